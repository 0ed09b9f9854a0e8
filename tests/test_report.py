"""The report: `snakemake --report` on a fresh copy of the tiny demo, its tables against the
metrics files, the figures' layout (panels, titles, legend, colour bar; never pixels) and which
images the stages draw.

The real run (one test, ~1 min on 2 cores) trains two seeds and one Table 4 variant of the
shrunk demo through Snakemake, then builds the HTML report and reads the tables back out of it.
"""

from __future__ import annotations

import base64
import hashlib
import html
import io
import json
import re
import shutil
import sys
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import tiny_params
from PIL import Image
from test_dag import _run, _tool, copy_workflow, make_paths

from ssr import report as ssr_report
from ssr.curves import CURVES
from ssr.figures import (
    NOT_TARGET,
    Bar,
    FigureCandidates,
    cam_figure,
    comparison_figure,
    curve_figure,
    prediction_figure,
    resize_nearest,
    sgc_regions,
    worst_images,
)
from ssr.sgc import column_mask, patch_region_share, region_onehot, sgc_mask

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
    """Every (row, column) cell of `table` against metrics[prefix + key] and its _std; -> cells checked.
    A cell shows "mean ± std", or the mean alone where every seed has the same value (min == max)."""
    checked = 0
    for (section, row), prefix in rows.items():
        for column, key in columns.items():
            text = table[(section, row)][column]
            mean, std = metrics.get(f"{prefix}{key}"), metrics.get(f"{prefix}{key}_std")
            if mean is None:
                assert text == "—", (section, row, column, text)
                continue
            same = metrics[f"{prefix}{key}_min"] == metrics[f"{prefix}{key}_max"]
            assert ("±" not in text) == same, (section, row, column, text)
            shown_mean, shown_std = (float(x) for x in text.split(" ± ")) if not same else (float(text), 0.0)
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
    matches the metrics files the run wrote, the paper's figures stand beside their rows, and the
    headline, the comparison figure, the params, the gallery, the figures and the curves are in it."""
    work = copy_workflow(tmp_path / "work")
    shutil.copytree(tiny_clip_dir, work / "clip")
    variants = {"cmpa_feature": {"cmpa.loss": "feature"}, "gt_bound": {"train.supervision": "gt"}}
    raw = tiny_params(yaml.safe_load((work / "params.yaml").read_text()), Path("clip"),
                      **{"datasets.demo.seeds": [0, 1], "datasets.demo.variants": variants,
                         "train_presets.demo.iterations": 2, "train.log_every": 1, "pseudo_labels.figures": 2})
    (work / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    _run([sys.executable, "workflow/pipeline.py", "dvc"], work)
    make_paths(work, [f"results/demo_{m}.json" for m in ("train", "seeds", "retrain", "miou", "headline")],
               content='{"miou": 0.5}\n', future=86400)
    for cmd in (["git", "init", "-q"], ["git", "add", "-A"], ["git", "commit", "-qm", "clone"]):  # dvclive needs a commit
        _run(cmd, work)

    _run([_tool("snakemake"), "--cores", "2", "--report", "results/demo_report.html", "--report-after-run", "report-demo"],
         work, timeout=900)
    results = report_results((work / "results/demo_report.html").read_text())
    by_name = {Path(p).relative_to("results/demo").as_posix(): e for p, e in results.items()}
    seeds, miou = (json.loads((work / f"results/demo_{m}.json").read_text()) for m in ("seeds", "miou"))
    assert seeds["seeds"] == miou["seeds"] == 2 and "cmpa_feature_cam_miou" in seeds  # the run wrote them anew

    # the tables: every cell of the seed ablation (Tables 3 and 4) and of val, without and with CRF
    variant, bound = "cmpa_feature (cmpa.loss = feature)", "gt_bound (train.supervision = gt)"
    seed_rows = {("Table 3", "CAM"): "cam_", ("Table 3", "+ CLIP attention"): "clip_", ("Table 3", "+ DINO attention"): "dino_",
                 ("Table 3", "+ SGC mask"): "sgc_", ("Table 3", "configured method"): "method_",
                 ("Table 4", "CAM without CMPA"): "cam_without_cmpa_",
                 ("Table 4", "CAM, CMPA with the cross_modal loss (method)"): "cam_",
                 ("Table 4", f"CAM, {variant}"): "cmpa_feature_cam_",
                 ("variants", f"{variant}: configured method"): "cmpa_feature_method_"}  # none for gt_bound
    summary = {"mIoU": "miou", "precision": "precision", "recall": "recall", "confusion ratio (FP/TP)": "confusion_ratio",
               "class swap": "class_swap_ratio"}
    classes = {name: f"iou_{name}" for name in json.loads((work / "data/demo/classes.json").read_text())}
    table = read_table(decoded(by_name["report/seeds.html"]).decode())
    assert set(table) == set(seed_rows)
    dino = table[("Table 3", "+ DINO attention")]  # no DINO weights in the demo: no numbers, but the paper's
    assert {c: v for c, v in dino.items() if "paper" not in c} == dict.fromkeys(summary, "—")
    checked = check_cells(table, seeds, seed_rows, summary)
    # the paper's figures (VOC, for the demo) beside the rows that have one, and only there
    paper = {row: cells["mIoU (paper, VOC)"] for row, cells in table.items()}
    assert paper == {("Table 3", "CAM"): "63.3", ("Table 3", "+ CLIP attention"): "74.6", ("Table 3", "+ DINO attention"): "76.3",
                     ("Table 3", "+ SGC mask"): "78.7", ("Table 3", "configured method"): "",
                     ("Table 4", "CAM without CMPA"): "58.6", ("Table 4", "CAM, CMPA with the cross_modal loss (method)"): "63.3",
                     ("Table 4", f"CAM, {variant}"): "53.5", ("variants", f"{variant}: configured method"): ""}
    table = read_table(decoded(by_name["report/seeds_classes.html"]).decode())
    assert set(table) == set(seed_rows) - {("Table 3", "+ DINO attention")}
    checked += check_cells(table, seeds, {k: v for k, v in seed_rows.items() if k in table}, classes)
    val_rows = {("without CRF", "method"): "", ("with DenseCRF", "method"): "crf_",
                ("without CRF", variant): "cmpa_feature_", ("with DenseCRF", variant): "cmpa_feature_crf_",
                ("without CRF", bound): "gt_bound_", ("with DenseCRF", bound): "gt_bound_crf_"}
    table = read_table(decoded(by_name["report/val.html"]).decode())
    assert set(table) == set(val_rows)
    checked += check_cells(table, miou, val_rows, {**summary, "pixel accuracy": "pixel_accuracy"})  # variants: no pixel accuracy
    crf = table[("with DenseCRF", "method")]
    table5 = {"mIoU": "79.5", "precision": "87.9", "recall": "89.1", "confusion ratio (FP/TP)": "0.198",
              "mIoU / mIoU of gt_bound": "97.4"}  # and Table 6's share
    assert {c: crf[f"{c} (paper, VOC)"] for c in table5} == table5
    assert table[("without CRF", "method")]["mIoU (paper, VOC)"] == "78.2"
    assert table[("with DenseCRF", bound)]["mIoU (paper, VOC)"] == "82.3"
    assert table[("with DenseCRF", variant)]["mIoU (paper, VOC)"] == ""
    share = table[("with DenseCRF", "method")]["mIoU / mIoU of gt_bound"]
    assert abs(float(share.split(" ± ")[0]) - 100 * miou["crf_ratio_to_gt_bound"]) <= 0.05 + 1e-9
    table = read_table(decoded(by_name["report/val_classes.html"]).decode())
    checked += check_cells(table, miou, {k: v for k, v in val_rows.items() if k[1] == "method"}, classes)
    assert checked >= 100  # of 9 * 5 - 5 + 8 * 5 + 6 * 6 - 4 + 2 * 5 cells, less any None (a class never seen: "—")

    # the headline: its numbers, the paper's beside them, and the same numbers as the headline stage's file
    headline = json.loads((work / "results/demo_headline.json").read_text())
    assert headline == ssr_report.headline_metrics(seeds, miou, variants)
    page = decoded(by_name["report/headline.html"]).decode()
    for words, mean, figure in (("val mIoU with DenseCRF", miou["crf_miou"], "79.5"),
                                ("seeds mIoU: + SGC mask", seeds["sgc_miou"], "78.7"),
                                ("val mIoU / mIoU of gt_bound, with DenseCRF", miou["crf_ratio_to_gt_bound"], "97.4")):
        words = re.escape(html.escape(words))
        assert re.search(rf"<th>{words}</th>\s*<td>{100 * mean:.1f}( ± [0-9.]+)?</td>\s*<td>{figure}</td>", page), words
    assert decoded(by_name["report/paper.png"]).startswith(b"\x89PNG")

    # the params the runs used: every run and seed checked against its model.json, the variants' changes, the file
    page = decoded(by_name["report/params.html"]).decode()
    for run in ("method", "cmpa_feature", "gt_bound"):
        for seed in (0, 1):
            assert re.search(rf"<th>{run}, seed {seed}</th>\s*<td>yes</td>", page), (run, seed)
    assert re.search(r"<th>cmpa.loss</th>\s*<td>cross_modal</td>\s*<td>feature</td>\s*<td></td>", page)
    assert re.search(r"<th>train.supervision</th>\s*<td>pseudo</td>\s*<td></td>\s*<td>gt</td>", page)
    assert html.escape("figures: 2") in page and "(P)" in page  # the params file as read, with its comments

    # the figures the stages drew (random and worst picks, pseudo_labels.figures of each), and the gallery of them
    cams = sorted(n for n in by_name if n.startswith("figures/"))
    strips = sorted(n for n in by_name if n.startswith("predictions/figures/"))
    assert len(cams) == len(strips) == 2 * raw["pseudo_labels"]["figures"]
    for names in (cams, strips):
        assert [re.match(r".*/(random|worst)_", n)[1] for n in names] == ["random", "random", "worst", "worst"]
    assert {by_name[n]["labels"]["picked"] for n in cams} == {"random 1", "random 2", "worst 1", "worst 2"}
    assert all(decoded(by_name[n]).startswith(b"\x89PNG") for n in [*cams, *strips])
    for name in cams:  # every CAM figure has SGC's region panels (the panel titles are in the PNG's text)
        panels = Image.open(io.BytesIO(decoded(by_name[name]))).text["Description"]
        assert "regions (SLIC + k-means)" in panels and "SGC target regions" in panels, (name, panels)
        assert panels.count("CAM") >= 1 and "+ CLIP attention" in panels, (name, panels)
    page = decoded(by_name["report/gallery.html"]).decode()
    images = re.findall(r'<img src="data:image/png;base64,([^"]+)" alt="([^"]+)">', page)
    shown = {Path(n).name: decoded(by_name[n]) for n in [*cams, *strips]}
    assert sorted(base64.b64decode(data) for data, _ in images) == sorted(shown.values())  # each figure once
    assert [alt.split(":")[0] for _, alt in images] == ["random 1", "random 2", "worst 1", "worst 2"] * 2

    # the curves: one per logged quantity, named in words; and a CSV of every number, the paper's beside it
    assert {n for n in by_name if n.startswith("report/curves/")} == {f"report/curves/{q.replace('/', '-')}.png" for q in CURVES}
    for quantity, words in CURVES.items():
        png = Image.open(io.BytesIO(decoded(by_name[f"report/curves/{quantity.replace('/', '-')}.png"])))
        assert png.text["Title"] == f"{quantity}: {words}"
        assert png.text["Description"] == f"panels: method | {variant} | {bound}"
    numbers = decoded(by_name["report/metrics.csv"]).decode().splitlines()
    assert numbers[0] == "table,section,row,metric,mean,std,min,max,paper" and len(numbers) > 100
    assert "seeds,Table 3,CAM,miou," in "\n".join(numbers) and any(line.endswith(",0.633") for line in numbers)

    # the report's files are the rule's outputs (workflow/pipeline.py declares what ssr report writes)
    params, resources = pipeline.load(work / "params.yaml", work / pipeline.RESOURCES)
    declared = pipeline.report_stage(params, resources, "demo").output_paths
    assert sorted(p for p in results if p.startswith("results/demo/report/") and "/curves/" not in p) == sorted(
        p for p in declared if not p.endswith("curves"))
    # the landing page promises what the report has, in words (no placeholder left)
    landing = (work / "results/demo_report.html").read_text()
    assert "{ds}" not in landing and "Configuration" in landing
    assert any(e["category"] == "4. Configuration" for e in results.values() if "category" in e) or "4. Configuration" in landing


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


def test_report_pages_are_what_the_rule_declares():
    assert ssr_report.PAGES == pipeline.REPORT_PAGES and ssr_report.COMPARISON == pipeline.REPORT_COMPARISON


VARIANTS = {"cmpa_in_modal": {"cmpa.loss": "in_modal"}, "cmpa_feature": {"cmpa.loss": "feature"},
            "gt_bound": {"train.supervision": "gt"}}


def _paper(rows) -> dict:
    return {(r.section, r.title): dict(r.paper) for r in rows if r.paper}


def test_the_papers_figures_stand_beside_their_counterparts_only():
    """Tables 3 and 4 on the seed rows (Table 4 by each run's CMPA loss), Table 5 on the method's
    CRF row and Table 6 on the bound and the method's share of it; none where a row has no
    counterpart, none of VOC's beside COCO, and the method's Table 3 rows only with the paper's loss."""
    rows = ssr_report.seed_rows(VARIANTS, "cross_modal", "voc")
    assert _paper(rows) == {
        ("Table 3", "CAM"): {"miou": 0.633}, ("Table 3", "+ CLIP attention"): {"miou": 0.746},
        ("Table 3", "+ DINO attention"): {"miou": 0.763}, ("Table 3", "+ SGC mask"): {"miou": 0.787},
        ("Table 4", "CAM without CMPA"): {"miou": 0.586},
        ("Table 4", "CAM, CMPA with the cross_modal loss (method)"): {"miou": 0.633},
        ("Table 4", "CAM, cmpa_in_modal (cmpa.loss = in_modal)"): {"miou": 0.578},
        ("Table 4", "CAM, cmpa_feature (cmpa.loss = feature)"): {"miou": 0.535}}
    # a variant that changes only the decoder's supervision has no seed rows: its CAMs are the method's
    assert not [r for r in rows if "gt_bound" in r.prefix]
    assert [r.prefix for r in rows if r.section == "variants"] == ["cmpa_in_modal_method_", "cmpa_feature_method_"]
    # trained with another loss, the method's CAM is Table 4's row of that loss, and Table 3 is not the paper's
    rows = ssr_report.seed_rows({}, "feature", "voc")
    assert _paper(rows) == {("Table 4", "CAM without CMPA"): {"miou": 0.586},
                            ("Table 4", "CAM, CMPA with the feature loss (method)"): {"miou": 0.535}}
    assert _paper(ssr_report.seed_rows(VARIANTS, "cross_modal", "coco")) == {}

    assert _paper(ssr_report.val_rows(VARIANTS, paper="voc")) == {
        ("without CRF", "method"): {"miou": 0.782},
        ("with DenseCRF", "method"): {"miou": 0.795, "precision": 0.879, "recall": 0.891, "confusion_ratio": 0.198,
                                      "ratio_to_gt_bound": 0.974},
        ("with DenseCRF", "gt_bound (train.supervision = gt)"): {"miou": 0.823}}
    assert _paper(ssr_report.val_rows(VARIANTS, paper="coco")) == {("with DenseCRF", "method"): {"miou": 0.506}}
    assert _paper(ssr_report.val_rows(VARIANTS, paper=None)) == {}
    assert ssr_report.paper_dataset("demo") == ("voc", "paper, VOC") and ssr_report.paper_dataset("voc") == ("voc", "paper")


def test_a_paper_column_follows_its_metric_and_the_csv_keeps_the_figure():
    rows = ssr_report.val_rows({}, paper="voc")
    metrics = {"miou": 0.5, "miou_std": 0.01, "miou_min": 0.49, "miou_max": 0.51, "recall": 0.6, "recall_std": 0.0,
               "recall_min": 0.6, "recall_max": 0.6, "crf_miou": 0.55, "crf_miou_std": 0.02, "crf_miou_min": 0.53,
               "crf_miou_max": 0.57, "crf_confusion_ratio": 0.3, "crf_confusion_ratio_std": 0.01,
               "crf_confusion_ratio_min": 0.29, "crf_confusion_ratio_max": 0.31}
    frame = ssr_report.metric_frame(metrics, rows, ["miou", "recall", "confusion_ratio"])
    table = ssr_report.summary_table(frame, rows, paper_label="paper")
    assert list(table.columns) == ["mIoU", "mIoU (paper)", "recall", "confusion ratio (FP/TP)",
                                   "confusion ratio (FP/TP) (paper)"]
    assert list(table.loc[("without CRF", "method")]) == ["50.0 ± 1.0", "78.2", "60.0", "—", ""]
    assert list(table.loc[("with DenseCRF", "method")]) == ["55.0 ± 2.0", "79.5", "—", "0.3 ± 0.01", "0.198"]
    assert frame.set_index(["section", "metric"]).loc[("with DenseCRF", "miou"), "paper"] == 0.795


def test_a_cell_shows_a_spread_only_where_the_seeds_differ():
    assert ssr_report.cell("miou", 0.5, 0.01, 0.49, 0.51) == "50.0 ± 1.0"
    assert ssr_report.cell("miou", 0.5, 0.0, 0.5, 0.5) == "50.0"  # one seed (std 0 by convention), or no training
    assert ssr_report.cell("miou", 0.5, 6.8e-17, 0.5, 0.5) == "50.0"  # three equal seeds: the mean's rounding is no spread
    assert ssr_report.cell("confusion_ratio", 0.3, 0.01, 0.29, 0.31) == "0.3 ± 0.01"
    assert ssr_report.cell("iterations", 300.0, np.nan) == "300" and ssr_report.cell("miou", np.nan, np.nan) == "—"
    assert ssr_report.cell("ratio_to_gt_bound", 0.907, 0.016, 0.89, 0.92) == "90.7 ± 1.6"


def test_the_headline_is_a_few_numbers_with_their_spread():
    """Val without and with CRF, the Table 3 rows that ran (no DINO), the share of the bound: a
    mean and a std each, read from the two metrics files; nothing else, so a diff fits a screen."""
    root = Path(__file__).resolve().parents[1]
    seeds, miou = (json.loads((root / f"results/demo_{m}.json").read_text()) for m in ("seeds", "miou"))
    headline = ssr_report.headline_metrics(seeds, miou, VARIANTS)
    names = ["val_miou", "val_crf_miou", "seeds_cam_miou", "seeds_clip_miou", "seeds_sgc_miou", "val_share_of_gt_bound",
             "val_crf_share_of_gt_bound"]
    assert list(headline) == ["seeds", *(k for n in names for k in (n, f"{n}_std"))]
    assert headline["seeds"] == miou["seeds"]
    assert (headline["val_crf_miou"], headline["val_crf_miou_std"]) == (miou["crf_miou"], miou["crf_miou_std"])
    assert headline["seeds_sgc_miou"] == seeds["sgc_miou"]
    assert headline["val_crf_share_of_gt_bound"] == miou["crf_ratio_to_gt_bound"]
    assert "seeds_dino_miou" not in headline and seeds["dino_available"] == 0
    # the committed headline is what the stage writes from the committed reference run
    assert json.loads((root / "results/demo_headline.json").read_text()) == headline
    table = ssr_report.headline_table(headline, VARIANTS, {"seeds": ssr_report.seed_rows(VARIANTS, "cross_modal", "voc"),
                                                           "val": ssr_report.val_rows(VARIANTS, paper="voc")}, "paper")
    assert table.loc["val mIoU with DenseCRF", "paper"] == "79.5" and table.loc["val mIoU / mIoU of gt_bound", "paper"] == ""
    assert table.loc["seeds mIoU: + SGC mask", "ours"] == ssr_report.cell("miou", seeds["sgc_miou"], seeds["sgc_miou_std"])
    one = ssr_report.headline_table({**headline, "seeds": 1}, VARIANTS, {"seeds": [], "val": ssr_report.val_rows({})}, "paper")
    assert "±" not in "".join(one["ours"])


def test_the_params_page_names_each_run_s_changes_and_a_run_trained_otherwise():
    used = {"method": {"cmpa.loss": "cross_modal", "sgc.rho": 0.3, "infer.scales": [1.0, 0.75]},
            "cmpa_feature": {"cmpa.loss": "feature", "sgc.rho": 0.3, "infer.scales": [1.0, 0.75]}}
    checks = {"method, seed 0": "yes", "cmpa_feature, seed 0": "no: sgc.rho (recorded 0.5, now 0.3)"}
    page = ssr_report.params_page(used, checks, "sgc:\n  rho: 0.3   # (O) <chosen>\n", "params.yaml")
    assert re.search(r"<th>cmpa.loss</th>\s*<td>cross_modal</td>\s*<td>feature</td>", page)
    assert re.search(r"<th>sgc.rho</th>\s*<td>0.3</td>\s*<td></td>", page)  # the same as the method's: blank
    assert re.search(r"<th>infer.scales</th>\s*<td>\[1.0, 0.75\]</td>", page)
    assert re.search(r"<th>cmpa_feature, seed 0</th>\s*<td>no: sgc.rho \(recorded 0.5, now 0.3\)</td>", page)
    assert "# (O) &lt;chosen&gt;" in page  # the params file, escaped


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


def _cam_case():
    image = np.zeros((12, 16, 3), np.uint8)
    gt = np.zeros((12, 16), np.uint8)
    gt[2:6, 2:6], gt[7:10, 8:14], gt[0, 0] = 2, 3, 255
    regions = np.repeat(np.arange(4), 4)[None, :].repeat(12, 0)  # 4 vertical bands, ids 0-3 of 5
    return image, gt, np.where(gt == 255, 0, gt), regions


def test_cam_figure_has_a_row_per_present_class_a_column_per_distinct_cam_row_and_the_sgc_regions():
    image, gt, label, regions = _cam_case()
    cams = _cams(2)
    cams["method"] = cams["sgc"].copy()  # all switches on: the method is the SGC row
    targets = np.array([[True, False, False, False, False], [False, False, True, True, False]])
    fig = cam_figure(image, gt, label, cams, [2, 3], NAMES, regions=regions, targets=targets, title="im1")
    titles, ylabels, bars = _layout(fig)
    assert titles == [["image", "ground truth", "pseudo-label", "regions (SLIC + k-means)"],
                      ["SGC target regions", "CAM", "+ CLIP attention", "+ SGC mask\n= configured method"], ["", "", "", ""]]
    assert ylabels == ["", "bicycle", "bird"]  # each class row named at its left
    assert bars == ["CAM score"]
    assert [t.get_text() for t in fig.legends[0].get_texts()] == ["background", "bicycle", "bird", "ignore",
                                                                  "true outline (CAM panels)"]
    axes = {(ax.get_subplotspec().rowspan.start, ax.get_subplotspec().colspan.start): ax
            for ax in fig.axes if ax.get_subplotspec() is not None}
    for k in range(2):
        # the target regions panel: a class's targets in their region colours, every other region grey
        shown = np.asarray(axes[(1 + k, 0)].get_images()[0].get_array())
        grey = np.all(shown == np.array(NOT_TARGET), axis=-1)
        outline = np.zeros_like(grey)
        outline[:, 1:] |= regions[:, 1:] != regions[:, :-1]   # the first column of each band after the first
        outline[:, :-1] |= regions[:, :-1] != regions[:, 1:]  # and the last column of each band before the last
        for r in range(4):
            inside, edge = (regions == r) & ~outline, (regions == r) & outline
            assert grey[inside].all() == (not targets[k, r]), (k, r)
            # colours repeat beyond nine regions, so each region's edge is drawn at half its colour
            np.testing.assert_array_equal(shown[edge], shown[inside][: int(edge.sum())] * 0.5)
        assert axes[(1 + k, 0)].get_xlabel() == f"{int(targets[k].sum())} of 4 regions"
        # a CAM is its own opaque image, never drawn over the picture, with the class's outline over it
        for c, row in enumerate(("cam", "clip", "sgc"), start=1):
            images = axes[(1 + k, c)].get_images()
            assert len(images) == 1 and images[0].get_alpha() is None
            assert np.array_equal(np.asarray(images[0].get_array()), cams[row][k])
            assert len(axes[(1 + k, c)].collections) == 1  # the outline of gt == class
    cams = _cams(3)  # a method that is none of the rows gets its own column; without regions, no SGC column
    titles, ylabels, _ = _layout(cam_figure(image, gt, label, cams, [1, 2, 3], NAMES))
    assert titles[0] == ["image", "ground truth", "pseudo-label"]
    assert titles[1] == ["CAM", "+ CLIP attention", "+ SGC mask", "configured method"]
    assert ylabels == ["", *NAMES[1:]]
    with pytest.raises(ValueError, match="both regions and targets"):
        cam_figure(image, gt, label, cams, [1, 2, 3], NAMES, regions=regions)


def test_the_drawn_target_regions_are_the_ones_sgc_masks_with():
    """sgc_regions decides the targets as ssr.sgc does: the columns they cover are sgc_mask's."""
    torch.manual_seed(0)
    grid, num_regions = (4, 5), 6  # a 16 x 20 region map, 4 px patches
    region_map = torch.randint(0, num_regions, (4, 5)).repeat_interleave(4, 0).repeat_interleave(4, 1)
    region_map[:, :3] = num_regions  # padding without a region
    cam = torch.rand(3, grid[0] * grid[1])
    for keep_best, denominator, rho in ((True, "region", 0.5), (False, "image", 0.1)):
        kwargs = dict(t_hi=0.5, rho=rho, keep_best=keep_best, denominator=denominator)
        targets = sgc_regions(cam, region_map, grid, num_regions, **kwargs)
        assert targets.shape == (3, num_regions) and targets.dtype == bool and targets.any() and not targets.all()
        share = patch_region_share(region_onehot(region_map[None], num_regions), grid)
        expected = sgc_mask(cam[None], region_map[None], num_regions, grid, patch_area=0.5, **kwargs)
        assert torch.equal(column_mask(torch.from_numpy(targets)[None], share, 0.5), expected)
    assert np.array_equal(resize_nearest(np.arange(6).reshape(2, 3), (4, 6)),
                          np.array([[0, 0, 1, 1, 2, 2]] * 2 + [[3, 3, 4, 4, 5, 5]] * 2))


def test_curves_put_two_panels_a_row_and_name_the_quantity_and_runs():
    runs = {run: {0: (np.arange(1, 4), np.ones(3)), 1: (np.arange(1, 4), np.zeros(3))} for run in ("method", "a", "b")}
    fig = curve_figure("train/loss", runs, title="train/loss: the training loss", run_titles={"a": "a (cmpa.loss = feature)"})
    shown = [ax for ax in fig.axes if ax.get_visible()]
    assert [ax.get_title() for ax in shown] == ["method", "a (cmpa.loss = feature)", "b"]
    assert {ax.get_subplotspec().colspan.start for ax in shown} == {0, 1}  # two columns, a second row
    assert fig.get_figwidth() <= 2 * 4.2 and fig.get_suptitle() == "train/loss: the training loss"
    assert [t.get_text() for t in shown[0].get_legend().get_texts()] == ["seed 0", "seed 1"]


def test_the_comparison_figure_draws_our_range_and_the_papers_figure():
    panels = {"Table 3": [Bar("CAM", 40.0, 39.0, 41.5, 63.3), Bar("+ DINO attention", np.nan, np.nan, np.nan, 76.3)],
              "val": [Bar("method", 65.0, 64.0, 66.0)]}
    fig = comparison_figure(panels, paper_label="paper, VOC")
    table3, val = fig.axes
    assert [t.get_text() for t in table3.get_yticklabels()] == ["CAM", "+ DINO attention"]
    assert [p.get_width() for p in table3.patches] == [40.0]  # no bar for a row that did not run
    assert "not run" in [t.get_text() for t in table3.texts]
    assert [list(c.get_offsets()[:, 0]) for c in table3.collections] == [[63.3], [76.3]]  # the paper's diamonds
    assert [list(line.get_xdata()) for line in table3.lines] == [[39.0, 41.5]]  # the seeds' range
    assert len(val.collections) == 0 and [t.get_text() for t in fig.legends[0].get_texts()] == ["ours (mean)", "paper, VOC"]


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


def _by_hash(ids) -> list[str]:
    return sorted(ids, key=lambda i: hashlib.sha256(i.encode()).hexdigest())


def test_figure_candidates_pick_the_worst_and_a_fixed_random_sample_holding_only_those():
    """A stream of 8 images, n = 2: the 2 of lowest IoU wherever they come, and 2 others, the
    ones whose id hashes lowest; the same picks in any order; figure data is made only for images
    that could still be picked, and let go."""
    stream = [("i0", 0.6), ("i1", None), ("i2", 0.2), ("i3", 0.8), ("i4", 0.05), ("i5", 0.7), ("i6", 0.1), ("i7", 0.9)]
    ids = [i for i, _ in stream]
    random = [i for i in _by_hash(ids) if i not in ("i4", "i6")][:2]
    for order in (stream, stream[::-1], stream[3:] + stream[:3]):
        picker, made = FigureCandidates(2), []
        for image_id, iou in order:
            picker.offer(image_id, iou, lambda i=image_id, made=made: made.append(i) or f"data of {i}")
            assert len(picker.data) <= 3 * 2
        assert [(s, r, i) for s, r, i, _ in picker.picks()] == [("worst", 1, "i4"), ("worst", 2, "i6"),
                                                               ("random", 1, random[0]), ("random", 2, random[1])]
        assert [d for *_, d in picker.picks()] == [f"data of {i}" for i in ("i4", "i6", *random)]
        assert len(set(made)) == len(made)  # made once, when offered, and only for a candidate then
    # an image without ground truth can be a random pick, never a worst one; a worst pick is not drawn twice
    picker = FigureCandidates(3)
    for image_id, iou in [("a", 0.0), ("b", None), ("c", 0.4), ("d", 0.9), ("e", 0.9)]:
        picker.offer(image_id, iou, lambda i=image_id: i)
    first, second = _by_hash(["b", "e"])
    assert [(s, i) for s, _, i, _ in picker.picks()] == [("worst", "a"), ("worst", "c"), ("worst", "d"), ("random", first),
                                                        ("random", second)]
    assert [(name, title) for name, title, _ in picker.titled("mIoU", "5 images")][2:4] == [
        ("worst_3_d.png", "d\nlowest mIoU no. 3 of 5 images"),
        (f"random_1_{first}.png", f"{first}\nrandom pick no. 1 of 5 images")]
