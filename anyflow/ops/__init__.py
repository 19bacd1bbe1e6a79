"""Fused operations of the AnyFlow engine, each with a plain PyTorch reference.

Every op validates its arguments, then dispatches through :mod:`anyflow.ops.registry` to the
``"torch"``, ``"triton"`` or ``"cuda"`` backend: the op's ``backend=`` argument, else the innermost
:class:`backend` setting (``with ops.backend("triton"): ...``), else ``ANYFLOW_BACKEND``, else
``"auto"``. The ``"torch"`` implementations are the specification the kernels are tested against.
"""

from . import registry
from . import _cuda, _triton  # noqa: F401  (register backends; load nothing yet)
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
from .registry import BackendUnavailableError, KernelRuntimeError, backend
from .rope import apply_rope, qk_norm_rope, rope_angles, rope_pair_split, rope_table
from .sdpa import (
    SDPA_POLICIES,
    clear_sdpa_choices,
    load_sdpa_choices,
    sdpa,
    sdpa_choices,
    sdpa_policy,
    set_sdpa_policy,
)

__all__ = [
    "AttentionLayout",
    "BackendUnavailableError",
    "KernelRuntimeError",
    "SDPA_POLICIES",
    "adaln_modulate",
    "apply_rope",
    "backend",
    "chunk_causal_attention",
    "chunk_causal_layout",
    "clear_sdpa_choices",
    "delta_time",
    "euler_shortcut",
    "far_attention_layout",
    "gated_residual",
    "load_sdpa_choices",
    "qk_norm_rope",
    "residual_norm",
    "registry",
    "rope_angles",
    "rope_pair_split",
    "rope_table",
    "sdpa",
    "sdpa_choices",
    "sdpa_policy",
    "segmented_attention",
    "set_sdpa_policy",
    "time_pair_embedding",
    "timestep_sinusoid",
]
