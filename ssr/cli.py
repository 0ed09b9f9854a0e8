"""`ssr <stage>`: the one implementation of every DAG stage (Snakemake and DVC both call it).

Each stage reads params.yaml (`--params`), works on one dataset (`--dataset demo|voc|coco`)
and writes under data_root / results_root (the weights cache: weights_root). `ssr <stage> --help`
shows a stage's options and examples; `python -m ssr <stage>` is the same command.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import textwrap
import time
from pathlib import Path
from typing import TYPE_CHECKING

from ssr import __version__
from ssr.data.layout import DatasetError, DatasetLayout, read_json, write_json

if TYPE_CHECKING:
    from ssr.config import Params

DATASETS = ("demo", "voc", "coco")
logger = logging.getLogger(__name__)


class UsageError(ValueError):
    """Options that do not go together; the message says which."""


def demo_dir(params: Params, name: str) -> Path:
    """A demo backbone's folder (`name`: demo_clip or demo_dino): as configured (relative to the
    working directory) where its config file is, else the copy installed with the package."""
    from ssr.backbones import demo_asset_dir
    from ssr.weights import DEMO_FILES

    configured = Path(getattr(params, name).checkpoint).parent
    return configured if (configured / DEMO_FILES[name][0]).is_file() else demo_asset_dir(name)


def results_dir(params: Params, dataset: str) -> Path:
    return Path(params.results_root) / dataset


def run_dir(params: Params, dataset: str, run: str, seed: int) -> Path:
    """Where one training run of one seed lives: results/{ds}/{run}/seed{seed}/."""
    return results_dir(params, dataset) / run / f"seed{seed}"


def _device(arg: str | None):
    """The torch device named by --device (default: cuda if available); cuda without a GPU is an error saying so."""
    from ssr.checkpoint import resolve_device

    return resolve_device(arg)


def _backbones_by_run(params: Params, dataset: str, device):
    """run -> its frozen backbones, loaded once per distinct dataset config: a variant may change
    what they are built from (prompts, models, CAM weighting), and most variants change nothing.
    CLIP and DINO come from the weights cache (`ssr weights`), never from a download."""
    from ssr.model import build_backbones
    from ssr.weights import cached_models

    classes = DatasetLayout(params.dataset_root(dataset)).classes()
    loaded = {}

    def backbones(run: str):
        ds = params.for_run(dataset, run).dataset(dataset)
        key = ds.model_dump_json()
        if key not in loaded:
            loaded[key] = build_backbones(ds, classes[1:], demo_clip_dir=demo_dir(params, "demo_clip"),
                                          demo_dino_dir=demo_dir(params, "demo_dino"), device=device,
                                          **cached_models(ds, params.weights_root, dataset, device))
        return loaded[key]

    return backbones


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
    """Hold the stage to `threads` CPU threads: torch's pool, the superpixel processes, the DataLoader workers, the demo
    models' pretraining."""
    if threads < 1:
        raise UsageError(f"--threads: must be >= 1, got {threads}")
    import torch

    torch.set_num_threads(threads)
    if params is None:
        return params
    return params.model_copy(update={
        "superpixels": params.superpixels.model_copy(update={"workers": min(params.superpixels.workers, threads)}),
        "train": params.train.model_copy(update={"num_workers": min(params.train.num_workers, threads)}),
        "demo_clip": params.demo_clip.model_copy(update={"threads": threads}),
        "demo_dino": params.demo_dino.model_copy(update={"threads": threads})})


# ------------------------------------------------------------------ stages

def cmd_prepare(args, params: Params) -> None:
    root = params.dataset_root(args.dataset)
    if args.dataset == "demo":
        from ssr.data.demo import prepare_demo

        prepare_demo(root, params.demo, progress=args.progress)
    elif args.dataset == "voc":
        from ssr.data.voc import prepare_voc

        prepare_voc(root, params.download, archives=args.archives, progress=args.progress)
    else:
        from ssr.data.coco import prepare_coco

        prepare_coco(root, params.download, archives=args.archives, progress=args.progress)
    print(f"prepared {args.dataset} in {root}")


def cmd_demo_clip(args, params: Params) -> None:
    from ssr.demo_clip import pretrain

    out = Path(args.out) if args.out else Path(params.demo_clip.checkpoint).parent
    provenance = pretrain(out, params.demo_clip, params.demo, progress=args.progress)
    print(f"demo CLIP written to {out}: held-out zero-shot mAP {provenance['held_out_zero_shot_map']:.3f} "
          f"(raw cosine {provenance['held_out_zero_shot_map_cosine']:.3f}) "
          f"after {provenance['steps']} steps in {provenance['wall_seconds']:.0f} s")


def cmd_demo_dino(args, params: Params) -> None:
    from ssr.demo_dino import pretrain

    out = Path(args.out) if args.out else Path(params.demo_dino.checkpoint).parent
    provenance = pretrain(out, params.demo_dino, params.demo, clip_blocks=params.affinity.clip_blocks,
                          clip_dir=demo_dir(params, "demo_clip"), progress=args.progress)
    dino, clip = provenance["attention"]["dino"], provenance["attention"]["clip"]
    print(f"demo DINO written to {out}: held-out CLS-attention IoU {dino['cls_iou']:.3f} (demo CLIP {clip['cls_iou']:.3f}), "
          f"own-object attention ratio {dino['own_object_ratio']:.2f} (demo CLIP {clip['own_object_ratio']:.2f}) "
          f"after {provenance['steps']} steps in {provenance['wall_seconds']:.0f} s")


