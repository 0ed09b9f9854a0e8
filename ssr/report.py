"""The metrics files as pandas tables beside the paper's figures, the training curves as figures,
the params the runs used and a gallery of the stages' figures: the report's artefacts.

    ssr report --dataset demo                  # -> results/demo/report/
    snakemake --cores 2 --report results/demo_report.html --report-after-run report-demo

The metrics files are flat JSON (`results/{ds}_{seeds,miou,train}.json`): per row of a table a
key prefix (`cam_`, `crf_`, `{variant}_cam_`, ...), per metric a name, per statistic over seeds
a suffix (none for the mean, `_std`, `_min`, `_max`). `metric_frame` turns one file into a tidy
DataFrame (one line per row and metric: mean, std, min, max, and the paper's figure where the
row has one), a key going to the row of its longest matching prefix (`cam_without_cmpa_miou` is
the plain-CLIP row, not the CAM row); `summary_table` and `class_table` pivot it into what a
person reads, mean ± std per cell. `write_report` writes the pages (`PAGES`), every number in
one CSV, one figure per logged training quantity (the seeds overlaid) and one of our figures
against the paper's; `build_report` reads what it needs for a dataset. `headline_metrics` is the
few numbers a run is judged by, the `headline` stage's metrics file.
"""

from __future__ import annotations

import base64
import html
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from ssr.curves import CURVES
from ssr.figures import ROW_TITLES, Bar, comparison_figure, curve_figure, replace_figures, save_figure
from ssr.metrics import iou_key

STATS = ("mean", "std", "min", "max")
SUMMARY = ("miou", "precision", "recall", "pixel_accuracy", "confusion_ratio", "class_swap_ratio")
METRIC_TITLES = {"miou": "mIoU", "precision": "precision", "recall": "recall", "pixel_accuracy": "pixel accuracy",
                 "confusion_ratio": "confusion ratio (FP/TP)", "class_swap_ratio": "class swap"}
# Shares of pixels or images, and ratios of mIoUs, shown in %; anything else (FP/TP, losses) as it is.
PERCENT = ("miou", "precision", "recall", "pixel_accuracy", "class_swap_ratio", "iou_", "ratio_to_")
MISSING = "—"
# The pages of results/{ds}/report/ (workflow/pipeline.py REPORT_PAGES declares them).
PAGES = ("headline", "seeds", "seeds_classes", "val", "val_classes", "train", "params", "gallery")
COMPARISON = "paper.png"  # our figures against the paper's

# ------------------------------------------------------------------ the paper's figures

# paper/METHOD.md, "Results to compare against", as shares (the metrics files' scale).
PAPER_TABLE3 = {"cam": 0.633, "clip": 0.746, "dino": 0.763, "sgc": 0.787}  # VOC train seeds; the CAM is CMPA's
PAPER_TABLE4 = {"none": 0.586, "feature": 0.535, "in_modal": 0.578, "cross_modal": 0.633}  # VOC CAM by CMPA loss
# val without and with DenseCRF (Table 5 is the CRF row: its mIoU is the paper's 79.5); COCO's 50.6
# and Table 6's bound are not said to be with or without CRF and stand beside the CRF row, as 79.5 does.
PAPER_VAL = {"voc": {"": {"miou": 0.782},
                     "crf_": {"miou": 0.795, "precision": 0.879, "recall": 0.891, "confusion_ratio": 0.198}},
             "coco": {"crf_": {"miou": 0.506}}}
PAPER_BOUND = {"miou": 0.823, "share": 0.974}  # Table 6: a fully supervised DeepLabV2 ViT-B on VOC val; SSR's share of it
# Variant params that change only the decoder's supervision: the CMPA heads, so the CAMs and the
# seed rows, train exactly as the method's (L_seg does not reach them), so they get no seed rows.
DECODER_ONLY_KEYS = frozenset({"train.supervision"})


def paper_dataset(dataset: str) -> tuple[str | None, str]:
    """(the paper's dataset to compare `dataset` with, the words for its column): the demo's
    counterparts are VOC's (its tables are the paper's, on shapes)."""
    if dataset == "demo":
        return "voc", "paper, VOC"
    return (dataset, "paper") if dataset in PAPER_VAL else (None, "paper")


