"""Forward passes of the diffusers AnyFlow transformers routed through :mod:`anyflow.ops`.

These functions take an (unmodified) ``AnyFlowTransformer3DModel`` / ``AnyFlowFARTransformer3DModel``
instance and compute what its ``forward`` computes, reading the same parameters through the same
submodules (so LoRA / PEFT layers and offload hooks keep working), with these differences:

* per-frame conditioning: the time-pair embedding runs on ``B x F`` rows and the adaLN modulation,
  gates and output head index frames through a segment table (no ``[B, N, 6, d]`` tensor);
* RoPE in fp32 from cached tables instead of complex128 every layer;
* FAR attention from chunk-partition range tables (no dense or flex block mask, no zero padding);
* optional prompt-constant cross-attention K/V (:class:`TextContext`) computed once per prompt.

Under group offloading or sequential CPU offload (:mod:`.offload`) every forward fires the offload hooks
of the modules whose parameters it reads directly, runs block by block (each block's hooks around it),
and projects the text inside the forward, as diffusers does; the output is the same.

Tensor layouts follow diffusers: latents ``[B, F, C, H, W]`` (frames before channels), timesteps
``[B, F]`` per frame in [0, 1000], text ``[B, L_text, text_dim]``.
"""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass
from functools import lru_cache
from typing import Callable, Optional

import torch

from .. import ops
from . import offload

try:
    from torch.distributed.fsdp import FSDPModule
except ImportError:  # torch built without distributed
    FSDPModule = None

#: ``fn(layer, attn_module, q_proj [B, L, H*Dh], k_proj [B, L, H*Dh], v [B, L, H, Dh]) -> [B, L, H*Dh]``
SelfAttention = Callable[..., torch.Tensor]


# ----------------------------------------------------------------------------------------------
# shared pieces
# ----------------------------------------------------------------------------------------------
@dataclass
class TextContext:
    """Projected text tokens and, optionally, every block's cross-attention K/V for one prompt batch.

    Attributes:
        tokens: ``[B, L, d]`` output of ``condition_embedder.text_embedder`` (image tokens first when
            the model has an image embedder).
        raw_dtype: dtype of the raw text embedding (the time-pair embedding is cast to it, as diffusers).
        kv: per block ``(k, v)`` of ``[B, L, H, Dh]``, or ``None`` to compute them on the fly.
        image: raw image embedding of a not yet projected context.
        projected: ``False`` when ``tokens`` is the raw text embedding, to be projected inside each forward
            (what :func:`prepare_text` returns for an offloaded model, whose weights are only loaded there).
    """

    tokens: torch.Tensor
    raw_dtype: torch.dtype
    kv: Optional[list] = None
    image: Optional[torch.Tensor] = None
    projected: bool = True


def prepare_text(model, encoder_hidden_states, encoder_hidden_states_image=None, cache_kv: bool = False) -> TextContext:
    """Project the text once; with ``cache_kv`` also precompute each block's cross-attention K/V.

    On a model with offload hooks (:func:`anyflow.models.offload.is_offloaded`), called outside a forward,
    nothing is computed: the context keeps the raw embeddings and every forward projects them (and
    computes the K/V) while its weights are loaded.
    """
    if not torch.compiler.is_compiling() and not offload.in_scope(model) and offload.is_offloaded(model):
        return TextContext(encoder_hidden_states, encoder_hidden_states.dtype, image=encoder_hidden_states_image,
                           projected=False)
    ce = model.condition_embedder
    tokens = ce.text_embedder(encoder_hidden_states)
    if encoder_hidden_states_image is not None:
        if ce.image_embedder is None:
            raise ValueError("encoder_hidden_states_image was given but the model has no image embedder")
        tokens = torch.cat([ce.image_embedder(encoder_hidden_states_image), tokens], dim=1)
    kv = None
    if cache_kv:
        kv = []
        for block in model.blocks:
            attn = block.attn2
            k = attn.norm_k(attn.to_k(tokens)).unflatten(2, (attn.heads, -1))
            v = attn.to_v(tokens).unflatten(2, (attn.heads, -1))
            kv.append((k, v))
    return TextContext(tokens, encoder_hidden_states.dtype, kv)


def _as_text(model, text, image=None) -> TextContext:
    if isinstance(text, TextContext):
        return text if text.projected else prepare_text(model, text.tokens, text.image)
    return prepare_text(model, text, image)


