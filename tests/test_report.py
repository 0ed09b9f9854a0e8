"""The report: `snakemake --report` on a fresh copy of the tiny demo, its tables against the
metrics files, the figures' layout (panels, titles, legend, colour bar; never pixels) and which
images the stages draw.

The real run (one test, ~1 min on 2 cores) trains two seeds and one Table 4 variant of the
shrunk demo through Snakemake, then builds the HTML report and reads the tables back out of it.
"""

from __future__ import annotations

import base64
import json
import re
import shutil
import sys
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import tiny_params
from test_dag import _run, _tool, copy_workflow, make_paths

from ssr import report as ssr_report
from ssr.figures import FigureCandidates, cam_figure, prediction_figure, worst_images

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "workflow"))
import pipeline  # noqa: E402

NAMES = ["background", "aeroplane", "bicycle", "bird"]


# ---------------------------------------------------------------- reading the report back

class _Tables(HTMLParser):
    """Every <table> of a page as rows of (header cells, data cells), text only."""

    def __init__(self):
        super().__init__()
        self.rows, self._row, self._cell = [], None, None

    def handle_starttag(self, tag, attrs):
        if tag == "tr":
            self._row = ([], [])
        elif tag in ("th", "td") and self._row is not None:
            self._cell = (tag, [])

    def handle_data(self, data):
        if self._cell is not None:
            self._cell[1].append(data)

    def handle_endtag(self, tag):
        if tag in ("th", "td") and self._cell is not None:
            self._row[0 if self._cell[0] == "th" else 1].append("".join(self._cell[1]).strip())
            self._cell = None
        elif tag == "tr":
            self.rows.append(self._row)
            self._row = None


def read_table(page: str) -> dict[tuple[str, str], dict[str, str]]:
    """A report table page -> {(section, row): {column: cell}} (pandas' MultiIndex HTML: the section
    header spans its rows, so later rows of a section carry the row title only)."""
    parser = _Tables()
    parser.feed(page)
    (header, _), *body = parser.rows
    columns = header[2:]
    table, section = {}, None
    for heads, cells in body:
        if len(heads) == 2:
            section = heads[0]
        table[(section, heads[-1])] = dict(zip(columns, cells, strict=True))
    return table


def check_cells(table: dict, metrics: dict, rows: dict[tuple[str, str], str], columns: dict[str, str]) -> int:
    """Every (row, column) cell of `table` against metrics[prefix + key] and its _std; -> cells checked."""
    checked = 0
    for (section, row), prefix in rows.items():
        for column, key in columns.items():
            text = table[(section, row)][column]
            mean, std = metrics.get(f"{prefix}{key}"), metrics.get(f"{prefix}{key}_std")
            if mean is None:
                assert text == "—", (section, row, column, text)
                continue
            shown_mean, shown_std = (float(x) for x in text.split(" ± "))
            if key == "confusion_ratio":  # FP per TP, 3 significant figures
                assert shown_mean == pytest.approx(mean, rel=5e-3) and shown_std == pytest.approx(std, rel=5e-2, abs=1e-9)
            else:  # shares, in % with one decimal
                assert abs(shown_mean - 100 * mean) <= 0.05 + 1e-9 and abs(shown_std - 100 * std) <= 0.05 + 1e-9, \
                    (section, row, column, text, mean, std)
            checked += 1
    return checked


def report_results(html: str) -> dict:
    """The results Snakemake's HTML report embeds: path -> {name, labels, mime_type, data_uri, ...}."""
    m = re.search(r"var results = (\{.*?\});\n", html, re.S)
    assert m, "no results in the report"
    return json.loads(m[1])


def decoded(entry: dict) -> bytes:
    return base64.b64decode(entry["data_uri"].split("base64,", 1)[1])


# ---------------------------------------------------------------- the real run

