"""ROCM: closed-form f-divergences of equal-variance Gaussian steps vs numerical integration (of the densities
and of the f table's E_q f(p/q): same names, same scale), the summed
per-step KL of an affine consistency chain vs the exact KL of the joint path distribution, and the chain
vs diffdiv.sampling.sample_consistency."""

import math

import pytest
import torch
from scipy import integrate, stats

from diffdiv.config import ConfigError, load_config
from diffdiv.divergence import DIVERGENCES, f_value
from diffdiv.divergence.exact import gaussian_kl
from diffdiv.methods.rocm import ROCM_DIVERGENCES, gaussian_step_divergence, step_sq_distance
from diffdiv.models.gmm import GaussianMixture, GaussianMixtureTeacher
from diffdiv.param import VPSchedule
from diffdiv.sampling import consistency_chain, sample_consistency
from diffdiv.trainers.rocm import ROCMConfig

DT = torch.float64
DS = (0.05, 0.3, 1.0, 2.5, 5.0)


def _integrand(name: str, d: float, sigma: float):
    """Integrand of D(p||q) written from the two densities (not from the f table), p = N(0, s^2), q = N(d s, s^2)."""
    p = stats.norm(0.0, sigma).pdf
    q = stats.norm(d * sigma, sigma).pdf
    if name == "fkl":  # KL(p||q)
        return lambda x: p(x) * (math.log(p(x)) - math.log(q(x))) if p(x) > 0 and q(x) > 0 else 0.0
    if name == "rkl":  # KL(q||p)
        return lambda x: q(x) * (math.log(q(x)) - math.log(p(x))) if p(x) > 0 and q(x) > 0 else 0.0
    if name == "hellinger":
        return lambda x: (math.sqrt(p(x)) - math.sqrt(q(x))) ** 2  # = 2 (1 - BC)
    if name == "tv":
        return lambda x: 0.5 * abs(p(x) - q(x))
    if name == "pearson":
        return lambda x: (p(x) - q(x)) ** 2 / q(x) if q(x) > 0 else 0.0
    if name == "neyman":
        return lambda x: (p(x) - q(x)) ** 2 / p(x) if p(x) > 0 else 0.0
    if name == "js":
        def f(x):
            m = 0.5 * (p(x) + q(x))
            out = 0.0
            if p(x) > 0:
                out += 0.5 * p(x) * math.log(p(x) / m)
            if q(x) > 0:
                out += 0.5 * q(x) * math.log(q(x) / m)
            return out
        return f
    raise ValueError(name)


def _table_integrand(name: str, d: float, sigma: float):
    """q f(p/q) with f from the f-divergence table (D_f(p||q) = E_q f(p/q)), in log space for the ratio."""
    p, q = stats.norm(0.0, sigma), stats.norm(d * sigma, sigma)

    def f(x):
        r = torch.tensor([math.exp(p.logpdf(x) - q.logpdf(x))], dtype=DT)
        return q.pdf(x) * float(f_value(r, name)[0])
    return f


def numeric_divergence(name: str, d: float, sigma: float = 0.7, table: bool = False) -> float:
    """D_f(N(0, s^2) || N(d s, s^2)) by adaptive quadrature of the densities (1-D, along the mean difference)."""
    lo, hi = -12 * sigma, (d + 12) * sigma
    pts = [0.0, 0.5 * d * sigma, d * sigma]
    fn = _table_integrand(name, d, sigma) if table else _integrand(name, d, sigma)
    val, _ = integrate.quad(fn, lo, hi, points=pts, limit=400, epsabs=1e-13, epsrel=1e-11)
    return val


@pytest.mark.parametrize("name", ROCM_DIVERGENCES)
def test_closed_forms_match_numerical_integration(name):
    d = torch.tensor(DS, dtype=DT)
    mine = gaussian_step_divergence(name, d**2)
    ref = torch.tensor([numeric_divergence(name, float(v)) for v in DS], dtype=DT)
    torch.testing.assert_close(mine, ref, rtol=1e-7, atol=1e-10)


@pytest.mark.parametrize("name", ROCM_DIVERGENCES)
def test_closed_forms_are_the_f_table_divergences(name):
    """Same meaning and scale as diffdiv.divergence.fdiv: E_q f(p/q) by quadrature with the table's f."""
    assert name in DIVERGENCES
    ds = DS[:4]  # at d = 5 the ratio p/q spans exp(+-60) and pearson's integrand is dominated by far tails
    mine = gaussian_step_divergence(name, torch.tensor(ds, dtype=DT) ** 2)
    ref = torch.tensor([numeric_divergence(name, v, table=True) for v in ds], dtype=DT)
    torch.testing.assert_close(mine, ref, rtol=1e-6, atol=1e-10)


