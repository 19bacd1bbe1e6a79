"""Reading conditioning images / videos for I2V and V2V, and writing generated videos atomically.

Pixel tensors follow the AnyFlow pipelines' ``video`` argument: ``(B, T, 3, H, W)`` float32 in
``[0, 1]``. Frames are centre-cropped to the target aspect ratio, then resized (bicubic, antialiased),
so nothing is stretched. Decoding uses Pillow (images) and imageio with its bundled ffmpeg (videos);
no system ffmpeg or OpenCV is needed.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import stat
from pathlib import Path

import torch

__all__ = ["read_image", "read_video", "write_video_atomic", "write_image_atomic", "side_by_side", "frame_strip",
           "VIDEO_SUFFIXES", "IMAGE_SUFFIXES"]

#: Containers :func:`write_video_atomic` writes (through ffmpeg).
VIDEO_SUFFIXES = (".mp4", ".mkv", ".mov", ".avi", ".webm")
#: Still images :func:`write_image_atomic` writes (through Pillow).
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


def _check_size(height: int, width: int) -> None:
    if int(height) < 1 or int(width) < 1:
        raise ValueError(f"height and width must be positive, got height={height}, width={width}")


def _output_path(path, suffixes: tuple) -> Path:
    path = Path(path).expanduser()
    if path.suffix.lower() not in suffixes:
        raise ValueError(f"{path}: output suffix must be one of {', '.join(suffixes)}")
    if not path.parent.is_dir():
        raise ValueError(f"{path}: output directory {path.parent} does not exist")
    return path


def _existing_file(path) -> Path:
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    return path


def _fit(frames: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Centre-crop ``(T, 3, h, w)`` float frames to the aspect ``height:width``, then resize to it."""
    h, w = frames.shape[-2:]
    if h * width > w * height:  # too tall: crop rows
        crop_h, crop_w = max(1, round(w * height / width)), w
    else:  # too wide: crop columns
        crop_h, crop_w = h, max(1, round(h * width / height))
    top, left = (h - crop_h) // 2, (w - crop_w) // 2
    frames = frames[..., top : top + crop_h, left : left + crop_w]
    if (crop_h, crop_w) != (height, width):
        frames = torch.nn.functional.interpolate(
            frames, size=(height, width), mode="bicubic", align_corners=False, antialias=True
        )
    return frames.clamp_(0.0, 1.0)


def _first_line(exc: BaseException) -> str:
    """``Type: first line of the message`` (ffmpeg errors carry its whole banner)."""
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0] if lines else ''}"


def _to_float(frames_uint8) -> torch.Tensor:
    """``(T, h, w, 3)`` uint8 numpy -> ``(T, 3, h, w)`` float32 in [0, 1]."""
    import numpy as np

    return torch.from_numpy(np.array(frames_uint8, dtype=np.uint8, copy=True)).permute(0, 3, 1, 2).float().div_(255.0)


def read_image(path, height: int, width: int) -> torch.Tensor:
    """Read an image as a one-frame video for I2V.

    Args:
        path: image file (anything Pillow decodes; converted to RGB).
        height, width: output size in pixels.

    Returns:
        ``(1, 1, 3, height, width)`` float32 tensor in ``[0, 1]``.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: the file cannot be decoded as an image, or the size is not positive.
    """
    import numpy as np
    from PIL import Image

    _check_size(height, width)
    path = _existing_file(path)
    try:
        with Image.open(path) as img:
            rgb = np.asarray(img.convert("RGB"))
    except Exception as exc:  # Pillow raises several types for corrupt or foreign files
        raise ValueError(f"{path}: cannot decode as an image ({_first_line(exc)})") from exc
    return _fit(_to_float(rgb[None]), int(height), int(width)).unsqueeze(0)


