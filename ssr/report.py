"""The metrics files as pandas tables, the training curves as figures: the report's artefacts.

    ssr report --dataset demo                  # -> results/demo/report/
    snakemake --cores 2 --report results/demo_report.html --report-after-run report-demo

The metrics files are flat JSON (`results/{ds}_{seeds,miou,train}.json`): per row of a table a
key prefix (`cam_`, `crf_`, `{variant}_cam_`, ...), per metric a name, per statistic over seeds
a suffix (none for the mean, `_std`, `_min`, `_max`). `metric_frame` turns one file into a tidy
DataFrame (one line per row and metric: mean, std, min, max), a key going to the row of its
longest matching prefix (`cam_without_cmpa_miou` is the plain-CLIP row, not the CAM row);
`summary_table` and `class_table` pivot it into what a person reads, mean ± std per cell.
`write_report` writes them as HTML (what Snakemake's report shows), every number in one CSV,
and one figure per logged training quantity from the dvclive TSVs, the seeds overlaid.
"""

from __future__ import annotations

import html
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from ssr.figures import ROW_TITLES, curve_figure, replace_figures
from ssr.metrics import iou_key

STATS = ("mean", "std", "min", "max")
SUMMARY = ("miou", "precision", "recall", "pixel_accuracy", "confusion_ratio", "class_swap_ratio")
METRIC_TITLES = {"miou": "mIoU", "precision": "precision", "recall": "recall", "pixel_accuracy": "pixel accuracy",
                 "confusion_ratio": "confusion ratio (FP/TP)", "class_swap_ratio": "class swap"}
# Shares of pixels or images, shown in %; anything else (FP/TP, losses, ratios of mIoUs) as it is.
PERCENT = ("miou", "precision", "recall", "pixel_accuracy", "class_swap_ratio", "iou_")
MISSING = "—"
TABLES = ("seeds", "seeds_classes", "val", "val_classes", "train")


@dataclass(frozen=True)
class Row:
    """One row of a table: the metrics under key `prefix`, shown as `title` in `section`."""

    prefix: str
    section: str
    title: str


def describe(overrides: Mapping[str, object]) -> str:
    """A variant's params overrides in words: {cmpa.loss: feature} -> "cmpa.loss = feature"."""
    return ", ".join(f"{k} = {v}" for k, v in overrides.items())


def seed_rows(variants: Mapping[str, Mapping], cmpa_loss: str) -> list[Row]:
    """The rows of the seed ablation: Table 3's, Table 4's (each `cmpa_*` variant's CAM), then the other variants'."""
    rows = [Row(f"{r}_", "Table 3", ROW_TITLES[r]) for r in ("cam", "clip", "dino", "sgc", "method")]
    rows += [Row("cam_without_cmpa_", "Table 4", ROW_TITLES["cam_without_cmpa"]),
             Row("cam_", "Table 4", f"CAM, CMPA with the {cmpa_loss} loss (method)")]
    rows += [Row(f"{v}_cam_", "Table 4", f"CAM, {v} ({describe(o)})") for v, o in variants.items() if v.startswith("cmpa_")]
    for v, o in variants.items():
        if not v.startswith("cmpa_"):
            rows.append(Row(f"{v}_cam_", "variants", f"{v} ({describe(o)}): CAM"))
        rows.append(Row(f"{v}_method_", "variants", f"{v} ({describe(o)}): {ROW_TITLES['method']}"))
    return rows


def val_rows(variants: Mapping[str, Mapping], retrain: bool = False) -> list[Row]:
    """The rows of the val scores: each run without and with DenseCRF (and the retrained segmenter)."""
    rows = []
    for crf, section in (("", "without CRF"), ("crf_", "with DenseCRF")):
        rows.append(Row(crf, section, "method"))
        rows += [Row(f"{v}_{crf}", section, f"{v} ({describe(o)})") for v, o in variants.items()]
    if retrain:
        rows.append(Row("retrain_", "retrained segmenter", "the method's pseudo-labels of its first training seed"))
    return rows


def train_rows(variants: Mapping[str, Mapping]) -> list[Row]:
    return [Row("", "training", "method"), *(Row(f"{v}_", "training", f"{v} ({describe(o)})") for v, o in variants.items())]


