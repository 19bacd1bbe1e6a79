"""Flow-map time-pair conditioning: dual timestep embedding per frame, adaLN modulate, gated residual.

AnyFlow conditions every DiT block on a time pair (t, r) given per latent frame (paper §3; diffusers
``AnyFlowDualTimestepTextImageEmbedding.forward_timestep`` and ``AnyFlowTransformerBlock.forward``). The
official code and diffusers expand the per-frame modulation to a per-token ``[B, N, 6, d]`` tensor and
promote it to fp32 in every block. Here the modulation stays per frame (``[B, R, d]``, R = frames) and
each token finds its frame through a *segment table*: ``((frames, tokens_per_frame), ...)`` in token
order. FAR sequences have several segments with different tokens per frame (compressed context, full
frames, clean copy); the bidirectional model has one.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from . import registry
from ._checks import check_int, check_number, check_same_device, check_segments, check_tensor

Segments = Sequence[Sequence[int]]


# ----------------------------------------------------------------------------------------------
# time-pair embedding
# ----------------------------------------------------------------------------------------------
def timestep_sinusoid(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding ``[cos(t w_k), sin(t w_k)]``, ``w_k = max_period^(-k / (dim/2))``, in fp32.

    Args:
        t: ``[N]`` timesteps in [0, 1000] (any real dtype).
        dim: embedding width (diffusers ``freq_dim``; 256 for Wan).

    Returns:
        ``[N, dim]`` fp32 (cosine half first, as diffusers ``Timesteps(flip_sin_to_cos=True, shift=0)``).
    """
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    angles = t.reshape(-1, 1).float() * freqs[None, :]
    emb = torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


def _mlp(s: torch.Tensor, w1, b1, w2, b2) -> torch.Tensor:
    if s.dtype != w1.dtype and w1.dtype != torch.int8:
        s = s.to(w1.dtype)
    return F.linear(F.silu(F.linear(s, w1, b1)), w2, b2)


@registry.register("time_pair_embedding", "torch")
def _time_pair_embedding_torch(t, delta, time_mlp, delta_mlp, proj, gate, freq_dim, out_dtype):
    temb = _mlp(timestep_sinusoid(t, freq_dim), *time_mlp).to(out_dtype)
    demb = _mlp(timestep_sinusoid(delta, freq_dim), *delta_mlp).to(out_dtype)
    g = gate.to(delta_mlp[0].dtype)
    e = (1 - g) * temb + g * demb
    m = F.linear(F.silu(e), proj[0], proj[1])
    return e, m