@dataclass(frozen=True)
class Row:
    """One row of a table: the metrics under key `prefix`, shown as `title` in `section`;
    `paper`: (metric, the paper's figure) where the row has a counterpart in the paper."""

    prefix: str
    section: str
    title: str
    paper: tuple[tuple[str, float], ...] = ()


def describe(overrides: Mapping[str, object]) -> str:
    """A variant's params overrides in words: {cmpa.loss: feature} -> "cmpa.loss = feature"."""
    return ", ".join(f"{k} = {v}" for k, v in overrides.items())


def is_bound(overrides: Mapping[str, object]) -> bool:
    """A variant trained on the true masks: the fully supervised bound (Table 6)."""
    return overrides.get("train.supervision") == "gt"


def seed_rows(variants: Mapping[str, Mapping], cmpa_loss: str, paper: str | None = None) -> list[Row]:
    """The rows of the seed ablation: Table 3's, Table 4's (each `cmpa_*` variant's CAM), then the
    other variants' (none for a variant that changes the decoder's supervision only: its seeds
    are the method's). `paper` ("voc" or None): whose figures stand beside them."""
    voc = paper == "voc"

    def table4(loss: str) -> tuple:
        return (("miou", PAPER_TABLE4[loss]),) if voc and loss in PAPER_TABLE4 else ()

    # Table 3's rows are the paper's on a model trained with the cross-modal loss
    table3 = voc and cmpa_loss == "cross_modal"
    rows = [Row(f"{r}_", "Table 3", ROW_TITLES[r], (("miou", PAPER_TABLE3[r]),) if table3 and r in PAPER_TABLE3 else ())
            for r in ("cam", "clip", "dino", "sgc", "method")]
    rows += [Row("cam_without_cmpa_", "Table 4", ROW_TITLES["cam_without_cmpa"], table4("none")),
             Row("cam_", "Table 4", f"CAM, CMPA with the {cmpa_loss} loss (method)", table4(cmpa_loss))]
    rows += [Row(f"{v}_cam_", "Table 4", f"CAM, {v} ({describe(o)})",
                 table4(o["cmpa.loss"]) if set(o) == {"cmpa.loss"} else ())
             for v, o in variants.items() if v.startswith("cmpa_")]
    for v, o in variants.items():
        if set(o) <= DECODER_ONLY_KEYS:
            continue
        if not v.startswith("cmpa_"):
            rows.append(Row(f"{v}_cam_", "variants", f"{v} ({describe(o)}): CAM"))
        rows.append(Row(f"{v}_method_", "variants", f"{v} ({describe(o)}): {ROW_TITLES['method']}"))
    return rows


def val_rows(variants: Mapping[str, Mapping], retrain: bool = False, paper: str | None = None) -> list[Row]:
    """The rows of the val scores: each run without and with DenseCRF (and the retrained segmenter);
    `paper` ("voc", "coco" or None): whose figures stand beside them (Tables 5 and 6 for VOC)."""
    figures = PAPER_VAL.get(paper, {})
    rows = []
    for crf, section in (("", "without CRF"), ("crf_", "with DenseCRF")):
        method = dict(figures.get(crf, {}))
        if paper == "voc" and crf:
            method.update({f"ratio_to_{v}": PAPER_BOUND["share"] for v, o in variants.items() if is_bound(o)})
        rows.append(Row(crf, section, "method", tuple(method.items())))
        rows += [Row(f"{v}_{crf}", section, f"{v} ({describe(o)})",
                     (("miou", PAPER_BOUND["miou"]),) if paper == "voc" and crf and is_bound(o) else ())
                 for v, o in variants.items()]
    if retrain:
        rows.append(Row("retrain_", "retrained segmenter", "the method's pseudo-labels of its first training seed"))
    return rows


def train_rows(variants: Mapping[str, Mapping]) -> list[Row]:
    return [Row("", "training", "method"), *(Row(f"{v}_", "training", f"{v} ({describe(o)})") for v, o in variants.items())]


# ------------------------------------------------------------------ tables

