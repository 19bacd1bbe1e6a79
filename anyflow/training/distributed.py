"""Data-parallel training with FSDP2 (``torch.distributed.fsdp.fully_shard``).

:func:`shard_model` shards an :func:`anyflow.enable`-d transformer (bidirectional or FAR) per block and
puts its remaining parameters (patch embeddings, time / text embedders, output head) in a root unit that
wraps the transformer. Everything that reads the model runs *inside* that root's ``__call__``
(:func:`run_sharded`), so FSDP's hooks gather the root parameters before and reduce their gradients
after, and the blocks are called as modules (:func:`anyflow.models.blocks.run_blocks`), so each block's
hooks gather and reduce its own parameters. :class:`ShardedForward` and :class:`ShardedFARWindowForward`
are the training forwards of a sharded model (bidirectional, and the FAR window with clean copies and
compressed context); :class:`anyflow.training.onpolicy.FARRollout` routes its KV-cache NFEs and cache
steps through :func:`run_sharded` itself.

Each process computes the loss of its own slice of the global batch, averaged over that slice; FSDP
averages the gradients over processes, so with equal slices the result is the gradient of the
global-batch mean, as one process on the whole batch. Every process must make the same sequence of
model calls (FSDP's collectives pair up by order); the trainer guarantees it by drawing all randomness
for the global batch on every process (same generator) and by :attr:`ShardedForward.uniform_calls`.

FSDP2 x context parallelism (:class:`TrainMesh`, :func:`train_mesh`): the processes form one
``DeviceMesh`` ``(dp_shard, cp)`` of shape ``(world / N, N)``. Batch rows are split over ``dp_shard``
only: the ``N`` processes of one ``cp`` group train on the same rows (and, like every process, draw the
randomness of the global batch from the same generator, so their noise, timesteps and text dropout
agree). The model's tokens are split over ``cp`` by the Ulysses machinery of :mod:`anyflow.parallel`
(given the ``cp`` sub-group); every ``cp`` rank gets the whole output and computes the same loss.
FSDP2 shards the parameters over the *flattened* ``(dp_shard, cp)`` mesh, i.e. over all processes
(see :func:`shard_model` for the choice and for the gradient scaling it needs).

Checkpoint helpers (:func:`full_tensor`, :func:`load_full_`, :func:`gather_optimizer_state`,
:func:`shard_optimizer_state`) convert between sharded ``DTensor`` state and the plain full tensors of
a one-process checkpoint, so checkpoints are the same format whatever the number of processes.
:func:`init_from_env` / :func:`destroy` wrap ``torch.distributed`` set-up for ``torchrun``.

Nothing here initialises ``torch.distributed`` at import.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from dataclasses import dataclass
from typing import Callable, ClassVar, Optional

import torch
import torch.distributed as dist

from ..models import blocks
from ..models.bidirectional import bidirectional_forward
from ..models.blocks import TextContext
from ..models.far import far_sequence_forward
from .flowmap import BidirectionalForward, FARWindowForward

try:
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor, distribute_tensor
except ImportError:  # torch built without distributed
    FSDPModule = DTensor = distribute_tensor = None

#: Attribute of a sharded transformer holding its FSDP root (set by :func:`shard_model`).
_ROOT_ATTR = "_anyflow_fsdp_root"


class _Root(torch.nn.Module):
    """The root FSDP unit of a sharded transformer: ``root(fn, *args)`` runs ``fn(transformer, *args)``
    inside the root's ``__call__`` (so FSDP gathers the transformer's non-block parameters first)."""

    def __init__(self, model: torch.nn.Module, compute_dtype: torch.dtype):
        super().__init__()
        self.transformer = model
        self.compute_dtype = compute_dtype
        self.active = False

    def forward(self, fn, *args, **kwargs):
        return fn(self.transformer, *args, **kwargs)


def _is_fsdp_block(block) -> bool:
    return FSDPModule is not None and isinstance(block, FSDPModule)


@contextlib.contextmanager
def frozen_parameters(params):
    """Temporarily set ``requires_grad=False`` on those of ``params`` that require grad (autograd then
    tracks the inputs only); restored on exit."""
    params = [p for p in params if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in params:
            p.requires_grad_(True)


@contextlib.contextmanager
def _frozen_by_name(module, names):
    """:func:`frozen_parameters` of ``module``'s parameters called ``names``, looked up on entry (under FSDP
    the gathered parameters of that moment, not the shards)."""
    own = dict(module.named_parameters())
    with frozen_parameters([own[n] for n in names if n in own]):
        yield


def checkpoint_block(fn, block, *args):
    """Activation checkpoint of one block whose recompute sees the parameters frozen that were frozen in
    the forward (the ``"mid"`` on-policy rollout freezes the student for one jump and unfreezes it before
    the backward; without the replay the recompute would build a different graph)."""
    frozen = tuple(n for n, p in block.named_parameters() if not p.requires_grad)
    if not frozen:
        return torch.utils.checkpoint.checkpoint(fn, *args, use_reentrant=False)
    context = lambda: (contextlib.nullcontext(), _frozen_by_name(block, frozen))  # noqa: E731
    return torch.utils.checkpoint.checkpoint(fn, *args, use_reentrant=False, context_fn=context)


# run_blocks calls FSDP2 blocks as modules and checkpoints with the freeze replayed (models never import training)
blocks.block_calls.as_module = _is_fsdp_block
blocks.block_calls.checkpoint = checkpoint_block


def mixed_precision_policy(enabled: bool):
    """The FSDP2 mixed-precision policy of a training run, or ``None`` when ``enabled`` is false.

    bf16 parameters in the forward/backward (gathered from fp32 master shards) and fp32 gradient
    reduction: ``MixedPrecisionPolicy(param_dtype=bfloat16, reduce_dtype=float32,
    cast_forward_inputs=False)``. FSDP's input casting is off because it would also cast the
    timesteps to bf16 (the official trainers draw t, r in bf16, a bias not copied here); the sharded forwards cast
    latents and text to bf16 themselves and keep t, r in fp32.
    """
    if not enabled:
        return None
    from torch.distributed.fsdp import MixedPrecisionPolicy

    return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32, cast_forward_inputs=False)


def shard_model(model: torch.nn.Module, mp_policy=None, mesh: Optional["TrainMesh"] = None) -> torch.nn.Module:
    """Apply FSDP2 ``fully_shard`` to every transformer block and to a root unit around the model (in place).

    Call it after LoRA injection and the choice of trainable parameters, before building the optimiser
    (whose parameters must be the sharded ones). The root unit is resharded after every call, so a
    parameter is full only inside a call, and ``requires_grad`` changes made between calls (the
    ``"mid"`` rollout freezes the student for one jump) reach the gathered parameters.

    With a ``(dp_shard, cp)`` ``mesh`` (:func:`train_mesh`) the model also runs Ulysses context
    parallelism over the ``cp`` sub-group (:class:`anyflow.parallel.UlyssesGroup`), and

    * **where the parameters are sharded**: over the flattened ``(dp_shard, cp)`` mesh, i.e. all
      ``dp * cp`` processes (row-major, so the flattened rank is the global rank and FSDP's default
      mesh is that mesh). Parameters, gradients and AdamW states per process fall as ``1 / (dp * cp)``
      instead of ``1 / dp``, and FSDP keeps one reduce-scatter per unit, as without ``cp``. Sharding over
      ``dp_shard`` alone would keep ``cp`` copies of the optimiser state and need HSDP's extra
      all-reduce over ``cp``; the all-gather volume per process is about the same either way
      (``(1 - 1/n)`` of the unit's parameters), so the flattened mesh is both smaller and simpler.
    * **gradient scaling**: the global loss is ``L = (1/dp) sum_d L_d``, ``L_d`` the loss of slice ``d``
      (its rows' mean, as one process on the global batch computes it; every ``cp`` rank of slice ``d``
      computes the same ``L_d`` on the gathered output). The backward of ``L_d`` on ``cp`` rank ``c``
      yields ``g_dc``, the part of ``dL_d/dtheta`` that flows through rank ``c``'s tokens (the token
      gather keeps the rank's slice of the output gradient; the all-to-alls send the attention gradients
      to the ranks whose tokens made Q, K, V; the head and every other per-token op run on local
      tokens). The token split is a partition of the sequence, even or not, so ``sum_c g_dc =
      dL_d/dtheta``. FSDP sums ``g_dc`` over all ``dp * cp`` processes; dividing by ``dp`` (not by the
      ``dp * cp`` it divides by by default, which would give ``1/cp`` of the gradient) gives
      ``(1/dp) sum_d dL_d/dtheta = dL/dtheta``: every FSDP unit gets
      ``set_gradient_divide_factor(dp)`` with sum reductions (``set_force_sum_reduction_for_comms``; gloo
      has no pre-multiplied sum). Every trained parameter is inside an FSDP unit, so no gradient needs
      an all-reduce of its own.

    Args:
        model: an ``AnyFlowTransformer3DModel`` / ``AnyFlowFARTransformer3DModel`` enabled with
            :func:`anyflow.enable` (its blocks must run anyflow's forward when called as modules), not
            enabled with a ``context_parallel`` of its own.
        mp_policy: optional ``torch.distributed.fsdp.MixedPrecisionPolicy`` (see
            :func:`mixed_precision_policy`); ``None``: compute in the parameters' dtype.
        mesh: optional :class:`TrainMesh`; ``None``: data parallelism over all processes.

    Returns:
        ``model``: its blocks are FSDP modules, its parameters sharded ``DTensor``s (same names); use it
        through :func:`run_sharded`, :class:`ShardedForward` or :class:`ShardedFARWindowForward`.

    Raises:
        TypeError: the model is not enabled with :func:`anyflow.enable`.
        ValueError: the model is already sharded, or already runs context parallelism; with ``mesh``, its
            attention heads are not divisible by ``mesh.cp_size``.
        RuntimeError: ``torch.distributed`` is not initialised.
    """
    from torch.distributed.fsdp import fully_shard

    from .. import parallel

    if not all(getattr(b, "_anyflow_block", False) for b in model.blocks):
        raise TypeError("shard_model needs a transformer enabled with anyflow.enable(model)")
    if is_sharded(model):
        raise ValueError("model is already sharded")
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("shard_model needs an initialised torch.distributed process group")
    if mesh is not None and mesh.cp_size > 1:
        if parallel.context_parallel_of(model) is not None:
            raise ValueError("shard_model: the model already runs context parallelism (anyflow.enable(..., "
                             "context_parallel=...)); pass the TrainMesh only")
        check_context_parallel(mesh.cp_size, dist.get_world_size(), model.config.num_attention_heads)
        setattr(model, parallel.ATTRIBUTE, mesh.ulysses())  # what anyflow.enable(context_parallel=) sets
    kw = {} if mp_policy is None else {"mp_policy": mp_policy}
    for block in model.blocks:
        fully_shard(block, **kw)
    dtype = next(model.parameters()).dtype
    if mp_policy is not None and mp_policy.param_dtype is not None:
        dtype = mp_policy.param_dtype
    root = _Root(model, dtype)
    fully_shard(root, reshard_after_forward=True, **kw)
    if mesh is not None:
        for unit in (*model.blocks, root):
            unit.set_force_sum_reduction_for_comms(True)
            unit.set_gradient_divide_factor(float(mesh.dp_size))
    object.__setattr__(model, _ROOT_ATTR, root)  # not a submodule: the root owns the model, not vice versa
    return model


def _root(model) -> Optional[_Root]:
    return model.__dict__.get(_ROOT_ATTR) if isinstance(model, torch.nn.Module) else None


def is_sharded(model) -> bool:
    """Whether ``model`` was sharded by :func:`shard_model`."""
    return _root(model) is not None


def compute_dtype(model) -> torch.dtype:
    """dtype the model computes in: the FSDP ``param_dtype`` of a sharded model, else its parameters' dtype."""
    root = _root(model)
    return next(model.parameters()).dtype if root is None else root.compute_dtype


def run_sharded(model, fn: Callable, *args, **kwargs):
    """``fn(model, *args, **kwargs)``, inside the FSDP root of a sharded model (directly otherwise).

    Nested calls run directly (the root is already gathered). ``fn`` must reach the blocks through
    :func:`anyflow.models.blocks.run_blocks` (or call them as modules).
    """
    root = _root(model)
    if root is None or root.active:
        return fn(model, *args, **kwargs)
    root.active = True
    try:
        return root(fn, *args, **kwargs)
    finally:
        root.active = False


# -- training forwards of a sharded model ----------------------------------------------------------
def _raw_text(text) -> torch.Tensor:
    return text.tokens if isinstance(text, TextContext) else text


class _RawTextInside:
    """Shared by the sharded forwards: the same passes on every process, and a text context holding the raw
    prompt embeddings, projected inside each FSDP root call."""

    #: every process runs the same passes whatever its samples (see :func:`anyflow.training.flowmap.flow_map_loss`)
    uniform_calls: ClassVar[bool] = True

    def prepare_text(self, text) -> TextContext:
        raw = _raw_text(text)
        return TextContext(raw, raw.dtype)


@dataclass
class ShardedForward(_RawTextInside, BidirectionalForward):
    """:class:`~anyflow.training.flowmap.BidirectionalForward` of a :func:`shard_model`-ed model.

    Each call runs inside the FSDP root (:func:`run_sharded`). The text projection must run inside that
    call too (FSDP reduces the root's gradients once the gradient of the root's inputs is complete), so
    the :class:`~anyflow.models.blocks.TextContext` of this forward carries the raw prompt embeddings
    ``[B, L, text_dim]`` and every call projects them (row selection and concatenation commute with the
    per-token projection). Latents and text are cast to the compute dtype (bf16 under the mixed-precision
    policy); timesteps stay fp32.
    """

    def __call__(self, z, t, r, text):
        dtype = compute_dtype(self.model)
        return run_sharded(self.model, bidirectional_forward, z.to(dtype), t, r, _raw_text(text).to(dtype))


@dataclass
class ShardedFARWindowForward(_RawTextInside, FARWindowForward):
    """:class:`~anyflow.training.flowmap.FARWindowForward` of a :func:`shard_model`-ed FAR model.

    Same sequence ``[compressed clean context | noisy window | clean copy]`` and training mask
    (official ``_forward_train``); the call runs inside the FSDP root with the raw text projected inside it (as
    :class:`ShardedForward`), context, window and clean copy cast to the compute dtype.
    """

    def __call__(self, z, t, r, text):
        dtype = compute_dtype(self.model)
        hidden, tt, rr, clean, clean_t = self.sequence(z.to(dtype), t, r)
        return run_sharded(self.model, far_sequence_forward, hidden, self.chunk_partition, tt, rr,
                           _raw_text(text).to(dtype), full_limit=self.full_limit, clean_hidden_states=clean,
                           clean_timestep=clean_t)


def sharded_forward(forward):
    """The sharded twin of a :class:`BidirectionalForward` / :class:`FARWindowForward` whose model is
    sharded (same fields); any other forward is returned unchanged."""
    if not is_sharded(getattr(forward, "model", None)) or getattr(forward, "uniform_calls", False):
        return forward
    if isinstance(forward, FARWindowForward):
        return ShardedFARWindowForward(**{f.name: getattr(forward, f.name) for f in dataclasses.fields(forward)})
    if isinstance(forward, BidirectionalForward):
        return ShardedForward(forward.model)
    return forward


# -- collectives and sharded <-> full state --------------------------------------------------------
def all_reduce_sum(t: torch.Tensor, group=None) -> torch.Tensor:
    """Sum ``t`` over the processes of ``group`` (a copy; ``t`` is unchanged)."""
    out = t.clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM, group=group)
    return out


