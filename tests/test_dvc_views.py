"""DVC's views of the results as a person reads them offline: `dvc plots show` pages that load no
script from the network, a plot per logged quantity with the seeds overlaid and named, and the
headline metrics file (`ssr headline`) that `dvc metrics diff` shows in a screen.

The plots run on the reference run's committed dvclive curves (results/demo/method/seed*/dvclive)
in a copy of the workflow; the page's scripts come from the installed vl-convert-python.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import yaml
from test_dag import _run, _tool, copy_workflow
from test_pipeline_cli import ssr_cli

from ssr.curves import CURVES

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "workflow"))
import pipeline  # noqa: E402


def _specs(page: str) -> list[dict]:
    """The Vega-Lite spec of every plot div DVC wrote (`var spec = {...};` before `vegaEmbed`)."""
    return [json.loads(m) for m in re.findall(r"var spec = (\{.*?\});\s*vegaEmbed\(", page, re.S)]


def test_dvc_plots_show_writes_a_page_that_loads_nothing_and_overlays_the_seeds(tmp_path):
    work = copy_workflow(tmp_path / "work", ".dvc/config", ".dvc/.gitignore", "results/demo/method")
    _run(["git", "init", "-q"], work)
    assert "wrote .dvc/plots_template.html" in _run([sys.executable, "workflow/pipeline.py", "plots-template"], work).stdout
    _run([_tool("dvc"), "plots", "show", "-o", "plots"], work)
    page = (work / "plots/index.html").read_text()

    # no script, style or image from the network: every script is inline, and the libraries are in it
    inline = re.findall(r"<script[^>]*>(.*?)</script>", page, re.S)
    markup = re.sub(r"(<script[^>]*>).*?</script>", r"\1", page, flags=re.S)  # the page's own tags, not the scripts' strings
    assert [tag for tag in re.findall(r"<(?:script|link|img|iframe)\b[^>]*>", markup) if re.search(r"\b(src|href)=", tag)] == []
    assert "cdn.jsdelivr.net" not in page
    assert any("window.vegaEmbed=" in s and "window.vega=" in s and "window.vegaLite=" in s for s in inline)

    # a plot per logged quantity, titled with the dataset, the run, the seeds and the quantity in words
    seeds = yaml.safe_load((work / "params.yaml").read_text())["datasets"]["demo"]["seeds"]
    specs = _specs(page)
    assert len(specs) == len(CURVES)
    quantities = {f"demo, method, seeds {', '.join(map(str, seeds))}: {words}": q for q, words in CURVES.items()}
    shown = {}
    for spec in specs:
        title = spec["title"]["text"] if isinstance(spec["title"], dict) else spec["title"]
        shown[quantities[title]] = sorted({v["filename"] for v in spec["data"]["values"]})
    # the seeds overlaid: every seed's file of that quantity in the one plot, told apart in its legend
    assert shown == {q: [f"seed{s}/dvclive/plots/metrics/{q}.tsv" for s in seeds] for q in CURVES}


def test_the_plots_template_keeps_dvc_s_placeholders_and_drops_its_cdn_scripts():
    page = pipeline.plots_template()
    assert page.count("{plot_divs}") == 1 and page.count("{refresh_tag}") == 1
    assert "{scripts}" not in page  # where DVC would add its CDN <script src=...> tags
    assert page.count("</script") == 1  # the bundle's own, if any, escaped: the inline script ends where it should
    assert re.search(r"Vega-Lite 5\.\d+", page)  # DVC's templates are Vega-Lite 5 specs
    assert re.search(r"^\s*html_template = plots_template\.html$", (REPO / ".dvc/config").read_text(), re.M)
    assert pipeline.PLOTS_TEMPLATE == ".dvc/plots_template.html"


def test_headline_without_its_inputs_names_the_file_and_the_stage_and_writes_nothing(tmp_path):
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["results_root"] = str(tmp_path / "results")
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    (tmp_path / "results").mkdir()
    (tmp_path / "results/demo_miou.json").write_text((REPO / "results/demo_miou.json").read_text())
    proc = ssr_cli("headline", "--dataset", "demo", "--params", str(tmp_path / "params.yaml"), cwd=tmp_path)
    assert proc.returncode == 2
    assert f"{tmp_path}/results/demo_seeds.json: file not found (run `ssr pseudo-labels --dataset demo` first)" in proc.stderr
    assert not (tmp_path / "results/demo_headline.json").exists() and not (tmp_path / "results/demo").exists()
    # with both files: the JSON DVC compares, and the same numbers beside the paper's as a table
    (tmp_path / "results/demo_seeds.json").write_text((REPO / "results/demo_seeds.json").read_text())
    proc = ssr_cli("headline", "--dataset", "demo", "--params", str(tmp_path / "params.yaml"), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert json.loads((tmp_path / "results/demo_headline.json").read_text()) == json.loads(
        (REPO / "results/demo_headline.json").read_text())
    table = (tmp_path / "results/demo/headline.md").read_text()
    miou = json.loads((REPO / "results/demo_miou.json").read_text())
    assert f"| val mIoU with DenseCRF | {100 * miou['crf_miou']:.1f} ± {100 * miou['crf_miou_std']:.1f} | 79.5 |" in table
    assert table == proc.stdout.rstrip("\n") + "\n"
