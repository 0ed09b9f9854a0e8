"""The training step's fast operators (`train.fast_path`) against the reference ones they replace.

Each fast operator computes the same function in fewer or better-shaped device operations; on
the CPU it must agree with the reference either exactly (where the arithmetic is the same) or
to a tolerance derived from float32 rounding (u = 2^-24 = 6e-8), stated per test. The Triton
PAR kernels have their own file (tests/test_par_triton.py).

Tolerance of a reassociated reduction: summing K float32 terms in another order changes the
result by at most about K u times the sum of their magnitudes, and typically by sqrt(K) u.
CAMs are min-max normalised to [0, 1]; their longest upstream reductions are the ViT's
(width 24 and MLP 96 for the tiny model here), so orders differing per reduction leave them
within ~1e-6, and 1e-5 bounds them with room for the ~10 chained products of a block.
"""

from __future__ import annotations

import copy

import numpy as np
import open_clip
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from test_backbones_cam import LABELS, make_backbones, make_ssr, tiny_clip, tiny_dino
from torch.utils._python_dispatch import TorchDispatchMode

from ssr.affinity import average_attention
from ssr.backbones import FrozenCache, clip_visual_forward, dino_last_attention, resample_positional_embedding
from ssr.cam import _slot_gradients, class_slots, gradcam, gradcam_at_qkv, present_class_probs
from ssr.config import AffinityParams, PseudoLabelParams, SgcParams
from ssr.data.dataset import DecodedCache
from ssr.data.transforms import channels_first, to_unit, unit_images
from ssr.decoder import upsample_bilinear
from ssr.model import cams_to_labels, eval_mode, refined_cams
from ssr.sgc import region_onehot, region_onehot_compact, region_sums, sgc_mask

CAM_TOLERANCE = 1e-5    # on [0, 1] CAMs; see the module docstring


@pytest.fixture(scope="module")
def tokenizer():
    return open_clip.SimpleTokenizer(context_length=16)


@pytest.fixture
def setup(tmp_path, tokenizer):
    backbones = make_backbones(tmp_path, tokenizer, tiny_clip(), tiny_dino(patch_size=8, img_size=32))
    model = make_ssr(backbones, randomise_heads=True)
    torch.manual_seed(6)
    return backbones, model, torch.rand(3, 3, 32, 32), torch.randint(0, 4, (3, 32, 32))


def _probs(backbones, model, visual, classes, valid):
    with eval_mode(model.isa, model.tsa), torch.enable_grad():
        image = model.isa(visual.dense.float()).mean(dim=1)
        return present_class_probs(image, model.tsa(backbones.text), backbones.clip.logit_scale.exp().float(), classes,
                                   valid, backbones.num_foreground)


def _cams(backbones, model, images, weighting, *, batched=False, fast=False, at_qkv=False):
    classes, valid = class_slots(LABELS)
    x = (images - backbones.clip_mean) / backbones.clip_std
    visual = clip_visual_forward(backbones.clip.visual, x, attn_blocks=2, cam_grad=True, fast=fast, cam_at_qkv=at_qkv)
    probs = _probs(backbones, model, visual, classes, valid)
    if at_qkv:
        return gradcam_at_qkv(visual.cam_activations, visual.cam_qkv, visual.cam_in_proj_weight, probs, valid)
    return gradcam(visual.cam_activations, probs, valid, weighting=weighting, batched=batched)


# ---------------------------------------------------------------- GradCAM


@pytest.mark.parametrize("weighting", ["gradcam", "hirescam"])
def test_one_batched_backward_gives_the_per_slot_cams(setup, weighting):
    """is_grads_batched vmaps the slots' backward passes: the same gradients, but its batched matrix
    products sum in another order than the per-slot ones (not bit for bit on this CPU's BLAS)."""
    backbones, model, images, _ = setup
    per_slot = _cams(backbones, model, images, weighting)
    batched = _cams(backbones, model, images, weighting, batched=True)
    assert (batched - per_slot).abs().max() < CAM_TOLERANCE
    assert per_slot.amax(dim=-1)[class_slots(LABELS)[1]].min() == 1.0    # real CAMs, not all zero
    # each slot's CAM is its own: swapping two slots' CAMs breaks the comparison
    assert (batched[:, [1, 0, 2]] - per_slot)[2].abs().max() > 0.1


