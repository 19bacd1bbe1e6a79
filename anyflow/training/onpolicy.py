"""On-policy phase of AnyFlow: Flow Map Backward Simulation + DMD (NVlabs/AnyFlow
``far/trainers/trainer_wan_anyflow_onpolicy.py`` and ``trainer_far_wan_anyflow_onpolicy.py``).

The student's *shortcut rollout* draws a step count N from ``rollout_steps`` and a gradient step
g* ~ U{0..N-1}, and runs at most three flow-map jumps over the shifted N-step grid t_0 = 1000 > ... >
t_N = 0: S1 = t_0 -> t_{g*}, S2 = t_{g*} -> t_{g*+1}, S3 = t_{g*+1} -> 0 (a jump whose endpoints
coincide is skipped, so 2-3 NFEs whatever N). The rollout output x_hat is judged by DMD: the real
score is the teacher with CFG (``x0_real = x0_c + s (x0_c - x0_u)``, Self-Forcing convention, CFG
1 + s), the fake score is the critic, both bidirectional flow-matching models called with r = t on
the whole clip. The critic is trained by flow matching on (detached) student samples.

Gradient through the rollout (``grad_segments``; the official ``training_rollout`` with ``grad_timestep``):

* ``"all"`` (official parity): autograd through all 2-3 jumps (the official ``training_rollout`` wraps
  none of them in no-grad, whatever the name ``grad_timestep`` suggests).
* ``"mid"``: only S2 gives the student's parameters gradient, the reading of ``grad_timestep`` that
  its name suggests: S1 runs without gradient; S3 is differentiated with respect to its input only
  (the parameters are frozen for that call, and a checkpointed block's recompute replays the freeze),
  so x_hat still depends on S2's output (a detached S3 would leave x_hat without any gradient).

FAR students roll out chunk by chunk through a KV cache (:class:`FARRollout`): each chunk gets the
same (N, g*) and the same 2-3 jumps with gradient; the cache steps re-encode the student's *own*
finished chunks at t = r = 0 without gradient (truncated BPTT across chunks, self-forcing context).

Units as in :mod:`.flowmap`: timesteps in [0, 1000], latents ``[B, F, C, H, W]``.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
from dataclasses import dataclass
from typing import Sequence

import torch

from .. import ops
from ..models.blocks import TextContext, prepare_text
from ..models.far import FARRunner
from ..samplers.schedule import shift_sigma, time_grid
from .config import DMDConfig
from .consistency import ConsistencyPhase, endpoint, teacher_velocity
from .distributed import compute_dtype, frozen_parameters, full_tensor, is_sharded, run_sharded
from .flowmap import (
    BidirectionalForward,
    LossOutput,
    Phase,
    PretrainPhase,
    _as_context,
    expand_negative,
    is_far,
    noise_latents,
    sample_logit_normal,
    torch_jumps,
)

SEGMENT_NAMES = ("S1", "S2", "S3")


# -- rollout schedule ------------------------------------------------------------------------------
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
    skipping those whose endpoints coincide (official ``training_rollout``)."""
    if not 0 <= grad_step < num_steps:
        raise ValueError(f"grad_step must be in [0, {num_steps}), got {grad_step}")
    grid = time_grid(num_steps, shift).tolist()
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
    if grad_segments not in ("all", "mid"):
        raise ValueError(f"grad_segments must be 'all' or 'mid', got {grad_segments!r}")
    if grad_segments == "mid" and name != "S2":
        return torch.no_grad() if name == "S1" else frozen_parameters(params)
    return contextlib.nullcontext()


