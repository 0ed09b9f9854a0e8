"""The Snakemake and DVC DAGs: complete, in agreement, safe on a fresh clone and on a cluster.

Most tests here are dry runs of the real tools (snakemake -n, DVC's own parser and
planner) on a copy of the workflow files in a temp dir, so nothing is trained and the
repository's data/ and results/ are never touched. The last test runs the real `ssr`
stages of a shrunk demo through Snakemake, then DVC. Training through the DAG (resume
after SIGTERM, torchrun) is in tests/test_workflow_train.py.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import tiny_params

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
DATASETS = ("demo", "voc", "coco")
STAGE_RULES = ("prepare", "weights", "superpixels", "train", "pseudo_labels", "retrain", "evaluate", "headline")
METRICS = ("train", "seeds", "retrain", "miou", "headline")
WORKFLOW_FILES = ("Snakefile", "workflow", "params.yaml", "dvc.yaml", ".dvcignore", ".gitignore")

sys.path.insert(0, str(REPO / "workflow"))
import pipeline  # noqa: E402

from ssr.curves import CURVES  # noqa: E402


def _tool(name: str) -> str:
    path = BIN / name
    if path.exists():
        return str(path)
    found = shutil.which(name)
    assert found, f"{name} is not installed next to {sys.executable} nor on PATH"
    return found


def _env() -> dict:
    """The test's venv first on PATH (so `ssr` and `torchrun` are this checkout's), plus a git identity."""
    return {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
            "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p),
            "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}


def _run(cmd: list[str], cwd: Path, check: bool = True, timeout: int = 180) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=_env())
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    return proc


def set_params(workdir: Path, **changes) -> dict:
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


def copy_workflow(dest: Path, *extra: str) -> Path:
    """The workflow files of this checkout (and `extra` paths) copied to `dest`, as a clone has them."""
    dest.mkdir(parents=True, exist_ok=True)
    for name in (*WORKFLOW_FILES, *extra):
        src = REPO / name
        (dest / name).parent.mkdir(parents=True, exist_ok=True)
        if src.is_dir():
            shutil.copytree(src, dest / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(src, dest / name)
    return dest


def demo_backbone_files(params: dict) -> list[Path]:
    """The committed demo CLIP's and DINO's files."""
    out = []
    for name in pipeline.DEMO_BACKBONES:
        weights, config = map(Path, pipeline.demo_backbone_files(params, name))
        out += [weights, config, weights.parent / "provenance.json"]
    return out


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    """A copy of the workflow as a fresh clone sees it, minus the committed metrics: no data, no results."""
    copy_workflow(tmp_path)
    params = yaml.safe_load((tmp_path / "params.yaml").read_text())
    for path in demo_backbone_files(params):
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / path).write_bytes(b"placeholder for a committed demo backbone")
    return tmp_path


def snakemake(workdir: Path, *args: str, check: bool = True, cores: int = 64) -> subprocess.CompletedProcess:
    """A dry run; many cores, so every job shows the threads its rule declares."""
    return _run([_tool("snakemake"), "--dry-run", "--printshellcmds", "--cores", str(cores), *args], workdir, check)


def dry_run(workdir: Path, *targets: str, extra: tuple[str, ...] = (), cores: int = 64) -> dict[str, dict]:
    """The jobs `snakemake -n -p` plans, by rule name: {input, output, log, threads, resources, shell}."""
    out = snakemake(workdir, *targets, *extra, cores=cores).stdout  # targets first: --config takes many values
    jobs, job = {}, None
    for line in out.splitlines():
        if m := re.fullmatch(r"(?:local)?rule ([\w-]+):", line):
            job = {"input": [], "output": [], "log": [], "threads": 1, "resources": {}, "shell": None}
            jobs[m[1]] = job
        elif job is None:
            continue
        elif m := re.fullmatch(r"    (input|output|log): (.*)", line):
            job[m[1]] = m[2].split(", ")
        elif m := re.fullmatch(r"    threads: (\d+)", line):
            job["threads"] = int(m[1])
        elif m := re.fullmatch(r"    resources: (.*)", line):
            job["resources"] = dict(item.split("=", 1) for item in m[1].split(", "))
        elif line.startswith("Shell command: "):
            job["shell"] = line.removeprefix("Shell command: ").strip()
    assert jobs, f"no jobs parsed from snakemake's dry run:\n{out}"
    return {name: j for name, j in jobs.items() if name not in ("all", *DATASETS)}


def unwrap(shell: str, name: str) -> str:
    """The stage command inside a rule's `(cmd) > logs/<name>.log 2>&1`."""
    m = re.fullmatch(rf"\((.*)\) > logs/{re.escape(name)}\.log 2>&1", shell)
    assert m, f"{name}: shell does not log to logs/{name}.log: {shell}"
    return m[1]