def _is_dtensor(t) -> bool:
    return DTensor is not None and isinstance(t, DTensor)


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a sharded ``DTensor`` (a collective: every process must call it), else ``t``."""
    return t.full_tensor() if _is_dtensor(t) else t


def local_view(p: torch.Tensor) -> torch.Tensor:
    """This process's shard of a ``DTensor`` parameter as a plain tensor sharing its storage (in-place
    optimiser updates show through), else ``p`` itself."""
    return p.to_local() if _is_dtensor(p) else p


def gather_shard(local: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Reassemble the whole tensor from per-process shards ``local`` laid out as ``like`` (a sharded
    ``DTensor``; collective); returns ``local`` when ``like`` is a plain tensor."""
    if not _is_dtensor(like):
        return local
    dt = DTensor.from_local(local.to(like.device), like.device_mesh, like.placements, shape=like.shape,
                            stride=like.stride())
    return dt.full_tensor().to(local.device)


def shard_of(full: torch.Tensor, like: torch.Tensor):
    """``full`` laid out as ``like``: a ``DTensor`` with this process's shard when ``like`` is one (no
    communication: every process holds ``full``), else ``full`` on ``like``'s device and dtype."""
    full = full.to(like.device, like.dtype)
    if not _is_dtensor(like):
        return full
    return distribute_tensor(full, like.device_mesh, like.placements, src_data_rank=None)