def _segment_velocity(call, plan: RolloutPlan, text: TextContext, dtype, grad: bool, grad_segments: str, params,
                      time_dtype=None):
    """``velocity(i, z, t, r)`` of :func:`~anyflow.training.flowmap.torch_jumps`: jump ``i`` of ``plan`` as one
    ``call(z in dtype, t [B, F], r [B, F], text)`` in the grad mode of its segment (module docstring); S3 under
    ``"mid"`` sees the projected prompt detached (no parameter gradient through the text)."""

    def velocity(i, z, t, r):
        name = plan.segments[i][0]
        if grad_segments == "mid" and name == "S3":
            text_i = TextContext(text.tokens.detach(), text.raw_dtype)
        else:
            text_i = text
        with _segment_context(name, grad, grad_segments, params):
            tt, rr = (torch.full(z.shape[:2], x, dtype=time_dtype, device=z.device) for x in (t, r))
            return call(z.to(dtype), tt, rr, text_i)

    return velocity


def bidirectional_rollout(
    forward, noise: torch.Tensor, text, plan: RolloutPlan, *, grad: bool = True, grad_segments: str = "all",
    params=(),
):
    """Shortcut rollout of a bidirectional student (official ``WanAnyFlowPipeline.training_rollout``; no CFG,
    mean velocity).

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

    Each jump is one NFE in the grad mode of its segment (module docstring) and the update of
    :func:`anyflow.training.flowmap.torch_jumps` on the torch backend (autograd sees it; it reads no
    parameter, so running it outside the segment's grad mode leaves the parameter gradients alone).
    """
    text = _as_context(forward, text)
    velocity = _segment_velocity(forward, plan, text, compute_dtype(forward.model), grad, grad_segments, params)
    run = torch_jumps(velocity, noise, [(a, b) for _, a, b in plan.segments])
    return run.latents, run.nfe


def consistency_rollout(forward, noise: torch.Tensor, text, plan: RolloutPlan, shift: float,
                        generator: torch.Generator, *, grad: bool = True):
    """Multistep consistency sampling of an endpoint-map student cut at the plan's gradient step: the DMD
    sample of the rCM-like baseline (DMD2's backward simulation, Yin et al. 2024, as rCM, Zheng et al. 2025,
    uses it on its consistency model).

    On the shifted ``plan.num_steps``-step grid, steps ``i < plan.grad_step`` run without gradient:
    ``x0 = z - t_i u(z, t_i, 0) / 1000`` (:func:`anyflow.training.consistency.endpoint`), then ``x0`` is
    re-noised to ``t_{i+1}`` with fresh noise from ``generator``; step ``plan.grad_step`` returns its endpoint
    with gradient (when ``grad``).

    Args:
        forward: :class:`anyflow.training.flowmap.BidirectionalForward` of the student.
        noise: ``[B, F, C, H, W]`` start noise (t = 1000).
        text: prompt embeddings or TextContext.
        plan: ``num_steps`` N and ``grad_step`` g* (:func:`sample_plan`); its segments are not used.
        shift: flow shift of the grid.
        generator: CPU generator of the re-noising draws.

    Returns:
        ``(x_hat [B, F, C, H, W] fp32, nfe = g* + 1)``.
    """
    text = _as_context(forward, text)
    dtype = compute_dtype(forward.model)
    grid = time_grid(plan.num_steps, shift).tolist()
    b, f = noise.shape[:2]
    z = noise
    for i in range(plan.grad_step + 1):
        t = torch.full((b, f), grid[i], device=noise.device)
        with contextlib.nullcontext() if grad and i == plan.grad_step else torch.no_grad():
            x0 = endpoint(forward, z.to(dtype), t, text)
        if i < plan.grad_step:
            eps = torch.randn(x0.shape, generator=generator).to(x0.device)
            z = noise_latents(x0, eps, torch.full((b, f), grid[i + 1], device=x0.device)).float()
    return x0, plan.grad_step + 1


