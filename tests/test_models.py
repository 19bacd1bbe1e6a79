"""enable()d transformers vs the untouched diffusers AnyFlow transformers on the same tiny weights."""

import pytest
import torch

import anyflow
from anyflow.testing.official import official_far_semantics
from anyflow.models.tiny import tiny_transformer
from anyflow.testing.tolerances import assert_rel_l2, sqnr_db

REAL_CP = [1, 3, 3, 3, 3, 3, 3, 2]
FWD_TOL = 1e-5


def randn(*shape, seed=0, dtype=torch.float32):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def times(b, f, seed):
    g = torch.Generator().manual_seed(seed)
    t = torch.rand(b, f, generator=g, dtype=torch.float64) * 1000
    return t, t * torch.rand(b, f, generator=g, dtype=torch.float64)


BACKENDS = ["auto", "triton", "cuda"]  # triton: CPU interpreter; cuda: the C++ CPU twins of anyflow._C


def _skip_unavailable(backend):
    from anyflow.ops import registry

    if backend != "auto" and registry.backend_reason(backend):
        pytest.skip(f"{backend} backend unavailable: {registry.backend_reason(backend)}")


def run_both(model, *args, backend="auto", **kwargs):
    """(diffusers output, anyflow output) of the same call."""
    _skip_unavailable(backend)
    ref = model(*args, **kwargs)
    handle = anyflow.enable(model, backend=backend)
    try:
        out = model(*args, **kwargs)
    finally:
        handle.disable()
    return ref, out


@pytest.fixture(scope="module")
def far_model():
    return tiny_transformer("far", seed=3)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("deltatime_type", ["r", "t-r"])
@pytest.mark.parametrize("shape", [(2, 3, 8, 12), (1, 5, 6, 10)])
def test_bidirectional_forward(deltatime_type, shape, backend):
    model = tiny_transformer("bidirectional", seed=1, deltatime_type=deltatime_type)
    b, f, h, w = shape
    x = randn(b, f, 16, h, w, seed=2)
    t, r = times(b, f, 3)
    text = randn(b, 9, 32, seed=4)
    with torch.no_grad():
        ref, out = run_both(model, x, t, r, text, backend=backend)
    assert_rel_l2(out.sample, ref.sample, FWD_TOL)


@pytest.mark.parametrize("backend", ["auto", "triton"])
def test_bidirectional_backward_matches(backend):
    model = tiny_transformer("bidirectional", seed=5)
    x = randn(1, 3, 16, 8, 8, seed=6)
    t, r = times(1, 3, 7)
    text = randn(1, 5, 32, seed=8)

    def grads():
        model.zero_grad()
        model(x, t, r, text).sample.square().mean().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters()}

    _skip_unavailable(backend)
    ref = grads()
    with anyflow.enable(model, backend=backend):
        got = grads()
    for name in ref:
        assert_rel_l2(got[name], ref[name], 1e-4)


def test_bidirectional_bf16():
    model32 = tiny_transformer("bidirectional", seed=9)
    model = tiny_transformer("bidirectional", seed=9, dtype=torch.bfloat16)
    x = randn(1, 3, 16, 8, 8, seed=10)
    t, r = times(1, 3, 11)
    text = randn(1, 5, 32, seed=12)
    with torch.no_grad():
        truth = model32(x, t, r, text).sample
        ref, out = run_both(model, x.bfloat16(), t, r, text.bfloat16())
    ours, theirs = sqnr_db(truth, out.sample), sqnr_db(truth, ref.sample)
    assert ours >= theirs - 3, f"anyflow bf16 SQNR {ours:.1f} dB vs diffusers bf16 {theirs:.1f} dB"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("clean", [True, False])
@pytest.mark.parametrize("cp", [REAL_CP, [1, 2], [2, 2, 1]])
def test_far_training_forward(far_model, cp, clean, backend):
    b, f, h, w = 2, sum(cp), 8, 8
    x = randn(b, f, 16, h, w, seed=13)
    t, r = times(b, f, 14)
    nc = len(cp) - min(len(cp), far_model.config.full_chunk_limit)
    n_ctx = sum(cp[:nc])
    t[:, :n_ctx] = 0
    r[:, :n_ctx] = 0
    kwargs = {}
    if clean:
        kwargs = dict(clean_hidden_states=randn(b, f - n_ctx, 16, h, w, seed=15), clean_timestep=torch.zeros(b, f - n_ctx))
    text = randn(b, 9, 32, seed=16)
    with torch.no_grad():
        ref, out = run_both(far_model, x, t, r, text, chunk_partition=cp, backend=backend, **kwargs)
    assert out.sample.shape == (b, f - n_ctx, 16, h, w)
    assert_rel_l2(out.sample, ref.sample, FWD_TOL)


