"""``anyflow.enable``: accelerate diffusers AnyFlow pipelines and transformers in place.

The instance keeps its parameters, state dict, config and every class attribute diffusers relies on
(``_no_split_modules``, ``_keep_in_fp32_modules``, ``_repeated_blocks``, ...): its class is swapped for a
subclass *of the same name and module* that overrides only ``forward`` (transformers and their blocks,
so that FSDP2's per-block hooks run) or ``__call__`` plus a new ``stream`` (pipelines).
``handle.disable()`` swaps the original classes back.

FAR semantics: the mask-free KV-cache inference step attends to the real cached keys only, as the
official NVlabs/AnyFlow code does. diffusers 0.42.1 pads q/k/v with zeros to a multiple of 128 in that
step too, so its keys include zero vectors that dilute the softmax (3-5% relative error per chunk on
a tiny model); an enabled ``AnyFlowFARPipeline`` therefore returns the official model's result, not
diffusers 0.42.1's.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any, Optional

import torch

from . import ops
from .models import blocks, far, offload
from .models.bidirectional import bidirectional_forward
from .ops import registry
from .ops.sdpa import get_sdpa_policy

_SUBCLASSES: dict[type, type] = {}
#: per-instance attributes set by :func:`enable` (and removed by ``disable``)
_SETTINGS = ("_anyflow_backend", "_anyflow_attention", "_anyflow_cuda_graphs", "_anyflow_context_parallel")


@dataclass
class EnableHandle:
    """What :func:`enable` changed; ``disable()`` restores it (idempotent)."""

    backend: str
    _swapped: list = field(default_factory=list)

    def disable(self) -> None:
        for obj, cls in reversed(self._swapped):
            enabled = type(obj)
            obj.__class__ = cls
            if "forward" in enabled.__dict__:
                _rebind_hooked_forward(obj, enabled, cls)
            for name in _SETTINGS:
                obj.__dict__.pop(name, None)
        self._swapped.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.disable()


def _method_like(fn, original):
    """``fn`` as a method that presents ``original``'s signature and docstring (``inspect.signature``,
    ``help``); ``__wrapped__`` points at ``original``."""

    @functools.wraps(original)
    def method(self, *args, **kwargs):
        return fn(self, *args, **kwargs)

    return method


def _subclass(cls: type, namespace: dict) -> type:
    sub = _SUBCLASSES.get(cls)
    if sub is None:
        sub = type(cls.__name__, (cls,), dict(namespace, __module__=cls.__module__, __qualname__=cls.__qualname__))
        sub._anyflow_original_class = cls
        _SUBCLASSES[cls] = sub
    return sub


def _block_forward(self, *args):
    """``forward(layer, x, text, m_rows, segments, self_attention)`` of an enabled block."""
    return blocks.standalone_block_forward(self, *args)


_BLOCK = {"forward": _block_forward, "_anyflow_block": True}


def _swap_model(model, namespace: dict, settings: dict, handle: EnableHandle) -> None:
    """Swap a transformer and its blocks (a block called as a module, as FSDP2 needs, runs anyflow's forward).

    ``None`` (a pipeline built without a transformer) is skipped."""
    if model is None:
        return
    _swap(model, namespace, settings, handle)
    for block in model.blocks:
        _swap(block, _BLOCK, settings, handle)


def _rebind_hooked_forward(obj, old_cls: type, new_cls: type) -> None:
    """Point the forward that offload hooks wrap at ``new_cls.forward``.

    diffusers' hook registry and accelerate's ``add_hook_to_module`` replace ``obj.forward`` with a wrapper
    around the bound ``forward`` of the moment they were added; after a class swap that is still the other
    class's, so the hooked call would skip (or, after ``disable``, keep) anyflow's forward.
    """
    import types

    def rebound(fn):
        if isinstance(fn, types.MethodType) and fn.__self__ is obj and fn.__func__ is old_cls.forward:
            return types.MethodType(new_cls.forward, obj)
        return fn

    registry = obj.__dict__.get("_diffusers_hook")
    for ref in getattr(registry, "_fn_refs", ()):
        ref.forward = rebound(ref.forward)
        ref.original_forward = rebound(ref.original_forward)
    if "_old_forward" in obj.__dict__:
        obj.__dict__["_old_forward"] = rebound(obj.__dict__["_old_forward"])
    if "forward" in obj.__dict__:
        obj.__dict__["forward"] = rebound(obj.__dict__["forward"])


def _swap(obj, namespace: dict, settings: dict, handle: EnableHandle) -> None:
    cls = type(obj)
    if getattr(cls, "_anyflow_original_class", None) is None:
        handle._swapped.append((obj, cls))
        obj.__class__ = _subclass(cls, namespace)
        if "forward" in namespace:
            _rebind_hooked_forward(obj, cls, obj.__class__)
    for name, value in settings.items():  # already enabled: only the settings change
        setattr(obj, name, value)


# ----------------------------------------------------------------------------------------------
# transformer forwards (same signatures as diffusers 0.42)
# ----------------------------------------------------------------------------------------------
def _enabled_forward(fn):
    """``fn`` as an enabled ``forward``: the LoRA scale from ``attention_kwargs`` (diffusers' decorator),
    the instance's SDPA policy and op backend (``enable(..., attention=..., backend=...)``) and, under group /
    sequential offloading, the offload hooks of the weights read outside module calls
    (:mod:`anyflow.models.offload`) around it."""
    from diffusers.utils import apply_lora_scale

    @functools.wraps(fn)
    def forward(self, *args, **kwargs):
        policy, backend = getattr(self, "_anyflow_attention", None), getattr(self, "_anyflow_backend", None)
        with ops.sdpa_policy(policy), ops.backend(backend):
            if torch.compiler.is_compiling() or not offload.is_offloaded(self):
                return fn(self, *args, **kwargs)
            # the offload hooks of the transformer itself have run: this forward is what they wrap
            with offload.model_onloaded(self, root_fired=True):
                return fn(self, *args, **kwargs)

    return apply_lora_scale("attention_kwargs")(forward)


def _bidirectional_forward(
    self,
    hidden_states: torch.Tensor,
    timestep: torch.Tensor,
    r_timestep: torch.Tensor,
    encoder_hidden_states: torch.Tensor,
    encoder_hidden_states_image: Optional[torch.Tensor] = None,
    attention_kwargs: Optional[dict] = None,
    return_dict: bool = True,
):
    """``AnyFlowTransformer3DModel.forward`` through anyflow's op layer (same arguments and outputs)."""
    from diffusers.models.modeling_outputs import Transformer2DModelOutput

    out = bidirectional_forward(self, hidden_states, timestep, r_timestep, encoder_hidden_states,
                                encoder_hidden_states_image)
    return Transformer2DModelOutput(sample=out) if return_dict else (out,)


def _far_forward(
    self,
    hidden_states: torch.Tensor,
    timestep: torch.Tensor,
    r_timestep: torch.Tensor,
    encoder_hidden_states: torch.Tensor,
    chunk_partition,
    encoder_hidden_states_image: Optional[torch.Tensor] = None,
    clean_hidden_states: Optional[torch.Tensor] = None,
    clean_timestep: Optional[torch.Tensor] = None,
    kv_cache: Optional[Any] = None,
    kv_cache_flag: Optional[dict] = None,
    attention_mask: Optional[Any] = None,
    attention_kwargs: Optional[dict] = None,
    return_dict: bool = True,
):
    """``AnyFlowFARTransformer3DModel.forward`` through anyflow's op layer.

    Same three paths as diffusers: training (``kv_cache is None``), cache step (``kv_cache_flag
    ["is_cache_step"]``) and KV-cache inference. ``attention_mask`` is accepted and ignored: the mask is
    determined by ``chunk_partition`` and built as range tables. The inference step follows the official
    semantics (no zero keys, see the module docstring). The KV cache dicts keep diffusers' format
    (post-norm, pre-RoPE keys) so both implementations can share a cache.
    """
    from diffusers.models.modeling_outputs import Transformer2DModelOutput
    from diffusers.models.transformers.transformer_anyflow_far import AnyFlowFARTransformerOutput

    if kv_cache is None:
        out = far.far_sequence_forward(
            self, hidden_states, chunk_partition, timestep, r_timestep, encoder_hidden_states,
            full_limit=self.config.full_chunk_limit, encoder_hidden_states_image=encoder_hidden_states_image,
            clean_hidden_states=clean_hidden_states, clean_timestep=clean_timestep)
        return Transformer2DModelOutput(sample=out) if return_dict else (out,)
    if kv_cache_flag is None:
        raise ValueError("kv_cache_flag is required with kv_cache")
    runner = far.FARRunner(self, chunk_partition, hidden_states.shape[-2:])
    k = len(runner.cp) - 1
    text = blocks.prepare_text(self, encoder_hidden_states, encoder_hidden_states_image)
    if kv_cache_flag.get("is_cache_step"):
        if clean_hidden_states is not None:
            raise ValueError("clean_hidden_states is not supported in the KV-cache step")
        kv_cache_flag["num_compressed_tokens"], kv_cache_flag["num_full_tokens"] = runner.context_tokens(k)
        state = far.DiffusersKVCache(kv_cache, timestep=timestep, r_timestep=r_timestep)
        runner.cache_step(k, hidden_states, text, state)
        return AnyFlowFARTransformerOutput(sample=None, kv_cache=kv_cache) if return_dict else (None, kv_cache)
    if hidden_states.shape[1] != runner.cp[-1]:
        raise ValueError(
            f"the KV-cache inference step takes the current chunk only: hidden_states has {hidden_states.shape[1]} "
            f"frames but chunk_partition[-1] = {runner.cp[-1]}"
        )
    state = far.DiffusersKVCache(kv_cache, int(kv_cache_flag["num_cached_chunks"]))
    out = runner.step(k, hidden_states, timestep, r_timestep, text, state)
    return AnyFlowFARTransformerOutput(sample=out, kv_cache=kv_cache) if return_dict else (out, kv_cache)


# ----------------------------------------------------------------------------------------------
# enable
# ----------------------------------------------------------------------------------------------
def enable(pipe_or_transformer, backend: str = "auto", *, attention: Optional[str] = None,
           cuda_graphs: bool = False, context_parallel=None) -> EnableHandle:
    """Accelerate a diffusers AnyFlow pipeline or transformer in place.

    Args:
        pipe_or_transformer: an ``AnyFlowPipeline``, ``AnyFlowFARPipeline``,
            ``AnyFlowTransformer3DModel`` or ``AnyFlowFARTransformer3DModel`` (diffusers >= 0.39).
            Pipelines get the fast samplers of :mod:`anyflow.samplers` as ``__call__`` (same arguments,
            signature, docstring and outputs) plus ``pipe.stream(...)``; their transformer is enabled too
            (a pipeline built with ``transformer=None`` is accepted and keeps ``encode_prompt``). Offloading
            (``enable_model_cpu_offload``, ``enable_sequential_cpu_offload``, ``enable_group_offload`` at
            block or leaf level, with or without streams, before or after ``enable``) keeps working.
        backend: ``"auto"`` (default; ``ANYFLOW_BACKEND`` overrides), ``"torch"``, ``"triton"`` or
            ``"cuda"``: the preferred backend of every op of the enabled forward; ops that backend does
            not implement, or calls it cannot run, take the PyTorch path (:func:`anyflow.ops.registry.prefer`).
        attention: SDPA kernel policy of the dense attentions on the PyTorch path while the enabled
            forward / sampler runs (:data:`anyflow.ops.SDPA_POLICIES`: ``"default"``, ``"cudnn"``,
            ``"flash"``, ``"efficient"``, ``"math"``, ``"tuned"`` = fastest kernel measured per shape);
            ``None`` (default) leaves the process policy (``ANYFLOW_SDPA``) alone.
        context_parallel: a ``diffusers.ContextParallelConfig(ulysses_degree=N)`` (``ring_degree`` 1): run the
            fused forwards with Ulysses context parallelism over the ``N`` ranks of a ``torchrun`` job
            (:class:`anyflow.parallel.UlyssesGroup`; ``torch.distributed`` initialised, ``N`` = world size or the
            ``"ulysses"`` dim of ``config.mesh``, heads divisible by ``N``). Each rank computes its slice of the
            tokens, the self-attention exchanges heads by all-to-all, every rank gets the whole output; the FAR
            KV cache holds ``heads / N`` heads per rank. Call with the same inputs (prompt, seed) on every rank.
            A transformer on which :func:`anyflow.parallel.apply_context_parallel` was called is run the same
            way without this argument. Not with a bare FAR transformer driven by diffusers' own pipeline
            ``__call__`` (its dict KV cache holds all heads): enable the pipeline. See docs/context_parallel.md.
        cuda_graphs: pipelines only: capture the per-step forward as a CUDA graph and replay it
            (:mod:`anyflow.samplers.graphs`; CUDA and inference only, eager elsewhere). Off by default.

    Returns:
        :class:`EnableHandle`; ``handle.disable()`` restores the original classes.

    Raises:
        TypeError: the object is not one of the four supported diffusers classes.
        ValueError: unknown backend or attention policy name; ``cuda_graphs`` for a bare transformer.
        TypeError / RuntimeError / ValueError: a bad ``context_parallel``
            (:func:`anyflow.parallel.check_context_parallel`: not a ``ContextParallelConfig``, ``torch.distributed`` not initialised, ring degree > 1, degree not the
            world size or not dividing the heads), raised before any collective.
        anyflow.ops.BackendUnavailableError: the requested backend cannot run at all here (e.g.
            ``"cuda"`` without the compiled extension), with the reason.

    Example:
        >>> import anyflow, torch
        >>> from diffusers import AnyFlowFARPipeline
        >>> pipe = AnyFlowFARPipeline.from_pretrained("nvidia/AnyFlow-FAR-Wan2.1-1.3B-Diffusers", torch_dtype=torch.bfloat16)
        >>> handle = anyflow.enable(pipe.to("cuda"), attention="tuned", cuda_graphs=True)
        >>> video = pipe("a red panda eating bamboo", num_inference_steps=4).frames[0]
    """
    from diffusers import AnyFlowFARPipeline, AnyFlowFARTransformer3DModel, AnyFlowPipeline, AnyFlowTransformer3DModel

    registry.warm_up()
    get_sdpa_policy()  # resolve ANYFLOW_SDPA now: a compiled forward must not see the policy change on first use
    wanted = registry.requested_backend(backend)
    if wanted not in ("auto", "torch") and registry.backend_reason(wanted):
        raise registry.BackendUnavailableError(f"backend {wanted!r} is unavailable: {registry.backend_reason(wanted)}")
    if attention is not None and attention not in ops.SDPA_POLICIES:
        raise ValueError(f"attention must be None or one of {ops.SDPA_POLICIES}, got {attention!r}")
    obj = pipe_or_transformer
    is_pipe = isinstance(obj, (AnyFlowFARPipeline, AnyFlowPipeline))
    if cuda_graphs and not is_pipe:
        raise ValueError(
            "cuda_graphs=True applies to pipelines (their samplers capture the per-step forward); for a bare "
            "transformer use torch.compile(mode='reduce-overhead') or torch.cuda.make_graphed_callables"
        )
    transformer = obj.transformer if is_pipe else obj
    ulysses = None  # validated before anything is swapped and before any collective, identically on every rank
    if context_parallel is not None or getattr(transformer, "_parallel_config", None) is not None:
        from . import parallel

        ulysses = parallel.ulysses_group(transformer, context_parallel)
    if not is_pipe and not isinstance(obj, (AnyFlowFARTransformer3DModel, AnyFlowTransformer3DModel)):
        raise TypeError(
            "anyflow.enable expects a diffusers AnyFlowPipeline, AnyFlowFARPipeline, AnyFlowTransformer3DModel or "
            f"AnyFlowFARTransformer3DModel, got {type(obj).__name__}"
        )
    handle = EnableHandle(backend)
    preferred = None if backend == "auto" else registry.prefer(backend)  # the enabled forward's ops.backend
    settings = {"_anyflow_backend": preferred, "_anyflow_attention": attention, "_anyflow_context_parallel": ulysses}
    is_far = isinstance(obj, (AnyFlowFARPipeline, AnyFlowFARTransformer3DModel))
    _swap_model(transformer, {"forward": _enabled_forward(_far_forward if is_far else _bidirectional_forward)},
                settings, handle)
    if is_pipe:
        from .samplers import pipelines

        original_call = getattr(type(obj), "_anyflow_original_class", type(obj)).__call__
        call = _method_like(pipelines.far_call if is_far else pipelines.bidirectional_call, original_call)
        namespace = {"__call__": call, "stream": pipelines.far_stream} if is_far else {"__call__": call}
        _swap(obj, namespace, dict(settings, _anyflow_cuda_graphs=bool(cuda_graphs)), handle)
    return handle
