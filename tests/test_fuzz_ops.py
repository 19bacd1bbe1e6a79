"""Property-based fuzzing of every op of :mod:`anyflow.ops` against plain float64 math, and of its argument checks.

For random shapes, strided (non-contiguous) views, dtypes, frame-segment tables, chunk partitions and KV
segment layouts drawn by Hypothesis:

* ``"torch"`` (the reference implementation) is compared with the spec written out here in float64
  (per-token modulation, dense masked softmax, complex rotation), under the rules of
  :mod:`anyflow.testing.tolerances`;
* ``"cuda"`` (its C++ CPU twins, when ``anyflow._C`` is built) and ``"triton"`` (the CPU interpreter
  under ``TRITON_INTERPRET=1``, set by ``tests/conftest.py``; slow, so few and tiny examples) are
  compared with the same float64 truth, with the ``"torch"`` result in the kernel's dtype as the
  low-precision reference (rule 1). A call a kernel declines (``BackendUnavailableError``: strides,
  dtypes or sizes outside what it states it supports) is not an error; a wrong result is;
* every rejected input (wrong rank, dtype, type, device, shape, segment table, partition, head dim, ...)
  raises ``ValueError`` or ``TypeError`` whose message names the argument.

CI budget: the ``anyflow-ci`` Hypothesis profile (``derandomize=True``, so the examples are the same on
every run; ``deadline=None``; a few examples per test; the file runs in about a minute on 2 cores).
Longer run (random examples, 50x the budget)::

    ANYFLOW_FUZZ_EXAMPLES=50 ANYFLOW_FUZZ_RANDOM=1 pytest tests/test_fuzz_ops.py

``ANYFLOW_FUZZ_EXAMPLES`` multiplies every test's ``max_examples``; ``ANYFLOW_FUZZ_RANDOM=1`` turns
derandomisation off (a failure is then printed with ``@reproduce_failure``).
"""

from __future__ import annotations

import math
import os

import pytest
import torch

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import anyflow.ops as O  # noqa: E402
from anyflow import _ext  # noqa: E402
from anyflow.ops import BackendUnavailableError  # noqa: E402
from anyflow.testing.tolerances import assert_kernel_close  # noqa: E402

SCALE = max(1, int(os.environ.get("ANYFLOW_FUZZ_EXAMPLES", "1")))
settings.register_profile(
    "anyflow-ci",
    derandomize=os.environ.get("ANYFLOW_FUZZ_RANDOM") != "1",
    deadline=None,
    database=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
)
BASE = settings.get_profile("anyflow-ci")


def budget(n: int) -> settings:
    """The CI profile with ``n`` examples (times ``ANYFLOW_FUZZ_EXAMPLES``)."""
    return settings(BASE, max_examples=n * SCALE)


HAS_C = _ext.extension_status()[0] is not None
HAS_TRITON = O.registry.backend_reason("triton") is None
KERNELS = [
    pytest.param("cuda", marks=pytest.mark.skipif(not HAS_C, reason="anyflow._C is not built")),
    pytest.param("triton", marks=pytest.mark.skipif(not HAS_TRITON, reason="triton cannot run here")),
]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


# ----------------------------------------------------------------------------------------------
# strategies
# ----------------------------------------------------------------------------------------------
def _tensor(shape, dtype, seed: int, strided: bool = False, scale: float = 1.0) -> torch.Tensor:
    """Seeded normal values of ``shape`` in ``dtype``; ``strided`` returns a non-contiguous view of a
    larger buffer (padding on the last two axes, every other row)."""
    g = torch.Generator().manual_seed(seed)
    if not strided or len(shape) < 2:
        return (torch.randn(*shape, generator=g) * scale).to(dtype)
    big = list(shape)
    big[-2] = 2 * shape[-2] + 1
    big[-1] = shape[-1] + 3
    buf = (torch.randn(*big, generator=g) * scale).to(dtype)
    return buf[..., 1::2, 1 : 1 + shape[-1]]


@st.composite
def segment_tables(draw, max_segments: int = 3):
    """``((frames, tokens_per_frame), ...)`` with at least one frame in total (empty segments allowed)."""
    n = draw(st.integers(1, max_segments))
    segs = [(draw(st.integers(0, 3)), draw(st.integers(1, 5))) for _ in range(n)]
    if sum(f for f, _ in segs) == 0:
        segs[0] = (1, segs[0][1])
    return tuple(segs)


def _frame_index(segs) -> torch.Tensor:
    """The frame (row) of every token of a segment table."""
    rows, row = [], 0
    for f, n in segs:
        for _ in range(f):
            rows += [row] * n
            row += 1
    return torch.tensor(rows, dtype=torch.long)


def _ln(x: torch.Tensor, eps: float) -> torch.Tensor:
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + eps)


