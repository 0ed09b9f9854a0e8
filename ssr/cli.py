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
    return Path(__file__).parent / "assets" / "demo_clip"


def results_dir(params: Params, dataset: str) -> Path:
    return Path(params.results_root) / dataset


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
    build_superpixels([(i, layout.image_path(i)) for i in ids], layout.superpixels_path, params.superpixels, progress=not args.quiet)
    print(f"wrote {len(ids)} region maps to {layout.superpixels_path}")


def cmd_train(args, params: Params) -> None:
    from ssr.train import train

    out = results_dir(params, args.dataset)
    summary = train(params, args.dataset, out, resume=args.resume, device=args.device,
                    progress=not args.quiet, demo_clip_dir=demo_clip_dir(params))
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_rank() == 0:
        write_json(Path(params.results_root) / f"{args.dataset}_train.json", summary)
        print(json.dumps(summary, indent=1))


def cmd_pseudo_labels(args, params: Params) -> None:
    from ssr.pseudo_labels import export_pseudo_labels
    from ssr.train import load_trained

    device = _device(args.device)
    backbones = _backbones(params, args.dataset, device)
    out = results_dir(params, args.dataset)
    model = load_trained(Path(args.model) if args.model else out / "model.pt", backbones, params, device)
    ds = params.dataset(args.dataset)
    split = args.split or ds.train_split
    tic = time.time()
    metrics = export_pseudo_labels(backbones, model, params, params.dataset_root(args.dataset), split, ds.long_side,
                                   out / "pseudo_labels", device=device, figures_dir=out / "figures", progress=not args.quiet)
    metrics["seconds"] = round(time.time() - tic, 1)
    write_json(Path(params.results_root) / f"{args.dataset}_seeds.json", metrics)


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
    from ssr.train import load_trained

    device = _device(args.device)
    backbones = _backbones(params, args.dataset, device)
    out = results_dir(params, args.dataset)
    model = load_trained(Path(args.model) if args.model else out / "model.pt", backbones, params, device)
    ds = params.dataset(args.dataset)
    tic = time.time()
    metrics = evaluate_model(backbones, model, params.dataset_root(args.dataset), ds.val_split, ds.long_side, params.infer,
                             device=device, pred_dir=out / "predictions", progress=not args.quiet, autocast_dtype=_autocast(params, device))
    metrics["seconds"] = round(time.time() - tic, 1)
    if params.retrain.enabled:
        metrics.update(_evaluate_retrained(params, args.dataset, device, quiet=args.quiet))
    write_json(args.out or Path(params.results_root) / f"{args.dataset}_miou.json", metrics)


def _evaluate_retrained(params: Params, dataset: str, device, quiet: bool) -> dict:
    import numpy as np

    from ssr.data.dataset import WholeImages
    from ssr.metrics import confusion_matrix, segmentation_scores
    from ssr.retrain import load_segmenter, predict

    path = results_dir(params, dataset) / "retrain" / "model.pt"
    model = load_segmenter(path, device)
    data = WholeImages(params.dataset_root(dataset), params.dataset(dataset).val_split, long_side=10**6, patch_size=1)
    conf = np.zeros((len(data.classes), len(data.classes) + 1), np.int64)
    for i in range(len(data)):
        image_id = data.ids[i]
        gt_path = data.layout.label_path(image_id)
        if gt_path.exists():
            from ssr.data.layout import read_image, read_label_png

            conf += confusion_matrix(predict(model, read_image(data.layout.image_path(image_id))), read_label_png(gt_path), len(data.classes))
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
    stats = retrain(root, out / "pseudo_labels", layout.split(ds.train_split), out / "retrain" / "model.pt",
                    model_name=r.model, num_classes=len(layout.classes()), iterations=r.iterations, batch_size=r.batch_size,
                    lr=r.lr, crop_size=r.crop_size, scale_range=(r.scale_min, r.scale_max), momentum=r.momentum,
                    weight_decay=r.weight_decay, weights_backbone=r.weights_backbone or None,
                    device=str(_device(args.device)), progress=not args.quiet)
    write_json(out_json, {"retrain_enabled": 1, **stats})


# ------------------------------------------------------------------ parser

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ssr", description=__doc__)
    sub = parser.add_subparsers(dest="stage", required=True)

    def stage(name: str, func, help: str, dataset: bool = True, dataset_required: bool = True):
        p = sub.add_parser(name, help=help)
        p.add_argument("--params", default="params.yaml", help="the params file (default: params.yaml)")
        p.add_argument("--quiet", action="store_true", help="no progress bars or tables")
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
    p.add_argument("--resume", action="store_true", help="continue from results/{dataset}/checkpoint.pt")
    p.add_argument("--device", help="cpu, cuda, cuda:1 (default: cuda if available); torchrun sets it per rank")
    p = stage("pseudo-labels", cmd_pseudo_labels, "export refined-CAM pseudo-labels and the seed ablation")
    p.add_argument("--model", help="trained model (default: results/{dataset}/model.pt)")
    p.add_argument("--split", help="split to label (default: the dataset's train split)")
    p.add_argument("--device")
    p = stage("evaluate", cmd_evaluate, "score the trained model on val, or score label PNG folders", dataset_required=False)
    p.add_argument("--model")
    p.add_argument("--device")
    p.add_argument("--pred", help="folder of predicted label PNGs")
    p.add_argument("--gt", help="folder of ground-truth label PNGs")
    p.add_argument("--num-classes", type=int)
    p.add_argument("--classes", help="classes.json naming the classes (optional)")
    p.add_argument("--out", help="metrics JSON to write")
    p = stage("retrain", cmd_retrain, "optional: train a fully supervised segmenter on the pseudo-labels")
    p.add_argument("--device")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    stage = f"ssr {args.stage}"
    try:
        # Scoring two label folders needs no params file.
        folders_only = args.stage == "evaluate" and (args.pred or args.gt)
        params = None if folders_only else load_params(args.params)
        if params is not None and getattr(args, "dataset", None):
            params.dataset(args.dataset)
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
