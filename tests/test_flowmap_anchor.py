"""Analytic anchor of the forward flow-map objective (issue 17 item 3).

On Gaussian-mixture data the exact flow map of ``z_t = (1 - s) x + s eps`` is known
(:mod:`anyflow.testing.exact_flow`). The regression target of the forward objective,
``v - (t - r) dU/dt`` with ``v = eps - x`` of one sample and dU/dt along that sample's velocity
(NVlabs/AnyFlow far/trainers/trainer_wan_anyflow_pretrain.py; ``anyflow.training.flowmap.mean_velocity_target``),
must then have conditional mean ``E[target | z_t] = u(z_t, t, r)`` when U is the exact average velocity
(the MeanFlow identity, Geng et al. 2025): the target is unbiased at the exact solution, so the exact flow
map is a fixed point of the regression. The check draws x from the exact posterior ``p(x | z_t)``.
"""

import pytest
import torch

from anyflow.models.blocks import TextContext
from anyflow.testing.exact_flow import GaussianMixture
from anyflow.training import flowmap as fm
from anyflow.training.config import FlowMapConfig

MIXTURE = dict(weights=[0.3, 0.7], means=[-1.5, 1.0], stds=[0.25, 0.5])
GAUSSIAN = dict(weights=[1.0], means=[0.7], stds=[0.4])


def _gen(seed):
    return torch.Generator().manual_seed(seed)


class ExactForward:
    """``u = forward(z [B, 1, D, 1, 1], t [B, 1], r [B, 1], text)``: the exact average velocity of ``gm``
    (``instantaneous``: the velocity at t whatever r, a wrong flow map used as a control)."""

    def __init__(self, gm: GaussianMixture, closed_form: bool = False, instantaneous: bool = False):
        self.gm, self.closed_form, self.instantaneous = gm, closed_form, instantaneous
        self.model = torch.nn.Linear(1, 1).double()

    def __call__(self, z, t, r, text, **kwargs):
        b = z.shape[0]
        zz, tt, rr = z.reshape(b, -1), t[:, :1].to(z.dtype), r[:, :1].to(z.dtype)
        if self.instantaneous:
            u = self.gm.velocity(zz, tt)
        elif self.closed_form:
            u = self.gm.gaussian_average_velocity(zz, tt, rr)
        else:
            u = self.gm.average_velocity(zz, tt, rr)
        return u.reshape(z.shape).to(z.dtype)

    def take(self, index):
        return self


def _text(b):
    return TextContext(torch.zeros(b, 1, 1), torch.float32)


# ----------------------------------------------------------------------------------------------
# the exact flow map itself (independent checks of the anchor)
# ----------------------------------------------------------------------------------------------
def test_exact_flow_map_solves_the_ode_and_transports_the_marginals():
    gm = GaussianMixture.make(**MIXTURE, dims=2)
    g = _gen(0)
    x, eps = gm.sample(4000, g), torch.randn(4000, 2, generator=g, dtype=torch.float64)
    t, r = 700.0, 250.0
    z = 0.3 * x + 0.7 * eps
    # dz/ds = v: a short backward step of the flow map is the velocity
    d = 1e-3
    v_fd = (z[:8] - gm.flow(z[:8], t, t - d)) / (d / 1000)
    torch.testing.assert_close(v_fd, gm.velocity(z[:8], t), rtol=1e-4, atol=1e-4)
    # semigroup: t -> 400 -> r equals t -> r
    torch.testing.assert_close(gm.flow(gm.flow(z[:64], t, 400.0), 400.0, r), gm.flow(z[:64], t, r), rtol=0, atol=1e-9)
    # the pushforward of the t-marginal is the r-marginal: z_r has CDF F_r (KS distance ~ 1/sqrt(n))
    zr = gm.flow(z, t, r).sort(dim=0).values
    ecdf = (torch.arange(1, 4001, dtype=torch.float64) / 4000)[:, None]
    assert (gm.cdf(zr, r) - ecdf).abs().max() < 0.03
    # a single Gaussian: the quantile map equals the closed form
    gauss = GaussianMixture.make(**GAUSSIAN, dims=2)
    tt, rr = torch.full((8, 1), 800.0, dtype=torch.float64), torch.full((8, 1), 100.0, dtype=torch.float64)
    torch.testing.assert_close(gauss.average_velocity(z[:8], tt, rr), gauss.gaussian_average_velocity(z[:8], tt, rr),
                               rtol=1e-8, atol=1e-8)


