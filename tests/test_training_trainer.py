"""Trainer loop, EMA, atomic checkpoints and bit-exact resume."""

import io
import json
import random

import numpy as np
import pytest
import torch

from anyflow.training import checkpoint as ckpt
from anyflow.training.config import from_dict
from anyflow.training.data import SyntheticClips
from anyflow.training.run import build_model
from anyflow.training.trainer import Trainer


def _negative():
    return torch.randn(1, 7, 32, generator=torch.Generator().manual_seed(123))


def _trainer(overrides, output_dir=None, log_stream=None):
    cfg = from_dict(overrides)
    model = build_model(cfg)
    frames = sum(cfg.far.chunk_partition) if cfg.far else 3
    data = SyntheticClips(cfg.batch_size, frames, seed=1)
    return Trainer(model, cfg, data, _negative(), output_dir=output_dir, log_stream=log_stream)


def _assert_same_state(a: Trainer, b: Trainer):
    for (n, p), (m, q) in zip(a.named_params, b.named_params):
        assert n == m and torch.equal(p, q), n
    for n in a.ema.shadow:
        assert torch.equal(a.ema.shadow[n], b.ema.shadow[n]), n
    sa, sb = a.optimizer.state_dict()["state"], b.optimizer.state_dict()["state"]
    for k in sa:
        for key in sa[k]:
            assert torch.equal(sa[k][key], sb[k][key]), (k, key)
    assert torch.equal(a.generator.get_state(), b.generator.get_state())
    assert a.step == b.step and a.data.index == b.data.index


RESUME_CASES = {
    "bidirectional": {"preset": "tiny", "batch_size": 3},
    "far": {"preset": "tiny-far", "batch_size": 2, "far": {"long_context_ratio": 0.7, "bidirectional_modeling_prob": 0.5}},
    "consistency": {"preset": "tiny", "batch_size": 2, "phase": "consistency"},
}


@pytest.mark.parametrize("case", list(RESUME_CASES))
def test_resume_is_bit_exact(case, tmp_path):
    over = {**RESUME_CASES[case], "total_iter": 4}
    straight = _trainer(over)
    straight.fit()
    first = _trainer(over, output_dir=tmp_path)
    first.fit(2)
    path = first.save()
    del first
    # a fresh trainer (new model, optimiser, data iterator, generator) with the global RNGs disturbed
    torch.manual_seed(999), random.seed(999), np.random.seed(999)
    resumed = _trainer(over, output_dir=tmp_path)
    assert resumed.resume() == path and resumed.step == 2
    resumed.fit()
    _assert_same_state(straight, resumed)


def test_resume_after_an_interruption_logs_each_step_once(tmp_path):
    """A run killed after logging past its last checkpoint: the resumed run drops those records and logs
    the steps again, so log.jsonl has one record per step."""
    import json

    cfg = {"preset": "tiny", "total_iter": 4, "save_every": 2}
    a = _trainer(cfg, output_dir=tmp_path)
    a.fit(3)  # checkpoint at step 2, log records 1..3, then "killed"
    b = _trainer(cfg, output_dir=tmp_path)
    assert b.resume() is not None and b.step == 2
    b.fit(2)
    steps = [json.loads(x)["step"] for x in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]


def test_resume_after_a_kill_mid_log_line(tmp_path):
    """A kill while a log record was being written leaves half a line: the resume drops it (it used to fail)."""
    import json

    cfg = {"preset": "tiny", "total_iter": 4, "save_every": 2}
    _trainer(cfg, output_dir=tmp_path).fit(3)
    with open(tmp_path / "log.jsonl", "a") as f:
        f.write('{"step": 4, "loss": 0.')
    b = _trainer(cfg, output_dir=tmp_path)
    assert b.resume() is not None and b.step == 2
    b.fit(2)
    steps = [json.loads(x)["step"] for x in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]


def test_checkpoint_restores_global_rng_and_loads_weights_only(tmp_path):
    tr = _trainer({"preset": "tiny", "total_iter": 1})
    torch.manual_seed(5), random.seed(5), np.random.seed(5)
    path = tr.save(tmp_path / "c.pt")
    expect = (torch.rand(3), random.random(), np.random.rand())
    state = ckpt.load(path)  # weights_only=True: plain containers and tensors only
    ckpt.set_rng_state(state["rng"])
    got = (torch.rand(3), random.random(), np.random.rand())
    assert torch.equal(expect[0], got[0]) and expect[1:] == got[1:]
    assert state["config"]["name"] == "tiny-bidirectional" and state["step"] == 0


