"""SSR training (ssr/train.py): exact resume, checkpoint contents, non-finite losses,
the lr schedule, gradient accumulation and SIGTERM.

All runs use the tiny random-init CLIP of conftest on a 12-image demo dataset
prepared once per module; a run of a few iterations takes well under a second.
Nothing from a library is mocked: the only monkeypatches wrap `ssr` functions
(`prepare_micro_batch`, `micro_batch_loss`, `build_optimiser`) to observe the run or inject a fault.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import write_tiny_params
from safetensors.torch import load_file

import ssr.train as ssr_train
from ssr.checkpoint import read_model
from ssr.cli import main as ssr_main
from ssr.cli import run_dir
from ssr.model import SSR
from ssr.train import NonFiniteLoss, lr_at, rng_state, train

REPO = Path(__file__).resolve().parents[1]
# Wall-clock figures differ between any two runs; everything else in the summary must not.
TIMING_KEYS = {"train_seconds", "images_per_second"}


def write_params(directory: Path, data_root: Path, clip_dir: Path, **overrides) -> tuple[Path, object]:
    """The shared tiny params, with checkpoints and log points every few iterations."""
    defaults = {"train_presets.demo.iterations": 6, "train_presets.demo.warmup": 2, "train.checkpoint_every": 2,
                "train.log_every": 1}
    return write_tiny_params(directory, data_root, clip_dir, **{**defaults, **overrides})


@pytest.fixture(scope="module")
def demo(tmp_path_factory, tiny_clip_dir):
    """A prepared demo dataset with superpixels, shared by the module; returns a params maker.

    make(name, **overrides) -> (params path, Params) whose results go to their own folder.
    """
    base = tmp_path_factory.mktemp("train")
    data_root = base / "data"
    path, _ = write_params(base / "prep", data_root, tiny_clip_dir)
    for stage in ("prepare", "superpixels"):
        assert ssr_main([stage, "--dataset", "demo", "--params", str(path), "--quiet"]) == 0

    def make(name: str, **overrides):
        return write_params(base / name, data_root, tiny_clip_dir, **overrides)

    make.clip_dir = tiny_clip_dir
    make.base = base
    return make


def run(params, out: Path, demo, **kwargs) -> dict:
    return train(params, "demo", out, progress=False, demo_clip_dir=demo.clip_dir, **kwargs)


def load(path: Path) -> dict:
    """A checkpoint, loaded as safely as ssr itself loads it (no pickled objects)."""
    return torch.load(path, map_location="cpu", weights_only=True)


def weights(run_dir: Path) -> dict:
    """The published model's state dict (model.safetensors)."""
    return load_file(str(run_dir / "model.safetensors"))


def assert_tensors_equal(a: dict, b: dict, what: str) -> None:
    assert a.keys() == b.keys(), what
    for key in a:
        difference = (a[key].double() - b[key].double()).abs().max()
        assert torch.equal(a[key], b[key]), f"{what}: {key} differs (max |diff| {difference})"


def assert_optimisers_equal(a: dict, b: dict) -> None:
    assert a["param_groups"] == b["param_groups"]
    assert a["state"].keys() == b["state"].keys()
    for index in a["state"]:
        assert_tensors_equal(a["state"][index], b["state"][index], f"optimiser state of parameter {index}")


def assert_rng_equal(a: dict, b: dict) -> None:
    assert torch.equal(a["torch"], b["torch"]), "torch RNG state differs"
    assert a["python"] == b["python"], "python RNG state differs"
    na, nb = a["numpy"], b["numpy"]
    assert na[0] == nb[0] and torch.equal(na[1], nb[1]) and tuple(na[2:]) == tuple(nb[2:]), "numpy RNG state differs"


def tsv(path: Path) -> list[list[str]]:
    return [line.split("\t") for line in path.read_text().splitlines()]


