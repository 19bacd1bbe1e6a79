"""anyflow.cli: make-tiny + generate end to end on CPU, and the error contract (``error: ...``, exit 2).

``generate`` calls ``anyflow.enable``; these tests exercise the real one.
"""

import re
import subprocess
import sys

import pytest

from anyflow.cli import main
from anyflow.io import read_video

DONE = re.compile(r"^done: (\d+) NFE(?: \(\+(\d+) cache steps\))?, [0-9.]+ s/NFE, total [0-9.]+ s -> (.+)$")


@pytest.fixture(scope="module")
def tiny_far(tmp_path_factory):
    folder = tmp_path_factory.mktemp("models") / "tiny-anyflow-far"
    assert main(["make-tiny", str(folder)]) == 0
    return folder


@pytest.fixture(scope="module")
def tiny_bidir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("models") / "tiny-anyflow-bidir"
    assert main(["make-tiny", str(folder), "--kind", "bidirectional", "--layout", "legacy"]) == 0
    return folder


def _generate(model, out, *extra):
    return ["generate", "--model", str(model), "--prompt", "a red panda eating bamboo", "--steps", "2",
            "--height", "64", "--width", "64", "--out", str(out), *extra]


def _done_line(capsys):
    lines = capsys.readouterr().out.strip().splitlines()
    match = DONE.match(lines[-1])
    assert match, lines[-1]
    return int(match.group(1)), int(match.group(2) or 0), match.group(3)


def test_make_tiny_then_generate_far(tiny_far, tmp_path, capsys):
    out = tmp_path / "out.mp4"
    assert main(_generate(tiny_far, out)) == 0
    nfe, cache_steps, path = _done_line(capsys)
    # tiny checkpoint: chunk partition 1,1,2,2 -> 4 chunks x 2 steps, a cache step after each but the last
    assert (nfe, cache_steps, path) == (8, 3, str(out))
    video = read_video(out, 64, 64)
    assert video.shape == (1, 21, 3, 64, 64)
    assert [p.name for p in tmp_path.iterdir()] == ["out.mp4"]


def test_generate_i2v_far_with_real_image(tiny_far, tmp_path, capsys, eval_data):
    out = tmp_path / "i2v.mp4"
    args = _generate(tiny_far, out, "--image", str(eval_data / "images" / "1.jpg"), "--chunk-partition", "1,2",
                     "--num-frames", "9")
    assert main(args) == 0
    nfe, cache_steps, _ = _done_line(capsys)
    assert (nfe, cache_steps) == (2, 1)  # the first chunk is the image context
    assert read_video(out, 64, 64).shape == (1, 9, 3, 64, 64)


def test_generate_bidirectional_legacy(tiny_bidir, tmp_path, capsys):
    out = tmp_path / "b.mkv"
    # the speed levers are accepted everywhere (CUDA graphs run eagerly off CUDA)
    assert main(_generate(tiny_bidir, out, "--num-frames", "5", "--fps", "8", "--attention", "tuned", "--cuda-graphs")) == 0
    nfe, cache_steps, _ = _done_line(capsys)
    assert (nfe, cache_steps) == (2, 0)
    assert read_video(out, 64, 64).shape == (1, 5, 3, 64, 64)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"--steps": "0"}, "--steps must be >= 1"),
        ({"--prompt": "   "}, "--prompt must not be empty"),
        ({"--height": "50"}, "--height must be a positive multiple of 16"),
        ({"--width": "0"}, "--width must be a positive multiple of 16"),
        ({"--num-frames": "10"}, "--num-frames must be 4k+1"),
        ({"--image": "no/such/image.jpg"}, "no/such/image.jpg: no such file"),
        ({"--video": "no/such/clip.mp4"}, "no/such/clip.mp4: no such file"),
        ({"--model": "no/such/model"}, "no/such/model: no such folder"),
        ({"--out": "out.gif"}, "suffix must be one of"),
        ({"--out": "no/such/dir/out.mp4"}, "does not exist"),
        ({"--num-frames": "9"}, "pass --num-frames 21"),
        ({"--chunk-partition": "1,2", "--num-frames": "21"}, "sums to 6"),
        ({"--chunk-partition": "1,x"}, "comma-separated positive integers"),
    ],
)
def test_bad_arguments_exit_2(tiny_far, tmp_path, capsys, change, message):
    args = _generate(tiny_far, tmp_path / "out.mp4")
    for key, value in change.items():
        if key in args:
            args[args.index(key) + 1] = value
        else:
            args += [key, value]
    try:
        code = main(args)
    except SystemExit as exc:  # argparse-level errors
        code = exc.code
    err = capsys.readouterr().err
    assert code == 2
    assert "error: " in err and message in err
    assert "Traceback" not in err
    assert list(tmp_path.iterdir()) == []