def time_pair_embedding(
    t: torch.Tensor,
    delta: torch.Tensor,
    time_mlp: Sequence[torch.Tensor],
    delta_mlp: Sequence[torch.Tensor],
    proj: Sequence[torch.Tensor],
    gate: torch.Tensor,
    *,
    freq_dim: int,
    out_dtype: torch.dtype,
    backend: Optional[str] = None,
):
    """Dual timestep embedding of a time pair, one row per frame.

    ``e = (1 - g) * E_t(S(t)) + g * E_delta(S(delta))`` and ``m = proj(SiLU(e))``, with S the sinusoid
    of :func:`timestep_sinusoid` and E_* the two-layer SiLU MLPs. ``delta`` is ``r`` for
    ``deltatime_type="r"`` and ``t - r`` for ``"t-r"`` (see :func:`delta_time`). Dtypes follow diffusers
    exactly: sinusoids in fp32, cast to each MLP's weight dtype, MLP outputs cast to ``out_dtype`` (the
    text-embedding dtype), ``g`` cast to the delta MLP's dtype.

    Args:
        t, delta: ``[R]`` per-frame timesteps in [0, 1000] (R = batch x frames, flattened).
        time_mlp, delta_mlp: ``(w1 [d, freq_dim], b1 [d], w2 [d, d], b2 [d])`` of ``time_embedder`` /
            ``delta_embedder``.
        proj: ``(w [6d, d], b [6d])`` of ``time_proj``.
        gate: ``[1]`` gate value g (``delta_emb_gate``, 0.25 in the released models).
        freq_dim: sinusoid width.
        out_dtype: dtype of the MLP outputs (diffusers casts them to the text embedding's dtype).
        backend: ``"torch"``, ``"triton"``, ``"cuda"`` or ``"auto"`` (default).

    Returns:
        ``(e [R, d], m [R, 6d])``: ``e`` feeds the output head, ``m`` the blocks' adaLN.

    Raises:
        ValueError / TypeError: shapes or dtypes that do not fit.

    Source: AnyFlow §3 (time-pair conditioning); diffusers ``AnyFlowDualTimestepTextImageEmbedding``.
    """
    check_tensor("t", t, ndim=1, dtypes=None)
    check_tensor("delta", delta, ndim=1, dtypes=None)
    if delta.shape != t.shape:
        raise ValueError(f"t and delta must be 1-D of equal length, got {tuple(t.shape)} and {tuple(delta.shape)}")
    for name, value in (("t", t), ("delta", delta)):
        if value.is_complex() or value.dtype == torch.bool:
            raise TypeError(f"{name} must hold real timesteps, got dtype {value.dtype}")
    freq_dim = check_int("freq_dim", freq_dim, minimum=1)
    if not isinstance(out_dtype, torch.dtype) or not out_dtype.is_floating_point:
        raise TypeError(f"out_dtype must be a floating torch.dtype, got {out_dtype!r}")
    check_tensor("gate", gate, dtypes=None)
    if gate.numel() != 1:
        raise ValueError(f"gate must hold one value (shape [1]), got shape {tuple(gate.shape)}")
    width = _check_mlp("time_mlp", time_mlp, freq_dim)
    if _check_mlp("delta_mlp", delta_mlp, freq_dim) != width:
        raise ValueError(f"delta_mlp must have the width of time_mlp ({width}), got {tuple(delta_mlp[0].shape)}")
    if not isinstance(proj, (list, tuple)) or len(proj) != 2:
        raise ValueError(f"proj must be (w [6d, d], b [6d]), got {len(proj) if hasattr(proj, '__len__') else proj!r}")
    check_tensor("proj[0]", proj[0], ndim=2, dtypes=None)
    check_tensor("proj[1]", proj[1], ndim=1, dtypes=None)
    if proj[0].shape[1] != width or proj[1].shape[0] != proj[0].shape[0]:
        raise ValueError(f"proj must be (w [6d, {width}], b [6d]), got {tuple(proj[0].shape)} and {tuple(proj[1].shape)}")
    check_same_device(t=t, delta=delta, gate=gate, **{f"time_mlp[{i}]": w for i, w in enumerate(time_mlp)},
                      **{f"delta_mlp[{i}]": w for i, w in enumerate(delta_mlp)}, **{"proj[0]": proj[0], "proj[1]": proj[1]})
    return registry.dispatch(
        "time_pair_embedding", backend, t.device.type, t, delta, tuple(time_mlp), tuple(delta_mlp), tuple(proj),
        gate, freq_dim, out_dtype,
    )


def _check_mlp(name: str, mlp, in_features: int) -> int:
    """Check ``(w1 [d, in], b1 [d], w2 [d, d], b2 [d])``; return d."""
    if not isinstance(mlp, (list, tuple)) or len(mlp) != 4:
        raise ValueError(f"{name} must be (w1, b1, w2, b2), got {len(mlp) if hasattr(mlp, '__len__') else mlp!r}")
    for i, (w, ndim) in enumerate(zip(mlp, (2, 1, 2, 1))):
        check_tensor(f"{name}[{i}]", w, ndim=ndim, dtypes=None)
    d = mlp[0].shape[0]
    if mlp[0].shape[1] != in_features:
        raise ValueError(f"{name}[0] must have freq_dim={in_features} input features, got {tuple(mlp[0].shape)}")
    if mlp[1].shape != (d,) or mlp[2].shape != (d, d) or mlp[3].shape != (d,):
        shapes = ", ".join(str(tuple(w.shape)) for w in mlp)
        raise ValueError(f"{name} must be (w1 [{d}, {in_features}], b1 [{d}], w2 [{d}, {d}], b2 [{d}]), got {shapes}")
    return d


