"""Flow-map time grids: the (t, r) pairs of an N-step sampler, validated."""

from __future__ import annotations

from typing import Optional, Sequence

import torch


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

    The grid is the scheduler's own (shifted ``linspace(1, 0, N + 1)`` in float64, or the custom
    ``sigmas`` / ``timesteps`` with the terminal 0 appended); jump i goes from t_i to t_{i+1}.

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
    grid = (scheduler.sigmas.to(torch.float64) * scheduler.config.num_train_timesteps).tolist()
    return list(zip(grid[:-1], grid[1:]))