def cmd_weights(args, params: Params) -> None:
    from ssr.weights import fetch, manifest_path

    manifest = fetch(params, args.dataset, demo_dir(params, "demo_clip"), demo_dir(params, "demo_dino"))
    models = [f"{e['model']} ({e['source']})" for e in (manifest["clip"], manifest["dino"]) if e]
    print(f"{', '.join(models)}: ready; wrote {manifest_path(params.weights_root, args.dataset)}")


def cmd_superpixels(args, params: Params) -> None:
    from ssr.superpixels import build_superpixels

    layout = DatasetLayout(params.dataset_root(args.dataset))
    ds = params.dataset(args.dataset)
    ids = list(dict.fromkeys(layout.split(ds.train_split) + layout.split(ds.val_split)))
    tic = time.time()
    build_superpixels([(i, layout.image_path(i)) for i in ids], layout.superpixels_path, params.superpixels,
                      progress=args.progress)
    _write_timings(params, args.dataset, "superpixels", {"seconds": round(time.time() - tic, 1), "images": len(ids)})
    print(f"wrote {len(ids)} region maps to {layout.superpixels_path}")


def cmd_train(args, params: Params) -> None:
    import torch.distributed as dist

    from ssr.config import METHOD_RUN
    from ssr.metrics import aggregate_seeds
    from ssr.train import TIMING_KEYS, setup_distributed, train

    _, _, device = setup_distributed()
    device = _device(args.device) if args.device else device
    backbones = _backbones_by_run(params, args.dataset, device)
    summaries: dict[str, list[dict]] = {}
    for run in params.runs(args.dataset):
        for seed in _seeds(args, params):
            summary = train(params, args.dataset, run_dir(params, args.dataset, run, seed), seed=seed, run=run,
                            resume=args.resume, device=device, backbones=backbones(run), progress=args.progress)
            summaries.setdefault(run, []).append(summary)
    if dist.is_initialized() and dist.get_rank() != 0:
        return
    metrics = {}
    for run, runs in summaries.items():
        quality = aggregate_seeds([{k: v for k, v in s.items() if k not in TIMING_KEYS} for s in runs])
        metrics.update(quality if run == METHOD_RUN else _prefixed(run, quality))
    timings = {run: [{k: s[k] for k in TIMING_KEYS} for s in runs] for run, runs in summaries.items()}
    _write_timings(params, args.dataset, "train", timings)
    write_json(Path(params.results_root) / f"{args.dataset}_train.json", metrics)
    if not args.quiet:
        print(json.dumps(metrics, indent=1))


def cmd_pseudo_labels(args, params: Params) -> None:
    from ssr.config import METHOD_RUN
    from ssr.metrics import aggregate_seeds
    from ssr.pseudo_labels import seed_metrics

    device = _device(args.device)
    backbones = _backbones_by_run(params, args.dataset, device)
    ds = params.dataset(args.dataset)
    root = params.dataset_root(args.dataset)
    layout = DatasetLayout(root)
    split = args.split or ds.train_split
    score_ids = set(layout.split(ds.seed_split))
    outside = score_ids - set(layout.split(split))
    if outside:
        from ssr.config import ConfigError

        raise ConfigError(f"datasets.{args.dataset}.seed_split: {len(outside)} of its images are not in split {split!r} "
                          f"(e.g. {sorted(outside)[0]!r}); seeds are scored on the labels exported for {split!r}")
    per_seed, timings = [], {}
    for k, seed in enumerate(_seeds(args, params)):
        tic = time.time()
        out = run_dir(params, args.dataset, METHOD_RUN, seed)
        metrics = seed_metrics(backbones(METHOD_RUN), _load_run(params, args.dataset, METHOD_RUN, seed, device), params, root,
                               split, ds.long_side, device=device, score_ids=score_ids, export_dir=out / "pseudo_labels",
                               figures_dir=results_dir(params, args.dataset) / "figures" if k == 0 else None,
                               progress=args.progress)
        for run in params.runs(args.dataset)[1:]:
            variant = params.for_run(args.dataset, run)
            model = _load_run(params, args.dataset, run, seed, device)
            metrics.update(_prefixed(run, seed_metrics(backbones(run), model, variant, root, split,
                                                       variant.dataset(args.dataset).long_side, device=device,
                                                       score_ids=score_ids, rows=("cam", METHOD_RUN), progress=False)))
        per_seed.append(metrics)
        timings[f"seed{seed}"] = round(time.time() - tic, 1)
    _write_timings(params, args.dataset, "pseudo_labels", timings)
    write_json(Path(params.results_root) / f"{args.dataset}_seeds.json",
               {"split": ds.seed_split, "images": len(score_ids), **aggregate_seeds(per_seed)})


INFERENCE_OPTIONS = ("scales", "flip", "long_side", "crf", "crf_max_side")