def time_rows(model, t: torch.Tensor, delta: torch.Tensor, out_dtype: torch.dtype, backend=None):
    """Per-frame time-pair embedding of ``model``: ``t``, ``delta`` ``[B, R]`` -> e ``[B, R, d]``, m ``[B, R, 6, d]``."""
    ce = model.condition_embedder
    b, r = t.shape
    te, de = ce.time_embedder, ce.delta_embedder
    e, m = ops.time_pair_embedding(
        t.reshape(-1),
        delta.reshape(-1),
        (te.linear_1.weight, te.linear_1.bias, te.linear_2.weight, te.linear_2.bias),
        (de.linear_1.weight, de.linear_1.bias, de.linear_2.weight, de.linear_2.bias),
        (ce.time_proj.weight, ce.time_proj.bias),
        ce.delta_emb_gate,
        freq_dim=te.linear_1.in_features,
        out_dtype=out_dtype,
        backend=backend,
    )
    return e.unflatten(0, (b, r)), m.unflatten(0, (b, r)).unflatten(2, (6, -1))


@lru_cache(maxsize=64)
def _rope_cached(head_dim, f0, f1, h, w, downscale, device):
    angles = ops.rope_angles(head_dim, torch.arange(f0, f1, device=device), h, w, downscale)
    return ops.rope_table(angles)


def rope_for(model, f0: int, f1: int, grid_hw, compressed: bool, device) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 cos/sin ``[tokens, Dh/2]`` for absolute frames ``[f0, f1)`` of a full or compressed grid."""
    cfg = model.config
    downscale = 1
    if compressed:
        ps, cps = cfg.patch_size, cfg.compressed_patch_size
        if cps[0] != ps[0]:
            raise ValueError(f"temporal compression is not supported (patch {ps}, compressed patch {cps})")
        downscale = cps[1] // ps[1]
    args = (cfg.attention_head_dim, int(f0), int(f1), int(grid_hw[0]), int(grid_hw[1]), downscale, device)
    if torch.compiler.is_compiling():  # traced into the graph: the table becomes a constant computation
        return _rope_cached.__wrapped__(*args)
    return _rope_cached(*args)


def _cat_rope(parts):
    parts = [p for p in parts if p[0].shape[0] > 0]
    if len(parts) == 1:
        return parts[0]
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


def patchify(conv, latents: torch.Tensor) -> torch.Tensor:
    """``[B, F, C, H, W]`` -> ``[B, F*h*w, d]`` through the model's patch-embedding Conv3d."""
    return conv(latents.permute(0, 2, 1, 3, 4)).flatten(2).transpose(1, 2)


