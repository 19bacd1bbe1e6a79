"""Data-parallel training with FSDP2 (``torch.distributed.fsdp.fully_shard``).

:func:`shard_model` shards an :func:`anyflow.enable`-d transformer per block and at the root;
:class:`ShardedForward` is the training forward for it (the model is called as a module so FSDP's
hooks gather parameters and reduce-scatter gradients); :func:`all_reduce_sum` is the ``all_reduce``
of :func:`anyflow.training.flowmap.flow_map_loss` (the re-scaling mean over the global batch).

Each process computes the loss of its own slice of the global batch, averaged over that slice;
FSDP averages the gradients over processes, so with equal slices the result is the gradient of the
global-batch mean, as one process on the whole batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist

from ..models import fused
from .flowmap import BidirectionalForward


def shard_model(model: torch.nn.Module, mp_policy=None) -> torch.nn.Module:
    """Apply FSDP2 ``fully_shard`` to every transformer block, then to the root (in place).

    Args:
        model: an ``AnyFlowTransformer3DModel`` / ``AnyFlowFARTransformer3DModel`` enabled with
            :func:`anyflow.enable` (its blocks must run anyflow's forward when called as modules).
        mp_policy: optional ``torch.distributed.fsdp.MixedPrecisionPolicy``, e.g.
            ``MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)`` for bf16
            parameters in the forward and fp32 gradient reduction; ``None``: the parameters' dtype.

    Returns:
        ``model`` (its class and its blocks' classes now FSDP subclasses; parameters are sharded DTensors).
    """
    from torch.distributed.fsdp import fully_shard

    if not all(getattr(b, "_anyflow_block", False) for b in model.blocks):
        raise TypeError("shard_model needs a transformer enabled with anyflow.enable(model)")
    kw = {} if mp_policy is None else {"mp_policy": mp_policy}
    for block in model.blocks:
        fully_shard(block, **kw)
    fully_shard(model, **kw)
    return model


@dataclass
class ShardedForward(BidirectionalForward):
    """:class:`~anyflow.training.flowmap.BidirectionalForward` of a :func:`shard_model`-ed model.

    The model is called as a module, ``model(...)``, so FSDP's hooks run. The text projection must
    run inside that call too (FSDP reduces the root's gradients once the gradient of the root's
    inputs is complete), so the :class:`~anyflow.models.fused.TextContext` of this forward carries
    the raw prompt embeddings ``[B, L, text_dim]`` and every call projects them (row selection and
    concatenation commute with the per-token projection). The ops backend is the one given to
    :func:`anyflow.enable` (the ``backend`` argument of a call is ignored).
    """

    def prepare_text(self, text: torch.Tensor) -> fused.TextContext:
        return fused.TextContext(text, text.dtype)

    def __call__(self, z, t, r, text, backend: Optional[str] = None):
        return self.model(z, t, r, text.tokens, return_dict=False)[0]


def all_reduce_sum(t: torch.Tensor, group=None) -> torch.Tensor:
    """Sum ``t`` over the processes of ``group`` (a copy; ``t`` is unchanged)."""
    out = t.clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM, group=group)
    return out
