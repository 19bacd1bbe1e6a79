"""anyflow.models.loading: both checkpoint layouts, both model kinds, and the error paths (CPU, tiny models)."""

import json
import shutil
import subprocess
import sys

import pytest
import torch

from anyflow.models.loading import DEFAULT_CHUNK_PARTITION, load_pipeline
from anyflow.models.tiny import TINY_CHECKPOINT_CHUNK_PARTITION, save_tiny_checkpoint, tiny_pipeline

KINDS = ("far", "bidirectional")
LAYOUTS = ("upstream", "legacy")


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt")
    return {
        (kind, layout): save_tiny_checkpoint(root / f"{kind}-{layout}", kind=kind, seed=3, layout=layout)
        for kind in KINDS
        for layout in LAYOUTS
    }


def _reference(kind):
    overrides = {"chunk_partition": TINY_CHECKPOINT_CHUNK_PARTITION} if kind == "far" else {}
    return tiny_pipeline(kind, seed=3, **overrides)


def _snapshot(folder):
    return {p: (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(folder.rglob("*"))}


def _assert_same_state(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert sa[key].dtype == sb[key].dtype, key
        assert torch.equal(sa[key], sb[key]), key


def test_legacy_layout_files_look_like_the_converter(checkpoints):
    far = checkpoints["far", "legacy"]
    index = json.loads((far / "model_index.json").read_text())
    assert index["_class_name"] == "FARWanAnyFlowPipeline"
    assert index["transformer"] == ["far.models.transformer_far_wan_model", "FAR_Wan_Transformer3DModel"]
    assert index["scheduler"] == ["far.schedulers.scheduling_flowmap_euler_discrete", "FlowMapDiscreteScheduler"]
    cfg = json.loads((far / "transformer" / "config.json").read_text())
    assert cfg["_class_name"] == "FAR_Wan_Transformer3DModel"
    assert cfg["init_far_model"] is True and cfg["init_flowmap_model"] is True
    assert cfg["qk_norm"] == "rms_norm_across_heads" and cfg["added_kv_proj_dim"] is None
    sched = json.loads((far / "scheduler" / "scheduler_config.json").read_text())
    assert sched["_class_name"] == "FlowMapDiscreteScheduler" and sched["weight_type"] == "gaussian"
    bidir = json.loads((checkpoints["bidirectional", "legacy"] / "transformer" / "config.json").read_text())
    assert bidir["init_far_model"] is False and bidir["chunk_partition"] is None


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("kind", KINDS)
def test_loads_right_classes_with_identical_weights(checkpoints, kind, layout):
    from diffusers import (
        AnyFlowFARPipeline,
        AnyFlowFARTransformer3DModel,
        AnyFlowPipeline,
        AnyFlowTransformer3DModel,
        FlowMapEulerDiscreteScheduler,
    )

    folder = checkpoints[kind, layout]
    before = _snapshot(folder)
    pipe = load_pipeline(folder)
    assert _snapshot(folder) == before, "the loader must not write into the checkpoint folder"

    if kind == "far":
        pipe_cls, model_cls = AnyFlowFARPipeline, AnyFlowFARTransformer3DModel
    else:
        pipe_cls, model_cls = AnyFlowPipeline, AnyFlowTransformer3DModel
    assert type(pipe) is pipe_cls and type(pipe.transformer) is model_cls
    assert isinstance(pipe.scheduler, FlowMapEulerDiscreteScheduler) and pipe.scheduler.config.shift == 5.0
    ref = _reference(kind)
    for name in ("transformer", "text_encoder", "vae"):
        _assert_same_state(getattr(pipe, name), getattr(ref, name))
    if kind == "far":
        assert list(pipe.transformer.config.chunk_partition) == list(TINY_CHECKPOINT_CHUNK_PARTITION)
    assert pipe.tokenizer("a red panda").input_ids == ref.tokenizer("a red panda").input_ids


def test_transformer_only_and_dtype(checkpoints):
    from diffusers import AnyFlowFARTransformer3DModel

    model = load_pipeline(checkpoints["far", "legacy"], dtype=torch.bfloat16, transformer_only=True)
    assert type(model) is AnyFlowFARTransformer3DModel
    assert model.blocks[0].attn1.to_q.weight.dtype == torch.bfloat16
    # diffusers' keep-in-fp32 rule applies as with from_pretrained(torch_dtype=bf16)
    assert model.condition_embedder.time_embedder.linear_1.weight.dtype == torch.float32
    same = load_pipeline(checkpoints["far", "legacy"] / "transformer", transformer_only=True)
    assert type(same) is AnyFlowFARTransformer3DModel


def test_loaded_far_pipeline_reproduces_latents(checkpoints):
    ref = _reference("far")
    loaded = load_pipeline(checkpoints["far", "legacy"])
    kwargs = dict(prompt="a red panda eating bamboo", height=32, width=32, num_frames=21, num_inference_steps=2,
                  output_type="latent")
    ref.set_progress_bar_config(disable=True)
    loaded.set_progress_bar_config(disable=True)
    a = ref(generator=torch.Generator().manual_seed(0), **kwargs).frames
    b = loaded(generator=torch.Generator().manual_seed(0), **kwargs).frames
    assert a.shape == (1, 16, 6, 4, 4)
    assert torch.isfinite(a).all()
    assert torch.equal(a, b)


def test_sharded_weights_and_unknown_keys(checkpoints, tmp_path):
    folder = shutil.copytree(checkpoints["far", "upstream"], tmp_path / "sharded")
    ref = _reference("far")
    tdir = folder / "transformer"
    for f in tdir.glob("diffusion_pytorch_model*"):
        f.unlink()
    ref.transformer.save_pretrained(tdir, max_shard_size="20KB")
    assert (tdir / "diffusion_pytorch_model.safetensors.index.json").is_file()
    cfg = json.loads((tdir / "config.json").read_text())
    cfg["some_future_key"] = 123
    (tdir / "config.json").write_text(json.dumps(cfg))
    _assert_same_state(load_pipeline(folder, transformer_only=True), ref.transformer)


def test_legacy_far_without_chunk_partition_gets_the_default(checkpoints, tmp_path):
    folder = shutil.copytree(checkpoints["far", "legacy"], tmp_path / "nocp")
    cfg_file = folder / "transformer" / "config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg["chunk_partition"] = None
    cfg_file.write_text(json.dumps(cfg))
    model = load_pipeline(folder, transformer_only=True)
    assert list(model.config.chunk_partition) == DEFAULT_CHUNK_PARTITION


def _edit_transformer_config(src, dst, **changes):
    folder = shutil.copytree(src, dst)
    cfg_file = folder / "transformer" / "config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg.update(changes)
    cfg_file.write_text(json.dumps(cfg))
    return folder


def test_unknown_transformer_class_is_named(checkpoints, tmp_path):
    folder = _edit_transformer_config(checkpoints["far", "upstream"], tmp_path / "x", _class_name="MysteryDiT")
    with pytest.raises(ValueError, match="MysteryDiT") as info:
        load_pipeline(folder)
    assert "AnyFlowFARTransformer3DModel" in str(info.value) and "FAR_Wan_Transformer3DModel" in str(info.value)


def test_legacy_without_flowmap_is_rejected(checkpoints, tmp_path):
    folder = _edit_transformer_config(checkpoints["far", "legacy"], tmp_path / "x", init_flowmap_model=False)
    with pytest.raises(ValueError, match="init_flowmap_model"):
        load_pipeline(folder)


@pytest.mark.parametrize("component", ["vae", "text_encoder", "tokenizer", "scheduler", "transformer"])
def test_missing_component_is_named(checkpoints, tmp_path, component):
    folder = shutil.copytree(checkpoints["far", "legacy"], tmp_path / "x")
    shutil.rmtree(folder / component)
    with pytest.raises(FileNotFoundError, match=f"'{component}'"):
        load_pipeline(folder)


def test_missing_weights_are_named(checkpoints, tmp_path):
    folder = shutil.copytree(checkpoints["bidirectional", "upstream"], tmp_path / "x")
    (folder / "transformer" / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="'transformer' has no weights"):
        load_pipeline(folder)


def test_missing_folder_and_model_index(checkpoints, tmp_path):
    with pytest.raises(FileNotFoundError, match="does-not-exist"):
        load_pipeline(tmp_path / "does-not-exist")
    folder = shutil.copytree(checkpoints["far", "upstream"], tmp_path / "x")
    (folder / "model_index.json").unlink()
    with pytest.raises(FileNotFoundError, match="model_index.json"):
        load_pipeline(folder)


def test_import_anyflow_does_not_import_diffusers():
    code = (
        "import sys, anyflow, anyflow.models, anyflow.models.loading, anyflow.io, anyflow.cli;"
        " print('diffusers' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
