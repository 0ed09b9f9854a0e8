"""What the demo backbones' pretraining runs (`ssr demo-clip`, `ssr demo-dino`) share:
their resume file and their fp16 weights file."""

from __future__ import annotations

import pickle
from pathlib import Path

import torch
from torch import nn

from ssr.data.layout import atomic_path

# Written at every evaluation and removed at the end: an interrupted run resumes from it.
RESUME_FILE = "resume.pt"


def load_resume(path: str | Path, run: dict) -> dict | None:
    """The state that the same run saved at `path`, or None when there is none.

    `run` identifies the run (config and params); a file saved by another run is ignored,
    so a changed param starts over. The file holds tensors, numbers, strings and
    containers only, so it loads with `weights_only`.
    """
    path = Path(path)
    if not path.is_file():
        return None
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, pickle.UnpicklingError) as exc:
        raise ValueError(f"{path}: unreadable resume file ({exc}); delete it to start the run over") from exc
    return saved if isinstance(saved, dict) and saved.get("run") == run else None


def save_resume(path: str | Path, run: dict, **state) -> None:
    """Replace the resume file at `path` atomically with `run` and `state`."""
    with atomic_path(path) as tmp:
        torch.save({"run": run, **state}, tmp)


def save_half_weights(path: str | Path, module: nn.Module) -> None:
    """The module's state as fp16 safetensors, atomically: half the size of a committed
    file; open_clip's and timm's loaders copy it into the model's fp32 parameters."""
    from safetensors.torch import save_file

    state = {k: v.detach().to(torch.float16).contiguous() for k, v in module.state_dict().items()}
    with atomic_path(path) as tmp:
        save_file(state, str(tmp))
