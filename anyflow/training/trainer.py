"""Single-process training loop for the forward phase: teacher, flow-map pretrain, consistency baseline.

One :class:`Trainer` step: next ``(latents [B, F, C, H, W], text [B, L, D])`` from the data iterator,
the phase's loss under optional bf16 autocast (fp32 master weights), backward, gradient clipping,
AdamW with the official betas / LR and linear warm-up, EMA, a log line (stdout and ``log.jsonl``), and
an atomic checkpoint every ``save_every`` steps. All randomness of the objective comes from one CPU
``torch.Generator`` seeded by ``config.seed``; it is checkpointed with the global RNGs and the data
iterator's state, so a resumed run continues bit for bit.

Not here yet: the on-policy DMD phase, LoRA through ``peft``, FSDP2 / ``torchrun``, the CLI.
"""

from __future__ import annotations

import contextlib
import json
import math
import sys
import time
from pathlib import Path
from typing import Callable, Iterator, Optional

import torch

from . import checkpoint as ckpt
from . import consistency as cons
from . import flowmap as fm
from .config import ConsistencyConfig, TrainConfig, resolve, to_dict


# ----------------------------------------------------------------------------------------------
# data
# ----------------------------------------------------------------------------------------------
class SyntheticClips:
    """Endless deterministic ``(latents [B, F, C, H, W], text [B, L, D])`` batches for tests and smoke runs.

    Batch k depends only on ``(seed, k)``; latents are smooth in time (a random start plus a slow random
    drift per frame) so the clips have some structure. ``state_dict`` / ``load_state_dict`` hold k.
    """

    def __init__(self, batch_size: int, frames: int, channels: int = 16, height: int = 8, width: int = 8,
                 text_len: int = 7, text_dim: int = 32, seed: int = 0):
        self.shape = (batch_size, frames, channels, height, width)
        self.text_shape = (batch_size, text_len, text_dim)
        self.seed = seed
        self.index = 0

    def __iter__(self):
        return self

    def __next__(self):
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.index)
        b, f, c, h, w = self.shape
        start = torch.randn(b, 1, c, h, w, generator=g)
        drift = 0.3 * torch.randn(b, f, c, h, w, generator=g).cumsum(1) / math.sqrt(f)
        text = torch.randn(self.text_shape, generator=g)
        self.index += 1
        return start + drift, text

    def state_dict(self) -> dict:
        return {"index": self.index}

    def load_state_dict(self, state: dict) -> None:
        self.index = int(state["index"])


# ----------------------------------------------------------------------------------------------
# model construction
# ----------------------------------------------------------------------------------------------
def build_model(cfg: TrainConfig):
    """The transformer of ``cfg.model``: a tiny random one or a diffusers-format folder (upstream or
    legacy layout; a whole checkpoint folder's ``transformer/`` is used), in fp32 (master weights)."""
    m = cfg.model
    if m.tiny:
        from ..testing.tiny import tiny_transformer

        overrides = {"gate_value": m.gate_value, "deltatime_type": m.deltatime_type}
        if m.kind == "far" and cfg.far is not None:
            overrides["chunk_partition"] = tuple(cfg.far.chunk_partition)
            overrides["full_chunk_limit"] = cfg.far.full_chunk_limit
        return tiny_transformer(m.kind, seed=m.seed, **overrides)
    if not m.pretrained:
        raise ValueError("model.pretrained must name a transformer folder unless model.tiny is set")
    from ..models.loading import load_transformer

    folder = Path(m.pretrained)
    if (folder / "transformer" / "config.json").is_file():
        folder = folder / "transformer"
    return load_transformer(folder, dtype=torch.float32)


def _is_far(model) -> bool:
    return hasattr(model, "far_patch_embedding")


# ----------------------------------------------------------------------------------------------
# trainer
# ----------------------------------------------------------------------------------------------
class Trainer:
    """Forward-phase trainer (phases ``teacher``, ``pretrain``, ``consistency``).

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
        output_dir: checkpoints and ``log.jsonl`` (default ``config.output_dir``; ``None``: no files).
        log_stream: where log lines are printed (``None``: silent).
        rank, world_size, all_reduce: the process's place in a data-parallel group (pair kinds by global
            index; the re-scaling mean summed by ``all_reduce``). Defaults: one process.

    Raises:
        NotImplementedError: ``phase="onpolicy"`` or a LoRA config (later milestones).
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
        output_dir=None,
        log_stream=sys.stdout,
        rank: int = 0,
        world_size: int = 1,
        all_reduce: Optional[Callable] = None,
    ):
        cfg = resolve(config)
        if cfg.phase == "onpolicy":
            raise NotImplementedError("the on-policy (DMD) phase is not implemented yet")
        if cfg.lora is not None:
            raise NotImplementedError("LoRA training through peft is not implemented yet: set lora to null "
                                      "and choose parameters with 'trainable'")
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
        self.named_params = []
        for name, p in model.named_parameters():
            train = not patterns or any(s in name for s in patterns)
            p.requires_grad_(train)
            if train:
                self.named_params.append((name, p))
        if not self.named_params:
            raise ValueError(f"trainable={list(patterns)} matches no parameter of the model")
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

    # -- one step ---------------------------------------------------------------------------------
    def _autocast(self, device):
        if not self.cfg.mixed_precision:
            return contextlib.nullcontext()
        return torch.autocast(device.type, dtype=torch.bfloat16)

    def _losses(self, latents, text):
        """Yield the step's losses one by one (each is backpropagated before the next is built)."""
        cfg, g = self.cfg, self.generator
        fmc = cfg.flowmap
        kw = dict(shift=cfg.shift, drop_text_ratio=cfg.drop_text_ratio, generator=g, rank=self.rank,
                  world_size=self.world_size, backend=self.backend)
        if cfg.phase == "pretrain":
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
            return
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

    def train_step(self) -> dict:
        """One optimiser step; returns the logged record."""
        start = time.perf_counter()
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
        return state

    def load_state_dict(self, state: dict) -> None:
        own = dict(self.named_params)
        missing = set(own) - set(state["model"])
        if missing:
            raise KeyError(f"checkpoint lacks trainable parameters {sorted(missing)[:5]}")
        with torch.no_grad():
            for n, p in own.items():
                p.copy_(state["model"][n])
        self.optimizer.load_state_dict(state["optimizer"])
        self.lr_scheduler.load_state_dict(state["lr_scheduler"])
        self.ema.load_state_dict(state["ema"])
        ckpt.set_rng_state(state["rng"], {"train": self.generator})
        if "data" in state and hasattr(self.data, "load_state_dict"):
            self.data.load_state_dict(state["data"])
        self.step = int(state["step"])

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
