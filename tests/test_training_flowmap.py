"""Forward flow-map objective (reference spec §3, §6): pairs, weights, dU/dt, re-scaling, gradients."""

import math

import numpy as np
import pytest
import torch

from anyflow.models.tiny import tiny_transformer
from anyflow.samplers.schedule import shift_sigma, time_grid
from anyflow.training import flowmap as fm
from anyflow.training.config import FARConfig, FlowMapConfig

SHAPE = (4, 3, 16, 8, 8)  # B, F, C, H, W


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="module")
def bidi():
    return tiny_transformer("bidirectional", seed=3).train()


@pytest.fixture(scope="module")
def far_model():
    return tiny_transformer("far", seed=4, chunk_partition=(1, 1, 2, 2, 2)).train()


def _inputs(shape=SHAPE, seed=0):
    g = _gen(seed)
    x = torch.randn(shape, generator=g)
    noise = torch.randn(shape, generator=g)
    text = torch.randn(shape[0], 7, 32, generator=g)
    neg = torch.randn(1, 7, 32, generator=g)
    return x, noise, text, neg


# ----------------------------------------------------------------------------------------------
# pairs
# ----------------------------------------------------------------------------------------------
def test_pair_kinds_by_global_index():
    # Bg = 8: round(0.5 * 8) = 4 diffusion, round(0.25 * 8) = 2 consistency, 2 free
    assert fm.pair_kinds(4, 0.5, 0.25, rank=0, world_size=2).tolist() == [0, 0, 0, 0]
    assert fm.pair_kinds(4, 0.5, 0.25, rank=1, world_size=2).tolist() == [1, 1, 2, 2]
    assert fm.pair_kinds(8, 0.5, 0.25).tolist() == [0, 0, 0, 0, 1, 1, 2, 2]
    # Bg = 2 (1.3B per GPU): Python rounding, round(0.5) = 0 consistency samples
    assert fm.pair_kinds(2, 0.5, 0.25).tolist() == [0, 2]
    assert fm.pair_kinds(32, 0.5, 0.25).bincount().tolist() == [16, 8, 8]


def _unshift(t, k=5.0):
    s = t / 1000
    return s / (k - (k - 1) * s)


def test_pair_ranges_and_distribution():
    cfg = FlowMapConfig()
    p = fm.sample_time_pairs(4000, cfg, 5.0, _gen(1))
    t, r, kind = p.t, p.r, p.kind
    assert kind.bincount().tolist() == [2000, 1000, 1000]
    assert t.dtype == torch.float32 and ((t >= 0) & (t < 1000)).all() and (r <= t).all() and (r >= 0).all()
    assert (r[kind == 0] == t[kind == 0]).all()
    assert (r[kind == 1] == 0).all()
    free = kind == 2
    assert (r[free] < t[free]).all() and (r[free] > 0).all()
    # before the shift t = max(u1, u2) (E = 2/3) and free r = min(u1, u2) (E = 1/3)
    assert abs(_unshift(t.double()).mean().item() - 2 / 3) < 0.01
    assert abs(_unshift(r[free].double()).mean().item() - 1 / 3) < 0.02


def test_bf16_timesteps_parity_flag():
    g1, g2 = _gen(2), _gen(2)
    p32 = fm.sample_time_pairs(64, FlowMapConfig(), 5.0, g1)
    p16 = fm.sample_time_pairs(64, FlowMapConfig(bf16_timesteps=True), 5.0, g2)
    assert p16.t.dtype == torch.float32
    assert torch.equal(p16.t, p16.t.bfloat16().float()) and torch.equal(p16.r, p16.r.bfloat16().float())
    assert not torch.equal(p32.t, p32.t.bfloat16().float())
    # same draws, rounded: the bf16 error of u is amplified by the shift (up to ~8 units)
    diff = (p16.t - p32.t).abs()
    assert diff.max() < 16 and diff.mean() > 0.5