def test_slot_gradients_are_each_slots_own(setup):
    backbones, model, images, _ = setup
    classes, valid = class_slots(LABELS)
    x = (images - backbones.clip_mean) / backbones.clip_std
    visual = clip_visual_forward(backbones.clip.visual, x, cam_grad=True)
    probs = _probs(backbones, model, visual, classes, valid)
    alone = torch.stack([torch.autograd.grad(probs[:, s].sum(), visual.cam_activations, retain_graph=True)[0]
                         for s in range(probs.shape[1])])
    grads = _slot_gradients(probs, visual.cam_activations)
    scale = alone.abs().max()
    assert scale > 0
    torch.testing.assert_close(grads, alone, atol=1e-5 * scale, rtol=0)
    assert (grads[[1, 0, 2]] - alone).abs().max() > 1e-2 * scale          # slots are not interchangeable


def test_stopping_the_backward_at_qkv_gives_gradcam(setup):
    """(sum_p dL/dqkv_p) W is the patch-summed gradient at ln_1's output, exactly in real arithmetic."""
    backbones, model, images, _ = setup
    reference = _cams(backbones, model, images, "gradcam")
    at_qkv = _cams(backbones, model, images, "gradcam", fast=True, at_qkv=True)
    assert (at_qkv - reference).abs().max() < CAM_TOLERANCE
    # HiResCAM's per-patch weighting is another function: the comparison can tell them apart
    assert (_cams(backbones, model, images, "hirescam") - reference).abs().max() > 0.05


def test_cam_at_qkv_needs_the_fast_forward(setup):
    backbones, _, images, _ = setup
    with pytest.raises(ValueError, match="fast path"):
        clip_visual_forward(backbones.clip.visual, images, cam_grad=True, cam_at_qkv=True)


def test_present_classes_and_slots_without_indexing():
    """class_slots builds on the host; present_class_probs marks present classes by a scatter of counts."""
    classes, valid = class_slots([[3], [], [1, 2, 4]])
    assert classes.tolist() == [[2, 0, 0], [0, 0, 0], [0, 1, 3]]
    assert valid.tolist() == [[True, False, False], [False, False, False], [True, True, True]]
    torch.manual_seed(0)
    image, text = torch.randn(3, 8), torch.randn(7, 8)                    # 4 foreground + 3 background prompts
    probs = present_class_probs(image, text, 10.0, classes, valid, 4)
    logits = 10.0 * F.normalize(image, dim=-1) @ F.normalize(text, dim=-1).T
    # image 0: class 3 (index 2) against the background only; its padded slots (class 0) do not count
    expected = logits[0, [2, 4, 5, 6]].softmax(dim=0)[0]
    torch.testing.assert_close(probs[0], torch.stack([expected, torch.tensor(0.0), torch.tensor(0.0)]))
    assert torch.equal(probs[1], torch.zeros(3))


# ---------------------------------------------------------------- the fast CLIP forward


def test_fast_forward_equals_the_reference_forward(setup):
    backbones, _, images, _ = setup
    visual = backbones.clip.visual
    depth = len(visual.transformer.resblocks)
    x = (images - backbones.clip_mean) / backbones.clip_std
    reference = clip_visual_forward(visual, x, attn_blocks=2, cam_grad=True)
    fast = clip_visual_forward(visual, x, attn_blocks=2, cam_grad=True, fast=True, cache=FrozenCache())
    for a, b in zip(fast.tokens, reference.tokens, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fast.pooled, reference.pooled, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fast.dense, reference.dense, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fast.cam_activations, reference.cam_activations, atol=1e-5, rtol=1e-5)
    expected = average_attention([reference.attentions[i] for i in range(depth - 2, depth)])
    torch.testing.assert_close(fast.patch_attention, expected, atol=1e-6, rtol=1e-5)
    assert fast.attentions == {} and fast.cam_activations.requires_grad
    # the average is over the right blocks: all three blocks' average differs
    everything = average_attention([reference.attentions[i] for i in range(depth - 2, depth)] + [
        clip_visual_forward(visual, x, attn_blocks=depth).attentions[0]])
    assert (everything - fast.patch_attention).abs().max() > 1e-3


