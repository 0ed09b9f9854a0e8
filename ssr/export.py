"""`ssr export`: the inference network as ONNX, to run without ssr or PyTorch.

The exported graph is CLIP's image encoder and the trained decoder, up to the logits:

    input  "image"   float32 (B, 3, H, W): RGB in [0, 1], H and W multiples of the patch size
    output "logits"  float32 (B, C + 1, H / patch, W / patch): class scores, class 0 = background

CLIP's own normalisation is part of the graph; H and W are dynamic (the positional embedding is
resampled to the patch grid inside it). What the graph leaves to its caller is what
`ssr.predict` does around the network: resizing to the long side, the scales and flips,
softmax and upsampling, DenseCRF. The model's metadata (`metadata_props`) records the class
names, the patch size and the recorded inference settings, as JSON.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from torch import nn

from ssr.backbones import clip_visual_forward
from ssr.data.layout import atomic_path
from ssr.data.transforms import normalise

logger = logging.getLogger(__name__)

OPSET = 18


class SegmentationNetwork(nn.Module):
    """CLIP's image encoder and the SSR decoder: (B, 3, H, W) RGB in [0, 1] -> (B, C + 1, H / p, W / p) logits."""

    def __init__(self, backbones, model):
        super().__init__()
        self.visual = backbones.clip.visual
        self.decoder = model.decoder
        self.blocks = backbones.depth - 1
        self.register_buffer("mean", backbones.clip_mean.detach().clone())
        self.register_buffer("std", backbones.clip_std.detach().clone())

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        visual = clip_visual_forward(self.visual, normalise(image, self.mean, self.std))
        logits, _ = self.decoder(visual.tokens[: self.blocks], visual.grid)
        return logits


def export_onnx(trained, out: str | Path) -> Path:
    """Write `trained` (from `ssr.load_model`) as ONNX to `out`, atomically; -> `out`.

    torch.export traces the network once with symbolic batch, height and width (height and
    width as multiples of the patch size), so the graph holds the patch grid's arithmetic
    and the positional embedding's resampling for every size.
    """
    import onnx
    from torch.export import Dim

    out = Path(out)
    patch = trained.backbones.patch_size
    side = trained.config["dataset_params"]["long_side"]
    network = SegmentationNetwork(trained.backbones, trained.model).eval().cpu()
    # two images, two grid sizes: torch.export would specialise a dimension traced at size 1
    example = torch.rand(2, 3, 2 * patch, 3 * patch)
    grid = {"min": 1, "max": 1024}
    shapes = {"image": {0: Dim("batch", min=1, max=4096), 2: patch * Dim("grid_height", **grid),
                        3: patch * Dim("grid_width", **grid)}}
    with torch.no_grad():
        program = torch.onnx.export(network, (example,), input_names=["image"], output_names=["logits"],
                                    dynamic_shapes=shapes, opset_version=OPSET, dynamo=True, verbose=False)
    graph = program.model_proto
    # readable names for the dynamic axes (torch.export names them by their symbols)
    for value, names in ((graph.graph.input[0], ("batch", None, "height", "width")),
                         (graph.graph.output[0], ("batch", None, "grid_height", "grid_width"))):
        for dim, name in zip(value.type.tensor_type.shape.dim, names, strict=True):
            if name is not None:
                dim.dim_param = name
    metadata = {"classes": trained.classes, "patch_size": patch, "long_side": side, "infer": trained.infer.model_dump(),
                "dataset": trained.config.get("dataset"), "run": trained.config.get("run"), "seed": trained.config.get("seed")}
    for key, value in metadata.items():
        entry = graph.metadata_props.add()
        entry.key, entry.value = key, json.dumps(value)
    onnx.checker.check_model(graph)
    with atomic_path(out) as tmp:
        onnx.save(graph, str(tmp))
    logger.info("wrote %s: %d ONNX nodes, opset %d", out, len(graph.graph.node), OPSET)
    return out