class _Boom:
    def __reduce__(self):
        raise RuntimeError("boom while pickling")


def test_atomic_save_leaves_no_partial_file(tmp_path):
    path = tmp_path / "ckpt.pt"
    big = {"w": torch.randn(256, 256)}
    with pytest.raises(RuntimeError, match="boom"):
        ckpt.atomic_save({**big, "z": _Boom()}, path)
    assert list(tmp_path.iterdir()) == []
    ckpt.atomic_save(big, path)
    before = path.read_bytes()
    with pytest.raises(RuntimeError, match="boom"):
        ckpt.atomic_save({"w": torch.zeros(3), "z": _Boom()}, path)
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"] and path.read_bytes() == before
    assert torch.equal(ckpt.load(path)["w"], big["w"])
    assert ckpt.latest_checkpoint(tmp_path) is None
    for step in (2, 10):
        ckpt.atomic_save(big, ckpt.checkpoint_path(tmp_path, step))
    assert ckpt.latest_checkpoint(tmp_path).name == "checkpoint-0000010.pt"


def test_ema_decay_and_warmup():
    p = torch.nn.Parameter(torch.tensor([1.0, 2.0]))
    ema = ckpt.EMA([("p", p)], decay=0.9, warmup_steps=2)
    with torch.no_grad():
        p.fill_(3.0)
    ema.update(0)  # warm-up: a copy
    assert ema.shadow["p"].tolist() == [3.0, 3.0]
    with torch.no_grad():
        p.fill_(5.0)
    ema.update(1)
    assert ema.shadow["p"].tolist() == [5.0, 5.0]
    with torch.no_grad():
        p.fill_(15.0)
    ema.update(2)  # 0.9 * 5 + 0.1 * 15
    torch.testing.assert_close(ema.shadow["p"], torch.tensor([6.0, 6.0]))
    assert ema.shadow["p"].dtype == torch.float32 and ema.shadow["p"].device.type == "cpu"
    m = torch.nn.Module()
    m.p = torch.nn.Parameter(torch.zeros(2))
    ema.copy_to(m)
    torch.testing.assert_close(m.p.detach(), torch.tensor([6.0, 6.0]))


def test_training_loop_logs_and_schedules(tmp_path):
    stream = io.StringIO()
    tr = _trainer({"preset": "tiny", "total_iter": 3, "save_every": 2, "mixed_precision": True,
                   "gradient_checkpointing": True, "trainable": ["blocks.1", "proj_out"]}, tmp_path, stream)
    assert tr.model.gradient_checkpointing
    frozen = {n: p.detach().clone() for n, p in tr.model.named_parameters() if not p.requires_grad}
    assert frozen and all(("blocks.1" in n or "proj_out" in n) for n, _ in tr.named_params)
    records = tr.fit()
    # constant_with_warmup: lr = 0 at the first update, lr * s / warmup after, then lr
    assert [r["lr"] for r in records] == [0.0, 5e-4, 1e-3]
    assert all(np.isfinite(r["loss"]) and np.isfinite(r["grad_norm"]) for r in records)
    assert {"loss_diffusion", "loss_consistency", "loss_free"} <= set(records[0])
    lines = [json.loads(x) for x in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [1, 2, 3]
    assert "step 3/3 loss" in stream.getvalue()
    assert [p.name for p in sorted(tmp_path.glob("checkpoint-*.pt"))] == ["checkpoint-0000002.pt"]
    for n, p in tr.model.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), n


def test_grad_clipping_bounds_the_update():
    tr = _trainer({"preset": "tiny", "total_iter": 1, "optimizer": {"max_grad_norm": 1e-6, "warmup_steps": 0}})
    rec = tr.train_step()
    assert rec["grad_norm"] > 1e-6  # reported before clipping
    total = torch.sqrt(sum((p.grad.float() ** 2).sum() for _, p in tr.named_params))
    assert total <= 1e-6 * 1.01


def test_trainer_errors():
    with pytest.raises(ValueError, match="real_score"):
        _trainer({"preset": "tiny", "phase": "onpolicy"})
    with pytest.raises(ValueError, match="LoRA targets"):
        _trainer({"preset": "tiny", "lora": {"rank": 8, "target_modules": ["no_such_module"]}})
    cfg = from_dict({"preset": "tiny"})
    with pytest.raises(ValueError, match="model.kind"):
        Trainer(build_model(from_dict({"preset": "tiny-far"})), cfg, SyntheticClips(2, 3), _negative())
    with pytest.raises(ValueError, match="trainable"):
        _trainer({"preset": "tiny", "trainable": ["no_such_param"]})