class StepRecorder:
    """Wraps `ssr.train.build_optimiser` to see every optimiser step: lrs and cloned gradients."""

    def __init__(self, monkeypatch, *, keep_grads: bool = False):
        self.lrs: list[list[float]] = []
        self.grads: list[dict[str, torch.Tensor]] = []
        self.model: SSR | None = None
        real = ssr_train.build_optimiser

        def build(model, preset):
            optimiser = real(model, preset)
            self.model, self.optimiser = model, optimiser
            names = {id(p): n for n, p in model.named_parameters()}

            def pre_step(opt, args, kwargs):
                self.lrs.append([g["lr"] for g in opt.param_groups])
                if keep_grads:
                    self.grads.append({names[id(p)]: p.grad.clone() for g in opt.param_groups for p in g["params"]
                                       if p.grad is not None})

            optimiser.register_step_pre_hook(pre_step)
            return optimiser

        monkeypatch.setattr(ssr_train, "build_optimiser", build)


class BatchRecorder:
    """Wraps `ssr.train.prepare_micro_batch` to record the image ids of every micro-batch."""

    def __init__(self, monkeypatch):
        self.ids: list[list[str]] = []
        real = ssr_train.prepare_micro_batch

        def prepare(backbones, model, batch, *args, **kwargs):
            self.ids.append(list(batch["id"]))
            return real(backbones, model, batch, *args, **kwargs)

        monkeypatch.setattr(ssr_train, "prepare_micro_batch", prepare)


# ---------------------------------------------------------------- resume


@pytest.mark.parametrize("num_workers, accumulation", [(0, 1), (1, 2)], ids=["workers0", "workers1-accum2"])
def test_resume_matches_an_uninterrupted_run(demo, num_workers, accumulation):
    """Stop at iteration 3 (between the periodic checkpoints at 2 and 4), resume, finish:
    every weight, buffer (prototypes, BatchNorm statistics), tau, the sample memory, the optimiser,
    the RNG, the training curves and the summary equal those of a straight run."""
    path, params = demo(f"resume_{num_workers}_{accumulation}", **{
        "train.num_workers": num_workers, "train_presets.demo.accumulation": accumulation})
    straight, resumed = path.parent / "straight", path.parent / "resumed"

    summary_a = run(params, straight, demo)
    partial = run(params, resumed, demo, stop_after=3)
    assert partial["iterations"] == 3
    assert not (resumed / "model.safetensors").exists(), "an interrupted run must not publish a model"
    assert load(resumed / "checkpoint.pt")["state"]["iteration"] == 3
    summary_b = run(params, resumed, demo, resume=True)

    assert summary_a["iterations"] == summary_b["iterations"] == 6
    quality = [{k: v for k, v in summary.items() if k not in TIMING_KEYS} for summary in (summary_a, summary_b)]
    assert quality[0] == quality[1]
    a, b = load(straight / "checkpoint.pt"), load(resumed / "checkpoint.pt")
    for key in ("prototypes.image", "prototypes.text", "prototypes.ready", "tau.log_tau"):
        assert key in a["model"], key
    assert bool(a["model"]["prototypes.ready"]), "the prototypes were never built: the test would not cover them"
    assert bool(a["memory"]["filled"].any()), "the sample memory is empty: the test would not cover it"
    assert_tensors_equal(a["model"], b["model"], "model")
    assert_tensors_equal(a["memory"], b["memory"], "memory")
    assert_optimisers_equal(a["optimiser"], b["optimiser"])
    assert_rng_equal(a["rng"], b["rng"])
    assert a["state"]["iteration"] == b["state"]["iteration"] and a["state"]["images_seen"] == b["state"]["images_seen"]
    assert_tensors_equal(weights(straight), weights(resumed), "model.safetensors")

    # dvclive curves: one row per iteration 1..6, identical across the interruption
    for metric in ("loss", "loss_ce", "loss_proto", "tau", "lr"):
        rows_a = tsv(straight / "dvclive" / "plots" / "metrics" / "train" / f"{metric}.tsv")
        rows_b = tsv(resumed / "dvclive" / "plots" / "metrics" / "train" / f"{metric}.tsv")
        assert rows_a == rows_b, metric
        assert [r[0] for r in rows_a[1:]] == [str(i) for i in range(1, 7)], metric
    lrs = [float(r[1]) for r in tsv(straight / "dvclive" / "plots" / "metrics" / "train" / "lr.tsv")[1:]]
    assert lrs == pytest.approx([lr_at(i, params.preset("demo")) for i in range(6)], rel=1e-12)


