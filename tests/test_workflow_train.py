"""Training through the DAG, for real, on a shrunk demo: what a cluster needs from the train rule.

- A train job killed with SIGTERM (what SLURM sends at the time limit) writes a checkpoint
  and fails; Snakemake's retry resumes it, and the model is bit for bit the model of an
  uninterrupted run (one thread), with one unbroken training curve.
- With datasets.demo.gpus: 2 the rule runs torchrun with two CPU processes (gloo), and the
  model equals the single-process one within float rounding.

Both run the rule `train-demo` with Snakemake's local executor in temp dirs; prepare and
superpixels run once for the module and are copied.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
import yaml
from conftest import tiny_params
from safetensors.torch import load_file
from test_dag import _env, _run, _tool, copy_workflow, set_params
from test_train import assert_gradients_close, assert_one_adamw_step_apart, first_step_gradients

from ssr.config import load_params

RUN = Path("results/demo/method/seed0")


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, tiny_clip_dir) -> Path:
    """A workflow copy with a shrunk demo (one seed, no variants) whose data and superpixels exist."""
    work = copy_workflow(tmp_path_factory.mktemp("train") / "base")
    shutil.copytree(tiny_clip_dir, work / "clip")
    raw = tiny_params(yaml.safe_load((work / "params.yaml").read_text()), Path("clip"),
                      **{"datasets.demo.seeds": [0], "datasets.demo.variants": {}, "train.log_every": 1})
    (work / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    _run([_tool("snakemake"), "--cores", "2", "superpixels-demo"], work, timeout=600)
    return work


def clone(prepared: Path, dest: Path, **params) -> Path:
    shutil.copytree(prepared, dest, symlinks=True)
    set_params(dest, **params)
    return dest


def model(work: Path) -> dict[str, torch.Tensor]:
    return load_file(work / RUN / "model.safetensors")


def curve(work: Path) -> list[tuple[int, str]]:
    """(step, loss) rows of the dvclive training curve."""
    lines = (work / RUN / "dvclive/plots/metrics/train/loss.tsv").read_text().splitlines()
    header = lines[0].split("\t")
    return [(int(r[header.index("step")]), r[header.index("loss")]) for r in (line.split("\t") for line in lines[1:])]


def descendants(pid: int) -> list[int]:
    """Every process below `pid`, from /proc."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def ssr_train_process(snakemake_pid: int) -> int | None:
    """The python process running `ssr train` under this Snakemake (not the shells around it)."""
    for pid in descendants(snakemake_pid):
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        is_python = len(argv) > 2 and b"python" in Path(argv[0].decode()).name.encode()
        if is_python and argv[1].endswith(b"/ssr") and argv[2] == b"train":
            return pid
    return None


def test_train_killed_by_sigterm_resumes_from_its_checkpoint_on_retry(prepared, tmp_path):
    iterations = 12
    killed = clone(prepared, tmp_path / "killed", train_presets__demo__iterations=iterations, train__checkpoint_every=2)
    whole = clone(prepared, tmp_path / "whole", train_presets__demo__iterations=iterations, train__checkpoint_every=2)

    # --cores 1: one torch thread, so the two runs can be compared bit for bit
    cmd = [_tool("snakemake"), "--cores", "1", "--retries", "1", "train-demo"]
    proc = subprocess.Popen(cmd, cwd=killed, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 600
        while not (killed / RUN / "checkpoint.pt").exists():
            assert proc.poll() is None and time.time() < deadline, "train ended before writing a checkpoint"
            time.sleep(0.05)
        pid = ssr_train_process(proc.pid)
        assert pid is not None, "no `ssr train` process found under snakemake"
        os.kill(pid, signal.SIGTERM)  # as SLURM does at the time limit
        out, _ = proc.communicate(timeout=900)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, out[-4000:]
    # the first attempt failed (SIGTERM: checkpoint, exit 130) and Snakemake retried it
    assert "returned non-zero exit status 130" in out and "Trying to restart job" in out, out[-4000:]

    log = (killed / "logs/train-demo.log").read_text()
    assert "checkpoint.pt: same params and inputs, `ssr train --resume` continues it" in log
    m = re.search(r"resuming demo \(method, seed 0\) from results/demo/method/seed0/checkpoint.pt at iteration (\d+)", log)
    assert m and 0 < int(m[1]) < iterations, log[-2000:]

    _run([_tool("snakemake"), "--cores", "1", "train-demo"], whole, timeout=900)
    a, b = model(killed), model(whole)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), f"{key} differs after the resume"
    # the dvclive curve is run state like the checkpoint: kept across the retry, continued, not restarted
    assert curve(killed) == curve(whole) and [s for s, _ in curve(whole)] == list(range(1, iterations + 1))
    assert json.loads((killed / RUN / "model.json").read_text())["summary"]["iterations"] == iterations


def test_two_processes_through_torchrun_match_one_process(prepared, tmp_path):
    """torchrun with 2 CPU processes (gloo) through the rule, against 1 process, for one step.

    The step's gradients must agree to float rounding: the two ranks sum theirs with an
    all-reduce, the same float32 numbers added in another order than one process's backward
    pass (`assert_gradients_close`; read back from the checkpoints, `first_step_gradients`). A
    rank training on its own half of the batch, or without the gradient sync, is off by the
    gradient's own size. The weights after the step are held to AdamW's bound
    (`assert_one_adamw_step_apart`): a gradient zero in exact arithmetic (the attention key
    bias, to which softmax is invariant) or within rounding of zero turns its rounding noise
    into a step of up to lr. Every rank writes the gathered samples into the same slots of the
    sample memory, so the memories (in the checkpoints) and the prototypes agree to rounding.
    """
    lr = 1e-3
    exact = {"train__supervision": "gt", "cmpa__num_layers": 1, "cmpa__enabled": True,
             "train_presets__demo__iterations": 1, "train_presets__demo__lr": lr,
             "train_presets__demo__decoder_lr_mult": 1.0}
    ddp = clone(prepared, tmp_path / "ddp", datasets__demo__gpus=2, **exact)
    one = clone(prepared, tmp_path / "one", **exact)
    proc = _run([_tool("snakemake"), "--cores", "2", "--printshellcmds", "train-demo"], ddp, timeout=900)
    assert ("torchrun --standalone --nproc_per_node 2 -m ssr train --dataset demo --params params.yaml --resume --threads 1"
            in proc.stdout + proc.stderr)
    _run([_tool("snakemake"), "--cores", "1", "train-demo"], one, timeout=900)
    preset = load_params(one / "params.yaml").preset("demo")
    assert_gradients_close(first_step_gradients(one / RUN, preset), first_step_gradients(ddp / RUN, preset))
    a, b = model(ddp), model(one)
    assert a.keys() == b.keys()
    assert_one_adamw_step_apart(a, b, lr)
    assert torch.equal(a["prototypes.ready"], b["prototypes.ready"])
    torch.testing.assert_close(a["prototypes.image"], b["prototypes.image"], rtol=1e-4, atol=1e-6)
    memory_a = torch.load(ddp / RUN / "checkpoint.pt", weights_only=True)["memory"]
    memory_b = torch.load(one / RUN / "checkpoint.pt", weights_only=True)["memory"]
    assert torch.equal(memory_a["filled"], memory_b["filled"])
    torch.testing.assert_close(memory_a["features"], memory_b["features"], rtol=1e-4, atol=1e-6)