def _empty_cache(model, batch, cp, h, w):
    cfg = model.config
    full_tpf, comp_tpf = (h // 2) * (w // 2), (h // 4) * (w // 4)
    shape = lambda n: (2, batch, cfg.num_attention_heads, n, cfg.attention_head_dim)  # noqa: E731
    return [
        {
            "full_cache": torch.zeros(shape(cfg.full_chunk_limit * max(cp) * full_tpf)),
            "compressed_cache": torch.zeros(shape((len(cp) - cfg.full_chunk_limit + 1) * max(cp) * comp_tpf)),
        }
        for _ in range(cfg.num_layers)
    ]


def _fill_cache(model, cache, latents, cp, k, text):
    """Cache steps for chunks 0..k, as AnyFlowFARPipeline.encode_kv_cache does."""
    flag = {"num_cached_chunks": 0, "is_cache_step": False}
    for j in range(k + 1):
        f = sum(cp[: j + 1])
        zeros = torch.zeros(latents.shape[0], f, dtype=torch.long)
        model(latents[:, :f], zeros, zeros, text, chunk_partition=cp[: j + 1], kv_cache=cache,
              kv_cache_flag=dict(flag, is_cache_step=True))
        flag["num_cached_chunks"] += 1
    return flag


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cp,h,w", [(REAL_CP, 8, 8), ([2, 2, 1], 8, 12)])
def test_far_cache_step_and_inference_step(far_model, cp, h, w, backend):
    _skip_unavailable(backend)
    b = 2
    latents = randn(b, sum(cp), 16, h, w, seed=17)
    text = randn(b, 9, 32, seed=18)
    with torch.no_grad(), official_far_semantics():
        for k in range(len(cp) - 1):
            results = []
            for enabled in (False, True):
                handle = anyflow.enable(far_model, backend=backend) if enabled else None
                cache = _empty_cache(far_model, b, cp, h, w)
                flag = _fill_cache(far_model, cache, latents, cp, k, text)
                cur = randn(b, cp[k + 1], 16, h, w, seed=19 + k)
                t = torch.full((b, cp[k + 1]), 937.5, dtype=torch.float64)
                r = torch.full((b, cp[k + 1]), 833.3, dtype=torch.float64)
                out = far_model(cur, t, r, text, chunk_partition=cp[: k + 2], kv_cache=cache, kv_cache_flag=dict(flag))
                results.append((cache, out.sample))
                if handle:
                    handle.disable()
            (ref_cache, ref), (our_cache, ours) = results
            for layer in range(len(ref_cache)):
                for name in ("full_cache", "compressed_cache"):
                    if ref_cache[layer][name].abs().sum() > 0:
                        assert_rel_l2(our_cache[layer][name], ref_cache[layer][name], FWD_TOL)
            assert_rel_l2(ours, ref, FWD_TOL)


def test_shipped_diffusers_inference_step_deviates_and_anyflow_does_not(far_model):
    """diffusers 0.42.1 zero-pads the mask-free cache step; anyflow matches the official semantics."""
    cp, h, w, b = [1, 3, 3], 8, 12, 1
    latents = randn(b, sum(cp), 16, h, w, seed=30)
    text = randn(b, 9, 32, seed=31)
    cur = randn(b, cp[-1], 16, h, w, seed=32)
    t = torch.full((b, cp[-1]), 900.0, dtype=torch.float64)
    r = torch.full((b, cp[-1]), 600.0, dtype=torch.float64)
    assert (cp[-1] * (h // 2) * (w // 2)) % 128 != 0

    def step(official, enabled):
        with torch.no_grad():
            handle = anyflow.enable(far_model) if enabled else None
            try:
                cache = _empty_cache(far_model, b, cp, h, w)
                with official_far_semantics() if official else torch.no_grad():
                    flag = _fill_cache(far_model, cache, latents, cp, 1, text)
                    return far_model(cur, t, r, text, chunk_partition=cp, kv_cache=cache, kv_cache_flag=flag).sample
            finally:
                if handle:
                    handle.disable()

    official = step(True, False)
    shipped = step(False, False)
    ours = step(False, True)
    assert_rel_l2(ours, official, FWD_TOL)
    err = ((shipped - official).norm() / official.norm()).item()
    assert err > 1e-3, f"expected diffusers 0.42.1 to deviate from the official semantics, got {err:.2e}"


def test_enable_keeps_class_attributes_state_and_config(tmp_path, far_model):
    cls = type(far_model)
    state = {k: v.clone() for k, v in far_model.state_dict().items()}
    attrs = {a: getattr(cls, a) for a in ("_no_split_modules", "_keep_in_fp32_modules", "_repeated_blocks",
                                           "_skip_layerwise_casting_patterns", "_supports_gradient_checkpointing")}
    handle = anyflow.enable(far_model, backend="torch")
    assert type(far_model) is not cls and isinstance(far_model, cls)
    assert type(far_model).__name__ == cls.__name__ and type(far_model).__module__ == cls.__module__
    for a, v in attrs.items():
        assert getattr(far_model, a) == v
    far_model.save_pretrained(tmp_path)
    import json

    assert json.loads((tmp_path / "config.json").read_text())["_class_name"] == cls.__name__
    assert anyflow.enable(far_model) is not None  # enabling twice is harmless
    handle.disable()
    assert type(far_model) is cls
    for k, v in far_model.state_dict().items():
        assert torch.equal(v, state[k])


def test_enable_rejects_other_objects():
    with pytest.raises(TypeError, match="anyflow.enable expects"):
        anyflow.enable(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="backend must be one of"):
        anyflow.enable(tiny_transformer("bidirectional"), backend="flash")


def test_far_forward_errors(far_model):
    text = randn(1, 4, 32)
    handle = anyflow.enable(far_model)
    try:
        x = randn(1, 5, 16, 8, 8)
        t = torch.zeros(1, 5)
        with pytest.raises(ValueError, match=r"chunk_partition=\[1, 3\] sums to 4 but there are 5"):
            far_model(x, t, t, text, chunk_partition=[1, 3])
        with pytest.raises(ValueError, match="must have 16 channels"):
            far_model(randn(1, 5, 8, 8, 8), t, t, text, chunk_partition=[1, 4])
        with pytest.raises(ValueError, match="divisible by the patch size"):
            far_model(randn(1, 5, 16, 7, 8), t, t, text, chunk_partition=[1, 4])
        with pytest.raises(ValueError, match=r"timestep must be per frame \[B, F\] = \[1, 5\]"):
            far_model(x, torch.zeros(1, 3), t, text, chunk_partition=[1, 4])
    finally:
        handle.disable()
