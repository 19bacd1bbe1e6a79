"""``anyflow train CONFIG``: build models and data from a config, resume from the output folder, fit.

Data sources:

* ``"synthetic"``: :class:`anyflow.training.data.SyntheticClips` shaped for the model (smoke runs,
  CI); the negative embedding is a fixed random tensor.
* a ``.pt`` file of precomputed VAE latents and text-encoder embeddings
  (:func:`anyflow.training.data.save_dataset`), read by :class:`anyflow.training.data.TensorClips`.

The run folder gets ``config.yaml`` (the resolved config), ``log.jsonl`` and ``checkpoint-*.pt``;
running the same command again continues from the newest checkpoint bit for bit.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path
from typing import Optional

import torch

from .config import ModelConfig, TrainConfig, dump_config, resolve
from .consistency import teacher_velocity
from .data import SyntheticClips, TensorClips, load_dataset
from .trainer import Trainer


def build_transformer(m: ModelConfig, far=None):
    """The transformer of a :class:`ModelConfig`: tiny random, from scratch (``arch``, optionally
    initialised from ``init_from``), or a diffusers folder, in fp32."""
    if m.tiny:
        from ..models.tiny import tiny_transformer

        overrides = {"gate_value": m.gate_value, "deltatime_type": m.deltatime_type}
        if m.kind == "far" and far is not None:
            overrides["chunk_partition"] = tuple(far.chunk_partition)
            overrides["full_chunk_limit"] = far.full_chunk_limit
        return tiny_transformer(m.kind, seed=m.seed, **overrides)
    from ..models.loading import load_transformer

    if m.arch is not None:
        from diffusers import AnyFlowFARTransformer3DModel, AnyFlowTransformer3DModel

        cls = AnyFlowFARTransformer3DModel if m.kind == "far" else AnyFlowTransformer3DModel
        arch = dict(m.arch)
        if m.kind == "far" and far is not None:
            arch["chunk_partition"] = list(far.chunk_partition)
            arch["full_chunk_limit"] = far.full_chunk_limit
        torch.manual_seed(m.seed)
        model = cls(**arch)
        if m.init_from is not None:
            source = load_transformer(_transformer_folder(m.init_from), dtype=torch.float32).state_dict()
            own = model.state_dict()
            take = {k: v for k, v in source.items() if k in own and own[k].shape == v.shape}
            if not take:
                raise ValueError(f"model.init_from={m.init_from}: no parameter matches the arch model by name and "
                                 "shape")
            model.load_state_dict(take, strict=False)
        return model.float()
    if not m.pretrained:
        raise ValueError("model.pretrained must name a transformer folder unless model.tiny or model.arch is set")
    return load_transformer(_transformer_folder(m.pretrained), dtype=torch.float32)


def build_model(cfg: TrainConfig):
    """The student transformer of ``cfg`` (:func:`build_transformer` of ``cfg.model`` with ``cfg.far``), fp32."""
    return build_transformer(cfg.model, cfg.far)


def build_phase_models(cfg: TrainConfig):
    """``(student, real score, ODE teacher)`` of a run, fp32 on the CPU: the real score (``dmd.teacher``) for
    phase ``onpolicy`` and the frozen teacher whose ODE a ``consistency`` phase distils
    (``consistency.teacher``), each ``None`` where the phase has none.

    Raises:
        ValueError: phase ``onpolicy`` without ``dmd.teacher``.
    """
    model = build_model(cfg)
    real_score = ode_teacher = None
    if cfg.phase == "onpolicy":
        if cfg.dmd is None or cfg.dmd.teacher is None:
            raise ValueError("phase 'onpolicy' needs dmd.teacher (the real score model) in the config")
        real_score = build_transformer(cfg.dmd.teacher)
    if cfg.phase == "consistency" and cfg.consistency is not None and cfg.consistency.teacher is not None:
        ode_teacher = build_transformer(cfg.consistency.teacher).eval().requires_grad_(False)
    return model, real_score, ode_teacher


def ode_velocity(ode_teacher):
    """The consistency phase's ``teacher`` argument: ``v(z, t, text)`` of ``ode_teacher`` (or ``None``)."""
    return None if ode_teacher is None else teacher_velocity(ode_teacher)


def _transformer_folder(path) -> Path:
    folder = Path(path)
    if (folder / "transformer" / "config.json").is_file():
        folder = folder / "transformer"
    return folder


