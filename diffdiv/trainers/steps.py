"""Training steps shared by trainers: a network call composed with a pure loss, written once."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import Tensor

from diffdiv.divergence import fake_score_loss

#: (x0, t) -> (x_t, eps, alpha, sigma), the DistillTrainer.noise convention (eps is not used here)
NoiseFn = Callable[[Tensor, Tensor], tuple[Tensor, Any, Tensor, Tensor]]


# fake-score denoising score matching on sg(G(z)) (DMD2 / f-distill critic, rCM critic, DI* fake score)
def fake_score_step(fake: Callable[[Tensor, Tensor, Any], Any], x0: Tensor, t: Tensor, noise_fn: NoiseFn,
                    cond: Any = None, weighting: str = "x0", *, sigma_data: float = 0.5,
                    reduction: str = "mean") -> tuple[Tensor, tuple]:
    """Noise sg(x0) to x_t at times t, call fake(x_t, t, cond), return (per-sample DSM loss (B,), extra).

    fake returns D_q, or a tuple (D_q, *extra) (e.g. the discriminator logits of the same forward); extra is
    () for a plain D_q. The loss is diffdiv.divergence.fake_score_loss with the given x0-space weighting.
    """
    x_t, _, a, s = noise_fn(x0, t)
    out = fake(x_t, t, cond)
    d_q, extra = (out[0], tuple(out[1:])) if isinstance(out, tuple) else (out, ())
    return fake_score_loss(d_q, x0, a, s, weighting, sigma_data=sigma_data, reduction=reduction), extra


__all__ = ["NoiseFn", "fake_score_step"]