def test_checkpoint_holds_what_resume_restores(demo):
    path, params = demo("contents")
    out = path.parent / "run"
    preset = params.preset("demo")
    run(params, out, demo, stop_after=3)
    ckpt = load(out / "checkpoint.pt")

    # iteration counters
    assert ckpt["state"]["iteration"] == 3
    assert ckpt["state"]["images_seen"] == 3 * preset.batch_size
    # the model: every trained tensor and buffer, the prototypes and tau included; the sample memory beside it
    assert set(ckpt["model"]) >= {"tau.log_tau", "prototypes.image", "prototypes.text", "prototypes.ready"}
    assert set(ckpt["memory"]) == {"features", "filled"} and bool(ckpt["memory"]["filled"].all())
    assert any(k.startswith("isa.") for k in ckpt["model"]) and any(k.startswith("decoder.") for k in ckpt["model"])
    # the optimiser: AdamW moments after 3 steps, and the lr of the last step (the schedule is lr_at(iteration))
    steps = {float(s["step"]) for s in ckpt["optimiser"]["state"].values()}
    assert steps == {3.0}
    assert [g["lr"] for g in ckpt["optimiser"]["param_groups"]] == pytest.approx(
        [lr_at(2, preset) * g["lr_mult"] for g in ckpt["optimiser"]["param_groups"]], rel=1e-12)
    assert set(ckpt["rng"]) >= {"python", "numpy", "torch"}
    assert ckpt["identity"]["seed"] == 0 and ckpt["identity"]["cmpa.loss"] == "cross_modal"

    # Give the checkpoint distinctive RNG states, then resume with nothing left to do: the
    # checkpoint written at the end must hold what was loaded, and the process RNGs too.
    torch.manual_seed(1234), random.seed(1234), np.random.seed(1234)
    ckpt["rng"] = rng_state()
    torch.save(ckpt, out / "checkpoint.pt")
    torch.manual_seed(99), random.seed(99), np.random.seed(99)
    summary = run(params, out, demo, resume=True, stop_after=3)
    assert summary["iterations"] == 3
    after = load(out / "checkpoint.pt")
    assert after["state"]["iteration"] == 3 and after["state"]["images_seen"] == 3 * preset.batch_size
    assert_tensors_equal(ckpt["model"], after["model"], "model after a no-op resume")
    assert_optimisers_equal(ckpt["optimiser"], after["optimiser"])
    assert_rng_equal(ckpt["rng"], after["rng"])
    assert_rng_equal(ckpt["rng"], rng_state())

    # resuming into the next iteration starts at 3: three more steps reach the end
    summary = run(params, out, demo, resume=True)
    assert summary["iterations"] == 6 and load(out / "checkpoint.pt")["state"]["images_seen"] == 6 * preset.batch_size


def test_resume_without_a_checkpoint_starts_from_zero(demo, capsys):
    path, params = demo("fresh", **{"train_presets.demo.iterations": 2})
    summary = train(params, "demo", path.parent / "run", resume=True, progress=True, demo_clip_dir=demo.clip_dir)
    assert summary["iterations"] == 2
    assert "starting from iteration 0" in capsys.readouterr().err


# ---------------------------------------------------------------- non-finite values


def test_non_finite_loss_stops_the_run_and_keeps_the_last_good_checkpoint(demo, monkeypatch):
    path, params = demo("nan_loss")
    out, reference = path.parent / "run", path.parent / "reference"
    run(params, out, demo, stop_after=2)
    first = (out / "checkpoint.pt").read_bytes()

    calls = {"n": 0}
    real = ssr_train.micro_batch_loss

    def poisoned(*args, **kwargs):
        loss, parts = real(*args, **kwargs)
        calls["n"] += 1
        return (loss * float("nan"), parts) if calls["n"] == poison_at else (loss, parts)

    monkeypatch.setattr(ssr_train, "micro_batch_loss", poisoned)
    # a NaN at the first resumed iteration: nothing is written, the checkpoint is byte-identical
    poison_at = 1
    with pytest.raises(NonFiniteLoss, match=r"non-finite loss \(nan\) at iteration 2 .*last good checkpoint is .*checkpoint\.pt"):
        run(params, out, demo, resume=True)
    assert (out / "checkpoint.pt").read_bytes() == first
    assert not (out / "model.safetensors").exists()

    # a NaN at iteration 4 (0-based) after the periodic checkpoint at 4 iterations: that checkpoint
    # stays, and it is exactly what a clean run stopped at 4 iterations writes
    calls["n"], poison_at = 0, 3
    with pytest.raises(NonFiniteLoss, match="at iteration 4"):
        run(params, out, demo, resume=True)
    assert not (out / "model.safetensors").exists()
    monkeypatch.setattr(ssr_train, "micro_batch_loss", real)
    run(params, reference, demo, stop_after=4)
    kept, clean = load(out / "checkpoint.pt"), load(reference / "checkpoint.pt")
    assert kept["state"]["iteration"] == 4
    assert_tensors_equal(clean["model"], kept["model"], "checkpoint kept after the NaN")
    assert_optimisers_equal(clean["optimiser"], kept["optimiser"])