def outputs_of(params: dict, resources: dict, ds: str) -> list[str]:
    return [p for s in pipeline.dataset_stages(params, resources, ds) for p in s.output_paths]


def make_paths(root: Path, paths: list[str], content: str = "{}\n", future: float = 0) -> None:
    """Create every path (a folder if it has no suffix), with an mtime `future` seconds ahead."""
    for p in paths:
        path = root / p
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.suffix:
            path.write_text(content)
        else:
            path.mkdir(exist_ok=True)
        if future:
            os.utime(path, (time.time() + future,) * 2)


# ---------------------------------------------------------------- Snakemake


@pytest.mark.parametrize("ds", DATASETS)
def test_dataset_target_plans_every_stage_from_scratch(workdir, ds):
    """`snakemake {ds}` on a clone runs everything, even with the committed metrics newer than all."""
    params, resources = pipeline.load(workdir / "params.yaml", workdir / pipeline.RESOURCES)
    make_paths(workdir, [f"results/{ds}_{m}.json" for m in METRICS], future=86400)
    jobs = dry_run(workdir, ds)
    assert set(jobs) == {f"{r}-{ds}" for r in STAGE_RULES}
    stages = {s.name: s for s in pipeline.dataset_stages(params, resources, ds)}
    for name, job in jobs.items():
        rule = name.rsplit("-", 1)[0]
        cmd = unwrap(job["shell"], name)
        threads = job["threads"] // stages[name].processes
        # every rule passes its threads on, logs, and tells a scheduler its memory and time
        resume = " --resume" if rule == "train" else ""
        assert cmd.endswith(f"--dataset {ds} --params params.yaml{resume} --threads {threads}"), cmd
        assert job["log"] == [f"logs/{name}.log"]
        assert int(job["resources"]["mem_mb"]) > 0 and int(job["resources"]["runtime"]) > 0, name
        cpu_only = ("prepare", "weights", "superpixels", "retrain", "headline")
        assert job["resources"]["gpu"] == ("0" if ds == "demo" or rule in cpu_only else "1"), name
    assert jobs[f"train-{ds}"]["shell"].startswith(
        f"(python workflow/scripts/checkpoints.py --dataset {ds} --params params.yaml && ssr train ")
    assert jobs[f"train-{ds}"]["resources"]["nodes"] == "1"
    seeds = params["datasets"][ds]["seeds"]
    assert f"results/{ds}/method/seed{seeds[0]}/model.safetensors" in jobs[f"pseudo_labels-{ds}"]["input"]
    assert f"data/{ds}/superpixels.h5" in jobs[f"train-{ds}"]["input"]
    assert ("ssr/assets/demo_clip/open_clip_model.safetensors" in jobs[f"train-{ds}"]["input"]) == (ds == "demo")
    # the demo is sized for 2 cores; the real datasets for a GPU node
    budget = max(j["threads"] for j in jobs.values())
    assert budget == 2 if ds == "demo" else budget >= 8
    # a dry run creates nothing
    assert not (workdir / "data").exists() and not (workdir / "results" / ds).exists()


def test_a_committed_metrics_file_is_never_taken_for_a_result(workdir):
    """Asked for directly, a reference metrics file without its run is refused, whatever its mtime."""
    params, resources = pipeline.load(workdir / "params.yaml", workdir / pipeline.RESOURCES)
    make_paths(workdir, [f"results/demo_{m}.json" for m in METRICS], future=86400)
    proc = snakemake(workdir, "results/demo_miou.json", check=False)
    assert proc.returncode != 0
    text = proc.stdout + proc.stderr
    assert "Nothing to be done" not in text
    assert "results/demo_miou.json is the committed reference run's metrics file" in text
    assert "snakemake --cores N demo" in text
    # the stage itself (or the dataset) computes it from scratch
    assert set(dry_run(workdir, "evaluate-demo")) == {f"{r}-demo" for r in STAGE_RULES if r != "headline"}
    # the headline, which reads it, waits for the stages that rewrite it instead of asking for it
    assert set(dry_run(workdir, "headline-demo")) == {f"{r}-demo" for r in STAGE_RULES}
    # once every product exists, the file is a result like any other
    make_paths(workdir, outputs_of(params, resources, "demo"))
    assert "Nothing to be done" in snakemake(workdir, "results/demo_miou.json").stdout
    assert "Nothing to be done" in snakemake(workdir, "demo").stdout


