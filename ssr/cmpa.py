"""Cross-Modal Prototype Alignment (paper Eq. 1-6).

ISA and TSA project CLIP's image and text embeddings (Eq. 1). Per (image, present class),
f_image pools the projected patch embeddings with the class's GradCAM (Eq. 2) and f_text is
the projected prompt of the class. k-means over the collected f_image gives the image
prototypes P_I; the nearest one to each sample is its cluster pseudo-label pos_idx (or,
with `cmpa.positive: class`, the sample's own class); the text prototypes P_T are the
projected prompts (k-means over the dataset's f_text, which take one value per class,
returns exactly those values when there are as many clusters as classes). L_proto
(Eq. 3-6) then pulls each f_image to the text prototype of its positive and away from the
others, and each text prototype to the image prototype of its class.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class ProjectionHead(nn.Module):
    """The paper's ISA / TSA (Eq. 1): (Linear, BatchNorm, ReLU) x (num_layers - 1), then Linear d1 -> d2.

    The output layer is a plain Linear (our reading): a final ReLU would leave every
    feature non-negative and every cosine similarity >= 0. Input (..., d1) -> (..., d2).
    """

    def __init__(self, in_dim: int, out_dim: int, hidden_dim: int, num_layers: int = 2):
        super().__init__()
        layers: list[nn.Module] = []
        width = in_dim
        for _ in range(num_layers - 1):
            layers += [nn.Linear(width, hidden_dim), nn.BatchNorm1d(hidden_dim), nn.ReLU(inplace=True)]
            width = hidden_dim
        self.mlp = nn.Sequential(*layers, nn.Linear(width, out_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1]).to(self.mlp[-1].weight.dtype)
        return self.mlp(flat).reshape(*x.shape[:-1], -1)


class ResidualHead(nn.Module):
    """x + MLP(x) with the MLP's last Linear zero-initialised: the identity at step 0 (our option).

    Keeps d1 (no reduction), so that an untrained model's CAM is plain CLIP's. Input (..., d) -> (..., d).
    """

    def __init__(self, dim: int, hidden_dim: int, num_layers: int = 2):
        super().__init__()
        self.mlp = ProjectionHead(dim, dim, hidden_dim, num_layers).mlp
        nn.init.zeros_(self.mlp[-1].weight)
        nn.init.zeros_(self.mlp[-1].bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        return (flat + self.mlp(flat.to(self.mlp[-1].weight.dtype)).to(flat.dtype)).reshape(x.shape)


def build_head(kind: str, in_dim: int, out_dim: int, hidden_dim: int, num_layers: int) -> nn.Module:
    """`cmpa.head`: "projection" (the paper's, d1 -> out_dim) or "residual" (identity at init, keeps d1)."""
    if kind == "projection":
        return ProjectionHead(in_dim, out_dim, hidden_dim, num_layers)
    if kind == "residual":
        return ResidualHead(in_dim, hidden_dim, num_layers)
    raise ValueError(f"unknown CMPA head {kind!r}; expected 'projection' or 'residual'")


def masked_average_pool(dense: torch.Tensor, cam: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """CAM-weighted average of patch features (Eq. 2).

    dense (B, N, E), cam (B, S, N) >= 0 -> (B, S, E).
    """
    weights = cam / (cam.sum(dim=-1, keepdim=True) + eps)
    return torch.einsum("bsn,bne->bse", weights, dense)


def spherical_kmeans(x: torch.Tensor, init: torch.Tensor, iters: int = 20) -> tuple[torch.Tensor, torch.Tensor]:
    """k-means under cosine similarity on L2-normalised rows, seeded with `init`.

    x (M, E), init (K, E) -> centroids (K, E) normalised, assignment (M,) long.
    A cluster that loses all members keeps its previous centroid, so the
    cluster index stays tied to the class that seeded it.
    """
    x = F.normalize(x.float(), dim=-1)
    centroids = F.normalize(init.float(), dim=-1)
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
    """A FIFO memory of (f_image, class) pairs and the image prototypes P_I k-means builds from it.

    State lives in buffers so it is saved in, and resumed from, checkpoints. Cluster k is
    seeded with class k's mean feature, so index k stays the class-k prototype.
    """

    def __init__(self, num_classes: int, dim: int, size: int):
        super().__init__()
        self.num_classes = num_classes
        self.register_buffer("features", torch.zeros(size, dim))
        self.register_buffer("labels", torch.full((size,), -1, dtype=torch.long))
        self.register_buffer("pointer", torch.zeros((), dtype=torch.long))
        self.register_buffer("image_prototypes", torch.zeros(num_classes, dim))
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

    def class_counts(self) -> torch.Tensor:
        """(K,) long: stored features per class."""
        filled = self.labels >= 0
        return torch.bincount(self.labels[filled], minlength=self.num_classes)

    @torch.no_grad()
    def refresh(self, fallback: torch.Tensor | None = None, iters: int = 20) -> None:
        """Re-cluster the stored features into P_I.

        Seeds: each class's mean stored feature; a class with none keeps its previous
        prototype, or before the first refresh `fallback` (K, E), its projected prompt
        (needed only then).
        """
        filled = self.labels >= 0
        feats, labels = self.features[filled], self.labels[filled]
        if len(feats) == 0:
            return
        if not bool(self.ready) and fallback is None:
            raise ValueError("the first refresh needs a fallback prototype for every class")
        seeds = self.image_prototypes.clone() if bool(self.ready) else F.normalize(fallback.float(), dim=-1).clone()
        for c in range(self.num_classes):
            members = feats[labels == c]
            if len(members):
                seeds[c] = members.mean(dim=0)
        self.image_prototypes.copy_(spherical_kmeans(feats, seeds, iters)[0])
        self.ready.fill_(True)

    def assign(self, features: torch.Tensor) -> torch.Tensor:
        """pos_idx: the image-prototype cluster of each feature (M, E) -> (M,) long."""
        return (F.normalize(features.float(), dim=-1) @ self.image_prototypes.T).argmax(dim=1)


def positive_index(rule: str, bank: PrototypeBank, features: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
    """pos_idx of Eq. 4-5 for features (M, E) of samples of classes (M,) -> (M,) long.

    "cluster" (the paper): the nearest image prototype, a pseudo-label that can name another
    class where the prototypes are poorly separated; "class" (our option): the sample's own
    image-level class, which cluster k stands for since class k seeds it.
    """
    if rule == "cluster":
        return bank.assign(features)
    if rule == "class":
        return classes
    raise ValueError(f"unknown CMPA positive {rule!r}; expected 'cluster' or 'class'")


class Temperature(nn.Module):
    """Learnable tau, stored as log(tau) so it stays positive; initial value 0.05 (P)."""

    def __init__(self, init: float):
        super().__init__()
        self.log_tau = nn.Parameter(torch.tensor(math.log(init)))

    def forward(self) -> torch.Tensor:
        return self.log_tau.exp()


def _cosine_logits(a: torch.Tensor, b: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
    return F.normalize(a.float(), dim=-1) @ F.normalize(b.float(), dim=-1).T / tau


def sample_loss_sum(
    kind: str,
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    text_prototypes: torch.Tensor,
    image_prototypes: torch.Tensor,
    pos_idx: torch.Tensor,
    tau: torch.Tensor,
    weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """The per-sample part of L_proto, SUMMED over the M samples (the caller divides by the step's count).

    image_features / text_features (M, E): f_image and f_text of each (image, class) sample;
    text_prototypes P_T / image_prototypes P_I (K, E); pos_idx (M,) each sample's cluster.
    kind (Table 4):
    - "cross_modal" (Eq. 3-6, the method): -log softmax(f_image . P_T / tau)[pos_idx];
    - "in_modal": the same against the image's own prototypes P_I;
    - "feature": 1 - cos(f_image, f_text), fitting the features directly, no prototypes.
    weight (M,) or None: each sample's weight in the sum (0 drops a padded slot without indexing it out).
    """
    reduction = "sum" if weight is None else "none"
    if kind == "cross_modal":
        terms = F.cross_entropy(_cosine_logits(image_features, text_prototypes, tau), pos_idx, reduction=reduction)
    elif kind == "in_modal":
        terms = F.cross_entropy(_cosine_logits(image_features, image_prototypes, tau), pos_idx, reduction=reduction)
    elif kind == "feature":
        terms = 1 - F.cosine_similarity(image_features.float(), text_features.float(), dim=-1)
    else:
        raise ValueError(f"unknown CMPA loss {kind!r}")
    return terms.sum() if weight is None else (terms * weight).sum()


def prototype_loss_term(kind: str, text_prototypes: torch.Tensor, image_prototypes: torch.Tensor,
                        tau: torch.Tensor) -> torch.Tensor | None:
    """The per-step part of L_proto, a mean over the K prototypes; None for "feature", which has none.

    "cross_modal": constraints (2) and (3): text prototype k gathers with image prototype k
    and is pushed from the others. "in_modal": text prototypes contrasted with one another.
    text_prototypes, image_prototypes (K, E) -> scalar.
    """
    target = torch.arange(len(text_prototypes), device=text_prototypes.device)
    if kind == "cross_modal":
        return F.cross_entropy(_cosine_logits(text_prototypes, image_prototypes, tau), target)
    if kind == "in_modal":
        return F.cross_entropy(_cosine_logits(text_prototypes, text_prototypes, tau), target)
    if kind == "feature":
        return None
    raise ValueError(f"unknown CMPA loss {kind!r}")
