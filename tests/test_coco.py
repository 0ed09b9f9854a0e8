import json
import re
import shutil

import archives as A
import numpy as np
import pytest
from PIL import Image
from pycocotools.coco import COCO

from ssr.data.coco import ann_to_mask, prepare_coco, semantic_label
from ssr.data.layout import DatasetError, DatasetLayout, voc_palette

TRAIN_IDS = [f"COCO_train2014_{i:012d}" for i in (9, 25, 30)]
VAL_IDS = [f"COCO_val2014_{i:012d}" for i in (42, 73)]
# pycocotools' own decode() trips a NumPy 2 deprecation; not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

PERSON, CAR, DOG = 1, 2, 3  # category ids 1, 3, 18 made contiguous


@pytest.fixture(scope="module")
def zips(tmp_path_factory):
    root = tmp_path_factory.mktemp("coco_archives")
    return A.build_coco_archives(root / "server", root / "work")


def _params(zips, missing_dir=None, **override):
    sources = {f"coco_{key}": A.source(path, missing_dir=missing_dir) for key, path in zips.items()}
    sources.update(override)
    return A.download_params(**sources)


def _label(root, image_id):
    with Image.open(DatasetLayout(root).label_path(image_id)) as png:
        assert png.mode == "P" and png.getpalette()[:768] == voc_palette()
        return np.array(png)


def _check_layout(root):
    layout = DatasetLayout(root)
    # Images without any (non-crowd) annotation -- train 34 and 36, val 74 -- are left out.
    assert layout.split("train") == TRAIN_IDS
    assert layout.split("val") == VAL_IDS
    assert sorted(p.stem for p in layout.images_dir.iterdir()) == sorted(TRAIN_IDS + VAL_IDS)
    assert sorted(p.stem for p in layout.labels_dir.iterdir()) == sorted(TRAIN_IDS + VAL_IDS)
    assert layout.classes() == ["background", "person", "car", "dog"]

    label = _label(root, TRAIN_IDS[0])
    assert label.shape == (40, 48)
    assert label[15, 15] == DOG  # small dog inside the big person, listed first: still visible
    assert label[25, 30] == PERSON
    assert label[2, 45] == 0
    assert (label[30:, :] == 255).all()  # the crowd overrides the person under it
    assert set(np.unique(label)) == {0, PERSON, DOG, 255}
    val = _label(root, VAL_IDS[1])
    assert val[15, 25] == CAR and val[5, 5] == PERSON
    assert layout.image_labels() == {
        TRAIN_IDS[0]: [PERSON, DOG], TRAIN_IDS[1]: [CAR], TRAIN_IDS[2]: [PERSON, DOG],
        VAL_IDS[0]: [DOG], VAL_IDS[1]: [PERSON, CAR],
    }
    for image_id in TRAIN_IDS + VAL_IDS:
        with Image.open(layout.image_path(image_id)) as jpg:
            assert (jpg.height, jpg.width) == _label(root, image_id).shape


def test_prepare_from_downloads(tmp_path, zips):
    root = tmp_path / "data" / "coco"
    prepare_coco(root, _params(zips), progress=False)
    downloads = tmp_path / "data" / "downloads"
    assert sorted(p.name for p in downloads.iterdir()) == sorted(
        ["train2014.zip", "val2014.zip", "annotations_trainval2014.zip",
         "train2014", "val2014", "annotations_trainval2014"])
    _check_layout(root)
    assert sorted(p.name for p in root.parent.iterdir()) == ["coco", "downloads"]


def test_prepare_from_archive_zips_never_downloads(tmp_path, zips):
    archives = tmp_path / "archives"
    archives.mkdir()
    for path in zips.values():
        shutil.copy(path, archives)
    params = _params(zips, missing_dir=tmp_path / "no-server")
    prepare_coco(tmp_path / "coco", params, archives=archives, cache_dir=tmp_path / "cache", progress=False)
    _check_layout(tmp_path / "coco")


def test_prepare_from_existing_tree(tmp_path):
    archives = A.build_coco_tree(tmp_path / "archives")
    prepare_coco(tmp_path / "coco", A.download_params(), archives=archives, cache_dir=tmp_path / "cache",
                 progress=False)
    _check_layout(tmp_path / "coco")
    assert not (tmp_path / "cache").exists()


