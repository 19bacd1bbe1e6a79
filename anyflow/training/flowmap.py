"""Forward (pretrain) flow-map objective of AnyFlow, bidirectional and FAR (NVlabs/AnyFlow
trainer_wan_anyflow_pretrain.py,
NVlabs/AnyFlow trainer_far_wan_anyflow_pretrain.py).

The student is a flow map u(z_t, t, r): ``z_r = z_t - (t - r) / 1000 * u``. With v = eps - x the
flow-matching velocity of a sample, its mean-velocity target is ``v - (t - r) dU/dt`` where dU/dt is
the total derivative of u along the probability-flow trajectory through z_t (``dz/dt = v / 1000``),
computed without gradient by a central finite difference (the official method, half step epsilon = 5
in 1000-units) or by forward-mode autodiff (``derivative="jvp"``).

Units: timesteps in [0, 1000] (sigma = t / 1000); latents ``[B, F, C, H, W]``; per-frame times
``[B, F]``; text ``[B, L, D]`` or a :class:`anyflow.models.blocks.TextContext`.

Every model call goes through :mod:`anyflow.models` (the op layer), so the backward kernels of
the backend in effect (:class:`anyflow.ops.backend`; the trainer enters ``config.backend``) are
exercised. The functions here are pure in the sense that all randomness comes from an explicit
``torch.Generator`` (CPU), which makes training reproducible and resumable.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import torch

from .. import ops
from ..models.bidirectional import bidirectional_forward
from ..models.blocks import TextContext, prepare_text, under_backend
from ..models.far import check_chunk_partition, far_sequence_forward, split_chunks
from ..samplers.jumps import flow_map_jumps
from ..samplers.schedule import pairs_of, shift_sigma, time_grid
from .config import TEACHER_TIMESTEPS, FARConfig, FlowMapConfig

KIND_DIFFUSION, KIND_CONSISTENCY, KIND_FREE = 0, 1, 2
KIND_NAMES = ("diffusion", "consistency", "free")
#: Floor of the loss re-scaling denominator (NVlabs/AnyFlow trainer_wan_anyflow_pretrain.py, loss re-scaling).
RESCALE_EPS = 1e-5


# -- weighting (NVlabs/AnyFlow scheduling_flowmap_euler_discrete.py) -------------------------------
def weight_table(weight_type: str, shift: float = 5.0, num_train_timesteps: int = 1000):
    """The training-weight table over the 1001-point shifted grid (NVlabs/AnyFlow scheduling_flowmap_euler_discrete.py).

    ``gaussian``: y = exp(-2 ((x - 500) / 1000)^2), y -= min y, w = y * 1000 / sum y;
    ``beta08``: tau = x / 1000, y = tau sqrt(1 - tau), w = y * 1000 / sum y (0 at both ends, max near
    t = 667); ``uniform``: w = 1.

    Returns:
        ``(grid [1001], weights [1001])`` float64, grid decreasing from 1000 to 0.

    Raises:
        ValueError: unknown ``weight_type``.
    """
    grid = time_grid(num_train_timesteps, shift, num_train_timesteps)
    n = float(num_train_timesteps)
    if weight_type == "uniform":
        return grid, torch.ones_like(grid)
    if weight_type == "gaussian":
        y = torch.exp(-2 * ((grid - n / 2) / n) ** 2)
        y = y - y.min()
    elif weight_type == "beta08":
        tau = grid / n
        y = tau * torch.sqrt(1 - tau)
    else:
        raise ValueError(f"weight_type must be 'beta08', 'gaussian' or 'uniform', got {weight_type!r}")
    return grid, y * (n / y.sum())


class TrainWeighting:
    """Per-timestep loss weight: nearest grid point of :func:`weight_table` (ties: the larger t).

    Args:
        weight_type: ``"beta08"``, ``"gaussian"`` or ``"uniform"``.
        shift: flow shift of the grid.
    """

    def __init__(self, weight_type: str, shift: float = 5.0, num_train_timesteps: int = 1000):
        self.weight_type = weight_type
        self.grid, self.weights = weight_table(weight_type, shift, num_train_timesteps)
        self._on_device = {}

    def __call__(self, t: torch.Tensor) -> torch.Tensor:
        """Weights of ``t`` (any shape, in [0, 1000]) as fp32 on ``t``'s device (no host sync)."""
        if t.device not in self._on_device:
            self._on_device[t.device] = (self.grid.to(t.device), self.weights.to(t.device, torch.float32))
        grid, weights = self._on_device[t.device]
        flat = t.detach().reshape(-1).to(torch.float64)
        idx = torch.argmin((grid[:, None] - flat[None, :]).abs(), dim=0)
        return weights[idx].reshape(t.shape)