def test_non_finite_gradient_never_reaches_a_checkpoint(demo, monkeypatch):
    """A finite loss whose backward yields NaN (overflow, a hook, bf16) must stop the run
    before the optimiser writes NaN into the weights and a checkpoint saves them."""
    path, params = demo("nan_grad", **{"train.checkpoint_every": 1})
    out = path.parent / "run"
    real = ssr_train.build_optimiser
    calls = {"n": 0}

    def build(model, preset):
        def corrupt(grad):
            calls["n"] += 1
            return grad * float("nan") if calls["n"] == 3 else grad

        model.decoder.classify.bias.register_hook(corrupt)
        return real(model, preset)

    monkeypatch.setattr(ssr_train, "build_optimiser", build)
    with pytest.raises(NonFiniteLoss, match=r"(?s)non-finite gradient.*decoder\.classify\.bias.*iteration 2"):
        run(params, out, demo)
    ckpt = load(out / "checkpoint.pt")
    assert ckpt["state"]["iteration"] == 2
    assert all(torch.isfinite(v.float()).all() for v in ckpt["model"].values())
    assert not (out / "model.safetensors").exists()


def test_cli_diverging_run_exits_non_zero_with_a_clear_message(demo, capsys):
    path, params = demo("diverge", **{"train_presets.demo.lr": 1.0e30, "train.checkpoint_every": 1})
    rc = ssr_main(["train", "--dataset", "demo", "--params", str(path), "--quiet"])
    err = capsys.readouterr().err
    assert rc == 1
    assert "ssr train: error: non-finite" in err and "last good checkpoint" in err
    results = Path(params.results_root)
    ckpt = load(results / "demo" / "method" / "seed0" / "checkpoint.pt")
    assert 1 <= ckpt["state"]["iteration"] < params.preset("demo").iterations
    assert all(torch.isfinite(v.float()).all() for v in ckpt["model"].values())
    assert not (results / "demo" / "method" / "seed0" / "model.safetensors").exists()
    assert not (results / "demo_train.json").exists()


# ---------------------------------------------------------------- lr schedule


def test_lr_is_linear_warmup_then_poly_decay(demo):
    preset = demo("lr")[1].preset("demo").model_copy(update={"lr": 2e-3, "warmup": 5, "iterations": 50})
    for i in range(5):
        assert lr_at(i, preset) == pytest.approx(2e-3 * (i + 1) / 5, rel=1e-12)
    for i in range(5, 51):
        assert lr_at(i, preset) == pytest.approx(2e-3 * (1 - (i - 5) / 45) ** 0.9, rel=1e-12, abs=1e-18)
    assert lr_at(4, preset) == lr_at(5, preset) == pytest.approx(2e-3)  # warmup ends at the base lr
    assert lr_at(50, preset) == 0.0 and lr_at(80, preset) == 0.0
    assert all(lr_at(i, preset) > 0 for i in range(50))
    decay = [lr_at(i, preset) for i in range(5, 51)]
    assert all(a > b for a, b in zip(decay, decay[1:], strict=False))
    no_warmup = preset.model_copy(update={"warmup": 0})
    assert lr_at(0, no_warmup) == pytest.approx(2e-3) and lr_at(25, no_warmup) == pytest.approx(2e-3 * 0.5 ** 0.9)


