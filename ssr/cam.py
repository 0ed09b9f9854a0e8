"""Initial CAMs: CLIP-ES softmax GradCAM with background prompts (CLIP-ES, Lin et al. CVPR 2023, which the paper follows).

Images in a batch never interact in the CLIP forward pass, so the gradient of
`sum_b p[b, slot_b]` with respect to the batch's activations is, for image b,
the gradient of its own score alone. One backward per class *slot* (the j-th
present class of every image) therefore yields every image's CAM, instead of
one backward per image x class. With `batched`, the slots' backward passes run as one
`torch.autograd.grad(..., is_grads_batched=True)` call (autograd's vmap over the slots'
output gradients); `gradcam_at_qkv` stops that backward at the CAM block's input projection.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# gradcam's ways of weighting activations by gradients (datasets.{ds}.cam_weighting): GradCAM averages
# the gradient over patches (CLIP-ES, the paper); HiResCAM weights each patch by its own gradient.
CAM_WEIGHTINGS = ("gradcam", "hirescam")


def class_slots(labels: list[list[int]], device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad per-image foreground classes (1-based) to slots.

    -> classes (B, S) long (0-based foreground index, 0 where padded), valid (B, S) bool.
    Built on the host and copied once (not written element by element on the device).
    """
    slots = max(1, max((len(present) for present in labels), default=0))
    classes = torch.zeros(len(labels), slots, dtype=torch.long)
    valid = torch.zeros(len(labels), slots, dtype=torch.bool)
    for b, present in enumerate(labels):
        classes[b, : len(present)] = torch.tensor(present, dtype=torch.long) - 1
        valid[b, : len(present)] = True
    if device is None or torch.device(device).type == "cpu":
        return classes, valid
    return classes.pin_memory().to(device, non_blocking=True), valid.pin_memory().to(device, non_blocking=True)


def present_class_probs(
    image_embedding: torch.Tensor,
    text_embedding: torch.Tensor,
    logit_scale: torch.Tensor | float,
    classes: torch.Tensor,
    valid: torch.Tensor,
    num_foreground: int,
) -> torch.Tensor:
    """Softmax over each image's present foreground classes plus all background prompts.

    image_embedding (B, E), text_embedding (C_fg + C_bg, E) with foreground first,
    classes / valid (B, S) from `class_slots` -> probabilities (B, S) of each slot's class.
    """
    logits = logit_scale * F.normalize(image_embedding, dim=-1) @ F.normalize(text_embedding, dim=-1).T
    # a scatter of counts, not of flags: a padded slot (class 0, not valid) adds 0 and cannot
    # clear a present class 0; no boolean indexing, so no device sync
    present = torch.zeros(logits.shape[0], num_foreground, device=logits.device).scatter_add_(
        1, classes, valid.to(logits.dtype)) > 0
    keep = torch.cat([present, torch.ones_like(logits[:, num_foreground:], dtype=torch.bool)], dim=1)
    probs = logits.masked_fill(~keep, float("-inf")).softmax(dim=-1)
    return probs.gather(1, classes) * valid