def unpatchify(model, tokens: torch.Tensor, num_frames: int, height: int, width: int) -> torch.Tensor:
    """``[B, F*h*w, p*p*C]`` -> ``[B, F, C, H, W]`` (channel fastest within a patch, as Wan)."""
    p = model.config.patch_size[1]
    b, _, ch = tokens.shape
    c = ch // (p * p)
    x = tokens.view(b * num_frames, height // p, width // p, p, p, c).permute(0, 5, 1, 3, 2, 4)
    return x.reshape(b, num_frames, c, height, width)


# ----------------------------------------------------------------------------------------------
# blocks
# ----------------------------------------------------------------------------------------------
def norm_rope(attn, x_proj, which: str, cos, sin, backend=None):
    """``norm_q`` / ``norm_k`` (RMSNorm across heads) + RoPE of a ``[B, L, H*Dh]`` projection -> ``[B, L, H, Dh]``."""
    norm = attn.norm_q if which == "q" else attn.norm_k
    weight = norm.weight if norm.weight is not None else torch.ones(x_proj.shape[-1], device=x_proj.device)
    return ops.qk_norm_rope(x_proj, weight, cos, sin, attn.heads, norm.eps, backend=backend)


def _cross_attention(attn, h, text: TextContext, layer: int):
    q = attn.norm_q(attn.to_q(h)).unflatten(2, (attn.heads, -1))
    if text.kv is not None:
        k, v = text.kv[layer]
    else:
        k = attn.norm_k(attn.to_k(text.tokens)).unflatten(2, (attn.heads, -1))
        v = attn.to_v(text.tokens).unflatten(2, (attn.heads, -1))
    o = ops.sdpa(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    o = o.transpose(1, 2).flatten(2).type_as(q)
    return attn.to_out[1](attn.to_out[0](o))


def block_forward(block, layer: int, x, h, text: TextContext, mod, next_mod, segments, self_attention, backend=None):
    """One ``AnyFlowTransformerBlock``; ``h`` is its norm1-modulated input, computed by the previous step.

    ``mod`` is this block's per-frame modulation ``[B, R, 6, d]`` (fp32, table included);
    ``next_mod`` is ``(shift, scale, eps)`` of the next block's norm1, or ``None`` for the last block.
    Every residual update is fused with the LayerNorm that follows it (:func:`anyflow.ops.residual_norm`).
    Returns ``(x, h_next)`` (``h_next`` is ``None`` after the last block).
    """
    _, _, gate_a, shift_f, scale_f, gate_f = mod.unbind(2)
    attn = block.attn1
    v = attn.to_v(h).unflatten(2, (attn.heads, -1))
    o = self_attention(layer, attn, attn.to_q(h), attn.to_k(h), v).type_as(h)
    o = attn.to_out[1](attn.to_out[0](o))
    if isinstance(block.norm2, torch.nn.LayerNorm):
        x, h = ops.residual_norm(x, o, gate_a, segments, block.norm2.eps, weight=block.norm2.weight,
                                 bias=block.norm2.bias, backend=backend)
    else:  # cross_attn_norm=False: norm2 is the identity
        x = ops.gated_residual(x, o, gate_a, segments, backend=backend)
        h = x
    c = _cross_attention(block.attn2, h, text, layer)
    x, h = ops.residual_norm(x, c, None, segments, block.norm3.eps, shift=shift_f, scale=scale_f, backend=backend)
    y = block.ffn(h)
    if next_mod is None:
        return ops.gated_residual(x, y, gate_f, segments, backend=backend), None
    shift, scale, eps = next_mod
    return ops.residual_norm(x, y, gate_f, segments, eps, shift=shift, scale=scale, backend=backend)


def sharded_block_forward(block, layer: int, x, text: TextContext, m_rows, segments, self_attention, backend=None):
    """One block that reads only its own parameters: the ``forward`` of an enabled block (FSDP2).

    Under ``fully_shard`` a block's parameters are gathered only inside its own ``__call__``, so the
    norm1 modulation that :func:`block_forward` receives fused into the previous block's residual is
    done here instead (one extra elementwise pass per block). Returns ``x`` after the block.
    """
    mod = block.scale_shift_table + m_rows.float()
    h = ops.adaln_modulate(x, mod[:, :, 0], mod[:, :, 1], segments, block.norm1.eps, backend=backend)
    return block_forward(block, layer, x, h, text, mod, None, segments, self_attention, backend)[0]


def _is_sharded(block) -> bool:
    return FSDPModule is not None and isinstance(block, FSDPModule)


@contextlib.contextmanager
def frozen_parameters(params):
    """Temporarily set ``requires_grad=False`` on those of ``params`` that require grad (autograd then
    tracks the inputs only); restored on exit."""
    params = [p for p in params if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in params:
            p.requires_grad_(True)


@contextlib.contextmanager
def _frozen_by_name(module, names):
    """:func:`frozen_parameters` of ``module``'s parameters called ``names``, looked up on entry (under FSDP
    the gathered parameters of that moment, not the shards)."""
    own = dict(module.named_parameters())
    with frozen_parameters([own[n] for n in names if n in own]):
        yield


def _checkpoint_block(fn, block, *args):
    """Activation checkpoint of one block whose recompute sees the parameters frozen that were frozen in
    the forward (the ``"mid"`` on-policy rollout freezes the student for one jump and unfreezes it before
    the backward; without the replay the recompute would build a different graph)."""
    frozen = tuple(n for n, p in block.named_parameters() if not p.requires_grad)
    if not frozen:
        return torch.utils.checkpoint.checkpoint(fn, *args, use_reentrant=False)
    context = lambda: (contextlib.nullcontext(), _frozen_by_name(block, frozen))  # noqa: E731
    return torch.utils.checkpoint.checkpoint(fn, *args, use_reentrant=False, context_fn=context)


def run_blocks(model, x, text: TextContext, m_rows, segments, self_attention: SelfAttention, backend=None):
    """All blocks with per-frame modulation ``m_rows`` ``[B, R, 6, d]``; checkpointed per block when the
    model has gradient checkpointing on and grad is enabled.

    Blocks sharded with FSDP2 (:func:`anyflow.training.distributed.shard_model`) are called as modules,
    ``block(...)``, so FSDP's hooks gather their parameters and reduce their gradients; this needs the
    block class swapped by :func:`anyflow.enable`. Under offloading each block runs inside its offload
    hooks (:func:`anyflow.models.offload.block_onloaded`), reading only its own parameters. Otherwise the
    blocks' submodules are used directly.
    """
    blocks = list(model.blocks)
    ckpt = torch.is_grad_enabled() and getattr(model, "gradient_checkpointing", False)
    text = _as_text(model, text)
    if not torch.compiler.is_compiling() and offload.in_scope(model):
        for i, block in enumerate(blocks):
            args = (block, i, x, text, m_rows, segments, self_attention, backend)
            x = _checkpoint_block(_offloaded_block, block, *args) if ckpt else _offloaded_block(*args)
        return x
    if _is_sharded(blocks[0]):
        if not getattr(blocks[0], "_anyflow_block", False):
            raise TypeError("FSDP-sharded blocks need anyflow.enable(model) (their forward must be anyflow's)")
        # FSDP's pre-forward hook hands a block an autograd alias of a grad-requiring input (size-1 dims
        # may get other strides) but does not run in a checkpoint's recompute; a strided input (a single
        # patchify is a transpose) can then take another matmul path in the recompute and fail the
        # checkpoint's saved-tensor check. A contiguous input looks the same to both.
        x = x.contiguous()
        for i, block in enumerate(blocks):
            args = (i, x, text, m_rows, segments, self_attention, backend)
            x = _checkpoint_block(block, block, *args) if ckpt else block(*args)
        return x
    mods = [block.scale_shift_table + m_rows.float() for block in blocks]
    h = ops.adaln_modulate(x, mods[0][:, :, 0], mods[0][:, :, 1], segments, blocks[0].norm1.eps, backend=backend)
    for i, block in enumerate(blocks):
        nxt = None
        if i + 1 < len(blocks):
            nxt = (mods[i + 1][:, :, 0], mods[i + 1][:, :, 1], blocks[i + 1].norm1.eps)
        args = (block, i, x, h, text, mods[i], nxt, segments, self_attention, backend)
        if ckpt:
            x, h = _checkpoint_block(block_forward, block, *args)
        else:
            x, h = block_forward(*args)
    return x


def _offloaded_block(block, *args):
    with offload.block_onloaded(block):
        return sharded_block_forward(block, *args)


def head(model, x, e_rows, segments, backend=None):
    """Output norm + per-frame modulation with ``e`` (not m) + ``proj_out``."""
    mod = model.scale_shift_table + e_rows[:, :, None, :]
    shift, scale = mod.unbind(2)
    h = ops.adaln_modulate(x, shift, scale, segments, model.norm_out.eps, backend=backend)
    return model.proj_out(h)


def dense_self_attention(cos, sin, backend=None) -> SelfAttention:
    """Bidirectional self-attention over the whole sequence."""

    def fn(layer, attn, q, k, v):
        q = norm_rope(attn, q, "q", cos, sin, backend)
        k = norm_rope(attn, k, "k", cos, sin, backend)
        o = ops.sdpa(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return o.transpose(1, 2).flatten(2)

    return fn


def masked_self_attention(cos, sin, layout, on_kv=None, backend=None) -> SelfAttention:
    """Chunk-causal self-attention; ``on_kv(layer, attn, k_proj, k_rope, v)`` sees every layer's keys."""

    def fn(layer, attn, q, k, v):
        qr = norm_rope(attn, q, "q", cos, sin, backend)
        kr = norm_rope(attn, k, "k", cos, sin, backend)
        if on_kv is not None:
            on_kv(layer, attn, k, kr, v)
        o = ops.chunk_causal_attention(
            qr.transpose(1, 2), kr.transpose(1, 2), v.transpose(1, 2), layout, backend=backend
        )
        return o.transpose(1, 2).flatten(2)

    return fn


def _check_latents(name, x, model):
    if not isinstance(x, torch.Tensor) or x.ndim != 5:
        raise ValueError(f"{name} must be a [B, F, C, H, W] tensor, got {getattr(x, 'shape', type(x))}")
    cfg = model.config
    if x.shape[2] != cfg.in_channels:
        raise ValueError(f"{name} must have {cfg.in_channels} channels at dim 2 ([B, F, C, H, W]), got {tuple(x.shape)}")
    p = max(cfg.patch_size[1:])
    if x.shape[3] % p or x.shape[4] % p:
        raise ValueError(f"{name} height/width {tuple(x.shape[3:])} must be divisible by the patch size {p}")


def _frame_times(name, t, b, f, device):
    t = torch.as_tensor(t, device=device)
    if t.ndim == 0:
        t = t.expand(b, f)
    elif t.ndim == 1 and t.shape[0] == b:
        t = t[:, None].expand(b, f)
    if t.shape != (b, f):
        raise ValueError(f"{name} must be per frame [B, F] = [{b}, {f}], got {tuple(t.shape)}")
    return t


def _onloaded(fn):
    """Run ``fn(model, ...)`` inside the model's offload scope (:func:`anyflow.models.offload.model_onloaded`)."""

    @functools.wraps(fn)
    def wrapper(model, *args, **kwargs):
        if torch.compiler.is_compiling() or offload.in_scope(model) or not offload.is_offloaded(model):
            return fn(model, *args, **kwargs)
        with offload.model_onloaded(model):
            return fn(model, *args, **kwargs)

    return wrapper


# ----------------------------------------------------------------------------------------------
# bidirectional model
# ----------------------------------------------------------------------------------------------
@_onloaded
def bidirectional_forward(
    model, hidden_states, timestep, r_timestep, encoder_hidden_states, encoder_hidden_states_image=None, backend=None
):
    """``AnyFlowTransformer3DModel.forward`` through the op layer.

    Args:
        hidden_states: ``[B, F, C, H, W]`` latents z_t.
        timestep, r_timestep: ``[B, F]`` (or scalar / ``[B]``) time pair (t, r) in [0, 1000].
        encoder_hidden_states: ``[B, L, text_dim]`` text, or a :class:`TextContext`.

    Returns:
        ``[B, F, C, H, W]`` mean velocity u in the model dtype.
    """
    _check_latents("hidden_states", hidden_states, model)
    b, f, _, hh, ww = hidden_states.shape
    p = model.config.patch_size
    grid = (hh // p[1], ww // p[2])
    text = _as_text(model, encoder_hidden_states, encoder_hidden_states_image)
    t = _frame_times("timestep", timestep, b, f, hidden_states.device)
    r = _frame_times("r_timestep", r_timestep, b, f, hidden_states.device)
    delta = ops.delta_time(t, r, model.condition_embedder.deltatime_type)
    e_rows, m_rows = time_rows(model, t, delta, text.raw_dtype, backend)
    segs = ((f, grid[0] * grid[1]),)
    cos, sin = rope_for(model, 0, f, grid, False, hidden_states.device)
    x = patchify(model.patch_embedding, hidden_states)
    x = run_blocks(model, x, text, m_rows, segs, dense_self_attention(cos, sin, backend), backend)
    return unpatchify(model, head(model, x, e_rows, segs, backend), f, hh, ww)


# ----------------------------------------------------------------------------------------------
# FAR model
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class FARGeometry:
    """Token geometry of a FAR model at one latent resolution."""

    full_grid: tuple[int, int]
    compressed_grid: tuple[int, int]

    @property
    def full_tpf(self) -> int:
        return self.full_grid[0] * self.full_grid[1]

    @property
    def compressed_tpf(self) -> int:
        return self.compressed_grid[0] * self.compressed_grid[1]


def far_geometry(model, height: int, width: int) -> FARGeometry:
    cfg = model.config
    ps, cps = cfg.patch_size, cfg.compressed_patch_size
    return FARGeometry((height // ps[1], width // ps[2]), (height // cps[1], width // cps[2]))


def check_chunk_partition(chunk_partition, num_frames: Optional[int] = None, arg: str = "chunk_partition"):
    """Validate a chunk partition (positive ints; summing to ``num_frames`` when given)."""
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
    """(compressed, full) chunk counts when at most ``limit`` trailing chunks are full."""
    full = min(num_chunks, max(limit, 0))
    return num_chunks - full, full


@_onloaded
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
    backend=None,
):
    """FAR forward over ``[compressed chunks | full chunks (| clean copies)]`` with the chunk-causal mask.

    This is diffusers' ``_forward_train`` (``full_limit = full_chunk_limit``) and ``_forward_cache``
    (``full_limit = full_chunk_limit - 1``, ``with_head=False``, ``on_kv`` storing the keys).

    Returns:
        ``[B, F_full, C, H, W]`` velocity of the noisy full frames (``None`` without head).
    """
    _check_latents("hidden_states", hidden_states, model)
    b, f, _, hh, ww = hidden_states.shape
    cp = check_chunk_partition(chunk_partition, f)
    geo = far_geometry(model, hh, ww)
    dev = hidden_states.device
    nc_chunks, _ = split_chunks(len(cp), full_limit)
    nc_frames = sum(cp[:nc_chunks])
    nf_frames = f - nc_frames
    text = _as_text(model, encoder_hidden_states, encoder_hidden_states_image)
    t = _frame_times("timestep", timestep, b, f, dev)
    r = _frame_times("r_timestep", r_timestep, b, f, dev)
    delta = ops.delta_time(t, r, model.condition_embedder.deltatime_type)
    t_rows = [t[:, :nc_frames], t[:, nc_frames:]]
    d_rows = [delta[:, :nc_frames], delta[:, nc_frames:]]
    segs = [(nc_frames, geo.compressed_tpf), (nf_frames, geo.full_tpf)]
    ropes = [
        rope_for(model, 0, nc_frames, geo.compressed_grid, True, dev),
        rope_for(model, nc_frames, f, geo.full_grid, False, dev),
    ]
    x = [patchify(model.far_patch_embedding, hidden_states[:, :nc_frames])] if nc_frames else []
    x.append(patchify(model.patch_embedding, hidden_states[:, nc_frames:]))
    if clean_hidden_states is not None:
        _check_latents("clean_hidden_states", clean_hidden_states, model)
        if clean_hidden_states.shape[:2] != (b, nf_frames) or clean_hidden_states.shape[3:] != (hh, ww):
            raise ValueError(
                f"clean_hidden_states must be [B, F_full, C, H, W] = [{b}, {nf_frames}, C, {hh}, {ww}], "
                f"got {tuple(clean_hidden_states.shape)}"
            )
        if clean_timestep is None:
            raise ValueError("clean_timestep is required with clean_hidden_states")
        ct = _frame_times("clean_timestep", clean_timestep, b, nf_frames, dev)
        t_rows.append(ct)
        d_rows.append(ct)  # diffusers embeds the clean copy with (t, delta) = (c, c) for both deltatime types
        segs.append((nf_frames, geo.full_tpf))
        ropes.append(ropes[-1])
        x.append(patchify(model.patch_embedding, clean_hidden_states))
    e_rows, m_rows = time_rows(model, torch.cat(t_rows, 1), torch.cat(d_rows, 1), text.raw_dtype, backend)
    cos, sin = _cat_rope(ropes)
    x = torch.cat(x, dim=1) if len(x) > 1 else x[0]
    layout = ops.far_attention_layout(
        cp, nc_chunks, geo.full_tpf, geo.compressed_tpf, clean_copy=clean_hidden_states is not None
    )
    x = run_blocks(model, x, text, m_rows, tuple(segs), masked_self_attention(cos, sin, layout, on_kv, backend), backend)
    if not with_head:
        return None
    n_ctx = nc_frames * geo.compressed_tpf
    x = x[:, n_ctx : n_ctx + nf_frames * geo.full_tpf]
    out = head(model, x, e_rows[:, nc_frames : nc_frames + nf_frames], ((nf_frames, geo.full_tpf),), backend)
    return unpatchify(model, out, nf_frames, hh, ww)


@_onloaded
def far_cached_step(
    model,
    hidden_states,
    timestep,
    r_timestep,
    text,
    attend: SelfAttention,
    first_frame: int,
    backend=None,
):
    """One denoising NFE on the current FAR chunk; ``attend`` reads/writes the KV cache.

    Args:
        hidden_states: ``[B, F_chunk, C, H, W]`` current chunk z_t.
        timestep, r_timestep: per-frame ``[B, F_chunk]`` time pair.
        text: :class:`TextContext` or raw text embedding.
        attend: self-attention over (cache | current); receives pre-RoPE q/k.
        first_frame: absolute index of the chunk's first frame (for RoPE).

    Returns:
        ``[B, F_chunk, C, H, W]`` mean velocity.
    """
    _check_latents("hidden_states", hidden_states, model)
    b, f, _, hh, ww = hidden_states.shape
    geo = far_geometry(model, hh, ww)
    text = _as_text(model, text)
    t = _frame_times("timestep", timestep, b, f, hidden_states.device)
    r = _frame_times("r_timestep", r_timestep, b, f, hidden_states.device)
    delta = ops.delta_time(t, r, model.condition_embedder.deltatime_type)
    e_rows, m_rows = time_rows(model, t, delta, text.raw_dtype, backend)
    segs = ((f, geo.full_tpf),)
    x = patchify(model.patch_embedding, hidden_states)
    x = run_blocks(model, x, text, m_rows, segs, attend, backend)
    return unpatchify(model, head(model, x, e_rows, segs, backend), f, hh, ww)


def diffusers_cache_attention(model, kv_cache, num_cached_chunks, chunk_partition, geo, device, backend=None):
    """Self-attention of an inference step over a diffusers-format KV cache (pre-RoPE keys).

    The cached keys are rotated on the fly and the three segments (compressed cache, full cache,
    current chunk) are attended without concatenation and without the zero padding of diffusers 0.42.1.
    Returns ``(attend, first_frame)``.
    """
    cp = chunk_partition
    total = len(cp)
    if total != num_cached_chunks + 1:
        raise ValueError(
            f"chunk_partition has {total} chunks but the cache holds {num_cached_chunks} (expected one more chunk)"
        )
    nc, nf = split_chunks(total, model.config.full_chunk_limit)
    n_cc = sum(cp[:nc]) * geo.compressed_tpf
    n_cf = sum(cp[nc : nc + nf - 1]) * geo.full_tpf
    nc_frames = sum(cp[:nc])
    first = sum(cp[:-1])
    cos_c, sin_c = rope_for(model, 0, nc_frames, geo.compressed_grid, True, device)
    cos_f, sin_f = rope_for(model, nc_frames, first, geo.full_grid, False, device)
    cos_q, sin_q = rope_for(model, first, sum(cp), geo.full_grid, False, device)

    def rot_cached(k, cos, sin):  # k: [B, H, L, D] pre-RoPE
        return ops.apply_rope(k.transpose(1, 2), cos, sin, backend=backend).transpose(1, 2)

    def fn(layer, attn, q, k, v):
        cache = kv_cache[layer]
        comp, full = cache["compressed_cache"], cache["full_cache"]
        qr = norm_rope(attn, q, "q", cos_q, sin_q, backend).transpose(1, 2)
        kr = norm_rope(attn, k, "k", cos_q, sin_q, backend).transpose(1, 2)
        keys = [rot_cached(comp[0, :, :, :n_cc], cos_c, sin_c), rot_cached(full[0, :, :, :n_cf], cos_f, sin_f), kr]
        values = [comp[1, :, :, :n_cc], full[1, :, :, :n_cf], v.transpose(1, 2)]
        o = ops.segmented_attention(qr, keys, values, backend=backend)
        return o.transpose(1, 2).flatten(2)

    return fn, first


def diffusers_cache_writer(kv_cache, n_compressed_tokens: int):
    """``on_kv`` hook writing post-norm, pre-RoPE K/V into a diffusers-format KV cache (cache step)."""

    def on_kv(layer, attn, k_proj, k_rot, v):
        cache = kv_cache[layer]
        k_pre = attn.norm_k(k_proj).to(k_proj.dtype).unflatten(2, (attn.heads, -1)).transpose(1, 2)
        v = v.transpose(1, 2)
        n = n_compressed_tokens
        m = k_pre.shape[2] - n
        cache["compressed_cache"][0, :, :, :n] = k_pre[:, :, :n]
        cache["compressed_cache"][1, :, :, :n] = v[:, :, :n]
        cache["full_cache"][0, :, :, :m] = k_pre[:, :, n:]
        cache["full_cache"][1, :, :, :m] = v[:, :, n:]

    return on_kv
