"""Context parallelism (Ulysses) for anyflow's fused forwards and for the plain diffusers AnyFlow transformers.

Two users, one home for the collectives:

* anyflow's fast path (``anyflow.enable(pipe, context_parallel=config)``): :class:`UlyssesGroup` /
  :class:`SequenceShard` below split the token sequence of a fused forward, exchange Q/K/V with functional
  collectives (``torch.distributed._functional_collectives``, so ``torch.compile`` keeps one graph) and gather
  the output; the forwards in :mod:`anyflow.models` call them where ``context_parallel_of(model)`` is set.
* plain diffusers models (``apply_context_parallel``), described next.

``apply_context_parallel(transformer, config)`` makes an un-enabled diffusers ``AnyFlowTransformer3DModel`` or
``AnyFlowFARTransformer3DModel`` run Ulysses sequence parallelism (Jacobs et al., "DeepSpeed Ulysses",
arXiv:2309.14509) across the ranks of a ``torchrun`` job and give the output of one process:

* the token sequence is split across ranks between the first block's input and the last block's output with
  diffusers' own split / gather hooks (``diffusers.hooks.context_parallel.apply_context_parallel``, a plan of
  ``ContextParallelInput`` / ``ContextParallelOutput`` as for ``WanTransformer3DModel._cp_plan``);
* each self-attention does the Ulysses all-to-all *before* RoPE, the KV cache and the attention mask, so every
  rank then holds the whole sequence for ``heads / N`` heads and runs diffusers' own single-process attention
  semantics on it: RoPE on the global frame grid, FAR's ``[compressed | full | current]`` cache layout, FAR's
  chunk-causal ``BlockMask`` with global indices and its padding to 128 tokens are all unchanged;
* cross-attention stays local (the text / image K/V are the same on every rank, so each query token needs
  nothing from the other ranks).

Why not ``transformer.enable_parallelism(config)`` with a ``_cp_plan`` alone (diffusers 0.42.1):

* bidirectional: the RoPE module returns a ``dict`` (``{"query", "key"}``), which ``ContextParallelSplitHook``
  cannot split (it accepts a tensor or a list / tuple of tensors); without the split the per-shard queries meet
  global frequencies, and splitting the input at the root instead computes RoPE per shard (silently wrong).
* FAR: ``AnyFlowCausalAttnProcessor`` writes and reads the KV cache with *global* token counts on the local
  shard, pads each shard to 128 tokens and indexes a ``BlockMask`` built for the global sequence, all before
  ``dispatch_attention_fn`` does the Ulysses all-to-all; and its ``flex`` backend is not context-parallel
  capable, so ``enable_parallelism`` rejects it.
* on a machine without an accelerator ``ModelMixin._resolve_parallel_config`` divides by
  ``torch.accelerator.device_count()`` (0), so CPU / gloo runs fail there.

So this module swaps the self-attention processors for Ulysses processors, builds the mesh itself and installs
diffusers' hooks with its plan. All checks that can fail run before any collective, identically on every rank.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.distributed as dist

__all__ = [
    "SequenceShard",
    "UlyssesGroup",
    "UlyssesAnyFlowAttnProcessor",
    "UlyssesAnyFlowCausalAttnProcessor",
    "apply_context_parallel",
    "check_context_parallel",
    "context_parallel_of",
    "context_parallel_plan",
    "split_sizes",
    "ulysses_group",
]


def split_sizes(num_tokens: int, world_size: int) -> list[int]:
    """Tokens per rank of a sequence of ``num_tokens`` split over ``world_size`` ranks.

    The rule of ``torch.tensor_split`` (the first ``num_tokens % world_size`` ranks get one token more), which
    diffusers' ``PartitionAnythingSharder`` uses to split the hidden states.
    """
    q, r = divmod(num_tokens, world_size)
    return [q + 1] * r + [q] * (world_size - r)


# --------------------------------------------------------------------------------------------------
# Fast path: token shards of anyflow's fused forwards, exchanged with functional collectives
# --------------------------------------------------------------------------------------------------

#: attribute of an enabled transformer that holds its :class:`UlyssesGroup` (set by ``anyflow.enable``)
ATTRIBUTE = "_anyflow_context_parallel"


def context_parallel_of(model) -> "UlyssesGroup | None":
    """The :class:`UlyssesGroup` that ``anyflow.enable(..., context_parallel=...)`` attached to ``model``, or
    ``None`` (one process: the fused forwards run unchanged)."""
    return getattr(model, ATTRIBUTE, None)


def local_segments(segments, start: int, end: int) -> tuple[tuple, tuple]:
    """The frame-segment table of tokens ``[start, end)`` of a sequence described by ``segments``.

    Args:
        segments: ``((frames, tokens_per_frame), ...)`` of the whole sequence, in token order (the table of
            :func:`anyflow.ops.adaln_modulate`).
        start, end: the token range of this rank (``0 <= start <= end <= sum(frames * tokens_per_frame)``).

    Returns:
        ``(segments, rows)``: the table of the range, where a frame cut by ``start`` or ``end`` becomes a
        segment of one frame with fewer tokens, and ``rows``: for every frame of that table the index of its row
        in the whole sequence's per-frame modulation (a cut frame keeps its row), so
        ``m_rows.index_select(1, rows)`` is the range's modulation. Adjacent segments of equal width are merged.

    Raises:
        ValueError: a range outside the sequence.
    """
    total = sum(nf * tpf for nf, tpf in segments)
    if not 0 <= start <= end <= total:
        raise ValueError(f"token range [{start}, {end}) is outside the sequence of {total} tokens")
    segs, rows = [], []
    tok = row = 0
    for nf, tpf in segments:
        s0 = tok
        a, b = max(start, s0), min(end, s0 + nf * tpf)
        tok, row0, row = tok + nf * tpf, row, row + nf
        if a >= b:
            continue
        frame, offset = divmod(a - s0, tpf)
        pos = a
        if offset:  # the range starts inside a frame
            n = min(tpf - offset, b - a)
            segs.append((1, n))
            rows.append(row0 + frame)
            pos, frame = pos + n, frame + 1
        whole = (b - pos) // tpf
        if whole:
            segs.append((whole, tpf))
            rows.extend(range(row0 + frame, row0 + frame + whole))
            pos, frame = pos + whole * tpf, frame + whole
        if pos < b:  # the range ends inside a frame
            segs.append((1, b - pos))
            rows.append(row0 + frame)
    merged = []
    for nf, tpf in segs:
        if merged and merged[-1][1] == tpf:  # rows are listed per frame, so equal widths simply continue
            merged[-1] = (merged[-1][0] + nf, tpf)
        else:
            merged.append((nf, tpf))
    return tuple(merged), tuple(rows)


class UlyssesGroup:
    """The ranks that share one sequence under Ulysses context parallelism (DeepSpeed-Ulysses,
    arXiv:2309.14509), as the fused forwards use it.

    A forward splits its token sequence with :meth:`shard` (``torch.tensor_split``'s rule, :func:`split_sizes`:
    any token count, also fewer tokens than ranks), runs the per-token work (patch embedding, adaLN, QK norm and
    RoPE on its slice of the global table, MLPs, cross-attention) on its tokens and exchanges only around the
    self-attention (:meth:`SequenceShard.to_heads` / :meth:`SequenceShard.to_seq`).

    Args:
        group: the ``torch.distributed`` process group of the ``world_size`` ranks.
        rank: this process's rank within ``group``.
        world_size: ``ulysses_degree``.
    """

    def __init__(self, group, rank: int, world_size: int):
        self.group, self.rank, self.world_size = group, int(rank), int(world_size)

    def local_heads(self, heads: int) -> int:
        """Heads each rank attends with (``heads / world_size``); ``ValueError`` if that does not divide."""
        if heads % self.world_size:
            raise ValueError(f"the model has {heads} attention heads, not divisible by ulysses_degree="
                             f"{self.world_size}")
        return heads // self.world_size

    def shard(self, segments) -> "SequenceShard":
        """This rank's part of a sequence described by the frame-segment table ``segments``
        (``((frames, tokens_per_frame), ...)``): see :class:`SequenceShard`."""
        segments = tuple((int(f), int(n)) for f, n in segments)
        sizes = tuple(split_sizes(sum(f * n for f, n in segments), self.world_size))
        start = sum(sizes[: self.rank])
        local, rows = local_segments(segments, start, start + sizes[self.rank])
        return SequenceShard(self, sizes, start, start + sizes[self.rank], local, rows)


class _Gather(torch.autograd.Function):
    """All-gather of unequal token shards (an all-to-all that sends the shard to every rank: no padding); the
    backward keeps the local slice of the gradient (every rank holds the same output and the same loss)."""

    @staticmethod
    def forward(ctx, x, sizes, rank, group):
        import torch.distributed._functional_collectives as funcol

        ctx.args = (sizes, rank)
        n = len(sizes)
        send = x.transpose(0, 1).contiguous()  # [s, B, ...]
        send = send.repeat(n, *([1] * (send.ndim - 1)))
        out = funcol.all_to_all_single(send, list(sizes), [x.shape[1]] * n, group)
        return funcol.wait_tensor(out).transpose(0, 1).contiguous()

    @staticmethod
    def backward(ctx, grad):
        sizes, rank = ctx.args
        return grad.narrow(1, sum(sizes[:rank]), sizes[rank]), None, None, None


@dataclasses.dataclass(frozen=True)
class SequenceShard:
    """One rank's contiguous slice ``[start, end)`` of a token sequence and the exchanges of its attention.

    Attributes:
        group: the :class:`UlyssesGroup`.
        sizes: tokens of every rank (:func:`split_sizes` of the sequence length).
        start, end: this rank's token range.
        segments: frame-segment table of the range (:func:`local_segments`: frames cut by the split become
            one-frame segments), for the per-frame ops (``anyflow.ops.adaln_modulate`` and friends).
        rows: per frame of ``segments``, its row in the sequence's per-frame modulation.
    """

    group: UlyssesGroup
    sizes: tuple
    start: int
    end: int
    segments: tuple
    rows: tuple

    @property
    def num_tokens(self) -> int:
        """Tokens of the whole sequence."""
        return sum(self.sizes)

    def tokens(self, x: torch.Tensor, dim: int = 1) -> torch.Tensor:
        """This rank's tokens of a whole-sequence tensor (tokens at ``dim``; e.g. ``[B, S, d]`` or RoPE tables
        ``[S, Dh/2]`` with ``dim=0``)."""
        return x.narrow(dim, self.start, self.end - self.start)

    def take_rows(self, rows: torch.Tensor) -> torch.Tensor:
        """This rank's per-frame rows ``[B, R_local, ...]`` of whole-sequence rows ``[B, R, ...]``."""
        return rows.index_select(1, torch.tensor(self.rows, dtype=torch.long, device=rows.device))

    def to_heads(self, *xs: torch.Tensor) -> tuple:
        """Sequence-sharded -> head-sharded, one all-to-all for all of ``xs``.

        Args:
            xs: tensors ``[B, s_rank, H, D]`` of one shape and dtype (this rank's tokens, all heads; e.g. Q, K
                after QK norm and RoPE, and V).

        Returns:
            One ``[B, S, H/N, D]`` contiguous tensor per input: every token, heads ``rank*H/N : (rank+1)*H/N``.

        Raises:
            ValueError: ``H`` not divisible by the group size, or a token count other than this rank's.
        """
        import torch.distributed._functional_collectives as funcol

        n = self.group.world_size
        x = torch.stack(xs)  # [T, B, s, H, D]
        t, b, s, heads, d = x.shape
        if s != self.end - self.start:
            raise ValueError(f"to_heads: this rank holds {self.end - self.start} tokens, got {s}")
        h = self.group.local_heads(heads)
        send = x.view(t, b, s, n, h, d).permute(3, 2, 0, 1, 4, 5).reshape(n * s, t, b, h, d)  # [dst, token]
        recv = funcol.all_to_all_single_autograd(send, list(self.sizes), [s] * n, self.group.group)
        return recv.permute(1, 2, 0, 3, 4).contiguous().unbind(0)  # [S, T, B, h, D] -> T x [B, S, h, D]

    def to_seq(self, y: torch.Tensor) -> torch.Tensor:
        """Head-sharded -> sequence-sharded: ``[B, S, H/N, D]`` -> ``[B, s_rank, H, D]`` (one all-to-all); the
        inverse of :meth:`to_heads`."""
        import torch.distributed._functional_collectives as funcol

        n, s = self.group.world_size, self.end - self.start
        b, total, h, d = y.shape
        if total != self.num_tokens:
            raise ValueError(f"to_seq: the sequence has {self.num_tokens} tokens, got {total}")
        send = y.transpose(0, 1).contiguous()  # [S, B, h, D], split by destination token ranges
        recv = funcol.all_to_all_single_autograd(send, [s] * n, list(self.sizes), self.group.group)
        return recv.view(n, s, b, h, d).permute(2, 1, 0, 3, 4).reshape(b, s, n * h, d)

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        """All tokens of a sequence-sharded tensor: ``[B, s_rank, ...]`` -> ``[B, S, ...]`` on every rank. The
        backward keeps this rank's slice of the gradient (the loss is the same on every rank)."""
        if x.shape[1] != self.end - self.start:
            raise ValueError(f"gather: this rank holds {self.end - self.start} tokens, got {x.shape[1]}")
        return _Gather.apply(x, self.sizes, self.group.rank, self.group.group)


