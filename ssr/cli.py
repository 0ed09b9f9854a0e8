"""`ssr <stage>`: the one implementation of every DAG stage (Snakemake and DVC both call it)."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from ssr.config import ConfigError, Params, load_params
from ssr.data.layout import DatasetError, DatasetLayout, read_json, write_json

DATASETS = ("demo", "voc", "coco")


def demo_clip_dir(params: Params) -> Path:
    """The demo CLIP folder: as configured (relative to the working directory), else the installed copy."""
    configured = Path(params.demo_clip.checkpoint).parent
    if (configured / "open_clip_config.json").is_file():
        return configured
    from ssr.backbones import demo_asset_dir

    return demo_asset_dir("demo_clip")


def results_dir(params: Params, dataset: str) -> Path:
    return Path(params.results_root) / dataset


def run_dir(params: Params, dataset: str, run: str, seed: int) -> Path:
    """Where one training run of one seed lives: results/{ds}/{run}/seed{seed}/."""
    return results_dir(params, dataset) / run / f"seed{seed}"


def _device(arg: str | None):
    import torch

    if arg:
        return torch.device(arg)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _backbones(params: Params, dataset: str, device):
    from ssr.model import build_backbones

    classes = DatasetLayout(params.dataset_root(dataset)).classes()
    return build_backbones(params.dataset(dataset), classes[1:], demo_clip_dir=demo_clip_dir(params), device=device)


def _autocast(params: Params, device):
    import torch

    return torch.bfloat16 if device.type == "cuda" and params.train.amp_bf16 else None


def _seeds(args, params: Params) -> list[int]:
    return list(args.seeds) if getattr(args, "seeds", None) else list(params.dataset(args.dataset).seeds)


def _load_run(params: Params, dataset: str, run: str, seed: int, device):
    """The trained model of one run and seed, refused if trained under other params."""
    from ssr.checkpoint import check_identity, read_model

    path = run_dir(params, dataset, run, seed)
    model, config = read_model(path, device)
    check_identity(config, params.for_run(dataset, run), dataset, path / "model.json")
    return model


def _write_timings(params: Params, dataset: str, stage: str, timings: dict) -> None:
    """Wall times go beside the results, never into a DVC metrics file: they differ on every run."""
    write_json(results_dir(params, dataset) / "timings" / f"{stage}.json", timings)


def _prefixed(prefix: str, metrics: dict) -> dict:
    return {f"{prefix}_{k}": v for k, v in metrics.items()}


def _limit_threads(threads: int, params: Params | None) -> Params | None:
    """Hold the stage to `threads` CPU threads: torch's pool, the superpixel processes, the demo CLIP's pretraining."""
    if threads < 1:
        raise ConfigError(f"--threads: must be >= 1, got {threads}")
    import dataclasses

    import torch

    torch.set_num_threads(threads)
    if params is None:
        return params
    return dataclasses.replace(params, superpixels=dataclasses.replace(params.superpixels, workers=min(params.superpixels.workers, threads)),
                               demo_clip=dataclasses.replace(params.demo_clip, threads=threads))


# ------------------------------------------------------------------ stages

def cmd_prepare(args, params: Params) -> None:
    root = params.dataset_root(args.dataset)
    if args.dataset == "demo":
        from ssr.data.demo import prepare_demo

        prepare_demo(root, params.demo, progress=not args.quiet)
    elif args.dataset == "voc":
        from ssr.data.voc import prepare_voc

        prepare_voc(root, params.download, archives=args.archives, progress=not args.quiet)
    else:
        from ssr.data.coco import prepare_coco

        prepare_coco(root, params.download, archives=args.archives, progress=not args.quiet)
    print(f"prepared {args.dataset} in {root}")


def cmd_demo_clip(args, params: Params) -> None:
    from ssr.demo_clip import pretrain

    out = Path(args.out) if args.out else Path(params.demo_clip.checkpoint).parent
    provenance = pretrain(out, params.demo_clip, params.demo, progress=not args.quiet)
    print(f"demo CLIP written to {out}: held-out zero-shot mAP {provenance['held_out_zero_shot_map']:.3f} "
          f"(raw cosine {provenance['held_out_zero_shot_map_cosine']:.3f}) "
          f"after {provenance['steps']} steps in {provenance['wall_seconds']:.0f} s")


def cmd_demo_dino(args, params: Params) -> None:
    from ssr.demo_dino import pretrain

    out = Path(args.out) if args.out else Path(params.demo_dino.checkpoint).parent
    provenance = pretrain(out, params.demo_dino, params.demo, clip_dir=demo_clip_dir(params), progress=not args.quiet)
    quality = provenance["attention_iou"]
    print(f"demo DINO written to {out}: held-out attention IoU {quality['dino']:.3f} (demo CLIP {quality['clip']:.3f}) "
          f"after {provenance['steps']} steps in {provenance['wall_seconds']:.0f} s")


def cmd_superpixels(args, params: Params) -> None:
    from ssr.superpixels import build_superpixels

    layout = DatasetLayout(params.dataset_root(args.dataset))
    ds = params.dataset(args.dataset)
    ids = list(dict.fromkeys(layout.split(ds.train_split) + layout.split(ds.val_split)))
    tic = time.time()
    build_superpixels([(i, layout.image_path(i)) for i in ids], layout.superpixels_path, params.superpixels, progress=not args.quiet)
    _write_timings(params, args.dataset, "superpixels", {"seconds": round(time.time() - tic, 1), "images": len(ids)})
    print(f"wrote {len(ids)} region maps to {layout.superpixels_path}")


TIMING_KEYS = ("train_seconds", "images_per_second")


def cmd_train(args, params: Params) -> None:
    import torch.distributed as dist

    from ssr.metrics import aggregate_seeds
    from ssr.train import setup_distributed, train

    _, _, device = setup_distributed()
    device = _device(args.device) if args.device else device
    backbones = _backbones(params, args.dataset, device)
    summaries: dict[str, list[dict]] = {}
    for run in params.runs(args.dataset):
        for seed in _seeds(args, params):
            summary = train(params.for_run(args.dataset, run), args.dataset, run_dir(params, args.dataset, run, seed), seed=seed,
                            run=run, resume=args.resume, device=device, backbones=backbones, progress=not args.quiet)
            summaries.setdefault(run, []).append(summary)
    if dist.is_initialized() and dist.get_rank() != 0:
        return
    metrics = {}
    for run, runs in summaries.items():
        quality = aggregate_seeds([{k: v for k, v in s.items() if k not in TIMING_KEYS} for s in runs])
        metrics.update(quality if run == "method" else _prefixed(run, quality))
    _write_timings(params, args.dataset, "train", {run: [{k: s[k] for k in TIMING_KEYS} for s in runs] for run, runs in summaries.items()})
    write_json(Path(params.results_root) / f"{args.dataset}_train.json", metrics)
    if not args.quiet:
        print(json.dumps(metrics, indent=1))


def cmd_pseudo_labels(args, params: Params) -> None:
    from ssr.metrics import aggregate_seeds
    from ssr.pseudo_labels import seed_metrics

    device = _device(args.device)
    backbones = _backbones(params, args.dataset, device)
    ds = params.dataset(args.dataset)
    root = params.dataset_root(args.dataset)
    layout = DatasetLayout(root)
    split = args.split or ds.train_split
    score_ids = set(layout.split(ds.seed_split))
    outside = score_ids - set(layout.split(split))
    if outside:
        raise ConfigError(f"datasets.{args.dataset}.seed_split: {len(outside)} of its images are not in split {split!r} "
                          f"(e.g. {sorted(outside)[0]!r}); seeds are scored on the labels exported for {split!r}")
    per_seed, timings = [], {}
    for k, seed in enumerate(_seeds(args, params)):
        tic = time.time()
        out = run_dir(params, args.dataset, "method", seed)
        metrics = seed_metrics(backbones, _load_run(params, args.dataset, "method", seed, device), params, root, split,
                               ds.long_side, device=device, score_ids=score_ids, export_dir=out / "pseudo_labels",
                               figures_dir=results_dir(params, args.dataset) / "figures" if k == 0 else None,
                               progress=not args.quiet)
        for run in params.runs(args.dataset)[1:]:
            variant = params.for_run(args.dataset, run)
            metrics.update(_prefixed(run, seed_metrics(backbones, _load_run(params, args.dataset, run, seed, device), variant, root,
                                                       split, ds.long_side, device=device, score_ids=score_ids, rows=("cam", "method"),
                                                       progress=False)))
        per_seed.append(metrics)
        timings[f"seed{seed}"] = round(time.time() - tic, 1)
    _write_timings(params, args.dataset, "pseudo_labels", timings)
    write_json(Path(params.results_root) / f"{args.dataset}_seeds.json",
               {"split": ds.seed_split, "images": len(score_ids), **aggregate_seeds(per_seed)})


def cmd_evaluate(args, params: Params | None) -> None:
    if args.pred or args.gt:
        from ssr.metrics import evaluate_label_dirs, format_table

        if not (args.pred and args.gt and args.num_classes and args.out):
            raise ConfigError("evaluate: --pred, --gt, --num-classes and --out go together")
        names = read_json(args.classes) if args.classes else [str(i) for i in range(args.num_classes)]
        scores = evaluate_label_dirs(Path(args.pred), Path(args.gt), args.num_classes, names)
        print(format_table(scores, names))
        write_json(args.out, scores)
        return
    if not args.dataset:
        raise ConfigError("evaluate: give --dataset, or --pred/--gt/--num-classes/--out")
    from ssr.infer import evaluate_model
    from ssr.metrics import aggregate_seeds

    device = _device(args.device)
    backbones = _backbones(params, args.dataset, device)
    ds = params.dataset(args.dataset)
    root = params.dataset_root(args.dataset)
    summary_keys = ("miou", "precision", "recall", "confusion_ratio", "class_swap_ratio")
    per_seed, timings = [], {}
    for k, seed in enumerate(_seeds(args, params)):
        tic = time.time()
        metrics = {}
        for run in params.runs(args.dataset):
            scores = evaluate_model(backbones, _load_run(params, args.dataset, run, seed, device), root, ds.val_split, ds.long_side,
                                    params.infer, device=device, progress=not args.quiet and run == "method",
                                    pred_dir=results_dir(params, args.dataset) / "predictions" if k == 0 and run == "method" else None,
                                    autocast_dtype=_autocast(params, device))
            if run == "method":
                metrics.update(scores)
                continue
            metrics.update(_prefixed(run, {key: scores.get(key) for key in (*summary_keys, *(f"crf_{s}" for s in summary_keys))
                                           if key in scores}))
            if params.for_run(args.dataset, run).train.supervision == "gt":
                for crf in ("", "crf_"):
                    if scores.get(f"{crf}miou") and metrics.get(f"{crf}miou") is not None:
                        metrics[f"{crf}ratio_to_{run}"] = metrics[f"{crf}miou"] / scores[f"{crf}miou"]
        per_seed.append(metrics)
        timings[f"seed{seed}"] = round(time.time() - tic, 1)
    out = aggregate_seeds(per_seed)
    if params.retrain.enabled:
        out.update(_evaluate_retrained(params, args.dataset, device, quiet=args.quiet))
    _write_timings(params, args.dataset, "evaluate", timings)
    write_json(args.out or Path(params.results_root) / f"{args.dataset}_miou.json", out)


def _evaluate_retrained(params: Params, dataset: str, device, quiet: bool) -> dict:
    import numpy as np

    from ssr.data.dataset import WholeImages
    from ssr.metrics import confusion_matrix, segmentation_scores
    from ssr.retrain import load_segmenter, predict

    path = results_dir(params, dataset) / "retrain" / "model.pt"
    model = load_segmenter(path, device)
    data = WholeImages(params.dataset_root(dataset), params.dataset(dataset).val_split, long_side=10**6, patch_size=1)
    conf = np.zeros((len(data.classes), len(data.classes) + 1), np.int64)
    for image_id in data.ids:
        original, gt = data.original(image_id)
        if gt is not None:
            conf += confusion_matrix(predict(model, original), gt, len(data.classes))
    return {f"retrain_{k}": v for k, v in segmentation_scores(conf, data.classes).items()}


def cmd_retrain(args, params: Params) -> None:
    out_json = Path(params.results_root) / f"{args.dataset}_retrain.json"
    if not params.retrain.enabled:
        note = "retrain.enabled is false in params.yaml: nothing trained (set it to true to run the multi-stage protocol)"
        print(note)
        # DVC has no conditional stages, so its retrain stage always runs and needs its output folder.
        out = results_dir(params, args.dataset) / "retrain"
        out.mkdir(parents=True, exist_ok=True)
        (out / "DISABLED.txt").write_text(note + "\n")
        write_json(out_json, {"retrain_enabled": 0})
        return
    from ssr.retrain import retrain

    r = params.retrain
    ds = params.dataset(args.dataset)
    root = params.dataset_root(args.dataset)
    layout = DatasetLayout(root)
    out = results_dir(params, args.dataset)
    labels = run_dir(params, args.dataset, "method", ds.seeds[0]) / "pseudo_labels"
    stats = retrain(root, labels, layout.split(ds.train_split), out / "retrain" / "model.pt",
                    model_name=r.model, num_classes=len(layout.classes()), iterations=r.iterations, batch_size=r.batch_size,
                    lr=r.lr, crop_size=r.crop_size, scale_range=(r.scale_min, r.scale_max), momentum=r.momentum,
                    weight_decay=r.weight_decay, weights_backbone=r.weights_backbone or None,
                    device=str(_device(args.device)), progress=not args.quiet)
    write_json(out_json, {"retrain_enabled": 1, **stats})


def cmd_report(args, params: Params) -> None:
    from ssr.report import write_report

    results = Path(params.results_root)
    written = write_report(
        Path(args.out) if args.out else results_dir(params, args.dataset) / "report",
        seeds=read_json(results / f"{args.dataset}_seeds.json"), miou=read_json(results / f"{args.dataset}_miou.json"),
        train=read_json(results / f"{args.dataset}_train.json"), class_names=DatasetLayout(params.dataset_root(args.dataset)).classes(),
        variants=params.dataset(args.dataset).variants, cmpa_loss=params.cmpa.loss,
        run_dirs={run: {seed: run_dir(params, args.dataset, run, seed) for seed in _seeds(args, params)} for run in params.runs(args.dataset)})
    print(f"wrote {len(written)} report files to {written[0].parent}")


# ------------------------------------------------------------------ parser

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ssr", description=__doc__)
    sub = parser.add_subparsers(dest="stage", required=True)

    def stage(name: str, func, help: str, dataset: bool = True, dataset_required: bool = True):
        p = sub.add_parser(name, help=help)
        p.add_argument("--params", default="params.yaml", help="the params file (default: params.yaml)")
        p.add_argument("--quiet", action="store_true", help="no progress bars or tables")
        p.add_argument("--threads", type=int, metavar="N",
                       help="CPU threads this stage may use: torch's intra-op threads, and at most N superpixel processes "
                            "(default: torch's own choice and superpixels.workers); Snakemake passes its {threads}")
        if dataset:
            p.add_argument("--dataset", choices=DATASETS, required=dataset_required)
        p.set_defaults(func=func)
        return p

    p = stage("prepare", cmd_prepare, "download/convert a dataset into data/{dataset}/")
    p.add_argument("--archives", type=Path, help="directory holding the official archives or an extracted tree (skips downloading)")
    p = stage("demo-clip", cmd_demo_clip, "pretrain the demo's tiny CLIP (its product is committed)", dataset=False)
    p.add_argument("--out", help="output folder (default: the params' demo_clip.checkpoint folder)")
    p = stage("demo-dino", cmd_demo_dino, "pretrain the demo's tiny DINO (its product is committed)", dataset=False)
    p.add_argument("--out", help="output folder (default: the params' demo_dino.checkpoint folder)")
    stage("superpixels", cmd_superpixels, "offline SLIC + colour k-means region maps to HDF5")
    p = stage("train", cmd_train, "single-stage SSR training")
    p.add_argument("--resume", action="store_true", help="continue each run from its results/{dataset}/{run}/seed{N}/checkpoint.pt")
    p.add_argument("--seeds", type=int, nargs="+", help="train these seeds (default: datasets.{dataset}.seeds)")
    p.add_argument("--device", help="cpu, cuda, cuda:1 (default: cuda if available); torchrun sets it per rank")
    p = stage("pseudo-labels", cmd_pseudo_labels, "export refined-CAM pseudo-labels and the seed ablation")
    p.add_argument("--split", help="split to label (default: the dataset's train split)")
    p.add_argument("--seeds", type=int, nargs="+", help="score these seeds (default: datasets.{dataset}.seeds)")
    p.add_argument("--device")
    p = stage("evaluate", cmd_evaluate, "score the trained model on val, or score label PNG folders", dataset_required=False)
    p.add_argument("--seeds", type=int, nargs="+", help="evaluate these seeds (default: datasets.{dataset}.seeds)")
    p.add_argument("--device")
    p.add_argument("--pred", help="folder of predicted label PNGs")
    p.add_argument("--gt", help="folder of ground-truth label PNGs")
    p.add_argument("--num-classes", type=int)
    p.add_argument("--classes", help="classes.json naming the classes (optional)")
    p.add_argument("--out", help="metrics JSON to write")
    p = stage("retrain", cmd_retrain, "optional: train a fully supervised segmenter on the pseudo-labels")
    p.add_argument("--device")
    p = stage("report", cmd_report, "tables (HTML, CSV) of every metrics file and figures of the training curves, for "
                                    "`snakemake --report`")
    p.add_argument("--out", help="output folder (default: results/{dataset}/report/)")
    p.add_argument("--seeds", type=int, nargs="+", help="draw these seeds' training curves (default: datasets.{dataset}.seeds)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    stage = f"ssr {args.stage}"
    try:
        # Scoring two label folders needs no params file.
        folders_only = args.stage == "evaluate" and (args.pred or args.gt)
        params = None if folders_only else load_params(args.params)
        if params is not None and getattr(args, "dataset", None):
            params = params.for_dataset(args.dataset)
        if args.threads is not None:
            params = _limit_threads(args.threads, params)
        args.func(args, params)
    except (ConfigError, DatasetError, FileNotFoundError, NotImplementedError, ValueError) as err:
        print(f"{stage}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as err:
        print(f"{stage}: interrupted: {err}", file=sys.stderr)
        return 130
    except RuntimeError as err:
        print(f"{stage}: error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
