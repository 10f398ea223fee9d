"""Guards that name the problem, and the small CLI items: --version, --prompt for text-to-image models,
explicit scheduler overrides, `train/<job>.py --help`, data/teacher shape errors, unreliable eval sizes."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from diffdiv.cli import main as cli_main
from diffdiv.guards import feature_sample_warnings, range_limit, x0_range_problem
from diffdiv.models.loading import load_denoiser
from diffdiv.models.tiny import build_tiny_sd, build_tiny_unet2d


@pytest.fixture(scope="module")
def pixel(tmp_path_factory):
    return build_tiny_unet2d(tmp_path_factory.mktemp("px") / "teacher")  # epsilon, linear betas, clip_sample


def test_version(capsys):
    with pytest.raises(SystemExit) as e:
        cli_main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.strip() == "diffdiv 0.1.0"


def test_text2img_sample_needs_a_prompt(tmp_path, capsys):
    sd = build_tiny_sd(tmp_path / "sd")
    rc = cli_main(["sample", "--model", str(sd), "--num-samples", "1", "--steps", "1",
                   "--out", str(tmp_path / "a.npz")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and err[-1].startswith("error:") and "--prompt" in err[-1] and "Traceback" not in "".join(err)
    rc = cli_main(["sample", "--model", str(sd), "--num-samples", "1", "--steps", "1", "--prompt", "",
                   "--out", str(tmp_path / "b.npz")])
    assert rc == 0
    meta = json.loads(str(np.load(tmp_path / "b.npz")["meta"]))
    assert meta["guidance_scale"] == 1.0 and meta["scheduler"] == "DDIMScheduler"


def test_scheduler_override_is_explicit_printed_and_recorded(pixel, tmp_path, capsys):
    base = ["sample", "--model", str(pixel), "--num-samples", "4", "--steps", "3", "--seed", "1"]
    assert cli_main([*base, "--out", str(tmp_path / "stored.npz")]) == 0
    assert cli_main([*base, "--scheduler-set", "clip_sample=false", "--out", str(tmp_path / "over.npz")]) == 0
    err = capsys.readouterr().err
    assert "note: scheduler setting clip_sample = False (stored: True)" in err
    stored, over = np.load(tmp_path / "stored.npz"), np.load(tmp_path / "over.npz")
    m0, m1 = json.loads(str(stored["meta"])), json.loads(str(over["meta"]))
    assert m0["scheduler"] == "DDPMScheduler" and m0["scheduler_overrides"] is None
    assert m1["scheduler_overrides"] == {"clip_sample": False}
    # the stored DDPMScheduler clips x0 to [-1, 1]; without clipping the random teacher's x0 is far outside
    assert np.abs(stored["samples"]).max() < np.abs(over["samples"]).max()
    assert cli_main([*base, "--scheduler-set", "clip_sample", "--out", str(tmp_path / "x.npz")]) == 2


def test_teacher_x0_guard_names_the_fix(pixel, tmp_path):
    d = load_denoiser(pixel)
    msg = x0_range_problem(d, 999.0, *range_limit(d))
    assert msg is not None and "predicts epsilon" in msg and "lower student.t_init" in msg and "157x" in msg
    v = load_denoiser(build_tiny_sd(tmp_path / "sdv", prediction_type="v_prediction"))
    assert x0_range_problem(v, 999.0, *range_limit(v)) is None  # x0 = alpha x - sigma v stays bounded


def test_data_that_does_not_match_the_teacher_is_one_line_error(pixel, tmp_path, capsys):
    from PIL import Image

    from diffdiv.trainers.entry import run
    from diffdiv.trainers.fdistill import FDistillTrainer

    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(2):
        Image.fromarray(np.full((16, 16, 3), 40 * i, dtype=np.uint8)).save(folder / f"{i}.png")
    with pytest.raises(SystemExit) as e:  # 3x16x16 images for a 1x8x8 teacher
        run(FDistillTrainer, ["--config", "configs/digits_fdistill_js.yaml", f"teacher.path={pixel}",
                              f"output_dir={tmp_path / 'p'}", "data.kind=image_folder", f"data.path={folder}",
                              "data.image_size=16", "data.channels=3", "max_steps=1", "progress=false",
                              "log_with=null"])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and err[-1] == ("error: data: samples are 3x16x16 but the teacher generates 1x8x8; set "
                                             "data.image_size: 8 and data.channels: 1, or drop the data section"), err
    assert not any("Traceback" in line for line in err)


def test_train_help_lists_config_keys(capsys):
    from diffdiv.trainers.entry import parse_args
    from diffdiv.trainers.rcm import RCMConfig

    with pytest.raises(SystemExit) as e:
        parse_args(["--help"], "rCM", RCMConfig)
    out = capsys.readouterr().out
    assert e.value.code == 0
    assert "student.t_init = null" in out and "mid_sigmas = [" in out and "teacher.guidance_scale = 1.0" in out
    assert "# global batch per micro-step" in out  # the field comments come along


def test_eval_flags_too_few_samples_for_the_feature_dimension(tmp_path):
    from diffdiv.eval.report import write_report

    rows = [{"label": lab, "steps": 1, "kind": "one_step", "num_samples": 128, "time_s": 1.0, "guidance_scale": 1.0,
             "metrics": {"fid": f, "precision": 0.0, "recall": r, "mmd": 0.1}}
            for lab, f, r in (("teacher", 80.0, 0.2), ("student", 60.0, 0.4))]
    warnings = feature_sample_warnings(rows, 768, 5000)
    assert len(warnings) == 2 and "128 samples in 768-d" in warnings[0] and "precision is 0" in warnings[1]
    assert rows[0]["unreliable"] == ["fid", "precision", "recall", "mmd"]
    ok = [dict(rows[0], num_samples=1000, unreliable=None, metrics={"fid": 1.0, "precision": 0.5, "recall": 0.5})]
    assert feature_sample_warnings(ok, 768, 5000) == []
    write_report({"rows": rows, "warnings": warnings, "metrics": ["fid"], "num_samples": 128, "seed": 0,
                  "batch_size": 64, "processes": 1, "guidance_scale": None}, tmp_path)
    md = (tmp_path / "report.md").read_text()
    assert "## Warnings" in md and "80.000 †" in md and "| guidance |" in md


def test_grid_labels(tmp_path):
    from PIL import Image

    from diffdiv.data.images import save_image_grid

    x = -torch.ones(4, 3, 32, 32)  # black tiles
    save_image_grid(x, tmp_path / "a.png")
    save_image_grid(x, tmp_path / "b.png", labels=["a photo of a cat", "a red car", "x", "y"])
    a, b = Image.open(tmp_path / "a.png"), Image.open(tmp_path / "b.png")
    assert a.width == b.width and b.height == a.height + 2 * 14
    assert np.asarray(b)[a.height // 2 - 10: a.height // 2 + 20].max() > 0  # text pixels under the first row
