"""The attention measures (`ssr.attention_quality`) that say, before use, whether a demo backbone's
attention finds the shapes: the CLS-attention IoU and the own-object share of patch attention."""

from __future__ import annotations

import pytest
import torch

from ssr import attention_quality as aq
from ssr.backbones import clip_visual_forward, load_clip
from ssr.config import DemoParams


def test_mass_mask_keeps_the_smallest_top_set_holding_the_mass():
    attention = torch.tensor([[0.15, 0.5, 0.05, 0.3]])
    # 0.5 alone holds less than 0.6; 0.5 + 0.3 holds 0.8: those two, not the 0.15
    assert aq.mass_mask(attention, 0.6).tolist() == [[False, True, False, True]]
    assert aq.mass_mask(attention, 0.5).tolist() == [[False, True, False, False]]
    assert aq.mass_mask(attention * 7, 0.6).tolist() == [[False, True, False, True]]  # unnormalised rows
    assert aq.mass_mask(attention, 1.0).all()


def test_attention_iou_on_a_hand_made_map():
    """A 2x2 patch grid over 4x4 pixels: attention keeps the top-left and bottom-right patches."""
    attention = torch.tensor([[[0.5, 0.05], [0.15, 0.3]]])
    foreground = torch.zeros(1, 4, 4, dtype=torch.bool)
    foreground[0, :2, :2] = True          # exactly the top-left patch
    foreground[0, 3, 0] = True            # one pixel of the bottom-left patch, which is not kept
    # kept pixels: 8; foreground: 5; intersection: 4; union: 9
    assert aq.attention_iou(attention, foreground, 0.6).tolist() == pytest.approx([4 / 9])
    assert aq.attention_iou(attention, foreground, 0.5).tolist() == pytest.approx([4 / 5])


def test_patch_objects_takes_the_object_covering_most_of_a_patch():
    """A 2x2 grid of 2x2-pixel patches."""
    instances = torch.tensor([[[1, 1, 2, 2],
                               [1, 1, 2, 0],
                               [1, 1, 0, 0],
                               [2, 0, 0, 0]]])
    # top-left all object 1; top-right 3/4 object 2; bottom-left half 1, a quarter 2: no majority
    assert aq.patch_objects(instances, (2, 2)).tolist() == [[1, 2, 0, 0]]
    assert aq.patch_objects(torch.zeros(1, 4, 4, dtype=torch.long), (2, 2)).tolist() == [[0, 0, 0, 0]]
    with pytest.raises(ValueError, match="not a multiple"):
        aq.patch_objects(instances, (3, 3))


def test_own_object_share_on_a_hand_made_attention():
    """4 patches: object 1 on patches 0 and 1, object 2 on patch 2, background on patch 3."""
    objects = torch.tensor([[1, 1, 2, 0]])
    attention = torch.tensor([[[2.0, 1.0, 1.0, 0.0],     # row 0: 3/4 on its object (patches 0, 1)
                               [0.0, 1.0, 0.0, 3.0],     # row 1: 1/4
                               [1.0, 1.0, 1.0, 1.0],     # row 2: 1/4 on patch 2 alone
                               [9.0, 9.0, 9.0, 9.0]]])   # background rows are not measured
    got = aq.own_object_share(attention, objects)
    share, patch_share = (3 / 4 + 1 / 4 + 1 / 4) / 3, (2 / 4 + 2 / 4 + 1 / 4) / 3
    assert got["patches"] == 3
    assert got["share"] == pytest.approx(share) and got["patch_share"] == pytest.approx(patch_share)
    assert got["ratio"] == pytest.approx(share / patch_share)
    # attention blind to objects (uniform rows) scores exactly its patch share: ratio 1
    assert aq.own_object_share(torch.ones(1, 4, 4), objects)["ratio"] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="no patch"):
        aq.own_object_share(attention, torch.zeros(1, 4, dtype=torch.long))


def test_patch_label_shares_counts_each_patch_s_pixels():
    """A 2x2 grid of 2x2-pixel patches, labels 0..2."""
    labels = torch.tensor([[[1, 1, 0, 1],
                            [1, 1, 0, 0],
                            [0, 0, 0, 0],
                            [0, 0, 0, 2]]])
    assert aq.patch_label_shares(labels, (2, 2), 3).tolist() == [[[0, 1, 0], [0.75, 0.25, 0], [1, 0, 0], [0.75, 0, 0.25]]]
    with pytest.raises(ValueError, match="expected 0..1"):
        aq.patch_label_shares(labels, (2, 2), 2)


def test_object_oracle_on_hand_made_shares():
    """Patch 0 all object 1, patch 1 half object 1, patch 2 background, patch 3 a quarter object 2."""
    shares = torch.tensor([[[0, 1, 0], [0.5, 0.5, 0], [1, 0, 0], [0.75, 0, 0.25]]])
    oracle = aq.object_oracle(shares, touch=0.25)
    background_row = torch.tensor([0, 0.5, 1, 0.75]) / 2.25       # by each patch's background share
    expected = torch.stack([torch.tensor([2 / 3, 1 / 3, 0, 0]),    # shares 1 and 0.5 of object 1
                            torch.tensor([2 / 3, 1 / 3, 0, 0]),
                            background_row,
                            background_row])                       # 0.25 object does not exceed touch
    assert torch.allclose(oracle[0], expected, atol=1e-6)
    # below `touch`, patch 3 attends to the only patch holding object 2: itself
    assert torch.allclose(aq.object_oracle(shares, touch=0.2)[0, 3], torch.tensor([0.0, 0, 0, 1]))


def test_clip_patch_attention_is_the_mean_of_its_last_blocks(tiny_clip_dir):
    """The tiny CLIP has 3 blocks: clip_blocks 8 averages all of them (capped at depth), 1 only the last."""
    visual = load_clip("demo", demo_dir=tiny_clip_dir)[0].visual
    images = torch.randn(2, 3, 32, 32)
    full = clip_visual_forward(visual, images, attn_blocks=3).attentions
    assert torch.allclose(aq.clip_patch_attention(visual, images, 1), full[2][:, 1:, 1:], atol=1e-6)
    everything = (full[0] + full[1] + full[2])[:, 1:, 1:] / 3
    assert torch.allclose(aq.clip_patch_attention(visual, images, 8), everything, atol=1e-6)
    assert torch.allclose(aq.clip_cls_attention(visual, images).flatten(1), full[2][:, 0, 1:], atol=1e-6)


def test_measure_clip_on_held_out_demo_images(tiny_clip_dir):
    clip = load_clip("demo", demo_dir=tiny_clip_dir)[0]
    held_out = aq.eval_samples(DemoParams(image_size=32), "clip_eval", 12)
    assert held_out["images"].shape == (12, 3, 32, 32) and held_out["instances"].shape == (12, 32, 32)
    assert torch.equal(held_out["instances"] > 0, held_out["foreground"])
    got = aq.measure_clip(clip, held_out, 0.6, 8)
    assert 0 <= got["cls_iou"] <= 1 and 0 < got["own_object_share"] < 1
    assert got["own_object_ratio"] == pytest.approx(got["own_object_share"] / got["own_object_patch_share"])
    objects = aq.patch_objects(held_out["instances"], (4, 4))
    assert got["own_object_patches"] == int((objects > 0).sum())
