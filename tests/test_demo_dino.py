"""The demo DINO stage: timm's own ViT trained by DINO self-distillation, a folder timm's
pretrained loader reads back through `load_dino("demo")`, resume, and the attention metric
that says whether its attention finds the shapes."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

import ssr.demo_dino as demo_dino
from ssr.backbones import dino_last_attention, dino_normalisation, load_dino
from ssr.cli import main
from ssr.config import DemoDinoParams, DemoParams, load_params
from ssr.data.demo import STREAMS

TINY = DemoDinoParams(width=24, depth=2, heads=2, patch_size=8, head_hidden=32, head_bottleneck=16, prototypes=64,
                      steps=4, batch_size=4, local_crops=2, local_size=16, teacher_temp_warmup=2, warmup=1,
                      freeze_last_layer=1, eval_images=8, threads=1)
DEMO = DemoParams(image_size=64)
REPO = Path(__file__).resolve().parents[1]


def test_pretrain_writes_a_folder_load_dino_reads_with_provenance(tmp_path):
    prov = demo_dino.pretrain(tmp_path, TINY, DEMO, progress=False, eval_every=2)
    model = load_dino("demo", demo_dir=tmp_path)
    assert model.patch_embed.patch_size == (8, 8) and model.embed_dim == 24 and len(model.blocks) == 2
    assert not any(q.requires_grad for q in model.parameters()) and not model.training
    assert dino_normalisation(model) == (tuple(demo_dino.MEAN), tuple(demo_dino.STD))
    saved = json.loads((tmp_path / "provenance.json").read_text())
    assert saved["steps"] == 4 and [h["step"] for h in saved["history"]] == [2, 4]
    assert all(math.isfinite(h["loss"]) and h["loss"] > 0 for h in saved["history"])
    assert saved["attention_iou"]["dino"] == pytest.approx(prov["attention_iou"]["dino"])
    assert 0 <= saved["attention_iou"]["dino"] <= 1 and "clip" not in saved["attention_iou"]
    assert {"device", "wall_seconds", "config", "attention_protocol"} <= saved.keys()
    assert not (tmp_path / demo_dino.RESUME_FILE).exists()

    images = torch.rand(3, 3, 64, 64)
    attention = dino_last_attention(model, images)
    assert attention.shape == (3, 64, 64) and (attention >= 0).all()
    # Patch-to-patch rows are the softmax rows without the CLS column: together they are stochastic.
    full = demo_dino.last_block_attention(model, images)
    assert torch.allclose(full.sum(-1), torch.ones(3, 2, 65), atol=1e-5)
    assert torch.allclose(attention, full.mean(dim=1)[:, 1:, 1:], atol=1e-6)
    assert torch.allclose(attention.sum(-1) + full.mean(dim=1)[:, 1:, 0], torch.ones(3, 64), atol=1e-5)


def test_fp16_weights_load_into_the_fp32_model_timm_builds(tmp_path):
    torch.manual_seed(0)
    backbone = demo_dino.build(TINY, 64).backbone.eval()
    demo_dino.save(tmp_path, backbone, demo_dino.export_config(TINY, 64))
    loaded = load_dino("demo", demo_dir=tmp_path)
    state = loaded.state_dict()
    assert state.keys() == backbone.state_dict().keys()
    assert all(v.dtype == torch.float32 and torch.equal(v, backbone.state_dict()[k].half().float()) for k, v in state.items())


def test_load_dino_demo_reports_a_missing_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="ssr demo-dino"):
        load_dino("demo", demo_dir=tmp_path)


def test_mass_mask_keeps_the_smallest_top_set_holding_the_mass():
    attention = torch.tensor([[0.15, 0.5, 0.05, 0.3]])
    # 0.5 alone holds less than 0.6; 0.5 + 0.3 holds 0.8: those two, not the 0.15
    assert demo_dino.mass_mask(attention, 0.6).tolist() == [[False, True, False, True]]
    assert demo_dino.mass_mask(attention, 0.5).tolist() == [[False, True, False, False]]
    assert demo_dino.mass_mask(attention * 7, 0.6).tolist() == [[False, True, False, True]]  # unnormalised rows
    assert demo_dino.mass_mask(attention, 1.0).all()


def test_attention_iou_on_a_hand_made_map():
    """A 2x2 patch grid over 4x4 pixels: attention keeps the top-left and bottom-right patches."""
    attention = torch.tensor([[[0.5, 0.05], [0.15, 0.3]]])
    foreground = torch.zeros(1, 4, 4, dtype=torch.bool)
    foreground[0, :2, :2] = True          # exactly the top-left patch
    foreground[0, 3, 0] = True            # one pixel of the bottom-left patch, which is not kept
    # kept pixels: 8; foreground: 5; intersection: 4; union: 9
    assert demo_dino.attention_iou(attention, foreground, 0.6).tolist() == pytest.approx([4 / 9])
    assert demo_dino.attention_iou(attention, foreground, 0.5).tolist() == pytest.approx([4 / 5])


def test_dino_loss_against_a_direct_computation():
    torch.manual_seed(0)
    b, k = 3, 5
    student, teacher, centre = torch.randn(4 * b, k), torch.randn(2 * b, k), torch.randn(k)
    got = demo_dino.dino_loss(student, teacher, centre, 0.1, 0.04)
    expected, pairs = 0.0, 0
    for t in range(2):
        target = torch.softmax((teacher[t * b:(t + 1) * b] - centre) / 0.04, -1)
        for v in range(4):
            if v != t:
                expected += -(target * torch.log_softmax(student[v * b:(v + 1) * b] / 0.1, -1)).sum(-1).mean()
                pairs += 1
    assert pairs == 6 and got.item() == pytest.approx(expected.item() / pairs, rel=1e-6)
    # where both global views agree, a student giving the centred, sharpened teacher
    # distribution on every view reaches the floor: the targets' entropy
    same = torch.cat([teacher[:b]] * 2)
    target = torch.softmax((teacher[:b] - centre) / 0.04, -1)
    matched = torch.cat([(teacher[:b] - centre) / 0.04 * 0.1] * 4)
    entropy = -(target * target.log()).sum(-1).mean()
    assert demo_dino.dino_loss(matched, same, centre, 0.1, 0.04).item() == pytest.approx(entropy.item(), rel=1e-5)
    assert demo_dino.dino_loss(student, same, centre, 0.1, 0.04) > entropy + 1


def test_views_are_a_function_of_the_rng_and_have_the_right_sizes():
    images = torch.rand(4, 3, 64, 64)
    a = demo_dino.views(images, np.random.default_rng(5), TINY)
    b = demo_dino.views(images, np.random.default_rng(5), TINY)
    assert [tuple(v.shape) for v in a] == [(4, 3, 64, 64)] * 2 + [(4, 3, 16, 16)] * TINY.local_crops
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    assert not torch.equal(a[0], demo_dino.views(images, np.random.default_rng(6), TINY)[0])


def test_cls_attention_and_the_streams():
    torch.manual_seed(0)
    backbone = demo_dino.build(TINY, 64).backbone.eval()
    cls = demo_dino.dino_cls_attention(backbone, torch.rand(2, 3, 64, 64))
    assert cls.shape == (2, 8, 8) and (cls > 0).all() and (cls.sum(dim=(1, 2)) < 1).all()
    assert len(set(STREAMS.values())) == len(STREAMS) and {"dino_train", "dino_eval"} <= STREAMS.keys()


def test_cli_demo_dino_writes_the_folder_and_scores_the_clip(tmp_path, tiny_params_file, capsys):
    path, _ = tiny_params_file(**{f"demo_dino.{k}": v for k, v in TINY.model_dump().items() if k != "checkpoint"})
    assert main(["demo-dino", "--params", str(path), "--out", str(tmp_path / "dino"), "--quiet"]) == 0
    assert "demo DINO written to" in capsys.readouterr().out
    saved = json.loads((tmp_path / "dino" / "provenance.json").read_text())
    assert set(saved["attention_iou"]) == {"dino", "clip"} and saved["demo_params"]["image_size"] == 32
    assert load_dino("demo", demo_dir=tmp_path / "dino").patch_embed.grid_size == (4, 4)


def test_the_committed_demo_dino_matches_params_yaml():
    """Editing how the demo is drawn or how its DINO is trained, without re-running
    `ssr demo-dino`, would leave the committed record describing another model."""
    params = load_params(REPO / "params.yaml")
    saved = json.loads((REPO / "ssr" / "assets" / "demo_dino" / "provenance.json").read_text())
    # Split sizes only say how many dataset images to draw; threads only change speed.
    drawn = params.demo.model_dump(exclude={"num_train", "num_val"})
    assert drawn == {k: saved["demo_params"][k] for k in drawn}
    trained = params.demo_dino.model_dump(exclude={"threads"})
    assert trained == {k: saved["params"][k] for k in trained}
    assert saved["config"] == json.loads(json.dumps(demo_dino.export_config(params.demo_dino, params.demo.image_size)))
    # SSR fuses the DINO and CLIP attentions patch by patch (Eq. 9): the grids must agree.
    clip = json.loads((REPO / "ssr" / "assets" / "demo_clip" / "open_clip_config.json").read_text())["model_cfg"]["vision_cfg"]
    assert (saved["config"]["model_args"]["patch_size"], saved["config"]["model_args"]["img_size"]) == (
        clip["patch_size"], clip["image_size"])


def test_demo_dino_weights_are_committed_only_when_their_attention_beats_the_demo_clip():
    """The DINO row of Table 3 is worth running on the demo only with a DINO whose attention
    finds the shapes better than CLIP's own; otherwise the record stays and the weights do not."""
    folder = REPO / "ssr" / "assets" / "demo_dino"
    quality = json.loads((folder / "provenance.json").read_text())["attention_iou"]
    assert (folder / demo_dino.WEIGHTS_FILE).is_file() == (quality["dino"] > quality["clip"])
    assert (folder / demo_dino.CONFIG_FILE).is_file() == (folder / demo_dino.WEIGHTS_FILE).is_file()
