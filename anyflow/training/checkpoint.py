"""EMA of the trainable parameters, RNG state capture and atomic, bit-exact resumable checkpoints.

A checkpoint is one ``torch.save`` file holding plain containers and tensors only (it loads with
``weights_only=True``): trainable parameters, optimiser and LR-schedule states, EMA, the training
generator and the global RNGs (torch CPU and CUDA, Python ``random``, NumPy), the data iterator's state
when it has one, and the step. It is written to a temporary file in the target folder, flushed and
fsynced, then moved into place with ``os.replace``, so a crash or an exception never leaves a partial
file under the final name. A process killed outright (SIGKILL, power loss) mid-write leaves only its
hidden temporary file, which :func:`remove_partial_checkpoints` deletes when the run resumes; and
:func:`latest_checkpoint` passes over a file under the final name that is not a complete ``torch.save``
archive (copied in part, or written by another tool), so a run never resumes from a partial checkpoint.
"""

from __future__ import annotations

import contextlib
import os
import random
import warnings
import zipfile
from pathlib import Path
from typing import Iterable, Optional, Union

import torch

from ..io import atomic_output

PathLike = Union[str, os.PathLike]


# -- EMA (NVlabs/AnyFlow far/utils/ema_util.py) ----------------------------------------------------
class EMA:
    """Exponential moving average of named parameters, kept as fp32 copies (on CPU by default).

    ``update(step)`` uses decay 0 (a plain copy) while ``step < warmup_steps`` and ``decay`` after:
    ``ema <- d * ema + (1 - d) * param`` (NVlabs/AnyFlow far/utils/ema_util.py, NVlabs/AnyFlow far/main.py: pretrain
    0.999 / 1000, on-policy 0.99 / 200).

    Args:
        named_params: ``(name, parameter)`` pairs of the trainable parameters.
        decay: EMA decay in [0, 1).
        warmup_steps: steps with decay 0.
        device: where the fp32 copies live.
    """

    def __init__(self, named_params: Iterable, decay: float, warmup_steps: int = 0, device="cpu"):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"decay must be in [0, 1), got {decay}")
        self.decay = float(decay)
        self.warmup_steps = int(warmup_steps)
        self.params = dict(named_params)
        self.shadow = {n: p.detach().to(device=device, dtype=torch.float32, copy=True) for n, p in self.params.items()}

    def decay_at(self, step: int) -> float:
        return 0.0 if step < self.warmup_steps else self.decay

    @torch.no_grad()
    def update(self, step: int) -> None:
        """Fold the current parameters in; ``step`` is the number of optimiser steps taken before this one."""
        d = self.decay_at(step)
        for name, p in self.params.items():
            s = self.shadow[name]
            src = p.detach().to(s.device, torch.float32)
            if d == 0.0:
                s.copy_(src)
            else:
                s.mul_(d).add_(src, alpha=1.0 - d)

    def state_dict(self) -> dict:
        return {"decay": self.decay, "warmup_steps": self.warmup_steps, "shadow": dict(self.shadow)}

    def load_state_dict(self, state: dict) -> None:
        missing = set(self.shadow) - set(state["shadow"])
        if missing:
            raise KeyError(f"EMA state lacks parameters {sorted(missing)[:5]}")
        for name, s in self.shadow.items():
            s.copy_(state["shadow"][name])

    @torch.no_grad()
    def copy_to(self, module: torch.nn.Module) -> None:
        """Write the EMA values into ``module``'s parameters of the same names."""
        own = dict(module.named_parameters())
        for name, s in self.shadow.items():
            own[name].copy_(s.to(own[name].device, own[name].dtype))


# -- RNG state -------------------------------------------------------------------------------------
def rng_state(generators: Optional[dict] = None) -> dict:
    """Global RNG states (torch CPU / CUDA, Python, NumPy) and those of named ``torch.Generator``s,
    as tensors and plain Python values."""
    py = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "python": [py[0], list(py[1]), py[2]],
        "generators": {k: g.get_state() for k, g in (generators or {}).items()},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    try:
        import numpy as np

        kind, keys, pos, has_gauss, cached = np.random.get_state()
        state["numpy"] = [kind, torch.from_numpy(keys.astype("int64")), int(pos), int(has_gauss), float(cached)]
    except ImportError:
        pass
    return state


def set_rng_state(state: dict, generators: Optional[dict] = None) -> None:
    """Restore what :func:`rng_state` captured (generators by name)."""
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if "numpy" in state:
        import numpy as np

        kind, keys, pos, has_gauss, cached = state["numpy"]
        np.random.set_state((kind, keys.numpy().astype("uint32"), pos, has_gauss, cached))
    for name, g in (generators or {}).items():
        g.set_state(state["generators"][name])


# -- atomic save / load ----------------------------------------------------------------------------
def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):  # best effort: not every platform can open or sync a folder
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_save(obj, path: PathLike) -> Path:
    """``torch.save(obj)`` to ``path`` atomically: temp file in the same folder, fsync, ``os.replace``.

    On any exception (including KeyboardInterrupt) the temporary file is removed and an existing file
    at ``path`` is left untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_output(path, suffix=".tmp") as tmp:
        torch.save(obj, tmp)
    _fsync_dir(path.parent)
    return path


def load(path: PathLike, map_location="cpu") -> dict:
    """Load a checkpoint written by :func:`atomic_save` (``weights_only=True``)."""
    return torch.load(Path(path), map_location=map_location, weights_only=True)


def checkpoint_path(output_dir: PathLike, step: int) -> Path:
    return Path(output_dir) / f"checkpoint-{step:07d}.pt"


def is_complete(path: PathLike) -> bool:
    """Whether ``path`` is a whole ``torch.save`` archive: a zip whose central directory (written last)
    is present and whose members are all there (their headers and sizes are read, not the data)."""
    try:
        with zipfile.ZipFile(path) as archive:
            end = os.path.getsize(path)
            return all(info.header_offset + info.compress_size <= end for info in archive.infolist())
    except (OSError, zipfile.BadZipFile, ValueError):
        return False


def latest_checkpoint(output_dir: PathLike) -> Optional[Path]:
    """The complete checkpoint with the largest step in ``output_dir`` (``None`` if there is none).

    A ``checkpoint-*.pt`` that is not a complete archive (:func:`is_complete`) is passed over with a
    warning naming it; the newest complete one before it is returned.
    """
    for path in sorted(Path(output_dir).glob("checkpoint-*.pt"), reverse=True):  # none in a missing folder
        if is_complete(path):
            return path
        warnings.warn(f"{path}: incomplete checkpoint (not a whole torch.save archive), skipped; resuming from an "
                      "earlier one", RuntimeWarning, stacklevel=2)
    return None


def remove_partial_checkpoints(output_dir: PathLike) -> list[Path]:
    """Delete the temporary files that :func:`atomic_save` leaves when its process is killed mid-write
    (``.checkpoint-*.tmp`` in ``output_dir``); returns them. Call it only where no other process is
    writing checkpoints into ``output_dir`` (rank 0, before training resumes)."""
    d = Path(output_dir)
    removed = []
    for tmp in d.glob(".checkpoint-*.tmp") if d.is_dir() else ():
        with contextlib.suppress(FileNotFoundError):  # removed by someone else meanwhile
            tmp.unlink()
            removed.append(tmp)
    return removed
