"""Dense attention through torch's SDPA with a chosen kernel: the *attention policy*.

Every unmasked dense attention of the PyTorch path (the bidirectional self-attention, the text
cross-attention, the contiguous segmented KV and each chunk-causal group) calls :func:`sdpa`. By default
torch picks the kernel itself; a policy can pin one (e.g. cuDNN, which often wins on H100 for Wan's
32,760-token self-attention at head dim 128 in bf16, but not for every shape) or time them all per shape
(``"tuned"``).

Policies (:data:`SDPA_POLICIES`):

* ``"default"``: torch's own choice (the initial policy unless ``ANYFLOW_SDPA`` says otherwise).
* ``"math"``, ``"flash"``, ``"efficient"``, ``"cudnn"``: that kernel first, torch's others behind it, so a
  call the pinned kernel cannot run (dtype, head dim, device, ...) still runs on the next one.
* ``"tuned"``: the first call for a new key (device, dtype, batch/head dims, Lq, Lk, D, scale, whether
  autograd records the call) times every kernel that can run it and remembers the fastest
  (:func:`sdpa_choices`); later calls with that key use it, with the same fallback as a pinned policy.

A non-default policy enables all four kernels for the call (in its order), also ones switched off
globally with ``torch.backends.cuda.enable_*_sdp(False)``. The policy is a module global: ``torch.compile``
guards on it, so changing it recompiles. ``anyflow.ops.sdpa`` is the function; this module is
``anyflow.ops.sdpa`` in ``sys.modules`` (``from anyflow.ops.sdpa import ...`` works).

Source: torch's ``torch.nn.attention.sdpa_kernel(backends, set_priority=True)`` selects the kernels;
nothing here re-implements attention.
"""

from __future__ import annotations

import contextlib
import os
import statistics
import time
import warnings
from typing import Callable, Iterator, Optional

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

ENV_VAR = "ANYFLOW_SDPA"

#: Kernel names -> torch backends, in torch's default priority order (flash, efficient, math, cudnn).
KERNELS = {
    "flash": SDPBackend.FLASH_ATTENTION,
    "efficient": SDPBackend.EFFICIENT_ATTENTION,
    "math": SDPBackend.MATH,
    "cudnn": SDPBackend.CUDNN_ATTENTION,
}
SDPA_POLICIES = ("default", "math", "flash", "efficient", "cudnn", "tuned")

#: Kernels ``"tuned"`` times, per device type (torch has a CPU flash kernel; efficient and cuDNN are
#: CUDA only). Other device types keep torch's choice.
CANDIDATES = {"cpu": ("math", "flash"), "cuda": ("flash", "efficient", "cudnn", "math")}

#: Per kernel: the backend list for ``sdpa_kernel(..., set_priority=True)``, that kernel first.
_PREFERENCE = {name: [backend] + [b for b in KERNELS.values() if b != backend] for name, backend in KERNELS.items()}

_WARMUP, _REPS = 2, 5
#: On CUDA, ``"tuned"`` does not time the math kernel above this many (query, key) pairs per head.
_MATH_MAX_PAIRS = 1 << 24

_policy: Optional[str] = None  # None until first use, then ANYFLOW_SDPA (or "default") unless set
_choices: dict[str, dict] = {}


def _check_policy(name, arg: str) -> str:
    if not isinstance(name, str):
        raise TypeError(f"{arg} must be a str, one of {SDPA_POLICIES}, got {type(name).__name__}")
    if name not in SDPA_POLICIES:
        raise ValueError(f"{arg} must be one of {SDPA_POLICIES}, got {name!r}")
    return name


def get_sdpa_policy() -> str:
    """The active policy; the first call reads ``ANYFLOW_SDPA`` (unset or empty: ``"default"``).

    Raises:
        ValueError: ``ANYFLOW_SDPA`` names no policy (raised at first use, not at import).
    """
    global _policy
    if _policy is None:
        _policy = _check_policy(os.environ.get(ENV_VAR) or "default", ENV_VAR)
    return _policy


