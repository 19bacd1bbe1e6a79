"""Training configs: official presets (reference spec §9), YAML round trip, errors."""

import pytest

from anyflow.training import config as C


def test_official_pretrain_presets():
    for size, batch, iters in (("1.3b", 2, 6000), ("14b", 1, 4000)):
        cfg = C.preset(f"bidirectional-pretrain-{size}")
        assert (cfg.phase, cfg.model.kind, cfg.batch_size, cfg.total_iter) == ("pretrain", "bidirectional", batch, iters)
        o = cfg.optimizer
        assert (o.lr, tuple(o.betas), o.weight_decay, o.warmup_steps, o.max_grad_norm) == (5e-5, (0.9, 0.95), 0.0, 1000, 1.0)
        assert (cfg.ema.decay, cfg.ema.warmup_steps) == (0.999, 1000)
        fmc = cfg.flowmap
        assert (fmc.diffusion_ratio, fmc.consistency_ratio, fmc.epsilon, fmc.fuse_guidance_scale, fmc.weight_type) == (
            0.5, 0.25, 5.0, 3.0, "beta08")
        assert fmc.derivative == "fd" and not fmc.bf16_timesteps and fmc.i2v_prob == 0.0
        assert (cfg.shift, cfg.drop_text_ratio, cfg.seed, cfg.mixed_precision, cfg.gradient_checkpointing) == (
            5.0, 0.1, 0, True, True)
        assert cfg.lora.rank == cfg.lora.alpha == 256
        assert "delta_embedder.linear_1" in cfg.lora.target_modules and "attn1.to_q" in cfg.lora.target_modules


def test_official_far_and_onpolicy_presets():
    fp = C.preset("far-pretrain-1.3b")
    assert fp.far.chunk_partition == (1, 3, 3, 3, 3, 3, 3, 2) and fp.far.full_chunk_limit == 3
    assert (fp.far.long_context_ratio, fp.far.bidirectional_modeling_prob) == (0.5, 0.1)
    assert fp.lora.extra_trainable == ("far_patch_embedding",)
    fo = C.preset("far-onpolicy-14b")
    assert fo.far.bidirectional_modeling_prob == 0.0
    assert (fo.optimizer.lr, tuple(fo.optimizer.betas), fo.optimizer.warmup_steps, fo.total_iter) == (2e-6, (0.0, 0.999), 0, 1200)
    assert (fo.ema.decay, fo.ema.warmup_steps) == (0.99, 200)
    d = fo.dmd
    assert (tuple(d.rollout_steps), d.dmd_weight, d.dmd_batch_size, d.real_guidance_scale, d.critic_update_ratio) == (
        (2, 4, 8, 16, 50), 1.0, 1, 3.0, 1)
    assert (d.critic_optimizer.lr, tuple(d.critic_optimizer.betas)) == (2e-6, (0.0, 0.999))
    assert C.preset("bidirectional-onpolicy-1.3b").dmd.dmd_batch_size == 2
    t = C.preset("teacher-14b")
    assert (t.phase, t.batch_size, t.total_iter, t.flowmap.weight_type) == ("teacher", 1, 4000, "gaussian")
    assert "delta_embedder.linear_1" not in t.lora.target_modules
    assert len(C.preset_names()) == 12


def test_yaml_round_trip_and_overrides(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(
        "preset: far-pretrain-1.3b\n"
        "total_iter: 10\n"
        "flowmap:\n  derivative: jvp\n  bf16_timesteps: true\n"
        "far:\n  chunk_partition: [1, 2, 2]\n"
        "optimizer:\n  lr: 1.0e-4\n"
    )
    cfg = C.load_config(path)
    assert cfg.total_iter == 10 and cfg.flowmap.derivative == "jvp" and cfg.flowmap.bf16_timesteps
    assert cfg.flowmap.epsilon == 5.0  # untouched keys keep the preset's value
    assert cfg.far.chunk_partition == (1, 2, 2) and cfg.far.full_chunk_limit == 3
    assert cfg.optimizer.lr == 1e-4 and cfg.optimizer.betas == (0.9, 0.95)
    out = tmp_path / "dump.yaml"
    C.dump_config(cfg, out)
    assert C.load_config(out) == cfg


def test_config_errors():
    with pytest.raises(ValueError, match="flowmpa"):
        C.from_dict({"flowmpa": {}})
    with pytest.raises(ValueError, match="flowmap.derivativ"):
        C.from_dict({"flowmap": {"derivativ": "fd"}})
    with pytest.raises(ValueError, match="flowmap.derivative"):
        C.from_dict({"flowmap": {"derivative": "exact"}})
    with pytest.raises(TypeError, match="batch_size"):
        C.from_dict({"batch_size": "two"})
    with pytest.raises(ValueError, match="preset name"):
        C.preset("far-pretrain-7b")
    with pytest.raises(ValueError, match="far"):
        C.from_dict({"model": {"kind": "far"}})
