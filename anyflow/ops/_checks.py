"""Argument checks shared by the ops: every failure names the argument, what was expected and what came."""

from __future__ import annotations

import math
import numbers
from typing import Optional, Sequence

import torch

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def check_tensor(name: str, x, ndim: int | None = None, dtypes=FLOAT_DTYPES) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if ndim is not None and x.ndim != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(x.shape)}")
    if dtypes is not None and x.dtype not in dtypes:
        raise TypeError(f"{name} must have dtype in {[str(d) for d in dtypes]}, got {x.dtype}")


def check_number(name: str, value, minimum: Optional[float] = None, maximum: Optional[float] = None) -> float:
    """``value`` as a finite float (a Python or NumPy real, or a one-element tensor) in ``[minimum, maximum]``."""
    if isinstance(value, torch.Tensor) and value.numel() == 1 and not value.is_complex():
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__} {value!r}")
    value = float(value)
    too_low = minimum is not None and value < minimum
    too_high = maximum is not None and value > maximum
    if not math.isfinite(value) or too_low or too_high:
        if maximum is None:
            bound = "" if minimum is None else f" >= {minimum:g}"
        else:
            bound = f" <= {maximum:g}" if minimum is None else f" in [{minimum:g}, {maximum:g}]"
        raise ValueError(f"{name} must be a finite number{bound}, got {value!r}")
    return value


def check_int(name: str, value, minimum: Optional[int] = None) -> int:
    """``value`` as an int (Python or NumPy integer; not bool, not float), at least ``minimum``."""
    if isinstance(value, torch.SymInt):  # traced shapes: specialise, as int() did before
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def check_same_device(**tensors) -> torch.device:
    devices = {name: t.device for name, t in tensors.items() if isinstance(t, torch.Tensor)}
    first = next(iter(devices.values()))
    for name, dev in devices.items():
        if dev != first:
            listing = ", ".join(f"{n}={d}" for n, d in devices.items())
            raise ValueError(f"all tensors must be on one device, got {listing}")
    return first


def check_segments(segments: Sequence[Sequence[int]], num_tokens: int, num_rows: Optional[int],
                   arg: str = "segments"):
    """Validate a frame-segment table: ``((frames, tokens_per_frame), ...)`` covering the token axis (and
    ``num_rows`` frames unless it is ``None``)."""
    try:
        segs = tuple((check_int(arg, f), check_int(arg, n)) for f, n in segments)
    except (TypeError, ValueError):
        raise TypeError(f"{arg} must be a sequence of (num_frames, tokens_per_frame) pairs, got {segments!r}") from None
    if any(f < 0 or n <= 0 for f, n in segs):
        raise ValueError(f"{arg} needs num_frames >= 0 and tokens_per_frame > 0, got {segs}")
    tokens = sum(f * n for f, n in segs)
    rows = sum(f for f, _ in segs)
    if tokens != num_tokens:
        raise ValueError(f"{arg}={segs} covers {tokens} tokens but the input has {num_tokens}")
    if num_rows is not None and rows != num_rows:
        raise ValueError(f"{arg}={segs} covers {rows} frames but the modulation has {num_rows} rows")
    return segs
