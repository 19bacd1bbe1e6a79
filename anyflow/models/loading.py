"""Load a diffusers-format AnyFlow checkpoint folder, in either of its two layouts, into diffusers' classes.

Both layouts share the folder structure and the weights (state-dict keys are bit-identical)::

    <path>/model_index.json
    <path>/transformer/config.json + diffusion_pytorch_model.safetensors
                                     (or diffusion_pytorch_model.safetensors.index.json + shards)
    <path>/scheduler/scheduler_config.json
    <path>/text_encoder/  (transformers UMT5EncoderModel)
    <path>/tokenizer/     (UMT5 tokenizer, loaded with AutoTokenizer)
    <path>/vae/           (diffusers AutoencoderKLWan)

**Upstream layout** (diffusers >= the AnyFlow upstreaming, what ``AnyFlowFARPipeline.save_pretrained``
writes): ``model_index.json`` names ``AnyFlowPipeline`` / ``AnyFlowFARPipeline``; the transformer
config's ``_class_name`` is ``AnyFlowTransformer3DModel`` (bidirectional) or
``AnyFlowFARTransformer3DModel`` (FAR causal); the scheduler is ``FlowMapEulerDiscreteScheduler``.

**Legacy layout** (NVlabs' ``convert_anyflow_to_diffusers.py``): ``model_index.json`` names
``WanAnyFlowPipeline`` / ``FARWanAnyFlowPipeline`` and modules of the ``far`` package that diffusers
cannot import, so ``DiffusionPipeline.from_pretrained`` fails on it. The transformer config's
``_class_name`` is ``FAR_Wan_Transformer3DModel`` with ``init_far_model`` (true = FAR causal model),
``init_flowmap_model`` (must be true), ``chunk_partition``, ``qk_norm``, ``added_kv_proj_dim`` and
other keys the upstream classes do not take; the scheduler is ``FlowMapDiscreteScheduler`` (its
``weight_type`` only matters for training).

:func:`load_pipeline` reads each component explicitly, so both layouts load the same way and the
user's folder is never written to.
"""

from __future__ import annotations

import inspect
import json
import math
import os
import shutil
import tempfile
from pathlib import Path

__all__ = [
    "SUPPORTED_TRANSFORMER_CLASSES",
    "CheckpointFileError",
    "check_safetensors",
    "load_pipeline",
    "load_transformer",
    "resolve_transformer_kind",
]

#: Transformer config ``_class_name`` values this loader understands.
SUPPORTED_TRANSFORMER_CLASSES = (
    "AnyFlowTransformer3DModel",
    "AnyFlowFARTransformer3DModel",
    "FAR_Wan_Transformer3DModel",
)

#: Chunk partition of the released 81-frame FAR checkpoints (21 latent frames), used when a FAR
#: config has none.
DEFAULT_CHUNK_PARTITION = [1, 3, 3, 3, 3, 3, 3, 2]

_WEIGHTS = "diffusion_pytorch_model.safetensors"
_WEIGHTS_INDEX = "diffusion_pytorch_model.safetensors.index.json"
_TEXT_WEIGHTS_INDEX = "model.safetensors.index.json"

#: Bytes per element of every dtype the safetensors format defines (sub-byte float4 types excluded).
_SAFETENSORS_ITEMSIZE = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "F8_E8M0": 1,
    "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4,
    "I64": 8, "U64": 8, "F64": 8, "C64": 8,
}
#: Largest header the safetensors library accepts (100 MB); a bigger length field is garbage.
_MAX_HEADER = 100_000_000


class CheckpointFileError(ValueError):
    """A checkpoint file that exists but cannot be used (truncated, corrupt, or not what its folder
    needs). The message is one line that starts with the file's path as the user named it."""