def metric_frame(metrics: Mapping[str, object], rows: list[Row], names: list[str]) -> pd.DataFrame:
    """Flat metrics -> one line per (row, metric) found: section, row, metric, mean, std, min, max, paper.

    names: the metric names to look for (keys are `{prefix}{name}` + a statistic suffix).
    A row whose `{prefix}available` is 0 (DINO without its weights) keeps a line with metric
    "available" and no numbers; `paper` is the row's paper figure for that metric, or NaN.
    """
    prefixes = {r.prefix for r in rows}
    records = []
    for row in rows:
        if metrics.get(f"{row.prefix}available") == 0:
            records.append({"section": row.section, "row": row.title, "metric": "available"})
            for name, value in row.paper:
                records.append({"section": row.section, "row": row.title, "metric": name, "paper": value})
            continue
        paper = dict(row.paper)
        for name in names:
            key = f"{row.prefix}{name}"
            if key not in metrics or max((p for p in prefixes if key.startswith(p)), key=len) != row.prefix:
                continue
            records.append({"section": row.section, "row": row.title, "metric": name, "paper": paper.get(name),
                            **{s: metrics.get(key if s == "mean" else f"{key}_{s}") for s in STATS}})
    frame = pd.DataFrame.from_records(records, columns=["section", "row", "metric", *STATS, "paper"])
    frame[[*STATS, "paper"]] = frame[[*STATS, "paper"]].astype(float)
    return frame


def _number(metric: str, value: float) -> str:
    if metric.startswith(PERCENT):
        return f"{100 * value:.1f}"
    return f"{value:.0f}" if float(value).is_integer() else f"{value:.3g}"


def cell(metric: str, mean: float, std: float, low: float = np.nan, high: float = np.nan) -> str:
    """mean ± std as a person reads it: % for shares, 3 significant figures otherwise. No ± where
    every seed has the same value (`low` == `high`: one seed, or a row that training does not
    change) or there is no spread at all (a count)."""
    if np.isnan(mean):
        return MISSING
    text = _number(metric, mean)
    if np.isnan(std) or low == high:
        return text
    spread = f"{100 * std:.1f}" if metric.startswith(PERCENT) else f"{std:.2g}"
    return f"{text} ± {spread}"


def names_after(metrics: Mapping[str, object], rows: list[Row], start: str) -> list[str]:
    """The metric names beginning with `start` under any row's prefix, in file order (e.g. the final losses)."""
    prefixes = {r.prefix for r in rows}
    names = []
    for key in metrics:
        rest = key[len(max((p for p in prefixes if key.startswith(p)), key=len, default="")):]
        if rest.startswith(start) and not rest.endswith(("_std", "_min", "_max")):
            names.append(rest)
    return list(dict.fromkeys(names))


def _pivot(frame: pd.DataFrame, metrics: list[str], titles: list[str], rows: list[Row], value: str = "cell") -> pd.DataFrame:
    cells = frame.assign(cell=[cell(m, a, s, lo, hi) for m, a, s, lo, hi in zip(
        frame["metric"], frame["mean"], frame["std"], frame["min"], frame["max"], strict=True)])
    cells = cells.assign(paper=[_number(m, p) if not np.isnan(p) else "" for m, p in zip(cells["metric"], cells["paper"],
                                                                                          strict=True)])
    index = pd.MultiIndex.from_tuples(list(dict.fromkeys((r.section, r.title) for r in rows)))
    table = cells.pivot(index=["section", "row"], columns="metric", values=value) if len(cells) else pd.DataFrame()
    table = table.reindex(index=index, columns=metrics).astype(object).fillna(MISSING if value == "cell" else "")
    table.columns = titles
    return table


def summary_table(frame: pd.DataFrame, rows: list[Row], metrics=SUMMARY, paper_label: str = "paper") -> pd.DataFrame:
    """(section, row) x summary metric, "mean ± std" cells; a row without numbers shows "—". A
    metric with a paper figure in any row gets a column "{metric} ({paper_label})" beside it."""
    present = [m for m in metrics if (frame["metric"] == m).any() and frame.loc[frame["metric"] == m, "mean"].notna().any()]
    table = _pivot(frame, present, [metric_title(m) for m in present], rows)
    papers = [m for m in present if frame.loc[frame["metric"] == m, "paper"].notna().any()]
    if papers:
        paper = _pivot(frame, papers, [f"{metric_title(m)} ({paper_label})" for m in papers], rows, value="paper")
        for m in reversed(papers):
            title = f"{metric_title(m)} ({paper_label})"
            table.insert(table.columns.get_loc(metric_title(m)) + 1, title, paper[title])
    return table


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


# ------------------------------------------------------------------ the headline

