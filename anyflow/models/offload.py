"""Offload hooks around the fused forwards: diffusers group offloading and accelerate's sequential offload.

Both load a module's weights in a hook on the module's call. The fused forwards call most submodules
(linear layers, patch embeddings, FFNs), whose hooks then fire as usual, but read a few parameters
directly: adaLN tables (``scale_shift_table``), the time-pair MLP (``ops.time_pair_embedding`` takes the
weights), the RMSNorm of self-attention q/k and ``norm2`` (fused into ``qk_norm_rope`` /
``residual_norm``). :func:`model_onloaded` and :func:`block_onloaded` fire the hooks of exactly those
modules, plus the transformer's and each block's own (where block-level group offloading keeps a whole
block, or everything outside the blocks), in the order a module call fires them: pre-forward outermost
hook first on entry, post-forward in reverse on exit. The per-block scopes run in block order inside the
transformer's scope, as in a diffusers forward, so the execution order that diffusers' lazy prefetching
records with CUDA streams, and replays, is that of the fused forward.

``enable_model_cpu_offload`` (accelerate's ``CpuOffload`` on the whole transformer) is not handled here:
the whole model is on the device once its hook ran, see :func:`anyflow.samplers.pipelines`.
"""

from __future__ import annotations

import contextlib

import torch

#: diffusers hooks that move weights or record the order they are needed in (group offloading)
_DIFFUSERS_HOOKS = ("group_offloading", "layer_execution_tracker", "lazy_prefetch_group_offloading")
_STATE = "_anyflow_onloaded"  # set on the transformer while its scope is open


def module_hooks(module) -> list:
    """The offload hooks of ``module`` itself (not of its children), outermost first.

    Each has ``pre_forward(module, *args, **kwargs)`` and ``post_forward(module, output)`` (diffusers
    ``ModelHook`` and accelerate ``ModelHook`` share this interface).
    """
    hooks = []
    registry = module.__dict__.get("_diffusers_hook")
    if registry is not None:
        hooks += [registry.hooks[n] for n in reversed(registry._hook_order) if n in _DIFFUSERS_HOOKS]
    hf = module.__dict__.get("_hf_hook")
    if hf is not None and type(hf).__name__ not in ("CpuOffload", "UserCpuOffloadHook"):  # not model CPU offload
        hooks.append(hf)
    return hooks


def is_offloaded(model) -> bool:
    """Whether any module of ``model`` has a per-module offload hook (group offloading at block or leaf
    level, with or without streams; accelerate's sequential CPU offload or a device map)."""
    return any(module_hooks(m) for m in model.modules())


@contextlib.contextmanager
def onloaded(modules):
    """Fire the offload hooks of ``modules``: pre-forward on entry (in order), post-forward on exit
    (in reverse), as if each module's call wrapped the body."""
    fired = []
    try:
        for m in modules:
            for hook in module_hooks(m):
                hook.pre_forward(m)
                fired.append((m, hook))
        yield
    finally:
        for m, hook in reversed(fired):
            hook.post_forward(m, None)


def _root_modules(model, with_root: bool) -> list:
    """Modules outside the blocks whose parameters the fused forwards read without calling them."""
    ce = model.condition_embedder
    mods = [model] if with_root else []
    mods += [ce, ce.time_embedder, ce.time_embedder.linear_1, ce.time_embedder.linear_2,
             ce.delta_embedder, ce.delta_embedder.linear_1, ce.delta_embedder.linear_2, ce.time_proj, model.norm_out]
    return mods


def _block_modules(block) -> list:
    """A block and the submodules whose parameters the fused block forward reads without calling them."""
    return [block, block.norm1, block.attn1.norm_q, block.attn1.norm_k, block.norm2, block.norm3]


def in_scope(model) -> bool:
    """Whether a :func:`model_onloaded` scope of ``model`` is open (weights outside the blocks are loaded)."""
    return model.__dict__.get(_STATE, False)


@contextlib.contextmanager
def model_onloaded(model, root_fired: bool = False):
    """Scope of one fused forward of ``model`` (a diffusers AnyFlow transformer) under offloading.

    Fires the hooks of the transformer and of the modules outside the blocks that the fused code reads
    directly. ``root_fired``: the transformer's own hooks already ran because this is its (hooked)
    ``forward``. Nested scopes, models without offload hooks and code being traced by ``torch.compile``
    do nothing.
    """
    if torch.compiler.is_compiling() or in_scope(model) or not is_offloaded(model):
        yield
        return
    model.__dict__[_STATE] = True
    try:
        with onloaded(_root_modules(model, not root_fired)):
            yield
    finally:
        model.__dict__.pop(_STATE, None)


def block_onloaded(block):
    """Scope of one block's fused forward under offloading (see :func:`model_onloaded`)."""
    return onloaded(_block_modules(block))
