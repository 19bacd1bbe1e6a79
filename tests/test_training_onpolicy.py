"""On-policy phase (reference spec §7): rollout plan and gradient flow, DMD and critic losses, FAR
rollout through the KV cache, the on-policy trainer loop and its bit-exact resume."""

import copy
import io
import random

import numpy as np
import pytest
import torch

from anyflow.models.bidirectional import bidirectional_forward
from anyflow.models.blocks import TextContext, prepare_text
from anyflow.models.far import FARRunner
from anyflow.samplers.schedule import shift_sigma, time_grid
from anyflow.models.tiny import tiny_transformer
from anyflow.training import flowmap as fm
from anyflow.training import onpolicy as op
from anyflow.training.config import from_dict
from anyflow.training.data import SyntheticClips
from anyflow.training.run import build_model
from anyflow.training.trainer import Trainer

SHAPE = (2, 3, 16, 8, 8)


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _negative():
    return torch.randn(1, 7, 32, generator=_gen(123))


@pytest.fixture(scope="module")
def nets():
    return tiny_transformer("bidirectional", seed=3), tiny_transformer("bidirectional", seed=5)


# ----------------------------------------------------------------------------------------------
# rollout plan and gradient flow
# ----------------------------------------------------------------------------------------------
def test_rollout_plan_segments():
    for n in (2, 4, 8, 16, 50):
        grid = time_grid(n, 5.0).tolist()
        for g in range(n):
            plan = op.rollout_plan(n, g, 5.0)
            names = [s[0] for s in plan.segments]
            expect = (["S1"] if g > 0 else []) + ["S2"] + (["S3"] if g + 1 < n else [])
            assert names == expect, (n, g)
            assert len(plan.segments) in (2, 3) or n == 1
            # the jumps chain from 1000 to 0 through t_g and t_{g+1}
            assert plan.segments[0][1] == 1000.0 and plan.segments[-1][2] == 0.0
            assert all(a[2] == b[1] for a, b in zip(plan.segments, plan.segments[1:]))
            s2 = dict((s[0], s[1:]) for s in plan.segments)["S2"]
            assert s2 == (grid[g], grid[g + 1])
    with pytest.raises(ValueError):
        op.rollout_plan(4, 4, 5.0)
    # N ~ U{steps}, g* ~ U{0..N-1}
    g = _gen(0)
    plans = [op.sample_plan((2, 4, 8), 5.0, g) for _ in range(600)]
    ns = [p.num_steps for p in plans]
    assert set(ns) == {2, 4, 8} and all(abs(ns.count(v) / 600 - 1 / 3) < 0.07 for v in (2, 4, 8))
    assert {p.grad_step for p in plans if p.num_steps == 8} == set(range(8))


def _manual_rollout(model, frozen_copy, noise, text, plan, mode):
    """Independent rollout: plain jumps; 'mid' = S1 no-grad, S3 through a frozen copy of the model."""
    z = noise.float()
    b, f = z.shape[:2]
    for name, a, c in plan.segments:
        t, r = torch.full((b, f), a), torch.full((b, f), c)
        if mode == "mid" and name == "S1":
            with torch.no_grad():
                u = bidirectional_forward(model, z, t, r, text)
        elif mode == "mid" and name == "S3":
            u = bidirectional_forward(frozen_copy, z, t, r, text)
        else:
            u = bidirectional_forward(model, z, t, r, text)
        z = z - (a - c) / 1000 * u
    return z