def cmd_evaluate(args, params: Params | None) -> None:
    if not args.model:
        given = [f"--{name.replace('_', '-')}" for name in INFERENCE_OPTIONS if getattr(args, name) is not None]
        if given:
            raise UsageError(f"{', '.join(given)}: inference settings go with --model (the DAG's evaluation reads "
                             f"params.yaml's `infer`; label folders are only scored)")
    if args.pred or args.gt:
        _evaluate_folders(args)
        return
    if args.model:
        if args.dataset or args.seeds:
            raise UsageError("--model scores one run folder: --dataset and --seeds are for the DAG's evaluation")
        _evaluate_run_folder(args, params)
        return
    if not args.dataset:
        raise UsageError("give --dataset (the DAG's evaluation), --model RUN_DIR, or --pred DIR --gt DIR")
    if args.split:
        raise UsageError("--split goes with --model or --pred/--gt; the DAG evaluates datasets.{dataset}.val_split")
    import shutil

    from ssr.config import METHOD_RUN
    from ssr.crf import CrfPool
    from ssr.infer import evaluate_model
    from ssr.metrics import aggregate_seeds
    from ssr.model import amp_dtype

    device = _device(args.device)
    backbones = _backbones_by_run(params, args.dataset, device)
    ds = params.dataset(args.dataset)
    root = params.dataset_root(args.dataset)
    # Each model's predictions, image by image, until the stage completes: a retry reuses them.
    partial = results_dir(params, args.dataset) / "predictions.partial"
    summary_keys = ("miou", "precision", "recall", "confusion_ratio", "class_swap_ratio")
    per_seed, timings = [], {}
    pool = CrfPool(_crf_workers(args))
    for k, seed in enumerate(_seeds(args, params)):
        tic = time.time()
        metrics = {}
        for run in params.runs(args.dataset):
            run_params = params.for_run(args.dataset, run)
            model = _load_run(params, args.dataset, run, seed, device)
            predictions = results_dir(params, args.dataset) / "predictions" if k == 0 and run == METHOD_RUN else None
            scores = evaluate_model(backbones(run), model, root, ds.val_split, run_params.dataset(args.dataset).long_side,
                                    run_params.infer, device=device, progress=args.progress if run == METHOD_RUN else False,
                                    tables=not args.quiet and run == METHOD_RUN, pred_dir=predictions,
                                    figures=params.pseudo_labels.figures, autocast_dtype=amp_dtype(params.train, device),
                                    store=partial / run / f"seed{seed}", crf_pool=pool, batch_size=args.batch_size)
            if run == METHOD_RUN:
                metrics.update(scores)
                continue
            metrics.update(_prefixed(run, {key: scores.get(key) for key in (*summary_keys, *(f"crf_{s}" for s in summary_keys))
                                           if key in scores}))
            if run_params.train.supervision == "gt":
                for crf in ("", "crf_"):
                    if scores.get(f"{crf}miou") and metrics.get(f"{crf}miou") is not None:
                        metrics[f"{crf}ratio_to_{run}"] = metrics[f"{crf}miou"] / scores[f"{crf}miou"]
        per_seed.append(metrics)
        timings[f"seed{seed}"] = round(time.time() - tic, 1)
    pool.close()
    out = aggregate_seeds(per_seed)
    if params.retrain.enabled:
        out.update(_evaluate_retrained(params, args.dataset, device))
    _write_timings(params, args.dataset, "evaluate", timings)
    write_json(args.out or Path(params.results_root) / f"{args.dataset}_miou.json", out)
    shutil.rmtree(partial, ignore_errors=True)


def _crf_workers(args) -> int:
    """DenseCRF processes: --workers, else --threads (Snakemake's threads for the stage), else the usable CPUs."""
    from ssr.config import usable_cpus

    if getattr(args, "workers", None) is not None:
        if args.workers < 0:
            raise UsageError(f"--workers: must be >= 0, got {args.workers}")
        return args.workers
    if getattr(args, "threads", None):
        return args.threads
    return usable_cpus()


def _optional_params(args) -> Params | None:
    """--params FILE, else ./params.yaml where there is one: predict and export need it only to find the demo CLIP."""
    from ssr.config import load_params

    path = args.params_file or ("params.yaml" if Path("params.yaml").is_file() else None)
    return load_params(path) if path else None


def _load_trained(args, params: Params | None, device):
    """`ssr.load_model` of --model; with params, CLIP and DINO from its weights cache (as the DAG's
    stages load them, offline) and the demo's tiny ones from where params put them."""
    from ssr.checkpoint import load_model
    from ssr.weights import DEMO_FILES

    if params is None:
        return load_model(args.model, device=device)
    return load_model(args.model, device=device, weights_root=params.weights_root,
                      **{f"{name}_dir": demo_dir(params, name) for name in DEMO_FILES})


def _inference_options(args, trained):
    """The model's recorded inference settings with the command's --scales, --flip, --crf, --crf-max-side, --long-side."""
    from ssr.infer import inference_params

    return inference_params(trained, scales=args.scales, flip=args.flip, crf=args.crf, crf_max_side=args.crf_max_side,
                            long_side=args.long_side)