# ----------------------------------------------------------------------------------------------
# weighting
# ----------------------------------------------------------------------------------------------
def _np_grid(k=5.0):
    s = np.linspace(1.0, 0.0, 1001)
    return 1000 * k * s / (1 + (k - 1) * s)


def test_weight_tables_match_the_formulas():
    x = _np_grid()
    y = np.exp(-2 * ((x - 500) / 1000) ** 2)
    y = y - y.min()
    gaussian = y * 1000 / y.sum()
    tau = x / 1000
    y = tau * np.sqrt(1 - tau)
    beta08 = y * 1000 / y.sum()
    for name, ref in (("gaussian", gaussian), ("beta08", beta08), ("uniform", np.ones_like(x))):
        grid, w = fm.weight_table(name, 5.0)
        np.testing.assert_allclose(grid.numpy(), x, rtol=1e-13, atol=1e-9)
        np.testing.assert_allclose(w.numpy(), ref, rtol=1e-12, atol=1e-12)
    grid, w = fm.weight_table("beta08", 5.0)
    assert w[0] == 0 and w[-1] == 0 and abs(w.sum().item() - 1000) < 1e-9
    assert abs(grid[w.argmax()].item() - 667) < 3 and 1.38 < w.max().item() < 1.44
    with pytest.raises(ValueError, match="weight_type"):
        fm.weight_table("cosine")


def test_weight_lookup_is_nearest_grid_point():
    x = _np_grid()
    _, w = fm.weight_table("beta08", 5.0)
    weighting = fm.TrainWeighting("beta08", 5.0)
    t = torch.rand(5, 7, generator=_gen(3)) * 1000
    got = weighting(t)
    idx = np.abs(x[:, None] - t.double().numpy().reshape(-1)[None]).argmin(0)
    assert got.shape == t.shape and got.dtype == torch.float32
    np.testing.assert_allclose(got.numpy().reshape(-1), w.numpy()[idx].astype(np.float32))
    assert weighting(torch.tensor([0.0, 1000.0])).tolist() == [0.0, 0.0]


# ----------------------------------------------------------------------------------------------
# dU/dt: finite difference vs JVP, and the skip where t == r
# ----------------------------------------------------------------------------------------------
def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def _deriv_inputs(shape, seed=5):
    x, noise, text, _ = _inputs(shape, seed)
    b, f = shape[:2]
    t = torch.linspace(350, 800, b)[:, None].expand(b, f).contiguous()
    r = torch.linspace(20, 300, b)[:, None].expand(b, f).contiguous()
    return fm.noise_latents(x, noise, t), noise - x, t, r, text


@pytest.mark.parametrize("kind", ["bidirectional", "far"])
def test_finite_difference_matches_jvp(kind, bidi, far_model):
    if kind == "bidirectional":
        fwd = fm.BidirectionalForward(bidi)
        z, v, t, r, text = _deriv_inputs((2, 3, 16, 8, 8))
    else:
        x, _, _, _ = _inputs((2, 8, 16, 8, 8), seed=6)
        cp, context, window = fm.far_window(x, (1, 1, 2, 2, 2), 5, 3)
        assert context.shape[1] == 2 and window.shape[1] == 6
        fwd = fm.FARWindowForward(far_model, cp, context, window, 3)
        z, v, t, r, text = _deriv_inputs((2, 6, 16, 8, 8))
    # both sides share the tangent (v / 1000, 1); the analytic derivative check is in tests/test_training_toy.py
    exact = fm.jvp_derivative(fwd, z, v, t, r, fm._as_context(fwd, text))
    errs = {e: _rel(fm.finite_difference_derivative(fwd, z, v, t, r, text, e), exact) for e in (0.4, 0.1)}
    # the central difference is second order: agreement to FD accuracy and the error shrinking ~16x
    assert errs[0.1] < 1e-2, errs
    assert errs[0.4] > 4 * errs[0.1], errs