def test_posterior_sampler_matches_the_joint():
    """Draws of p(x | z_t) have the mean that the joint (x, z_t) gives by regression near z."""
    gm = GaussianMixture.make(**MIXTURE, dims=1)
    g = _gen(1)
    x = gm.sample(400_000, g)
    z = 0.4 * x + 0.6 * torch.randn(x.shape, generator=g, dtype=torch.float64)  # t = 600
    for z0 in (-0.9, 0.1, 0.6):
        near = (z - z0).abs() < 0.01
        post = gm.sample_posterior(torch.tensor([[z0]], dtype=torch.float64), 600.0, 50_000, g)
        assert abs(x[near].mean().item() - post.mean().item()) < 0.03
        exact = gm.posterior_mean(torch.tensor([[z0]], dtype=torch.float64), 600.0).item()
        assert abs(post.mean().item() - exact) < 0.01


# ----------------------------------------------------------------------------------------------
# the forward objective's target is unbiased at the exact flow map
# ----------------------------------------------------------------------------------------------
PAIRS = [(800.0, 0.0), (600.0, 200.0), (900.0, 500.0), (400.0, 100.0)]


def _target_stats(gm, forward, derivative, seed, m=6000):
    """Per (z_t point, pair): mean and standard error over m posterior draws of the forward target, the
    exact u, and the exact velocity at t."""
    g = _gen(seed)
    rows = []
    for t, r in PAIRS:
        x0 = gm.sample(3, g)
        z0 = (1 - t / 1000) * x0 + (t / 1000) * torch.randn(x0.shape, generator=g, dtype=torch.float64)  # [3, D]
        xs = gm.sample_posterior(z0, t, m, g)  # [m, 3, D]
        zs = z0.expand_as(xs)
        eps = (zs - (1 - t / 1000) * xs) / (t / 1000)
        n, d = m * 3, gm.dims
        z5 = zs.reshape(n, 1, d, 1, 1)
        v5 = (eps - xs).reshape(n, 1, d, 1, 1)
        tt = torch.full((n, 1), t, dtype=torch.float64)
        rr = torch.full((n, 1), r, dtype=torch.float64)
        cfg = FlowMapConfig(derivative=derivative, epsilon=2.0, fuse_guidance_scale=1.0)
        target = fm.mean_velocity_target(forward, z5, v5, tt, rr, _text(n), cfg).double().reshape(m, 3, d)
        rows.append((target.mean(0), target.std(0) / m**0.5, gm.average_velocity(z0, t, r), gm.velocity(z0, t)))
    return rows


@pytest.mark.parametrize("data,derivative,closed_form", [
    ("gaussian", "jvp", True), ("gaussian", "fd", False), ("mixture", "fd", False),
])
def test_forward_target_conditional_mean_is_the_exact_average_velocity(data, derivative, closed_form):
    gm = GaussianMixture.make(**(GAUSSIAN if data == "gaussian" else MIXTURE), dims=2)
    stats = _target_stats(gm, ExactForward(gm, closed_form=closed_form), derivative, seed=2)
    for (mean, se, u, v), pair in zip(stats, PAIRS):
        # 5 standard errors of the Monte-Carlo mean, plus the fp32 target and the central difference
        tol = 5 * se + 2e-3 * (1 + u.abs())
        assert ((mean - u).abs() <= tol).all(), (pair, mean, u, se)
        if data == "mixture":  # the check has power: the instantaneous velocity is far from u
            assert ((v - u).abs() > 4 * tol).any(), (pair, v, u)


def test_a_wrong_flow_map_gives_a_biased_target():
    """Control: with U = the instantaneous velocity (the teacher's Euler step) the target's conditional
    mean is not the exact u, so the previous test can fail."""
    gm = GaussianMixture.make(**MIXTURE, dims=2)
    stats = _target_stats(gm, ExactForward(gm, instantaneous=True), "fd", seed=3, m=4000)
    worst = max(((mean - u).abs() / (5 * se + 2e-3 * (1 + u.abs()))).max().item() for mean, se, u, _ in stats)
    assert worst > 5, worst


def test_anchor_experiment_runs():
    """``experiments/flowmap_anchor.py`` end to end at a CI size (the numbers in docs/anystep use 2000 steps)."""
    from experiments.flowmap_anchor import STEPS, main

    res = main(["--steps", "20"])
    assert set(res) == {"exact velocity + Euler", "anyflow", "anyflow, uniform weights", "flow matching + Euler",
                        "consistency distillation"}
    assert all(set(rows) == set(STEPS) for rows in res.values())
    assert all(v == v and v < 1e3 for rows in res.values() for r in rows.values() for v in r.values())
    # the exact velocity's Euler solver converges to the exact ODE solution
    exact = res["exact velocity + Euler"]
    assert exact[32]["x_err"] < exact[4]["x_err"] / 4 and exact[32]["u_err"] < 0.1