@torch.no_grad()
def load_full_(param: torch.Tensor, full: torch.Tensor) -> None:
    """Copy a whole tensor into a (possibly sharded) parameter in place.

    Raises:
        ValueError: shapes differ.
    """
    if tuple(full.shape) != tuple(param.shape):
        raise ValueError(f"full must have the parameter's shape {tuple(param.shape)}, got {tuple(full.shape)}")
    param.copy_(shard_of(full, param))


def gather_optimizer_state(state: dict) -> dict:
    """``optimizer.state_dict()`` with every sharded tensor gathered to a whole CPU tensor (collective);
    unchanged (the same objects) when nothing is sharded."""
    if not any(_is_dtensor(v) for s in state["state"].values() for v in s.values()):
        return state
    out = {}
    for i, s in state["state"].items():
        out[i] = {k: full_tensor(v).cpu() if _is_dtensor(v) else v for k, v in s.items()}
    return {**state, "state": out}


def shard_optimizer_state(state: dict, params) -> dict:
    """Inverse of :func:`gather_optimizer_state` for an optimiser over ``params`` (in its param-group
    order): whole tensors shaped like a sharded parameter become ``DTensor``s laid out like it."""
    params = list(params)
    if not any(_is_dtensor(p) for p in params):
        return state
    ids = [i for g in state["param_groups"] for i in g["params"]]
    if len(ids) != len(params):
        raise ValueError(f"optimizer state has {len(ids)} parameters, the optimizer {len(params)}")
    out = {}
    for i, p in zip(ids, params):
        s = state["state"].get(i)
        if s is None:
            continue
        out[i] = {k: shard_of(v, p) if (_is_dtensor(p) and torch.is_tensor(v) and tuple(v.shape) == tuple(p.shape)
                                         and k != "step") else v for k, v in s.items()}
    return {**state, "state": out}


