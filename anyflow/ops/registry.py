"""Backend registry for the fused ops (xformers-style: every implementation says why it cannot run).

Three backends exist: ``"torch"`` (the plain PyTorch path; always available, and also the reference the
others are tested against), ``"triton"`` (kernels in :mod:`anyflow.kernels`) and ``"cuda"`` (the compiled
extension ``anyflow._C``). A backend registers an implementation per op, optionally with a ``check``
callable that receives the call's tensors and returns a reason string when it cannot handle them
(device, dtype, head dim, ...).

Selection: an explicit backend name must work or a :class:`BackendUnavailableError` lists why not.
``"auto"`` walks the priority list of the call's device (:func:`auto_priority`: a kernel only where the
committed GPU results of :mod:`anyflow.ops.measured` show it correct and faster on that architecture, then
the PyTorch path) and takes the first that can run; the environment variable ``ANYFLOW_BACKEND``
replaces ``"auto"`` by a fixed name.

Run-time failures (a Triton compile or out-of-resources error, a CUDA error, a shape found unsupported
only at launch): a backend chosen by name raises :class:`KernelRuntimeError` naming the op, the backend,
the shapes and the reason; under ``"auto"`` the call falls back to the next backend (in the end the
PyTorch path) with one warning, and that (op, backend, shapes) is not tried again in this process.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import warnings
from dataclasses import dataclass
from typing import Callable, Optional

BACKENDS = ("torch", "triton", "cuda")


class BackendUnavailableError(RuntimeError):
    """Raised when the requested backend (or every backend, for ``"auto"``) cannot run a call."""


class KernelRuntimeError(RuntimeError):
    """A backend asked for by name accepted a call and then failed running it (compile error, out of
    resources, CUDA error, ...). The message names the op, the backend, the shapes and the reason; the
    original exception is the ``__cause__``."""


@functools.lru_cache(maxsize=None)
def _arch(device_index: int) -> str:
    import torch

    major, minor = torch.cuda.get_device_capability(device_index)
    return f"sm_{major}{minor}"


def auto_priority(op: str, device_type: str, device_index: Optional[int] = None) -> tuple:
    """Backends ``"auto"`` tries for ``op`` on a device, in order.

    On CPU only the PyTorch path (the Triton interpreter and the C++ CPU twins exist for testing, not for
    speed). On a CUDA device of architecture ``sm_XY``: the backend that :data:`anyflow.ops.measured.AUTO_KERNELS`
    lists for (``sm_XY``, ``op``), i.e. one that the committed GPU results show correct and faster than the
    PyTorch path at every measured shape, then the PyTorch path.
    """
    if device_type != "cuda":
        return ("torch",)
    from .measured import AUTO_KERNELS

    try:
        arch = _arch(device_index if device_index is not None else 0)
    except Exception:  # noqa: BLE001 - no usable device: nothing measured applies
        return ("torch",)
    kernel = AUTO_KERNELS.get(arch, {}).get(op)
    return (kernel, "torch") if kernel and kernel != "torch" else ("torch",)


@dataclass(frozen=True)
class Implementation:
    op: str
    backend: str
    fn: Callable
    check: Optional[Callable[..., Optional[str]]] = None


_IMPLS: dict[str, dict[str, Implementation]] = {}


def register(op: str, backend: str, check: Optional[Callable[..., Optional[str]]] = None):
    """Decorator registering ``fn`` as ``backend``'s implementation of ``op``.

    Args:
        op: op name as exported from :mod:`anyflow.ops` (e.g. ``"adaln_modulate"``).
        backend: one of :data:`BACKENDS`.
        check: optional ``check(*args, **kwargs) -> str | None`` called with the op's arguments; a
            returned string is the reason this implementation cannot run that call.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")

    def deco(fn):
        _IMPLS.setdefault(op, {})[backend] = Implementation(op, backend, fn, check)
        return fn

    return deco


def _triton_reason() -> Optional[str]:
    try:
        found = importlib.util.find_spec("triton") is not None
    except (ImportError, ValueError):  # a broken or blocked installation
        found = False
    if not found:
        return "triton is not installed"
    if os.environ.get("TRITON_INTERPRET") == "1":
        return None
    import torch

    if not torch.cuda.is_available():
        return "no CUDA device (set TRITON_INTERPRET=1 to run the kernels in the CPU interpreter)"
    return None


def _cuda_reason() -> Optional[str]:
    from .. import _ext

    return _ext.extension_status()[1]


_REASONS: dict[str, Optional[str]] = {}


def backend_reason(backend: str) -> Optional[str]:
    """Why ``backend`` cannot run at all in this process (``None`` when it can); cached per process.

    :func:`anyflow.enable` fills the cache eagerly (:func:`warm_up`), so a traced forward only reads it.
    """
    if backend not in _REASONS:
        _REASONS[backend] = _backend_reason(backend)
    return _REASONS[backend]


_WARM_UPS: dict[str, list] = {}


def on_warm_up(backend: str, fn) -> None:
    """Run ``fn()`` in :func:`warm_up` when ``backend`` is available (e.g. load a library, register fakes)."""
    _WARM_UPS.setdefault(backend, []).append(fn)


def warm_up() -> None:
    """Evaluate every backend's availability and run its warm-ups now, outside any ``torch.compile`` trace."""
    for name in BACKENDS:
        if backend_reason(name) is None:
            for fn in _WARM_UPS.get(name, ()):
                fn()


def _backend_reason(backend: str) -> Optional[str]:
    if backend == "torch":
        return None
    if backend == "triton":
        return _triton_reason()
    if backend == "cuda":
        return _cuda_reason()
    raise ValueError(f"backend must be one of {BACKENDS} or 'auto', got {backend!r}")


