"""``torchrun --nproc_per_node 2 -m anyflow generate --context-parallel 2`` on CPU (gloo) against one process.

Each launch runs ``python -m torch.distributed.run`` (= ``torchrun``) with per-rank log files (``--redirects 3``),
so the test sees what each rank printed. The output is a ``--grid`` PNG frame strip (lossless) of the tiny
checkpoints; the 2-rank strip must match the one-process strip to 1/255 per value (the fp32 outputs agree to
~1e-7 relative, so a uint8 rounding may flip on a few values; asserted: at most 1 level on under 0.1% of the
values; measured in four runs: identical, once 2 of 153,660 FAR values 1 level apart).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("diffusers")

import torch.distributed as dist  # noqa: E402

from anyflow.cli import main  # noqa: E402
from anyflow.testing.gloo import free_port  # noqa: E402

HANG_GUARD_S = 300  # a stuck launch fails the test instead of blocking the suite; not a timing assertion
PROMPT = "a red panda eating bamboo"


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """The tiny FAR and bidirectional checkpoints, and a bidirectional one with 3 heads (not divisible by 2)."""
    from anyflow.models.tiny import tiny_pipeline

    root = tmp_path_factory.mktemp("models")
    assert main(["make-tiny", str(root / "far")]) == 0
    assert main(["make-tiny", str(root / "bidir"), "--kind", "bidirectional"]) == 0
    tiny_pipeline("bidirectional", seed=3, num_attention_heads=3).save_pretrained(root / "heads3")
    return root


def _args(model, out, *extra):
    return ["generate", "--model", str(model), "--prompt", PROMPT, "--grid", "1,2", "--device", "cpu",
            "--out", str(out), *extra]


def _torchrun(tmp_path, argv, nproc=2):
    """Launch ``anyflow`` on ``nproc`` CPU processes; returns the torchrun result and each rank's (stdout, stderr)."""
    logs = tmp_path / "logs"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_addr",
           "127.0.0.1", "--master_port", str(free_port()), "--log-dir", str(logs), "--redirects", "3",
           "-m", "anyflow", *argv]
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=HANG_GUARD_S)
    ranks = []
    for r in range(nproc):
        (folder,) = logs.glob(f"*/attempt_0/{r}")
        ranks.append(((folder / "stdout.log").read_text(), (folder / "stderr.log").read_text()))
    return run, ranks


def _png(path):
    from PIL import Image

    return np.asarray(Image.open(path)).astype(np.int16)


def _compare(one, two):
    """Max abs difference (uint8 levels) and the fraction of values that differ."""
    assert one.shape == two.shape
    diff = np.abs(one - two)
    print(f"max |diff| {diff.max()} levels, {np.count_nonzero(diff)} of {diff.size} values differ")
    return int(diff.max()), np.count_nonzero(diff) / diff.size


@pytest.mark.parametrize("kind, extra", [
    # 48 x 48 px -> 3 x 3 tokens per latent frame, 3 latent frames: 27 tokens split 14 / 13 across the ranks
    ("bidir", ["--height", "48", "--width", "48", "--num-frames", "9"]),
    # I2V: the image is chunk 0, four chunks of one latent frame generated, with KV-cache steps between them
    ("far", ["--height", "64", "--width", "64", "--chunk-partition", "1,1,1,1,1", "--num-frames", "17", "--image"]),
])
def test_two_ranks_match_one_process(models, tmp_path, kind, extra, capsys):
    if extra[-1] == "--image":
        from PIL import Image

        rng = np.random.default_rng()
        Image.fromarray(rng.integers(0, 256, (80, 96, 3), dtype=np.uint8)).save(tmp_path / "first.png")
        extra = [*extra, str(tmp_path / "first.png")]
    seed = str(np.random.default_rng().integers(0, 2**31))
    one, two = tmp_path / "one" / "strip.png", tmp_path / "two" / "strip.png"
    one.parent.mkdir()
    two.parent.mkdir()

    assert main(_args(models / kind, one, "--seed", seed, "--threads", "1", *extra)) == 0
    single = capsys.readouterr().out.splitlines()
    run, ranks = _torchrun(tmp_path, _args(models / kind, two, "--seed", seed, "--context-parallel", "2", *extra))
    assert run.returncode == 0, run.stderr[-3000:] + "".join(f"\n[rank {r}] {e[-2000:]}" for r, (_, e) in enumerate(ranks))

    # rank 0 says the engine runs split (read back from the enabled model), then prints what one process prints
    # (timings aside); rank 1 prints nothing, not even progress bars
    head, *lines = ranks[0][0].splitlines()
    assert head == "context parallel: 2 processes (gloo), 1 of 2 attention heads each"  # tiny models: 2 heads
    stats = [re.sub(r"[0-9.]+ s\b", "X s", line.replace(str(two), "OUT")) for line in lines]
    assert stats == [re.sub(r"[0-9.]+ s\b", "X s", line.replace(str(one), "OUT")) for line in single]
    assert len(stats) == 3 and stats[-1] == "done: 2 samples from one noise -> OUT", stats
    assert "it/s" in ranks[0][1]  # the progress bar is shown, by rank 0
    assert ranks[1] == ("", ""), ranks[1]
    assert [p.name for p in two.parent.iterdir()] == ["strip.png"]  # no partial or second file

    a, b = _png(one), _png(two)
    assert a.std() > 10  # a real picture, not a blank strip
    worst, frac = _compare(a, b)
    assert worst <= 1 and frac < 1e-3, (worst, frac)