def _check(out, truth, dtype, low=None):
    """Rule 1 against the float64 truth; ``low`` is the reference in ``dtype`` (default: truth rounded)."""
    truth32 = truth.float()
    assert out.dtype == dtype
    assert_kernel_close(out, truth32, truth.to(dtype) if low is None else low)


def _run(op, backend, *args, **kwargs):
    """``op(..., backend=backend)``, or ``None`` where a kernel declines the call."""
    try:
        return op(*args, backend=backend, **kwargs)
    except BackendUnavailableError:
        if backend == "torch":
            raise
        return None


# ----------------------------------------------------------------------------------------------
# elementwise ops: the spec in float64, per token
# ----------------------------------------------------------------------------------------------
def _adaln_case(data, dtype, tiny=False):
    segs = data.draw(segment_tables(2 if tiny else 3), label="segments")
    b = data.draw(st.integers(1, 2), label="B")
    d = data.draw(st.sampled_from([8, 12] if tiny else [1, 3, 8, 17, 32, 64]), label="d")
    seed = data.draw(st.integers(0, 2**16), label="seed")
    strided = data.draw(st.booleans(), label="strided")
    n, r = sum(f * t for f, t in segs), sum(f for f, _ in segs)
    x = _tensor((b, n, d), dtype, seed, strided)
    shift = _tensor((b, r, d), data.draw(st.sampled_from(DTYPES), label="mod dtype"), seed + 1, scale=0.5)
    scale = _tensor((b, r, d), shift.dtype, seed + 2, strided, scale=0.5)
    return segs, x, shift, scale


def _adaln_truth(x, shift, scale, segs, eps):
    rows = _frame_index(segs)
    return _ln(x.double(), eps) * (1 + scale.double()[:, rows]) + shift.double()[:, rows]


@given(data=st.data(), dtype=st.sampled_from(DTYPES))
@budget(25)
def test_adaln_modulate_torch(data, dtype):
    segs, x, shift, scale = _adaln_case(data, dtype)
    _check(O.adaln_modulate(x, shift, scale, segs, 1e-6, backend="torch"), _adaln_truth(x, shift, scale, segs, 1e-6), dtype)


@given(data=st.data(), dtype=st.sampled_from(DTYPES))
@budget(25)
def test_gated_residual_torch(data, dtype):
    segs, x, gate, y = _adaln_case(data, dtype)
    y = y.to(data.draw(st.sampled_from(DTYPES), label="y dtype"))[:, :1].expand(-1, x.shape[1], -1) \
        if data.draw(st.booleans(), label="broadcast y") and gate.shape[1] == x.shape[1] else _tensor(x.shape, dtype, 9)
    truth = x.double() + y.double() * gate.double()[:, _frame_index(segs)]
    _check(O.gated_residual(x, y, gate, segs, backend="torch"), truth, dtype)


def _residual_norm_case(data, dtype, tiny=False):
    segs, x, shift, scale = _adaln_case(data, dtype, tiny)
    seed = data.draw(st.integers(0, 2**16), label="seed2")
    y = _tensor(x.shape, dtype, seed, data.draw(st.booleans(), label="y strided"))
    gate = _tensor(shift.shape, shift.dtype, seed + 1) if data.draw(st.booleans(), label="gate") else None
    kind = data.draw(st.sampled_from(["adaln", "affine", "plain"]), label="norm")
    kw = {}
    if kind == "adaln":
        kw = dict(shift=shift, scale=scale)
    elif kind == "affine":
        d = x.shape[2]
        kw = dict(weight=_tensor((d,), dtype, seed + 2) if data.draw(st.booleans(), label="w") else None,
                  bias=_tensor((d,), dtype, seed + 3) if data.draw(st.booleans(), label="b") else None)
    return segs, x, y, gate, kw


def _residual_norm_truth(x, y, gate, segs, eps, shift=None, scale=None, weight=None, bias=None):
    rows = _frame_index(segs)
    g = 1.0 if gate is None else gate.double()[:, rows]
    x_new = (x.double() + y.double() * g).to(x.dtype)  # the stream is rounded once, then normed
    h = _ln(x_new.double(), eps)
    if shift is not None:
        h = h * (1 + scale.double()[:, rows]) + shift.double()[:, rows]
    else:
        h = h * (1 if weight is None else weight.double()) + (0 if bias is None else bias.double())
    return x.double() + y.double() * g, h


@given(data=st.data(), dtype=st.sampled_from(DTYPES))
@budget(25)
def test_residual_norm_torch(data, dtype):
    segs, x, y, gate, kw = _residual_norm_case(data, dtype)
    x_new, h = O.residual_norm(x, y, gate, segs, 1e-6, backend="torch", **kw)
    t_new, t_h = _residual_norm_truth(x, y, gate, segs, 1e-6, **kw)
    _check(x_new, t_new, dtype)
    # h is the norm of the rounded stream: compare against the norm of the op's own x_new
    _check(h, _residual_norm_truth(x_new, torch.zeros_like(x_new), None, segs, 1e-6, **kw)[1], dtype)


