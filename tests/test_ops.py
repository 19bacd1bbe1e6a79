"""anyflow.ops against diffusers' AnyFlow modules and plain references: random inputs, odd token counts,
the real chunk partition, fp32 and bf16, errors."""

import math

import pytest
import torch
import torch.nn.functional as F

from anyflow import ops
from anyflow.ops import registry
from anyflow.testing.tolerances import assert_kernel_close, assert_rel_l2

REAL_CP = [1, 3, 3, 3, 3, 3, 3, 2]
DTYPES = [torch.float32, torch.bfloat16]


@pytest.fixture(autouse=True)
def _no_grad():
    with torch.no_grad():
        yield


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def randn(*shape, seed=0, dtype=torch.float32):
    return torch.randn(*shape, generator=gen(seed)).to(dtype)


# ----------------------------------------------------------------------------------------------
# time-pair embedding vs diffusers AnyFlowDualTimestepTextImageEmbedding
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("deltatime_type", ["r", "t-r"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_time_pair_embedding_matches_diffusers(deltatime_type, dtype):
    from diffusers.models.transformers.transformer_anyflow import AnyFlowDualTimestepTextImageEmbedding

    torch.manual_seed(0)
    d, freq = 24, 32
    emb = AnyFlowDualTimestepTextImageEmbedding(d, 0.25, deltatime_type, freq, 6 * d, 16)
    for p in emb.parameters():
        p.data = randn(*p.shape, seed=p.numel()) * 0.3
    emb = emb.to(dtype)
    b, f = 2, 5
    t = torch.rand(b, f, generator=gen(1), dtype=torch.float64) * 1000
    r = t * torch.rand(b, f, generator=gen(2), dtype=torch.float64)
    text = randn(b, 7, 16, dtype=dtype)
    delta = ops.delta_time(t, r, deltatime_type)
    ref_e, ref_m = emb.forward_timestep(t, delta, text, 1)
    e, m = ops.time_pair_embedding(
        t.reshape(-1), delta.reshape(-1),
        [emb.time_embedder.linear_1.weight, emb.time_embedder.linear_1.bias,
         emb.time_embedder.linear_2.weight, emb.time_embedder.linear_2.bias],
        [emb.delta_embedder.linear_1.weight, emb.delta_embedder.linear_1.bias,
         emb.delta_embedder.linear_2.weight, emb.delta_embedder.linear_2.bias],
        [emb.time_proj.weight, emb.time_proj.bias], emb.delta_emb_gate, freq_dim=freq, out_dtype=text.dtype,
    )
    torch.testing.assert_close(e, ref_e.reshape(b * f, d), rtol=0, atol=0)
    torch.testing.assert_close(m, ref_m.reshape(b * f, 6 * d), rtol=0, atol=0)


def test_timestep_sinusoid_matches_diffusers():
    from diffusers.models.embeddings import get_timestep_embedding

    t = torch.rand(11, generator=gen(3), dtype=torch.float64) * 1000
    ref = get_timestep_embedding(t, 33, flip_sin_to_cos=True, downscale_freq_shift=0)
    torch.testing.assert_close(ops.timestep_sinusoid(t, 33), ref, rtol=0, atol=0)


# ----------------------------------------------------------------------------------------------
# adaLN modulate / gated residual vs the per-token computation of diffusers' block
# ----------------------------------------------------------------------------------------------
SEGMENT_CASES = [
    ((5, 39),),  # bidirectional, odd tokens per frame (not a multiple of 128 in total)
    ((4, 9), (3, 39), (3, 39)),  # FAR training: compressed | full | clean copy
    ((0, 9), (3, 39)),  # empty compressed segment
]


def _per_token(rows, segments):
    return torch.cat([rows[:, sum(f for f, _ in segments[:i]) : sum(f for f, _ in segments[: i + 1])]
                      .repeat_interleave(n, dim=1) for i, (f, n) in enumerate(segments)], dim=1)


@pytest.mark.parametrize("segments", SEGMENT_CASES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_adaln_modulate(segments, dtype):
    from diffusers.models.normalization import FP32LayerNorm

    b, d = 2, 40
    n = sum(f * t for f, t in segments)
    rows = sum(f for f, _ in segments)
    x32 = randn(b, n, d, seed=1) * 3 + 1
    shift = randn(b, rows, d, seed=2)
    scale = randn(b, rows, d, seed=3) * 0.5
    norm = FP32LayerNorm(d, 1e-6, elementwise_affine=False)

    def ref(x):  # diffusers: norm1(x.float()) * (1 + scale) + shift with per-token (repeated) tensors
        return (norm(x.float()) * (1 + _per_token(scale, segments)) + _per_token(shift, segments)).type_as(x)

    out = ops.adaln_modulate(x32.to(dtype), shift, scale, segments)
    assert out.dtype == dtype
    assert_kernel_close(out, ref(x32), ref(x32.to(dtype)))
    if dtype == torch.float32:
        torch.testing.assert_close(out, ref(x32), rtol=0, atol=0)


@pytest.mark.parametrize("segments", SEGMENT_CASES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_gated_residual(segments, dtype):
    b, d = 2, 40
    n = sum(f * t for f, t in segments)
    rows = sum(f for f, _ in segments)
    x32, y32, gate = randn(b, n, d, seed=4), randn(b, n, d, seed=5), randn(b, rows, d, seed=6)

    def ref(x, y):  # diffusers: (x.float() + y * gate).type_as(x)
        return (x.float() + y * _per_token(gate, segments)).type_as(x)

    out = ops.gated_residual(x32.to(dtype), y32.to(dtype), gate, segments)
    assert_kernel_close(out, ref(x32, y32), ref(x32.to(dtype), y32.to(dtype)))


def test_modulation_errors():
    x = randn(1, 10, 8)
    rows = randn(1, 2, 8)
    with pytest.raises(ValueError, match="covers 9 tokens"):
        ops.adaln_modulate(x, rows, rows, ((1, 4), (1, 5)))
    with pytest.raises(ValueError, match="covers 3 frames"):
        ops.adaln_modulate(x, rows, rows, ((1, 4), (2, 3)))
    with pytest.raises(TypeError, match="x must have dtype"):
        ops.adaln_modulate(x.to(torch.int32), rows, rows, ((2, 5),))
    with pytest.raises(ValueError, match="one device"):
        ops.gated_residual(x, x, rows.to("meta"), ((2, 5),))
    with pytest.raises(ValueError, match="y must have the shape"):
        ops.gated_residual(x, x[:, :5], rows, ((2, 5),))


# ----------------------------------------------------------------------------------------------
# RoPE vs diffusers' complex128 tables (full and FAR-compressed)
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("head_dim", [12, 128])
@pytest.mark.parametrize("compressed", [False, True])
def test_rope_matches_diffusers(head_dim, compressed):
    from diffusers.models.transformers.transformer_anyflow_far import AnyFlowCausalRotaryPosEmbed, apply_rotary_emb

    rope = AnyFlowCausalRotaryPosEmbed(head_dim, (1, 2, 2), (1, 4, 4), 64)
    frames, h, w = 5, 3, 7
    if compressed:
        ref_freqs = rope._forward_compressed_frame(frames, h, w, torch.device("cpu")).flatten(0, 2)
    else:
        ref_freqs = rope._forward_full_frame(frames, h, w, torch.device("cpu")).flatten(0, 2)
    x = randn(2, frames * h * w, 3, head_dim, seed=7)
    ref = apply_rotary_emb(x.transpose(1, 2), ref_freqs[None, None]).transpose(1, 2)
    cos, sin = ops.rope_table(ops.rope_angles(head_dim, torch.arange(frames), h, w, 2 if compressed else 1))
    out = ops.apply_rope(x, cos, sin)
    assert_kernel_close(out, ref)


def test_rope_errors():
    with pytest.raises(ValueError, match="head_dim must be even"):
        ops.rope_pair_split(7)
    cos, sin = ops.rope_table(ops.rope_angles(12, torch.arange(2), 2, 2))
    with pytest.raises(ValueError, match="cos/sin must be"):
        ops.apply_rope(randn(1, 9, 2, 12), cos, sin)


# ----------------------------------------------------------------------------------------------
# FAR attention
# ----------------------------------------------------------------------------------------------
def _sdpa_ref(q, k, v, mask=None):
    return F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("adjacent", [True, False])
def test_segmented_attention(dtype, adjacent):
    b, h, d = 2, 3, 16
    lens = [39, 117, 45]  # compressed cache | full cache | current chunk; none a multiple of 128
    q32 = randn(b, h, lens[-1], d, seed=8)
    k32, v32 = randn(b, h, sum(lens), d, seed=9), randn(b, h, sum(lens), d, seed=10)
    bounds = [0, lens[0], lens[0] + lens[1], sum(lens)]
    k, v = k32.to(dtype), v32.to(dtype)
    if adjacent:  # views of one buffer, as FARKVCache lays them out
        keys = [k[:, :, a:c] for a, c in zip(bounds, bounds[1:])]
        values = [v[:, :, a:c] for a, c in zip(bounds, bounds[1:])]
    else:
        keys = [k[:, :, a:c].clone() for a, c in zip(bounds, bounds[1:])]
        values = [v[:, :, a:c].clone() for a, c in zip(bounds, bounds[1:])]
    out = ops.segmented_attention(q32.to(dtype), keys, values)
    assert_kernel_close(out, _sdpa_ref(q32, k32, v32), _sdpa_ref(q32.to(dtype), k, v).to(dtype))


def test_segmented_attention_lse():
    q, k, v = randn(1, 2, 33, 8, seed=11), randn(1, 2, 70, 8, seed=12), randn(1, 2, 70, 8, seed=13)
    out, lse = ops.segmented_attention(q, [k[:, :, :20], k[:, :, 20:]], [v[:, :, :20], v[:, :, 20:]], return_lse=True)
    logits = q @ k.transpose(-1, -2) / math.sqrt(8)
    assert_kernel_close(lse, torch.logsumexp(logits, -1))
    assert_kernel_close(out, _sdpa_ref(q, k, v))


def test_segmented_attention_separate_segments_under_autograd():
    """Separate KV segments that need gradients (the on-policy rollout's snapshot) give the same output as
    without autograd and the gradients of one SDPA over the concatenated keys."""
    g = torch.Generator().manual_seed(31)
    q = torch.randn(1, 2, 19, 16, generator=g)
    keys = [torch.randn(1, 2, n, 16, generator=g) for n in (7, 0, 12)]
    values = [torch.randn(1, 2, n, 16, generator=g) for n in (7, 0, 12)]
    with torch.no_grad():
        plain = ops.segmented_attention(q, keys, values, backend="torch")
    torch.set_grad_enabled(True)  # inside this module's no-grad fixture, which restores the mode afterwards
    leaves = [t.clone().requires_grad_() for t in (q, *keys, *values)]
    out = ops.segmented_attention(leaves[0], leaves[1:4], leaves[4:], backend="torch")
    assert_rel_l2(out.detach(), plain, 1e-6)
    out.square().sum().backward()
    ref_leaves = [t.clone().requires_grad_() for t in (q, *keys, *values)]
    ref = F.scaled_dot_product_attention(ref_leaves[0], torch.cat(ref_leaves[1:4], 2), torch.cat(ref_leaves[4:], 2))
    ref.square().sum().backward()
    for mine, theirs in zip(leaves, ref_leaves):
        if mine.numel():
            assert_rel_l2(mine.grad, theirs.grad, 1e-5)


def test_segmented_attention_errors():
    q = randn(1, 2, 5, 8)
    with pytest.raises(ValueError, match="non-empty"):
        ops.segmented_attention(q, [], [])
    with pytest.raises(TypeError, match="q's dtype"):
        ops.segmented_attention(q, [q.to(torch.bfloat16)], [q.to(torch.bfloat16)])
    with pytest.raises(ValueError, match=r"keys\[0\]/values\[0\] must be"):
        ops.segmented_attention(q, [randn(1, 2, 5, 4)], [randn(1, 2, 5, 4)])
    with pytest.raises(ValueError, match="one device"):
        ops.segmented_attention(q, [q.to("meta")], [q.to("meta")])


def _diffusers_dense_mask(cp, nc_chunks, full_tpf, comp_tpf, clean):
    from diffusers.models.transformers.transformer_anyflow_far import _build_far_block_mask_from_far_cfg
    from torch.nn.attention.flex_attention import create_mask

    far_cfg = {
        "chunk_partition": cp, "num_compressed_chunk": nc_chunks, "num_full_frames": sum(cp[nc_chunks:]),
        "num_compressed_frames": sum(cp[:nc_chunks]), "full_token_per_frame": full_tpf,
        "compressed_token_per_frame": comp_tpf,
    }
    bm = _build_far_block_mask_from_far_cfg(far_cfg, has_clean=clean, device="cpu")
    return create_mask(bm.mask_mod, None, None, bm.shape[-2], bm.shape[-1], device="cpu")[0, 0]


@pytest.mark.parametrize(
    "cp,nc_chunks,clean",
    [(REAL_CP, 5, True), (REAL_CP, 6, False), ([1, 2], 0, True), ([2, 2, 1], 1, False), ([2, 2, 1], 2, True)],
)
@pytest.mark.parametrize("dtype", DTYPES)
def test_chunk_causal_attention_matches_diffusers_mask(cp, nc_chunks, clean, dtype):
    full_tpf, comp_tpf = 6, 2  # a 4x6 latent at patch 2 / 4 (compressed 2x... tokens), small and odd
    layout = ops.far_attention_layout(cp, nc_chunks, full_tpf, comp_tpf, clean_copy=clean)
    dense = _diffusers_dense_mask(cp, nc_chunks, full_tpf, comp_tpf, clean)
    n = layout.q_len
    assert n % 128 != 0
    assert torch.equal(layout.dense_mask(), dense[:n, :n]), "range layout differs from diffusers' FAR mask"
    b, h, d = 1, 2, 16
    q32, k32, v32 = randn(b, h, n, d, seed=14), randn(b, h, n, d, seed=15), randn(b, h, n, d, seed=16)
    out = ops.chunk_causal_attention(q32.to(dtype), k32.to(dtype), v32.to(dtype), layout)
    mask = dense[:n, :n]
    ref_low = _sdpa_ref(q32.to(dtype), k32.to(dtype), v32.to(dtype), mask).to(dtype)
    assert_kernel_close(out, _sdpa_ref(q32, k32, v32, mask), ref_low)
    out2, lse = ops.chunk_causal_attention(q32, k32, v32, layout, return_lse=True)
    logits = (q32 @ k32.transpose(-1, -2) / math.sqrt(d)).masked_fill(~mask, float("-inf"))
    assert_kernel_close(lse, torch.logsumexp(logits, -1))


def test_chunk_causal_layout_with_cached_prefix():
    layout = ops.chunk_causal_layout([6, 12], kv_offset=5)
    mask = layout.dense_mask()
    assert mask.shape == (18, 23)
    assert mask[:6, :11].all() and not mask[:6, 11:].any() and mask[6:].all()


def test_chunk_causal_attention_errors():
    layout = ops.far_attention_layout([1, 2], 0, 4, 1)
    q = randn(1, 2, 12, 8)
    with pytest.raises(ValueError, match="layout is for 12 queries x 12 keys"):
        ops.chunk_causal_attention(q[:, :, :11], q[:, :, :11], q[:, :, :11], layout)
    with pytest.raises(TypeError, match="layout must be an AttentionLayout"):
        ops.chunk_causal_attention(q, q, q, "causal")
    with pytest.raises(ValueError, match="num_compressed_chunks must be"):
        ops.far_attention_layout([1, 2], 3, 4, 1)


# ----------------------------------------------------------------------------------------------
# Euler shortcut vs FlowMapEulerDiscreteScheduler.step and the pipelines' CFG combine
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("steps", [1, 4, 8])
def test_euler_shortcut_matches_scheduler(steps):
    from diffusers import FlowMapEulerDiscreteScheduler

    sched = FlowMapEulerDiscreteScheduler(shift=5.0)
    sched.set_timesteps(steps)
    z = randn(2, 5, 4, 6, 10, seed=17)
    for i, t in enumerate(sched.timesteps):
        u = randn(*z.shape, seed=18 + i)
        r = (sched.sigmas[i + 1] * 1000).item()
        ref = sched.step(u, t, z, return_dict=False)[0]
        out = torch.full_like(z, float("nan"))  # poisoned destination
        ops.euler_shortcut(z, u, t.item(), r, out=out)
        assert_kernel_close(out, ref)
        z = ref


@pytest.mark.parametrize("dtype", DTYPES)
def test_euler_shortcut_cfg_context_and_per_frame_times(dtype):
    b, f = 2, 5
    z = randn(b, f, 4, 3, 5, seed=19)
    u = randn(2 * b, f, 4, 3, 5, seed=20).to(dtype)
    t = torch.rand(b, f, generator=gen(21), dtype=torch.float64) * 1000
    r = t * 0.5
    g = 3.5
    uu, uc = u[:b].float(), u[b:].float()
    ref = z - ((t - r) / 1000).float()[:, :, None, None, None] * (uu + g * (uc - uu))
    ref[:, :2] = z[:, :2]
    out = ops.euler_shortcut(z, u, t, r, guidance_scale=g, num_context_frames=2)
    assert out.dtype == torch.float32
    assert_kernel_close(out, ref)
    assert torch.equal(out[:, :2], z[:, :2])


def test_euler_shortcut_errors():
    z = randn(1, 3, 2, 2, 2)
    with pytest.raises(ValueError, match="velocity must be"):
        ops.euler_shortcut(z, randn(3, 3, 2, 2, 2), 500.0, 100.0)
    with pytest.raises(ValueError, match=r"t must be a number or a \[B, F\]"):
        ops.euler_shortcut(z, z, torch.ones(2, 2), 100.0)
    with pytest.raises(ValueError, match="num_context_frames"):
        ops.euler_shortcut(z, z, 500.0, 100.0, num_context_frames=4)
    with pytest.raises(ValueError, match="one device"):
        ops.euler_shortcut(z, z.to("meta"), 500.0, 100.0)
    with pytest.raises(ValueError, match=r"t must be a finite number in \[0, 1000\], got 1500.0"):
        ops.euler_shortcut(z, z, 1500.0, 100.0)
    with pytest.raises(ValueError, match=r"r must be a finite number in \[0, 1000\], got -1.0"):
        ops.euler_shortcut(z, z, 500.0, -1.0)
    torch.testing.assert_close(ops.euler_shortcut(z, z, 100.0, 500.0), z * 1.4)  # r > t: a backward jump


# ----------------------------------------------------------------------------------------------
# backend registry
# ----------------------------------------------------------------------------------------------
def test_registry_explicit_backend_reports_reason():
    z = randn(1, 3, 2, 2, 2)
    x, rows = randn(1, 5, 8), randn(1, 5, 8)
    five_segments = ((1, 1),) * 5  # the Triton kernels take at most 4 frame segments
    with pytest.raises(registry.BackendUnavailableError, match="backend 'triton' cannot run this call: at most 4"):
        ops.adaln_modulate(x, rows, rows, five_segments, backend="triton")
    with pytest.raises(ValueError, match="backend must be one of"):
        ops.euler_shortcut(z, z, 500.0, 100.0, backend="flash")


def test_registry_env_override(monkeypatch):
    z = randn(1, 3, 2, 2, 2)
    monkeypatch.setenv("ANYFLOW_BACKEND", "triton")
    x, rows = randn(1, 5, 8), randn(1, 5, 8)
    with pytest.raises(registry.BackendUnavailableError, match="'triton'"):
        ops.adaln_modulate(x, rows, rows, ((1, 1),) * 5)  # more segments than the Triton kernels take
    monkeypatch.setenv("ANYFLOW_BACKEND", "torch")
    assert_rel_l2(ops.euler_shortcut(z, z, 500.0, 100.0), z * 0.6, 1e-6)


def test_registry_report_lists_every_op_and_backend():
    rows = registry.report("cpu")
    ops_seen = {r["op"] for r in rows}
    assert {"adaln_modulate", "gated_residual", "time_pair_embedding", "segmented_attention",
            "chunk_causal_attention", "euler_shortcut", "apply_rope"} <= ops_seen
    for op in ops_seen:
        auto = [r for r in rows if r["op"] == op and r["backend"] == "auto"][0]
        assert auto["available"] and auto["reason"] == "torch"
        for r in rows:
            if r["op"] == op and not r["available"]:
                assert r["reason"], r


def test_backend_context_precedence(monkeypatch):
    """``backend=`` argument > innermost ``ops.backend`` setting > ANYFLOW_BACKEND > "auto"."""
    monkeypatch.delenv("ANYFLOW_BACKEND", raising=False)
    monkeypatch.setattr(registry, "_selected", None)
    assert registry.requested_backend() == "auto"
    monkeypatch.setenv("ANYFLOW_BACKEND", "cuda")
    assert registry.requested_backend() == "cuda"
    with ops.backend("triton") as inside:
        assert inside == "triton" and registry.requested_backend() == "triton"
        assert registry.requested_backend("torch") == "torch"
        with ops.backend(("triton", "torch")):
            assert registry.requested_backend() == ("triton", "torch")
        with ops.backend("auto"):  # undoes the outer setting: the environment decides again
            assert registry.requested_backend() == "cuda"
        with ops.backend(None):  # sets and restores nothing
            assert registry.requested_backend() == "triton"
        with pytest.raises(KeyError), ops.backend("torch"):
            raise KeyError
        assert registry.requested_backend() == "triton"
    assert registry.requested_backend() == "cuda"
    ops.backend("torch")  # process-wide, as set_sdpa_policy
    assert registry.requested_backend() == "torch"
    with pytest.raises(ValueError, match="backend must be one of"):
        ops.backend("flash")
    x, rows = randn(1, 5, 8), randn(1, 5, 8)
    with ops.backend("triton"), pytest.raises(registry.BackendUnavailableError, match="'triton'.*at most 4"):
        ops.adaln_modulate(x, rows, rows, ((1, 1),) * 5)


def test_backend_context_compiles_without_recompiles(monkeypatch):
    """Entered inside a compiled function (as an enabled forward does), the setting is traced: no graph
    break, and calls with new values reuse the graph."""
    monkeypatch.setattr(registry, "_selected", None)
    segs = ((2, 3), (1, 5))

    def f(x, shift, scale):
        with ops.backend("torch"):
            return ops.adaln_modulate(x, shift, scale, segs)

    torch._dynamo.reset()
    try:
        compiled = torch.compile(f, fullgraph=True, backend="eager")
        for seed in (0, 1):
            args = (randn(1, 11, 8, seed=seed), randn(1, 3, 8, seed=seed + 2), randn(1, 3, 8, seed=seed + 4))
            with torch._dynamo.config.patch(error_on_recompile=seed == 1):
                torch.testing.assert_close(compiled(*args), f(*args))
    finally:
        torch._dynamo.reset()
    assert registry._selected is None  # the context restored the setting


def test_not_supported_reasons_lists_every_declared_constraint():
    q = randn(1, 2, 3, 9).requires_grad_()
    five = (randn(1, 2, 3, 9),) * 5
    with torch.enable_grad():
        reasons = registry.not_supported_reasons("segmented_attention", "cuda", q, five, five, 0.1, False)
    if registry.backend_reason("cuda") is None:
        assert any("forward-only" in r for r in reasons) and any("at most 4 non-empty KV" in r for r in reasons)
    assert registry.not_supported_reasons("segmented_attention", "torch", q, five, five, 0.1, False) == []
    supports = {(r["op"], r["backend"]): r["supports"] for r in registry.report("cpu")}
    assert "forward-only" in supports[("segmented_attention", "cuda")]
    assert "segments <= 4" in supports[("adaln_modulate", "triton")]
    assert supports[("adaln_modulate", "torch")] == "any call"


# ----------------------------------------------------------------------------------------------
# fused residual + norm, fused QK RMSNorm + RoPE
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["modulate", "affine", "plain_add"])
@pytest.mark.parametrize("segments", SEGMENT_CASES[:2])
@pytest.mark.parametrize("dtype", DTYPES)
def test_residual_norm(kind, segments, dtype):
    from diffusers.models.normalization import FP32LayerNorm

    b, d = 2, 40
    n = sum(f * t for f, t in segments)
    rows = sum(f for f, _ in segments)
    x32, y32 = randn(b, n, d, seed=30), randn(b, n, d, seed=31)
    gate, shift, scale = randn(b, rows, d, seed=32), randn(b, rows, d, seed=33), randn(b, rows, d, seed=34)
    affine = FP32LayerNorm(d, 1e-6, elementwise_affine=True)
    affine.weight.data, affine.bias.data = randn(d, seed=35), randn(d, seed=36)
    plain = FP32LayerNorm(d, 1e-6, elementwise_affine=False)

    def ref(x, y):  # diffusers' block steps, unfused, per-token modulation
        if kind == "plain_add":
            x_new = x + y
        else:
            x_new = (x.float() + y * _per_token(gate, segments)).type_as(x)
        if kind == "affine":
            return x_new, affine(x_new.float()).type_as(x_new)
        h = plain(x_new.float()) * (1 + _per_token(scale, segments)) + _per_token(shift, segments)
        return x_new, h.type_as(x_new)

    kwargs = dict(weight=affine.weight, bias=affine.bias) if kind == "affine" else dict(shift=shift, scale=scale)
    x_new, h = ops.residual_norm(x32.to(dtype), y32.to(dtype), None if kind == "plain_add" else gate, segments, **kwargs)
    r32, r_low = ref(x32, y32), ref(x32.to(dtype), y32.to(dtype))
    assert_kernel_close(x_new, r32[0], r_low[0])
    assert_kernel_close(h, r32[1], r_low[1])


def test_residual_norm_errors():
    x, rows = randn(1, 10, 8), randn(1, 2, 8)
    with pytest.raises(ValueError, match="together"):
        ops.residual_norm(x, x, rows, ((2, 5),), shift=rows)
    with pytest.raises(ValueError, match="not both"):
        ops.residual_norm(x, x, rows, ((2, 5),), shift=rows, scale=rows, weight=torch.ones(8))
    with pytest.raises(ValueError, match=r"weight must be \[8\]"):
        ops.residual_norm(x, x, rows, ((2, 5),), weight=torch.ones(7))


@pytest.mark.parametrize("head_dim", [12, 128])
@pytest.mark.parametrize("dtype", DTYPES)
def test_qk_norm_rope_matches_diffusers(head_dim, dtype):
    from diffusers.models.normalization import RMSNorm
    from diffusers.models.transformers.transformer_anyflow_far import AnyFlowCausalRotaryPosEmbed, apply_rotary_emb

    heads, frames, h, w = 2, 3, 3, 5
    norm = RMSNorm(heads * head_dim, eps=1e-6)
    norm.weight.data = 1 + 0.1 * randn(heads * head_dim, seed=40)
    rope = AnyFlowCausalRotaryPosEmbed(head_dim, (1, 2, 2), (1, 4, 4), 64)
    freqs = rope._forward_full_frame(frames, h, w, torch.device("cpu")).flatten(0, 2)[None, None]
    x32 = randn(2, frames * h * w, heads * head_dim, seed=41) * 2

    def ref(x):  # diffusers FAR processor: norm_q, cast back, (B, H, L, D), complex128 rotary
        n = norm.to(x.dtype)(x).to(x.dtype).unflatten(2, (heads, -1)).transpose(1, 2)
        return apply_rotary_emb(n, freqs).transpose(1, 2)

    cos, sin = ops.rope_table(ops.rope_angles(head_dim, torch.arange(frames), h, w))
    out = ops.qk_norm_rope(x32.to(dtype), norm.weight.to(dtype), cos, sin, heads)
    assert out.shape == (2, frames * h * w, heads, head_dim) and out.dtype == dtype
    assert_kernel_close(out, ref(x32), ref(x32.to(dtype)))
