"""Reliability: interrupted saves, bad inputs (one line, exit 2, nothing overwritten), safe loading,
multi-process equivalence and rank-consistent non-finite skipping."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file

from diffdiv.config import ConfigError, from_dict, load_config
from diffdiv.trainers.checkpoint import list_checkpoints, verify_checkpoint
from diffdiv.trainers.entry import run
from diffdiv.trainers.teacher import TeacherTrainConfig, TeacherTrainer

ROOT = Path(__file__).resolve().parents[1]
TOY = ["data.kind=mixture", "data.mixture.num_modes=4", "model.kind=mlp", "model.hidden=32", "model.depth=2",
       "batch_size=32", "lr=1e-3", "warmup_steps=3", "eval_samples=0", "log_with=null", "progress=false",
       "log_every=1"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "true", "PYTHONPATH": str(ROOT)}


def test_interrupted_save_keeps_previous_checkpoint(tmp_path, monkeypatch):
    out = tmp_path / "run"
    cfg = load_config(TeacherTrainConfig, None, TOY + [f"output_dir={out}", "max_steps=4", "checkpoint_every=2"])
    tr = TeacherTrainer(cfg)
    tr.setup()
    real_save = tr.accelerator.save_state
    calls = {"n": 0}

    def crashing_save(path, **kw):
        calls["n"] += 1
        if calls["n"] == 2:  # the save at step 4 dies half-way
            Path(path, "model.safetensors").write_bytes(b"partial")
            raise OSError("disk died")
        return real_save(path, **kw)

    monkeypatch.setattr(tr.accelerator, "save_state", crashing_save)
    with pytest.raises(OSError):
        tr.train()
    cks = list_checkpoints(out / "checkpoints")
    assert [c.name for c in cks] == ["step_00000002"] and verify_checkpoint(cks[0]) is None
    assert (out / "checkpoints" / ".tmp-step_00000004").exists()
    tr2 = TeacherTrainer(load_config(TeacherTrainConfig, None, TOY + [f"output_dir={out}", "max_steps=4",
                                                                       "checkpoint_every=2"]))
    tr2.setup()
    assert tr2.state.step == 2
    assert not (out / "checkpoints" / ".tmp-step_00000004").exists()  # stale temp dirs cleaned


def test_pickle_weights_refused_unless_opted_in(tmp_path):
    from diffdiv.models.loading import load_denoiser, save_denoiser
    from diffdiv.models.nets import MLPNet, NetDenoiser

    d = tmp_path / "m"
    save_denoiser(NetDenoiser(MLPNet(in_dim=2, hidden=8, depth=1)), d)
    st_file = d / "net" / "diffusion_pytorch_model.safetensors"
    torch.save(load_file(str(st_file)), d / "net" / "diffusion_pytorch_model.bin")
    st_file.unlink()
    with pytest.raises(ConfigError, match="pickle weights"):
        load_denoiser(d)
    den = load_denoiser(d, allow_pickle=True)
    assert den.net.config.hidden == 8


def _run_teacher(argv, capsys):
    with pytest.raises(SystemExit) as e:
        run(TeacherTrainer, argv)
    err = capsys.readouterr().err.strip().splitlines()
    return e.value.code, err


def _bad_image_folder(tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    (folder / "broken.png").write_bytes(b"not a png at all")
    return folder


BAD_INPUTS = [
    (["learning_rate=1"], "unknown config key 'learning_rate'"),
    (["lr=-1e-3"], "lr must be a positive number"),
    (["lr=fast"], "lr: expected a number"),
    (["batch_size=0"], "batch_size must be > 0"),
    (["max_steps=ten"], "max_steps: expected an integer"),
    (["data.kind=mixture", "data.mixture.kind=custom", "data.mixture.means=[[0,0],[1,1]]", "data.mixture.weights=[]"],
     "mixture.weights"),
    (["data.kind=mixture", "data.mixture.kind=custom", "data.mixture.means=[]"], "mixture.means: empty"),
    (["data.kind=mixture", "data.mixture.std=-0.1"], "mixture.std must be > 0"),
    (["data.image_size=10", "model.block_out_channels=[8,16,16]", "model.norm_num_groups=8"],
     "not divisible by the UNet's downsampling factor 4"),
    (["data.kind=image_folder", "data.path=/nonexistent/folder"], "image folder not found"),
    (["mixed_precision=fp8"], "mixed_precision: 'fp8' is not one of"),
    (["--config", "/nonexistent.yaml"], "config file not found"),
]


@pytest.mark.parametrize("argv,needle", BAD_INPUTS, ids=[b[1][:30] for b in BAD_INPUTS])
def test_bad_inputs_one_line_exit_2(argv, needle, tmp_path, capsys):
    out = tmp_path / "out"
    code, err = _run_teacher([f"output_dir={out}", *argv], capsys)
    assert code == 2
    assert len(err) == 1 and err[0].startswith("error: ") and needle in err[0], err
    assert not out.exists()


def test_unreadable_image_and_existing_results(tmp_path, capsys):
    folder = _bad_image_folder(tmp_path)
    code, err = _run_teacher([f"output_dir={tmp_path / 'o'}", "data.kind=image_folder", f"data.path={folder}",
                              "data.image_size=8", "model.block_out_channels=[8,16]", "model.norm_num_groups=8"],
                             capsys)
    assert code == 2 and "cannot read image" in err[0]
    done = tmp_path / "done"
    done.mkdir()
    (done / "metrics.json").write_text('{"keep": 1}')
    code, err = _run_teacher([f"output_dir={done}", *TOY, "max_steps=1"], capsys)
    assert code == 2 and "already holds results" in err[0]
    assert json.loads((done / "metrics.json").read_text()) == {"keep": 1}


def _valid_teacher_dict():
    return {"output_dir": "x", "max_steps": 3, "batch_size": 8, "lr": 1e-3, "data": {"kind": "mixture"},
            "model": {"kind": "mlp"}}


BAD_VALUES = st.one_of(st.text(max_size=5), st.floats(allow_nan=True), st.integers(-10**6, -1), st.none(),
                       st.lists(st.integers(), max_size=3), st.booleans(), st.dictionaries(st.text(max_size=3),
                                                                                             st.integers(), max_size=2))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(key=st.sampled_from(["max_steps", "batch_size", "lr", "grad_accum", "ema_decay", "mixed_precision",
                            "data", "data.kind", "data.mixture", "data.mixture.std", "data.mixture.weights",
                            "model.block_out_channels", "model.kind", "schedule.beta_start", "keep_last",
                            "unknown_key", "data.bogus"]),
       value=BAD_VALUES)
def test_generated_bad_configs_raise_config_error_only(key, value):
    """Any mutation either validates or raises ConfigError with a one-line message: never another exception."""
    d = _valid_teacher_dict()
    node = d
    parts = key.split(".")
    for p in parts[:-1]:
        node = node.setdefault(p, {})
    node[parts[-1]] = value
    try:
        from_dict(TeacherTrainConfig, d)
    except ConfigError as e:
        assert "\n" not in str(e) and str(e)


SKIP_ONE_RANK = textwrap.dedent("""
    import sys, torch
    from diffdiv.trainers.entry import run
    from diffdiv.trainers.teacher import TeacherTrainer

    class Flaky(TeacherTrainer):
        def loss(self, phase, micro):
            loss, logs = super().loss(phase, micro)
            if self.rank == 1 and self.state.step == 2:
                loss = loss * float("nan")
            return loss, logs

    run(Flaky, sys.argv[1:])
