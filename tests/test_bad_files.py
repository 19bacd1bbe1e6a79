"""Broken weight files in a model folder give one line naming the user's file and what is wrong.

Every component with weights (transformer, VAE, text encoder) of a tiny checkpoint is damaged in turn:
truncated, garbage header, zero length, shorter than the length field, trailing bytes, a header whose
offsets disagree with the shapes, and the weights of another component. ``load_pipeline`` raises
:class:`anyflow.models.loading.CheckpointFileError` (a ``ValueError``) before any weights are read, and
``anyflow generate --model DIR`` exits with status 2 and that line (no traceback, no temporary path).
"""

import json
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from anyflow.cli import main
from anyflow.models.loading import CheckpointFileError, check_safetensors, load_pipeline

WEIGHTS = {
    "transformer": "transformer/diffusion_pytorch_model.safetensors",
    "vae": "vae/diffusion_pytorch_model.safetensors",
    "text_encoder": "text_encoder/model.safetensors",
}


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    from anyflow.models.tiny import save_tiny_checkpoint

    return save_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "model", kind="far")


@pytest.fixture
def model(tiny_dir, tmp_path):
    """A private copy of the tiny checkpoint that a test may damage."""
    return Path(shutil.copytree(tiny_dir, tmp_path / "model"))


def _truncate(file: Path) -> str:
    data = file.read_bytes()
    file.write_bytes(data[: len(data) * 2 // 3])
    return "truncated: header says"


def _garbage_header(file: Path) -> str:
    data = bytearray(file.read_bytes())
    data[:64] = bytes((i * 37 + 11) % 256 for i in range(64))  # a length field of ~10^18 and no JSON
    file.write_bytes(bytes(data))
    return "corrupt: header length field"


def _zero_length(file: Path) -> str:
    file.write_bytes(b"")
    return "empty file (0 bytes)"


def _five_bytes(file: Path) -> str:
    file.write_bytes(file.read_bytes()[:5])
    return "truncated: 5 bytes"


def _header_cut(file: Path) -> str:
    data = file.read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    file.write_bytes(data[: 8 + n // 2])  # the JSON header itself is cut
    return "truncated: header says it is"


def _not_json(file: Path) -> str:
    data = file.read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    file.write_bytes(data[:8] + b"\xff" * n + data[8 + n:])
    return "corrupt header: not UTF-8 JSON"


def _trailing_bytes(file: Path) -> str:
    file.write_bytes(file.read_bytes() + b"\0" * 10)
    return "10 trailing bytes"


def _bad_offsets(file: Path) -> str:
    data = file.read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8:8 + n])
    name = sorted(k for k in header if k != "__metadata__")[0]
    begin, end = header[name]["data_offsets"]
    header[name]["data_offsets"] = [begin, end + 4]
    text = json.dumps(header).encode()
    file.write_bytes(struct.pack("<Q", len(text)) + text + data[8 + n:])
    return f"corrupt header: tensor {name!r}"


DAMAGE = [_truncate, _garbage_header, _zero_length, _five_bytes, _header_cut, _not_json, _trailing_bytes,
          _bad_offsets]


def _assert_one_line(text: str, file: Path, expect: str) -> None:
    assert "\n" not in text.strip() and "Traceback" not in text
    assert text.startswith(str(file) + ": "), text
    assert expect in text, text
    assert "anyflow-transformer-" not in text  # never the temporary view's path


@pytest.mark.parametrize("component", sorted(WEIGHTS))
@pytest.mark.parametrize("damage", DAMAGE, ids=lambda f: f.__name__.strip("_"))
def test_damaged_weights_name_the_file(model, component, damage):
    file = model / WEIGHTS[component]
    expect = damage(file)
    with pytest.raises(CheckpointFileError) as info:
        load_pipeline(model)
    assert isinstance(info.value, ValueError)
    _assert_one_line(str(info.value), file, expect)


def test_truncated_header_message_has_both_sizes(model):
    file = model / WEIGHTS["transformer"]
    size = file.stat().st_size
    file.write_bytes(file.read_bytes()[:-100])
    with pytest.raises(CheckpointFileError, match=rf"truncated: header says {size} bytes, file has {size - 100}$"):
        check_safetensors(file)


@pytest.mark.parametrize("component,source", [("transformer", "vae"), ("vae", "transformer"),
                                              ("text_encoder", "vae")])
def test_weights_of_another_model_are_rejected(model, component, source):
    """A complete safetensors file with the wrong tensors: the libraries would leave parameters random
    (transformers) or on the meta device (diffusers); here it is one line naming the folder."""
    shutil.copyfile(model / WEIGHTS[source], model / WEIGHTS[component])
    with pytest.raises(CheckpointFileError) as info:
        load_pipeline(model)
    text = str(info.value)
    assert text.startswith(f"{model / component}: the weights of component '{component}' do not fit its config.json")
    assert "tensors missing" in text and "tensors unexpected" in text and "\n" not in text


def test_sharded_index_naming_a_tensor_its_shard_lacks(model):
    folder = model / "transformer"
    index = {"metadata": {}, "weight_map": {"blocks.0.no_such.weight": "diffusion_pytorch_model.safetensors"}}
    (folder / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointFileError, match=r"lacks tensor 'blocks.0.no_such.weight'"):
        load_pipeline(model)


def test_transformer_only_load_checks_the_file(model):
    file = model / WEIGHTS["transformer"]
    _truncate(file)
    with pytest.raises(CheckpointFileError) as info:
        load_pipeline(model / "transformer", transformer_only=True)
    _assert_one_line(str(info.value), file, "truncated")


@pytest.mark.parametrize("component", sorted(WEIGHTS))
def test_cli_generate_exits_2_with_one_line(model, component, tmp_path, capsys):
    file = model / WEIGHTS[component]
    _truncate(file)
    out = tmp_path / "out.mp4"
    rc = main(["generate", "--model", str(model), "--prompt", "a cat", "--steps", "1", "--out", str(out)])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and not out.exists()
    assert err.startswith("error: ") and "\n" not in err
    _assert_one_line(err[len("error: "):], file, "truncated: header says")


def test_cli_subprocess_prints_no_traceback(model, tmp_path):
    """The real command: status 2, stderr is the one error line."""
    _zero_length(model / WEIGHTS["vae"])
    proc = subprocess.run(
        [sys.executable, "-m", "anyflow", "generate", "--model", str(model), "--prompt", "a cat", "--steps", "1",
         "--out", str(tmp_path / "out.mp4")],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last == f"error: {model / WEIGHTS['vae']}: empty file (0 bytes), expected a safetensors file"