def headline_sources(variants: Mapping[str, Mapping]) -> list[tuple[str, str, str, str, str]]:
    """(name, words, table, row prefix, metric) of each headline number: val mIoU without and with
    DenseCRF, the seed ablation's Table 3 rows, the method's share of each fully supervised bound."""
    out = [("val_miou", "val mIoU", "val", "", "miou"), ("val_crf_miou", "val mIoU with DenseCRF", "val", "crf_", "miou")]
    out += [(f"seeds_{r}_miou", f"seeds mIoU: {ROW_TITLES[r]}", "seeds", f"{r}_", "miou") for r in ("cam", "clip", "dino", "sgc")]
    for v, o in variants.items():
        if is_bound(o):
            out += [(f"val_share_of_{v}", f"val mIoU / mIoU of {v}", "val", "", f"ratio_to_{v}"),
                    (f"val_crf_share_of_{v}", f"val mIoU / mIoU of {v}, with DenseCRF", "val", "crf_", f"ratio_to_{v}")]
    return out


def headline_metrics(seeds: Mapping, miou: Mapping, variants: Mapping[str, Mapping]) -> dict:
    """The few numbers a run is judged by (`headline_sources`), each its mean and std over seeds,
    flat, so that `dvc metrics diff` on them fits in a screen; `seeds` counts the seeds."""
    out: dict = {"seeds": miou.get("seeds", seeds.get("seeds"))}
    for name, _, table, prefix, metric in headline_sources(variants):
        source = seeds if table == "seeds" else miou
        if source.get(f"{prefix}{metric}") is not None:
            out[name], out[f"{name}_std"] = source[f"{prefix}{metric}"], source.get(f"{prefix}{metric}_std")
    return out


def headline_table(headline: Mapping, variants: Mapping[str, Mapping], rows: Mapping[str, list[Row]],
                   paper_label: str) -> pd.DataFrame:
    """The headline metrics as rows "what | ours (mean ± std) | the paper's figure", the paper's
    taken from the table rows (`seed_rows`, `val_rows`) the numbers come from."""
    records = []
    for name, words, table, prefix, metric in headline_sources(variants):
        if name not in headline:
            continue
        row = next((r for r in rows[table] if r.prefix == prefix), None)
        paper = None if row is None else dict(row.paper).get(metric)
        std = np.nan if headline.get("seeds") == 1 or headline.get(f"{name}_std") is None else headline[f"{name}_std"]
        records.append({"": words, "ours": cell(metric, headline[name], std),
                        paper_label: "" if paper is None else _number(metric, paper)})
    table = pd.DataFrame.from_records(records, columns=["", "ours", paper_label]).set_index("")
    table.index.name = None  # no header row of its own
    return table


def headline_markdown(headline: Mapping, dataset: str, variants: Mapping[str, Mapping], cmpa_loss: str) -> str:
    """The headline as a Markdown table beside the paper's figures, for a terminal or a browser."""
    paper, label = paper_dataset(dataset)
    rows = {"seeds": seed_rows(variants, cmpa_loss, paper), "val": val_rows(variants, paper=paper)}
    table = headline_table(headline, variants, rows, label)
    lines = [f"# {dataset}: the headline", "",
             f"mIoU in %, mean ± std over {headline.get('seeds')} training seeds (results/{dataset}_headline.json).", "",
             f"| | ours | {label} |", "|---|---:|---:|"]
    lines += [f"| {name} | {cells['ours']} | {cells[label]} |" for name, cells in table.iterrows()]
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------ pages

PAGE_STYLE = """
body { font-family: sans-serif; font-size: 14px; margin: 1em; }
table { border-collapse: collapse; margin-bottom: 1em; }
th, td { border: 1px solid #ccc; padding: 3px 8px; }
td { text-align: right; white-space: nowrap; font-variant-numeric: tabular-nums; }
th { background: #f3f3f3; text-align: left; }
pre { background: #f7f7f7; padding: 0.5em; font-size: 12px; }
figure { display: inline-block; width: 47%; margin: 0 1em 1em 0; vertical-align: top; }
figure img { width: 100%; border: 1px solid #ddd; }
figcaption { font-size: 12px; }
table.text td { text-align: left; white-space: normal; }
"""


def html_page(title: str, note: str, body: str | pd.DataFrame) -> str:
    """A standalone page (Snakemake's report shows each result in a frame of its own); a table or HTML."""
    if isinstance(body, pd.DataFrame):
        body = body.to_html(escape=True, border=0, na_rep=MISSING)
    return f"""<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>{PAGE_STYLE}</style></head><body>
<h3>{html.escape(title)}</h3>
<p>{html.escape(note)}</p>
{body}
</body></html>
"""


