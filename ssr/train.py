"""Single-stage SSR training (DESIGN 4.5): online SSR pseudo-labels supervise the decoder,
L_proto trains the CMPA heads; L = L_proto + gamma * (L_ce + w_aff * L_aff).

Resumable: every `checkpoint_every` iterations and on SIGTERM the model,
optimiser, RNG states and iteration go to `checkpoint.pt`; the data order is a
pure function of (seed, epoch), so a resumed run replays exactly the batches
an uninterrupted one would have seen.
"""

from __future__ import annotations

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
from torch import nn
from torch.utils.data import DataLoader, Sampler
from tqdm import tqdm

from ssr.cam import class_slots
from ssr.cmpa import masked_average_pool, prototype_loss
from ssr.config import Params, PresetParams
from ssr.data.dataset import TrainCrops, collate
from ssr.data.layout import IGNORE_INDEX, atomic_path
from ssr.decoder import affinity_loss
from ssr.model import SSR, FrozenBackbones, build_backbones, cams_to_labels, refined_cams


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


@dataclass
class TrainState:
    iteration: int = 0
    images_seen: int = 0
    seconds: float = 0.0
    last_losses: dict = field(default_factory=dict)  # the last iteration's losses, for the summary after a resume


def lr_at(iteration: int, preset: PresetParams) -> float:
    """Linear warmup, then poly decay (power 0.9) to zero at the last iteration."""
    if iteration < preset.warmup:
        return preset.lr * (iteration + 1) / preset.warmup
    progress = (iteration - preset.warmup) / max(1, preset.iterations - preset.warmup)
    return preset.lr * (1 - min(progress, 1.0)) ** 0.9


def build_optimiser(model: SSR, preset: PresetParams) -> torch.optim.Optimizer:
    decoder = list(model.decoder.parameters())
    heads = [p for n, p in model.named_parameters() if not n.startswith("decoder.")]
    return torch.optim.AdamW(
        [{"params": heads, "lr_mult": 1.0}, {"params": decoder, "lr_mult": preset.decoder_lr_mult}],
        lr=preset.lr, weight_decay=preset.weight_decay)


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(path: Path, model: SSR, optimiser, state: TrainState, meta: dict) -> None:
    payload = {"model": model.state_dict(), "optimiser": optimiser.state_dict(), "state": asdict(state), "rng": rng_state(), "meta": meta}
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)


