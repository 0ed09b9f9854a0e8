"""Initial CAMs: CLIP-ES softmax GradCAM with background prompts (CLIP-ES, Lin et al. CVPR 2023, which the paper follows).

Images in a batch never interact in the CLIP forward pass, so the gradient of
`sum_b p[b, slot_b]` with respect to the batch's activations is, for image b,
the gradient of its own score alone. One backward per class *slot* (the j-th
present class of every image) therefore yields every image's CAM, instead of
one backward per image x class.
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
    """
    slots = max(1, max((len(present) for present in labels), default=0))
    classes = torch.zeros(len(labels), slots, dtype=torch.long, device=device)
    valid = torch.zeros(len(labels), slots, dtype=torch.bool, device=device)
    for b, present in enumerate(labels):
        for s, c in enumerate(present):
            classes[b, s] = c - 1
            valid[b, s] = True
    return classes, valid


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
    present = torch.zeros(logits.shape[0], num_foreground, dtype=torch.bool, device=logits.device)
    # not scatter_: padded slots (class 0, False) would overwrite a present class 0
    present[valid.nonzero(as_tuple=True)[0], classes[valid]] = True
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


def gradcam(activations: torch.Tensor, slot_scores: torch.Tensor, valid: torch.Tensor, num_prefix: int = 1,
            weighting: str = "gradcam") -> torch.Tensor:
    """GradCAM of every image and slot with one backward pass per slot.

    activations (B, T, D): a tensor that requires grad and from which `slot_scores` (B, S)
    were computed; its first `num_prefix` tokens (CLS) are not patches.
    weighting "gradcam": channel weights = gradient averaged over patches (CLIP-ES);
    "hirescam": each patch's own gradient times its activation (HiResCAM, Draelos and
    Carin 2020), for models whose gradient lands on a few attended patches.
    -> CAMs (B, S, N) in [0, 1], zero for invalid slots. The graph is released after the last slot.
    """
    if weighting not in CAM_WEIGHTINGS:
        raise ValueError(f"unknown CAM weighting {weighting!r}; expected one of {CAM_WEIGHTINGS}")
    cams = []
    slots = slot_scores.shape[1]
    for s in range(slots):
        (grad,) = torch.autograd.grad(slot_scores[:, s].sum(), activations, retain_graph=s < slots - 1)
        feats, grad = activations[:, num_prefix:].detach(), grad[:, num_prefix:]
        weights = grad.mean(dim=1, keepdim=True) if weighting == "gradcam" else grad   # (B, 1 or N, D)
        cams.append(F.relu((weights * feats).sum(dim=-1)))                            # (B, N)
    return minmax_normalise(torch.stack(cams, dim=1).float()) * valid[..., None]
