"""Fused operations of the AnyFlow engine, each with a plain PyTorch reference.

Every op validates its arguments, then dispatches through :mod:`anyflow.ops.registry` to the
``"torch"``, ``"triton"`` or ``"cuda"`` backend (``backend="auto"`` by default; ``ANYFLOW_BACKEND``
overrides). The ``"torch"`` implementations are the specification the kernels are tested against.
"""

from . import registry
from . import _cuda, _triton_attention, _triton_elementwise  # noqa: F401  (register backends; load nothing yet)
from .attention import (
    AttentionLayout,
    chunk_causal_attention,
    chunk_causal_layout,
    far_attention_layout,
    segmented_attention,
)
from .conditioning import (
    adaln_modulate,
    delta_time,
    gated_residual,
    residual_norm,
    time_pair_embedding,
    timestep_sinusoid,
)
from .euler import euler_shortcut
from .registry import BackendUnavailableError
from .rope import apply_rope, qk_norm_rope, rope_angles, rope_pair_split, rope_table

__all__ = [
    "AttentionLayout",
    "BackendUnavailableError",
    "adaln_modulate",
    "apply_rope",
    "chunk_causal_attention",
    "chunk_causal_layout",
    "delta_time",
    "euler_shortcut",
    "far_attention_layout",
    "gated_residual",
    "qk_norm_rope",
    "residual_norm",
    "registry",
    "rope_angles",
    "rope_pair_split",
    "rope_table",
    "segmented_attention",
    "time_pair_embedding",
    "timestep_sinusoid",
]
