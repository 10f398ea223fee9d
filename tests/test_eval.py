"""Evaluation: FID / precision-recall / MMD against exact answers, stats caching, rewards and CLIP score,
the `diffdiv eval` CLI and its report files."""

import json
import math

import numpy as np
import pytest
import scipy.linalg
import torch
from diffusers import DDPMScheduler, UNet2DModel

from diffdiv.config import ConfigError
from diffdiv.data.digits import load_digits_tensor
from diffdiv.eval.features import build_features, extract
from diffdiv.eval.job import main as eval_main
from diffdiv.eval.manifold import feature_mmd, knn_radii, precision_recall
from diffdiv.eval.mixture import mmd_rbf
from diffdiv.eval.reference import parse_ref
from diffdiv.eval.stats import FeatureStats, fid_from_stats
from diffdiv.models.loading import save_denoiser
from diffdiv.models.unet import UNetDenoiser


# ----------------------------------------------------------------------------- exact answers
def _gaussians(d: int = 3):
    g = torch.Generator().manual_seed(0)
    a = torch.randn(d, d, generator=g, dtype=torch.float64)
    b = torch.randn(d, d, generator=g, dtype=torch.float64)
    s1 = a @ a.T / d + 0.1 * torch.eye(d, dtype=torch.float64)
    s2 = b @ b.T / d + 0.2 * torch.eye(d, dtype=torch.float64)
    return torch.zeros(d, dtype=torch.float64), s1, torch.tensor([0.5, -0.3, 0.2], dtype=torch.float64), s2


def _exact_frechet(m1, s1, m2, s2) -> float:
    # ||m1 - m2||^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2)), via scipy's sqrtm (independent of torchmetrics' eigvals)
    root = scipy.linalg.sqrtm(s1.numpy() @ s2.numpy()).real
    return float(((m1 - m2) ** 2).sum() + np.trace(s1.numpy() + s2.numpy() - 2 * root))


def test_fid_from_exact_moments_matches_closed_form():
    m1, s1, m2, s2 = _gaussians()
    exact = _exact_frechet(m1, s1, m2, s2)
    got = fid_from_stats(FeatureStats(m1, s1, 10**6, "raw-3"), FeatureStats(m2, s2, 10**6, "raw-3"))
    assert got == pytest.approx(exact, rel=1e-9)
    same = fid_from_stats(FeatureStats(m1, s1, 50, "raw-3"), FeatureStats(m1, s1, 7, "raw-3"))
    assert same == pytest.approx(0, abs=1e-9)


def test_fid_of_gaussian_samples_matches_closed_form():
    """n = 20000 per side: over 20 seeds the estimate has bias 0.002 and sd 0.021 (FID 2.19); 4 sd allowed."""
    m1, s1, m2, s2 = _gaussians()
    g = torch.Generator().manual_seed(3)
    n = 20000
    x = m1 + torch.randn(n, 3, generator=g, dtype=torch.float64) @ torch.linalg.cholesky(s1).T
    y = m2 + torch.randn(n, 3, generator=g, dtype=torch.float64) @ torch.linalg.cholesky(s2).T
    got = fid_from_stats(FeatureStats.from_features(x, "raw-3"), FeatureStats.from_features(y, "raw-3"))
    assert got == pytest.approx(_exact_frechet(m1, s1, m2, s2), abs=0.085)


def test_fid_zero_for_identical_sets_and_monotone_in_noise():
    """Digits-CNN features: identical sets give ~0; corrupting one set with growing Gaussian noise grows FID."""
    x = load_digits_tensor("test")
    ext = build_features("digits")
    ref = FeatureStats.from_features(extract(ext, x), ext.id)
    eps = torch.randn(x.shape, generator=torch.Generator().manual_seed(0))
    fids = []
    for s in (0.0, 0.05, 0.1, 0.2, 0.4, 0.8):
        fake = FeatureStats.from_features(extract(ext, (x + s * eps).clamp(-1, 1)), ext.id)
        fids.append(fid_from_stats(ref, fake))
    assert abs(fids[0]) < 1e-6 * float(ref.cov.trace())
    assert all(b > a * 1.5 for a, b in zip(fids[1:], fids[2:])), fids  # strictly (and clearly) increasing
    assert fids[1] > 0.1
    # the pre-existing torchmetrics path (float32 features) agrees
    from diffdiv.eval.fid import digits_fid

    y = (x + 0.2 * eps).clamp(-1, 1)
    assert digits_fid(x, y) == pytest.approx(fids[3], rel=1e-5)