def test_optimiser_steps_use_the_schedule_and_the_decoder_multiplier(demo, monkeypatch):
    path, params = demo("lr_run", **{"train_presets.demo.decoder_lr_mult": 10.0})
    steps = StepRecorder(monkeypatch)
    run(params, path.parent / "run", demo)
    preset = params.preset("demo")
    assert steps.lrs == [pytest.approx([lr_at(i, preset), 10 * lr_at(i, preset)], rel=1e-12) for i in range(6)]
    # the second group holds exactly the decoder's parameters, the first everything else that trains
    heads, decoder = ({id(p) for p in g["params"]} for g in steps.optimiser.param_groups)
    assert decoder == {id(p) for p in steps.model.decoder.parameters()}
    assert heads | decoder == {id(p) for p in steps.model.parameters()} and not heads & decoder


# ---------------------------------------------------------------- gradient accumulation


# Exact labels (the true masks: `train.supervision: gt`) with padding (scale_min 0.5 pads the crops
# with ignored pixels, differently per image), every loss on, and CMPA heads without BatchNorm
# (one Linear: BatchNorm statistics are per micro-batch by nature). Then a step over micro-batches,
# or over ranks, is the full batch's step: the gradients agree to float rounding. The CAM pass
# still runs (CMPA pools with it); its batch-size-dependent rounding reaches the loss only through
# continuous weights, never through an argmax.
EXACT = {"train.supervision": "gt", "train_presets.demo.scale_min": 0.5, "train_presets.demo.scale_max": 0.9,
         "cmpa.num_layers": 1, "train.affinity_loss": True}


def assert_gradients_close(g1: dict, g2: dict) -> None:
    """Float32 sums over a few thousand pixels in another order: relative error ~1e-6 of each norm."""
    assert g1.keys() == g2.keys() and g1
    assert any(k.startswith("isa.") for k in g1) and any(k.startswith("decoder.") for k in g1) and "tau.log_tau" in g1
    for name in g1:
        scale = max(float(g1[name].norm()), 1e-12)
        diff = float((g2[name] - g1[name]).norm())
        assert diff <= 1e-5 * scale, f"gradient of {name}: |diff| {diff:.3g} vs |grad| {scale:.3g}"


def first_step_gradients(run_dir: Path, preset) -> dict[str, torch.Tensor]:
    """The gradient of a run's only optimiser step, read back from its checkpoint: after one step,
    AdamW's first moment is (1 - beta1) x the gradient (a lerp from zero, exact to an ulp)."""
    model, _ = read_model(run_dir / "model.safetensors")
    optimiser = ssr_train.build_optimiser(model, preset)    # the order in which the state indexes parameters
    names = {id(p): n for n, p in model.named_parameters()}
    order = [names[id(p)] for group in optimiser.param_groups for p in group["params"]]
    saved = load(run_dir / "checkpoint.pt")["optimiser"]
    assert {int(s["step"]) for s in saved["state"].values()} == {1}, "one optimiser step expected"
    beta1 = saved["param_groups"][0]["betas"][0]
    return {order[i]: s["exp_avg"] / (1 - beta1) for i, s in saved["state"].items()}


def assert_one_adamw_step_apart(a: dict, b: dict, lr: float) -> None:
    """Weights after one AdamW step from the same start, with gradients equal to rounding: a step
    moves each weight by at most lr (lr x g / |g|, plus decay), so where a gradient is zero in exact
    arithmetic or within rounding of it, its rounding noise can become a step of lr either way."""
    for name in a:
        if a[name].is_floating_point() and not name.startswith("prototypes."):
            assert (a[name] - b[name]).abs().max() <= 2 * lr * (1 + 1e-6), name


