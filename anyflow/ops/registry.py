"""Backend registry for the fused ops (xformers-style: every implementation says why it cannot run).

Backends: ``"torch"`` (the plain PyTorch path, always available: the reference the others are tested
against), ``"triton"`` (:mod:`anyflow.ops._triton`) and ``"cuda"`` (the extension ``anyflow._C``,
:mod:`anyflow.ops._cuda`). An implementation declares what it runs as data, a :class:`Supports`
(devices, dtypes, autograd, limits of :mod:`anyflow.kernels.limits`, compute capability) plus a small
``check`` only for what data cannot say; each op describes its calls once (:func:`describe`), and
:func:`not_supported_reasons` lists every reason a call cannot run. :func:`report` (``anyflow env``)
prints the declared constraints.

Selection: the op's ``backend=`` argument, else the innermost :class:`backend` setting, else
``ANYFLOW_BACKEND``, else ``"auto"``. A name must work or :class:`BackendUnavailableError` says why; a
tuple is an ordered preference (:func:`prefer`); ``"auto"`` walks :func:`auto_priority` (a kernel only
where the committed GPU results of :mod:`anyflow.ops.measured` list it, then the PyTorch path).

Run-time failures (a Triton compile or out-of-resources error, a CUDA error): a backend chosen by name
raises :class:`KernelRuntimeError` naming op, backend, shapes and reason; under ``"auto"`` the call falls
back to the next backend with one warning, and that (op, backend, shapes) is not tried again.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import warnings
from dataclasses import dataclass
from typing import Callable, Optional, Union

import torch

BACKENDS = ("torch", "triton", "cuda")
FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
Backend = Union[str, tuple]


class BackendUnavailableError(RuntimeError):
    """Raised when the requested backend (or every backend, for ``"auto"``) cannot run a call."""


class KernelRuntimeError(RuntimeError):
    """A backend asked for by name accepted a call and then failed running it (compile error, out of
    resources, CUDA error, ...). The message names the op, the backend, the shapes and the reason; the
    original exception is the ``__cause__``."""


@functools.lru_cache(maxsize=None)
def _capability(device_index: int) -> tuple[int, int]:
    return tuple(torch.cuda.get_device_capability(device_index))


def _arch(device_index: int) -> str:
    major, minor = _capability(device_index)
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


# ----------------------------------------------------------------------------------------------
# declared constraints
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Call:
    """The features of one op call that declared constraints are checked against: the device and dtype
    of the main tensor (``x``, ``q``, ``latents``), whether grad mode is on and an input requires grad,
    and where the op has them the head dim, the non-empty frame / KV segments and batch x heads."""

    device: torch.device
    dtype: torch.dtype
    grad: bool
    head_dim: Optional[int] = None
    segments: Optional[int] = None
    segment_kind: str = "frame"
    batch_heads: Optional[int] = None


def call_of(main: torch.Tensor, tensors, **features) -> Call:
    """A :class:`Call` of ``main`` (device, dtype) whose ``tensors`` (``None`` entries allowed) may need grad."""
    grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)
    return Call(main.device, main.dtype, grad, **features)


@dataclass(frozen=True)
class Supports:
    """What an implementation can run, as data (xformers' ``SUPPORTED_*`` class attributes).

    Attributes:
        devices: device types of the tensors.
        dtypes: dtypes of the op's main tensor.
        autograd: ``False`` for forward-only kernels (declined when an input requires grad).
        max_segments: most non-empty segments (``None``: any).
        max_head_dim: largest head dim (``None``: any).
        even_head_dim: the head dim must be even (interleaved RoPE pairs).
        max_batch_heads: most batch x heads (the launch grid's second axis).
        min_capability: lowest CUDA compute capability ``(major, minor)`` on CUDA tensors.
        check: ``check(*args) -> str | None`` with the op's arguments, for what data cannot say (a
            layout's groups, strides, a row width); its docstring's first line is what it checks.
    """

    devices: tuple = ("cpu", "cuda")
    dtypes: tuple = FLOAT_DTYPES
    autograd: bool = True
    max_segments: Optional[int] = None
    max_head_dim: Optional[int] = None
    even_head_dim: bool = False
    max_batch_heads: Optional[int] = None
    min_capability: Optional[tuple] = None
    check: Optional[Callable[..., Optional[str]]] = None

    def reasons(self, backend: str, call: Call, args, kwargs) -> list[str]:
        """Every declared constraint ``call`` breaks, then the custom check's reason."""
        out = []
        if call.device.type not in self.devices:
            out.append(f"the {backend} kernels take {' or '.join(self.devices)} tensors, got {call.device.type}")
        if call.dtype not in self.dtypes:
            out.append(f"dtype {call.dtype} is not supported ({', '.join(_dtype(d) for d in self.dtypes)})")
        if call.grad and not self.autograd:
            out.append(f"the {backend} kernels are forward-only (an input requires grad)")
        if self.max_segments is not None and call.segments is not None and call.segments > self.max_segments:
            out.append(f"at most {self.max_segments} non-empty {call.segment_kind} segments are supported, "
                       f"got {call.segments}")
        if call.head_dim is not None:
            if self.max_head_dim is not None and call.head_dim > self.max_head_dim:
                out.append(f"head dim {call.head_dim} is above the largest supported, {self.max_head_dim}")
            if self.even_head_dim and call.head_dim % 2:
                out.append(f"head dim {call.head_dim} must be even (interleaved RoPE pairs)")
        if self.max_batch_heads is not None and call.batch_heads is not None and call.batch_heads > self.max_batch_heads:
            out.append(f"batch * heads must be <= {self.max_batch_heads}, got {call.batch_heads}")
        if self.min_capability is not None and call.device.type == "cuda":
            have = _capability(call.device.index if call.device.index is not None else torch.cuda.current_device())
            if have < tuple(self.min_capability):
                out.append(f"needs compute capability >= {'.'.join(map(str, self.min_capability))}, "
                           f"{call.device} has {have[0]}.{have[1]}")
        if self.check is not None:
            reason = self.check(*args, **kwargs)
            if reason is not None:
                out.append(reason)
        return out

    def summary(self) -> str:
        """One line of the declared constraints (what ``anyflow env`` prints)."""
        doc = (self.check.__doc__ or "").strip().split("\n")[0].rstrip(".") if self.check else ""
        parts = [f"devices {'/'.join(self.devices)}", f"dtypes {'/'.join(map(_dtype, self.dtypes))}",
                 not self.autograd and "forward-only",
                 self.max_segments and f"segments <= {self.max_segments}",
                 self.max_head_dim and f"head dim <= {self.max_head_dim}",
                 self.even_head_dim and "even head dim",
                 self.max_batch_heads and f"batch*heads <= {self.max_batch_heads}",
                 self.min_capability and f"compute capability >= {'.'.join(map(str, self.min_capability))}",
                 doc[:1].lower() + doc[1:]]
        return "; ".join(p for p in parts if p)


def _dtype(d: torch.dtype) -> str:
    return str(d).removeprefix("torch.")


@dataclass(frozen=True)
class Implementation:
    op: str
    backend: str
    fn: Callable
    supports: Optional[Supports] = None


_IMPLS: dict[str, dict[str, Implementation]] = {}
_CALLS: dict[str, Callable[..., Call]] = {}


def register(op: str, backend: str, supports: Optional[Supports] = None):
    """Decorator registering ``fn`` as ``backend``'s implementation of ``op``.

    Args:
        op: op name as exported from :mod:`anyflow.ops` (e.g. ``"adaln_modulate"``).
        backend: one of :data:`BACKENDS`.
        supports: the calls it can run (``None``: every call the op accepts, as the PyTorch path).

    Raises:
        ValueError: unknown backend.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")

    def deco(fn):
        _IMPLS.setdefault(op, {})[backend] = Implementation(op, backend, fn, supports)
        return fn

    return deco


def describe(op: str, fn: Callable[..., Call]) -> None:
    """Register ``fn(*args) -> Call``: the features of a call of ``op`` (its torch reference's arguments)
    that :class:`Supports` constraints are checked against."""
    _CALLS[op] = fn


# ----------------------------------------------------------------------------------------------
# backend availability
# ----------------------------------------------------------------------------------------------
def triton_installed() -> bool:
    try:
        return importlib.util.find_spec("triton") is not None
    except (ImportError, ValueError):  # a broken or blocked installation
        return False


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
        if not triton_installed():
            return "triton is not installed"
        if os.environ.get("TRITON_INTERPRET") == "1" or torch.cuda.is_available():
            return None
        return "no CUDA device (set TRITON_INTERPRET=1 to run the kernels in the CPU interpreter)"
    if backend == "cuda":
        from .. import _ext

        return _ext.extension_status()[1]
    raise ValueError(f"backend must be one of {BACKENDS} or 'auto', got {backend!r}")


def _impl_reasons(impl: Optional[Implementation], backend: str, args, kwargs) -> list[str]:
    if impl is None:
        return [f"no {backend} implementation registered"]
    reason = backend_reason(backend)
    if reason is not None:
        return [reason]
    if impl.supports is None:
        return []
    return impl.supports.reasons(backend, _CALLS[impl.op](*args, **kwargs), args, kwargs)


def not_supported_reasons(op: str, backend: str, *args, **kwargs) -> list[str]:
    """Why ``backend`` cannot run ``op`` on these arguments (those of the op's torch reference, as the
    public op passes them after its argument checks); empty when it can."""
    return _impl_reasons(_IMPLS.get(op, {}).get(backend), backend, args, kwargs)


# ----------------------------------------------------------------------------------------------
# which backend a call asks for
# ----------------------------------------------------------------------------------------------
#: The backend of ops called with ``backend=None``: set process-wide or by the innermost ``with backend(...)``.
_selected: Optional[Backend] = None


def _check_backend(name) -> Backend:
    names, allowed = (name, BACKENDS) if isinstance(name, tuple) else ((name,), BACKENDS + ("auto",))
    for n in names:
        if n not in allowed:
            raise ValueError(f"backend must be one of {BACKENDS} or 'auto', got {n!r}")
    return name


class backend:
    """The backend of every op called with ``backend=None``: process-wide, or within a ``with`` block.

    ``backend("triton")`` sets it for the process (as :func:`anyflow.ops.set_sdpa_policy`); ``with
    backend("triton"):`` sets it for the block and restores the previous setting on exit, also on an
    exception (as ``torch.set_grad_enabled``). ``None`` sets and restores nothing; ``"auto"`` undoes an
    outer setting. An op's ``backend=`` argument wins over it; it wins over ``ANYFLOW_BACKEND``.

    torch.compile guards on the setting (a module global), so changing it between calls of a compiled
    function recompiles; entered inside the compiled function (as an enabled forward should) it is
    traced: no graph break, no recompile.

    Args:
        name: ``"auto"``, ``"torch"``, ``"triton"``, ``"cuda"``, a tuple of names (an ordered preference,
            :func:`prefer`) or ``None``.

    Raises:
        ValueError: an unknown backend name.

    Example:
        >>> with anyflow.ops.backend(anyflow.ops.registry.prefer("triton")):  # Triton where it runs, else torch
        ...     video = pipe("a red panda eating bamboo").frames[0]
    """

    def __init__(self, name: Optional[Backend]):
        global _selected
        self._set = name is not None
        self._previous = _selected
        if self._set:
            _selected = None if _check_backend(name) == "auto" else name

    def __enter__(self) -> Optional[Backend]:
        return _selected

    def __exit__(self, *exc) -> None:
        global _selected
        if self._set:
            _selected = self._previous


def prefer(backend: str) -> tuple:
    """An ordered preference: ``backend`` where it can run a call, else the PyTorch path.

    :func:`anyflow.enable` enters this (:class:`backend`) around its forwards, so
    ``enable(pipe, backend="triton")`` uses the Triton kernels for the ops that have one (and can run the call)
    and PyTorch for the rest (e.g. the tiny time-pair GEMMs). A plain name given to an op is strict instead.
    """
    backend = requested_backend(backend)
    return backend if backend in ("auto", "torch") else (backend, "torch")


def requested_backend(backend=None) -> Backend:
    """``backend``, or for ``None`` the innermost :class:`backend` setting; then ``"auto"`` becomes
    ``ANYFLOW_BACKEND`` when set. A tuple (an ordered preference, :func:`prefer`) comes back unchanged.

    Raises:
        ValueError: an unknown backend name.
    """
    if backend is None:
        backend = _selected if _selected is not None else "auto"
    backend = _check_backend(backend)
    if backend == "auto":
        backend = _check_backend(os.environ.get("ANYFLOW_BACKEND", "auto") or "auto")
    return backend


# ----------------------------------------------------------------------------------------------
# dispatch
# ----------------------------------------------------------------------------------------------
def _tensors(args):
    for a in args:
        if isinstance(a, torch.Tensor):
            yield a
        elif isinstance(a, (list, tuple)):
            yield from (t for t in a if isinstance(t, torch.Tensor))


def _shapes(args) -> str:
    """``"[1, 4680, 1536] bfloat16, ..."`` of a call's tensors (nested lists included), for messages and keys."""
    text = ", ".join(f"{list(t.shape)} {_dtype(t.dtype)}" for t in _tensors(args))
    return text[:400]


#: (op, backend, shapes) that failed at run time under "auto": skipped from then on in this process
_FAILED: set = set()


def _run(impl: Implementation, args, kwargs):
    """Call a named backend; a failure becomes a :class:`KernelRuntimeError` naming op, backend and shapes."""
    if impl.backend == "torch" or torch.compiler.is_compiling():
        return impl.fn(*args, **kwargs)
    try:
        return impl.fn(*args, **kwargs)
    except Exception as exc:  # noqa: BLE001 - any kernel failure is reported with its context
        first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ""
        raise KernelRuntimeError(f"anyflow.ops.{impl.op}: backend {impl.backend!r} failed at run time on "
                                 f"[{_shapes(args)}]: {type(exc).__name__}: {first}") from exc


def dispatch(op: str, backend: Optional[Backend], device_type: str, *args, **kwargs):
    """Run ``op`` on the selected backend (:func:`requested_backend`). ``device_type`` is the device of the
    call's tensors; ``args`` are the arguments of the op's torch reference."""
    impls = _IMPLS.get(op, {})
    backend = requested_backend(backend)
    if isinstance(backend, tuple):
        return _first_runnable(op, impls, backend, args, kwargs)
    if backend != "auto":
        impl = impls.get(backend)
        reasons = _impl_reasons(impl, backend, args, kwargs)
        if reasons:
            raise BackendUnavailableError(f"anyflow.ops.{op}: backend {backend!r} cannot run this call: "
                                          f"{'; '.join(reasons)}")
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
        why = _impl_reasons(impl, name, args, kwargs)
        if not why and fallback and name != "torch":
            key = key or (op, _shapes(args))
            if (name,) + key in _FAILED:
                why = ["failed at run time on these shapes earlier in this process"]
        if not why:
            try:
                return _run(impl, args, kwargs)
            except KernelRuntimeError as exc:
                if not fallback or name == "torch":
                    raise
                _FAILED.add((name,) + key)
                warnings.warn(f"{exc}; falling back to the next backend for these shapes", RuntimeWarning, stacklevel=3)
                why = ["failed at run time"]
        reasons.append(f"{name}: {'; '.join(why)}")
    raise BackendUnavailableError(f"anyflow.ops.{op}: no backend can run this call ({'; '.join(reasons)})")


def report(device_type: str = "cuda") -> list[dict]:
    """One row per (op, backend): whether it is registered and usable here, why not, and what it supports.

    Rows are ``{"op", "backend", "available", "reason", "supports"}``; ``supports`` is
    :meth:`Supports.summary` (``"any call"`` without declared constraints). The ``"auto"`` row's
    ``reason`` is the backend ``"auto"`` picks on ``device_type``.
    """
    rows = []
    for op in sorted(_IMPLS):
        for name in BACKENDS:
            impl = _IMPLS[op].get(name)
            reason = "no implementation registered" if impl is None else backend_reason(name)
            supports = None if impl is None else ("any call" if impl.supports is None else impl.supports.summary())
            rows.append({"op": op, "backend": name, "available": reason is None, "reason": reason,
                         "supports": supports})
        auto_choice = next((name for name in auto_priority(op, device_type)
                            if _IMPLS[op].get(name) is not None and backend_reason(name) is None), None)
        rows.append({"op": op, "backend": "auto", "available": auto_choice is not None, "reason": auto_choice,
                     "supports": None})
    return rows
