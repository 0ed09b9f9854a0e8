"""The Snakemake and DVC DAGs: complete, toggled by params.yaml, and in agreement.

Everything here is a dry run of the real tools (snakemake -n, DVC's own parser)
on a copy of the workflow files in a temp dir, so nothing is trained and the
repository's data/ and results/ are never touched. The `ssr` CLI is not needed.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import tiny_params

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
DATASETS = ("demo", "voc", "coco")
CORE_RULES = {"prepare", "superpixels", "train", "pseudo_labels", "evaluate"}
STAGE_RULES = CORE_RULES | {"demo_clip", "retrain"}
WORKFLOW_FILES = ("Snakefile", "workflow", "params.yaml", "dvc.yaml", ".dvcignore")


def _tool(name: str) -> str:
    path = BIN / name
    if path.exists():
        return str(path)
    found = shutil.which(name)
    assert found, f"{name} is not installed next to {sys.executable} nor on PATH"
    return found


def _run(cmd: list[str], cwd: Path, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=120)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def _set_params(workdir: Path, **changes) -> dict:
    """Rewrite workdir/params.yaml; `retrain__enabled=True` sets retrain.enabled. Returns the params."""
    path = workdir / "params.yaml"
    params = yaml.safe_load(path.read_text())
    for dotted, value in changes.items():
        node = params
        *parents, leaf = dotted.split("__")
        for key in parents:
            node = node[key]
        node[leaf] = value
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return params


def _demo_clip_files(params: dict) -> list[Path]:
    checkpoint = Path(params["demo_clip"]["checkpoint"])
    return [checkpoint, checkpoint.parent / "open_clip_config.json", checkpoint.parent / "provenance.json"]


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    """A copy of the workflow as a fresh clone sees it: committed demo CLIP, no data, retrain off."""
    for name in WORKFLOW_FILES:
        src = REPO / name
        if src.is_dir():
            shutil.copytree(src, tmp_path / name)
        else:
            shutil.copy2(src, tmp_path / name)
    params = _set_params(tmp_path, retrain__enabled=False)
    for path in _demo_clip_files(params):
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / path).write_bytes(b"placeholder for the committed demo CLIP")
    return tmp_path


def _snakemake(workdir: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    return _run([_tool("snakemake"), "--dry-run", "--printshellcmds", "--cores", "1", *args], workdir, check)


def dry_run(workdir: Path, *targets: str, extra: tuple[str, ...] = ()) -> list[dict]:
    """The jobs `snakemake -n -p` plans: [{rule, input, output, wildcards, resources, shell}]."""
    out = _snakemake(workdir, *targets, *extra).stdout  # targets first: --config takes many values
    jobs, job = [], None
    for line in out.splitlines():
        if m := re.fullmatch(r"(?:local)?rule (\w+):", line):
            job = {"rule": m[1], "input": [], "output": [], "wildcards": {}, "resources": {}, "shell": None}
            jobs.append(job)
        elif job is None:
            continue
        elif m := re.fullmatch(r"    (input|output): (.*)", line):
            job[m[1]] = m[2].split(", ")
        elif m := re.fullmatch(r"    (wildcards|resources): (.*)", line):
            job[m[1]] = dict(item.split("=", 1) for item in m[2].split(", "))
        elif line.startswith("Shell command: "):
            job["shell"] = line.removeprefix("Shell command: ").strip()
    assert jobs, f"no jobs parsed from snakemake's dry run:\n{out}"
    return [j for j in jobs if j["rule"] != "all"]


def by_stage(jobs: list[dict]) -> dict[tuple[str, str | None], dict]:
    return {(j["rule"], j["wildcards"].get("ds")): j for j in jobs}


# ---------------------------------------------------------------- Snakemake


@pytest.mark.parametrize("ds", DATASETS)
def test_target_plans_whole_dag_without_demo_clip(workdir, ds):
    jobs = dry_run(workdir, f"results/{ds}_miou.json")
    assert sorted(j["rule"] for j in jobs) == sorted(CORE_RULES)
    assert all(j["wildcards"] == {"ds": ds} for j in jobs)
    stages = {rule: job for (rule, _), job in by_stage(jobs).items()}
    assert stages["evaluate"]["output"] == [f"results/{ds}_miou.json"]
    # one target runs everything: evaluate pulls the seeds, which pull the model
    assert f"results/{ds}_seeds.json" in stages["evaluate"]["input"]
    assert f"results/{ds}/model.pt" in stages["pseudo_labels"]["input"]
    assert f"data/{ds}/superpixels.h5" in stages["train"]["input"]
    assert f"data/{ds}/image_labels.json" in stages["superpixels"]["input"]
    for rule, job in stages.items():
        assert job["shell"] == f"ssr {rule.replace('_', '-')} --dataset {ds} --params params.yaml"
    clip = "ssr/assets/demo_clip/open_clip_model.safetensors"
    assert (clip in stages["train"]["input"]) == (ds == "demo")
    assert stages["train"]["resources"]["gpu"] == ("0" if ds == "demo" else "1")
    # a dry run creates nothing
    assert not (workdir / "data").exists() and not (workdir / "results").exists()


def test_default_target_is_demo(workdir):
    jobs = dry_run(workdir)
    assert {j["rule"] for j in jobs} == CORE_RULES
    assert {j["wildcards"]["ds"] for j in jobs} == {"demo"}


def test_demo_clip_runs_only_without_committed_checkpoint(workdir):
    (workdir / "ssr/assets/demo_clip/open_clip_model.safetensors").unlink()
    stages = by_stage(dry_run(workdir, "results/demo_miou.json"))
    assert set(stages) == {(r, "demo") for r in CORE_RULES} | {("demo_clip", None)}
    assert stages["demo_clip", None]["shell"] == "ssr demo-clip --params params.yaml"
    # voc does not need the demo CLIP at all
    assert "demo_clip" not in {j["rule"] for j in dry_run(workdir, "results/voc_miou.json")}


def test_retrain_enabled_in_params_joins_the_dag(workdir):
    _set_params(workdir, retrain__enabled=True)
    stages = by_stage(dry_run(workdir, "results/voc_miou.json"))
    assert {rule for rule, _ in stages} == CORE_RULES | {"retrain"}
    assert stages["retrain", "voc"]["shell"] == "ssr retrain --dataset voc --params params.yaml"
    assert "results/voc/pseudo_labels" in stages["retrain", "voc"]["input"]
    assert {"results/voc/retrain", "results/voc_retrain.json"} <= set(stages["evaluate", "voc"]["input"])


def test_config_override_that_disagrees_with_params_is_refused(workdir):
    proc = _snakemake(workdir, "results/voc_miou.json", "--config", "retrain={enabled: true}", check=False)
    assert proc.returncode != 0
    assert "retrain.enabled" in proc.stderr + proc.stdout and "edit params.yaml" in proc.stderr + proc.stdout
    # an override equal to params.yaml is harmless
    assert "retrain" not in {j["rule"] for j in dry_run(workdir, "results/voc_miou.json", extra=("--config", "retrain={enabled: false}"))}


def test_profiles_load(workdir):
    local = by_stage(dry_run(workdir, "results/voc_miou.json", extra=("--profile", "workflow/profiles/local")))
    assert local["train", "voc"]["resources"]["gpu"] == "1"
    # the slurm executor plugin is not installed here: plan with the dryrun executor instead
    slurm = by_stage(dry_run(workdir, "results/voc_miou.json",
                             extra=("--profile", "workflow/profiles/slurm", "--executor", "dryrun")))
    assert slurm["train", "voc"]["resources"]["gpu"] == "1"
    assert slurm["train", "voc"]["resources"]["slurm_partition"] != slurm["prepare", "voc"]["resources"]["slurm_partition"]
    profile = yaml.safe_load((workdir / "workflow/profiles/slurm/config.yaml").read_text())
    assert profile["executor"] == "slurm"


# ---------------------------------------------------------------- DVC

_DVC_DUMP = """
import json, sys
from dvc.dependency.param import ParamsDependency
from dvc.repo import Repo