def _evaluate_run_folder(args, params: Params) -> None:
    """`ssr evaluate --model RUN_DIR [--split NAME]`: one run on any split, outside the DAG's outputs."""
    import torch

    from ssr.crf import CrfPool
    from ssr.infer import evaluate_model, saved_predictions, write_submission

    device = _device(args.device)
    trained = _load_trained(args, params, device)
    dataset = trained.config["dataset"]
    split = args.split or trained.config["dataset_params"]["val_split"]
    infer, long_side = _inference_options(args, trained)
    out = Path(args.out) if args.out else Path(args.model) / "evaluate" / split
    bf16 = device.type == "cuda" and trained.config["identity"].get("train.amp_bf16", False)
    with CrfPool(_crf_workers(args) if infer.crf else 0) as pool:
        scores = evaluate_model(trained.backbones, trained.model, params.dataset_root(dataset), split, long_side, infer,
                                device=device, store=out, progress=args.progress, tables=not args.quiet,
                                autocast_dtype=torch.bfloat16 if bf16 else None, crf_pool=pool, batch_size=args.batch_size)
    saved = saved_predictions(out, infer.crf)
    if scores:
        write_json(out / "metrics.json", {"model": str(args.model), "split": split, **scores})
        if not args.quiet:
            crf = f", with DenseCRF {scores['crf_miou']:.2%}" if infer.crf else ""
            print(f"{dataset} {split}: mIoU {scores['miou']:.2%}{crf}; predictions and metrics.json in {out}")
    elif not args.quiet:
        print(f"{dataset} {split}: no ground truth to score; predictions in {saved}")
    if split == "test":
        ids = DatasetLayout(params.dataset_root(dataset)).split(split)
        target = results_dir(params, dataset) / "test_submission"
        folder = write_submission(saved, ids, target)
        print(f"VOC test-server submission: {len(ids)} class-indexed PNGs in {folder}; pack it with\n"
              f"  tar -czf {dataset}_test_submission.tgz -C {target} results")


def _evaluate_folders(args) -> None:
    """`ssr evaluate --pred DIR --gt DIR`: two folders of label PNGs, matched by the predictions' ids or a --split."""
    from ssr.metrics import evaluate_label_dirs, format_table

    if not (args.pred and args.gt):
        raise UsageError("--pred and --gt go together")
    pred, gt = Path(args.pred), Path(args.gt)
    names = None
    if args.classes:
        names = read_json(args.classes)
    elif args.model:
        from ssr.checkpoint import read_config

        names = read_config(args.model)["classes"]
    elif args.num_classes:
        names = [str(i) for i in range(args.num_classes)]
    elif (gt.parent / "classes.json").is_file():
        names = DatasetLayout(gt.parent).classes()  # --gt is a dataset's labels/ folder
    if names is None:
        raise UsageError("give --num-classes, --classes FILE or --model RUN_DIR (or a --gt folder with classes.json beside it)")
    if args.num_classes and args.num_classes != len(names):
        raise UsageError(f"--num-classes {args.num_classes} but {len(names)} class names")
    if args.split:
        ids = DatasetLayout(gt.parent).split(args.split)  # splits/ beside labels/, in the canonical layout
    else:
        if not pred.is_dir():
            raise DatasetError(f"{pred}: no such folder of predictions")
        ids = sorted(p.stem for p in pred.glob("*.png"))
        if not ids:
            raise DatasetError(f"{pred}: no label PNGs (predictions) in this folder")
    scores = evaluate_label_dirs(pred, gt, len(names), names, ids=ids)
    if not args.quiet:
        print(format_table(scores, names))
        print(f"{len(ids)} predictions scored" + (f" (split {args.split})" if args.split else " (every PNG in --pred)"))
    if args.out:
        write_json(args.out, scores)


def _evaluate_retrained(params: Params, dataset: str, device) -> dict:
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
    from ssr.config import METHOD_RUN
    from ssr.retrain import retrain

    ds = params.dataset(args.dataset)
    root = params.dataset_root(args.dataset)
    layout = DatasetLayout(root)
    out = results_dir(params, args.dataset)
    labels = run_dir(params, args.dataset, METHOD_RUN, ds.seeds[0]) / "pseudo_labels"
    (out / "retrain" / "DISABLED.txt").unlink(missing_ok=True)
    stats = retrain(root, labels, layout.split(ds.train_split), out / "retrain" / "model.pt", params.retrain,
                    num_classes=len(layout.classes()), device=str(_device(args.device)), progress=args.progress,
                    num_workers=params.train.num_workers)
    write_json(out_json, {"retrain_enabled": 1, **stats})


def cmd_report(args, params: Params) -> None:
    from ssr.report import build_report

    out = Path(args.out) if args.out else results_dir(params, args.dataset) / "report"
    written = build_report(params, args.dataset, out, params_path=Path(args.params), seeds=_seeds(args, params))
    print(f"wrote {len(written)} report files to {out}")


def cmd_headline(args, params: Params) -> None:
    from ssr.data.layout import atomic_path
    from ssr.report import headline_markdown, headline_metrics, read_metrics

    results = Path(params.results_root)
    variants = params.dataset(args.dataset).variants
    headline = headline_metrics(read_metrics(results, args.dataset, "seeds", "pseudo-labels"),
                                read_metrics(results, args.dataset, "miou", "evaluate"), variants)
    text = headline_markdown(headline, args.dataset, variants, params.cmpa.loss)
    with atomic_path(results_dir(params, args.dataset) / "headline.md") as tmp:
        tmp.write_text(text)
    write_json(results / f"{args.dataset}_headline.json", headline)
    if not args.quiet:
        print(text)


