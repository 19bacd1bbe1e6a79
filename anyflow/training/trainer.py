"""Single-process training loop for the forward phase: teacher, flow-map pretrain, consistency baseline.

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
Not here: FSDP2 / ``torchrun``.
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
from . import flowmap as fm
from . import onpolicy as op
from .config import ConsistencyConfig, DMDConfig, TrainConfig, resolve, to_dict


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
            ``load_state_dict``, when present, are checkpointed.
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
            index; the re-scaling mean summed by ``all_reduce``). Defaults: one process.

    Raises:
        ValueError: ``phase="onpolicy"`` without ``real_score``.
        ValueError: the model kind does not match ``config.model.kind``; nothing to train.
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
        self.rank, self.world_size, self.all_reduce = rank, world_size, all_reduce
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
        params = [p for _, p in self.named_params]
        o = cfg.optimizer
        self.optimizer = torch.optim.AdamW(params, lr=o.lr, betas=tuple(o.betas), weight_decay=o.weight_decay, eps=o.eps)
        warmup = o.warmup_steps
        self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: s / warmup if s < warmup else 1.0
        )
        self.ema = ckpt.EMA(self.named_params, cfg.ema.decay, cfg.ema.warmup_steps)
        self.generator = torch.Generator().manual_seed(cfg.seed)
        self.weighting = fm.TrainWeighting(cfg.flowmap.weight_type, cfg.shift)
        self.consistency_cfg = cfg.consistency or ConsistencyConfig()
        self.step = 0
        self.real_score = self.critic = None
        if cfg.phase == "onpolicy":
            self._init_onpolicy(real_score, critic)

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
        o = self.dmd.critic_optimizer
        self.critic_optimizer = torch.optim.AdamW([p for _, p in self.critic_params], lr=o.lr, betas=tuple(o.betas),
                                                  weight_decay=o.weight_decay, eps=o.eps)
        warmup = o.warmup_steps
        self.critic_lr_scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.critic_optimizer, lambda s: s / warmup if s < warmup else 1.0
        )
        self.real_forward = fm.BidirectionalForward(real_score, self.backend)
        self.critic_forward = fm.BidirectionalForward(critic, self.backend)

    # -- one step ---------------------------------------------------------------------------------
    def _autocast(self, device):
        if not self.cfg.mixed_precision:
            return contextlib.nullcontext()
        return torch.autocast(device.type, dtype=torch.bfloat16)

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
        kw = dict(shift=cfg.shift, drop_text_ratio=cfg.drop_text_ratio, generator=g, rank=self.rank,
                  world_size=self.world_size, backend=self.backend)
        if self.far:
            si = fm.prepare_far(self.model, latents, text, self.negative, fmc, cfg.far, **kw)
        else:
            si = fm.prepare_bidirectional(self.model, latents, text, self.negative, fmc, **kw)
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
                    guidance_scale=fmc.fuse_guidance_scale, generator=g, backend=self.backend)
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
            t = fm.sample_logit_normal(b, cfg.shift, g)[:, None].expand(b, f).to(x.device)
            noise = torch.randn(x.shape, generator=g).to(x.device, x.dtype)
            yield fm.flow_matching_loss(fwd, x, noise, t, text)
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
        return op.bidirectional_rollout(fm.BidirectionalForward(self.model, self.backend), noise, text, plan,
                                        grad=grad, grad_segments=self.dmd.grad_segments, params=params)

    def _rollout_frames(self, latents) -> int:
        return sum(self.cfg.far.chunk_partition) if self.far else latents.shape[1]

    def _generator_losses(self, latents, text):
        """DMD on the first ``dmd_batch_size`` samples, then (co-training) the forward loss on all."""
        cfg, g, d = self.cfg, self.generator, self.dmd
        nb = min(d.dmd_batch_size, latents.shape[0])
        dev = latents.device
        shape = (nb, self._rollout_frames(latents)) + tuple(latents.shape[2:])
        plan = op.sample_plan(d.rollout_steps, cfg.shift, g)
        noise = torch.randn(shape, generator=g).to(dev)
        x_hat, nfe = self._rollout(noise, text[:nb], plan, grad=True)
        t = op.sample_dmd_timesteps(nb, cfg.shift, g, d.min_timestep, d.max_timestep)
        t = t[:, None].expand(nb, shape[1]).to(dev)
        dmd_noise = torch.randn(shape, generator=g).to(dev)
        out = op.dmd_generator_loss(x_hat, dmd_noise, t, text[:nb], self.negative, self.real_forward,
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
        b = latents.shape[0]
        shape = (b, self._rollout_frames(latents)) + tuple(latents.shape[2:])
        plan = op.sample_plan(d.rollout_steps, cfg.shift, g)
        noise = torch.randn(shape, generator=g).to(device)
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
            out = op.critic_loss(self.critic_forward, x, eps, t, text)
        out.loss.backward()
        params = [p for _, p in self.critic_params]
        norm = torch.nn.utils.clip_grad_norm_(params, d.critic_optimizer.max_grad_norm)
        self.critic_optimizer.step()
        self.critic_lr_scheduler.step()
        return {**out.stats, "critic_grad_norm": float(norm), "critic_lr": self.critic_optimizer.param_groups[0]["lr"],
                "critic_rollout_steps": plan.num_steps, "critic_rollout_grad_step": plan.grad_step}

    def _onpolicy_step(self, device) -> dict:
        record = {"step": self.step + 1, "lr": self.optimizer.param_groups[0]["lr"]}
        if self.step % self.dmd.critic_update_ratio == 0:
            latents, text = next(self.data)
            latents, text = latents.to(device), text.to(device)
            self.optimizer.zero_grad(set_to_none=True)
            total = 0.0
            losses = self._generator_losses(latents, text)
            while True:
                with self._autocast(device):
                    out = next(losses, None)
                if out is None:
                    break
                out.loss.backward()
                total += float(out.loss.detach())
                record.update(out.stats)
            params = [p for _, p in self.named_params]
            record["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(params, self.cfg.optimizer.max_grad_norm))
            self.optimizer.step()
            self.lr_scheduler.step()
            self.ema.update(self.step)
            record["loss"] = total
        record.update(self._critic_step(device))
        return record

    def train_step(self) -> dict:
        """One optimiser step; returns the logged record."""
        start = time.perf_counter()
        if self.cfg.phase == "onpolicy":
            record = self._onpolicy_step(next(self.model.parameters()).device)
            self.step += 1
            record["time_s"] = time.perf_counter() - start
            self._log(record)
            if self.output_dir is not None and self.cfg.save_every and self.step % self.cfg.save_every == 0:
                self.save()
            return record
        latents, text = next(self.data)
        device = next(self.model.parameters()).device
        latents, text = latents.to(device), text.to(device)
        self.optimizer.zero_grad(set_to_none=True)
        record = {"step": self.step + 1, "lr": self.optimizer.param_groups[0]["lr"]}
        losses = self._losses(latents, text)
        while True:
            with self._autocast(device):
                out = next(losses, None)
            if out is None:
                break
            out.loss.backward()
            record.update(out.stats)
        params = [p for _, p in self.named_params]
        grad_norm = torch.nn.utils.clip_grad_norm_(params, self.cfg.optimizer.max_grad_norm)
        self.optimizer.step()
        self.lr_scheduler.step()
        self.ema.update(self.step)
        self.step += 1
        record["grad_norm"] = float(grad_norm)
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
        state = {
            "step": self.step,
            "model": {n: p.detach().cpu().clone() for n, p in self.named_params},
            "optimizer": self.optimizer.state_dict(),
            "lr_scheduler": self.lr_scheduler.state_dict(),
            "ema": self.ema.state_dict(),
            "rng": ckpt.rng_state({"train": self.generator}),
            "config": to_dict(self.cfg),
        }
        if hasattr(self.data, "state_dict"):
            state["data"] = self.data.state_dict()
        if self.critic is not None:
            state["critic"] = {n: p.detach().cpu().clone() for n, p in self.critic_params}
            state["critic_optimizer"] = self.critic_optimizer.state_dict()
            state["critic_lr_scheduler"] = self.critic_lr_scheduler.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        _restore_params(self.named_params, state["model"], "trainable parameters")
        self.optimizer.load_state_dict(state["optimizer"])
        if self.critic is not None:
            if "critic" not in state:
                raise KeyError("checkpoint has no critic state (not an on-policy run)")
            _restore_params(self.critic_params, state["critic"], "critic parameters")
            self.critic_optimizer.load_state_dict(state["critic_optimizer"])
            self.critic_lr_scheduler.load_state_dict(state["critic_lr_scheduler"])
        self.lr_scheduler.load_state_dict(state["lr_scheduler"])
        self.ema.load_state_dict(state["ema"])
        ckpt.set_rng_state(state["rng"], {"train": self.generator})
        if "data" in state and hasattr(self.data, "load_state_dict"):
            self.data.load_state_dict(state["data"])
        self.step = int(state["step"])

    @torch.no_grad()
    def export_state_dict(self, ema: bool = True, dtype=None) -> dict:
        """The student's plain weights (LoRA adapters merged, original names), with the EMA values of
        the trainable parameters swapped in when ``ema`` (the official ``ema`` export)."""
        from .lora import merged_state_dict

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

    def save(self, path=None) -> Path:
        """Write a checkpoint atomically (default ``output_dir/checkpoint-<step>.pt``)."""
        if path is None:
            if self.output_dir is None:
                raise ValueError("save() needs a path when the trainer has no output_dir")
            path = ckpt.checkpoint_path(self.output_dir, self.step)
        return ckpt.atomic_save(self.state_dict(), path)

    def resume(self, path=None) -> Optional[Path]:
        """Load ``path`` (default: the latest checkpoint in ``output_dir``); returns it, or ``None``."""
        if path is None:
            path = ckpt.latest_checkpoint(self.output_dir) if self.output_dir is not None else None
            if path is None:
                return None
        self.load_state_dict(ckpt.load(path))
        return Path(path)


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
    with torch.no_grad():
        for n, p in named:
            p.copy_(saved[n])
