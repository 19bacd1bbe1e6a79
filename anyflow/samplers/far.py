"""FAR sampler core: chunk-by-chunk flow-map sampling over a :class:`FARKVCache`.

Per chunk k (AnyFlow FAR inference, reference spec §5.3): N flow-map jumps on the chunk alone, each
one NFE attending to [compressed cache | full cache | current chunk] without a mask; then, unless it is
the last chunk, a *cache step* that encodes the finished prefix at t = r = 0 with the chunk-causal mask:
the last ``full_chunk_limit - 1`` chunks at full resolution, older chunks compressed.

What the cache step skips, and why that is exact: a compressed chunk attends only to compressed chunks
up to itself (chunk-causal, and every full chunk comes later), so its keys/values in every layer never
change once it is compressed. Each cache step therefore *appends* the chunk that just became compressed
(one forward of its compressed tokens over the cached compressed prefix) and keeps the older ones. The
full-resolution chunks must be re-encoded every time: they attend to the compressed prefix, which has
just grown, and the most recent one has never been encoded. Nothing else is skipped.
"""

from __future__ import annotations

from typing import Callable, Iterator, Optional, Sequence

import torch

from .. import ops
from ..models import fused, offload
from . import graphs
from .kv_cache import FARKVCache, kv_capacity


class FARSession:
    """State of one FAR generation: model, prompt context, geometry, KV cache.

    Args:
        model: a diffusers ``AnyFlowFARTransformer3DModel`` (enabled or not; its parameters are read).
        text: :class:`anyflow.models.fused.TextContext` for the model batch (2B with CFG).
        chunk_partition: latent frames per chunk.
        latent_hw: latent (height, width).
        backend: op backend.
        cuda_graphs: capture each chunk's per-step forward as a CUDA graph (:mod:`.graphs`; CUDA,
            inference only, otherwise eager).
        attention: SDPA policy (:data:`anyflow.ops.SDPA_POLICIES`) active during the session's forwards;
            ``None`` leaves the process policy alone.
    """

    def __init__(self, model, text: fused.TextContext, chunk_partition: Sequence[int], latent_hw, backend=None,
                 cuda_graphs: bool = False, attention: Optional[str] = None):
        self.model = model
        self.text = text
        self.cp = fused.check_chunk_partition(chunk_partition)
        self.geo = fused.far_geometry(model, *latent_hw)
        self.latent_hw = tuple(latent_hw)
        self.backend = backend
        self.limit = model.config.full_chunk_limit
        cfg = model.config
        batch = text.tokens.shape[0]
        cap = kv_capacity(self.cp, self.limit, self.geo.full_tpf, self.geo.compressed_tpf)
        self.nfe = 0
        self.cache_steps = 0
        self.cuda_graphs = cuda_graphs
        self.attention = attention
        self.graph_replays = 0
        self.graph_pool = graphs.new_pool(text.tokens.device, cuda_graphs)
        self.cache = FARKVCache(
            cfg.num_layers, batch, cfg.num_attention_heads, cfg.attention_head_dim, cap,
            model.dtype, text.tokens.device,
        )

    def chunk_frames(self, k: int) -> tuple[int, int]:
        return sum(self.cp[:k]), sum(self.cp[: k + 1])

    # -- inference NFE ------------------------------------------------------------------------
    def _attend_current(self, cos, sin):
        cache, backend = self.cache, self.backend

        def fn(layer, attn, q, k, v):
            start = cache.num_cached
            kr = fused.norm_rope(attn, k, "k", cos, sin, backend)
            cache.write(layer, start, kr, v)
            qr = fused.norm_rope(attn, q, "q", cos, sin, backend).transpose(1, 2)
            keys, values = cache.segments(layer, start + k.shape[1])
            return ops.segmented_attention(qr, keys, values, backend=backend).transpose(1, 2).flatten(2)

        return fn

    def velocity(self, k: int, z: torch.Tensor, t: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
        """One NFE on chunk ``k``: ``z`` ``[B', F_k, C, H, W]`` (model dtype), per-frame ``t``, ``r`` ``[B', F_k]``.

        Writes the chunk's keys/values into the cache at the current offset (the same slots at every
        step of the chunk) and reads nothing but its arguments, the cache and the prompt context, so
        it can be captured as a CUDA graph per chunk. The caller counts the NFE.
        """
        f0, f1 = self.chunk_frames(k)
        cos, sin = fused.rope_for(self.model, f0, f1, self.geo.full_grid, False, z.device)
        with ops.sdpa_policy(self.attention):
            return fused.far_cached_step(self.model, z, t, r, self.text, self._attend_current(cos, sin), f0, self.backend)

    # -- cache step ---------------------------------------------------------------------------
    def _encode(self, x, rows, segs, cos, sin, start, layout):
        """Run the blocks on ``x`` (clean tokens, t = r = 0), writing their K/V at ``start``."""
        cache, backend = self.cache, self.backend

        def fn(layer, attn, q, k, v):
            kr = fused.norm_rope(attn, k, "k", cos, sin, backend)
            cache.write(layer, start, kr, v)
            qr = fused.norm_rope(attn, q, "q", cos, sin, backend).transpose(1, 2)
            end = start + k.shape[1]
            o = ops.chunk_causal_attention(qr, cache.k[layer, :, :, :end], cache.v[layer, :, :, :end], layout, backend=backend)
            return o.transpose(1, 2).flatten(2)

        fused.run_blocks(self.model, x, self.text, rows, segs, fn, backend)

    def _zero_rows(self, b, n, device):
        zeros = torch.zeros(b, n, dtype=torch.float64, device=device)
        return fused.time_rows(self.model, zeros, zeros, self.text.raw_dtype, self.backend)[1]

    def cache_step(self, k: int, latents: torch.Tensor) -> None:
        """Make chunks ``0..k`` context; ``latents`` ``[B', >= f1, C, H, W]`` holds their final values."""
        with ops.sdpa_policy(self.attention), offload.model_onloaded(self.model):
            self._cache_step(k, latents)

    def _cache_step(self, k: int, latents: torch.Tensor) -> None:
        model, geo, cache = self.model, self.geo, self.cache
        self.cache_steps += 1
        nc, _ = fused.split_chunks(k + 1, self.limit - 1)
        b, dev = latents.shape[0], latents.device
        while cache.num_compressed_chunks < nc:
            j = cache.num_compressed_chunks
            f0, f1 = self.chunk_frames(j)
            x = fused.patchify(model.far_patch_embedding, latents[:, f0:f1])
            cos, sin = fused.rope_for(model, f0, f1, geo.compressed_grid, True, dev)
            start = cache.num_compressed
            layout = ops.chunk_causal_layout([x.shape[1]], kv_offset=start)
            self._encode(x, self._zero_rows(b, f1 - f0, dev), ((f1 - f0, geo.compressed_tpf),), cos, sin, start, layout)
            cache.num_compressed += x.shape[1]
            cache.num_compressed_chunks += 1
        f0, f1 = sum(self.cp[:nc]), sum(self.cp[: k + 1])
        x = fused.patchify(model.patch_embedding, latents[:, f0:f1])
        cos, sin = fused.rope_for(model, f0, f1, geo.full_grid, False, dev)
        layout = ops.chunk_causal_layout([c * geo.full_tpf for c in self.cp[nc : k + 1]], kv_offset=cache.num_compressed)
        self._encode(x, self._zero_rows(b, f1 - f0, dev), ((f1 - f0, geo.full_tpf),), cos, sin, cache.num_compressed, layout)
        cache.num_full = x.shape[1]


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
    """Run the flow-map jumps ``pairs`` on chunk ``k`` from ``noise`` ``[B, F_k, C, H, W]``.

    The latent is an fp32 master copy; the model sees it in its own dtype. With classifier-free
    guidance the model batch is ``[uncond; cond]`` (the session's text batch is 2B).
    ``on_step(i, t, latents)`` may return replacement latents (diffusers callback semantics).

    Returns:
        ``[B, F_k, C, H, W]`` fp32 clean chunk latents.
    """
    z = noise.float()
    b, f = z.shape[:2]
    cfg = session.text.tokens.shape[0] == 2 * b
    dtype = session.model.dtype
    step = graphs.StepGraph(lambda x, tt, rr: session.velocity(k, x, tt, rr), z.device,
                            enabled=session.cuda_graphs, pool=session.graph_pool)
    for i, (t, r) in enumerate(pairs):
        if t == r:
            continue
        x = z.to(dtype)
        if cfg:
            x = torch.cat([x, x])
        tt = torch.full((x.shape[0], f), t, dtype=torch.float64, device=x.device)
        rr = torch.full_like(tt, r) if use_mean_velocity else tt
        u = step(x, tt, rr)
        session.nfe += 1
        z = ops.euler_shortcut(z, u, t, r, guidance_scale=guidance_scale, backend=session.backend)
        if on_step is not None:
            new = on_step(i, t, z)
            if new is not None:
                z = new.float()
    session.graph_replays += step.replays
    return z


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
    fused.check_chunk_partition(cp, f_total)
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
