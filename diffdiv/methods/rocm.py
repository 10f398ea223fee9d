"""ROCM (Shekhar & Zhang 2025, arXiv 2503.06171): first-order reward optimization through a consistency
model's few-step chain with an f-divergence regularizer between fine-tuned and reference step distributions.

Chain (sCM multistep sampling, the semantics of diffdiv.sampling.sample_consistency):
    x_0 = sigma_{t_0} z,  f_i = f_theta(x_i, t_i),  x_{i+1} = alpha_{t_{i+1}} f_i + sigma_{t_{i+1}} eps_i.
Step i is the Gaussian N(alpha_{i+1} f_theta(x_i), sigma_{i+1}^2 I); the reference step at the same state is
N(alpha_{i+1} f_ref(x_i), sigma_{i+1}^2 I). The regularizer D_f(policy step || reference step) is named and
scaled as in the f-divergence table diffdiv.divergence.fdiv (p = policy, q = reference): fkl is ROCM's
KL(policy || reference), pearson its chi^2 (int policy^2/reference - 1 = exp(d^2) - 1; Neyman's
int reference^2/policy - 1 is the same here), hellinger = 2 (1 - BC). The former names kl, chi2 are rejected
with an error naming fkl, pearson. Equal-variance Gaussians reduce to 1-D
along the mean difference, so every f-divergence is a function of d = alpha ||f_theta - f_ref|| / sigma
(norm over all elements), and
d^2 = exp(logsnr_{i+1}) ||f_theta - f_ref||^2. The last step has no next noise level: it is compared
after re-noising to log-SNR `final_logsnr` (default 2, the last re-noise level of default_times), or
skipped when final_logsnr is None. Everything is reparameterized: gradients flow through the whole chain
(the chain is `diffdiv.sampling.consistency_chain`; this module holds the step divergences and the loss).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from diffdiv.config import ConfigError
from diffdiv.divergence.fdiv import RENAMED, parse_divergence

CHI2_MAX_D2 = 60.0  # chi^2 = exp(d^2) - 1 is evaluated at min(d^2, 60) (no overflow; no gradient beyond)
_JS_GRID = 2001
_JS_HALF_WIDTH = 10.0


def kl_equal_var(d2: Tensor) -> Tensor:
    # KL(N(0,1) || N(d,1)) = d^2 / 2 (either direction)
    return 0.5 * d2


def hellinger_equal_var(d2: Tensor) -> Tensor:
    # squared Hellinger int (sqrt p - sqrt q)^2 = 2 (1 - BC), Bhattacharyya coefficient BC = exp(-d^2/8)
    return -2.0 * torch.expm1(-d2 / 8.0)


def tv_equal_var(d2: Tensor) -> Tensor:
    # TV = 2 Phi(d/2) - 1 = erf(d / (2 sqrt 2)); sqrt(d^2 + tiny) keeps the gradient finite at d = 0
    d = torch.sqrt(d2 + 1e-30)
    return torch.erf(d / (2.0 * math.sqrt(2.0)))


def chi2_equal_var(d2: Tensor) -> Tensor:
    # Pearson chi^2 int p^2/q - 1 = exp(d^2) - 1 (Neyman's int q^2/p - 1 is the same for equal variances)
    return torch.expm1(d2.clamp(max=CHI2_MAX_D2))


def js_equal_var(d2: Tensor) -> Tensor:
    # JS = log 2 - E_{z ~ N(0,1)} softplus(d z - d^2/2): 1-D quadrature (trapezoid on a +-10 grid)
    z = torch.linspace(-_JS_HALF_WIDTH, _JS_HALF_WIDTH, _JS_GRID, dtype=torch.float64, device=d2.device)
    w = torch.exp(-0.5 * z * z)
    w = w / w.sum()
    dd = torch.sqrt(d2.double() + 1e-30)[..., None]
    val = math.log(2.0) - (torch.nn.functional.softplus(dd * z - 0.5 * dd * dd) * w).sum(-1)
    return val.to(d2.dtype)


# closed forms by name of the f-divergence table (diffdiv.divergence.fdiv, D_f(p||q) = E_q f(p/q) with
# p = policy step, q = reference step); equal variances make rkl = fkl and neyman = pearson
_CLOSED_FORMS: dict[str, Callable[[Tensor], Tensor]] = {
    "fkl": kl_equal_var, "rkl": kl_equal_var, "hellinger": hellinger_equal_var, "tv": tv_equal_var,
    "pearson": chi2_equal_var, "neyman": chi2_equal_var, "js": js_equal_var,
}
ROCM_DIVERGENCES: tuple[str, ...] = tuple(_CLOSED_FORMS)


def rocm_divergence(name: str) -> str:
    """The table name of a ROCM step regularizer; ConfigError for a name without an equal-variance closed form."""
    if not isinstance(name, str) or name.strip().lower() in RENAMED:
        parse_divergence(name)  # raises: not a string, or the table name of a former name
    kind = name.strip().lower()
    if kind not in _CLOSED_FORMS:
        raise ConfigError(f"divergence {name!r}: ROCM needs a closed form for equal-variance Gaussian steps; "
                          f"choose from {', '.join(ROCM_DIVERGENCES)}")
    return kind


def gaussian_step_divergence(name: str, d2: Tensor) -> Tensor:
    """f-divergence between N(m1, s^2 I) and N(m2, s^2 I) as a function of d^2 = ||m1 - m2||^2 / s^2.

    `name` is a name of the f-divergence table (diffdiv.divergence.fdiv), on its scale (hellinger = 2 (1 - BC)).
    """
    return _CLOSED_FORMS[rocm_divergence(name)](d2)


def step_sq_distance(f_theta: Tensor, f_ref: Tensor, logsnr_next: Tensor | float) -> Tensor:
    """d^2 = (alpha/sigma)^2 ||f_theta - f_ref||^2 = exp(logsnr) ||.||^2 per sample (B,)."""
    diff = (f_theta.float() - f_ref.float()).reshape(f_theta.shape[0], -1)
    lam = torch.as_tensor(logsnr_next, dtype=diff.dtype, device=diff.device)
    return torch.exp(lam) * (diff * diff).sum(1)


def rocm_loss(rewards: Tensor, div: Tensor, reward_weight: float, div_weight: float) -> tuple[Tensor, dict[str, float]]:
    """-reward_weight * mean r + div_weight * mean sum_i D_f(step_i)."""
    loss = -reward_weight * rewards.float().mean() + div_weight * div.float().mean()
    return loss, {"reward": float(rewards.detach().float().mean()), "div": float(div.detach().float().mean())}
