"""LoRA through peft: targets, effective weights on the op-layer path, merged export, training."""

import copy

import numpy as np
import pytest
import torch

pytest.importorskip("peft")

from anyflow.models.bidirectional import bidirectional_forward  # noqa: E402
from anyflow.models.tiny import tiny_transformer  # noqa: E402
from anyflow.training.config import STUDENT_LORA_TARGETS, TEACHER_LORA_TARGETS, LoRAConfig, from_dict  # noqa: E402
from anyflow.training.lora import apply_lora, merged_state_dict  # noqa: E402
from anyflow.training.data import SyntheticClips  # noqa: E402
from anyflow.training.run import build_model  # noqa: E402
from anyflow.training.trainer import Trainer  # noqa: E402


def _randomise(params, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in params:
            p.copy_(0.1 * torch.randn(p.shape, generator=g))


def test_lora_targets_and_trainable_params():
    m = tiny_transformer("far", seed=1, chunk_partition=(1, 1, 2))
    params = apply_lora(m, LoRAConfig(rank=4, alpha=8, extra_trainable=("far_patch_embedding",)))
    names = [n for n, _ in params]
    assert all(".lora_A." in n or ".lora_B." in n or "far_patch_embedding" in n for n in names)
    # 2 blocks x 6 targets + 4 embedder linears, A and B each; far_patch_embedding weight + bias
    assert sum(".lora_A." in n for n in names) == 2 * 6 + 4 and sum("far_patch_embedding" in n for n in names) == 2
    assert {n for n, p in m.named_parameters() if p.requires_grad} == set(names)
    t = tiny_transformer("bidirectional", seed=1)
    tp = apply_lora(t, LoRAConfig(rank=4, alpha=4, target_modules=TEACHER_LORA_TARGETS))
    assert not any("embedder" in n for n, _ in tp) and len(tp) == 2 * 2 * 6
    assert set(STUDENT_LORA_TARGETS) > set(TEACHER_LORA_TARGETS)


def test_lora_effective_weight_and_merged_export():
    m = tiny_transformer("bidirectional", seed=2)
    plain = copy.deepcopy(m)
    params = apply_lora(m, LoRAConfig(rank=4, alpha=8))
    g = torch.Generator().manual_seed(0)
    z, txt = torch.randn(2, 3, 16, 8, 8, generator=g), torch.randn(2, 7, 32, generator=g)
    t, r = torch.full((2, 3), 700.0), torch.full((2, 3), 200.0)
    # B = 0 at init: the adapted model is the base model
    torch.testing.assert_close(bidirectional_forward(m, z, t, r, txt), bidirectional_forward(plain, z, t, r, txt))
    _randomise(params)
    merged = merged_state_dict(m)
    assert set(merged) == set(plain.state_dict())
    lin = m.condition_embedder.time_embedder.linear_1
    expect = lin.base_layer.weight + (8 / 4) * lin.lora_B["default"].weight @ lin.lora_A["default"].weight
    torch.testing.assert_close(merged["condition_embedder.time_embedder.linear_1.weight"], expect)
    plain.load_state_dict(merged)
    out = bidirectional_forward(m, z, t, r, txt)
    torch.testing.assert_close(out, bidirectional_forward(plain, z, t, r, txt), rtol=1e-5, atol=1e-5)
    # the diffusers forward (peft's module forward) agrees with the op layer (effective weights)
    ref = m(hidden_states=z, timestep=t, r_timestep=r, encoder_hidden_states=txt, return_dict=False)[0]
    torch.testing.assert_close(ref, plain(hidden_states=z, timestep=t, r_timestep=r, encoder_hidden_states=txt,
                                          return_dict=False)[0], rtol=1e-5, atol=1e-5)
    # gradients reach the embedder adapters through the fused time-pair embedding
    out.pow(2).mean().backward()
    assert lin.lora_A["default"].weight.grad.abs().sum() > 0
    assert m.condition_embedder.delta_embedder.linear_2.lora_B["default"].weight.grad.abs().sum() > 0


def _negative():
    return torch.randn(1, 7, 32, generator=torch.Generator().manual_seed(123))


def test_far_onpolicy_with_lora_reaches_adapters_and_exports():
    cfg = from_dict({"preset": "tiny-far", "phase": "onpolicy", "batch_size": 1, "total_iter": 2, "seed": 1,
                     "lora": {"rank": 4, "alpha": 4, "extra_trainable": ["far_patch_embedding"]},
                     "optimizer": {"warmup_steps": 0},
                     "far": {"chunk_partition": [1, 1, 2], "full_chunk_limit": 2, "long_context_ratio": 1.0},
                     "dmd": {"dmd_batch_size": 1, "rollout_steps": [4], "critic_optimizer": {"lr": 1e-3}}})
    model = build_model(cfg)
    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    tr = Trainer(model, cfg, SyntheticClips(1, 4, seed=2), _negative(),
                 real_score=tiny_transformer("bidirectional", seed=7), log_stream=None)
    assert any(".lora_" in n for n, _ in tr.critic_params)
    assert all(".lora_" in n or "far_patch_embedding" in n for n, _ in tr.named_params)
    with torch.no_grad():  # non-zero B so that every adapter gets gradient at the first step
        for n, p in tr.named_params:
            if ".lora_B." in n:
                p.normal_(0, 0.05)
    rec = tr.train_step()
    assert np.isfinite(rec["loss_dmd"]) and np.isfinite(rec["loss_forward"]) and np.isfinite(rec["loss_critic"])
    grads = {n: p.grad for n, p in tr.named_params}
    lora_names = [n for n in grads if ".lora_" in n]
    assert lora_names and all(grads[n] is not None and grads[n].abs().sum() > 0 for n in lora_names)
    # through the co-trained causal loss when it has compressed context (3 chunks, 2 full)
    assert rec["num_chunks"] == 3 and grads["far_patch_embedding.weight"].abs().sum() > 0
    tr.train_step()
    # base weights never move; the export folds the EMA adapters in under the original names
    for n, p in model.named_parameters():
        if ".base_layer." in n:
            assert torch.equal(p, base[n.replace(".base_layer.", ".")]), n
    exported = tr.export_state_dict(ema=True)
    assert set(exported) == set(base)
    assert not torch.equal(exported["blocks.0.attn1.to_q.weight"], base["blocks.0.attn1.to_q.weight"])
    assert torch.equal(exported["patch_embedding.weight"], base["patch_embedding.weight"])
