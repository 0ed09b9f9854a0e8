"""The demo CLIP stage: open_clip's own classes and loss, a folder open_clip's loader
reads back, provenance, an evaluation that can tell a good model from chance, and resume."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

import ssr.demo_clip as demo_clip
from ssr.backbones import load_clip
from ssr.config import DemoClipParams, DemoParams, load_params

TINY = DemoClipParams(embed_dim=16, vision_width=24, vision_layers=2, vision_heads=2, patch_size=8, text_width=16,
                      text_layers=1, text_heads=2, context_length=16, steps=4, batch_size=8, lr=1e-3, warmup=1,
                      eval_images=8, threads=1)
DEMO = DemoParams(image_size=32)


def test_pretrain_writes_a_folder_open_clip_loads_with_provenance(tmp_path):
    prov = demo_clip.pretrain(tmp_path, TINY, DEMO, progress=False, eval_every=2)
    model, tokenizer = load_clip("demo", demo_dir=tmp_path)
    assert model.visual.conv1.kernel_size == (8, 8) and model.visual.transformer.width == 24
    saved = json.loads((tmp_path / "provenance.json").read_text())
    assert saved["steps"] == 4 and saved["seed"] == TINY.seed and [h["step"] for h in saved["history"]] == [2, 4]
    assert saved["held_out_zero_shot_map"] == pytest.approx(prov["held_out_zero_shot_map"]) == saved["history"][-1]["map"]
    assert {"device", "wall_seconds", "config", "held_out_ap"} <= saved.keys()
    assert not (tmp_path / demo_clip.RESUME_FILE).exists()
    # the fp16 file round-trips into the fp32 model open_clip builds
    image = torch.rand(2, 3, 32, 32)
    assert torch.isfinite(model.encode_image(image)).all()
    assert tokenizer(["a photo of a circle."]).shape == (1, 16)


def test_average_precision_against_a_direct_computation():
    rng = np.random.default_rng(0)
    scores, positives = rng.random(50), rng.random(50) < 0.3
    order = np.argsort(-scores)
    hits = positives[order]
    expected = np.mean([hits[: k + 1].mean() for k in np.flatnonzero(hits)])
    assert demo_clip.average_precision(scores, positives) == pytest.approx(expected)
    assert demo_clip.average_precision(positives.astype(float), positives) == 1.0


def test_zero_shot_map_rewards_a_model_that_knows_the_classes(tmp_path):
    """A model whose image embedding *is* the class indicator scores mAP 1; a random one does not."""
    demo = DemoParams(image_size=32)

    class Oracle(torch.nn.Module):
        def encode_text(self, tokens, normalize=True):
            return torch.eye(len(demo.classes), 8)[: len(tokens)]

        def encode_image(self, images, normalize=True):
            # recover the samples from their rendering order: the oracle reads the true labels
            return torch.nn.functional.normalize(self.truth[: len(images)] + 1e-3, dim=-1)

    oracle = Oracle()
    oracle.logit_scale = torch.tensor(math.log(100.0))
    samples = [demo_clip.render_sample(demo, "clip_eval", i) for i in range(40)]
    oracle.truth = torch.tensor(np.array([[(s.label == c + 1).any() for c in range(4)] + [0] * 4 for s in samples]),
                                dtype=torch.float32)
    tokenizer = lambda texts: torch.zeros(len(texts), 4)  # noqa: E731
    assert demo_clip.zero_shot_map(oracle, tokenizer, demo, 40)["map"] == pytest.approx(1.0)
    oracle.truth = torch.rand(40, 8)
    assert demo_clip.zero_shot_map(oracle, tokenizer, demo, 40)["map"] < 0.9


def test_zero_shot_map_compares_classes_within_an_image():
    """Prompts sharing a direction and clutter growing with the object count make an
    image's raw cosines fall below other images' negatives, while each image still
    ranks its own classes first: the softmax protocol scores 1, the raw cosine less."""
    demo = DemoParams(image_size=32)
    samples = [demo_clip.render_sample(demo, "clip_eval", i) for i in range(60)]
    truth = torch.tensor(np.array([[(s.label == c + 1).any() for c in range(4)] for s in samples]), dtype=torch.float32)

    class Cluttered(torch.nn.Module):
        logit_scale = torch.tensor(math.log(100.0))

        def encode_text(self, tokens, normalize=True):
            shared = torch.zeros(4, 8)
            shared[:, 4] = 1.0
            return torch.nn.functional.normalize(torch.eye(4, 8) + shared, dim=-1)

        def encode_image(self, images, normalize=True):
            n = len(images)
            extra = torch.zeros(n, 4)
            extra[:, 0] = 1.0
            extra[:, 1] = 3 * (truth[:n].sum(1) - 1)
            return torch.nn.functional.normalize(torch.cat([truth[:n], extra], dim=1), dim=-1)

    tokenizer = lambda texts: torch.zeros(len(texts), 4)  # noqa: E731
    assert sorted(set(truth.sum(1).tolist())) == [1.0, 2.0, 3.0]
    result = demo_clip.zero_shot_map(Cluttered(), tokenizer, demo, 60)
    assert result["map"] == pytest.approx(1.0)
    assert result["map_cosine"] < 0.95


def test_the_committed_demo_clip_matches_params_yaml():
    """Editing how the demo is drawn or how its CLIP is trained, without re-running
    `ssr demo-clip`, would leave `make demo` on a CLIP trained for another domain."""
    repo = Path(__file__).resolve().parents[1]
    params = load_params(repo / "params.yaml")
    saved = json.loads((repo / "ssr" / "assets" / "demo_clip" / "provenance.json").read_text())
    # Split sizes only say how many dataset images to draw; threads only change speed.
    drawn = params.demo.model_dump(exclude={"num_train", "num_val"})
    assert drawn == {k: saved["demo_params"][k] for k in drawn}
    trained = params.demo_clip.model_dump(exclude={"threads"})
    assert trained == {k: saved["params"][k] for k in trained}
