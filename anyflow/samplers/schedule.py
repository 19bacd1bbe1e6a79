"""The flow-map time grid, in one place: the shifted grid of an N-step sampler and its (t, r) pairs.

Every sampler, training rollout, consistency sampler and the any-step study take their grid from
:func:`time_grid`; :func:`time_pairs` reads a diffusers ``FlowMapEulerDiscreteScheduler`` (its shift, or
the custom sigmas / timesteps a pipeline call passes). Timesteps are in [0, 1000], sigma = t / 1000.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch


def shift_sigma(s, shift: float):
    """Flow shift ``k s / (1 + (k - 1) s)`` of sigma ``s`` in [0, 1] (identity for k = 1; AnyFlow §3, the
    shift of diffusers ``FlowMapEulerDiscreteScheduler``).

    Works on Python floats and tensors; a tensor keeps its dtype (bf16 arithmetic rounds every op,
    which is how the official trainer's bf16 timesteps come about).
    """
    if shift == 1.0:
        return s
    return shift * s / (1 + (shift - 1) * s)


def time_grid(num_steps: int, shift: float = 1.0, num_train_timesteps: int = 1000) -> torch.Tensor:
    """``[N + 1]`` float64 grid ``num_train_timesteps * shift(linspace(1, 0, N + 1))``, from 1000 down to 0.

    The grid of diffusers ``FlowMapEulerDiscreteScheduler.set_timesteps(N)`` (equal to it in float64) and of
    the official trainer's rollouts. Jump i goes from ``grid[i]`` to ``grid[i + 1]``.

    Raises:
        ValueError: ``num_steps`` is not an int >= 1.
    """
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1:
        raise ValueError(f"num_steps must be an int >= 1, got {num_steps!r}")
    s = torch.linspace(1.0, 0.0, num_steps + 1, dtype=torch.float64)
    return shift_sigma(s, shift) * num_train_timesteps


def pairs_of(grid) -> list[tuple[float, float]]:
    """``[(grid[0], grid[1]), (grid[1], grid[2]), ...]`` as Python floats (a tensor is read once)."""
    values = grid.tolist() if isinstance(grid, torch.Tensor) else [float(v) for v in grid]
    return list(zip(values[:-1], values[1:]))


def _decreasing(name: str, values: Sequence[float], low: float, high: float) -> list[float]:
    try:
        vals = [float(v) for v in values]
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a sequence of numbers, got {values!r}") from None
    if not vals:
        raise ValueError(f"{name} must not be empty")
    if any(not (low <= v <= high) for v in vals):
        raise ValueError(f"{name} must lie in [{low}, {high}], got {vals}")
    if any(b >= a for a, b in zip(vals, vals[1:])):
        raise ValueError(f"{name} must be strictly decreasing (noisy to clean), got {vals}")
    return vals


def time_pairs(
    scheduler,
    num_inference_steps: Optional[int] = None,
    sigmas: Optional[Sequence[float]] = None,
    timesteps: Optional[Sequence[float]] = None,
) -> list[tuple[float, float]]:
    """The (t, r) jumps of a sampler, in [0, 1000], from a diffusers ``FlowMapEulerDiscreteScheduler``.

    The grid is the scheduler's own: :func:`time_grid` with its shift, or the custom ``sigmas`` /
    ``timesteps`` (shifted by the scheduler, the terminal 0 appended); jump i goes from t_i to t_{i+1}.

    Args:
        scheduler: the pipeline's ``FlowMapEulerDiscreteScheduler`` (its state is reset).
        num_inference_steps: N in [1, 1000]; ignored when ``sigmas`` or ``timesteps`` is given.
        sigmas: custom decreasing sigmas in (0, 1] (the shift is applied on top, as in diffusers).
        timesteps: custom decreasing timesteps in (0, 1000].

    Returns:
        ``[(t_0, t_1), (t_1, t_2), ...]`` as Python floats; pairs with t == r are kept (callers skip them).

    Raises:
        ValueError / TypeError: steps < 1 or > 1000, non-integer steps, empty or non-decreasing
            custom schedules, both ``sigmas`` and ``timesteps``.
    """
    if sigmas is not None and timesteps is not None:
        raise ValueError("pass either sigmas or timesteps, not both")
    if sigmas is not None:
        sigmas = _decreasing("sigmas", sigmas, 0.0, 1.0)
        num_inference_steps = len(sigmas)
    elif timesteps is not None:
        timesteps = _decreasing("timesteps", timesteps, 0.0, float(scheduler.config.num_train_timesteps))
        num_inference_steps = len(timesteps)
    else:
        if isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, int):
            raise TypeError(f"num_inference_steps must be an int, got {num_inference_steps!r}")
        if not 1 <= num_inference_steps <= 1000:
            raise ValueError(f"num_inference_steps must be in [1, 1000], got {num_inference_steps}")
    scheduler.set_timesteps(num_inference_steps, device="cpu", sigmas=sigmas, timesteps=timesteps)
    if sigmas is None and timesteps is None:
        return pairs_of(time_grid(num_inference_steps, scheduler.config.shift, scheduler.config.num_train_timesteps))
    return pairs_of(scheduler.sigmas.to(torch.float64) * scheduler.config.num_train_timesteps)