@pytest.mark.parametrize("mode", ["all", "mid"])
def test_rollout_gradient_flow(nets, mode):
    student = copy.deepcopy(nets[0]).train()
    frozen = copy.deepcopy(student).requires_grad_(False)
    g = _gen(1)
    noise, text = torch.randn(SHAPE, generator=g), torch.randn(2, 7, 32, generator=g)
    w = torch.randn(SHAPE, generator=g)
    params = [p for p in student.parameters()]
    plan = op.rollout_plan(4, 1, 5.0)  # S1, S2, S3
    assert len(plan.segments) == 3

    x, nfe = op.bidirectional_rollout(fm.BidirectionalForward(student), noise, text, plan, grad_segments=mode,
                                      params=params)
    assert nfe == 3 and x.requires_grad
    got = torch.autograd.grad((x * w).sum(), params)
    assert all(p.requires_grad for p in params)  # un-frozen after S3
    ref = _manual_rollout(student, frozen, noise, text, plan, mode)
    torch.testing.assert_close(x, ref, rtol=0, atol=0)
    expect = torch.autograd.grad((ref * w).sum(), params)
    for a, b in zip(got, expect):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    if mode == "mid":  # differs from "all": S1 and S3 contribute no parameter gradient
        full = torch.autograd.grad((_manual_rollout(student, frozen, noise, text, plan, "all") * w).sum(), params)
        assert any((a - b).abs().max() > 1e-6 for a, b in zip(got, full))
    # the critic's rollout is fully no-grad
    with torch.no_grad():
        x2, _ = op.bidirectional_rollout(fm.BidirectionalForward(student), noise, text, plan, grad=False)
    assert not x2.requires_grad
    torch.testing.assert_close(x2, x.detach(), rtol=0, atol=0)


# ----------------------------------------------------------------------------------------------
# DMD and critic losses
# ----------------------------------------------------------------------------------------------
# the DMD gradient against the gradient of an explicit KL: tests/test_training_toy.py


def test_critic_loss_matches_independent_computation(nets):
    critic = copy.deepcopy(nets[1]).train()
    g = _gen(3)
    x = torch.randn(SHAPE, generator=g).requires_grad_(True)
    eps, text = torch.randn(SHAPE, generator=g), torch.randn(2, 7, 32, generator=g)
    t = op.sample_critic_timesteps(2, 5.0, g)[:, None].expand(2, 3)
    out = op.critic_loss(fm.BidirectionalForward(critic), x, eps, t, text)
    out.loss.backward()
    assert x.grad is None  # student samples are detached
    sig = (t / 1000)[:, :, None, None, None]
    z = sig * eps + (1 - sig) * x.detach()
    u = bidirectional_forward(critic, z, t, t, text)
    ref = ((u - (eps - x.detach())) ** 2).mean()
    torch.testing.assert_close(out.loss, ref, rtol=1e-6, atol=0)
    assert all(p.grad is not None for p in critic.parameters() if p.requires_grad)


def test_timestep_samplers():
    t = op.sample_dmd_timesteps(20000, 5.0, _gen(4), 20.0, 980.0)
    assert t.min() >= 20 and t.max() <= 980
    # shifted uniform: P(t <= 1000 shift(0.5)) = 0.5
    assert abs(float((t <= 1000 * shift_sigma(0.5, 5.0)).float().mean()) - 0.5) < 0.02
    c = op.sample_critic_timesteps(20000, 5.0, _gen(5))
    assert abs(float((c <= 1000 * shift_sigma(0.5, 5.0)).float().mean()) - 0.5) < 0.02  # logit-normal median


# ----------------------------------------------------------------------------------------------
# FAR rollout through the KV cache
# ----------------------------------------------------------------------------------------------
CP = (1, 1, 2, 2)


@pytest.fixture(scope="module")
def far_model():
    return tiny_transformer("far", seed=4, chunk_partition=CP)