def export_transformer(trainer, folder, ema: bool = True) -> Path:
    """Write the trained student as a diffusers transformer folder (``save_pretrained``, safetensors):
    the EMA weights with LoRA merged (:meth:`Trainer.export_state_dict`) in the model's own class and
    config, so the folder loads with ``AnyFlow*Transformer3DModel.from_pretrained`` or as
    ``model.pretrained`` / ``init_from`` / ``dmd.teacher`` of the next phase. Written to a temporary
    sibling and renamed, so an interrupted export leaves no half folder."""
    import shutil
    import tempfile

    state = trainer.export_state_dict(ema=ema)
    # the diffusers class itself (anyflow.enable() swaps in a same-named subclass)
    cls = getattr(type(trainer.model), "_anyflow_original_class", type(trainer.model))
    with torch.device("meta"):  # no initialisation: every tensor comes from the exported state
        model = cls.from_config(trainer.model.config)
    model.load_state_dict(state, assign=True)
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        model.save_pretrained(tmp)
        if folder.exists():
            shutil.rmtree(folder)
        tmp.rename(folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder


def build_data(cfg: TrainConfig, model, data: str, frames: Optional[int] = None, latent_hw=(8, 8)):
    """``(iterator, negative [1, L, D])`` for ``data`` (``"synthetic"`` or a ``.pt`` file, see the module doc)."""
    if data == "synthetic":
        mc = model.config
        if frames is None:
            frames = sum(cfg.far.chunk_partition) if cfg.far is not None else 3
        it = SyntheticClips(cfg.batch_size, frames, mc.in_channels, latent_hw[0], latent_hw[1], text_dim=mc.text_dim,
                            seed=cfg.seed)
        negative = torch.randn(1, 7, mc.text_dim, generator=torch.Generator().manual_seed(cfg.seed + 12345))
        return it, negative
    blob = load_dataset(data)
    it = TensorClips(blob["latents"].float(), blob["text"].float(), cfg.batch_size, cfg.seed,
                     text_index=blob.get("text_index"))
    return it, blob["negative"].float()


def train_from_config(config, *, output_dir=None, data: str = "synthetic", steps: Optional[int] = None,
                      resume: bool = True, frames: Optional[int] = None, latent_hw=(8, 8), log_stream="stdout"):
    """Build everything from ``config`` (path, preset, mapping or :class:`TrainConfig`), resume from the
    newest checkpoint in the output folder (unless ``resume`` is false), run ``steps`` steps (default: up
    to ``total_iter``) and write a final checkpoint; once ``total_iter`` is reached, also the EMA
    transformer as ``output_dir/transformer`` (:func:`export_transformer`). Returns the trainer.

    Under ``torchrun`` (``WORLD_SIZE > 1``) the process group is initialised (NCCL on CUDA, each
    process on ``cuda:LOCAL_RANK``; gloo on the CPU), student, critic and teacher are FSDP2-sharded,
    ``config.batch_size`` is per process (the global batch is ``batch_size * WORLD_SIZE``, every
    process reading it and training on its slice), and rank 0 alone logs and writes the config, the
    checkpoints (whole tensors, loadable by any number of processes) and the exported transformer.
    With ``config.context_parallel = N`` the processes form a ``(WORLD_SIZE / N, N)`` mesh
    (:class:`anyflow.training.trainer.Trainer`): ``batch_size`` is per data-parallel slice (global batch
    ``batch_size * WORLD_SIZE / N``) and each slice's tokens are split over its ``N`` processes; a
    ``WORLD_SIZE`` that ``N`` does not divide raises ``ValueError`` before any collective.
    The process group is destroyed before returning.
    """
    from . import distributed as D

    ctx = D.init_from_env()
    try:
        main = ctx is None or ctx.is_main
        if log_stream == "stdout":
            log_stream = sys.stdout
        if not main:
            log_stream = None
        cfg = resolve(config)
        world = 1 if ctx is None else ctx.world_size
        slices = D.check_context_parallel(cfg.context_parallel, world)  # data-parallel slices of the batch
        out = Path(output_dir or cfg.output_dir or f"runs/{cfg.name}")
        out.mkdir(parents=True, exist_ok=True)
        model, teacher, ode_teacher = build_phase_models(cfg)
        data_cfg = cfg if slices == 1 else dataclasses.replace(cfg, batch_size=cfg.batch_size * slices)
        it, negative = build_data(data_cfg, model, data, frames, latent_hw)
        if main:
            dump_config(cfg, out / "config.yaml")
        if ctx is not None:
            model = model.to(ctx.device)
            teacher = None if teacher is None else teacher.to(ctx.device)
            ode_teacher = None if ode_teacher is None else ode_teacher.to(ctx.device)
        trainer = Trainer(model, cfg, it, negative, teacher=ode_velocity(ode_teacher), real_score=teacher,
                          output_dir=out, log_stream=log_stream, fsdp=ctx is not None)
        if resume:
            if main:  # a run killed mid-write left its temporary checkpoint file behind
                from .checkpoint import remove_partial_checkpoints

                remove_partial_checkpoints(out)
            path = trainer.resume()
            if path is not None and log_stream is not None:
                print(f"resumed from {path} (step {trainer.step})", file=log_stream, flush=True)
        trainer.fit(steps)
        trainer.save()
        if trainer.step >= cfg.total_iter:
            if main:
                export_transformer(trainer, out / "transformer")
            else:  # the export gathers the sharded weights: every process takes part
                trainer.export_state_dict()
        if ctx is not None:
            # tear down together: a process destroying the group (and exiting) while rank 0 still writes
            # the export can abort gloo's connection threads ("terminate called without an active exception")
            import torch.distributed as dist

            dist.barrier()
        return trainer
    finally:
        if ctx is not None:
            D.destroy()
