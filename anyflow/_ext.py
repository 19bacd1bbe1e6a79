"""Lazy, guarded loading of the compiled extension ``anyflow._C``.

``import anyflow`` never loads the shared library; the first call to :func:`extension_status` does.
Before importing it, the torch/CUDA versions recorded at build time (``anyflow/_build_info.py``,
written by ``setup.py``) are compared with the running torch, because a library built against another
torch fails with undefined symbols or worse, instead of a clean ``ImportError``.
"""

from __future__ import annotations

import functools
import importlib
import importlib.machinery
import importlib.util
import os
from types import ModuleType
from typing import Optional

EXTENSION = "anyflow._C"
DISABLE_ENV = "ANYFLOW_DISABLE_EXTENSION"


def _read_build_info() -> Optional[dict]:
    """The build record written by setup.py, or ``None`` when there is none (pure-Python install)."""
    try:
        from ._build_info import BUILD_INFO
    except ImportError:
        return None
    return dict(BUILD_INFO)


def _extension_present() -> bool:
    """Whether a compiled ``anyflow._C`` file exists, found without loading it."""
    return importlib.util.find_spec(EXTENSION) is not None


def _library_file_present() -> bool:
    """Whether the ``_C`` shared library sits in the package folder (no import machinery involved)."""
    folder = os.path.dirname(os.path.abspath(__file__))
    return any(os.path.isfile(os.path.join(folder, "_C" + suffix)) for suffix in importlib.machinery.EXTENSION_SUFFIXES)


def _runtime_versions() -> tuple[str, Optional[str]]:
    import torch

    return torch.__version__, torch.version.cuda


def _release(version: str) -> str:
    """``"2.13.0+cu130"`` -> ``"2.13.0"``: the local label only names the build, which CUDA compares."""
    return version.split("+", 1)[0]


def _cuda_label(cuda: Optional[str]) -> str:
    return f"CUDA {cuda}" if cuda else "CPU"


def compatibility_reason(build_info: dict, torch_version: str, cuda_version: Optional[str]) -> Optional[str]:
    """Why a build recorded as ``build_info`` cannot be loaded into this torch (``None`` if it can).

    The torch release (e.g. ``2.13.0``, pre/dev tags included) must be equal, and so must the CUDA
    version: ``None`` (a CPU-only extension) on both sides, or the same CUDA version. The local version
    label (``+cpu``, ``+cu130``) is otherwise ignored, since it only repeats the CUDA flavour.

    Args:
        build_info: the ``BUILD_INFO`` dict (``torch_version``, ``cuda_version``).
        torch_version: the running ``torch.__version__``.
        cuda_version: the running ``torch.version.cuda`` (``None`` for a CPU torch).
    """
    built_torch = str(build_info.get("torch_version"))
    built_cuda = build_info.get("cuda_version")
    if _release(built_torch) != _release(torch_version):
        return f"{EXTENSION} was built for torch {built_torch} but torch {torch_version} is running; rebuild it"
    if built_cuda and built_cuda != cuda_version:
        return (
            f"{EXTENSION} was built for torch {built_torch} with CUDA {built_cuda} but torch {torch_version} "
            f"({_cuda_label(cuda_version)}) is running; rebuild it"
        )
    if not built_cuda and cuda_version:
        return (
            f"{EXTENSION} is a CPU-only build (torch {built_torch}) but torch {torch_version} with CUDA "
            f"{cuda_version} is running; rebuild it with ANYFLOW_BUILD_CUDA=1 for the cuda backend"
        )
    return None


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0] if lines else ''}".rstrip(": ")


@functools.lru_cache(maxsize=None)
def extension_status() -> tuple[Optional[ModuleType], Optional[str]]:
    """Load ``anyflow._C`` once and report the outcome; never raises.

    Returns:
        ``(module, None)`` when the extension is loaded (its ``anyflow::`` ops are then registered in
        ``torch.ops.anyflow``), else ``(None, reason)`` with a one-line reason. The result is cached;
        ``extension_status.cache_clear()`` forgets it (tests).
    """
    try:
        if os.environ.get(DISABLE_ENV, "") not in ("", "0"):
            return None, f"disabled by {DISABLE_ENV}"
        info = _read_build_info()
        if info is not None and not info.get("built", False):
            error = info.get("error")
            what = "was not built" if info.get("skipped") else "failed to build"
            return None, f"{EXTENSION} {what} at install time" + (f" ({error})" if error else "")
        if info is None or not _extension_present():
            return None, f"{EXTENSION} not built (pure-Python install)"
        reason = compatibility_reason(info, *_runtime_versions())
        if reason is not None:
            return None, reason
        return importlib.import_module(EXTENSION), None
    except Exception as exc:  # an unloadable library must degrade to the other backends, not crash
        return None, f"cannot load {EXTENSION}: {_first_line(exc)}"


def _build_command(info: Optional[dict]) -> str:
    source = (info or {}).get("source")
    target = source if source and os.path.isfile(os.path.join(source, "setup.py")) else "<anyflow source folder>"
    return f"pip install --no-build-isolation --no-deps --force-reinstall {target}"


def absent_notice() -> Optional[str]:
    """One line saying that ``anyflow._C`` is absent and the one command that adds it, or ``None``.

    ``None`` when the extension was built (whether or not it later loads: :func:`extension_status` says
    that) or is switched off with ``ANYFLOW_DISABLE_EXTENSION``. Decided from the build record and the
    presence of the library file only, so it is cheap enough for ``import anyflow`` and loads nothing.
    """
    if os.environ.get(DISABLE_ENV, "") not in ("", "0"):
        return None
    info = _read_build_info()
    if info is not None and info.get("built", False) and _library_file_present():
        return None
    why = (info or {}).get("error") or "pure-Python install"
    return (f"anyflow: compiled backend {EXTENSION} not built ({why}); add it with: {_build_command(info)} "
            f"(CUDA kernels: ANYFLOW_BUILD_CUDA=1; silence: {DISABLE_ENV}=1)")


def build_info() -> Optional[dict]:
    """What ``anyflow._C`` was built against, as recorded at install time (``None`` if never built)."""
    return _read_build_info()