def test_jvp_matches_a_manual_dual_number_free_check(bidi):
    # independent of torch.func: the z and t parts of the JVP are linear in the tangent
    fwd = fm.BidirectionalForward(bidi)
    z, v, t, r, text = _deriv_inputs((1, 2, 16, 8, 8))
    ctx = fm._as_context(fwd, text)
    d_full = fm.jvp_derivative(fwd, z, v, t, r, ctx)
    d_twice = fm.jvp_derivative(fwd, z, 2 * v, t, r, ctx)
    d_t_only = fm.jvp_derivative(fwd, z, torch.zeros_like(v), t, r, ctx)
    torch.testing.assert_close(d_twice - d_t_only, 2 * (d_full - d_t_only), rtol=1e-4, atol=1e-5)


class _CountingForward:
    def __init__(self, inner):
        self.inner, self.batches = inner, []
        self.model = inner.model

    def __call__(self, z, t, r, text):
        self.batches.append(z.shape[0])
        return self.inner(z, t, r, text)

    def take(self, index):
        return self


@pytest.mark.parametrize("g", [1.0, 3.0])
def test_derivative_skip_where_t_equals_r_is_exact(bidi, g):
    fwd = fm.BidirectionalForward(bidi)
    z, v, t, r, text = _deriv_inputs(SHAPE)
    r[0] = t[0]
    r[2] = t[2]  # samples 0 and 2 are diffusion samples
    cfg = FlowMapConfig(fuse_guidance_scale=g)
    counting = _CountingForward(fwd)
    target = fm.mean_velocity_target(counting, z, v, t, r, text, cfg)
    assert counting.batches == [4]  # one batched FD forward over the 2 samples with t != r, x 2
    assert torch.equal(target[0], v[0]) and torch.equal(target[2], v[2])
    # the kept samples equal the full-batch computation v - (t - r) dU/dt / g
    du = fm.finite_difference_derivative(fwd, z, v, t, r, text, 5.0)
    full = v - (t - r)[:, :, None, None, None] * du / g
    torch.testing.assert_close(target[[1, 3]], full[[1, 3]], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(target[[0, 2]], full[[0, 2]], rtol=0, atol=0)


def test_no_derivative_forward_for_an_all_diffusion_batch(bidi):
    fwd = _CountingForward(fm.BidirectionalForward(bidi))
    x, noise, text, neg = _inputs()
    t = torch.full(SHAPE[:2], 400.0)
    kind = torch.zeros(SHAPE[0], dtype=torch.long)
    out = fm.flow_map_loss(fwd, x, noise, t, t.clone(), kind, text, fm.expand_negative(neg, text), FlowMapConfig(),
                           fm.TrainWeighting("beta08"))
    assert fwd.batches == [4, 4] and out.stats["derivative_samples"] == 0  # conditional + unconditional only


# ----------------------------------------------------------------------------------------------
# re-scaling (§6.9)
# ----------------------------------------------------------------------------------------------
def test_rescaling_value_and_gradient():
    w = torch.tensor([0.7, -1.3, 0.4, 2.0, 1.1], dtype=torch.float64, requires_grad=True)
    a = torch.tensor([1.0, 2.0, 0.5, 3.0, 1.5], dtype=torch.float64)

    def per_sample(w):
        return (a * w) ** 2 + 0.1 * w.sin()

    is_diff = torch.tensor([True, True, False, False, False])
    l = per_sample(w)
    out = fm.rescale_losses(l, is_diff)
    ld = l.detach()
    mean_diff = ld[is_diff].mean()
    torch.testing.assert_close(out[:2], ld[:2])
    torch.testing.assert_close(out[2:], mean_diff * ld[2:] / (ld[2:] + fm.RESCALE_EPS))
    for b in range(5):
        (grad,) = torch.autograd.grad(out[b], w, retain_graph=True)
        (ref,) = torch.autograd.grad(per_sample(w)[b], w)
        scale = 1.0 if is_diff[b] else (mean_diff / (ld[b] + fm.RESCALE_EPS))
        torch.testing.assert_close(grad, scale * ref)
    # a second process's diffusion losses enter the mean through all_reduce
    other = torch.tensor([5.0, 2.0], dtype=torch.float64)
    out2 = fm.rescale_losses(l, is_diff, all_reduce=lambda s: s + torch.stack([other.sum(), torch.tensor(2.0, dtype=torch.float64)]))
    m = (ld[:2].sum() + other.sum()) / 4
    torch.testing.assert_close(out2[3], m * ld[3] / (ld[3] + fm.RESCALE_EPS))
    # no diffusion sample anywhere: unchanged instead of NaN
    torch.testing.assert_close(fm.rescale_losses(l, torch.zeros(5, dtype=torch.bool)), l)


# ----------------------------------------------------------------------------------------------
# whole loss: finite, gradients reach every trained parameter
# ----------------------------------------------------------------------------------------------
def _grad_report(model):
    missing = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()
               or p.grad.abs().sum() == 0]
    return missing


