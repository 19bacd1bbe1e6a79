"""Statistics of the any-step study (``experiments/anystep.py``): distances with uncertainty.

Every generated set of the study is a *cell*: one (method, step count, training seed), ``n`` clips drawn
from one fixed evaluation noise shared by every cell. A cell is summarised by a point estimate and ``B``
bootstrap replicates computed with *shared* resampling weights: replicate ``b`` resamples the same clip
indices (the noise draws) in every cell and the same reference indices, so differences between cells
are paired over the noise (:class:`Resampler`).

Distances of a cell (features ``[n, d]`` in float64):

* **KID** (Binkowski et al. 2018): unbiased squared MMD with the cubic polynomial kernel
  ``k(x, y) = (x . y / d + 1)^3``. With multiplicities ``w`` (bootstrap counts) the within-set term is
  ``sum_{i != j} w_i w_j k_ij / sum_{i != j} w_i w_j`` (pairs of copies of one clip are left out, so a
  replicate stays a U-statistic), the cross term ``sum_ij w_i v_j k_ij / (W V)``.
* **FD**: Frechet distance between Gaussians fitted to the (weighted) features, meant for few dimensions.
* **per-clip means** (e.g. the relative L2 distance to the teacher's ODE solution from the same noise).

Uncertainty across training seeds (:func:`summarise`, :func:`contrast`): for a quantity averaged over the
``S`` seeds of a method, ``SE^2 = s^2 / S + Var_b(mean over seeds of replicate b)``: the spread between
seeds (which already holds each seed's own sampling noise, so the sum is conservative) plus the
evaluation-noise sampling variance that all seeds share (the bootstrap, with the seeds fixed). The 95%
interval is ``estimate +- t_{0.975, S-1} SE`` (the normal quantile when no seed spread enters). Two
methods with independent seeds add their seed terms; one method at two step counts pairs its seeds
(the difference is taken per seed). A single-model method (the teacher) has no seed term: comparisons
with it are conditional on that teacher.

Hypotheses are one-sided non-inferiority statements about a difference ``D = A - B`` of a
lower-is-better distance with a margin ``delta`` fixed before the run (:func:`verdict`): *supported*
when the interval's upper end is at most ``delta``, *refuted* when its lower end is above ``delta``,
otherwise *unresolved*.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

#: Two-sided 95% quantiles of Student's t by degrees of freedom (df >= 31: the normal 1.96).
_T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
         11: 2.201, 12: 2.179, 13: 2.160, 14: 2.145, 15: 2.131, 16: 2.120, 17: 2.110, 18: 2.101, 19: 2.093,
         20: 2.086, 21: 2.080, 22: 2.074, 23: 2.069, 24: 2.064, 25: 2.060, 26: 2.056, 27: 2.052, 28: 2.048,
         29: 2.045, 30: 2.042}


def t_quantile(df: Optional[int]) -> float:
    """Two-sided 95% critical value of Student's t with ``df`` degrees of freedom (``None``: normal, 1.96)."""
    if df is None or df > 30:
        return 1.96
    if df < 1:
        raise ValueError(f"df must be >= 1, got {df}")
    return _T975[int(df)]