def delta_time(t: torch.Tensor, r: torch.Tensor, deltatime_type: str) -> torch.Tensor:
    """The second time input of the flow map: ``r`` (``"r"``, the released models) or ``t - r`` (``"t-r"``).

    Raises:
        ValueError: unknown ``deltatime_type``.
    """
    if deltatime_type == "r":
        return r
    if deltatime_type == "t-r":
        return t - r
    raise ValueError(f"deltatime_type must be 'r' or 't-r', got {deltatime_type!r}")


# ----------------------------------------------------------------------------------------------
# adaLN modulate and gated residual, per frame
# ----------------------------------------------------------------------------------------------
def _per_frame(x, rows, segs):
    """Yield (token slice, row slice, nf, tpf) for every segment."""
    tok = row = 0
    for nf, tpf in segs:
        yield slice(tok, tok + nf * tpf), slice(row, row + nf), nf, tpf
        tok += nf * tpf
        row += nf


def flat_segments(segs) -> list[int]:
    """``((frames, tokens_per_frame), ...)`` -> ``[f0, n0, f1, n1, ...]``: how an op schema (``int[]``) carries
    a segment table to the kernels of both backends."""
    return [int(v) for pair in segs for v in pair]


def _non_empty(segs) -> int:
    return sum(1 for f, _ in segs if f > 0)


registry.describe("adaln_modulate", lambda x, shift, scale, segs, eps: registry.call_of(
    x, (x, shift, scale), segments=_non_empty(segs)))
registry.describe("gated_residual", lambda x, y, gate, segs: registry.call_of(
    x, (x, y, gate), segments=_non_empty(segs)))
registry.describe("residual_norm", lambda x, y, gate, segs, eps, *mod: registry.call_of(
    x, (x, y, gate, *mod), segments=_non_empty(segs)))


@registry.register("adaln_modulate", "torch")
def _adaln_modulate_torch(x, shift, scale, segs, eps):
    b, n, d = x.shape
    normed = F.layer_norm(x.float(), (d,), eps=eps)
    out = torch.empty_like(x)
    for toks, rows, nf, tpf in _per_frame(x, shift, segs):
        if nf == 0:
            continue
        h = normed[:, toks].view(b, nf, tpf, d)
        h = h * (1 + scale[:, rows, None, :].float()) + shift[:, rows, None, :].float()
        out[:, toks] = h.view(b, nf * tpf, d).to(x.dtype)
    return out


def adaln_modulate(
    x: torch.Tensor,
    shift: torch.Tensor,
    scale: torch.Tensor,
    segments: Segments,
    eps: float = 1e-6,
    *,
    backend: Optional[str] = None,
) -> torch.Tensor:
    """adaLN modulate with per-frame modulation: ``LN(x) * (1 + scale[f]) + shift[f]``, math in fp32.

    LayerNorm has no affine parameters (Wan's ``norm1`` / ``norm3`` / ``norm_out``); the result is cast
    to ``x.dtype``.

    Args:
        x: ``[B, N, d]`` activations (fp32 / bf16 / fp16), tokens frame-major.
        shift, scale: ``[B, R, d]`` per-frame modulation (any float dtype; promoted to fp32). For a block
            this is ``scale_shift_table + m`` evaluated per frame, never per token.
        segments: ``((frames, tokens_per_frame), ...)`` in token order; ``sum(frames) == R`` and
            ``sum(frames * tokens_per_frame) == N``.
        eps: LayerNorm epsilon (1e-6 in Wan).
        backend: ``"torch"``, ``"triton"``, ``"cuda"`` or ``"auto"`` (default).

    Returns:
        ``[B, N, d]`` in ``x.dtype``.

    Raises:
        ValueError / TypeError: mismatched shapes, dtypes, devices or a segment table that does not
            cover ``N`` tokens and ``R`` frames.

    Source: diffusers ``AnyFlowTransformerBlock.forward`` (steps 1 and 3) and the output head.
    """
    check_tensor("x", x, ndim=3)
    check_tensor("shift", shift, ndim=3)
    check_tensor("scale", scale, ndim=3)
    if shift.shape != scale.shape or shift.shape[0] != x.shape[0] or shift.shape[2] != x.shape[2]:
        raise ValueError(
            f"shift and scale must be [B, R, d] with B, d of x {tuple(x.shape)}, got {tuple(shift.shape)} and "
            f"{tuple(scale.shape)}"
        )
    check_same_device(x=x, shift=shift, scale=scale)
    segs = check_segments(segments, x.shape[1], shift.shape[1])
    eps = check_number("eps", eps, minimum=0.0)
    return registry.dispatch("adaln_modulate", backend, x.device.type, x, shift, scale, segs, eps)


