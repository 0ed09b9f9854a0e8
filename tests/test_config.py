"""params.yaml: it loads, every value is documented, and a bad value stops the run naming its key."""

from __future__ import annotations

import copy
import json
import re
import subprocess
import sys
import typing
from pathlib import Path

import numpy as np
import pytest
import yaml

from ssr import cli
from ssr.config import (
    OFFICIAL,
    PER_ENTRY,
    SCHEMA_PATH,
    ConfigError,
    DemoParams,
    Params,
    Section,
    json_schema,
    json_schema_text,
    load_params,
    params_from_dict,
)
from ssr.data.demo import render_sample
from ssr.site import LOCAL_FILE

REPO = Path(__file__).resolve().parents[1]
PARAMS = REPO / "params.yaml"
KEY_LINE = re.compile(r"^(?P<indent>\s*)(?P<key>[A-Za-z_][\w.]*):(?P<rest>.*)$")  # dotted: the keys of overrides


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


TAG = re.compile(r"^\((?P<tag>[PWO](?:, [PWO])*)\)\s*(?P<text>.*)$")


def _leaf_comments() -> dict[str, str]:
    """{dotted key: comment} for every leaf line of params.yaml (a line with a value)."""
    out, stack = {}, []
    for line in PARAMS.read_text().splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        match = KEY_LINE.match(line)
        indent = len(match.group("indent"))
        while stack and stack[-1][0] >= indent:
            stack.pop()
        stack.append((indent, match.group("key")))
        value, comment = _split_comment(match.group("rest"))
        if value:
            out[".".join(key for _, key in stack)] = comment
    return out


def _field_of(dotted: str):
    """The model field a params.yaml key sets (the dict-typed field for an entry of variants/overrides)."""
    node, field = Params, None
    for part in dotted.split("."):
        if typing.get_origin(node) is dict:
            node = typing.get_args(node)[1]          # an entry: datasets.voc, train_presets.demo, variants.x
        elif isinstance(node, type) and issubclass(node, Section):
            assert part in node.model_fields, f"params.yaml {dotted}: {node.__name__} has no field {part!r}"
            field = node.model_fields[part]
            node = field.annotation
    return field


def test_every_params_leaf_has_a_described_field_whose_source_and_text_match_the_comment():
    problems = []
    for dotted, comment in _leaf_comments().items():
        field = _field_of(dotted)
        source = (field.json_schema_extra or {}).get("source")
        if not field.description or not source:
            problems.append(f"{dotted}: the model field has no description or no source")
            continue
        tag = TAG.match(comment or "")
        if source == OFFICIAL:
            if not (comment or "").startswith("official"):
                problems.append(f"{dotted}: an official URL or checksum, commented {comment!r}")
        elif source == PER_ENTRY or typing.get_origin(field.annotation) is dict:
            if not tag:
                problems.append(f"{dotted}: comment {comment!r} starts with no (P), (W) or (O)")
        elif not tag or tag["tag"] != source:
            problems.append(f"{dotted}: params.yaml says {comment!r}, the model's source is {source!r}")
        elif tag["text"] and tag["text"] != field.description:
            problems.append(f"{dotted}: params.yaml says {tag['text']!r}, the model's description {field.description!r}")
    assert not problems, "params.yaml comments and ssr/config.py disagree:\n" + "\n".join(problems)


def test_every_model_field_has_a_description_and_numbers_have_bounds():
    problems = []
    for model in {Params, *(m for m in Section.__subclasses__())}:
        for name, field in model.model_fields.items():
            if not field.description:
                problems.append(f"{model.__name__}.{name}: no description")
            if field.annotation in (int, float) and not any(hasattr(m, a) for m in field.metadata for a in ("ge", "gt")):
                problems.append(f"{model.__name__}.{name}: a number without a lower bound")
    assert not problems, "\n".join(problems)


def test_params_are_immutable():
    params = load_params(PARAMS)
    with pytest.raises(Exception, match="frozen"):
        params.sgc.rho = 0.1
    changed = params.model_copy(update={"sgc": params.sgc.model_copy(update={"rho": 0.1})})
    assert changed.sgc.rho == 0.1 and params.sgc.rho != 0.1


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


