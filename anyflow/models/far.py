"""FAR (causal AnyFlow): chunk geometry, the full-sequence forward, and :class:`FARRunner`, the one FAR engine.

A *chunk partition* cuts the video into chunks (latent frames per chunk, e.g. ``[1,3,3,3,3,3,3,2]``). Over a
prefix of K chunks the last ``min(K, limit)`` are *full* (``patch_embedding``) and older ones *compressed*
(``far_patch_embedding``, RoPE on the coarser grid). The sampler, the on-policy rollout and the enabled
diffusers forward all step through :class:`FARRunner`, each with its attention state: the live
:class:`FARKVCache`, a gradient-keeping :class:`KVSnapshot`, or diffusers' dict cache (:class:`DiffusersKVCache`).
Source: ``far/models/transformer_far_wan_model.py`` of NVlabs/AnyFlow (``_forward_train``, ``_forward_cache``,
``_forward_inference``, the compressed / full RoPE tables). Latents ``[B, F, C, H, W]``, timesteps ``[B, F]``
in [0, 1000], cached keys/values ``[B, H, L, Dh]``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch

from .. import ops, parallel
from . import blocks
from .blocks import SelfAttention, as_text, check_latents, frame_times, head, onloaded, patchify, unpatchify


# ----------------------------------------------------------------------------------------------
# geometry
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class FARGeometry:
    """Token grids of a FAR model at one latent resolution: ``full_grid`` / ``compressed_grid`` are the
    (rows, columns) of tokens per frame with the full / compressed patch; ``*_tpf`` their tokens per frame."""

    full_grid: tuple[int, int]
    compressed_grid: tuple[int, int]

    @property
    def full_tpf(self) -> int:
        return self.full_grid[0] * self.full_grid[1]

    @property
    def compressed_tpf(self) -> int:
        return self.compressed_grid[0] * self.compressed_grid[1]


def far_geometry(model, height: int, width: int) -> FARGeometry:
    """:class:`FARGeometry` of ``model`` at latent ``height`` x ``width`` (``patch_size`` and
    ``compressed_patch_size`` of its config)."""
    cfg = model.config
    ps, cps = cfg.patch_size, cfg.compressed_patch_size
    return FARGeometry((height // ps[1], width // ps[2]), (height // cps[1], width // cps[2]))


def check_chunk_partition(chunk_partition, num_frames: Optional[int] = None, arg: str = "chunk_partition"):
    """Validate a chunk partition; returns it as a list of ints.

    Raises:
        TypeError: not a sequence of ints.
        ValueError: empty, a chunk < 1, or (``num_frames`` given) a sum other than ``num_frames``.
    """
    try:
        cp = [int(c) for c in chunk_partition]
    except (TypeError, ValueError):
        raise TypeError(f"{arg} must be a sequence of positive ints, got {chunk_partition!r}") from None
    if not cp or any(c <= 0 for c in cp):
        raise ValueError(f"{arg} must be a non-empty sequence of positive ints, got {cp}")
    if num_frames is not None and sum(cp) != num_frames:
        raise ValueError(f"{arg}={cp} sums to {sum(cp)} but there are {num_frames} latent frames")
    return cp


def split_chunks(num_chunks: int, limit: int) -> tuple[int, int]:
    """(compressed, full) chunk counts of a ``num_chunks`` prefix when at most ``limit`` trailing chunks are full."""
    full = min(num_chunks, max(limit, 0))
    return num_chunks - full, full


def kv_capacity(chunk_partition: Sequence[int], full_chunk_limit: int, full_tpf: int, compressed_tpf: int) -> int:
    """Largest token count the cache must hold over a whole FAR video (inference NFEs and cache steps)."""
    cp = list(chunk_partition)
    need = 0
    for k in range(len(cp)):
        nc, nf = split_chunks(k + 1, full_chunk_limit)  # inference NFE of chunk k: cache + current
        need = max(need, sum(cp[:nc]) * compressed_tpf + sum(cp[nc : nc + nf]) * full_tpf)
        nc, nf = split_chunks(k + 1, full_chunk_limit - 1)  # cache step after chunk k
        need = max(need, sum(cp[:nc]) * compressed_tpf + sum(cp[nc : k + 1]) * full_tpf)
    return need


# ----------------------------------------------------------------------------------------------
# full-sequence forward (training, diffusers' cache step)
# ----------------------------------------------------------------------------------------------
@onloaded
def far_sequence_forward(
    model,
    hidden_states,
    chunk_partition,
    timestep,
    r_timestep,
    encoder_hidden_states,
    *,
    full_limit: int,
    encoder_hidden_states_image=None,
    clean_hidden_states=None,
    clean_timestep=None,
    on_kv=None,
    with_head: bool = True,
):
    """FAR forward over ``[compressed chunks | full chunks (| clean copies)]`` with the chunk-causal mask.

    The official ``_forward_train`` (``full_limit = full_chunk_limit``, clean copies of the full chunks) and
    ``_forward_cache`` (``full_limit = full_chunk_limit - 1``, ``with_head=False``, ``on_kv`` storing the
    keys) of ``far/models/transformer_far_wan_model.py``; the mask is built as range tables
    (:func:`anyflow.ops.far_attention_layout`), without padding.

    Args:
        hidden_states: ``[B, F, C, H, W]`` latents of all chunks of ``chunk_partition`` (sum = F).
        timestep, r_timestep: per frame ``[B, F]`` (or scalar / ``[B]``) in [0, 1000].
        encoder_hidden_states: ``[B, L, text_dim]`` or a :class:`~anyflow.models.blocks.TextContext`.
        full_limit: trailing chunks at full resolution; older chunks are compressed.
        clean_hidden_states, clean_timestep: ``[B, F_full, C, H, W]`` clean copies of the full chunks and
            their ``[B, F_full]`` time (0 in training).
        on_kv: ``on_kv(layer, attn, k_proj [B, N, H*Dh], k_rope [B, N, H, Dh], v [B, N, H, Dh])`` per layer.
        with_head: ``False`` skips the output head (a cache step needs only the keys/values).

    Returns:
        ``[B, F_full, C, H, W]`` velocity of the noisy full frames in the model dtype (``None`` without head).

    Raises:
        ValueError / TypeError: bad latents, chunk partition, timesteps or clean copies.
    """
    check_latents("hidden_states", hidden_states, model)
    b, f, _, hh, ww = hidden_states.shape
    cp = check_chunk_partition(chunk_partition, f)
    geo = far_geometry(model, hh, ww)
    dev = hidden_states.device
    nc_chunks, _ = split_chunks(len(cp), full_limit)
    nc_frames = sum(cp[:nc_chunks])
    nf_frames = f - nc_frames
    text = as_text(model, encoder_hidden_states, encoder_hidden_states_image)
    t = frame_times("timestep", timestep, b, f, dev)
    r = frame_times("r_timestep", r_timestep, b, f, dev)
    delta = ops.delta_time(t, r, model.condition_embedder.deltatime_type)
    t_rows = [t[:, :nc_frames], t[:, nc_frames:]]
    d_rows = [delta[:, :nc_frames], delta[:, nc_frames:]]
    segs = [(nc_frames, geo.compressed_tpf), (nf_frames, geo.full_tpf)]
    ropes = [
        blocks.rope_for(model, 0, nc_frames, geo.compressed_grid, True, dev),
        blocks.rope_for(model, nc_frames, f, geo.full_grid, False, dev),
    ]
    x = [patchify(model.far_patch_embedding, hidden_states[:, :nc_frames])] if nc_frames else []
    x.append(patchify(model.patch_embedding, hidden_states[:, nc_frames:]))
    if clean_hidden_states is not None:
        check_latents("clean_hidden_states", clean_hidden_states, model)
        if clean_hidden_states.shape[:2] != (b, nf_frames) or clean_hidden_states.shape[3:] != (hh, ww):
            raise ValueError(
                f"clean_hidden_states must be [B, F_full, C, H, W] = [{b}, {nf_frames}, C, {hh}, {ww}], "
                f"got {tuple(clean_hidden_states.shape)}"
            )
        if clean_timestep is None:
            raise ValueError("clean_timestep is required with clean_hidden_states")
        ct = frame_times("clean_timestep", clean_timestep, b, nf_frames, dev)
        t_rows.append(ct)
        d_rows.append(ct)  # diffusers embeds the clean copy with (t, delta) = (c, c) for both deltatime types
        segs.append((nf_frames, geo.full_tpf))
        ropes.append(ropes[-1])
        x.append(patchify(model.patch_embedding, clean_hidden_states))
    e_rows, m_rows = blocks.time_rows(model, torch.cat(t_rows, 1), torch.cat(d_rows, 1), text.raw_dtype)
    cos, sin = blocks.cat_rope(ropes)
    x = torch.cat(x, dim=1) if len(x) > 1 else x[0]
    layout = ops.far_attention_layout(
        cp, nc_chunks, geo.full_tpf, geo.compressed_tpf, clean_copy=clean_hidden_states is not None
    )
    segs = tuple(segs)
    shard = blocks.split_sequence(model, segs)  # Ulysses context parallelism: this rank's tokens
    if shard is not None and on_kv is not None:
        raise NotImplementedError("on_kv (diffusers' dict KV cache) is not supported under context parallelism")
    x, (m_rows,), cos, sin = blocks.shard_inputs(shard, x, (m_rows,), cos, sin)
    # chunk-causal; under Ulysses the attention sees all tokens of this rank's heads (``layout`` indexes them all)
    attend = blocks.rotary_attention(cos, sin, lambda layer, q, k, v: ops.chunk_causal_attention(q, k, v, layout),
                                     shard=shard, on_kv=on_kv)
    x = blocks.run_blocks(model, x, text, m_rows, segs if shard is None else shard.segments, attend)
    if not with_head:
        return None
    n_ctx = nc_frames * geo.compressed_tpf
    if shard is None:
        x = x[:, n_ctx : n_ctx + nf_frames * geo.full_tpf]
        out = head(model, x, e_rows[:, nc_frames : nc_frames + nf_frames], ((nf_frames, geo.full_tpf),))
    else:  # the head on this rank's tokens, as every per-token op: a parameter's gradient is counted once over ranks
        out = shard.gather(head(model, x, shard.take_rows(e_rows), shard.segments))
        out = out[:, n_ctx : n_ctx + nf_frames * geo.full_tpf].contiguous()
    return unpatchify(model, out, nf_frames, hh, ww)


# ----------------------------------------------------------------------------------------------
# attention states of the runner: step_attention(runner, k, cos, sin, shard), cache_step(runner, k, latents, text)
# ----------------------------------------------------------------------------------------------
class FARKVCache:
    """The live KV cache: preallocated, post-RoPE keys, one ``[compressed | full | current]`` buffer per layer.

    An NFE writes the current chunk right after the cached context and attends to one strided view (no
    ``torch.cat``). Keys are stored rotated: a cached token's position never changes (the official code
    stores pre-RoPE keys and re-rotates the whole cache in float64 at every NFE). The cache step *appends*
    the chunk that has just become compressed and re-encodes only the full chunks; exact, because a
    compressed chunk attends only to compressed chunks up to itself, so its keys/values never change.

    Args:
        num_layers, batch (2B with CFG), heads, head_dim: the shape; capacity: tokens per layer
            (:func:`kv_capacity`); dtype, device: storage (the model's compute dtype).

    Attributes:
        k, v: ``[num_layers, batch, heads, capacity, head_dim]``.
        num_compressed, num_full: tokens of cached compressed / full context.
        num_compressed_chunks: chunks held in compressed form (final once written).
    """

    def __init__(self, num_layers, batch, heads, head_dim, capacity, dtype, device):
        shape = (num_layers, batch, heads, capacity, head_dim)
        self.k = torch.empty(shape, dtype=dtype, device=device)
        self.v = torch.empty(shape, dtype=dtype, device=device)
        self.capacity = capacity
        self.num_compressed = self.num_full = self.num_compressed_chunks = 0

    @property
    def num_cached(self) -> int:
        return self.num_compressed + self.num_full

    def write(self, layer: int, start: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store ``[B, L, H, Dh]`` keys (post-RoPE) and values at tokens ``[start, start + L)``;
        ``ValueError`` past ``capacity``."""
        end = start + k.shape[1]
        if end > self.capacity:
            raise ValueError(f"KV cache overflow: writing tokens up to {end} but capacity is {self.capacity}")
        self.k[layer, :, :, start:end] = k.transpose(1, 2)
        self.v[layer, :, :, start:end] = v.transpose(1, 2)

    def segments(self, layer: int, end: int):
        """Key/value views ``[B, H, L, Dh]`` of the regions in ``[0, end)``: compressed, full, rest."""
        bounds = [0, self.num_compressed, self.num_cached, end]
        ks = [self.k[layer, :, :, a:b] for a, b in zip(bounds, bounds[1:]) if b > a]
        vs = [self.v[layer, :, :, a:b] for a, b in zip(bounds, bounds[1:]) if b > a]
        return ks, vs

    def snapshot(self) -> "KVSnapshot":
        """Copies of the cached prefix ``[0, num_cached)`` of every layer."""
        n = self.num_cached
        return KVSnapshot([(self.k[i, :, :, :n].clone(), self.v[i, :, :, :n].clone()) for i in range(self.k.shape[0])])

    def _writing(self, cos, sin, start: int, attend, shard=None) -> SelfAttention:
        """Self-attention that writes the tokens' K/V at ``start``, then ``attend(layer, q [B, H, L, Dh], end)``;
        under Ulysses (``shard``) this rank's heads of all tokens are written and attended."""

        def write_attend(layer, q, k, v):
            self.write(layer, start, k.transpose(1, 2), v.transpose(1, 2))
            return attend(layer, q, start + k.shape[2])

        return blocks.rotary_attention(cos, sin, write_attend, shard=shard)

    def step_attention(self, runner: "FARRunner", k: int, cos, sin, shard) -> SelfAttention:
        def attend(layer, q, end):
            return ops.segmented_attention(q, *self.segments(layer, end))

        return self._writing(cos, sin, self.num_cached, attend, shard)

    def cache_step(self, runner: "FARRunner", k: int, latents: torch.Tensor, text: blocks.TextContext) -> None:
        nc, _ = split_chunks(k + 1, runner.limit - 1)
        while self.num_compressed_chunks < nc:
            self.num_compressed += self._encode(runner, self.num_compressed_chunks, self.num_compressed_chunks + 1,
                                                True, latents, text)
            self.num_compressed_chunks += 1
        self.num_full = self._encode(runner, nc, k + 1, False, latents, text)

    def _encode(self, runner, c0: int, c1: int, compressed: bool, latents, text) -> int:
        """Encode chunks ``[c0, c1)`` at t = r = 0 right after the compressed prefix, chunk-causally over
        everything before them; returns their token count."""
        model, start = runner.model, self.num_compressed
        f0, f1 = sum(runner.cp[:c0]), sum(runner.cp[:c1])
        x = patchify(model.far_patch_embedding if compressed else model.patch_embedding, latents[:, f0:f1])
        tpf = runner.geo.compressed_tpf if compressed else runner.geo.full_tpf
        layout = ops.chunk_causal_layout([c * tpf for c in runner.cp[c0:c1]], kv_offset=start)
        zeros = torch.zeros(x.shape[0], f1 - f0, dtype=torch.float64, device=x.device)
        m_rows = blocks.time_rows(model, zeros, zeros, text.raw_dtype)[1]
        segs = ((f1 - f0, tpf),)
        shard = blocks.split_sequence(model, segs)  # Ulysses: this rank's tokens, all tokens of its heads cached
        cos, sin = runner.rope(f0, f1, x.device, compressed)
        x, (m_rows,), cos, sin = blocks.shard_inputs(shard, x, (m_rows,), cos, sin)

        def attend(layer, q, end):
            return ops.chunk_causal_attention(q, self.k[layer, :, :, :end], self.v[layer, :, :, :end], layout)

        attention = self._writing(cos, sin, start, attend, shard)
        blocks.run_blocks(model, x, text, m_rows, segs if shard is None else shard.segments, attention)
        return (f1 - f0) * tpf


def _over_cache(cos, sin, cached, shard=None) -> SelfAttention:
    """Self-attention of the current tokens over ``cached(layer) -> (keys, values)`` (lists of
    ``[B, H, L, Dh]``, rotated) and themselves, without mask; nothing is written. Under Ulysses (``shard``) the
    current tokens are this rank's and ``cached`` holds this rank's heads."""

    def attend(layer, q, k, v):
        keys, values = cached(layer)
        return ops.segmented_attention(q, [c.to(q.dtype) for c in keys] + [k], [c.to(q.dtype) for c in values] + [v])

    return blocks.rotary_attention(cos, sin, attend, shard=shard)


@dataclass
class KVSnapshot:
    """Gradient-keeping state: per layer ``(keys, values)`` ``[B, H, L_cached, Dh]`` copies of the cache
    (:meth:`FARKVCache.snapshot`). The backward, and the recompute of checkpointed blocks, then see the
    cache of the forward although later cache steps overwrite it. Read-only; one serves a whole chunk."""

    layers: list

    def step_attention(self, runner: "FARRunner", k: int, cos, sin, shard) -> SelfAttention:
        cached = lambda layer: [[t] if t.shape[2] else [] for t in self.layers[layer]]  # noqa: E731
        return _over_cache(cos, sin, cached, shard)

    def cache_step(self, runner, k, latents, text) -> None:
        raise TypeError("a KVSnapshot is read-only: run the cache step on the FARKVCache it was taken from")


def _no_context_parallel(runner) -> None:
    if parallel.context_parallel_of(runner.model) is not None:
        raise NotImplementedError(
            "diffusers' dict KV cache holds every head on every rank, which anyflow's context parallelism does not "
            "fill: enable the AnyFlowFARPipeline (anyflow.enable(pipe, context_parallel=...)), whose sampler keeps "
            "heads / N per rank, or use anyflow.parallel.apply_context_parallel without enable"
        )


@dataclass
class DiffusersKVCache:
    """diffusers' dict KV cache: ``kv_cache[layer] = {"compressed_cache", "full_cache"}``, each
    ``[2, B, H, L, Dh]`` (keys, values), keys post-norm and *pre*-RoPE (so diffusers and anyflow can share it).

    The NFE of chunk k (``num_cached_chunks`` must be k) rotates the cached keys on the fly and attends to
    ``[compressed | full | current]`` without concatenation and without the zero padding of diffusers 0.42.1.
    The cache step re-encodes every chunk it is given (:func:`far_sequence_forward`) at ``timestep`` /
    ``r_timestep`` (diffusers' callers pass zeros) and stores their keys/values.
    """

    kv_cache: Any
    num_cached_chunks: int = 0
    timestep: Any = 0.0
    r_timestep: Any = 0.0

    def step_attention(self, runner: "FARRunner", k: int, cos, sin, shard) -> SelfAttention:
        _no_context_parallel(runner)
        if k != self.num_cached_chunks:
            raise ValueError(f"chunk_partition has {k + 1} chunks but the cache holds {self.num_cached_chunks} "
                             "(expected one more chunk)")
        dev = cos.device
        n_cc, n_cf = runner.context_tokens(k - 1) if k else (0, 0)
        nc_frames = sum(runner.cp[: split_chunks(k + 1, runner.limit)[0]])
        rope_c, rope_f = runner.rope(0, nc_frames, dev, True), runner.rope(nc_frames, sum(runner.cp[:k]), dev)

        def cached(layer):
            comp, full = self.kv_cache[layer]["compressed_cache"], self.kv_cache[layer]["full_cache"]
            rotated = [ops.apply_rope(key.transpose(1, 2), *rope).transpose(1, 2)
                       for key, rope in ((comp[0, :, :, :n_cc], rope_c), (full[0, :, :, :n_cf], rope_f))]
            return rotated, [comp[1, :, :, :n_cc], full[1, :, :, :n_cf]]

        return _over_cache(cos, sin, cached)

    def cache_step(self, runner: "FARRunner", k: int, latents: torch.Tensor, text: blocks.TextContext) -> None:
        _no_context_parallel(runner)
        n = runner.context_tokens(k)[0]

        def on_kv(layer, attn, k_proj, k_rot, v):
            comp, full = self.kv_cache[layer]["compressed_cache"], self.kv_cache[layer]["full_cache"]
            k_pre = attn.norm_k(k_proj).to(k_proj.dtype).unflatten(2, (attn.heads, -1)).transpose(1, 2)
            v = v.transpose(1, 2)
            m = k_pre.shape[2] - n
            comp[0, :, :, :n], comp[1, :, :, :n], full[0, :, :, :m], full[1, :, :, :m] = (
                k_pre[:, :, :n], v[:, :, :n], k_pre[:, :, n:], v[:, :, n:])

        far_sequence_forward(runner.model, latents, runner.cp[: k + 1], self.timestep, self.r_timestep, text,
                             full_limit=runner.limit - 1, on_kv=on_kv, with_head=False)


# ----------------------------------------------------------------------------------------------
# the runner
# ----------------------------------------------------------------------------------------------
class FARRunner:
    """One FAR model at one latent resolution and chunk partition: geometry, RoPE tables, NFEs, cache steps.

    Per chunk k (official ``FARWanAnyFlowPipeline.inference`` and its cache step,
    ``far/pipelines/pipeline_far_wan_anyflow.py``): every NFE (:meth:`step`, the model's
    ``_forward_inference``) attends without mask to ``[compressed context | full context | current chunk]``;
    then :meth:`cache_step` (``_forward_cache``) encodes chunks ``0..k`` at t = r = 0 chunk-causally, the last
    ``full_chunk_limit - 1`` at full resolution. The attention state (:class:`FARKVCache`,
    :class:`KVSnapshot`, :class:`DiffusersKVCache`) holds the keys/values.

    Args:
        model: a diffusers ``AnyFlowFARTransformer3DModel`` (enabled or not; its parameters are read).
        chunk_partition: latent frames per chunk; latent_hw: latent (height, width).

    Raises:
        TypeError / ValueError: a chunk partition that is not a non-empty sequence of positive ints.
    """

    def __init__(self, model, chunk_partition: Sequence[int], latent_hw):
        self.model = model
        self.cp = check_chunk_partition(chunk_partition)
        self.latent_hw = (int(latent_hw[0]), int(latent_hw[1]))
        self.geo = far_geometry(model, *self.latent_hw)
        self.limit = model.config.full_chunk_limit

    def chunk_frames(self, k: int) -> tuple[int, int]:
        """Absolute latent frames ``[f0, f1)`` of chunk ``k``."""
        return sum(self.cp[:k]), sum(self.cp[: k + 1])

    def check_num_frames(self, num_frames: int) -> None:
        """``ValueError`` unless the chunk partition sums to ``num_frames``."""
        check_chunk_partition(self.cp, num_frames)

    def context_tokens(self, k: int) -> tuple[int, int]:
        """(compressed, full) context tokens once chunks ``0..k`` are cached."""
        nc, _ = split_chunks(k + 1, self.limit - 1)
        return sum(self.cp[:nc]) * self.geo.compressed_tpf, sum(self.cp[nc : k + 1]) * self.geo.full_tpf

    def rope(self, f0: int, f1: int, device, compressed: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """fp32 ``(cos, sin)`` ``[tokens, Dh/2]`` of absolute frames ``[f0, f1)`` on the full or compressed grid."""
        grid = self.geo.compressed_grid if compressed else self.geo.full_grid
        return blocks.rope_for(self.model, f0, f1, grid, compressed, device)

    def new_cache(self, batch: int, dtype: torch.dtype, device) -> FARKVCache:
        """A :class:`FARKVCache` of ``batch`` rows large enough for the whole video (:func:`kv_capacity`)."""
        cfg = self.model.config
        cap = kv_capacity(self.cp, self.limit, self.geo.full_tpf, self.geo.compressed_tpf)
        heads = cfg.num_attention_heads  # under Ulysses a rank caches its heads / N of every token
        ulysses = parallel.context_parallel_of(self.model)
        heads = heads if ulysses is None else ulysses.local_heads(heads)
        return FARKVCache(cfg.num_layers, batch, heads, cfg.attention_head_dim, cap, dtype, device)

    def step(self, k: int, z: torch.Tensor, t, r, text, state) -> torch.Tensor:
        """One NFE of chunk ``k``: ``z`` ``[B, F_k, C, H, W]`` (compute dtype) at per-frame ``t``, ``r`` ``[B, F_k]``
        (or scalar / ``[B]``) in [0, 1000], ``text`` a TextContext or raw ``[B, L, text_dim]``, attending to
        ``state`` -> mean velocity u ``[B, F_k, C, H, W]`` (model dtype).

        Raises:
            ValueError: ``z`` is not chunk k at the runner's resolution; bad times; a
                :class:`DiffusersKVCache` that does not hold chunks ``0..k-1``.
        """
        return _step(self.model, self, k, z, t, r, text, state)

    def cache_step(self, k: int, latents: torch.Tensor, text, state) -> None:
        """Make chunks ``0..k`` context in ``state`` from their final ``latents`` ``[B, >= f1, C, H, W]`` (exactly
        their frames for a :class:`DiffusersKVCache`); run it under ``torch.no_grad()``. ``TypeError`` for a
        :class:`KVSnapshot`."""
        _cache_step(self.model, self, k, latents, text, state)


@onloaded
def _step(model, runner: FARRunner, k, z, t, r, text, state):
    check_latents("hidden_states", z, model)
    b, f, _, hh, ww = z.shape
    f0, f1 = runner.chunk_frames(k)
    if f != f1 - f0 or (hh, ww) != runner.latent_hw:
        raise ValueError(f"chunk {k} latents must be [B, {f1 - f0}, C, {runner.latent_hw[0]}, {runner.latent_hw[1]}], "
                         f"got {tuple(z.shape)}")
    text = as_text(model, text)
    t, r = frame_times("timestep", t, b, f, z.device), frame_times("r_timestep", r, b, f, z.device)
    delta = ops.delta_time(t, r, model.condition_embedder.deltatime_type)
    e_rows, m_rows = blocks.time_rows(model, t, delta, text.raw_dtype)
    segs = ((f, runner.geo.full_tpf),)
    shard = blocks.split_sequence(model, segs)  # Ulysses: this rank's tokens
    x, (m_rows, e_rows), cos, sin = blocks.shard_inputs(shard, patchify(model.patch_embedding, z), (m_rows, e_rows),
                                                        *runner.rope(f0, f1, z.device))
    attention = state.step_attention(runner, k, cos, sin, shard)
    segs = segs if shard is None else shard.segments
    x = blocks.run_blocks(model, x, text, m_rows, segs, attention)
    out = head(model, x, e_rows, segs)
    return unpatchify(model, out if shard is None else shard.gather(out), f, hh, ww)


@onloaded
def _cache_step(model, runner: FARRunner, k, latents, text, state):
    state.cache_step(runner, k, latents, as_text(model, text))