def test_far_rollout_matches_sampler_and_trains(far_model):
    from anyflow.samplers.far import FARSession, generate

    model = copy.deepcopy(far_model).train()
    g = _gen(6)
    noise = torch.randn(2, sum(CP), 16, 8, 8, generator=g)
    text = torch.randn(2, 7, 32, generator=g)
    plan = op.rollout_plan(8, 3, 5.0)
    with torch.no_grad():
        ro = op.FARRollout(model, text, CP, (8, 8))
        x, nfe = ro.run(noise, plan, grad=False)
        session = FARSession(model, prepare_text(model, text), CP, (8, 8))
        pairs = [(a, b) for _, a, b in plan.segments]
        *_, (_, ref) = generate(session, noise, pairs)
    assert nfe == 3 * len(CP) and ro.cache_steps == len(CP) - 1
    torch.testing.assert_close(x, ref, rtol=1e-4, atol=1e-5)

    params = [p for p in model.parameters()]
    ro = op.FARRollout(model, text, CP, (8, 8))
    xg, _ = ro.run(noise, plan, grad=True, params=params)
    torch.testing.assert_close(xg.detach(), x, rtol=1e-5, atol=1e-6)
    grads = torch.autograd.grad(xg.pow(2).mean(), params, allow_unused=True)
    named = dict(zip([n for n, _ in model.named_parameters()], grads))
    # patch embedding of the current chunk, the blocks and the head get gradient; the compressed
    # patch embedding only feeds the (no-grad) cache steps
    assert named["patch_embedding.weight"] is not None and named["proj_out.weight"].abs().sum() > 0
    assert named["blocks.0.attn1.to_q.weight"].abs().sum() > 0
    assert named["far_patch_embedding.weight"] is None
    # context is detached: the last chunk's output has no gradient path to earlier chunks' noise
    nz = noise.clone().requires_grad_(True)
    xg2, _ = op.FARRollout(model, text, CP, (8, 8)).run(nz, plan, grad=True, params=params)
    (gn,) = torch.autograd.grad(xg2[:, -2:].sum(), nz)
    assert gn[:, :-2].abs().max() == 0 and gn[:, -2:].abs().max() > 0


# ----------------------------------------------------------------------------------------------
# which rollout segments carry gradient (reference §7.1: parity "all"; "mid" = only S2 differentiated)
# ----------------------------------------------------------------------------------------------
class _PerSegmentForward(fm.BidirectionalForward):
    """Jump i of a bidirectional rollout runs on its own copy i of the student (same weights), so the
    gradient a copy receives is exactly the parameter gradient that flows through that jump; every
    output is recorded as ``(i, u)``."""

    def __init__(self, copies):
        super().__init__(copies[0])
        self.copies, self.outputs = copies, []

    def prepare_text(self, text):
        return TextContext(text, text.dtype)  # raw: every copy projects it itself

    def __call__(self, z, t, r, text):
        i = len(self.outputs) % len(self.copies)
        u = bidirectional_forward(self.copies[i], z, t, r, text.tokens)
        self.outputs.append((i, u))
        return u


class _PerSegmentFAR(op.FARRollout):
    """The FAR rollout with jump i of every chunk on copy i (cache steps on copy 0, without grad)."""

    def __init__(self, copies, text, cp):
        super().__init__(copies[0], text, cp, (8, 8))
        self.copies, self.raw, self.outputs = copies, text, []

    def velocity(self, k, z, t, r, text=None, state=None):
        i = self.nfe % len(self.copies)
        self.nfe += 1
        model = self.copies[i]
        state = self.cache.snapshot() if torch.is_grad_enabled() else self.cache
        u = FARRunner(model, self.runner.cp, (8, 8)).step(k, z, t, r, prepare_text(model, self.raw), state)
        self.outputs.append((i, u))
        return u


def _segment_gradients(kind, mode):
    """``{segment: (norm of the parameter gradient through it or None, norm of d loss / d its output or
    None)}`` for ``loss = <w, x_hat>`` of a 3-jump rollout."""
    g = _gen(8)
    base = tiny_transformer(kind, seed=2, **({"chunk_partition": CP} if kind == "far" else {})).train()
    copies = [copy.deepcopy(base) for _ in range(3)]
    frames = sum(CP) if kind == "far" else 3
    noise, text = torch.randn(1, frames, 16, 8, 8, generator=g), torch.randn(1, 7, 32, generator=g)
    w = torch.randn(1, frames, 16, 8, 8, generator=g)
    params = [p for c in copies for p in c.parameters()]
    plan = op.rollout_plan(4, 1, 5.0)  # S1 = 1000 -> t_1, S2 = t_1 -> t_2, S3 = t_2 -> 0
    if kind == "far":
        rec = _PerSegmentFAR(copies, text, CP)
        x, _ = rec.run(noise, plan, grad=True, grad_segments=mode, params=params)
    else:
        rec = _PerSegmentForward(copies)
        x, _ = op.bidirectional_rollout(rec, noise, text, plan, grad_segments=mode, params=params)
    loss = (x * w).sum()
    tracked = [(i, u) for i, u in rec.outputs if u.requires_grad]
    du = {}
    for (i, _), d in zip(tracked, torch.autograd.grad(loss, [u for _, u in tracked], retain_graph=True)):
        du[i] = du.get(i, 0.0) + float(d.norm())
    loss.backward()
    out = {}
    for i, name in enumerate(op.SEGMENT_NAMES):
        grads = [p.grad for p in copies[i].parameters() if p.grad is not None]
        out[name] = (float(torch.stack([q.norm() for q in grads]).norm()) if grads else None, du.get(i))
    return out


