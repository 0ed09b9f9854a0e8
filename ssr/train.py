"""Single-stage SSR training: online SSR pseudo-labels supervise the decoder, L_proto trains
the CMPA heads; L = L_proto + gamma * (L_ce + w_aff * L_aff) (paper Eq. 12).

One optimiser step covers `accumulation` micro-batches on each of `world` processes and is
exactly the full batch's step: every loss is normalised by the whole step's count (valid
pixels for L_ce, same- and different-label pairs for L_aff, (image, class) samples for
L_proto), taken over micro-batches and ranks. So a step first runs the CAM pass of all its
micro-batches (which fixes the labels and so the counts), then the losses and backward passes.

Resumable: every `checkpoint_every` iterations and on SIGTERM the model, optimiser, RNG
states, iteration and training identity go to `checkpoint.pt` (tensors and plain Python
values only, loaded with weights_only=True); the data order is a pure function of
(seed, epoch), so a resumed run replays exactly the batches an uninterrupted one would
have seen. A finished run writes `model.safetensors` + `model.json` (ssr.checkpoint).
"""

from __future__ import annotations

import io
import math
import os
import random
import signal
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.data import DataLoader, Sampler

from ssr.cam import class_slots
from ssr.checkpoint import model_files, save_model
from ssr.cmpa import SampleMemory, masked_average_pool, positive_index, prototype_loss_term, sample_loss_sum
from ssr.config import ConfigError, Params, PresetParams, identity_differences, training_identity
from ssr.data.dataset import TrainCrops, collate
from ssr.data.layout import IGNORE_INDEX, DatasetError, DatasetLayout, atomic_path
from ssr.data.transforms import unit_images
from ssr.decoder import affinity_loss_sums, affinity_pairs, upsample_bilinear
from ssr.model import (
    SSR,
    FrozenBackbones,
    ModelDims,
    amp_dtype,
    autocast,
    batch_statistics,
    build_backbones,
    cams_to_labels,
    initial_cams,
    refined_cams,
)
from ssr.progress import Progress, progress_bar
from ssr.schedules import poly
from ssr.superpixels import check_region_maps


class NonFiniteLoss(RuntimeError):
    pass


class ResumableSampler(Sampler):
    """(epoch, index) pairs forever: epoch e is a permutation seeded by (seed, e).

    Starts at micro-batch `start` of the whole run and keeps rank `rank`'s share
    of every micro-batch, so resuming replays exactly the uninterrupted stream.
    """

    def __init__(self, size: int, micro: int, seed: int, start: int = 0, rank: int = 0, world: int = 1):
        self.size, self.micro, self.seed, self.start, self.rank, self.world = size, micro, seed, start, rank, world
        self.per_epoch = size // micro

    def __iter__(self):
        epoch, offset = divmod(self.start, self.per_epoch)
        while True:
            order = np.random.default_rng([self.seed, epoch]).permutation(self.size)
            for m in range(offset, self.per_epoch):
                for index in order[m * self.micro: (m + 1) * self.micro][self.rank::self.world]:
                    yield epoch, int(index)
            epoch, offset = epoch + 1, 0


# The summary's wall-clock entries: results/{ds}/timings/ keeps them, metrics and model.json do not.
TIMING_KEYS = ("train_seconds", "images_per_second")


@dataclass
class TrainState:
    iteration: int = 0
    images_seen: int = 0
    seconds: float = 0.0
    last_losses: dict = field(default_factory=dict)  # the last iteration's losses, for the summary after a resume


def lr_at(iteration: int, preset: PresetParams) -> float:
    """Linear warmup, then poly decay (power 0.9) towards zero at step `iterations`."""
    return poly(iteration, preset.iterations, preset.lr, warmup=preset.warmup)


def build_optimiser(model: SSR, preset: PresetParams) -> torch.optim.Optimizer:
    decoder = list(model.decoder.parameters())
    heads = [p for n, p in model.named_parameters() if not n.startswith("decoder.")]
    return torch.optim.AdamW(
        [{"params": heads, "lr_mult": 1.0}, {"params": decoder, "lr_mult": preset.decoder_lr_mult}],
        lr=preset.lr, weight_decay=preset.weight_decay)


# ---------------------------------------------------------------- RNG and checkpoints

