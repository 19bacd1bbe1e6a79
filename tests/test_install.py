"""Install-time and first-import reporting of the compiled backend ``anyflow._C``: an installation without
it (``pip install .`` under build isolation cannot see torch) says so in one line with the command that
adds it; an installation with it says nothing."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import anyflow
from anyflow import _ext

PACKAGE = Path(anyflow.__file__).resolve().parent
SKIPPED = {"built": False, "skipped": True, "torch_version": None, "cuda_version": None,
           "error": "torch was not importable at build time: ModuleNotFoundError, pip build isolation?",
           "source": str(PACKAGE.parent)}


def _import_stderr(pythonpath: Path | None = None, **env) -> str:
    """stderr of a fresh interpreter that imports anyflow twice (from ``pythonpath`` when given)."""
    environ = {k: v for k, v in os.environ.items() if k != _ext.DISABLE_ENV}
    environ.update(env)
    if pythonpath is not None:
        environ["PYTHONPATH"] = str(pythonpath)
    code = "import anyflow, importlib; importlib.import_module('anyflow._ext'); import anyflow"
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=environ,
                         cwd=pythonpath or PACKAGE.parent, timeout=120)
    assert run.returncode == 0, run.stderr
    return run.stderr


@pytest.fixture
def isolated_install(tmp_path) -> Path:
    """A copy of the two modules ``import anyflow`` runs, with the build record of an isolated build."""
    pkg = tmp_path / "anyflow"
    pkg.mkdir()
    for name in ("__init__.py", "_ext.py"):
        shutil.copy(PACKAGE / name, pkg / name)
    (pkg / "_build_info.py").write_text(f"BUILD_INFO = {SKIPPED!r}\n")
    return tmp_path


def test_import_without_the_extension_says_so_in_one_line(isolated_install):
    err = _import_stderr(isolated_install)
    lines = err.splitlines()
    assert len(lines) == 1, err
    line = lines[0]
    assert "anyflow._C" in line and "pip build isolation" in line
    assert f"pip install --no-build-isolation --no-deps --force-reinstall {PACKAGE.parent}" in line
    assert "ANYFLOW_BUILD_CUDA=1" in line
    assert _import_stderr(isolated_install, ANYFLOW_DISABLE_EXTENSION="1") == ""


def test_notice_cases(monkeypatch):
    monkeypatch.delenv(_ext.DISABLE_ENV, raising=False)
    monkeypatch.setattr(_ext, "_read_build_info", lambda: dict(SKIPPED))
    notice = _ext.absent_notice()
    assert "\n" not in notice and notice.startswith("anyflow: compiled backend anyflow._C not built")
    monkeypatch.setattr(_ext, "_read_build_info", lambda: dict(SKIPPED, source="/nowhere"))
    assert "--force-reinstall <anyflow source folder>" in _ext.absent_notice()
    monkeypatch.setattr(_ext, "_read_build_info", lambda: None)  # a source tree never built
    assert "pure-Python install" in _ext.absent_notice()
    monkeypatch.setattr(_ext, "_read_build_info", lambda: {"built": True, "torch_version": "x", "cuda_version": None})
    monkeypatch.setattr(_ext, "_library_file_present", lambda: True)
    assert _ext.absent_notice() is None
    monkeypatch.setattr(_ext, "_library_file_present", lambda: False)  # recorded as built, library gone
    assert _ext.absent_notice() is not None
    monkeypatch.setenv(_ext.DISABLE_ENV, "1")
    assert _ext.absent_notice() is None


def test_env_shows_the_notice(monkeypatch):
    from anyflow import env

    monkeypatch.delenv(_ext.DISABLE_ENV, raising=False)
    monkeypatch.setattr(_ext, "_read_build_info", lambda: dict(SKIPPED))
    _ext.extension_status.cache_clear()
    try:
        info = env.collect()
    finally:
        _ext.extension_status.cache_clear()
    report = env.format_report(info)
    assert "anyflow._C was not built at install time" in report
    assert _ext.absent_notice() in report


def test_built_install_is_quiet():
    if _ext.absent_notice() is not None:
        pytest.skip(f"anyflow._C is not built in this environment: {_ext.absent_notice()}")
    assert _import_stderr() == ""