# -- FSDP2 x context parallelism: one (dp_shard, cp) DeviceMesh ------------------------------------
#: dimension names of the training mesh: data-parallel sharding (batch rows), context parallelism (tokens)
MESH_DIMS = ("dp_shard", "cp")


def check_context_parallel(context_parallel, world_size: int, heads: Optional[int] = None) -> int:
    """Validate a context-parallel degree ``N`` for a job of ``world_size`` processes; no collective is
    issued, so every process raises the same error before any could wait in one.

    Args:
        context_parallel: ``N``, the processes that share one sequence (a positive int).
        world_size: processes of the job.
        heads: the model's attention heads (Ulysses gives each of the ``N`` ranks ``heads / N``);
            ``None``: not checked.

    Returns:
        The data-parallel size ``world_size // N``.

    Raises:
        ValueError: ``N`` not a positive int, ``world_size`` not a multiple of ``N``, or ``heads`` not
            divisible by ``N``.
    """
    if isinstance(context_parallel, bool) or not isinstance(context_parallel, int) or context_parallel < 1:
        raise ValueError(f"context_parallel must be a positive int, got {context_parallel!r}")
    if world_size % context_parallel:
        raise ValueError(f"context_parallel={context_parallel} must divide the number of processes {world_size}: "
                         f"launch torchrun --nproc_per_node with a multiple of {context_parallel}")
    if heads is not None and heads % context_parallel:
        raise ValueError(f"the model has {heads} attention heads, not divisible by context_parallel="
                         f"{context_parallel} (Ulysses gives each rank heads / context_parallel heads)")
    return world_size // context_parallel