def metric_frame(metrics: Mapping[str, object], rows: list[Row], names: list[str]) -> pd.DataFrame:
    """Flat metrics -> one line per (row, metric) found: section, row, metric, mean, std, min, max.

    names: the metric names to look for (keys are `{prefix}{name}` + a statistic suffix).
    A row whose `{prefix}available` is 0 (DINO without its weights) keeps a line with metric
    "available" and no numbers.
    """
    prefixes = {r.prefix for r in rows}
    records = []
    for row in rows:
        if metrics.get(f"{row.prefix}available") == 0:
            records.append({"section": row.section, "row": row.title, "metric": "available"})
            continue
        for name in names:
            key = f"{row.prefix}{name}"
            if key not in metrics or max((p for p in prefixes if key.startswith(p)), key=len) != row.prefix:
                continue
            records.append({"section": row.section, "row": row.title, "metric": name,
                            **{s: metrics.get(key if s == "mean" else f"{key}_{s}") for s in STATS}})
    frame = pd.DataFrame.from_records(records, columns=["section", "row", "metric", *STATS])
    frame[list(STATS)] = frame[list(STATS)].astype(float)
    return frame


def cell(metric: str, mean: float, std: float) -> str:
    """mean ± std as a person reads it: % for shares, 3 significant figures otherwise; no ± for a
    number every seed shares (a count)."""
    if np.isnan(mean):
        return MISSING
    if metric.startswith(PERCENT):
        text, spread = f"{100 * mean:.1f}", f"{100 * std:.1f}"
    else:
        text = f"{mean:.0f}" if float(mean).is_integer() else f"{mean:.3g}"
        spread = f"{std:.2g}"
    return text if np.isnan(std) else f"{text} ± {spread}"


def names_after(metrics: Mapping[str, object], rows: list[Row], start: str) -> list[str]:
    """The metric names beginning with `start` under any row's prefix, in file order (e.g. the final losses)."""
    prefixes = {r.prefix for r in rows}
    names = []
    for key in metrics:
        rest = key[len(max((p for p in prefixes if key.startswith(p)), key=len, default="")):]
        if rest.startswith(start) and not rest.endswith(("_std", "_min", "_max")):
            names.append(rest)
    return list(dict.fromkeys(names))


def _pivot(frame: pd.DataFrame, metrics: list[str], titles: list[str], rows: list[Row]) -> pd.DataFrame:
    cells = frame.assign(cell=[cell(m, a, s) for m, a, s in zip(frame["metric"], frame["mean"], frame["std"], strict=True)])
    index = pd.MultiIndex.from_tuples(list(dict.fromkeys((r.section, r.title) for r in rows)))
    table = cells.pivot(index=["section", "row"], columns="metric", values="cell") if len(cells) else pd.DataFrame()
    table = table.reindex(index=index, columns=metrics).astype(object).fillna(MISSING)
    table.columns = titles
    return table


def summary_table(frame: pd.DataFrame, rows: list[Row], metrics=SUMMARY) -> pd.DataFrame:
    """(section, row) x summary metric, "mean ± std" cells; a row without numbers shows "—"."""
    present = [m for m in metrics if (frame["metric"] == m).any()]
    return _pivot(frame, present, [metric_title(m) for m in present], rows)


def metric_title(metric: str) -> str:
    if metric.startswith("ratio_to_"):
        return f"mIoU / mIoU of {metric.removeprefix('ratio_to_')}"
    return METRIC_TITLES.get(metric, metric.removeprefix("final_").replace("_", " "))


def class_table(frame: pd.DataFrame, rows: list[Row], class_names: list[str]) -> pd.DataFrame:
    """(section, row) x class IoU, "mean ± std" cells; only the rows that have per-class IoUs."""
    keys = [iou_key(n) for n in class_names]
    have = frame[frame["metric"].isin(keys)]
    kept = [r for r in rows if ((have["section"] == r.section) & (have["row"] == r.title)).any()]
    return _pivot(have, keys, list(class_names), kept)


def html_page(title: str, note: str, table: pd.DataFrame) -> str:
    """A standalone page (Snakemake's report shows each result in a frame of its own)."""
    return f"""<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>
body {{ font-family: sans-serif; font-size: 14px; margin: 1em; }}
table {{ border-collapse: collapse; }}
th, td {{ border: 1px solid #ccc; padding: 3px 8px; }}
td {{ text-align: right; white-space: nowrap; font-variant-numeric: tabular-nums; }}
th {{ background: #f3f3f3; text-align: left; }}
</style></head><body>
<h3>{html.escape(title)}</h3>
<p>{html.escape(note)}</p>
{table.to_html(escape=True, border=0, na_rep=MISSING)}
</body></html>
"""