def ulysses_group(transformer, config=None) -> UlyssesGroup:
    """The :class:`UlyssesGroup` for running ``transformer``'s fused forwards under ``config``.

    Without ``config``, the configuration that :func:`apply_context_parallel` recorded on ``transformer`` is used
    (``anyflow.enable`` honours it); with both, their ``ulysses_degree`` must agree. Validation is that of
    :func:`check_context_parallel` (world size, ring degree, heads divisible by ``ulysses_degree``): it runs
    before any collective, identically on every rank.

    Args:
        transformer: diffusers ``AnyFlowTransformer3DModel`` / ``AnyFlowFARTransformer3DModel``.
        config: ``diffusers.ContextParallelConfig`` (or a ``ParallelConfig`` holding one), or ``None``.

    Raises:
        TypeError, RuntimeError, ValueError: see :func:`check_context_parallel`; ``ValueError`` also when
            ``config`` disagrees with the one applied to ``transformer``; ``ValueError`` when neither exists.
    """
    applied = getattr(transformer, "_parallel_config", None)
    if applied is not None and getattr(applied, "context_parallel_config", None) is not None:
        cfg = applied.context_parallel_config
        if config is not None:
            from diffusers import ParallelConfig

            given = config.context_parallel_config if isinstance(config, ParallelConfig) else config
            if getattr(given, "ulysses_degree", None) != cfg.ulysses_degree:
                raise ValueError(
                    f"context_parallel has ulysses_degree={getattr(given, 'ulysses_degree', given)!r} but "
                    f"apply_context_parallel applied ulysses_degree={cfg.ulysses_degree} to this transformer"
                )
        mesh = cfg._ulysses_mesh
        group = UlyssesGroup(mesh.get_group(), cfg._ulysses_local_rank, cfg.ulysses_degree)
    elif config is None:
        raise ValueError("context_parallel: no ContextParallelConfig given and none applied to the transformer")
    else:
        cfg = check_context_parallel(transformer, config)
        if cfg.mesh is not None:
            mesh = cfg.mesh["ulysses"]
            group = UlyssesGroup(mesh.get_group(), mesh.get_local_rank(), cfg.ulysses_degree)
        else:
            group = UlyssesGroup(dist.group.WORLD, dist.get_rank(), cfg.ulysses_degree)
    group.local_heads(transformer.config.num_attention_heads)
    return group


