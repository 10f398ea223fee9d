"""IPRO-style truncated reward back-propagation (Shen et al. 2025, arXiv 2510.14255) and the DDIM chain.

The sampler runs without gradients until the last K steps, then with gradients through the K
differentiated steps, the decoder and a differentiable reward (e.g. the identity-pool reward of
diffdiv.rewards.identity). The regularizer is the per-step KL between the fine-tuned and the reference
transitions on the differentiated steps, for the stochastic DDIM transition with `kl_eta` (the DDPM
posterior variance for kl_eta = 1), whatever eta the sampler itself uses:
    L = -reward_weight * r(decode(x_final)) + kl_weight * sum_{last K steps} KL_t.
With K = all steps this is full back-propagation through the chain (AlignProp/DRaFT); the gradient
w.r.t. the parameters equals autograd through the whole chain (tests/test_ipro.py).

Video-shaped samples: a per-frame image model denoises (B*F, C, H, W); the reward sees (B, F, C, H, W).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint as grad_checkpoint

from diffdiv.methods.dpok import (
    ddim_mean_x0_coef,
    ddim_step_coeffs,
    ddim_step_mean,
    gaussian_log_prob,
    step_kl_from_x0,
)

DenoiseFn = Callable[[Tensor, Tensor], Tensor]


@dataclass
class ChainOut:
    """Result of a DDIM chain: final state, per-sample KL and (optionally) the recorded trajectory."""

    x: Tensor  # final state x_{t_T}
    x0: Tensor  # denoiser output at the last step
    kl: Tensor  # (B,) sum of the per-step KLs that were computed (zeros without a reference)
    kl_steps: list[Tensor] = field(default_factory=list)
    states: list[Tensor] = field(default_factory=list)  # x_{t_0..t_T} (record=True)
    log_probs: list[Tensor] = field(default_factory=list)  # log p(x_{i+1} | x_i) per step (record=True)


def ddim_times(t_max: float, t_min: float, steps: int) -> Tensor:
    """steps + 1 model times, evenly spaced from t_max down to t_min (float64)."""
    return torch.linspace(float(t_max), float(t_min), steps + 1, dtype=torch.float64)


def _noise_at(noises: Sequence[Tensor] | Callable[[int], Tensor] | None, i: int) -> Tensor | None:
    if noises is None:
        return None
    return noises(i) if callable(noises) else noises[i]


def ddim_chain(denoise: DenoiseFn, x_T: Tensor, times: Tensor, schedule, eta: float = 0.0,
               noises: Sequence[Tensor] | Callable[[int], Tensor] | None = None, grad_steps: int = 0,
               ref_denoise: DenoiseFn | None = None, kl_eta: float | None = None, kl_on: str = "grad",
               reduce: str = "mean", record: bool = False, checkpoint: bool = False,
               ref_grad: bool = False) -> ChainOut:
    """Run x_{t_0} = x_T -> x_{t_T} with DDIM(eta); gradients only through the last `grad_steps` steps.

    denoise(x, t) -> x0 with t of shape (B,). ref_denoise, if given, is evaluated without gradients at the
    same states; kl_on = "grad" computes the per-step KL on the differentiated steps, "all" on every step.
    The KL uses the transition of DDIM(kl_eta) (default: eta), which must be stochastic. ref_grad=True lets
    the KL's gradient flow through the reference's input state too (pathwise gradient of KL_t(x_t(theta)));
    by default the reference output is a constant at the visited state.
    """
    steps = len(times) - 1
    grad_steps = steps if grad_steps < 0 else min(grad_steps, steps)
    kl_eta = eta if kl_eta is None else kl_eta
    B = x_T.shape[0]
    x = x_T
    out = ChainOut(x=x_T, x0=x_T, kl=torch.zeros(B, dtype=torch.float32, device=x_T.device))
    if record:
        out.states.append(x_T.detach())
    grad_on = torch.is_grad_enabled()
    for i in range(steps):
        t = torch.full((B,), float(times[i]), device=x.device, dtype=torch.float64)
        s = torch.full((B,), float(times[i + 1]), device=x.device, dtype=torch.float64)
        a_t, s_t = (v.float() for v in schedule.alpha_sigma(t))
        a_s, s_s = (v.float() for v in schedule.alpha_sigma(s))
        with_grad = grad_on and i >= steps - grad_steps
        if not with_grad:
            x = x.detach()
        tt = t.float()
        with torch.set_grad_enabled(with_grad):
            if with_grad and checkpoint:
                x0 = grad_checkpoint(denoise, x, tt, use_reentrant=False)
            else:
                x0 = denoise(x, tt)
            c_x0, c_eps, std = ddim_step_coeffs(a_t, s_t, a_s, s_s, eta)
            mean = ddim_step_mean(x, x0.to(x.dtype), a_t, s_t, c_x0, c_eps)
            z = _noise_at(noises, i)
            if eta > 0 and z is None:
                raise ValueError("a stochastic DDIM chain (eta > 0) needs noises")
            x_next = mean if z is None or eta == 0 else mean + std.view(-1, *([1] * (x.ndim - 1))) * z
        if ref_denoise is not None and (kl_on == "all" or with_grad):
            with torch.set_grad_enabled(with_grad and ref_grad):
                x0_ref = ref_denoise(x if ref_grad else x.detach(), tt)
            k_c, k_e, k_std = ddim_step_coeffs(a_t, s_t, a_s, s_s, kl_eta)
            if bool((k_std <= 0).any()):
                raise ValueError("the per-step KL needs a stochastic transition: set kl_eta > 0")
            kl_i = step_kl_from_x0(x0.float(), x0_ref.float(), ddim_mean_x0_coef(a_t, s_t, k_c, k_e), k_std, reduce)
            out.kl_steps.append(kl_i)
            out.kl = out.kl + kl_i
        if record:
            out.states.append(x_next.detach())
            if eta > 0:
                out.log_probs.append(gaussian_log_prob(x_next.detach(), mean.detach(), std, reduce))
        x = x_next
        out.x0 = x0
    out.x = x
    return out


def correlated_frame_noise(shared: Tensor, per_frame: Tensor, corr: float) -> Tensor:
    """Frame noises sqrt(c) z_shared + sqrt(1 - c) z_f: (B, ...) and (B, F, ...) -> (B, F, ...), each N(0, I)."""
    return corr**0.5 * shared.unsqueeze(1) + (1.0 - corr) ** 0.5 * per_frame


def ipro_loss(rewards: Tensor, kl: Tensor, reward_weight: float, kl_weight: float) -> tuple[Tensor, dict[str, float]]:
    """-reward_weight * mean r + kl_weight * mean KL (KL summed over the differentiated steps)."""
    loss = -reward_weight * rewards.float().mean() + kl_weight * kl.float().mean()
    return loss, {"reward": float(rewards.detach().float().mean()), "kl": float(kl.detach().float().mean())}