def test_accumulation_gives_the_full_batch_gradient(demo, monkeypatch):
    """Batch 4 in one micro-batch vs two micro-batches of 2: the same images, the same gradient,
    although the two micro-batches hold different counts of ignored pixels."""
    results = {}
    for accumulation in (1, 2):
        path, params = demo(f"accum{accumulation}", **EXACT, **{
            "train_presets.demo.iterations": 1, "train_presets.demo.accumulation": accumulation})
        with monkeypatch.context() as patch:
            steps, batches = StepRecorder(patch, keep_grads=True), BatchRecorder(patch)
            prepared = []
            real = ssr_train.prepare_micro_batch
            def record(*a, prepared=prepared, real=real, **k):
                prepared.append(real(*a, **k))
                return prepared[-1]

            patch.setattr(ssr_train, "prepare_micro_batch", record)
            run(params, path.parent / "run", demo)
        results[accumulation] = steps, batches, prepared

    (steps1, batches1, _), (steps2, batches2, prepared2) = results[1], results[2]
    assert len(steps1.grads) == len(steps2.grads) == 1
    # the training batches (after the warm-up's) are the same four images, split in two
    assert batches1.ids[-1:] == [batches2.ids[-2] + batches2.ids[-1]]
    ignored = [int((m.labels == 255).sum()) for m in prepared2[-2:]]
    assert ignored[0] != ignored[1], f"the micro-batches must differ in ignored pixels for the test to bite: {ignored}"
    assert_gradients_close(steps1.grads[0], steps2.grads[0])


def test_accumulation_steps_make_one_optimiser_step(demo, monkeypatch):
    path, params = demo("accum_steps", **{"train_presets.demo.iterations": 3, "train_presets.demo.accumulation": 4})
    steps, batches = StepRecorder(monkeypatch), BatchRecorder(monkeypatch)
    summary = run(params, path.parent / "run", demo)
    assert len(steps.lrs) == 3
    assert [len(b) for b in batches.ids] == [1] * 12
    assert summary["images_seen"] == 12
    ckpt = load(path.parent / "run" / "checkpoint.pt")
    assert {float(s["step"]) for s in ckpt["optimiser"]["state"].values()} == {3.0}
    # 12 micro-batches of one image over a 12-image split: one epoch, each image once
    assert sorted(i for b in batches.ids for i in b) == sorted(f"train_{k:05d}" for k in range(12))


# ---------------------------------------------------------------- SIGTERM

