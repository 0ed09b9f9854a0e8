"""`ssr export`: the ONNX graph run by onnxruntime gives PyTorch's logits at other sizes than it was traced at,
and the README's recipe segments an image with it, without ssr."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import pytest
import torch
from torch import nn

import ssr
from ssr.cli import main as ssr_main
from ssr.data.layout import DatasetLayout
from ssr.export import SegmentationNetwork

REPO = Path(__file__).resolve().parents[1]
UNIT_ROUNDOFF = 2.0 ** -24   # float32


@pytest.fixture(scope="module")
def exported(trained_demo, tmp_path_factory):
    path, params = trained_demo
    run = Path(params.results_root) / "demo" / "method" / "seed0"
    out = tmp_path_factory.mktemp("onnx") / "demo.onnx"
    assert ssr_main(["export", "--model", str(run), "--out", str(out), "--params", str(path), "--quiet"]) == 0
    trained = ssr.load_model(run, demo_clip_dir=Path(params.demo_clip.checkpoint).parent)
    return out, trained, DatasetLayout(params.dataset_root("demo"))


def rounding_bound(network: nn.Module, tokens: int) -> float:
    """A first-order bound, relative to the logits' scale, on how far two float32 evaluations of the network that
    sum in different orders can differ: each dot product of length n carries at most n * u relative error (Higham,
    Accuracy and Stability of Numerical Algorithms, 3.1), and these add up along the layers; a Linear or
    convolution reduces over its inputs, an attention over the tokens twice (scores and weighted sum)."""
    lengths = 0
    for module in network.modules():
        if isinstance(module, nn.Linear):
            lengths += module.in_features
        elif isinstance(module, nn.Conv2d):
            lengths += module.in_channels * module.kernel_size[0] * module.kernel_size[1]
        elif isinstance(module, nn.MultiheadAttention):
            lengths += 2 * tokens
    return lengths * UNIT_ROUNDOFF


@pytest.mark.parametrize("batch, height, width", [(1, 32, 48), (2, 56, 24)], ids=["32x48", "2x56x24"])
def test_onnxruntime_gives_pytorchs_logits_at_other_sizes(exported, batch, height, width):
    """Neither size is the traced one (2 x 16 x 24): the patch grid and the positional embedding follow the input."""
    path, trained, layout = exported
    network = SegmentationNetwork(trained.backbones, trained.model).eval()
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    images = torch.rand(batch, 3, height, width, generator=torch.Generator().manual_seed(height))
    with torch.no_grad():
        expected = network(images).numpy()
    (logits,) = session.run(None, {"image": images.numpy()})
    patch = trained.backbones.patch_size
    assert logits.shape == expected.shape == (batch, len(trained.classes), height // patch, width // patch)
    tokens = 1 + (height // patch) * (width // patch)
    tolerance = rounding_bound(network, tokens) * float(np.abs(expected).max())
    assert np.abs(logits - expected).max() <= tolerance
    # labels: equal wherever the top two logits are further apart than the two evaluations can differ
    top2 = np.sort(expected, axis=1)[:, -2:]
    decided = top2[:, 1] - top2[:, 0] > 2 * tolerance
    assert decided.mean() > 0.5, "the comparison would cover too few pixels to say anything"
    np.testing.assert_array_equal(logits.argmax(1)[decided], expected.argmax(1)[decided])


def test_the_graph_names_its_inputs_and_records_the_classes(exported):
    path, trained, _ = exported
    model = onnx.load(str(path))
    dims = [d.dim_param or d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
    assert [model.graph.input[0].name, *dims] == ["image", "batch", 3, "height", "width"]
    meta = {p.key: json.loads(p.value) for p in model.metadata_props}
    assert meta["classes"] == trained.classes and meta["patch_size"] == trained.backbones.patch_size
    assert meta["infer"]["scales"] == trained.infer.scales


def test_the_readme_recipe_segments_an_image_without_ssr(exported, tmp_path):
    """The README's code runs as written (only the two file names replaced) and labels the image like ssr.predict
    without DenseCRF at one scale without flip, up to pixels whose probabilities tie within rounding."""
    path, trained, layout = exported
    readme = (REPO / "README.md").read_text()
    code = re.search(r"```python\n(# Run the exported model without ssr.*?)```", readme, re.S)
    assert code, "README: no python block starting with '# Run the exported model without ssr'"
    source = code.group(1).replace('"model.onnx"', repr(str(path)))
    image_path = layout.image_path(layout.split("val")[0])
    source = source.replace('"photo.jpg"', repr(str(image_path)))
    namespace: dict = {}
    exec(compile(source, "README.md", "exec"), namespace)
    labels = namespace["labels"]
    labels_ssr, probs = ssr.predict(trained, image_path, crf=False, scales=[1.0], flip=False, probabilities=True)
    assert labels.shape == labels_ssr.shape
    top2 = np.sort(probs, axis=0)[-2:]
    decided = top2[1] - top2[0] > 1e-3        # 2**-10: far above float32 rounding of a softmax of bounded logits
    np.testing.assert_array_equal(labels[decided], labels_ssr[decided])
