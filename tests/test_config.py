"""params.yaml: it loads, every value is documented, and a bad value stops the run naming its key."""

from __future__ import annotations

import copy
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from ssr import cli
from ssr.config import ConfigError, DemoParams, Params, load_params, params_from_dict
from ssr.data.demo import render_sample

REPO = Path(__file__).resolve().parents[1]
PARAMS = REPO / "params.yaml"
KEY_LINE = re.compile(r"^(?P<indent>\s*)(?P<key>[A-Za-z_][\w]*):(?P<rest>.*)$")


def _raw() -> dict:
    return yaml.safe_load(PARAMS.read_text())


def _set(raw: dict, dotted: str, value) -> dict:
    raw = copy.deepcopy(raw)
    node = raw
    *parents, leaf = dotted.split(".")
    for key in parents:
        node = node[key]
    node[leaf] = value
    return raw


def _count_leaves(node) -> int:
    if isinstance(node, dict) and node:
        return sum(_count_leaves(v) for v in node.values())
    return 1  # a value, an empty mapping ({}) written inline included


def _split_comment(rest: str) -> tuple[str, str | None]:
    """'value  # comment' -> ('value', 'comment'); a '#' only starts a comment after whitespace."""
    match = re.search(r"(^|\s)#(.*)$", rest)
    if not match:
        return rest.strip(), None
    return rest[:match.start()].strip(), match.group(2).strip()


# ---------------------------------------------------------------- the repo's params.yaml

def test_repo_params_load():
    params = load_params(PARAMS)
    assert isinstance(params, Params)
    raw = _raw()
    # Spot-check that values come from the file, not from dataclass defaults.
    assert params.sgc.rho == raw["sgc"]["rho"]
    assert params.demo_clip.steps == raw["demo_clip"]["steps"]
    assert params.affinity.clip_weight == raw["affinity"]["clip_weight"]
    assert params.affinity.dino_weight == raw["affinity"]["dino_weight"]
    assert params.cmpa.tau_init == 0.05                                   # (P)
    assert set(params.datasets) == set(raw["datasets"]) >= {"demo", "voc", "coco"}
    for name in params.datasets:
        assert params.preset(name) is params.train_presets[raw["datasets"][name]["preset"]]