def test_mmd_matches_gaussian_closed_form():
    """E k(X, Y) for an RBF kernel of width h, X ~ N(a, sa^2 I), Y ~ N(b, sb^2 I) in d dims is
    (h^2 / v)^(d/2) exp(-|a - b|^2 / (2 v)), v = h^2 + sa^2 + sb^2. n = 2000: over 20 seeds the estimate
    (MMD^2 = 0.409) had bias 0.004 and sd 0.021; 4 sd allowed."""
    hs, d, sa, sb = (0.5, 1.0, 2.0), 2, 0.5, 0.8
    a, b = np.zeros(2), np.array([0.7, 0.0])

    def ek(ma, va, mb, vb, h):
        v = h * h + va + vb
        return (h * h / v) ** (d / 2) * math.exp(-((ma - mb) ** 2).sum() / (2 * v))

    exact = sum(ek(a, sa**2, a, sa**2, h) + ek(b, sb**2, b, sb**2, h) - 2 * ek(a, sa**2, b, sb**2, h) for h in hs)
    g = torch.Generator().manual_seed(1)
    x = torch.from_numpy(a) + sa * torch.randn(2000, 2, generator=g, dtype=torch.float64)
    y = torch.from_numpy(b) + sb * torch.randn(2000, 2, generator=g, dtype=torch.float64)
    assert mmd_rbf(x, y, hs) == pytest.approx(exact, abs=0.085)
    assert feature_mmd(x[:300], y[:300], scales=hs, bandwidth=1.0) == pytest.approx(mmd_rbf(x[:300], y[:300], hs),
                                                                                    rel=1e-12)
    # same distribution: the unbiased estimate is centred on 0 (sd 0.0012 over 20 seeds at n = 1000)
    assert abs(feature_mmd(x[:1000], x[1000:])) < 0.005


