"""A DDPO-style reference (Black et al. 2023, arXiv 2305.13301), written on diffusers alone (no diffdiv import):
policy gradient on the DDIM(eta) chain of a StableDiffusionPipeline folder, PPO-clipped importance ratios,
no KL, the full UNet trained.

    OMP_NUM_THREADS=1 python benchmarks/ddpo_baseline.py --pipe runs/tiny_sd --budget 120 [--seed 0]

Loop (as trl's DDPOTrainer): sample `sample_batches` x `sample_batch` trajectories with the pipeline's
DDIMScheduler (eta, classifier-free guidance), recording every latent and the per-step Gaussian log-probability
(mean over the latent elements); reward = minus the quality-95 JPEG size in kB of the decoded image;
advantages = (r - mean) / (std + 1e-8) over the round, clipped to +-adv_clip; then `inner_epochs` passes over the
round in minibatches of `train_batch`, the PPO-clip loss summed over all timesteps of a trajectory before one
AdamW step (gradient norm clipped to 1). Evaluation follows `diffdiv.trainers.rewarding.RewardKit.evaluate`:
`eval_samples` fixed noises (generator seeded eval_seed + batch start, initial noise then one noise per step),
prompts in turn, fine-tuned and initial UNet on the same noise; reward, and `paired_mse` = mean squared pixel
difference of the two models' images (the drift), and the diversity ratio (mean pairwise pixel distance of the
fine-tuned over the initial model's images).
"""

from __future__ import annotations

import argparse
import copy
import io
import json
import math
import os
import time
from pathlib import Path

import torch
from PIL import Image


