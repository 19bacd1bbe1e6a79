"""Bidirectional sampler core: whole-clip flow-map jumps z_r = z_t - (t - r) u(z_t, t, r).

One NFE per time pair (t, r) over the whole clip (flow-map sampling with any number of steps:
NVlabs/AnyFlow ``far/pipelines/pipeline_wan_anyflow.py``, ``WanAnyFlowPipeline.__call__``), run by
:func:`anyflow.samplers.jumps.flow_map_jumps`. The latent between steps is an fp32 master copy that the
model sees in its own dtype; the Euler shortcut update (with CFG when the text batch is 2B) is one fused
op. Context frames (I2V / V2V) are clean: their time is t = 0 and the update leaves them unchanged. The
per-step forward can be replayed from a CUDA graph (:mod:`.graphs`); the prompt's cross-attention K/V
are whatever ``text`` carries (:func:`anyflow.models.blocks.prepare_text` with ``cache_kv=True``
computes them once).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch

from .. import ops
from ..models.bidirectional import bidirectional_forward
from ..models.blocks import TextContext
from . import graphs
from .jumps import flow_map_jumps


@dataclass
class BidirectionalRun:
    """Result of :func:`sample`: ``latents`` ``[B, F, C, H, W]`` fp32, NFE count and graph replays."""

    latents: torch.Tensor
    nfe: int
    graph_replays: int


def sample(
    model,
    noise: torch.Tensor,
    pairs: Sequence[tuple[float, float]],
    text: TextContext,
    *,
    context: Optional[torch.Tensor] = None,
    guidance_scale: float = 1.0,
    use_mean_velocity: bool = True,
    cuda_graphs: bool = False,
    attention: Optional[str] = None,
    on_step: Optional[Callable[[int, float, torch.Tensor], Optional[torch.Tensor]]] = None,
    interrupted: Optional[Callable[[], bool]] = None,
) -> BidirectionalRun:
    """Run the flow-map jumps ``pairs`` on the whole clip.

    Args:
        model: a diffusers ``AnyFlowTransformer3DModel`` (enabled or not; its parameters are read); the ops run
            on its :func:`anyflow.enable` backend, else on the one in effect (:class:`anyflow.ops.backend`).
        noise: ``[B, F, C, H, W]`` initial latents (any float dtype; copied to fp32).
        pairs: time pairs ``(t, r)`` in [0, 1000], t >= r (:func:`anyflow.samplers.schedule.time_pairs`);
            pairs with t == r are skipped.
        text: :class:`~anyflow.models.blocks.TextContext` of batch B, or 2B ``[uncond; cond]`` for CFG.
        context: optional ``[B, T, C, H, W]`` clean latents of the first T frames (I2V / V2V).
        guidance_scale: CFG scale (used when the text batch is 2B).
        use_mean_velocity: pass r to the model (flow map); ``False`` passes r = t (instantaneous velocity).
        attention: SDPA policy (:data:`anyflow.ops.SDPA_POLICIES`, ``None`` = as is).
        cuda_graphs: replay the per-step forward from a CUDA graph (CUDA + inference only, else eager).
        on_step: ``on_step(i, t, latents)`` after every jump; may return replacement latents.
        interrupted: checked before every jump; ``True`` skips the remaining jumps.

    Returns:
        :class:`BidirectionalRun`.

    Raises:
        ValueError: noise is not 5-D, context frames do not match the noise's (C, H, W) or outnumber its frames.
    """
    if noise.ndim != 5:
        raise ValueError(f"noise must be [B, F, C, H, W], got shape {tuple(noise.shape)}")
    dtype = model.dtype
    z = noise.to(torch.float32, copy=True)
    b, f = z.shape[:2]
    n_ctx = 0
    ctx = None
    if context is not None:
        if context.shape[0] != b or context.shape[2:] != z.shape[2:] or context.shape[1] > f:
            raise ValueError(f"context must be [B, T <= {f}, C, H, W] matching noise {tuple(z.shape)}, "
                             f"got {tuple(context.shape)}")
        ctx = context.to(dtype)
        n_ctx = ctx.shape[1]
        z[:, :n_ctx] = ctx.float()
    cfg = text.tokens.shape[0] == 2 * b
    step = graphs.StepGraph(lambda x, tt, rr: bidirectional_forward(model, x, tt, rr, text), z.device, enabled=cuda_graphs)

    def velocity(i, z, t, r):
        x = z.to(dtype)
        if ctx is not None:
            x[:, :n_ctx] = ctx
        if cfg:
            x = torch.cat([x, x])
        tt = torch.full((x.shape[0], f), t, dtype=torch.float64, device=x.device)
        rr = torch.full_like(tt, r) if use_mean_velocity else tt.clone()
        tt[:, :n_ctx] = 0  # context frames are clean: t = 0 (r untouched, as the official pipeline)
        return step(x, tt, rr)

    with ops.sdpa_policy(attention), ops.backend(getattr(model, "_anyflow_backend", None)):
        run = flow_map_jumps(velocity, z, pairs, guidance_scale=guidance_scale, num_context_frames=n_ctx,
                             on_step=on_step, interrupted=interrupted)
    return BidirectionalRun(run.latents, run.nfe, step.replays)
