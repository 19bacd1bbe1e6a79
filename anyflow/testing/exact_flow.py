"""Exact flow maps of the linear interpolation for Gaussian-mixture data (an analytic anchor for the
flow-map objective).

Data ``x`` is a product of independent 1-D Gaussian mixtures (one per coordinate); the path is
``z_t = (1 - s) x + s eps`` with ``s = t / 1000``, the rectified-flow path of Wan / AnyFlow. Every
coordinate of ``z_t`` is then a 1-D mixture with components ``N((1 - s) mu_k, (1 - s)^2 sd_k^2 + s^2)``.

* The flow-matching velocity (per unit of s) is ``v(z, t) = E[eps - x | z_t = z] = (z - E[x | z]) / s``.
* The probability-flow ODE ``dz/ds = v`` of a 1-D coordinate is monotone and carries the marginal CDF
  along, so its flow map from t to r is the quantile map ``z_r = F_r^{-1}(F_t(z_t))`` (solved by
  bisection in float64), and the exact average velocity of the flow-map parameterisation
  (``z_r = z_t - (t - r) / 1000 u``) is ``u(z_t, t, r) = (z_t - z_r) / ((t - r) / 1000)``; at r = t it is
  ``v``.
* A single Gaussian (one component) has the closed form ``z_r = m_r + (sd_r / sd_t) (z_t - m_t)``,
  differentiable (for forward-mode checks).

Tensors are float64, any shape ``[..., D]``-compatible by broadcasting against the per-coordinate
parameters (``[D, K]``). References: Lipman et al. 2023 (flow matching), Geng et al. 2025 (MeanFlow: the
average velocity and its identity ``u = v - (t - r) du/dt``), the AnyFlow paper (arXiv 2605.13724).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class GaussianMixture:
    """A product of 1-D Gaussian mixtures.

    Attributes:
        weights, means, stds: ``[D, K]`` per coordinate and component (weights sum to 1 over K).
    """

    weights: torch.Tensor
    means: torch.Tensor
    stds: torch.Tensor

    @classmethod
    def make(cls, weights, means, stds, dims: int = 1) -> "GaussianMixture":
        """The same 1-D mixture in every one of ``dims`` coordinates."""
        rows = [torch.as_tensor(v, dtype=torch.float64).reshape(1, -1).expand(dims, -1) for v in (weights, means, stds)]
        w = rows[0] / rows[0].sum(dim=1, keepdim=True)
        return cls(w.contiguous(), rows[1].contiguous(), rows[2].contiguous())

    @property
    def dims(self) -> int:
        return self.weights.shape[0]

    # -- data and the interpolation ------------------------------------------------------------
    def sample(self, n: int, generator: torch.Generator) -> torch.Tensor:
        """``[n, D]`` float64 draws of x."""
        k = torch.multinomial(self.weights, n, replacement=True, generator=generator).T  # [n, D]
        d = torch.arange(self.dims)
        eps = torch.randn(n, self.dims, generator=generator, dtype=torch.float64)
        return self.means[d, k] + self.stds[d, k] * eps

    def _marginal(self, s: torch.Tensor):
        """Component means and stds of z_s: ``[..., D, K]`` each (``s`` ``[..., D]`` or broadcastable)."""
        s = s[..., None]
        return (1 - s) * self.means, torch.sqrt((1 - s) ** 2 * self.stds**2 + s**2)

    def cdf(self, z: torch.Tensor, t) -> torch.Tensor:
        """Marginal CDF of z_t per coordinate (``z`` ``[..., D]``, ``t`` in [0, 1000])."""
        s = torch.as_tensor(t, dtype=torch.float64) / 1000 + torch.zeros_like(z)
        m, sd = self._marginal(s)
        return (self.weights * torch.special.ndtr((z[..., None] - m) / sd)).sum(-1)

    def posterior_mean(self, z: torch.Tensor, t) -> torch.Tensor:
        """``E[x | z_t = z]`` per coordinate (t in (0, 1000])."""
        s = torch.as_tensor(t, dtype=torch.float64) / 1000 + torch.zeros_like(z)
        resp, mean, _ = self._posterior(z, s)
        return (resp * mean).sum(-1)

    def _posterior(self, z, s):
        """Responsibilities, means and stds of the components of ``p(x | z_s = z)``: ``[..., D, K]``."""
        m, sd = self._marginal(s)
        logp = torch.log(self.weights) - 0.5 * ((z[..., None] - m) / sd) ** 2 - torch.log(sd)
        resp = torch.softmax(logp, dim=-1)
        s = s[..., None]
        prec = 1 / self.stds**2 + (1 - s) ** 2 / s**2
        mean = (self.means / self.stds**2 + (1 - s) * z[..., None] / s**2) / prec
        return resp, mean, prec.rsqrt()

    def sample_posterior(self, z: torch.Tensor, t, n: int, generator: torch.Generator) -> torch.Tensor:
        """``[n, *z.shape]`` draws of x from ``p(x | z_t = z)`` (t in (0, 1000))."""
        s = torch.as_tensor(t, dtype=torch.float64) / 1000 + torch.zeros_like(z)
        resp, mean, std = self._posterior(z, s)
        flat = resp.reshape(-1, resp.shape[-1])
        k = torch.multinomial(flat, n, replacement=True, generator=generator).T.reshape(n, *z.shape)
        pick = lambda a: torch.gather(a.expand(n, *a.shape), -1, k[..., None])[..., 0]  # noqa: E731
        eps = torch.randn(n, *z.shape, generator=generator, dtype=torch.float64)
        return pick(mean) + pick(std.expand_as(mean)) * eps

    # -- the exact ODE -----------------------------------------------------------------------------
    def velocity(self, z: torch.Tensor, t) -> torch.Tensor:
        """Flow-matching velocity ``E[eps - x | z_t] = (z - E[x | z]) / s`` (per unit of s = t / 1000)."""
        s = torch.as_tensor(t, dtype=torch.float64) / 1000 + torch.zeros_like(z)
        return (z - self.posterior_mean(z, t)) / s

    def flow(self, z: torch.Tensor, t, r, iters: int = 64) -> torch.Tensor:
        """Exact ODE solution ``z_r`` from ``z_t = z`` (quantile map ``F_r^{-1}(F_t(z))``; t, r in [0, 1000],
        scalars or broadcastable to ``z``); ``iters`` bisection halvings of a bracket that holds every quantile."""
        t = torch.as_tensor(t, dtype=torch.float64) + torch.zeros_like(z)
        r = torch.as_tensor(r, dtype=torch.float64) + torch.zeros_like(z)
        q = self.cdf(z, t)
        span = (self.means.abs() + 12 * self.stds).max() + 12 + z.abs().max()
        lo, hi = torch.full_like(z, -float(span)), torch.full_like(z, float(span))
        for _ in range(iters):
            mid = (lo + hi) / 2
            below = self.cdf(mid, r) < q
            lo, hi = torch.where(below, mid, lo), torch.where(below, hi, mid)
        return torch.where(t == r, z, (lo + hi) / 2)

    def average_velocity(self, z: torch.Tensor, t, r) -> torch.Tensor:
        """Exact ``u(z_t, t, r) = (z_t - z_r) / ((t - r) / 1000)``; the velocity where r = t."""
        t = torch.as_tensor(t, dtype=torch.float64) + torch.zeros_like(z)
        r = torch.as_tensor(r, dtype=torch.float64) + torch.zeros_like(z)
        gap = (t - r) / 1000
        same = gap == 0
        u = (z - self.flow(z, t, r)) / torch.where(same, torch.ones_like(gap), gap)
        return torch.where(same, self.velocity(z, t), u)

    def gaussian_average_velocity(self, z: torch.Tensor, t: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
        """Closed-form ``u`` of a one-component mixture (differentiable in z, t and r; t != r)."""
        if self.weights.shape[1] != 1:
            raise ValueError(f"gaussian_average_velocity needs one component, got {self.weights.shape[1]}")
        mu, sd = self.means[:, 0], self.stds[:, 0]
        st, sr = t / 1000, r / 1000
        vt = torch.sqrt((1 - st) ** 2 * sd**2 + st**2)
        vr = torch.sqrt((1 - sr) ** 2 * sd**2 + sr**2)
        z_r = (1 - sr) * mu + vr / vt * (z - (1 - st) * mu)
        return (z - z_r) / (st - sr)