def test_every_problem_is_reported_at_once_one_line_each(tmp_path):
    raw = _set(_set(_set(_raw(), "sgc.rho", 1.5), "train_presets.demo.lr", "fast"), "cmpa.tau_nit", 0.05)
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError) as err:
        load_params(path)
    lines = str(err.value).splitlines()
    assert lines[0] == f"{path}: 3 problems", lines
    assert sorted(line.split(":")[0].strip() for line in lines[1:]) == ["cmpa.tau_nit", "sgc.rho", "train_presets.demo.lr"]
    text = str(err.value)
    assert "sgc.rho: must be <= 1.0, got 1.5" in text
    assert "train_presets.demo.lr: expected float, got str 'fast'" in text
    assert "cmpa.tau_nit: unknown key (did you mean 'tau_init'?)" in text


def test_cross_field_problems_are_reported_together_and_overrides_name_their_place():
    raw = _set(_set(_raw(), "demo.min_objects", 4), "demo.max_objects", 2)
    raw = _set(_set(raw, "demo.min_object_size", 0.9), "train_presets.voc.accumulation", 7)
    with pytest.raises(ConfigError) as err:
        params_from_dict(raw)
    assert str(err.value).splitlines() == ["demo.min_objects: 4 exceeds max_objects 2",
                                          "demo.min_object_size: 0.9 exceeds max_object_size 0.45",
                                          "train_presets.voc.accumulation: must divide batch_size 128, got 7"]
    raw = _set(_set(_raw(), "demo_clip.vision_heads", 3), "demo_clip.text_heads", 5)
    raw = _set(_set(_set(raw, "demo_dino.heads", 5), "demo_dino.local_scale_min", 0.5), "demo_dino.local_size", 28)
    raw = _set(_set(raw, "demo_clip.patch_size", 7), "demo_dino.patch_size", 6)
    with pytest.raises(ConfigError) as err:
        params_from_dict(raw)
    assert str(err.value).splitlines() == ["demo_clip.vision_heads: must divide vision_width 128, got 3",
                                          "demo_clip.text_heads: must divide text_width 64, got 5",
                                          "demo_dino.heads: must divide width 128, got 5",
                                          "demo_dino.local_scale_min: 0.5 exceeds local_scale_max 0.4",
                                          "demo_dino.local_size: must be a multiple of patch_size 6, got 28"]
    raw = _set(_set(_set(_raw(), "demo_clip.patch_size", 7), "demo_dino.patch_size", 6), "demo_dino.local_size", 30)
    with pytest.raises(ConfigError) as err:
        params_from_dict(raw)
    assert str(err.value).splitlines() == ["demo_clip.patch_size: must divide demo.image_size 64, got 7",
                                          "demo_dino.patch_size: must divide demo.image_size 64, got 6"]
    raw = _set(_raw(), "datasets.demo.variants", {"typo": {"cmpa.los": "feature"}, "bad": {"cmpa.loss": "nope"}})
    with pytest.raises(ConfigError) as err:
        params_from_dict(raw)
    text = str(err.value)
    assert "datasets.demo.variants.typo: cmpa.los: unknown key (did you mean 'cmpa.loss'?)" in text
    assert "datasets.demo.variants.bad: cmpa.loss: must be one of 'cross_modal', 'in_modal', 'feature', got 'nope'" in text


def test_json_schema_is_committed_current_and_agrees_with_the_models():
    import jsonschema

    assert (REPO / SCHEMA_PATH).read_text() == json_schema_text(), "run `ssr schema --out " + SCHEMA_PATH + "` (make schema)"
    validator = jsonschema.Draft202012Validator(json_schema())
    assert not list(validator.iter_errors(_raw()))
    bad = _set(_set(_raw(), "sgc.rho", 1.5), "sgc.colour", 3)
    messages = sorted(e.message for e in validator.iter_errors(bad))
    assert len(messages) == 2 and "1.5 is greater than the maximum of 1.0" in messages
    schema = json.loads((REPO / SCHEMA_PATH).read_text())
    rho = schema["$defs"]["SgcParams"]["properties"]["rho"]
    assert rho["source"] == "O" and rho["maximum"] == 1.0 and rho["description"]