@registry.register("gated_residual", "torch")
def _gated_residual_torch(x, y, gate, segs):
    b, n, d = x.shape
    out = torch.empty_like(x)
    for toks, rows, nf, tpf in _per_frame(x, gate, segs):
        if nf == 0:
            continue
        xs = x[:, toks].float().view(b, nf, tpf, d)
        ys = y[:, toks].float().view(b, nf, tpf, d)
        out[:, toks] = (xs + ys * gate[:, rows, None, :].float()).view(b, nf * tpf, d).to(x.dtype)
    return out


def gated_residual(
    x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor, segments: Segments, *, backend: Optional[str] = None
) -> torch.Tensor:
    """Gated residual with per-frame gate: ``x + y * gate[f]`` in fp32, cast to ``x.dtype``.

    Args:
        x: ``[B, N, d]`` residual stream.
        y: ``[B, N, d]`` branch output (attention or FFN), any float dtype.
        gate: ``[B, R, d]`` per-frame gate (``scale_shift_table + m``, chunk 2 or 5).
        segments: frame-segment table, as in :func:`adaln_modulate`.
        backend: ``"torch"``, ``"triton"``, ``"cuda"`` or ``"auto"`` (default).

    Returns:
        ``[B, N, d]`` in ``x.dtype``.

    Raises:
        ValueError / TypeError: mismatched shapes, dtypes, devices or segment table.

    Source: diffusers ``AnyFlowTransformerBlock.forward`` (residuals after self-attention and FFN).
    """
    check_tensor("x", x, ndim=3)
    check_tensor("y", y, ndim=3)
    check_tensor("gate", gate, ndim=3)
    if y.shape != x.shape:
        raise ValueError(f"y must have the shape of x {tuple(x.shape)}, got {tuple(y.shape)}")
    if gate.shape[0] != x.shape[0] or gate.shape[2] != x.shape[2]:
        raise ValueError(f"gate must be [B, R, d] with B, d of x {tuple(x.shape)}, got {tuple(gate.shape)}")
    check_same_device(x=x, y=y, gate=gate)
    segs = check_segments(segments, x.shape[1], gate.shape[1])
    return registry.dispatch("gated_residual", backend, x.device.type, x, y, gate, segs)


@registry.register("residual_norm", "torch")
def _residual_norm_torch(x, y, gate, segs, eps, shift, scale, weight, bias):
    b, n, d = x.shape
    if gate is None:
        x_new = (x.float() + y.float()).to(x.dtype)
    else:
        x_new = _gated_residual_torch(x, y, gate, segs)
    w = None if weight is None else weight.float()
    bb = None if bias is None else bias.float()
    if shift is None:
        return x_new, F.layer_norm(x_new.float(), (d,), w, bb, eps).to(x.dtype)
    return x_new, _adaln_modulate_torch(x_new, shift, scale, segs, eps)