def check_safetensors(file) -> dict:
    """Check that ``file`` is a complete, well-formed safetensors file, without reading its tensors.

    Reads the 8-byte little-endian header length and the JSON header, then checks every tensor entry
    (known dtype, shape, ``data_offsets`` that match ``prod(shape) * itemsize``, tile the data area
    without gaps or overlaps) and that the file is exactly ``8 + header + data`` bytes long.

    Args:
        file: path of the ``.safetensors`` file; the error messages name it as given.

    Returns:
        The parsed header (``{name: {"dtype", "shape", "data_offsets"}, "__metadata__": ...}``).

    Raises:
        FileNotFoundError: ``file`` does not exist.
        CheckpointFileError: (a ``ValueError``) empty, truncated or oversized file, unreadable header, or
            inconsistent tensor entries; the message is ``"<file>: <what is wrong>"``.
    """
    file = Path(file)
    if not file.is_file():
        raise FileNotFoundError(f"{file}: no such file")

    def bad(what: str) -> CheckpointFileError:
        return CheckpointFileError(f"{file}: {what}")

    size = file.stat().st_size
    if size == 0:
        raise bad("empty file (0 bytes), expected a safetensors file")
    with open(file, "rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            raise bad(f"truncated: {size} bytes, shorter than the 8-byte header length of a safetensors file")
        n = int.from_bytes(head, "little")
        if n > _MAX_HEADER:
            raise bad(f"corrupt: header length field reads {n} bytes (at most {_MAX_HEADER}); not a safetensors file")
        if 8 + n > size:
            raise bad(f"truncated: header says it is {n} bytes, file has {size - 8} after the length field")
        raw = fh.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise bad(f"corrupt header: not UTF-8 JSON ({exc})") from None
    if not isinstance(header, dict):
        raise bad(f"corrupt header: expected a JSON object, got {type(header).__name__}")
    spans = []
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (begin, end) = entry["dtype"], list(entry["shape"]), entry["data_offsets"]
            if not all(isinstance(d, int) and d >= 0 for d in shape) or not isinstance(begin, int) \
                    or not isinstance(end, int):
                raise TypeError
        except (TypeError, KeyError, ValueError):
            raise bad(f"corrupt header: tensor {name!r} has entry {entry!r}, expected dtype, shape and "
                      "data_offsets [begin, end]") from None
        if dtype not in _SAFETENSORS_ITEMSIZE:
            raise bad(f"corrupt header: tensor {name!r} has unknown dtype {dtype!r}")
        numel = math.prod(shape)
        if end - begin != numel * _SAFETENSORS_ITEMSIZE[dtype] or begin < 0:
            raise bad(f"corrupt header: tensor {name!r} ({dtype} {shape}) needs {numel * _SAFETENSORS_ITEMSIZE[dtype]} "
                      f"bytes, data_offsets give [{begin}, {end}]")
        spans.append((begin, end, name))
    spans.sort()
    expected = 0
    for begin, end, name in spans:
        if begin != expected:
            raise bad(f"corrupt header: tensor {name!r} starts at byte {begin} of the data, expected {expected} "
                      "(tensors must tile the data without gaps or overlaps)")
        expected = end
    data = size - 8 - n
    if data < expected:
        raise bad(f"truncated: header says {8 + n + expected} bytes, file has {size}")
    if data > expected:
        raise bad(f"corrupt: header says {8 + n + expected} bytes, file has {size} ({data - expected} trailing bytes)")
    return header


def _check_weight_files(files: list[Path], component: str) -> None:
    """Check every safetensors file (and the tensors an index maps to each shard) before loading any."""
    headers = {f.name: check_safetensors(f) for f in files if f.name.endswith(".safetensors")}
    for index in (f for f in files if f.name.endswith(".index.json")):
        weight_map = _read_json(index, f"component '{component}' weight index").get("weight_map", {})
        for key, shard in weight_map.items():
            if shard in headers and key not in headers[shard]:
                raise CheckpointFileError(f"{index.parent / shard}: lacks tensor {key!r}, which {index.name} maps to it")


def _check_loading_info(model, info: dict, folder: Path, component: str):
    """Turn the libraries' silent partial loads (missing tensors left random or on the meta device,
    unexpected or mis-shaped tensors dropped) into one line naming the folder; returns ``model``."""
    problems = []
    for key, what in (("missing_keys", "missing"), ("unexpected_keys", "unexpected"),
                      ("mismatched_keys", "with a shape other than the config's")):
        names = [k[0] if isinstance(k, (tuple, list)) else k for k in (info.get(key) or ())]
        if names:
            problems.append(f"{len(names)} tensors {what} (e.g. {sorted(names)[0]!r})")
    if problems:
        raise CheckpointFileError(
            f"{folder}: the weights of component '{component}' do not fit its config.json: " + "; ".join(problems)
        )
    return model


def _load_error(folder: Path, component: str, exc: Exception) -> CheckpointFileError:
    """One line for a failure inside ``from_pretrained`` that the file checks did not foresee."""
    text = " ".join(str(exc).split())
    if len(text) > 300:
        text = text[:297] + "..."
    return CheckpointFileError(f"{folder}: component '{component}' cannot be loaded: {type(exc).__name__}: {text}")


def _from_pretrained(cls, folder: Path, component: str, source=None, **kwargs):
    """``cls.from_pretrained(source or folder, ...)`` in eval mode; a failure inside it, or a partial load, is one
    line naming the user's ``folder`` (also when ``source`` is a temporary view of it)."""
    try:
        model, info = cls.from_pretrained(source or folder, output_loading_info=True, **kwargs)
    except Exception as exc:  # noqa: BLE001 - one line naming the folder instead of a library traceback
        err = str(_load_error(folder, component, exc))
        raise CheckpointFileError(err.replace(str(source), str(folder)) if source else err) from exc
    return _check_loading_info(model, info, folder, component).eval()


def _read_json(file: Path, what: str) -> dict:
    if not file.is_file():
        raise FileNotFoundError(f"{what}: expected {file}, which does not exist")
    try:
        return json.loads(file.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"{what}: {file} is not readable JSON ({exc})") from exc


def _component_dir(root: Path, name: str) -> Path:
    folder = root / name
    if not folder.is_dir():
        raise FileNotFoundError(f"component '{name}' missing: expected the folder {folder} in the checkpoint {root}")
    return folder


def _resolve_dtype(dtype):
    import torch

    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    names = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
             "float16": torch.float16, "fp16": torch.float16}
    if dtype not in names:
        raise ValueError(f"dtype must be a torch.dtype or one of {sorted(names)}, got {dtype!r}")
    return names[dtype]