def test_overlap_rule_does_not_depend_on_listing_order():
    anns = [a for a in A.coco_annotations("train2014") if a["image_id"] == 9]
    cat_to_label = {1: PERSON, 3: CAR, 18: DOG}
    forward = semantic_label(anns, 40, 48, cat_to_label)
    np.testing.assert_array_equal(forward, semantic_label(anns[::-1], 40, 48, cat_to_label))
    # Drawing in listing order instead would bury the dog under the person.
    naive = np.zeros((40, 48), np.uint8)
    for ann in anns:
        if not ann["iscrowd"]:
            naive[ann_to_mask(ann["segmentation"], 40, 48) > 0] = cat_to_label[ann["category_id"]]
    assert DOG not in naive and DOG in forward


def test_ann_to_mask_matches_pycocotools_annToMask(tmp_path):
    path = tmp_path / "instances.json"
    path.write_text(json.dumps(A.coco_instances("train2014")))
    coco = COCO(str(path))
    for ann in coco.dataset["annotations"]:
        info = coco.imgs[ann["image_id"]]
        np.testing.assert_array_equal(ann_to_mask(ann["segmentation"], info["height"], info["width"]),
                                      coco.annToMask(ann))


def test_bad_checksum_leaves_no_output(tmp_path, zips):
    params = _params(zips, coco_annotations=(A.file_url(zips["annotations"]), "1" * 32))
    root = tmp_path / "data" / "coco"
    with pytest.raises(DatasetError) as err:
        prepare_coco(root, params, progress=False)
    message = str(err.value)
    assert "annotations_trainval2014.zip" in message and "1" * 32 in message
    assert A.md5_of(zips["annotations"]) in message
    assert not root.exists()
    assert sorted(p.name for p in root.parent.iterdir()) == ["downloads"]


def test_truncated_zip_leaves_no_output(tmp_path, zips):
    archives = tmp_path / "archives"
    archives.mkdir()
    for path in zips.values():
        shutil.copy(path, archives)
    truncated = archives / "val2014.zip"
    truncated.write_bytes(truncated.read_bytes()[:-100])
    missing = tmp_path / "no-server"
    params = _params(zips, missing, coco_val=(A.file_url(missing / "val2014.zip"), A.md5_of(truncated)))
    with pytest.raises(DatasetError, match=f"{re.escape(str(truncated))}: cannot extract"):
        prepare_coco(tmp_path / "coco", params, archives=archives, cache_dir=tmp_path / "cache", progress=False)
    assert not (tmp_path / "coco").exists()
    assert not (tmp_path / "cache" / "val2014").exists()


def test_malformed_annotations_are_reported(tmp_path):
    archives = A.build_coco_tree(tmp_path / "archives")
    bad = archives / "annotations" / "instances_val2014.json"
    bad.write_text('{"images": [')
    with pytest.raises(DatasetError, match=f"{re.escape(str(bad))}: not a COCO instances annotation file"):
        prepare_coco(tmp_path / "coco", A.download_params(), archives=archives, progress=False)
    assert not (tmp_path / "coco").exists()


def test_unknown_category_and_size_mismatch_are_reported(tmp_path):
    archives = A.build_coco_tree(tmp_path / "archives")
    path = archives / "annotations" / "instances_train2014.json"
    instances = A.coco_instances("train2014")
    instances["annotations"][3]["category_id"] = 99
    path.write_text(json.dumps(instances))
    with pytest.raises(DatasetError, match=r"image 25 has annotations of unknown categories \[99\]"):
        prepare_coco(tmp_path / "coco", A.download_params(), archives=archives, progress=False)

    instances = A.coco_instances("train2014")
    instances["images"][1]["height"] = 31
    path.write_text(json.dumps(instances))
    with pytest.raises(DatasetError, match=r"COCO_train2014_000000000025.jpg: image size \(30, 36\) does not match"):
        prepare_coco(tmp_path / "coco", A.download_params(), archives=archives, progress=False)
    assert not (tmp_path / "coco").exists()