def cmd_predict(args, params: Params | None) -> None:
    from tqdm.contrib.logging import logging_redirect_tqdm

    from ssr.images import find_images
    from ssr.predict_files import predict_files

    params = _optional_params(args)
    files, problems, passed_over = find_images(args.inputs)
    if passed_over:
        logger.info("passed over %d files without an image suffix in the folders given (e.g. %s)", len(passed_over),
                    passed_over[0])
    for problem in problems:
        logger.error("%s; skipped", problem)
    device = _device(args.device)
    trained = _load_trained(args, params, device)
    infer, long_side = _inference_options(args, trained)
    out = Path(args.out)
    with logging_redirect_tqdm([logging.getLogger("ssr")]):
        report = predict_files(trained, files, out, infer=infer, long_side=long_side, batch_size=args.batch_size,
                               workers=_crf_workers(args), probabilities=args.probabilities, overwrite=args.overwrite,
                               background=args.background, progress=args.progress)
    failed = len(problems) + len(report.failed)
    if not args.quiet:
        print(f"{len(report.written)} images segmented into {out}" +
              (f", {len(report.skipped)} already there" if report.skipped else "") + (f", {failed} failed" if failed else ""))
    if failed:
        raise DatasetError(f"{failed} of {len(problems) + len(files)} inputs could not be segmented (each named above); "
                           f"the others are in {out}")


def cmd_export(args, params: Params | None) -> None:
    try:
        import onnx  # noqa: F401
        import onnxscript  # noqa: F401
    except ModuleNotFoundError as err:
        raise UsageError(f"ssr export needs onnx and onnxscript ({err}): pip install 'ssr[export]'") from err
    from ssr.export import export_onnx

    params = _optional_params(args)
    trained = _load_trained(args, params, "cpu")
    out = export_onnx(trained, args.out)
    if not args.quiet:
        print(f"wrote {out}: {trained.config['dataset']} model, {len(trained.classes)} classes, input (B, 3, H, W) RGB "
              f"in [0, 1] with H and W multiples of {trained.backbones.patch_size}")


def cmd_schema(args, params: Params | None) -> None:
    from ssr.config import json_schema_text

    text = json_schema_text()
    if not args.out:
        sys.stdout.write(text)
        return
    out = Path(args.out)
    if args.check:
        if not out.is_file() or out.read_text() != text:
            raise UsageError(f"{out}: out of date with ssr/config.py; run `ssr schema --out {out}` (make schema)")
        print(f"{out} is current")
        return
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print(f"wrote {out}")


# ------------------------------------------------------------------ parser