def _ranks_without_agent(argv, nproc=2):
    """Start ``nproc`` ranks of ``python -m anyflow`` with the environment torchrun gives its children, but with no
    elastic agent: torchrun terminates the other ranks (SIGTERM) as soon as one exits non-zero, so whether a slower
    rank exits by itself could not be observed. Returns each rank's (returncode, stdout, stderr); a rank stuck in a
    collective fails the test through the hang guard."""
    port = str(free_port())
    procs = []
    for rank in range(nproc):
        env = dict(os.environ, OMP_NUM_THREADS="1", RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(nproc),
                   LOCAL_WORLD_SIZE=str(nproc), MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
        procs.append(subprocess.Popen([sys.executable, "-m", "anyflow", *argv], env=env, text=True,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE))
    results = []
    try:
        for proc in procs:
            out, err = proc.communicate(timeout=HANG_GUARD_S)
            results.append((proc.returncode, out, err))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    return results


def test_heads_not_divisible_fails_cleanly_on_every_rank(models, tmp_path):
    ranks = _ranks_without_agent(_args(models / "heads3", tmp_path / "x.png", "--context-parallel", "2",
                                       "--height", "32", "--width", "32", "--num-frames", "5"))
    # every rank finds the bad degree itself, before any collective, and exits with status 2 (a rank waiting in a
    # collective for a peer that left would hang until the guard)
    assert [code for code, _, _ in ranks] == [2, 2], ranks
    for _, out, err in ranks:
        errors = [line for line in err.splitlines() if line.startswith("error:")]
        assert errors == ["error: --context-parallel 2: AnyFlowTransformer3DModel has 3 attention heads, not "
                          "divisible by ulysses_degree=2: Ulysses gives each rank heads/ulysses_degree heads; use a "
                          "degree that divides 3"], err
        assert "Traceback" not in err and out == ""
    assert not (tmp_path / "x.png").exists()


TORCHRUN_ENV = {"RANK": "0", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1"}


@pytest.mark.parametrize("env, option, message", [
    ({}, "2", "error: --context-parallel 2 needs 2 processes started by torchrun (RANK, WORLD_SIZE, LOCAL_RANK, "
              "MASTER_ADDR unset): launch torchrun --nproc_per_node 2 -m anyflow generate --context-parallel 2 ..."),
    (dict(TORCHRUN_ENV, WORLD_SIZE="4"), "2", "error: --context-parallel 2 must equal the number of processes, "
     "WORLD_SIZE=4: launch torchrun --nproc_per_node 2 -m anyflow generate --context-parallel 2 ... or pass "
     "--context-parallel 4"),
    (dict(TORCHRUN_ENV, WORLD_SIZE="2"), "1", "error: this is one of WORLD_SIZE=2 processes but --context-parallel "
     "is 1: pass --context-parallel 2 to split the model across them, or run one process"),
    ({}, "0", "error: --context-parallel must be >= 1, got 0"),
])
def test_bad_launch_is_one_line_and_rc_2(models, tmp_path, monkeypatch, capsys, env, option, message):
    """Checked in this process before any collective: a rendezvous with the (unreachable) MASTER_PORT 1 or with
    four absent peers would fail or hang instead of returning."""
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    out = tmp_path / "x.png"
    assert main(_args(models / "bidir", out, "--context-parallel", option)) == 2
    captured = capsys.readouterr()
    assert captured.err.splitlines() == [message] and captured.out == ""
    assert not (dist.is_available() and dist.is_initialized())
    assert not out.exists()