def test_default_target_is_the_demo(workdir):
    assert set(dry_run(workdir)) == {f"{r}-demo" for r in STAGE_RULES}


def test_threads_follow_the_cores_given(workdir):
    """`{threads}` reaches every command: with one core every stage gets --threads 1."""
    jobs = dry_run(workdir, "voc", cores=1)
    assert all(unwrap(j["shell"], name).endswith("--threads 1") for name, j in jobs.items())


def test_multi_gpu_training_runs_torchrun_on_one_node(workdir):
    set_params(workdir, datasets__voc__gpus=4)
    train = dry_run(workdir, "train-voc")["train-voc"]
    assert unwrap(train["shell"], "train-voc") == (
        "python workflow/scripts/checkpoints.py --dataset voc --params params.yaml && "
        "torchrun --standalone --nproc_per_node 4 -m ssr train --dataset voc --params params.yaml --resume --threads 2")
    assert train["threads"] == 8  # shared by the 4 processes
    assert (train["resources"]["gpu"], train["resources"]["nodes"]) == ("4", "1")


@pytest.mark.parametrize("backbone", ["demo_clip", "demo_dino"])
def test_a_demo_backbone_runs_only_without_committed_checkpoint(workdir, backbone):
    """The committed DINO is in the DAG when the demo uses it (datasets.demo.dino_model: demo)."""
    params = set_params(workdir, datasets__demo__dino_model="demo")
    (workdir / params[backbone]["checkpoint"]).unlink()
    jobs = dry_run(workdir, "demo")
    assert set(jobs) == {f"{r}-demo" for r in STAGE_RULES} | {backbone}
    command = f"ssr {backbone.replace('_', '-')} --params params.yaml --threads 2"
    assert unwrap(jobs[backbone]["shell"], backbone) == command
    # voc does not need the demo backbones at all
    assert backbone not in dry_run(workdir, "voc")


def test_weights_are_fetched_by_a_local_job_before_train(workdir):
    """On a cluster the weights rule runs on the submitting host (the login node, which has the
    network) before every job that loads CLIP and DINO. Snakemake's dry run does not say which
    rules are local, so the rule runs for real under the SLURM executor plugin: a local rule runs
    here, where no `sbatch` exists, and Snakemake logs it as a localrule."""
    jobs = dry_run(workdir, "voc")
    order = list(jobs)
    assert order.index("weights-voc") < order.index("train-voc")
    for stage in ("train", "pseudo_labels", "evaluate"):
        assert "weights/voc.json" in jobs[f"{stage}-voc"]["input"], stage
    params = yaml.safe_load((workdir / "params.yaml").read_text())["datasets"]["voc"]
    for folder, files in ((f"weights/open_clip/{params['clip_model']}/{params['clip_pretrained']}",
                           ("open_clip_config.json", "open_clip_model.safetensors")),
                          (f"weights/timm/{params['dino_model']}", ("config.json", "model.safetensors"))):
        make_paths(workdir, [f"{folder}/{name}" for name in files])  # a filled cache: nothing to download
    out = _run([_tool("snakemake"), "--profile", "workflow/profiles/slurm", "weights-voc"], workdir, timeout=600)
    assert "localrule weights-voc:" in out.stdout + out.stderr
    assert json.loads((workdir / "weights/voc.json").read_text())["clip"]["folder"] == "open_clip/ViT-B-16/openai"


def test_config_override_that_disagrees_with_params_is_refused(workdir):
    proc = snakemake(workdir, "voc", "--config", "retrain={enabled: true}", check=False)
    assert proc.returncode != 0
    assert "retrain.enabled" in proc.stderr + proc.stdout and "edit params.yaml" in proc.stderr + proc.stdout
    # an override equal to params.yaml is harmless
    assert "train-voc" in dry_run(workdir, "voc", extra=("--config", "retrain={enabled: false}"))


