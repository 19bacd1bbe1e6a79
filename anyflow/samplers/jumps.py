"""The flow-map jump loop, in one place: ``z_r = z_t - (t - r) / 1000 * u(z_t, t, r)`` over a list of time pairs.

Every sampler (bidirectional, each FAR chunk), every training rollout (forward-phase sampling, the
on-policy shortcut rollouts of Flow Map Backward Simulation) and the consistency sampler run this loop; what
differs between them is how the mean velocity u is obtained (``velocity``) and, for multistep consistency
sampling, a re-noising policy applied after each jump. The update is :func:`anyflow.ops.euler_shortcut`
(fp32 master latent, CFG combine when the velocity has batch 2B, clean context frames copied through).
Source: the AnyFlow paper's flow-map sampling with any number of steps; NVlabs/AnyFlow
pipeline_wan_anyflow.py / pipeline_far_wan_anyflow.py (``__call__``, ``training_rollout``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch

from .. import ops

#: ``velocity(i, z, t, r) -> u``: the mean velocity for jump i from the fp32 master latent ``z``
#: ``[B, F, C, H, W]`` and the Python-float times t > r in [0, 1000]; ``u`` is ``[B, F, C, H, W]``, or
#: ``[2B, F, C, H, W]`` stacked ``[uncond; cond]`` for classifier-free guidance, in any float dtype.
Velocity = Callable[[int, torch.Tensor, float, float], torch.Tensor]


@dataclass
class Jumps:
    """Result of :func:`flow_map_jumps`: ``latents`` fp32 ``[B, F, C, H, W]`` and the NFEs spent."""

    latents: torch.Tensor
    nfe: int


def flow_map_jumps(
    velocity: Velocity,
    z: torch.Tensor,
    time_pairs: Sequence[tuple[float, float]],
    *,
    guidance_scale: float = 1.0,
    num_context_frames: int = 0,
    renoise: Optional[Callable[[int, torch.Tensor], torch.Tensor]] = None,
    on_step: Optional[Callable[[int, float, torch.Tensor], Optional[torch.Tensor]]] = None,
    interrupted: Optional[Callable[[], bool]] = None,
) -> Jumps:
    """Run the flow-map jumps ``time_pairs`` from ``z``.

    Args:
        velocity: ``velocity(i, z, t, r) -> u`` (see :data:`Velocity`); one call is one NFE.
        z: ``[B, F, C, H, W]`` start latents (copied to fp32; gradients flow through when they require them).
        time_pairs: ``[(t, r), ...]`` in [0, 1000] with t >= r (:func:`anyflow.samplers.schedule.pairs_of`);
            pairs with t == r are skipped (no NFE).
        guidance_scale: CFG scale, used when ``u`` has batch 2B.
        num_context_frames: leading clean frames (I2V / V2V context) that every jump leaves unchanged.
        renoise: ``renoise(i, z) -> z`` after jump i (multistep consistency sampling re-noises the clean
            estimate to the next time); ``None`` for flow-map sampling.
        on_step: ``on_step(i, t, z)`` after jump i; may return replacement latents (diffusers callback semantics).
        interrupted: checked before every jump; ``True`` skips the remaining jumps.

    Returns:
        :class:`Jumps`.

    Raises:
        ValueError: a pair with r > t, or ``z`` not 5-D.
    """
    if z.ndim != 5:
        raise ValueError(f"z must be [B, F, C, H, W], got shape {tuple(z.shape)}")
    z = z.float()
    nfe = 0
    for i, (t, r) in enumerate(time_pairs):
        if interrupted is not None and interrupted():
            break
        if r > t:
            raise ValueError(f"time_pairs[{i}] = ({t}, {r}) jumps backwards: r must be <= t")
        if t == r:
            continue
        u = velocity(i, z, t, r)
        nfe += 1
        z = ops.euler_shortcut(z, u, t, r, guidance_scale=guidance_scale, num_context_frames=num_context_frames)
        if renoise is not None:
            z = renoise(i, z)
        if on_step is not None:
            new = on_step(i, t, z)
            if new is not None:
                z = new.float()
    return Jumps(z, nfe)