def poly_kernel(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """KID's kernel ``(a b^T / d + 1)^3`` of features ``a [n, d]``, ``b [m, d]`` -> ``[n, m]`` float64."""
    a, b = a.double(), b.double()
    return (a @ b.T / a.shape[1] + 1.0) ** 3


class Resampler:
    """Shared bootstrap weights: ``B`` replicates of multinomial counts over ``n`` generated clips and over
    ``m`` reference items, drawn once from ``seed`` and used for every cell (paired over the noise).

    Attributes:
        clips: ``[B, n]`` float64 counts (each row sums to n).
        reference: ``[B, m]`` float64 counts (each row sums to m), or ``None`` without a reference.
    """

    def __init__(self, n: int, m: Optional[int], replicates: int, seed: int = 0):
        if n < 2 or replicates < 1:
            raise ValueError(f"need n >= 2 clips and >= 1 replicate, got n={n}, replicates={replicates}")
        g = torch.Generator().manual_seed(seed)
        self.clips = self._counts(n, replicates, g)
        self.reference = None if m is None else self._counts(m, replicates, g)

    @staticmethod
    def _counts(n: int, replicates: int, g: torch.Generator) -> torch.Tensor:
        idx = torch.randint(n, (replicates, n), generator=g)
        return torch.zeros(replicates, n, dtype=torch.float64).scatter_add_(1, idx, torch.ones_like(idx, dtype=torch.float64))

    @property
    def replicates(self) -> int:
        return self.clips.shape[0]


def _within(k: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``sum_{i != j} w_i w_j k_ij / sum_{i != j} w_i w_j`` for weight rows ``w [R, n]`` -> ``[R]``."""
    k = k - torch.diag_embed(torch.diagonal(k))
    num = ((w @ k) * w).sum(1)
    den = w.sum(1) ** 2 - (w * w).sum(1)
    return num / den


def kid(x: torch.Tensor, y: torch.Tensor, resampler: Optional[Resampler] = None,
        kyy: Optional[torch.Tensor] = None) -> tuple[float, torch.Tensor]:
    """Unbiased KID of generated features ``x [n, d]`` against reference features ``y [m, d]``.

    Args:
        resampler: shared weights (its ``reference`` rows resample ``y``); ``None``: no replicates.
        kyy: the reference's within term per replicate ``[1 + B]`` (:func:`reference_term`), to reuse it
            across cells.

    Returns:
        ``(estimate, replicates [B] float64)`` (an empty tensor without a resampler).
    """
    ones_x = torch.ones(1, x.shape[0], dtype=torch.float64)
    ones_y = torch.ones(1, y.shape[0], dtype=torch.float64)
    wx = ones_x if resampler is None else torch.cat([ones_x, resampler.clips])
    wy = ones_y if resampler is None else torch.cat([ones_y, resampler.reference])
    if kyy is None:
        kyy = reference_term(y, resampler)
    kxx = _within(poly_kernel(x, x), wx)
    kxy = ((wx @ poly_kernel(x, y)) * wy).sum(1) / (wx.sum(1) * wy.sum(1))
    vals = kxx + kyy - 2 * kxy
    return float(vals[0]), vals[1:]


def reference_term(y: torch.Tensor, resampler: Optional[Resampler] = None) -> torch.Tensor:
    """The reference set's within term of :func:`kid`, ``[1 + B]`` (the point estimate first)."""
    ones = torch.ones(1, y.shape[0], dtype=torch.float64)
    w = ones if resampler is None else torch.cat([ones, resampler.reference])
    return _within(poly_kernel(y, y), w)


def _weighted_gaussian(x: torch.Tensor, w: torch.Tensor):
    w = w / w.sum()
    mu = w @ x
    xc = x - mu
    cov = (xc * w[:, None]).T @ xc / (1.0 - (w * w).sum())
    return mu, cov


def _sqrtm_psd(a: torch.Tensor) -> torch.Tensor:
    e, v = torch.linalg.eigh(a)
    return (v * e.clamp_min(0).sqrt()) @ v.T


def frechet(x: torch.Tensor, y: torch.Tensor, resampler: Optional[Resampler] = None) -> tuple[float, torch.Tensor]:
    """Frechet distance of Gaussians fitted to ``x [n, d]`` (resampled by ``resampler.clips``) and to the
    whole reference ``y [m, d]`` (fixed: its uncertainty is not part of the replicates). Returns
    ``(estimate, replicates [B])``."""
    x, y = x.double(), y.double()
    mu_y, cov_y = _weighted_gaussian(y, torch.ones(y.shape[0], dtype=torch.float64))
    root_y = _sqrtm_psd(cov_y)

    def fd(w):
        mu, cov = _weighted_gaussian(x, w)
        cross = torch.linalg.eigvalsh(root_y @ cov @ root_y).clamp_min(0).sqrt().sum()
        return float((mu - mu_y).pow(2).sum() + cov.trace() + cov_y.trace() - 2 * cross)

    rows = [] if resampler is None else [fd(w) for w in resampler.clips]
    return fd(torch.ones(x.shape[0], dtype=torch.float64)), torch.tensor(rows, dtype=torch.float64)


def clip_mean(values: torch.Tensor, resampler: Optional[Resampler] = None) -> tuple[float, torch.Tensor]:
    """Mean of per-clip values ``[n]`` and its replicates ``[B]`` under the shared clip weights."""
    v = values.double()
    reps = torch.empty(0, dtype=torch.float64) if resampler is None else resampler.clips @ v / v.numel()
    return float(v.mean()), reps


@dataclass
class Cell:
    """A point estimate and its shared-weight bootstrap replicates ``[B]``."""

    estimate: float
    replicates: torch.Tensor

    def to_dict(self) -> dict:
        return {"estimate": self.estimate, "replicates": [float(v) for v in self.replicates]}

    @classmethod
    def from_dict(cls, d: dict) -> "Cell":
        return cls(float(d["estimate"]), torch.tensor(d["replicates"], dtype=torch.float64))


@dataclass
class Interval:
    """``estimate`` with standard error ``se`` and 95% interval ``[lo, hi]`` (``df``: degrees of freedom of
    the critical value, ``None`` for the normal one); ``seeds`` the seeds per side."""

    estimate: float
    se: float
    lo: float
    hi: float
    df: Optional[int]
    seeds: tuple

    def to_dict(self) -> dict:
        return {"estimate": self.estimate, "se": self.se, "lo": self.lo, "hi": self.hi, "df": self.df,
                "seeds": list(self.seeds)}


def _interval(estimate: float, seed_var: float, inner: torch.Tensor, df: Optional[int], seeds) -> Interval:
    inner_var = float(inner.var()) if inner.numel() > 1 else 0.0
    se = math.sqrt(max(seed_var, 0.0) + inner_var)
    q = t_quantile(df)
    return Interval(estimate, se, estimate - q * se, estimate + q * se, df, tuple(seeds))


def _stack(cells: Sequence[Cell]):
    if not cells:
        raise ValueError("cells must hold at least one seed's cell")
    est = torch.tensor([c.estimate for c in cells], dtype=torch.float64)
    reps = torch.stack([c.replicates for c in cells])
    return est, reps


def summarise(cells: Sequence[Cell]) -> Interval:
    """Mean over seeds of one method's cells (one per seed) with its 95% interval (module docstring)."""
    est, reps = _stack(cells)
    s = len(cells)
    seed_var = float(est.var()) / s if s > 1 else 0.0
    return _interval(float(est.mean()), seed_var, reps.mean(0), s - 1 if s > 1 else None, (s,))


def contrast(a: Sequence[Cell], b: Sequence[Cell], paired: bool) -> Interval:
    """``mean(a) - mean(b)`` over seeds with its 95% interval.

    Args:
        a, b: cells per seed of the two sides.
        paired: the same models on both sides (one method at two step counts): the difference is taken per
            seed (``a[i]`` and ``b[i]`` from seed i). Otherwise the seeds are independent and each side adds
            its own seed term; degrees of freedom ``min(S_a, S_b) - 1`` over the sides with seed spread.

    Raises:
        ValueError: ``paired`` with different seed counts.
    """
    ea, ra = _stack(a)
    eb, rb = _stack(b)
    if paired:
        if len(a) != len(b):
            raise ValueError(f"paired contrast needs as many cells on both sides, got {len(a)} and {len(b)}")
        d, s = ea - eb, len(a)
        seed_var = float(d.var()) / s if s > 1 else 0.0
        return _interval(float(d.mean()), seed_var, (ra - rb).mean(0), s - 1 if s > 1 else None, (s,))
    seed_var, dfs = 0.0, []
    for e in (ea, eb):
        if e.numel() > 1:
            seed_var += float(e.var()) / e.numel()
            dfs.append(e.numel() - 1)
    return _interval(float(ea.mean() - eb.mean()), seed_var, ra.mean(0) - rb.mean(0), min(dfs) if dfs else None,
                     (len(a), len(b)))


def verdict(interval: Interval, delta: float) -> str:
    """Non-inferiority of A against B for ``interval`` of ``A - B`` (lower is better) with margin ``delta``:
    ``"supported"`` (``hi <= delta``), ``"refuted"`` (``lo > delta``) or ``"unresolved"``."""
    if interval.hi <= delta:
        return "supported"
    if interval.lo > delta:
        return "refuted"
    return "unresolved"