def test_lint_is_clean():
    """`snakemake --lint` on the checkout as it is (committed metrics, hence the guard rules, included)."""
    proc = _run([_tool("snakemake"), "--lint"], REPO)
    assert "Congratulations, your workflow is in a good condition!" in proc.stdout + proc.stderr


def test_slurm_profile_asks_for_the_gpus_on_one_node(workdir):
    """The SLURM profile, through the real executor plugin (a test extra), in a dry run."""
    set_params(workdir, datasets__coco__gpus=4)
    jobs = dry_run(workdir, "voc", "coco", extra=("--profile", "workflow/profiles/slurm"))
    profile = yaml.safe_load((workdir / "workflow/profiles/slurm/config.yaml").read_text())
    assert profile["executor"] == "slurm" and profile["retries"] >= 1
    coco = jobs["train-coco"]
    assert (coco["resources"]["gpu"], coco["resources"]["nodes"]) == ("4", "1")
    assert "--nproc_per_node 4" in coco["shell"]
    assert coco["resources"]["slurm_partition"] == "gpu" and "--signal=TERM" in coco["resources"]["slurm_extra"]
    assert jobs["train-voc"]["resources"]["gpu"] == "1" and "torchrun" not in jobs["train-voc"]["shell"]
    assert int(coco["resources"]["runtime"]) > int(jobs["train-voc"]["resources"]["runtime"])
    assert jobs["prepare-voc"]["resources"]["slurm_partition"] == "cpu"
    for name in ("pseudo_labels-voc", "evaluate-coco"):
        assert (jobs[name]["resources"]["gpu"], jobs[name]["resources"]["slurm_partition"]) == ("1", "gpu")


def test_prepare_and_targets_run_on_the_submitting_host():
    """localrules: downloads need the login node's network; targets and a disabled retrain are no-ops."""
    params, resources = pipeline.load(REPO / "params.yaml", REPO / pipeline.RESOURCES)
    stages = pipeline.stages(params, resources)
    assert {s.name for s in stages if s.local} == {f"{r}-{ds}" for r in ("prepare", "weights", "headline") for ds in DATASETS} | (
        {f"retrain-{ds}" for ds in DATASETS} if not params["retrain"]["enabled"] else set())
    assert "localrule: _stage.local" in (REPO / "workflow/rules/stages.smk").read_text()


# ---------------------------------------------------------------- DVC

_DVC_DUMP = """
import json, sys
from dvc.dependency.param import ParamsDependency
from dvc.repo import Repo

stages = {}
for stage in Repo(sys.argv[1]).index.stages:
    root = stage.repo.root_dir
    rel = lambda o: __import__("os").path.relpath(o.fs_path, root)
    stages[stage.name] = {
        "cmd": stage.cmd,
        "frozen": stage.frozen,
        "dvcfile": __import__("os").path.relpath(stage.path, root),
        "deps": sorted(rel(d) for d in stage.deps if not isinstance(d, ParamsDependency)),
        "params": sorted(p for d in stage.deps if isinstance(d, ParamsDependency) for p in d.params),
        "outs": {rel(o): {"cache": o.use_cache, "metric": bool(o.metric), "persist": o.persist} for o in stage.outs},
    }
print(json.dumps(stages))
"""


def in_dag_order(names: list[str], ds: str) -> bool:
    """`names` are the dataset's stages, each after the stages it reads (DVC orders independent ones as it likes)."""
    after = {"superpixels": ("prepare",), "train": ("superpixels", "weights"), "pseudo_labels": ("train", "weights"),
             "retrain": ("pseudo_labels",), "evaluate": ("retrain", "weights")}
    position = {name: k for k, name in enumerate(names)}
    return sorted(names) == sorted(f"{r}-{ds}" for r in STAGE_RULES) and all(
        position[f"{before}-{ds}"] < position[f"{rule}-{ds}"] for rule, needs in after.items() for before in needs)


def dvc_stages(workdir: Path) -> dict[str, dict]:
    """Every dvc.yaml under workdir as DVC itself reads it, paths relative to the repository root."""
    if not (workdir / ".dvc").exists():
        _run([_tool("dvc"), "init", "--no-scm", "--quiet"], workdir)
    return json.loads(_run([sys.executable, "-c", _DVC_DUMP, str(workdir)], workdir).stdout)


