"""Frozen backbones: open_clip's ViT run block by block, and timm's DINO ViT.

open_clip's residual blocks call nn.MultiheadAttention without asking for its
weights, so `clip_visual_forward` runs the same blocks itself and asks the
attention for them. A test checks that the pooled output equals open_clip's
own `encode_image`.

`fast=True` runs the same function the way a training step wants it (the same outputs up to
float rounding; tests/test_fast_path.py): the attention's input projection as one matrix
product, SDPA for every block's output, and for the blocks whose attention the affinity uses
only its head- and block-averaged patch rows; the positional embedding resampled once per
grid and the frozen weights cast to the autocast dtype once (`FrozenCache`).
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


def resample_positional_embedding(pos_embed: torch.Tensor, grid: tuple[int, int], num_prefix: int = 1,
                                  mode: str = "bilinear") -> torch.Tensor:
    """(num_prefix + n0*n0, D) positional embedding -> (num_prefix + h*w, D), resized on the patch grid.

    Bilinear (half-pixel centres) by default: CLIP-ES and WeCLIP resize CLIP's embedding so, and
    every VOC and COCO grid differs from CLIP's native 14x14. (timm resizes DINO's itself.)
    """
    prefix, patches = pos_embed[:num_prefix], pos_embed[num_prefix:]
    n0 = int(math.isqrt(patches.shape[0]))
    if (n0, n0) == tuple(grid):
        return pos_embed
    patches = patches.reshape(1, n0, n0, -1).permute(0, 3, 1, 2)
    patches = F.interpolate(patches.float(), size=grid, mode=mode, align_corners=False).to(pos_embed.dtype)
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


class FrozenCache:
    """Tensors derived from frozen weights, made once and reused across forwards.

    Under autocast every matrix product casts its fp32 weights to bf16 again on each call
    (autocast caches casts only of weights that require grad); the positional embedding is
    resampled to the patch grid on each call. Both depend only on the weights, so they are
    kept here, keyed by the source tensor (identity and version, so an in-place change such
    as load_state_dict makes a fresh one). A cast made here rounds exactly as autocast's.
    """

    def __init__(self):
        self._entries: dict = {}

    def derived(self, key, source: torch.Tensor | nn.Module, make):
        """make() once per `key` while `source` is the same tensor (or module), unchanged: its version,
        or every parameter's."""
        stamp = tuple(p._version for p in source.parameters()) if isinstance(source, nn.Module) else source._version
        entry = self._entries.get(key)
        if entry is not None and entry[0] is source and entry[1] == stamp:
            return entry[2]
        value = make()
        self._entries[key] = (source, stamp, value)
        return value

    def cast(self, tensor: torch.Tensor | None, dtype: torch.dtype | None) -> torch.Tensor | None:
        """`tensor` in `dtype` (None: as it is)."""
        if tensor is None or dtype is None or tensor.dtype == dtype:
            return tensor
        return self.derived(("cast", id(tensor), dtype), tensor, lambda: tensor.detach().to(dtype))

    def positional_embedding(self, pos_embed: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        return self.derived(("pos", id(pos_embed), tuple(grid)), pos_embed,
                            lambda: resample_positional_embedding(pos_embed.detach(), grid))

    def module_copy(self, module: nn.Module, dtype: torch.dtype) -> nn.Module:
        """A copy of a frozen module whose Linear and Conv2d weights are in `dtype` (norms keep theirs).

        Under autocast to `dtype` it computes exactly what the module does: autocast runs
        those layers in `dtype` and casts their weights to it anyway. Remade when any weight
        of the module changes."""
        return self.derived(("module", id(module), dtype), module, lambda: _cast_layers(module, dtype))


def _cast_layers(module: nn.Module, dtype: torch.dtype) -> nn.Module:
    import copy

    out = copy.deepcopy(module)
    for layer in out.modules():
        if isinstance(layer, nn.Linear | nn.Conv2d):
            layer.to(dtype)
    return out


def autocast_dtype(device_type: str) -> torch.dtype | None:
    """The dtype autocast runs matrix products in here, or None when it is off."""
    return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else None


@dataclass
class ClipVisualOutput:
    tokens: list[torch.Tensor]       # per block output, (B, 1 + N, D); index i = block i + 1
    attentions: dict[int, torch.Tensor]  # block index -> head-averaged attention (B, 1 + N, 1 + N); empty when fast
    cam_activations: torch.Tensor | None  # (B, 1 + N, D) output of the CAM block's ln_1 (the GradCAM layer), a grad leaf
    pooled: torch.Tensor             # (B, E) open_clip's image embedding (ln_post(cls) @ proj)
    dense: torch.Tensor              # (B, N, E) patch embeddings (ln_post(patch) @ proj)
    grid: tuple[int, int]            # (h, w) patch grid, N = h * w
    # fast only: the mean over the `attn_blocks` last blocks of their head-averaged patch-to-patch
    # attention, (B, N, N) float32 (what `ssr.affinity.average_attention` makes of `attentions`)
    patch_attention: torch.Tensor | None = None
    # fast with cam_at_qkv: the CAM block's qkv projection (B, 1 + N, 3D), the grad leaf in place
    # of cam_activations (which then needs no grad), and the projection's weight (3D, D)
    cam_qkv: torch.Tensor | None = None
    cam_in_proj_weight: torch.Tensor | None = None


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
    fast: bool = False,
    cam_at_qkv: bool = False,
    cache: FrozenCache | None = None,
) -> ClipVisualOutput:
    """Run open_clip's VisionTransformer on images of any size divisible by its patch size.

    images: (B, 3, H, W) normalised. `attn_blocks` = how many of the last blocks
    return attention weights (others keep the fused attention path).
    With `cam_grad`, the output of block `cam_block`'s ln_1 becomes a leaf that requires
    grad (`cam_activations`), so GradCAM can differentiate any score computed from the
    outputs with respect to it; everything before it runs without building a graph, and
    everything from it on builds one even inside torch.no_grad().
    `fast`: the module docstring's fast path; the attention comes as `patch_attention`
    instead of `attentions`, and with `cam_at_qkv` the grad leaf is the CAM block's qkv
    projection (`cam_qkv`, for `ssr.cam.gradcam_at_qkv`). `cache`: where the fast path keeps
    its casts and resampled embedding (None: made on each call).
    """
    check_supported(visual)
    if cam_at_qkv and not fast:
        raise ValueError("cam_at_qkv needs the fast path")
    blocks = visual.transformer.resblocks
    depth = len(blocks)
    cam_block = cam_block % depth
    patch = visual.conv1.kernel_size
    if images.shape[-2] % patch[0] or images.shape[-1] % patch[1]:
        raise ValueError(f"image size {tuple(images.shape[-2:])} is not a multiple of the patch size {patch}")
    grid = (images.shape[-2] // patch[0], images.shape[-1] // patch[1])
    grad = torch.is_grad_enabled() and not cam_grad
    if fast:
        return _fast_visual_forward(visual, images, grid, attn_blocks=attn_blocks, cam_block=cam_block if cam_grad else None,
                                    cam_at_qkv=cam_at_qkv, grad=grad, cache=cache or FrozenCache())

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


def check_fast_supported(visual: nn.Module) -> None:
    """The fast path reads nn.MultiheadAttention's packed projection and the MLP's c_fc / gelu / c_proj."""
    for block in visual.transformer.resblocks:
        attn, mlp = block.attn, block.mlp
        if (not attn._qkv_same_embed_dim or attn.in_proj_bias is None or attn.bias_k is not None or attn.add_zero_attn
                or attn.dropout or not attn.batch_first):
            raise NotImplementedError("the fast CLIP forward needs nn.MultiheadAttention with one packed, biased input "
                                      "projection, batch_first, no bias_k/v, no added zero attention, no dropout")
        if not all(hasattr(mlp, name) for name in ("c_fc", "gelu", "c_proj")):
            raise NotImplementedError("the fast CLIP forward needs open_clip's MLP (c_fc, gelu, c_proj)")


def _fast_visual_forward(visual: nn.Module, images: torch.Tensor, grid: tuple[int, int], *, attn_blocks: int,
                         cam_block: int | None, cam_at_qkv: bool, grad: bool, cache: FrozenCache) -> ClipVisualOutput:
    check_fast_supported(visual)
    dtype = autocast_dtype(images.device.type)

    def cast(t):
        return cache.cast(t, dtype)

    blocks = visual.transformer.resblocks
    depth = len(blocks)
    with torch.set_grad_enabled(grad):
        weight = cast(visual.conv1.weight)
        x = F.conv2d(images.to(weight.dtype), weight, cast(visual.conv1.bias), stride=visual.conv1.stride)
        x = x.flatten(2).transpose(1, 2)
        cls = visual.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1)
        x = x + cache.positional_embedding(visual.positional_embedding, grid).to(x.dtype)
        x = visual.ln_pre(x)

    tokens, patch_attention, cam_activations, cam_qkv = [], None, None, None
    for i, block in enumerate(blocks):
        leaf = None if cam_block is None or i != cam_block else ("qkv" if cam_at_qkv else "ln_1")
        need_weights = i >= depth - attn_blocks
        with torch.set_grad_enabled(grad or (cam_block is not None and i >= cam_block)):
            x, weights, y, qkv = _fast_block_forward(block, x, cast, need_weights=need_weights, cam_leaf=leaf)
        if leaf is not None:
            cam_activations, cam_qkv = y, qkv
        if weights is not None:
            patch_attention = weights if patch_attention is None else patch_attention + weights
        tokens.append(x)
    if patch_attention is not None:
        patch_attention = patch_attention / min(attn_blocks, depth)

    with torch.set_grad_enabled(grad or cam_block is not None):
        proj = cast(visual.proj)
        pooled = visual.ln_post(x[:, 0]) @ proj
        dense = visual.ln_post(x[:, 1:]) @ proj
    in_proj = blocks[cam_block].attn.in_proj_weight if cam_qkv is not None else None
    return ClipVisualOutput(tokens, {}, cam_activations, pooled, dense, grid, patch_attention=patch_attention,
                            cam_qkv=cam_qkv, cam_in_proj_weight=in_proj)


