"""Density ratio from discriminator logits, bin/batch normalization (with 2 real gloo ranks), GAN losses."""

from __future__ import annotations

import json
import math
import os
import socket

import pytest
import torch
import torch.nn.functional as F
from scipy.stats import norm

from diffdiv.divergence import (
    RatioBinNormalizer,
    discriminator_loss,
    gan_generator_loss,
    normalize_batch_mean,
    ratio_from_logits,
)

# ----------------------------------------------------------------------------------------------
# ratio_from_logits
# ----------------------------------------------------------------------------------------------


def test_ratio_from_logits_values_clamp_clip():
    logits = torch.tensor([[0.0, 1.0], [50.0, 50.0], [-50.0, -50.0], [math.log(3.0), math.log(3.0)]],
                          requires_grad=True)
    r = ratio_from_logits(logits)
    assert r.dtype == torch.float32 and not r.requires_grad and r.shape == (4,)
    torch.testing.assert_close(r, torch.tensor([math.exp(0.5), 20.0, 0.1, 3.0]))
    r2 = ratio_from_logits(logits, clip=None)
    torch.testing.assert_close(r2[1:3], torch.tensor([math.exp(10.0), math.exp(-10.0)]))


def test_ratio_from_logits_low_precision_under_autocast():
    logits = torch.tensor([2.5, -1.25, 0.75], dtype=torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        r = ratio_from_logits(logits)
    assert r.dtype == torch.float32
    torch.testing.assert_close(r, torch.exp(logits.float()))


def test_discriminator_optimum_is_log_ratio():
    """Minimize the population logistic loss over quadratic logits: the minimizer is log p/q exactly."""
    mp, sp, mq, sq = 0.5, 0.8, -0.3, 1.1
    n = 20000
    u = (torch.arange(n, dtype=torch.float64) + 0.5) / n  # midpoint quantiles: deterministic expectations
    xr = torch.as_tensor(norm.ppf(u.numpy(), mp, sp))
    xf = torch.as_tensor(norm.ppf(u.numpy(), mq, sq))
    w = torch.zeros(3, dtype=torch.float64, requires_grad=True)
    feats = lambda x: torch.stack([torch.ones_like(x), x, x * x], 1)  # noqa: E731
    opt = torch.optim.LBFGS([w], lr=1, max_iter=500, tolerance_grad=1e-12, tolerance_change=1e-15,
                            line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = discriminator_loss(feats(xr) @ w, feats(xf) @ w).mean()
        loss.backward()
        return loss

    opt.step(closure)
    # exact log p/q = log(sq/sp) - (x-mp)^2/(2 sp^2) + (x-mq)^2/(2 sq^2)
    a2 = -1 / (2 * sp**2) + 1 / (2 * sq**2)
    a1 = mp / sp**2 - mq / sq**2
    a0 = math.log(sq / sp) - mp**2 / (2 * sp**2) + mq**2 / (2 * sq**2)
    # quantile-midpoint error ~ 1/n in the tails -> 1e-3 on the coefficients
    torch.testing.assert_close(w.detach(), torch.tensor([a0, a1, a2], dtype=torch.float64), rtol=0, atol=2e-3)
    x = torch.linspace(-2, 2, 9, dtype=torch.float64)
    exact_r = torch.as_tensor(norm.pdf(x.numpy(), mp, sp) / norm.pdf(x.numpy(), mq, sq))
    r = ratio_from_logits(feats(x) @ w.detach())
    torch.testing.assert_close(r.double(), exact_r.clamp(0.1, 20.0), rtol=3e-3, atol=0)


def test_gan_losses_values_and_shapes():
    lr = torch.tensor([[0.3, -1.0], [2.0, 0.5]])
    lf = torch.tensor([[-0.2, 0.4], [1.5, -3.0]])
    d = discriminator_loss(lr, lf)
    expect = (F.softplus(-lr).mean(1) + F.softplus(lf).mean(1))
    torch.testing.assert_close(d, expect)
    g = gan_generator_loss(lf.to(torch.bfloat16))
    assert g.dtype == torch.float32 and g.shape == (2,)
    torch.testing.assert_close(g, -torch.log(torch.sigmoid(lf.to(torch.bfloat16).float())).mean(1))


# ----------------------------------------------------------------------------------------------
# normalizers (single process)
# ----------------------------------------------------------------------------------------------


def test_normalize_batch_mean():
    h = torch.tensor([1.0, 2.0, 3.0, 6.0], dtype=torch.bfloat16, requires_grad=True)
    out = normalize_batch_mean(h)
    assert out.dtype == torch.float32 and not out.requires_grad
    torch.testing.assert_close(out, torch.tensor([1.0, 2.0, 3.0, 6.0]) / 3.0)


def test_bin_index_edges():
    nb = RatioBinNormalizer(num_bins=4, decay=0.0, t_min=0.0, t_max=1.0)
    t = torch.tensor([-0.1, 0.0, 0.2499, 0.25, 0.74, 0.75, 1.0, 3.0])
    assert nb.bin_index(t).tolist() == [0, 0, 0, 1, 2, 3, 3, 3]


def _ema_reference(batches, num_bins, decay, t_min, t_max):
    ema = [1.0] * num_bins
    width = (t_max - t_min) / num_bins
    for r, t in batches:
        for k in range(num_bins):
            vals = [float(ri) for ri, ti in zip(r, t)
                    if min(num_bins - 1, max(0, math.floor((float(ti) - t_min) / width))) == k]
            if vals:
                ema[k] = decay * ema[k] + (1 - decay) * sum(vals) / len(vals)
    return ema


@pytest.mark.parametrize("decay", [0.0, 0.9])
def test_bin_ema_matches_hand_computation(decay):
    g = torch.Generator().manual_seed(0)
    nb = RatioBinNormalizer(num_bins=5, decay=decay, t_min=0.0, t_max=999.0)
    batches = []
    for _ in range(4):
        r = torch.exp(torch.randn(12, generator=g))
        t = torch.rand(12, generator=g) * 600  # upper bins never seen: must stay at 1
        batches.append((r, t))
        nb.update(r, t)
    ref = _ema_reference(batches, 5, decay, 0.0, 999.0)
    torch.testing.assert_close(nb.ema, torch.tensor(ref, dtype=torch.float32))
    assert nb.ema[4].item() == 1.0
    r, t = batches[-1]
    torch.testing.assert_close(nb(r, t), r / (torch.tensor(ref)[nb.bin_index(t)] + nb.eps))


def test_bin_normalized_has_unit_bin_means_with_decay0():
    g = torch.Generator().manual_seed(1)
    nb = RatioBinNormalizer(num_bins=3, decay=0.0, t_min=0.0, t_max=1.0, eps=0.0)
    r = torch.exp(torch.randn(300, generator=g))
    t = torch.rand(300, generator=g)
    rn = nb.update_and_normalize(r, t)
    idx = nb.bin_index(t)
    for k in range(3):
        assert abs(rn[idx == k].mean().item() - 1.0) < 1e-6


def test_bin_normalizer_resumes_exactly():
    g = torch.Generator().manual_seed(2)
    data = [(torch.exp(torch.randn(16, generator=g)), torch.rand(16, generator=g)) for _ in range(6)]
    a = RatioBinNormalizer(num_bins=4, decay=0.7)
    for r, t in data[:3]:
        a.update(r, t)
    state = {k: v.clone() for k, v in a.state_dict().items()}
    assert set(state) == {"ema", "count"}
    b = RatioBinNormalizer(num_bins=4, decay=0.7)
    b.load_state_dict(state)
    for r, t in data[3:]:
        assert torch.equal(a.update_and_normalize(r, t), b.update_and_normalize(r, t))
    assert torch.equal(a.ema, b.ema)


def test_bin_normalizer_rejects_bad_config():
    with pytest.raises(ValueError):
        RatioBinNormalizer(num_bins=0)
    with pytest.raises(ValueError):
        RatioBinNormalizer(decay=1.0)
    with pytest.raises(ValueError):
        RatioBinNormalizer(t_min=1.0, t_max=1.0)


# ----------------------------------------------------------------------------------------------
# two real processes (gloo): statistics are all-reduced
# ----------------------------------------------------------------------------------------------


def _data():
    g = torch.Generator().manual_seed(5)
    r = torch.exp(torch.randn(2, 9, generator=g))
    t = torch.rand(2, 9, generator=g)
    h = torch.rand(2, 9, generator=g) + 0.1
    return r, t, h


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        r, t, h = _data()
        nb = RatioBinNormalizer(num_bins=4, decay=0.5)
        nb.update(r[rank], t[rank])
        res = {"ema": nb.ema.tolist(), "norm": normalize_batch_mean(h[rank]).tolist(),
               "rn": nb(r[rank], t[rank]).tolist()}
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump(res, f)
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_all_reduce_across_two_gloo_processes(tmp_path):
    import torch.multiprocessing as mp

    mp.start_processes(_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True,
                       start_method="spawn")
    r, t, h = _data()
    single = RatioBinNormalizer(num_bins=4, decay=0.5)
    single.update(r.reshape(-1), t.reshape(-1))  # one process seeing the global batch
    hn = normalize_batch_mean(h.reshape(-1)).reshape(2, 9)
    for rank in range(2):
        res = json.loads((tmp_path / f"rank{rank}.json").read_text())
        torch.testing.assert_close(torch.tensor(res["ema"]), single.ema)
        torch.testing.assert_close(torch.tensor(res["norm"]), hn[rank])
        torch.testing.assert_close(torch.tensor(res["rn"]), single(r[rank], t[rank]))
    # and the global statistics differ from a single rank's local ones (the test can fail)
    local = RatioBinNormalizer(num_bins=4, decay=0.5)
    local.update(r[0], t[0])
    assert not torch.allclose(local.ema, single.ema)