def residual_norm(
    x: torch.Tensor,
    y: torch.Tensor,
    gate: Optional[torch.Tensor],
    segments: Segments,
    eps: float = 1e-6,
    *,
    shift: Optional[torch.Tensor] = None,
    scale: Optional[torch.Tensor] = None,
    weight: Optional[torch.Tensor] = None,
    bias: Optional[torch.Tensor] = None,
    backend: Optional[str] = None,
):
    """Residual update fused with the LayerNorm that follows it; returns the new stream and the normed input.

    ``x_new = x + y * gate[f]`` (fp32 math; ``gate=None`` means ``x + y``), cast to ``x.dtype``; then
    ``h = LN(x_new)`` in fp32, either modulated per frame (``* (1 + scale[f]) + shift[f]``, LN without
    affine: Wan's norm1 / norm3 / norm_out) or affine (``weight``, ``bias``: Wan's norm2), cast to
    ``x.dtype``. In a Wan block this covers: self-attention residual + norm2, cross-attention residual
    + norm3 modulate, FFN residual + the next block's norm1 modulate (or the output head).

    Args:
        x, y: ``[B, N, d]`` stream and branch output.
        gate: ``[B, R, d]`` per-frame gate or ``None``.
        segments: frame-segment table (see :func:`adaln_modulate`).
        eps: LayerNorm epsilon.
        shift, scale: ``[B, R, d]`` per-frame modulation (both or neither).
        weight, bias: ``[d]`` affine LayerNorm parameters (only without ``shift``/``scale``; either may
            be ``None``).
        backend: ``"torch"``, ``"triton"``, ``"cuda"`` or ``"auto"`` (default).

    Returns:
        ``(x_new, h)``, both ``[B, N, d]`` in ``x.dtype``.

    Raises:
        ValueError / TypeError: shapes, dtypes, devices, segment table, or modulation and affine
            parameters given together.

    Source: diffusers ``AnyFlowTransformerBlock.forward``, consecutive steps fused.
    """
    check_tensor("x", x, ndim=3)
    check_tensor("y", y, ndim=3)
    if y.shape != x.shape:
        raise ValueError(f"y must have the shape of x {tuple(x.shape)}, got {tuple(y.shape)}")
    rows = None
    if gate is not None:
        check_tensor("gate", gate, ndim=3)
        rows = gate.shape[1]
    if (shift is None) != (scale is None):
        raise ValueError("shift and scale must be given together")
    if shift is not None:
        if weight is not None or bias is not None:
            raise ValueError("give either shift/scale (adaLN) or weight/bias (affine LayerNorm), not both")
        check_tensor("shift", shift, ndim=3)
        check_tensor("scale", scale, ndim=3)
        if shift.shape != scale.shape or (rows is not None and shift.shape[1] != rows):
            raise ValueError(f"shift/scale must be [B, R, d] like gate, got {tuple(shift.shape)} and {tuple(scale.shape)}")
        rows = shift.shape[1]
    for name, p in (("weight", weight), ("bias", bias)):
        if p is not None:
            check_tensor(name, p, ndim=1)
        if p is not None and p.shape != (x.shape[2],):
            raise ValueError(f"{name} must be [{x.shape[2]}], got {tuple(p.shape)}")
    for name, t in (("gate", gate), ("shift", shift)):
        if t is not None and (t.shape[0] != x.shape[0] or t.shape[2] != x.shape[2]):
            raise ValueError(f"{name} must be [B, R, d] with B, d of x {tuple(x.shape)}, got {tuple(t.shape)}")
    check_same_device(x=x, y=y, gate=gate, shift=shift, scale=scale, weight=weight, bias=bias)
    segs = check_segments(segments, x.shape[1], rows)
    eps = check_number("eps", eps, minimum=0.0)
    return registry.dispatch(
        "residual_norm", backend, x.device.type, x, y, gate, segs, eps, shift, scale, weight, bias
    )
