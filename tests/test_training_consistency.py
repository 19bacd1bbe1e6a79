"""Consistency-distillation baseline: x0 parameterisation, loss, teacher step, multistep sampling."""

import pytest
import torch

from anyflow.models.blocks import TextContext
from anyflow.models.tiny import tiny_transformer
from anyflow.samplers.schedule import time_grid
from anyflow.training import consistency as cons
from anyflow.training import flowmap as fm
from anyflow.training.config import ConsistencyConfig

SHAPE = (3, 2, 16, 8, 8)


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


class _Stub:
    """A flow map with a known output; records (t, r)."""

    def __init__(self, fn):
        self.fn, self.calls = fn, []
        self.model = torch.nn.Linear(1, 1)

    def __call__(self, z, t, r, text):
        self.calls.append((t.clone(), r.clone()))
        return self.fn(z, t, r)

    def take(self, index):
        return self


@pytest.fixture(scope="module")
def model():
    return tiny_transformer("bidirectional", seed=9).train()


def _data(seed=0, shape=SHAPE):
    g = _gen(seed)
    return torch.randn(shape, generator=g), torch.randn(shape, generator=g), torch.randn(shape[0], 7, 32, generator=g)


def test_endpoint_parameterisation():
    x, noise, text = _data()
    t = torch.tensor([[0.0, 0.0], [250.0, 250.0], [1000.0, 1000.0]])
    z = fm.noise_latents(x, noise, t)
    # the straight-path velocity eps - x is the exact mean velocity from t to r = 0: x0 = x
    stub = _Stub(lambda z_, t_, r_: noise - x)
    x0 = cons.endpoint(stub, z, t, text)
    torch.testing.assert_close(x0, x, rtol=1e-5, atol=1e-5)
    assert torch.equal(x0[0], z[0])  # boundary condition f(z_0, 0) = z_0, exactly
    assert (stub.calls[0][1] == 0).all()  # r fixed to 0
    u = torch.randn(SHAPE, generator=_gen(1))
    x0 = cons.endpoint(_Stub(lambda *a: u), z, t, text)
    torch.testing.assert_close(x0, z - (t / 1000)[:, :, None, None, None] * u)


def test_grid():
    grid = cons.consistency_grid(4, 5.0)
    assert grid[0] == 0 and grid[-1] == 1000 and (grid[1:] > grid[:-1]).all()
    torch.testing.assert_close(grid, time_grid(4, 5.0).flip(0))


def test_loss_against_an_independent_computation(model):
    x, noise, text = _data(2)
    fwd = fm.BidirectionalForward(model)
    # one interval: t = 1000, s = 0, so the target is x itself and lambda = 1000 / 1000
    out = cons.consistency_loss(fwd, x, noise, text, ConsistencyConfig(num_intervals=1), 5.0, _gen(0))
    b, f = SHAPE[:2]
    with torch.no_grad():
        u = fwd(noise, torch.full((b, f), 1000.0), torch.zeros(b, f), text)
    ref = ((noise - u) - x).pow(2).mean()
    torch.testing.assert_close(out.loss.detach(), ref, rtol=1e-5, atol=1e-6)
    model.zero_grad()
    out = cons.consistency_loss(fwd, x, noise, text, ConsistencyConfig(num_intervals=16), 5.0, _gen(3))
    assert torch.isfinite(out.loss)
    out.loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


def test_distillation_with_an_exact_teacher_equals_consistency_training(model):
    x, noise, text = _data(4)
    fwd = fm.BidirectionalForward(model)
    cfg = ConsistencyConfig(num_intervals=8, teacher_guidance_scale=1.0)
    teacher = lambda z, t, txt: noise - x  # noqa: E731 - the exact velocity of this sample's path
    a = cons.consistency_loss(fwd, x, noise, text, cfg, 5.0, _gen(5))
    b = cons.consistency_loss(fwd, x, noise, text, cfg, 5.0, _gen(5), teacher=teacher)
    torch.testing.assert_close(a.loss, b.loss, rtol=1e-4, atol=1e-6)
    # CFG with a prompt-dependent teacher: tests/test_training_toy.py
    v = cons.teacher_velocity(model)(fm.noise_latents(x, noise, torch.full(SHAPE[:2], 500.0)),
                                              torch.full(SHAPE[:2], 500.0), text)
    assert v.shape == SHAPE


def test_multistep_sampling():
    x_star = torch.randn(SHAPE, generator=_gen(6))
    # an oracle endpoint map (always x*): every step lands on x*, whatever the fresh noise
    oracle = _Stub(lambda z, t, r: (z - x_star) / (t / 1000)[:, :, None, None, None])
    noise = torch.randn(SHAPE, generator=_gen(7))
    text = TextContext(torch.zeros(SHAPE[0], 7, 32), torch.float32)
    out = cons.consistency_sample(oracle, noise, text, 4, generator=_gen(8))
    torch.testing.assert_close(out, x_star, rtol=1e-4, atol=1e-4)
    ts = [c[0][0, 0].item() for c in oracle.calls]
    assert [round(v, 2) for v in ts] == [1000.0, 937.5, 833.33, 625.0]  # shifted grid, the last jump to 0


def test_sampling_with_the_model(model):
    _, noise, text = _data(8)
    fwd = fm.BidirectionalForward(model)
    one = cons.consistency_sample(fwd, noise, text, 1)
    with torch.no_grad():
        u = fwd(noise, torch.full(SHAPE[:2], 1000.0), torch.zeros(SHAPE[:2]), text)
    torch.testing.assert_close(one, noise - u)
    four = cons.consistency_sample(fwd, noise, text, 4, generator=_gen(1))
    assert four.shape == SHAPE and torch.isfinite(four).all()