def patch_labels(labels: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """(B, H, W) pixel labels -> (B, h * w) patch labels by nearest sampling at patch centres."""
    return F.interpolate(labels[:, None].float(), size=grid, mode="nearest")[:, 0].long().flatten(1)


def train_step(backbones: FrozenBackbones, model: SSR, batch: dict, params: Params, preset: PresetParams,
               *, num_regions: int, autocast_dtype=None) -> tuple[torch.Tensor, dict]:
    """One micro-batch: returns the loss (not yet backpropagated) and its parts."""
    device = backbones.text.device
    images = batch["image"].to(device, non_blocking=True)
    regions = batch["regions"].to(device, non_blocking=True)
    classes, valid = class_slots(batch["labels"], device)
    cam = refined_cams(backbones, model, images, classes, valid, regions, params.affinity, params.sgc,
                       num_regions=num_regions, rows=(), autocast_dtype=autocast_dtype)
    pseudo = cams_to_labels(cam.method, classes, valid, cam.grid, images.shape[-2:], bg_power=params.pseudo_labels.bg_power,
                            ignore_low=params.pseudo_labels.ignore_low, ignore_high=params.pseudo_labels.ignore_high)

    amp = torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype else torch.autocast(device.type, enabled=False)
    tokens = [t.detach() for t in cam.visual.tokens[: backbones.depth - 1]]
    with amp:
        logits, feats = model.decoder(tokens, cam.grid)
    logits = F.interpolate(logits.float(), size=images.shape[-2:], mode="bilinear", align_corners=False)
    loss_ce = F.cross_entropy(logits, pseudo, ignore_index=IGNORE_INDEX)
    loss_aff = affinity_loss(feats, patch_labels(pseudo, cam.grid)) if params.train.affinity_loss else logits.new_zeros(())
    loss = preset.gamma * (loss_ce + preset.affinity_weight * loss_aff)
    parts = {"loss_ce": loss_ce.detach(), "loss_aff": loss_aff.detach()}

    if model.use_cmpa:
        dense = model.isa(cam.visual.dense.detach().float())                       # (B, N, E)
        pooled = masked_average_pool(dense, cam.method)[valid]                    # (M, E)
        labels = classes[valid]
        text = model.tsa(backbones.text[: backbones.num_foreground])              # (C, E)
        pos_idx = model.bank.assign(pooled.detach()) if bool(model.bank.ready) else labels
        symmetric = {"text_features": text[labels], "image_prototypes": model.bank.image_prototypes} if params.cmpa.symmetric and bool(model.bank.ready) else {}
        loss_proto = prototype_loss(pooled, model.bank.text_prototypes(text), pos_idx, model.tau(), **symmetric)
        loss = loss + loss_proto
        parts.update(loss_proto=loss_proto.detach(), tau=model.tau().detach(), _bank=(pooled.detach(), labels, text.detach()))
    return loss, parts


def non_finite_gradients(model: nn.Module) -> list[str]:
    """Names of the parameters whose gradient holds NaN or inf (one device sync when all are finite)."""
    named = [(n, p.grad) for n, p in model.named_parameters() if p.grad is not None]
    if not named or bool(torch.stack([torch.isfinite(g).all() for _, g in named]).all()):
        return []
    return [n for n, g in named if not bool(torch.isfinite(g).all())]


def _last_good(ckpt_path: Path) -> str:
    return f"the last good checkpoint is {ckpt_path if ckpt_path.exists() else 'none yet'}"


def _all_gather(x: torch.Tensor) -> torch.Tensor:
    if not (dist.is_available() and dist.is_initialized()):
        return x
    sizes = [torch.zeros((), dtype=torch.long, device=x.device) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, torch.tensor(len(x), device=x.device))
    padded = torch.zeros(int(max(sizes)), *x.shape[1:], dtype=x.dtype, device=x.device)
    padded[: len(x)] = x
    out = [torch.zeros_like(padded) for _ in sizes]
    dist.all_gather(out, padded)
    return torch.cat([o[: int(n)] for o, n in zip(out, sizes)])


def _sync_gradients(model: SSR) -> None:
    """Average gradients across ranks (the DDP reduction, done explicitly because the
    training step calls the model's parts rather than one forward).

    One flat all-reduce over every trainable parameter: a parameter without a gradient on
    one rank (an absent class, say) contributes zeros rather than leaving the ranks'
    collectives out of step.
    """
    if not (dist.is_available() and dist.is_initialized()):
        return
    params = [p for p in model.parameters() if p.requires_grad]
    flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params])
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    offset = 0
    for p in params:
        p.grad = flat[offset:offset + p.numel()].view_as(p).clone()
        offset += p.numel()


def _check_ranks_agree(model: SSR) -> None:
    """Every rank must hold the same weights after training; a difference means the gradient sync failed."""
    if not (dist.is_available() and dist.is_initialized()):
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


