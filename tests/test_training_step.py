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
from ssr.cmpa import class_means, masked_average_pool
from ssr.data.dataset import collate
from ssr.data.transforms import unit_images
from ssr.model import eval_mode, initial_cams, refined_cams
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
    # the fast path keeps every slot's f_image and which slots are valid
    f_image = parts["f_image"][parts["slot_valid"]] if "slot_valid" in parts else parts["f_image"]
    expected = masked_average_pool(model.isa(m.dense), cams.cam.detach())[valid]
    torch.testing.assert_close(f_image, expected.detach(), atol=1e-5, rtol=1e-5)


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


def test_the_first_prototypes_come_from_a_whole_pass_in_the_training_batchnorm_mode(dataset):
    """Before the first step the sample memory reads one pass over the split (every (image, class)
    sample), pooling f_image as the loss does, with BatchNorm in train mode, and leaves the running
    statistics as they were; P_I is then each class's mean."""
    trainer = dataset("warmup", **{"train_presets.demo.batch_size": 1})
    model, memory, backbones = trainer.model, trainer.memory, trainer.backbones
    torch.manual_seed(3)
    torch.nn.init.normal_(model.isa.mlp[-1].weight, std=0.5)      # heads off the identity: BatchNorm's mode matters
    stats = {k: v.clone() for k, v in model.isa.named_buffers()}
    assert not bool(model.prototypes.ready)
    read = warm_up_prototypes(backbones, model, memory, trainer.loader(0), trainer.params, max_batches=len(trainer.data))
    assert read == len(trainer.data)
    assert bool(memory.filled.all()) and bool(model.prototypes.ready)
    assert all(torch.equal(v, stats[k]) for k, v in model.isa.named_buffers())
    fallback = torch.zeros_like(model.prototypes.image)
    torch.testing.assert_close(model.prototypes.image, class_means(memory.features, memory.labels, fallback))

    index = int(next(iter(trainer.loader(0).sampler))[1])         # the first image the pass read
    batch = collate([trainer.data[(0, index)]])
    classes, valid = class_slots(batch["labels"])
    cam, visual = initial_cams(backbones, model, unit_images(batch["image"]), classes, valid, attn_blocks=0,
                               fast=trainer.params.train.fast_path)
    with torch.no_grad():
        model.isa.train()
        train_mode = masked_average_pool(model.isa(visual.dense.float()), cam)[valid]
        with eval_mode(model.isa):
            eval_pooled = masked_average_pool(model.isa(visual.dense.float()), cam)[valid]
    slots = memory.slots(batch["id"], [len(batch["labels"][0])])
    torch.testing.assert_close(memory.features[slots], torch.nn.functional.normalize(train_mode, dim=-1), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(memory.features[slots], torch.nn.functional.normalize(eval_pooled, dim=-1), atol=1e-3)


def test_prototypes_are_refreshed_every_refresh_every_iterations(dataset, monkeypatch):
    trainer = dataset("refresh", **{"train_presets.demo.refresh_every": 2, "train_presets.demo.iterations": 5})
    calls = []
    real = type(trainer.model.prototypes).refresh

    def spy(prototypes, *args, **kwargs):
        calls.append(trainer.state.iteration)
        return real(prototypes, *args, **kwargs)

    monkeypatch.setattr(type(trainer.model.prototypes), "refresh", spy)
    from ssr.train import _run

    _run(trainer, None)
    # once for the warm-up (iteration 0), then after steps 2 and 4 (state.iteration still 1 and 3 then)
    assert calls == [0, 1, 3]
    assert Path(trainer.out_dir / "model.safetensors").is_file()