def resolve_transformer_kind(config: dict, where: str = "transformer config") -> str:
    """Decide which upstream transformer class a transformer ``config.json`` describes.

    Args:
        config: the parsed transformer ``config.json``.
        where: how to name the config in error messages (usually its path).

    Returns:
        ``"far"`` (``AnyFlowFARTransformer3DModel``) or ``"bidirectional"`` (``AnyFlowTransformer3DModel``).

    Raises:
        ValueError: unknown ``_class_name``; a legacy config whose ``init_flowmap_model`` is not true
            (a plain Wan / FAR model, not a flow-map checkpoint); a legacy ``qk_norm`` other than
            ``rms_norm_across_heads`` or a non-null ``added_kv_proj_dim`` (architectures the
            upstream classes do not implement).
    """
    name = config.get("_class_name")
    if name == "AnyFlowFARTransformer3DModel":
        return "far"
    if name == "AnyFlowTransformer3DModel":
        return "bidirectional"
    if name == "FAR_Wan_Transformer3DModel":
        if config.get("init_flowmap_model") is not True:
            raise ValueError(
                f"{where}: legacy FAR_Wan_Transformer3DModel with init_flowmap_model="
                f"{config.get('init_flowmap_model')!r}; only flow-map (AnyFlow) checkpoints are supported, "
                "which have init_flowmap_model true"
            )
        if config.get("qk_norm", "rms_norm_across_heads") != "rms_norm_across_heads":
            raise ValueError(f"{where}: qk_norm must be 'rms_norm_across_heads', got {config['qk_norm']!r}")
        if config.get("added_kv_proj_dim") is not None:
            raise ValueError(f"{where}: added_kv_proj_dim must be null, got {config['added_kv_proj_dim']!r}")
        return "far" if config.get("init_far_model") is True else "bidirectional"
    raise ValueError(
        f"{where}: unsupported transformer _class_name {name!r}; supported: {', '.join(SUPPORTED_TRANSFORMER_CLASSES)}"
    )


def _upstream_config(config: dict, cls, kind: str) -> dict:
    """Keep only the keys ``cls.__init__`` accepts; fill the FAR chunk partition when absent."""
    accepted = set(inspect.signature(cls.__init__).parameters) - {"self"}
    out = {k: v for k, v in config.items() if k in accepted}
    if kind == "far" and not out.get("chunk_partition"):
        out["chunk_partition"] = list(DEFAULT_CHUNK_PARTITION)
    out["_class_name"] = cls.__name__
    return out


