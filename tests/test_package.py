"""Packaging checks: cheap ``import anyflow``, guarded loading of ``anyflow._C``, and ``anyflow env``."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import anyflow
from anyflow import _ext

REPO = Path(__file__).resolve().parents[1]


def _run_python(code: str, **env) -> subprocess.CompletedProcess:
    full_env = {k: v for k, v in os.environ.items() if k != _ext.DISABLE_ENV}
    full_env.update(env)
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], cwd=REPO, env=full_env, capture_output=True, text=True, timeout=120
    )


@pytest.fixture
def fresh_status():
    """Forget the cached extension status before and after the test (the test patches its inputs)."""
    _ext.extension_status.cache_clear()
    yield _ext
    _ext.extension_status.cache_clear()


def test_import_is_cheap_without_optional_dependencies():
    result = _run_python(
        """
        import importlib.abc, sys
        import torch  # anyflow needs torch; import it before blocking so torch's own probes are unaffected

        BLOCKED = ("diffusers", "transformers", "triton", "anyflow._C")

        class Blocker(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if any(name == b or name.startswith(b + ".") for b in BLOCKED):
                    raise ImportError(f"{name} is blocked by the test")
                return None

        sys.meta_path.insert(0, Blocker())
        import anyflow

        assert isinstance(anyflow.__version__, str) and anyflow.__version__, anyflow.__version__
        assert not torch.cuda.is_initialized(), "import anyflow initialised CUDA"
        loaded = [m for m in ("diffusers", "transformers", "triton", "anyflow._C", "anyflow.kernels") if m in sys.modules]
        assert not loaded, f"import anyflow imported {loaded}"
        print("ok")
        """
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


def test_extension_status_never_raises(fresh_status):
    module, reason = fresh_status.extension_status()
    assert (module is None) != (reason is None)
    assert reason is None or (isinstance(reason, str) and "\n" not in reason)
    assert fresh_status.extension_status() == (module, reason), "status must be cached"


def test_disable_env_var_is_reported():
    result = _run_python(
        "from anyflow import _ext; print(_ext.extension_status()[1])", ANYFLOW_DISABLE_EXTENSION="1"
    )
    assert result.returncode == 0, result.stderr
    assert "disabled by ANYFLOW_DISABLE_EXTENSION" in result.stdout


def test_build_info_op_matches_running_torch(fresh_status):
    module, reason = fresh_status.extension_status()
    if module is None:
        pytest.skip(f"anyflow._C not available: {reason}")
    expected = {"torch": torch.__version__, "cuda": torch.version.cuda or "cpu"}
    assert module.build_info() == expected
    assert torch.ops.anyflow.build_info() == f"torch={expected['torch']};cuda={expected['cuda']}"


def test_env_report_lists_versions_and_backends():
    from anyflow import env
    from anyflow.ops import registry

    report = env.format_report()
    assert "torch" in report
    assert "anyflow._C" in report
    for backend in registry.BACKENDS:
        assert backend in report
    info = env.collect()
    assert info["packages"]["torch"] == torch.__version__
    assert info["backends"]["error"] is None, info["backends"]["error"]


def test_version_mismatch_is_refused_before_loading(fresh_status, monkeypatch):
    monkeypatch.setattr(fresh_status, "_extension_present", lambda: True)
    monkeypatch.setattr(
        fresh_status, "_read_build_info", lambda: {"built": True, "torch_version": "1.0.0+cpu", "cuda_version": None}
    )
    monkeypatch.setattr(fresh_status.importlib, "import_module", pytest.fail)  # must not load the library
    module, reason = fresh_status.extension_status()
    assert module is None
    assert "built for torch 1.0.0+cpu" in reason and f"torch {torch.__version__} is running" in reason


def test_failed_and_missing_builds_are_reported(fresh_status, monkeypatch):
    monkeypatch.setattr(fresh_status, "_read_build_info", lambda: None)
    assert fresh_status.extension_status() == (None, "anyflow._C not built (pure-Python install)")

    fresh_status.extension_status.cache_clear()
    monkeypatch.setattr(
        fresh_status, "_read_build_info", lambda: {"built": False, "torch_version": torch.__version__, "error": "boom"}
    )
    assert "failed to build at install time (boom)" in fresh_status.extension_status()[1]


@pytest.mark.parametrize(
    "built, running, problem",
    [
        (("2.13.0+cpu", None), ("2.13.0", None), None),
        (("2.11.0+cu130", "13.0"), ("2.11.0+cu130", "13.0"), None),
        (("2.11.0+cu130", "13.0"), ("2.12.0+cu130", "13.0"), "built for torch 2.11.0+cu130"),
        (("2.11.0+cu126", "12.6"), ("2.11.0+cu130", "13.0"), "with CUDA 12.6"),
        (("2.11.0+cu130", "13.0"), ("2.11.0+cpu", None), "(CPU) is running"),
        (("2.11.0+cpu", None), ("2.11.0+cu130", "13.0"), "CPU-only build"),
    ],
)
def test_compatibility_reason(built, running, problem):
    reason = _ext.compatibility_reason({"torch_version": built[0], "cuda_version": built[1]}, *running)
    if problem is None:
        assert reason is None
    else:
        assert reason is not None and problem in reason


def test_production_code_does_not_import_testing():
    """``anyflow.testing`` is for tests and benchmarks: no module of the package proper imports it."""
    import ast

    root = Path(anyflow.__file__).parent
    offenders = []
    for path in root.rglob("*.py"):
        if path.relative_to(root).parts[0] == "testing":
            continue
        package = ".".join(("anyflow",) + path.relative_to(root).parent.parts)
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                name = ".".join(filter(None, (base, node.module))) if node.level else node.module
                names = [name] + [f"{name}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                continue
            if any(n == "anyflow.testing" or n.startswith("anyflow.testing.") for n in names):
                offenders.append(f"{path.relative_to(root)}:{node.lineno}")
    assert not offenders, offenders
