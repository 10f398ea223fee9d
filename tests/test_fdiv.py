"""f-divergence table: f(1) = 0, convexity, and h(r) = r^2 f''(r) against autograd in float64."""

from __future__ import annotations

import math

import pytest
import torch

from diffdiv.config import ConfigError
from diffdiv.divergence import DIVERGENCES, f_value, f_weight, parse_divergence
from diffdiv.divergence.fdiv import NO_WEIGHT, RENAMED

NAMES = [n for n in DIVERGENCES if not n.startswith("alpha") and n not in NO_WEIGHT] + [
    "alpha:0.5", "alpha:-1", "alpha:2", "alpha:0", "alpha:1", "alpha:1.7", "ALPHA:-0.3",
]
R = torch.logspace(-2.5, 2.5, 301, dtype=torch.float64)


def _second_derivative(name: str, r: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    r = r.clone().requires_grad_(True)
    f = f_value(r, name)
    (d1,) = torch.autograd.grad(f.sum(), r, create_graph=True)
    (d2,) = torch.autograd.grad(d1.sum(), r)
    return d1.detach(), d2


def test_names_listed():
    assert set(DIVERGENCES) == {"rkl", "fkl", "js", "hellinger", "jeffreys", "srkl", "pearson", "neyman", "tv",
                                "alpha:<a>"}
    assert NO_WEIGHT == ("tv",) and set(RENAMED.values()) <= set(DIVERGENCES)


@pytest.mark.parametrize("name", NAMES)
def test_f_at_one_is_zero(name):
    one = torch.ones(3, dtype=torch.float64)
    assert torch.allclose(f_value(one, name), torch.zeros(3, dtype=torch.float64), atol=1e-15)


@pytest.mark.parametrize("name", NAMES)
def test_h_is_r2_fpp(name):
    _, d2 = _second_derivative(name, R)
    expect = R**2 * d2
    got = f_weight(R, name)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, expect, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("name", NAMES)
def test_convex(name):
    _, d2 = _second_derivative(name, R)
    assert bool((d2 > 0).all()), f"f'' not positive for {name}"
    # midpoint convexity on random pairs, independent of autograd
    g = torch.Generator().manual_seed(0)
    a = torch.exp(torch.randn(2000, generator=g, dtype=torch.float64) * 2)
    b = torch.exp(torch.randn(2000, generator=g, dtype=torch.float64) * 2)
    lam = torch.rand(2000, generator=g, dtype=torch.float64)
    lhs = f_value(lam * a + (1 - lam) * b, name)
    rhs = lam * f_value(a, name) + (1 - lam) * f_value(b, name)
    assert bool((lhs <= rhs + 1e-9 * (1 + rhs.abs())).all())


@pytest.mark.parametrize("name", NAMES)
def test_f_prime_at_one_finite_and_min_of_divergence(name):
    # D_f(p||p) = 0 is the minimum: the "tangent-shifted" f(r) - f'(1)(r - 1) is >= 0 (convex, zero at 1)
    d1, _ = _second_derivative(name, torch.ones(1, dtype=torch.float64))
    shifted = f_value(R, name) - d1 * (R - 1)
    assert bool((shifted >= -1e-12).all())


def test_table_values():
    r = torch.tensor([0.25, 1.0, 4.0], dtype=torch.float64)
    torch.testing.assert_close(f_weight(r, "js"), r / (2 * (1 + r)))
    torch.testing.assert_close(f_weight(r, "neyman"), 2 / r)
    torch.testing.assert_close(f_weight(r, "alpha:0.5"), torch.sqrt(r))
    torch.testing.assert_close(f_value(r, "rkl"), -torch.log(r))
    torch.testing.assert_close(f_value(torch.tensor([4.0], dtype=torch.float64), "hellinger"),
                               torch.tensor([1.0], dtype=torch.float64))


def test_low_precision_input_computes_in_fp32():
    r = torch.tensor([0.5, 2.0], dtype=torch.bfloat16)
    assert f_weight(r, "fkl").dtype == torch.float32
    assert f_value(r, "js").dtype == torch.float32


@pytest.mark.parametrize("bad", ["kl", "alpha:", "alpha:x", "alpha:nan", "", "chi2"])
def test_unknown_name_raises_listing_valid(bad):
    with pytest.raises(ValueError) as e:
        f_weight(torch.ones(1), bad)
    assert isinstance(e.value, ConfigError)
    if not bad.startswith("alpha"):
        for valid in ("rkl", "fkl", "js", "neyman", "alpha:<a>"):
            assert valid in str(e.value)


def test_parse():
    assert parse_divergence("JS") == ("js", None)
    kind, a = parse_divergence("alpha:0.25")
    assert kind == "alpha" and math.isclose(a, 0.25)


@pytest.mark.parametrize("old,new", [("kl", "fkl"), ("chi2", "pearson"), (" KL ", "fkl")])
def test_former_names_name_the_table_name(old, new):
    with pytest.raises(ConfigError, match=f"is now called '{new}'"):
        parse_divergence(old)


def test_tv_has_f_but_no_generator_weight():
    r = torch.tensor([0.25, 1.0, 3.0], dtype=torch.float64)
    torch.testing.assert_close(f_value(r, "tv"), torch.tensor([0.375, 0.0, 1.0], dtype=torch.float64))
    with pytest.raises(ConfigError, match="no generator weight"):
        f_weight(r, "tv")
    with pytest.raises(ConfigError, match="no generator weight"):
        parse_divergence("tv", need_weight=True)


def _gauss_quad(fn, d: float) -> float:
    from scipy import integrate

    return integrate.quad(fn, -12.0, d + 12.0, points=[0.0, d / 2, d], limit=400, epsabs=1e-13, epsrel=1e-11)[0]


@pytest.mark.parametrize("d", [0.3, 1.0, 2.0, 3.5])
def test_table_scale_on_two_gaussians(d):
    """E_q f(p/q) with the table's f, p = N(0, 1), q = N(d, 1), by quadrature, against the densities' own integrals:
    hellinger = int (sqrt p - sqrt q)^2 = 2 (1 - BC) = 2 (1 - exp(-d^2/8)); tv = int |p - q| / 2 = erf(d / 2 sqrt 2)."""
    from scipy import stats

    p, q = stats.norm(0.0, 1.0), stats.norm(d, 1.0)

    def table(name):
        return _gauss_quad(lambda x: q.pdf(x) * float(f_value(torch.tensor(math.exp(p.logpdf(x) - q.logpdf(x)),
                                                                            dtype=torch.float64), name)), d)

    hel = table("hellinger")
    assert abs(hel - _gauss_quad(lambda x: (math.sqrt(p.pdf(x)) - math.sqrt(q.pdf(x))) ** 2, d)) < 1e-10
    bc = _gauss_quad(lambda x: math.sqrt(p.pdf(x) * q.pdf(x)), d)
    assert abs(hel - 2 * (1 - bc)) < 1e-10 and abs(hel - 2 * (1 - math.exp(-d * d / 8))) < 1e-10
    tv = table("tv")
    assert abs(tv - _gauss_quad(lambda x: 0.5 * abs(p.pdf(x) - q.pdf(x)), d)) < 1e-10
    assert abs(tv - math.erf(d / (2 * math.sqrt(2)))) < 1e-9