def train(params: Params, dataset: str, out_dir: str | Path, *, resume: bool = False, device=None,
          backbones: FrozenBackbones | None = None, stop_after: int | None = None, progress: bool = True,
          demo_clip_dir: str | Path | None = None) -> dict:
    """Train SSR on `dataset`; writes out_dir/{model.pt, checkpoint.pt, dvclive/} and returns the summary.

    `stop_after` ends the run (with a checkpoint) after that many iterations, as
    an interruption would; `resume` continues from out_dir/checkpoint.pt.
    """
    torch.backends.cudnn.benchmark = True
    rank, world, auto_device = setup_distributed()
    device = torch.device(device) if device is not None else auto_device
    ds = params.dataset(dataset)
    preset = params.preset(dataset)
    root = params.dataset_root(dataset)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    ckpt_path, model_path = out_dir / "checkpoint.pt", out_dir / "model.pt"
    seed = params.demo.seed

    torch.manual_seed(seed)
    data = TrainCrops(root, ds.train_split, crop_size=preset.crop_size, scale_min=preset.scale_min,
                      scale_max=preset.scale_max, superpixels=root / "superpixels.h5", seed=seed)
    if backbones is None:
        backbones = build_backbones(ds, data.classes[1:], demo_clip_dir=demo_clip_dir or Path(params.demo_clip.checkpoint).parent, device=device)
    dims = decoder_dims(preset, backbones)
    model = SSR(backbones, params.cmpa, **dims).to(device)
    optimiser = build_optimiser(model, preset)
    state = TrainState()
    meta = {"dataset": dataset, "num_classes": len(data.classes), "classes": data.classes, "decoder": dims,
            "preset": asdict(preset), "cmpa": asdict(params.cmpa)}

    if resume and ckpt_path.exists():
        ckpt = torch.load(ckpt_path, map_location=device, weights_only=False)
        model.load_state_dict(ckpt["model"])
        optimiser.load_state_dict(ckpt["optimiser"])
        state = TrainState(**ckpt["state"])
        set_rng_state(ckpt["rng"])
        if progress and rank == 0:
            print(f"resuming {dataset} from {ckpt_path} at iteration {state.iteration}")
    elif resume and progress and rank == 0:
        print(f"no checkpoint at {ckpt_path}; starting from iteration 0")

    num_regions = params.superpixels.n_clusters
    autocast_dtype = torch.bfloat16 if (device.type == "cuda" and params.train.amp_bf16) else None
    micro = preset.batch_size // preset.accumulation
    if micro % world:
        raise ValueError(f"train_presets.{ds.preset}: micro-batch {micro} is not divisible by {world} processes")
    per_rank = micro // world
    if len(data) < micro:
        raise ValueError(f"{root}: split {ds.train_split!r} has {len(data)} images, fewer than one micro-batch of {micro}")

    stop = {"signal": False}
    # Every rank stops at the same iteration boundary (the flag is all-reduced below), so none is
    # left waiting in a collective while another exits.
    previous = signal.signal(signal.SIGTERM, lambda *_: stop.update(signal=True))

    live = None
    if rank == 0:
        from dvclive import Live
        try:
            live = Live(dir=str(out_dir / "dvclive"), resume=resume and state.iteration > 0, save_dvc_exp=False, dvcyaml=None, report=None)
        except Exception as err:  # dvclive fails inside a git repo that has no commit yet (scmrepo "Empty git repo")
            print(f"warning: dvclive disabled ({type(err).__name__}: {err}); commit once to get training curves", file=sys.stderr)
            (out_dir / "dvclive").mkdir(exist_ok=True)

    sampler = ResumableSampler(len(data), micro, seed, state.iteration * preset.accumulation, rank, world)
    # The loader draws its workers' base seed from its own generator, not the global torch RNG: a draw
    # from the global RNG here would land after the checkpoint's RNG state is restored on resume and
    # shift the stream relative to an uninterrupted run.
    loader = DataLoader(data, batch_size=per_rank, sampler=sampler, num_workers=params.train.num_workers, collate_fn=collate,
                        generator=torch.Generator().manual_seed(seed))
    batches = iter(loader)
    end = preset.iterations if stop_after is None else min(preset.iterations, stop_after)
    first = state.iteration  # a disabled tqdm has no `initial` attribute, so keep the start here
    bar = tqdm(total=preset.iterations, initial=first, desc=f"train {dataset}", disable=not progress or rank != 0)
    model.train()
    tic = run_start = time.time()
    try:
        while state.iteration < end:
            lr = lr_at(state.iteration, preset)
            for group in optimiser.param_groups:
                group["lr"] = lr * group["lr_mult"]
            optimiser.zero_grad(set_to_none=True)
            totals: dict[str, float] = {}
            bank_items = []
            for _ in range(preset.accumulation):
                batch = next(batches)
                loss, parts = train_step(backbones, model, batch, params, preset, num_regions=num_regions, autocast_dtype=autocast_dtype)
                if not torch.isfinite(loss):
                    raise NonFiniteLoss(
                        f"non-finite loss ({loss.item()}) at iteration {state.iteration} "
                        f"({', '.join(f'{k}={v.item():.4g}' for k, v in parts.items() if not k.startswith('_'))}); "
                        f"{_last_good(ckpt_path)}")
                (loss / preset.accumulation).backward()
                if "_bank" in parts:
                    bank_items.append(parts.pop("_bank"))
                for k, v in parts.items():
                    totals[k] = totals.get(k, 0.0) + float(v) / preset.accumulation
                totals["loss"] = totals.get("loss", 0.0) + float(loss.detach()) / preset.accumulation
            _sync_gradients(model)
            bad = non_finite_gradients(model)
            if bad:
                # Checked before the step: a finite loss can still back-propagate NaN/inf (overflow),
                # and once the optimiser writes it into the weights the next checkpoint would save it.
                raise NonFiniteLoss(
                    f"non-finite gradient in {', '.join(bad[:5])}{' ...' if len(bad) > 5 else ''} at iteration {state.iteration} "
                    f"(loss {totals['loss']:.4g}); {_last_good(ckpt_path)}")
            optimiser.step()
            if bank_items:
                feats = _all_gather(torch.cat([b[0] for b in bank_items]))
                labels = _all_gather(torch.cat([b[1] for b in bank_items]))
                model.bank.push(feats, labels)
                if state.iteration % preset.refresh_every == 0:
                    model.bank.refresh(bank_items[-1][2], iters=params.cmpa.kmeans_iters)
            state.iteration += 1
            state.images_seen += preset.batch_size
            state.last_losses = totals
            bar.update(1)
            done = state.iteration - first
            bar.set_postfix(loss=f"{totals['loss']:.3f}", img_s=f"{done * preset.batch_size / max(time.time() - run_start, 1e-6):.1f}")
            if live is not None and state.iteration % params.train.log_every == 0:
                live.step = state.iteration  # before logging: log_metric records the current step
                for k, v in totals.items():
                    live.log_metric(f"train/{k}", v)
                live.log_metric("train/lr", lr)
                live.next_step()
            if world > 1:
                flag = torch.tensor([float(stop["signal"])], device=device)
                dist.all_reduce(flag)
                stop["signal"] = bool(flag.item())
            if rank == 0 and (state.iteration % params.train.checkpoint_every == 0 or stop["signal"]):
                state.seconds += time.time() - tic
                tic = time.time()
                save_checkpoint(ckpt_path, model, optimiser, state, meta)
            if stop["signal"]:
                raise KeyboardInterrupt(f"SIGTERM: checkpoint written at iteration {state.iteration} to {ckpt_path}")
    finally:
        bar.close()
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
        if live is not None:
            live.end()

    _check_ranks_agree(model)
    state.seconds += time.time() - tic
    summary = {"iterations": state.iteration, "images_seen": state.images_seen, "train_seconds": round(state.seconds, 1),
               "images_per_second": round(state.images_seen / max(state.seconds, 1e-6), 2),
               **{f"final_{k}": round(v, 5) for k, v in state.last_losses.items()}}
    if rank == 0:
        save_checkpoint(ckpt_path, model, optimiser, state, meta)
        if state.iteration >= preset.iterations:
            with atomic_path(model_path) as tmp:
                torch.save({"model": model.state_dict(), "meta": meta, "summary": summary}, tmp)
    return summary


def decoder_dims(preset: PresetParams, backbones: FrozenBackbones) -> dict:
    """Decoder width/layers: WeCLIP's 256 x 3 for real CLIP, narrower for a tiny demo CLIP."""
    width = 256 if backbones.width >= 256 else 64
    return {"decoder_width": width, "decoder_layers": 3 if width == 256 else 1, "decoder_heads": 8 if width == 256 else 4}


def load_trained(path: str | Path, backbones: FrozenBackbones, params: Params, device="cpu") -> SSR:
    """Rebuild an SSR model from model.pt (or checkpoint.pt)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: trained model not found (run `ssr train` first)")
    ckpt = torch.load(path, map_location=device, weights_only=False)
    model = SSR(backbones, params.cmpa, **ckpt["meta"]["decoder"]).to(device)
    model.load_state_dict(ckpt["model"])
    return model.eval()
