"""``anyflow train CONFIG``: build models and data from a config, resume from the output folder, fit.

Data sources:

* ``"synthetic"``: :class:`anyflow.training.trainer.SyntheticClips` shaped for the model (smoke runs,
  CI); the negative embedding is a fixed random tensor.
* a ``.pt`` file written with ``torch.save({"latents": [N, F, C, H, W], "text": [N, L, D],
  "negative": [L, D] or [1, L, D]})`` (precomputed VAE latents and text-encoder embeddings), read
  by :class:`TensorClips`.

The run folder gets ``config.yaml`` (the resolved config), ``log.jsonl`` and ``checkpoint-*.pt``;
running the same command again continues from the newest checkpoint bit for bit.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import torch

from .config import ModelConfig, TrainConfig, dump_config, resolve


class TensorClips:
    """Endless batches ``(latents, text)`` from in-memory tensors, reshuffled every epoch.

    Epoch e visits the samples in the order ``randperm(N)`` of a generator seeded ``(seed, e)``;
    batch k takes positions ``[k B, (k + 1) B)`` of the concatenated epoch orders, so the state is the
    batch index alone (``state_dict`` / ``load_state_dict``).
    """

    def __init__(self, latents: torch.Tensor, text: torch.Tensor, batch_size: int, seed: int = 0):
        if latents.shape[0] != text.shape[0]:
            raise ValueError(f"latents ({latents.shape[0]}) and text ({text.shape[0]}) differ in sample count")
        if latents.ndim != 5 or text.ndim != 3:
            raise ValueError(f"latents must be [N, F, C, H, W] and text [N, L, D], got {tuple(latents.shape)}, "
                             f"{tuple(text.shape)}")
        self.latents, self.text = latents, text
        self.batch_size, self.seed, self.index = int(batch_size), int(seed), 0

    def _order(self, epoch: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(self.latents.shape[0], generator=g)

    def __iter__(self):
        return self

    def __next__(self):
        n, b = self.latents.shape[0], self.batch_size
        pos = torch.arange(self.index * b, (self.index + 1) * b)
        idx = torch.stack([self._order(int(p) // n)[int(p) % n] for p in pos])
        self.index += 1
        return self.latents[idx], self.text[idx]

    def state_dict(self) -> dict:
        return {"index": self.index}

    def load_state_dict(self, state: dict) -> None:
        self.index = int(state["index"])


def build_transformer(m: ModelConfig, far=None):
    """The transformer of a :class:`ModelConfig` (tiny random, or a diffusers folder in fp32)."""
    if m.tiny:
        from ..testing.tiny import tiny_transformer

        overrides = {"gate_value": m.gate_value, "deltatime_type": m.deltatime_type}
        if m.kind == "far" and far is not None:
            overrides["chunk_partition"] = tuple(far.chunk_partition)
            overrides["full_chunk_limit"] = far.full_chunk_limit
        return tiny_transformer(m.kind, seed=m.seed, **overrides)
    if not m.pretrained:
        raise ValueError("model.pretrained must name a transformer folder unless model.tiny is set")
    from ..models.loading import load_transformer

    folder = Path(m.pretrained)
    if (folder / "transformer" / "config.json").is_file():
        folder = folder / "transformer"
    return load_transformer(folder, dtype=torch.float32)


def build_data(cfg: TrainConfig, model, data: str, frames: Optional[int] = None, latent_hw=(8, 8)):
    """``(iterator, negative [1, L, D])`` for ``data`` (``"synthetic"`` or a ``.pt`` file, see the module doc)."""
    if data == "synthetic":
        mc = model.config
        if frames is None:
            frames = sum(cfg.far.chunk_partition) if cfg.far is not None else 3
        from .trainer import SyntheticClips

        it = SyntheticClips(cfg.batch_size, frames, mc.in_channels, latent_hw[0], latent_hw[1], text_dim=mc.text_dim,
                            seed=cfg.seed)
        negative = torch.randn(1, 7, mc.text_dim, generator=torch.Generator().manual_seed(cfg.seed + 12345))
        return it, negative
    path = Path(data)
    if not path.is_file():
        raise FileNotFoundError(f"data file {path} does not exist (or pass 'synthetic')")
    blob = torch.load(path, map_location="cpu", weights_only=True)
    missing = {"latents", "text", "negative"} - set(blob)
    if missing:
        raise KeyError(f"{path} lacks {sorted(missing)}; expected latents, text, negative")
    return TensorClips(blob["latents"].float(), blob["text"].float(), cfg.batch_size, cfg.seed), blob["negative"].float()


def train_from_config(
    config,
    *,
    output_dir=None,
    data: str = "synthetic",
    steps: Optional[int] = None,
    resume: bool = True,
    frames: Optional[int] = None,
    latent_hw=(8, 8),
    log_stream="stdout",
):
    """Build everything from ``config`` (path, preset, mapping or :class:`TrainConfig`), resume from the
    newest checkpoint in the output folder (unless ``resume`` is false), run ``steps`` steps (default: up
    to ``total_iter``) and write a final checkpoint. Returns the trainer."""
    from .trainer import Trainer

    if log_stream == "stdout":
        log_stream = sys.stdout
    cfg = resolve(config)
    out = Path(output_dir or cfg.output_dir or f"runs/{cfg.name}")
    out.mkdir(parents=True, exist_ok=True)
    model = build_transformer(cfg.model, cfg.far)
    teacher = None
    if cfg.phase == "onpolicy":
        if cfg.dmd is None or cfg.dmd.teacher is None:
            raise ValueError("phase 'onpolicy' needs dmd.teacher (the real score model) in the config")
        teacher = build_transformer(cfg.dmd.teacher)
    it, negative = build_data(cfg, model, data, frames, latent_hw)
    dump_config(cfg, out / "config.yaml")
    trainer = Trainer(model, cfg, it, negative, real_score=teacher, output_dir=out, log_stream=log_stream)
    if resume:
        path = trainer.resume()
        if path is not None and log_stream is not None:
            print(f"resumed from {path} (step {trainer.step})", file=log_stream, flush=True)
    trainer.fit(steps)
    trainer.save()
    return trainer