class _SequenceLayout:
    """The :class:`SequenceShard` of the current forward, shared by the processors of one transformer.

    Set by a forward pre-hook on ``blocks[0]``, which runs before diffusers' split hook and so sees the whole
    sequence; the processors only see their shard and need every rank's shard size for the all-to-all.
    """

    def __init__(self, group: UlyssesGroup):
        self.group = group
        self._shard = None

    def shard(self) -> SequenceShard:
        if self._shard is None:
            raise RuntimeError("anyflow.parallel: the sequence layout is unset; call the transformer, not a block")
        return self._shard

    def pre_hook(self, module, args, kwargs):
        hidden_states = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        self._shard = self.group.shard(((1, hidden_states.shape[1]),))

    def to_heads(self, x: torch.Tensor) -> torch.Tensor:
        return self.shard().to_heads(x)[0]

    def to_seq(self, y: torch.Tensor) -> torch.Tensor:
        return self.shard().to_seq(y)

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        return self.shard().gather(x)

    def local_heads(self, heads: int) -> slice:
        h = heads // self.group.world_size
        return slice(self.group.rank * h, (self.group.rank + 1) * h)


# --------------------------------------------------------------------------------------------------
# Self-attention processors
# --------------------------------------------------------------------------------------------------


class _UlyssesProcessorBase:
    """Shared parts. No ``_attention_backend`` attribute on purpose: ``enable_parallelism`` would then check it
    for context-parallel capability, but these processors run the backend on a whole (head-sliced) sequence
    with no parallel config, so any backend works. ``backend`` is the replaced processor's backend."""

    def __init__(self, layout: _SequenceLayout, backend):
        self.layout = layout
        self.backend = backend

    def _local_qkv(self, attn, hidden_states: torch.Tensor, cast_to=None):
        query = attn.norm_q(attn.to_q(hidden_states))  # RMSNorm across all heads: per token, so local is exact
        key = attn.norm_k(attn.to_k(hidden_states))
        value = attn.to_v(hidden_states)
        if cast_to is not None:
            query, key = query.to(cast_to), key.to(cast_to)
        # [B, s, H, D] -> [B, S, H/N, D] -> [B, H/N, S, D] (the layout of diffusers' RoPE and KV cache code)
        return [self.layout.to_heads(t.unflatten(2, (attn.heads, -1))).transpose(1, 2) for t in (query, key, value)]

    def _finish(self, attn, out_bshd: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        out = self.layout.to_seq(out_bshd.contiguous()).flatten(2, 3).type_as(like)
        return attn.to_out[1](attn.to_out[0](out))


class UlyssesAnyFlowAttnProcessor(_UlyssesProcessorBase):
    """Ulysses self-attention for ``AnyFlowTransformer3DModel`` blocks (replaces ``AnyFlowAttnProcessor``).

    Input ``hidden_states`` ``[B, s_rank, C]`` (this rank's tokens); output the same shape. Q/K/V are projected
    and RMS-normalised locally, exchanged so that each rank holds ``[B, S, H/N, D]``, rotated with the global
    RoPE table ``rotary_emb["query"/"key"]`` ``[1, 1, S, D/2]`` (complex), attended with
    ``dispatch_attention_fn(backend=<the replaced processor's>)`` and exchanged back. Same operations in the same
    order as ``diffusers.models.transformers.transformer_anyflow.AnyFlowAttnProcessor``.

    Raises:
        ValueError: an ``attention_mask`` (the bidirectional model never passes one).
    """

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
        from diffusers.models.attention_dispatch import dispatch_attention_fn
        from diffusers.models.transformers.transformer_anyflow import apply_rotary_emb

        if encoder_hidden_states is not None or attention_mask is not None:
            raise ValueError("UlyssesAnyFlowAttnProcessor: self-attention only, without attention_mask")
        query, key, value = self._local_qkv(attn, hidden_states)
        if rotary_emb is not None:
            query = apply_rotary_emb(query, rotary_emb["query"])
            key = apply_rotary_emb(key, rotary_emb["key"])
        out = dispatch_attention_fn(
            query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2),
            dropout_p=0.0, is_causal=False, backend=self.backend,
        )
        return self._finish(attn, out, query)