def test_frozen_cache_casts_as_autocast_and_follows_the_weights():
    torch.manual_seed(0)
    layer = torch.nn.Linear(16, 8).requires_grad_(False)
    x = torch.randn(4, 16)
    cache = FrozenCache()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        by_autocast = layer(x)
        by_cache = F.linear(x, cache.cast(layer.weight, torch.bfloat16), cache.cast(layer.bias, torch.bfloat16))
    assert torch.equal(by_autocast, by_cache)
    first = cache.cast(layer.weight, torch.bfloat16)
    assert cache.cast(layer.weight, torch.bfloat16) is first                   # made once
    with torch.no_grad():
        layer.weight.mul_(2)                                                   # an in-place change (load_state_dict)
    again = cache.cast(layer.weight, torch.bfloat16)
    assert again is not first and torch.equal(again, layer.weight.to(torch.bfloat16))
    pos = torch.randn(1 + 16, 8)
    resampled = cache.positional_embedding(pos, (3, 5))
    assert torch.equal(resampled, resample_positional_embedding(pos, (3, 5)))
    assert cache.positional_embedding(pos, (3, 5)) is resampled
    assert cache.positional_embedding(pos, (4, 4)).shape == (17, 8)


def test_fast_forward_under_bf16_autocast_uses_the_cached_casts(setup):
    """Under autocast the fast forward's products take the cache's bf16 weights (no fp32 weight
    reaches a matrix product) and agree with the reference forward to bf16 rounding."""
    backbones, _, images, _ = setup
    visual = backbones.clip.visual
    x = (images - backbones.clip_mean) / backbones.clip_std
    cache = FrozenCache()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        reference = clip_visual_forward(visual, x)
        with RecordOps() as ops:
            fast = clip_visual_forward(visual, x, fast=True, cache=cache)
    cast_weights = {id(entry[2]) for entry in cache._entries.values()}
    assert len(cast_weights) >= 4 * len(visual.transformer.resblocks)         # in_proj, out_proj, c_fc, c_proj per block
    fp32_weights = [name for name, arg in ops.matmul_args if arg.dtype == torch.float32 and arg.dim() == 2]
    assert fp32_weights == []
    # bf16: u = 2^-8; a product of three roundings per token across three blocks
    torch.testing.assert_close(fast.pooled.float(), reference.pooled.float(), atol=0.1, rtol=0.05)


class RecordOps(TorchDispatchMode):
    """The aten operators run inside, and the operands of the matrix products."""

    def __init__(self):
        super().__init__()
        self.names, self.matmul_args = [], []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.name()
        self.names.append(name)
        if name in ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm"):
            self.matmul_args += [(name, a) for a in args if isinstance(a, torch.Tensor)]
        return func(*args, **(kwargs or {}))


# ---------------------------------------------------------------- DINO


@pytest.mark.parametrize("amp", [False, True])
def test_fast_dino_stops_at_the_last_attention_and_matches(amp):
    dino = tiny_dino(patch_size=16, img_size=64)
    torch.manual_seed(8)
    images = torch.rand(2, 3, 64, 96)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
        reference = dino_last_attention(dino, images)
        cache = FrozenCache()
        fast = dino_last_attention(dino, images, fast=True, cache=cache)
        again = dino_last_attention(dino, images, fast=True, cache=cache)
    # the same operators on the same values up to the last block's norm1, then the same attention
    assert torch.equal(fast, reference) and torch.equal(again, reference)
    calls = {"mlp": 0}
    handle = dino.blocks[-1].mlp.register_forward_hook(lambda *_: calls.update(mlp=calls["mlp"] + 1))
    try:
        dino_last_attention(dino, images, fast=True)
        assert calls["mlp"] == 0
        dino_last_attention(dino, images)
        assert calls["mlp"] == 1
    finally:
        handle.remove()


