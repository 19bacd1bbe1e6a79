"""Consistency-distillation baseline on the same backbone, data and step interface as the flow map.

The AnyFlow transformer is used as an *endpoint map* (consistency function) by fixing r = 0:
``f(z_t, t) = z_t - (t / 1000) u(z_t, t, 0)``, an estimate of the clean latent x0. This
parameterisation satisfies the boundary condition f(z_0, 0) = z_0 exactly. (It is the consistency
pair kind of the flow-map objective taken alone, trained with the discrete consistency loss instead of
the mean-velocity target.)

Loss (discrete consistency, Song et al. 2023; the improved-CT weighting of Song & Dhariwal 2023): on
the shifted grid ``t_i = 1000 shift(i / N)``, i = 0..N, draw i ~ U{1..N} per sample, t = t_i,
s = t_{i-1}, z_t = sigma_t eps + (1 - sigma_t) x, and

* with a teacher (consistency distillation): z_s = one Euler step of the teacher's probability-flow
  ODE with CFG, ``z_s = z_t - (t - s) / 1000 v_teacher(z_t, t)``;
* without (consistency training): z_s = sigma_s eps + (1 - sigma_s) x (the same noise).

``L = mean_b lambda_b mean (f_theta(z_t, t) - sg f_theta(z_s, s))^2``, lambda = 1 / (sigma_t - sigma_s)
(``inverse_delta``) or 1; the target network is the student itself under stop-gradient (iCT).

Sampling is multistep consistency sampling: x0 = f(z, t_i); re-noise x0 to t_{i+1} with fresh noise.
Timesteps are in [0, 1000]; latents ``[B, F, C, H, W]``.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch

from .. import ops
from ..models.bidirectional import bidirectional_forward
from ..samplers.schedule import pairs_of, time_grid
from .config import ConsistencyConfig
from .flowmap import (LossOutput, Phase, _as_context, expand_negative, model_velocity, noise_latents, torch_jumps,
                      window_forward)


def consistency_grid(num_intervals: int, shift: float) -> torch.Tensor:
    """``[N + 1]`` float64 increasing grid ``t_i = 1000 shift(i / N)`` (t_0 = 0, t_N = 1000): the sampler's
    :func:`anyflow.samplers.schedule.time_grid`, reversed."""
    return time_grid(num_intervals, shift).flip(0)


def endpoint(forward, z: torch.Tensor, t: torch.Tensor, text) -> torch.Tensor:
    """Consistency function ``x0 = z_t - (t / 1000) u(z_t, t, r = 0)`` in fp32: the flow-map jump t -> 0
    (:func:`anyflow.ops.euler_shortcut`, torch backend: differentiable).

    Args:
        forward: :class:`anyflow.training.flowmap.BidirectionalForward` or ``FARWindowForward``.
        z: ``[B, F, C, H, W]`` latents at t; t: ``[B, F]`` in [0, 1000].
    """
    u = forward(z, t, torch.zeros_like(t), text)
    return ops.euler_shortcut(z.float(), u, t, 0.0, backend="torch")


def teacher_velocity(model) -> Callable:
    """Flow-matching velocity ``v(z, t, text)`` of an AnyFlow (bidirectional) model used at r = t, the way
    the official trainer queries its teacher (NVlabs/AnyFlow trainer_wan_anyflow_onpolicy.py, ``real_score``)."""

    def v(z, t, text):
        return bidirectional_forward(model, z, t, t, text)

    return v


def consistency_loss(forward, x: torch.Tensor, noise: torch.Tensor, text, cfg: ConsistencyConfig, shift: float,
                     generator: torch.Generator, teacher: Optional[Callable] = None, negative=None) -> LossOutput:
    """Discrete consistency loss of one batch (module docstring).

    Args:
        forward: student wrapper (r fixed to 0 here).
        x, noise: ``[B, F, C, H, W]`` clean latents and standard normal noise.
        text: ``[B, L, D]`` prompt embeddings (after dropout) or a TextContext.
        teacher: ``v(z, t, text)`` flow-matching velocity for distillation; ``None`` for consistency
            training with the data velocity.
        negative: negative text for the teacher's CFG (needed when ``cfg.teacher_guidance_scale != 1``).
        generator: draws the grid indices (one per sample).

    Returns:
        :class:`LossOutput` with ``stats["loss"]`` and the mean sampled ``t``.
    """
    b, f = x.shape[:2]
    grid = consistency_grid(cfg.num_intervals, shift)
    i = torch.randint(1, cfg.num_intervals + 1, (b,), generator=generator)
    t = grid[i].float()[:, None].expand(b, f).to(x.device)
    s = grid[i - 1].float()[:, None].expand(b, f).to(x.device)
    text = _as_context(forward, text)
    z_t = noise_latents(x, noise, t)
    with torch.no_grad():
        if teacher is None:
            z_s = noise_latents(x, noise, s)
        else:
            v = teacher(z_t, t, text)
            w = cfg.teacher_guidance_scale
            if w != 1.0:
                if negative is None:
                    raise ValueError("teacher_guidance_scale != 1 needs the negative text")
                v = torch.cat([teacher(z_t, t, _as_context(forward, negative)), v])  # [uncond; cond]: CFG w
            z_s = ops.euler_shortcut(z_t.float(), v, t, s, guidance_scale=w, backend="torch").to(x.dtype)
        target = endpoint(forward, z_s, s, text)
    pred = endpoint(forward, z_t, t, text)
    per_sample = (pred - target).pow(2).mean(dim=(1, 2, 3, 4))
    if cfg.weighting == "inverse_delta":
        lam = 1000.0 / (grid[i] - grid[i - 1]).float().to(per_sample.device)
    else:
        lam = torch.ones_like(per_sample)
    loss = (lam * per_sample).mean()
    return LossOutput(loss, per_sample.detach(), {"loss": float(loss.detach()), "t_mean": float(t[:, 0].mean())})


@torch.no_grad()
def consistency_sample(forward, noise: torch.Tensor, text, num_steps: int, shift: float = 5.0,
                       generator: Optional[torch.Generator] = None,
                       timesteps: Optional[Sequence[float]] = None) -> torch.Tensor:
    """Multistep consistency sampling (Song et al. 2023, Algorithm 1) on the flow-map sampler's grid.

    Step i is the flow-map jump ``t_i -> 0`` (``x0 = z - t_i / 1000 u(z, t_i, 0)``, the endpoint map) of
    :func:`anyflow.samplers.jumps.flow_map_jumps`, whose ``renoise`` policy then draws fresh noise eps'
    from ``generator`` and sets ``z = sigma_{i+1} eps' + (1 - sigma_{i+1}) x0`` (not after the last step,
    nor when t_{i+1} = 0).

    Args:
        forward: student wrapper, ``u = forward(z, t [B, F], r [B, F], text)``.
        noise: ``[B, F, C, H, W]`` initial noise at t_0 = 1000.
        text: ``[B, L, D]`` prompt embeddings or a TextContext.
        num_steps: N (NFE) on :func:`anyflow.samplers.schedule.time_grid` with ``shift``.
        timesteps: custom decreasing grid in [0, 1000] ending at 0 (replaces the N-step grid).

    Returns:
        ``[B, F, C, H, W]`` fp32 clean latents (the last endpoint).

    Raises:
        ValueError: ``num_steps`` < 1 (without ``timesteps``).
    """
    pairs = pairs_of(time_grid(num_steps, shift) if timesteps is None else timesteps)
    b, f = noise.shape[:2]

    def renoise(i, x0):
        t_next = pairs[i][1]
        if i + 1 == len(pairs) or t_next <= 0:
            return x0
        eps = torch.randn(x0.shape, generator=generator).to(x0.device)
        return noise_latents(x0, eps, torch.full((b, f), t_next, device=x0.device)).float()

    to_zero = [(t, 0.0) for t, _ in pairs]
    return torch_jumps(model_velocity(forward, text), noise, to_zero, renoise=renoise).latents


class ConsistencyPhase(Phase):
    """Phase ``consistency``: :func:`consistency_loss` of the student (bidirectional, or a FAR window), distilled
    from ``teacher`` or, without one, consistency training. Single-process only.

    Args:
        trainer: the :class:`~anyflow.training.trainer.Trainer`.
        teacher: ``v(z, t, text)`` flow-matching velocity (:func:`teacher_velocity`) or ``None``.

    Raises:
        ValueError: a data-parallel (``fsdp``) trainer.
    """

    def __init__(self, trainer, teacher: Optional[Callable] = None):
        if trainer.fsdp:
            raise ValueError("phase 'consistency' is single-process only (fsdp=True given)")
        super().__init__(trainer)
        self.teacher = teacher
        self.cfg = trainer.cfg.consistency or ConsistencyConfig()

    def losses(self, latents, text):
        tr = self.trainer
        fwd, x, text = window_forward(tr, latents, text)
        noise = torch.randn(x.shape, generator=tr.generator).to(x.device, x.dtype)
        yield consistency_loss(fwd, x, noise, text, self.cfg, tr.cfg.shift, tr.generator, teacher=self.teacher,
                               negative=expand_negative(tr.negative, text))