# -- sampling of pairs, noise, text dropout (NVlabs/AnyFlow trainer_wan_anyflow_pretrain.py) -------
@dataclass
class TimePairs:
    """One (t, r) pair per sample.

    Attributes:
        t, r: ``[B]`` fp32 in [0, 1000], r <= t.
        kind: ``[B]`` int64: :data:`KIND_DIFFUSION` (r = t), :data:`KIND_CONSISTENCY` (r = 0) or
            :data:`KIND_FREE`.
    """

    t: torch.Tensor
    r: torch.Tensor
    kind: torch.Tensor

    def per_frame(self, num_frames: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(t, r)`` repeated over frames: ``[B, F]`` each (fresh tensors, safe to edit)."""
        b = self.t.shape[0]
        return self.t[:, None].expand(b, num_frames).clone(), self.r[:, None].expand(b, num_frames).clone()


def pair_kinds(batch: int, diffusion_ratio: float, consistency_ratio: float, rank: int = 0, world_size: int = 1):
    """Kind of every local sample from its global index ``j = rank * batch + b`` (NVlabs/AnyFlow
    trainer_wan_anyflow_pretrain.py, pair kinds).

    ``j < round(d * Bg)``: diffusion; ``j < round(d * Bg) + round(c * Bg)``: consistency; else free
    (Bg = world_size * batch; Python's round, as the official trainer). Deterministic by index, so
    with several processes whole ranks can be diffusion-only.

    Returns:
        ``[batch]`` int64.
    """
    bg = batch * world_size
    n_d = round(diffusion_ratio * bg)
    n_c = round(consistency_ratio * bg)
    j = rank * batch + torch.arange(batch)
    return torch.where(j < n_d, KIND_DIFFUSION, torch.where(j < n_d + n_c, KIND_CONSISTENCY, KIND_FREE))


def sample_time_pairs(batch: int, cfg: FlowMapConfig, shift: float, generator: torch.Generator, rank: int = 0,
                      world_size: int = 1) -> TimePairs:
    """Draw (t, r) (NVlabs/AnyFlow trainer_wan_anyflow_pretrain.py, pair sampling): u1, u2 ~ U[0, 1), t = max,
    r = min; r = t for diffusion samples, r = 0 for consistency samples; then ``t <- 1000 shift(t)``, ``r <- 1000
    shift(r)``.

    With ``cfg.bf16_timesteps`` the draws and the shift are computed in bf16 (the official trainer's
    dtype; see :attr:`FlowMapConfig.bf16_timesteps`); the result is fp32 either way.
    """
    kind = pair_kinds(batch, cfg.diffusion_ratio, cfg.consistency_ratio, rank, world_size)
    u = torch.rand(2, batch, generator=generator)
    if cfg.bf16_timesteps:
        u = u.bfloat16()
    t, r = u.max(0).values, u.min(0).values
    r = torch.where(kind == KIND_DIFFUSION, t, torch.where(kind == KIND_CONSISTENCY, torch.zeros_like(r), r))
    t, r = shift_sigma(t, shift) * 1000, shift_sigma(r, shift) * 1000
    return TimePairs(t.float(), r.float(), kind)


def sample_logit_normal(batch: int, shift: float, generator: torch.Generator) -> torch.Tensor:
    """``[B]`` fp32 t = 1000 shift(sigmoid(n)), n ~ N(0, 1) (teacher / critic / bidirectional modeling)."""
    return shift_sigma(torch.sigmoid(torch.randn(batch, generator=generator)), shift) * 1000


def sample_teacher_timesteps(batch: int, shift: float, generator: torch.Generator,
                             distribution: str = "logit_normal") -> torch.Tensor:
    """``[B]`` fp32 teacher timesteps: ``"logit_normal"`` (the official draw, NVlabs/AnyFlow trainer_wan_teacher.py)
    or ``"uniform"`` (t = 1000 shift(u), u ~ U(0, 1): every noise level gets samples; at shift 1 the logit-normal
    draw leaves t > 950 almost untrained, see docs/anystep).

    Raises:
        ValueError: unknown ``distribution``.
    """
    if distribution == "logit_normal":
        return sample_logit_normal(batch, shift, generator)
    if distribution == "uniform":
        return shift_sigma(torch.rand(batch, generator=generator), shift) * 1000
    raise ValueError(f"distribution must be one of {TEACHER_TIMESTEPS}, got {distribution!r}")


def drop_text(text: torch.Tensor, negative: torch.Tensor, ratio: float, generator: torch.Generator):
    """Replace each sample's prompt by the negative embedding with probability ``ratio`` (NVlabs/AnyFlow
    trainer_wan_anyflow_pretrain.py, text dropout).

    Args:
        text: ``[B, L, D]`` prompt embeddings.
        negative: ``[L, D]``, ``[1, L, D]`` or ``[B, L, D]`` negative-prompt embedding.

    Returns:
        ``(text [B, L, D], dropped [B] bool)``. One coin per sample is always drawn.
    """
    negative = expand_negative(negative, text)
    dropped = torch.rand(text.shape[0], generator=generator) < ratio
    mask = dropped.to(text.device)[:, None, None]
    return torch.where(mask, negative, text), dropped


def expand_negative(negative: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``negative`` as ``[B, L, D]`` like ``like`` (an explicit expand; the official code broadcasts batch 1)."""
    if negative.ndim == 2:
        negative = negative[None]
    if negative.ndim != 3 or negative.shape[1:] != like.shape[1:] or negative.shape[0] not in (1, like.shape[0]):
        raise ValueError(f"negative must be [L, D], [1, L, D] or [B, L, D] matching text {tuple(like.shape)}, "
                         f"got {tuple(negative.shape)}")
    return negative.to(like.device, like.dtype).expand(like.shape[0], -1, -1)


def noise_latents(x: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """``z_t = sigma eps + (1 - sigma) x``, sigma = t / 1000 per frame (``t`` ``[B, F]``), in x's dtype."""
    sigma = (t.float() / 1000)[:, :, None, None, None]
    return (sigma * noise.float() + (1 - sigma) * x.float()).to(x.dtype)


# -- model wrappers: one call signature for the bidirectional and the FAR training forward ---------
def _take_text(text: TextContext, index: torch.Tensor) -> TextContext:
    return TextContext(text.tokens[index.to(text.tokens.device)], text.raw_dtype)


def cat_text(texts: Sequence[TextContext]) -> TextContext:
    """Concatenate projected prompts along the batch."""
    return TextContext(torch.cat([t.tokens for t in texts]), texts[0].raw_dtype)


@dataclass
class BidirectionalForward:
    """``u = forward(z [B, F, C, H, W], t [B, F], r [B, F], text) -> [B, F, C, H, W]`` of a bidirectional
    model (also a FAR model used bidirectionally: same submodules, full patches, dense attention)."""

    model: torch.nn.Module

    def __call__(self, z, t, r, text):
        return bidirectional_forward(self.model, z, t, r, text)

    def take(self, index: torch.Tensor) -> "BidirectionalForward":
        """The wrapper for batch rows ``index`` (nothing per-row to select here)."""
        return self


@dataclass
class FARWindowForward:
    """FAR training forward on a window of noisy chunks (NVlabs/AnyFlow transformer_far_wan_model.py
    ``_forward_train``; NVlabs/AnyFlow trainer_far_wan_anyflow_pretrain.py).

    The sequence is ``[compressed clean context (t = r = 0) | noisy window | clean copy of the window
    (t = 0)]`` with the training mask; the call takes and returns only the window frames.

    Attributes:
        model: ``AnyFlowFARTransformer3DModel``.
        chunk_partition: chunks of context + window (``cp[:n]``).
        context: ``[B, F_ctx, C, H, W]`` clean latents of the compressed chunks (F_ctx may be 0).
        clean: ``[B, F_win, C, H, W]`` clean latents of the window (the clean copy).
        full_limit: chunks at full resolution (the window), ``full_chunk_limit``.
    """

    model: torch.nn.Module
    chunk_partition: Sequence[int]
    context: torch.Tensor
    clean: torch.Tensor
    full_limit: int

    def sequence(self, z, t, r):
        """The model inputs of a call: ``(hidden [B, F_ctx + F_win, C, H, W], t, r [B, F_ctx + F_win],
        clean [B, F_win, C, H, W], clean_t [B, F_win])``, context at t = r = 0, in ``z``'s dtype."""
        b, fc = z.shape[0], self.context.shape[1]
        zeros = t.new_zeros(b, fc)
        hidden = torch.cat([self.context.to(z.dtype), z], 1) if fc else z
        return (hidden, torch.cat([zeros, t], 1), torch.cat([zeros, r], 1), self.clean.to(z.dtype),
                t.new_zeros(b, self.clean.shape[1]))

    def __call__(self, z, t, r, text):
        hidden, tt, rr, clean, clean_t = self.sequence(z, t, r)
        return far_sequence_forward(self.model, hidden, self.chunk_partition, tt, rr, text, full_limit=self.full_limit,
                                    clean_hidden_states=clean, clean_timestep=clean_t)

    def take(self, index: torch.Tensor) -> "FARWindowForward":
        """The wrapper for batch rows ``index`` (context and clean copy selected alike; repeats allowed;
        same class, so a sharded subclass stays sharded)."""
        index = index.to(self.clean.device)
        return dataclasses.replace(self, context=self.context[index], clean=self.clean[index])


def sample_num_chunks(far: FARConfig, generator: torch.Generator) -> int:
    """Chunks n of one FAR training step (NVlabs/AnyFlow trainer_far_wan_anyflow_pretrain.py, chunk sampling): with
    probability ``long_context_ratio`` n ~ U{limit, ..., len(cp)}, else n = limit (limit = ``full_chunk_limit``,
    capped at the number of chunks). Both draws are always made, so the generator advances alike."""
    total = len(far.chunk_partition)
    lim = min(far.full_chunk_limit, total)
    coin = torch.rand((), generator=generator).item() < far.long_context_ratio
    n = int(torch.randint(lim, total + 1, (), generator=generator))
    return n if coin else lim


def far_window(latents: torch.Tensor, chunk_partition: Sequence[int], num_chunks: int, full_limit: int):
    """Split the first ``num_chunks`` chunks of a clip into context and window.

    Returns:
        ``(cp[:n], context [B, F_ctx, C, H, W], window [B, F_win, C, H, W])``: the last
        ``min(n, full_limit)`` chunks form the window, earlier chunks the compressed context.
    """
    cp = check_chunk_partition(chunk_partition)
    if not 1 <= num_chunks <= len(cp):
        raise ValueError(f"num_chunks must be in [1, {len(cp)}], got {num_chunks}")
    cp = cp[:num_chunks]
    if latents.shape[1] < sum(cp):
        raise ValueError(f"latents have {latents.shape[1]} frames, the chunks {cp} need {sum(cp)}")
    nc, _ = split_chunks(num_chunks, full_limit)
    fc = sum(cp[:nc])
    return cp, latents[:, :fc], latents[:, fc : sum(cp)]


# -- the mean-velocity target ----------------------------------------------------------------------
def _no_grad_passes(forward, z, v, t, r, text, negative, rows, cfg: FlowMapConfig):
    """The passes of one step that take no gradient, batched into one forward where possible.

    Returns ``(u_uncond [B, ...] or None, dU/dt [len(rows), ...] fp32 or None)``, dU/dt per 1000-unit
    of t and divided by the guidance scale g (NVlabs/AnyFlow trainer_wan_anyflow_pretrain.py, guidance fusion).
    """
    g = cfg.fuse_guidance_scale
    b, n_sel = z.shape[0], int(rows.numel())
    parts = []  # (rows, z, t, r, text) of each slice of the batched forward
    if g != 1.0:
        if negative is None:
            raise ValueError("guidance fusion (fuse_guidance_scale != 1) needs the negative text")
        parts.append((torch.arange(b), z, t, r, negative))
    fd = n_sel > 0 and cfg.derivative == "fd"
    sel = (z[rows], v[rows], t[rows], r[rows], _take_text(text, rows))  # the rows whose dU/dt is needed
    if fd:
        eps = float(cfg.epsilon)
        zs, vs, ts, rs, text_sel = sel
        dz = (vs.float() * (eps / 1000)).to(z.dtype)
        t_plus, t_minus = ts + eps, ts - eps
        if cfg.bf16_timesteps:  # the official trainer adds epsilon to bf16 timesteps
            t_plus, t_minus = t_plus.bfloat16().float(), t_minus.bfloat16().float()
        parts += [(rows, zs + dz, t_plus, rs, text_sel), (rows, zs - dz, t_minus, rs, text_sel)]
    u_uncond = derivative = None
    with torch.no_grad():
        if parts:
            index, zz, tt, rr, texts = zip(*parts)
            out = forward.take(torch.cat(index))(torch.cat(zz), torch.cat(tt), torch.cat(rr), cat_text(texts))
            if g != 1.0:
                u_uncond, out = out[:b], out[b:]
            if fd:
                derivative = (out[:n_sel].float() - out[n_sel:].float()) / (2 * eps * g)
        if n_sel and cfg.derivative == "jvp":
            derivative = jvp_derivative(forward.take(rows), *sel) / g
    return u_uncond, derivative


def jvp_derivative(forward, z, v, t, r, text) -> torch.Tensor:
    """Exact total derivative ``dU/dt = d/dt u(z + (v / 1000) dt, t + dt, r)`` by forward-mode AD.

    Tangent ``(v / 1000, 1)`` w.r.t. ``(z, t)`` through :func:`torch.func.jvp`, with no gradient and
    attention on the math SDPA path (forward AD has no formula for the fused kernels). The op layer runs
    under ``ops.backend("torch")`` (the Triton/CUDA kernels have no forward-mode rule).

    Returns:
        ``[B, F, C, H, W]`` fp32, per 1000-unit of t.
    """

    def fn(z_, t_):
        return forward(z_, t_, r, text)

    tangent = ((v.float() / 1000).to(z.dtype), torch.ones_like(t))
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), ops.backend("torch"):
        _, du = torch.func.jvp(fn, (z, t), tangent)
    return du.float()


def finite_difference_derivative(forward, z, v, t, r, text, epsilon: float = 5.0) -> torch.Tensor:
    """Central difference ``(u(z + v e / 1000, t + e, r) - u(z - v e / 1000, t - e, r)) / (2 e)`` (NVlabs/AnyFlow
    trainer_wan_anyflow_pretrain.py, guidance fusion) without gradient; ``[B, F, C, H, W]`` fp32 per 1000-unit of t."""
    cfg = FlowMapConfig(epsilon=epsilon, derivative="fd", fuse_guidance_scale=1.0)
    return _no_grad_passes(forward, z, v, t, r, _as_context(forward, text), None, torch.arange(z.shape[0]), cfg)[1]


def _as_context(forward, text):
    if isinstance(text, TextContext):
        return text
    prepare = getattr(forward, "prepare_text", None)  # e.g. a sharded model (anyflow.training.distributed)
    return prepare(text) if prepare is not None else prepare_text(forward.model, text)


def _sample_rows(t: torch.Tensor, r: torch.Tensor, forward=None) -> torch.Tensor:
    """Samples whose target needs dU/dt: some frame with t != r (the rest are multiplied by zero).

    A forward with ``uniform_calls`` (a sharded model, :mod:`anyflow.training.distributed`) gets every
    row: FSDP's collectives need the same model calls on every process, and a process whose slice holds
    only diffusion samples would otherwise skip the derivative pass (for those rows t - r = 0, so the
    target is unchanged).
    """
    if getattr(forward, "uniform_calls", False):
        return torch.arange(t.shape[0])
    return torch.nonzero((t != r).any(dim=1).cpu()).flatten()


def mean_velocity_target(forward, z, v, t, r, text, cfg: FlowMapConfig) -> torch.Tensor:
    """``v - (t - r) dU/dt`` per frame (NVlabs/AnyFlow trainer_wan_anyflow_pretrain.py, mean-velocity target),
    fp32, no gradient.

    dU/dt is computed only for samples with some frame where t != r; the others get ``v`` exactly
    (their derivative term is multiplied by zero). dU/dt is divided by the guidance scale g, as the
    official objective does for the guidance-fused prediction.
    """
    text = _as_context(forward, text)
    rows = _sample_rows(t, r, forward)
    _, du = _no_grad_passes(forward, z, v, t, r, text, None, rows, dataclasses.replace(cfg, fuse_guidance_scale=1.0))
    return _target(v, t, r, rows, None if du is None else du / cfg.fuse_guidance_scale)


def _target(v, t, r, rows, du) -> torch.Tensor:
    """fp32 ``v - (t - r) du`` on the samples ``rows`` (``du`` ``[len(rows), ...]``), ``v`` on the others."""
    target = v.float().clone()
    if rows.numel():
        dev_rows = rows.to(v.device)
        target[dev_rows] = target[dev_rows] - (t[dev_rows] - r[dev_rows]).float()[:, :, None, None, None] * du
    return target


# -- losses ----------------------------------------------------------------------------------------
def rescale_losses(losses: torch.Tensor, is_diffusion: torch.Tensor,
                   all_reduce: Optional[Callable[[torch.Tensor], torch.Tensor]] = None, eps: float = RESCALE_EPS):
    """Adaptive normalisation of the non-diffusion losses (NVlabs/AnyFlow trainer_wan_anyflow_pretrain.py, loss
    re-scaling).

    Every non-diffusion ``l_b`` becomes ``l_b * sg(m / (l_b + eps))`` with m the mean diffusion loss
    over the global batch: its value is ~m and its gradient ``(m / (l_b + eps)) grad l_b``. Without any
    diffusion sample in the global batch the losses are returned unchanged (the official code divides
    by zero there).

    Args:
        losses: ``[B]`` per-sample losses (with graph).
        is_diffusion: ``[B]`` bool.
        all_reduce: sums a ``[2]`` tensor ``(sum, count)`` over processes (``None``: one process).
    """
    ld = losses.detach().float()
    mask = is_diffusion.to(losses.device)
    stats = torch.stack([(ld * mask).sum(), mask.float().sum()])
    if all_reduce is not None:
        stats = all_reduce(stats)
    mean_d = stats[0] / stats[1].clamp(min=1)
    factor = torch.where(mask | (stats[1] == 0), torch.ones_like(ld), mean_d / (ld + eps))
    return losses * factor.to(losses.dtype)


@dataclass
class LossOutput:
    """A scalar loss and detached per-sample statistics for logging.

    Attributes:
        loss: scalar to backpropagate.
        per_sample: ``[B]`` fp32 losses before re-scaling (detached).
        stats: floats for the log (``loss``, ``loss_<kind>`` means, ...).
    """

    loss: torch.Tensor
    per_sample: torch.Tensor
    stats: dict = field(default_factory=dict)


def guidance_fuse(u_cond: torch.Tensor, u_uncond: Optional[torch.Tensor], g: float) -> torch.Tensor:
    """``U_hat = (U_c - (1 - g) U_u) / g`` (NVlabs/AnyFlow trainer_wan_anyflow_pretrain.py, guidance fusion): the
    prediction whose CFG with scale g is U_c."""
    if u_uncond is None or g == 1.0:
        return u_cond
    return (u_cond - (1 - g) * u_uncond.to(u_cond.dtype)) / g


def flow_map_loss(forward, x: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, r: torch.Tensor, kind: torch.Tensor,
                  text, negative, cfg: FlowMapConfig, weighting: TrainWeighting,
                  all_reduce: Optional[Callable] = None) -> LossOutput:
    """The forward flow-map loss of one batch (NVlabs/AnyFlow trainer_wan_anyflow_pretrain.py).

    Args:
        forward: :class:`BidirectionalForward` or :class:`FARWindowForward`.
        x: ``[B, F, C, H, W]`` clean latents of the frames being denoised.
        noise: ``[B, F, C, H, W]`` standard normal noise.
        t, r: ``[B, F]`` per-frame time pair in [0, 1000].
        kind: ``[B]`` pair kind (:data:`KIND_DIFFUSION` samples define the re-scaling mean).
        text: ``[B, L, D]`` prompt embeddings (after dropout) or a TextContext (with grad).
        negative: ``[B, L, D]`` negative embedding or TextContext (needed when g != 1).
        cfg: objective settings; weighting: the per-timestep weight.
        all_reduce: sum over processes for the re-scaling mean (``None``: one process).

    Computes ``z_t``; U_c with gradient; without gradient the unconditional U_u (guidance fusion) and
    dU/dt of the samples with t != r (one batched forward for the finite difference); per-frame
    ``l_bf = mean_{C,H,W} (U_hat - target)^2`` in fp32, ``l_b = mean_f w(t_f) l_bf``, re-scaled, and
    the batch mean. (With per-frame weights the official ``mean(l) * w(t)`` is the same number whenever
    all frames of a sample share t, which holds for every released configuration; for I2V, where
    frame 0 has t = 0 and weight 0, the conditioning frame drops out of the loss.)
    """
    text = _as_context(forward, text)
    if negative is not None:
        with torch.no_grad():
            negative = _as_context(forward, negative)
    z = noise_latents(x, noise, t)
    v = noise.float() - x.float()
    u_cond = forward(z, t, r, text)
    rows = _sample_rows(t, r, forward)
    u_uncond, du = _no_grad_passes(forward, z, v, t, r, text, negative, rows, cfg)
    u_hat = guidance_fuse(u_cond, u_uncond, cfg.fuse_guidance_scale)
    per_frame = (u_hat.float() - _target(v, t, r, rows, du)).pow(2).mean(dim=(2, 3, 4))
    per_sample = (per_frame * weighting(t)).mean(dim=1)
    losses = per_sample
    if cfg.rescale:
        losses = rescale_losses(per_sample, kind == KIND_DIFFUSION, all_reduce)
    loss = losses.mean()
    ps = per_sample.detach()
    stats = {"loss": float(loss.detach()), "derivative_samples": int(rows.numel())}
    stats.update(kind_loss_stats(ps, kind))
    return LossOutput(loss, ps, stats)


def kind_loss_stats(per_sample: torch.Tensor, kind: torch.Tensor) -> dict:
    """``{"_kind_loss_sums": [...], "_kind_counts": [...]}`` over :data:`KIND_NAMES`: the pieces of the
    per-kind mean losses, summable over processes (:func:`kind_losses` turns them into ``loss_<kind>``)."""
    sel = kind.to(per_sample.device)[None, :] == torch.arange(len(KIND_NAMES), device=per_sample.device)[:, None]
    sums = (sel * per_sample.double()[None, :]).sum(dim=1)
    return {"_kind_loss_sums": sums.tolist(), "_kind_counts": sel.sum(dim=1).tolist()}


def kind_losses(stats: dict, all_reduce=None) -> None:
    """Replace :func:`kind_loss_stats`' entries of ``stats`` by ``loss_<kind>`` means (kinds present only),
    summed over processes first when ``all_reduce`` is given (a global-batch figure)."""
    if "_kind_loss_sums" not in stats:
        return
    both = torch.tensor(stats.pop("_kind_loss_sums") + stats.pop("_kind_counts"), dtype=torch.float64)
    if all_reduce is not None:
        both = all_reduce(both)
    n = len(KIND_NAMES)
    for name, total, count in zip(KIND_NAMES, both[:n].tolist(), both[n:].tolist()):
        if count > 0:
            stats[f"loss_{name}"] = total / count


def flow_matching_loss(forward, x, noise, t, text, negative=None, guidance_scale: float = 1.0) -> LossOutput:
    """Plain flow-matching loss at r = t: ``mean (U_hat(z_t, t, t) - (eps - x))^2`` unweighted, fp32.

    The teacher objective (NVlabs/AnyFlow trainer_wan_teacher.py, g = 1) and the FAR bidirectional-modeling loss
    (NVlabs/AnyFlow trainer_far_wan_anyflow_pretrain.py, FAR variant, guidance-fused with the student's own
    unconditional prediction when g != 1).

    Args:
        t: ``[B, F]`` per-frame timesteps in [0, 1000].
    """
    text = _as_context(forward, text)
    z = noise_latents(x, noise, t)
    u_cond = forward(z, t, t, text)
    u_uncond = None
    if guidance_scale != 1.0:
        if negative is None:
            raise ValueError("guidance_scale != 1 needs the negative text")
        with torch.no_grad():
            u_uncond = forward(z, t, t, _as_context(forward, negative))
    u_hat = guidance_fuse(u_cond, u_uncond, guidance_scale)
    per_sample = (u_hat.float() - (noise.float() - x.float())).pow(2).mean(dim=(1, 2, 3, 4))
    loss = per_sample.mean()
    return LossOutput(loss, per_sample.detach(), {"loss": float(loss.detach())})


# -- one step's batch preparation (bidirectional / FAR) --------------------------------------------
@dataclass
class StepInputs:
    """Everything random about one forward-objective step, drawn from the training generator."""

    forward: object
    x: torch.Tensor
    noise: torch.Tensor
    t: torch.Tensor
    r: torch.Tensor
    kind: torch.Tensor
    text: torch.Tensor
    dropped: torch.Tensor
    num_chunks: Optional[int] = None


def prepare_bidirectional(
    model, latents, text, negative, cfg: FlowMapConfig, *, shift: float, drop_text_ratio: float,
    generator: torch.Generator, rank: int = 0, world_size: int = 1,
) -> StepInputs:
    """Text dropout, (t, r) pairs, the I2V coin (``t[:, 0] = 0``, r kept, as the official trainer does) and noise
    for a bidirectional step. Draw order: text coins, pairs, I2V coin, noise."""
    return _step_inputs(BidirectionalForward(model), latents, text, negative, cfg, shift, drop_text_ratio, generator,
                        rank, world_size)


def prepare_far(
    model, latents, text, negative, cfg: FlowMapConfig, far: FARConfig, *, shift: float, drop_text_ratio: float,
    generator: torch.Generator, rank: int = 0, world_size: int = 1,
) -> StepInputs:
    """A FAR step (NVlabs/AnyFlow trainer_far_wan_anyflow_pretrain.py, chunk sampling): chunk count n, window = last
    ``full_chunk_limit`` chunks of ``cp[:n]`` with one (t, r) per sample, compressed clean context before it, clean
    copy of the window. Draw order: chunk count, text coins, pairs, noise (of the window)."""
    n = sample_num_chunks(far, generator)
    cp, context, window = far_window(latents, far.chunk_partition, n, far.full_chunk_limit)
    return _step_inputs(FARWindowForward(model, cp, context, window, far.full_chunk_limit), window, text, negative,
                        cfg, shift, drop_text_ratio, generator, rank, world_size, n)


def _step_inputs(forward, x, text, negative, cfg: FlowMapConfig, shift, drop_text_ratio, generator, rank, world_size,
                 num_chunks=None) -> StepInputs:
    """Text coins, pairs, the I2V coin (bidirectional steps only: no ``num_chunks``) and noise of a step that
    denoises ``x``, drawn in this order."""
    text, dropped = drop_text(text, negative, drop_text_ratio, generator)
    pairs = sample_time_pairs(x.shape[0], cfg, shift, generator, rank, world_size)
    t, r = pairs.per_frame(x.shape[1])
    if num_chunks is None and torch.rand((), generator=generator).item() < cfg.i2v_prob:
        t[:, 0] = 0
    noise = torch.randn(x.shape, generator=generator).to(x.device, x.dtype)
    return StepInputs(forward, x, noise, t.to(x.device), r.to(x.device), pairs.kind, text, dropped, num_chunks)


def bidirectional_modeling_loss(
    model, latents, text, negative, *, shift: float, guidance_scale: float, generator: torch.Generator,
    forward=None, rows: Optional[torch.Tensor] = None,
) -> LossOutput:
    """FAR's extra bidirectional flow-matching loss on the whole clip (NVlabs/AnyFlow
    trainer_far_wan_anyflow_pretrain.py, bidirectional co-training):
    t ~ logit-normal then shifted, r = t, guidance-fused, unweighted MSE to v.

    ``forward`` replaces ``BidirectionalForward(model)`` (e.g. the sharded forward of
    :mod:`anyflow.training.distributed`); with ``rows`` the draws are made for the whole (global) batch
    and the loss is computed on those rows only (one process's slice).
    """
    b, f = latents.shape[:2]
    t = sample_logit_normal(b, shift, generator)[:, None].expand(b, f).to(latents.device)
    noise = torch.randn(latents.shape, generator=generator).to(latents.device, latents.dtype)
    neg = expand_negative(negative, text)
    if rows is not None:
        latents, text, t, noise, neg = (a[rows.to(a.device)] for a in (latents, text, t, noise, neg))
    forward = BidirectionalForward(model) if forward is None else forward
    return flow_matching_loss(forward, latents, noise, t, text, neg, guidance_scale)


# -- sampling with a flow map (for evaluation) -----------------------------------------------------
@torch.no_grad()
def flow_map_sample(forward, noise: torch.Tensor, text, num_steps: int, shift: float = 5.0,
                    timesteps: Optional[Sequence[float]] = None) -> torch.Tensor:
    """N-step flow-map sampling ``z_{t_{i+1}} = z_{t_i} - (t_i - t_{i+1}) / 1000 u(z_{t_i}, t_i, t_{i+1})``
    (NVlabs/AnyFlow ``WanAnyFlowPipeline.__call__`` without CFG) through
    :func:`anyflow.samplers.jumps.flow_map_jumps`, fp32 master latent.

    Args:
        forward: ``u = forward(z, t [B, F], r [B, F], text)``, e.g. :class:`BidirectionalForward`; called
            with ``z`` in the dtype of ``forward.model``'s parameters and fp32 times in [0, 1000].
        noise: ``[B, F, C, H, W]`` initial noise (t = 1000).
        text: ``[B, L, D]`` prompt embeddings or a TextContext.
        num_steps: N (NFE), on :func:`anyflow.samplers.schedule.time_grid` with ``shift``.
        timesteps: custom decreasing grid in [0, 1000] ending at 0 (replaces the N-step grid).

    Returns:
        ``[B, F, C, H, W]`` fp32 latents at t = 0.

    Raises:
        ValueError: ``num_steps`` < 1 (without ``timesteps``).
    """
    grid = time_grid(num_steps, shift) if timesteps is None else timesteps
    return torch_jumps(model_velocity(forward, text), noise, pairs_of(grid)).latents


def torch_jumps(velocity, z: torch.Tensor, time_pairs, **kwargs):
    """:func:`anyflow.samplers.jumps.flow_map_jumps` (same arguments) whose updates run on the torch backend
    (autograd sees them) and whose ``velocity`` calls on the op backend in effect (:class:`anyflow.ops.backend`)."""
    velocity = under_backend(ops.registry.requested_backend(), velocity)
    with ops.backend("torch"):
        return flow_map_jumps(velocity, z, time_pairs, **kwargs)


def model_velocity(forward, text):
    """``velocity(i, z, t, r)`` of :func:`anyflow.samplers.jumps.flow_map_jumps` from a training forward:
    ``forward(z in the model dtype, t [B, F], r [B, F] fp32, text)``."""
    text = _as_context(forward, text)
    dtype = next(forward.model.parameters()).dtype

    def velocity(i, z, t, r):
        b, f = z.shape[:2]
        return forward(z.to(dtype), torch.full((b, f), t, device=z.device), torch.full((b, f), r, device=z.device),
                       text)

    return velocity


# -- the training phases of the forward objective (run by anyflow.training.trainer.Trainer) --------
def is_far(model) -> bool:
    """Whether ``model`` is an ``AnyFlowFARTransformer3DModel`` (it has FAR's compressed patch embedding)."""
    return hasattr(model, "far_patch_embedding")


class Phase:
    """One phase's training step on a :class:`anyflow.training.trainer.Trainer`, which owns the loop, the
    optimisers, EMA, checkpoints and logs; the phase draws the step's randomness from ``trainer.generator``
    and builds its losses. This base runs one student update on the losses :meth:`losses` yields for the
    next batch (teacher, pretrain and consistency phases).

    Args:
        trainer: the :class:`~anyflow.training.trainer.Trainer` (its ``cfg``, ``model``, ``negative``,
            ``generator`` and data-parallel helpers are read).
    """

    def __init__(self, trainer):
        self.trainer = trainer

    def losses(self, latents: torch.Tensor, text: torch.Tensor):
        """Yield the :class:`LossOutput` of one step on ``latents [B, F, C, H, W]``, ``text [B, L, D]`` (the
        global batch) one by one: each is backpropagated before the next is built."""
        raise NotImplementedError

    def step(self, device: torch.device, record: dict) -> None:
        """One optimiser step; its statistics go into ``record``."""
        tr = self.trainer
        tr.update_student(self.losses(*tr.next_batch(device)), record, device)
        tr.average_losses(record)

    def local(self, forward, *tensors) -> tuple:
        """``(forward, *tensors)`` on this process's rows of a step drawn for the global batch (``tensors``
        batch-first), the forward sharded where its model is."""
        tr = self.trainer
        rows = tr.rows(tensors[0].shape[0])
        if rows is not None:
            forward = forward.take(rows)
        return (tr.sharded(forward), *tr.take(rows, *tensors))


def window_forward(trainer, latents: torch.Tensor, text: torch.Tensor):
    """Text dropout, then for a FAR student a chunk count and its window (context + noisy chunks): the draws
    of a teacher or consistency step, in this order. Returns ``(forward, x, text)`` with ``x`` the clean
    latents to denoise (the window, or the whole clip for a bidirectional student)."""
    cfg, g = trainer.cfg, trainer.generator
    text, _ = drop_text(text, trainer.negative, cfg.drop_text_ratio, g)
    if not trainer.far:
        return BidirectionalForward(trainer.model), latents, text
    n = sample_num_chunks(cfg.far, g)
    cp, context, window = far_window(latents, cfg.far.chunk_partition, n, cfg.far.full_chunk_limit)
    return FARWindowForward(trainer.model, cp, context, window, cfg.far.full_chunk_limit), window, text


class TeacherPhase(Phase):
    """Phase ``teacher``: plain flow matching at r = t (:func:`flow_matching_loss`; NVlabs/AnyFlow
    ``far/trainers/trainer_wan_teacher.py``), t from :func:`sample_teacher_timesteps`."""

    def losses(self, latents, text):
        tr = self.trainer
        fwd, x, text = window_forward(tr, latents, text)
        b, f = x.shape[:2]
        t = sample_teacher_timesteps(b, tr.cfg.shift, tr.generator, tr.cfg.teacher_timesteps)[:, None].expand(b, f)
        noise = torch.randn(x.shape, generator=tr.generator).to(x.device, x.dtype)
        yield flow_matching_loss(*self.local(fwd, x, noise, t.to(x.device), text))


class PretrainPhase(Phase):
    """Phase ``pretrain``: the forward flow-map loss (NVlabs/AnyFlow
    ``far/trainers/trainer_wan_anyflow_pretrain.py`` / ``trainer_far_wan_anyflow_pretrain.py``),
    bidirectional or FAR, plus FAR's bidirectional-modeling loss with probability
    ``far.bidirectional_modeling_prob``, on the same prompts after text dropout (the official FAR
    ``pixel_loss`` drops them in place before both losses). The on-policy phase co-trains with it."""

    def __init__(self, trainer):
        super().__init__(trainer)
        self.weighting = TrainWeighting(trainer.cfg.flowmap.weight_type, trainer.cfg.shift)

    def losses(self, latents, text):
        tr = self.trainer
        cfg, g, fmc = tr.cfg, tr.generator, tr.cfg.flowmap
        # drawn for the global batch (pair kinds by global index), then this process's rows
        kw = dict(shift=cfg.shift, drop_text_ratio=cfg.drop_text_ratio, generator=g)
        if tr.far:
            si = prepare_far(tr.model, latents, text, tr.negative, fmc, cfg.far, **kw)
        else:
            si = prepare_bidirectional(tr.model, latents, text, tr.negative, fmc, **kw)
        fwd, x, noise, t, r, kind, text = self.local(si.forward, si.x, si.noise, si.t, si.r, si.kind, si.text)
        neg = expand_negative(tr.negative, text) if fmc.fuse_guidance_scale != 1.0 else None
        out = flow_map_loss(fwd, x, noise, t, r, kind, text, neg, fmc, self.weighting, tr.all_reduce)
        if si.num_chunks is not None:
            out.stats["num_chunks"] = si.num_chunks
        yield out
        if tr.far and torch.rand((), generator=g).item() < cfg.far.bidirectional_modeling_prob:
            extra = bidirectional_modeling_loss(  # on the global batch's prompts after dropout
                tr.model, latents, si.text, tr.negative, shift=cfg.shift, guidance_scale=fmc.fuse_guidance_scale,
                generator=g, forward=tr.sharded(BidirectionalForward(tr.model)),
                rows=tr.rows(latents.shape[0]))
            extra.stats = {"loss_bidirectional": extra.stats["loss"]}
            yield extra