def test_snakemake_and_dvc_declare_the_same_dag(workdir):
    # custom roots: every path in both DAGs must follow params.yaml; torchrun for voc; the CLIP re-trained
    params = set_params(workdir, data_root="store/data", results_root="out", weights_root="cache/weights",
                        retrain__enabled=True, datasets__voc__gpus=2, datasets__demo__dino_model="demo")
    for name in pipeline.DEMO_BACKBONES:  # so Snakemake plans demo_clip and demo_dino too
        (workdir / params[name]["checkpoint"]).unlink()
    _run([sys.executable, "workflow/pipeline.py", "dvc", "voc", "coco"], workdir)
    smk = dry_run(workdir, *DATASETS)
    dvc = dvc_stages(workdir)
    expected = {f"{r}-{ds}" for r in STAGE_RULES for ds in DATASETS} | set(pipeline.DEMO_BACKBONES)
    assert set(smk) == set(dvc) == expected
    resources = pipeline.load(workdir / "params.yaml", workdir / pipeline.RESOURCES)[1]
    curves = {p for s in pipeline.stages(params, resources) for p in s.curves}

    for name, job in smk.items():
        stage = dvc[name]
        assert stage["dvcfile"] == ("dvc.yaml" if name.endswith("demo") or name in pipeline.DEMO_BACKBONES else
                                    f"workflow/dvc/{name.rsplit('-', 1)[1]}/dvc.yaml"), name
        # the same command; Snakemake adds only the log
        assert unwrap(job["shell"], name) == stage["cmd"], name
        assert sorted(job["input"]) == stage["deps"], name
        if name in pipeline.DEMO_BACKBONES:
            # DVC tracks the committed folder (in git, not in the DVC cache) and never re-runs it
            assert stage["frozen"] and stage["outs"] == {f"ssr/assets/{name}": {"cache": False, "metric": False,
                                                                                "persist": False}}
            continue
        assert not stage["frozen"], name
        # the same outputs; DVC also declares the method's dvclive curves, which Snakemake must not
        # (it deletes declared outputs before a retry, and a resumed run appends to them)
        assert sorted(job["output"]) == sorted(set(stage["outs"]) - curves), name
        for path, out in stage["outs"].items():
            assert path.startswith(("store/data/", "out/", "cache/weights/")), path
            if path in curves:
                assert out == {"cache": False, "metric": False, "persist": True}, path
            else:
                # metrics stay out of the cache so `dvc metrics diff` reads them from git
                assert out["metric"] == bool(re.fullmatch(r"out/[a-z]+_[a-z]+\.json", path)), path
                assert out["cache"] is not out["metric"] and not out["persist"], path
        # both runners re-run a stage when the same params.yaml keys change
        assert stage["params"] == sorted(next(s for s in pipeline.stages(params, resources) if s.name == name).params)
        for dotted in stage["params"]:
            node = params
            for part in dotted.split("."):
                assert part in node, f"{name}: params.yaml has no {dotted}"
                node = node[part]
    metrics = sorted(p for s in dvc.values() for p, o in s["outs"].items() if o["metric"])
    assert metrics == sorted(f"out/{ds}_{m}.json" for ds in DATASETS for m in METRICS)
    # no timing file is a metric; the wall times go to results/{ds}/timings/
    assert not any("timing" in p for s in dvc.values() for p in s["outs"])


def test_committed_dvc_files_are_current_and_the_root_one_is_the_demo():
    """dvc.yaml is generated from params.yaml; it holds the demo (+ the committed backbones it uses) and nothing else."""
    assert _run([sys.executable, "workflow/pipeline.py", "dvc", "--check"], REPO).returncode == 0
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    demo = yaml.safe_load((REPO / "params.yaml").read_text())["datasets"]["demo"]
    used = set(pipeline.demo_backbones_used(demo))
    assert "demo_clip" in used and set(stages) == {f"{r}-demo" for r in STAGE_RULES} | used
    # voc/coco get their own files, written when first run (and then committed with their results)
    for path in (REPO / "workflow").glob("dvc/*/dvc.yaml"):
        assert set(yaml.safe_load(path.read_text())["stages"]) == {f"{r}-{path.parent.name}" for r in STAGE_RULES}
    # DVC's plots: one per logged quantity, the method's seeds overlaid, titled with the run and the quantity in words
    raw = yaml.safe_load((REPO / "dvc.yaml").read_text())
    plots = {name: spec for p in raw["plots"] for name, spec in p.items()}
    seeds = yaml.safe_load((REPO / "params.yaml").read_text())["datasets"]["demo"]["seeds"]
    assert list(plots) == [f"demo method: {q}" for q in CURVES]
    for quantity, words in CURVES.items():
        spec = plots[f"demo method: {quantity}"]
        assert spec["title"] == f"demo, method, seeds {', '.join(map(str, seeds))}: {words}"
        assert spec["y"] == {f"results/demo/method/seed{s}/dvclive/plots/metrics/{quantity}.tsv": quantity.split("/")[1]
                             for s in seeds}
        assert (spec["x"], spec["x_label"]) == ("step", "iteration")


