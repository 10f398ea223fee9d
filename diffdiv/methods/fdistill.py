"""f-distill (Xu, Nie, Vahdat 2025, arXiv 2502.15681): weights, generator and critic losses.

Composes the divergence core (diffdiv.divergence): r from discriminator logits, optional per-noise-level
normalization, h(r) = r^2 f''(r) normalized by its global batch mean, the score-difference generator loss
(docs/math.md#fdistill) and the GAN terms. All functions return per-sample losses (B,) in fp32.
"""

from __future__ import annotations

import torch
from torch import Tensor

from diffdiv.divergence import (
    RatioBinNormalizer,
    discriminator_loss,
    f_weight,
    fdistill_loss,
    gan_generator_loss,
    normalize_batch_mean,
    ratio_from_logits,
)


def density_ratio(logits: Tensor, t: Tensor | None = None, bins: RatioBinNormalizer | None = None,
                  clamp: float = 10.0, clip: tuple[float, float] | None = (0.1, 20.0),
                  update: bool = True) -> Tensor:
    """r = p_t/q_t from discriminator logits (sec. 4: exp(clamped logit), clipped), detached (B,).

    With `bins`, r is divided by an EMA of its mean in the sample's noise-level bin (reference practice);
    `update` folds this batch into the EMA first.
    """
    r = ratio_from_logits(logits, clamp=clamp, clip=clip)
    if bins is not None:
        r = bins.update_and_normalize(r, t) if update else bins(r, t)
    return r


def fdistill_weight(r: Tensor, divergence: str, normalize_mean: bool = True) -> Tensor:
    """h(r) = r^2 f''(r) (Theorem 1), divided by its global batch mean when normalize_mean; detached fp32."""
    h = f_weight(r.detach(), divergence).float()
    return normalize_batch_mean(h) if normalize_mean else h


def generator_loss(x0: Tensor, d_p: Tensor, d_q: Tensor, h: Tensor | float, normalize: bool = True,
                   logits_fake: Tensor | None = None, gan_weight: float = 0.0) -> tuple[Tensor, Tensor, Tensor]:
    """Per-sample generator loss (eq. 8 + non-saturating GAN term) -> (total, distill part, gan part).

    distill = 1/2 mean (x0 - sg(x0 - g))^2 with g = h (D_q - D_p)/n, n = sg(mean|x0 - D_p|) if normalize;
    gan = softplus(-logit_fake) on the generator's noised samples (logits carry the graph to x0).
    """
    dist = fdistill_loss(x0, d_p, d_q, h, normalize)
    if logits_fake is not None and gan_weight > 0:
        gan = gan_generator_loss(logits_fake)
    else:
        gan = torch.zeros_like(dist)
    return dist + gan_weight * gan, dist, gan


def critic_loss(dsm: Tensor, logits_real: Tensor | None = None, logits_fake: Tensor | None = None,
                disc_weight: float = 1.0) -> tuple[Tensor, Tensor, Tensor]:
    """Per-sample critic loss from its fake-score DSM part -> (total, DSM part, discriminator part).

    dsm: the fake score's denoising loss on sg(G(z)) (diffdiv.divergence.fake_score_loss; its minimizer is
    E_q[x0|x_t]); the discriminator part is the logistic loss softplus(-l_real) + softplus(l_fake) (its
    optimal logit is log p_t/q_t).
    """
    if logits_real is not None and logits_fake is not None and disc_weight > 0:
        disc = discriminator_loss(logits_real, logits_fake)
    else:
        disc = torch.zeros_like(dsm)
    return dsm + disc_weight * disc, dsm, disc
