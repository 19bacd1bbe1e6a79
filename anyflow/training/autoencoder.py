"""Training a small Wan video VAE (``diffusers.AutoencoderKLWan``) on real clips.

The shipped default model needs a VAE that plain diffusers loads; the released Wan VAE is too big
for a CPU demo and cannot be downloaded here, so a small one is fitted to the footage. Objective:
L1 + MSE reconstruction of the posterior *mean* decoded (a deterministic autoencoder, as the
pipelines use the mean for conditioning) plus a small KL term that keeps the latent near unit scale.
After training, ``latents_mean`` / ``latents_std`` of the config are set to the per-channel statistics
of the encoded training clips, so normalised latents (``(z - mean) / std``, the pipelines'
convention) have zero mean and unit variance - what the flow-matching noise assumes.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

__all__ = ["VAEConfig", "build_vae", "train_vae", "set_latent_stats"]


@dataclass
class VAEConfig:
    """Architecture and optimisation of a small ``AutoencoderKLWan``.

    Attributes:
        base_dim, z_dim, dim_mult, num_res_blocks, temperal_downsample: the diffusers constructor
            arguments (``len(temperal_downsample)`` stages of 2x spatial downsampling; each ``True``
            also halves time, Wan's causal 1 + 4k frame scheme).
        steps, batch_size, window: optimiser steps, clips per step, frames per training window (1 + 4k).
        lr: AdamW learning rate (cosine decay to 10% over ``steps``).
        kl_weight: weight of the KL term.
        seed: initialisation and sampling seed.
    """

    base_dim: int = 16
    z_dim: int = 8
    dim_mult: Sequence[int] = (1, 2, 2)
    num_res_blocks: int = 1
    temperal_downsample: Sequence[bool] = (True, True)
    steps: int = 500
    batch_size: int = 2
    window: int = 9
    lr: float = 2e-3
    kl_weight: float = 1e-6
    seed: int = 0


def build_vae(cfg: VAEConfig):
    """A freshly initialised ``AutoencoderKLWan`` for ``cfg`` (scale factors recorded in its config)."""
    from diffusers import AutoencoderKLWan

    torch.manual_seed(cfg.seed)
    td = [bool(x) for x in cfg.temperal_downsample]
    return AutoencoderKLWan(
        base_dim=cfg.base_dim, z_dim=cfg.z_dim, dim_mult=list(cfg.dim_mult), num_res_blocks=cfg.num_res_blocks,
        temperal_downsample=td, latents_mean=[0.0] * cfg.z_dim, latents_std=[1.0] * cfg.z_dim,
        scale_factor_temporal=2 ** sum(td), scale_factor_spatial=2 ** len(td),
    )


def _windows(videos: Sequence[torch.Tensor], cfg: VAEConfig, gen: torch.Generator) -> torch.Tensor:
    """A batch of random ``window``-frame crops, randomly mirrored, as ``[B, 3, F, H, W]`` in ``[-1, 1]``."""
    out = []
    for _ in range(cfg.batch_size):
        v = videos[int(torch.randint(len(videos), (1,), generator=gen))]
        s = int(torch.randint(v.shape[0] - cfg.window + 1, (1,), generator=gen))
        clip = v[s:s + cfg.window]
        if bool(torch.rand((), generator=gen) < 0.5):
            clip = clip.flip(-1)
        out.append(clip.permute(1, 0, 2, 3))
    return torch.stack(out) * 2 - 1


def train_vae(videos: Sequence[torch.Tensor], cfg: VAEConfig, log_every: int = 50, log=print, vae=None,
              decoder_only: bool = False):
    """Fit a VAE to ``videos`` (each ``[T, 3, H, W]`` float in ``[0, 1]``, ``T >= cfg.window``).

    Args:
        vae: a model to continue from (default: a fresh :func:`build_vae`).
        decoder_only: freeze the encoder (and ``quant_conv``) and train the decoder alone: the latents
            (and the latent statistics) stay exactly as they were, so a decoder can be refined after a
            diffusion model was trained on the encoder's latents.

    Returns:
        ``(vae, history)``: the trained model in eval mode (latent statistics set with
        :func:`set_latent_stats` unless ``decoder_only``) and a list of ``{"step", "l1", "mse", "kl",
        "seconds"}`` records.

    Raises:
        ValueError: no video, a video shorter than ``cfg.window``, or ``cfg.window`` not ``1 + 4k``.
    """
    if not videos:
        raise ValueError("videos must hold at least one [T, 3, H, W] clip")
    step_t = 2 ** sum(bool(x) for x in cfg.temperal_downsample)
    if (cfg.window - 1) % step_t:
        raise ValueError(f"window must be 1 + {step_t}k frames, got {cfg.window}")
    short = [i for i, v in enumerate(videos) if v.shape[0] < cfg.window]
    if short:
        raise ValueError(f"videos {short} have fewer than window={cfg.window} frames")
    if decoder_only and vae is None:
        raise ValueError("decoder_only needs the trained vae to refine")
    vae = build_vae(cfg) if vae is None else vae
    vae.train()
    if decoder_only:
        for module in (vae.encoder, vae.quant_conv):
            module.requires_grad_(False)
    params = [p for p in vae.parameters() if p.requires_grad]
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    opt = torch.optim.AdamW(params, lr=cfg.lr, betas=(0.9, 0.99), weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(s, cfg.steps) / max(1, cfg.steps))))
    history, t0 = [], time.time()
    for step in range(1, cfg.steps + 1):
        x = _windows(videos, cfg, gen)
        with torch.set_grad_enabled(not decoder_only):
            post = vae.encode(x).latent_dist
        y = vae.decode(post.mean).sample
        l1, mse = (y - x).abs().mean(), (y - x).square().mean()
        kl = 0.5 * (post.mean.square() + post.var - 1.0 - post.logvar).mean()
        loss = l1 + mse + cfg.kl_weight * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        if step % log_every == 0 or step == cfg.steps:
            rec = {"step": step, "l1": l1.item(), "mse": mse.item(), "kl": kl.item(), "seconds": time.time() - t0}
            history.append(rec)
            if log is not None:
                log(f"vae step {step}/{cfg.steps}: l1 {rec['l1']:.4f} mse {rec['mse']:.5f} kl {rec['kl']:.3f} "
                    f"({rec['seconds']:.0f} s)")
    vae.eval()
    vae.requires_grad_(True)
    if not decoder_only:
        set_latent_stats(vae, videos, cfg.window)
    return vae, history


@torch.no_grad()
def set_latent_stats(vae, videos: Sequence[torch.Tensor], window: Optional[int] = None) -> None:
    """Set ``vae.config.latents_mean`` / ``latents_std`` to the per-channel mean / std of the posterior means
    of ``videos`` (whole videos, or non-overlapping ``window``-frame pieces)."""
    zs = []
    for v in videos:
        n = v.shape[0] if window is None else window
        for s in range(0, v.shape[0] - n + 1, n):
            x = v[s:s + n].permute(1, 0, 2, 3).unsqueeze(0) * 2 - 1
            z = vae.encode(x).latent_dist.mean
            zs.append(z.transpose(0, 1).reshape(z.shape[1], -1))
    z = torch.cat(zs, dim=1)
    vae.register_to_config(latents_mean=z.mean(1).tolist(), latents_std=z.std(1).clamp_min(1e-4).tolist())
