"""Training data: clip iterators and the real-footage dataset cut from ``anyflow_eval``.

Iterators yield ``(latents [B, F, C, H, W], text [B, L, D])`` float32 batches and expose
``state_dict`` / ``load_state_dict`` so a resumed run draws the same batches:

* :class:`SyntheticClips`: deterministic random clips (tests, smoke runs).
* :class:`TensorClips`: precomputed VAE latents and text-encoder embeddings, reshuffled every epoch.

Real data: :func:`load_eval_videos` reads the evaluation videos of ``../shared/data/anyflow_eval``
(real footage, 16 fps) with their V2V captions; :func:`cut_clips` cuts overlapping windows;
:func:`encode_clips` / :func:`encode_prompts` turn them into the latents and prompt embeddings the
AnyFlow pipelines use (same normalisation and zero padding as ``AnyFlowFARPipeline``), and
:func:`save_dataset` writes the ``.pt`` file ``anyflow train --data`` reads.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import torch

__all__ = [
    "SyntheticClips", "TensorClips", "EvalVideo", "eval_data_root", "load_eval_videos", "cut_clips",
    "encode_clips", "decode_latents", "encode_prompts", "save_dataset", "load_dataset",
]


class _IndexedBatches:
    """An endless iterator whose state is the index of its next batch (``state_dict`` / ``load_state_dict``)."""

    index = 0

    def __iter__(self):
        return self

    def state_dict(self) -> dict:
        return {"index": self.index}

    def load_state_dict(self, state: dict) -> None:
        self.index = int(state["index"])


class SyntheticClips(_IndexedBatches):
    """Endless deterministic ``(latents [B, F, C, H, W], text [B, L, D])`` batches for tests and smoke runs.

    Batch k depends only on ``(seed, k)``; latents are smooth in time (a random start plus a slow random
    drift per frame) so the clips have some structure. ``state_dict`` / ``load_state_dict`` hold k.
    """

    def __init__(self, batch_size: int, frames: int, channels: int = 16, height: int = 8, width: int = 8,
                 text_len: int = 7, text_dim: int = 32, seed: int = 0):
        self.shape = (batch_size, frames, channels, height, width)
        self.text_shape = (batch_size, text_len, text_dim)
        self.seed = seed

    def __next__(self):
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.index)
        b, f, c, h, w = self.shape
        start = torch.randn(b, 1, c, h, w, generator=g)
        drift = 0.3 * torch.randn(b, f, c, h, w, generator=g).cumsum(1) / math.sqrt(f)
        text = torch.randn(self.text_shape, generator=g)
        self.index += 1
        return start + drift, text


class TensorClips(_IndexedBatches):
    """Endless batches ``(latents, text)`` from in-memory tensors, reshuffled every epoch.

    Args:
        latents: ``[N, F, C, H, W]`` clips.
        text: ``[N, L, D]`` per-clip prompt embeddings, or a ``[K, L, D]`` table of distinct prompts
            with ``text_index`` (``[N]`` int, the row of each clip) - a few captions shared by many
            clips need not be stored once per clip.
        batch_size: clips per batch.
        seed: shuffling seed.

    Epoch e visits the samples in the order ``randperm(N)`` of a generator seeded ``(seed, e)``;
    batch k takes positions ``[k B, (k + 1) B)`` of the concatenated epoch orders, so the state is the
    batch index alone (``state_dict`` / ``load_state_dict``).

    Raises:
        ValueError: mismatched counts or ranks, an out-of-range ``text_index``.
    """

    def __init__(self, latents: torch.Tensor, text: torch.Tensor, batch_size: int, seed: int = 0,
                 text_index: Optional[torch.Tensor] = None):
        if latents.ndim != 5 or text.ndim != 3:
            raise ValueError(f"latents must be [N, F, C, H, W] and text [N, L, D], got {tuple(latents.shape)}, "
                             f"{tuple(text.shape)}")
        if text_index is None:
            if latents.shape[0] != text.shape[0]:
                raise ValueError(f"latents ({latents.shape[0]}) and text ({text.shape[0]}) differ in sample count")
            text_index = torch.arange(text.shape[0])
        else:
            text_index = torch.as_tensor(text_index, dtype=torch.long)
            if text_index.shape != (latents.shape[0],):
                raise ValueError(f"text_index must be [N={latents.shape[0]}], got {tuple(text_index.shape)}")
            if text_index.numel() and (int(text_index.min()) < 0 or int(text_index.max()) >= text.shape[0]):
                raise ValueError(f"text_index must lie in [0, {text.shape[0]}), got [{int(text_index.min())}, "
                                 f"{int(text_index.max())}]")
        self.latents, self.text, self.text_index = latents, text, text_index
        self.batch_size, self.seed = int(batch_size), int(seed)

    def _order(self, epoch: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(self.latents.shape[0], generator=g)

    def __next__(self):
        n, b = self.latents.shape[0], self.batch_size
        pos = torch.arange(self.index * b, (self.index + 1) * b)
        idx = torch.stack([self._order(int(p) // n)[int(p) % n] for p in pos])
        self.index += 1
        return self.latents[idx], self.text[self.text_index[idx]]


# -- real footage: the anyflow_eval videos and captions --------------------------------------------
@dataclass
class EvalVideo:
    """One evaluation video: ``frames`` ``[T, 3, H, W]`` float32 in ``[0, 1]`` (16 fps), its caption and name."""

    name: str
    frames: torch.Tensor
    caption: str


#: Environment variable naming the ``anyflow_eval`` folder (videos, images, caption files), which the
#: repository does not ship.
EVAL_DATA_ENV = "ANYFLOW_EVAL_DATA"


def eval_data_root(root=None) -> Path:
    """The ``anyflow_eval`` folder (the evaluation videos, images and caption files).

    Looked up in this order, the first that is given deciding: ``root``; else ``$ANYFLOW_EVAL_DATA``
    (when set, it is the only place looked at, so ``ANYFLOW_EVAL_DATA=/nonexistent`` hides the data);
    else ``../shared/data/anyflow_eval`` next to the repository, then next to / under the current directory.

    Raises:
        FileNotFoundError: the chosen folder (or none of the default ones) holds ``eval_caption_v2v.json``;
            the message names the places looked at and ``ANYFLOW_EVAL_DATA``.
    """
    env = os.environ.get(EVAL_DATA_ENV)
    if root is not None:
        candidates = [Path(root)]
    elif env:
        candidates = [Path(env).expanduser()]
    else:
        here = Path(__file__).resolve().parents[2]
        candidates = [here.parent / "shared/data/anyflow_eval", Path.cwd().parent / "shared/data/anyflow_eval",
                      Path.cwd() / "shared/data/anyflow_eval"]
    for c in candidates:
        if (c / "eval_caption_v2v.json").is_file():
            return c
    raise FileNotFoundError(f"no anyflow_eval folder (with eval_caption_v2v.json) at "
                            f"{', '.join(map(str, candidates))}; pass root= or set {EVAL_DATA_ENV} to the folder")


def load_eval_videos(height: int, width: int, root=None, names: Optional[Sequence[str]] = None) -> list[EvalVideo]:
    """Read the V2V evaluation videos at ``height x width`` (centre crop, antialiased resize) with their captions.

    Args:
        height, width: frame size in pixels.
        root: the ``anyflow_eval`` folder (see :func:`eval_data_root`).
        names: video stems to read (``"1"`` ... ``"8"``); ``None`` reads every captioned video.

    Returns:
        A list of :class:`EvalVideo` in caption-file order.
    """
    from ..io import read_video

    root = eval_data_root(root)
    entries = json.loads((root / "eval_caption_v2v.json").read_text())
    out = []
    for entry in entries:
        name = Path(entry["video"]).stem
        if names is not None and name not in names:
            continue
        frames = read_video(root / "videos" / f"{name}.mp4", height, width)[0]
        out.append(EvalVideo(name=name, frames=frames, caption=entry["prompt"]))
    if names is not None and len(out) != len(set(names)):
        found = {v.name for v in out}
        raise ValueError(f"names {sorted(set(names) - found)} are not captioned videos of {root}")
    return out


def cut_clips(frames: torch.Tensor, num_frames: int, stride: int, start: int = 0,
              stop: Optional[int] = None) -> torch.Tensor:
    """All windows ``frames[s : s + num_frames]`` with ``s = start, start + stride, ...`` ending by ``stop``.

    Args:
        frames: ``[T, ...]``.
        num_frames, stride: window length and step (frames).
        start, stop: frame range the windows must lie in (``stop`` defaults to ``T``).

    Returns:
        ``[N, num_frames, ...]`` (``N`` may be 0).

    Raises:
        ValueError: non-positive ``num_frames`` / ``stride``.
    """
    if num_frames < 1 or stride < 1:
        raise ValueError(f"num_frames and stride must be >= 1, got {num_frames}, {stride}")
    stop = frames.shape[0] if stop is None else min(int(stop), frames.shape[0])
    starts = range(int(start), stop - num_frames + 1, stride)
    if not starts:
        return frames.new_zeros((0, num_frames) + tuple(frames.shape[1:]))
    return torch.stack([frames[s:s + num_frames] for s in starts])


def _latent_stats(vae, device, dtype):
    c = vae.config.z_dim
    mean = torch.tensor(vae.config.latents_mean, device=device, dtype=dtype).view(1, c, 1, 1, 1)
    std = torch.tensor(vae.config.latents_std, device=device, dtype=dtype).view(1, c, 1, 1, 1)
    return mean, std


@torch.no_grad()
def encode_clips(vae, clips: torch.Tensor, batch_size: int = 8) -> torch.Tensor:
    """Pixel clips ``[N, F, 3, H, W]`` in ``[0, 1]`` -> normalised latents ``[N, F', C, H', W']`` (fp32).

    Uses the posterior mean and the ``(z - latents_mean) / latents_std`` normalisation of the AnyFlow
    pipelines' V2V/I2V conditioning, so training latents and sampled latents share one scale.
    """
    out = []
    for i in range(0, clips.shape[0], batch_size):
        x = clips[i:i + batch_size].permute(0, 2, 1, 3, 4).float() * 2 - 1
        mu = vae.encode(x).latent_dist.mean.float()
        mean, std = _latent_stats(vae, mu.device, mu.dtype)
        out.append(((mu - mean) / std).permute(0, 2, 1, 3, 4))
    return torch.cat(out)


@torch.no_grad()
def decode_latents(vae, latents: torch.Tensor, batch_size: int = 8) -> torch.Tensor:
    """Normalised latents ``[N, F', C, H', W']`` -> pixel clips ``[N, F, 3, H, W]`` in ``[0, 1]`` (fp32)."""
    out = []
    for i in range(0, latents.shape[0], batch_size):
        z = latents[i:i + batch_size].permute(0, 2, 1, 3, 4).float()
        mean, std = _latent_stats(vae, z.device, z.dtype)
        x = vae.decode(z * std + mean).sample.float()
        out.append(((x.clamp(-1, 1) + 1) / 2).permute(0, 2, 1, 3, 4))
    return torch.cat(out)


@torch.no_grad()
def encode_prompts(tokenizer, text_encoder, prompts: Sequence[str], max_sequence_length: int = 512) -> torch.Tensor:
    """Prompt embeddings ``[K, max_sequence_length, D]`` (fp32) as ``AnyFlowFARPipeline.encode_prompt`` builds them.

    The encoder's ``last_hidden_state`` over the attended tokens, zero rows after them (the padding
    of the Wan-family pipelines), so the model trains on exactly what the pipeline feeds it.
    """
    from diffusers.pipelines.wan.pipeline_wan import prompt_clean

    prompts = [prompt_clean(p) for p in prompts]
    enc = tokenizer(prompts, padding="max_length", max_length=max_sequence_length, truncation=True,
                    add_special_tokens=True, return_attention_mask=True, return_tensors="pt")
    hidden = text_encoder(enc.input_ids, enc.attention_mask).last_hidden_state.float()
    keep = enc.attention_mask.bool().unsqueeze(-1)
    return torch.where(keep, hidden, torch.zeros_like(hidden))


def save_dataset(path, latents: torch.Tensor, text: torch.Tensor, negative: torch.Tensor,
                 text_index: Optional[torch.Tensor] = None, **extra) -> Path:
    """Write the ``.pt`` file of ``anyflow train --data`` atomically (see :func:`load_dataset`)."""
    from ..io import atomic_output

    blob = {"latents": latents.float().contiguous(), "text": text.float().contiguous(),
            "negative": negative.float().contiguous(), **extra}
    if text_index is not None:
        blob["text_index"] = torch.as_tensor(text_index, dtype=torch.long)
    with atomic_output(path) as tmp:
        torch.save(blob, tmp)
    return Path(path)


def load_dataset(path) -> dict:
    """Read a dataset file: ``latents [N, F, C, H, W]``, ``text [N or K, L, D]``, ``negative [L, D] or [1, L, D]``,
    optional ``text_index [N]``.

    Raises:
        FileNotFoundError: no such file. KeyError: a required entry is missing.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data file {path} does not exist (or pass 'synthetic')")
    blob = torch.load(path, map_location="cpu", weights_only=True)
    missing = {"latents", "text", "negative"} - set(blob)
    if missing:
        raise KeyError(f"{path} lacks {sorted(missing)}; expected latents, text, negative")
    return blob
