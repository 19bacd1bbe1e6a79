"""Learned flow maps against the exact one on a 1-D Gaussian mixture (issue 17 item 3).

Data: x ~ 0.3 N(-1.5, 0.25^2) + 0.7 N(1.0, 0.5^2); path z_t = (1 - s) x + s eps, s = t / 1000. The exact
flow map and average velocity u(z_t, t, r) come from :mod:`anyflow.testing.exact_flow` (quantile map).

Four tiny MLPs ``u_theta(z, t, r)`` (3 -> 128 -> 128 -> 128 -> 1, SiLU; Adam, same steps, batch and seed)
are trained with the repository's losses:

* ``anyflow``: the forward flow-map loss (:func:`anyflow.training.flowmap.flow_map_loss`: 50% diffusion /
  25% consistency / 25% free pairs, central-difference dU/dt with epsilon 5, beta08 weights, re-scaling;
  NVlabs/AnyFlow trainer_wan_anyflow_pretrain.py), from data; ``anyflow, uniform weights``: the same with
  uniform time weights and no re-scaling (beta08 gives the jump from t = 1000 weight 0);
* ``flow matching + Euler``: :func:`anyflow.training.flowmap.flow_matching_loss` (r = t, uniform t), sampled
  with Euler steps (its u is the velocity at t whatever r);
* ``consistency distillation``: :func:`anyflow.training.consistency.consistency_loss` (64 intervals,
  ``inverse_delta``) from the *exact* velocity as teacher (the baseline's best case), sampled
  deterministically (x0 = f(z_t, t), re-noised with the noise implied by z_t), whose average velocity over
  [r, t] is (z_t - z_r) / ((t - r) / 1000).

For N = 1, 2, 4, 8, 16, 32 steps on the linear grid (shift 1) it reports

* ``u_err``: RMS of u_model - u_exact over z_t drawn from the exact marginal at every grid time t_i and the
  pair (t_i, t_{i+1}), averaged over the N pairs, relative to the RMS of u_exact;
* ``x_err``: RMS distance of the N-step sample from noise eps to the exact ODE solution from the same eps;
* ``w1``: Wasserstein-1 distance of the N-step samples to the data (1-D: mean |sorted - exact quantiles|);

and the exact velocity's own Euler solver as the discretisation reference (its ``u_err`` is the gap between
the instantaneous and the average velocity). One seed: the figures show
the shape of each curve, not confidence intervals (item 2 of issue 17 is the study with them).

    python experiments/flowmap_anchor.py [--steps 2000] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import math
import time

import torch

from anyflow.models.blocks import TextContext
from anyflow.samplers.schedule import time_grid
from anyflow.testing.exact_flow import GaussianMixture
from anyflow.training import consistency as cons
from anyflow.training import flowmap as fm
from anyflow.training.config import ConsistencyConfig, FlowMapConfig

MIXTURE = dict(weights=[0.3, 0.7], means=[-1.5, 1.0], stds=[0.25, 0.5])
STEPS = (1, 2, 4, 8, 16, 32)


class MLPFlowMap(torch.nn.Module):
    """``u = forward(z [B, 1, 1, 1, 1], t [B, 1], r [B, 1], text)`` of a small MLP on (z, s_t, s_r): the call
    signature of :class:`anyflow.training.flowmap.BidirectionalForward`."""

    def __init__(self, width: int = 128, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.net = torch.nn.Sequential(
            torch.nn.Linear(3, width), torch.nn.SiLU(), torch.nn.Linear(width, width), torch.nn.SiLU(),
            torch.nn.Linear(width, width), torch.nn.SiLU(), torch.nn.Linear(width, 1))

    @property
    def model(self):
        return self

    def forward(self, z, t, r, text=None, **kwargs):
        b = z.shape[0]
        feats = torch.stack([z.reshape(b).float(), t[:, 0].float() / 1000, r[:, 0].float() / 1000], dim=1)
        return self.net(feats).reshape(z.shape).to(z.dtype)

    def take(self, index):
        return self


def _text(b):
    return TextContext(torch.zeros(b, 1, 1), torch.float32)


def train(method: str, gm: GaussianMixture, steps: int, batch: int, seed: int) -> MLPFlowMap:
    """One MLP trained with ``method``'s loss (module docstring)."""
    net = MLPFlowMap(seed=seed)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    g = torch.Generator().manual_seed(seed)
    fmc = FlowMapConfig(fuse_guidance_scale=1.0)
    if method == "anyflow, uniform weights":
        fmc = FlowMapConfig(fuse_guidance_scale=1.0, weight_type="uniform", rescale=False)
    weighting = fm.TrainWeighting(fmc.weight_type, 1.0)
    ccfg = ConsistencyConfig(num_intervals=64, teacher_guidance_scale=1.0)

    def teacher(z, t, text):
        return gm.velocity(z.reshape(-1, 1).double(), t[:, :1].double()).reshape(z.shape).to(z.dtype)

    for _ in range(steps):
        x = gm.sample(batch, g).float().reshape(batch, 1, 1, 1, 1)
        noise = torch.randn(x.shape, generator=g)
        if method.startswith("anyflow"):
            p = fm.sample_time_pairs(batch, fmc, 1.0, g)
            t, r = p.per_frame(1)
            out = fm.flow_map_loss(net, x, noise, t, r, p.kind, _text(batch), None, fmc, weighting)
        elif method == "flow matching + Euler":
            t = fm.sample_teacher_timesteps(batch, 1.0, g, "uniform")[:, None]
            out = fm.flow_matching_loss(net, x, noise, t, _text(batch))
        else:
            out = cons.consistency_loss(net, x, noise, _text(batch), ccfg, 1.0, g, teacher=teacher)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        opt.step()
        sched.step()
    return net.eval()


