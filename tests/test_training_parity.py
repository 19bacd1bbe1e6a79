"""Three details of the on-policy trainer that follow the official code (NVlabs/AnyFlow
far/trainers/trainer_wan_anyflow_onpolicy.py, trainer_far_wan_anyflow_onpolicy.py and
trainer_far_wan_anyflow_pretrain.py ``pixel_loss``; options/train/anyflow/*/onpolicy YAMLs). Each test fails
on the behaviour before the fix."""

import pytest
import torch

from anyflow.models.tiny import tiny_transformer
from anyflow.training import flowmap as fm
from anyflow.training import onpolicy as op
from anyflow.training.config import STUDENT_LORA_TARGETS, TEACHER_LORA_TARGETS, from_dict
from anyflow.training.data import SyntheticClips
from anyflow.training.run import build_model
from anyflow.training.trainer import Trainer


def _negative():
    return torch.randn(1, 7, 32, generator=torch.Generator().manual_seed(123))


def _trainer(over):
    cfg = from_dict(over)
    model = build_model(cfg)
    frames = sum(cfg.far.chunk_partition) if cfg.far else 3
    data = SyntheticClips(cfg.batch_size, frames, seed=1)
    return Trainer(model, cfg, data, _negative(), real_score=tiny_transformer("bidirectional", seed=7),
                   log_stream=None)


ONPOLICY = {"preset": "tiny", "phase": "onpolicy", "batch_size": 3, "total_iter": 1,
            "dmd": {"dmd_batch_size": 1, "rollout_steps": [2], "cotrain_forward": False}}


def test_critic_trains_on_the_first_dmd_batch_size_samples(monkeypatch):
    """Official ``train_step``: the critic step slices ``latents[:dmd_batch_size]``, like the generator."""
    tr = _trainer(ONPOLICY)
    seen = []
    inner = op.critic_loss

    def recording(critic, x, noise, t, text):
        seen.append((x.shape[0], noise.shape[0], t.shape[0], text.clone()))
        return inner(critic, x, noise, t, text)

    monkeypatch.setattr(op, "critic_loss", recording)
    probe = SyntheticClips(3, 3, seed=1)
    next(probe)  # the generator step's batch
    _, critic_text = next(probe)  # the critic step's batch
    rec = tr.train_step()
    assert len(seen) == 1
    xb, nb, tb, text = seen[0]
    assert (xb, nb, tb) == (1, 1, 1)  # was 3: the whole batch
    torch.testing.assert_close(text, critic_text[:1])
    assert torch.isfinite(torch.tensor(rec["loss_critic"]))


@pytest.mark.parametrize("far", [False, True])
def test_critic_lora_targets_attention_and_ffn_only(far):
    """Official on-policy YAMLs: the discriminator's LoRA targets attn1 q/k/v/o and the FFN; only the
    student's adds the time / delta embedders."""
    pytest.importorskip("peft")
    over = {**ONPOLICY, "lora": {"rank": 4, "alpha": 4}}
    if far:
        over = {**over, "preset": "tiny-far", "batch_size": 1, "far": {"chunk_partition": [1, 1, 2]}}
    tr = _trainer(over)
    critic_names = [n for n, _ in tr.critic_params]
    student_names = [n for n, _ in tr.named_params]
    assert critic_names and all(".lora_A." in n or ".lora_B." in n for n in critic_names)
    assert not any("embedder" in n for n in critic_names)  # was: time_embedder / delta_embedder adapters
    assert any("time_embedder" in n for n in student_names) and any("delta_embedder" in n for n in student_names)
    adapted = {n.split(".lora_")[0] for n in critic_names}
    suffixes = {next(s for s in TEACHER_LORA_TARGETS if a.endswith(s)) for a in adapted}
    assert suffixes == set(TEACHER_LORA_TARGETS)
    # 2 tiny blocks x 6 targets
    assert len(adapted) == 2 * len(TEACHER_LORA_TARGETS) < 2 * len(TEACHER_LORA_TARGETS) + len(
        set(STUDENT_LORA_TARGETS) - set(TEACHER_LORA_TARGETS))
    assert not any(p.requires_grad for n, p in tr.critic.named_parameters() if "embedder" in n)


@pytest.mark.parametrize("phase", ["pretrain", "onpolicy"])
def test_far_bidirectional_loss_gets_the_dropped_prompts(monkeypatch, phase):
    """Official FAR ``pixel_loss``: ``prompt_embeds[mask] = negative_embedding`` in place, then both the causal
    and the bidirectional loss read the dropped prompts (the on-policy trainer inherits it)."""
    over = {"preset": "tiny-far", "phase": phase, "batch_size": 4, "total_iter": 1, "drop_text_ratio": 0.5,
            "far": {"chunk_partition": [1, 1, 2], "bidirectional_modeling_prob": 1.0}}
    if phase == "onpolicy":
        over["dmd"] = {"dmd_batch_size": 1, "rollout_steps": [2]}
    tr = _trainer(over)
    causal, bidir = [], []
    inner_fm, inner_bd = fm.flow_map_loss, fm.bidirectional_modeling_loss

    def rec_fm(forward, x, noise, t, r, kind, text, *a, **k):
        causal.append(text.clone())
        return inner_fm(forward, x, noise, t, r, kind, text, *a, **k)

    def rec_bd(model, latents, text, *a, **k):
        bidir.append(text.clone())
        return inner_bd(model, latents, text, *a, **k)

    monkeypatch.setattr(fm, "flow_map_loss", rec_fm)
    monkeypatch.setattr(fm, "bidirectional_modeling_loss", rec_bd)
    _, raw = next(SyntheticClips(4, 4, seed=1))
    rec = tr.train_step()
    assert "loss_bidirectional" in rec and len(causal) == len(bidir) == 1
    torch.testing.assert_close(bidir[0], causal[0])  # was: the un-dropped prompts
    neg = _negative().expand(4, -1, -1)
    dropped = [bool(torch.equal(causal[0][i], neg[i])) for i in range(4)]
    kept = [bool(torch.equal(causal[0][i], raw[i])) for i in range(4)]
    assert any(dropped) and all(a != b for a, b in zip(dropped, kept)), (dropped, kept)