def test_image_and_video_together_exit_2(tiny_far, tmp_path, capsys):
    image = tmp_path / "a.jpg"
    image.write_bytes(b"x")
    with pytest.raises(SystemExit) as info:
        main(_generate(tiny_far, tmp_path / "out.mp4", "--image", str(image), "--video", str(image)))
    assert info.value.code == 2
    assert "error: argument --video: not allowed with argument --image" in capsys.readouterr().err


def test_undecodable_image_exit_2(tiny_far, tmp_path, capsys):
    fake = tmp_path / "fake.jpg"
    fake.write_text("not an image")
    assert main(_generate(tiny_far, tmp_path / "out.mp4", "--image", str(fake))) == 2
    assert "cannot decode as an image" in capsys.readouterr().err


def test_broken_checkpoint_exit_2(tmp_path, capsys):
    (tmp_path / "empty-model").mkdir()
    assert main(_generate(tmp_path / "empty-model", tmp_path / "out.mp4")) == 2
    assert "model_index.json" in capsys.readouterr().err


def test_missing_enable_is_an_error(tiny_far, tmp_path, capsys, monkeypatch):
    import anyflow

    def unavailable(pipe, backend="auto", **levers):
        raise ImportError("no module named anyflow.integration")

    monkeypatch.setattr(anyflow, "enable", unavailable)
    assert main(_generate(tiny_far, tmp_path / "out.mp4")) == 1
    assert "error: anyflow.enable is unavailable" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_backend_that_cannot_run_exit_2(tiny_far, tmp_path, capsys, monkeypatch):
    from anyflow.ops import registry

    registry.warm_up()
    monkeypatch.setitem(registry._REASONS, "cuda", "anyflow._C not built (pure-Python install)")
    assert main(_generate(tiny_far, tmp_path / "out.mp4", "--backend", "cuda")) == 2
    err = capsys.readouterr().err
    assert "error: --backend cuda:" in err and "Traceback" not in err
    assert list(tmp_path.iterdir()) == []


def test_make_tiny_refuses_non_empty_folder(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    assert main(["make-tiny", str(tmp_path)]) == 2
    assert "not empty" in capsys.readouterr().err


def test_env_prints_a_report(capsys):
    assert main(["env"]) == 0
    out = capsys.readouterr().out
    # one line each for the SDPA policy and whether the samplers can capture CUDA graphs here (with the reason)
    sdpa = next(line for line in out.splitlines() if line.startswith("sdpa "))
    assert " policy " in sdpa and "kernels: " in sdpa
    graphs = next(line for line in out.splitlines() if line.startswith("cuda graphs"))
    import torch

    if not torch.cuda.is_available():
        assert "eager: CUDA graphs need a CUDA device" in graphs


def test_python_dash_m_help():
    out = subprocess.run([sys.executable, "-m", "anyflow", "--help"], capture_output=True, text=True)
    assert out.returncode == 0
    assert "generate" in out.stdout and "make-tiny" in out.stdout and "env" in out.stdout


def test_cpu_threads_follow_idle_cores(monkeypatch):
    import os

    import torch

    from anyflow.cli import UsageError, _cpu_threads

    assert _cpu_threads(3) == 3
    with pytest.raises(UsageError, match="--threads must be >= 1"):
        _cpu_threads(0)
    monkeypatch.setattr(os, "cpu_count", lambda: 8)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 8)
    monkeypatch.setattr(os, "getloadavg", lambda: (5.2, 0.0, 0.0))
    assert _cpu_threads(None) == 3
    monkeypatch.setattr(os, "getloadavg", lambda: (12.0, 0.0, 0.0))
    assert _cpu_threads(None) == 1