def _weight_files(folder: Path, component: str) -> list[Path]:
    """The safetensors files of a diffusers model folder (single file, or an index and its shards)."""
    index = folder / _WEIGHTS_INDEX
    if index.is_file():
        shards = sorted(set(_read_json(index, f"component '{component}' weight index").get("weight_map", {}).values()))
        if not shards:
            raise ValueError(f"component '{component}': {index} lists no weight shards")
        missing = [s for s in shards if not (folder / s).is_file()]
        if missing:
            raise FileNotFoundError(f"component '{component}': shards listed in {index} are missing: {missing}")
        return [index] + [folder / s for s in shards]
    single = folder / _WEIGHTS
    if single.is_file():
        return [single]
    raise FileNotFoundError(
        f"component '{component}' has no weights: expected {single} or {index} (with its shards)"
    )


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.symlink(src.resolve(), dst)
    except OSError:
        try:
            os.link(src, dst)
        except OSError:
            shutil.copyfile(src, dst)


def load_transformer(folder, dtype=None):
    """Load an AnyFlow transformer folder (``config.json`` + safetensors) of either layout.

    The config is rewritten for the upstream class (unknown keys dropped, FAR ``chunk_partition``
    defaulted to ``[1,3,3,3,3,3,3,2]``) into a temporary folder whose weight files are links to the
    originals, and loaded with ``Cls.from_pretrained`` so that diffusers' own rules apply (meta-device
    init, ``_keep_in_fp32_modules`` under a low-precision ``dtype``). ``folder`` is only read.

    Args:
        folder: the transformer folder (e.g. ``<checkpoint>/transformer``).
        dtype: ``torch.dtype`` (or ``"float32"`` / ``"bfloat16"``) for the parameters; ``None`` keeps
            diffusers' default.

    Returns:
        ``AnyFlowTransformer3DModel`` or ``AnyFlowFARTransformer3DModel`` in eval mode.

    Raises:
        FileNotFoundError: ``folder``, its ``config.json`` or its weights are missing.
        ValueError: unsupported config (see :func:`resolve_transformer_kind`).
        CheckpointFileError: (a ``ValueError``) a truncated or corrupt weight file, or weights that do
            not fit the config; one line naming the file or folder (see :func:`check_safetensors`).
    """
    from diffusers import AnyFlowFARTransformer3DModel, AnyFlowTransformer3DModel

    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"component 'transformer' missing: expected the folder {folder}")
    config_file = folder / "config.json"
    config = _read_json(config_file, "component 'transformer' config")
    kind = resolve_transformer_kind(config, where=str(config_file))
    cls = AnyFlowFARTransformer3DModel if kind == "far" else AnyFlowTransformer3DModel
    weights = _weight_files(folder, "transformer")
    _check_weight_files(weights, "transformer")
    torch_dtype = _resolve_dtype(dtype)
    with tempfile.TemporaryDirectory(prefix="anyflow-transformer-") as view:
        view = Path(view)
        (view / "config.json").write_text(json.dumps(_upstream_config(config, cls, kind), indent=2))
        for file in weights:
            _link_or_copy(file, view / file.name)
        return _from_pretrained(cls, folder, "transformer", view, torch_dtype=torch_dtype, low_cpu_mem_usage=True)


def _load_text_encoder(folder: Path, entry, dtype):
    import transformers

    library, name = (entry if isinstance(entry, (list, tuple)) and len(entry) == 2 else ("transformers", None))
    if library != "transformers" or not name or not hasattr(transformers, name):
        name = "UMT5EncoderModel"
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"component 'text_encoder' has no config: expected {folder / 'config.json'}")
    _read_json(folder / "config.json", "component 'text_encoder' config")
    if not any(folder.glob("*.safetensors")) and not any(folder.glob("*.bin")):
        raise FileNotFoundError(f"component 'text_encoder' has no weights (*.safetensors or *.bin) in {folder}")
    kwargs = {} if dtype is None else {"dtype": dtype}  # the weight files are checked by load_pipeline
    return _from_pretrained(getattr(transformers, name), folder, "text_encoder", **kwargs)


def _load_tokenizer(folder: Path):
    from transformers import AutoTokenizer

    if not any((folder / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "spiece.model")):
        raise FileNotFoundError(
            f"component 'tokenizer' has no tokenizer files: expected tokenizer.json, tokenizer_config.json "
            f"or spiece.model in {folder}"
        )
    try:
        return AutoTokenizer.from_pretrained(folder)
    except Exception as exc:  # noqa: BLE001 - e.g. a corrupt tokenizer.json
        raise _load_error(folder, "tokenizer", exc) from exc