def test_dvc_reads_the_repository_pipeline():
    dag = _run([_tool("dvc"), "dag", "--dot"], REPO).stdout
    edges = [("prepare", "superpixels"), ("superpixels", "train"), ("weights", "train"), ("train", "pseudo_labels"),
             ("weights", "pseudo_labels"), ("pseudo_labels", "retrain"), ("retrain", "evaluate"), ("weights", "evaluate")]
    for a, b in edges:
        assert re.search(rf'"{a}-demo"\s*->\s*"{b}-demo"', dag), f"no edge {a}-demo -> {b}-demo in dvc dag"
    assert re.search(r'"demo_clip"\s*->\s*"train-demo"', dag)
    # no warnings about metrics of datasets that never ran
    proc = _run([_tool("dvc"), "metrics", "show"], REPO)
    assert "failed" not in (proc.stdout + proc.stderr).lower() and "warning" not in proc.stderr.lower()
    assert set(re.findall(r"^(results/\S+)", proc.stdout, re.M)) >= {f"results/demo_{m}.json" for m in METRICS}


def test_plain_dvc_repro_is_the_demo_and_voc_runs_when_named(workdir):
    """What `dvc repro` would run on a fresh clone (planned with --force, which runs the planner
    without hashing the missing inputs; see test_dvc_dry_run_on_a_fresh_clone)."""
    _run(["git", "init", "-q"], workdir)
    _run([_tool("dvc"), "init", "-q"], workdir)

    def planned(*args):
        out = _run([_tool("dvc"), "repro", "--dry", "--force", *args], workdir).stdout
        return re.findall(r"Running stage '(?:[^':]*:)?([^']+)'", out)

    assert in_dag_order(planned(), "demo")
    _run([sys.executable, "workflow/pipeline.py", "dvc", "voc"], workdir)
    assert in_dag_order(planned(), "demo")  # still the demo alone
    assert in_dag_order(planned("workflow/dvc/voc/dvc.yaml"), "voc")
    upstream = planned("workflow/dvc/voc/dvc.yaml:train-voc")
    assert sorted(upstream) == sorted(f"{r}-voc" for r in STAGE_RULES[:4]) and upstream[-1] == "train-voc"


def test_dvc_dry_run_on_a_fresh_clone(workdir):
    """DVC 3.67's `dvc repro --dry` hashes every input for its run cache and fails on the first
    missing one (treeverse/dvc#9818), i.e. on any fresh clone of a pipeline with two stages. The
    README's two ways to see the plan work: `dvc status` and `dvc repro --dry --force-downstream`."""
    _run(["git", "init", "-q"], workdir)
    _run([_tool("dvc"), "init", "-q"], workdir)
    status = _run([_tool("dvc"), "status"], workdir).stdout
    for r in STAGE_RULES:
        assert f"{r}-demo:" in status
    out = _run([_tool("dvc"), "repro", "--dry", "--force-downstream"], workdir).stdout
    assert in_dag_order(re.findall(r"Running stage '([^']+)'", out), "demo")
    # `dvc exp run --dry` fails the same way; with --force it lists every stage (all must run here)
    _run(["git", "add", "-A"], workdir)
    _run(["git", "commit", "-qm", "clone"], workdir)
    proc = _run([_tool("dvc"), "exp", "run", "--dry", "-S", "affinity.use_sgc=false"], workdir, check=False)
    assert proc.returncode != 0 and "No such file or directory" in proc.stderr + proc.stdout
    out = _run([_tool("dvc"), "exp", "run", "--dry", "--force", "-S", "affinity.use_sgc=false"], workdir).stdout
    assert in_dag_order(re.findall(r"Running stage '([^']+)'", out), "demo")
    assert not (workdir / "data").exists()
    assert _run(["git", "status", "--porcelain"], workdir).stdout == ""  # a dry run changes no file