class UlyssesAnyFlowCausalAttnProcessor(_UlyssesProcessorBase):
    """Ulysses self-attention for ``AnyFlowFARTransformer3DModel`` blocks (replaces ``AnyFlowCausalAttnProcessor``).

    After the all-to-all each rank holds the whole sequence for its ``H/N`` heads and follows
    ``diffusers.models.transformers.transformer_anyflow_far.AnyFlowCausalAttnProcessor`` unchanged on it:
    cache step (``kv_cache_flag["is_cache_step"]``) writes keys / values ``[B, H/N, tokens, D]`` into the heads
    ``rank*H/N : (rank+1)*H/N`` of the pipeline's ``kv_cache["compressed_cache"/"full_cache"]``
    ``[2, B, H, L, D]``; an inference step prepends those cached heads; the training / cache-step ``BlockMask``
    (global indices, ``H=None``) and the zero padding to a multiple of 128 tokens apply to the global sequence,
    exactly as in one process (this includes diffusers 0.42.1's unmasked padding in the inference step, so the
    result equals single-process *diffusers*, not the official code).

    Memory: the pipeline allocates the cache for all heads; each rank fills only its slice (no 1/N saving here).
    """

    def __call__(
        self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None,
        kv_cache=None, kv_cache_flag=None,
    ):
        import math

        import torch.nn.functional as F
        from diffusers.models.attention_dispatch import dispatch_attention_fn
        from diffusers.models.transformers.transformer_anyflow_far import apply_rotary_emb

        if encoder_hidden_states is not None:
            raise ValueError("UlyssesAnyFlowCausalAttnProcessor: self-attention only")
        target_dtype = hidden_states.dtype
        query, key, value = self._local_qkv(attn, hidden_states, cast_to=target_dtype)
        heads = self.layout.local_heads(attn.heads)
        if kv_cache is not None:
            comp, full = kv_cache["compressed_cache"], kv_cache["full_cache"]
            if kv_cache_flag["is_cache_step"]:
                nc, nf = kv_cache_flag["num_compressed_tokens"], kv_cache_flag["num_full_tokens"]
                comp[0, :, heads, :nc] = key[:, :, :nc]
                comp[1, :, heads, :nc] = value[:, :, :nc]
                full[0, :, heads, :nf] = key[:, :, nc:]
                full[1, :, heads, :nf] = value[:, :, nc:]
            else:
                ncc, ncf = kv_cache_flag["num_cached_compressed_tokens"], kv_cache_flag["num_cached_full_tokens"]
                key = torch.cat([comp[0, :, heads, :ncc], full[0, :, heads, :ncf], key], dim=2)
                value = torch.cat([comp[1, :, heads, :ncc], full[1, :, heads, :ncf], value], dim=2)
        if rotary_emb is not None:
            query = apply_rotary_emb(query, rotary_emb["query"])
            key = apply_rotary_emb(key, rotary_emb["key"])

        # diffusers pads the (global) sequence to a multiple of 128 for the flex BlockMask and the head dim to 16
        seq_len, head_dim = query.shape[2], query.shape[3]
        pad = int(math.ceil(seq_len / 128.0) * 128 - seq_len)
        if pad > 0:
            zeros = query.new_zeros(query.shape[0], query.shape[1], pad, head_dim)
            query, key, value = (torch.cat([t, zeros], dim=2) for t in (query, key, value))
        head_pad = max(0, 16 - head_dim)
        scale = 1.0 / (head_dim**0.5) if head_pad > 0 else None
        if head_pad > 0:
            query, key, value = (F.pad(t, (0, head_pad)) for t in (query, key, value))
        out = dispatch_attention_fn(
            query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2),
            attn_mask=attention_mask, dropout_p=0.0, is_causal=False, scale=scale, backend=self.backend,
        )
        if head_pad > 0:
            out = out[..., :head_dim]
        if pad > 0:
            out = out[:, :seq_len]
        return self._finish(attn, out, query)