class FARRollout:
    """Chunk-wise FAR rollout with a KV cache, differentiable per chunk: a thin user of
    :class:`anyflow.models.far.FARRunner` (official ``FARWanAnyFlowPipeline.training_rollout`` in
    ``far/pipelines/pipeline_far_wan_anyflow.py`` and ``trainer_far_wan_anyflow_onpolicy.py``).

    Every chunk k runs the plan's 2-3 jumps (:func:`anyflow.samplers.jumps.flow_map_jumps`); each jump is
    one NFE of the chunk attending to the cached keys/values of the finished prefix and to itself. With
    gradient the NFEs attend to a :class:`~anyflow.models.far.KVSnapshot` of the cache taken at the start of
    the chunk, so the backward, and the recompute of checkpointed blocks, see the cache of the forward
    although later cache steps overwrite it; without gradient they use the live cache, as the sampler. After
    chunk k the cache step re-encodes chunks 0..k from the student's own (detached) output without gradient.

    A model sharded with :func:`anyflow.training.distributed.shard_model` works too: every NFE and
    every cache step runs inside the FSDP root (:func:`~anyflow.training.distributed.run_sharded`), the
    NFE projecting the raw prompt itself (so the root's gradients are reduced after the backward), in
    the FSDP compute dtype (the KV cache too).

    Args:
        model: ``AnyFlowFARTransformer3DModel`` (the student).
        text: ``[B, L, text_dim]`` prompt embeddings (a projected TextContext is accepted unsharded only).
        chunk_partition: latent frames per chunk; latent_hw: latent (height, width).

    Attributes:
        runner: the :class:`~anyflow.models.far.FARRunner`; cache: its live KV cache (compute dtype);
        nfe, cache_steps: counters.

    Raises:
        TypeError: a TextContext for a sharded model.
    """

    def __init__(self, model, text, chunk_partition, latent_hw):
        self.model = model
        self.dtype = compute_dtype(model)
        self.sharded = is_sharded(model)
        if self.sharded:
            if isinstance(text, TextContext):
                raise TypeError("text must be the raw [B, L, D] prompt embeddings for a sharded model, "
                                "got a TextContext")
            raw = text.to(self.dtype)
            self.text = TextContext(raw, raw.dtype)  # raw: projected inside every NFE
            with torch.no_grad():
                self.cache_text = run_sharded(model, prepare_text, raw)
        else:
            self.text = _as_context(BidirectionalForward(model), text)
            self.cache_text = TextContext(self.text.tokens.detach(), self.text.raw_dtype)
        self.runner = FARRunner(model, chunk_partition, latent_hw)
        self.cache = self.runner.new_cache(self.cache_text.tokens.shape[0], self.dtype, self.cache_text.tokens.device)
        self.nfe = 0
        self.cache_steps = 0

    def velocity(self, k: int, z, t, r, text=None, state=None):
        """One NFE of chunk ``k``: ``z`` ``[B, F_k, C, H, W]`` (compute dtype), per-frame ``t``, ``r``
        ``[B, F_k]`` in [0, 1000] -> mean velocity ``[B, F_k, C, H, W]``, attending to ``state`` (default: a
        fresh :meth:`~anyflow.models.far.FARKVCache.snapshot` when grad is enabled, else the live cache)."""
        self.nfe += 1
        text = self.text if text is None else text
        if state is None:
            state = self.cache.snapshot() if torch.is_grad_enabled() else self.cache
        if self.sharded:
            return run_sharded(self.model, _sharded_step, self.runner, k, z, t, r, text.tokens, state)
        return self.runner.step(k, z, t, r, text, state)

    def cache_step(self, k: int, prefix: torch.Tensor) -> None:
        """Make chunks ``0..k`` context from ``prefix`` ``[B, >= F, C, H, W]`` (no gradient)."""
        self.cache_steps += 1
        with torch.no_grad():
            run_sharded(self.model, lambda _model: self.runner.cache_step(k, prefix, self.cache_text, self.cache))

    def run(self, noise: torch.Tensor, plan: RolloutPlan, *, grad: bool = True, grad_segments: str = "all", params=()):
        """Roll out all chunks from ``noise`` ``[B, F_total, C, H, W]``; returns ``(x_hat fp32, nfe)``.

        Each jump's NFE runs in the grad mode of its segment (module docstring); the Euler update after it
        reads no parameter, so where it runs does not change the parameter gradients.
        """
        cp = self.runner.cp
        self.runner.check_num_frames(noise.shape[1])
        pairs = [(a, b) for _, a, b in plan.segments]
        chunks = []
        for k in range(len(cp)):
            f0, f1 = self.runner.chunk_frames(k)
            nfe = functools.partial(self.velocity, k, state=self.cache.snapshot() if grad else self.cache)
            velocity = _segment_velocity(nfe, plan, self.text, self.dtype, grad, grad_segments, params, torch.float64)
            chunks.append(torch_jumps(velocity, noise[:, f0:f1], pairs).latents)
            if k < len(cp) - 1:
                self.cache_step(k, torch.cat([c.detach() for c in chunks], dim=1).to(self.dtype))
        return torch.cat(chunks, dim=1), self.nfe