@torch.no_grad()
def model_u(method: str, net, z: torch.Tensor, t: float, r: float) -> torch.Tensor:
    """The method's average velocity over [r, t] at z ``[n]`` (float64)."""
    n = z.shape[0]
    z5 = z.float().reshape(n, 1, 1, 1, 1)
    tt, rr = torch.full((n, 1), t), torch.full((n, 1), r)
    if method.startswith("anyflow"):
        u = net(z5, tt, rr)
    elif method == "flow matching + Euler":
        u = net(z5, tt, tt)
    else:  # deterministic consistency step: x0 = f(z, t), re-noised with the implied noise
        st, sr = t / 1000, r / 1000
        x0 = z5 - st * net(z5, tt, torch.zeros_like(tt))
        eps = (z5 - (1 - st) * x0) / st
        zr = (1 - sr) * x0 + sr * eps
        u = (z5 - zr) / (st - sr)
    return u.double().reshape(n)


def evaluate(method: str, net, gm: GaussianMixture, n: int = 4000, seed: int = 123) -> dict:
    g = torch.Generator().manual_seed(seed)
    eps = torch.randn(n, generator=g, dtype=torch.float64)
    exact_x = gm.flow(eps[:, None], 1000.0, 0.0)[:, 0]
    quantiles = exact_x.sort().values
    out = {}
    for steps in STEPS:
        grid = time_grid(steps, 1.0).tolist()
        errs, refs = [], []
        z = eps.clone()
        for t, r in zip(grid[:-1], grid[1:]):
            zt = (1 - t / 1000) * gm.sample(n, g)[:, 0] + (t / 1000) * torch.randn(n, generator=g, dtype=torch.float64)
            u_true = gm.average_velocity(zt[:, None], t, r)[:, 0]
            u_of = (lambda z_: gm.velocity(z_[:, None], t)[:, 0]) if net is None else (
                lambda z_: model_u(method, net, z_, t, r))
            errs.append((u_of(zt) - u_true).pow(2).mean())
            refs.append(u_true.pow(2).mean())
            z = z - (t - r) / 1000 * u_of(z)
        u_err = math.sqrt(sum(errs) / len(errs)) / math.sqrt(sum(refs) / len(refs))
        out[steps] = {"u_err": u_err,
                      "x_err": float((z - exact_x).pow(2).mean().sqrt()),
                      "w1": float((z.sort().values - quantiles).abs().mean())}
    return out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=2000, help="optimiser steps per model")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None, help="write the numbers here")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    gm = GaussianMixture.make(**MIXTURE, dims=1)
    results, start = {}, time.perf_counter()
    results["exact velocity + Euler"] = evaluate("exact", None, gm)
    for method in ("anyflow", "anyflow, uniform weights", "flow matching + Euler", "consistency distillation"):
        net = train(method, gm, args.steps, args.batch, args.seed)
        results[method] = evaluate(method, net, gm)
    wall = time.perf_counter() - start
    for metric in ("u_err", "x_err", "w1"):
        print(f"\n{metric}: " + " | ".join(f"{s:>6}" for s in STEPS))
        for method, rows in results.items():
            print(f"{method:>26}: " + " | ".join(f"{rows[s][metric]:6.3f}" for s in STEPS))
    print(f"\nwall {wall:.1f} s, {args.steps} steps x batch {args.batch} per model, seed {args.seed}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "wall_s": wall, "results": results}, f, indent=1)
    return results


if __name__ == "__main__":
    main()