# --------------------------------------------------------------------------------------------------
# Plan, checks, entry point
# --------------------------------------------------------------------------------------------------


def _model_kind(transformer) -> str:
    from diffusers import AnyFlowFARTransformer3DModel, AnyFlowTransformer3DModel

    if isinstance(transformer, AnyFlowFARTransformer3DModel):
        return "far"
    if isinstance(transformer, AnyFlowTransformer3DModel):
        return "bidirectional"
    raise TypeError(
        "transformer must be a diffusers AnyFlowTransformer3DModel or AnyFlowFARTransformer3DModel, "
        f"got {type(transformer).__name__}"
    )


def context_parallel_plan(transformer) -> dict:
    """The diffusers context-parallel split plan that :func:`apply_context_parallel` installs.

    * ``blocks.0``: split ``hidden_states`` ``[B, S, C]`` along tokens (dim 1);
    * ``blocks.*``: split ``temb`` (the per-token modulation ``[B, S, 6, C]``) along tokens in every block (the
      model passes one global tensor to all blocks).

    Values are ``diffusers.models._modeling_parallel.ContextParallelInput``. The gather is not in the plan:
    :func:`apply_context_parallel` all-gathers the last block's output ``[B, s_rank, C]`` with a hook of its own
    (diffusers' ``ContextParallelOutput`` gather of unequal shards fails on gloo), so ``norm_out`` / ``proj_out`` and
    FAR's output slicing run on the whole sequence with the global ``temb``. RoPE, the FAR ``BlockMask`` and the
    KV cache are not split: the Ulysses processors use them whole.

    Raises:
        TypeError: not an AnyFlow transformer.
    """
    from diffusers.models._modeling_parallel import ContextParallelInput

    _model_kind(transformer)
    return {
        "blocks.0": {"hidden_states": ContextParallelInput(split_dim=1, expected_dims=3)},
        "blocks.*": {"temb": ContextParallelInput(split_dim=1, expected_dims=4)},
    }