def test_cli_schema_check(tmp_path, capsys):
    out = tmp_path / "schema.json"
    assert cli.main(["schema", "--out", str(out), "--check"]) == 2
    assert "out of date" in capsys.readouterr().err
    assert cli.main(["schema", "--out", str(out)]) == 0
    assert cli.main(["schema", "--out", str(out), "--check"]) == 0


# ---------------------------------------------------------------- per-site paths

def _site_params(tmp_path: Path) -> Path:
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(_raw(), sort_keys=False))
    return path


def test_site_paths_from_the_local_file_then_the_environment(tmp_path, monkeypatch):
    path = _site_params(tmp_path)
    assert (load_params(path).data_root, load_params(path).results_root) == ("data", "results")
    (tmp_path / LOCAL_FILE).write_text("data_root: /scratch/data\nresults_root: /scratch/results\n")
    params = load_params(path)
    assert (params.data_root, params.results_root) == ("/scratch/data", "/scratch/results")
    assert params.dataset_root("voc") == Path("/scratch/data/voc")
    monkeypatch.setenv("SSR_DATA_ROOT", "/fast/data")
    params = load_params(path)
    assert (params.data_root, params.results_root) == ("/fast/data", "/scratch/results")  # the environment wins
    assert load_params(path, site=False).data_root == "data"
    monkeypatch.setenv("SSR_DATA_ROOT", "")                                                  # empty = unset
    assert load_params(path).data_root == "/scratch/data"


def test_the_local_file_holds_site_paths_only(tmp_path):
    path = _site_params(tmp_path)
    (tmp_path / LOCAL_FILE).write_text("sgc:\n  rho: 0.2\n")
    with pytest.raises(ConfigError, match=rf"{LOCAL_FILE}: sgc: not a per-site key .*params.yaml"):
        load_params(path)
    (tmp_path / LOCAL_FILE).write_text("data_root: 3\n")
    with pytest.raises(ConfigError, match=r"data_root: expected a folder path, got 3"):
        load_params(path)


def test_a_dvc_stage_refuses_a_site_path_that_moves_its_files(tmp_path, monkeypatch):
    path = _site_params(tmp_path)
    monkeypatch.setenv("DVC_STAGE", "train-demo")
    monkeypatch.setenv("SSR_RESULTS_ROOT", "results")        # the same path as params.yaml: fine
    assert load_params(path).results_root == "results"
    monkeypatch.setenv("SSR_RESULTS_ROOT", "/elsewhere")
    with pytest.raises(ConfigError, match=r"DVC stage train-demo: \$SSR_RESULTS_ROOT sets results_root to '/elsewhere'"):
        load_params(path)


def test_cli_stage_writes_where_the_site_says(tmp_path, monkeypatch, capsys):
    path = _params_file(tmp_path)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("SSR_DATA_ROOT", str(tmp_path / "site-data"))
    assert cli.main(["prepare", "--dataset", "demo", "--params", str(path)]) == 0
    assert (tmp_path / "site-data" / "demo" / "image_labels.json").is_file()
    assert not (tmp_path / "data").exists()


def test_snakemake_plans_with_the_site_paths_and_dvc_files_stay_as_tracked(tmp_path, monkeypatch):
    sys.path.insert(0, str(REPO / "workflow"))
    try:
        import pipeline
    finally:
        sys.path.remove(str(REPO / "workflow"))
    path = _site_params(tmp_path)
    (tmp_path / LOCAL_FILE).write_text("data_root: /scratch/data\n")
    tracked, resources = pipeline.load(path)
    site, _ = pipeline.load(path, site=True)
    assert tracked["data_root"] == "data" and site["data_root"] == "/scratch/data"
    prepare = next(s for s in pipeline.stages(site, resources, ["demo"]) if s.rule == "prepare")
    assert prepare.outputs["images"] == ["/scratch/data/demo/images"]
    assert "data/demo/images" in pipeline.dvc_yaml(tracked, resources, "demo")


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
    for x, y in zip(a, b, strict=True):
        assert np.array_equal(x.image, y.image) and np.array_equal(x.label, y.label) and x.caption == y.caption
    assert any(not np.array_equal(x.image, z.image) for x, z in zip(a, c, strict=True))
    assert any(not np.array_equal(x.label, z.label) for x, z in zip(a, c, strict=True))
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
