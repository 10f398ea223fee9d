"""f-divergence table: f(r) and the generator weight h(r) = r^2 f''(r) (docs/math.md#f-table).

The one vocabulary of divergence names in diffdiv (f-distill, Uni-Instruct, ROCM's step regularizer).
Convention (f-distill, Xu et al. 2025, arXiv 2502.15681, sec. 3): D_f(p||q) = E_q[f(p/q)], r = p/q,
f convex with f(1) = 0. The generator gradient is E[h(r) (s_q - s_p)^T dx_t/dtheta] with
h(r) = r^2 f''(r) (the f-distill gradient theorem; derivation in docs/math.md#core). h is returned un-normalized.
In distillation p is the teacher and q the student; ROCM compares p = the fine-tuned (policy) step with
q = the reference step, so its KL(policy || reference) is "fkl".

Scales (no hidden factors): hellinger is f = (sqrt r - 1)^2, D = int (sqrt p - sqrt q)^2 = 2 (1 - BC) with
the Bhattacharyya coefficient BC = int sqrt(p q), so D is in [0, 2]; for two equal-variance Gaussians at
Mahalanobis distance d, BC = exp(-d^2/8) and D = 2 (1 - exp(-d^2/8)). tv is (1/2) int |p - q| in [0, 1];
js is (1/2) KL(p||m) + (1/2) KL(q||m), m = (p + q)/2, in [0, log 2]; pearson is int (p - q)^2 / q.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from diffdiv.config import ConfigError

#: canonical names; `alpha:<a>` (any real a) is accepted as well
DIVERGENCES: tuple[str, ...] = (
    "rkl", "fkl", "js", "hellinger", "jeffreys", "srkl", "pearson", "neyman", "tv", "alpha:<a>",
)
_FIXED = DIVERGENCES[:-1]
#: names whose f has no second derivative (tv: f'' is a point mass at r = 1), so no generator weight h(r)
NO_WEIGHT: tuple[str, ...] = ("tv",)
#: former names (ROCM's `kl`, `chi2`), rejected with a one-line error naming the table name
RENAMED: dict[str, str] = {"kl": "fkl", "chi2": "pearson"}


def parse_divergence(name: str, need_weight: bool = False) -> tuple[str, float | None]:
    """Validate a divergence name -> (kind, alpha-parameter or None).

    Raises `ConfigError` (a ValueError) naming the valid choices for an unknown name, the table name for a
    former name (RENAMED), and, with need_weight, for a name without a generator weight (NO_WEIGHT).
    """
    if not isinstance(name, str):
        raise ConfigError(f"divergence must be a string, got {type(name).__name__}")
    key = name.strip().lower()
    if key in RENAMED:
        raise ConfigError(f"divergence {name!r} is now called {RENAMED[key]!r} (one name per divergence, "
                          f"diffdiv.divergence.fdiv); valid: {', '.join(DIVERGENCES)}")
    if key in _FIXED:
        if need_weight and key in NO_WEIGHT:
            smooth = ", ".join(n for n in DIVERGENCES if n not in NO_WEIGHT)
            raise ConfigError(f"divergence {name!r} has no generator weight h(r) = r^2 f''(r) (f is not twice "
                              f"differentiable); choose from {smooth}")
        return key, None
    if key.startswith("alpha:"):
        try:
            a = float(key.split(":", 1)[1])
        except ValueError:
            a = math.nan
        if not math.isfinite(a):
            raise ConfigError(f"divergence {name!r}: alpha:<a> needs a finite number, e.g. alpha:0.5")
        return "alpha", a
    raise ConfigError(f"unknown divergence {name!r}; valid: {', '.join(DIVERGENCES)}")


def _float(r: Tensor) -> Tensor:
    r = torch.as_tensor(r)
    return r.to(torch.promote_types(r.dtype, torch.float32))


def f_value(r: Tensor, name: str) -> Tensor:
    """f(r) of the named divergence (elementwise, r > 0)."""
    kind, a = parse_divergence(name)
    r = _float(r)
    log = torch.log
    if kind == "rkl":  # KL(q||p): f = -log r
        return -log(r)
    if kind == "fkl":  # KL(p||q): f = r log r
        return torch.xlogy(r, r)
    if kind == "js":  # f = 1/2 [r log r - (1+r) log((1+r)/2)]
        return 0.5 * (torch.xlogy(r, r) - (1 + r) * log((1 + r) / 2))
    if kind == "hellinger":  # squared Hellinger: f = (sqrt r - 1)^2
        return (torch.sqrt(r) - 1) ** 2
    if kind == "jeffreys":  # f = (r - 1) log r
        return (r - 1) * log(r)
    if kind == "srkl":  # softened reverse KL: f = (1+r) log((1+r)/(2r))
        return (1 + r) * log((1 + r) / (2 * r))
    if kind == "pearson":  # f = (r - 1)^2
        return (r - 1) ** 2
    if kind == "neyman":  # f = (1 - r)^2 / r
        return (1 - r) ** 2 / r
    if kind == "tv":  # total variation: f = |r - 1| / 2
        return 0.5 * (r - 1).abs()
    # alpha family: f = (r^a - a r - (1 - a)) / (a (a - 1)); limits at a = 0, 1
    assert a is not None
    if a == 0.0:
        return r - 1 - log(r)
    if a == 1.0:
        return torch.xlogy(r, r) - r + 1
    return (r**a - a * r - (1 - a)) / (a * (a - 1))


def f_weight(r: Tensor, name: str) -> Tensor:
    """h(r) = r^2 f''(r) of the named divergence (elementwise, un-normalized)."""
    kind, a = parse_divergence(name, need_weight=True)
    r = _float(r)
    if kind == "rkl":
        return torch.ones_like(r)
    if kind == "fkl":
        return r.clone()
    if kind == "js":
        return r / (2 * (1 + r))
    if kind == "hellinger":
        return 0.5 * torch.sqrt(r)
    if kind == "jeffreys":
        return 1 + r
    if kind == "srkl":
        return 1 / (1 + r)
    if kind == "pearson":
        return 2 * r**2
    if kind == "neyman":
        return 2 / r
    assert a is not None
    return r**a
