"""SSR: Semantic and Spatial Rectification for CLIP-based weakly supervised semantic segmentation.

    import ssr
    model = ssr.load_model("results/voc/method/seed0")   # the folder `ssr train` wrote
    labels = ssr.predict(model, image)                    # a path, PIL image or array -> (H, W) class indices
"""

__version__ = "0.1.0"


def load_model(path, **kwargs):
    """A trained SSR model, rebuilt from its folder (model.json + model.safetensors); see ssr.checkpoint.load_model."""
    from ssr.checkpoint import load_model as load

    return load(path, **kwargs)


def predict(model, image, **kwargs):
    """Segment an image (a path, a PIL image or an array) with a model from `load_model`; see ssr.infer.predict."""
    from ssr.infer import predict as run

    return run(model, image, **kwargs)


__all__ = ["__version__", "load_model", "predict"]
