"""Distillation training for AnyFlow flow maps (bidirectional and FAR) on the op layer.

Modules: :mod:`.config` (dataclasses, official presets, YAML), :mod:`.flowmap` (the forward flow-map
objective, reference spec §6), :mod:`.consistency` (the consistency-distillation baseline),
:mod:`.checkpoint` (EMA, atomic checkpoints, bit-exact resume), :mod:`.trainer` (single-process loop).
Nothing is imported eagerly, so ``import anyflow.training`` costs nothing.
"""