def rng_state() -> dict:
    """Every RNG a run draws from, as tensors and plain values (safe to load with weights_only=True)."""
    version, mt, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": [version, list(mt), gauss],
             "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached],
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    version, mt, gauss = state["python"]
    random.setstate((version, tuple(mt), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(path: Path, model: SSR, optimiser, state: TrainState, identity: dict,
                    memory: SampleMemory | None = None) -> None:
    payload = {"model": model.state_dict(), "optimiser": optimiser.state_dict(), "state": asdict(state), "rng": rng_state(),
               "identity": identity}
    if memory is not None:
        payload["memory"] = memory.state_dict()
    # Serialised in memory first: torch's own file writer reports a full disk as "unexpected pos".
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    try:
        with atomic_path(path) as tmp:
            tmp.write_bytes(buffer.getbuffer())
    except OSError as err:
        kept = "the last checkpoint, of an earlier iteration, is kept" if path.exists() else "no checkpoint is kept"
        raise RuntimeError(f"{path}: cannot write the checkpoint ({err.strerror}); {kept}. Free disk space and rerun "
                           f"`ssr train --resume`") from None


def load_checkpoint(path: Path, identity: dict, device) -> dict:
    """The resume checkpoint, refused with the differing keys if written under other params."""
    try:
        ckpt = torch.load(path, map_location=device, weights_only=True)
    except Exception as err:  # a truncated or foreign file: torch raises several error types
        raise ConfigError(f"{path}: not a readable ssr checkpoint ({type(err).__name__}: {err}); "
                          f"delete it to start the run over") from err
    differences = identity_differences(ckpt.get("identity", {}), identity)
    if differences:
        raise ConfigError(f"{path}: written under other params: {'; '.join(differences)}. "
                          f"Restore them to resume, or delete the checkpoint to start over")
    return ckpt


# ---------------------------------------------------------------- one optimiser step

@dataclass
class MicroBatch:
    """One micro-batch after its CAM pass: everything the losses need, nothing with a graph."""
    tokens: list[torch.Tensor]   # depth - 1 blocks of (B, 1 + N, D), the decoder's input
    grid: tuple[int, int]
    labels: torch.Tensor         # (B, H, W) long: online pseudo-labels, or true masks (supervision "gt")
    patch_labels: torch.Tensor   # (B, N) long, for the affinity loss
    cam: torch.Tensor            # (B, S, N) GradCAM, Eq. 2's pooling weights
    dense: torch.Tensor          # (B, N, E) CLIP patch embeddings
    classes: torch.Tensor        # (B, S)
    valid: torch.Tensor          # (B, S)
    ids: list[str]               # the images, for their CMPA samples' memory slots
    counts: list[int]            # classes per image: the valid slots of each row of `valid`


def patch_labels(labels: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """(B, H, W) pixel labels -> (B, h * w) patch labels by nearest sampling at patch centres."""
    return F.interpolate(labels[:, None].float(), size=grid, mode="nearest")[:, 0].long().flatten(1)


def prepare_micro_batch(backbones: FrozenBackbones, model: SSR, batch: dict, params: Params, *, num_regions: int,
                        par: bool, autocast_dtype=None) -> MicroBatch:
    """The CAM pass of one micro-batch: refined CAMs -> the labels the decoder learns from."""
    device = backbones.text.device
    fast = params.train.fast_path
    images = unit_images(batch["image"], device)       # uint8 crops (TrainCrops' compact) become float here
    classes, valid = class_slots(batch["labels"], device)
    cam = refined_cams(backbones, model, images, classes, valid, batch["regions"].to(device, non_blocking=True), params.affinity,
                       params.sgc, num_regions=num_regions, rows=(), autocast_dtype=autocast_dtype, fast=fast)
    if params.train.supervision == "gt":
        labels = batch["gt"].to(device, non_blocking=True).long()
    else:
        labels = cams_to_labels(cam.method, classes, valid, cam.grid, images.shape[-2:], params.pseudo_labels,
                                images=images, par=par, fast=fast)
    return MicroBatch([t.detach() for t in cam.visual.tokens[: backbones.depth - 1]], cam.grid, labels,
                      patch_labels(labels, cam.grid), cam.cam.detach(), cam.visual.dense.detach().float(), classes, valid,
                      list(batch["id"]), [len(present) for present in batch["labels"]])


def step_counts(micro: list[MicroBatch], device) -> torch.Tensor:
    """(4,) float64: valid pixels, same-label pairs, different-label pairs, (image, class) samples of this rank's step."""
    counts = torch.zeros(4, dtype=torch.float64, device=device)
    for m in micro:
        same, diff = affinity_pairs(m.patch_labels)
        counts += torch.stack([(m.labels != IGNORE_INDEX).sum(), same.sum(), diff.sum(), m.valid.sum()]).double()
    return counts


def micro_batch_loss(backbones: FrozenBackbones, model: SSR, m: MicroBatch, params: Params, preset: PresetParams,
                     counts: torch.Tensor, *, autocast_dtype=None) -> tuple[torch.Tensor, dict]:
    """This micro-batch's share of the step loss: its sums divided by the whole step's counts.

    Returns the loss (not yet backpropagated) and its parts; parts["f_image"] holds the samples'
    f_image (M, d2), row-major over the valid slots, for the sample memory.
    """
    n_pixels, n_same, n_diff, n_samples = (c.clamp_min(1).float() for c in counts)
    with autocast(m.labels.device.type, autocast_dtype):
        logits, feats = model.decoder(m.tokens, m.grid)
    if params.train.fast_path:
        logits = upsample_bilinear(logits.float(), m.labels.shape[-2:])
    else:
        logits = F.interpolate(logits.float(), size=m.labels.shape[-2:], mode="bilinear", align_corners=False)
    loss_ce = F.cross_entropy(logits, m.labels, ignore_index=IGNORE_INDEX, reduction="sum") / n_pixels
    loss_aff = logits.new_zeros(())
    if params.train.affinity_loss:
        pos, neg = affinity_loss_sums(feats, m.patch_labels)
        loss_aff = (pos / n_same + neg / n_diff) / 2
    loss = preset.gamma * (loss_ce + preset.affinity_weight * loss_aff)
    parts = {"loss_ce": loss_ce.detach(), "loss_aff": loss_aff.detach()}
    if model.use_cmpa:
        loss_proto, f_image, slot_valid = prototype_loss_share(backbones, model, m, params, n_samples,
                                                               masked=params.train.fast_path)
        loss = loss + loss_proto
        parts.update(loss_proto=loss_proto.detach(), f_image=f_image)
        if slot_valid is not None:
            parts["slot_valid"] = slot_valid
    return loss, parts


def prototype_loss_share(backbones: FrozenBackbones, model: SSR, m: MicroBatch, params: Params, n_samples: torch.Tensor,
                         *, masked: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """`micro_batch_loss`'s L_proto share (Eq. 2-6) -> (loss share, f_image detached, valid slots or None).

    The valid slots are selected (f_image (M, d2), valid None), which waits for the device; or,
    `masked` (the fast path), every slot is kept with the padded ones weighted 0 (f_image
    (B * S, d2), valid (B * S,)): padded slots pool an all-zero CAM, so their f_image is 0 and
    their loss finite.
    """
    f_image = masked_average_pool(model.isa(m.dense), m.cam)                          # (B, S, d2), Eq. 2
    if masked:
        f_image, labels, valid = f_image.flatten(0, 1), m.classes.flatten(), m.valid.flatten()
    else:
        f_image, labels, valid = f_image[m.valid], m.classes[m.valid], None
    text = model.tsa(backbones.text[: backbones.num_foreground])                      # (C, d2): each class's f_text
    text_prototypes = text if params.cmpa.text_prototypes == "live" else model.prototypes.text
    pos_idx = positive_index(params.cmpa.positive, model.prototypes.image, f_image.detach(), labels)
    loss = sample_loss_sum(model.cmpa_loss, f_image, text[labels], text_prototypes, model.prototypes.image, pos_idx,
                           model.tau(), weight=None if valid is None else valid.float()) / n_samples
    return loss, f_image.detach(), valid


def prototype_step_loss(backbones: FrozenBackbones, model: SSR, world: int) -> torch.Tensor | None:
    """The step's prototype-level term (`cmpa.prototype_loss_term`), once per step; divided by `world`
    since the ranks' gradients are summed. None when the CMPA loss has no such term."""
    text = model.tsa(backbones.text[: backbones.num_foreground])
    term = prototype_loss_term(model.cmpa_loss, text, model.prototypes.image, model.tau())
    return None if term is None else term / world


def optimiser_step(backbones: FrozenBackbones, model: SSR, optimiser, batches: list[dict], params: Params, preset: PresetParams,
                   *, lr: float, par: bool = False, autocast_dtype=None, world: int = 1, iteration: int = 0,
                   ckpt_path: Path | None = None, memory: SampleMemory | None = None) -> dict:
    """One optimiser step over this rank's micro-batches (a list of collated batches).

    CAM passes first (they fix the labels and so the step's counts, summed over ranks), then
    each micro-batch's loss share and backward, the step's prototype term, the gradient sum
    over ranks, a finiteness check, the update, the sample memory and, every `refresh_every`
    iterations, the prototypes. Returns the step's losses and lr.
    """
    device = backbones.text.device
    for group in optimiser.param_groups:
        group["lr"] = lr * group["lr_mult"]
    optimiser.zero_grad(set_to_none=True)
    micro = [prepare_micro_batch(backbones, model, batch, params, num_regions=params.superpixels.n_clusters, par=par,
                                 autocast_dtype=autocast_dtype) for batch in batches]
    counts = _all_reduce(step_counts(micro, device))
    totals = torch.zeros(4, dtype=torch.float64, device=device)  # loss, ce, aff, proto
    samples = []  # (micro-batch, f_image, which of its rows are valid slots or None), for the sample memory
    seen = []
    last_good = _last_good(ckpt_path) if ckpt_path is not None else "no checkpoint"
    for m in micro:
        loss, parts = micro_batch_loss(backbones, model, m, params, preset, counts, autocast_dtype=autocast_dtype)
        if params.train.fast_path:      # checked once, with the gradients, before the update
            seen.append((loss.detach(), parts))
        elif not torch.isfinite(loss):
            raise_non_finite_loss(loss, parts, iteration, last_good)
        loss.backward()
        if "f_image" in parts and memory is not None:
            samples.append((m, parts["f_image"], parts.get("slot_valid")))
        proto = parts.get("loss_proto", loss.new_zeros(()))
        totals += torch.stack([loss.detach(), parts["loss_ce"], parts["loss_aff"], proto]).double()
    term = prototype_step_loss(backbones, model, world) if model.use_cmpa and params.cmpa.text_prototype_term else None
    if term is not None:
        term.backward()
        totals[0] += term.detach().double()
        totals[3] += term.detach().double()
    sum_gradients(model)
    bad = non_finite_gradients(model, [loss for loss, _ in seen])
    if bad == [NON_FINITE_LOSS]:
        raise_non_finite_loss(*next((loss, parts) for loss, parts in seen if not torch.isfinite(loss)), iteration, last_good)
    if bad:
        # Checked before the step: a finite loss can still back-propagate NaN/inf (overflow),
        # and once the optimiser writes it into the weights the next checkpoint would save it.
        raise NonFiniteLoss(
            f"non-finite gradient in {', '.join(bad[:5])}{' ...' if len(bad) > 5 else ''} at iteration {iteration} "
            f"(loss {totals[0].item():.4g}); {last_good}")
    optimiser.step()
    if samples:
        # the memory's slots come from the host; the fast path's f_image holds every slot, the valid ones are
        # taken here, after the update (a device sync, once per step)
        slots = torch.cat([memory.slots(m.ids, m.counts) for m, _, _ in samples])
        f_image = torch.cat([f if valid is None else f[valid] for _, f, valid in samples])
        memory.write(_all_gather(slots), _all_gather(f_image))
        if (iteration + 1) % preset.refresh_every == 0:
            refresh_prototypes(backbones, model, memory, params)
    totals = _all_reduce(totals)
    losses = dict(zip(("loss", "loss_ce", "loss_aff", "loss_proto"), totals.tolist(), strict=True))
    if model.use_cmpa:
        losses["tau"] = float(model.tau().detach())
    else:
        losses.pop("loss_proto")
    return {**losses, "lr": lr}


# ---------------------------------------------------------------- prototypes before the first step

@torch.no_grad()
def warm_up_prototypes(backbones: FrozenBackbones, model: SSR, memory: SampleMemory, loader, params: Params, *,
                       max_batches: int) -> int:
    """Fill the sample memory with one pass over the split, then build the first prototypes.

    `max_batches` micro-batches are read (the caller's pass over the split, rounded up to whole
    micro-batches: the last may reach into the next epoch, which only refreshes some slots). f_image
    is pooled as the training loss pools it (Eq. 2 over the heads' output with BatchNorm in train
    mode), without moving the running statistics, which are the training steps' to set.
    Returns the number of micro-batches read.
    """
    device = backbones.text.device
    read = 0
    for batch in loader:
        images = unit_images(batch["image"], device)
        classes, valid = class_slots(batch["labels"], device)
        cam, visual = initial_cams(backbones, model, images, classes, valid, attn_blocks=0, fast=params.train.fast_path)
        with batch_statistics(model.isa):
            f_image = masked_average_pool(model.isa(visual.dense.detach().float()), cam.detach())[valid]
        slots = memory.slots(list(batch["id"]), [len(present) for present in batch["labels"]])
        memory.write(_all_gather(slots), _all_gather(f_image))
        read += 1
        if read >= max_batches:
            break
    refresh_prototypes(backbones, model, memory, params)
    return read


@torch.no_grad()
def refresh_prototypes(backbones: FrozenBackbones, model: SSR, memory: SampleMemory, params: Params) -> None:
    """P_I from the sample memory, and P_T's snapshot: the projected prompts as the loss sees them
    (TSA with BatchNorm in train mode, running statistics untouched). A class without stored
    features keeps its last image prototype, or before the first refresh its projected prompt."""
    with batch_statistics(model.tsa):
        text = model.adapt_text(backbones.text[: backbones.num_foreground]).float()
    fallback = model.prototypes.image if bool(model.prototypes.ready) else text
    model.prototypes.refresh(memory.prototypes(fallback, params.cmpa.kmeans_iters), text)


# ---------------------------------------------------------------- distributed helpers

def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def _all_gather(x: torch.Tensor) -> torch.Tensor:
    if not _distributed():
        return x
    sizes = [torch.zeros((), dtype=torch.long, device=x.device) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, torch.tensor(len(x), device=x.device))
    padded = torch.zeros(int(max(sizes)), *x.shape[1:], dtype=x.dtype, device=x.device)
    padded[: len(x)] = x
    out = [torch.zeros_like(padded) for _ in sizes]
    dist.all_gather(out, padded)
    return torch.cat([o[: int(n)] for o, n in zip(out, sizes, strict=True)])


def _all_reduce(x: torch.Tensor) -> torch.Tensor:
    if _distributed():
        dist.all_reduce(x)
    return x


def sum_gradients(model: SSR) -> None:
    """Sum gradients across ranks: each rank's losses are already divided by the global counts.

    One flat all-reduce over every trainable parameter: a parameter without a gradient on one
    rank (an absent class, say) contributes zeros rather than leaving the collectives out of step.
    One without a gradient on every rank keeps none, as in a single process, so the optimiser
    skips it (AdamW would otherwise decay it and move its moments).
    """
    if not _distributed():
        return
    params = [p for p in model.parameters() if p.requires_grad]
    grads = [(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params]
    # Which ranks had a gradient rides along as a count per parameter, in the same collective.
    has_grad = torch.tensor([p.grad is not None for p in params], dtype=grads[0].dtype, device=grads[0].device)
    flat = torch.cat([*grads, has_grad])
    dist.all_reduce(flat)
    counts = flat[-len(params):].tolist()
    offset = 0
    for p, ranks_with_grad in zip(params, counts, strict=True):
        p.grad = flat[offset:offset + p.numel()].view_as(p).clone() if ranks_with_grad else None
        offset += p.numel()


def _check_ranks_agree(model: SSR) -> None:
    """Every rank must hold the same weights after training; a difference means the gradient sync failed."""
    if not _distributed():
        return
    sums = torch.stack([p.detach().double().sum() for p in model.parameters()])
    low, high = sums.clone(), sums.clone()
    dist.all_reduce(low, op=dist.ReduceOp.MIN)
    dist.all_reduce(high, op=dist.ReduceOp.MAX)
    if not torch.equal(low, high):
        raise RuntimeError("DDP ranks ended with different weights; gradient synchronisation failed")


def setup_distributed() -> tuple[int, int, torch.device]:
    """torchrun sets WORLD_SIZE/RANK/LOCAL_RANK; without them this is a single process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend)
    rank = dist.get_rank() if world > 1 else 0
    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        return rank, world, torch.device("cuda", local)
    return rank, world, torch.device("cpu")


NON_FINITE_LOSS = "(a micro-batch's loss)"


def non_finite_gradients(model, losses: list[torch.Tensor] = ()) -> list[str]:
    """Names of the parameters whose gradient holds NaN or inf (one device sync when all are finite).

    `losses`: scalars checked in the same sync; if one is not finite the answer is [NON_FINITE_LOSS].
    """
    named = [(n, p.grad) for n, p in model.named_parameters() if p.grad is not None]
    checks = [torch.isfinite(g).all() for _, g in named] + [torch.isfinite(loss) for loss in losses]
    finite = torch.stack(checks).tolist() if checks else []
    if all(finite):
        return []
    if not all(finite[len(named):]):
        return [NON_FINITE_LOSS]
    return [n for (n, _), ok in zip(named, finite, strict=False) if not ok]


def raise_non_finite_loss(loss: torch.Tensor, parts: dict, iteration: int, last_good: str) -> None:
    raise NonFiniteLoss(
        f"non-finite loss ({loss.item()}) at iteration {iteration} "
        f"({', '.join(f'{k}={v.item():.4g}' for k, v in parts.items() if v.dim() == 0)}); {last_good}")


def _last_good(ckpt_path: Path) -> str:
    return f"the last good checkpoint is {ckpt_path if ckpt_path.exists() else 'none yet'}"


# ---------------------------------------------------------------- the run

class Trainer:
    """One training run (dataset, params, seed) into `out_dir`; state lives here between steps."""

    def __init__(self, params: Params, dataset: str, out_dir: str | Path, *, seed: int, run: str, device,
                 backbones: FrozenBackbones,
                 rank: int, world: int, progress: bool | Progress):
        self.params, self.dataset, self.seed, self.run = params, dataset, seed, run
        self.rank, self.world, self.device, self.backbones = rank, world, device, backbones
        self.ds, self.preset = params.dataset(dataset), params.preset(dataset)
        self.out_dir = Path(out_dir)
        self.ckpt_path = self.out_dir / "checkpoint.pt"
        self.identity = {**training_identity(params, dataset), "seed": seed}
        self.progress = progress if rank == 0 else False  # keeps a Progress (its interval) on rank 0
        self.autocast_dtype = amp_dtype(params.train, device)
        self.par = self.ds.par and params.train.supervision == "pseudo"
        root = params.dataset_root(dataset)
        self.data = TrainCrops(root, self.ds.train_split, crop_size=self.preset.crop_size, scale_min=self.preset.scale_min,
                               scale_max=self.preset.scale_max, superpixels=root / "superpixels.h5", seed=seed,
                               with_gt=params.train.supervision == "gt", compact=params.train.fast_path,
                               cache_dir=Path(params.results_root) / dataset / "decoded" if params.train.decode_cache else None)
        self.micro = self.preset.batch_size // self.preset.accumulation
        if self.micro % world:
            raise ValueError(f"train_presets.{self.ds.preset}: micro-batch {self.micro} is not divisible by {world} processes")
        check_region_maps(self.data.superpixels, params.superpixels, self.data.ids)
        if len(self.data) < self.micro:
            raise ValueError(f"{root}: split {self.ds.train_split!r} has {len(self.data)} images, "
                             f"fewer than one micro-batch of {self.micro}")
        torch.manual_seed(seed)
        self.model = SSR(ModelDims.of(backbones), params.cmpa).to(device)
        self.optimiser = build_optimiser(self.model, self.preset)
        self.state = TrainState()
        self.memory = None
        if self.model.use_cmpa:
            self.memory = SampleMemory(self.data.ids, self.data.labels, backbones.num_foreground,
                                       self.model.prototypes.image.shape[1], device)

    def loader(self, start: int) -> DataLoader:
        # The loader draws its workers' base seed from its own generator, not the global torch RNG: a draw
        # from the global RNG here would land after the checkpoint's RNG state is restored on resume and
        # shift the stream relative to an uninterrupted run.
        sampler = ResumableSampler(len(self.data), self.micro, self.seed, start, self.rank, self.world)
        return DataLoader(self.data, batch_size=self.micro // self.world, sampler=sampler,
                          num_workers=self.params.train.num_workers, pin_memory=self.device.type == "cuda",
                          collate_fn=collate, generator=torch.Generator().manual_seed(self.seed))

    def resume(self) -> None:
        if not self.ckpt_path.exists():
            self.log(f"no checkpoint at {self.ckpt_path}; starting from iteration 0")
            return
        ckpt = load_checkpoint(self.ckpt_path, self.identity, self.device)
        self.model.load_state_dict(ckpt["model"])
        self.optimiser.load_state_dict(ckpt["optimiser"])
        if self.memory is not None:
            self.memory.load_state_dict(ckpt["memory"])
        self.state = TrainState(**ckpt["state"])
        set_rng_state(ckpt["rng"])
        self.log(f"resuming {self.dataset} ({self.run}, seed {self.seed}) from {self.ckpt_path} "
                 f"at iteration {self.state.iteration}")

    def log(self, message: str) -> None:
        if self.rank == 0:
            print(message, file=sys.stderr)

    def step(self, batches) -> dict:
        """One optimiser step over the next `accumulation` micro-batches; returns its losses and lr."""
        lr = lr_at(self.state.iteration, self.preset)
        return optimiser_step(self.backbones, self.model, self.optimiser,
                              [next(batches) for _ in range(self.preset.accumulation)],
                              self.params, self.preset, lr=lr, par=self.par, autocast_dtype=self.autocast_dtype, world=self.world,
                              iteration=self.state.iteration, ckpt_path=self.ckpt_path, memory=self.memory)


def train(params: Params, dataset: str, out_dir: str | Path, *, seed: int = 0, run: str = "method", resume: bool = False,
          device=None, backbones: FrozenBackbones | None = None, stop_after: int | None = None, progress: bool | Progress = True,
          demo_clip_dir: str | Path | None = None, demo_dino_dir: str | Path | None = None) -> dict:
    """Train SSR on `dataset` with `seed`; writes out_dir/{model.safetensors, model.json, checkpoint.pt, dvclive/}.

    `params` as params.yaml gives them: the dataset's overrides and then the run's variant are
    applied here (`Params.for_run`; params that already carry them are fine). `stop_after` ends the
    run (with a checkpoint) after that many iterations, as an interruption would; `resume`
    continues from out_dir/checkpoint.pt when one exists. Returns the summary.
    """
    torch.backends.cudnn.benchmark = True
    params = params.for_run(dataset, run)
    rank, world, auto_device = setup_distributed()
    device = torch.device(device) if device is not None else auto_device
    root = params.dataset_root(dataset)
    if backbones is None:
        backbones = build_backbones(params.dataset(dataset), DatasetLayout(root).classes()[1:], device=device,
                                    demo_clip_dir=demo_clip_dir, demo_dino_dir=demo_dino_dir)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    trainer = Trainer(params, dataset, out_dir, seed=seed, run=run, device=device, backbones=backbones, rank=rank, world=world,
                      progress=progress)
    if resume:
        trainer.resume()
    else:
        if trainer.ckpt_path.exists():
            trainer.log(f"starting over without --resume: {trainer.ckpt_path} will be replaced")
        # An earlier run's model must not pass for this one's if this one stops early.
        for stale in model_files(out_dir):
            stale.unlink(missing_ok=True)
    try:
        return _run(trainer, stop_after)
    except DatasetError as err:
        worker_error = _worker_error(err)
        if worker_error is err:
            raise
        raise worker_error from None


def _worker_error(err: DatasetError) -> DatasetError:
    """A DataLoader worker's DatasetError as the worker raised it.

    torch re-raises a worker's error in the main process with the worker's whole traceback
    as its message; the message the worker raised is the last line, after the error's name.
    """
    lines = str(err).strip().splitlines()
    if len(lines) < 2 or "DataLoader worker" not in lines[0]:
        return err
    return DatasetError(lines[-1].split(": ", 1)[-1])


def _run(trainer: Trainer, stop_after: int | None) -> dict:
    params, preset, state, model = trainer.params, trainer.preset, trainer.state, trainer.model
    if model.use_cmpa and not bool(model.prototypes.ready):
        read = warm_up_prototypes(trainer.backbones, model, trainer.memory, trainer.loader(0), params,
                                  max_batches=math.ceil(len(trainer.data) / trainer.micro))
        counts = trainer.memory.class_counts().tolist()
        trainer.log(f"prototypes built from {read} micro-batches: {counts} features per class")

    stop = {"signal": False}
    # Every rank stops at the same iteration boundary (the flag is all-reduced below), so none is
    # left waiting in a collective while another exits.
    previous = signal.signal(signal.SIGTERM, lambda *_: stop.update(signal=True))
    live = _open_live(trainer) if trainer.rank == 0 else None
    batches = iter(trainer.loader(state.iteration * preset.accumulation))
    end = preset.iterations if stop_after is None else min(preset.iterations, stop_after)
    first = state.iteration
    bar = progress_bar(total=preset.iterations, initial=first, desc=f"train {trainer.dataset} {trainer.run} seed {trainer.seed}",
                       progress=trainer.progress)
    model.train()
    tic = run_start = time.time()
    try:
        while state.iteration < end:
            losses = trainer.step(batches)
            state.iteration += 1
            state.images_seen += preset.batch_size
            state.last_losses = {k: v for k, v in losses.items() if k != "lr"}
            bar.set_postfix(_progress_fields(losses, (state.iteration - first) * preset.batch_size
                                             / max(time.time() - run_start, 1e-6), trainer.device), refresh=False)
            bar.update(1)
            if live is not None and state.iteration % params.train.log_every == 0:
                live.step = state.iteration  # before logging: log_metric records the current step
                for k, v in losses.items():
                    live.log_metric(f"train/{k}", v)
                live.next_step()
            if trainer.world > 1:
                stop["signal"] = bool(_all_reduce(torch.tensor([float(stop["signal"])], device=trainer.device)).item())
            if trainer.rank == 0 and (state.iteration % params.train.checkpoint_every == 0 or stop["signal"]):
                state.seconds += time.time() - tic
                tic = time.time()
                save_checkpoint(trainer.ckpt_path, model, trainer.optimiser, state, trainer.identity, trainer.memory)
            if stop["signal"]:
                raise KeyboardInterrupt(f"SIGTERM: checkpoint written at iteration {state.iteration} to {trainer.ckpt_path}")
    finally:
        bar.close()
        signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)
        if live is not None:
            live.end()

    _check_ranks_agree(model)
    state.seconds += time.time() - tic
    summary = {"iterations": state.iteration, "images_seen": state.images_seen, "train_seconds": round(state.seconds, 1),
               "images_per_second": round(state.images_seen / max(state.seconds, 1e-6), 2),
               **{f"final_{k}": round(v, 5) for k, v in state.last_losses.items()}}
    if trainer.rank == 0:
        save_checkpoint(trainer.ckpt_path, model, trainer.optimiser, state, trainer.identity, trainer.memory)
        if state.iteration >= preset.iterations:
            # wall times stay out of the product, so a rerun's model.json (a DVC output) has the same bytes
            save_model(trainer.out_dir, model, params, trainer.dataset, classes=trainer.data.classes, seed=trainer.seed,
                       run=trainer.run, summary={k: v for k, v in summary.items() if k not in TIMING_KEYS})
    return summary


def _progress_fields(losses: dict, images_per_second: float, device) -> dict:
    """What a progress line or bar shows after the iteration count: every loss, tau, lr, images/s, peak GPU memory."""
    fields = {k: f"{v:.4g}" for k, v in losses.items()}
    fields["images/s"] = f"{images_per_second:.1f}"
    if torch.device(device).type == "cuda":
        fields["peak GPU memory"] = f"{torch.cuda.max_memory_allocated(device) / 2**30:.1f} GiB"
    return fields


def _open_live(trainer: Trainer):
    from dvclive import Live

    if trainer.state.iteration > 0:
        _drop_curve_rows_after(trainer.out_dir / "dvclive", trainer.state.iteration)
    try:
        return Live(dir=str(trainer.out_dir / "dvclive"), resume=trainer.state.iteration > 0, save_dvc_exp=False, dvcyaml=None,
                    report=None)
    except Exception as err:  # dvclive fails inside a git repo that has no commit yet (scmrepo "Empty git repo")
        print(f"warning: dvclive disabled ({type(err).__name__}: {err}); commit once to get training curves", file=sys.stderr)
        (trainer.out_dir / "dvclive").mkdir(exist_ok=True)
        return None


def _drop_curve_rows_after(folder: Path, iteration: int) -> None:
    """Drop the curve rows of steps after `iteration`, the checkpoint a run resumes from: a run killed
    past its last checkpoint (SIGKILL, a crash) logged them, and the resumed run logs them again."""
    for tsv in (folder / "plots" / "metrics").rglob("*.tsv"):
        lines = tsv.read_text().splitlines(keepends=True)
        step = lines[0].rstrip("\n").split("\t").index("step") if lines else 0
        kept = lines[:1] + [line for line in lines[1:] if int(line.split("\t")[step]) <= iteration]
        if len(kept) < len(lines):
            with atomic_path(tsv) as tmp:
                tmp.write_text("".join(kept))
