"""anyflow.io: real inputs at small sizes, decode errors, atomic video writing."""

import os
import stat
from pathlib import Path

import numpy as np
import pytest
import torch

from anyflow.io import read_image, read_video, write_video_atomic



@pytest.mark.parametrize("size", [(64, 96), (48, 32)])
def test_read_real_image(size, eval_data):
    x = read_image(eval_data / "images" / "1.jpg", *size)
    assert x.shape == (1, 1, 3, *size) and x.dtype == torch.float32
    assert 0.0 <= x.min() and x.max() <= 1.0 and x.std() > 0.01


def test_read_real_video_snaps_to_4k_plus_1(eval_data):
    v = read_video(eval_data / "videos" / "1.mp4", 32, 48, num_frames=11)
    assert v.shape == (1, 9, 3, 32, 48) and v.dtype == torch.float32
    assert 0.0 <= v.min() and v.max() <= 1.0
    assert (v[0, 0] - v[0, -1]).abs().mean() > 0  # real motion, distinct frames


def test_image_center_crop_keeps_aspect(eval_data):
    # a square crop of a 1280x736 image: the centre, not a squeeze of the whole frame
    full = read_image(eval_data / "images" / "1.jpg", 368, 640)  # same aspect, no crop
    square = read_image(eval_data / "images" / "1.jpg", 368, 368)
    centre = full[..., :, 136:504]
    assert (square - centre).abs().mean() < 0.03


def test_written_video_reads_back(tmp_path):
    frames = np.random.default_rng(0).random((9, 32, 48, 3))
    out = write_video_atomic(frames, tmp_path / "clip.mp4", fps=8)
    assert out == tmp_path / "clip.mp4"
    back = read_video(out, 32, 48)
    assert back.shape == (1, 9, 3, 32, 48)
    assert sorted(os.listdir(tmp_path)) == ["clip.mp4"]


def test_uint8_frames_and_overwrite(tmp_path):
    target = tmp_path / "clip.mp4"
    target.write_bytes(b"old")
    write_video_atomic(np.full((5, 16, 16, 3), 200, np.uint8), target, fps=4)
    assert target.stat().st_size > 3
    assert abs(read_video(target, 16, 16).mean().item() - 200 / 255) < 0.02


class _Boom(Exception):
    pass


@pytest.mark.parametrize("error", [_Boom, KeyboardInterrupt])
def test_atomic_write_leaves_nothing_on_error(tmp_path, monkeypatch, error):
    import imageio.v2 as imageio

    real = imageio.get_writer

    class Failing:
        def __init__(self, *a, **k):
            self.inner = real(*a, **k)
            self.count = 0

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.inner.close()
            return False

        def append_data(self, frame):
            self.count += 1
            if self.count == 3:
                raise error()
            self.inner.append_data(frame)

    monkeypatch.setattr(imageio, "get_writer", Failing)
    target = tmp_path / "out.mp4"
    with pytest.raises(error):
        write_video_atomic(np.zeros((6, 16, 16, 3), np.float32), target, fps=8)
    assert os.listdir(tmp_path) == []

    target.write_bytes(b"previous")
    with pytest.raises(error):
        write_video_atomic(np.zeros((6, 16, 16, 3), np.float32), target, fps=8)
    assert os.listdir(tmp_path) == ["out.mp4"] and target.read_bytes() == b"previous"


def test_bad_frames_are_rejected_before_writing(tmp_path):
    with pytest.raises(ValueError, match="shape"):
        write_video_atomic(np.zeros((4, 16, 16)), tmp_path / "a.mp4")
    with pytest.raises(ValueError, match="NaN"):
        write_video_atomic(np.full((4, 16, 16, 3), np.nan), tmp_path / "a.mp4")
    with pytest.raises(ValueError, match="suffix"):
        write_video_atomic(np.zeros((4, 16, 16, 3)), tmp_path / "a.txt")
    with pytest.raises(ValueError, match="does not exist"):
        write_video_atomic(np.zeros((4, 16, 16, 3)), tmp_path / "missing" / "a.mp4")
    assert os.listdir(tmp_path) == []


def test_unreadable_inputs_name_the_path(tmp_path):
    fake = tmp_path / "fake.mp4"
    fake.write_text("this is not a video")
    with pytest.raises(ValueError, match="fake.mp4.*cannot decode as a video"):
        read_video(fake, 16, 16)
    fake_img = tmp_path / "fake.jpg"
    fake_img.write_text("this is not an image")
    with pytest.raises(ValueError, match="fake.jpg.*cannot decode as an image"):
        read_image(fake_img, 16, 16)
    with pytest.raises(FileNotFoundError, match="missing.jpg"):
        read_image(tmp_path / "missing.jpg", 16, 16)
    with pytest.raises(FileNotFoundError, match="missing.mp4"):
        read_video(tmp_path / "missing.mp4", 16, 16)


@pytest.fixture
def umask():
    """``os.umask``, with the process umask restored after the test."""
    old = os.umask(0o022)
    try:
        yield os.umask
    finally:
        os.umask(old)


@pytest.mark.parametrize("mask", [0o022, 0o077, 0o002])
def test_outputs_get_the_umask(tmp_path, umask, mask):
    from anyflow.io import atomic_output, write_image_atomic

    umask(mask)
    video = write_video_atomic(np.zeros((5, 16, 16, 3), np.uint8), tmp_path / "a.mp4", fps=4)
    image = write_image_atomic(np.zeros((16, 16, 3), np.uint8), tmp_path / "a.png")
    with atomic_output(tmp_path / "state.pt", suffix=".tmp") as tmp:
        Path(tmp).write_bytes(b"x")
    with open(tmp_path / "plain", "w"):  # what any other new file gets
        pass
    expected = 0o666 & ~mask
    assert stat.S_IMODE((tmp_path / "plain").stat().st_mode) == expected
    for f in (video, image, tmp_path / "state.pt"):
        assert stat.S_IMODE(f.stat().st_mode) == expected, f


def test_overwrite_keeps_the_existing_mode(tmp_path, umask):
    target = tmp_path / "clip.mp4"
    target.write_bytes(b"old")
    target.chmod(0o640)
    umask(0o000)
    write_video_atomic(np.zeros((5, 16, 16, 3), np.uint8), target, fps=4)
    assert stat.S_IMODE(target.stat().st_mode) == 0o640
    assert target.stat().st_size > 3
