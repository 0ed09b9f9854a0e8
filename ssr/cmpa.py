"""Cross-Modal Prototype Alignment (paper Eq. 1-6).

ISA and TSA project CLIP's image and text embeddings (Eq. 1). Per (image, present class),
f_image pools the projected patch embeddings with the class's GradCAM (Eq. 2) and f_text is
the projected prompt of the class. Prototypes are class-indexed, row k = class k: clustering
the dataset's f_text gives one cluster per class (each class's prompt takes one value), so
P_T row k is class k's projected prompt, and P_I row k is the normalised mean of the stored
f_image of class k, which is what k-means seeded with the class means returns before its
first iteration (free k-means is an option; its clusters are then relabelled to classes).
A sample's positive (Eq. 4-5) is the text prototype of its own class, constraint (1);
L_proto (Eq. 3-6) pulls each f_image to it and away from the other classes' prototypes, and
each text prototype to the image prototype of its class, constraint (2).

The stored f_image live in a `SampleMemory` with one slot per (image, class) sample of the
train split, so a refresh reads the whole split, as the paper's collection over the dataset.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
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
    A cluster that loses all members keeps its previous centroid.
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


def class_means(features: torch.Tensor, labels: torch.Tensor, fallback: torch.Tensor) -> torch.Tensor:
    """Normalised mean of each class's normalised features: features (M, E), labels (M,) in [0, K),
    fallback (K, E) for a class without features -> (K, E), row k = class k."""
    sums = torch.zeros_like(fallback, dtype=torch.float32).index_add_(0, labels, F.normalize(features.float(), dim=-1))
    counts = torch.bincount(labels, minlength=len(fallback))
    return torch.where(counts[:, None] > 0, F.normalize(sums, dim=-1), F.normalize(fallback.float(), dim=-1))


def relabel_clusters(centroids: torch.Tensor, assignment: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Reorder k-means centroids (K, E) so that row k is the cluster matched to class k.

    The matching maximises the samples whose cluster and class agree (Hungarian algorithm on
    the K x K cluster-by-class counts): a cluster index is otherwise no class, and cannot pick
    a row of the class-ordered text prototypes.
    """
    k = len(centroids)
    counts = torch.zeros(k, k, dtype=torch.long).index_put_((assignment.cpu(), labels.cpu()), torch.ones(len(labels),
                                                            dtype=torch.long), accumulate=True)
    clusters, classes = linear_sum_assignment(counts.numpy(), maximize=True)
    out = torch.empty_like(centroids)
    out[torch.as_tensor(classes, device=centroids.device)] = centroids[torch.as_tensor(clusters, device=centroids.device)]
    return out


def image_prototypes(features: torch.Tensor, labels: torch.Tensor, fallback: torch.Tensor, kmeans_iters: int = 0) -> torch.Tensor:
    """P_I (K, E), row k = class k, from the stored features (M, E) of classes labels (M,).

    `kmeans_iters` 0: each class's mean feature (k-means stopped at its class seed, the clusters
    that clustering the paired text gives). Above 0: that many iterations of free spherical
    k-means seeded with the class means, then the clusters relabelled to classes. A class
    without stored features keeps `fallback[k]`.
    """
    means = class_means(features, labels, fallback)
    if kmeans_iters == 0:
        return means
    centroids, assignment = spherical_kmeans(features, means, kmeans_iters)
    return relabel_clusters(centroids, assignment, labels)


class Prototypes(nn.Module):
    """P_I and, for `cmpa.text_prototypes: snapshot`, P_T as taken at the last refresh: (K, E) buffers,
    so that they are saved with the model and resumed with it."""

    def __init__(self, num_classes: int, dim: int):
        super().__init__()
        self.register_buffer("image", torch.zeros(num_classes, dim))
        self.register_buffer("text", torch.zeros(num_classes, dim))
        self.register_buffer("ready", torch.zeros((), dtype=torch.bool))

    @torch.no_grad()
    def refresh(self, image: torch.Tensor, text: torch.Tensor) -> None:
        self.image.copy_(image)
        self.text.copy_(F.normalize(text.float(), dim=-1))
        self.ready.fill_(True)


