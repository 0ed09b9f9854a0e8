"""The demo backbones' pretraining (`ssr demo-clip`, `ssr demo-dino`) resumes: the same run
resumes to the same result, another run or a damaged file does not resume."""

import pytest
import test_demo_clip
import test_demo_dino
import torch

import ssr.demo_clip as demo_clip
import ssr.demo_dino as demo_dino
from ssr.backbones import load_clip, load_dino
from ssr.pretraining import RESUME_FILE, load_resume, save_resume

# (module, the evaluation each `eval_every` calls, tiny params, demo params, loader of the saved folder)
STAGES = {
    "clip": (demo_clip, "zero_shot_map", test_demo_clip.TINY, test_demo_clip.DEMO,
             lambda folder: load_clip("demo", demo_dir=folder)[0]),
    "dino": (demo_dino, "measure_dino", test_demo_dino.TINY, test_demo_dino.DEMO,
             lambda folder: load_dino("demo", demo_dir=folder)),
    "dino_alone": (demo_dino, "measure_dino", test_demo_dino.TINY.model_copy(update={"denoise_weight": 0.0}),
                   test_demo_dino.DEMO, lambda folder: load_dino("demo", demo_dir=folder)),
}
# what each stage's pretrain takes besides its params
MEASURE = {demo_clip: {}, demo_dino: {"clip_blocks": 8}}

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


def interrupt_pretraining_at_second_evaluation(module, evaluator: str, out_dir, params, demo, monkeypatch):
    """Leave a resume file at step 2 of a 4-step `module.pretrain` run (demo_clip or demo_dino), by
    interrupting the held-out evaluation that step 2 (`eval_every=2`) calls."""
    real = getattr(module, evaluator)
    calls = {"n": 0}

    def stop_at_second(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt("simulated interruption")
        return real(*args, **kwargs)

    monkeypatch.setattr(module, evaluator, stop_at_second)
    with pytest.raises(KeyboardInterrupt):
        module.pretrain(out_dir, params, demo, progress=False, eval_every=2, **MEASURE[module])
    monkeypatch.setattr(module, evaluator, real)


@pytest.mark.parametrize("stage", STAGES)
def test_interrupted_pretraining_resumes_to_the_same_run(stage, tmp_path, monkeypatch, capsys):
    """Same machine, same thread count: the resumed run is the uninterrupted one, bit for bit."""
    module, evaluator, tiny, demo, load = STAGES[stage]
    straight = module.pretrain(tmp_path / "straight", tiny, demo, progress=False, eval_every=2, **MEASURE[module])
    interrupt_pretraining_at_second_evaluation(module, evaluator, tmp_path / "interrupted", tiny, demo, monkeypatch)
    assert torch.load(tmp_path / "interrupted" / RESUME_FILE, weights_only=True)["step"] == 2
    capsys.readouterr()
    resumed = module.pretrain(tmp_path / "interrupted", tiny, demo, progress=False, eval_every=2, **MEASURE[module])
    assert "resuming from" in capsys.readouterr().out
    a, b = load(tmp_path / "straight").state_dict(), load(tmp_path / "interrupted").state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [h["loss"] for h in straight["history"]] == [h["loss"] for h in resumed["history"]]
    assert not (tmp_path / "interrupted" / RESUME_FILE).exists()


@pytest.mark.parametrize("stage", STAGES)
def test_a_resume_file_is_resumed_with_another_thread_count(stage, tmp_path, monkeypatch, capsys):
    """Threads are not part of the run's identity. They can change float summation order (CPU
    kernels split reductions by thread), so the continued run is the same only to rounding."""
    module, evaluator, tiny, demo, _ = STAGES[stage]
    interrupt_pretraining_at_second_evaluation(module, evaluator, tmp_path, tiny, demo, monkeypatch)
    capsys.readouterr()
    prov = module.pretrain(tmp_path, tiny.model_copy(update={"threads": 2}), demo, progress=False, eval_every=2,
                           **MEASURE[module])
    assert "resuming from" in capsys.readouterr().out
    assert [h["step"] for h in prov["history"]] == [2, 4]


@pytest.mark.parametrize("stage", STAGES)
def test_a_resume_file_from_other_settings_is_not_resumed(stage, tmp_path, monkeypatch, capsys):
    module, evaluator, tiny, demo, _ = STAGES[stage]
    interrupt_pretraining_at_second_evaluation(module, evaluator, tmp_path, tiny, demo, monkeypatch)
    capsys.readouterr()
    prov = module.pretrain(tmp_path, tiny.model_copy(update={"lr": tiny.lr * 2}), demo, progress=False, eval_every=2,
                           **MEASURE[module])
    assert "resuming" not in capsys.readouterr().out
    assert prov["params"]["lr"] == tiny.lr * 2 and [h["step"] for h in prov["history"]] == [2, 4]
