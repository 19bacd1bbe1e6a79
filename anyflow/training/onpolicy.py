"""On-policy phase of AnyFlow: Flow Map Backward Simulation + DMD (reference spec §7).

The student's *shortcut rollout* draws a step count N from ``rollout_steps`` and a gradient step
g* ~ U{0..N-1}, and runs at most three flow-map jumps over the shifted N-step grid t_0 = 1000 > ... >
t_N = 0: S1 = t_0 -> t_{g*}, S2 = t_{g*} -> t_{g*+1}, S3 = t_{g*+1} -> 0 (a jump whose endpoints
coincide is skipped, so 2-3 NFEs whatever N). The rollout output x_hat is judged by DMD: the real
score is the teacher with CFG (``x0_real = x0_c + s (x0_c - x0_u)``, Self-Forcing convention, CFG
1 + s), the fake score is the critic, both bidirectional flow-matching models called with r = t on
the whole clip. The critic is trained by flow matching on (detached) student samples.

Gradient through the rollout (``grad_segments``, reference §7.1):

* ``"all"`` (official parity): autograd through all 2-3 jumps (the official ``training_rollout`` wraps
  none of them in no-grad, whatever the name ``grad_timestep`` suggests).
* ``"mid"``: only S2 gives the student's parameters gradient, the reading of ``grad_timestep`` that
  §7.1 makes the flag: S1 runs without gradient; S3 is differentiated with respect to its input only
  (the parameters are frozen for that call, and a checkpointed block's recompute replays the freeze),
  so x_hat still depends on S2's output (a detached S3 would leave x_hat without any gradient).

FAR students roll out chunk by chunk through a KV cache (:class:`FARRollout`): each chunk gets the
same (N, g*) and the same 2-3 jumps with gradient; the cache steps re-encode the student's *own*
finished chunks at t = r = 0 without gradient (truncated BPTT across chunks, self-forcing context).

Units as in :mod:`.flowmap`: timesteps in [0, 1000], latents ``[B, F, C, H, W]``.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F

from ..models import fused
from ..samplers.kv_cache import FARKVCache
from .distributed import compute_dtype, is_sharded, run_sharded
from .flowmap import (
    BidirectionalForward,
    LossOutput,
    _as_context,
    expand_negative,
    noise_latents,
    sample_logit_normal,
    shift_sigma,
    shifted_grid,
)

SEGMENT_NAMES = ("S1", "S2", "S3")


# ----------------------------------------------------------------------------------------------
# rollout schedule
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RolloutPlan:
    """One rollout's jumps.

    Attributes:
        num_steps: N.
        grad_step: g*.
        segments: ``((name, t_from, t_to), ...)`` of the jumps actually run (2 or 3), names in
            :data:`SEGMENT_NAMES`.
    """

    num_steps: int
    grad_step: int
    segments: tuple


def rollout_plan(num_steps: int, grad_step: int, shift: float) -> RolloutPlan:
    """Jumps S1 = t_0 -> t_g, S2 = t_g -> t_{g+1}, S3 = t_{g+1} -> t_N on the shifted N-step grid,
    skipping those whose endpoints coincide (reference §7.1)."""
    if not 0 <= grad_step < num_steps:
        raise ValueError(f"grad_step must be in [0, {num_steps}), got {grad_step}")
    grid = shifted_grid(num_steps, shift).tolist()
    ends = ((grid[0], grid[grad_step]), (grid[grad_step], grid[grad_step + 1]), (grid[grad_step + 1], grid[-1]))
    segs = tuple((name, a, b) for name, (a, b) in zip(SEGMENT_NAMES, ends) if a != b)
    return RolloutPlan(num_steps, grad_step, segs)


def sample_plan(steps: Sequence[int], shift: float, generator: torch.Generator) -> RolloutPlan:
    """N ~ U{steps}, g* ~ U{0..N-1} from ``generator`` (two draws, always)."""
    steps = [int(s) for s in steps]
    n = steps[int(torch.randint(len(steps), (), generator=generator))]
    g = int(torch.randint(n, (), generator=generator))
    return rollout_plan(n, g, shift)


def _segment_context(name: str, grad: bool, grad_segments: str, params):
    """Grad mode of one jump: see the module docstring."""
    if not grad:
        return torch.no_grad()
    if grad_segments == "all":
        return contextlib.nullcontext()
    if grad_segments != "mid":
        raise ValueError(f"grad_segments must be 'all' or 'mid', got {grad_segments!r}")
    if name == "S1":
        return torch.no_grad()
    if name == "S3":
        return fused.frozen_parameters(params)
    return contextlib.nullcontext()


def _segment_text(name: str, grad_segments: str, text: fused.TextContext) -> fused.TextContext:
    """S3 under ``"mid"`` sees the projected prompt detached (no parameter gradient through the text)."""
    if grad_segments == "mid" and name == "S3":
        return fused.TextContext(text.tokens.detach(), text.raw_dtype)
    return text


def _jump(z, u, t_from: float, t_to: float):
    return z - ((t_from - t_to) / 1000) * u.float()


def bidirectional_rollout(
    forward, noise: torch.Tensor, text, plan: RolloutPlan, *, grad: bool = True, grad_segments: str = "all",
    params=(),
):
    """Shortcut rollout of a bidirectional student (reference §7.1, no CFG, mean velocity).

    Args:
        forward: :class:`anyflow.training.flowmap.BidirectionalForward` of the student.
        noise: ``[B, F, C, H, W]`` start noise (t = 1000).
        text: prompt embeddings or TextContext.
        plan: the jumps (:func:`sample_plan`).
        grad: differentiate at all (``False``: the critic step's no-grad rollout).
        grad_segments: ``"all"`` or ``"mid"``.
        params: the trained parameters (frozen during S3 with ``"mid"``).

    Returns:
        ``(x_hat [B, F, C, H, W] fp32, nfe)``.
    """
    text = _as_context(forward, text)
    z = noise.float()
    b, f = z.shape[:2]
    dtype = compute_dtype(forward.model)
    for name, t_from, t_to in plan.segments:
        with _segment_context(name, grad, grad_segments, params):
            t = torch.full((b, f), t_from, device=z.device)
            r = torch.full((b, f), t_to, device=z.device)
            z = _jump(z, forward(z.to(dtype), t, r, _segment_text(name, grad_segments, text)), t_from, t_to)
    return z, len(plan.segments)


class FARRollout:
    """Chunk-wise FAR rollout with a KV cache (reference §7.1 FAR, §7.5), differentiable per chunk.

    Every chunk k runs the plan's 2-3 jumps; each jump is one NFE of the chunk attending to the cached
    keys/values of the finished prefix and to itself; nothing is written to the cache during a jump.
    With gradient the NFEs read a copy of the cached prefix taken at the start of the chunk
    (:meth:`snapshot`), so the backward, and the recompute of checkpointed blocks, see the cache of the
    forward although later cache steps overwrite it. After chunk k the cache step re-encodes chunks
    0..k from the student's own (detached) output without gradient.

    A model sharded with :func:`anyflow.training.distributed.shard_model` works too: every NFE and
    every cache step runs inside the FSDP root (:func:`~anyflow.training.distributed.run_sharded`), the
    NFE projecting the raw prompt itself (so the root's gradients are reduced after the backward), in
    the FSDP compute dtype (the KV cache too).

    Args:
        model: ``AnyFlowFARTransformer3DModel`` (the student).
        text: ``[B, L, text_dim]`` prompt embeddings (a projected TextContext is accepted unsharded only).
        chunk_partition: latent frames per chunk; latent_hw: latent (height, width).

    Raises:
        TypeError: a TextContext for a sharded model.
    """

    def __init__(self, model, text, chunk_partition, latent_hw, backend=None):
        from ..samplers.far import FARSession

        self.model = model
        self.backend = backend
        self.dtype = compute_dtype(model)
        self.sharded = is_sharded(model)
        if self.sharded:
            if isinstance(text, fused.TextContext):
                raise TypeError("text must be the raw [B, L, D] prompt embeddings for a sharded model, "
                                "got a TextContext")
            raw = text.to(self.dtype)
            self.text = fused.TextContext(raw, raw.dtype)  # raw: projected inside every NFE
            with torch.no_grad():
                cache_text = run_sharded(model, fused.prepare_text, raw)
        else:
            self.text = _as_context(BidirectionalForward(model), text)
            with torch.no_grad():
                cache_text = fused.TextContext(self.text.tokens.detach(), self.text.raw_dtype)
        self.session = FARSession(model, cache_text, chunk_partition, latent_hw, backend)
        cache = self.session.cache
        if cache.k.dtype != self.dtype:  # a sharded model's parameters are fp32 shards, it computes in bf16
            self.session.cache = FARKVCache(cache.k.shape[0], cache.k.shape[1], cache.k.shape[2], cache.k.shape[4],
                                            cache.capacity, self.dtype, cache.k.device)
        self.nfe = 0

    def snapshot(self):
        """Per layer ``(keys, values)`` ``[B, H, L_cached, Dh]``: copies of the cached prefix.

        A differentiable NFE attends to these instead of the live cache: the backward (and the recompute
        of a checkpointed block, which runs in the backward) must see the cache as it was in the
        forward, while later cache steps overwrite and extend it. One copy serves all NFEs of a chunk.
        """
        cache = self.session.cache
        n = cache.num_cached
        return [(cache.k[layer, :, :, :n].clone(), cache.v[layer, :, :, :n].clone())
                for layer in range(cache.k.shape[0])]

    def _attend(self, cos, sin, snapshot=None):
        cache, backend = self.session.cache, self.backend
        start = cache.num_cached

        def fn(layer, attn, q, k, v):
            kr = fused.norm_rope(attn, k, "k", cos, sin, backend).transpose(1, 2)
            qr = fused.norm_rope(attn, q, "q", cos, sin, backend).transpose(1, 2)
            if snapshot is None:
                keys, values = cache.segments(layer, start)
            else:
                keys, values = [snapshot[layer][0]], [snapshot[layer][1]]
            kk = torch.cat([*[x.to(kr.dtype) for x in keys], kr], dim=2)
            vv = torch.cat([*[x.to(v.dtype) for x in values], v.transpose(1, 2)], dim=2)
            o = F.scaled_dot_product_attention(qr, kk, vv)
            return o.transpose(1, 2).flatten(2)

        return fn

    def velocity(self, k: int, z, t, r, text=None, snapshot=None):
        """One NFE of chunk ``k``: ``z`` ``[B, F_k, C, H, W]``, per-frame ``t``, ``r`` ``[B, F_k]`` ->
        mean velocity ``[B, F_k, C, H, W]`` (with graph when grad is enabled, attending to ``snapshot``
        (:meth:`snapshot`; taken here when not given) rather than the live cache)."""
        f0, f1 = self.session.chunk_frames(k)
        cos, sin = fused.rope_for(self.model, f0, f1, self.session.geo.full_grid, False, z.device)
        self.nfe += 1
        text = self.text if text is None else text
        if snapshot is None and torch.is_grad_enabled():
            snapshot = self.snapshot()
        attend = self._attend(cos, sin, snapshot)
        if self.sharded:
            return run_sharded(self.model, _sharded_nfe, z, t, r, text.tokens, attend, f0, self.backend)
        return fused.far_cached_step(self.model, z, t, r, text, attend, f0, self.backend)

    def cache_step(self, k: int, prefix: torch.Tensor) -> None:
        """Make chunks ``0..k`` context from ``prefix`` ``[B, >= F, C, H, W]`` (no gradient)."""
        with torch.no_grad():
            run_sharded(self.model, _cache_step, self.session, k, prefix)

    def run(self, noise: torch.Tensor, plan: RolloutPlan, *, grad: bool = True, grad_segments: str = "all", params=()):
        """Roll out all chunks from ``noise`` ``[B, F_total, C, H, W]``; returns ``(x_hat fp32, nfe)``."""
        cp = self.session.cp
        fused.check_chunk_partition(cp, noise.shape[1])
        dtype = self.dtype
        chunks = []
        for k in range(len(cp)):
            f0, f1 = self.session.chunk_frames(k)
            z = noise[:, f0:f1].float()
            b, f = z.shape[:2]
            snapshot = self.snapshot() if grad else None
            for name, t_from, t_to in plan.segments:
                with _segment_context(name, grad, grad_segments, params):
                    t = torch.full((b, f), t_from, dtype=torch.float64, device=z.device)
                    r = torch.full((b, f), t_to, dtype=torch.float64, device=z.device)
                    u = self.velocity(k, z.to(dtype), t, r, _segment_text(name, grad_segments, self.text), snapshot)
                    z = _jump(z, u, t_from, t_to)
            chunks.append(z)
            if k < len(cp) - 1:
                self.cache_step(k, torch.cat([c.detach() for c in chunks], dim=1).to(dtype))
        return torch.cat(chunks, dim=1), self.nfe


def _sharded_nfe(model, z, t, r, raw_text, attend, first_frame, backend):
    text = fused.prepare_text(model, raw_text)
    return fused.far_cached_step(model, z, t, r, text, attend, first_frame, backend)


def _cache_step(model, session, k, prefix):
    session.cache_step(k, prefix)


# ----------------------------------------------------------------------------------------------
# losses
# ----------------------------------------------------------------------------------------------
def x0_from_velocity(z: torch.Tensor, u: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """``x0 = z - (t / 1000) u`` per frame (``t`` ``[B, F]``), fp32."""
    return z.float() - (t.float() / 1000)[:, :, None, None, None] * u.float()


def sample_dmd_timesteps(batch: int, shift: float, generator: torch.Generator, lo: float = 0.0, hi: float = 1000.0):
    """``[B]`` t = clamp(1000 shift(tau), lo, hi), tau ~ U[0, 1) (reference §7.2)."""
    tau = torch.rand(batch, generator=generator)
    return (shift_sigma(tau, shift) * 1000).clamp(lo, hi)


def dmd_generator_loss(
    x_hat: torch.Tensor,
    noise: torch.Tensor,
    t: torch.Tensor,
    text,
    negative,
    real,
    fake,
    *,
    real_guidance_scale: float = 3.0,
    dmd_weight: float = 1.0,
) -> LossOutput:
    """DMD generator loss (reference §7.2).

    Args:
        x_hat: ``[B, F, C, H, W]`` student samples (with graph).
        noise: standard normal noise like ``x_hat``.
        t: ``[B, F]`` DMD noise levels in [0, 1000].
        text, negative: ``[B, L, D]`` prompt / negative embeddings (raw, each net projects its own).
        real: ``u(z, t, r, text)`` of the teacher (real score); fake: the critic's (fake score).

    Without gradient: ``z = noise_latents(x_hat, noise, t)``; ``x0_fake`` from the critic,
    ``x0_real = x0_c + s (x0_c - x0_u)`` from the teacher (s = 0: the conditional branch alone, one
    teacher forward of batch B instead of 2B); ``grad = (x0_fake - x0_real) /
    mean_{F,C,H,W}|x_hat - x0_real|`` (per sample, NaN -> 0). The loss
    ``w mean((x_hat - sg(x_hat - grad))^2)`` (float64) has ``dL/dx_hat = 2 w grad / numel``.
    """
    negative = expand_negative(negative, text)
    with torch.no_grad():
        xd = x_hat.detach()
        z = noise_latents(xd, noise, t)
        b = z.shape[0]
        x0_fake = x0_from_velocity(z, fake(z, t, t, text), t)
        if real_guidance_scale == 0:  # x0_real = x0_c: the unconditional branch would be multiplied by zero
            x0_real = x0_from_velocity(z, real(z, t, t, text), t)
        else:
            u_real = real(torch.cat([z, z]), torch.cat([t, t]), torch.cat([t, t]), torch.cat([text, negative]))
            x0_c = x0_from_velocity(z, u_real[:b], t)
            x0_u = x0_from_velocity(z, u_real[b:], t)
            x0_real = x0_c + real_guidance_scale * (x0_c - x0_u)
        grad = x0_fake - x0_real
        norm = (xd.float() - x0_real).abs().mean(dim=(1, 2, 3, 4), keepdim=True)
        grad = torch.nan_to_num(grad / norm)
        target = (xd.double() - grad.double())
    loss = dmd_weight * (x_hat.double() - target).pow(2).mean()
    per_sample = (xd.double() - target).pow(2).mean(dim=(1, 2, 3, 4)).float()
    stats = {"loss_dmd": float(loss.detach()), "dmd_grad_norm": float(grad.norm()), "dmd_t_mean": float(t.float().mean())}
    return LossOutput(loss, per_sample, stats)


def critic_loss(critic, x: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, text) -> LossOutput:
    """Critic flow-matching loss on student samples (reference §7.3):
    ``mean_{B,F} mean_{C,H,W} (critic(z_t, t, t) - (eps - x))^2`` in fp32 (x detached)."""
    x = x.detach()
    z = noise_latents(x, noise, t)
    u = critic(z, t, t, text)
    per_frame = (u.float() - (noise.float() - x.float())).pow(2).mean(dim=(2, 3, 4))
    loss = per_frame.mean()
    return LossOutput(loss, per_frame.mean(1).detach(), {"loss_critic": float(loss.detach())})


def sample_critic_timesteps(batch: int, shift: float, generator: torch.Generator, lo: float = 0.0, hi: float = 1000.0):
    """``[B]`` logit-normal, shifted and clamped critic timesteps (reference §7.3)."""
    return sample_logit_normal(batch, shift, generator).clamp(lo, hi)
