"""WeCLIP-style segmentation decoder on frozen CLIP tokens (WeCLIP, Zhang et al. CVPR 2024, which SSR builds on)."""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn


class SegDecoder(nn.Module):
    """Per-block Linear to `width`, concatenate, 1x1 conv, transformer layers, 1x1 conv to classes.

    Input: a list of L block outputs, each (B, 1 + N, D) with CLS first, on an (h, w) grid.
    Output: logits (B, num_classes, h, w) and the last features (B, N, width) for the affinity loss.
    """

    def __init__(self, in_dim: int, num_blocks: int, num_classes: int, width: int = 256, layers: int = 3, heads: int = 8):
        super().__init__()
        self.num_blocks = num_blocks
        self.project = nn.ModuleList([nn.Linear(in_dim, width) for _ in range(num_blocks)])
        self.fuse = nn.Conv2d(width * num_blocks, width, kernel_size=1)
        layer = nn.TransformerEncoderLayer(width, heads, dim_feedforward=4 * width, dropout=0.0, batch_first=True,
                                           norm_first=True)
        self.transformer = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.classify = nn.Conv2d(width, num_classes, kernel_size=1)

    def forward(self, tokens: list[torch.Tensor], grid: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        if len(tokens) != self.num_blocks:
            raise ValueError(f"decoder expects {self.num_blocks} blocks of tokens, got {len(tokens)}")
        h, w = grid
        dtype = self.fuse.weight.dtype
        feats = [proj(t[:, 1:].to(dtype)) for proj, t in zip(self.project, tokens, strict=True)]
        x = torch.cat(feats, dim=-1).transpose(1, 2).reshape(feats[0].shape[0], -1, h, w)
        x = self.fuse(x).flatten(2).transpose(1, 2)                 # (B, N, width)
        x = self.transformer(x)
        logits = self.classify(x.transpose(1, 2).reshape(x.shape[0], -1, h, w))
        return logits, x


@functools.lru_cache(maxsize=16)
def bilinear_matrix(size_in: int, size_out: int, device: torch.device, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(size_out, size_in) weights of 1-d linear interpolation as F.interpolate's "bilinear",
    align_corners=False, computes them in `dtype` (float32, or float64 for float64 inputs):
    source = (dst + 0.5) * in / out - 0.5, floored at 0, two taps."""
    scale = torch.tensor(size_in / size_out, dtype=dtype)
    src = ((torch.arange(size_out, dtype=dtype) + 0.5) * scale - 0.5).clamp_min(0)
    low = src.long().clamp(max=size_in - 1)
    high = (low + 1).clamp(max=size_in - 1)
    frac = src - low
    matrix = torch.zeros(size_out, size_in, dtype=dtype)
    rows = torch.arange(size_out)
    matrix.index_put_((rows, low), 1 - frac, accumulate=True)
    matrix.index_put_((rows, high), frac, accumulate=True)
    return matrix.to(device)


def upsample_bilinear(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """F.interpolate(x, size, mode="bilinear", align_corners=False) as two matrix products.

    x (B, C, h, w) float -> (B, C, H, W). Bilinear upsampling is separable: out = R_h x R_w^T
    with fixed interpolation matrices, so its backward is two products too, where
    F.interpolate's backward scatters with atomic adds. Same values up to rounding.
    """
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    rows = bilinear_matrix(x.shape[-2], size[0], x.device, dtype).to(x.dtype)
    cols = bilinear_matrix(x.shape[-1], size[1], x.device, dtype).to(x.dtype)
    return rows @ x @ cols.T


def affinity_pairs(labels: torch.Tensor, ignore_index: int = 255) -> tuple[torch.Tensor, torch.Tensor]:
    """Same-label and different-label pairs of patches: labels (B, N) -> two (B, N, N) bool masks.

    Pairs touching an ignored patch are in neither.
    """
    valid = labels != ignore_index
    pair_valid = valid[:, :, None] & valid[:, None, :]
    same = (labels[:, :, None] == labels[:, None, :]) & pair_valid
    return same, pair_valid & ~same


def affinity_loss_sums(features: torch.Tensor, labels: torch.Tensor,
                       ignore_index: int = 255) -> tuple[torch.Tensor, torch.Tensor]:
    """The pairwise affinity loss on decoder features (WeCLIP-style), as sums over pairs.

    features (B, N, d), labels (B, N) patch pseudo-labels -> (sum over same-label pairs of
    -log s, sum over different-label pairs of -log(1 - s)), s = sigmoid(5 cos). The loss is
    (pos_sum / n_pos + neg_sum / n_neg) / 2 with the pair counts of the whole optimiser step,
    so positive and negative pairs are averaged separately and neither dominates.
    """
    f = F.normalize(features.float(), dim=-1)
    sim = torch.sigmoid(f @ f.transpose(1, 2) * 5.0)               # (B, N, N)
    same, diff = affinity_pairs(labels, ignore_index)
    pos = -(torch.log(sim.clamp_min(1e-6)) * same).sum()
    neg = -(torch.log((1 - sim).clamp_min(1e-6)) * diff).sum()
    return pos, neg