def _rope_case(data, dtype, tiny=False):
    b = data.draw(st.integers(1, 2), label="B")
    length = data.draw(st.integers(1, 6 if tiny else 20), label="L")
    heads = data.draw(st.integers(1, 2 if tiny else 4), label="H")
    dh = data.draw(st.sampled_from([6, 12] if tiny else [6, 8, 12, 18, 64, 128]), label="Dh")
    seed = data.draw(st.integers(0, 2**16), label="seed")
    frames = torch.arange(length) * data.draw(st.integers(0, 3), label="frame step")
    ang = O.rope_angles(dh, frames, 1, 1, downscale=data.draw(st.sampled_from([1, 2]), label="downscale"))
    cos, sin = O.rope_table(ang)
    return b, length, heads, dh, seed, cos, sin


def _rope_truth(x, cos, sin):
    xd = x.double().unflatten(-1, (-1, 2))
    c, s = cos.double()[:, None, :], sin.double()[:, None, :]
    return torch.stack([xd[..., 0] * c - xd[..., 1] * s, xd[..., 0] * s + xd[..., 1] * c], -1).flatten(-2)


@given(data=st.data(), dtype=st.sampled_from(DTYPES))
@budget(25)
def test_apply_rope_torch(data, dtype):
    b, length, heads, dh, seed, cos, sin = _rope_case(data, dtype)
    x = _tensor((b, heads, length, dh), dtype, seed, data.draw(st.booleans(), label="strided")).transpose(1, 2)
    _check(O.apply_rope(x, cos, sin, backend="torch"), _rope_truth(x, cos, sin), dtype)


def _qk_truth(x, weight, cos, sin, heads, eps):
    xd = x.double()
    h = xd / torch.sqrt(xd.pow(2).mean(-1, keepdim=True) + eps) * weight.double()
    # the op rounds the normed values to nothing: RMSNorm and RoPE are one fp32 pass
    return _rope_truth(h.unflatten(-1, (heads, -1)), cos, sin)


@given(data=st.data(), dtype=st.sampled_from(DTYPES))
@budget(25)
def test_qk_norm_rope_torch(data, dtype):
    b, length, heads, dh, seed, cos, sin = _rope_case(data, dtype)
    x = _tensor((b, length, heads * dh), dtype, seed, data.draw(st.booleans(), label="strided"))
    weight = _tensor((heads * dh,), data.draw(st.sampled_from(DTYPES), label="w dtype"), seed + 1)
    _check(O.qk_norm_rope(x, weight, cos, sin, heads, backend="torch"), _qk_truth(x, weight, cos, sin, heads, 1e-6),
           dtype)


def _euler_case(data, dtype, tiny=False):
    b = data.draw(st.integers(1, 2), label="B")
    f = data.draw(st.integers(1, 3 if tiny else 5), label="F")
    c, h, w = (data.draw(st.integers(1, 3 if tiny else 5), label=k) for k in "CHW")
    seed = data.draw(st.integers(0, 2**16), label="seed")
    cfg = data.draw(st.booleans(), label="cfg")
    latents = _tensor((b, f, c, h, w), dtype, seed, data.draw(st.booleans(), label="strided"))
    velocity = _tensor((2 * b if cfg else b, f, c, h, w), data.draw(st.sampled_from(DTYPES), label="u dtype"), seed + 1)
    per_frame = data.draw(st.booleans(), label="per-frame t")
    g = torch.Generator().manual_seed(seed + 2)
    if per_frame:
        t = torch.rand(b, f, generator=g, dtype=torch.float64) * 1000
        r = t * torch.rand(b, f, generator=g, dtype=torch.float64)
    else:
        t = data.draw(st.floats(0, 1000), label="t")
        r = data.draw(st.floats(0, 1000), label="r")
    kw = dict(guidance_scale=data.draw(st.floats(0, 8), label="g"),
              num_context_frames=data.draw(st.integers(0, f), label="context"))
    return latents, velocity, t, r, kw


def _euler_truth(latents, velocity, t, r, guidance_scale, num_context_frames):
    b, f = latents.shape[:2]
    u = velocity.double()
    if u.shape[0] == 2 * b:
        u = u[:b] + guidance_scale * (u[b:] - u[:b])
    dt = (torch.as_tensor(t, dtype=torch.float64) - torch.as_tensor(r, dtype=torch.float64)).expand(b, f) / 1000
    z = latents.double() - dt.float().double()[:, :, None, None, None] * u  # dt is handed to the kernels in fp32
    z[:, :num_context_frames] = latents[:, :num_context_frames].double()
    return z


@given(data=st.data(), dtype=st.sampled_from(DTYPES))
@budget(25)
def test_euler_shortcut_torch(data, dtype):
    latents, velocity, t, r, kw = _euler_case(data, dtype)
    _check(O.euler_shortcut(latents, velocity, t, r, backend="torch", **kw), _euler_truth(latents, velocity, t, r, **kw),
           dtype)


