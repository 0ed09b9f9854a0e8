"""The `ssr` command line as a user meets it: help and examples, version, logging, progress bars, hints."""

from __future__ import annotations

import argparse
import io
import logging
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import ssr
from ssr import cli
from ssr.progress import progress_bar

REPO = Path(__file__).resolve().parents[1]


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def test_every_stage_and_option_has_help_and_every_stage_examples():
    parser = cli.build_parser()
    stages = _subparsers(parser)
    assert set(stages) == set(cli.STAGES)
    undocumented = [f"ssr {name} {'/'.join(a.option_strings)}" for name, p in stages.items() for a in p._actions
                    if a.option_strings and not a.help]
    assert not undocumented, undocumented
    for name, p in stages.items():
        assert p.description and p.epilog.startswith("examples:\n  "), name
        examples = [line.strip() for line in p.epilog.splitlines()[1:]]
        assert all(f"ssr {name}" in line or f"-m ssr {name}" in line for line in examples), (name, examples)
        for line in examples:                                  # every option an example uses exists
            command = line.split("#")[0].split("|")[0].split("&&")[0]
            stages[name].parse_args(command.split(f" {name}", 1)[1].split())


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out.strip() == f"ssr {ssr.__version__}"


def test_help_is_fast_and_needs_no_torch():
    # `ssr --help` and `ssr --version` answer without importing torch (seconds on a busy machine).
    code = "import sys; from ssr import cli; cli.build_parser(); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert out.stdout.strip() == "False", out.stderr


def test_logging_goes_to_stderr_once_per_command_and_quiet_keeps_warnings_only(capsys):
    log = logging.getLogger("ssr.data.download")
    cases = ((["schema"], {"INFO", "WARNING"}), (["schema", "-q"], {"WARNING"}), (["schema", "-v"], {"DEBUG", "INFO", "WARNING"}))
    for argv, shown in cases:
        cli.configure_logging(*(lambda a: (a.verbose, a.quiet))(cli.build_parser().parse_args(argv)))
        log.debug("a debug line")
        log.info("an info line")
        log.warning("a warning line")
        err = capsys.readouterr().err
        assert {level for level in ("DEBUG", "INFO", "WARNING") if f"{level} ssr.data.download" in err} == shown, (argv, err)
        assert err.count("a warning line") == 1                       # one handler, however often configured
    cli.configure_logging()


def test_progress_bars_only_where_someone_watches():
    class Terminal(io.StringIO):
        def isatty(self):
            return True

    assert progress_bar(range(3), file=io.StringIO()).disable                 # a log file or pipe: no bar
    assert not progress_bar(range(3), file=Terminal()).disable               # a terminal: a bar
    assert progress_bar(range(3), file=Terminal(), progress=False).disable   # --no-progress: none either
    args = cli.build_parser().parse_args(["train", "--dataset", "demo", "--no-progress", "--quiet"])
    assert args.progress is False and args.quiet is True
    args = cli.build_parser().parse_args(["train", "--dataset", "demo", "--quiet"])
    assert args.progress is True                                              # --quiet leaves bars to the terminal test


def _params(tmp_path: Path) -> Path:
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    raw["data_root"], raw["results_root"] = str(tmp_path / "data"), str(tmp_path / "results")
    raw["demo"].update(image_size=32, num_train=3, num_val=2)
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.mark.parametrize("stage,hint", [
    ("superpixels", "run `ssr prepare --dataset demo` first"),                  # no split files yet
    ("report", "run `ssr pseudo-labels --dataset demo` first"),                 # no metrics files yet
])
def test_a_missing_input_names_the_command_that_writes_it(tmp_path, capsys, stage, hint):
    path = _params(tmp_path)
    assert cli.main([stage, "--dataset", "demo", "--params", str(path)]) == 2
    err = capsys.readouterr().err.splitlines()[-1]
    assert err.startswith(f"ssr {stage}: error: ") and hint in err, err


def test_missing_superpixels_and_model_name_their_stage(tmp_path, capsys):
    path = _params(tmp_path)
    assert cli.main(["prepare", "--dataset", "demo", "--params", str(path), "-q"]) == 0
    from ssr.data.dataset import TrainCrops
    from ssr.data.layout import DatasetError

    hint = r"superpixels\.h5: superpixels file not found \(run `ssr superpixels --dataset demo` first\)"
    with pytest.raises(DatasetError, match=hint):
        TrainCrops(tmp_path / "data" / "demo", "train", crop_size=16, scale_min=1.0, scale_max=1.0,
                   superpixels=tmp_path / "data" / "demo" / "superpixels.h5")[0]
    with pytest.raises(FileNotFoundError, match=r"model\.json: trained model not found \(run `ssr train --dataset demo` first\)"):
        run = tmp_path / "results" / "demo" / "method" / "seed0"
        run.mkdir(parents=True)                                              # an interrupted run: no model yet
        ssr.load_model(run)


def test_every_stage_says_which_top_level_values_the_dataset_overrides(tmp_path, capsys):
    # `dvc exp run -S sgc.rho=0.4` edits the top level, which the demo's own `sgc.rho` shadows: say so.
    path = _params(tmp_path)
    raw = yaml.safe_load(path.read_text())
    raw["datasets"]["demo"]["overrides"] = {"sgc.rho": 0.3, "sgc.t_hi": raw["sgc"]["t_hi"]}
    raw["sgc"]["rho"] = 0.4
    path.write_text(yaml.safe_dump(raw))
    assert cli.main(["prepare", "--dataset", "demo", "--params", str(path)]) == 0
    said = [line for line in capsys.readouterr().err.splitlines() if "overrides" in line]
    assert said == ["INFO ssr.cli: datasets.demo.overrides sets sgc.rho 0.3 (top level 0.4)"]
