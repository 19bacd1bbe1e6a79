"""FAR sampler: chunk-by-chunk flow-map sampling on a :class:`~anyflow.models.far.FARRunner` and its KV cache.

Per chunk k (official ``FARWanAnyFlowPipeline.__call__`` / ``inference`` in
``far/pipelines/pipeline_far_wan_anyflow.py``, NVlabs/AnyFlow): N flow-map jumps on the chunk alone
(:func:`anyflow.samplers.jumps.flow_map_jumps`), each one NFE of the runner attending to the cached context
and to the chunk; then, unless it is the last chunk, a cache step that makes the finished prefix context.
The per-step forward of a chunk can be replayed from a CUDA graph (:mod:`.graphs`).
"""

from __future__ import annotations

from typing import Callable, Iterator, Optional, Sequence

import torch

from .. import ops
from ..models.blocks import TextContext
from ..models.far import FARRunner
from . import graphs
from .jumps import flow_map_jumps


class FARSession:
    """State of one FAR generation: model, prompt context, runner, live KV cache, counters.

    Args:
        model: a diffusers ``AnyFlowFARTransformer3DModel`` (enabled or not; its parameters are read).
        text: :class:`anyflow.models.blocks.TextContext` for the model batch (2B with CFG).
        chunk_partition: latent frames per chunk.
        latent_hw: latent (height, width).
        cuda_graphs: capture each chunk's per-step forward as a CUDA graph (:mod:`.graphs`; CUDA,
            inference only, otherwise eager).
        attention: SDPA policy (:data:`anyflow.ops.SDPA_POLICIES`) active during the session's forwards;
            ``None`` leaves the process policy alone.

    Attributes:
        runner: the :class:`~anyflow.models.far.FARRunner`; cache: its :class:`~anyflow.models.far.FARKVCache`
            (model dtype, batch of ``text``); nfe, cache_steps, graph_replays: counters; backend: the model's
            :func:`anyflow.enable` backend, entered around its steps (``None``: :class:`anyflow.ops.backend`'s).

    Raises:
        TypeError / ValueError: a bad chunk partition.
    """

    def __init__(self, model, text: TextContext, chunk_partition: Sequence[int], latent_hw,
                 cuda_graphs: bool = False, attention: Optional[str] = None):
        self.model = model
        self.text = text
        self.backend = getattr(model, "_anyflow_backend", None)
        self.runner = FARRunner(model, chunk_partition, latent_hw)
        self.cp = self.runner.cp
        self.cache = self.runner.new_cache(text.tokens.shape[0], model.dtype, text.tokens.device)
        self.nfe = 0
        self.cache_steps = 0
        self.cuda_graphs = cuda_graphs
        self.attention = attention
        self.graph_replays = 0
        self.graph_pool = graphs.new_pool(text.tokens.device, cuda_graphs)

    def chunk_frames(self, k: int) -> tuple[int, int]:
        """Absolute latent frames ``[f0, f1)`` of chunk ``k``."""
        return self.runner.chunk_frames(k)

    def velocity(self, k: int, z: torch.Tensor, t: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
        """One NFE on chunk ``k``: ``z`` ``[B', F_k, C, H, W]`` (model dtype), per-frame ``t``, ``r`` ``[B', F_k]``
        in [0, 1000] -> mean velocity ``[B', F_k, C, H, W]``.

        Writes the chunk's keys/values into the cache at the current offset (the same slots at every
        step of the chunk) and reads nothing but its arguments, the cache and the prompt context, so
        it can be captured as a CUDA graph per chunk. The caller counts the NFE.
        """
        with ops.sdpa_policy(self.attention), ops.backend(self.backend):
            return self.runner.step(k, z, t, r, self.text, self.cache)

    def cache_step(self, k: int, latents: torch.Tensor) -> None:
        """Make chunks ``0..k`` context; ``latents`` ``[B', >= f1, C, H, W]`` holds their final values."""
        self.cache_steps += 1
        with ops.sdpa_policy(self.attention), ops.backend(self.backend):
            self.runner.cache_step(k, latents, self.text, self.cache)


def sample_chunk(
    session: FARSession,
    k: int,
    noise: torch.Tensor,
    pairs: Sequence[tuple[float, float]],
    *,
    guidance_scale: float = 1.0,
    use_mean_velocity: bool = True,
    on_step: Optional[Callable[[int, float, torch.Tensor], Optional[torch.Tensor]]] = None,
) -> torch.Tensor:
    """Run the flow-map jumps ``pairs`` (t, r in [0, 1000]) on chunk ``k`` from ``noise`` ``[B, F_k, C, H, W]``.

    The latent is an fp32 master copy; the model sees it in its own dtype. With classifier-free
    guidance the model batch is ``[uncond; cond]`` (the session's text batch is 2B).
    ``on_step(i, t, latents)`` may return replacement latents (diffusers callback semantics).

    Returns:
        ``[B, F_k, C, H, W]`` fp32 clean chunk latents.
    """
    b, f = noise.shape[:2]
    cfg = session.text.tokens.shape[0] == 2 * b
    dtype = session.model.dtype
    step = graphs.StepGraph(lambda x, tt, rr: session.velocity(k, x, tt, rr), noise.device,
                            enabled=session.cuda_graphs, pool=session.graph_pool)

    def velocity(i, z, t, r):
        x = z.to(dtype)
        if cfg:
            x = torch.cat([x, x])
        tt = torch.full((x.shape[0], f), t, dtype=torch.float64, device=x.device)
        return step(x, tt, torch.full_like(tt, r) if use_mean_velocity else tt)

    with ops.backend(session.backend):
        run = flow_map_jumps(velocity, noise, pairs, guidance_scale=guidance_scale, on_step=on_step)
    session.nfe += run.nfe
    session.graph_replays += step.replays
    return run.latents


def generate(
    session: FARSession,
    noise: torch.Tensor,
    pairs: Sequence[tuple[float, float]],
    *,
    context: Optional[torch.Tensor] = None,
    guidance_scale: float = 1.0,
    use_mean_velocity: bool = True,
    on_step=None,
) -> Iterator[tuple[int, torch.Tensor]]:
    """Yield ``(chunk_index, latents [B, F_total, C, H, W] fp32)`` after every chunk is final.

    Args:
        noise: ``[B, F_total, C, H, W]`` initial noise of the whole video (chunk k uses its frames).
        pairs: the (t, r) jumps of every chunk, in [0, 1000] (:func:`anyflow.samplers.schedule.time_pairs`).
        context: optional ``[B, T, C, H, W]`` clean latents of the first T frames (I2V: T = 1, V2V);
            the chunks they touch are not sampled (frames of such a chunk beyond T stay zero, as in
            the official pipeline).
        on_step: ``on_step(chunk, i, t, latents)`` per jump; may return replacement latents.

    Raises:
        ValueError: the chunk partition does not sum to the noise's frame count; context longer
            than the video.
    """
    cp = session.cp
    b, f_total = noise.shape[:2]
    session.runner.check_num_frames(f_total)
    out = torch.zeros(noise.shape, dtype=torch.float32, device=noise.device)
    n_ctx = 0
    if context is not None:
        if context.shape[1] > f_total:
            raise ValueError(f"context has {context.shape[1]} latent frames but the video has {f_total}")
        out[:, : context.shape[1]] = context.float()
        n_ctx = next(i + 1 for i in range(len(cp)) if sum(cp[: i + 1]) >= context.shape[1])
    cfg = session.text.tokens.shape[0] == 2 * b
    dtype = session.model.dtype
    for k in range(len(cp)):
        f0, f1 = session.chunk_frames(k)
        if k >= n_ctx:
            step_cb = None if on_step is None else (lambda i, t, z, _k=k: on_step(_k, i, t, z))
            out[:, f0:f1] = sample_chunk(
                session, k, noise[:, f0:f1], pairs, guidance_scale=guidance_scale,
                use_mean_velocity=use_mean_velocity, on_step=step_cb,
            )
        if k < len(cp) - 1:
            prefix = out[:, :f1].to(dtype)
            session.cache_step(k, torch.cat([prefix, prefix]) if cfg else prefix)
        yield k, out