def read_video(path, height: int, width: int, num_frames: int | None = None) -> torch.Tensor:
    """Read the first frames of a video for V2V conditioning.

    The frame count is ``min(num_frames, frames in the file)`` snapped down to the nearest ``4k + 1``
    (what the Wan VAE encodes); frames are taken at the file's own rate, from the start.

    Args:
        path: video file (anything the bundled ffmpeg decodes).
        height, width: output size in pixels.
        num_frames: maximum number of frames to read; ``None`` reads the whole file.

    Returns:
        ``(1, T, 3, height, width)`` float32 tensor in ``[0, 1]`` with ``T % 4 == 1``.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: the file cannot be decoded as a video or has no frame; ``num_frames < 1``;
            the size is not positive.
    """
    import imageio.v2 as imageio
    import numpy as np

    _check_size(height, width)
    if num_frames is not None and int(num_frames) < 1:
        raise ValueError(f"num_frames must be >= 1 or None, got {num_frames}")
    path = _existing_file(path)
    frames = []
    try:
        with imageio.get_reader(path, format="FFMPEG") as reader:
            for frame in reader:
                frames.append(np.asarray(frame)[..., :3])
                if num_frames is not None and len(frames) >= int(num_frames):
                    break
    except Exception as exc:  # imageio / ffmpeg raise OSError, RuntimeError, IndexError... on bad input
        raise ValueError(f"{path}: cannot decode as a video ({_first_line(exc)})") from exc
    if not frames:
        raise ValueError(f"{path}: the video has no decodable frame")
    count = (len(frames) - 1) // 4 * 4 + 1
    video = _to_float(np.stack(frames[:count]))
    return _fit(video, int(height), int(width)).unsqueeze(0)


def _as_uint8(frames):
    """``(T, H, W, 3)`` numpy / torch, float in [0, 1] or uint8 -> contiguous uint8 numpy."""
    import numpy as np

    if isinstance(frames, torch.Tensor):
        frames = frames.detach().cpu()
        frames = frames.float().numpy() if frames.is_floating_point() else frames.numpy()
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.shape[0] < 1:
        raise ValueError(f"frames must have shape (T, H, W, 3) with T >= 1, got {frames.shape}")
    if frames.dtype == np.uint8:
        return np.ascontiguousarray(frames)
    if not np.issubdtype(frames.dtype, np.floating):
        raise TypeError(f"frames must be uint8 or float in [0, 1], got dtype {frames.dtype}")
    if not np.isfinite(frames).all():
        raise ValueError("frames contain NaN or Inf")
    return np.ascontiguousarray((np.clip(frames, 0.0, 1.0) * 255.0).round().astype(np.uint8))


def write_video_atomic(frames, path, fps: float = 16) -> Path:
    """Write a video so that ``path`` is either the complete new file or untouched.

    Frames are encoded (H.264, yuv420p, via imageio-ffmpeg) into a temporary file in the same
    directory with the same suffix, flushed, then moved over ``path`` with ``os.replace``. On any
    error, ``KeyboardInterrupt`` included, the temporary file is removed and the error re-raised.

    Args:
        frames: ``(T, H, W, 3)`` numpy array or tensor, float in ``[0, 1]`` or uint8. H and W should
            be even (yuv420p); multiples of 16 avoid ffmpeg's macro-block resize.
        path: output file; suffix one of :data:`VIDEO_SUFFIXES`. Its directory must exist.
        fps: frames per second (> 0).

    Returns:
        pathlib.Path: ``path``.

    Raises:
        ValueError: unsupported suffix, missing directory, bad ``fps`` or frame shape, NaN/Inf.
        TypeError: frames of an unsupported dtype.
    """
    import imageio.v2 as imageio

    path = _output_path(path, VIDEO_SUFFIXES)
    if not fps > 0:
        raise ValueError(f"fps must be > 0, got {fps}")
    data = _as_uint8(frames)

    with atomic_output(path) as tmp:
        with imageio.get_writer(
            tmp, format="FFMPEG", mode="I", fps=fps, codec="libx264", pixelformat="yuv420p", macro_block_size=16
        ) as writer:
            for frame in data:
                writer.append_data(frame)
    return path


def write_image_atomic(image, path) -> Path:
    """Write one ``(H, W, 3)`` image (float in ``[0, 1]`` or uint8) with Pillow, atomically.

    Raises:
        ValueError: unsupported suffix (see :data:`IMAGE_SUFFIXES`), missing directory, bad shape.
    """
    from PIL import Image

    path = _output_path(path, IMAGE_SUFFIXES)
    data = _as_uint8(image[None] if getattr(image, "ndim", 0) == 3 else image)[0]
    with atomic_output(path) as tmp:
        Image.fromarray(data).save(tmp)
    return path


def _label(tile, text: str):
    """Burn ``text`` into the top-left corner of a uint8 ``(H, W, 3)`` tile (white on a dark box)."""
    import numpy as np
    from PIL import Image, ImageDraw

    img = Image.fromarray(tile)
    draw = ImageDraw.Draw(img)
    box = draw.textbbox((1, 0), text)
    draw.rectangle((0, 0, box[2] + 1, box[3] + 1), fill=(0, 0, 0))
    draw.text((1, 0), text, fill=(255, 255, 255))
    return np.asarray(img)