def params_page(used: Mapping[str, Mapping[str, object]], checks: Mapping[str, str], params_text: str,
                params_path: str) -> str:
    """The params the runs used: which runs were trained under them, a key | method | variant...
    table (a variant shows only what differs from the method), then the params file as read."""
    runs = list(used)
    keys = list(dict.fromkeys(k for run in runs for k in used[run]))
    method = used[runs[0]]

    def shown(value) -> str:
        return value if isinstance(value, str) else json.dumps(value)

    table = pd.DataFrame(
        [[shown(used[run].get(k, MISSING)) if run == runs[0] or used[run].get(k) != method.get(k) else ""
          for run in runs] for k in keys], index=keys, columns=runs)
    check = pd.DataFrame({"trained under these params": list(checks.values())}, index=list(checks))
    body = (f"<h4>Runs</h4>{check.to_html(escape=True, border=0, classes='text')}"
            f"<h4>Params used (a variant's column shows only what differs from the method's)</h4>"
            f"{table.to_html(escape=True, border=0, classes='text')}"
            f"<h4>{html.escape(params_path)} as read (the comments say where each value comes from: (P) the paper, "
            f"(W) WeCLIP/CLIP-ES, (O) our choice)</h4><pre>{html.escape(params_text)}</pre>")
    return html_page("Configuration: the params of these results",
                     "Training params as each run's model.json records them (checked against params.yaml), and the "
                     "params the pseudo-label and evaluation stages read.", body)


def gallery_page(sections: Mapping[str, Mapping[str, list[tuple[str, Path]]]]) -> str:
    """The stages' figures side by side: section -> selection ("random picks", ...) -> (caption,
    PNG path), embedded so the page stands alone."""
    body = []
    for section, selections in sections.items():
        body.append(f"<h4>{html.escape(section)}</h4>")
        for selection, figures in selections.items():
            body.append(f"<p><b>{html.escape(selection)}</b> ({len(figures)})</p><div>")
            for caption, path in figures:
                data = base64.b64encode(path.read_bytes()).decode()
                body.append(f'<figure><img src="data:image/png;base64,{data}" alt="{html.escape(caption)}">'
                            f"<figcaption>{html.escape(caption)}</figcaption></figure>")
            body.append("</div>")
    return html_page("Gallery: the figures of the first training seed",
                     "Random picks are a fixed pseudo-random sample of the split (the same images in every run); "
                     "worst picks have the lowest per-image mIoU. pseudo_labels.figures sets how many of each.",
                     "\n".join(body))


def gallery_sections(cam_figures: Path, prediction_figures: Path) -> dict:
    """The two figure folders (ssr.figures.figure_name files) -> `gallery_page`'s sections."""
    sections = {}
    for section, folder in (("Pseudo-labels: CAMs, SGC regions and pseudo-labels (train split)", cam_figures),
                            ("Segmentation: the decoder's predictions (val split)", prediction_figures)):
        picks: dict = {"random picks": [], "lowest mIoU": []}
        for path in sorted(folder.glob("*.png"), key=lambda p: (p.name.split("_")[0], int(p.name.split("_")[1]))):
            selection, rank, image_id = path.stem.split("_", 2)
            picks["random picks" if selection == "random" else "lowest mIoU"].append((f"{selection} {rank}: {image_id}", path))
        sections[section] = picks
    return sections


# ------------------------------------------------------------------ curves and the comparison figure

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


def comparison_panels(frames: Mapping[str, pd.DataFrame], rows: Mapping[str, list[Row]]) -> dict[str, list[Bar]]:
    """The mIoU rows of the seed and val tables as `comparison_figure` panels (in %): Table 3,
    Table 4, and val without and with DenseCRF (Tables 5 and 6). A row with neither our number
    nor the paper's is left out."""
    panels = {}
    picks = (("Table 3: seeds mIoU", "seeds", lambda r: r.section == "Table 3" and r.prefix != "method_", False),
             ("Table 4: CAM mIoU", "seeds", lambda r: r.section == "Table 4", False),
             ("val mIoU (Tables 5 and 6)", "val", lambda r: r.section in ("without CRF", "with DenseCRF"), True))
    for title, table, keep, with_section in picks:
        frame = frames[table]
        bars = []
        for row in filter(keep, rows[table]):
            line = frame[(frame["section"] == row.section) & (frame["row"] == row.title) & (frame["metric"] == "miou")]
            paper = dict(row.paper).get("miou")
            mean, low, high = (float(line[s].iloc[0]) * 100 if len(line) else np.nan for s in ("mean", "min", "max"))
            if np.isnan(mean) and paper is None:
                continue
            label = f"{row.title}, {row.section}" if with_section else row.title
            bars.append(Bar(label, mean, low, high, None if paper is None else paper * 100))
        if bars:
            panels[title] = bars
    return panels