# `ssr train` with each step slowed down, so that the signal lands mid-run on any machine.
SLOW_TRAIN = """
import sys, time
import ssr.train
real = ssr.train.prepare_micro_batch
def slow(*args, **kwargs):
    time.sleep(0.15)
    return real(*args, **kwargs)
ssr.train.prepare_micro_batch = slow
from ssr.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_sigterm_writes_a_checkpoint_and_resume_finishes_the_run(demo):
    iterations = 40  # 0.15 s each in the subprocess: a window of 6 s for the signal; it lands at ~1-2
    path, params = demo("sigterm", **{"train_presets.demo.iterations": iterations, "train.checkpoint_every": 1000})
    out = Path(params.results_root) / "demo" / "method" / "seed0"
    curve = out / "dvclive" / "plots" / "metrics" / "train" / "loss.tsv"
    env = dict(os.environ, OMP_NUM_THREADS="1", PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    proc = subprocess.Popen([sys.executable, "-c", SLOW_TRAIN, "train", "--dataset", "demo", "--params", str(path), "--quiet"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=path.parent)
    try:
        deadline = time.time() + 90
        while not (curve.exists() and len(curve.read_text().splitlines()) >= 2):  # header + iteration 1: handler installed
            assert proc.poll() is None, f"training ended before the signal:\n{proc.communicate()}"
            assert time.time() < deadline, "training did not start within 90 s"
            time.sleep(0.02)
        proc.send_signal(signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()

    assert proc.returncode == 130, stderr
    ckpt = load(out / "checkpoint.pt")
    stopped = ckpt["state"]["iteration"]
    assert 1 <= stopped < iterations, stderr
    assert f"SIGTERM: checkpoint written at iteration {stopped}" in stderr
    assert not (out / "model.safetensors").exists()
    assert not (Path(params.results_root) / "demo_train.json").exists()

    summary = train(params, "demo", out, resume=True, progress=False, demo_clip_dir=demo.clip_dir)
    assert summary["iterations"] == iterations and (out / "model.safetensors").exists()
    # the interrupted-and-resumed run is the uninterrupted one
    reference = path.parent / "reference"
    run(params, reference, demo)
    assert_tensors_equal(weights(reference), weights(out), "model after SIGTERM + resume")
    assert tsv(curve) == tsv(reference / "dvclive" / "plots" / "metrics" / "train" / "loss.tsv")


# ---------------------------------------------------------------- DDP

def test_ddp_two_ranks_of_two_micro_batches_equal_one_process_of_four(demo):
    """2 gloo ranks x 2 micro-batches of 1 against 1 process x 1 micro-batch of 4: the same
    images per step, the same losses normalised by the whole step's counts, so the same step
    gradient to float rounding (summed across ranks in another order); rank 0 alone writes.
    One step: after it the weights differ by AdamW's amplified rounding (see
    `assert_one_adamw_step_apart`), and every later gradient by more than rounding."""
    overrides = {**EXACT, "train_presets.demo.iterations": 1, "train_presets.demo.batch_size": 4}
    path, params = demo("ddp", **overrides, **{"train_presets.demo.accumulation": 2})
    torchrun = Path(sys.executable).parent / "torchrun"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([str(torchrun), "--standalone", "--nproc_per_node", "2", "-m", "ssr", "train", "--dataset", "demo",
                           "--params", str(path), "--quiet", "--seeds", "0"], capture_output=True, text=True, env=env,
                          cwd=path.parent, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    summary = yaml.safe_load((Path(params.results_root) / "demo_train.json").read_text())
    assert summary["iterations"] == 1 and summary["images_seen"] == 4
    ddp_dir = Path(params.results_root) / "demo" / "method" / "seed0"

    single_path, single = demo("ddp_reference", **overrides, **{"train_presets.demo.accumulation": 1})
    reference = single_path.parent / "run"
    run(single, reference, demo)
    assert_gradients_close(first_step_gradients(reference, single.preset("demo")),
                           first_step_gradients(ddp_dir, params.preset("demo")))
    ddp, alone = weights(ddp_dir), weights(reference)
    assert ddp.keys() == alone.keys()
    assert_one_adamw_step_apart(ddp, alone, single.preset("demo").lr * single.preset("demo").decoder_lr_mult)
    # Every rank writes the gathered samples into the same slots: one memory, and the prototypes built from it.
    memory_ddp, memory_alone = load(ddp_dir / "checkpoint.pt")["memory"], load(reference / "checkpoint.pt")["memory"]
    assert torch.equal(memory_ddp["filled"], memory_alone["filled"])
    torch.testing.assert_close(memory_ddp["features"], memory_alone["features"], rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(ddp["prototypes.image"], alone["prototypes.image"], rtol=1e-4, atol=1e-6)
    for name, value in alone.items():
        if not value.is_floating_point():
            assert torch.equal(ddp[name], value), name


def test_a_variant_setting_wins_over_the_dataset_overrides(demo):
    """The CLI resolves a run's params as dataset overrides, then the variant; train() applying the
    overrides again must not undo a variant that sets the same key (it did: the variant trained
    the dataset's value, and the next stage refused the model as trained under other params)."""
    path, params = demo("variant_over_overrides", **{
        "train_presets.demo.iterations": 1, "datasets.demo.overrides": {"cmpa.head": "residual"},
        "datasets.demo.variants": {"paper_heads": {"cmpa.head": "projection"}}})
    assert ssr_main(["train", "--dataset", "demo", "--params", str(path), "--quiet"]) == 0
    heads = {run: json.loads((run_dir(params, "demo", run, 0) / "model.json").read_text())["cmpa"]["head"]
             for run in ("method", "paper_heads")}
    assert heads == {"method": "residual", "paper_heads": "projection"}
    assert ssr_main(["pseudo-labels", "--dataset", "demo", "--params", str(path), "--quiet"]) == 0


def test_summed_gradients_keep_none_where_no_rank_has_one(tmp_path):
    """A parameter no rank computed a gradient for (tau under `cmpa.loss: feature`) must stay
    without one after the all-reduce, as in a single process, or AdamW decays it and moves its
    moments on a multi-GPU run only. A one-rank gloo group runs the real collectives."""
    import torch.distributed as dist
    from torch import nn

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        model = nn.Sequential(nn.Linear(3, 2), nn.Linear(2, 1))
        model[0](torch.ones(1, 3)).sum().backward()
        ssr_train.sum_gradients(model)
        assert model[0].weight.grad is not None and torch.equal(model[0].weight.grad, torch.ones(2, 3))
        assert model[1].weight.grad is None and model[1].bias.grad is None
    finally:
        dist.destroy_process_group()