STAGES = {
    # name: (function, one-line help, description, examples, which options: "params", "dataset" (required), "dataset?")
    "prepare": (cmd_prepare, "download or read the official archives and write data/{dataset}/ in the canonical layout",
                "Downloads are resumable and MD5-checked; --archives reads archives or extracted trees instead, and the "
                "demo is drawn procedurally from the `demo` params. Writes images/, labels/, splits/, classes.json and "
                "image_labels.json under data_root/{dataset}.",
                ["ssr prepare --dataset demo",
                 "ssr prepare --dataset voc --archives ~/archives    # VOCtrainval_11-May-2012.tar, benchmark.tgz"],
                ("params", "dataset")),
    "demo-clip": (cmd_demo_clip, "pretrain the demo's tiny CLIP on demo captions (its product is committed)",
                  "Trains open_clip's CLIP class with the `demo_clip` params on captioned demo images and writes an "
                  "open_clip local-dir folder (config, weights, provenance.json). Resumes from resume.pt in that folder.",
                  ["ssr demo-clip --threads 2", "ssr demo-clip --out /tmp/demo_clip"], ("params",)),
    "demo-dino": (cmd_demo_dino, "pretrain the demo's tiny DINO ViT by self-distillation (not used by default)",
                  "Trains a timm ViT with the `demo_dino` params on unlabelled demo images and scores its attention "
                  "against the demo CLIP's.",
                  ["ssr demo-dino --threads 1", "ssr demo-dino --out /tmp/demo_dino"], ("params",)),
    "weights": (cmd_weights, "fetch the dataset's CLIP and DINO into the weights cache (weights_root), for jobs without internet",
                "Downloads through open_clip and timm into weights_root/open_clip/{model}/{tag}/ and "
                "weights_root/timm/{model}/ (folders their local loaders read), then writes weights_root/{dataset}.json "
                "(each model's folder and SHA-256). Run it where there is internet (a cluster's login node); train, "
                "pseudo-labels and evaluate then load from the cache only. Nothing is downloaded for what is already "
                "there, for the demo's committed CLIP or for weights files named in the params.",
                ["ssr weights --dataset voc",
                 "SSR_WEIGHTS_ROOT=/shared/ssr-weights ssr weights --dataset coco"],
                ("params", "dataset")),
    "superpixels": (cmd_superpixels, "SLIC + colour k-means region maps of the train and val images (SGC, paper Eq. 8)",
                    "Writes data_root/{dataset}/superpixels.h5 (one map per image, the `superpixels` params as file "
                    "attributes); resumes from superpixels.h5.partial.h5.",
                    ["ssr superpixels --dataset demo", "ssr superpixels --dataset voc --threads 16"], ("params", "dataset")),
    "train": (cmd_train, "train SSR: every run (the method, then datasets.{dataset}.variants) and seed",
              "Writes results_root/{dataset}/{run}/seed{S}/ (model.safetensors, model.json, dvclive/, checkpoint.pt) and "
              "results_root/{dataset}_train.json. On SIGTERM it writes a checkpoint and exits with 130.",
              ["ssr train --dataset demo",
               "ssr train --dataset voc --resume --device cuda:0",
               "torchrun --standalone --nproc_per_node 4 -m ssr train --dataset coco --resume"],
              ("params", "dataset")),
    "pseudo-labels": (cmd_pseudo_labels, "export the refined-CAM pseudo-labels and score the seed ablation (Table 3)",
                      "Writes results_root/{dataset}/method/seed{S}/pseudo_labels/*.png, results_root/{dataset}_seeds.json "
                      "and the CAM figures.",
                      ["ssr pseudo-labels --dataset demo", "ssr pseudo-labels --dataset voc --seeds 0"],
                      ("params", "dataset")),
    "retrain": (cmd_retrain, "optional: train a fully supervised segmenter on the pseudo-labels (retrain.enabled)",
                "With retrain.enabled false it only writes {\"retrain_enabled\": 0} to results_root/{dataset}_retrain.json.",
                ["ssr retrain --dataset voc --device cuda"], ("params", "dataset")),
    "evaluate": (cmd_evaluate, "score the trained models on val (mIoU with and without DenseCRF), one run folder on "
                               "any split, or two folders of label PNGs",
                 "With --dataset (the DAG's stage): multi-scale + flip inference on the val split of every run and seed, "
                 "results_root/{dataset}_miou.json and the prediction figures. With --model RUN_DIR: that one run on "
                 "--split (default val), its predictions and metrics.json in RUN_DIR/evaluate/{split}/ (--out), nothing "
                 "of the DAG's touched; --split test also writes a VOC test-server submission to "
                 "results_root/{dataset}/test_submission/. With --pred/--gt: scores two folders of label PNGs matched by "
                 "the predictions' file names or the ids of --split (255 ignored), with no params file. DenseCRF runs in "
                 "--workers processes; predictions already written by an interrupted run are reused.",
                 ["ssr evaluate --dataset demo",
                  "ssr evaluate --model results/voc/method/seed0 --split val --device cuda --workers 8",
                  "ssr evaluate --model results/voc/method/seed0 --split test    # -> results/voc/test_submission/",
                  "ssr evaluate --pred preds/ --gt data/voc/labels --split val --out scores.json"],
                 ("params", "dataset?")),
    "headline": (cmd_headline, "the few numbers a run is judged by, from the seeds and val metrics files",
                 "Writes results_root/{dataset}_headline.json: val mIoU without and with DenseCRF, the seed ablation's "
                 "Table 3 rows and the share of the fully supervised bound, each as mean and std over seeds (a DVC "
                 "metric that `dvc metrics diff` shows in a screen), and the same beside the paper's figures as a "
                 "Markdown table, results_root/{dataset}/headline.md.",
                 ["ssr headline --dataset demo"], ("params", "dataset")),
    "predict": (cmd_predict, "segment image files with a trained run: label PNGs and overlays",
                "For each image (files, folders, glob patterns) writes OUT/{stem}.png, a palette PNG of class indices at "
                "the image's size in the dataset's colours, and OUT/{stem}_overlay.jpg (with --probabilities also "
                "OUT/{stem}.npz). JPEG, PNG, palette, greyscale, 16-bit and EXIF-rotated images are read as shown; "
                "transparency is composited on --background. Inference settings default to the run's model.json. "
                "Images whose outputs exist are skipped (--overwrite redoes them), so a rerun resumes; a file that "
                "cannot be read is named and skipped, and the exit status is then non-zero.",
                ["ssr predict --model results/demo/method/seed0 --out masks/ photos/",
                 "ssr predict --model results/voc/method/seed0 --out masks/ 'photos/**/*.jpg' --device cuda --batch-size 8",
                 "ssr predict --model results/voc/method/seed0 --out masks/ big.jpg --crf-max-side 768 --probabilities"],
                ()),
    "export": (cmd_export, "write a run's network (CLIP image encoder + decoder, up to the logits) as ONNX",
               "Input \"image\": float32 (B, 3, H, W) RGB in [0, 1], H and W any multiples of the patch size; output "
               "\"logits\": (B, C + 1, H / patch, W / patch). CLIP's normalisation is inside the graph; the metadata holds "
               "the classes, patch size and recorded inference settings. Needs the `export` extra (onnx, onnxscript).",
               ["ssr export --model results/demo/method/seed0 --out demo.onnx"],
               ()),
    "report": (cmd_report, "the HTML report's pages: tables beside the paper's figures, curves, params, gallery",
               "Writes results_root/{dataset}/report/, which `snakemake --report` collects (docs/workflow.md).",
               ["ssr report --dataset demo", "ssr report --dataset voc --out /tmp/voc_report"], ("params", "dataset")),
    "schema": (cmd_schema, "write params.yaml's JSON Schema (types, bounds, choices, descriptions, P/W/O sources)",
               "Generated from ssr/config.py; the Snakefile validates params.yaml against the committed copy.",
               ["ssr schema | less", "ssr schema --out workflow/schemas/params.schema.json    # make schema",
                "ssr schema --out workflow/schemas/params.schema.json --check"], ()),
}

