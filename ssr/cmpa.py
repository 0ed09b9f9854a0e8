"""Cross-Modal Prototype Alignment (paper Eq. 1-6, DESIGN 4.4).

ISA and TSA adapt CLIP's image and text embeddings. Both are residual MLPs
whose last layer starts at zero, so at step 0 they are the identity and the
CAM equals plain CLIP's. Training pulls each (image, class) feature towards
the text prototype of its cluster and away from the other prototypes.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class SemanticAdapter(nn.Module):
    """x + MLP(x), MLP = (Linear, BatchNorm, ReLU) x (num_layers - 1) then a zero-initialised Linear.

    Used as ISA (image) and TSA (text); input (..., E) -> (..., E).
    """

    def __init__(self, dim: int, hidden_dim: int, num_layers: int = 2):
        super().__init__()
        layers: list[nn.Module] = []
        width = dim
        for _ in range(num_layers - 1):
            layers += [nn.Linear(width, hidden_dim), nn.BatchNorm1d(hidden_dim), nn.ReLU(inplace=True)]
            width = hidden_dim
        last = nn.Linear(width, dim)
        nn.init.zeros_(last.weight)
        nn.init.zeros_(last.bias)
        self.mlp = nn.Sequential(*layers, last)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        return (flat + self.mlp(flat.to(self.mlp[-1].weight.dtype)).to(flat.dtype)).reshape(shape)


def masked_average_pool(dense: torch.Tensor, cam: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """CAM-weighted average of patch features (Eq. 2).

    dense (B, N, E), cam (B, S, N) >= 0 -> (B, S, E).
    """
    weights = cam / (cam.sum(dim=-1, keepdim=True) + eps)
    return torch.einsum("bsn,bne->bse", weights, dense)


def kmeans(x: torch.Tensor, init: torch.Tensor, iters: int = 20) -> tuple[torch.Tensor, torch.Tensor]:
    """Spherical k-means on L2-normalised rows, seeded with `init`.

    x (M, E), init (K, E) -> centroids (K, E) normalised, assignment (M,) long.
    A cluster that loses all members keeps its previous centroid, so the
    cluster index stays tied to the class that seeded it.
    """
    x = F.normalize(x.float(), dim=-1)
    centroids = F.normalize(init.float(), dim=-1)
    assignment = torch.zeros(len(x), dtype=torch.long, device=x.device)
    for _ in range(iters):
        assignment = (x @ centroids.T).argmax(dim=1)
        sums = torch.zeros_like(centroids).index_add_(0, assignment, x)
        counts = torch.bincount(assignment, minlength=len(centroids))
        updated = torch.where(counts[:, None] > 0, F.normalize(sums, dim=-1), centroids)
        if torch.allclose(updated, centroids):
            break
        centroids = updated
    return centroids, (x @ centroids.T).argmax(dim=1)


class PrototypeBank(nn.Module):
    """A FIFO memory of recent (image feature, class) pairs and the prototypes built from it.

    State lives in buffers so it is saved in, and resumed from, checkpoints.
    Image prototypes P_I come from k-means over the stored image features,
    seeded with per-class means; text prototypes P_T are the members' mean
    of the live TSA outputs, so TSA keeps receiving gradient.
    """

    def __init__(self, num_classes: int, dim: int, size: int):
        super().__init__()
        self.num_classes = num_classes
        self.register_buffer("features", torch.zeros(size, dim))
        self.register_buffer("labels", torch.full((size,), -1, dtype=torch.long))
        self.register_buffer("pointer", torch.zeros((), dtype=torch.long))
        self.register_buffer("image_prototypes", torch.zeros(num_classes, dim))
        # text_members[k, c] = 1 if class c's text feature belongs to cluster k.
        self.register_buffer("text_members", torch.eye(num_classes))
        self.register_buffer("ready", torch.zeros((), dtype=torch.bool))

    @torch.no_grad()
    def push(self, features: torch.Tensor, labels: torch.Tensor) -> None:
        """features (M, E), labels (M,) 0-based foreground classes."""
        size = len(self.labels)
        for start in range(0, len(features), size):
            chunk_f, chunk_l = features[start:start + size], labels[start:start + size]
            index = (self.pointer + torch.arange(len(chunk_f), device=self.pointer.device)) % size
            self.features[index] = F.normalize(chunk_f.float(), dim=-1)
            self.labels[index] = chunk_l
            self.pointer.copy_((self.pointer + len(chunk_f)) % size)

    @torch.no_grad()
    def refresh(self, text_features: torch.Tensor, iters: int = 20) -> None:
        """Re-cluster the bank; text_features (C, E) are the current TSA(t_c)."""
        filled = self.labels >= 0
        feats, labels = self.features[filled], self.labels[filled]
        if len(feats) == 0:
            return
        seeds = self.image_prototypes.clone() if self.ready else F.normalize(text_features.float(), dim=-1)
        for c in range(self.num_classes):
            members = feats[labels == c]
            if len(members):
                seeds[c] = members.mean(dim=0)
        self.image_prototypes.copy_(kmeans(feats, seeds, iters)[0])
        # With one feature per class, k-means over the text side, seeded with the class means, keeps
        # each class in its own cluster unless two classes coincide; assign by nearest class seed.
        text = F.normalize(text_features.float(), dim=-1)
        centroids, assignment = kmeans(text, text, iters)
        self.text_members.copy_(F.one_hot(assignment, self.num_classes).T.float())
        self.ready.fill_(True)

    def assign(self, features: torch.Tensor) -> torch.Tensor:
        """pos_idx: the image-prototype cluster of each feature (M, E) -> (M,) long."""
        return (F.normalize(features.float(), dim=-1) @ self.image_prototypes.T).argmax(dim=1)

    def text_prototypes(self, text_features: torch.Tensor) -> torch.Tensor:
        """P_T (K, E) from live text features (C, E); empty clusters fall back to their seed class."""
        members = self.text_members + (self.text_members.sum(dim=1, keepdim=True) == 0) * torch.eye(
            self.num_classes, device=text_features.device)
        protos = members @ F.normalize(text_features, dim=-1)
        return F.normalize(protos, dim=-1)


class Temperature(nn.Module):
    """Learnable tau, stored as log(tau) so it stays positive; initial value 0.05 (P)."""

    def __init__(self, init: float):
        super().__init__()
        self.log_tau = nn.Parameter(torch.tensor(math.log(init)))

    def forward(self) -> torch.Tensor:
        return self.log_tau.exp()


def prototype_loss(
    image_features: torch.Tensor,
    text_prototypes: torch.Tensor,
    pos_idx: torch.Tensor,
    tau: torch.Tensor,
    *,
    text_features: torch.Tensor | None = None,
    image_prototypes: torch.Tensor | None = None,
) -> torch.Tensor:
    """L_proto (Eq. 3-6): cross-entropy of cos(f_image, P_T) / tau against pos_idx.

    image_features (M, E), text_prototypes (K, E), pos_idx (M,).
    With text_features (M, E) and image_prototypes (K, E), adds the symmetric
    text -> image-prototype term and averages the two.
    """
    logits = F.normalize(image_features, dim=-1) @ F.normalize(text_prototypes, dim=-1).T / tau
    loss = F.cross_entropy(logits, pos_idx)
    if text_features is not None and image_prototypes is not None:
        back = F.normalize(text_features, dim=-1) @ F.normalize(image_prototypes, dim=-1).T / tau
        loss = (loss + F.cross_entropy(back, pos_idx)) / 2
    return loss