def _fast_block_forward(block: nn.Module, x: torch.Tensor, cast, *, need_weights: bool, cam_leaf: str | None):
    """`_block_forward`, with the attention written out: one GEMM for q, k and v, SDPA for the output
    (the CAM block, which GradCAM differentiates: softmax(q k^T) v as nn.MultiheadAttention computes it).

    need_weights: also the head-averaged attention of the patch rows and columns, (B, N, N)
    float32, without grad (what nn.MultiheadAttention's weights hold there: softmax over all
    keys, CLS included, then the CLS row and column dropped), on the side of SDPA.
    cam_leaf "ln_1" or "qkv": that tensor becomes a grad leaf. -> x, weights, ln_1 output, qkv leaf.
    """
    attn, mlp = block.attn, block.mlp
    y = block.ln_1(x)
    if cam_leaf == "ln_1":
        y = y.detach().requires_grad_(True)
    qkv = F.linear(y, cast(attn.in_proj_weight), cast(attn.in_proj_bias))
    leaf = None
    if cam_leaf == "qkv":
        y = y.detach()
        qkv = leaf = qkv.detach().requires_grad_(True)
    b, t, _ = qkv.shape
    q, k, v = qkv.view(b, t, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4).unbind(0)   # (B, heads, T, hd)
    scale = math.sqrt(1.0 / attn.head_dim)
    weights = None
    if cam_leaf is not None:
        # GradCAM back-propagates through this block once per class slot, batched by autograd's vmap:
        # the explicit softmax(q k^T) v has batching rules everywhere, and the softmax serves the weights too
        probs = ((q * scale) @ k.transpose(-2, -1)).softmax(dim=-1)                                # (B, heads, T, T)
        out = probs @ v
        if need_weights:
            weights = probs.detach()[:, :, 1:, 1:].float().mean(dim=1)
    else:
        if need_weights:
            with torch.no_grad():
                scores = (q[:, :, 1:] * scale) @ k.transpose(-2, -1)                              # (B, heads, N, T)
                weights = scores.softmax(dim=-1)[..., 1:].float().mean(dim=1)
        out = F.scaled_dot_product_attention(q, k, v)
    out = out.transpose(1, 2).reshape(b, t, -1)
    x = x + block.ls_1(F.linear(out, cast(attn.out_proj.weight), cast(attn.out_proj.bias)))
    h = F.linear(block.ln_2(x), cast(mlp.c_fc.weight), cast(mlp.c_fc.bias))
    x = x + block.ls_2(F.linear(mlp.gelu(h), cast(mlp.c_proj.weight), cast(mlp.c_proj.bias)))
    return x, weights, y, leaf


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
def dino_last_attention(model: nn.Module, images: torch.Tensor, *, fast: bool = False,
                        cache: FrozenCache | None = None) -> torch.Tensor:
    """Head-averaged patch-to-patch attention of the last block: (B, 3, H, W) -> (B, N, N).

    timm's attention uses the fused kernel, which returns no weights, so a forward hook on
    the last block's `norm1` (timm's public module API) captures the attention input, and
    softmax(q k^T * scale) is recomputed from that block's own qkv layer.
    `fast`: stop at that input instead of running the last block and the final norm, which
    nothing reads, with the resampled positional embedding and the autocast casts of the
    weights kept in `cache` (`dino_attention_input`).
    """
    if fast:
        cache = cache or FrozenCache()
        dtype = autocast_dtype(images.device.type)
        run = cache.module_copy(model, dtype) if dtype is not None else model
        y = dino_attention_input(model, run, images, cache)
    else:
        run = model
        captured = {}
        handle = model.blocks[-1].norm1.register_forward_hook(lambda _m, _i, out: captured.setdefault("y", out))
        try:
            model.forward_features(images)
        finally:
            handle.remove()
        y = captured["y"]
    attn = run.blocks[-1].attn
    b, t, d = y.shape
    qkv = attn.qkv(y).reshape(b, t, 3, attn.num_heads, d // attn.num_heads).permute(2, 0, 3, 1, 4)
    q, k = attn.q_norm(qkv[0]), attn.k_norm(qkv[1])
    weights = ((q * attn.scale) @ k.transpose(-2, -1)).float().softmax(dim=-1).mean(dim=1)
    prefix = model.num_prefix_tokens
    return weights[:, prefix:, prefix:]


def dino_attention_input(model: nn.Module, run: nn.Module, images: torch.Tensor, cache: FrozenCache) -> torch.Tensor:
    """What the last block's `norm1` outputs in `model.forward_features(images)`: (B, T, D).

    timm's own modules, run up to there: patch embedding, the positional embedding resampled to
    the grid as timm's `_pos_embed` does (kept in `cache`), the blocks but the last, its norm1.
    `run`: `model` or its copy with pre-cast Linear weights (`FrozenCache.module_copy`).
    """
    if model.reg_token is not None or model.no_embed_class or model.cls_token is None or not model.dynamic_img_size:
        raise NotImplementedError("the fast DINO path covers timm ViTs with a class token, no register tokens, "
                                  "pos_embed over the class token too, and dynamic_img_size")
    from timm.layers import resample_abs_pos_embed

    x = run.patch_embed(images)                                       # (B, h, w, C) with dynamic_img_size
    b, h, w, c = x.shape
    pos_embed = cache.derived(("dino_pos", id(model.pos_embed), h, w), model.pos_embed,
                              lambda: resample_abs_pos_embed(model.pos_embed, new_size=(h, w),
                                                             old_size=model.patch_embed.grid_size,
                                                             num_prefix_tokens=model.num_prefix_tokens))
    x = torch.cat([model.cls_token.expand(b, -1, -1), x.view(b, -1, c)], dim=1) + pos_embed
    x = run.norm_pre(run.patch_drop(run.pos_drop(x)))
    for block in run.blocks[:-1]:
        x = block(x)
    return run.blocks[-1].norm1(x)