def test_snakemake_report_of_the_tiny_demo_shows_the_metrics_files(tmp_path, tiny_clip_dir):
    """A fresh copy (committed metrics without their run, as a clone has them): one command runs
    the demo and the report rule and writes results/demo_report.html; every table cell in it
    matches the metrics files the run wrote, and the figures and curves are in it."""
    work = copy_workflow(tmp_path / "work")
    shutil.copytree(tiny_clip_dir, work / "clip")
    raw = tiny_params(yaml.safe_load((work / "params.yaml").read_text()), Path("clip"),
                      **{"datasets.demo.seeds": [0, 1], "datasets.demo.variants": {"cmpa_feature": {"cmpa.loss": "feature"}},
                         "train_presets.demo.iterations": 2, "train.log_every": 1})
    (work / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    _run([sys.executable, "workflow/pipeline.py", "dvc"], work)
    make_paths(work, [f"results/demo_{m}.json" for m in ("train", "seeds", "retrain", "miou")], content='{"miou": 0.5}\n',
               future=86400)
    for cmd in (["git", "init", "-q"], ["git", "add", "-A"], ["git", "commit", "-qm", "clone"]):  # dvclive needs a commit
        _run(cmd, work)

    _run([_tool("snakemake"), "--cores", "2", "--report", "results/demo_report.html", "--report-after-run", "report-demo"],
         work, timeout=900)
    results = report_results((work / "results/demo_report.html").read_text())
    by_name = {Path(p).relative_to("results/demo").as_posix(): e for p, e in results.items()}
    seeds, miou = (json.loads((work / f"results/demo_{m}.json").read_text()) for m in ("seeds", "miou"))
    assert seeds["seeds"] == miou["seeds"] == 2 and "cmpa_feature_cam_miou" in seeds  # the run wrote them anew

    # the tables: every cell of the seed ablation (Tables 3 and 4) and of val, without and with CRF
    variant = "cmpa_feature (cmpa.loss = feature)"
    seed_rows = {("Table 3", "CAM"): "cam_", ("Table 3", "+ CLIP attention"): "clip_", ("Table 3", "+ DINO attention"): "dino_",
                 ("Table 3", "+ SGC mask"): "sgc_", ("Table 3", "configured method"): "method_",
                 ("Table 4", "CAM without CMPA"): "cam_without_cmpa_",
                 ("Table 4", "CAM, CMPA with the cross_modal loss (method)"): "cam_",
                 ("Table 4", f"CAM, {variant}"): "cmpa_feature_cam_",
                 ("variants", f"{variant}: configured method"): "cmpa_feature_method_"}
    summary = {"mIoU": "miou", "precision": "precision", "recall": "recall", "confusion ratio (FP/TP)": "confusion_ratio",
               "class swap": "class_swap_ratio"}
    classes = {name: f"iou_{name}" for name in json.loads((work / "data/demo/classes.json").read_text())}
    table = read_table(decoded(by_name["report/seeds.html"]).decode())
    assert set(table) == set(seed_rows)
    assert all(v == "—" for v in table[("Table 3", "+ DINO attention")].values())  # no DINO weights in the demo
    checked = check_cells(table, seeds, seed_rows, summary)
    table = read_table(decoded(by_name["report/seeds_classes.html"]).decode())
    assert set(table) == set(seed_rows) - {("Table 3", "+ DINO attention")}
    checked += check_cells(table, seeds, {k: v for k, v in seed_rows.items() if k in table}, classes)
    val_rows = {("without CRF", "method"): "", ("with DenseCRF", "method"): "crf_",
                ("without CRF", variant): "cmpa_feature_", ("with DenseCRF", variant): "cmpa_feature_crf_"}
    table = read_table(decoded(by_name["report/val.html"]).decode())
    assert set(table) == set(val_rows)
    checked += check_cells(table, miou, val_rows, {**summary, "pixel accuracy": "pixel_accuracy"})  # variants: no pixel accuracy
    table = read_table(decoded(by_name["report/val_classes.html"]).decode())
    checked += check_cells(table, miou, {k: v for k, v in val_rows.items() if k[1] == "method"}, classes)
    assert checked >= 100  # of 9 * 5 - 5 + 8 * 5 + 4 * 6 - 2 + 2 * 5 cells, less any None (a class never seen: "—")

    # the figures the stages drew, the curves, and a CSV of every number
    cams = sorted(n for n in by_name if n.startswith("figures/"))
    strips = sorted(n for n in by_name if n.startswith("predictions/figures/"))
    assert len(cams) == len(strips) == raw["pseudo_labels"]["figures"]
    for names in (cams, strips):
        assert [re.match(r".*/(first|worst)_", n)[1] for n in names] == ["first", "first", "worst", "worst"]
    assert {by_name[n]["labels"]["picked"] for n in cams} == {"first 1", "first 2", "worst 1", "worst 2"}
    assert {n for n in by_name if n.startswith("report/curves/")} >= {"report/curves/train-loss.png",
                                                                      "report/curves/train-loss_ce.png"}
    assert all(decoded(by_name[n]).startswith(b"\x89PNG") for n in [*cams, *strips])
    numbers = decoded(by_name["report/metrics.csv"]).decode().splitlines()
    assert numbers[0] == "table,section,row,metric,mean,std,min,max" and len(numbers) > 100

    # the report's files are the rule's outputs (workflow/pipeline.py declares what ssr report writes)
    params, resources = pipeline.load(work / "params.yaml", work / pipeline.RESOURCES)
    declared = pipeline.report_stage(params, resources, "demo").output_paths
    assert sorted(p for p in results if p.startswith("results/demo/report/") and "/curves/" not in p) == sorted(
        p for p in declared if not p.endswith("curves"))


# ---------------------------------------------------------------- tables

def test_each_key_goes_to_the_row_of_its_longest_prefix():
    """cam_without_cmpa_miou is the plain-CLIP row's mIoU, not the CAM row's metric "without_cmpa_miou";
    a variant's keys stay off the method's rows."""
    metrics = {"cam_miou": 0.25, "cam_miou_std": 0.01, "cam_without_cmpa_miou": 0.125, "cam_without_cmpa_miou_std": 0.0,
               "cmpa_feature_cam_miou": 0.5, "dino_available": 0, "cam_iou_aeroplane": 0.75, "cam_iou_aeroplane_std": 0.05}
    rows = ssr_report.seed_rows({"cmpa_feature": {"cmpa.loss": "feature"}}, "cross_modal")
    frame = ssr_report.metric_frame(metrics, rows, ["miou", "iou_aeroplane"])
    means = {(r.section, r.row, r.metric): r.mean for r in frame.itertuples()}
    assert means[("Table 3", "CAM", "miou")] == 0.25
    assert means[("Table 4", "CAM without CMPA", "miou")] == 0.125
    assert means[("Table 4", "CAM, cmpa_feature (cmpa.loss = feature)", "miou")] == 0.5
    assert ("variants", "cmpa_feature (cmpa.loss = feature): configured method", "miou") not in means
    table = ssr_report.summary_table(frame, rows)
    assert table.loc[("Table 3", "CAM"), "mIoU"] == "25.0 ± 1.0"
    assert (table.loc[("Table 3", "+ DINO attention")] == "—").all()
    per_class = ssr_report.class_table(frame, rows, NAMES)
    assert list(per_class.columns) == NAMES and per_class.loc[("Table 3", "CAM"), "aeroplane"] == "75.0 ± 5.0"
    assert list(per_class.index) == [("Table 3", "CAM"), ("Table 4", "CAM, CMPA with the cross_modal loss (method)")]


def test_report_tables_are_what_the_rule_declares():
    assert ssr_report.TABLES == pipeline.REPORT_TABLES


# ---------------------------------------------------------------- figures

def _cams(classes: int, rows=("cam", "clip", "sgc", "method"), size=(12, 16), seed=0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {row: rng.random((classes, *size)) for row in rows}


def _layout(fig) -> tuple[list[list[str]], list[str], list[str]]:
    """The panels' titles by grid row, the y labels of the first column, and the colour bar labels."""
    grid, ylabels, bars = {}, [], []
    for ax in fig.axes:
        spec = ax.get_subplotspec()
        if spec is None:  # the colour bar's axes
            bars.append(ax.get_ylabel())
            continue
        grid.setdefault(spec.rowspan.start, []).append((spec.colspan.start, ax.get_title()))
        if spec.colspan.start == 0:
            ylabels.append(ax.get_ylabel())
    return [[t for _, t in sorted(grid[r])] for r in sorted(grid)], ylabels, bars


def test_cam_figure_has_a_panel_per_present_class_named_and_no_repeated_row():
    image = np.zeros((12, 16, 3), np.uint8)
    gt = np.zeros((12, 16), np.uint8)
    gt[2:6, 2:6], gt[7:10, 8:14], gt[0, 0] = 2, 3, 255
    label = np.where(gt == 255, 0, gt)
    cams = _cams(2)
    cams["method"] = cams["sgc"].copy()  # all switches on: the method is the SGC row
    fig = cam_figure(image, gt, label, cams, [2, 3], NAMES, title="im1")
    titles, ylabels, bars = _layout(fig)
    assert titles == [["image", "ground truth", "pseudo-label"], ["bicycle", "bird"], ["bicycle", "bird"], ["bicycle", "bird"]]
    assert ylabels[1:] == ["CAM", "+ CLIP attention", "+ SGC mask\n= configured method"]
    assert bars == ["CAM score"]
    assert [t.get_text() for t in fig.legends[0].get_texts()] == ["background", "bicycle", "bird", "ignore"]

    cams = _cams(3)  # a method that is none of the rows gets its own
    titles, ylabels, _ = _layout(cam_figure(image, gt, label, cams, [1, 2, 3], NAMES))
    assert titles[1:] == [NAMES[1:]] * 4
    assert ylabels[1:] == ["CAM", "+ CLIP attention", "+ SGC mask", "configured method"]


def test_prediction_figure_shows_image_truth_prediction_and_crf():
    image = np.zeros((8, 8, 3), np.uint8)
    gt, pred = np.zeros((8, 8), np.uint8), np.ones((8, 8), np.uint8)
    titles, _, bars = _layout(prediction_figure(image, gt, pred, pred * 3, NAMES))
    assert titles == [["image", "ground truth", "prediction", "after DenseCRF"]] and bars == []
    fig = prediction_figure(image, gt, pred, None, NAMES)
    assert _layout(fig)[0] == [["image", "ground truth", "prediction"]]
    assert [t.get_text() for t in fig.legends[0].get_texts()] == ["background", "aeroplane"]


# ---------------------------------------------------------------- which images

def test_worst_images_are_the_lowest_iou_ones():
    ious = {"a": 0.5, "b": 0.1, "c": 0.9, "d": 0.1, "e": 0.3}
    assert worst_images(ious, 3) == ["b", "d", "e"]
    assert worst_images(ious, 0) == [] and worst_images(ious, 9)[-1] == "c"


def test_figure_candidates_pick_the_worst_and_the_first_holding_only_those():
    """A stream of 8 images, n = 4: the 2 of lowest IoU wherever they come, then the first 2 not
    among them; figure data is made only for images that could still be picked, and let go."""
    stream = [("i0", 0.6), ("i1", None), ("i2", 0.2), ("i3", 0.8), ("i4", 0.05), ("i5", 0.7), ("i6", 0.1), ("i7", 0.9)]
    picker, made = FigureCandidates(4), []
    for image_id, iou in stream:
        picker.offer(image_id, iou, lambda i=image_id: made.append(i) or f"data of {i}")
        assert len(picker.data) <= 4 + 2
    assert [(s, r, i) for s, r, i, _ in picker.picks()] == [("worst", 1, "i4"), ("worst", 2, "i6"), ("first", 1, "i0"),
                                                           ("first", 2, "i1")]
    assert [d for *_, d in picker.picks()] == ["data of i4", "data of i6", "data of i0", "data of i1"]
    assert made == ["i0", "i1", "i2", "i3", "i4", "i6"]  # i5, i7: never among the lowest two so far
    assert set(picker.data) == {"i0", "i1", "i2", "i3", "i4", "i6"}  # i2 fell out of the worst two, but is a first one
    # a worst image among the first ones is shown once, as worst; the next first image fills in
    picker = FigureCandidates(4)
    for image_id, iou in [("a", 0.0), ("b", 0.5), ("c", 0.4), ("d", 0.9), ("e", 0.9)]:
        picker.offer(image_id, iou, lambda i=image_id: i)
    assert [(s, i) for s, _, i, _ in picker.picks()] == [("worst", "a"), ("worst", "c"), ("first", "b"), ("first", "d")]
    assert [(name, title) for name, title, _ in picker.titled("mIoU", "5 images")][1:3] == [
        ("worst_2_c.png", "c\nlowest mIoU no. 2 of 5 images"), ("first_1_b.png", "b\nfirst image no. 1")]
