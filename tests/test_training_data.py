"""Training data: real eval clips, pipeline-exact prompt embeddings and latents, TensorClips caption tables,
and the small-VAE trainer."""

from __future__ import annotations

import pytest
import torch

from anyflow.training.data import TensorClips, cut_clips, eval_data_root

pytest.importorskip("diffusers")


def test_cut_clips_windows_and_bounds():
    frames = torch.arange(20.0)[:, None] * torch.ones(20, 3)
    clips = cut_clips(frames, 5, 4)
    assert clips.shape == (4, 5, 3) and clips[:, 0, 0].tolist() == [0, 4, 8, 12]
    assert cut_clips(frames, 5, 4, start=2, stop=12)[:, 0, 0].tolist() == [2, 6]  # 6..10 ends inside stop
    assert cut_clips(frames, 30, 1).shape == (0, 30, 3)
    with pytest.raises(ValueError, match="num_frames and stride"):
        cut_clips(frames, 0, 1)


def test_tensor_clips_caption_table_and_resume():
    g = torch.Generator().manual_seed(0)
    lat, table = torch.randn(7, 2, 3, 2, 2, generator=g), torch.randn(3, 4, 5, generator=g)
    index = torch.tensor([0, 0, 1, 1, 2, 2, 2])
    it = TensorClips(lat, table, batch_size=3, seed=1, text_index=index)
    for _ in range(5):  # crosses epoch boundaries
        x, t = next(it)
        for xi, ti in zip(x, t):
            k = int((lat - xi).flatten(1).abs().sum(1).argmin())
            assert torch.equal(ti, table[index[k]])
    state = it.state_dict()
    a = next(it)
    it2 = TensorClips(lat, table, batch_size=3, seed=1, text_index=index)
    it2.load_state_dict(state)
    b = next(it2)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    with pytest.raises(ValueError, match="text_index must be"):
        TensorClips(lat, table, 2, text_index=index[:3])
    with pytest.raises(ValueError, match=r"text_index must lie in \[0, 3\)"):
        TensorClips(lat, table, 2, text_index=index + 1)


@pytest.mark.eval_data
def test_eval_videos_are_real_footage():
    from anyflow.training.data import load_eval_videos

    videos = load_eval_videos(32, 56, names=["3"])
    assert len(videos) == 1 and videos[0].name == "3" and len(videos[0].caption) > 20
    v = videos[0].frames
    assert v.shape[1:] == (3, 32, 56) and v.shape[0] >= 73 and 0 <= v.min() and v.max() <= 1
    assert v.std() > 0.05  # not blank
    with pytest.raises(ValueError, match="not captioned"):
        load_eval_videos(32, 56, names=["99"])
    with pytest.raises(FileNotFoundError, match="anyflow_eval"):
        eval_data_root("/nonexistent")


def test_encode_prompts_matches_the_pipeline():
    """The training embeddings are exactly what AnyFlowFARPipeline.encode_prompt feeds the transformer."""
    from anyflow.models.tiny import tiny_pipeline
    from anyflow.training.data import encode_prompts

    pipe = tiny_pipeline("far")
    prompts = ["a red panda eating bamboo", "a boat on the sea at sunset, slow camera"]
    ours = encode_prompts(pipe.tokenizer, pipe.text_encoder, prompts, max_sequence_length=24)
    ref, _ = pipe.encode_prompt(prompts, do_classifier_free_guidance=False, max_sequence_length=24,
                                device=torch.device("cpu"))
    assert ours.shape == ref.shape
    # fp32 summation-order noise only (the pipeline call runs with autograd on, ours under no_grad)
    torch.testing.assert_close(ours, ref.detach().float(), rtol=1e-5, atol=1e-5)


def test_encode_decode_latents_use_the_pipeline_normalisation():
    from anyflow.models.tiny import tiny_vae
    from anyflow.training.data import decode_latents, encode_clips

    vae = tiny_vae()
    clips = torch.rand(2, 5, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    lat = encode_clips(vae, clips, batch_size=1)
    assert lat.shape == (2, 2, 16, 2, 2)
    mu = vae.encode(clips.permute(0, 2, 1, 3, 4) * 2 - 1).latent_dist.mean
    mean = torch.tensor(vae.config.latents_mean).view(1, -1, 1, 1, 1)
    std = torch.tensor(vae.config.latents_std).view(1, -1, 1, 1, 1)
    torch.testing.assert_close(lat, ((mu - mean) / std).permute(0, 2, 1, 3, 4), rtol=1e-5, atol=1e-5)
    px = decode_latents(vae, lat)
    assert px.shape == clips.shape and 0 <= px.min() and px.max() <= 1


def test_train_vae_reduces_the_reconstruction_error_and_sets_latent_stats():
    from anyflow.training.autoencoder import VAEConfig, train_vae

    g = torch.Generator().manual_seed(0)
    # smooth moving blobs: learnable in a few steps
    t = torch.linspace(0, 1, 13)[:, None, None, None]
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, 16), torch.linspace(-1, 1, 16), indexing="ij")
    video = torch.sigmoid(4 * (torch.sin(3 * xx + 4 * t) + torch.cos(2 * yy - 3 * t))).expand(13, 3, 16, 16).clone()
    video[:, 1] *= 0.5 + 0.5 * torch.rand(1, generator=g)
    cfg = VAEConfig(base_dim=8, z_dim=4, steps=30, window=5, batch_size=1, lr=3e-3)
    vae, history = train_vae([video], cfg, log_every=10, log=None)
    assert history[-1]["l1"] < history[0]["l1"]
    assert len(vae.config.latents_mean) == 4 and all(s > 0 for s in vae.config.latents_std)
    with pytest.raises(ValueError, match="window must be 1 \\+ 4k"):
        train_vae([video], VAEConfig(window=6, steps=1))
    with pytest.raises(ValueError, match="fewer than window"):
        train_vae([video[:3]], VAEConfig(window=5, steps=1))