# ---------------------------------------------------------------- SGC


def test_compact_region_onehot_is_the_onehot_from_any_integer_type():
    torch.manual_seed(0)
    region_map = torch.randint(0, 6, (2, 9, 11))
    region_map[0, 0, :3] = 255                                                 # padding ids are dropped
    expected = region_onehot(region_map, 5)
    assert torch.equal(region_onehot_compact(region_map, 5), expected)
    assert torch.equal(region_onehot_compact(region_map.to(torch.uint8), 5), expected)
    assert torch.equal(region_onehot(region_map.to(torch.uint8), 5), expected)


def test_split_k_region_sums_equal_the_einsum():
    """Chunks of `chunk` pixels summed apart then together: a reassociation of K = H*W terms in [0, 1]."""
    torch.manual_seed(1)
    values = torch.rand(2, 6, 40, 56)
    regions = region_onehot(torch.randint(0, 8, (2, 40, 56)), 8)
    expected = torch.einsum("bshw,brhw->bsr", values, regions)
    for chunk in (64, 1000, 4096):                                            # padding to a multiple too
        torch.testing.assert_close(region_sums(values, regions, chunk), expected, atol=0, rtol=40 * 56 * 2**-24)


def test_fast_sgc_masks_equal_the_reference():
    torch.manual_seed(2)
    cam = torch.rand(3, 2, 16) ** 3
    region_map = F.interpolate(torch.randint(0, 4, (3, 1, 4, 4)).float(), size=(32, 32), mode="nearest")[:, 0].long()
    for denominator in ("region", "image"):
        kwargs = {"t_hi": 0.4, "rho": 0.3, "patch_area": 0.5, "denominator": denominator}
        expected = sgc_mask(cam, region_map, 4, (4, 4), **kwargs)
        assert 0 < expected.mean() < 1, "all or nothing masked: the test would not bite"
        assert torch.equal(sgc_mask(cam, region_map.to(torch.uint8), 4, (4, 4), fast=True, **kwargs), expected)


# ---------------------------------------------------------------- decoder upsampling


@pytest.mark.parametrize("sizes", [((20, 20), (320, 320)), ((3, 5), (17, 41)), ((8, 8), (5, 6)), ((4, 4), (4, 4))])
def test_upsampling_by_two_products_equals_interpolate(sizes):
    """Forward and backward: the same two taps per output, summed with zeros in a GEMM (exact) or in another order."""
    (h, w), size = sizes
    torch.manual_seed(3)
    x = torch.randn(2, 3, h, w, requires_grad=True)
    grad = torch.randn(2, 3, *size)
    expected = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
    (expected_grad,) = torch.autograd.grad(expected, x, grad)
    got = upsample_bilinear(x, size)
    (got_grad,) = torch.autograd.grad(got, x, grad)
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-6)
    # the backward sums (H/h)(W/w) output gradients per input: K u relative to their magnitude
    torch.testing.assert_close(got_grad, expected_grad, atol=size[0] * size[1] / (h * w) * 4 * 2**-24 * 8, rtol=1e-5)
    assert upsample_bilinear(x.double(), size).dtype == torch.float64


# ---------------------------------------------------------------- the whole CAM pass


def test_fast_cam_pass_and_labels_equal_the_reference(setup):
    backbones, model, images, regions = setup
    classes, valid = class_slots(LABELS)
    pl = PseudoLabelParams(par_iterations=3, par_dilations=[1, 2])
    out = {}
    for fast in (False, True):
        cams = refined_cams(backbones, model, images, classes, valid, regions, AffinityParams(), SgcParams(),
                            num_regions=4, rows=(), fast=fast)
        labels = cams_to_labels(cams.method, classes, valid, cams.grid, (32, 32), pl, images=images, par=True, fast=fast)
        out[fast] = cams, labels
    assert (out[True][0].cam - out[False][0].cam).abs().max() < CAM_TOLERANCE
    # the refined CAM is min-max normalised again after a 2-step random walk: range-magnified rounding
    assert (out[True][0].method - out[False][0].method).abs().max() < 10 * CAM_TOLERANCE
    assert torch.equal(out[True][1], out[False][1])