def read_curves(run_dirs: Mapping[str, Mapping[int, Path]]) -> dict[str, dict[str, dict[int, tuple[np.ndarray, np.ndarray]]]]:
    """dvclive curves -> quantity (e.g. "train/loss") -> run -> seed -> (steps (T,), values (T,)).

    run_dirs: run -> seed -> the run folder holding dvclive/. A run trained without dvclive
    (no TSVs) is left out.
    """
    curves: dict = {}
    for run, seeds in run_dirs.items():
        for seed, folder in seeds.items():
            root = folder / "dvclive" / "plots" / "metrics"
            for tsv in sorted(root.rglob("*.tsv")):
                name = tsv.relative_to(root).with_suffix("").as_posix()
                data = pd.read_csv(tsv, sep="\t")
                column = data.columns[-1]  # dvclive: step, then the value named after the quantity
                curves.setdefault(name, {}).setdefault(run, {})[seed] = (data["step"].to_numpy(), data[column].to_numpy())
    return curves


def write_report(out: Path, *, seeds: Mapping, miou: Mapping, train: Mapping, class_names: list[str],
                 variants: Mapping[str, Mapping], cmpa_loss: str, run_dirs: Mapping[str, Mapping[int, Path]]) -> list[Path]:
    """The report's artefacts in `out`: one HTML page per table (`TABLES`), metrics.csv (every
    number of every table, with min and max) and curves/{quantity}.png.

    seeds, miou, train: the contents of the dataset's metrics files; variants: run -> params
    overrides; run_dirs as in `read_curves`. Returns the files written.
    """
    classes = [iou_key(n) for n in class_names]
    seed_table_rows = seed_rows(variants, cmpa_loss)
    val_table_rows = val_rows(variants, retrain="retrain_miou" in miou)
    train_table_rows = train_rows(variants)
    specs = {  # name: (metrics, rows, metric names, title, note)
        "seeds": (seeds, seed_table_rows, [*SUMMARY, *classes], "Pseudo-labels: the seed ablation (paper Tables 3 and 4)",
                  f"Pseudo-labels of the {seeds.get('split', '?')} split ({seeds.get('images', '?')} images) against its "
                  f"ground truth; mean ± std over {seeds.get('seeds', '?')} training seeds; %, except the confusion ratio "
                  f"(false positives per true positive); {MISSING} marks a row that could not run (DINO without its weights)."),
        "val": (miou, val_table_rows, [*SUMMARY, *classes, *names_after(miou, val_table_rows, "ratio_to_")],
                "Segmentation of the val split, without and with DenseCRF",
                f"The decoder's predictions against ground truth; mean ± std over {miou.get('seeds', '?')} training seeds; "
                f"%, except the confusion ratio (false positives per true positive) and the mIoU ratios to a variant."),
        "train": (train, train_table_rows, ["iterations", "images_seen", *names_after(train, train_table_rows, "final_")],
                  "Training: the losses at the last iteration", f"mean ± std over {train.get('seeds', '?')} training seeds."),
    }
    out.mkdir(parents=True, exist_ok=True)
    written, frames = [], []
    for name, (metrics, rows, names, title, note) in specs.items():
        frame = metric_frame(metrics, rows, names)
        frames.append(frame.assign(table=name))
        pages = {name: (title, summary_table(frame, rows, [n for n in names if n not in classes]))}
        if name != "train":
            pages[f"{name}_classes"] = (f"{title}: IoU per class", class_table(frame, rows, class_names))
        for page, (heading, table) in pages.items():
            (out / f"{page}.html").write_text(html_page(heading, note, table))
            written.append(out / f"{page}.html")
    numbers = pd.concat(frames, ignore_index=True)[["table", "section", "row", "metric", *STATS]]
    numbers.to_csv(out / "metrics.csv", index=False)
    written.append(out / "metrics.csv")

    (out / "curves").mkdir(exist_ok=True)
    curves = {name.replace("/", "-") + ".png": curve_figure(name, runs) for name, runs in read_curves(run_dirs).items()}
    replace_figures(out / "curves", curves)
    return written + [out / "curves" / name for name in curves]
