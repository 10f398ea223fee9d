"""IPRO-style truncated reward back-propagation (Shen et al. 2025, arXiv 2510.14255): the loss.

The sampler runs without gradients until the last K steps, then with gradients through the K
differentiated steps, the decoder and a differentiable reward (e.g. the identity-pool reward of
diffdiv.rewards.identity). The regularizer is the per-step KL between the fine-tuned and the reference
transitions on the differentiated steps, for the stochastic DDIM transition with `kl_eta` (the DDPM
posterior variance for kl_eta = 1), whatever eta the sampler itself uses:
    L = -reward_weight * r(decode(x_final)) + div_weight * sum_{last K steps} KL_t.
With K = all steps this is full back-propagation through the chain (AlignProp/DRaFT); the gradient
w.r.t. the parameters equals autograd through the whole chain (tests/test_ipro.py). The chain itself
is `diffdiv.sampling.ddim_chain`.

Video-shaped samples: a per-frame image model denoises (B*F, C, H, W); the reward sees (B, F, C, H, W).
"""

from __future__ import annotations

from torch import Tensor


def ipro_loss(rewards: Tensor, kl: Tensor, reward_weight: float, div_weight: float) -> tuple[Tensor, dict[str, float]]:
    """-reward_weight * mean r + div_weight * mean KL (KL summed over the differentiated steps)."""
    loss = -reward_weight * rewards.float().mean() + div_weight * kl.float().mean()
    return loss, {"reward": float(rewards.detach().float().mean()), "kl": float(kl.detach().float().mean())}