def _sharded_step(model, runner, k, z, t, r, raw_text, state):
    return runner.step(k, z, t, r, prepare_text(model, raw_text), state)


# -- losses ----------------------------------------------------------------------------------------
def x0_from_velocity(z: torch.Tensor, u: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """``x0 = z - (t / 1000) u`` per frame (``t`` ``[B, F]``), fp32: the flow-map jump t -> 0
    (:func:`anyflow.ops.euler_shortcut`, torch backend)."""
    return ops.euler_shortcut(z.float(), u, t, 0.0, backend="torch")


def sample_dmd_timesteps(batch: int, shift: float, generator: torch.Generator, lo: float = 0.0, hi: float = 1000.0):
    """``[B]`` t = clamp(1000 shift(tau), lo, hi), tau ~ U[0, 1) (official ``generator_loss``)."""
    tau = torch.rand(batch, generator=generator)
    return (shift_sigma(tau, shift) * 1000).clamp(lo, hi)


def dmd_generator_loss(x_hat: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, text, negative, real, fake, *,
                       real_guidance_scale: float = 3.0, dmd_weight: float = 1.0) -> LossOutput:
    """DMD generator loss (official ``generator_loss``, ``trainer_wan_anyflow_onpolicy.py``).

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
    return LossOutput(loss, per_sample, {"loss_dmd": float(loss.detach()), "dmd_grad_norm": float(grad.norm()),
                                         "dmd_t_mean": float(t.float().mean())})


def critic_loss(critic, x: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, text) -> LossOutput:
    """Critic flow-matching loss on student samples (the critic step of ``trainer_wan_anyflow_onpolicy.py``):
    ``mean_{B,F} mean_{C,H,W} (critic(z_t, t, t) - (eps - x))^2`` in fp32 (x detached)."""
    x = x.detach()
    z = noise_latents(x, noise, t)
    u = critic(z, t, t, text)
    per_frame = (u.float() - (noise.float() - x.float())).pow(2).mean(dim=(2, 3, 4))
    loss = per_frame.mean()
    return LossOutput(loss, per_frame.mean(1).detach(), {"loss_critic": float(loss.detach())})


def sample_critic_timesteps(batch: int, shift: float, generator: torch.Generator, lo: float = 0.0, hi: float = 1000.0):
    """``[B]`` logit-normal, shifted and clamped critic timesteps (the official critic step)."""
    return sample_logit_normal(batch, shift, generator).clamp(lo, hi)


# -- the on-policy phase (run by anyflow.training.trainer.Trainer) ---------------------------------
class OnPolicyPhase(Phase):
    """Phase ``onpolicy`` (the loop of NVlabs/AnyFlow ``far/main.py`` with
    ``trainer_wan_anyflow_onpolicy.py`` / ``trainer_far_wan_anyflow_onpolicy.py``): per iteration, when
    ``step % critic_update_ratio == 0``, a generator step (shortcut rollout of the first ``dmd_batch_size``
    samples, :func:`dmd_generator_loss` against the teacher and the critic, optionally plus the forward loss
    on the whole batch), then always a critic step on a fresh batch (:meth:`critic_step`). Bidirectional and
    FAR students; teacher and critic are bidirectional models judging the whole clip. The critic's
    parameters and AdamW are the trainer's ``"critic"`` optimiser (checkpointed with it).

    Args:
        trainer: the :class:`~anyflow.training.trainer.Trainer`.
        real_score: the teacher (bidirectional flow-matching model; frozen here, CFG real score of DMD).
        critic: the fake score (bidirectional; default: a copy of ``real_score``), trained with LoRA when
            ``config.lora`` is set.

    Raises:
        ValueError: no ``real_score``; a FAR ``real_score`` or ``critic``; nothing of the critic to train.
    """

    def __init__(self, trainer, real_score, critic=None):
        if real_score is None:
            raise ValueError("phase 'onpolicy' needs real_score (the teacher, a bidirectional model)")
        for name, m in (("real_score", real_score), ("critic", critic)):
            if m is not None and is_far(m):
                raise ValueError(f"{name} must be a bidirectional model (it judges the whole clip)")
        super().__init__(trainer)
        cfg = trainer.cfg
        self.dmd = cfg.dmd or DMDConfig()
        if self.dmd.student == "consistency":  # the rCM-like baseline: consistency distillation + DMD
            if trainer.far:
                raise ValueError("dmd.student 'consistency' supports bidirectional students only")
            self.forward_phase = ConsistencyPhase(trainer, teacher_velocity(real_score))
        else:
            self.forward_phase = PretrainPhase(trainer)  # the co-trained forward loss
        if critic is None:
            critic = copy.deepcopy(real_score)
        real_score.eval().requires_grad_(False)
        self.real_score, self.critic = real_score, critic
        critic.train()
        if cfg.gradient_checkpointing:
            critic.enable_gradient_checkpointing()
        patterns = tuple(self.dmd.critic_trainable)
        # the critic trains its own LoRA adapters: attention and FFN only (discriminator_cfg of the official
        # on-policy YAMLs), not the student's timestep-embedder targets
        lora = None if cfg.lora is None else dataclasses.replace(
            cfg.lora, target_modules=tuple(self.dmd.critic_lora_targets), extra_trainable=patterns)
        self.critic_params = trainer.trainable(critic, lora, patterns, "critic_trainable", "the critic")
        if trainer.fsdp:
            trainer.shard(real_score)
        self.critic_optimizer, self.critic_lr_scheduler = trainer.add_optimizer(
            "critic", self.critic_params, self.dmd.critic_optimizer)
        self.real_forward = trainer.sharded(BidirectionalForward(real_score))
        self.critic_forward = trainer.sharded(BidirectionalForward(critic))

    def step(self, device, record):
        tr = self.trainer
        if tr.step % self.dmd.critic_update_ratio == 0:
            # the co-trained forward loss is logged as loss_forward: the generator's loss is the sum
            record["loss"] = tr.update_student(self.losses(*tr.next_batch(device)), record, device)
            tr.average_losses(record)
        record.update(self.critic_step(device))

    def rollout(self, noise, text, plan: RolloutPlan, grad: bool):
        """The student's shortcut rollout (bidirectional, or FAR chunk by chunk through the KV cache):
        ``(x_hat [B, F, C, H, W] fp32, nfe)``."""
        tr = self.trainer
        params = [p for _, p in tr.named_params]
        if tr.far:  # (a consistency student is bidirectional)
            ro = FARRollout(tr.model, text, tr.cfg.far.chunk_partition, noise.shape[-2:])
            return ro.run(noise, plan, grad=grad, grad_segments=self.dmd.grad_segments, params=params)
        fwd = tr.sharded(BidirectionalForward(tr.model))
        if self.dmd.student == "consistency":
            return consistency_rollout(fwd, noise, text, plan, tr.cfg.shift, tr.generator, grad=grad)
        return bidirectional_rollout(fwd, noise, text, plan, grad=grad, grad_segments=self.dmd.grad_segments,
                                     params=params)

    def _dmd_batch(self, latents, text, device):
        """The DMD batch of a step: the first ``dmd_batch_size`` samples of this process's slice, the rollout
        plan and noise drawn for the global DMD batch. Returns ``(text [nb, L, D], rows, shape, plan, noise)``
        with ``shape = (nb * world_size, F, C, H, W)`` and ``rows`` this process's rows of it (``None``: one
        process)."""
        tr, d = self.trainer, self.dmd
        rows = tr.rows(latents.shape[0])
        local_text = text if rows is None else tr.take(rows, text)[0]
        nb = min(d.dmd_batch_size, local_text.shape[0])
        rows = None if rows is None else torch.arange(tr.rank * nb, (tr.rank + 1) * nb)
        frames = sum(tr.cfg.far.chunk_partition) if tr.far else latents.shape[1]
        shape = (nb * tr.world_size, frames) + tuple(latents.shape[2:])
        plan = sample_plan(d.rollout_steps, tr.cfg.shift, tr.generator)
        noise, = tr.take(rows, torch.randn(shape, generator=tr.generator).to(device))
        return local_text[:nb], rows, shape, plan, noise

    def _noise_levels(self, sample_timesteps, shape, rows, device):
        """``(t [b, F], noise)`` of a DMD or critic loss: ``sample_timesteps`` within ``[min_timestep,
        max_timestep]`` and fresh noise, drawn for the global DMD batch, this process's ``rows``."""
        d, tr = self.dmd, self.trainer
        t = sample_timesteps(shape[0], tr.cfg.shift, tr.generator, d.min_timestep, d.max_timestep)
        noise = torch.randn(shape, generator=tr.generator).to(device)
        return tr.take(rows, t[:, None].expand(shape[:2]).to(device), noise)

    def losses(self, latents, text):
        """DMD on the first ``dmd_batch_size`` samples (of each process's slice), then (co-training) the
        forward loss on all; draws are made for the global DMD batch (``dmd_batch_size * world_size``)."""
        d = self.dmd
        text_nb, rows, shape, plan, noise = self._dmd_batch(latents, text, latents.device)
        x_hat, nfe = self.rollout(noise, text_nb, plan, grad=True)
        t, dmd_noise = self._noise_levels(sample_dmd_timesteps, shape, rows, latents.device)
        out = dmd_generator_loss(x_hat, dmd_noise, t, text_nb, self.trainer.negative, self.real_forward,
                                 self.critic_forward, real_guidance_scale=d.real_guidance_scale,
                                 dmd_weight=d.dmd_weight)
        out.stats.update(rollout_steps=plan.num_steps, rollout_grad_step=plan.grad_step, rollout_nfe=nfe)
        yield out
        if d.cotrain_forward:
            name = "loss_consistency" if d.student == "consistency" else "loss_forward"
            for extra in self.forward_phase.losses(latents, text):
                extra.stats = {(name if k == "loss" else k): v for k, v in extra.stats.items()}
                yield extra

    def critic_step(self, device) -> dict:
        """Critic (fake score) flow matching on a fresh batch of no-grad student samples (official critic
        step, ``trainer_wan_anyflow_onpolicy.py`` ``train_step`` / ``discriminator_loss``); returns its log
        statistics. Like the generator's DMD loss it uses the first ``dmd_batch_size`` samples of each
        process's slice (draws for the global DMD batch ``dmd_batch_size * world_size``)."""
        tr, d = self.trainer, self.dmd
        text, rows, shape, plan, noise = self._dmd_batch(*tr.next_batch(device), device)
        self.critic_optimizer.zero_grad(set_to_none=True)
        with tr.autocast(device):
            tr.model.eval()
            try:
                with torch.no_grad():
                    x, _ = self.rollout(noise, text, plan, grad=False)
            finally:
                tr.model.train()
            t, eps = self._noise_levels(sample_critic_timesteps, shape, rows, device)
            out = critic_loss(self.critic_forward, x, eps, t, text)
        out.loss.backward()
        norm = torch.nn.utils.clip_grad_norm_([p for _, p in self.critic_params], d.critic_optimizer.max_grad_norm)
        self.critic_optimizer.step()
        self.critic_lr_scheduler.step()
        tr.average_losses(out.stats)
        return {**out.stats, "critic_grad_norm": float(full_tensor(norm)),
                "critic_lr": self.critic_optimizer.param_groups[0]["lr"],
                "critic_rollout_steps": plan.num_steps, "critic_rollout_grad_step": plan.grad_step}
