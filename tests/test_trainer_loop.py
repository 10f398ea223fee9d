"""The shared training loop: exact resume, atomic checkpoints, rotation, NaN guard, output contract."""

import json

import pytest
import torch
from safetensors.torch import load_file

from diffdiv.config import ConfigError, load_config
from diffdiv.trainers.base import TrainingError
from diffdiv.trainers.checkpoint import list_checkpoints, verify_checkpoint
from diffdiv.trainers.teacher import TeacherTrainConfig, TeacherTrainer

BASE = ["data.kind=mixture", "data.mixture.kind=ring", "data.mixture.num_modes=4", "model.kind=mlp",
        "model.hidden=32", "model.depth=2", "batch_size=32", "lr=1e-3", "warmup_steps=3", "eval_samples=0",
        "log_with=null", "progress=false", "ema_decay=0.9", "log_every=2"]


def _cfg(out, *extra):
    return load_config(TeacherTrainConfig, None, BASE + [f"output_dir={out}", *extra])


def _weights(out):
    return load_file(str(out / "teacher" / "net" / "diffusion_pytorch_model.safetensors"))


def test_resume_is_bitwise_exact(tmp_path):
    a = tmp_path / "a"
    TeacherTrainer(_cfg(a, "max_steps=12", "checkpoint_every=4")).train()
    b = tmp_path / "b"
    TeacherTrainer(_cfg(b, "max_steps=8", "checkpoint_every=4")).train()
    # "crash" after step 8: results written at step 8 are discarded, training resumes from the checkpoint
    (b / "metrics.json").unlink()
    m = TeacherTrainer(_cfg(b, "max_steps=12", "checkpoint_every=4")).train()
    assert m["steps"] == 12
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k
    ck_a = load_file(str(list_checkpoints(a / "checkpoints")[-1] / "model.safetensors"))
    ck_b = load_file(str(list_checkpoints(b / "checkpoints")[-1] / "model.safetensors"))
    for k in ck_a:
        assert torch.equal(ck_a[k], ck_b[k])


def test_corrupt_checkpoint_is_skipped(tmp_path, capsys):
    out = tmp_path / "r"
    TeacherTrainer(_cfg(out, "max_steps=6", "checkpoint_every=3", "keep_last=3")).train()
    cks = list_checkpoints(out / "checkpoints")
    assert [c.name for c in cks] == ["step_00000003", "step_00000006"]
    # flip bytes in the newest checkpoint's weights -> detected, previous one used
    f = cks[-1] / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[-10] ^= 0xFF
    f.write_bytes(bytes(data))
    assert "checksum" in verify_checkpoint(cks[-1])
    (out / "metrics.json").unlink()
    tr = TeacherTrainer(_cfg(out, "max_steps=6", "checkpoint_every=3"))
    tr.setup()
    assert tr.state.step == 3
    assert "skipping checkpoint" in capsys.readouterr().out
    # an interrupted save (no manifest) is also skipped
    (cks[0] / "COMPLETE.json").unlink()
    assert "incomplete" in verify_checkpoint(cks[0])


def test_rotation_keeps_last(tmp_path):
    out = tmp_path / "r"
    TeacherTrainer(_cfg(out, "max_steps=8", "checkpoint_every=2", "keep_last=2")).train()
    assert [c.name for c in list_checkpoints(out / "checkpoints")] == ["step_00000006", "step_00000008"]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["steps"] == 8
    assert (out / "teacher" / "model_index.json").is_file()


def test_nonfinite_guard_skips_then_stops(tmp_path):
    out = tmp_path / "nan"
    tr = TeacherTrainer(_cfg(out, "max_steps=50", "checkpoint_every=0", "max_nonfinite=3"))
    orig = TeacherTrainer.loss
    calls = {"n": 0}

    def flaky(self, phase, micro):
        calls["n"] += 1
        loss, logs = orig(self, phase, micro)
        return (loss * float("nan") if calls["n"] in (2, 5, 6, 7, 8) else loss), logs

    tr.loss = flaky.__get__(tr)
    tr.setup()
    before = {k: v.clone() for k, v in tr.model.state_dict().items()}
    with pytest.raises(TrainingError, match="3 steps in a row"):
        tr.train()
    assert tr.state.nonfinite_total == 4  # step 2 skipped, then 5,6,7 -> stop
    for _k, v in tr.model.state_dict().items():
        assert torch.isfinite(v).all()
    assert any(not torch.equal(before[k], v) for k, v in tr.model.state_dict().items())


def test_refuses_to_overwrite_results(tmp_path):
    out = tmp_path / "x"
    TeacherTrainer(_cfg(out, "max_steps=2", "checkpoint_every=0")).train()
    with pytest.raises(ConfigError, match="already holds results"):
        TeacherTrainer(_cfg(out, "max_steps=2", "checkpoint_every=0")).setup()