@pytest.mark.parametrize("derivative", ["fd", "jvp"])
def test_bidirectional_loss_finite_with_gradients(bidi, derivative):
    x, _, text, neg = _inputs()
    cfg = FlowMapConfig(derivative=derivative, i2v_prob=0.0)
    si = fm.prepare_bidirectional(bidi, x, text, neg, cfg, shift=5.0, drop_text_ratio=0.25, generator=_gen(7))
    assert si.kind.tolist() == [0, 0, 1, 2]
    bidi.zero_grad()
    out = fm.flow_map_loss(si.forward, si.x, si.noise, si.t, si.r, si.kind, si.text, fm.expand_negative(neg, text),
                           cfg, fm.TrainWeighting("beta08"))
    assert torch.isfinite(out.loss) and out.stats["derivative_samples"] == 2
    out.loss.backward()
    assert _grad_report(bidi) == []
    # after re-scaling every sample carries (about) the mean diffusion loss
    expect = out.per_sample[:2].mean()
    torch.testing.assert_close(out.loss.detach(), expect, rtol=1e-4, atol=0)


def test_far_loss_finite_with_gradients_and_context(far_model):
    x, _, text, neg = _inputs((2, 8, 16, 8, 8), seed=8)
    far = FARConfig(chunk_partition=(1, 1, 2, 2, 2), full_chunk_limit=3, long_context_ratio=1.0)
    cfg = FlowMapConfig()
    g = _gen(0)
    counts = set()
    for _ in range(30):
        counts.add(fm.sample_num_chunks(far, g))
    assert counts == {3, 4, 5}
    g = _gen(11)
    while True:  # a step with compressed context (n > 3), so far_patch_embedding takes part
        state = g.get_state()
        if fm.sample_num_chunks(far, g) == 5:
            g.set_state(state)
            break
    si = fm.prepare_far(far_model, x, text, neg, cfg, far, shift=5.0, drop_text_ratio=0.1, generator=g)
    assert si.num_chunks == 5 and si.x.shape[1] == 6 and si.forward.context.shape[1] == 2
    far_model.zero_grad()
    out = fm.flow_map_loss(si.forward, si.x, si.noise, si.t, si.r, si.kind, si.text, fm.expand_negative(neg, text),
                           cfg, fm.TrainWeighting("beta08"))
    assert torch.isfinite(out.loss)
    out.loss.backward()
    assert _grad_report(far_model) == []
    far_model.zero_grad()
    extra = fm.bidirectional_modeling_loss(far_model, x, text, neg, shift=5.0, guidance_scale=3.0, generator=_gen(1))
    assert torch.isfinite(extra.loss)
    extra.loss.backward()
    missing = _grad_report(far_model)
    assert missing == ["far_patch_embedding.weight", "far_patch_embedding.bias"]  # full patches only