class SampleMemory:
    """The latest f_image of every (image, class) sample of a split, one slot each.

    image_labels: 1-based foreground classes per image id, as image_labels.json holds them.
    Slots are laid out by image id in split order, then by the image's classes in label order
    (the order of `ssr.cam.class_slots`), so a micro-batch's valid slots map to memory slots
    without any device work. Memory: samples x E x 4 bytes (VOC train_aug: about 16k samples,
    32 MB at E = 512; COCO train: about 240k, 490 MB). State: `state_dict()`, for checkpoints.
    """

    def __init__(self, ids: list[str], image_labels: dict[str, list[int]], num_classes: int, dim: int, device=None):
        self.num_classes = num_classes
        self.offsets, start = {}, 0
        labels = []
        for image_id in ids:
            self.offsets[image_id] = start
            start += len(image_labels[image_id])
            labels += [c - 1 for c in image_labels[image_id]]
        self.labels = torch.tensor(labels, dtype=torch.long, device=device)
        self.features = torch.zeros(start, dim, device=device)
        self.filled = torch.zeros(start, dtype=torch.bool, device=device)

    def slots(self, ids: list[str], counts: list[int]) -> torch.Tensor:
        """(M,) long memory slots of the valid (image, slot) pairs of a batch, row-major; counts[b]: image b's classes."""
        return torch.tensor([self.offsets[i] + s for i, n in zip(ids, counts, strict=True) for s in range(n)],
                            dtype=torch.long, device=self.features.device)

    @torch.no_grad()
    def write(self, slots: torch.Tensor, features: torch.Tensor) -> None:
        """slots (M,) long, features (M, E): a later write to a slot replaces the earlier one (a slot twice in one
        write, an image seen at the end of one epoch and the start of the next in one step, keeps either)."""
        self.features[slots] = F.normalize(features.float(), dim=-1)
        self.filled[slots] = True

    def class_counts(self) -> torch.Tensor:
        """(K,) long: filled slots per class."""
        return torch.bincount(self.labels[self.filled], minlength=self.num_classes)

    def prototypes(self, fallback: torch.Tensor, kmeans_iters: int = 0) -> torch.Tensor:
        """P_I (K, E) from the filled slots; `image_prototypes` says how."""
        return image_prototypes(self.features[self.filled], self.labels[self.filled], fallback, kmeans_iters)

    def state_dict(self) -> dict:
        return {"features": self.features, "filled": self.filled}

    def load_state_dict(self, state: dict) -> None:
        if state["features"].shape != self.features.shape:
            raise ValueError(f"sample memory of {tuple(state['features'].shape)} does not fit {tuple(self.features.shape)}")
        self.features.copy_(state["features"])
        self.filled.copy_(state["filled"])


POSITIVES = ("class", "nearest_prototype")


def positive_index(rule: str, image_prototypes: torch.Tensor, features: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
    """pos_idx of Eq. 4-5 for features (M, E) of samples of classes (M,) -> (M,) long.

    "class" (the paper's constraint (1)): the text prototype of the sample's own class.
    "nearest_prototype" (our option): the class of the nearest image prototype (P_I (K, E)),
    which names another class wherever the prototypes are poorly separated.
    """
    if rule == "class":
        return classes
    if rule == "nearest_prototype":
        return (F.normalize(features.float(), dim=-1) @ F.normalize(image_prototypes.float(), dim=-1).T).argmax(dim=1)
    raise ValueError(f"unknown CMPA positive {rule!r}; expected one of {POSITIVES}")


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
    text_prototypes P_T / image_prototypes P_I (K, E); pos_idx (M,) each sample's positive.
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