@dataclass(frozen=True)
class TrainMesh:
    """This process's place in the ``(dp_shard, cp)`` mesh of a training job (:func:`train_mesh`).

    Attributes:
        mesh: the 2-D ``torch.distributed.device_mesh.DeviceMesh`` of shape ``(dp_size, cp_size)``, dims
            :data:`MESH_DIMS`; the global rank is ``dp_rank * cp_size + cp_rank``.
        dp_rank, dp_size: index of this process's slice of the batch rows, and the number of slices.
        cp_rank, cp_size: index of this process's token shard, and the processes sharing one sequence.
    """

    mesh: object
    dp_rank: int
    dp_size: int
    cp_rank: int
    cp_size: int

    @property
    def dp_group(self):
        """The process group of the ``dp_shard`` dimension (the processes holding the same token shard)."""
        return self.mesh.get_group("dp_shard")

    def ulysses(self):
        """The :class:`anyflow.parallel.UlyssesGroup` of the ``cp`` sub-group."""
        from ..parallel import UlyssesGroup

        return UlyssesGroup(self.mesh.get_group("cp"), self.cp_rank, self.cp_size)


def train_mesh(context_parallel: int, device) -> TrainMesh:
    """Build the ``(dp_shard, cp)`` mesh ``(world / N, N)`` of a job (every process must call it: it
    creates the sub-groups).

    Args:
        context_parallel: ``N`` (:func:`check_context_parallel`, checked before any collective).
        device: the training device (its type is the mesh's).

    Raises:
        RuntimeError: ``torch.distributed`` is not initialised.
        ValueError: see :func:`check_context_parallel`.
    """
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("train_mesh needs an initialised torch.distributed process group")
    world = dist.get_world_size()
    dp = check_context_parallel(context_parallel, world)
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh(torch.device(device).type, (dp, context_parallel), mesh_dim_names=MESH_DIMS)
    out = TrainMesh(mesh, mesh.get_local_rank("dp_shard"), dp, mesh.get_local_rank("cp"), context_parallel)
    if out.dp_rank * context_parallel + out.cp_rank != dist.get_rank():  # shard_model relies on the row-major layout
        raise RuntimeError(f"rank {dist.get_rank()} is at (dp_shard, cp) = ({out.dp_rank}, {out.cp_rank})")
    return out


