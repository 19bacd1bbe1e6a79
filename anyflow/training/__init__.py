"""Distillation training for AnyFlow flow maps (bidirectional and FAR) on the op layer.

Modules: :mod:`.config` (dataclasses, official presets, YAML), :mod:`.flowmap` (the forward flow-map
objective, reference spec §6), :mod:`.consistency` (the consistency-distillation baseline),
:mod:`.checkpoint` (EMA, atomic checkpoints, bit-exact resume), :mod:`.onpolicy` (Flow Map Backward
Simulation + DMD, bidirectional and FAR rollouts), :mod:`.lora` (peft adapters, merged export),
:mod:`.trainer` (single-process loop, every phase), :mod:`.run` (``anyflow train CONFIG``).
Nothing is imported eagerly, so ``import anyflow.training`` costs nothing.
"""