def set_sdpa_policy(name: Optional[str]) -> str:
    """Set the process-wide policy; returns the previous one. ``None`` leaves it as is.

    Raises:
        ValueError / TypeError: ``name`` is not one of :data:`SDPA_POLICIES` (or an invalid
            ``ANYFLOW_SDPA`` when this is the first use).
    """
    global _policy
    if name is not None:
        _check_policy(name, "name")
    previous = get_sdpa_policy()
    if name is not None:
        _policy = name
    return previous


@contextlib.contextmanager
def sdpa_policy(name: Optional[str]) -> Iterator[str]:
    """Context manager: ``name`` is the policy inside the block and the previous one is restored on exit,
    also when the block raises (``None``: nothing is set or restored). Yields the policy in force.

    Raises:
        ValueError / TypeError: as :func:`set_sdpa_policy`.
    """
    if name is None:
        yield get_sdpa_policy()
        return
    previous = set_sdpa_policy(name)
    try:
        yield name
    finally:
        set_sdpa_policy(previous)


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: Optional[float] = None) -> torch.Tensor:
    """``F.scaled_dot_product_attention(q, k, v, scale=scale)`` (no mask, no dropout) under the active policy.

    Args:
        q: ``[B, H, Lq, D]``; ``k``: ``[B, H, Lk, D]``; ``v``: ``[B, H, Lk, Dv]``, one dtype (fp32, bf16,
            fp16 or fp64: what torch's kernels accept), one device. Strided views are fine.
        scale: softmax scale, default ``1/sqrt(D)``.

    Returns:
        ``[B, H, Lq, Dv]`` in ``q.dtype``. Kernels differ in rounding: results agree to the dtype's
        tolerance, not bitwise.

    Raises:
        ValueError / TypeError: the policy (or ``ANYFLOW_SDPA``) is invalid.
        RuntimeError: from torch, when no kernel at all can run the call (e.g. mismatched shapes).

    Cost of ``"tuned"``: the first call for a new key runs each candidate kernel ``2 + 5`` times under
    ``torch.no_grad()`` and synchronises the host once per candidate (CUDA events, median of 5; on CPU
    ``time.perf_counter``). No tuning happens while ``torch.compile`` traces or a CUDA graph captures: the
    remembered choice is used, else torch's default. A candidate that fails (no viable kernel, out of
    memory) is left out of the timing.
    """
    policy = get_sdpa_policy()
    kernel = _tuned_kernel(q, k, v, scale) if policy == "tuned" else policy
    if kernel == "default" or kernel is None:
        return F.scaled_dot_product_attention(q, k, v, scale=scale)
    with sdpa_kernel(_PREFERENCE[kernel], set_priority=True):
        return F.scaled_dot_product_attention(q, k, v, scale=scale)


def _key(q, k, v, scale) -> str:
    grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    *batch, lq, d = q.shape
    dims = "|".join(f"{n}{s}" for n, s in zip(("B", "H"), batch)) if len(batch) == 2 else "x".join(map(str, batch))
    dv = "" if v.shape[-1] == d else f"|Dv{v.shape[-1]}"
    dtype = str(q.dtype).removeprefix("torch.")
    return f"{q.device}|{dtype}|{dims}|Lq{lq}|Lk{k.shape[-2]}|D{d}{dv}|scale={scale!r}|grad={int(grad)}"


def _tuned_kernel(q, k, v, scale) -> Optional[str]:
    """The remembered kernel for this call's key, timing the candidates first when the key is new."""
    key = _key(q, k, v, scale)
    entry = _choices.get(key)
    if entry is not None:
        return entry["kernel"]
    if torch.compiler.is_compiling() or (q.is_cuda and torch.cuda.is_current_stream_capturing()):
        return None
    entry = _tune(q, k, v, scale)
    if entry is not None:
        _choices[key] = entry
        return entry["kernel"]
    return None


