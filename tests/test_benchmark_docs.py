"""Every command shown in the benchmarks' docstrings and script headers runs as written (at tiny sizes here).

Commands at real Wan2.1 sizes need a GPU and are skipped with that reason; the CPU-sized ones run in a
subprocess from the repository root with their output folders redirected to a temporary folder.
"""

from __future__ import annotations

import ast
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "benchmarks"

#: command prefix -> why it does not run here (each must match at least one shown command)
SKIPPED = {
    "python -m benchmarks kernels --out benchmarks/results/h200 --model 1.3B": "1.3B shapes: a GPU run",
    "python -m benchmarks nfe --model 1.3B": "1.3B at 480x832x81: a GPU run",
    "python -m benchmarks levers --model 1.3B": "1.3B at 480x832x81: a GPU run",
    "bash benchmarks/device_check.sh OUTDIR": "needs a GPU (exits 1 without one); its HARNESS_SMOKE=1 form runs here",
    "HARNESS_SMOKE=1 bash benchmarks/device_check.sh": "run by tests/test_benchmarks.py::test_device_check_rehearsal_on_cpu",
    "bash benchmarks/pack_wheels.sh": "downloads wheels for the GPU machine; rehearse_gpu_image.sh runs it",
    "bash benchmarks/rehearse_gpu_image.sh": "builds a 5 GB venv of the GPU image's versions (run by hand)",
}


def shown_commands() -> list[str]:
    """Commands in the module docstrings of benchmarks/*.py and the header comments of benchmarks/*.sh."""
    out = []
    for path in sorted(BENCH.glob("*.py")):
        doc = ast.get_docstring(ast.parse(path.read_text())) or ""
        out += [line.strip() for line in doc.splitlines() if re.match(r"\s*(\w+=\S+ )*python -m benchmarks \w", line)]
    for path in sorted(BENCH.glob("*.sh")):
        for line in path.read_text().splitlines():
            m = re.match(r"#\s+((\w+=\S+ )*bash benchmarks/\S+\.sh.*)", line)
            if m:
                out.append(m.group(1).strip())
    return [re.sub(r"\s+#.*$", "", c) for c in out]


def test_every_skip_reason_is_used():
    commands = shown_commands()
    for prefix in SKIPPED:
        assert any(c.startswith(prefix) for c in commands), f"stale skip entry {prefix!r}"


@pytest.mark.parametrize("command", shown_commands())
def test_shown_command_runs(command, tmp_path):
    reason = next((why for prefix, why in SKIPPED.items() if command.startswith(prefix)), None)
    if reason:
        pytest.skip(reason)
    if command.startswith("python -m benchmarks report") and "--results" not in command:
        # the README form: it must leave the README as it is (the committed block is what the results give)
        before = (ROOT / "README.md").read_text()
    else:
        before = None
    def redirect(arg: str) -> str:  # output folders of the examples -> the test's temporary folder
        for shown, here in (("OUTDIR", "out"), ("OUT", "out"), ("/tmp", "tmp"), ("benchmarks/results/h200", "results")):
            if arg == shown or arg.startswith(shown + "/"):
                return str(tmp_path / here) + arg[len(shown):]
        return arg

    argv = [redirect(a) for a in shlex.split(command)]
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1", PYTHON=sys.executable)
    while "=" in argv[0]:  # leading VAR=value assignments
        key, _, value = argv.pop(0).partition("=")
        env[key] = value
    if argv[0] == "python":
        argv[0] = sys.executable
    if command.startswith("python -m benchmarks report --results OUT"):
        (tmp_path / "out").mkdir(exist_ok=True)
    proc = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    if before is not None:
        assert (ROOT / "README.md").read_text() == before