""")


@pytest.mark.slow
@pytest.mark.multiprocess
def test_two_processes_match_one_and_skip_together(tmp_path):
    """Same global batch: 2 gloo ranks give the 1-process loss curve; a NaN on one rank skips the step on both."""
    script = tmp_path / "flaky.py"
    script.write_text(SKIP_ONE_RANK)
    args = TOY + ["max_steps=5", "checkpoint_every=5"]
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--main_process_port", "0",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    r2 = subprocess.run(launch + [str(ROOT / "train" / "teacher.py"), *args, f"output_dir={tmp_path / 'two'}"],
                        env=ENV, capture_output=True, text=True, timeout=300)
    assert r2.returncode == 0, r2.stderr[-2000:]
    r1 = subprocess.run([sys.executable, str(ROOT / "train" / "teacher.py"), *args, f"output_dir={tmp_path / 'one'}"],
                        env=ENV, capture_output=True, text=True, timeout=300)
    assert r1.returncode == 0, r1.stderr[-2000:]

    def curve(d):
        ck = list_checkpoints(d / "checkpoints")[-1]
        return [h["model/loss"] for h in json.loads((ck / "trainer_state.json").read_text())["history"]]

    c1, c2 = curve(tmp_path / "one"), curve(tmp_path / "two")
    assert len(c1) == len(c2) == 5
    for a, b in zip(c1, c2):
        assert abs(a - b) <= 1e-5 * max(1.0, abs(a))
    w1 = load_file(str(tmp_path / "one" / "teacher" / "net" / "diffusion_pytorch_model.safetensors"))
    w2 = load_file(str(tmp_path / "two" / "teacher" / "net" / "diffusion_pytorch_model.safetensors"))
    assert max(float((w1[k] - w2[k]).abs().max()) for k in w1) < 1e-5

    r3 = subprocess.run(launch + [str(script), *args, f"output_dir={tmp_path / 'flaky'}"], env=ENV,
                        capture_output=True, text=True, timeout=300)
    assert r3.returncode == 0, r3.stderr[-2000:]
    ck = list_checkpoints(tmp_path / "flaky" / "checkpoints")[-1]
    state = json.loads((ck / "trainer_state.json").read_text())
    assert state["nonfinite_total"] == 1
    assert state["history"][2].get("model/skipped_nonfinite") == 1.0  # step 3 (index 2) skipped on both ranks


@pytest.mark.slow
@pytest.mark.multiprocess
def test_bad_input_under_accelerate_launch_prints_first(tmp_path):
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--main_process_port", "0",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    r = subprocess.run(launch + [str(ROOT / "train" / "teacher.py"), f"output_dir={tmp_path / 'o'}", "lr=-1"],
                       env=ENV, capture_output=True, text=True, timeout=300)
    assert r.returncode != 0
    first = [ln for ln in r.stderr.splitlines() if ln.strip()][0]
    assert first.startswith("error: lr must be a positive number"), r.stderr[:500]
