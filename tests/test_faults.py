"""Faults, with real processes: a killed training run resumes bit-exact; an interrupted generate leaves no output.

The killed processes run ``anyflow.cli.main`` through a small driver that delivers the signal to itself at
a chosen point (a step in progress, the middle of a checkpoint write, after the rename), so every point
is hit on every run instead of by timing. Nothing here asserts a time.
"""

import os
import signal
import subprocess
import sys
import textwrap

import pytest
import torch

from anyflow.cli import main
from anyflow.training import checkpoint as ckpt

DRIVER = textwrap.dedent('''
    import contextlib, io, os, signal, sys, time
    point, sig = sys.argv[1], getattr(signal, sys.argv[2])
    argv = sys.argv[3:]
    import torch
    torch.set_num_threads(int(os.environ["PARENT_THREADS"]))  # bit-exact resume compares with the parent's run

    def die():
        os.kill(os.getpid(), sig)
        time.sleep(60)  # SIGINT: the KeyboardInterrupt is raised in here

    if point.startswith("train-"):
        import torch
        from anyflow.training import checkpoint, trainer
        kind, step = point.split("-")[1], int(point.split("-")[2])
        if kind == "write":  # half of the checkpoint's bytes are on disk
            save = torch.save
            def partial(obj, f):
                if checkpoint.Path(f).name.startswith(".checkpoint-%07d" % step):
                    buf = io.BytesIO(); save(obj, buf)
                    with open(f, "wb") as fh:
                        fh.write(buf.getvalue()[: len(buf.getvalue()) // 2]); fh.flush(); os.fsync(fh.fileno())
                    die()
                return save(obj, f)
            checkpoint.torch.save = partial
        elif kind == "renamed":  # the checkpoint is in place, the folder not yet fsynced
            fsync = checkpoint._fsync_dir
            def _fsync_dir(path):
                if any(path.glob("checkpoint-%07d.pt" % step)):
                    die()
                fsync(path)
            checkpoint._fsync_dir = _fsync_dir
    elif point == "gen-load":
        from anyflow.models import loading
        loading.load_pipeline = lambda *a, **k: die()
    elif point == "gen-sample":  # in the second flow-map Euler step of the sampler
        from anyflow.ops import registry
        dispatch, steps = registry.dispatch, []
        def counting(op, *a, **k):
            if op == "euler_shortcut":
                steps.append(1)
                if len(steps) == 2:
                    die()
            return dispatch(op, *a, **k)
        registry.dispatch = counting
    elif point == "gen-write":  # the encoder has written the temporary file; cut it in half, then the signal
        from anyflow import io as aio
        real = aio.atomic_output
        @contextlib.contextmanager
        def atomic_output(path, suffix=None):
            with real(path, suffix) as tmp:
                yield tmp
                data = open(tmp, "rb").read()
                open(tmp, "wb").write(data[: len(data) // 2])
                die()
        aio.atomic_output = atomic_output
    from anyflow.cli import main
    sys.exit(main(argv))
''')

CONFIG = "preset: tiny\nbatch_size: 1\ntotal_iter: 4\nsave_every: 1\nlog_every: 0\n"


def _drive(tmp_path, point, sig, argv):
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    env = {**os.environ, "PARENT_THREADS": str(torch.get_num_threads())}
    return subprocess.run([sys.executable, str(driver), point, sig, *argv], capture_output=True, text=True,
                          timeout=300, cwd=tmp_path, env=env)


def _assert_same(a, b, where="checkpoint"):
    """Bitwise equality of two checkpoint trees (tensors with torch.equal)."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            _assert_same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


def test_training_killed_anywhere_resumes_bit_exact(tmp_path):
    cfg = tmp_path / "run.yaml"
    cfg.write_text(CONFIG)
    ref, run = tmp_path / "ref", tmp_path / "run"
    assert main(["train", str(cfg), "--output-dir", str(ref)]) == 0
    argv = ["train", str(cfg), "--output-dir", str(run)]

    # killed halfway through writing checkpoint 2: checkpoint 1 is the newest complete one
    proc = _drive(tmp_path, "train-write-2", "SIGKILL", argv)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert ckpt.latest_checkpoint(run).name == "checkpoint-0000001.pt"
    assert list(run.glob(".checkpoint-0000002.*.tmp")), "the partial write should be on disk"

    # killed after checkpoint 3 was renamed into place (before the folder fsync): it is complete
    # (a kill inside a step, before its checkpoint, is the same case as a kill before the write)
    proc = _drive(tmp_path, "train-renamed-3", "SIGKILL", argv)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert "resumed from" in proc.stdout and "checkpoint-0000001.pt" in proc.stdout
    assert not list(run.glob(".checkpoint-*.tmp"))  # the resume removed the partial file
    assert ckpt.latest_checkpoint(run).name == "checkpoint-0000003.pt"

    # a partial file under a final name (e.g. a copy cut short) is passed over, never loaded
    (run / "checkpoint-0000004.pt").write_bytes((run / "checkpoint-0000003.pt").read_bytes()[:1000])
    with pytest.warns(RuntimeWarning, match="checkpoint-0000004.pt: incomplete checkpoint"):
        assert main(argv) == 0
    final = ckpt.latest_checkpoint(run)
    assert final.name == "checkpoint-0000004.pt" and ckpt.is_complete(final)
    got, want = ckpt.load(final), ckpt.load(ref / "checkpoint-0000004.pt")
    for state in (got, want):  # process-global RNGs that training never seeds nor draws from differ per process
        state["rng"].pop("python"), state["rng"].pop("numpy", None)
    _assert_same(got, want)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    from anyflow.models.tiny import save_tiny_checkpoint

    return save_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "model", kind="far")


@pytest.mark.parametrize("point,sig", [("gen-sample", "SIGINT"), ("gen-write", "SIGINT"), ("gen-write", "SIGKILL")])
def test_interrupted_generate_leaves_no_output(tiny_model, tmp_path, point, sig):
    out = tmp_path / "out.mp4"
    old = tmp_path / "old.mp4"
    argv = ["generate", "--model", str(tiny_model), "--prompt", "a cat", "--steps", "2", "--threads", "1",
            "--height", "32", "--width", "32"]
    proc = _drive(tmp_path, point, sig, argv + ["--out", str(out)])
    assert not out.exists()
    if sig == "SIGINT":
        assert proc.returncode == 130 and "interrupted" in proc.stderr, proc.stderr
        assert sorted(p.name for p in tmp_path.iterdir()) == ["driver.py"]  # no temporary file either
    else:
        assert proc.returncode == -signal.SIGKILL, proc.stderr
        # a process killed outright cannot clean up: at most its hidden temporary file remains
        assert all(p.name == "driver.py" or p.name.startswith(".out.") for p in tmp_path.iterdir())
    if point == "gen-write":  # an existing output is left exactly as it was
        old.write_bytes(b"previous video")
        _drive(tmp_path, point, sig, argv + ["--out", str(old)])
        assert old.read_bytes() == b"previous video"