def test_hellinger_scale_is_two_one_minus_bc():
    """hellinger = int (sqrt p - sqrt q)^2 = 2 (1 - BC), BC = exp(-d^2/8): e.g. 2 (1 - e^{-1/2}) at d = 2."""
    bc = integrate.quad(lambda x: math.sqrt(stats.norm(0, 1).pdf(x) * stats.norm(2, 1).pdf(x)), -12, 14)[0]
    assert abs(bc - math.exp(-0.5)) < 1e-10
    assert abs(float(gaussian_step_divergence("hellinger", torch.tensor([4.0], dtype=DT))[0]) - 2 * (1 - bc)) < 1e-10


def test_names_are_the_f_table_and_old_names_point_to_it():
    assert set(ROCM_DIVERGENCES) <= set(DIVERGENCES)
    for old, new in (("kl", "fkl"), ("chi2", "pearson")):
        with pytest.raises(ConfigError, match=f"now called '{new}'"):
            gaussian_step_divergence(old, torch.ones(1))
        with pytest.raises(ConfigError, match=f"now called '{new}'"):
            load_config(ROCMConfig, None, [f"divergence={old}"])
    for bad in ("alpha:0.5", "jeffreys", "foo"):
        with pytest.raises(ConfigError, match="fkl, rkl, hellinger"):
            load_config(ROCMConfig, None, [f"divergence={bad}"])
    assert load_config(ROCMConfig, None, ["divergence=Hellinger"]).divergence == "Hellinger"  # case-insensitive


def test_multivariate_reduces_to_distance_along_mean_difference():
    """N(alpha f1, s^2 I) vs N(alpha f2, s^2 I) in D=5: KL equals the exact multivariate formula, and every
    divergence equals the 1-D one at d = alpha ||f1 - f2|| / s (= exp(logsnr/2) ||f1 - f2||)."""
    g = torch.Generator().manual_seed(0)
    f1, f2 = torch.randn(1, 5, generator=g, dtype=DT), torch.randn(1, 5, generator=g, dtype=DT) * 0.3
    alpha, sigma = 0.8, 0.6
    d2 = step_sq_distance(f1, f2, 2 * math.log(alpha / sigma)).double()
    torch.testing.assert_close(d2, alpha**2 * ((f1 - f2) ** 2).sum(1) / sigma**2)
    cov = sigma**2 * torch.eye(5, dtype=DT)
    kl = gaussian_kl(alpha * f1[0], cov, alpha * f2[0], cov)
    torch.testing.assert_close(gaussian_step_divergence("fkl", d2)[0], kl)
    # Monte Carlo in 5-D for the Bhattacharyya coefficient (squared Hellinger = 2 (1 - E_p sqrt(q/p)))
    n = 400_000
    x = alpha * f1 + sigma * torch.randn(n, 5, generator=g, dtype=DT)
    logr = (-((x - alpha * f2) ** 2).sum(1) + ((x - alpha * f1) ** 2).sum(1)) / (2 * sigma**2)
    bc = torch.exp(0.5 * logr)
    se = 2 * float(bc.std() / math.sqrt(n))
    assert abs(float(2 * (1 - bc.mean())) - float(gaussian_step_divergence("hellinger", d2)[0])) < 4 * se


def test_js_gradient_matches_numerical_derivative():
    for d in (0.3, 1.5, 4.0):
        d2 = torch.tensor([d * d], dtype=DT, requires_grad=True)
        (g,) = torch.autograd.grad(gaussian_step_divergence("js", d2).sum(), d2)
        h = 1e-4
        hi, lo = numeric_divergence("js", math.sqrt(d * d + h)), numeric_divergence("js", math.sqrt(d * d - h))
        num = (hi - lo) / (2 * h)
        assert abs(float(g) - num) < 1e-6 * max(1.0, abs(num)), (d, float(g), num)


def test_chi2_is_capped_not_infinite():
    v = gaussian_step_divergence("pearson", torch.tensor([1e4]))
    assert torch.isfinite(v).all()


