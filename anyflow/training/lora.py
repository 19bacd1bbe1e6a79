"""LoRA adapters through ``peft`` as in the official recipe (NVlabs/AnyFlow far/utils/lora_util.py, NVlabs/AnyFlow
options/train/anyflow YAMLs: rank = alpha = 256 on
attn1 q/k/v/out.0, ffn.net.0.proj, ffn.net.2 and, for flow-map students, the Linear layers of the
time and delta embedders).

``peft.inject_adapter_in_model`` wraps every target ``nn.Linear`` in a ``peft`` LoRA layer in place
(the model keeps its class and its diffusers forward). The op layer reads some weights directly
(``anyflow.models.blocks.time_rows`` passes ``time_embedder.linear_1.weight`` etc. to the fused
time-pair embedding) instead of calling the module; peft's ``weight`` property would hand it the base
weight only. The wrapped layers therefore get a subclass whose ``weight`` is the *effective* weight
``W + (alpha / r) B A`` (differentiable in A and B), while ``forward`` stays peft's
``base(x) + scale B A x``. Both paths see the same adapted layer.

:func:`merged_state_dict` exports plain weights (adapters folded in, original key names), the format
of a diffusers transformer folder.
"""

from __future__ import annotations

from typing import Iterable, Sequence

import torch

from .config import LoRAConfig

ADAPTER = "default"
_SUBCLASSES: dict = {}


def _effective_class(cls):
    """A subclass of peft's LoRA layer class whose ``weight`` includes the active adapters' delta."""
    if cls not in _SUBCLASSES:

        def weight(self):
            base = self.get_base_layer().weight
            if self.merged or self.disable_adapters:
                return base
            delta = None
            for name in self.active_adapters:
                if name in self.lora_A:
                    d = self.get_delta_weight(name)
                    delta = d if delta is None else delta + d
            return base if delta is None else base + delta.to(base.dtype)

        def bias(self):
            return self.get_base_layer().bias

        props = {"weight": property(weight), "bias": property(bias)}
        _SUBCLASSES[cls] = type(f"Effective{cls.__name__}", (cls,), props)
    return _SUBCLASSES[cls]


def _matches(name: str, targets: Sequence[str]) -> bool:
    return any(name == t or name.endswith("." + t) for t in targets)


def apply_lora(model: torch.nn.Module, cfg: LoRAConfig, adapter: str = ADAPTER) -> list:
    """Inject LoRA adapters into ``model`` in place and select the trainable parameters.

    Targets are ``cfg.target_modules`` (module-name suffixes) that exist in ``model``; every parameter is
    frozen except ``lora_A`` / ``lora_B`` and the names containing one of ``cfg.extra_trainable``.

    Returns:
        ``[(name, parameter)]`` of the trainable parameters.

    Raises:
        ImportError: ``peft`` is not installed (``pip install anyflow[train]``).
        ValueError: no target module exists in ``model``.
    """
    try:
        from peft import LoraConfig, inject_adapter_in_model
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("LoRA training needs peft: pip install 'anyflow[train]'") from exc
    from peft.tuners.lora import LoraLayer

    names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and _matches(n, cfg.target_modules)]
    if not names:
        raise ValueError(f"no Linear module of {type(model).__name__} matches the LoRA targets "
                         f"{list(cfg.target_modules)}")
    lcfg = LoraConfig(r=int(cfg.rank), lora_alpha=int(cfg.alpha), target_modules=names, lora_dropout=0.0, bias="none")
    inject_adapter_in_model(lcfg, model, adapter_name=adapter)
    for _, m in model.named_modules():
        if isinstance(m, LoraLayer) and not type(m).__name__.startswith("Effective"):
            m.__class__ = _effective_class(type(m))
    return _train_only(model, lambda n: ".lora_A." in n or ".lora_B." in n or any(s in n for s in cfg.extra_trainable))


def _train_only(model: torch.nn.Module, train) -> list:
    """Set ``requires_grad`` of every parameter to ``train(name)``; returns the trained ``(name, param)`` pairs."""
    named = list(model.named_parameters())
    for n, p in named:
        p.requires_grad_(bool(train(n)))
    return [(n, p) for n, p in named if p.requires_grad]


def lora_modules(model: torch.nn.Module) -> Iterable:
    from peft.tuners.lora import LoraLayer

    return [(n, m) for n, m in model.named_modules() if isinstance(m, LoraLayer)]


@torch.no_grad()
def merged_state_dict(model: torch.nn.Module, dtype=None) -> dict:
    """Plain state dict with every adapter folded into its base weight (``W + (alpha / r) B A``), under
    the original (pre-peft) parameter names; ``lora_A`` / ``lora_B`` are dropped. Works on an
    unmodified model too (returns its state dict)."""
    state = {}
    wrapped = dict(lora_modules(model)) if any(".lora_A." in n for n, _ in model.named_parameters()) else {}
    for n, v in model.state_dict().items():
        if ".lora_" in n:  # lora_A, lora_B and the other adapter entries
            continue
        mod = n.removesuffix(".base_layer.weight")
        if mod != n and mod in wrapped:
            v = wrapped[mod].weight  # effective weight: base + delta of the active adapters
        v = v.detach().clone()
        state[n.replace(".base_layer.", ".")] = v.to(dtype) if dtype is not None and v.is_floating_point() else v
    return state


def select_trainable(model, lora_cfg, patterns: Sequence[str], arg: str, what: str) -> list:
    """``(name, param)`` pairs to train: LoRA adapters (+ extra patterns) when ``lora_cfg`` is given
    (:func:`apply_lora`), else the parameters whose name contains one of ``patterns`` (all when empty); the
    rest is frozen.

    Args:
        arg, what: the config key and the model, for the error message.

    Raises:
        ValueError: nothing matches.
    """
    if lora_cfg is not None:
        named = apply_lora(model, lora_cfg)
    else:
        named = _train_only(model, lambda n: not patterns or any(s in n for s in patterns))
    if not named:
        raise ValueError(f"{arg}={list(patterns)} matches no parameter of {what}")
    return named