MAIN_EPILOG = """\
examples:
  ssr prepare --dataset demo && ssr superpixels --dataset demo && ssr train --dataset demo
  ssr weights --dataset voc && ssr evaluate --dataset voc --device cuda
  ssr predict --model results/demo/method/seed0 --out masks/ photos/
  ssr schema --out workflow/schemas/params.schema.json

Every stage reads params.yaml (--params); data_root, results_root and weights_root may also come
from params.local.yaml beside it or SSR_DATA_ROOT / SSR_RESULTS_ROOT / SSR_WEIGHTS_ROOT.
Snakemake and DVC run these same commands (README, docs/workflow.md).
"""


def _common_options() -> argparse.ArgumentParser:
    """Options every subcommand takes: output and logging."""
    common = argparse.ArgumentParser(add_help=False)
    out = common.add_argument_group("output")
    out.add_argument("-v", "--verbose", action="count", default=0,
                     help="more log detail: -v debug messages of ssr, -vv also of the libraries it uses")
    out.add_argument("-q", "--quiet", action="store_true",
                     help="no tables or summaries, and only warnings and errors in the log (bars: see --no-progress)")
    out.add_argument("--no-progress", dest="progress", action="store_false",
                     help="no progress bars or progress lines (where stderr is not a terminal, e.g. in a Snakemake "
                          "log, there is no bar but a line every progress_interval seconds of params.yaml)")
    return common


def build_parser() -> argparse.ArgumentParser:
    common = _common_options()
    parser = argparse.ArgumentParser(prog="ssr", description=__doc__, epilog=MAIN_EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"ssr {__version__}")
    sub = parser.add_subparsers(dest="stage", required=True, metavar="STAGE")
    parsers = {}
    for name, (func, help, description, examples, options) in STAGES.items():
        epilog = "examples:\n" + "\n".join(f"  {line}" for line in examples)
        p = sub.add_parser(name, parents=[common], help=help, epilog=epilog,
                           description=help[0].upper() + help[1:] + ".\n\n" + textwrap.fill(description, 100),
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        if "params" in options:
            p.add_argument("--params", default="params.yaml", metavar="FILE",
                           help="the params file (default: params.yaml); data_root, results_root and weights_root also "
                                "come from params.local.yaml beside it and SSR_DATA_ROOT / SSR_RESULTS_ROOT / "
                                "SSR_WEIGHTS_ROOT")
            p.add_argument("--threads", type=int, metavar="N",
                           help="CPU threads this stage may use: torch's intra-op threads, and at most N superpixel "
                                "processes (default: torch's own choice and superpixels.workers); Snakemake passes its "
                                "{threads}")
        if "dataset" in options or "dataset?" in options:
            p.add_argument("--dataset", choices=DATASETS, required="dataset" in options,
                           help="which dataset: a key of `datasets` in params.yaml")
        p.set_defaults(func=func)
        parsers[name] = p
    device = "torch device: cpu, cuda, cuda:1 (default: cuda if available)"
    seeds = "training seeds to use (default: datasets.{dataset}.seeds)"

    p = parsers["prepare"]
    p.add_argument("--archives", type=Path, metavar="DIR",
                   help="folder holding the official archives or an extracted tree: nothing is downloaded")
    for name, product in (("demo-clip", "demo_clip"), ("demo-dino", "demo_dino")):
        parsers[name].add_argument("--out", metavar="DIR", help=f"output folder (default: the folder of {product}.checkpoint)")
    p = parsers["train"]
    p.add_argument("--resume", action="store_true",
                   help="continue each run from its results/{dataset}/{run}/seed{N}/checkpoint.pt (refused if written "
                        "under other params)")
    p.add_argument("--seeds", type=int, nargs="+", metavar="S", help=seeds)
    p.add_argument("--device", help=device + "; torchrun sets it per rank")
    p = parsers["pseudo-labels"]
    p.add_argument("--split", help="split to label (default: datasets.{dataset}.train_split)")
    p.add_argument("--seeds", type=int, nargs="+", metavar="S", help=seeds)
    p.add_argument("--device", help=device)
    p = parsers["evaluate"]
    p.add_argument("--seeds", type=int, nargs="+", metavar="S", help=seeds)
    p.add_argument("--device", help=device)
    p.add_argument("--model", metavar="RUN_DIR", help="score this one run folder (model.json + model.safetensors) "
                                                      "instead of the DAG's runs; its classes name the --pred/--gt scores")
    p.add_argument("--split", metavar="NAME", help="with --model: the split to predict and score (default: the model's "
                                                   "val split; `test` writes a VOC submission); with --pred/--gt: score "
                                                   "exactly the ids of GT/../splits/NAME.txt")
    _inference_arguments(p)
    folders = p.add_argument_group("scoring two folders of label PNGs (no params needed)")
    folders.add_argument("--pred", metavar="DIR", help="folder of predicted label PNGs; its file names are the ids scored")
    folders.add_argument("--gt", metavar="DIR", help="folder of ground-truth label PNGs, e.g. data/voc/labels")
    folders.add_argument("--num-classes", type=int, metavar="N", help="classes, background included (255 is ignore; "
                                                                      "default: from --classes, --model or GT/../classes.json)")
    folders.add_argument("--classes", metavar="FILE", help="classes.json naming the classes (optional)")
    folders.add_argument("--out", metavar="PATH",
                         help="--pred/--gt: metrics JSON to write; --model: output folder (default RUN_DIR/evaluate/{split}); "
                              "--dataset: metrics JSON instead of results_root/{dataset}_miou.json")
    p = parsers["predict"]
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="image files, folders (their images) or glob patterns")
    p.add_argument("--model", required=True, metavar="RUN_DIR", help="a trained run folder (model.json + model.safetensors)")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder")
    p.add_argument("--device", help=device)
    _inference_arguments(p)
    p.add_argument("--probabilities", action="store_true",
                   help="also write OUT/{stem}.npz: per-class probabilities (C + 1, H, W) float16 and the class names")
    p.add_argument("--background", choices=("white", "black"), default="white",
                   help="what transparent pixels (RGBA, LA, transparent palette entries) are composited on (default: white)")
    p.add_argument("--overwrite", action="store_true", help="segment images whose outputs already exist again")
    p = parsers["export"]
    p.add_argument("--model", required=True, metavar="RUN_DIR", help="a trained run folder (model.json + model.safetensors)")
    p.add_argument("--out", required=True, metavar="FILE", help="the ONNX file to write, e.g. model.onnx")
    for name in ("predict", "export"):
        parsers[name].add_argument("--params", dest="params_file", metavar="FILE",
                                   help="read where the demo's tiny CLIP lives from this params file (default: ./params.yaml "
                                        "if there is one, else the copy installed with ssr); nothing else is read from it")
        parsers[name].add_argument("--threads", type=int, metavar="N", help="CPU threads for torch (default: torch's choice)")
    parsers["retrain"].add_argument("--device", help=device)
    p = parsers["report"]
    p.add_argument("--out", metavar="DIR", help="output folder (default: results_root/{dataset}/report/)")
    p.add_argument("--seeds", type=int, nargs="+", metavar="S", help="draw these seeds' training curves "
                                                                      "(default: datasets.{dataset}.seeds)")
    p = parsers["schema"]
    p.add_argument("--out", metavar="FILE", help="write the schema here (default: print it)")
    p.add_argument("--check", action="store_true", help="write nothing; fail if --out is not current")
    return parser


