"""The rCM-like baseline of the any-step study: consistency distillation + DMD (``dmd.student: consistency``).

Its DMD sample is multistep consistency sampling cut at the gradient step (DMD2's backward simulation):
run to the last step it equals the consistency sampler users of the baseline run, the gradient reaches the
parameters through the last endpoint only, and one trainer step optimises DMD plus the consistency loss.
"""

import pytest
import torch

from anyflow.models.tiny import tiny_transformer
from anyflow.training import consistency as cons
from anyflow.training import flowmap as fm
from anyflow.training import onpolicy as op
from anyflow.training.config import from_dict
from anyflow.training.data import SyntheticClips
from anyflow.training.run import build_model
from anyflow.training.trainer import Trainer

SHIFT = 3.0


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, 3, 16, 8, 8, generator=g), torch.randn(2, 7, 32, generator=g)


def test_cut_at_the_last_step_equals_the_consistency_sampler():
    model = tiny_transformer("bidirectional", seed=3).eval()
    fwd = fm.BidirectionalForward(model)
    noise, text = _inputs()
    for n in (1, 3, 4):
        plan = op.rollout_plan(n, n - 1, SHIFT)
        got, nfe = op.consistency_rollout(fwd, noise, text, plan, SHIFT, torch.Generator().manual_seed(5),
                                          grad=False)
        want = cons.consistency_sample(fwd, noise, text, n, SHIFT, generator=torch.Generator().manual_seed(5))
        assert nfe == n
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_gradient_flows_through_the_gradient_step_only():
    model = tiny_transformer("bidirectional", seed=3)
    fwd = fm.BidirectionalForward(model)
    noise, text = _inputs(1)
    plan = op.rollout_plan(4, 2, SHIFT)
    x, nfe = op.consistency_rollout(fwd, noise, text, plan, SHIFT, torch.Generator().manual_seed(2))
    assert nfe == 3
    w = torch.randn(x.shape, generator=torch.Generator().manual_seed(9))
    (x * w).sum().backward()
    got = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    assert got
    # the same endpoint evaluated on the detached input of step 2 gives the same parameter gradient
    model.zero_grad(set_to_none=True)
    with torch.no_grad():
        z, _ = op.consistency_rollout(fwd, noise, text, op.rollout_plan(4, 1, SHIFT), SHIFT,
                                      torch.Generator().manual_seed(2), grad=False)
        grid = op.time_grid(4, SHIFT)
        eps = torch.randn(z.shape, generator=_after_draws(2, z.shape, 1))
        z = fm.noise_latents(z, eps, torch.full(z.shape[:2], float(grid[2]))).float()
    t = torch.full(z.shape[:2], float(grid[2]))
    (cons.endpoint(fwd, z, t, text) * w).sum().backward()
    for n, p in model.named_parameters():
        if n in got:
            torch.testing.assert_close(p.grad, got[n], rtol=1e-5, atol=1e-7)
        else:
            assert p.grad is None or not p.grad.any(), n


def _after_draws(seed, shape, k):
    """A generator seeded with ``seed`` after ``k`` draws of ``shape`` (the re-noising draws already made)."""
    g = torch.Generator().manual_seed(seed)
    for _ in range(k):
        torch.randn(shape, generator=g)
    return g


CD_DMD = {"preset": "tiny", "phase": "onpolicy", "batch_size": 2, "total_iter": 2,
          "dmd": {"dmd_batch_size": 1, "rollout_steps": [1, 2, 4], "student": "consistency", "real_guidance_scale": 0.0},
          "consistency": {"num_intervals": 8, "teacher_guidance_scale": 1.0}}


def test_a_trainer_step_trains_dmd_and_the_consistency_loss():
    cfg = from_dict(CD_DMD)
    model = build_model(cfg)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    tr = Trainer(model, cfg, SyntheticClips(2, 3, seed=1), torch.randn(1, 7, 32), log_stream=None,
                 real_score=tiny_transformer("bidirectional", seed=7))
    assert isinstance(tr.phase.forward_phase, cons.ConsistencyPhase)
    for _ in range(2):
        rec = tr.train_step()
        for key in ("loss_dmd", "loss_consistency", "loss_critic"):
            assert key in rec and torch.isfinite(torch.tensor(rec[key])), (key, rec)
    assert any(not torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_bad_student_and_far_student_raise():
    with pytest.raises(ValueError, match="dmd.student"):
        from_dict({**CD_DMD, "dmd": {**CD_DMD["dmd"], "student": "cm"}})
    cfg = from_dict({**CD_DMD, "preset": "tiny-far"})
    with pytest.raises(ValueError, match="bidirectional students only"):
        Trainer(build_model(cfg), cfg, SyntheticClips(2, 5, seed=1), torch.randn(1, 7, 32), log_stream=None,
                real_score=tiny_transformer("bidirectional", seed=7))