@pytest.mark.parametrize("kind", ["bidirectional", "far"])
def test_grad_segments_which_segments_carry_gradient(kind):
    # "all" (official parity): the parameters get gradient through all three jumps
    seg = _segment_gradients(kind, "all")
    assert all(seg[n][0] and seg[n][0] > 0 and seg[n][1] > 0 for n in op.SEGMENT_NAMES), seg
    # "mid": S1 runs without graph (no parameter gradient, x_hat does not depend on its output);
    # S3 is differentiated w.r.t. its input only, so x_hat still depends on S2, which alone gives the
    # parameter gradient
    seg = _segment_gradients(kind, "mid")
    assert seg["S1"] == (None, None), seg
    assert seg["S2"][0] > 0 and seg["S2"][1] > 0, seg
    assert seg["S3"][0] is None and seg["S3"][1] > 0, seg


@pytest.mark.parametrize("mode", ["all", "mid"])
def test_far_rollout_gradients_with_checkpointing_and_lora(mode):
    """Per-block activation checkpointing gives the gradients of the plain backward: the recompute
    (in the backward) reads the cache snapshot of its chunk, not the cache later steps overwrote, and
    sees the parameters frozen that "mid" froze for S3 in the forward."""
    from anyflow.training.config import LoRAConfig
    from anyflow.training.lora import apply_lora

    g = _gen(9)
    noise, text = torch.randn(1, sum(CP), 16, 8, 8, generator=g), torch.randn(1, 7, 32, generator=g)
    w = torch.randn(1, sum(CP), 16, 8, 8, generator=g)
    grads = []
    for checkpointing in (False, True):
        model = tiny_transformer("far", seed=4, chunk_partition=CP).train()
        named = apply_lora(model, LoRAConfig(rank=4, alpha=4))
        torch.manual_seed(0)
        for _, p in named:  # LoRA B starts at zero: make both factors non-trivial
            torch.nn.init.normal_(p, std=0.1)
        model.gradient_checkpointing = checkpointing
        params = [p for _, p in named]
        x, _ = op.FARRollout(model, text, CP, (8, 8)).run(noise, op.rollout_plan(4, 1, 5.0), grad=True,
                                                          grad_segments=mode, params=params)
        grads.append(torch.autograd.grad((x * w).sum(), params))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


# ----------------------------------------------------------------------------------------------
# trainer
# ----------------------------------------------------------------------------------------------
def _trainer(over, output_dir=None, log_stream=None):
    cfg = from_dict(over)
    model = build_model(cfg)
    frames = sum(cfg.far.chunk_partition) if cfg.far else 3
    data = SyntheticClips(cfg.batch_size, frames, seed=1)
    teacher = tiny_transformer("bidirectional", seed=7)
    return Trainer(model, cfg, data, _negative(), real_score=teacher, output_dir=output_dir, log_stream=log_stream)


ONPOLICY = {"preset": "tiny", "phase": "onpolicy", "batch_size": 2, "total_iter": 4,
            "dmd": {"dmd_batch_size": 1, "rollout_steps": [2, 4, 8], "critic_update_ratio": 2,
                    "critic_optimizer": {"lr": 1e-3}}}