def minmax_normalise(cam: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Min-max normalise over the last dimension: (..., N) -> (..., N) in [0, 1]; a constant row gives 0.

    The guard is a floor on the range, not an added constant, so CAMs of any scale (HiResCAM's
    are ~1e-6 on the demo CLIP) still reach 1 at their maximum.
    """
    low = cam.amin(dim=-1, keepdim=True)
    high = cam.amax(dim=-1, keepdim=True)
    return (cam - low) / (high - low).clamp_min(eps)


def _check_weighting(weighting: str) -> None:
    if weighting not in CAM_WEIGHTINGS:
        raise ValueError(f"unknown CAM weighting {weighting!r}; expected one of {CAM_WEIGHTINGS}")


def _slot_gradients(slot_scores: torch.Tensor, leaf: torch.Tensor) -> torch.Tensor:
    """d(sum_b slot_scores[b, s]) / d leaf for every slot s in one batched backward: (B, S) -> (S, *leaf.shape).

    The output gradient of slot s is the one-hot of column s in every row, what the loop's
    `slot_scores[:, s].sum()` back-propagates; autograd vmaps the backward over the S of them.
    """
    slots = slot_scores.shape[1]
    one_hot = torch.eye(slots, dtype=slot_scores.dtype, device=slot_scores.device)[:, None, :]
    (grad,) = torch.autograd.grad(slot_scores, leaf, grad_outputs=one_hot.expand(slots, *slot_scores.shape),
                                  is_grads_batched=True)
    return grad


def gradcam(activations: torch.Tensor, slot_scores: torch.Tensor, valid: torch.Tensor, num_prefix: int = 1,
            weighting: str = "gradcam", *, batched: bool = False) -> torch.Tensor:
    """GradCAM of every image and slot with one backward pass per slot.

    activations (B, T, D): a tensor that requires grad and from which `slot_scores` (B, S)
    were computed; its first `num_prefix` tokens (CLS) are not patches.
    weighting "gradcam": channel weights = gradient averaged over patches (CLIP-ES);
    "hirescam": each patch's own gradient times its activation (HiResCAM, Draelos and
    Carin 2020), for models whose gradient lands on a few attended patches.
    batched: the S backward passes as one batched call (the same CAMs to float rounding: its larger
    matrix products may sum in another order).
    -> CAMs (B, S, N) in [0, 1], zero for invalid slots. The graph is released after the last slot.
    """
    _check_weighting(weighting)
    feats = activations[:, num_prefix:].detach()
    if batched:
        grad = _slot_gradients(slot_scores, activations)[:, :, num_prefix:]                 # (S, B, N, D)
        weights = grad.mean(dim=2, keepdim=True) if weighting == "gradcam" else grad          # (S, B, 1 or N, D)
        cams = F.relu((weights * feats).sum(dim=-1)).transpose(0, 1)                           # (B, S, N)
        return minmax_normalise(cams.float()) * valid[..., None]
    cams = []
    slots = slot_scores.shape[1]
    for s in range(slots):
        (grad,) = torch.autograd.grad(slot_scores[:, s].sum(), activations, retain_graph=s < slots - 1)
        grad = grad[:, num_prefix:]
        weights = grad.mean(dim=1, keepdim=True) if weighting == "gradcam" else grad   # (B, 1 or N, D)
        cams.append(F.relu((weights * feats).sum(dim=-1)))                            # (B, N)
    return minmax_normalise(torch.stack(cams, dim=1).float()) * valid[..., None]


def gradcam_at_qkv(activations: torch.Tensor, qkv: torch.Tensor, in_proj_weight: torch.Tensor, slot_scores: torch.Tensor,
                   valid: torch.Tensor, num_prefix: int = 1) -> torch.Tensor:
    """`gradcam` (weighting "gradcam") with the backward stopped at the CAM block's attention input projection.

    activations (B, T, D): the GradCAM layer's output (ln_1's), no grad needed; qkv (B, T, 3D):
    `activations @ in_proj_weight.T + bias`, a tensor that requires grad and from which
    `slot_scores` (B, S) were computed. That projection is the activations' only consumer,
    so their gradient is dL/dqkv @ in_proj_weight, and the patch-summed gradient GradCAM
    averages is (sum_p dL/dqkv_p) @ in_proj_weight: one (S*B, 3D) x (3D, D) product instead
    of a backward GEMM over every token. Same CAMs as `gradcam` up to float rounding (the
    order of the sums). -> (B, S, N) in [0, 1], zero for invalid slots.
    """
    feats = activations[:, num_prefix:].detach().float()                                  # (B, N, D)
    grad = _slot_gradients(slot_scores, qkv)[:, :, num_prefix:]                           # (S, B, N, 3D)
    weights = (grad.float().sum(dim=2) @ in_proj_weight.float()) / grad.shape[2]          # (S, B, D): patch-mean gradient
    cams = torch.einsum("sbd,bnd->bsn", weights, feats)
    return minmax_normalise(F.relu(cams)) * valid[..., None]