def jpeg_reward(images: torch.Tensor, quality: int = 95) -> torch.Tensor:
    """Minus the JPEG size in kB of [-1, 1] images (N, 3, H, W), rounded to uint8 like DDPO."""
    arr = ((images.detach().float() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    out = []
    for a in arr:
        buf = io.BytesIO()
        Image.fromarray(a, mode="RGB").save(buf, format="JPEG", quality=quality)
        out.append(-buf.tell() / 1000.0)
    return torch.tensor(out)


class Pipe:
    """The pipeline's UNet (trained), frozen VAE / text encoder, and its DDIM scheduler at `steps` steps."""

    def __init__(self, path: str, steps: int, guidance: float):
        from diffusers import DDIMScheduler, StableDiffusionPipeline

        self.pipe = StableDiffusionPipeline.from_pretrained(path, safety_checker=None, requires_safety_checker=False)
        self.pipe.set_progress_bar_config(disable=True)
        self.sch = DDIMScheduler.from_config(self.pipe.scheduler.config)
        self.sch.set_timesteps(steps)
        self.unet = self.pipe.unet
        self.guidance = guidance
        for m in (self.pipe.vae, self.pipe.text_encoder):
            m.requires_grad_(False).eval()

    @torch.no_grad()
    def embeds(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        c, u = self.pipe.encode_prompt(prompts, "cpu", 1, True, negative_prompt=[""] * len(prompts))
        return c, u

    def eps(self, unet, x: torch.Tensor, t: int, emb: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        c, u = emb
        if self.guidance == 1.0:
            return unet(x, t, encoder_hidden_states=c).sample
        e_u, e_c = unet(torch.cat([x, x]), t, encoder_hidden_states=torch.cat([u, c])).sample.chunk(2)
        return e_u + self.guidance * (e_c - e_u)

    def step_stats(self, i: int, x: torch.Tensor, eps: torch.Tensor, eta: float):
        """Mean and std of the DDIM(eta) transition x_t -> x_prev (Song et al. 2021, eq. 12 and 16)."""
        sch = self.sch
        t = int(sch.timesteps[i])
        prev = t - sch.config.num_train_timesteps // sch.num_inference_steps
        a_t = sch.alphas_cumprod[t]
        a_p = sch.alphas_cumprod[prev] if prev >= 0 else sch.final_alpha_cumprod
        x0 = (x - (1 - a_t).sqrt() * eps) / a_t.sqrt()
        var = (1 - a_p) / (1 - a_t) * (1 - a_t / a_p)
        std = eta * var.sqrt()
        mean = a_p.sqrt() * x0 + (1 - a_p - std**2).clamp_min(0).sqrt() * eps
        return mean, std

    def decode(self, lat: torch.Tensor) -> torch.Tensor:
        return self.pipe.vae.decode(lat / self.pipe.vae.config.scaling_factor).sample.float()


def log_prob(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """Gaussian log-density per sample, mean over elements (DDPO's ddim_step_with_logprob)."""
    lp = -((x - mean) ** 2) / (2 * std**2) - torch.log(std) - 0.5 * math.log(2 * math.pi)
    return lp.flatten(1).mean(1)


@torch.no_grad()
def sample(p: Pipe, unet, z: torch.Tensor, emb, noises: list[torch.Tensor], eta: float):
    """Latents x_0..x_T and per-step log-probs of the DDIM(eta) chain from z."""
    xs, lps = [z], []
    x = z
    for i, t in enumerate(p.sch.timesteps):
        mean, std = p.step_stats(i, x, p.eps(unet, x, int(t), emb), eta)
        x = mean + std * noises[i]
        xs.append(x)
        lps.append(log_prob(x, mean, std))
    return torch.stack(xs, 1), torch.stack(lps, 1)


@torch.no_grad()
def evaluate(p: Pipe, unet, ref_unet, prompts: list[str], n: int, batch: int, seed: int, eta: float,
             cache: dict) -> dict[str, float]:
    """Reward of the fine-tuned and initial UNet on the same noise and prompts; paired pixel MSE (drift)."""
    rp, rr, mse, ip, ir = [], [], [], [], []
    shape = (p.unet.config.in_channels, p.unet.config.sample_size, p.unet.config.sample_size)
    for start in range(0, n, batch):
        b = min(batch, n - start)
        idx = [(start + k) % len(prompts) for k in range(b)]
        emb = p.embeds([prompts[k] for k in idx])
        out = {}
        for which, net in (("policy", unet), ("reference", ref_unet)):
            if which == "reference" and start in cache:
                out[which] = cache[start]
                continue
            g = torch.Generator().manual_seed(seed + start)
            z = torch.randn(b, *shape, generator=g)
            noises = [torch.randn(z.shape, generator=g) for _ in range(len(p.sch.timesteps))]
            xs, _ = sample(p, net, z, emb, noises, eta)
            out[which] = p.decode(xs[:, -1])
            if which == "reference":
                cache[start] = out[which]
        rp.append(jpeg_reward(out["policy"]))
        rr.append(jpeg_reward(out["reference"]))
        mse.append(((out["policy"] - out["reference"]) ** 2).flatten(1).mean(1))
        ip.append(out["policy"])
        ir.append(out["reference"])
    rp, rr, mse = torch.cat(rp).double(), torch.cat(rr).double(), torch.cat(mse)
    spread = lambda x: float(torch.cdist(x, x).sum() / (len(x) * (len(x) - 1)))  # noqa: E731  mean pairwise L2
    return {"reward_policy": float(rp.mean()), "reward_reference": float(rr.mean()),
            "reward_policy_sem": float(rp.std() / math.sqrt(len(rp))), "reward_gain": float(rp.mean() - rr.mean()),
            "paired_mse": float(mse.mean()),
            "diversity_ratio": spread(torch.cat(ip).flatten(1).double()) / spread(torch.cat(ir).flatten(1).double())}


def train(pipe: str, budget: float, seed: int = 0, prompts: list[str] | None = None, lr: float = 1e-3,
          clip_range: float = 1e-4, adv_clip: float = 5.0, sample_batch: int = 8, sample_batches: int = 2,
          train_batch: int = 8, inner_epochs: int = 1, guidance: float = 5.0, steps: int = 10, eta: float = 1.0,
          eval_samples: int = 32, eval_batch: int = 32, eval_every: float = 0.0, eval_seed: int = 12345,
          threads: int | None = None) -> dict:
    """DDPO for `budget` seconds of training (evaluation excluded); returns the evaluation history."""
    torch.set_num_threads(threads or int(os.environ.get("OMP_NUM_THREADS", "1")))
    torch.manual_seed(seed)
    prompts = prompts or ["a cat", "a dog"]
    p = Pipe(pipe, steps, guidance)
    ref = copy.deepcopy(p.unet).requires_grad_(False).eval()
    unet = p.unet
    unet.requires_grad_(True).train()
    opt = torch.optim.AdamW(unet.parameters(), lr=lr, betas=(0.9, 0.999), weight_decay=1e-4, eps=1e-8)
    g = torch.Generator().manual_seed(seed)
    shape = (unet.config.in_channels, unet.config.sample_size, unet.config.sample_size)
    hist, cache, clock, step, next_eval = [], {}, 0.0, 0, 0.0
    T = len(p.sch.timesteps)
    rewards_seen: list[float] = []
    while True:
        if clock >= next_eval or clock >= budget:
            unet.eval()
            hist.append({"step": step, "train_time_s": clock,
                         **evaluate(p, unet, ref, prompts, eval_samples, eval_batch, eval_seed, eta, cache)})
            unet.train()
            next_eval = clock + eval_every if eval_every > 0 else float("inf")
            if clock >= budget:
                break
        t0 = time.perf_counter()
        # --- sampling round ---
        traj, lps, rews, embs = [], [], [], []
        unet.eval()
        for _ in range(sample_batches):
            idx = torch.randint(len(prompts), (sample_batch,), generator=g).tolist()
            emb = p.embeds([prompts[k] for k in idx])
            z = torch.randn(sample_batch, *shape, generator=g)
            noises = [torch.randn(z.shape, generator=g) for _ in range(T)]
            xs, lp = sample(p, unet, z, emb, noises, eta)
            with torch.no_grad():
                rews.append(jpeg_reward(p.decode(xs[:, -1])))
            traj.append(xs)
            lps.append(lp)
            embs.append(emb)
        unet.train()
        xs, lp, r = torch.cat(traj), torch.cat(lps), torch.cat(rews)
        c_all, u_all = torch.cat([e[0] for e in embs]), torch.cat([e[1] for e in embs])
        rewards_seen.append(float(r.mean()))
        adv = ((r - r.mean()) / (r.std() + 1e-8)).clamp(-adv_clip, adv_clip)
        # --- PPO updates: per minibatch, the loss of every timestep accumulated, then one step ---
        n = len(r)
        for _ in range(inner_epochs):
            perm = torch.randperm(n, generator=g)
            for s0 in range(0, n, train_batch):
                b = perm[s0:s0 + train_batch]
                emb = (c_all[b], u_all[b])
                for i in torch.randperm(T, generator=g).tolist():
                    x_t, x_prev = xs[b, i], xs[b, i + 1]
                    mean, std = p.step_stats(i, x_t, p.eps(unet, x_t, int(p.sch.timesteps[i]), emb), eta)
                    ratio = torch.exp(log_prob(x_prev, mean, std) - lp[b, i])
                    a = adv[b]
                    loss = torch.maximum(-a * ratio, -a * ratio.clamp(1 - clip_range, 1 + clip_range)).mean()
                    (loss / T).backward()
                torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
                opt.step()
                opt.zero_grad(set_to_none=True)
                step += 1
        clock += time.perf_counter() - t0
    return {"method": "ddpo", "eval_history": hist, "steps": step, "train_reward": rewards_seen,
            "config": {"lr": lr, "clip_range": clip_range, "sample_batch": sample_batch,
                       "sample_batches": sample_batches, "train_batch": train_batch, "inner_epochs": inner_epochs,
                       "guidance": guidance, "steps": steps, "eta": eta, "seed": seed, "prompts": prompts}}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pipe", required=True)
    ap.add_argument("--budget", type=float, default=120.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--clip-range", type=float, default=1e-4)
    ap.add_argument("--sample-batch", type=int, default=8)
    ap.add_argument("--sample-batches", type=int, default=2)
    ap.add_argument("--train-batch", type=int, default=8)
    ap.add_argument("--inner-epochs", type=int, default=1)
    ap.add_argument("--guidance", type=float, default=5.0)
    ap.add_argument("--eval-every", type=float, default=0.0)
    ap.add_argument("--prompts", default="a cat,a dog")
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    res = train(a.pipe, a.budget, a.seed, a.prompts.split(","), a.lr, a.clip_range, sample_batch=a.sample_batch,
                sample_batches=a.sample_batches, train_batch=a.train_batch, inner_epochs=a.inner_epochs,
                guidance=a.guidance, eval_every=a.eval_every)
    last = res["eval_history"][-1]
    print(f"ddpo: {res['steps']} updates, reward {last['reward_reference']:.4f} -> {last['reward_policy']:.4f} "
          f"(gain {last['reward_gain']:+.4f}, paired mse {last['paired_mse']:.4f})")
    if a.out:
        Path(a.out).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