def _videos_uint8(videos, labels) -> list:
    arrays = [_as_uint8(v) for v in videos]
    if not arrays:
        raise ValueError("videos must hold at least one (T, H, W, 3) clip")
    if len({a.shape for a in arrays}) != 1:
        raise ValueError(f"videos must share one shape, got {sorted({a.shape for a in arrays})}")
    if len(labels) != len(arrays):
        raise ValueError(f"labels must have one entry per video ({len(arrays)}), got {len(labels)}")
    return arrays


def side_by_side(videos, labels, gap: int = 2, multiple: int = 16):
    """Tile equally shaped clips left to right into one clip, each labelled in its top-left corner.

    Args:
        videos: sequence of ``(T, H, W, 3)`` clips (float in ``[0, 1]`` or uint8).
        labels: one string per clip.
        gap: white pixels between panels.
        multiple: the width is padded (white, on the right) to a multiple of this, so a video encoder
            with 16-pixel macro blocks does not rescale the panels.

    Returns:
        uint8 numpy ``(T, H, W', 3)``, ``W'`` = ``n W + (n - 1) gap`` rounded up to ``multiple``.

    Raises:
        ValueError: no clip, shapes differ, or ``labels`` has the wrong length.
    """
    import numpy as np

    arrays = _videos_uint8(videos, labels)
    t, h, w, _ = arrays[0].shape
    width = len(arrays) * w + (len(arrays) - 1) * gap
    out = np.full((t, h, -(-width // multiple) * multiple, 3), 255, np.uint8)
    for i, (a, lab) in enumerate(zip(arrays, labels)):
        x = i * (w + gap)
        out[:, :, x:x + w] = np.stack([_label(f, lab) for f in a])
    return out


def frame_strip(videos, labels, columns: int = 6, gap: int = 2):
    """One image: a row per clip (labelled), ``columns`` evenly spaced frames of it left to right.

    Returns:
        uint8 numpy ``(n H + (n - 1) gap, c W + (c - 1) gap, 3)`` with ``c = min(columns, T)``.

    Raises:
        ValueError: no clip, shapes differ, wrong ``labels`` length, ``columns < 1``.
    """
    import numpy as np

    arrays = _videos_uint8(videos, labels)
    if columns < 1:
        raise ValueError(f"columns must be >= 1, got {columns}")
    t, h, w, _ = arrays[0].shape
    c = min(columns, t)
    picks = np.linspace(0, t - 1, c).round().astype(int)
    out = np.full((len(arrays) * h + (len(arrays) - 1) * gap, c * w + (c - 1) * gap, 3), 255, np.uint8)
    for i, (a, lab) in enumerate(zip(arrays, labels)):
        for j, k in enumerate(picks):
            tile = _label(a[k], lab) if j == 0 else a[k]
            out[i * (h + gap):i * (h + gap) + h, j * (w + gap):j * (w + gap) + w] = tile
    return out


def _create_sibling(path: Path, suffix: str) -> str:
    """Create an empty, uniquely named file next to ``path`` and return its name.

    Opened with ``O_CREAT | O_EXCL`` and mode ``0o666``, so the kernel applies the user's umask (and a
    directory's default ACL) exactly as for any other new file; ``tempfile.mkstemp`` would force ``0600``
    onto the final output. When ``path`` already exists, its permission bits are kept instead, as an
    in-place overwrite would keep them.
    """
    for _ in range(100):
        tmp = path.parent / f".{path.stem}.{secrets.token_hex(6)}{suffix}"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o666)
        except FileExistsError:
            continue
        os.close(fd)
        with contextlib.suppress(FileNotFoundError):
            os.chmod(tmp, stat.S_IMODE(os.stat(path).st_mode))
        return str(tmp)
    raise FileExistsError(f"{path.parent}: could not create a unique temporary file for {path.name}")


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike, suffix: str | None = None):
    """Write a file atomically: yield a temporary path in ``path``'s folder, then fsync it and
    ``os.replace`` it onto ``path``. On any exception (KeyboardInterrupt included) the temporary file is
    removed and an existing ``path`` is left untouched.

    The result has the permissions of any new file (``0o666`` minus the umask), or those of the file it
    replaces.

    Args:
        path: final destination.
        suffix: suffix of the temporary file (default: ``path``'s, so format sniffing still works).
    """
    path = Path(path)
    tmp = _create_sibling(path, path.suffix if suffix is None else suffix)
    try:
        yield tmp
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