def _affine_joint(A: torch.Tensor, b: torch.Tensor, sched: VPSchedule, times: list[float], lam_f: float):
    """Mean and covariance of (x_0, x_1, x_f) for a 2-step chain with f(x) = A x + b:
    x_0 = s_0 z, x_1 = a_1 f(x_0) + s_1 e1, x_f = a_f f(x_1) + s_f e2 (the last step's re-noising)."""
    D = len(b)
    _, s0 = (float(v) for v in sched.alpha_sigma(torch.tensor([times[0]], dtype=DT)))
    a1, s1 = (float(v) for v in sched.alpha_sigma(torch.tensor([times[1]], dtype=DT)))
    af, sf = math.sqrt(1 / (1 + math.exp(-lam_f))), math.sqrt(1 / (1 + math.exp(lam_f)))
    eye, zero = torch.eye(D, dtype=DT), torch.zeros(D, D, dtype=DT)
    # linear map from w = (z, e1, e2) ~ N(0, I_3D)
    M0 = torch.cat([s0 * eye, zero, zero], 1)
    M1 = torch.cat([a1 * A @ (s0 * eye), s1 * eye, zero], 1)
    Mf = torch.cat([af * A @ M1[:, :D], af * A @ M1[:, D:2 * D], sf * eye], 1)
    m0 = torch.zeros(D, dtype=DT)
    m1 = a1 * b
    mf = af * (A @ m1 + b)
    M = torch.cat([M0, M1, Mf], 0)
    return torch.cat([m0, m1, mf]), M @ M.T


def test_summed_step_kl_is_the_path_kl():
    """Chain rule: E_theta[sum_i KL_i] = KL of the joint Gaussians of the whole chain (affine models)."""
    sched = VPSchedule.linear()
    times = [999.0, 400.0]
    lam_f = 2.0
    A1 = torch.tensor([[0.9, 0.2], [-0.1, 0.7]], dtype=DT)
    b1 = torch.tensor([0.3, -0.2], dtype=DT)
    A2 = torch.tensor([[0.8, 0.0], [0.1, 0.9]], dtype=DT)
    b2 = torch.tensor([0.1, 0.1], dtype=DT)
    m1, S1 = _affine_joint(A1, b1, sched, times, lam_f)
    m2, S2 = _affine_joint(A2, b2, sched, times, lam_f)
    exact = gaussian_kl(m1, S1, m2, S2)
    g = torch.Generator().manual_seed(1)
    n = 200_000
    z = torch.randn(n, 2, generator=g, dtype=DT)
    noises = [torch.randn(n, 2, generator=g, dtype=DT)]
    out = consistency_chain(lambda x, t: x @ A1.T + b1, z, times, sched, noises, lambda x, t: x @ A2.T + b2,
                            "fkl", final_logsnr=lam_f)
    se = float(out.div.std() / math.sqrt(n))
    assert abs(float(out.div.mean()) - float(exact)) < 4 * se, (float(out.div.mean()), float(exact), se)
    assert float(exact) > 20 * se
    torch.testing.assert_close(out.kl, out.div.float())


def test_chain_matches_sample_consistency_and_gradients_flow():
    mix = GaussianMixture([[-1.0, 0.5], [1.0, -0.5]], 0.3)
    teacher = GaussianMixtureTeacher(mix, VPSchedule.linear())
    times = [999.0, 600.0, 200.0]
    noise = torch.randn(16, 2, generator=torch.Generator().manual_seed(2))
    ref = sample_consistency(teacher, noise, 3, times, generator=torch.Generator().manual_seed(3))
    g = torch.Generator().manual_seed(3)
    noises = [torch.randn(noise.shape, generator=g) for _ in range(2)]
    out = consistency_chain(lambda x, t: teacher(x, t), noise, times, teacher.schedule, noises)
    torch.testing.assert_close(out.x0, ref)
    # reparameterized: the reward gradient reaches the parameters of the first step
    scale = torch.tensor(1.0, requires_grad=True)
    out = consistency_chain(lambda x, t: scale * teacher(x, t), noise, times, teacher.schedule, noises,
                            lambda x, t: teacher(x, t), "hellinger")
    (g1,) = torch.autograd.grad(out.x0.sum() + out.div.sum(), scale)
    assert torch.isfinite(g1) and float(g1.abs()) > 0
    assert out.div.shape == (16,) and float(out.div.detach().min()) == 0.0  # identical models where scale = 1