def test_knn_radii_match_brute_force():
    x = torch.randn(60, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    d = torch.cdist(x, x)
    for k in (1, 3, 5):
        brute = torch.tensor([sorted(row.tolist())[k] for row in d], dtype=torch.float64)
        torch.testing.assert_close(knn_radii(x, k, chunk=7), brute)


def test_precision_recall_exact_cases():
    g = torch.Generator().manual_seed(0)
    real = torch.rand(500, 2, generator=g, dtype=torch.float64)
    assert precision_recall(real, real.clone()) == {"precision": 1.0, "recall": 1.0}
    assert precision_recall(real, real + 10.0) == {"precision": 0.0, "recall": 0.0}
    # half the fake set sits on real points (distance 0 <= any radius), half far away: precision exactly 0.5
    fake = torch.cat([real[:250], real[250:] + 10.0])
    assert precision_recall(real, fake)["precision"] == 0.5


def test_precision_recall_of_shifted_uniform_squares():
    """real ~ U([0,1]^2), fake ~ U([0.5,1.5] x [0,1]): both overlap fractions are 1/2. The k-NN balls
    overhang the support edge by ~ the k=3 radius (~0.02 at n = 4000), so allow 0.04."""
    g = torch.Generator().manual_seed(1)
    real = torch.rand(4000, 2, generator=g, dtype=torch.float64)
    fake = torch.rand(4000, 2, generator=g, dtype=torch.float64) + torch.tensor([0.5, 0.0], dtype=torch.float64)
    pr = precision_recall(real, fake, k=3)
    assert pr["precision"] == pytest.approx(0.5, abs=0.04)
    assert pr["recall"] == pytest.approx(0.5, abs=0.04)


# ----------------------------------------------------------------------------- stats files and references
@pytest.mark.parametrize("suffix", [".npz", ".safetensors"])
def test_stats_roundtrip_and_extractor_guard(tmp_path, suffix):
    f = torch.randn(40, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    st = FeatureStats.from_features(f, "digits_cnn-v1-abc")
    st.save(tmp_path / f"s{suffix}")
    back = FeatureStats.load(tmp_path / f"s{suffix}")
    assert back.n == 40 and back.extractor == "digits_cnn-v1-abc"
    torch.testing.assert_close(back.mean, st.mean)
    torch.testing.assert_close(back.cov, st.cov)
    torch.testing.assert_close(back.features, f.float().double())
    torch.testing.assert_close(st.cov, torch.from_numpy(np.cov(f.numpy(), rowvar=False)))
    with pytest.raises(ConfigError, match="never mix"):
        fid_from_stats(back, FeatureStats.from_features(f, "clip-xyz"))
    assert parse_ref(str(tmp_path / f"s{suffix}")).kind == "stats"


@pytest.mark.parametrize("spec,needle", [
    ("imagenet", "is not digits"),
    ("digits:val", "split must be train, test or all"),
    ("mixture:/nonexistent/m.yaml", "mixture config file not found"),
    ("/nonexistent/folder", "does not exist"),
    ("", "empty"),
])
def test_bad_ref_values(spec, needle):
    with pytest.raises(ConfigError, match=needle):
        parse_ref(spec)


def test_ref_npz_without_samples_or_stats(tmp_path):
    np.savez(tmp_path / "x.npz", foo=np.zeros(3))
    with pytest.raises(ConfigError, match="neither samples"):
        parse_ref(str(tmp_path / "x.npz"))
    (tmp_path / "m.yaml").write_text("mixture: {kind: ring, num_modes: 0}\n")
    with pytest.raises(ConfigError, match="num_modes"):
        parse_ref(f"mixture:{tmp_path / 'm.yaml'}")


# ----------------------------------------------------------------------------- CLI end to end
@pytest.fixture(scope="module")
def unet_dir(tmp_path_factory):
    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(16, 32), layers_per_block=1,
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                       norm_num_groups=8)
    run = tmp_path_factory.mktemp("run")
    save_denoiser(UNetDenoiser(unet, DDPMScheduler(clip_sample=False)), run / "teacher", {"default_steps": 4})
    ck = run / "checkpoints" / "step_00000020"
    ck.mkdir(parents=True)
    hist = [{"step": 10.0, "teacher/loss": 0.5}, {"step": 20.0, "teacher/loss": 0.3}]
    (ck / "trainer_state.json").write_text(json.dumps({"step": 20, "history": hist}))
    return run / "teacher"


def _chunked_samples(model_dir, n, steps, chunk, seed=0):
    """What the runner must draw: chunk c of size `chunk` from seed `seed * 1000003 + c`, with the folder's own
    stored scheduler (a plain pipeline folder: no diffdiv.json sampler)."""
    from diffdiv.models.loading import load_denoiser
    from diffdiv.sampling import sample

    model = load_denoiser(model_dir).eval()
    parts = [sample(model, min(chunk, n - s), steps, seed=seed * 1000003 + c, batch_size=chunk, sampler="stored")
             for c, s in enumerate(range(0, n, chunk))]
    return torch.cat(parts)


def test_cli_two_models_steps_report_and_comparison(unet_dir, tmp_path, capsys):
    out = tmp_path / "ev"
    rc = eval_main(["--model", f"A={unet_dir}", "--model", f"B={unet_dir}", "--steps", "1,2", "--steps", "3",
                    "--metrics", "fid,precision_recall,mmd,reward:digits:target=3", "--ref", "digits:test",
                    "--num-samples", "48", "--batch-size", "20", "--out", str(out), "--cache-dir", str(tmp_path / "c"),
                    "--no-progress"])
    assert rc == 0, capsys.readouterr().err
    rep = json.loads((out / "metrics.json").read_text())
    assert [(r["label"], r["steps"]) for r in rep["rows"]] == [("A", 1), ("A", 2), ("B", 3)]
    assert all(r["guidance_scale"] == 1.0 and r["scheduler"] == "DDPMScheduler" for r in rep["rows"])
    # the FID is the digits FID of exactly the chunk-seeded samples
    x = _chunked_samples(unet_dir, 48, 2, 20)
    from diffdiv.eval.fid import digits_fid

    row = rep["rows"][1]
    assert row["metrics"]["fid"] == pytest.approx(digits_fid(load_digits_tensor("test"), x), rel=1e-5)
    # the reward is the digits reward of those samples: mean and standard error
    from diffdiv.rewards import build_reward

    r = build_reward({"name": "digits", "target": 3})(x.clamp(-1, 1)).double().numpy()  # images scored clamped
    rw = row["metrics"]["reward:digits:target=3"]
    assert rw["mean"] == pytest.approx(r.mean(), rel=1e-5)
    assert rw["stderr"] == pytest.approx(r.std(ddof=1) / math.sqrt(len(r)), rel=1e-4)
    assert rw["n"] == 48
    assert 0 <= row["metrics"]["precision"] <= 1 and 0 <= row["metrics"]["recall"] <= 1
    # files: report, side-by-side table, grids, metric-vs-steps plot and the training curve
    comp = json.loads((out / "comparison.json").read_text())["table"]
    assert set(comp["fid"]) == {"A", "B"} and set(comp["fid"]["A"]) == {"1", "2"} and set(comp["fid"]["B"]) == {"3"}
    md = (out / "comparison.md").read_text()
    assert "| A |" in md and "3 steps" in md
    for f in ["report.md", "samples_A_1steps.png", "samples_B_3steps.png", "metric_vs_steps.png",
              "training_curve_A.png"]:
        assert (out / f).is_file() and (out / f).stat().st_size > 100, f
    assert "training_curve_A.png" in (out / "report.md").read_text()
    # the reference statistics were cached under the extractor's id, and the cache is reused
    cached = list((tmp_path / "c" / "ref_stats").glob("*.safetensors"))
    assert len(cached) == 1 and "digits_cnn" in cached[0].name
    assert FeatureStats.load(cached[0]).n == len(load_digits_tensor("test"))


def test_api_mixture_teacher_and_cache_key_per_extractor(tmp_path):
    """The exact GMM teacher: at 25 DDIM steps every mode is recalled and FID sits near the noise floor."""
    from diffdiv.data.mixtures import MixtureConfig, build_mixture
    from diffdiv.eval import evaluate
    from diffdiv.models.gmm import GaussianMixtureTeacher

    (tmp_path / "mix.yaml").write_text("data:\n  kind: mixture\n  mixture: {kind: ring, num_modes: 8, radius: 2.0, "
                                       "std: 0.15}\n")
    teacher = GaussianMixtureTeacher(build_mixture(MixtureConfig(kind="ring", num_modes=8, radius=2.0, std=0.15)))
    rep = evaluate({"exact": teacher}, "fid,precision_recall", ref=f"mixture:{tmp_path / 'mix.yaml'}",
                   steps=[1, 25], n=800, out=tmp_path / "o", cache_dir=str(tmp_path / "c"), progress=False,
                   batch_size=400, ref_samples=2000)
    one, many = (r["metrics"] for r in rep["rows"])
    assert many["mode_recall"] == 1.0 and many["far_fraction"] < 0.02 and len(many["mode_mass"]) == 8
    assert many["fid"] < 0.05 < 1.0 < one["fid"]
    assert many["precision"] > 0.9 and many["recall"] > 0.9 and one["precision"] < 0.1
    assert (tmp_path / "o" / "samples_exact_25steps.png").is_file()
    # stats of the same reference under another extractor land in another cache file
    from diffdiv.eval.reference import stats_cache_path

    ref = parse_ref(f"mixture:{tmp_path / 'mix.yaml'}")
    a = stats_cache_path(ref, "raw-2", (2,), 2000, tmp_path / "c")
    b = stats_cache_path(ref, "clip-123", (2,), 2000, tmp_path / "c")
    assert a.is_file() and a != b and not b.exists()


def test_rewards_and_clip_score_per_prompt_on_a_samples_file(tmp_path, capsys):
    """A samples .npz evaluated with prompts: CLIP score = 100 max(cos, 0) from CLIPModel's own forward."""
    from transformers import AutoTokenizer, CLIPModel

    from diffdiv.rewards.clip import ClipEmbedder
    from diffdiv.rewards.tiny import build_tiny_clip

    clip = build_tiny_clip(tmp_path / "clip")
    imgs = torch.rand(10, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    np.savez(tmp_path / "s.npz", images=imgs.numpy())
    (tmp_path / "p.txt").write_text("a photo of a cat\n# comment\na dog\n")
    out = tmp_path / "ev"
    rc = eval_main(["--model", str(tmp_path / "s.npz"), "--metrics", "clip_score,reward:clip_similarity,"
                    "reward:jpeg_compressibility", "--clip", str(clip), "--prompts", str(tmp_path / "p.txt"),
                    "--num-samples", "10", "--batch-size", "4", "--out", str(out), "--no-progress"])
    assert rc == 0, capsys.readouterr().err
    row = json.loads((out / "metrics.json").read_text())["rows"][0]
    prompts = ["a photo of a cat", "a dog"] * 5
    model = CLIPModel.from_pretrained(clip).eval()
    tok = AutoTokenizer.from_pretrained(clip)(prompts, padding="max_length", max_length=32, return_tensors="pt")
    with torch.no_grad():
        o = model(input_ids=tok["input_ids"], attention_mask=tok["attention_mask"],
                  pixel_values=ClipEmbedder.from_pretrained(str(clip)).preprocess(imgs))
    cos = (o.image_embeds * o.text_embeds).sum(-1).double()
    want = (100 * cos.clamp_min(0)).numpy()
    cs = row["metrics"]["clip_score"]
    assert cs["mean"] == pytest.approx(want.mean(), abs=1e-4)
    for p in ("a photo of a cat", "a dog"):
        sel = want[[i for i, q in enumerate(prompts) if q == p]]
        assert cs["per_prompt"][p]["n"] == 5
        assert cs["per_prompt"][p]["mean"] == pytest.approx(sel.mean(), abs=1e-4)
        assert cs["per_prompt"][p]["stderr"] == pytest.approx(sel.std(ddof=1) / math.sqrt(5), abs=1e-4)
    sim = row["metrics"]["reward:clip_similarity"]  # scale 1, no clamp
    assert sim["mean"] == pytest.approx(cos.mean().item(), abs=1e-6)
    from diffdiv.rewards import jpeg_sizes_kb

    assert row["metrics"]["reward:jpeg_compressibility"]["mean"] == pytest.approx(
        -np.mean(np.asarray(jpeg_sizes_kb(imgs), dtype=np.float64)), rel=1e-5)
    assert "Per prompt" in (out / "report.md").read_text()


def _err(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    return err[-1] if err else ""


@pytest.mark.parametrize("extra,needle", [
    (["--ref", "imagenet"], "error: --ref: 'imagenet' is not"),
    (["--ref", "digits:val"], "split must be"),
    (["--metrics", "fid"], "--ref is required"),
    (["--metrics", "fid,bogus", "--ref", "digits"], "unknown metric 'bogus'"),
    (["--ref", "digits", "--steps", "0,2"], "positive"),
    (["--ref", "digits", "--steps", "a"], "comma-separated"),
    (["--metrics", "clip_score"], "clip_score needs --clip"),
    (["--ref", "digits", "--features", "wavelets"], "unknown extractor"),
    (["--metrics", "reward:nope"], "unknown reward 'nope'"),
    (["--ref", "digits", "--steps", "1", "--steps", "2", "--steps", "3"], "--steps given 3 times"),
])
def test_cli_bad_input_is_one_line_exit_2(unet_dir, tmp_path, capsys, extra, needle):
    rc = eval_main(["--model", str(unet_dir), "--out", str(tmp_path / "o"), "--no-progress", *extra])
    err = _err(capsys)
    assert rc == 2 and needle in err and err.startswith("error: "), err


def test_cli_inception_unavailable_and_extractor_mismatch(unet_dir, tmp_path, capsys):
    from torchmetrics.utilities.imports import _TORCH_FIDELITY_AVAILABLE

    base = ["--model", str(unet_dir), "--out", str(tmp_path / "o"), "--no-progress", "--num-samples", "8",
            "--steps", "1", "--metrics", "fid"]
    if not _TORCH_FIDELITY_AVAILABLE:
        rc = eval_main([*base, "--ref", "digits", "--features", "inception"])
        err = _err(capsys)
        assert rc == 2 and "inception" in err and "torch-fidelity" in err, err
    f = torch.randn(20, 64, dtype=torch.float64)
    FeatureStats.from_features(f, "clip-0123").save(tmp_path / "ref.npz")
    rc = eval_main([*base, "--ref", str(tmp_path / "ref.npz")])
    err = _err(capsys)
    assert rc == 2 and "never mix" in err, err
    FeatureStats.from_features(f, "clip-0123", keep=False).save(tmp_path / "ref2.safetensors")
    rc = eval_main([*base, "--ref", str(tmp_path / "ref2.safetensors"), "--metrics", "precision_recall"])
    assert rc == 2 and "holds only mean/cov" in _err(capsys)


def test_training_log_reading(tmp_path):
    from diffdiv.eval.report import find_training_log, plot_training_log, read_history

    model = tmp_path / "run" / "student"
    model.mkdir(parents=True)
    assert find_training_log(model) is None
    ck = tmp_path / "run" / "checkpoints"
    for s in (5, 10):
        (ck / f"step_{s:08d}").mkdir(parents=True)
        (ck / f"step_{s:08d}" / "trainer_state.json").write_text(json.dumps({"history": [{"step": s, "x/loss": 1.0}]}))
    assert find_training_log(model) == ck / "step_00000010" / "trainer_state.json"
    log = tmp_path / "run" / "train_log.jsonl"
    log.write_text('{"step": 1, "reward/mean": 0.1}\n{"step": 2, "reward/mean": 0.4}\n{"step": 3, "rew')
    assert find_training_log(model) == log  # the jsonl wins; a torn last line is skipped
    assert [h["step"] for h in read_history(log)] == [1, 2]
    assert plot_training_log(log, tmp_path / "c.png") == "c.png" and (tmp_path / "c.png").stat().st_size > 100


def test_folder_and_samples_references_agree_with_embedded_digits(unet_dir, tmp_path, capsys):
    """The test split as PNGs (8-bit rounding only) and as a samples .npz give the digits:test FID;
    a samples file's stored prompts are used for per-prompt rewards."""
    from PIL import Image

    x = load_digits_tensor("test")
    (tmp_path / "png").mkdir()
    for i, im in enumerate(x):
        Image.fromarray(((im[0] + 1) * 127.5).round().byte().numpy(), mode="L").save(tmp_path / "png" / f"{i:04d}.png")
    np.savez(tmp_path / "ref.npz", images=x.numpy())
    y = (x[:100] + 0.3 * torch.randn(100, 1, 8, 8, generator=torch.Generator().manual_seed(0))).clamp(-1, 1)
    np.savez(tmp_path / "fake.npz", samples=y.numpy(), prompts=np.array(["3", "7"] * 50))
    fids = {}
    for name, ref in [("digits", "digits:test"), ("folder", str(tmp_path / "png")), ("npz", str(tmp_path / "ref.npz"))]:
        out = tmp_path / name
        rc = eval_main(["--model", str(tmp_path / "fake.npz"), "--metrics", "fid,reward:digits:target=null",
                        "--ref", ref, "--out", str(out), "--no-progress", "--cache-dir", str(tmp_path / "c")])
        assert rc == 0, capsys.readouterr().err
        row = json.loads((out / "metrics.json").read_text())["rows"][0]
        fids[name] = row["metrics"]["fid"]
        assert row["num_samples"] == 100 and row["steps"] is None
    assert fids["npz"] == pytest.approx(fids["digits"], rel=1e-6)
    assert fids["folder"] == pytest.approx(fids["digits"], rel=0.02)
    per = row["metrics"]["reward:digits:target=null"]["per_prompt"]
    assert set(per) == {"3", "7"} and per["3"]["n"] == 50
    from diffdiv.rewards import build_reward

    r3 = build_reward({"name": "digits", "target": 3})(y[0::2]).double()
    assert per["3"]["mean"] == pytest.approx(r3.mean().item(), rel=1e-5)


def test_clip_features_fid_and_default_extractor(tmp_path, capsys):
    """`--features clip:<dir>`: FID over CLIP image embeddings; RGB samples default to CLIP when --clip is set."""
    from diffdiv.rewards.clip import ClipEmbedder
    from diffdiv.rewards.tiny import build_tiny_clip

    clip = build_tiny_clip(tmp_path / "clip")
    g = torch.Generator().manual_seed(0)
    a = torch.rand(40, 3, 32, 32, generator=g) * 2 - 1
    b = (a + 0.5 * torch.randn(a.shape, generator=g)).clamp(-1, 1)
    np.savez(tmp_path / "a.npz", images=a.numpy())
    np.savez(tmp_path / "b.npz", images=b.numpy())
    fids = {}
    for name, feat in [("named", ["--features", f"clip:{clip}"]), ("default", ["--clip", str(clip)])]:
        rc = eval_main(["--model", str(tmp_path / "b.npz"), "--ref", str(tmp_path / "a.npz"), "--metrics", "fid",
                        "--out", str(tmp_path / name), "--no-progress", "--cache-dir", str(tmp_path / "c"), *feat])
        assert rc == 0, capsys.readouterr().err
        rep = json.loads((tmp_path / name / "metrics.json").read_text())
        assert rep["features"]["id"].startswith("clip-") and rep["features"]["dim"] == 32
        fids[name] = rep["rows"][0]["metrics"]["fid"]
    emb = ClipEmbedder.from_pretrained(str(clip))
    with torch.no_grad():
        fa, fb = emb.embed_images(a).double(), emb.embed_images(b).double()
    want = fid_from_stats(FeatureStats.from_features(fa, "x"), FeatureStats.from_features(fb, "x"))
    assert fids["named"] == pytest.approx(want, rel=1e-4) and fids["default"] == pytest.approx(want, rel=1e-4)
    assert want > 1e-3