def test_far_window_split():
    x = torch.randn(1, 8, 16, 8, 8)
    cp, ctx, win = fm.far_window(x, (1, 1, 2, 2, 2), 3, 3)
    assert cp == [1, 1, 2] and ctx.shape[1] == 0 and win.shape[1] == 4
    cp, ctx, win = fm.far_window(x, (1, 1, 2, 2, 2), 4, 3)
    assert cp == [1, 1, 2, 2] and ctx.shape[1] == 1 and torch.equal(win, x[:, 1:6])
    with pytest.raises(ValueError, match="num_chunks"):
        fm.far_window(x, (1, 1, 2, 2, 2), 6, 3)


# ----------------------------------------------------------------------------------------------
# text dropout, I2V, sampling
# ----------------------------------------------------------------------------------------------
def test_text_dropout_to_negative():
    _, _, text, neg = _inputs((64, 1, 16, 8, 8))
    out, dropped = fm.drop_text(text, neg, 0.3, _gen(9))
    assert 5 < int(dropped.sum()) < 35
    assert torch.equal(out[dropped], neg.expand(64, -1, -1)[dropped]) and torch.equal(out[~dropped], text[~dropped])
    assert fm.drop_text(text, neg, 1.0, _gen(9))[1].all() and not fm.drop_text(text, neg, 0.0, _gen(9))[1].any()
    with pytest.raises(ValueError, match="negative"):
        fm.drop_text(text, torch.randn(1, 5, 32), 0.1, _gen(0))


def test_i2v_first_frame(bidi):
    x, _, text, neg = _inputs()
    cfg = FlowMapConfig(i2v_prob=1.0)
    si = fm.prepare_bidirectional(bidi, x, text, neg, cfg, shift=5.0, drop_text_ratio=0.0, generator=_gen(4))
    assert (si.t[:, 0] == 0).all() and (si.t[:, 1:] > 0).all()
    assert torch.equal(si.r[:, 0], si.r[:, 1])  # r is kept (official quirk, reference §10.1 #6)
    assert torch.equal(fm.noise_latents(si.x, si.noise, si.t)[:, 0], x[:, 0])
    assert (fm.TrainWeighting("beta08")(si.t)[:, 0] == 0).all()
    si0 = fm.prepare_bidirectional(bidi, x, text, neg, FlowMapConfig(i2v_prob=0.0), shift=5.0, drop_text_ratio=0.0,
                                   generator=_gen(4))
    assert (si0.t[:, 0] > 0).all()


def test_flow_map_sample_shapes(bidi):
    x, noise, text, _ = _inputs((1, 2, 16, 8, 8))
    fwd = fm.BidirectionalForward(bidi)
    out = fm.flow_map_sample(fwd, noise, text, 4)
    assert out.shape == noise.shape and out.dtype == torch.float32 and torch.isfinite(out).all()
    grid = time_grid(4, 5.0).tolist()
    assert [round(v, 2) for v in grid] == [1000.0, 937.5, 833.33, 625.0, 0.0]  # reference §3 example
    # one step equals the Euler shortcut z - u(z, 1000, 0)
    one = fm.flow_map_sample(fwd, noise, text, 1)
    with torch.no_grad():
        u = fwd(noise, torch.full((1, 2), 1000.0), torch.zeros(1, 2), text)
    torch.testing.assert_close(one, noise - u)
    assert math.isclose(shift_sigma(0.5, 5.0), 5 * 0.5 / (1 + 4 * 0.5))


class _RecordingForward(_CountingForward):
    def __call__(self, z, t, r, text):
        self.batches.append(t.clone())
        return self.inner(z, t, r, text)


def test_bf16_timesteps_round_the_finite_difference_times(bidi):
    z, v, t, r, text = _deriv_inputs((2, 2, 16, 8, 8))
    t = t.bfloat16().float()
    for flag in (False, True):
        rec = _RecordingForward(fm.BidirectionalForward(bidi))
        fm.mean_velocity_target(rec, z, v, t, r, text, FlowMapConfig(bf16_timesteps=flag))
        (times,) = rec.batches
        expect = torch.cat([t + 5, t - 5])
        if flag:  # e.g. 612 + 5 -> 616 in bf16: the official finite difference's bias (reference §10.1 #1)
            expect = expect.bfloat16().float()
        assert torch.equal(times, expect)
    assert not torch.equal(torch.cat([t + 5, t - 5]), torch.cat([t + 5, t - 5]).bfloat16().float())


