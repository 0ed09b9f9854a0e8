"""One SSR training step as the paper defines it: what Eq. 2 pools with, where the labels come
from, and how the prototypes exist before the first step.

Tiny random-init CLIP of conftest, a 12-image demo dataset prepared once for the module.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import write_tiny_params

from ssr.cam import class_slots
from ssr.cli import _backbones_by_run
from ssr.cli import main as ssr_main
from ssr.cmpa import masked_average_pool
from ssr.data.dataset import collate
from ssr.data.transforms import unit_images
from ssr.model import refined_cams
from ssr.train import Trainer, micro_batch_loss, prepare_micro_batch, step_counts, warm_up_prototypes


@pytest.fixture(scope="module")
def dataset(tmp_path_factory, tiny_clip_dir):
    base = tmp_path_factory.mktemp("step")
    path, _ = write_tiny_params(base / "prep", base / "data", tiny_clip_dir)
    for stage in ("prepare", "superpixels"):
        assert ssr_main([stage, "--dataset", "demo", "--params", str(path), "--quiet"]) == 0

    def make(name: str, **overrides):
        _, params = write_tiny_params(base / name, base / "data", tiny_clip_dir, **overrides)
        backbones = _backbones_by_run(params, "demo", torch.device("cpu"))("method")
        return Trainer(params, "demo", base / name / "run", seed=0, run="method", device=torch.device("cpu"),
                       backbones=backbones, rank=0, world=1, progress=False)

    return make


def _batch(trainer, ids=(0, 1, 2, 3)):
    return collate([trainer.data[(0, i)] for i in ids])


def test_eq2_pools_the_projected_patches_with_the_gradcam_not_the_refined_cam(dataset):
    trainer = dataset("eq2")
    params, model, backbones = trainer.params, trainer.model, trainer.backbones
    batch = _batch(trainer)
    m = prepare_micro_batch(backbones, model, batch, params, num_regions=params.superpixels.n_clusters, par=False)
    classes, valid = class_slots(batch["labels"])
    cams = refined_cams(backbones, model, unit_images(batch["image"]), classes, valid, batch["regions"], params.affinity,
                        params.sgc, num_regions=params.superpixels.n_clusters, rows=(), fast=params.train.fast_path)
    torch.testing.assert_close(m.cam, cams.cam.detach(), atol=1e-6, rtol=0)
    assert not torch.allclose(m.cam, cams.method, atol=1e-3), "refined and initial CAM coincide: the test would not bite"

    model.train()
    _, parts = micro_batch_loss(backbones, model, m, params, trainer.preset, step_counts([m], torch.device("cpu")))
    f_image, labels, keep = parts["bank"]      # the fast path's every slot, and which are valid
    f_image, labels = f_image[keep], labels[keep]
    expected = masked_average_pool(model.isa(m.dense), cams.cam.detach())[valid]
    torch.testing.assert_close(f_image, expected.detach(), atol=1e-5, rtol=1e-5)
    assert torch.equal(labels, classes[valid])


def test_gt_supervision_trains_the_decoder_on_the_true_masks(dataset):
    trainer = dataset("gt", **{"train.supervision": "gt"})
    batch = _batch(trainer)
    assert "gt" in batch
    m = prepare_micro_batch(trainer.backbones, trainer.model, batch, trainer.params,
                            num_regions=trainer.params.superpixels.n_clusters, par=False)
    assert torch.equal(m.labels, batch["gt"])
    pseudo = dataset("pseudo")
    p = prepare_micro_batch(pseudo.backbones, pseudo.model, _batch(pseudo), pseudo.params,
                            num_regions=pseudo.params.superpixels.n_clusters, par=False)
    assert not torch.equal(p.labels, batch["gt"])


def test_par_changes_the_online_labels_when_on(dataset):
    trainer = dataset("par")
    batch = _batch(trainer)
    args = dict(num_regions=trainer.params.superpixels.n_clusters)
    plain = prepare_micro_batch(trainer.backbones, trainer.model, batch, trainer.params, par=False, **args)
    refined = prepare_micro_batch(trainer.backbones, trainer.model, batch, trainer.params, par=True, **args)
    assert refined.labels.shape == plain.labels.shape
    assert not torch.equal(refined.labels, plain.labels)
    # PAR moves scores between the classes an image has; it never invents one
    for b, present in enumerate(batch["labels"]):
        assert set(refined.labels[b].unique().tolist()) <= {0, *present}


def test_prototypes_come_from_several_batches_before_the_first_step(dataset):
    """With one image per micro-batch no single batch holds every class: the warm-up reads on
    until each class has `cmpa.warmup_per_class` features, and only then clusters."""
    trainer = dataset("warmup", **{"train_presets.demo.batch_size": 1, "cmpa.warmup_per_class": 2})
    bank = trainer.model.bank
    assert not bool(bank.ready)
    first = trainer.data[(0, int(next(iter(trainer.loader(0).sampler))[1]))]["labels"]
    assert len(first) < bank.num_classes, "the first image holds every class: the test would not bite"
    read = warm_up_prototypes(trainer.backbones, trainer.model, trainer.loader(0), trainer.params, max_batches=len(trainer.data))
    assert read > 1
    assert bool(bank.ready) and (bank.class_counts() >= 2).all()
    # no prototype is its projected prompt, the fallback of a class without features
    prompts = torch.nn.functional.normalize(trainer.model.adapt_text(trainer.backbones.text[: bank.num_classes]).detach(), dim=-1)
    assert not torch.isclose(bank.image_prototypes, prompts, atol=1e-4).all(dim=-1).any()


def test_prototypes_are_refreshed_every_refresh_every_iterations(dataset, monkeypatch):
    trainer = dataset("refresh", **{"train_presets.demo.refresh_every": 2, "train_presets.demo.iterations": 5})
    calls = []
    real = type(trainer.model.bank).refresh

    def spy(bank, *args, **kwargs):
        calls.append(trainer.state.iteration)
        return real(bank, *args, **kwargs)

    monkeypatch.setattr(type(trainer.model.bank), "refresh", spy)
    from ssr.train import _run

    _run(trainer, None)
    # once for the warm-up (iteration 0), then after steps 2 and 4 (state.iteration still 1 and 3 then)
    assert calls == [0, 1, 3]
    assert Path(trainer.out_dir / "model.safetensors").is_file()