def _impl_reason(impl: Optional[Implementation], backend: str, args, kwargs) -> Optional[str]:
    if impl is None:
        return f"no {backend} implementation registered"
    reason = backend_reason(backend)
    if reason is None and impl.check is not None:
        reason = impl.check(*args, **kwargs)
    return reason


def _env_backend() -> str:
    return os.environ.get("ANYFLOW_BACKEND", "auto") or "auto"


def prefer(backend: str) -> tuple:
    """An ordered preference: ``backend`` where it can run a call, else the PyTorch path.

    :func:`anyflow.enable` passes this to every op, so ``enable(pipe, backend="triton")`` uses the
    Triton kernels for the ops that have one (and can run the call) and PyTorch for the rest (e.g. the
    tiny time-pair GEMMs). A plain name given to an op is strict instead.
    """
    backend = requested_backend(backend)
    return backend if backend in ("auto", "torch") else (backend, "torch")


def requested_backend(backend) -> "str | tuple":
    """Apply the ``ANYFLOW_BACKEND`` override to a requested backend (``None`` means ``"auto"``).

    Also accepts a tuple of names (an ordered preference, see :func:`prefer`), returned unchanged.
    """
    if isinstance(backend, tuple):
        for name in backend:
            if name not in BACKENDS:
                raise ValueError(f"backend must be one of {BACKENDS} or 'auto', got {name!r}")
        return backend
    backend = backend or "auto"
    if backend == "auto":
        backend = _env_backend()
    if backend != "auto" and backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS} or 'auto', got {backend!r}")
    return backend


def _tensors(args):
    import torch

    for a in args:
        if isinstance(a, torch.Tensor):
            yield a
        elif isinstance(a, (list, tuple)):
            yield from (t for t in a if isinstance(t, torch.Tensor))


def _shapes(args) -> str:
    """``"[1, 4680, 1536] bfloat16, ..."`` of a call's tensors (nested lists included), for messages and keys."""
    text = ", ".join(f"{list(t.shape)} {str(t.dtype).replace('torch.', '')}" for t in _tensors(args))
    return text[:400]


#: (op, backend, shapes) that failed at run time under "auto": skipped from then on in this process
_FAILED: set = set()


def _compiling() -> bool:
    import torch

    return bool(torch.compiler.is_compiling())


def _run(impl: Implementation, args, kwargs):
    """Call a named backend; a failure becomes a :class:`KernelRuntimeError` naming op, backend and shapes."""
    if impl.backend == "torch" or _compiling():
        return impl.fn(*args, **kwargs)
    try:
        return impl.fn(*args, **kwargs)
    except Exception as exc:  # noqa: BLE001 - any kernel failure is reported with its context
        raise KernelRuntimeError(f"anyflow.ops.{impl.op}: backend {impl.backend!r} failed at run time on "
                                 f"[{_shapes(args)}]: {type(exc).__name__}: {str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ''}") from exc


def dispatch(op: str, backend: Optional[str], device_type: str, *args, **kwargs):
    """Run ``op`` on the selected backend. ``device_type`` is the device of the call's tensors."""
    impls = _IMPLS.get(op, {})
    backend = requested_backend(backend)
    if isinstance(backend, tuple):
        return _first_runnable(op, impls, backend, args, kwargs)
    if backend != "auto":
        impl = impls.get(backend)
        reason = _impl_reason(impl, backend, args, kwargs)
        if reason is not None:
            raise BackendUnavailableError(f"anyflow.ops.{op}: backend {backend!r} cannot run this call: {reason}")
        return _run(impl, args, kwargs)
    index = None
    if device_type == "cuda":
        first = next(_tensors(args), None)
        index = first.device.index if first is not None else None
    return _first_runnable(op, impls, auto_priority(op, device_type, index), args, kwargs, fallback=True)


def _first_runnable(op, impls, names, args, kwargs, fallback: bool = False):
    """The first backend of ``names`` that can run the call. With ``fallback`` (``"auto"``) a backend that
    fails at run time is reported once (a warning) and the next one runs; otherwise the failure raises."""
    reasons = []
    key = None
    for name in names:
        impl = impls.get(name)
        reason = _impl_reason(impl, name, args, kwargs)
        if reason is None and fallback and name != "torch":
            key = key or (op, _shapes(args))
            if (name,) + key in _FAILED:
                reason = "failed at run time on these shapes earlier in this process"
        if reason is None:
            if not fallback or name == "torch":
                return _run(impl, args, kwargs)
            try:
                return _run(impl, args, kwargs)
            except KernelRuntimeError as exc:
                _FAILED.add((name,) + key)
                warnings.warn(f"{exc}; falling back to the next backend for these shapes", RuntimeWarning, stacklevel=3)
                reason = "failed at run time"
        reasons.append(f"{name}: {reason}")
    raise BackendUnavailableError(f"anyflow.ops.{op}: no backend can run this call ({'; '.join(reasons)})")


def report(device_type: str = "cuda") -> list[dict]:
    """One row per (op, backend): whether it is registered and usable here, and why not.

    ``device_type`` picks which ``"auto"`` priority list is reported as the auto choice.
    """
    rows = []
    for op in sorted(_IMPLS):
        auto_choice = None
        for backend in BACKENDS:
            impl = _IMPLS[op].get(backend)
            reason = "no implementation registered" if impl is None else backend_reason(backend)
            rows.append({"op": op, "backend": backend, "available": reason is None, "reason": reason})
        for name in auto_priority(op, device_type):
            if _IMPLS[op].get(name) is not None and backend_reason(name) is None:
                auto_choice = name
                break
        rows.append({"op": op, "backend": "auto", "available": auto_choice is not None, "reason": auto_choice})
    return rows