def test_onpolicy_trainer_steps_and_schedule(tmp_path):
    stream = io.StringIO()
    tr = _trainer({**ONPOLICY, "total_iter": 3, "save_every": 3}, tmp_path, stream)
    assert not any(p.requires_grad for p in tr.real_score.parameters())
    teacher_before = {n: p.clone() for n, p in tr.real_score.named_parameters()}
    critic_before = {n: p.detach().clone() for n, p in tr.critic_params}
    recs = tr.fit()
    # generator step every critic_update_ratio = 2 iterations, critic step every iteration
    assert ["loss_dmd" in r for r in recs] == [True, False, True]
    assert all("loss_critic" in r and np.isfinite(r["loss_critic"]) for r in recs)
    assert all(np.isfinite(r["loss_dmd"]) and np.isfinite(r["loss_forward"]) for r in recs if "loss_dmd" in r)
    assert all(r["rollout_nfe"] in (2, 3) for r in recs if "loss_dmd" in r)
    assert tr.optimizer.state_dict()["param_groups"][0]["betas"] == (0.9, 0.95)
    assert tr.critic_optimizer.state_dict()["param_groups"][0]["betas"] == (0.0, 0.999)
    for n, p in tr.real_score.named_parameters():
        assert torch.equal(p, teacher_before[n])
    assert any(not torch.equal(p, critic_before[n]) for n, p in tr.critic_params)
    assert (tmp_path / "checkpoint-0000003.pt").is_file() and "step 3/3" in stream.getvalue()


def test_onpolicy_without_cotraining_uses_only_dmd():
    tr = _trainer({**ONPOLICY, "total_iter": 1, "dmd": {**ONPOLICY["dmd"], "cotrain_forward": False}})
    rec = tr.train_step()
    assert "loss_forward" not in rec and rec["loss"] == pytest.approx(rec["loss_dmd"])
    assert rec["grad_norm"] > 0


def test_onpolicy_far_trainer_gradients():
    tr = _trainer({"preset": "tiny-far", "phase": "onpolicy", "batch_size": 1, "total_iter": 1,
                   "trainable": ["blocks", "far_patch_embedding"],
                   "far": {"chunk_partition": [1, 1, 2], "long_context_ratio": 0.0},
                   "dmd": {"dmd_batch_size": 1, "rollout_steps": [4], "cotrain_forward": False}})
    rec = tr.train_step()
    assert np.isfinite(rec["loss_dmd"]) and np.isfinite(rec["loss_critic"]) and rec["rollout_nfe"] in (6, 9)
    assert rec["grad_norm"] > 0
    with_grad = {n for n, p in tr.named_params if p.grad is not None and p.grad.abs().sum() > 0}
    assert {n for n, _ in tr.named_params if n.startswith("blocks.")} <= with_grad


@pytest.mark.parametrize("mode", ["all", "mid"])
def test_onpolicy_resume_is_bit_exact(tmp_path, mode):
    over = {**ONPOLICY, "dmd": {**ONPOLICY["dmd"], "grad_segments": mode}}
    straight = _trainer(over)
    straight.fit()
    first = _trainer(over, output_dir=tmp_path)
    first.fit(1)  # stops between a generator and a generator-less iteration
    path = first.save()
    del first
    torch.manual_seed(999), random.seed(999), np.random.seed(999)
    resumed = _trainer(over, output_dir=tmp_path)
    assert resumed.resume() == path and resumed.step == 1
    resumed.fit()
    for (n, p), (m, q) in zip(straight.named_params, resumed.named_params):
        assert n == m and torch.equal(p, q), n
    for (n, p), (m, q) in zip(straight.critic_params, resumed.critic_params):
        assert n == m and torch.equal(p, q), n
    for n in straight.ema.shadow:
        assert torch.equal(straight.ema.shadow[n], resumed.ema.shadow[n]), n
    for a, b in ((straight.optimizer, resumed.optimizer), (straight.critic_optimizer, resumed.critic_optimizer)):
        sa, sb = a.state_dict()["state"], b.state_dict()["state"]
        assert sa.keys() == sb.keys() and sa
        for k in sa:
            for key in sa[k]:
                assert torch.equal(sa[k][key], sb[k][key]), (k, key)
    assert torch.equal(straight.generator.get_state(), resumed.generator.get_state())
    assert straight.data.index == resumed.data.index
