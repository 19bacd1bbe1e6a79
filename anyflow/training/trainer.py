"""The training loop of every phase: teacher, flow-map pretrain, consistency baseline, on-policy FMBS + DMD.

:class:`Trainer` owns the loop, the optimisers, EMA, checkpoints and logs; what a step computes is its
phase's (:class:`anyflow.training.flowmap.TeacherPhase` / :class:`~anyflow.training.flowmap.PretrainPhase`,
:class:`anyflow.training.consistency.ConsistencyPhase`, :class:`anyflow.training.onpolicy.OnPolicyPhase`,
each next to its loss). One step: next ``(latents [B, F, C, H, W], text [B, L, D])`` from the data
iterator, the phase's losses under optional bf16 autocast (fp32 master weights), backward, gradient
clipping, AdamW with the official betas / LR and linear warm-up, EMA, a log line (stdout and ``log.jsonl``),
and an atomic checkpoint every ``save_every`` steps. All randomness of the objective comes from one CPU
``torch.Generator`` seeded by ``config.seed``; it is checkpointed with the global RNGs and the data
iterator's state, so a resumed run continues bit for bit.

LoRA adapters through ``peft`` (:mod:`.lora`) when ``config.lora`` is set (student and critic).

Data parallelism (``fsdp=True``, :mod:`.distributed`): the student, the critic and the teacher are
sharded with FSDP2 (the teacher too, as it is as large as the student; being frozen it costs one
all-gather per call and no reduction). Every process reads the *global* batch from its data iterator
and draws all randomness of the step for the global batch from the same generator (identical on every
process), then trains on its own rows ``[rank * B, (rank + 1) * B)`` (B = global / world_size): the
pair kinds are those of the global sample index, the FAR chunk count, rollout plan and coins agree
across processes, and a run on P processes takes the steps of one process on the same global batch
(up to the floating-point order of the gradient reduction). bf16 mixed precision is FSDP's policy
(bf16 gathered parameters, fp32 reduction, fp32 master shards) instead of autocast. Checkpoints hold
whole tensors (gathered; written by rank 0), the same format as a one-process run, and load into any
number of processes. The consistency phase is single-process only.

FSDP2 x context parallelism (``context_parallel=N`` or the config key, with ``fsdp``; phases ``teacher`` and
``pretrain``, bidirectional and FAR, finite-difference derivative only) runs on the ``(dp_shard, cp)`` mesh
``(P / N, N)`` of :mod:`.distributed`: the ``N`` processes of a ``cp`` group train on the same rows ``[d * B,
(d + 1) * B)`` (d the ``dp_shard`` index, B = global / (P / N)) with the same draws and split the student's tokens
by Ulysses (gradient scaling: :func:`.distributed.shard_model`); logged losses are averaged over ``dp_shard``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import sys
import time
from pathlib import Path
from typing import Callable, Iterator, Optional

import torch
import torch.distributed as dist

from .. import ops
from . import checkpoint as ckpt
from . import distributed as D
from .config import resolve, to_dict
from .consistency import ConsistencyPhase
from .flowmap import PretrainPhase, TeacherPhase, is_far, kind_losses
from .lora import select_trainable
from .onpolicy import OnPolicyPhase

#: Logged losses averaged over processes in data-parallel runs (present on every process alike).
GLOBAL_LOSSES = ("loss", "loss_forward", "loss_bidirectional", "loss_dmd", "loss_critic")


class Trainer:
    """Trainer of every phase: ``teacher``, ``pretrain``, ``consistency`` and ``onpolicy``.

    Args:
        model: diffusers ``AnyFlowTransformer3DModel`` / ``AnyFlowFARTransformer3DModel`` (fp32 weights,
            on the training device); trained in place.
        config: :class:`TrainConfig`, preset name, mapping or YAML path.
        data: iterator of ``(latents [B, F, C, H, W], text [B, L, D])``; its ``state_dict`` /
            ``load_state_dict``, when present, are checkpointed. With several processes B is the global
            batch (a multiple of ``world_size``); each process trains on its slice.
        negative_embedding: ``[L, D]`` / ``[1, L, D]`` negative-prompt embedding (text dropout, guidance
            fusion, teacher CFG).
        teacher: ``v(z, t, text)`` flow-matching velocity for the consistency phase (distillation);
            ``None`` = consistency training.
        real_score: phase ``onpolicy``: the teacher (bidirectional flow-matching model, frozen; CFG real
            score of DMD).
        critic: phase ``onpolicy``: the fake score (bidirectional; default: a copy of ``real_score``).
        output_dir: checkpoints and ``log.jsonl`` (default ``config.output_dir``; ``None``: no files).
        log_stream: where log lines are printed (``None``: silent).
        rank, world_size, all_reduce: the process's place in a data-parallel group (pair kinds by global
            index; the re-scaling mean summed by ``all_reduce``). Defaults: one process, or the initialised
            process group with ``fsdp`` (with context parallelism, ``all_reduce`` sums over ``dp_shard``).
        fsdp: shard student, critic and teacher with FSDP2 (:func:`.distributed.shard_model`; the models
            are :func:`anyflow.enable`-d with ``config.backend``); needs an initialised process group and
            the models on the training device.
        context_parallel: ``N`` processes share each sequence (Ulysses over the ``cp`` dimension of the
            ``(dp_shard, cp)`` mesh, see the module doc); default ``config.context_parallel`` (1: none).
            ``N > 1`` needs ``fsdp``.

    Attributes:
        phase: the phase's step (:class:`anyflow.training.flowmap.Phase`); ``critic``, ``critic_params``,
            ``critic_optimizer`` and ``real_score`` are the on-policy phase's (``None`` in other phases).
        rank, world_size: global rank and number of processes (rank 0 logs and writes).
        dp_rank, dp_size: this process's slice of the global batch and the number of slices
            (``world_size / N``); equal to ``rank``, ``world_size`` without context parallelism.
        mesh: the :class:`.distributed.TrainMesh` with context parallelism, else ``None``.

    Raises:
        ValueError: ``phase="onpolicy"`` without ``real_score``.
        ValueError: the model kind does not match ``config.model.kind``; nothing to train.
        ValueError: ``fsdp`` with the consistency phase.
        ValueError: ``context_parallel`` not a positive int, ``> 1`` without ``fsdp``, with a phase other
            than ``teacher`` / ``pretrain`` or the ``"jvp"`` derivative, not dividing the number of
            processes or the model's attention heads; raised before any collective.
        RuntimeError: ``fsdp`` without an initialised process group.
    """

    def __init__(self, model, config, data: Iterator, negative_embedding: torch.Tensor, *,
                 teacher: Optional[Callable] = None, real_score=None, critic=None, output_dir=None,
                 log_stream=sys.stdout, rank: int = 0, world_size: int = 1, all_reduce: Optional[Callable] = None,
                 fsdp: bool = False, context_parallel: Optional[int] = None):
        cfg = resolve(config)
        if context_parallel is not None and context_parallel != cfg.context_parallel:
            cfg = dataclasses.replace(cfg, context_parallel=context_parallel)  # validated (phase, derivative)
        cp = cfg.context_parallel
        if cp > 1 and not fsdp:
            raise ValueError(f"context_parallel={cp} needs fsdp=True (a torchrun job; the trainer shards with FSDP2)")
        far = is_far(model)
        if far != (cfg.model.kind == "far"):
            raise ValueError(f"config.model.kind is {cfg.model.kind!r} but the model is "
                             f"{type(model).__name__} ({'far' if far else 'bidirectional'})")
        self.cfg = cfg
        self.model = model
        self.far = far
        self.data = data
        self.negative = negative_embedding
        if fsdp:
            if not dist.is_available() or not dist.is_initialized():
                raise RuntimeError("fsdp=True needs an initialised torch.distributed process group")
            rank, world_size = dist.get_rank(), dist.get_world_size()
            D.check_context_parallel(cp, world_size, model.config.num_attention_heads)  # before any collective
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
        self.mesh = D.train_mesh(cp, next(model.parameters()).device) if cp > 1 else None
        if fsdp and all_reduce is None:
            all_reduce = D.all_reduce_sum if self.mesh is None else functools.partial(D.all_reduce_sum,
                                                                                   group=self.mesh.dp_group)
        self.rank, self.world_size, self.all_reduce = rank, world_size, all_reduce
        self.dp_rank, self.dp_size = (rank, world_size) if self.mesh is None else (self.mesh.dp_rank, self.mesh.dp_size)
        self.fsdp = fsdp
        self.output_dir = Path(output_dir or cfg.output_dir) if (output_dir or cfg.output_dir) else None
        self.log_stream = log_stream

        model.train()
        if cfg.gradient_checkpointing:
            model.enable_gradient_checkpointing()
        elif getattr(model, "gradient_checkpointing", False):
            model.disable_gradient_checkpointing()
        patterns = tuple(cfg.trainable)
        lora = None if cfg.lora is None else dataclasses.replace(
            cfg.lora, extra_trainable=tuple(cfg.lora.extra_trainable) + patterns)
        self.named_params = self.trainable(model, lora, patterns, "trainable", "the model")
        self.optimizer, self.lr_scheduler = _adamw(self.named_params, cfg.optimizer)
        # checkpoint keys (params, AdamW, LR schedule), named params, AdamW and LR schedule of each trained model
        self._trained = [(("model", "optimizer", "lr_scheduler"), self.named_params, self.optimizer,
                          self.lr_scheduler)]
        # sharded: the EMA keeps this process's shards (views that follow the optimiser's in-place updates)
        self.ema = ckpt.EMA([(n, D.local_view(p)) for n, p in self.named_params], cfg.ema.decay, cfg.ema.warmup_steps)
        self.generator = torch.Generator().manual_seed(cfg.seed)
        self.step = 0
        if cfg.phase == "onpolicy":
            self.phase = OnPolicyPhase(self, real_score, critic)
        elif cfg.phase == "consistency":
            self.phase = ConsistencyPhase(self, teacher)
        elif cfg.phase == "pretrain":
            self.phase = PretrainPhase(self)
        else:  # "teacher"; validated in config
            self.phase = TeacherPhase(self)

    critic = property(lambda self: getattr(self.phase, "critic", None))
    critic_params = property(lambda self: getattr(self.phase, "critic_params", None))
    critic_optimizer = property(lambda self: getattr(self.phase, "critic_optimizer", None))
    real_score = property(lambda self: getattr(self.phase, "real_score", None))

    # -- what phases use ----------------------------------------------------------------------------
    def trainable(self, model, lora_cfg, patterns, arg: str, what: str) -> list:
        """``(name, param)`` pairs to train in ``model`` (:func:`anyflow.training.lora.select_trainable`; the
        rest is frozen), re-bound to the sharded parameters when the trainer shards (:meth:`shard`)."""
        named = select_trainable(model, lora_cfg, patterns, arg, what)
        return self.shard(model, named) if self.fsdp else named

    def shard(self, model, named=()) -> list:
        """Enable and FSDP2-shard ``model``; ``named`` re-bound to the sharded parameters (same names)."""
        import anyflow

        anyflow.enable(model, backend=self.cfg.backend)
        D.shard_model(model, D.mixed_precision_policy(self.cfg.mixed_precision), self.mesh)
        own = dict(model.named_parameters())
        return [(n, own[n]) for n, _ in named]

    def add_optimizer(self, name: str, named: list, opt_cfg):
        """AdamW with linear warm-up (``opt_cfg``: :class:`~anyflow.training.config.OptimizerConfig`) for
        another trained model's ``named`` parameters; checkpointed as ``name``, ``name_optimizer`` and
        ``name_lr_scheduler``. Returns ``(optimizer, lr_scheduler)``; the phase steps them."""
        optimizer, scheduler = _adamw(named, opt_cfg)
        self._trained.append(((name, f"{name}_optimizer", f"{name}_lr_scheduler"), named, optimizer, scheduler))
        return optimizer, scheduler

    def sharded(self, forward):
        """The sharded twin of a training forward whose model is sharded (:func:`.distributed.sharded_forward`)."""
        return D.sharded_forward(forward)

    def autocast(self, device):
        """bf16 autocast with ``mixed_precision`` (sharded: FSDP's bf16 policy instead, no autocast)."""
        if not self.cfg.mixed_precision or self.fsdp:
            return contextlib.nullcontext()
        return torch.autocast(device.type, dtype=torch.bfloat16)

    def rows(self, global_batch: int) -> Optional[torch.Tensor]:
        """This process's rows of a global batch: slice ``dp_rank`` of ``dp_size`` (``None`` for one slice;
        the processes of one context-parallel group get the same rows).

        Raises:
            ValueError: the global batch is not a multiple of ``dp_size``.
        """
        if self.dp_size == 1:
            return None
        if global_batch % self.dp_size:
            raise ValueError(f"the data iterator's batch ({global_batch}) must be a multiple of the data-parallel "
                             f"size ({self.dp_size}): it is the global batch")
        n = global_batch // self.dp_size
        return torch.arange(self.dp_rank * n, (self.dp_rank + 1) * n)

    @staticmethod
    def take(rows, *tensors):
        """``tensors`` restricted to ``rows`` (all of them for ``None``)."""
        if rows is None:
            return tensors
        return tuple(x[rows.to(x.device)] for x in tensors)

    def next_batch(self, device):
        """The next ``(latents, text)`` of the data iterator on ``device`` (the global batch)."""
        latents, text = next(self.data)
        return latents.to(device), text.to(device)

    def average_losses(self, record: dict) -> None:
        """Replace the losses of :data:`GLOBAL_LOSSES` in ``record`` by their mean over the batch slices
        (``dp_shard``: the processes of a context-parallel group hold the same values) and the per-kind
        pieces by the per-kind means over the global batch; other statistics stay this process's."""
        distributed = self.dp_size > 1 and self.all_reduce is not None
        kind_losses(record, self._all_reduce_on_device if distributed else None)
        keys = [k for k in GLOBAL_LOSSES if k in record]  # the same keys on every process (global coins)
        if not distributed or not keys:
            return
        values = torch.tensor([float(record[k]) for k in keys], dtype=torch.float64)
        record.update(zip(keys, (self._all_reduce_on_device(values) / self.dp_size).tolist()))

    def _all_reduce_on_device(self, values: torch.Tensor) -> torch.Tensor:
        """Sum ``values`` over processes on the model's device (NCCL needs CUDA tensors); back on the CPU."""
        device = next(self.model.parameters()).device
        return self.all_reduce(values.to(device)).cpu()

    def update_student(self, losses, record: dict, device) -> float:
        """Backward every loss ``losses`` yields (each under autocast), clip, AdamW, LR and EMA steps; the
        losses' stats and ``grad_norm`` go into ``record``. Returns the summed loss."""
        self.optimizer.zero_grad(set_to_none=True)
        total = 0.0
        while True:
            with self.autocast(device):
                out = next(losses, None)
            if out is None:
                break
            out.loss.backward()
            total += float(out.loss.detach())
            record.update(out.stats)
        norm = torch.nn.utils.clip_grad_norm_([p for _, p in self.named_params], self.cfg.optimizer.max_grad_norm)
        record["grad_norm"] = float(D.full_tensor(norm))
        self.optimizer.step()
        self.lr_scheduler.step()
        self.ema.update(self.step)
        return total

    # -- the loop -----------------------------------------------------------------------------------
    def train_step(self) -> dict:
        """One optimiser step (on-policy: a generator step every ``critic_update_ratio`` iterations, then
        a critic step); returns the logged record."""
        start = time.perf_counter()
        device = next(self.model.parameters()).device
        record = {"step": self.step + 1, "lr": self.optimizer.param_groups[0]["lr"]}
        with ops.backend(self.cfg.backend):  # every forward and backward of the step
            self.phase.step(device, record)
        self.step += 1
        record["time_s"] = time.perf_counter() - start
        self._log(record)
        if self.output_dir is not None and self.cfg.save_every and self.step % self.cfg.save_every == 0:
            self.save()
        return record

    def fit(self, num_steps: Optional[int] = None) -> list[dict]:
        """Run ``num_steps`` steps (default: up to ``config.total_iter``); returns the records."""
        end = self.cfg.total_iter if num_steps is None else self.step + num_steps
        return [self.train_step() for _ in range(max(0, end - self.step))]

    # -- logging ----------------------------------------------------------------------------------
    def _log(self, record: dict) -> None:
        if self.output_dir is not None and self.rank == 0:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            with open(self.output_dir / "log.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")
        every = self.cfg.log_every
        if self.log_stream is not None and self.rank == 0 and every and (self.step % every == 0 or self.step == 1):
            extras = " ".join(f"{k} {v:.4g}" for k, v in record.items()
                              if k.startswith("loss_") and isinstance(v, float))
            nan = float("nan")  # no loss / grad_norm: an on-policy iteration without a generator step
            print(f"step {self.step}/{self.cfg.total_iter} loss {record.get('loss', nan):.4g} {extras} grad_norm "
                  f"{record.get('grad_norm', nan):.3g} lr {record['lr']:.3g} ({record['time_s']:.2f} s)",
                  file=self.log_stream, flush=True)

    # -- checkpoints ------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """The checkpoint: whole tensors whatever the sharding (gathering them is a collective: with
        ``fsdp`` every process must call this)."""
        state = {"step": self.step}
        for (p_key, o_key, s_key), named, optimizer, scheduler in self._trained:
            state.update({p_key: _full_params(named), o_key: D.gather_optimizer_state(optimizer.state_dict()),
                          s_key: scheduler.state_dict()})
        state.update(ema=self._ema_state(), rng=ckpt.rng_state({"train": self.generator}), config=to_dict(self.cfg))
        if hasattr(self.data, "state_dict"):
            state["data"] = self.data.state_dict()
        return state

    def _ema_state(self) -> dict:
        state = self.ema.state_dict()
        if not self.fsdp:
            return state
        own = dict(self.named_params)
        return {**state, "shadow": {n: D.gather_shard(s, own[n]).cpu() for n, s in state["shadow"].items()}}

    def load_state_dict(self, state: dict) -> None:
        """Restore a checkpoint of :meth:`state_dict` (written by any number of processes)."""
        for (p_key, o_key, s_key), named, optimizer, scheduler in self._trained:
            if p_key not in state:
                raise KeyError(f"checkpoint has no {p_key} state (written by another phase)")
            _restore_params(named, state[p_key], "trainable parameters" if p_key == "model" else f"{p_key} parameters")
            optimizer.load_state_dict(D.shard_optimizer_state(state[o_key], [p for _, p in named]))
            scheduler.load_state_dict(state[s_key])
        ema = state["ema"]
        if self.fsdp:
            own = dict(self.named_params)
            ema = {**ema, "shadow": {n: D.local_view(D.shard_of(s, own[n])) if n in own else s
                                     for n, s in ema["shadow"].items()}}
        self.ema.load_state_dict(ema)
        ckpt.set_rng_state(state["rng"], {"train": self.generator})
        if "data" in state and hasattr(self.data, "load_state_dict"):
            self.data.load_state_dict(state["data"])
        self.step = int(state["step"])

    @torch.no_grad()
    def export_state_dict(self, ema: bool = True, dtype=None) -> dict:
        """The student's plain weights (LoRA adapters merged, original names), with the EMA values of
        the trainable parameters swapped in when ``ema`` (the official ``ema`` export).

        With ``fsdp`` the whole weights are gathered (a collective: every process must call this) and
        only rank 0 gets them; the other processes get ``{}``.
        """
        from .lora import merged_state_dict

        if self.fsdp:
            return self._export_sharded(ema, dtype)
        saved = {n: p.detach().clone() for n, p in self.named_params}
        try:
            if ema:
                self.ema.copy_to(self.model)
            return merged_state_dict(self.model, dtype)
        finally:
            for n, p in self.named_params:
                p.copy_(saved[n])

    def _export_sharded(self, ema: bool, dtype) -> dict:
        """Gather every weight (EMA swapped in), then merge on rank 0 in an unsharded twin of the student."""
        from .lora import apply_lora, merged_state_dict

        full = {n: D.full_tensor(v.detach()).cpu() for n, v in self.model.state_dict().items()}
        if ema:
            full.update(self._ema_state()["shadow"])
        if self.rank != 0:
            return {}
        cls = getattr(type(self.model), "_anyflow_original_class", type(self.model))
        with torch.device("meta"):  # no initialisation: every tensor is assigned from the gathered state
            twin = cls.from_config(self.model.config)
            if self.cfg.lora is not None:
                apply_lora(twin, self.cfg.lora)
        twin.load_state_dict(full, assign=True)
        return merged_state_dict(twin, dtype)

    def save(self, path=None) -> Path:
        """Write a checkpoint atomically (default ``output_dir/checkpoint-<step>.pt``).

        With ``fsdp`` every process must call it (the state is gathered); rank 0 writes, and the call
        returns once the file is in place on every process.
        """
        if path is None:
            if self.output_dir is None:
                raise ValueError("save() needs a path when the trainer has no output_dir")
            path = ckpt.checkpoint_path(self.output_dir, self.step)
        state = self.state_dict()
        if self.rank == 0:
            ckpt.atomic_save(state, path)
        if self.fsdp:
            dist.barrier()
        return Path(path)

    def resume(self, path=None) -> Optional[Path]:
        """Load ``path`` (default: the latest checkpoint in ``output_dir``, as rank 0 sees it); returns it,
        or ``None``."""
        if path is None:
            path = ckpt.latest_checkpoint(self.output_dir) if self.output_dir is not None else None
            if self.fsdp:  # every process must load the same file
                box = [None if path is None else str(path)]
                dist.broadcast_object_list(box, src=0)
                path = box[0]
            if path is None:
                return None
        self.load_state_dict(ckpt.load(path))
        self._truncate_log()
        return Path(path)

    def _truncate_log(self) -> None:
        """Drop ``log.jsonl`` records of steps after the resumed one (an interrupted run logged them
        past its last checkpoint; the resumed run logs them again) and a line a kill cut short."""
        log = None if self.output_dir is None else self.output_dir / "log.jsonl"
        if self.rank != 0 or log is None or not log.is_file():
            return
        lines = log.read_text().splitlines()

        def kept(line: str) -> bool:
            try:
                return json.loads(line).get("step", 0) <= self.step
            except (json.JSONDecodeError, AttributeError):
                return False

        keep = [line for line in lines if line.strip() and kept(line)]
        if len(keep) != len(lines):
            from ..io import atomic_output

            with atomic_output(log) as tmp:
                Path(tmp).write_text("".join(line + "\n" for line in keep))


def _full_params(named) -> dict:
    """``{name: whole tensor on the CPU}`` (gathered from the shards of sharded parameters)."""
    return {n: D.full_tensor(p.detach()).cpu().clone() for n, p in named}


def _restore_params(named, saved: dict, what: str) -> None:
    """Copy ``saved[name]`` into every ``(name, param)`` of ``named``.

    Raises:
        KeyError: the checkpoint lacks some of them.
    """
    missing = sorted({n for n, _ in named} - set(saved))
    if missing:
        raise KeyError(f"checkpoint lacks {what} {missing[:5]}")
    for n, p in named:
        D.load_full_(p, saved[n])


def _adamw(named, o):
    """AdamW over ``named``'s parameters with the settings of ``o`` and its LR schedule: linear warm-up over
    ``o.warmup_steps`` steps, then constant."""
    optimizer = torch.optim.AdamW([p for _, p in named], lr=o.lr, betas=tuple(o.betas), weight_decay=o.weight_decay,
                                  eps=o.eps)
    warmup = o.warmup_steps
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: s / warmup if s < warmup else 1.0)
