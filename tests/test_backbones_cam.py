"""Backbones and the CAM path against independent computations.

Every expected value here comes from a different code path than the one under
test: open_clip's own forward (with hooks), torch's MultiheadAttention, timm's
unfused attention and its pos-embed resampler, or a per-image x per-class
GradCAM loop written out in this file.
"""

from __future__ import annotations

import copy

import numpy as np
import open_clip
import pytest
import timm
import torch
import torch.nn.functional as F
from conftest import tiny_clip_config
from timm.layers import resample_abs_pos_embed
from torch import nn

from ssr.backbones import clip_visual_forward, dino_last_attention, load_dino, resample_positional_embedding
from ssr.cam import class_slots, gradcam
from ssr.config import AffinityParams, CmpaParams, DatasetParams, PseudoLabelParams, SgcParams
from ssr.model import ABLATION_ROWS, SSR, ModelDims, build_backbones, cams_to_labels, refined_cams

CLASSES = ["circle", "square", "triangle", "cross"]
NUM_REGIONS = 4


# ------------------------------------------------------------------ helpers

def tiny_clip(image_size: int = 32, patch_size: int = 8, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return open_clip.CLIP(**tiny_clip_config(image_size, patch_size)).eval().requires_grad_(False)


def tiny_dino(patch_size: int, img_size: int, seed: int = 1) -> nn.Module:
    torch.manual_seed(seed)
    model = timm.create_model("vit_small_patch16_224", pretrained=False, depth=2, embed_dim=48, num_heads=3,
                              patch_size=patch_size, img_size=img_size, dynamic_img_size=True, num_classes=0)
    return model.eval().requires_grad_(False)


@pytest.fixture(scope="module")
def tokenizer():
    return open_clip.SimpleTokenizer(context_length=16)


def make_backbones(tmp_path, tokenizer, clip, dino=None):
    ds = DatasetParams(train_split="train", val_split="val", preset="demo", prompt_template="a photo of a {}.",
                       background_prompts=["stripes", "dots", "plain"], clip_model="demo", clip_pretrained="",
                       dino_model="")
    return build_backbones(ds, CLASSES, demo_clip_dir=tmp_path, clip=clip, tokenizer=tokenizer, dino=dino)


def make_ssr(backbones, enabled: bool = True, head: str = "projection", randomise_heads: bool = False, seed: int = 3) -> SSR:
    torch.manual_seed(seed)
    dims = ModelDims(backbones.embed_dim, backbones.width, backbones.depth, backbones.num_foreground, 16, 1, 2)
    model = SSR(dims, CmpaParams(enabled=enabled, head=head, proj_dim=12, hidden_dim=32))
    if randomise_heads:
        with torch.no_grad():
            for module in (model.isa, model.tsa):
                module.mlp[-1].weight.normal_(0, 0.3)
                module.mlp[-1].bias.normal_(0, 0.1)
                for layer in module.mlp:
                    if isinstance(layer, nn.BatchNorm1d):    # non-trivial running statistics
                        layer.running_mean.normal_(0, 0.2)
                        layer.running_var.uniform_(0.5, 2.0)
    return model


def reference_cams(backbones, model, images, labels, pos_embed=None, *, layer="ln_1", pooling="patch_mean"):
    """CLIP-ES GradCAM the reference-code way: one forward + backward per image x present class.

    Built from open_clip's own modules, as pytorch-grad-cam does: a forward hook on the last
    block's `ln_1` keeps its output and a tensor hook on that output keeps its gradient; the
    image embedding is open_clip's ln_post'ed patch tokens (`output_tokens`) @ proj, averaged
    over patches after the CMPA head (CLIP-ES's pooling; no ssr forward code). -> list (per
    image) of (n_b, N). `layer="block_input"` and `pooling="cls"` compute the two wrong
    readings, so a test can show it tells them apart.
    """
    clip = copy.deepcopy(backbones.clip)
    if pos_embed is not None:
        clip.visual.positional_embedding = nn.Parameter(pos_embed.clone(), requires_grad=False)
    clip.visual.output_tokens = True
    store = {}

    def keep(tensor):
        store["act"] = tensor
        tensor.register_hook(lambda grad: store.__setitem__("grad", grad))

    block = clip.visual.transformer.resblocks[-1]
    if layer == "ln_1":
        handle = block.ln_1.register_forward_hook(lambda _m, _i, out: keep(out))
    else:
        handle = block.register_forward_pre_hook(lambda _m, args: keep(args[0]))
    x = (images - backbones.clip_mean) / backbones.clip_std
    num_fg, total = backbones.num_foreground, backbones.text.shape[0]
    model.eval()
    out = []
    try:
        for b, present in enumerate(labels):
            rows = []
            for c in present:
                with torch.enable_grad():
                    image = x[b:b + 1].clone().requires_grad_(True)   # so the hooked activations carry a graph
                    pooled, tokens = clip.visual(image)
                    if pooling == "cls":
                        img = model.adapt_patches(pooled.float()[:, None])[:, 0]
                    else:
                        img = model.adapt_patches((tokens @ clip.visual.proj).float()).mean(dim=1)
                    txt = model.adapt_text(backbones.text)
                    logits = clip.logit_scale.exp() * F.normalize(img, dim=-1) @ F.normalize(txt, dim=-1).T
                    keep_classes = [p - 1 for p in present] + list(range(num_fg, total))
                    prob = logits[0, keep_classes].softmax(dim=-1)[present.index(c)]
                    prob.backward()
                feats, grad = store["act"][0, 1:].detach(), store["grad"][0, 1:]
                cam = F.relu(feats @ grad.mean(dim=0))
                rows.append((cam - cam.min()) / (cam.max() - cam.min()).clamp_min(1e-12))
            out.append(torch.stack(rows))
    finally:
        handle.remove()
    return out


def run_cams(backbones, model, images, labels, regions, affinity=None):
    classes, valid = class_slots(labels)
    return refined_cams(backbones, model, images, classes, valid, regions, affinity or AffinityParams(), SgcParams(),
                        num_regions=NUM_REGIONS)


# ------------------------------------------------------------ CLIP forward

def test_clip_visual_forward_reproduces_open_clip_forward():
    """pooled == encode_image; every block's tokens == open_clip's block outputs; the CAM activations ==
    what a forward hook on the last block's ln_1 sees (not the block's input)."""
    model = tiny_clip()
    blocks = model.visual.transformer.resblocks
    ln_1_out, outputs = {}, {}
    handles = []
    for i, block in enumerate(blocks):
        handles.append(block.ln_1.register_forward_hook(lambda m, a, o, i=i: ln_1_out.__setitem__(i, o)))
        handles.append(block.register_forward_hook(lambda m, a, o, i=i: outputs.__setitem__(i, o)))
    torch.manual_seed(1)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = model.encode_image(x)
    for h in handles:
        h.remove()
    out = clip_visual_forward(model.visual, x, attn_blocks=len(blocks), cam_grad=True)

    torch.testing.assert_close(out.pooled, expected, atol=1e-5, rtol=1e-5)
    assert len(out.tokens) == len(blocks)
    for i in range(len(blocks)):
        torch.testing.assert_close(out.tokens[i], outputs[i], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.cam_activations, ln_1_out[len(blocks) - 1], atol=1e-5, rtol=1e-5)
    assert out.cam_activations.requires_grad and out.cam_activations.grad_fn is None   # a leaf: GradCAM's layer
    assert out.dense.requires_grad                                                      # the scores reach it
    assert out.grid == (4, 4)


@pytest.mark.parametrize("block_index", [0, 2])
def test_block_attention_equals_multihead_attention_weights(block_index):
    """Head-averaged attention == nn.MultiheadAttention(need_weights) on the ln_1 input, and == softmax(qk^T) by hand."""
    model = tiny_clip()
    block = model.visual.transformer.resblocks[block_index]
    captured = {}
    handle = block.register_forward_pre_hook(lambda m, a: captured.__setitem__("x", a[0]))
    torch.manual_seed(2)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        model.encode_image(x)
    handle.remove()
    out = clip_visual_forward(model.visual, x, attn_blocks=len(model.visual.transformer.resblocks))
    got = out.attentions[block_index]

    y = block.ln_1(captured["x"])
    _, mha = block.attn(y, y, y, need_weights=True, average_attn_weights=True)
    torch.testing.assert_close(got, mha, atol=1e-6, rtol=1e-5)

    # By hand from in_proj: softmax(q k^T / sqrt(d_head)), mean over heads.
    heads = block.attn.num_heads
    q, k, _ = F.linear(y, block.attn.in_proj_weight, block.attn.in_proj_bias).chunk(3, dim=-1)
    b, t, d = q.shape
    q = q.reshape(b, t, heads, d // heads).transpose(1, 2)
    k = k.reshape(b, t, heads, d // heads).transpose(1, 2)
    by_hand = (q @ k.transpose(-1, -2) / (d // heads) ** 0.5).softmax(dim=-1).mean(dim=1)
    torch.testing.assert_close(got, by_hand, atol=1e-6, rtol=1e-5)
    assert got.shape == (2, 17, 17)


def test_unsupported_vision_towers_are_refused_by_name():
    from ssr.backbones import check_supported

    model = tiny_clip()
    check_supported(model.visual)
    for attr, value, name in (("pool_type", "avg", "pool_type"), ("final_ln_after_pool", True, "final_ln_after_pool"),
                              ("patch_dropout", nn.Dropout(0.1), "patch_dropout")):
        broken = copy.deepcopy(model.visual)
        setattr(broken, attr, value)
        with pytest.raises(NotImplementedError, match=name):
            clip_visual_forward(broken, torch.randn(1, 3, 32, 32))


def test_prompts_use_the_class_synonyms_and_the_template(tokenizer):
    """VOC/COCO classes are prompted with CLIP-ES's synonyms ("person with clothes,people,human"),
    foreground first, then every background prompt, in the configured template."""
    from ssr.backbones import encode_prompts
    from ssr.config import ConfigError

    clip = tiny_clip()
    synonyms = ["round thing", "box", "wedge", "plus sign"]
    ds = DatasetParams(train_split="train", val_split="val", preset="demo", prompt_template="a clean origami {}.",
                       background_prompts=["sky", "road"], clip_model="demo", clip_pretrained="", dino_model="",
                       prompt_names=synonyms)
    backbones = build_backbones(ds, CLASSES, demo_clip_dir=".", clip=clip, tokenizer=tokenizer)
    expected = encode_prompts(clip, tokenizer, synonyms + ["sky", "road"], "a clean origami {}.")
    torch.testing.assert_close(backbones.text, expected)
    assert not torch.allclose(backbones.text[:4], encode_prompts(clip, tokenizer, CLASSES, "a clean origami {}."), atol=1e-4)
    with pytest.raises(ConfigError, match="prompt_names"):
        build_backbones(DatasetParams(**{**ds.__dict__, "prompt_names": synonyms[:3]}), CLASSES, demo_clip_dir=".",
                        clip=clip, tokenizer=tokenizer)


def test_repo_params_prompt_voc_and_coco_with_clip_es_synonyms():
    from pathlib import Path

    from ssr.config import load_params
    from ssr.data.voc import VOC_CLASSES

    params = load_params(Path(__file__).resolve().parents[1] / "params.yaml")
    voc = params.dataset("voc").prompt_name_list(VOC_CLASSES[1:])
    assert voc[VOC_CLASSES.index("person") - 1] == "person with clothes,people,human"
    assert voc[VOC_CLASSES.index("bird") - 1] == "bird avian"
    assert len(params.dataset("coco").prompt_names) == 80
    assert params.dataset("voc").prompt_template == params.dataset("coco").prompt_template == "a clean origami {}."


def test_attention_only_for_last_blocks():
    model = tiny_clip()
    out = clip_visual_forward(model.visual, torch.randn(1, 3, 32, 32), attn_blocks=2)
    assert sorted(out.attentions) == [1, 2]


def test_dense_embeddings_are_ln_post_proj_of_patch_tokens():
    model = tiny_clip()
    torch.manual_seed(3)
    x = torch.randn(2, 3, 32, 32)
    out = clip_visual_forward(model.visual, x)
    last = out.tokens[-1]
    assert out.dense.shape == (2, 16, 16)          # (B, N = 4*4, E = embed_dim)
    by_hand = F.layer_norm(last[:, 1:], (last.shape[-1],), model.visual.ln_post.weight, model.visual.ln_post.bias,
                           model.visual.ln_post.eps) @ model.visual.proj
    torch.testing.assert_close(out.dense, by_hand, atol=1e-6, rtol=1e-5)
    # the CLS row of the same computation is the pooled embedding
    cls = F.layer_norm(last[:, 0], (last.shape[-1],), model.visual.ln_post.weight, model.visual.ln_post.bias,
                       model.visual.ln_post.eps) @ model.visual.proj
    torch.testing.assert_close(out.pooled, cls, atol=1e-6, rtol=1e-5)


# ------------------------------------------------- positional embeddings

def test_pos_embed_identity_at_native_size():
    model = tiny_clip()
    pe = model.visual.positional_embedding
    assert torch.equal(resample_positional_embedding(pe, (4, 4)), pe)


def bilinear_by_hand(pos_embed: torch.Tensor, grid: tuple[int, int], num_prefix: int = 1) -> torch.Tensor:
    """Bilinear resize of a square patch embedding with half-pixel centres (the convention of CLIP-ES's
    `F.upsample(..., mode="bilinear")`), written out in numpy: an independent reference."""
    pe = pos_embed.detach().double().numpy()
    patches = pe[num_prefix:]
    n0 = int(round(len(patches) ** 0.5))
    square = patches.reshape(n0, n0, -1)

    def taps(out_size):
        src = np.maximum((np.arange(out_size) + 0.5) * n0 / out_size - 0.5, 0.0)
        low = np.floor(src).astype(int)
        return low, np.minimum(low + 1, n0 - 1), src - low

    y0, y1, fy = taps(grid[0])
    x0, x1, fx = taps(grid[1])
    rows = square[y0] * (1 - fy)[:, None, None] + square[y1] * fy[:, None, None]
    out = rows[:, x0] * (1 - fx)[None, :, None] + rows[:, x1] * fx[None, :, None]
    return torch.from_numpy(np.concatenate([pe[:num_prefix], out.reshape(grid[0] * grid[1], -1)])).float()


@pytest.mark.parametrize("grid", [(4, 6), (6, 4), (2, 3), (8, 8), (12, 10)])
def test_pos_embed_interpolation_is_bilinear_as_clip_es(grid):
    model = tiny_clip()
    pe = model.visual.positional_embedding
    got = resample_positional_embedding(pe, grid)
    assert got.shape == (1 + grid[0] * grid[1], pe.shape[1])
    torch.testing.assert_close(got, bilinear_by_hand(pe, grid), atol=1e-6, rtol=1e-6)
    assert torch.equal(got[0], pe[0])              # CLS position untouched
    # bicubic (timm's DINO convention) is a different embedding at these grids
    bicubic = resample_abs_pos_embed(pe[None], new_size=list(grid), old_size=[4, 4], num_prefix_tokens=1,
                                     interpolation="bicubic", antialias=False)[0]
    assert (got - bicubic).abs().max() > 1e-3


def test_pos_embed_interpolation_keeps_row_major_layout():
    """A pos-embed that varies only along rows stays constant along columns (and vice versa) at (4, 6)."""
    n0, d = 4, 5
    rows = torch.arange(n0, dtype=torch.float32)[:, None, None].expand(n0, n0, d)
    cols = torch.arange(n0, dtype=torch.float32)[None, :, None].expand(n0, n0, d)
    for field, check in ((rows, "rows"), (cols, "cols")):
        pe = torch.cat([torch.zeros(1, d), field.reshape(n0 * n0, d)])
        out = resample_positional_embedding(pe, (4, 6))[1:].reshape(4, 6, d)
        if check == "rows":   # height unchanged: every row keeps its value across all 6 columns
            torch.testing.assert_close(out, rows[:, :1].expand(4, 6, d), atol=1e-5, rtol=0)
        else:                 # varies along width only: all rows identical
            torch.testing.assert_close(out, out[:1].expand(4, 6, d), atol=1e-6, rtol=0)
            assert (out[0, 1:, 0] - out[0, :-1, 0] >= -1e-6).all()   # monotone left -> right


def test_non_square_forward_equals_open_clip_with_resized_pos_embed():
    model = tiny_clip()
    torch.manual_seed(4)
    x = torch.randn(2, 3, 32, 48)                  # patch 8 -> grid (4, 6)
    out = clip_visual_forward(model.visual, x, attn_blocks=3)
    assert out.grid == (4, 6)
    assert out.dense.shape == (2, 24, 16)
    assert out.tokens[-1].shape == (2, 25, 24)
    assert all(a.shape == (2, 25, 25) for a in out.attentions.values())
    resized = copy.deepcopy(model)
    resized.visual.positional_embedding = nn.Parameter(bilinear_by_hand(model.visual.positional_embedding, (4, 6)),
                                                       requires_grad=False)
    with torch.no_grad():
        expected = resized.encode_image(x)
    torch.testing.assert_close(out.pooled, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("size", [(30, 32), (32, 36)])
def test_size_not_multiple_of_patch_raises(size):
    model = tiny_clip()
    with pytest.raises(ValueError, match="multiple of the patch"):
        clip_visual_forward(model.visual, torch.randn(1, 3, *size))


# ------------------------------------------------------------- GradCAM

def test_gradcam_matches_analytic_gradients():
    """scores[b, s] = mean_patches(A[b]) . V[:, class] + CLS term: the weights are V[:, class] / N exactly."""
    torch.manual_seed(5)
    b, n, d = 3, 6, 4
    acts = torch.randn(b, 1 + n, d, requires_grad=True)
    v = torch.randn(d, 5)
    classes = torch.tensor([[0, 3], [2, 0], [4, 1]])
    valid = torch.tensor([[True, True], [True, False], [True, True]])
    pooled = acts[:, 1:].mean(dim=1) @ v + (acts[:, 0] ** 2).sum(-1, keepdim=True)   # CLS grads must be ignored
    scores = pooled.gather(1, classes) * valid
    got = gradcam(acts, scores, valid)
    assert got.shape == (b, 2, n)
    for i in range(b):
        for s in range(2):
            if not valid[i, s]:
                assert torch.equal(got[i, s], torch.zeros(n))
                continue
            cam = F.relu(acts[i, 1:].detach() @ (v[:, classes[i, s]] / n))
            expected = (cam - cam.min()) / (cam.max() - cam.min())
            torch.testing.assert_close(got[i, s], expected, atol=1e-6, rtol=1e-5)


def test_hirescam_weights_each_patch_by_its_own_gradient():
    """scores[b, s] = sum_p A[b, p] . W[p, :, class]: patch p's gradient is W[p, :, class] exactly."""
    torch.manual_seed(7)
    b, n, d = 2, 5, 3
    acts = torch.randn(b, 1 + n, d, requires_grad=True)
    w = torch.randn(n, d, 4)
    classes = torch.tensor([[1, 3], [0, 2]])
    valid = torch.ones(2, 2, dtype=torch.bool)
    def scores():
        return torch.einsum("bpd,pdc->bc", acts[:, 1:], w).gather(1, classes)

    got = gradcam(acts, scores(), valid, weighting="hirescam")
    for i in range(b):
        for s in range(2):
            cam = F.relu((acts[i, 1:].detach() * w[:, :, classes[i, s]]).sum(-1))
            torch.testing.assert_close(got[i, s], (cam - cam.min()) / (cam.max() - cam.min()), atol=1e-6, rtol=1e-5)
    # the channel-mean weighting differs on the same scores (the weights vary over patches)
    assert not torch.allclose(got, gradcam(acts, scores(), valid))
    with pytest.raises(ValueError, match="unknown CAM weighting"):
        gradcam(acts, scores(), valid, weighting="bogus")


def test_minmax_keeps_tiny_cams_on_the_full_range():
    from ssr.cam import minmax_normalise

    cam = torch.tensor([[0.0, 1e-7, 3e-7], [2.0, 2.0, 2.0]])
    out = minmax_normalise(cam)
    torch.testing.assert_close(out[0], torch.tensor([0.0, 1 / 3, 1.0]))
    assert torch.equal(out[1], torch.zeros(3))


LABELS = [[1, 3], [2], [1, 2, 4]]


@pytest.fixture
def batch_setup(tmp_path, tokenizer):
    backbones = make_backbones(tmp_path, tokenizer, tiny_clip(), tiny_dino(patch_size=8, img_size=32))
    torch.manual_seed(6)
    images = torch.rand(3, 3, 32, 32)
    regions = torch.randint(0, NUM_REGIONS, (3, 32, 32))
    return backbones, images, regions


def test_batched_cams_equal_per_image_cams(batch_setup):
    """Every Table 3 row of a 3-image batch equals running each image alone; CMPA heads non-trivial, BN in train mode."""
    backbones, images, regions = batch_setup
    model = make_ssr(backbones, randomise_heads=True).train()
    batched = run_cams(backbones, model, images, LABELS, regions)
    assert model.training and model.isa.training   # eval_mode restored train mode
    assert set(batched.rows) == set(ABLATION_ROWS)
    for b, present in enumerate(LABELS):
        alone = run_cams(backbones, model, images[b:b + 1], [present], regions[b:b + 1])
        n = len(present)
        for row in ABLATION_ROWS:
            torch.testing.assert_close(batched.rows[row][b, :n], alone.rows[row][0, :n], atol=1e-4, rtol=1e-4)
            assert torch.equal(batched.rows[row][b, n:], torch.zeros_like(batched.rows[row][b, n:]))
        torch.testing.assert_close(batched.method[b, :n], alone.method[0, :n], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("head", ["projection", "residual"])
def test_batched_cam_equals_the_clip_es_reference(batch_setup, head):
    """The batched 'cam' row equals CLIP-ES's GradCAM: hooks on open_clip's last ln_1, the mean of the
    ln_post'ed patch tokens @ proj through ISA, one forward + backward per image x class."""
    backbones, images, regions = batch_setup
    model = make_ssr(backbones, head=head, randomise_heads=True)
    batched = run_cams(backbones, model, images, LABELS, regions)
    reference = reference_cams(backbones, model, images, LABELS)
    for b, present in enumerate(LABELS):
        ref = reference[b]
        assert (ref.amax(dim=-1) > 0.5).all(), "degenerate reference CAM: test would be vacuous"
        torch.testing.assert_close(batched.cam[b, :len(present)], ref, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("wrong", [{"layer": "block_input"}, {"pooling": "cls"}])
def test_the_reference_tells_the_wrong_readings_apart(batch_setup, wrong):
    """The reference is not blind to the two earlier deviations: hooking the block's input instead of
    ln_1's output, or scoring the CLS embedding instead of the patch mean, gives other CAMs than ours."""
    backbones, images, regions = batch_setup
    model = make_ssr(backbones, randomise_heads=True)
    batched = run_cams(backbones, model, images, LABELS, regions)
    other = reference_cams(backbones, model, images, LABELS, **wrong)
    gaps = [(batched.cam[b, :len(p)] - other[b]).abs().max().item() for b, p in enumerate(LABELS)]
    assert max(gaps) > 0.05, gaps


def test_zero_init_residual_cmpa_reproduces_plain_clip_cam(batch_setup):
    backbones, images, regions = batch_setup
    with_heads = make_ssr(backbones, enabled=True, head="residual").train()
    plain = make_ssr(backbones, enabled=False)
    assert with_heads.use_cmpa and not plain.use_cmpa
    a = run_cams(backbones, with_heads, images, LABELS, regions)
    b = run_cams(backbones, plain, images, LABELS, regions)
    for row in ABLATION_ROWS:
        torch.testing.assert_close(a.rows[row], b.rows[row], atol=1e-7, rtol=0)
    torch.testing.assert_close(a.method, b.method, atol=1e-7, rtol=0)
    # Control: once the heads are no longer zero the CAM moves, so the comparison above is not vacuous;
    # the paper's projection heads change it from the start.
    for model in (make_ssr(backbones, head="residual", randomise_heads=True), make_ssr(backbones, head="projection")):
        c = run_cams(backbones, model, images, LABELS, regions)
        assert not torch.allclose(c.cam, b.cam, atol=1e-3)


def test_non_square_refined_cams_and_labels(tmp_path, tokenizer):
    backbones = make_backbones(tmp_path, tokenizer, tiny_clip(), tiny_dino(patch_size=8, img_size=32))
    model = make_ssr(backbones, randomise_heads=True)
    torch.manual_seed(7)
    images = torch.rand(2, 3, 32, 48)
    regions = torch.randint(0, NUM_REGIONS, (2, 32, 48))
    labels = [[2, 4], [3]]
    out = run_cams(backbones, model, images, labels, regions)
    assert out.grid == (4, 6)
    for row in ABLATION_ROWS:
        assert out.rows[row].shape == (2, 2, 24)
    assert out.method.shape == (2, 2, 24)
    assert out.visual.dense.shape == (2, 24, backbones.embed_dim)
    assert out.visual.tokens[-1].shape == (2, 25, backbones.width)

    # the non-square CAM equals the reference loop run with the interpolated pos-embed
    pe = bilinear_by_hand(backbones.clip.visual.positional_embedding, (4, 6))
    reference = reference_cams(backbones, model, images, labels, pos_embed=pe)
    for b, present in enumerate(labels):
        torch.testing.assert_close(out.cam[b, :len(present)], reference[b], atol=1e-5, rtol=1e-4)

    classes, valid = class_slots(labels)
    maps = cams_to_labels(out.method, classes, valid, out.grid, (32, 48), PseudoLabelParams())
    assert maps.shape == (2, 32, 48) and maps.dtype == torch.long
    for b, present in enumerate(labels):
        assert set(maps[b].unique().tolist()) <= {0, *present}


def test_cams_to_labels_non_square_layout():
    """A CAM active on the left half of a (4, 6) grid labels the left half of the 32x48 image, not a transposed blob."""
    grid = (4, 6)
    left = torch.zeros(4, 6)
    left[:, :3] = 1.0
    top = torch.zeros(4, 6)
    top[:2, :] = 1.0
    cams = torch.stack([left.flatten(), top.flatten()])[:, None]       # (B=2, S=1, N=24)
    classes, valid = class_slots([[3], [2]])
    maps = cams_to_labels(cams, classes, valid, grid, (32, 48), PseudoLabelParams())
    assert maps.shape == (2, 32, 48)
    assert (maps[0, :, :20] == 3).all() and (maps[0, :, 28:] == 0).all()
    assert (maps[1, :12, :] == 2).all() and (maps[1, 20:, :] == 0).all()


# ----------------------------------------------------------------- DINO

def _timm_unfused_last_attention(model, images):
    """Full head-averaged attention of the last block via timm's own unfused path (hook on attn_drop)."""
    attn = model.blocks[-1].attn
    captured = {}
    old = attn.fused_attn
    attn.fused_attn = False
    handle = attn.attn_drop.register_forward_hook(lambda m, a, o: captured.__setitem__("attn", o))
    norm_handle = model.blocks[-1].norm1.register_forward_hook(lambda m, a, o: captured.__setitem__("y", o))
    try:
        with torch.no_grad():
            model.forward_features(images)
    finally:
        handle.remove()
        norm_handle.remove()
        attn.fused_attn = old
    return captured["attn"].mean(dim=1), captured["y"]


def test_dino_last_attention_on_clip_grid(tmp_path, tokenizer):
    dino = tiny_dino(patch_size=16, img_size=64)
    clip = tiny_clip(image_size=64, patch_size=16)
    torch.manual_seed(8)
    images = torch.rand(2, 3, 64, 96)
    got = dino_last_attention(dino, images)
    grid = clip_visual_forward(clip.visual, images).grid
    assert grid == (4, 6)
    assert got.shape == (2, 24, 24)

    full, y = _timm_unfused_last_attention(dino, images)
    assert full.shape == (2, 25, 25)
    torch.testing.assert_close(got, full[:, 1:, 1:], atol=1e-6, rtol=1e-5)
    # rows of the full attention sum to 1: patch-to-patch rows plus the attention paid to CLS
    torch.testing.assert_close(got.sum(-1) + full[:, 1:, 0], torch.ones(2, 24), atol=1e-5, rtol=0)
    assert (got >= 0).all()

    # by hand from the last block's qkv on its norm1 output
    attn = dino.blocks[-1].attn
    h = attn.num_heads
    q, k, _ = attn.qkv(y).reshape(2, 25, 3, h, -1).unbind(2)
    w = (q.transpose(1, 2) @ k.transpose(1, 2).transpose(-1, -2) * (q.shape[-1] ** -0.5)).softmax(-1).mean(1)
    torch.testing.assert_close(got, w[:, 1:, 1:], atol=1e-6, rtol=1e-5)

    # the whole CAM path runs with this DINO on the CLIP grid, including the DINO and SGC rows
    backbones = make_backbones(tmp_path, tokenizer, clip, dino)
    out = run_cams(backbones, make_ssr(backbones), images, [[1], [2, 3]], torch.randint(0, NUM_REGIONS, (2, 64, 96)))
    assert out.grid == (4, 6)
    assert out.rows["dino"].shape == out.rows["sgc"].shape == (2, 2, 24)


def test_dino_grid_mismatch_is_reported(tmp_path, tokenizer):
    backbones = make_backbones(tmp_path, tokenizer, tiny_clip(), tiny_dino(patch_size=16, img_size=64))
    with pytest.raises(ValueError, match="patch sizes must match"):
        run_cams(backbones, make_ssr(backbones), torch.rand(1, 3, 32, 32), [[1]], None)


def test_load_dino_random_init_is_frozen_and_any_size():
    model = load_dino("vit_small_patch16_224", pretrained=False)
    assert not model.training
    assert not any(p.requires_grad for p in model.parameters())
    attn = dino_last_attention(model, torch.rand(1, 3, 32, 48))
    assert attn.shape == (1, 6, 6)