def test_every_output_is_tracked_or_ignored(tmp_path):
    """What the runners and the stages write: ignored by git, except the metrics files and the
    method's training curves, which are committed with the reference run (and dvc.lock)."""
    copy_workflow(tmp_path)
    _run(["git", "init", "-q"], tmp_path)
    params, resources = pipeline.load(REPO / "params.yaml", REPO / pipeline.RESOURCES)
    written = [p for ds in DATASETS for s in pipeline.dataset_stages(params, resources, ds) for p in [*s.output_paths, s.log]]
    for ds in DATASETS:
        for run in pipeline.runs(params, ds) + ["cmpa_feature"]:
            for seed in pipeline.seeds(params, ds):
                d = pipeline.run_dir(params, ds, run, seed)
                written += [f"{d}/checkpoint.pt", f"{d}/checkpoint.stale.pt", f"{d}/resume.json", f"{d}/dvclive/metrics.json",
                            f"{d}/dvclive/plots/metrics/train/loss.tsv", f"{d}/pseudo_labels/x.png"]
        written += [f"results/{ds}/timings/train.json", f"results/{ds}/figures/a.png", f"results/{ds}/retrain/model.pt"]
    written += [".snakemake/log/x.log", ".dvc/tmp/x", ".dvc/cache/files/md5/00/x", "logs/train-demo.log"]
    tracked = {p for p in written if re.fullmatch(r"results/\w+\.json", p)} | {
        p for p in written if re.fullmatch(r"results/\w+/method/seed\d+/dvclive/.*", p)}
    proc = subprocess.run(["git", "check-ignore", "--no-index", "--stdin"], cwd=tmp_path, input="\n".join(written),
                          capture_output=True, text=True, env=_env())
    ignored = set(proc.stdout.split())
    assert ignored == set(written) - tracked
    assert tracked >= {f"results/{ds}_{m}.json" for ds in DATASETS for m in METRICS}
    assert "results/demo/method/seed0/dvclive/plots/metrics/train/loss.tsv" in tracked
    assert not any("gt_bound" in p or "cmpa" in p for p in tracked)  # variants' curves stay local


# ---------------------------------------------------------------- both, executed

