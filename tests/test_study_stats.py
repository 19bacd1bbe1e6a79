"""The any-step study's statistics (experiments/study_stats.py) against independent computations and by
simulation: the KID estimator and its resampled replicates against explicit double loops, FD against the
closed form of two Gaussians, and the coverage of the 95% intervals (one set, and seeds with a shared
evaluation noise) on problems with a known answer."""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from experiments import study_stats as st  # noqa: E402


def _kid_loops(x, y, wx=None):
    """Unbiased KID by explicit loops; with integer counts ``wx`` the set holds clip i ``wx[i]`` times and
    pairs of copies of one clip are left out."""
    xs = [i for i in range(len(x)) for _ in range(int(1 if wx is None else wx[i]))]
    d = x.shape[1]

    def k(a, b):
        return float((a.double() @ b.double() / d + 1) ** 3)

    xx = [k(x[i], x[j]) for i in xs for j in xs if i != j]
    yy = [k(y[i], y[j]) for i in range(len(y)) for j in range(len(y)) if i != j]
    xy = [k(x[i], y[j]) for i in xs for j in range(len(y))]
    return sum(xx) / len(xx) + sum(yy) / len(yy) - 2 * sum(xy) / len(xy)


def test_kid_and_its_replicates_match_explicit_loops():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(9, 3, generator=g) + 0.3, torch.randn(7, 3, generator=g)
    est, reps = st.kid(x, y)
    assert reps.numel() == 0
    assert est == pytest.approx(_kid_loops(x, y), rel=1e-10)
    rs = st.Resampler(9, 7, replicates=4, seed=3)
    rs.reference = torch.ones_like(rs.reference)  # the reference unresampled: the loops' reference
    est2, reps = st.kid(x, y, rs)
    assert est2 == pytest.approx(est, rel=1e-12)
    for b in range(4):
        assert float(reps[b]) == pytest.approx(_kid_loops(x, y, rs.clips[b]), rel=1e-10)


def test_resampler_counts_sum_to_the_set_sizes():
    rs = st.Resampler(11, 5, replicates=6, seed=1)
    assert rs.clips.shape == (6, 11) and rs.reference.shape == (6, 5)
    assert torch.equal(rs.clips.sum(1), torch.full((6,), 11.0, dtype=torch.float64))
    assert torch.equal(rs.reference.sum(1), torch.full((6,), 5.0, dtype=torch.float64))
    with pytest.raises(ValueError, match="n >= 2"):
        st.Resampler(1, 5, 3)


def test_frechet_matches_the_closed_form_of_two_gaussians():
    g = torch.Generator().manual_seed(2)
    n = 40000
    a = torch.randn(n, 2, generator=g, dtype=torch.float64) * torch.tensor([1.0, 2.0], dtype=torch.float64)
    b = torch.randn(n, 2, generator=g, dtype=torch.float64) + torch.tensor([1.0, 0.0], dtype=torch.float64)
    # |mu|^2 + tr(S_a + S_b - 2 (S_a S_b)^1/2) with diagonal S_a = diag(1, 4), S_b = I: 1 + (1 + 1 - 2) + (4 + 1 - 4)
    est, _ = st.frechet(a, b)
    assert est == pytest.approx(2.0, abs=0.08)
    rs = st.Resampler(200, None, replicates=3, seed=0)
    est, reps = st.frechet(a[:200], b, rs)
    assert reps.shape == (3,) and torch.isfinite(reps).all()


def test_interval_covers_zero_for_equal_distributions_and_excludes_it_for_a_shift():
    covered, detected, trials = 0, 0, 120
    for i in range(trials):
        g = torch.Generator().manual_seed(100 + i)
        y = torch.randn(60, 4, generator=g, dtype=torch.float64)
        x = torch.randn(60, 4, generator=g, dtype=torch.float64)
        rs = st.Resampler(60, 60, replicates=150, seed=i)
        iv = st.summarise([st.Cell(*st.kid(x, y, rs))])
        covered += iv.lo <= 0.0 <= iv.hi
        iv_shift = st.summarise([st.Cell(*st.kid(x + 0.8, y, rs))])
        detected += iv_shift.lo > 0.0
    assert covered / trials >= 0.88, covered
    assert detected / trials >= 0.9, detected


def test_seed_intervals_cover_the_mean_of_the_training_distribution():
    """Per seed a model-specific offset (between-seed spread), plus an evaluation noise shared by every seed:
    the interval of the mean over 5 seeds covers the true mean about 95% of the time."""
    trials, covered = 300, 0
    for i in range(trials):
        g = torch.Generator().manual_seed(i)
        shared = torch.randn(50, generator=g, dtype=torch.float64)  # per-clip values of the shared noise
        rs = st.Resampler(50, None, replicates=100, seed=1000 + i)
        cells = []
        for _ in range(5):
            offset = 0.5 * torch.randn((), generator=g, dtype=torch.float64)
            own = 0.5 * torch.randn(50, generator=g, dtype=torch.float64)
            cells.append(st.Cell(*st.clip_mean(1.0 + offset + shared + own, rs)))
        iv = st.summarise(cells)
        assert iv.df == 4
        covered += iv.lo <= 1.0 <= iv.hi
    assert 0.9 <= covered / trials <= 0.995, covered


def test_contrasts_pair_seeds_or_add_seed_terms():
    rs = st.Resampler(30, None, replicates=50, seed=0)
    g = torch.Generator().manual_seed(4)
    base = torch.randn(30, generator=g, dtype=torch.float64)
    a = [st.Cell(*st.clip_mean(base + s, rs)) for s in range(3)]
    b = [st.Cell(*st.clip_mean(base + s - 0.5, rs)) for s in range(3)]
    paired = st.contrast(a, b, paired=True)
    # the same shift on every seed and every clip: no uncertainty at all
    assert paired.estimate == pytest.approx(0.5) and paired.se == pytest.approx(0.0, abs=1e-12)
    unpaired = st.contrast(a, b, paired=False)
    assert unpaired.estimate == pytest.approx(0.5) and unpaired.se > 0.5 and unpaired.df == 2
    teacher = [st.Cell(*st.clip_mean(base, rs))]
    one = st.contrast(a, teacher, paired=False)
    assert one.df == 2 and one.seeds == (3, 1)
    with pytest.raises(ValueError, match="paired"):
        st.contrast(a, teacher, paired=True)


def test_verdicts_and_quantiles():
    iv = st.Interval(0.0, 1.0, -0.5, 0.05, 4, (5,))
    assert st.verdict(iv, 0.1) == "supported"
    assert st.verdict(st.Interval(0.5, 0.1, 0.2, 0.8, 4, (5,)), 0.1) == "refuted"
    assert st.verdict(st.Interval(0.1, 0.1, -0.1, 0.3, 4, (5,)), 0.1) == "unresolved"
    assert st.t_quantile(4) == 2.776 and st.t_quantile(None) == 1.96 and st.t_quantile(100) == 1.96
    with pytest.raises(ValueError, match="df"):
        st.t_quantile(0)