# -- process group set-up (torchrun) ---------------------------------------------------------------
@dataclass(frozen=True)
class DistContext:
    """This process's place in the data-parallel group.

    Attributes:
        rank, world_size: global rank and number of processes.
        local_rank: rank on this node (the CUDA device index).
        device: the training device (``cuda:<local_rank>`` with NCCL, CPU with gloo).
    """

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def world_size_from_env(env=None) -> int:
    """``WORLD_SIZE`` of the environment (set by ``torchrun``), 1 when unset.

    Raises:
        ValueError: ``WORLD_SIZE`` is not a positive integer.
    """
    raw = (os.environ if env is None else env).get("WORLD_SIZE", "1")
    try:
        n = int(raw)
    except ValueError:
        n = 0
    if n < 1:
        raise ValueError(f"WORLD_SIZE must be a positive integer, got {raw!r}")
    return n


def init_from_env(backend: Optional[str] = None) -> Optional[DistContext]:
    """Initialise the default process group from the ``torchrun`` environment when ``WORLD_SIZE > 1``.

    The backend is NCCL when CUDA is available (each process then uses ``cuda:LOCAL_RANK``), else gloo
    on the CPU; ``backend`` overrides. An already initialised group is reused.

    Returns:
        :class:`DistContext`, or ``None`` for a single process (nothing is initialised).

    Raises:
        RuntimeError: ``torch.distributed`` is unavailable in this torch build.
        ValueError: bad ``WORLD_SIZE`` / ``RANK`` / ``LOCAL_RANK``.
    """
    world = world_size_from_env()
    if world == 1:
        return None
    if not dist.is_available():
        raise RuntimeError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
    try:
        int(os.environ.get("RANK", "0"))  # validated here; init_process_group reads it from the environment
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    except ValueError:
        raise ValueError(f"RANK / LOCAL_RANK must be integers, got {os.environ.get('RANK')!r} / "
                         f"{os.environ.get('LOCAL_RANK')!r}") from None
    use_cuda = torch.cuda.is_available() if backend is None else backend == "nccl"
    backend = backend or ("nccl" if use_cuda else "gloo")
    device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend)
    return DistContext(dist.get_rank(), dist.get_world_size(), local_rank, device)


def destroy() -> None:
    """Destroy the default process group if one is initialised."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
