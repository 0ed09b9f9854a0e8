import numpy as np
import pytest
import torch

from ssr.config import RetrainParams
from ssr.data.layout import DatasetError, read_label_png, write_image, write_label_png
from ssr.retrain import PseudoLabelDataset, build_segmenter, load_segmenter, predict, retrain

MODEL = "lraspp_mobilenet_v3_large"  # the fastest torchvision segmenter on CPU
NUM_CLASSES = 3


def _make_data(tmp_path, n=4, size=64):
    """n images in tmp_path/images: a red (class 1) or green (class 2) square on
    grey, with the true mask written as the pseudo-label in tmp_path/pseudo."""
    rng = np.random.default_rng(0)
    ids = []
    for i in range(n):
        image = np.full((size, size, 3), 110, dtype=np.uint8)
        label = np.zeros((size, size), dtype=np.uint8)
        cls = 1 + i % 2
        top, left = rng.integers(4, size // 2, 2)
        side = size // 3
        image[top:top + side, left:left + side] = (220, 20, 20) if cls == 1 else (20, 220, 20)
        label[top:top + side, left:left + side] = cls
        label[:2] = 255  # an ignore strip, as exported labels may have
        image_id = f"img_{i}"
        write_image(tmp_path / "images" / f"{image_id}.png", image)
        write_label_png(tmp_path / "pseudo" / f"{image_id}.png", label)
        ids.append(image_id)
    return ids


def test_build_segmenter_output_shape():
    model = build_segmenter(MODEL, NUM_CLASSES).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, 48, 40))["out"]
    assert out.shape == (2, NUM_CLASSES, 48, 40)


def test_unknown_model_name_is_a_clear_error():
    with pytest.raises(ValueError, match=r"unknown segmenter 'unet'.*deeplabv3_resnet50"):
        build_segmenter("unet", NUM_CLASSES)


def test_retrain_lowers_the_loss_and_writes_a_loadable_checkpoint(tmp_path):
    ids = _make_data(tmp_path)
    out = tmp_path / "retrain" / "model.pt"
    params = RetrainParams(model=MODEL, iterations=10, batch_size=2, lr=0.05, crop_size=64, scale_min=0.9, scale_max=1.1)
    stats = retrain(tmp_path, tmp_path / "pseudo", ids[:2], out, params, num_classes=NUM_CLASSES, seed=0, progress=False)
    assert stats["iterations"] == 10
    assert stats["images_per_s"] > 0
    assert stats["final_loss"] < 0.7 * stats["first_loss"], stats
    assert [p.name for p in out.parent.iterdir()] == ["model.pt"]  # no temp file left behind

    checkpoint = torch.load(out, weights_only=True)
    assert checkpoint["model_name"] == MODEL and checkpoint["num_classes"] == NUM_CLASSES
    assert checkpoint["iterations"] == 10
    model = build_segmenter(MODEL, NUM_CLASSES)
    model.load_state_dict(checkpoint["model"])

    loaded = load_segmenter(out)
    image = np.full((50, 70, 3), 110, dtype=np.uint8)
    pred = predict(loaded, image)
    assert pred.shape == (50, 70) and pred.dtype == np.uint8
    assert pred.max() < NUM_CLASSES
    assert not loaded.training


def test_missing_pseudo_label_names_the_file(tmp_path):
    ids = _make_data(tmp_path)
    (tmp_path / "pseudo" / f"{ids[2]}.png").unlink()
    with pytest.raises(DatasetError, match=rf"pseudo[/\\]{ids[2]}\.png: pseudo-label file not found"):
        retrain(tmp_path, tmp_path / "pseudo", ids, tmp_path / "model.pt",
                RetrainParams(model=MODEL, iterations=1, batch_size=2, lr=0.01, crop_size=32), num_classes=NUM_CLASSES,
                progress=False)
    assert not (tmp_path / "model.pt").exists()


def test_dataset_augments_to_the_crop_and_pads_labels_with_ignore(tmp_path):
    ids = _make_data(tmp_path, n=1)
    ds = PseudoLabelDataset(tmp_path, tmp_path / "pseudo", ids, num_classes=NUM_CLASSES, crop_size=96, scale_range=(1.0, 1.0))
    torch.manual_seed(0)
    x, y = ds[0]
    assert x.shape == (3, 96, 96) and x.dtype == torch.float32
    assert y.shape == (96, 96) and y.dtype == torch.int64
    # A 64 px image in a 96 px crop: at least 96^2 - 64^2 padded pixels are ignore.
    assert (y == 255).sum() >= 96 * 96 - 64 * 64
    # Label values are kept as classes, not resampled into new values.
    assert set(torch.unique(y).tolist()) <= {0, 1, 255}
    original = read_label_png(tmp_path / "pseudo" / f"{ids[0]}.png")
    assert (y == 1).sum() == (original == 1).sum()


def test_out_of_range_label_is_a_clear_error(tmp_path):
    ids = _make_data(tmp_path, n=1)
    write_label_png(tmp_path / "pseudo" / f"{ids[0]}.png", np.full((64, 64), 7, dtype=np.uint8))
    ds = PseudoLabelDataset(tmp_path, tmp_path / "pseudo", ids, num_classes=NUM_CLASSES, crop_size=32)
    with pytest.raises(DatasetError, match=r"img_0\.png: label value 7 out of range for 3 classes"):
        ds[0]


def test_label_size_mismatch_is_a_clear_error(tmp_path):
    ids = _make_data(tmp_path, n=1)
    write_label_png(tmp_path / "pseudo" / f"{ids[0]}.png", np.zeros((32, 64), dtype=np.uint8))
    ds = PseudoLabelDataset(tmp_path, tmp_path / "pseudo", ids, num_classes=NUM_CLASSES, crop_size=32)
    with pytest.raises(DatasetError, match=r"img_0\.png: label size \(32, 64\) does not match"):
        ds[0]


def test_load_segmenter_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing.pt: retrained checkpoint not found"):
        load_segmenter(tmp_path / "nothing.pt")
