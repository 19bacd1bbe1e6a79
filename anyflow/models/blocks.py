"""What every AnyFlow forward shares: text context, time-pair rows, RoPE tables, blocks, output head.

They read an (unmodified) diffusers ``AnyFlowTransformer3DModel`` / ``AnyFlowFARTransformer3DModel`` through
its submodules (LoRA / PEFT layers and offload hooks keep working), unlike diffusers' forward with:

* per-frame conditioning: the time-pair embedding runs on ``B x F`` rows and the adaLN modulation, gates
  and output head index frames through a segment table (no ``[B, N, 6, d]`` tensor);
* RoPE in fp32 from cached tables instead of complex128 every layer;
* optional prompt-constant cross-attention K/V (:class:`TextContext`) computed once per prompt.

Whole-model forwards: :mod:`.bidirectional`, :mod:`.far`. Under group / sequential CPU offload (:mod:`.offload`)
a forward fires the hooks of the modules it reads directly and runs block by block inside their hooks.

Tensor layouts follow diffusers: latents ``[B, F, C, H, W]`` (frames before channels), timesteps ``[B, F]``
per frame in [0, 1000], text ``[B, L_text, text_dim]``, tokens ``[B, N, d]`` frame-major.
Source: diffusers ``AnyFlowTransformer3DModel`` / ``AnyFlowTransformerBlock`` and the official
``far/models/transformer_far_wan_model.py`` (NVlabs/AnyFlow).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from functools import lru_cache
from typing import Callable, Optional

import torch

from .. import ops, parallel
from . import offload

#: ``fn(layer, attn_module, q_proj [B, L, H*Dh], k_proj [B, L, H*Dh], v [B, L, H, Dh]) -> [B, L, H*Dh]``
SelfAttention = Callable[..., torch.Tensor]


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


def as_text(model, text, image=None) -> TextContext:
    """``text`` as a projected :class:`TextContext`: raw ``[B, L, text_dim]`` embeddings are projected, an
    unprojected context (offloaded model) is projected now."""
    if isinstance(text, TextContext):
        return text if text.projected else prepare_text(model, text.tokens, text.image)
    return prepare_text(model, text, image)


def time_rows(model, t: torch.Tensor, delta: torch.Tensor, out_dtype: torch.dtype):
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


def split_sequence(model, segments) -> Optional[parallel.SequenceShard]:
    """This rank's :class:`anyflow.parallel.SequenceShard` of a sequence with frame-segment table ``segments``
    when ``model`` runs under Ulysses context parallelism (``anyflow.enable(..., context_parallel=...)``);
    ``None`` in one process."""
    group = parallel.context_parallel_of(model)
    return None if group is None else group.shard(segments)


def shard_inputs(shard, x, rows, cos, sin):
    """This rank's tokens ``x`` ``[B, s, d]``, per-frame ``rows`` (list of ``[B, R, ...]``) and RoPE tables
    ``[s, Dh/2]`` (``None`` passes through) of a whole sequence; everything unchanged when ``shard`` is ``None``."""
    if shard is None:
        return x, rows, cos, sin
    cos, sin = (None if t is None else shard.tokens(t, 0) for t in (cos, sin))
    return shard.tokens(x), [shard.take_rows(r) for r in rows], cos, sin


def exchange_heads(shard, q, k, v):
    """Ulysses exchange before an attention: ``[B, s, H, Dh]`` per rank -> ``[B, S, H/N, Dh]`` (one all-to-all);
    unchanged when ``shard`` is ``None``."""
    return (q, k, v) if shard is None else shard.to_heads(q, k, v)


def exchange_tokens(shard, o):
    """Ulysses exchange after an attention: ``[B, S, H/N, Dh]`` -> ``[B, s, H, Dh]``; unchanged when ``shard`` is
    ``None``."""
    return o if shard is None else shard.to_seq(o)


def cat_rope(parts):
    """Concatenate ``(cos, sin)`` tables of consecutive token ranges (empty ones dropped)."""
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


def norm_rope(attn, x_proj, which: str, cos, sin):
    """``norm_q`` / ``norm_k`` (RMSNorm across heads) + RoPE of a ``[B, L, H*Dh]`` projection -> ``[B, L, H, Dh]``."""
    norm = attn.norm_q if which == "q" else attn.norm_k
    weight = norm.weight if norm.weight is not None else torch.ones(x_proj.shape[-1], device=x_proj.device)
    return ops.qk_norm_rope(x_proj, weight, cos, sin, attn.heads, norm.eps)


def rotary_attention(cos, sin, attend, *, shard=None, on_kv=None) -> SelfAttention:
    """The self-attention of every AnyFlow forward: ``norm_q`` / ``norm_k`` + RoPE with the fp32 ``[N, Dh/2]``
    tables ``cos``, ``sin`` (:func:`norm_rope`), then ``attend(layer, q, k, v)`` on ``[B, H, N, Dh]`` tensors
    (returns ``[B, H, N, Dh]``). ``on_kv(layer, attn, k_proj [B, N, H*Dh], k_rope [B, N, H, Dh], v [B, N, H, Dh])``
    sees every layer's keys. Under Ulysses (``shard``, an :class:`anyflow.parallel.SequenceShard`) the tokens and
    tables are this rank's and ``attend`` sees all tokens of this rank's heads."""

    def fn(layer, attn, q, k, v):
        qr, kr = norm_rope(attn, q, "q", cos, sin), norm_rope(attn, k, "k", cos, sin)
        if on_kv is not None:
            on_kv(layer, attn, k, kr, v)
        qr, kr, v = exchange_heads(shard, qr, kr, v)
        o = attend(layer, qr.transpose(1, 2), kr.transpose(1, 2), v.transpose(1, 2))
        return exchange_tokens(shard, o.transpose(1, 2)).flatten(2)

    return fn


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


def block_forward(block, layer: int, x, h, text: TextContext, mod, next_mod, segments, self_attention):
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
                                 bias=block.norm2.bias)
    else:  # cross_attn_norm=False: norm2 is the identity
        x = ops.gated_residual(x, o, gate_a, segments)
        h = x
    c = _cross_attention(block.attn2, h, text, layer)
    x, h = ops.residual_norm(x, c, None, segments, block.norm3.eps, shift=shift_f, scale=scale_f)
    y = block.ffn(h)
    if next_mod is None:
        return ops.gated_residual(x, y, gate_f, segments), None
    shift, scale, eps = next_mod
    return ops.residual_norm(x, y, gate_f, segments, eps, shift=shift, scale=scale)


def standalone_block_forward(block, layer: int, x, text: TextContext, m_rows, segments, self_attention):
    """One block that reads only its own parameters: the ``forward`` of an enabled block.

    Used where a block's parameters are loaded only around that block (FSDP2 ``fully_shard`` gathers them
    inside the block's ``__call__``; offloading loads them in the block's hooks), so the norm1 modulation
    that :func:`block_forward` receives fused into the previous block's residual is done here instead (one
    extra elementwise pass per block). ``m_rows`` is ``[B, R, 6, d]``. Returns ``x`` ``[B, N, d]`` after the
    block.
    """
    mod = block.scale_shift_table + m_rows.float()
    h = ops.adaln_modulate(x, mod[:, :, 0], mod[:, :, 1], segments, block.norm1.eps)
    return block_forward(block, layer, x, h, text, mod, None, segments, self_attention)[0]


@dataclass
class BlockCalls:
    """How :func:`run_blocks` calls blocks, for policies owned outside the models (training installs its own
    in :mod:`anyflow.training.distributed`; models never import training).

    Attributes:
        as_module: ``as_module(block) -> bool``: call the block as a module, ``block(...)``, so its hooks run.
        checkpoint: ``checkpoint(fn, block, *args)``: activation checkpoint of one block's ``fn(*args)``.
    """

    as_module: Callable[[torch.nn.Module], bool] = lambda block: False
    checkpoint: Callable[..., object] = lambda fn, block, *args: torch.utils.checkpoint.checkpoint(
        fn, *args, use_reentrant=False)


#: The block-call policies in effect.
block_calls = BlockCalls()


def run_blocks(model, x, text: TextContext, m_rows, segments, self_attention: SelfAttention):
    """All blocks with per-frame modulation ``m_rows`` ``[B, R, 6, d]``; checkpointed per block when the
    model has gradient checkpointing on and grad is enabled.

    Blocks for which ``block_calls.as_module`` holds (FSDP2-sharded ones) are called as modules so their hooks
    gather parameters and reduce gradients (needs :func:`anyflow.enable`'s block class). Under offloading each
    block runs inside its offload hooks (:func:`anyflow.models.offload.block_onloaded`). Otherwise the blocks'
    submodules are used directly. ``x`` is ``[B, N, d]``; returns it after the last block.
    """
    blocks = list(model.blocks)
    ckpt = torch.is_grad_enabled() and getattr(model, "gradient_checkpointing", False)
    if ckpt:  # a block recomputes in the backward, which may run outside this forward's ops.backend
        pinned = ops.registry.requested_backend()
        checkpoint = lambda fn, *args: block_calls.checkpoint(under_backend(pinned, fn), *args)  # noqa: E731
    text = as_text(model, text)
    if not torch.compiler.is_compiling() and offload.in_scope(model):
        for i, block in enumerate(blocks):
            args = (block, i, x, text, m_rows, segments, self_attention)
            x = checkpoint(_offloaded_block, block, *args) if ckpt else _offloaded_block(*args)
        return x
    if block_calls.as_module(blocks[0]):
        if not getattr(blocks[0], "_anyflow_block", False):
            raise TypeError("FSDP-sharded blocks need anyflow.enable(model) (their forward must be anyflow's)")
        # FSDP's pre-forward hook hands a block an autograd alias of a grad-requiring input (size-1 dims
        # may get other strides) but does not run in a checkpoint's recompute; a strided input (a single
        # patchify is a transpose) can then take another matmul path in the recompute and fail the
        # checkpoint's saved-tensor check. A contiguous input looks the same to both.
        x = x.contiguous()
        for i, block in enumerate(blocks):
            args = (i, x, text, m_rows, segments, self_attention)
            x = checkpoint(block, block, *args) if ckpt else block(*args)
        return x
    mods = [block.scale_shift_table + m_rows.float() for block in blocks]
    h = ops.adaln_modulate(x, mods[0][:, :, 0], mods[0][:, :, 1], segments, blocks[0].norm1.eps)
    for i, block in enumerate(blocks):
        nxt = None
        if i + 1 < len(blocks):
            nxt = (mods[i + 1][:, :, 0], mods[i + 1][:, :, 1], blocks[i + 1].norm1.eps)
        args = (block, i, x, h, text, mods[i], nxt, segments, self_attention)
        if ckpt:
            x, h = checkpoint(block_forward, block, *args)
        else:
            x, h = block_forward(*args)
    return x


def under_backend(backend, fn):
    """``fn`` that runs under ``ops.backend(backend)`` whenever it is called."""

    def run(*args):
        with ops.backend(backend):
            return fn(*args)

    return run


def _offloaded_block(block, *args):
    with offload.block_onloaded(block):
        return standalone_block_forward(block, *args)


def head(model, x, e_rows, segments):
    """Output norm + per-frame modulation with ``e`` (not m) + ``proj_out``."""
    mod = model.scale_shift_table + e_rows[:, :, None, :]
    shift, scale = mod.unbind(2)
    h = ops.adaln_modulate(x, shift, scale, segments, model.norm_out.eps)
    return model.proj_out(h)


def check_latents(name, x, model):
    """Raise ``ValueError`` unless ``x`` is ``[B, F, C, H, W]`` with the model's channels and H, W divisible by
    the largest patch."""
    if not isinstance(x, torch.Tensor) or x.ndim != 5:
        raise ValueError(f"{name} must be a [B, F, C, H, W] tensor, got {getattr(x, 'shape', type(x))}")
    cfg = model.config
    if x.shape[2] != cfg.in_channels:
        raise ValueError(f"{name} must have {cfg.in_channels} channels at dim 2 ([B, F, C, H, W]), got {tuple(x.shape)}")
    p = max(cfg.patch_size[1:])
    if x.shape[3] % p or x.shape[4] % p:
        raise ValueError(f"{name} height/width {tuple(x.shape[3:])} must be divisible by the patch size {p}")


def frame_times(name, t, b, f, device):
    """``t`` (scalar, ``[B]`` or ``[B, F]``, in [0, 1000]) as a per-frame ``[B, F]`` tensor on ``device``;
    ``ValueError`` for any other shape."""
    t = torch.as_tensor(t, device=device)
    if t.ndim == 0:
        t = t.expand(b, f)
    elif t.ndim == 1 and t.shape[0] == b:
        t = t[:, None].expand(b, f)
    if t.shape != (b, f):
        raise ValueError(f"{name} must be per frame [B, F] = [{b}, {f}], got {tuple(t.shape)}")
    return t


def onloaded(fn):
    """Decorator: run ``fn(model, ...)`` inside the model's offload scope (:func:`anyflow.models.offload.model_onloaded`)."""

    @functools.wraps(fn)
    def wrapper(model, *args, **kwargs):
        if torch.compiler.is_compiling() or offload.in_scope(model) or not offload.is_offloaded(model):
            return fn(model, *args, **kwargs)
        with offload.model_onloaded(model):
            return fn(model, *args, **kwargs)

    return wrapper
