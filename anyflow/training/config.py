"""Training configurations: dataclasses with the official AnyFlow defaults, presets and a YAML loader.

The values restate the official YAML files (NVlabs/AnyFlow options/train/anyflow YAMLs; NVlabs/AnyFlow
trainer_wan_anyflow_pretrain.py for the forward objective, NVlabs/AnyFlow trainer_wan_anyflow_onpolicy.py for
the on-policy phase, NVlabs/AnyFlow trainer_wan_teacher.py for the teacher). A config is a :class:`TrainConfig`;
:func:`preset` returns the official ones by name (``"teacher-1.3b"``, ``"bidirectional-pretrain-14b"``,
``"far-onpolicy-1.3b"``, ...) plus ``"tiny"`` / ``"tiny-far"`` for CPU tests, and :func:`load_config`
reads YAML (``preset: NAME`` selects a base, every other key overrides it, nested by section).

Timesteps are in [0, 1000] throughout (sigma = t / 1000).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union, get_args, get_origin, get_type_hints

#: Wan2.1 LoRA targets of the teacher (NVlabs/AnyFlow options/train/anyflow YAMLs: attn1 q/k/v/out.0, ffn.net.0.proj,
#: ffn.net.2).
TEACHER_LORA_TARGETS = ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "ffn.net.0.proj", "ffn.net.2")
#: Flow-map students add the Linear layers of both timestep embedders (NVlabs/AnyFlow
#: trainer_wan_anyflow_pretrain.py, NVlabs/AnyFlow far/utils/lora_util.py).
STUDENT_LORA_TARGETS = TEACHER_LORA_TARGETS + (
    "time_embedder.linear_1", "time_embedder.linear_2", "delta_embedder.linear_1", "delta_embedder.linear_2",
)
#: The FAR chunk partition of the released models (21 latent frames = 81 pixel frames).
FAR_CHUNK_PARTITION = (1, 3, 3, 3, 3, 3, 3, 2)

PHASES = ("teacher", "pretrain", "onpolicy", "consistency")
#: phases that run with context_parallel > 1 (FSDP2 x Ulysses, anyflow.training.distributed)
CONTEXT_PARALLEL_PHASES = ("teacher", "pretrain")
#: Distributions of the teacher phase's t (:func:`anyflow.training.flowmap.sample_teacher_timesteps`).
TEACHER_TIMESTEPS = ("logit_normal", "uniform")
MODEL_KINDS = ("bidirectional", "far")
WEIGHT_TYPES = ("beta08", "gaussian", "uniform")
DERIVATIVES = ("fd", "jvp")


@dataclass
class ModelConfig:
    """Which transformer to train.

    Attributes:
        kind: ``"bidirectional"`` (``AnyFlowTransformer3DModel``) or ``"far"`` (``AnyFlowFARTransformer3DModel``).
        pretrained: path of a diffusers-format transformer folder (or a whole AnyFlow checkpoint folder,
            whose ``transformer/`` is used); ``None`` for :attr:`tiny` / :attr:`arch` models.
        tiny: build :func:`anyflow.models.tiny.tiny_transformer` (CPU tests) instead of loading.
        arch: transformer constructor kwargs (the diffusers ``config.json`` keys) of a model built
            from scratch with diffusers' default initialisation (seeded by :attr:`seed`).
        init_from: a transformer folder whose parameters of matching name and shape initialise an
            :attr:`arch` model (e.g. a FAR student from its bidirectional teacher; the FAR-only
            compressed patch embedding keeps its fresh initialisation).
        seed: init seed of a tiny model.
        gate_value, deltatime_type: the flow-map embedder of a model initialised from a plain Wan
            checkpoint (NVlabs/AnyFlow options/train/anyflow YAMLs ``flowmap_cfg``: gate 0.25, delta input ``r``).
    """

    kind: str = "bidirectional"
    pretrained: Optional[str] = None
    tiny: bool = False
    arch: Optional[dict] = None
    init_from: Optional[str] = None
    seed: int = 0
    gate_value: float = 0.25
    deltatime_type: str = "r"


@dataclass
class OptimizerConfig:
    """AdamW with a linear warm-up to a constant learning rate (NVlabs/AnyFlow far/main.py, optimisers and learning
    rate).

    ``lr(step) = lr * step / warmup_steps`` for ``step < warmup_steps`` (0 at the first update, as the
    ``constant_with_warmup`` schedule of the official trainer), then ``lr``.
    """

    lr: float = 5e-5
    betas: tuple = (0.9, 0.95)
    weight_decay: float = 0.0
    eps: float = 1e-8
    warmup_steps: int = 1000
    max_grad_norm: float = 1.0


@dataclass
class EMAConfig:
    """EMA of the trainable parameters: decay 0 (a copy) for ``step < warmup_steps``, then ``decay``."""

    decay: float = 0.999
    warmup_steps: int = 1000


@dataclass
class LoRAConfig:
    """LoRA adapters as in the official recipe (rank = alpha = 256). Applied through ``peft`` (later).

    Attributes:
        rank, alpha: LoRA rank and alpha.
        target_modules: module-name suffixes that receive adapters.
        extra_trainable: parameter-name substrings trained in full besides the adapters
            (``far_patch_embedding`` for FAR).
    """

    rank: int = 256
    alpha: int = 256
    target_modules: tuple = STUDENT_LORA_TARGETS
    extra_trainable: tuple = ()


@dataclass
class FlowMapConfig:
    """Forward (pretrain) flow-map objective (NVlabs/AnyFlow trainer_wan_anyflow_pretrain.py).

    Attributes:
        diffusion_ratio, consistency_ratio: shares of the global batch with r = t (diffusion) and
            r = 0 (consistency), assigned by global sample index; the rest are free pairs.
        epsilon: finite-difference half step in 1000-units (5).
        derivative: ``"fd"`` (central difference, the official method) or ``"jvp"`` (forward-mode
            autodiff, exact derivative; attention runs on the math SDPA path). Measured on CPU (fp32,
            1 thread, a 4-block d-128 model, batch 4 x 672 tokens, every pair free so every row needs
            the derivative): a training step takes 1.06 s with ``"fd"`` and 1.83 s with ``"jvp"``
            (median of 4, interleaved), so ``"fd"`` stays the default; GPU figures are owed.
        fuse_guidance_scale: g of the guidance fusion (1 disables it and its unconditional pass).
        weight_type: time weighting ``"beta08"``, ``"gaussian"`` or ``"uniform"`` (NVlabs/AnyFlow
        scheduling_flowmap_euler_discrete.py).
        bf16_timesteps: emulate the official bf16 rounding of t, r and t +/- epsilon (the official
            trainers draw them in the model dtype; a bias of the finite difference); off = fp32 timesteps.
        rescale: scale each non-diffusion loss to the global diffusion mean (stop-gradient factor).
        i2v_prob: probability (one coin per step) of zeroing t of the first frame (bidirectional).
    """

    diffusion_ratio: float = 0.5
    consistency_ratio: float = 0.25
    epsilon: float = 5.0
    derivative: str = "fd"
    fuse_guidance_scale: float = 3.0
    weight_type: str = "beta08"
    bf16_timesteps: bool = False
    rescale: bool = True
    i2v_prob: float = 0.0


@dataclass
class FARConfig:
    """FAR causal training (NVlabs/AnyFlow transformer_far_wan_model.py ``setup_far``; NVlabs/AnyFlow
    trainer_far_wan_anyflow_pretrain.py).

    Attributes:
        chunk_partition: latent frames per chunk.
        full_chunk_limit: trailing chunks at full resolution (the noisy window of the forward loss).
        long_context_ratio: probability of drawing the chunk count uniformly from
            ``{full_chunk_limit, ..., len(chunk_partition)}`` instead of ``full_chunk_limit``.
        bidirectional_modeling_prob: probability (per step) of the extra bidirectional
            flow-matching loss on the whole clip.
    """

    chunk_partition: tuple = FAR_CHUNK_PARTITION
    full_chunk_limit: int = 3
    long_context_ratio: float = 0.5
    bidirectional_modeling_prob: float = 0.1


@dataclass
class DMDConfig:
    """On-policy Flow Map Backward Simulation + DMD (NVlabs/AnyFlow trainer_wan_anyflow_onpolicy.py). Consumed by the
    on-policy trainer.

    Attributes:
        rollout_steps: step counts N drawn uniformly per iteration.
        grad_segments: ``"all"`` (official: backprop through the 2-3 rollout jumps) or ``"mid"``.
        dmd_weight, dmd_batch_size: generator loss weight and the samples it uses.
        real_guidance_scale: s of x0_real = x0_c + s (x0_c - x0_u) (CFG 1 + s).
        critic_update_ratio: generator step every this many iterations; critic every iteration.
        cotrain_forward: add the student's own distillation loss to the generator loss (the forward
            flow-map loss; with ``student="consistency"`` the consistency-distillation loss of ``consistency``).
        student: ``"flowmap"`` (AnyFlow: shortcut rollouts of the flow map) or ``"consistency"`` (the rCM-like
            baseline, consistency distillation + DMD: the student is an endpoint map u(z_t, t, 0), rolled out
            by multistep consistency sampling cut at the gradient step; bidirectional, single process).
        min_timestep, max_timestep: clamp of the DMD noise level.
        critic_optimizer: AdamW of the critic (fake score).
        critic_trainable: critic parameter-name substrings to train without LoRA (empty: all).
        critic_lora_targets: module-name suffixes of the critic's LoRA adapters (rank and alpha from
            ``lora``): attention q/k/v/o and FFN, not the student's timestep embedders (the
            ``discriminator_cfg`` LoRA of NVlabs/AnyFlow options/train/anyflow/*/onpolicy YAMLs).
        teacher: the real score (a bidirectional flow-matching model, also the critic's init) for
            ``anyflow train``; ``None`` when the caller passes the models to the trainer.
    """

    rollout_steps: tuple = (2, 4, 8, 16, 50)
    grad_segments: str = "all"
    dmd_weight: float = 1.0
    dmd_batch_size: int = 2
    real_guidance_scale: float = 3.0
    critic_update_ratio: int = 1
    cotrain_forward: bool = True
    student: str = "flowmap"
    min_timestep: float = 0.0
    max_timestep: float = 1000.0
    critic_optimizer: OptimizerConfig = field(default_factory=lambda: OptimizerConfig(lr=2e-6, betas=(0.0, 0.999),
                                                                                      warmup_steps=0))
    critic_trainable: tuple = ()
    critic_lora_targets: tuple = TEACHER_LORA_TARGETS
    teacher: Optional[ModelConfig] = None


@dataclass
class ConsistencyConfig:
    """Discrete consistency baseline (:mod:`anyflow.training.consistency`).

    Attributes:
        num_intervals: N of the shifted grid t_i = 1000 shift(i / N), i = 0..N; adjacent points are paired.
        teacher_guidance_scale: CFG of the teacher ODE step (consistency distillation); unused without
            a teacher (consistency training with the data velocity).
        weighting: ``"uniform"`` or ``"inverse_delta"`` (1 / (sigma_t - sigma_s), as iCT).
        teacher: the bidirectional flow-matching model whose ODE is distilled (queried at r = t, as the
            official real score); ``None``: consistency *training* from the data velocity.
    """

    num_intervals: int = 64
    teacher_guidance_scale: float = 3.0
    weighting: str = "inverse_delta"
    teacher: Optional[ModelConfig] = None


@dataclass
class TrainConfig:
    """One training run.

    Attributes:
        name: run name.
        phase: ``"teacher"``, ``"pretrain"`` (forward flow map), ``"onpolicy"`` (DMD, after pretrain) or
            ``"consistency"`` (the baseline).
        batch_size: samples per process and step.
        total_iter: optimiser steps.
        seed: seed of the training generator (pairs, noise, dropout coins, chunk counts).
        mixed_precision: bf16 autocast around the forwards (fp32 master weights).
        gradient_checkpointing: per-block activation checkpointing (the model's flag).
        shift: flow shift k of t = 1000 k s / (1 + (k - 1) s).
        drop_text_ratio: per-sample probability of replacing the prompt by the negative embedding.
        teacher_timesteps: phase ``teacher``: ``"logit_normal"`` (official) or ``"uniform"`` in the shifted
            sigma (:func:`anyflow.training.flowmap.sample_teacher_timesteps`).
        trainable: parameter-name substrings to train without LoRA (empty: every parameter).
        log_every, save_every: logging and checkpoint periods in steps (0 disables saving).
        output_dir: checkpoints and ``log.jsonl``.
        backend: op backend of the fused forwards (entered as :class:`anyflow.ops.backend` around every step).
        context_parallel: processes that share each sequence under ``torchrun`` (Ulysses context parallelism
            composed with FSDP2 on one ``(dp_shard, cp)`` mesh, :mod:`anyflow.training.distributed`); 1: none.
            ``batch_size`` is then per ``dp_shard`` slice (the global batch is ``batch_size * WORLD_SIZE /
            context_parallel``). Phases ``teacher`` and ``pretrain``, ``flowmap.derivative = "fd"``.
    """

    name: str = "run"
    phase: str = "pretrain"
    model: ModelConfig = field(default_factory=ModelConfig)
    batch_size: int = 2
    total_iter: int = 6000
    seed: int = 0
    mixed_precision: bool = True
    gradient_checkpointing: bool = True
    shift: float = 5.0
    drop_text_ratio: float = 0.1
    teacher_timesteps: str = "logit_normal"
    trainable: tuple = ()
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    ema: EMAConfig = field(default_factory=EMAConfig)
    lora: Optional[LoRAConfig] = None
    flowmap: FlowMapConfig = field(default_factory=FlowMapConfig)
    far: Optional[FARConfig] = None
    dmd: Optional[DMDConfig] = None
    consistency: Optional[ConsistencyConfig] = None
    log_every: int = 1
    save_every: int = 50
    output_dir: Optional[str] = None
    backend: str = "auto"
    context_parallel: int = 1

    def __post_init__(self):
        validate(self)


# -- validation ------------------------------------------------------------------------------------
def _check(cond: bool, name: str, expected: str, got) -> None:
    if not cond:
        raise ValueError(f"{name} must be {expected}, got {got!r}")


def validate(cfg: TrainConfig) -> None:
    """Raise ``ValueError`` for out-of-range values (called on construction)."""
    _check(cfg.phase in PHASES, "phase", f"one of {PHASES}", cfg.phase)
    _check(cfg.teacher_timesteps in TEACHER_TIMESTEPS, "teacher_timesteps", f"one of {TEACHER_TIMESTEPS}",
           cfg.teacher_timesteps)
    _check(cfg.model.kind in MODEL_KINDS, "model.kind", f"one of {MODEL_KINDS}", cfg.model.kind)
    _check(cfg.model.arch is None or isinstance(cfg.model.arch, dict), "model.arch", "a mapping of transformer "
           "config keys", cfg.model.arch)
    _check(cfg.model.init_from is None or cfg.model.arch is not None, "model.init_from", "used with model.arch",
           cfg.model.init_from)
    _check(cfg.batch_size >= 1, "batch_size", ">= 1", cfg.batch_size)
    _check(cfg.total_iter >= 0, "total_iter", ">= 0", cfg.total_iter)
    _check(cfg.shift > 0, "shift", "> 0", cfg.shift)
    _check(0.0 <= cfg.drop_text_ratio <= 1.0, "drop_text_ratio", "in [0, 1]", cfg.drop_text_ratio)
    fm = cfg.flowmap
    _check(0 <= fm.diffusion_ratio and 0 <= fm.consistency_ratio and fm.diffusion_ratio + fm.consistency_ratio <= 1,
           "flowmap.diffusion_ratio + flowmap.consistency_ratio", "non-negative with sum <= 1",
           (fm.diffusion_ratio, fm.consistency_ratio))
    _check(fm.epsilon > 0, "flowmap.epsilon", "> 0", fm.epsilon)
    _check(fm.derivative in DERIVATIVES, "flowmap.derivative", f"one of {DERIVATIVES}", fm.derivative)
    _check(fm.fuse_guidance_scale > 0, "flowmap.fuse_guidance_scale", "> 0", fm.fuse_guidance_scale)
    _check(fm.weight_type in WEIGHT_TYPES, "flowmap.weight_type", f"one of {WEIGHT_TYPES}", fm.weight_type)
    _check(0.0 <= fm.i2v_prob <= 1.0, "flowmap.i2v_prob", "in [0, 1]", fm.i2v_prob)
    critic_opt = [("dmd.critic_optimizer", cfg.dmd.critic_optimizer)] if cfg.dmd else []
    for name, opt in [("optimizer", cfg.optimizer)] + critic_opt:
        _check(opt.lr >= 0, f"{name}.lr", ">= 0", opt.lr)
        _check(len(opt.betas) == 2 and all(0 <= b < 1 for b in opt.betas), f"{name}.betas", "two values in [0, 1)",
               opt.betas)
        _check(opt.warmup_steps >= 0, f"{name}.warmup_steps", ">= 0", opt.warmup_steps)
        _check(opt.max_grad_norm > 0, f"{name}.max_grad_norm", "> 0", opt.max_grad_norm)
    _check(0 <= cfg.ema.decay < 1, "ema.decay", "in [0, 1)", cfg.ema.decay)
    cp = cfg.context_parallel
    _check(isinstance(cp, int) and not isinstance(cp, bool) and cp >= 1, "context_parallel", "a positive int", cp)
    if cp > 1:  # the on-policy rollouts and the consistency phase slice rows by global rank; JVP cannot cross ranks
        _check(cfg.phase in CONTEXT_PARALLEL_PHASES, "phase", f"one of {CONTEXT_PARALLEL_PHASES} with "
               f"context_parallel={cp}", cfg.phase)
        _check(fm.derivative == "fd", "flowmap.derivative", f"'fd' with context_parallel={cp} (forward-mode AD "
               "has no rule for the Ulysses collectives)", fm.derivative)
    _check(cfg.model.kind != "far" or cfg.far is not None, "far", "a FARConfig for model.kind 'far'", cfg.far)
    if cfg.far is not None:
        cp = cfg.far.chunk_partition
        _check(len(cp) > 0 and all(int(c) > 0 for c in cp), "far.chunk_partition", "positive ints", cp)
        _check(1 <= cfg.far.full_chunk_limit, "far.full_chunk_limit", ">= 1", cfg.far.full_chunk_limit)
        _check(0 <= cfg.far.long_context_ratio <= 1, "far.long_context_ratio", "in [0, 1]", cfg.far.long_context_ratio)
    if cfg.dmd is not None:
        _check(cfg.dmd.grad_segments in ("all", "mid"), "dmd.grad_segments", "'all' or 'mid'", cfg.dmd.grad_segments)
        _check(cfg.dmd.student in ("flowmap", "consistency"), "dmd.student", "'flowmap' or 'consistency'",
               cfg.dmd.student)
    if cfg.consistency is not None:
        _check(cfg.consistency.num_intervals >= 1, "consistency.num_intervals", ">= 1", cfg.consistency.num_intervals)
        _check(cfg.consistency.weighting in ("uniform", "inverse_delta"), "consistency.weighting",
               "'uniform' or 'inverse_delta'", cfg.consistency.weighting)


# -- official presets (NVlabs/AnyFlow options/train/anyflow YAMLs) ---------------------------------
_SIZES = {"1.3b": dict(batch_size=2, total_iter=6000, dmd_batch_size=2),
          "14b": dict(batch_size=1, total_iter=4000, dmd_batch_size=1)}


def _official(kind: str, phase: str, size: str) -> TrainConfig:
    s = _SIZES[size]
    far = kind == "far"
    if phase == "onpolicy":
        optimizer = OptimizerConfig(lr=2e-6, betas=(0.0, 0.999), warmup_steps=0)
        ema, total = EMAConfig(decay=0.99, warmup_steps=200), 1200
        dmd = DMDConfig(dmd_batch_size=s["dmd_batch_size"])
    else:
        optimizer = OptimizerConfig(lr=5e-5, betas=(0.9, 0.95), warmup_steps=1000)
        ema, total, dmd = EMAConfig(decay=0.999, warmup_steps=1000), s["total_iter"], None
    if phase == "teacher":
        lora = LoRAConfig(target_modules=TEACHER_LORA_TARGETS)
        flowmap = FlowMapConfig(weight_type="gaussian", fuse_guidance_scale=1.0)
    else:
        lora = LoRAConfig(extra_trainable=("far_patch_embedding",) if far else ())
        flowmap = FlowMapConfig()
    far_cfg = FARConfig(bidirectional_modeling_prob=0.1 if phase == "pretrain" else 0.0) if far else None
    return TrainConfig(name=f"{kind if phase != 'teacher' else 'wan'}-{phase}-{size}", phase=phase,
                       model=ModelConfig(kind=kind), batch_size=s["batch_size"], total_iter=total, optimizer=optimizer,
                       ema=ema, lora=lora, flowmap=flowmap, far=far_cfg, dmd=dmd)


def _tiny(kind: str) -> TrainConfig:
    return TrainConfig(
        name=f"tiny-{kind}", phase="pretrain", model=ModelConfig(kind=kind, tiny=True), batch_size=4, total_iter=20,
        mixed_precision=False, gradient_checkpointing=False, save_every=0, backend="torch",
        optimizer=OptimizerConfig(lr=1e-3, betas=(0.9, 0.95), warmup_steps=2), ema=EMAConfig(decay=0.9, warmup_steps=2),
        far=FARConfig(chunk_partition=(1, 1, 2, 2, 2), full_chunk_limit=3) if kind == "far" else None,
    )


def preset_names() -> list[str]:
    """Names accepted by :func:`preset`."""
    phases = [f"{kind}-{phase}" for kind in MODEL_KINDS for phase in ("pretrain", "onpolicy")]
    return [f"{p}-{size}" for size in _SIZES for p in ["teacher", *phases]] + ["tiny", "tiny-far"]


def preset(name: str) -> TrainConfig:
    """An official configuration (NVlabs/AnyFlow options/train/anyflow YAMLs) or a tiny CPU one.

    Names: ``teacher-{1.3b,14b}``, ``{bidirectional,far}-{pretrain,onpolicy}-{1.3b,14b}``, ``tiny``
    (bidirectional) and ``tiny-far``. Sizes differ only in batch per GPU (2 / 1), pretrain/teacher
    iterations (6000 / 4000) and the DMD batch (2 / 1).

    Where the official presets deliberately differ from the official trainers:

    * **fp32 timesteps.** The official trainers draw and shift t, r (and t +/- epsilon of the finite
      difference) in the bf16 model dtype, which biases dU/dt by up to about 20% above t = 256; the presets
      keep them in fp32 (``flowmap.bf16_timesteps=False``; set it to ``True`` to emulate the rounding).
    * **Explicit batch of the negative embedding.** It is expanded to the batch instead of broadcast from
      batch 1 (same numbers; lets the fused attention kernels run).

    The critic follows the official code (it trains on the first ``dmd_batch_size`` samples, with LoRA on
    attention and FFN only, ``dmd.critic_lora_targets``), and so does FAR's bidirectional loss (it gets the
    prompts after text dropout).

    Raises:
        ValueError: unknown name.
    """
    key = name.lower()
    if key in ("tiny", "tiny-far"):
        return _tiny("far" if key == "tiny-far" else "bidirectional")
    parts = key.split("-")
    if len(parts) == 2 and parts[0] == "teacher" and parts[1] in _SIZES:
        return _official("bidirectional", "teacher", parts[1])
    if len(parts) == 3 and parts[0] in MODEL_KINDS and parts[1] in ("pretrain", "onpolicy") and parts[2] in _SIZES:
        return _official(parts[0], parts[1], parts[2])
    raise ValueError(f"preset name must be one of {preset_names()}, got {name!r}")


# -- dict / YAML round trip ------------------------------------------------------------------------
def to_dict(cfg) -> dict:
    """Plain nested dict (tuples as lists) suitable for YAML / JSON."""

    def conv(v):
        if dataclasses.is_dataclass(v):
            return {f.name: conv(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, (tuple, list)):
            return [conv(x) for x in v]
        return v

    return conv(cfg)


#: scalar field type -> (what the error names, accepted Python types); bools are not numbers here
_SCALARS = {float: ("a number", (int, float)), int: ("an int", int), bool: ("a bool", bool), str: ("a string", str)}


def _coerce(tp, value, where: str):
    if get_origin(tp) is Union:  # Optional[X]
        args = [a for a in get_args(tp) if a is not type(None)]
        return None if value is None else _coerce(args[0], value, where)
    if dataclasses.is_dataclass(tp):  # a mapping went to _from_dict
        if not isinstance(value, tp):
            raise TypeError(f"{where} must be a mapping, got {type(value).__name__}")
        return value
    if tp is tuple:
        if not isinstance(value, (list, tuple)):
            raise TypeError(f"{where} must be a list, got {value!r}")
        return tuple(value)
    if tp in _SCALARS:
        what, accepted = _SCALARS[tp]
        if not isinstance(value, accepted) or (tp is not bool and isinstance(value, bool)):
            raise TypeError(f"{where} must be {what}, got {value!r}")
        return float(value) if tp is float else value
    return value


def _from_dict(cls, data: dict, where: str, base):
    """``base`` (a ``cls``) with the fields of ``data`` replaced, mappings merged into nested sections."""
    hints = get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        keys = [f"{where}.{k}" if where else k for k in unknown]
        raise ValueError(f"unknown config key(s) {keys}; {where or 'the top level'} takes {sorted(names)}")
    kwargs = {f.name: getattr(base, f.name) for f in dataclasses.fields(cls)}
    for name in (f.name for f in dataclasses.fields(cls) if f.name in data):
        value, tp, key = data[name], hints[name], f"{where}.{name}" if where else name
        inner = [a for a in get_args(tp) if a is not type(None)] if get_origin(tp) is Union else [tp]
        if isinstance(value, dict) and dataclasses.is_dataclass(inner[0]):
            cur = kwargs[name]
            kwargs[name] = _from_dict(inner[0], value, key, cur if cur is not None else inner[0]())
        else:
            kwargs[name] = _coerce(tp, value, key)
    return cls(**kwargs)


def from_dict(data: dict) -> TrainConfig:
    """Build a :class:`TrainConfig` from a nested mapping; ``preset`` names the base (default: the
    dataclass defaults). Nested sections override field by field.

    Raises:
        ValueError: unknown keys (named with their path) or invalid values.
        TypeError: a value of the wrong type.
    """
    if not isinstance(data, dict):
        raise TypeError(f"config must be a mapping, got {type(data).__name__}")
    data = dict(data)
    name = data.pop("preset", None)
    base = preset(name) if name is not None else TrainConfig()
    return _from_dict(TrainConfig, data, "", base=base)


def load_config(path: Union[str, Path]) -> TrainConfig:
    """Read a YAML config file (see :func:`from_dict`)."""
    import yaml

    with open(path) as f:
        data = yaml.safe_load(f) or {}
    return from_dict(data)


def dump_config(cfg: TrainConfig, path: Optional[Union[str, Path]] = None) -> str:
    """YAML text of ``cfg`` (written to ``path`` when given)."""
    import yaml

    text = yaml.safe_dump(to_dict(cfg), sort_keys=False)
    if path is not None:
        Path(path).write_text(text)
    return text


def resolve(cfg: Any) -> TrainConfig:
    """Accept a :class:`TrainConfig`, a preset name, a mapping or a YAML path."""
    if isinstance(cfg, TrainConfig):
        return cfg
    if isinstance(cfg, dict):
        return from_dict(cfg)
    if isinstance(cfg, (str, Path)):
        p = Path(cfg)
        if p.suffix in (".yaml", ".yml") or p.is_file():
            return load_config(p)
        return preset(str(cfg))
    raise TypeError(f"config must be a TrainConfig, preset name, mapping or YAML path, got {type(cfg).__name__}")
