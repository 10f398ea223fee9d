"""Divergence core: f-divergence weights, density ratio, score-difference losses, fused kernels."""

from diffdiv.divergence.fdiv import DIVERGENCES, f_value, f_weight, parse_divergence
from diffdiv.divergence.kernels import weighted_score_difference
from diffdiv.divergence.losses import (
    PREDICTION_WEIGHTING,
    denoiser_normalizer,
    fake_score_loss,
    fdistill_loss,
    pseudo_huber_c,
    sid_loss,
    sim_loss,
    vsd_loss,
    x0_loss_weight,
)
from diffdiv.divergence.ratio import (
    RatioBinNormalizer,
    all_reduce_sum,
    discriminator_loss,
    gan_generator_loss,
    normalize_batch_mean,
    ratio_from_logits,
)

__all__ = [
    "DIVERGENCES", "f_value", "f_weight", "parse_divergence",
    "weighted_score_difference",
    "PREDICTION_WEIGHTING", "denoiser_normalizer", "fake_score_loss", "fdistill_loss", "pseudo_huber_c", "sid_loss",
    "sim_loss", "vsd_loss", "x0_loss_weight",
    "RatioBinNormalizer", "all_reduce_sum", "discriminator_loss", "gan_generator_loss",
    "normalize_batch_mean", "ratio_from_logits",
]