# ---------------------------------------------------------------- host syncs

SYNC_OPS = ("aten::nonzero", "aten::_local_scalar_dense", "aten::item", "aten::is_nonzero", "aten::masked_select")


def test_the_fast_micro_batch_issues_no_host_sync(dataset_trainer):
    """On a GPU these operators wait for the device (a boolean index is a nonzero); the fast CAM pass
    and loss issue none, the reference issues several (so the test can fail)."""
    from ssr.train import micro_batch_loss, prepare_micro_batch, step_counts

    trainer, batch = dataset_trainer
    for fast, expect_syncs in ((True, False), (False, True)):
        params = trainer.params.model_copy(update={"train": trainer.params.train.model_copy(update={"fast_path": fast})})
        with RecordOps() as ops:
            m = prepare_micro_batch(trainer.backbones, trainer.model, batch, params,
                                    num_regions=params.superpixels.n_clusters, par=True)
            loss, _ = micro_batch_loss(trainer.backbones, trainer.model, m, params, trainer.preset,
                                       step_counts([m], torch.device("cpu")))
        syncs = [name for name in ops.names if name in SYNC_OPS]
        assert bool(syncs) == expect_syncs, (fast, syncs)


@pytest.fixture
def dataset_trainer(tmp_path, tiny_clip_dir):
    from conftest import write_tiny_params

    from ssr.cli import _backbones_by_run
    from ssr.cli import main as ssr_main
    from ssr.data.dataset import collate
    from ssr.train import Trainer

    path, params = write_tiny_params(tmp_path, tmp_path / "data", tiny_clip_dir)
    for stage in ("prepare", "superpixels"):
        assert ssr_main([stage, "--dataset", "demo", "--params", str(path), "--quiet"]) == 0
    backbones = _backbones_by_run(params, "demo", torch.device("cpu"))("method")
    trainer = Trainer(params, "demo", tmp_path / "run", seed=0, run="method", device=torch.device("cpu"),
                      backbones=backbones, rank=0, world=1, progress=False)
    return trainer, collate([trainer.data[(0, i)] for i in range(4)])


def test_fast_and_reference_micro_batches_agree(dataset_trainer):
    """The same labels, and the same loss and gradients to rounding, through the whole micro-batch."""
    from ssr.train import micro_batch_loss, prepare_micro_batch, step_counts

    trainer, batch = dataset_trainer
    results = {}
    start = copy.deepcopy(trainer.model.state_dict())    # the loss's BatchNorm updates running statistics
    for fast in (True, False):
        params = trainer.params.model_copy(update={"train": trainer.params.train.model_copy(update={"fast_path": fast})})
        trainer.model.load_state_dict(start)
        trainer.model.zero_grad(set_to_none=True)
        m = prepare_micro_batch(trainer.backbones, trainer.model, batch, params, num_regions=params.superpixels.n_clusters,
                                par=True)
        loss, parts = micro_batch_loss(trainer.backbones, trainer.model, m, params, trainer.preset,
                                       step_counts([m], torch.device("cpu")))
        loss.backward()
        grads = {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None}
        results[fast] = m, loss.detach(), parts, grads
    (fm, floss, fparts, fgrads), (rm, rloss, rparts, rgrads) = results[True], results[False]
    assert torch.equal(fm.labels, rm.labels)
    torch.testing.assert_close(floss, rloss, atol=0, rtol=1e-5)
    torch.testing.assert_close(fparts["loss_proto"], rparts["loss_proto"], atol=0, rtol=1e-5)
    assert fgrads.keys() == rgrads.keys()
    # rounding relative to the step's largest gradient: a bias ahead of a BatchNorm has a gradient that
    # is zero in exact arithmetic and rounding noise here, so no per-tensor relative tolerance can hold
    scale = max(g.abs().max() for g in rgrads.values())
    for name in rgrads:
        torch.testing.assert_close(fgrads[name], rgrads[name], atol=1e-5 * scale, rtol=0, msg=name)
    torch.testing.assert_close(fparts["f_image"][fparts["slot_valid"]], rparts["f_image"], atol=1e-6, rtol=1e-5)
    assert torch.equal(fparts["slot_valid"], rm.valid.flatten())