def check_context_parallel(transformer, config):
    """Validate ``config`` for ``transformer`` on this process; no collective is issued.

    Every condition depends only on the model config, ``config`` and the world size, so all ranks of a job
    raise the same error at the same point and none is left waiting in a collective.

    Args:
        transformer: diffusers ``AnyFlowTransformer3DModel`` / ``AnyFlowFARTransformer3DModel``.
        config: ``diffusers.ContextParallelConfig`` or ``diffusers.ParallelConfig`` holding one.

    Returns:
        The ``ContextParallelConfig``.

    Raises:
        TypeError: not an AnyFlow transformer, or ``config`` of another type / without a context-parallel part.
        RuntimeError: ``torch.distributed`` not initialised, or parallelism already applied to ``transformer``.
        ValueError: ``ring_degree > 1`` (ring attention needs an attention kernel that returns the log-sum-exp,
            and FAR's masked cache step cannot be ring-split; only Ulysses is implemented), a tensor-parallel part,
            ``ulysses_degree`` different from the world size (or from the ``"ulysses"`` dim of ``config.mesh``),
            or attention heads not divisible by ``ulysses_degree``.
    """
    from diffusers import ContextParallelConfig, ParallelConfig

    _model_kind(transformer)
    if isinstance(config, ParallelConfig):
        if config.tensor_parallel_config is not None:
            raise ValueError("config: tensor parallelism is not supported together with anyflow.parallel")
        config = config.context_parallel_config
    if not isinstance(config, ContextParallelConfig):
        raise TypeError(f"config must be a diffusers ContextParallelConfig, got {type(config).__name__}")
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(
            "torch.distributed is not initialised: launch with torchrun and call "
            "torch.distributed.init_process_group() before apply_context_parallel"
        )
    if getattr(transformer, "_parallel_config", None) is not None:
        raise RuntimeError(f"parallelism is already applied to this {type(transformer).__name__}")
    if config.ring_degree != 1:
        raise ValueError(
            f"config.ring_degree must be 1, got {config.ring_degree}: anyflow.parallel implements Ulysses only "
            "(ring attention needs an attention kernel that returns the log-sum-exp, and FAR's masked cache step "
            "cannot be split into ring passes with diffusers' hooks)"
        )
    n = config.ulysses_degree
    world = dist.get_world_size()
    if config.mesh is not None:
        if "ulysses" not in (config.mesh.mesh_dim_names or ()) or config.mesh["ulysses"].size() != n:
            raise ValueError(f"config.mesh must have a 'ulysses' dimension of size ulysses_degree={n}")
    elif n != world:
        raise ValueError(
            f"config.ulysses_degree={n} does not match the world size {world}: launch "
            f"torchrun --nproc_per_node {n} or set ulysses_degree={world}"
        )
    heads = transformer.config.num_attention_heads
    if heads % n != 0:
        raise ValueError(
            f"{type(transformer).__name__} has {heads} attention heads, not divisible by ulysses_degree={n}: "
            f"Ulysses gives each rank heads/ulysses_degree heads; use a degree that divides {heads}"
        )
    return config