@given(data=st.data())
@budget(15)
def test_time_pair_embedding_torch(data):
    rows = data.draw(st.integers(1, 6), label="R")
    d = data.draw(st.integers(1, 16), label="d")
    freq = data.draw(st.integers(2, 32), label="freq_dim")
    seed = data.draw(st.integers(0, 2**16), label="seed")
    g = torch.Generator().manual_seed(seed)
    t = torch.rand(rows, generator=g) * 1000
    delta = t * torch.rand(rows, generator=g)

    def mlp(s):
        return (_tensor((d, freq), torch.float32, s, scale=0.3), _tensor((d,), torch.float32, s + 1),
                _tensor((d, d), torch.float32, s + 2, scale=0.3), _tensor((d,), torch.float32, s + 3))

    time_mlp, delta_mlp = mlp(seed + 10), mlp(seed + 20)
    proj = (_tensor((6 * d, d), torch.float32, seed + 30, scale=0.3), _tensor((6 * d,), torch.float32, seed + 31))
    gate = torch.tensor([data.draw(st.floats(0, 1), label="gate")])
    e, m = O.time_pair_embedding(t, delta, time_mlp, delta_mlp, proj, gate, freq_dim=freq, out_dtype=torch.float32,
                                 backend="torch")

    def sinusoid(x):
        half = freq // 2
        w = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float64) / half)
        a = x.double()[:, None] * w.float().double()[None]  # the op builds its frequencies in fp32
        out = torch.cat([torch.cos(a), torch.sin(a)], -1)
        return torch.nn.functional.pad(out, (0, freq % 2))

    def run(s, w1, b1, w2, b2):
        h = s @ w1.double().T + b1.double()
        return (h * torch.sigmoid(h)) @ w2.double().T + b2.double()

    gd = gate.double()
    te = (1 - gd) * run(sinusoid(t), *time_mlp) + gd * run(sinusoid(delta), *delta_mlp)
    tm = (te * torch.sigmoid(te)) @ proj[0].double().T + proj[1].double()
    torch.testing.assert_close(e.double(), te, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(m.double(), tm, rtol=1e-4, atol=1e-4)


# ----------------------------------------------------------------------------------------------
# attention: dense masked softmax in float64
# ----------------------------------------------------------------------------------------------
def _dense_attention(q, k, v, scale, mask=None):
    logits = q.double() @ k.double().transpose(-1, -2) * scale
    if mask is not None:
        logits = logits.masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(logits, -1)
    return torch.exp(logits - lse[..., None]) @ v.double(), lse


def _qkv(shape, dtype, seed, strided):
    return _tensor(shape, dtype, seed, strided)


def _segmented_case(data, dtype, tiny=False):
    b = data.draw(st.integers(1, 2), label="B")
    h = data.draw(st.integers(1, 2 if tiny else 3), label="H")
    dh = data.draw(st.sampled_from([8, 16] if tiny else [4, 8, 13, 16, 64]), label="D")
    lq = data.draw(st.integers(1, 5 if tiny else 40), label="Lq")
    lens = data.draw(st.lists(st.integers(0, 6 if tiny else 50), min_size=1, max_size=3), label="segments")
    if sum(lens) == 0:
        lens[-1] = 1
    seed = data.draw(st.integers(0, 2**16), label="seed")
    strided = data.draw(st.booleans(), label="strided")
    q = _qkv((b, h, lq, dh), dtype, seed, strided)
    one_buffer = data.draw(st.booleans(), label="one buffer")
    if one_buffer:  # adjacent views of one cache buffer (how FARKVCache lays them out)
        kb, vb = _qkv((b, h, sum(lens), dh), dtype, seed + 1, strided), _qkv((b, h, sum(lens), dh), dtype, seed + 2, strided)
        starts = [sum(lens[:i]) for i in range(len(lens))]
        keys = [kb[:, :, s:s + n] for s, n in zip(starts, lens)]
        values = [vb[:, :, s:s + n] for s, n in zip(starts, lens)]
    else:
        keys = [_qkv((b, h, n, dh), dtype, seed + 10 + i, strided) for i, n in enumerate(lens)]
        values = [_qkv((b, h, n, dh), dtype, seed + 20 + i, strided) for i, n in enumerate(lens)]
    scale = data.draw(st.sampled_from([None, 0.1, 1.0]), label="scale")
    return q, keys, values, scale


def _segmented_truth(q, keys, values, scale):
    s = 1 / math.sqrt(q.shape[-1]) if scale is None else scale
    return _dense_attention(q, torch.cat(keys, 2), torch.cat(values, 2), s)


@given(data=st.data(), dtype=st.sampled_from(DTYPES), lse=st.booleans())
@budget(25)
def test_segmented_attention_torch(data, dtype, lse):
    q, keys, values, scale = _segmented_case(data, dtype)
    out = O.segmented_attention(q, keys, values, scale=scale, return_lse=lse, backend="torch")
    truth, truth_lse = _segmented_truth(q, keys, values, scale)
    if lse:
        out, got_lse = out
        torch.testing.assert_close(got_lse.double(), truth_lse, rtol=1e-5, atol=1e-5)
    _check(out, truth, dtype)


@st.composite
def chunk_layouts(draw, tiny=False):
    """A FAR layout from a random chunk partition (inference / cache step or training with clean copies)."""
    partition = draw(st.lists(st.integers(1, 3), min_size=1, max_size=3 if tiny else 6), label="chunk partition")
    compressed = draw(st.integers(0, len(partition)), label="compressed chunks")
    full_tpf = draw(st.integers(1, 3 if tiny else 6), label="full tokens/frame")
    comp_tpf = draw(st.integers(1, full_tpf), label="compressed tokens/frame")
    clean = draw(st.booleans(), label="clean copy")
    return O.far_attention_layout(partition, compressed, full_tpf, comp_tpf, clean_copy=clean)


def _chunk_case(data, dtype, tiny=False):
    layout = data.draw(chunk_layouts(tiny), label="layout")
    b = data.draw(st.integers(1, 2), label="B")
    h = data.draw(st.integers(1, 2 if tiny else 3), label="H")
    dh = data.draw(st.sampled_from([8, 16] if tiny else [4, 8, 13, 16, 64]), label="D")
    seed = data.draw(st.integers(0, 2**16), label="seed")
    strided = data.draw(st.booleans(), label="strided")
    q = _qkv((b, h, layout.q_len, dh), dtype, seed, strided)
    k = _qkv((b, h, layout.kv_len, dh), dtype, seed + 1, strided)
    v = _qkv((b, h, layout.kv_len, dh), dtype, seed + 2, strided)
    return q, k, v, layout


@given(data=st.data(), dtype=st.sampled_from(DTYPES), lse=st.booleans())
@budget(25)
def test_chunk_causal_attention_torch(data, dtype, lse):
    q, k, v, layout = _chunk_case(data, dtype)
    out = O.chunk_causal_attention(q, k, v, layout, return_lse=lse, backend="torch")
    truth, truth_lse = _dense_attention(q, k, v, 1 / math.sqrt(q.shape[-1]), layout.dense_mask())
    if lse:
        out, got_lse = out
        torch.testing.assert_close(got_lse.double(), truth_lse, rtol=1e-5, atol=1e-5)
    _check(out, truth, dtype)


# ----------------------------------------------------------------------------------------------
# kernels: cuda (C++ CPU twins) and triton (interpreter) against the same truth
# ----------------------------------------------------------------------------------------------
KERNEL_DTYPES = st.sampled_from([torch.float32, torch.bfloat16])


def _kernel_budget(backend):
    return {"cuda": 15, "triton": 3}[backend]


def _compare(op, backend, truth, dtype, *args, **kwargs):
    """Run ``op`` on ``backend`` and on ``"torch"``; check both outputs (tuples elementwise) against ``truth``."""
    with torch.no_grad():
        got = _run(op, backend, *args, **kwargs)
        if got is None:
            return
        ref = op(*args, backend="torch", **kwargs)
    got = got if isinstance(got, tuple) else (got,)
    ref = ref if isinstance(ref, tuple) else (ref,)
    truth = truth if isinstance(truth, tuple) else (truth,)
    for g, r, t in zip(got, ref, truth):
        if g.dtype == torch.float32 and r.dtype == torch.float32 and dtype != torch.float32:  # an fp32 LSE
            torch.testing.assert_close(g.double(), t, rtol=1e-4, atol=1e-4)
        else:
            _check(g, t, dtype, low=r)


@pytest.mark.parametrize("which", ["adaln", "gated", "residual_norm", "rope", "qk", "euler"])
@pytest.mark.parametrize("backend", KERNELS)
def test_kernels_elementwise(backend, which):
    tiny = backend == "triton"

    @given(data=st.data(), dtype=KERNEL_DTYPES)
    @budget(_kernel_budget(backend))
    def run(data, dtype):
        if which in ("adaln", "gated"):
            segs, x, shift, scale = _adaln_case(data, dtype, tiny)
            if which == "adaln":
                _compare(O.adaln_modulate, backend, _adaln_truth(x, shift, scale, segs, 1e-6), dtype, x, shift, scale,
                         segs, 1e-6)
            else:
                y = _tensor(x.shape, dtype, 5)
                truth = x.double() + y.double() * shift.double()[:, _frame_index(segs)]
                _compare(O.gated_residual, backend, truth, dtype, x, y, shift, segs)
        elif which == "residual_norm":
            segs, x, y, gate, kw = _residual_norm_case(data, dtype, tiny)
            with torch.no_grad():
                got = _run(O.residual_norm, backend, x, y, gate, segs, 1e-6, **kw)
            if got is not None:
                ref = O.residual_norm(x, y, gate, segs, 1e-6, backend="torch", **kw)
                _check(got[0], _residual_norm_truth(x, y, gate, segs, 1e-6, **kw)[0], dtype, low=ref[0])
                truth_h = _residual_norm_truth(got[0], torch.zeros_like(got[0]), None, segs, 1e-6, **kw)[1]
                _check(got[1], truth_h, dtype, low=ref[1])
        elif which == "rope":
            b, length, heads, dh, seed, cos, sin = _rope_case(data, dtype, tiny)
            x = _tensor((b, heads, length, dh), dtype, seed, data.draw(st.booleans(), label="strided")).transpose(1, 2)
            _compare(O.apply_rope, backend, _rope_truth(x, cos, sin), dtype, x, cos, sin)
        elif which == "qk":
            b, length, heads, dh, seed, cos, sin = _rope_case(data, dtype, tiny)
            x = _tensor((b, length, heads * dh), dtype, seed, data.draw(st.booleans(), label="strided"))
            weight = _tensor((heads * dh,), dtype, seed + 1)
            _compare(O.qk_norm_rope, backend, _qk_truth(x, weight, cos, sin, heads, 1e-6), dtype, x, weight, cos, sin,
                     heads)
        else:
            latents, velocity, t, r, kw = _euler_case(data, dtype, tiny)
            _compare(O.euler_shortcut, backend, _euler_truth(latents, velocity, t, r, **kw), dtype, latents, velocity,
                     t, r, **kw)

    run()


@pytest.mark.parametrize("chunked", [False, True], ids=["segmented", "chunk_causal"])
@pytest.mark.parametrize("backend", KERNELS)
def test_kernels_attention(backend, chunked):
    tiny = backend == "triton"

    @given(data=st.data(), dtype=KERNEL_DTYPES, lse=st.booleans())
    @budget(_kernel_budget(backend) + 2)
    def run(data, dtype, lse):
        if chunked:
            q, k, v, layout = _chunk_case(data, dtype, tiny)
            truth, truth_lse = _dense_attention(q, k, v, 1 / math.sqrt(q.shape[-1]), layout.dense_mask())
            _compare(O.chunk_causal_attention, backend, (truth, truth_lse) if lse else truth, dtype, q, k, v, layout,
                     return_lse=lse)
        else:
            q, keys, values, scale = _segmented_case(data, dtype, tiny)
            truth, truth_lse = _segmented_truth(q, keys, values, scale)
            _compare(O.segmented_attention, backend, (truth, truth_lse) if lse else truth, dtype, q, keys, values,
                     scale=scale, return_lse=lse)

    run()


# ----------------------------------------------------------------------------------------------
# rejected inputs: ValueError / TypeError naming the argument
# ----------------------------------------------------------------------------------------------
def _valid_calls(seed: int, dtype):
    """One valid call per op: ``{op name: (fn, kwargs)}`` (all keyword arguments, so a mutation can
    replace any of them)."""
    segs = ((1, 3), (2, 2))
    b, n, r, d = 2, 7, 3, 8
    x = _tensor((b, n, d), dtype, seed)
    mod = _tensor((b, r, d), dtype, seed + 1)
    cos, sin = O.rope_table(O.rope_angles(12, torch.arange(5), 1, 1))
    layout = O.far_attention_layout([1, 2], 1, 2, 1)
    freq, dm = 6, 4
    mlp = (_tensor((dm, freq), torch.float32, 1), _tensor((dm,), torch.float32, 2), _tensor((dm, dm), torch.float32, 3),
           _tensor((dm,), torch.float32, 4))
    return {
        "adaln_modulate": (O.adaln_modulate, dict(x=x, shift=mod, scale=mod.clone(), segments=segs, eps=1e-6)),
        "gated_residual": (O.gated_residual, dict(x=x, y=x.clone(), gate=mod, segments=segs)),
        "residual_norm": (O.residual_norm, dict(x=x, y=x.clone(), gate=mod, segments=segs, eps=1e-6, shift=mod.clone(),
                                                scale=mod.clone())),
        "apply_rope": (O.apply_rope, dict(x=_tensor((1, 5, 2, 12), dtype, seed), cos=cos, sin=sin)),
        "qk_norm_rope": (O.qk_norm_rope, dict(x=_tensor((1, 5, 24), dtype, seed), weight=_tensor((24,), dtype, 1),
                                              cos=cos, sin=sin, heads=2, eps=1e-6)),
        "euler_shortcut": (O.euler_shortcut, dict(latents=_tensor((1, 3, 2, 2, 2), dtype, seed),
                                                  velocity=_tensor((2, 3, 2, 2, 2), dtype, seed + 1), t=900.0, r=500.0,
                                                  guidance_scale=2.0, num_context_frames=1)),
        "segmented_attention": (O.segmented_attention, dict(q=_tensor((1, 2, 3, 8), dtype, seed),
                                                            keys=[_tensor((1, 2, n_, 8), dtype, i) for i, n_ in enumerate((4, 3))],
                                                            values=[_tensor((1, 2, n_, 8), dtype, 9 + i) for i, n_ in enumerate((4, 3))])),
        "chunk_causal_attention": (O.chunk_causal_attention, dict(q=_tensor((1, 2, layout.q_len, 8), dtype, seed),
                                                                  k=_tensor((1, 2, layout.kv_len, 8), dtype, 1),
                                                                  v=_tensor((1, 2, layout.kv_len, 8), dtype, 2),
                                                                  layout=layout)),
        "time_pair_embedding": (O.time_pair_embedding, dict(t=torch.tensor([900.0, 500.0]), delta=torch.tensor([100.0, 0.0]),
                                                            time_mlp=mlp, delta_mlp=mlp, proj=(_tensor((6 * dm, dm), torch.float32, 5),
                                                                                               _tensor((6 * dm,), torch.float32, 6)),
                                                            gate=torch.tensor([0.25]), freq_dim=freq, out_dtype=torch.float32)),
        "far_attention_layout": (O.far_attention_layout, dict(chunk_partition=[1, 3, 2], num_compressed_chunks=1,
                                                              full_tokens_per_frame=4, compressed_tokens_per_frame=1)),
        "chunk_causal_layout": (O.chunk_causal_layout, dict(chunk_tokens=[2, 3], num_context_chunks=1)),
        "rope_pair_split": (O.rope_pair_split, dict(head_dim=12)),
    }


def _drop_dim(t):
    return t[0]


def _add_dim(t):
    return t[None]


def _as_int(t):
    return (t * 10).to(torch.int32)


def _meta(t):
    return t.to("meta")


def _shorter(t):
    return t[..., :-1] if t.shape[-1] > 1 else t[:, :0]


# (op, argument, mutation of that argument, text the message must contain)
MUTATIONS = []
for _op, _tensors in {
    "adaln_modulate": ("x", "shift", "scale"),
    "gated_residual": ("x", "y", "gate"),
    "residual_norm": ("x", "y", "gate", "shift", "scale"),
    "apply_rope": ("x", "cos", "sin"),
    "qk_norm_rope": ("x", "weight", "cos", "sin"),
    "euler_shortcut": ("latents", "velocity"),
    "segmented_attention": ("q",),
    "chunk_causal_attention": ("q", "k", "v"),
    "time_pair_embedding": ("t", "delta"),
}.items():
    for _arg in _tensors:
        MUTATIONS += [(_op, _arg, "rank-1", _drop_dim), (_op, _arg, "rank+1", _add_dim),
                      (_op, _arg, "not a tensor", lambda t: t.tolist()), (_op, _arg, "shape", _shorter)]
        if _op != "time_pair_embedding":
            MUTATIONS += [(_op, _arg, "int dtype", _as_int), (_op, _arg, "meta device", _meta)]
MUTATIONS += [
    ("adaln_modulate", "segments", "too few tokens", lambda s: ((1, 3), (2, 1))),
    ("adaln_modulate", "segments", "too many frames", lambda s: ((1, 3), (2, 2), (0, 1), (1, 0))),
    ("adaln_modulate", "segments", "not pairs", lambda s: (1, 3, 2, 2)),
    ("adaln_modulate", "segments", "not a table", lambda s: 7),
    ("adaln_modulate", "eps", "not a number", lambda e: "tiny"),
    ("adaln_modulate", "eps", "negative", lambda e: -1.0),
    ("gated_residual", "segments", "negative frames", lambda s: ((-1, 3), (4, 2))),
    ("residual_norm", "segments", "not a table", lambda s: None),
    ("residual_norm", "segments", "too few frames", lambda s: ((1, 7),)),
    ("residual_norm", "weight", "with shift", lambda w: torch.ones(8)),
    ("residual_norm", "scale", "without shift", lambda s: None),
    ("apply_rope", "x", "odd head dim", lambda x: x[..., :11]),
    ("apply_rope", "cos", "float64", lambda c: c.double()),
    ("qk_norm_rope", "heads", "zero", lambda h: 0),
    ("qk_norm_rope", "heads", "not dividing", lambda h: 5),
    ("qk_norm_rope", "heads", "not an int", lambda h: 2.5),
    ("qk_norm_rope", "x", "odd head dim", lambda x: torch.randn(1, 5, 22)),
    ("euler_shortcut", "t", "wrong shape", lambda t: torch.full((4, 4), 900.0)),
    ("euler_shortcut", "t", "not a number", lambda t: "late"),
    ("euler_shortcut", "r", "wrong shape", lambda r: torch.zeros(1, 3, 1)),
    ("euler_shortcut", "num_context_frames", "too many", lambda n: 4),
    ("euler_shortcut", "num_context_frames", "negative", lambda n: -1),
    ("euler_shortcut", "guidance_scale", "not a number", lambda g: "high"),
    ("euler_shortcut", "velocity", "3B batch", lambda v: torch.cat([v, v[:1]])),
    ("euler_shortcut", "out", "wrong dtype", lambda o: torch.zeros(1, 3, 2, 2, 2, dtype=torch.float64)),
    ("euler_shortcut", "out", "wrong shape", lambda o: torch.zeros(1, 3, 2, 2, 1)),
    ("segmented_attention", "keys", "empty", lambda k: []),
    ("segmented_attention", "keys", "one more than values", lambda k: k + [k[0]]),
    ("segmented_attention", "keys", "a tensor", lambda k: k[0]),
    ("segmented_attention", "keys", "other head dim", lambda k: [k[0][..., :4], k[1]]),
    ("segmented_attention", "keys", "other dtype", lambda k: [k[0].double(), k[1]]),
    ("segmented_attention", "keys", "meta device", lambda k: [k[0].to("meta"), k[1]]),
    ("segmented_attention", "keys", "all empty", lambda k: [x[:, :, :0] for x in k]),
    ("segmented_attention", "values", "other length", lambda v: [v[0][:, :, :1], v[1]]),
    ("segmented_attention", "scale", "not a number", lambda s: "auto"),
    ("chunk_causal_attention", "layout", "not a layout", lambda lay: lay.dense_mask()),
    ("chunk_causal_attention", "layout", "other lengths", lambda lay: O.far_attention_layout([1, 3], 1, 2, 1)),
    ("chunk_causal_attention", "layout", "key range out of bounds",
     lambda lay: O.AttentionLayout(lay.q_len, lay.kv_len, ((0, lay.q_len, ((0, lay.kv_len + 5),)),))),
    ("chunk_causal_attention", "layout", "groups not tiling the queries",
     lambda lay: O.AttentionLayout(lay.q_len, lay.kv_len, ((0, 1, ((0, 1),)),))),
    ("chunk_causal_attention", "layout", "empty key range",
     lambda lay: O.AttentionLayout(lay.q_len, lay.kv_len, ((0, lay.q_len, ()),))),
    ("chunk_causal_attention", "k", "other dtype", lambda k: k.double()),
    ("time_pair_embedding", "time_mlp", "three tensors", lambda m: m[:3]),
    ("time_pair_embedding", "time_mlp", "wrong freq_dim", lambda m: (m[0][:, :5],) + tuple(m[1:])),
    ("time_pair_embedding", "delta_mlp", "wrong freq_dim", lambda m: (m[0][:, :5],) + tuple(m[1:])),
    ("time_pair_embedding", "delta_mlp", "not tensors", lambda m: (1, 2, 3, 4)),
    ("time_pair_embedding", "proj", "wrong width", lambda p: (p[0][:, :3], p[1])),
    ("time_pair_embedding", "gate", "not a tensor", lambda g: 0.25),
    ("time_pair_embedding", "gate", "two values", lambda g: torch.tensor([0.25, 0.5])),
    ("time_pair_embedding", "out_dtype", "not a dtype", lambda d: "float32"),
    ("time_pair_embedding", "freq_dim", "zero", lambda f: 0),
    ("far_attention_layout", "chunk_partition", "zero chunk", lambda p: [1, 0, 2]),
    ("far_attention_layout", "chunk_partition", "not ints", lambda p: ["a", 3]),
    ("far_attention_layout", "num_compressed_chunks", "too many", lambda n: 4),
    ("far_attention_layout", "full_tokens_per_frame", "zero", lambda n: 0),
    ("far_attention_layout", "compressed_tokens_per_frame", "negative", lambda n: -2),
    ("chunk_causal_layout", "chunk_tokens", "zero", lambda c: [2, 0]),
    ("chunk_causal_layout", "num_context_chunks", "too many", lambda n: 3),
    ("rope_pair_split", "head_dim", "odd", lambda h: 13),
    ("rope_pair_split", "head_dim", "too small", lambda h: 4),
]


@pytest.mark.parametrize("op,arg,what,mutate", MUTATIONS, ids=[f"{o}-{a}-{w}" for o, a, w, _ in MUTATIONS])
@given(seed=st.integers(0, 2**16), dtype=st.sampled_from([torch.float32, torch.bfloat16]))
@budget(2)
def test_rejections_name_the_argument(op, arg, what, mutate, seed, dtype):
    fn, kwargs = _valid_calls(seed, dtype)[op]
    fn(**kwargs)  # the unmutated call is valid
    kwargs[arg] = mutate(kwargs.get(arg))
    with pytest.raises((ValueError, TypeError)) as info:
        fn(**kwargs, **({"backend": "torch"} if op in O.registry._IMPLS else {}))
    assert not isinstance(info.value, BackendUnavailableError)
    assert arg in str(info.value), f"{type(info.value).__name__}: {info.value}"
