"""Distillation training for AnyFlow flow maps (bidirectional and FAR) on the op layer.

Modules: :mod:`.config` (dataclasses, official presets, YAML), :mod:`.flowmap` (the forward flow-map
objective and the teacher / pretrain phases), :mod:`.consistency` (the consistency-distillation baseline
and its phase), :mod:`.onpolicy` (Flow Map Backward Simulation + DMD, bidirectional and FAR rollouts, the
on-policy phase), :mod:`.checkpoint` (EMA, atomic checkpoints, bit-exact resume), :mod:`.lora` (peft
adapters, trainable-parameter selection, merged export), :mod:`.trainer` (the loop, optimisers, EMA,
checkpoints and logs of every phase), :mod:`.run` (``anyflow train CONFIG``).
Nothing is imported eagerly, so ``import anyflow.training`` costs nothing.
"""