def apply_context_parallel(transformer, config) -> None:
    """Run a diffusers AnyFlow transformer with Ulysses context parallelism over ``config.ulysses_degree`` ranks.

    Call it on every rank of a ``torchrun`` job after ``torch.distributed.init_process_group`` and after the
    model is on its device, before sampling. Pass the same inputs (prompt, seed, generator) on every rank;
    every rank then gets the full, identical output of one process (fp32: relative error ~1e-7, see
    ``tests/test_parallel.py``), so the pipeline's scheduler, VAE and output code run unchanged (redundantly).

    What it does (module docstring for why ``enable_parallelism`` alone cannot): validates
    (:func:`check_context_parallel`); builds the ``("ring", "ulysses")`` DeviceMesh (or takes ``config.mesh``) and
    sets ``transformer._parallel_config`` like ``ModelMixin.enable_parallelism``; replaces every ``attn1``
    processor with :class:`UlyssesAnyFlowAttnProcessor` / :class:`UlyssesAnyFlowCausalAttnProcessor` (keeping its
    attention backend); installs diffusers' split / gather hooks with :func:`context_parallel_plan`.

    The model keeps a copy of ``config`` with ``ulysses_anything=True``: that makes diffusers' hooks split with
    ``tensor_split`` and gather shards of unequal size, so token counts not divisible by ``ulysses_degree``
    (1,560 tokens per 480p frame on 16 ranks, FAR chunks of 1 or 2 frames, compressed frames) work without
    padding any attention. The user's ``config`` object is not modified.

    Args:
        transformer: diffusers ``AnyFlowTransformer3DModel`` or ``AnyFlowFARTransformer3DModel`` (not enabled by
            ``anyflow.enable``).
        config: ``diffusers.ContextParallelConfig(ulysses_degree=N)`` (or a ``ParallelConfig`` holding one).

    Raises:
        TypeError, RuntimeError, ValueError: see :func:`check_context_parallel`; all before any collective.
    """
    from diffusers import ParallelConfig
    from diffusers.hooks.context_parallel import apply_context_parallel as install_hooks
    from diffusers.models.transformers.transformer_anyflow import AnyFlowAttnProcessor
    from diffusers.models.transformers.transformer_anyflow_far import AnyFlowCausalAttnProcessor

    config = check_context_parallel(transformer, config)
    kind = _model_kind(transformer)
    expected = AnyFlowCausalAttnProcessor if kind == "far" else AnyFlowAttnProcessor
    for i, block in enumerate(transformer.blocks):
        if type(block.attn1.processor) is not expected:
            raise TypeError(
                f"blocks.{i}.attn1 uses {type(block.attn1.processor).__name__}, expected diffusers' "
                f"{expected.__name__} (apply_context_parallel works on un-enabled diffusers models)"
            )

    config = dataclasses.replace(config, ulysses_anything=True)
    device_type = torch._C._get_accelerator().type
    mesh = config.mesh or dist.device_mesh.init_device_mesh(
        device_type, config.mesh_shape, mesh_dim_names=config.mesh_dim_names
    )
    rank, world = dist.get_rank(), dist.get_world_size()
    count = torch.accelerator.device_count() if device_type != "cpu" else 0
    device = torch.device(device_type, rank % count) if count else torch.device(device_type)
    parallel = ParallelConfig(context_parallel_config=config)
    parallel.setup(rank, world, device, mesh=mesh)

    layout = _SequenceLayout(UlyssesGroup(config._ulysses_mesh.get_group(), config._ulysses_local_rank,
                                          config.ulysses_degree))
    cls = UlyssesAnyFlowCausalAttnProcessor if kind == "far" else UlyssesAnyFlowAttnProcessor
    for block in transformer.blocks:
        block.attn1.set_processor(cls(layout, block.attn1.processor._attention_backend))
    transformer.blocks[0].register_forward_pre_hook(layout.pre_hook, with_kwargs=True)
    transformer.blocks[-1].register_forward_hook(lambda module, args, output: layout.gather(output))
    install_hooks(transformer, config, context_parallel_plan(transformer))
    transformer._parallel_config = parallel
