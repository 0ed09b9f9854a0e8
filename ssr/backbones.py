"""Frozen backbones: open_clip's ViT run block by block, and timm's DINO ViT.

open_clip's residual blocks call nn.MultiheadAttention without asking for its
weights, so `clip_visual_forward` runs the same blocks itself and asks the
attention for them. A test checks that the pooled output equals open_clip's
own `encode_image`.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import open_clip
import torch
import torch.nn.functional as F
from torch import nn


def demo_asset_dir(name: str) -> Path:
    """The folder of a committed demo model (`demo_clip`, `demo_dino`) installed with ssr."""
    return Path(__file__).parent / "assets" / name


def load_clip(model_name: str, pretrained: str = "", *, demo_dir: str | Path | None = None,
              cache_dir: str | Path | None = None, device="cpu"):
    """Load a frozen open_clip model and its tokenizer through open_clip's own loaders.

    model_name "demo" loads the committed tiny CLIP folder (`demo_dir`, default the copy
    installed with the package) via the `local-dir:` schema, and so does `cache_dir`: the
    weights cache's folder of this model and tag (`ssr.weights`), which never touches the
    network. Otherwise `open_clip.create_model(model_name, pretrained=...)`, which downloads a
    tag such as "openai" (built with the QuickGELU its weights were trained with, as the
    tag's config says) or reads a checkpoint path.
    """
    folder, missing = None, ""
    if model_name == "demo":
        folder = Path(demo_dir) if demo_dir is not None else demo_asset_dir("demo_clip")
        missing = "demo CLIP folder missing (run `ssr demo-clip`)"
    elif cache_dir is not None:
        folder, missing = Path(cache_dir), f"no {model_name} ({pretrained}) CLIP here (run `ssr weights`)"
    if folder is not None:
        if not (folder / "open_clip_config.json").is_file():
            raise FileNotFoundError(f"{folder}: {missing}")
        name = f"local-dir:{folder}"
        model = open_clip.create_model(name, device=device)
    else:
        name = model_name
        quick_gelu = bool(open_clip.get_pretrained_cfg(model_name, pretrained).get("quick_gelu", False)) if pretrained else False
        model = open_clip.create_model(model_name, pretrained=pretrained or None, force_quick_gelu=quick_gelu, device=device)
    model.eval().requires_grad_(False)
    return model, open_clip.get_tokenizer(name)


def clip_normalisation(model) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The mean and std this CLIP was trained with (never ImageNet's by accident)."""
    cfg = getattr(model.visual, "preprocess_cfg", {}) or {}
    return tuple(cfg.get("mean", open_clip.OPENAI_DATASET_MEAN)), tuple(cfg.get("std", open_clip.OPENAI_DATASET_STD))


def resample_positional_embedding(pos_embed: torch.Tensor, grid: tuple[int, int], num_prefix: int = 1) -> torch.Tensor:
    """(num_prefix + n0*n0, D) positional embedding -> (num_prefix + h*w, D) by bicubic interpolation."""
    prefix, patches = pos_embed[:num_prefix], pos_embed[num_prefix:]
    n0 = int(math.isqrt(patches.shape[0]))
    if (n0, n0) == tuple(grid):
        return pos_embed
    patches = patches.reshape(1, n0, n0, -1).permute(0, 3, 1, 2)
    patches = F.interpolate(patches.float(), size=grid, mode="bicubic", align_corners=False).to(pos_embed.dtype)
    return torch.cat([prefix, patches.permute(0, 2, 3, 1).reshape(grid[0] * grid[1], -1)])


def check_supported(visual: nn.Module) -> None:
    """Refuse an open_clip vision tower whose forward `clip_visual_forward` would not reproduce.

    The re-implemented forward covers open_clip's plain ViT: class-token pooling, `ln_post` on
    every token, nn.MultiheadAttention blocks, no attentional pooler, no patch dropout at
    inference. Anything else raises NotImplementedError naming the feature.
    """
    unsupported = []
    if not hasattr(visual, "transformer") or not hasattr(visual, "conv1"):
        unsupported.append(f"{type(visual).__name__} (only open_clip's VisionTransformer is supported)")
    else:
        if getattr(visual, "attn_pool", None) is not None:
            unsupported.append("attn_pool (attentional pooling)")
        if getattr(visual, "pool_type", "tok") != "tok":
            unsupported.append(f"pool_type={visual.pool_type!r} (only 'tok', class-token pooling)")
        if getattr(visual, "final_ln_after_pool", False):
            unsupported.append("final_ln_after_pool")
        if not isinstance(getattr(visual, "patch_dropout", nn.Identity()), nn.Identity):
            unsupported.append("patch_dropout")
        if any(not isinstance(getattr(b, "attn", None), nn.MultiheadAttention) for b in visual.transformer.resblocks):
            unsupported.append("blocks without nn.MultiheadAttention (e.g. custom attention)")
        if getattr(visual, "proj", None) is None:
            unsupported.append("no output projection (proj is None)")
    if unsupported:
        raise NotImplementedError("this open_clip vision tower is not supported by ssr.backbones.clip_visual_forward: "
                                  + "; ".join(unsupported))


@dataclass
class ClipVisualOutput:
    tokens: list[torch.Tensor]       # per block output, (B, 1 + N, D); index i = block i + 1
    attentions: dict[int, torch.Tensor]  # block index -> head-averaged attention (B, 1 + N, 1 + N)
    cam_activations: torch.Tensor | None  # (B, 1 + N, D) output of the CAM block's ln_1 (the GradCAM layer), a grad leaf
    pooled: torch.Tensor             # (B, E) open_clip's image embedding (ln_post(cls) @ proj)
    dense: torch.Tensor              # (B, N, E) patch embeddings (ln_post(patch) @ proj)
    grid: tuple[int, int]            # (h, w) patch grid, N = h * w


def _block_forward(block: nn.Module, x: torch.Tensor, need_weights: bool, cam_leaf: bool):
    """One open_clip residual block; with `cam_leaf`, ln_1's output becomes a grad leaf.

    That output is what a forward hook on `block.ln_1` sees (CLIP-ES's GradCAM layer): the
    gradient reaching it is the one through the attention alone, not through the residual.
    """
    y = block.ln_1(x)
    if cam_leaf:
        y = y.detach().requires_grad_(True)
    out, weights = block.attn(y, y, y, need_weights=need_weights, average_attn_weights=True)
    x = x + block.ls_1(out)
    x = x + block.ls_2(block.mlp(block.ln_2(x)))
    return x, weights, y


def clip_visual_forward(
    visual: nn.Module,
    images: torch.Tensor,
    *,
    attn_blocks: int = 0,
    cam_block: int = -1,
    cam_grad: bool = False,
) -> ClipVisualOutput:
    """Run open_clip's VisionTransformer on images of any size divisible by its patch size.

    images: (B, 3, H, W) normalised. `attn_blocks` = how many of the last blocks
    return attention weights (others keep the fused attention path).
    With `cam_grad`, the output of block `cam_block`'s ln_1 becomes a leaf that requires
    grad (`cam_activations`), so GradCAM can differentiate any score computed from the
    outputs with respect to it; everything before it runs without building a graph, and
    everything from it on builds one even inside torch.no_grad().
    """
    check_supported(visual)
    blocks = visual.transformer.resblocks
    depth = len(blocks)
    cam_block = cam_block % depth
    patch = visual.conv1.kernel_size
    if images.shape[-2] % patch[0] or images.shape[-1] % patch[1]:
        raise ValueError(f"image size {tuple(images.shape[-2:])} is not a multiple of the patch size {patch}")
    grid = (images.shape[-2] // patch[0], images.shape[-1] // patch[1])
    grad = torch.is_grad_enabled() and not cam_grad

    with torch.set_grad_enabled(grad):
        x = visual.conv1(images.to(visual.conv1.weight.dtype)).flatten(2).transpose(1, 2)
        cls = visual.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1)
        x = x + resample_positional_embedding(visual.positional_embedding, grid).to(x.dtype)
        x = visual.ln_pre(x)

    tokens, attentions, cam_activations = [], {}, None
    for i, block in enumerate(blocks):
        leaf = cam_grad and i == cam_block
        with torch.set_grad_enabled(grad or (cam_grad and i >= cam_block)):
            x, weights, y = _block_forward(block, x, need_weights=i >= depth - attn_blocks, cam_leaf=leaf)
        if leaf:
            cam_activations = y
        if weights is not None:
            attentions[i] = weights.detach() if cam_grad else weights
        tokens.append(x)

    with torch.set_grad_enabled(grad or cam_grad):
        pooled = visual.ln_post(x[:, 0]) @ visual.proj
        dense = visual.ln_post(x[:, 1:]) @ visual.proj
    return ClipVisualOutput(tokens, attentions, cam_activations, pooled, dense, grid)


@torch.no_grad()
def encode_prompts(model, tokenizer, names: list[str], template: str) -> torch.Tensor:
    """(len(names), E) L2-normalised text embeddings of template.format(name)."""
    device = model.logit_scale.device
    text = tokenizer([template.format(n) for n in names]).to(device)
    return F.normalize(model.encode_text(text).float(), dim=-1)


# ---------------------------------------------------------------- DINO (timm)

def load_dino(model_name: str, *, pretrained: bool = True, weights: str | Path | None = None, demo_dir: str | Path | None = None,
              cache_dir: str | Path | None = None, device="cpu") -> nn.Module:
    """A frozen timm ViT (e.g. `vit_small_patch16_224.dino`) accepting any input size.

    `weights`: a local weights file for `model_name`, read by timm's own pretrained loader
    instead of its download (a mirrored checkpoint, or the random weights of a test).
    `cache_dir`: the weights cache's folder of this model (`ssr.weights`: timm's config.json and
    model.safetensors), read by timm's `local-dir:` loader, never the network.
    model_name "demo" loads the committed tiny DINO folder (`demo_dir`, default the
    installed copy): its config.json names the architecture, its sizes and the
    pretrained cfg, and timm's pretrained loader reads the weights file it points to.
    """
    import timm

    if model_name == "demo":
        demo_dir = Path(demo_dir) if demo_dir is not None else demo_asset_dir("demo_dino")
        if not (demo_dir / "config.json").is_file() or not (demo_dir / "model.safetensors").is_file():
            raise FileNotFoundError(f"{demo_dir}: no demo DINO weights (run `ssr demo-dino`)")
        cfg = json.loads((demo_dir / "config.json").read_text())
        overlay = {**cfg["pretrained_cfg"], "file": str(demo_dir / "model.safetensors")}
        kwargs = {**cfg["model_args"], "num_classes": 0, "dynamic_img_size": True}
        model = timm.create_model(cfg["architecture"], pretrained=True, pretrained_cfg_overlay=overlay, **kwargs)
    elif cache_dir is not None:
        if not (Path(cache_dir) / "config.json").is_file():
            raise FileNotFoundError(f"{cache_dir}: no {model_name} DINO here (run `ssr weights`)")
        model = timm.create_model(f"local-dir:{cache_dir}", pretrained=True, num_classes=0, dynamic_img_size=True)
    elif weights:
        if not Path(weights).is_file():
            raise FileNotFoundError(f"{weights}: DINO weights file not found (datasets.{{ds}}.dino_weights names it; "
                                    f'"" downloads {model_name} through timm instead)')
        model = timm.create_model(model_name, pretrained=True, pretrained_cfg_overlay={"file": str(weights)}, num_classes=0,
                                  dynamic_img_size=True)
    else:
        model = timm.create_model(model_name, pretrained=pretrained, num_classes=0, dynamic_img_size=True)
    return model.to(device).eval().requires_grad_(False)


def dino_normalisation(model) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The mean and std in the model's pretrained cfg (ImageNet's where it names none)."""
    from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

    cfg = getattr(model, "pretrained_cfg", {}) or {}
    return tuple(cfg.get("mean", IMAGENET_DEFAULT_MEAN)), tuple(cfg.get("std", IMAGENET_DEFAULT_STD))


@torch.no_grad()
def dino_last_attention(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Head-averaged patch-to-patch attention of the last block: (B, 3, H, W) -> (B, N, N).

    timm's attention uses the fused kernel, which returns no weights, so a forward hook on
    the last block's `norm1` (timm's public module API) captures the attention input, and
    softmax(q k^T * scale) is recomputed from that block's own qkv layer.
    """
    attn = model.blocks[-1].attn
    captured = {}
    handle = model.blocks[-1].norm1.register_forward_hook(lambda _m, _i, out: captured.setdefault("y", out))
    try:
        model.forward_features(images)
    finally:
        handle.remove()
    y = captured["y"]
    b, t, d = y.shape
    qkv = attn.qkv(y).reshape(b, t, 3, attn.num_heads, d // attn.num_heads).permute(2, 0, 3, 1, 4)
    q, k = attn.q_norm(qkv[0]), attn.k_norm(qkv[1])
    weights = ((q * attn.scale) @ k.transpose(-2, -1)).float().softmax(dim=-1).mean(dim=1)
    prefix = model.num_prefix_tokens
    return weights[:, prefix:, prefix:]