def _tune(q, k, v, scale) -> Optional[dict]:
    ms = {}
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch warns why each refused kernel cannot run
        for name in CANDIDATES.get(q.device.type, ()):
            if name == "math" and q.is_cuda and q.shape[-2] * k.shape[-2] > _MATH_MAX_PAIRS:
                continue  # materialises [B, H, Lq, Lk] scores: never the fastest there, and can run out of memory

            def call(backend=KERNELS[name]):
                with sdpa_kernel([backend]):
                    F.scaled_dot_product_attention(q, k, v, scale=scale)

            try:
                ms[name] = _time_ms(call, q.device)
            except RuntimeError:  # "no viable backend" for this kernel, or out of memory (math at long L)
                continue
    if not ms:  # let the real call raise torch's own error
        return None
    return {"kernel": min(ms, key=ms.get), "ms": ms}


def _time_ms(fn: Callable[[], None], device: torch.device) -> float:
    """Median milliseconds of ``fn()`` over ``_REPS`` runs after ``_WARMUP`` runs."""
    for _ in range(_WARMUP):
        fn()
    if device.type == "cuda":
        with torch.cuda.device(device):
            events = []
            for _ in range(_REPS):
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                events.append((start, end))
            torch.cuda.synchronize(device)
        return statistics.median(s.elapsed_time(e) for s, e in events)
    times = []
    for _ in range(_REPS):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def sdpa_choices() -> dict:
    """A copy of the ``"tuned"`` table: key string -> ``{"kernel": name, "ms": {kernel: median ms}}``.

    JSON-serialisable; the key names device, dtype, ``B``/``H``, ``Lq``, ``Lk``, ``D``, scale and
    ``grad`` (whether autograd recorded the call).
    """
    return {key: {"kernel": e["kernel"], "ms": dict(e["ms"])} for key, e in _choices.items()}


def load_sdpa_choices(table: dict) -> None:
    """Merge a table from :func:`sdpa_choices` (e.g. read back from a benchmark's JSON) into this process's.

    Loaded keys are not timed again. ``"ms"`` may be omitted.

    Raises:
        TypeError: ``table`` or an entry is not a dict.
        ValueError: an entry names no kernel of :data:`KERNELS`.
    """
    if not isinstance(table, dict):
        raise TypeError(f"table must be a dict from sdpa_choices(), got {type(table).__name__}")
    loaded = {}
    for key, entry in table.items():
        if not isinstance(entry, dict):
            raise TypeError(f"table[{key!r}] must be a dict with 'kernel' and 'ms', got {type(entry).__name__}")
        if entry.get("kernel") not in KERNELS:
            raise ValueError(f"table[{key!r}]['kernel'] must be one of {tuple(KERNELS)}, got {entry.get('kernel')!r}")
        loaded[str(key)] = {"kernel": entry["kernel"], "ms": {str(n): float(t) for n, t in entry.get("ms", {}).items()}}
    _choices.update(loaded)


def clear_sdpa_choices() -> None:
    """Forget every ``"tuned"`` choice (the next call of each key times again)."""
    _choices.clear()


def available_kernels(device="cpu") -> tuple[str, ...]:
    """The kernels of :data:`KERNELS` that run a small probe call on ``device`` with only that kernel enabled.

    The probe is ``[1, 1, 16, 64]`` in bf16 on CUDA and fp32 elsewhere: it shows what this torch build and
    device have, not that a kernel accepts every shape or dtype.
    """
    device = torch.device(device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    q = torch.randn(1, 1, 16, 64, generator=torch.Generator().manual_seed(0)).to(device, dtype)
    found = []
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name, backend in KERNELS.items():
            try:
                with sdpa_kernel([backend]):
                    F.scaled_dot_product_attention(q, q, q)
            except RuntimeError:
                continue
            found.append(name)
    return tuple(found)