def test_demo_dag_runs_from_scratch_then_dvc_commit_status_and_metrics_diff(tmp_path, tiny_clip_dir):
    """A clone with the committed reference metrics (newer than anything) and no data: `snakemake
    demo` computes the whole shrunk demo; `dvc commit` (make reference) gives a dvc.lock that
    `dvc status` and Snakemake both agree with; every file written is tracked or ignored; a param
    edit re-runs what it should through `dvc repro`, and `dvc metrics diff` shows only quality."""
    work = copy_workflow(tmp_path / "work", ".dvc/config", ".dvc/.gitignore")
    shutil.copytree(tiny_clip_dir, work / "clip")
    raw = tiny_params(yaml.safe_load((work / "params.yaml").read_text()), Path("clip"),
                      **{"train_presets.demo.iterations": 2, "infer.crf": False, "train.log_every": 1,
                         "datasets.demo.seeds": [0], "datasets.demo.variants": {}})
    (work / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    _run([sys.executable, "workflow/pipeline.py", "dvc"], work)
    make_paths(work, [f"results/demo_{m}.json" for m in METRICS], content='{"miou": 0.5}\n', future=86400)

    def run(*cmd, timeout=900):
        return _run(list(cmd), work, timeout=timeout)

    run("git", "init", "-q")
    run("git", "add", "-A")
    run("git", "commit", "-qm", "clone")  # dvclive needs a commit to exist
    smk = run(_tool("snakemake"), "--cores", "2", "demo").stderr
    for r in STAGE_RULES:
        assert f"rule {r}-demo:" in smk
        assert (work / f"logs/{r}-demo.log").stat().st_size > 0
    for m in METRICS:
        metrics = json.loads((work / f"results/demo_{m}.json").read_text())
        assert metrics != {"miou": 0.5}
        assert not [k for k in metrics if "second" in k], f"timings in results/demo_{m}.json"
    # a timing is recorded (a fast machine may round a 2-iteration run to 0.0 s: no lower bound)
    assert json.loads((work / "results/demo/timings/train.json").read_text())["method"][0]["train_seconds"] >= 0
    assert "Nothing to be done" in run(_tool("snakemake"), "-n", "--cores", "2", "demo").stdout

    # the reference run's lock: dvc commit after Snakemake, and both tools agree it is up to date
    run(_tool("dvc"), "commit", "--force", "--quiet")
    assert run(_tool("dvc"), "status", "--quiet").returncode == 0
    assert "Data and pipelines are up to date" in run(_tool("dvc"), "status").stdout
    assert "Nothing to be done" in run(_tool("snakemake"), "-n", "--cores", "2", "demo").stdout
    untracked = run("git", "status", "--porcelain", "--untracked-files=all").stdout.splitlines()
    assert {line[3:] for line in untracked if line.startswith("??")} == {
        "dvc.lock", *(str(p.relative_to(work)) for p in (work / "results/demo/method/seed0/dvclive").rglob("*") if p.is_file())}
    assert not [*(work / "data").rglob(".gitignore"), *(work / "results").rglob(".gitignore")]  # DVC added none
    run("git", "add", "-A")
    run("git", "commit", "-qm", "baseline")
    assert "results/demo/method/seed0/dvclive/plots/metrics/train/loss.tsv" in run("git", "ls-files").stdout

    # bg_power is read by train and pseudo_labels (and so evaluate re-runs), not by prepare/superpixels
    set_params(work, pseudo_labels__bg_power=3.0)
    out = run(_tool("dvc"), "repro").stdout
    ran = re.findall(r"Running stage '([^']+)'", out)
    assert ran == ["train-demo", "pseudo_labels-demo", "evaluate-demo", "headline-demo"] or ran == [
        "train-demo", "pseudo_labels-demo", "retrain-demo", "evaluate-demo", "headline-demo"], ran
    assert "set aside as checkpoint.stale.pt, the run starts over (pseudo_labels.bg_power (recorded 1.0, now 3.0))" in out
    diff = json.loads(run(_tool("dvc"), "metrics", "diff", "--json").stdout)
    seeds = diff["results/demo_seeds.json"]
    baseline = json.loads(run("git", "show", "HEAD:results/demo_seeds.json").stdout)
    assert seeds["cam_miou"]["old"] == pytest.approx(baseline["cam_miou"])
    assert seeds["cam_miou"]["diff"] != 0
    assert not [k for f in diff.values() for k in f if "second" in k]
    plots = json.loads(run(_tool("dvc"), "plots", "diff", "HEAD", "--json").stdout)
    assert not plots.get("errors") and "demo method: train/loss" in plots["data"], plots
    # the headline: a diff that fits a screen, beside the full files
    headline = run(_tool("dvc"), "metrics", "diff", "--targets", "results/demo_headline.json").stdout.splitlines()
    assert 3 < len(headline) <= 24 and any("val_miou" in line for line in headline), headline


def test_the_command_line_and_the_dags_know_the_same_datasets():
    from ssr.cli import DATASETS as CLI_DATASETS

    assert CLI_DATASETS == pipeline.DATASETS


def _dotted(node, key: str):
    for part in key.split("."):
        node = getattr(node, part)
    return node


def test_every_dvc_exp_run_in_the_readme_sets_params_that_reach_the_demo(tmp_path):
    """The README's `dvc exp run -S` lines, applied by DVC's own `-S` parser to a copy of
    params.yaml: the params still load, and the demo's (its overrides applied) carry each value."""
    from dvc.utils.hydra import apply_overrides

    from ssr.config import load_params

    lines = [line.split("#")[0] for line in (REPO / "README.md").read_text(encoding="utf-8").splitlines()
             if line.strip().startswith("dvc exp run -S")]
    assert len(lines) >= 4, lines
    for line in lines:
        words = shlex.split(line)
        sets = [value for flag, value in itertools.pairwise(words) if flag == "-S"]
        path = tmp_path / "params.yaml"
        shutil.copy(REPO / "params.yaml", path)
        apply_overrides(str(path), sets)
        demo = load_params(path, site=False).for_dataset("demo")
        for assignment in sets:
            key, value = assignment.split("=", 1)
            value = yaml.safe_load(value)
            wanted = value.items() if key == "datasets.demo.overrides" else [(key, value)]
            for dotted, expected in wanted:
                assert _dotted(demo, dotted) == expected, (line, dotted)