def _inference_arguments(p: argparse.ArgumentParser) -> None:
    """The inference options of predict and evaluate; each defaults to the run's model.json (DAG: params.yaml's `infer`)."""
    group = p.add_argument_group("inference (default: as recorded in the run's model.json)")
    group.add_argument("--batch-size", type=int, default=1, metavar="N",
                       help="images per network pass, among those that share a size (default: 1)")
    group.add_argument("--scales", type=float, nargs="+", metavar="S", help="scales averaged, e.g. 1.0 0.75")
    group.add_argument("--flip", action=argparse.BooleanOptionalAction, help="also average each image's mirror image")
    group.add_argument("--long-side", type=int, metavar="PX", help="the long side images are resized to for the network")
    group.add_argument("--crf", action=argparse.BooleanOptionalAction, help="DenseCRF post-processing")
    group.add_argument("--crf-max-side", type=int, metavar="PX",
                       help="run DenseCRF at most at this long side, then upsample its probabilities (0: full size)")
    group.add_argument("--workers", type=int, metavar="N",
                       help="DenseCRF processes (default: --threads if given, else the usable CPUs; 0: in this process)")


_HANDLER_FLAG = "_ssr_cli"


def configure_logging(verbose: int = 0, quiet: bool = False) -> None:
    """The `ssr` loggers to stderr: INFO by default, DEBUG with -v, WARNING with --quiet; -vv also the libraries'.

    Called once per command; calling it again (tests run several commands in one process)
    replaces the handler it added before.
    """
    package = logging.getLogger("ssr")
    for handler in [h for h in package.handlers if getattr(h, _HANDLER_FLAG, False)]:
        package.removeHandler(handler)
    handler = logging.StreamHandler(sys.stderr)
    setattr(handler, _HANDLER_FLAG, True)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s" if verbose
                                           else "%(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
    package.addHandler(handler)
    package.setLevel(logging.WARNING if quiet else logging.DEBUG if verbose else logging.INFO)
    package.propagate = False
    if verbose > 1:
        logging.basicConfig(level=logging.DEBUG, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure_logging(args.verbose, args.quiet)
    stage = f"ssr {args.stage}"
    try:
        from ssr.config import ConfigError, load_params

        params = None
        # Scoring two label folders, or writing the schema, needs no params file.
        if hasattr(args, "params") and not (args.stage == "evaluate" and (args.pred or args.gt)):
            params = load_params(args.params)
            if getattr(args, "dataset", None):
                # Said on every stage: `dvc exp run -S sgc.rho=...` does not reach a dataset that overrides it.
                shadowed = params.shadowed(args.dataset)
                if shadowed:
                    logger.info("datasets.%s.overrides sets %s", args.dataset,
                                ", ".join(f"{key} {value!r} (top level {top!r})" for key, top, value in shadowed))
                params = params.for_dataset(args.dataset)
        if getattr(args, "threads", None) is not None:
            params = _limit_threads(args.threads, params)
        if params is not None and args.progress:
            from ssr.progress import Progress

            # A log line every progress_interval seconds where no bar is drawn (Snakemake, DVC, SLURM logs).
            args.progress = Progress(params.progress_interval)
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
