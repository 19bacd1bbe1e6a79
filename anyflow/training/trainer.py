"""Training loop for every phase: teacher, flow-map pretrain, consistency baseline, on-policy FMBS + DMD.

One :class:`Trainer` step: next ``(latents [B, F, C, H, W], text [B, L, D])`` from the data iterator,
the phase's loss under optional bf16 autocast (fp32 master weights), backward, gradient clipping,
AdamW with the official betas / LR and linear warm-up, EMA, a log line (stdout and ``log.jsonl``), and
an atomic checkpoint every ``save_every`` steps. All randomness of the objective comes from one CPU
``torch.Generator`` seeded by ``config.seed``; it is checkpointed with the global RNGs and the data
iterator's state, so a resumed run continues bit for bit.

Phase ``onpolicy`` (reference §7, :mod:`.onpolicy`): per iteration, when ``step % critic_update_ratio
== 0``, a generator step (shortcut rollout of the first ``dmd_batch_size`` samples, DMD loss against the
teacher (real score, CFG) and the critic (fake score), optionally plus the forward loss on the whole
batch; clip, AdamW, LR step, EMA), then always a critic step on a fresh batch (no-grad rollout,
flow-matching loss, clip, its own AdamW). Bidirectional and FAR students; teacher and critic are
bidirectional models judging the whole clip.

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
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Callable, Iterator, Optional

import torch

from . import checkpoint as ckpt
from . import consistency as cons
from . import distributed as D
from . import flowmap as fm
from . import onpolicy as op
from .config import ConsistencyConfig, DMDConfig, TrainConfig, resolve, to_dict

#: Logged losses averaged over processes in data-parallel runs (present on every process alike).
GLOBAL_LOSSES = ("loss", "loss_forward", "loss_bidirectional", "loss_dmd", "loss_critic")


# ----------------------------------------------------------------------------------------------
# model construction
# ----------------------------------------------------------------------------------------------
def build_model(cfg: TrainConfig):
    """The transformer of ``cfg.model``: a tiny random one or a diffusers-format folder (upstream or
    legacy layout; a whole checkpoint folder's ``transformer/`` is used), in fp32 (master weights)."""
    from .run import build_transformer

    return build_transformer(cfg.model, cfg.far)


def _is_far(model) -> bool:
    return hasattr(model, "far_patch_embedding")


# ----------------------------------------------------------------------------------------------
# trainer
# ----------------------------------------------------------------------------------------------
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
            process group with ``fsdp``.
        fsdp: shard student, critic and teacher with FSDP2 (:func:`.distributed.shard_model`; the models
            are :func:`anyflow.enable`-d with ``config.backend``); needs an initialised process group and
            the models on the training device.

    Raises:
        ValueError: ``phase="onpolicy"`` without ``real_score``.
        ValueError: the model kind does not match ``config.model.kind``; nothing to train.
        ValueError: ``fsdp`` with the consistency phase.
        RuntimeError: ``fsdp`` without an initialised process group.
    """

    def __init__(
        self,
        model,
        config,
        data: Iterator,
        negative_embedding: torch.Tensor,
        *,
        teacher: Optional[Callable] = None,
        real_score=None,
        critic=None,
        output_dir=None,
        log_stream=sys.stdout,
        rank: int = 0,
        world_size: int = 1,
        all_reduce: Optional[Callable] = None,
        fsdp: bool = False,
    ):
        cfg = resolve(config)
        if cfg.phase == "onpolicy" and real_score is None:
            raise ValueError("phase 'onpolicy' needs real_score (the teacher, a bidirectional model)")
        far = _is_far(model)
        if far != (cfg.model.kind == "far"):
            raise ValueError(f"config.model.kind is {cfg.model.kind!r} but the model is "
                             f"{type(model).__name__} ({'far' if far else 'bidirectional'})")
        if far and cfg.far is None:
            raise ValueError("a FAR model needs config.far")
        self.cfg = cfg
        self.model = model
        self.far = far
        self.data = data
        self.negative = negative_embedding
        self.teacher = teacher
        if fsdp:
            import torch.distributed as dist

            if not dist.is_available() or not dist.is_initialized():
                raise RuntimeError("fsdp=True needs an initialised torch.distributed process group")
            if cfg.phase == "consistency":
                raise ValueError("phase 'consistency' is single-process only (fsdp=True given)")
            rank, world_size = dist.get_rank(), dist.get_world_size()
            all_reduce = all_reduce or D.all_reduce_sum
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
        self.rank, self.world_size, self.all_reduce = rank, world_size, all_reduce
        self.fsdp = fsdp
        self.output_dir = Path(output_dir or cfg.output_dir) if (output_dir or cfg.output_dir) else None
        self.log_stream = log_stream
        self.backend = cfg.backend

        model.train()
        if cfg.gradient_checkpointing:
            model.enable_gradient_checkpointing()
        elif getattr(model, "gradient_checkpointing", False):
            model.disable_gradient_checkpointing()
        patterns = tuple(cfg.trainable)
        lora = None if cfg.lora is None else dataclasses.replace(
            cfg.lora, extra_trainable=tuple(cfg.lora.extra_trainable) + patterns
        )
        self.named_params = _select_trainable(model, lora, patterns, "trainable", "the model")
        if fsdp:
            self.named_params = self._shard(model, self.named_params)
        params = [p for _, p in self.named_params]
        o = cfg.optimizer
        self.optimizer = torch.optim.AdamW(params, lr=o.lr, betas=tuple(o.betas), weight_decay=o.weight_decay, eps=o.eps)
        warmup = o.warmup_steps
        self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: s / warmup if s < warmup else 1.0
        )
        # sharded: the EMA keeps this process's shards (views that follow the optimiser's in-place updates)
        self.ema = ckpt.EMA([(n, D.local_view(p)) for n, p in self.named_params], cfg.ema.decay, cfg.ema.warmup_steps)
        self.generator = torch.Generator().manual_seed(cfg.seed)
        self.weighting = fm.TrainWeighting(cfg.flowmap.weight_type, cfg.shift)
        self.consistency_cfg = cfg.consistency or ConsistencyConfig()
        self.step = 0
        self.real_score = self.critic = None
        if cfg.phase == "onpolicy":
            self._init_onpolicy(real_score, critic)

    def _shard(self, model, named):
        """Enable and FSDP2-shard ``model``; ``named`` re-bound to the sharded parameters (same names)."""
        import anyflow

        anyflow.enable(model, backend=self.cfg.backend)
        D.shard_model(model, D.mixed_precision_policy(self.cfg.mixed_precision))
        own = dict(model.named_parameters())
        return [(n, own[n]) for n, _ in named]

    def _init_onpolicy(self, real_score, critic):
        """Teacher (frozen, eval) and critic (trainable; default: a copy of the teacher) with its AdamW."""
        import copy

        cfg = self.cfg
        self.dmd = cfg.dmd or DMDConfig()
        for name, m in (("real_score", real_score), ("critic", critic)):
            if m is not None and _is_far(m):
                raise ValueError(f"{name} must be a bidirectional model (it judges the whole clip)")
        if critic is None:
            critic = copy.deepcopy(real_score)
        real_score.eval().requires_grad_(False)
        self.real_score, self.critic = real_score, critic
        critic.train()
        if cfg.gradient_checkpointing:
            critic.enable_gradient_checkpointing()
        patterns = tuple(self.dmd.critic_trainable)
        # the critic trains LoRA adapters too (reference §7)
        lora = None if cfg.lora is None else dataclasses.replace(cfg.lora, extra_trainable=patterns)
        self.critic_params = _select_trainable(critic, lora, patterns, "critic_trainable", "the critic")
        if self.fsdp:
            self.critic_params = self._shard(critic, self.critic_params)
            self._shard(real_score, [])
        o = self.dmd.critic_optimizer
        self.critic_optimizer = torch.optim.AdamW([p for _, p in self.critic_params], lr=o.lr, betas=tuple(o.betas),
                                                  weight_decay=o.weight_decay, eps=o.eps)
        warmup = o.warmup_steps
        self.critic_lr_scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.critic_optimizer, lambda s: s / warmup if s < warmup else 1.0
        )
        self.real_forward = D.sharded_forward(fm.BidirectionalForward(real_score, self.backend))
        self.critic_forward = D.sharded_forward(fm.BidirectionalForward(critic, self.backend))

    # -- one step ---------------------------------------------------------------------------------
    def _autocast(self, device):
        if not self.cfg.mixed_precision or self.fsdp:  # sharded: FSDP's bf16 policy instead
            return contextlib.nullcontext()
        return torch.autocast(device.type, dtype=torch.bfloat16)

    def _rows(self, global_batch: int) -> Optional[torch.Tensor]:
        """This process's rows of a global batch (``None`` for one process).

        Raises:
            ValueError: the global batch is not a multiple of ``world_size``.
        """
        if self.world_size == 1:
            return None
        if global_batch % self.world_size:
            raise ValueError(f"the data iterator's batch ({global_batch}) must be a multiple of world_size "
                             f"({self.world_size}): it is the global batch")
        n = global_batch // self.world_size
        return torch.arange(self.rank * n, (self.rank + 1) * n)

    @staticmethod
    def _take(rows, *tensors):
        if rows is None:
            return tensors
        return tuple(x[rows.to(x.device)] for x in tensors)

    def _local_inputs(self, si: fm.StepInputs) -> fm.StepInputs:
        """This process's rows of a step drawn for the global batch, with the sharded forward if sharded."""
        rows = self._rows(si.x.shape[0])
        if rows is None:
            return dataclasses.replace(si, forward=D.sharded_forward(si.forward))
        x, noise, t, r, text = self._take(rows, si.x, si.noise, si.t, si.r, si.text)
        return dataclasses.replace(si, forward=D.sharded_forward(si.forward.take(rows)), x=x, noise=noise, t=t, r=r,
                                   kind=si.kind[rows], text=text, dropped=si.dropped[rows])

    def _average_losses(self, record: dict) -> None:
        """Replace the losses of :data:`GLOBAL_LOSSES` in ``record`` by their mean over processes and the
        per-kind pieces by the per-kind means over the global batch; other statistics stay this process's."""
        distributed = self.world_size > 1 and self.all_reduce is not None
        fm.kind_losses(record, self._all_reduce_on_device if distributed else None)
        if not distributed:
            return
        keys = [k for k in GLOBAL_LOSSES if k in record]  # the same keys on every process (global coins)
        if not keys:
            return
        values = torch.tensor([float(record[k]) for k in keys], dtype=torch.float64)
        for k, v in zip(keys, (self._all_reduce_on_device(values) / self.world_size).tolist()):
            record[k] = v

    def _all_reduce_on_device(self, values: torch.Tensor) -> torch.Tensor:
        """Sum ``values`` over processes on the model's device (NCCL needs CUDA tensors); back on the CPU."""
        device = next(self.model.parameters()).device
        return self.all_reduce(values.to(device)).cpu()

    def _losses(self, latents, text):
        """Yield the step's losses one by one (each is backpropagated before the next is built)."""
        if self.cfg.phase == "pretrain":
            yield from self._pretrain_losses(latents, text)
            return
        yield from self._other_losses(latents, text)

    def _pretrain_losses(self, latents, text):
        """The forward flow-map loss (reference §6), bidirectional or FAR (+ FAR's bidirectional modeling)."""
        cfg, g = self.cfg, self.generator
        fmc = cfg.flowmap
        # drawn for the global batch (pair kinds by global index), then this process's rows
        kw = dict(shift=cfg.shift, drop_text_ratio=cfg.drop_text_ratio, generator=g, backend=self.backend)
        if self.far:
            si = fm.prepare_far(self.model, latents, text, self.negative, fmc, cfg.far, **kw)
        else:
            si = fm.prepare_bidirectional(self.model, latents, text, self.negative, fmc, **kw)
        si = self._local_inputs(si)
        neg = fm.expand_negative(self.negative, si.text) if fmc.fuse_guidance_scale != 1.0 else None
        out = fm.flow_map_loss(si.forward, si.x, si.noise, si.t, si.r, si.kind, si.text, neg, fmc,
                               self.weighting, self.all_reduce)
        if si.num_chunks is not None:
            out.stats["num_chunks"] = si.num_chunks
        yield out
        if self.far:
            coin = torch.rand((), generator=g).item() < cfg.far.bidirectional_modeling_prob
            if coin:
                extra = fm.bidirectional_modeling_loss(
                    self.model, latents, text, self.negative, shift=cfg.shift,
                    guidance_scale=fmc.fuse_guidance_scale, generator=g, backend=self.backend,
                    forward=D.sharded_forward(fm.BidirectionalForward(self.model, self.backend)),
                    rows=self._rows(latents.shape[0]))
                extra.stats = {"loss_bidirectional": extra.stats["loss"]}
                yield extra

    def _other_losses(self, latents, text):
        """Teacher (reference §8) and consistency-baseline losses."""
        cfg, g = self.cfg, self.generator
        text, _ = fm.drop_text(text, self.negative, cfg.drop_text_ratio, g)
        if self.far:
            n = fm.sample_num_chunks(cfg.far, g)
            cp, context, window = fm.far_window(latents, cfg.far.chunk_partition, n, cfg.far.full_chunk_limit)
            fwd = fm.FARWindowForward(self.model, cp, context, window, cfg.far.full_chunk_limit, self.backend)
            x = window
        else:
            fwd, x = fm.BidirectionalForward(self.model, self.backend), latents
        if cfg.phase == "teacher":
            b, f = x.shape[:2]
            t = fm.sample_teacher_timesteps(b, cfg.shift, g, cfg.teacher_timesteps)[:, None].expand(b, f).to(x.device)
            noise = torch.randn(x.shape, generator=g).to(x.device, x.dtype)
            rows = self._rows(b)
            if rows is not None:
                fwd = fwd.take(rows)
                x, noise, t, text = self._take(rows, x, noise, t, text)
            yield fm.flow_matching_loss(D.sharded_forward(fwd), x, noise, t, text)
        elif cfg.phase == "consistency":
            noise = torch.randn(x.shape, generator=g).to(x.device, x.dtype)
            neg = fm.expand_negative(self.negative, text)
            yield cons.consistency_loss(fwd, x, noise, text, self.consistency_cfg, cfg.shift, g,
                                        teacher=self.teacher, negative=neg)
        else:  # validated in config
            raise ValueError(f"unknown phase {cfg.phase!r}")

    # -- on-policy phase (reference §7) ------------------------------------------------------------
    def _rollout(self, noise, text, plan, grad: bool):
        """The student's shortcut rollout (bidirectional, or FAR chunk by chunk through the KV cache)."""
        params = [p for _, p in self.named_params]
        if self.far:
            ro = op.FARRollout(self.model, text, self.cfg.far.chunk_partition, noise.shape[-2:], self.backend)
            return ro.run(noise, plan, grad=grad, grad_segments=self.dmd.grad_segments, params=params)
        return op.bidirectional_rollout(D.sharded_forward(fm.BidirectionalForward(self.model, self.backend)), noise,
                                        text, plan, grad=grad, grad_segments=self.dmd.grad_segments, params=params)

    def _rollout_frames(self, latents) -> int:
        return sum(self.cfg.far.chunk_partition) if self.far else latents.shape[1]

    def _generator_losses(self, latents, text):
        """DMD on the first ``dmd_batch_size`` samples (of each process's slice), then (co-training) the
        forward loss on all; draws are made for the global DMD batch (``dmd_batch_size * world_size``)."""
        cfg, g, d = self.cfg, self.generator, self.dmd
        rows = self._rows(latents.shape[0])
        local_text = text if rows is None else self._take(rows, text)[0]
        nb = min(d.dmd_batch_size, local_text.shape[0])
        dmd_rows = None if rows is None else torch.arange(self.rank * nb, (self.rank + 1) * nb)
        dev = latents.device
        shape = (nb * self.world_size, self._rollout_frames(latents)) + tuple(latents.shape[2:])
        plan = op.sample_plan(d.rollout_steps, cfg.shift, g)
        noise, = self._take(dmd_rows, torch.randn(shape, generator=g).to(dev))
        x_hat, nfe = self._rollout(noise, local_text[:nb], plan, grad=True)
        t = op.sample_dmd_timesteps(shape[0], cfg.shift, g, d.min_timestep, d.max_timestep)
        t = t[:, None].expand(shape[0], shape[1]).to(dev)
        dmd_noise = torch.randn(shape, generator=g).to(dev)
        t, dmd_noise = self._take(dmd_rows, t, dmd_noise)
        out = op.dmd_generator_loss(x_hat, dmd_noise, t, local_text[:nb], self.negative, self.real_forward,
                                    self.critic_forward, real_guidance_scale=d.real_guidance_scale,
                                    dmd_weight=d.dmd_weight)
        out.stats.update(rollout_steps=plan.num_steps, rollout_grad_step=plan.grad_step, rollout_nfe=nfe)
        yield out
        if d.cotrain_forward:
            for extra in self._pretrain_losses(latents, text):
                extra.stats = {("loss_forward" if k == "loss" else k): v for k, v in extra.stats.items()}
                yield extra

    def _critic_step(self, device) -> dict:
        """Critic (fake score) flow matching on a fresh batch of no-grad student samples (reference §7.3)."""
        cfg, g, d = self.cfg, self.generator, self.dmd
        latents, text = next(self.data)
        latents, text = latents.to(device), text.to(device)
        b = latents.shape[0]  # global batch: draws for all of it, then this process's rows
        rows = self._rows(b)
        shape = (b, self._rollout_frames(latents)) + tuple(latents.shape[2:])
        plan = op.sample_plan(d.rollout_steps, cfg.shift, g)
        noise, text = self._take(rows, torch.randn(shape, generator=g).to(device), text)
        self.critic_optimizer.zero_grad(set_to_none=True)
        with self._autocast(device):
            self.model.eval()
            try:
                with torch.no_grad():
                    x, _ = self._rollout(noise, text, plan, grad=False)
            finally:
                self.model.train()
            t = op.sample_critic_timesteps(b, cfg.shift, g, d.min_timestep, d.max_timestep)
            t = t[:, None].expand(b, shape[1]).to(device)
            eps = torch.randn(shape, generator=g).to(device)
            t, eps = self._take(rows, t, eps)
            out = op.critic_loss(self.critic_forward, x, eps, t, text)
        out.loss.backward()
        params = [p for _, p in self.critic_params]
        norm = torch.nn.utils.clip_grad_norm_(params, d.critic_optimizer.max_grad_norm)
        self.critic_optimizer.step()
        self.critic_lr_scheduler.step()
        self._average_losses(out.stats)
        return {**out.stats, "critic_grad_norm": float(D.full_tensor(norm)),
                "critic_lr": self.critic_optimizer.param_groups[0]["lr"],
                "critic_rollout_steps": plan.num_steps, "critic_rollout_grad_step": plan.grad_step}

    def _student_update(self, losses, record: dict, device) -> float:
        """Backward every loss ``losses`` yields (each under autocast), clip, AdamW, LR and EMA steps; the
        losses' stats and ``grad_norm`` go into ``record``. Returns the summed loss."""
        self.optimizer.zero_grad(set_to_none=True)
        total = 0.0
        while True:
            with self._autocast(device):
                out = next(losses, None)
            if out is None:
                break
            out.loss.backward()
            total += float(out.loss.detach())
            record.update(out.stats)
        params = [p for _, p in self.named_params]
        norm = torch.nn.utils.clip_grad_norm_(params, self.cfg.optimizer.max_grad_norm)
        record["grad_norm"] = float(D.full_tensor(norm))
        self.optimizer.step()
        self.lr_scheduler.step()
        self.ema.update(self.step)
        return total

    def _next_batch(self, device):
        latents, text = next(self.data)
        return latents.to(device), text.to(device)

    def train_step(self) -> dict:
        """One optimiser step (on-policy: a generator step every ``critic_update_ratio`` iterations, then
        a critic step); returns the logged record."""
        start = time.perf_counter()
        device = next(self.model.parameters()).device
        record = {"step": self.step + 1, "lr": self.optimizer.param_groups[0]["lr"]}
        if self.cfg.phase != "onpolicy":
            self._student_update(self._losses(*self._next_batch(device)), record, device)
            self._average_losses(record)
        else:
            if self.step % self.dmd.critic_update_ratio == 0:
                # the co-trained forward loss is logged as loss_forward: the generator's loss is the sum
                losses = self._generator_losses(*self._next_batch(device))
                record["loss"] = self._student_update(losses, record, device)
                self._average_losses(record)
            record.update(self._critic_step(device))
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
            if "grad_norm" not in record:  # on-policy iteration without a generator step
                record = {**record, "grad_norm": float("nan")}
            extras = " ".join(f"{k} {v:.4g}" for k, v in record.items()
                              if k.startswith("loss_") and isinstance(v, float))
            print(f"step {self.step}/{self.cfg.total_iter} loss {record.get('loss', float('nan')):.4g} {extras} "
                  f"grad_norm {record['grad_norm']:.3g} lr {record['lr']:.3g} ({record['time_s']:.2f} s)",
                  file=self.log_stream, flush=True)

    # -- checkpoints ------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """The checkpoint: whole tensors whatever the sharding (gathering them is a collective: with
        ``fsdp`` every process must call this)."""
        state = {
            "step": self.step,
            "model": _full_params(self.named_params),
            "optimizer": D.gather_optimizer_state(self.optimizer.state_dict()),
            "lr_scheduler": self.lr_scheduler.state_dict(),
            "ema": self._ema_state(),
            "rng": ckpt.rng_state({"train": self.generator}),
            "config": to_dict(self.cfg),
        }
        if hasattr(self.data, "state_dict"):
            state["data"] = self.data.state_dict()
        if self.critic is not None:
            state["critic"] = _full_params(self.critic_params)
            state["critic_optimizer"] = D.gather_optimizer_state(self.critic_optimizer.state_dict())
            state["critic_lr_scheduler"] = self.critic_lr_scheduler.state_dict()
        return state

    def _ema_state(self) -> dict:
        state = self.ema.state_dict()
        if not self.fsdp:
            return state
        own = dict(self.named_params)
        return {**state, "shadow": {n: D.gather_shard(s, own[n]).cpu() for n, s in state["shadow"].items()}}

    def load_state_dict(self, state: dict) -> None:
        """Restore a checkpoint of :meth:`state_dict` (written by any number of processes)."""
        _restore_params(self.named_params, state["model"], "trainable parameters")
        self.optimizer.load_state_dict(D.shard_optimizer_state(state["optimizer"], [p for _, p in self.named_params]))
        if self.critic is not None:
            if "critic" not in state:
                raise KeyError("checkpoint has no critic state (not an on-policy run)")
            _restore_params(self.critic_params, state["critic"], "critic parameters")
            self.critic_optimizer.load_state_dict(
                D.shard_optimizer_state(state["critic_optimizer"], [p for _, p in self.critic_params]))
            self.critic_lr_scheduler.load_state_dict(state["critic_lr_scheduler"])
        self.lr_scheduler.load_state_dict(state["lr_scheduler"])
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
                own = dict(self.named_params)
                for n, s in self.ema.shadow.items():
                    own[n].copy_(s.to(own[n].device, own[n].dtype))
            return merged_state_dict(self.model, dtype)
        finally:
            own = dict(self.named_params)
            for n, v in saved.items():
                own[n].copy_(v)

    def _export_sharded(self, ema: bool, dtype) -> dict:
        """Gather every weight (EMA swapped in), then merge on rank 0 in an unsharded twin of the student."""
        from .lora import apply_lora, merged_state_dict

        full = {n: D.full_tensor(v.detach()).cpu() for n, v in self.model.state_dict().items()}
        if ema:
            own = dict(self.named_params)
            for n, s in self.ema.shadow.items():
                full[n] = D.gather_shard(s, own[n]).cpu()
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
            import torch.distributed as dist

            dist.barrier()
        return Path(path)

    def resume(self, path=None) -> Optional[Path]:
        """Load ``path`` (default: the latest checkpoint in ``output_dir``, as rank 0 sees it); returns it,
        or ``None``."""
        if path is None:
            path = ckpt.latest_checkpoint(self.output_dir) if self.output_dir is not None else None
            if self.fsdp:  # every process must load the same file
                import torch.distributed as dist

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
        if self.output_dir is None or self.rank != 0:
            return
        log = Path(self.output_dir) / "log.jsonl"
        if not log.is_file():
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


def _select_trainable(model, lora_cfg, patterns, arg: str, what: str) -> list:
    """``(name, param)`` pairs to train: LoRA adapters (+ extra patterns) when ``lora_cfg`` is given, else
    the parameters whose name contains one of ``patterns`` (all when empty); the rest is frozen.

    Raises:
        ValueError: nothing matches.
    """
    if lora_cfg is not None:
        from .lora import apply_lora

        named = apply_lora(model, lora_cfg)
    else:
        named = []
        for name, p in model.named_parameters():
            train = not patterns or any(s in name for s in patterns)
            p.requires_grad_(train)
            if train:
                named.append((name, p))
    if not named:
        raise ValueError(f"{arg}={list(patterns)} matches no parameter of {what}")
    return named


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
