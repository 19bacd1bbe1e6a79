"""The kernel limits Python checks (``anyflow.kernels.limits``) are the ones the CUDA sources are built to."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from anyflow.kernels import limits

CSRC = Path(__file__).resolve().parent.parent / "csrc" / "kernels"


def _define(name: str, header: str) -> int:
    m = re.search(rf"#define\s+{name}\s+(\d+)", (CSRC / header).read_text())
    assert m, f"{name} not defined in csrc/kernels/{header}"
    return int(m.group(1))


def _constexpr(name: str, source: str) -> int:
    m = re.search(rf"constexpr\s+int\s+{name}\s*=\s*(\d+)\s*;", (CSRC / source).read_text())
    assert m, f"constexpr int {name} not found in csrc/kernels/{source}"
    return int(m.group(1))


@pytest.mark.parametrize("python_name,macro,header", [
    ("MAX_SEGMENTS", "ANYFLOW_MAX_SEGMENTS", "segments.h"),
    ("MAX_SEGMENTS", "ANYFLOW_ATTN_MAX_SEGMENTS", "attention.h"),
    ("MAX_HEAD_DIM", "ANYFLOW_ATTN_MAX_HEAD_DIM", "attention.h"),
    ("MAX_GROUPS", "ANYFLOW_ATTN_MAX_GROUPS", "attention.h"),
    ("MAX_RANGES", "ANYFLOW_ATTN_MAX_RANGES", "attention.h"),
])
def test_macros_match(python_name, macro, header):
    assert getattr(limits, python_name) == _define(macro, header)


def test_grid_limit_matches():
    m = re.search(r"a->batch \* a->heads > (\d+)", (CSRC / "attention.h").read_text())
    assert m and int(m.group(1)) == limits.MAX_BATCH_HEADS


@pytest.mark.parametrize("source", ["conditioning.cu", "rope.cu"])
def test_row_kernel_capacity_matches(source):
    assert limits.ROW_CHUNKS_PER_THREAD == _constexpr("kChunks", source)
    assert limits.ROW_MAX_THREADS == _constexpr("kMaxThreads", source)
    assert limits.MAX_ROW_CHUNKS == limits.ROW_CHUNKS_PER_THREAD * limits.ROW_MAX_THREADS


def test_one_home():
    """No module restates a limit as a literal: every other definition is an import of this module."""
    root = Path(__file__).resolve().parent.parent / "anyflow"
    names = [n for n in vars(limits) if n.isupper()]
    offenders = []
    for path in root.rglob("*.py"):
        if path.name == "limits.py":
            continue
        for n in names:
            if re.search(rf"^\s*{n}\s*=", path.read_text(), re.M):
                offenders.append(f"{path.relative_to(root)}: {n}")
    assert offenders == []


def test_imports_without_triton_or_torch():
    import subprocess
    import sys

    code = ("import sys; sys.modules['triton'] = None; sys.modules['torch'] = None; "
            "import importlib.util as u; spec = u.spec_from_file_location('limits', %r); "
            "m = u.module_from_spec(spec); spec.loader.exec_module(m); print(m.MAX_SEGMENTS)" % str(Path(limits.__file__)))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == "4", out.stderr