# ---------------------------------------------------------------- data on the host


def test_uint8_images_become_the_float_images_on_the_device():
    pixels = np.random.default_rng(0).integers(0, 256, (2, 5, 7, 3), dtype=np.uint8)
    pixels[0, 0, :4, 0] = [3, 6, 7, 12]            # values whose x * (1/255) rounds differently from x / 255
    expected = to_unit(pixels)
    got = unit_images(torch.stack([channels_first(p) for p in pixels]))
    assert got.dtype == torch.float32 and torch.equal(got, expected)
    assert unit_images(expected) is expected


def test_decoded_cache_returns_what_it_decoded_and_decodes_a_changed_source_again(tmp_path):
    source = tmp_path / "a.png"
    Image.fromarray(np.full((4, 5, 3), 7, np.uint8)).save(source)
    cache = DecodedCache(tmp_path / "cache")
    calls = []

    def decode():
        calls.append(1)
        return np.asarray(Image.open(source))

    first = cache.get("rgb", "dir/a", source, decode)
    assert np.array_equal(cache.get("rgb", "dir/a", source, decode), first)
    assert len(calls) == 1
    Image.fromarray(np.full((4, 6, 3), 9, np.uint8)).save(source)              # same id, new content
    assert cache.get("rgb", "dir/a", source, decode).shape == (4, 6, 3) and len(calls) == 2
    for stored in (tmp_path / "cache").glob("*.npy"):                          # a damaged file is made again
        stored.write_bytes(b"not numpy")
    assert cache.get("rgb", "dir/a", source, decode).shape == (4, 6, 3) and len(calls) == 3


def test_compact_and_cached_crops_are_the_same_crops(dataset_trainer, tmp_path):
    from ssr.data.dataset import TrainCrops

    trainer, _ = dataset_trainer
    root = trainer.params.dataset_root("demo")
    kwargs = {"crop_size": 32, "scale_min": 0.5, "scale_max": 2.0, "superpixels": root / "superpixels.h5", "with_gt": True}
    plain = TrainCrops(root, "train", **kwargs)
    compact = TrainCrops(root, "train", compact=True, **kwargs)
    cached = TrainCrops(root, "train", compact=True, cache_dir=tmp_path / "decoded", **kwargs)
    for key in [(0, 0), (1, 3), (2, 5)]:
        a, b = plain[key], compact[key]
        for item in (b, cached[key], cached[key]):                             # the second read comes from the cache
            assert item["image"].dtype == item["regions"].dtype == item["gt"].dtype == torch.uint8
            assert torch.equal(unit_images(item["image"][None])[0], a["image"])
            assert torch.equal(item["regions"].long(), a["regions"]) and torch.equal(item["gt"].long(), a["gt"])
    assert len(list((tmp_path / "decoded").glob("*.rgb.*.npy"))) == 3
    assert len(list((tmp_path / "decoded").glob("*.regions.*.npy"))) == 3


def test_num_workers_auto_is_the_free_cores_and_threads_cap_it(tiny_params_file, monkeypatch):
    from ssr.cli import _limit_threads
    from ssr.config import available_cpus

    monkeypatch.setattr("os.sched_getaffinity", lambda _pid: set(range(6)), raising=False)
    assert available_cpus(16) == 5 and available_cpus(4) == 4
    _, params = tiny_params_file(**{"train.num_workers": "auto"})
    assert params.train.num_workers == 5
    assert _limit_threads(2, params).train.num_workers == 2
    _, params = tiny_params_file(**{"train.num_workers": 0})
    assert params.train.num_workers == 0 and _limit_threads(2, params).train.num_workers == 0
    monkeypatch.setattr("os.sched_getaffinity", lambda _pid: {0}, raising=False)
    assert available_cpus(16) == 0          # one core: the main process loads the data itself