def test_every_leaf_line_is_commented():
    lines = PARAMS.read_text().splitlines()
    leaves, uncommented = 0, []
    for number, line in enumerate(lines, 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        match = KEY_LINE.match(line)
        assert match, f"params.yaml:{number}: not a `key: value` line: {line!r}"
        value, comment = _split_comment(match.group("rest"))
        if not value:
            continue                                                      # a section header
        leaves += 1
        if not comment:
            uncommented.append(f"{number}: {line.strip()}")
    assert not uncommented, "params.yaml leaf lines without a # comment:\n" + "\n".join(uncommented)
    # The text parse found exactly the leaves YAML sees (lists count as one leaf).
    assert leaves == _count_leaves(_raw())


def test_comment_parser():
    # The leaf-line parser: no comment is reported as None; a "#" inside a value is not a comment.
    value, comment = _split_comment(" 0.5")
    assert value == "0.5" and comment is None
    value, comment = _split_comment(" http://x/y#frag  # official")
    assert value == "http://x/y#frag" and comment == "official"


# ---------------------------------------------------------------- validation names the key

BAD_VALUES = [
    ("sgc.rho", 1.5, "must be <= 1"),                                    # out of range
    ("sgc.t_hi", -0.1, "must be >= 0"),                                  # out of range
    ("train_presets.demo.lr", -1.0, "must be > 0"),                      # open lower bound
    ("cmpa.tau_init", 0.0, "must be > 0"),
    ("sgc.t_hi", "high", "expected float"),                              # wrong type
    ("demo.seed", True, "expected int"),                                 # bool is not an int
    ("affinity.use_dino", "yes", "expected true/false"),
    ("demo.classes", "circle", "expected a list"),
    ("demo.image_size", 32.5, "expected int"),
    ("retrain.model", "unet", "must be one of"),
    ("sgc.colour", 3, "unknown key"),                                    # unknown key
    ("datasets.voc.crop", 3, "unknown key"),
    ("train_presets.demo.momentum", 0.9, "unknown key"),
    ("optimiser", {"lr": 1}, "unknown key"),
]


@pytest.mark.parametrize("key,value,why", BAD_VALUES, ids=[f"{k}={v!r}" for k, v, _ in BAD_VALUES])
def test_bad_value_names_the_key(key, value, why):
    raw = _set(_raw(), key, value)
    with pytest.raises(ConfigError) as err:
        params_from_dict(raw)
    message = str(err.value)
    assert message.startswith(f"{key}:"), message
    assert why in message


def test_load_params_names_file_and_key(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(_set(_raw(), "sgc.rho", 2.0)))
    with pytest.raises(ConfigError, match=r"sgc\.rho: must be <= 1"):
        load_params(path)
    with pytest.raises(ConfigError, match="params.yaml"):
        load_params(path)
    with pytest.raises(ConfigError, match="not found"):
        load_params(tmp_path / "missing.yaml")


def test_cross_field_checks_name_the_key():
    with pytest.raises(ConfigError, match=r"^demo\.min_objects"):
        params_from_dict(_set(_set(_raw(), "demo.min_objects", 4), "demo.max_objects", 2))
    with pytest.raises(ConfigError, match=r"^train_presets\.voc\.accumulation"):
        params_from_dict(_set(_raw(), "train_presets.voc.accumulation", 7))
    with pytest.raises(ConfigError, match=r"^datasets\.demo\.preset"):
        params_from_dict(_set(_raw(), "datasets.demo.preset", "nope"))
    with pytest.raises(ConfigError, match=r"^datasets\.voc\.prompt_template"):
        params_from_dict(_set(_raw(), "datasets.voc.prompt_template", "a photo"))
    with pytest.raises(ConfigError, match=r"^pseudo_labels\.ignore_low"):
        params_from_dict(_set(_set(_raw(), "pseudo_labels.ignore_low", 0.5), "pseudo_labels.ignore_high", 0.2))


def test_int_accepted_for_float():
    params = params_from_dict(_set(_raw(), "sgc.rho", 1))
    assert params.sgc.rho == 1.0 and isinstance(params.sgc.rho, float)


# ---------------------------------------------------------------- the CLI stops before writing

def _params_file(tmp_path: Path, **overrides) -> Path:
    raw = _raw()
    raw["data_root"] = str(tmp_path / "data")
    raw["results_root"] = str(tmp_path / "results")
    raw["demo"].update(image_size=32, num_train=3, num_val=2)
    for key, value in overrides.items():
        raw = _set(raw, key, value)
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def _tree(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


@pytest.mark.parametrize("stage", [["prepare", "--dataset", "demo"], ["superpixels", "--dataset", "demo"],
                                   ["train", "--dataset", "demo"]])
def test_cli_bad_params_exits_nonzero_and_writes_nothing(tmp_path, monkeypatch, capsys, stage):
    path = _params_file(tmp_path, **{"sgc.rho": 1.5})
    monkeypatch.chdir(tmp_path)
    before = _tree(tmp_path)
    code = cli.main([*stage, "--params", str(path), "--quiet"])
    err = capsys.readouterr().err
    assert code != 0
    assert "sgc.rho" in err
    assert _tree(tmp_path) == before


def test_cli_good_params_does_write(tmp_path, monkeypatch, capsys):
    # Control for the test above: the same command with valid params writes the dataset.
    path = _params_file(tmp_path)
    monkeypatch.chdir(tmp_path)
    assert cli.main(["prepare", "--dataset", "demo", "--params", str(path), "--quiet"]) == 0
    assert (tmp_path / "data" / "demo" / "image_labels.json").is_file()


def test_cli_subprocess_bad_params(tmp_path):
    path = _params_file(tmp_path, **{"retrain.model": "unet"})
    exe = Path(sys.executable).parent / "ssr"
    command = [str(exe)] if exe.exists() else [sys.executable, "-m", "ssr"]
    before = _tree(tmp_path)
    proc = subprocess.run([*command, "prepare", "--dataset", "demo", "--params", str(path), "--quiet"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "retrain.model" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert _tree(tmp_path) == before


def test_cli_missing_params_file(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert cli.main(["prepare", "--dataset", "demo", "--params", str(tmp_path / "nope.yaml")]) != 0
    assert "nope.yaml" in capsys.readouterr().err
    assert _tree(tmp_path) == set()


# ---------------------------------------------------------------- demo generator parameters

def _demo(**kw) -> DemoParams:
    base = dict(seed=0, image_size=32, num_train=4, num_val=2)
    base.update(kw)
    return DemoParams(**base)


def test_demo_seed_is_a_param():
    a = [render_sample(_demo(seed=3), "train", i) for i in range(4)]
    b = [render_sample(_demo(seed=3), "train", i) for i in range(4)]
    c = [render_sample(_demo(seed=4), "train", i) for i in range(4)]
    for x, y in zip(a, b):
        assert np.array_equal(x.image, y.image) and np.array_equal(x.label, y.label) and x.caption == y.caption
    assert any(not np.array_equal(x.image, z.image) for x, z in zip(a, c))
    assert any(not np.array_equal(x.label, z.label) for x, z in zip(a, c))
    # Streams are disjoint draws for one seed.
    assert not np.array_equal(render_sample(_demo(seed=3), "val", 0).image, a[0].image)


def test_demo_sizes_are_params():
    for size in (16, 40):
        sample = render_sample(_demo(image_size=size), "train", 0)
        assert sample.image.shape == (size, size, 3) and sample.image.dtype == np.uint8
        assert sample.label.shape == (size, size)
    small = _demo(image_size=48, min_objects=1, max_objects=1, min_object_size=0.1, max_object_size=0.12)
    large = _demo(image_size=48, min_objects=1, max_objects=1, min_object_size=0.6, max_object_size=0.65)
    area = lambda p: np.mean([(render_sample(p, "train", i).label > 0).mean() for i in range(8)])  # noqa: E731
    assert area(small) < 0.05 < 0.2 < area(large)
    one = _demo(min_objects=1, max_objects=1)
    for i in range(6):
        sample = render_sample(one, "train", i)
        assert len(np.unique(sample.label[sample.label > 0])) == 1
        assert " and a " not in sample.caption
