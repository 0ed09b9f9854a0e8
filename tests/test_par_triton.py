"""The Triton PAR kernels (ssr.par_triton) against the reference (ssr.par), on the CPU through
Triton's interpreter (TRITON_INTERPRET=1), which runs the same kernel code as numpy operations.

Tolerance: the kernels add the same terms in the same order as the reference, but may fuse a
multiply and an add (one rounding instead of two) and sum the softmax's 48 exponentials in
another order; each iteration is a convex combination (weights summing to 1) of scores in
[0, 1], so each one adds at most a few float32 units of roundoff (u = 6e-8) per pixel and 20
iterations stay far below 1e-5. Labels (the argmax) must agree everywhere on these inputs.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ssr.par import par_affinity, par_refine, resolve_backend

DILATIONS = [1, 2, 4, 8, 12, 24]
REPO = Path(__file__).resolve().parents[1]


# Runs in a fresh process: the interpreter must be on before Triton is first imported, since
# Triton's own library functions (tl.zeros...) are compiled or interpreted as Triton loads.
RUNNER = """
import sys, torch
import ssr.par_triton as kernels
calls = torch.load(sys.argv[1])
out = [getattr(kernels, name)(*args, **kwargs) for name, args, kwargs in calls]
torch.save(out, sys.argv[2])
"""


def run_interpreted(tmp_path, calls: list[tuple[str, tuple, dict]]) -> list[torch.Tensor]:
    """Call ssr.par_triton's functions, (name, args, kwargs) each, under TRITON_INTERPRET=1 in a child process."""
    torch.save(calls, tmp_path / "calls.pt")
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-c", RUNNER, str(tmp_path / "calls.pt"), str(tmp_path / "out.pt")], env=env,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return torch.load(tmp_path / "out.pt")


def _inputs(shape, seed):
    g = torch.Generator().manual_seed(seed)
    b, c, h, w = shape
    # smooth colours plus noise, so the colour term varies, and scores with a clear winner per pixel
    coarse = torch.rand(b, 3, h // 8, w // 8, generator=g)
    image = torch.nn.functional.interpolate(coarse, size=(h, w), mode="bilinear", align_corners=False)
    image = (image + 0.05 * torch.rand(b, 3, h, w, generator=g)).clamp(0, 1)
    scores = torch.rand(b, c, h, w, generator=g)
    return image, scores


SHAPES = [(2, 3, 40, 56), (1, 4, 64, 96)]


def test_triton_par_equals_the_reference(tmp_path):
    cases = [_inputs(shape, seed=sum(shape)) for shape in SHAPES]
    calls = []
    for image, scores in cases:
        calls += [("par_affinity_triton", (image, DILATIONS), {}),
                  ("par_refine_triton", (image, scores), {"dilations": DILATIONS, "iterations": 20})]
    out = run_interpreted(tmp_path, calls)
    for (image, scores), (affinity, refined) in zip(cases, zip(*[iter(out)] * 2, strict=True), strict=True):
        torch.testing.assert_close(affinity, par_affinity(image, DILATIONS), atol=1e-6, rtol=0)
        reference = par_refine(image, scores, dilations=DILATIONS, iterations=20, backend="torch")
        assert (refined - reference).abs().max() < 1e-5
        assert torch.equal(refined.argmax(dim=1), reference.argmax(dim=1))
        # the tolerance tells iteration counts apart: a kernel one iteration short would fail it
        fewer = par_refine(image, scores, dilations=DILATIONS, iterations=19, backend="torch")
        assert (fewer - reference).abs().max() > 1e-3


def test_inactive_channels_are_skipped_and_come_out_zero(tmp_path):
    """A padded class slot (all-zero scores, as cams_to_labels passes them) refines to zero either way.
    Ten channels: more than one program's MAX_BLOCK_C, so the channels split over programs too."""
    image, scores = _inputs((2, 10, 24, 40), seed=3)
    active = torch.ones(2, 10, dtype=torch.bool)
    active[1, 3:] = False
    scores = scores * active[..., None, None]
    kwargs = {"dilations": [1, 2, 4], "iterations": 5, "active": active}
    skipped, ones = run_interpreted(tmp_path, [("par_refine_triton", (image, scores), kwargs),
                                               ("par_refine_triton", (image, torch.ones(2, 10, 24, 40)), kwargs)])
    reference = par_refine(image, scores, dilations=[1, 2, 4], iterations=5, backend="torch")
    assert (skipped - reference).abs().max() < 1e-5
    assert torch.equal(skipped[1, 3:], torch.zeros_like(skipped[1, 3:]))
    # a channel marked inactive is not computed even when it holds scores
    assert torch.equal(ones[1, 3:], torch.zeros_like(ones[1, 3:]))
    torch.testing.assert_close(ones[0], torch.ones(10, 24, 40), atol=1e-5, rtol=0)   # weights sum to 1


def test_auto_backend_is_triton_on_cuda_or_when_interpreting_and_torch_otherwise(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert resolve_backend("auto", torch.device("cpu")) == "torch"
    assert resolve_backend("auto", torch.device("cuda")) == "triton"   # Triton ships with the torch wheel
    assert resolve_backend("torch", torch.device("cuda")) == "torch"
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert resolve_backend("auto", torch.device("cpu")) == "triton"
    with pytest.raises(ValueError, match="unknown PAR backend"):
        resolve_backend("cuda", torch.device("cpu"))


COMPILE = """
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
import ssr.par_triton as kernels
target = GPUTarget("cuda", 90, 32)
pointers = {"src_ptr": "*fp32", "affinity_ptr": "*fp32", "dilations_ptr": "*i32", "active_ptr": "*i8", "dst_ptr": "*fp32"}
propagate = ASTSource(kernels._propagate_kernel, {**pointers, "C": "i32", "H": "i32", "W": "i32", "ND": "constexpr",
                      "BLOCK_C": "constexpr", "BLOCK": "constexpr"},
                      constexprs={"ND": 6, "BLOCK_C": kernels.MAX_BLOCK_C, "BLOCK": kernels.GPU_BLOCK})
affinity = ASTSource(kernels._affinity_kernel, {"image_ptr": "*fp32", "dilations_ptr": "*i32", "position_ptr": "*fp32",
                     "out_ptr": "*fp32", "H": "i32", "W": "i32", "w_colour": "fp32", "norm": "fp32", "ND": "constexpr",
                     "BLOCK": "constexpr"}, constexprs={"ND": 6, "BLOCK": kernels.GPU_BLOCK})
for source in (propagate, affinity):
    assert triton.compile(source, target=target).asm["cubin"]
print("compiled")
"""


def test_kernels_compile_for_hopper():
    """Triton's compiler, not its interpreter, accepts the kernels: they build to sm_90 machine code
    (with the ptxas Triton bundles; no GPU needed), so a GPU run does not fail on a compile error."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-c", COMPILE], env=env, capture_output=True, text=True)
    assert proc.returncode == 0 and "compiled" in proc.stdout, proc.stderr[-3000:]
