"""PAR (`ssr.par`) as two Triton kernels: the neighbour affinity, then one launch per iteration.

`ssr.par` is the reference: it materialises a replicate-padded copy of the scores per dilation and
issues one `addcmul_` per neighbour (48 with WeCLIP's dilations), each a full pass over memory.
Here each pixel reads its neighbours through clamped indices (exactly replicate padding) and
does the 48 multiply-adds in registers, in the reference's order, so one iteration is one pass:
read the scores and the affinity, write the result. The kernels write the 8 neighbours of each
dilation out in `ssr.par.OFFSETS` order: up-left, up, up-right, left, right, down-left, down,
down-right.

Same function as `ssr.par.par_affinity` / `par_refine` up to float rounding (fused multiply-adds,
the order of the softmax's sums); tests/test_par_triton.py runs both under TRITON_INTERPRET=1
on the CPU. No autograd: PAR refines labels under no_grad.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from ssr.par import position_softmax

# Pixels per program. The interpreter (TRITON_INTERPRET=1, CPU tensors) runs each program as
# numpy calls, so it wants few, wide programs; a GPU wants many narrow ones.
GPU_BLOCK = 256
INTERPRETER_BLOCK = 16384
MAX_BLOCK_C = 8


@triton.jit
def _rows_cols(dilations_ptr, j, y, x, H, W):
    """For dilation j: the clamped (= replicate-padded) flat row starts above / at / below and columns
    left / at / right of pixels (y, x)."""
    d = tl.load(dilations_ptr + j)
    up = tl.maximum(y - d, 0) * W
    mid = y * W
    down = tl.minimum(y + d, H - 1) * W
    left = tl.maximum(x - d, 0)
    right = tl.minimum(x + d, W - 1)
    return up, mid, down, left, x, right


@triton.jit
def _accumulate(acc, src, read, q, weight_ptr, in_image):
    """acc + src[:, q] * weight (one neighbour's multiply-add for every channel)."""
    weight = tl.load(weight_ptr, mask=in_image, other=0.0)
    return acc + tl.load(src + q[None, :], mask=read, other=0.0) * weight[None, :]


@triton.jit
def _propagate_kernel(src_ptr, affinity_ptr, dilations_ptr, active_ptr, dst_ptr, C, H, W,
                      ND: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK: tl.constexpr):
    """One PAR iteration for one image (program axis 1) x BLOCK pixels x BLOCK_C of its C channels (axis 2).

    dst[c, p] = sum_k src[c, neighbour_k(p)] * affinity[k, p], accumulated in k order from 0
    (dilation-major, OFFSETS order, as `ssr.par.par_refine`); channels whose `active` flag is 0
    are neither read nor computed and come out 0.
    """
    b = tl.program_id(1)
    HW = H * W
    p = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    in_image = p < HW
    y = p // W
    x = p % W
    c = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
    in_channels = c < C
    active = tl.load(active_ptr + b * C + c, mask=in_channels, other=0) != 0
    read = active[:, None] & in_image[None, :]
    src = src_ptr + b.to(tl.int64) * C * HW + c[:, None] * HW
    weights = affinity_ptr + b.to(tl.int64) * 8 * ND * HW + p
    acc = tl.zeros([BLOCK_C, BLOCK], tl.float32)
    for j in range(ND):
        up, mid, down, left, centre, right = _rows_cols(dilations_ptr, j, y, x, H, W)
        k = weights + 8 * j * HW
        acc = _accumulate(acc, src, read, up + left, k, in_image)
        acc = _accumulate(acc, src, read, up + centre, k + HW, in_image)
        acc = _accumulate(acc, src, read, up + right, k + 2 * HW, in_image)
        acc = _accumulate(acc, src, read, mid + left, k + 3 * HW, in_image)
        acc = _accumulate(acc, src, read, mid + right, k + 4 * HW, in_image)
        acc = _accumulate(acc, src, read, down + left, k + 5 * HW, in_image)
        acc = _accumulate(acc, src, read, down + centre, k + 6 * HW, in_image)
        acc = _accumulate(acc, src, read, down + right, k + 7 * HW, in_image)
    dst = dst_ptr + b.to(tl.int64) * C * HW + c[:, None] * HW + p[None, :]
    tl.store(dst, acc, mask=in_channels[:, None] & in_image[None, :])


@triton.jit
def _colour_sum(s0, s1, s2, base, q, mask, HW):
    return (s0 + tl.load(base + q, mask=mask, other=0.0), s1 + tl.load(base + HW + q, mask=mask, other=0.0),
            s2 + tl.load(base + 2 * HW + q, mask=mask, other=0.0))


@triton.jit
def _colour_square_sum(v0, v1, v2, base, q, mask, HW, m0, m1, m2):
    d0 = tl.load(base + q, mask=mask, other=0.0) - m0
    d1 = tl.load(base + HW + q, mask=mask, other=0.0) - m1
    d2 = tl.load(base + 2 * HW + q, mask=mask, other=0.0) - m2
    return v0 + d0 * d0, v1 + d1 * d1, v2 + d2 * d2


@triton.jit
def _colour_logit(top, out, base, q, mask, HW, x0, x1, x2, s0, s1, s2, w_colour):
    """Store -(mean over channels of (|I_j - I_i| / std / w_colour)^2) of neighbour pixels q at `out`;
    return the running maximum."""
    t0 = tl.abs(tl.load(base + q, mask=mask, other=0.0) - x0) / s0 / w_colour
    t1 = tl.abs(tl.load(base + HW + q, mask=mask, other=0.0) - x1) / s1 / w_colour
    t2 = tl.abs(tl.load(base + 2 * HW + q, mask=mask, other=0.0) - x2) / s2 / w_colour
    logit = -((t0 * t0 + t1 * t1 + t2 * t2) / 3.0)
    tl.store(out, logit, mask=mask)
    return tl.maximum(top, logit)


@triton.jit
def _affinity_kernel(image_ptr, dilations_ptr, position_ptr, out_ptr, H, W, w_colour, norm,
                     ND: tl.constexpr, BLOCK: tl.constexpr):
    """One image (program axis 1) x BLOCK pixels: (3, H, W) -> (K, H, W) neighbour weights, K = 8 ND.

    Passes over the K neighbours, in the reference's order: their mean colour, their std, the
    colour logits (stored in the output, with their maximum), the softmax's denominator, the weights.
    """
    K = 8 * ND
    b = tl.program_id(1)
    HW = H * W
    p = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = p < HW
    y = p // W
    x = p % W
    base = image_ptr + b.to(tl.int64) * 3 * HW
    x0 = tl.load(base + p, mask=mask, other=0.0)
    x1 = tl.load(base + HW + p, mask=mask, other=0.0)
    x2 = tl.load(base + 2 * HW + p, mask=mask, other=0.0)
    m0 = tl.zeros([BLOCK], tl.float32)
    m1 = tl.zeros([BLOCK], tl.float32)
    m2 = tl.zeros([BLOCK], tl.float32)
    for j in range(ND):
        up, mid, down, left, centre, right = _rows_cols(dilations_ptr, j, y, x, H, W)
        m0, m1, m2 = _colour_sum(m0, m1, m2, base, up + left, mask, HW)
        m0, m1, m2 = _colour_sum(m0, m1, m2, base, up + centre, mask, HW)
        m0, m1, m2 = _colour_sum(m0, m1, m2, base, up + right, mask, HW)
        m0, m1, m2 = _colour_sum(m0, m1, m2, base, mid + left, mask, HW)
        m0, m1, m2 = _colour_sum(m0, m1, m2, base, mid + right, mask, HW)
        m0, m1, m2 = _colour_sum(m0, m1, m2, base, down + left, mask, HW)
        m0, m1, m2 = _colour_sum(m0, m1, m2, base, down + centre, mask, HW)
        m0, m1, m2 = _colour_sum(m0, m1, m2, base, down + right, mask, HW)
    m0 = m0 / K
    m1 = m1 / K
    m2 = m2 / K
    v0 = tl.zeros([BLOCK], tl.float32)
    v1 = tl.zeros([BLOCK], tl.float32)
    v2 = tl.zeros([BLOCK], tl.float32)
    for j in range(ND):
        up, mid, down, left, centre, right = _rows_cols(dilations_ptr, j, y, x, H, W)
        v0, v1, v2 = _colour_square_sum(v0, v1, v2, base, up + left, mask, HW, m0, m1, m2)
        v0, v1, v2 = _colour_square_sum(v0, v1, v2, base, up + centre, mask, HW, m0, m1, m2)
        v0, v1, v2 = _colour_square_sum(v0, v1, v2, base, up + right, mask, HW, m0, m1, m2)
        v0, v1, v2 = _colour_square_sum(v0, v1, v2, base, mid + left, mask, HW, m0, m1, m2)
        v0, v1, v2 = _colour_square_sum(v0, v1, v2, base, mid + right, mask, HW, m0, m1, m2)
        v0, v1, v2 = _colour_square_sum(v0, v1, v2, base, down + left, mask, HW, m0, m1, m2)
        v0, v1, v2 = _colour_square_sum(v0, v1, v2, base, down + centre, mask, HW, m0, m1, m2)
        v0, v1, v2 = _colour_square_sum(v0, v1, v2, base, down + right, mask, HW, m0, m1, m2)
    s0 = tl.sqrt(v0 / (K - 1)) + 1e-8
    s1 = tl.sqrt(v1 / (K - 1)) + 1e-8
    s2 = tl.sqrt(v2 / (K - 1)) + 1e-8
    out = out_ptr + b.to(tl.int64) * K * HW + p
    top = tl.full([BLOCK], float("-inf"), tl.float32)
    for j in range(ND):
        up, mid, down, left, centre, right = _rows_cols(dilations_ptr, j, y, x, H, W)
        k = out + 8 * j * HW
        top = _colour_logit(top, k, base, up + left, mask, HW, x0, x1, x2, s0, s1, s2, w_colour)
        top = _colour_logit(top, k + HW, base, up + centre, mask, HW, x0, x1, x2, s0, s1, s2, w_colour)
        top = _colour_logit(top, k + 2 * HW, base, up + right, mask, HW, x0, x1, x2, s0, s1, s2, w_colour)
        top = _colour_logit(top, k + 3 * HW, base, mid + left, mask, HW, x0, x1, x2, s0, s1, s2, w_colour)
        top = _colour_logit(top, k + 4 * HW, base, mid + right, mask, HW, x0, x1, x2, s0, s1, s2, w_colour)
        top = _colour_logit(top, k + 5 * HW, base, down + left, mask, HW, x0, x1, x2, s0, s1, s2, w_colour)
        top = _colour_logit(top, k + 6 * HW, base, down + centre, mask, HW, x0, x1, x2, s0, s1, s2, w_colour)
        top = _colour_logit(top, k + 7 * HW, base, down + right, mask, HW, x0, x1, x2, s0, s1, s2, w_colour)
    total = tl.zeros([BLOCK], tl.float32)
    for k in range(K):
        total += tl.exp(tl.load(out + k * HW, mask=mask, other=0.0) - top)
    for k in range(K):
        colour = tl.exp(tl.load(out + k * HW, mask=mask, other=0.0) - top) / total
        tl.store(out + k * HW, (colour + tl.load(position_ptr + k)) / norm, mask=mask)


@functools.lru_cache(maxsize=16)
def _constants(dilations: tuple[int, ...], w_colour: float, w_position: float, device: torch.device):
    """The kernels' small inputs, made once per setting: a tensor built from Python values on a GPU
    is a copy from pageable host memory, which waits for the device."""
    position = w_position * position_softmax(list(dilations), w_colour, device)   # as par_affinity adds it
    return torch.tensor(dilations, dtype=torch.int32, device=device), position


def _block(device: torch.device) -> int:
    return GPU_BLOCK if device.type == "cuda" else INTERPRETER_BLOCK


def par_affinity_triton(image: torch.Tensor, dilations: list[int], w_colour: float = 0.3,
                        w_position: float = 0.01) -> torch.Tensor:
    """`ssr.par.par_affinity` in one kernel: (B, 3, H, W) image -> (B, K, H, W) float32, K = 8 * len(dilations)."""
    image = image.float().contiguous()
    b, _, h, w = image.shape
    k = 8 * len(dilations)
    out = torch.empty(b, k, h, w, device=image.device, dtype=torch.float32)
    block = _block(image.device)
    dilation_values, position = _constants(tuple(dilations), float(w_colour), float(w_position), image.device)
    # named ranges, so that a profile (benchmarks/op_count.py) counts each launch, interpreted or not
    with torch.profiler.record_function("triton::par_affinity"):
        _affinity_kernel[(triton.cdiv(h * w, block), b)](image, dilation_values, position, out, h, w,
                                                        float(w_colour), float(1 + w_position), ND=len(dilations),
                                                        BLOCK=block)
    return out


def par_refine_triton(image: torch.Tensor, scores: torch.Tensor, *, dilations: list[int], iterations: int,
                      w_colour: float = 0.3, w_position: float = 0.01,
                      active: torch.Tensor | None = None) -> torch.Tensor:
    """`ssr.par.par_refine` with the kernels: image (B, 3, H, W), scores (B, C, H, W) -> (B, C, H, W) float32.

    active (B, C) bool or None (all): channels to refine; the others are skipped and come out 0,
    which is what the reference gives them when their scores are 0 (padded class slots).
    """
    b, c, h, w = scores.shape
    affinity = par_affinity_triton(image, dilations, w_colour, w_position)
    dilation_values = _constants(tuple(dilations), float(w_colour), float(w_position), scores.device)[0]
    if active is None:
        active = torch.ones(b, c, dtype=torch.bool, device=scores.device)
    active = active.to(device=scores.device, dtype=torch.int8).contiguous()
    src = scores.float().contiguous()
    if iterations == 0:
        return src.masked_fill(active[..., None, None] == 0, 0.0)
    block = _block(scores.device)
    buffers = [torch.empty_like(src), torch.empty_like(src)]
    # channels per program: all of a VOC image's (background + up to 7 classes) read each neighbour's
    # weight once; more (COCO) would cost registers, so they split over programs
    block_c = min(triton.next_power_of_2(c), MAX_BLOCK_C)
    grid = (triton.cdiv(h * w, block), b, triton.cdiv(c, block_c))
    for i in range(iterations):
        dst = buffers[i % 2]
        with torch.profiler.record_function("triton::par_propagate"):
            _propagate_kernel[grid](src, affinity, dilation_values, active, dst, c, h, w, ND=len(dilations),
                                    BLOCK_C=block_c, BLOCK=block)
        src = dst
    return src
