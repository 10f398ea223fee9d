"""DI* (Diff-Instruct*, Luo et al. 2024, arXiv 2410.20898): a one-step generator fine-tuned for a reward
under a score-based divergence to a frozen CFG-guided reference diffusion model.

Objective (docs/math.md#di-star): min_theta  -reward_weight E[r(G(z, c), c)] + div_weight D_score(p_G || p_ref),
with the score divergence of SIM (pseudo-Huber distance of score differences, diffdiv.divergence.sim_loss),
whose tractable loss uses an online fake score D_q trained by denoising score matching on sg(G(z)).

Classifier-free guidance (guidance scale w) enters in one of two ways:
- "in":  the divergence's reference is the guided denoiser D_p = D_u + w (D_c - D_u);
- "out": the divergence's reference is the unguided conditional D_c, and CFG becomes an implicit reward
  (w - 1) log p_t(c | x_t), whose x_t-gradient is alpha (D_c - D_u) / sigma^2. `cfg_implicit_reward_loss`
  is its surrogate in the divergence's units: per-sample gradient w.r.t. x0 equal to
  -(w - 1) k (D_c - D_u) / N (k = 1 in "x0" space, alpha/sigma^2 in "score" space, N elements), i.e.
  -(w - 1) / (alpha N) grad_x0 log p_t(c | alpha x0 + sigma eps) in score space. It is weighted like the
  divergence (div_weight); "in" and "out" are different objectives (docs/math.md#di-star).
"""

from __future__ import annotations

import torch
from torch import Tensor

from diffdiv.divergence import sim_loss

CFG_MODES = ("in", "out")


def _k(alpha: Tensor | float, sigma: Tensor | float, space: str, like: Tensor) -> Tensor:
    if space == "x0":
        return torch.ones(like.shape[0], 1, dtype=like.dtype, device=like.device)
    if space == "score":
        a = torch.as_tensor(alpha, dtype=like.dtype, device=like.device).reshape(-1, 1)
        s = torch.as_tensor(sigma, dtype=like.dtype, device=like.device).reshape(-1, 1)
        return (a / s**2).expand(like.shape[0], 1)
    raise ValueError(f"space must be 'x0' or 'score', got {space!r}")


def cfg_implicit_reward_loss(x0: Tensor, d_cond: Tensor, d_uncond: Tensor, guidance_scale: float,
                             alpha: Tensor | float, sigma: Tensor | float, space: str = "x0") -> Tensor:
    """DI* "OUT": -(w - 1) mean_elements(sg(k (D_c - D_u)) * x0), per sample (B,)."""
    dt = torch.promote_types(x0.dtype, torch.float32)
    x = x0.reshape(x0.shape[0], -1).to(dt)
    g = (d_cond.to(dt) - d_uncond.to(dt)).reshape(x.shape).detach()
    k = _k(alpha, sigma, space, x)
    return -(guidance_scale - 1.0) * ((k * g) * x).mean(1)


def di_star_generator_loss(x0: Tensor, rewards: Tensor, d_p: Tensor, d_q: Tensor, alpha: Tensor, sigma: Tensor,
                           reward_weight: float, div_weight: float, distance: str = "pseudo_huber",
                           c: float | None = None, space: str = "x0", normalize: bool = False,
                           cfg_out: tuple[Tensor, Tensor, float] | None = None) -> tuple[Tensor, dict[str, float]]:
    """-reward_weight mean r + div_weight mean(SIM(d_p, d_q) [+ CFG implicit reward term]) (DI* eq. 3.4).

    d_p, d_q must carry the graph to x_t (frozen networks), as for `sim_loss`. cfg_out = (D_c, D_u, w)
    adds the "OUT" implicit CFG reward; for "IN" pass the guided D_p and cfg_out=None.
    """
    div = sim_loss(x0, d_p, d_q, alpha, sigma, distance, c, space=space, normalize=normalize)
    parts = {"sim": float(div.detach().mean())}
    if cfg_out is not None:
        d_c, d_u, w = cfg_out
        cfg = cfg_implicit_reward_loss(x0, d_c, d_u, w, alpha, sigma, space)
        parts["cfg_term"] = float(cfg.detach().mean())
        div = div + cfg
    loss = -reward_weight * rewards.mean() + div_weight * div.mean()
    parts["reward"] = float(rewards.detach().float().mean())
    return loss, parts