def test_far_window_forward_matches_diffusers_training_forward(far_model):
    # the window wrapper assembles [context (t = r = 0) | noisy window] + clean copy exactly as the
    # diffusers FAR training forward expects it (reference §5.2)
    g = _gen(12)
    x = torch.randn(2, 8, 16, 8, 8, generator=g)
    cp, context, window = fm.far_window(x, (1, 1, 2, 2, 2), 5, 3)
    z = torch.randn(window.shape, generator=g)
    t = torch.full((2, 6), 700.0)
    r = torch.full((2, 6), 250.0)
    text = torch.randn(2, 7, 32, generator=g)
    fwd = fm.FARWindowForward(far_model, cp, context, window, 3)
    zeros = torch.zeros(2, 2)
    with torch.no_grad():
        ours = fwd(z, t, r, text)
        ref = far_model(torch.cat([context, z], 1), torch.cat([zeros, t], 1), torch.cat([zeros, r], 1), text,
                        chunk_partition=cp, clean_hidden_states=window, clean_timestep=torch.zeros(2, 6)).sample
        # the FAR model used bidirectionally = one chunk holding every frame
        bi = fm.BidirectionalForward(far_model)(z, t, r, text)
        one_chunk = far_model(z, t, r, text, chunk_partition=[6]).sample
    assert ((ours - ref).norm() / ref.norm()).item() < 1e-5
    assert ((bi - one_chunk).norm() / one_chunk.norm()).item() < 1e-5


def test_teacher_timestep_distributions():
    """The teacher phase's t: the official logit-normal draw leaves the ends nearly empty at shift 1; the
    uniform draw covers [0, 1000] evenly; an unknown name is a clear error (also at config validation)."""
    from anyflow.training.config import from_dict

    n = 20000
    ln = fm.sample_teacher_timesteps(n, 1.0, torch.Generator().manual_seed(0))
    un = fm.sample_teacher_timesteps(n, 1.0, torch.Generator().manual_seed(0), "uniform")
    assert float((ln > 950).float().mean()) < 0.01 < 0.04 < float((un > 950).float().mean()) < 0.06
    assert abs(float(un.mean()) - 500) < 10 and 0 <= float(un.min()) and float(un.max()) <= 1000
    shifted = fm.sample_teacher_timesteps(n, 5.0, torch.Generator().manual_seed(0), "uniform")
    assert abs(float((shifted <= 1000 * shift_sigma(0.5, 5.0)).float().mean()) - 0.5) < 0.02
    torch.testing.assert_close(ln, fm.sample_logit_normal(n, 1.0, torch.Generator().manual_seed(0)), rtol=0, atol=0)
    with pytest.raises(ValueError, match="distribution must be one of"):
        fm.sample_teacher_timesteps(2, 1.0, torch.Generator(), "beta")
    with pytest.raises(ValueError, match="teacher_timesteps"):
        from_dict({"preset": "tiny", "phase": "teacher", "teacher_timesteps": "beta"})


def test_teacher_phase_uses_the_configured_distribution(monkeypatch):
    from anyflow.training.config import from_dict
    from anyflow.training.data import SyntheticClips
    from anyflow.training.run import build_model
    from anyflow.training.trainer import Trainer

    seen = []
    real = fm.sample_teacher_timesteps
    monkeypatch.setattr(fm, "sample_teacher_timesteps", lambda *a: seen.append(a[-1]) or real(*a))
    cfg = from_dict({"preset": "tiny", "phase": "teacher", "teacher_timesteps": "uniform", "total_iter": 1,
                     "batch_size": 2})
    trainer = Trainer(build_model(cfg), cfg, SyntheticClips(2, 3, seed=0), torch.randn(1, 7, 32), log_stream=None)
    record = trainer.train_step()
    assert seen == ["uniform"] and math.isfinite(record["loss"])