# ------------------------------------------------------------------ the report

def write_report(out: Path, *, dataset: str, seeds: Mapping, miou: Mapping, train: Mapping, class_names: list[str],
                 variants: Mapping[str, Mapping], cmpa_loss: str, run_dirs: Mapping[str, Mapping[int, Path]],
                 params_html: str, gallery_html: str) -> list[Path]:
    """The report's artefacts in `out`: one HTML page per `PAGES` entry, metrics.csv (every number
    of every table, with min, max and the paper's figure), curves/{quantity}.png and `COMPARISON`.

    seeds, miou, train: the contents of the dataset's metrics files; variants: run -> params
    overrides; run_dirs as in `read_curves`; params_html, gallery_html: `params_page` and
    `gallery_page`. Returns the files written.
    """
    paper, paper_label = paper_dataset(dataset)
    classes = [iou_key(n) for n in class_names]
    rows = {"seeds": seed_rows(variants, cmpa_loss, paper), "val": val_rows(variants, "retrain_miou" in miou, paper),
            "train": train_rows(variants)}
    one_seed = "; one training seed, so no spread (±) to show" if miou.get("seeds") == 1 else ""
    same = (f"; a cell without ± has the same value in every seed (a row that training does not change){one_seed}; "
            f"'{paper_label}' columns: the paper's figure where a row has a counterpart")
    bound = [v for v, o in variants.items() if is_bound(o)]
    specs = {  # name: (metrics, rows, metric names, title, note)
        "seeds": (seeds, rows["seeds"], [*SUMMARY, *classes], "Pseudo-labels: the seed ablation (paper Tables 3 and 4)",
                  f"Pseudo-labels of the {seeds.get('split', '?')} split ({seeds.get('images', '?')} images) against its "
                  f"ground truth; mean ± std over {seeds.get('seeds', '?')} training seeds; %, except the confusion ratio "
                  f"(false positives per true positive); {MISSING} marks a row that could not run (DINO without its "
                  f"weights){same}. " + (f"No seed rows for {', '.join(bound)}: it changes only the decoder's "
                                         f"supervision, so its CAMs are the method's. " if bound else "")),
        "val": (miou, rows["val"], [*SUMMARY, *classes, *names_after(miou, rows["val"], "ratio_to_")],
                "Segmentation of the val split, without and with DenseCRF (paper Tables 5 and 6)",
                f"The decoder's predictions against ground truth; mean ± std over {miou.get('seeds', '?')} training "
                f"seeds; %, except the confusion ratio (false positives per true positive){same}. The paper's 79.5 is "
                f"with DenseCRF; its fully supervised bound (82.3, DeepLabV2 ViT-B) and share of it (97.4%) stand on "
                f"the CRF rows, though the paper does not say whether they are."),
        "train": (train, rows["train"], ["iterations", "images_seen", *names_after(train, rows["train"], "final_")],
                  "Training: the losses at the last iteration",
                  f"mean ± std over {train.get('seeds', '?')} training seeds{one_seed}; the curves are under Curves."),
    }
    out.mkdir(parents=True, exist_ok=True)
    written, frames = [], {}
    for name, (metrics, table_rows, names, title, note) in specs.items():
        frame = metric_frame(metrics, table_rows, names)
        frames[name] = frame
        pages = {name: (title, summary_table(frame, table_rows, [n for n in names if n not in classes], paper_label))}
        if name != "train":
            pages[f"{name}_classes"] = (f"{title}: IoU per class", class_table(frame, table_rows, class_names))
        for page, (heading, table) in pages.items():
            (out / f"{page}.html").write_text(html_page(heading, note, table))
            written.append(out / f"{page}.html")
    headline = headline_table(headline_metrics(seeds, miou, variants), variants, rows, paper_label)
    (out / "headline.html").write_text(html_page(
        "Headline: the numbers this run is judged by", f"mean ± std over {miou.get('seeds', '?')} training seeds, in %"
        f"{one_seed}; the same numbers as results/{dataset}_headline.json (the headline stage). The full tables are under "
        f"1. Pseudo-labels and 2. Segmentation; 'Against the paper' draws them beside the paper's.", headline))
    (out / "params.html").write_text(params_html)
    (out / "gallery.html").write_text(gallery_html)
    written += [out / f"{page}.html" for page in ("headline", "params", "gallery")]

    numbers = pd.concat([f.assign(table=n) for n, f in frames.items()], ignore_index=True)
    numbers[["table", "section", "row", "metric", *STATS, "paper"]].to_csv(out / "metrics.csv", index=False)
    written.append(out / "metrics.csv")
    panels = comparison_panels(frames, rows) or {"nothing to compare: no mIoU in the metrics files": []}
    save_figure(comparison_figure(panels, paper_label=paper_label), out / COMPARISON)
    written.append(out / COMPARISON)

    (out / "curves").mkdir(exist_ok=True)
    run_titles = {"method": "method", **{v: f"{v} ({describe(o)})" for v, o in variants.items()}}
    curves = {name.replace("/", "-") + ".png": curve_figure(name, runs, title=f"{name}: {CURVES.get(name, name)}",
                                                            run_titles=run_titles)
              for name, runs in read_curves(run_dirs).items()}
    replace_figures(out / "curves", curves)
    return written + [out / "curves" / name for name in curves]