stages = {}
for stage in Repo(sys.argv[1]).index.stages:
    stages[stage.name] = {
        "cmd": stage.cmd,
        "frozen": stage.frozen,
        "deps": sorted(d.def_path for d in stage.deps if not isinstance(d, ParamsDependency)),
        "params": sorted(p for d in stage.deps if isinstance(d, ParamsDependency) for p in d.params),
        "outs": {o.def_path: {"cache": o.use_cache, "metric": bool(o.metric)} for o in stage.outs},
    }
print(json.dumps(stages))
"""


def dvc_stages(workdir: Path) -> dict[tuple[str, str | None], dict]:
    """dvc.yaml as DVC itself resolves it (interpolation from params.yaml), keyed like by_stage."""
    _run([_tool("dvc"), "init", "--no-scm", "--quiet"], workdir)
    stages = json.loads(_run([sys.executable, "-c", _DVC_DUMP, str(workdir)], workdir).stdout)
    keyed = {}
    for name, stage in stages.items():
        rule, ds = name.rsplit("-", 1) if "-" in name else (name, None)  # "train-voc", "demo_clip"
        keyed[rule, ds] = stage
    return keyed


def _tracked_params(workdir: Path, params: dict) -> dict[tuple[str, str], list[str]]:
    """The params.yaml keys each Snakemake rule passes to tracked(), expanded per dataset."""
    text = "\n".join(p.read_text() for p in sorted((workdir / "workflow/rules").glob("*.smk")))
    found = {}
    for rule, body in re.findall(r"^rule (\w+):\n(.*?)(?=^rule |\Z)", text, re.S | re.M):
        if m := re.search(r"tracked=tracked\((.*?)\)", body, re.S):
            keys = re.findall(r'"([^"]+)"', m[1])
            for ds in DATASETS:
                fill = {"ds": ds, "preset": params["datasets"][ds]["preset"],
                        "source": "demo" if ds == "demo" else "download"}
                found[rule, ds] = sorted(k.format(**fill) for k in keys)
    return found


def test_snakemake_and_dvc_declare_the_same_dag(workdir):
    # custom roots: every path in both DAGs must follow params.yaml
    params = _set_params(workdir, data_root="store/data", results_root="out", retrain__enabled=True)
    for path in _demo_clip_files(params)[:1]:
        (workdir / path).unlink()  # so Snakemake plans demo_clip too
    smk = by_stage(dry_run(workdir, *(f"out/{ds}_miou.json" for ds in DATASETS)))
    dvc = dvc_stages(workdir)

    expected = {(r, ds) for r in STAGE_RULES - {"demo_clip"} for ds in DATASETS} | {("demo_clip", None)}
    assert set(smk) == expected
    assert set(dvc) == expected

    for key, job in smk.items():
        stage = dvc[key]
        assert job["shell"] == stage["cmd"], key
        assert job["shell"].split()[:2] == ["ssr", key[0].replace("_", "-")], key
        assert sorted(job["input"]) == stage["deps"], key
        if key == ("demo_clip", None):
            # DVC tracks the committed directory (in git, not in the DVC cache) and never re-runs it
            assert stage["frozen"] and stage["outs"] == {"ssr/assets/demo_clip": {"cache": False, "metric": False}}
            assert all(p.startswith("ssr/assets/demo_clip/") for p in job["output"])
            continue
        assert sorted(job["output"]) == sorted(stage["outs"]), key
        assert not stage["frozen"], key
        for path, out in stage["outs"].items():
            assert path.startswith(("store/data/", "out/")), path
            # metrics stay out of the cache so `dvc metrics diff` reads them from git
            if key[0] != "prepare":
                assert out["metric"] == path.endswith(".json"), path
            assert out["cache"] is not out["metric"], path
    metrics = sorted(p for s in dvc.values() for p, o in s["outs"].items() if o["metric"])
    assert metrics == sorted(f"out/{ds}_{m}.json" for ds in DATASETS for m in ("train", "seeds", "retrain", "miou"))

    # both tools re-run a stage when the same params.yaml sections change
    tracked = _tracked_params(workdir, params)
    assert len(tracked) == 6 * len(DATASETS)
    for key, stage in dvc.items():
        if key[0] != "demo_clip":
            assert tracked[key] == stage["params"], key
        for dotted in stage["params"]:
            node = params
            for part in dotted.split("."):
                assert part in node, f"{key}: params.yaml has no {dotted}"
                node = node[part]


def test_evaluate_needs_retrain_only_in_snakemake_when_disabled(workdir):
    """The documented difference: DVC has no conditional stages."""
    smk = by_stage(dry_run(workdir, "results/voc_miou.json"))
    dvc = dvc_stages(workdir)
    assert ("retrain", "voc") not in smk
    assert set(dvc["evaluate", "voc"]["deps"]) - set(smk["evaluate", "voc"]["input"]) == {
        "results/voc/retrain", "results/voc_retrain.json"}


def test_dvc_reads_the_repository_pipeline():
    dag = _run([_tool("dvc"), "dag", "--dot"], REPO).stdout
    for ds in DATASETS:
        chain = [f"prepare-{ds}", f"superpixels-{ds}", f"train-{ds}", f"pseudo_labels-{ds}", f"evaluate-{ds}"]
        for a, b in zip(chain, chain[1:]):
            assert re.search(rf'"{a}"\s*->\s*"{b}"', dag), f"no edge {a} -> {b} in dvc dag"
        assert bool(re.search(rf'"demo_clip"\s*->\s*"train-{ds}"', dag)) == (ds == "demo")
    listed = _run([_tool("dvc"), "stage", "list", "--name-only"], REPO).stdout.split()
    assert len(listed) == 1 + 6 * len(DATASETS)
    raw = yaml.safe_load((REPO / "dvc.yaml").read_text())
    plots = [next(iter(p)) for p in raw["plots"]]
    assert plots == [f"${{results_root}}/{ds}/dvclive/plots/metrics" for ds in DATASETS]


# ---------------------------------------------------------------- both, executed

def test_demo_dag_runs_for_real_and_dvc_metrics_diff_sees_a_param_edit(tmp_path, tiny_clip_dir):
    """The real `ssr` stages on a shrunk demo: Snakemake to the end, then `dvc repro`,
    a committed baseline, a param edit that re-runs only evaluate, and `dvc metrics diff`."""
    work = tmp_path / "work"
    work.mkdir()
    for name in (*WORKFLOW_FILES, ".gitignore"):
        src = REPO / name
        (shutil.copytree if src.is_dir() else shutil.copy2)(src, work / name)
    raw = tiny_params(yaml.safe_load((work / "params.yaml").read_text()), tiny_clip_dir,
                      **{"train_presets.demo.iterations": 3, "infer.crf": False})
    (work / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", "GIT_AUTHOR_NAME": "t",
           "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}

    def run(*cmd):
        proc = subprocess.run(cmd, cwd=work, capture_output=True, text=True, timeout=600, env=env)
        assert proc.returncode == 0, f"{cmd} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        return proc.stdout + proc.stderr

    run(_tool("snakemake"), "--cores", "1", "results/demo_miou.json")
    first = json.loads((work / "results/demo_miou.json").read_text())
    assert 0 <= first["miou"] <= 1
    assert "Nothing to be done" in run(_tool("snakemake"), "-n", "--cores", "1", "results/demo_miou.json")

    run("git", "init", "-q")
    run(_tool("dvc"), "init", "-q")
    run("git", "add", "-A")
    run("git", "commit", "-qm", "workflow")  # as in a clone: dvclive needs a commit to exist
    run(_tool("dvc"), "repro", "evaluate-demo")
    assert (work / "results/demo/dvclive/metrics.json").is_file()
    assert "up to date" in run(_tool("dvc"), "status", "evaluate-demo")
    run("git", "add", "-A")
    run("git", "commit", "-qm", "baseline")  # metrics files are small and tracked by git (cache: false)

    # bg_power is read by train and pseudo_labels (and so evaluate re-runs), not by prepare/superpixels
    _set_params(work, pseudo_labels__bg_power=3.0)
    out = run(_tool("dvc"), "repro", "evaluate-demo")
    assert "Running stage 'pseudo_labels-demo'" in out
    assert "Running stage 'superpixels-demo'" not in out
    # voc/coco metrics do not exist here; DVC says so on a line after the JSON
    diff = json.loads(run(_tool("dvc"), "metrics", "diff", "--json").splitlines()[0])
    seeds = diff["results/demo_seeds.json"]
    baseline = json.loads(run("git", "show", "HEAD:results/demo_seeds.json"))
    assert seeds["cam_miou"]["old"] == pytest.approx(baseline["cam_miou"])
    assert seeds["cam_miou"]["diff"] != 0
