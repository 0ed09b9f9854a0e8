"""The demo backbones' resume file: the same run resumes, another run or a damaged file does not."""

import pytest
import torch

from ssr.pretraining import load_resume, save_resume

RUN = {"config": {"width": 8, "layers": (2, 2)}, "params": {"lr": 1e-3, "note": None}}


def test_the_same_run_resumes_with_its_state(tmp_path):
    path = tmp_path / "out" / "resume.pt"
    save_resume(path, RUN, step=3, weights=torch.arange(4.0), history=[{"step": 3, "loss": 0.5}])
    saved = load_resume(path, RUN)
    assert saved["step"] == 3 and saved["history"] == [{"step": 3, "loss": 0.5}]
    assert torch.equal(saved["weights"], torch.arange(4.0))
    assert [p.name for p in path.parent.iterdir()] == ["resume.pt"]  # no temporary file left beside it


def test_another_run_or_no_file_starts_over(tmp_path):
    path = tmp_path / "resume.pt"
    assert load_resume(path, RUN) is None
    save_resume(path, RUN, step=3)
    assert load_resume(path, {**RUN, "params": {"lr": 1e-4, "note": None}}) is None


def test_a_damaged_file_is_named(tmp_path):
    path = tmp_path / "resume.pt"
    save_resume(path, RUN, step=3, weights=torch.zeros(1000))
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(ValueError, match=r"resume\.pt: unreadable resume file"):
        load_resume(path, RUN)