def _load_vae(folder: Path, dtype):
    from diffusers import AutoencoderKLWan

    _read_json(folder / "config.json", "component 'vae' config")
    kwargs = {} if dtype is None else {"torch_dtype": dtype}  # the weight files are checked by load_pipeline
    return _from_pretrained(AutoencoderKLWan, folder, "vae", **kwargs)


def _load_scheduler(folder: Path):
    from diffusers import FlowMapEulerDiscreteScheduler

    cfg = _read_json(folder / "scheduler_config.json", "component 'scheduler' config")
    return FlowMapEulerDiscreteScheduler(
        num_train_timesteps=int(cfg.get("num_train_timesteps", 1000)), shift=float(cfg.get("shift", 1.0))
    )


def load_pipeline(path, dtype=None, device=None, transformer_only: bool = False):
    """Load an AnyFlow checkpoint folder (upstream or legacy layout, see the module docstring).

    Args:
        path: the checkpoint folder (the one holding ``model_index.json``). With
            ``transformer_only=True`` it may also be a transformer folder itself.
        dtype: ``torch.dtype`` (or ``"float32"`` / ``"bfloat16"``) applied to every model component
            like ``DiffusionPipeline.from_pretrained(torch_dtype=...)`` (diffusers keeps its fp32
            modules in fp32); ``None`` keeps the libraries' defaults.
        device: if given, the pipeline (or transformer) is moved there.
        transformer_only: return just the transformer, skipping text encoder, tokenizer, VAE.

    Returns:
        ``diffusers.AnyFlowPipeline`` (bidirectional) or ``diffusers.AnyFlowFARPipeline`` (FAR causal)
        with an ``AnyFlowTransformer3DModel`` / ``AnyFlowFARTransformer3DModel``, the
        ``FlowMapEulerDiscreteScheduler`` with the folder's ``shift``, ``UMT5EncoderModel``, the
        tokenizer and ``AutoencoderKLWan``; or only the transformer when ``transformer_only``.

    Raises:
        FileNotFoundError: ``path`` or its ``model_index.json`` is missing; a component folder, its
            config or its weights are missing (the message names the component).
        ValueError: unreadable JSON; unsupported transformer ``_class_name`` (the message names the
            class found and the supported ones); legacy config with ``init_flowmap_model`` false.
        CheckpointFileError: (a ``ValueError``) a truncated or corrupt weight file of any component
            (checked for all components before any weights are read), or a component that its library
            cannot load; one line naming the user's file or folder and what is wrong.
    """
    root = Path(path).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"checkpoint folder {root} does not exist (expected an AnyFlow diffusers folder)")
    bare = transformer_only and not (root / "model_index.json").is_file() and (root / "config.json").is_file()
    if not bare:
        index = _read_json(root / "model_index.json", f"checkpoint {root} is not a diffusers pipeline folder")
        dtype = _resolve_dtype(dtype)
    if transformer_only:
        model = load_transformer(root if bare else _component_dir(root, "transformer"), dtype=dtype)
        return model.to(device) if device is not None else model

    # every folder is checked before any weights are read, so a broken checkpoint fails fast
    names = ("transformer", "scheduler", "text_encoder", "tokenizer", "vae")
    dirs = {name: _component_dir(root, name) for name in names}
    _check_weight_files(_weight_files(dirs["transformer"], "transformer"), "transformer")
    text_index = dirs["text_encoder"] / _TEXT_WEIGHTS_INDEX  # its safetensors files; .bin files are not checked
    text_weights = sorted(dirs["text_encoder"].glob("*.safetensors"))
    _check_weight_files(([text_index] if text_index.is_file() else []) + text_weights, "text_encoder")
    _check_weight_files(_weight_files(dirs["vae"], "vae"), "vae")
    scheduler = _load_scheduler(dirs["scheduler"])
    transformer = load_transformer(dirs["transformer"], dtype=dtype)
    text_encoder = _load_text_encoder(dirs["text_encoder"], index.get("text_encoder"), dtype)
    tokenizer = _load_tokenizer(dirs["tokenizer"])
    vae = _load_vae(dirs["vae"], dtype)

    from diffusers import AnyFlowFARPipeline, AnyFlowFARTransformer3DModel, AnyFlowPipeline

    cls = AnyFlowFARPipeline if isinstance(transformer, AnyFlowFARTransformer3DModel) else AnyFlowPipeline
    pipe = cls(tokenizer=tokenizer, text_encoder=text_encoder, transformer=transformer, vae=vae, scheduler=scheduler)
    return pipe.to(device) if device is not None else pipe