def read_metrics(results: Path, dataset: str, name: str, stage: str) -> dict:
    """results/{dataset}_{name}.json, or an error naming the `ssr {stage}` that writes it."""
    from ssr.data.layout import read_json

    return read_json(results / f"{dataset}_{name}.json", f"run `ssr {stage} --dataset {dataset}` first")


def build_report(params, dataset: str, out: Path, *, params_path: Path, seeds: list[int] | None = None) -> list[Path]:
    """`write_report` for one dataset from what its stages wrote: the metrics files, the classes,
    each run's model.json (the params it was trained under), the figure folders and the dvclive
    curves. params: the `ssr.config.Params` the stages read, loaded from `params_path`; seeds:
    the training seeds to draw and check (default: the dataset's)."""
    from ssr.config import identity_differences, training_identity
    from ssr.data.layout import DatasetLayout, read_json

    results = Path(params.results_root)
    ds = params.dataset(dataset)

    seeds = list(ds.seeds) if seeds is None else seeds
    run_dirs = {run: {seed: results / dataset / run / f"seed{seed}" for seed in seeds} for run in params.runs(dataset)}
    used, checks = {}, {}
    for run, folders in run_dirs.items():
        run_params = params.for_run(dataset, run)
        current = training_identity(run_params, dataset)
        used[run] = {**current, **{f"infer.{k}": v for k, v in run_params.infer.model_dump().items()},
                     f"datasets.{dataset}.long_side": run_params.dataset(dataset).long_side,
                     f"datasets.{dataset}.seed_split": run_params.dataset(dataset).seed_split,
                     f"datasets.{dataset}.val_split": run_params.dataset(dataset).val_split,
                     f"datasets.{dataset}.seeds": list(ds.seeds)}
        for seed, folder in folders.items():
            config = folder / "model.json"
            if not config.is_file():
                checks[f"{run}, seed {seed}"] = f"no {config}"
                continue
            differences = identity_differences(read_json(config).get("identity", {}), current)
            checks[f"{run}, seed {seed}"] = "yes" if not differences else "no: " + "; ".join(differences)
    return write_report(
        out, dataset=dataset, seeds=read_metrics(results, dataset, "seeds", "pseudo-labels"),
        miou=read_metrics(results, dataset, "miou", "evaluate"), train=read_metrics(results, dataset, "train", "train"),
        class_names=DatasetLayout(params.dataset_root(dataset)).classes(),
        variants=ds.variants, cmpa_loss=params.for_dataset(dataset).cmpa.loss, run_dirs=run_dirs,
        params_html=params_page(used, checks, Path(params_path).read_text(), str(params_path)),
        gallery_html=gallery_page(gallery_sections(results / dataset / "figures", results / dataset / "predictions" / "figures")))
