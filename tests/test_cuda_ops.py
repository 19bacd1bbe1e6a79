"""The ``"cuda"`` backend (``anyflow._C``) against the ``"torch"`` references.

On CPU tensors ``backend="cuda"`` runs the C++ CPU twins of the CUDA kernels through the same
bindings, schemas and argument checks as the CUDA build, so everything but the kernels themselves is
tested without a GPU. The ``cuda`` parametrisations (marker ``gpu``) run the same checks on the CUDA
kernels where a device and a CUDA build exist.

Outputs are poisoned: the tests run with ``torch.utils.deterministic.fill_uninitialized_memory``, so
every ``empty`` the ops allocate (also from C++) starts as NaN and a row a kernel forgets stays NaN.
"""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

import anyflow.ops as O
from anyflow import _ext
from anyflow.ops import _cuda, registry
from anyflow.testing.tolerances import assert_kernel_close


REPO = Path(__file__).resolve().parents[1]
_MODULE, _REASON = _ext.extension_status()
needs_ext = pytest.mark.skipif(_MODULE is None, reason=f"anyflow._C is not built: {_REASON}")
pytestmark = needs_ext

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]
DTYPES = [torch.float32, torch.bfloat16]
SEGMENTS = [((4, 9), (3, 39), (3, 39)), ((0, 9), (3, 39)), ((2, 13),)]
CHUNKS = [1, 3, 3, 3, 3, 3, 3, 2]  # the real chunk partition of 81 frames


@pytest.fixture(autouse=True)
def poison_outputs():
    """Fill every uninitialised allocation with NaN (outputs of the ops included)."""
    import torch.utils.deterministic as det

    old_det, old_warn, old_fill = (
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
        det.fill_uninitialized_memory,
    )
    torch.use_deterministic_algorithms(True, warn_only=True)
    det.fill_uninitialized_memory = True
    yield
    det.fill_uninitialized_memory = old_fill
    torch.use_deterministic_algorithms(old_det, warn_only=old_warn)


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _rand(*shape, gen, dtype=torch.float32, device="cpu", scale=1.0):
    return (torch.randn(*shape, generator=gen) * scale).to(dtype=dtype, device=device)


def _upcast(v):
    if isinstance(v, torch.Tensor) and v.is_floating_point():
        return v.float()
    if isinstance(v, (list, tuple)) and v and isinstance(v[0], torch.Tensor):
        return type(v)(_upcast(t) for t in v)
    return v


def _segmented_truth(q, keys, values, return_lse=False, scale=None):
    """Segmented attention in float64 (dense softmax over the concatenated segments): the truth for fp32 inputs,
    where torch's own fp32 SDPA is no more exact than the kernel under test."""
    k, v = torch.cat([t.double() for t in keys], 2), torch.cat([t.double() for t in values], 2)
    s = (q.double() @ k.transpose(-1, -2)) * (scale if scale is not None else q.shape[-1] ** -0.5)
    out = torch.softmax(s, -1) @ v
    return (out, torch.logsumexp(s, -1)) if return_lse else out


def _compare(fn, args, kwargs=None, ref_args=None, truth=None):
    """Rule 1: the cuda backend vs the torch reference in fp32 (and in the inputs' dtype). For fp32 inputs with a
    float64 ``truth``, rule 1 runs one precision up: the torch fp32 reference is then the low-precision one."""
    kwargs = kwargs or {}
    out = fn(*args, backend="cuda", **kwargs)
    ref_low = fn(*(ref_args or args), backend="torch", **kwargs)
    ref32 = fn(*[_upcast(a) for a in (ref_args or args)], backend="torch", **kwargs)
    if truth is not None and args[0].dtype == torch.float32:
        ref32 = truth(*[_upcast(a) for a in (ref_args or args)], **kwargs)
    outs = out if isinstance(out, tuple) else (out,)
    lows = ref_low if isinstance(ref_low, tuple) else (ref_low,)
    r32s = ref32 if isinstance(ref32, tuple) else (ref32,)
    errors = []
    for o, lo, r in zip(outs, lows, r32s):
        assert o.shape == lo.shape and o.dtype == lo.dtype, (o.shape, o.dtype, lo.shape, lo.dtype)
        fp32_without_truth = o.dtype == torch.float32 and r.dtype != torch.float64
        assert_kernel_close(o.cpu(), r.cpu(), None if fp32_without_truth else lo.cpu())
        errors.append((o.double() - r.double()).abs().max().item())
    return errors


# ----------------------------------------------------------------------------------------------
# conditioning
# ----------------------------------------------------------------------------------------------
def _conditioning_inputs(segs, dtype, device, d=64, batch=2, mod_dtype=torch.float32, seed=0):
    g = _gen(seed)
    n = sum(f * t for f, t in segs)
    rows = sum(f for f, _ in segs)
    x = _rand(batch, n, d, gen=g, dtype=dtype, device=device, scale=2.0) + 0.5
    y = _rand(batch, n, d, gen=g, dtype=dtype, device=device)
    # per-frame rows as strided views of one [B, R, 6, d] tensor, as a Wan block slices them
    mod = _rand(batch, rows, 6, d, gen=g, dtype=mod_dtype, device=device, scale=0.5)
    return x, y, mod[:, :, 0], mod[:, :, 1], mod[:, :, 2]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("segs", SEGMENTS)
def test_adaln_modulate(device, dtype, segs):
    x, _, shift, scale, _ = _conditioning_inputs(segs, dtype, device)
    _compare(O.adaln_modulate, (x, shift, scale, segs))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("segs", SEGMENTS)
def test_gated_residual(device, dtype, segs):
    x, y, _, _, gate = _conditioning_inputs(segs, dtype, device, mod_dtype=dtype)
    _compare(O.gated_residual, (x, y, gate, segs))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "variant", ["gate+modulate", "modulate", "gate+affine", "affine_weight_only", "plain", "narrow_unaligned"]
)
def test_residual_norm(device, dtype, variant):
    segs = ((4, 9), (3, 39), (3, 39))
    d = 20 if variant == "narrow_unaligned" else 64  # 20: not a multiple of a 16-byte vector
    x, y, shift, scale, gate = _conditioning_inputs(segs, dtype, device, d=d)
    g = _gen(1)
    weight = _rand(d, gen=g, dtype=dtype, device=device) + 1.0
    bias = _rand(d, gen=g, dtype=torch.float32, device=device)
    kw = {
        "gate+modulate": dict(shift=shift, scale=scale),
        "modulate": dict(shift=shift, scale=scale),
        "gate+affine": dict(weight=weight, bias=bias),
        "affine_weight_only": dict(weight=weight),
        "plain": {},
        "narrow_unaligned": dict(shift=shift, scale=scale),
    }[variant]
    use_gate = variant not in ("modulate", "plain")
    args = (x, y, gate if use_gate else None, segs)
    _compare(O.residual_norm, args, kw)


# ----------------------------------------------------------------------------------------------
# RoPE
# ----------------------------------------------------------------------------------------------
def _rope_tables(head_dim, frames, h, w, device, downscale=1):
    ang = O.rope_angles(head_dim, torch.arange(frames), h, w, downscale=downscale)
    cos, sin = O.rope_table(ang)
    return cos.to(device), sin.to(device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("heads, head_dim", [(3, 12), (2, 128)])
def test_qk_norm_rope(device, dtype, heads, head_dim):
    cos, sin = _rope_tables(head_dim, 3, 3, 3, device)  # L = 27 tokens
    g = _gen(2)
    x = _rand(2, cos.shape[0], heads * head_dim, gen=g, dtype=dtype, device=device, scale=3.0)
    weight = _rand(heads * head_dim, gen=g, dtype=dtype, device=device) + 1.0
    _compare(O.qk_norm_rope, (x, weight, cos, sin, heads))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["contiguous", "heads_first_buffer"])
def test_apply_rope(device, dtype, layout):
    head_dim, heads = 16, 3
    cos, sin = _rope_tables(head_dim, 3, 3, 3, device, downscale=2)  # FAR compressed positions
    g = _gen(3)
    if layout == "contiguous":
        x = _rand(2, cos.shape[0], heads, head_dim, gen=g, dtype=dtype, device=device)
    else:  # [B, H, L, D] storage seen as [B, L, H, D]: strided, unit stride along D
        x = _rand(2, heads, cos.shape[0], head_dim, gen=g, dtype=dtype, device=device).transpose(1, 2)
    _compare(O.apply_rope, (x, cos, sin))


# ----------------------------------------------------------------------------------------------
# Euler shortcut
# ----------------------------------------------------------------------------------------------
def _euler_inputs(device, vel_dtype, cfg, b=2, f=5):
    g = _gen(4)
    latents = _rand(b, f, 4, 3, 5, gen=g, device=device)
    velocity = _rand(2 * b if cfg else b, f, 4, 3, 5, gen=g, dtype=vel_dtype, device=device)
    t = (torch.rand(b, f, generator=g) * 900 + 100).to(device)
    r = t * torch.rand(b, f, generator=g).to(device)
    return latents, velocity, t, r


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("vel_dtype", DTYPES)
@pytest.mark.parametrize("cfg", [False, True])
@pytest.mark.parametrize("context", [0, 2])
def test_euler_shortcut(device, vel_dtype, cfg, context):
    latents, velocity, t, r = _euler_inputs(device, vel_dtype, cfg)
    kw = dict(guidance_scale=4.5, num_context_frames=context)
    _compare(O.euler_shortcut, (latents, velocity, t, r), kw)
    out = O.euler_shortcut(latents, velocity, t, r, backend="cuda", **kw)
    assert torch.equal(out[:, :context], latents[:, :context]), "context frames must be copied exactly"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("target", ["poisoned", "in_place", "strided", "scalar_times_bf16_latents"])
def test_euler_shortcut_out(device, target):
    latents, velocity, t, r = _euler_inputs(device, torch.bfloat16, cfg=True)
    kw = dict(guidance_scale=3.0, num_context_frames=1)
    if target == "scalar_times_bf16_latents":
        latents = latents.bfloat16()
        ref = O.euler_shortcut(latents, velocity, 700.0, 350.0, backend="torch", **kw)
        out = O.euler_shortcut(latents, velocity, 700.0, 350.0, backend="cuda", **kw)
        ref32 = O.euler_shortcut(latents.float(), velocity.float(), 700.0, 350.0, backend="torch", **kw)
        assert_kernel_close(out.cpu(), ref32.cpu(), ref.cpu())
        return
    ref = O.euler_shortcut(latents, velocity, t, r, backend="torch", **kw)
    if target == "poisoned":
        out = torch.full_like(latents, float("nan"))
    elif target == "in_place":
        out = latents.clone()
        latents = out
    else:
        out = torch.full((latents.shape[0], latents.shape[1], 4, 5, 3), float("nan"), device=device)
        out = out.transpose(3, 4)  # [B, F, C, H, W] view that is not contiguous
    got = O.euler_shortcut(latents, velocity, t, r, out=out, backend="cuda", **kw)
    assert got is out
    assert_kernel_close(out.cpu(), ref.cpu())


# ----------------------------------------------------------------------------------------------
# attention
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim", [17, 128])
@pytest.mark.parametrize("return_lse", [False, True])
def test_segmented_attention_far_cache(device, dtype, head_dim, return_lse):
    """A FAR step: [compressed | full | current] adjacent in one cache buffer, plus an empty segment."""
    g = _gen(5)
    b, h, comp, full, cur, cap = 2, 2, 2 * 3 * 2, 2 * 3 * 6, 3 * 6, 80
    buf_k = _rand(b, h, cap, head_dim, gen=g, dtype=dtype, device=device)
    buf_v = _rand(b, h, cap, head_dim, gen=g, dtype=dtype, device=device)
    q = _rand(b, cur, h, head_dim, gen=g, dtype=dtype, device=device).transpose(1, 2)  # [B, L, H, D] storage
    cut = [0, comp, comp + full, comp + full + cur]
    keys = [buf_k[:, :, cut[i] : cut[i + 1]] for i in range(3)] + [buf_k[:, :, :0]]
    values = [buf_v[:, :, cut[i] : cut[i + 1]] for i in range(3)] + [buf_v[:, :, :0]]
    _compare(O.segmented_attention, (q, keys, values), dict(return_lse=return_lse), truth=_segmented_truth)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_segmented_attention_separate_tensors(device, dtype):
    g = _gen(6)
    q = _rand(1, 3, 29, 64, gen=g, dtype=dtype, device=device)
    lens = [7, 0, 40, 29]
    keys = [_rand(1, 3, n, 64, gen=g, dtype=dtype, device=device) for n in lens]
    values = [_rand(1, 3, n, 64, gen=g, dtype=dtype, device=device) for n in lens]
    _compare(O.segmented_attention, (q, keys, values), dict(return_lse=True, scale=0.3), truth=_segmented_truth)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_compressed, clean_copy", [(0, False), (3, False), (0, True), (3, True)])
@pytest.mark.parametrize("return_lse", [False, True])
def test_chunk_causal_attention_far_layouts(device, dtype, num_compressed, clean_copy, return_lse):
    layout = O.far_attention_layout(CHUNKS, num_compressed, 6, 2, clean_copy=clean_copy)
    g = _gen(7)
    head_dim = 128 if clean_copy else 24
    q = _rand(1, 2, layout.q_len, head_dim, gen=g, dtype=dtype, device=device)
    k = _rand(1, 2, layout.kv_len, head_dim, gen=g, dtype=dtype, device=device)
    v = _rand(1, 2, layout.kv_len, head_dim, gen=g, dtype=dtype, device=device)
    _compare(O.chunk_causal_attention, (q, k, v, layout), dict(return_lse=return_lse))


@pytest.mark.parametrize("device", DEVICES)
def test_chunk_causal_attention_cached_prefix(device):
    """Incremental cache step: queries see an already cached prefix of kv_offset keys."""
    layout = O.chunk_causal_layout([6, 18, 18], kv_offset=13)
    g = _gen(8)
    q = _rand(2, 2, layout.q_len, 33, gen=g, device=device)
    k = _rand(2, 2, layout.kv_len, 33, gen=g, device=device)
    v = _rand(2, 2, layout.kv_len, 33, gen=g, device=device)
    _compare(O.chunk_causal_attention, (q, k, v, layout), dict(return_lse=True))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("impl", [1, 2])
def test_attention_kernel_paths(device, impl):
    """Both CUDA kernel paths (1: SIMT, 2: tensor cores; the CPU twin ignores impl) on one bf16 call."""
    layout = O.far_attention_layout([1, 3, 2], 1, 70, 18, clean_copy=True)
    g = _gen(9)
    q, k, v = (_rand(1, 2, layout.q_len, 64, gen=g, dtype=torch.bfloat16, device=device) for _ in range(3))
    flat = O.attention.flat_layout(layout)
    out, lse = torch.ops.anyflow.c_chunk_causal_attention(q, k, v, flat, 0.125, True, impl)
    ref32, lse32 = O.chunk_causal_attention(q.float(), k.float(), v.float(), layout, scale=0.125, return_lse=True,
                                            backend="torch")
    ref = O.chunk_causal_attention(q, k, v, layout, scale=0.125, backend="torch")
    assert_kernel_close(out.cpu(), ref32.cpu(), ref.cpu())
    assert_kernel_close(lse.cpu(), lse32.cpu())


# ----------------------------------------------------------------------------------------------
# argument checks (on the CPU twins; the CUDA build shares them)
# ----------------------------------------------------------------------------------------------
A = None if _MODULE is None else torch.ops.anyflow


def _x(*shape, dtype=torch.float32):
    return torch.randn(*shape, generator=_gen(10)).to(dtype)


CHECKS = [
    # conditioning
    ("c_adaln_modulate", lambda: (_x(2, 9, 8), _x(2, 3, 4), _x(2, 3, 8), [3, 3], 1e-6), ValueError,
     r"shift must be \[B, R, d\] = \[2, R, 8\], got \[2, 3, 4\]"),
    ("c_adaln_modulate", lambda: (_x(2, 9, 8), _x(2, 3, 8), _x(2, 3, 8), [3, 4], 1e-6), ValueError,
     r"segments \[3, 4\] cover 12 tokens but the input has 9"),
    ("c_adaln_modulate", lambda: (_x(2, 9, 8), _x(2, 3, 8), _x(2, 3, 8), [1, 9], 1e-6), ValueError,
     r"cover 1 frames but the modulation has 3 rows"),
    ("c_adaln_modulate", lambda: (_x(2, 5, 8), _x(2, 5, 8), _x(2, 5, 8), [1, 1] * 5, 1e-6), NotImplementedError,
     r"at most 4 non-empty segments"),
    ("c_adaln_modulate", lambda: (_x(2, 9, 8), _x(2, 3, 8), _x(2, 3, 8), [3, 3, 1], 1e-6), ValueError,
     r"flat \(frames, tokens_per_frame\) pairs"),
    ("c_adaln_modulate", lambda: (_x(2, 9, 8).to(torch.int32), _x(2, 3, 8), _x(2, 3, 8), [3, 3], 1e-6), TypeError,
     r"x must have dtype float32, bfloat16 or float16, got Int"),
    ("c_adaln_modulate", lambda: (_x(2, 8, 9).transpose(1, 2), _x(2, 3, 8), _x(2, 3, 8), [3, 3], 1e-6), ValueError,
     r"x must have unit stride along its last dimension"),
    ("c_adaln_modulate", lambda: (_x(2, 9, 8), _x(2, 3, 8), _x(2, 3, 8), [3, 3], -1.0), ValueError, r"eps must be"),
    ("c_adaln_modulate", lambda: (_x(9, 8), _x(2, 3, 8), _x(2, 3, 8), [3, 3], 1e-6), ValueError,
     r"x must be \[B, N, d\] \(3-D\), got shape \[9, 8\]"),
    ("c_gated_residual", lambda: (_x(2, 9, 8), _x(2, 9, 8, dtype=torch.bfloat16), _x(2, 3, 8), [3, 3]), TypeError,
     r"y must have the dtype of x"),
    ("c_gated_residual", lambda: (_x(2, 9, 8), _x(2, 9, 7), _x(2, 3, 8), [3, 3]), ValueError,
     r"y must be the shape of x = \[2, 9, 8\], got \[2, 9, 7\]"),
    ("c_residual_norm", lambda: (_x(2, 9, 8), _x(2, 9, 8), None, [3, 3], 1e-6, _x(2, 3, 8), None, None, None),
     ValueError, r"shift and scale must be given together"),
    ("c_residual_norm", lambda: (_x(2, 9, 8), _x(2, 9, 8), None, [3, 3], 1e-6, _x(2, 3, 8), _x(2, 3, 8), _x(8), None),
     ValueError, r"either shift/scale \(adaLN\) or weight/bias"),
    ("c_residual_norm", lambda: (_x(2, 9, 8), _x(2, 9, 8), None, [3, 3], 1e-6, None, None, _x(7), None), ValueError,
     r"weight must be \[d\] = \[8\], got \[7\]"),
    ("c_residual_norm", lambda: (_x(2, 9, 8), _x(2, 9, 8), _x(2, 3, 8), [3, 3], 1e-6, _x(2, 2, 8), _x(2, 2, 8),
                                 None, None), ValueError, r"shift must be \[B, R, d\] = \[2, 3, 8\]"),
    # rope
    ("c_qk_norm_rope", lambda: (_x(2, 4, 12), _x(12), 1e-6, _x(4, 3), _x(4, 3), 5), ValueError,
     r"heads must divide the channels"),
    ("c_qk_norm_rope", lambda: (_x(2, 4, 12), _x(12), 1e-6, _x(4, 3), _x(4, 3), 4), ValueError,
     r"head dim x.shape\[2\] / heads must be even, got 3"),
    ("c_qk_norm_rope", lambda: (_x(2, 4, 12), _x(12), 1e-6, _x(4, 3).double(), _x(4, 3), 2), TypeError,
     r"cos must be float32, got Double"),
    ("c_qk_norm_rope", lambda: (_x(2, 4, 12), _x(12), 1e-6, _x(5, 3), _x(5, 3), 2), ValueError,
     r"cos must be \[L, Dh/2\] = \[4, 3\], got \[5, 3\]"),
    ("c_apply_rope", lambda: (_x(2, 4, 2, 6), _x(3, 4).t(), _x(4, 3)), ValueError, r"cos must be contiguous"),
    ("c_apply_rope", lambda: (_x(2, 4, 2, 5), _x(4, 2), _x(4, 2)), ValueError, r"head dim of x must be even"),
    # euler
    ("c_euler_shortcut", lambda: (_x(2, 3, 4), _x(3, 3, 4), _x(2, 3), 1.0, 0), ValueError,
     r"velocity must be \[B or 2B, F, ...\]"),
    ("c_euler_shortcut", lambda: (_x(2, 3, 4), _x(2, 3, 4), _x(2, 3), 1.0, 4), ValueError,
     r"num_context_frames must be in \[0, 3\], got 4"),
    ("c_euler_shortcut", lambda: (_x(2, 3, 4), _x(2, 3, 4), _x(2, 3).double(), 1.0, 0), TypeError,
     r"dt must be float32"),
    ("c_euler_shortcut", lambda: (_x(2, 4, 3).transpose(1, 2), _x(2, 3, 4), _x(2, 3), 1.0, 0), ValueError,
     r"latents must be contiguous"),
    ("c_euler_shortcut_out", lambda: (_x(2, 3, 4), _x(2, 3, 4), _x(2, 3), 1.0, 0, _x(2, 3, 4).bfloat16()), TypeError,
     r"out must have the dtype of latents"),
    # attention
    ("c_segmented_attention", lambda: (_x(1, 2, 3, 264), [_x(1, 2, 4, 264)], [_x(1, 2, 4, 264)], 0.1, False),
     NotImplementedError, r"head dim must be in \[1, 256\], got 264"),
    ("c_segmented_attention", lambda: (_x(1, 2, 3, 8), [_x(1, 2, 1, 8)] * 5, [_x(1, 2, 1, 8)] * 5, 0.1, False),
     NotImplementedError, r"at most 4 non-empty KV segments"),
    ("c_segmented_attention", lambda: (_x(1, 2, 3, 8), [_x(1, 2, 4, 8).half()], [_x(1, 2, 4, 8).half()], 0.1, False),
     TypeError, r"keys\[0\] must have the dtype of q"),
    ("c_segmented_attention", lambda: (_x(1, 2, 3, 8), [_x(1, 2, 0, 8)], [_x(1, 2, 0, 8)], 0.1, False), ValueError,
     r"needs at least one key"),
    ("c_segmented_attention", lambda: (_x(1, 2, 3, 8), [_x(1, 2, 4, 8)], [_x(1, 2, 5, 8)], 0.1, False), ValueError,
     r"values\[0\] must be the shape of its keys"),
    ("c_segmented_attention", lambda: (_x(1, 2, 3, 8), [_x(1, 3, 4, 8)], [_x(1, 3, 4, 8)], 0.1, False), ValueError,
     r"keys\[0\] must be \[B, H, L, D\] = \[1, 2, L, 8\] like q"),
    ("c_segmented_attention", lambda: (_x(1, 2, 3, 8), [_x(1, 2, 4, 8)], [_x(1, 2, 4, 8)], 0.1, False, 3), ValueError,
     r"impl must be 0 \(auto\), 1 \(SIMT\) or 2"),
    ("c_chunk_causal_attention", lambda: (_x(1, 2, 6, 8), _x(1, 2, 6, 8), _x(1, 2, 6, 8), [0, 4, 1, 0, 4], 0.1, False),
     ValueError, r"query ranges tile \[0, 6\)"),
    ("c_chunk_causal_attention", lambda: (_x(1, 2, 6, 8), _x(1, 2, 6, 8), _x(1, 2, 6, 8), [0, 6, 1, 0, 7], 0.1, False),
     ValueError, r"key ranges lie in \[0, 6\]"),
    ("c_chunk_causal_attention", lambda: (_x(1, 2, 65, 8), _x(1, 2, 65, 8), _x(1, 2, 65, 8),
                                          [v for i in range(65) for v in (i, i + 1, 1, 0, i + 1)], 0.1, False),
     NotImplementedError, r"at most 64 query groups"),
    ("c_chunk_causal_attention", lambda: (_x(1, 2, 6, 8), _x(1, 2, 12, 8), _x(1, 2, 12, 8),
                                          [0, 6, 5, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9], 0.1, False),
     NotImplementedError, r"4 non-empty key ranges per group"),
]


@pytest.mark.parametrize("op, make, exc, match", CHECKS, ids=[f"{c[0]}-{i}" for i, c in enumerate(CHECKS)])
def test_argument_checks(op, make, exc, match):
    with pytest.raises(exc, match=match):
        getattr(A, op)(*make())


def test_backend_checks_route_auto_elsewhere():
    """Calls the kernels cannot take give a reason (BackendUnavailableError for an explicit backend)."""
    segs = ((3, 3),)
    x, gate = _x(2, 9, 8), _x(2, 3, 8)
    with pytest.raises(registry.BackendUnavailableError, match="y must have x's dtype"):
        O.gated_residual(x, x.bfloat16(), gate, segs, backend="cuda")
    with pytest.raises(registry.BackendUnavailableError, match="forward-only"):
        O.gated_residual(x.requires_grad_(), x, gate, segs, backend="cuda")
    q = _x(1, 1, 3, 8)
    five = [_x(1, 1, 2, 8) for _ in range(5)]
    with pytest.raises(registry.BackendUnavailableError, match="at most 4 non-empty KV segments"):
        O.segmented_attention(q, five, five, backend="cuda")
    layout = O.chunk_causal_layout([1] * 65)
    qkv = _x(1, 1, 65, 8)
    with pytest.raises(registry.BackendUnavailableError, match="at most 64 query groups"):
        O.chunk_causal_attention(qkv, qkv, qkv, layout, backend="cuda")
    with torch.no_grad():  # forward-only is fine without grad mode
        O.gated_residual(x, x, gate, segs, backend="cuda")


def test_checks_mirror_the_cuda_launch_limits():
    """The checks refuse exactly what the CUDA launchers would refuse at run time (NotImplementedError,
    no fallback): row widths of the row kernels (csrc/tests/test_kernels.cpp tests the C++ side) and the
    attention grid's batch * heads."""
    # residual_norm: 4096 chunks of 16 bytes (aligned or not), or of 1 element when the width is odd
    assert _cuda._row_limit(2, 5120, 1) == 32768 and _cuda._row_limit(2, 5121, 1) == 4096
    assert _cuda._row_limit(4, 5120, 1) == 16384 and _cuda._row_limit(4, 5122, 1) == 4096
    # qk_norm_rope: the head dim decides the chunk; pairs when the vector width does not divide it
    assert _cuda._row_limit(2, 128, 2) == 32768 and _cuda._row_limit(2, 6, 2) == 8192
    cuda = registry._IMPLS["segmented_attention"]["cuda"].supports
    q = torch.empty(1, 65536, 2, 8)

    def reasons(q):
        return "; ".join(cuda.reasons("cuda", registry._CALLS["segmented_attention"](q, [q], [q], 0.1, False), (), {}))

    assert "batch * heads must be <= 65535" in reasons(q)
    assert reasons(q[:, :65535]) == ""


# ----------------------------------------------------------------------------------------------
# torch.library.opcheck (schemas, fake implementations, dispatch)
# ----------------------------------------------------------------------------------------------
def _opcheck_cases():
    g = _gen(11)
    segs = [2, 3, 1, 5]
    x, y = _rand(2, 11, 16, gen=g), _rand(2, 11, 16, gen=g)
    mod = _rand(2, 3, 16, gen=g)
    cos, sin = _rope_tables(8, 1, 3, 3, "cpu")
    layout = O.far_attention_layout([1, 2], 1, 4, 1, clean_copy=True)  # 17 queries and keys
    q = _rand(1, 2, layout.q_len, 8, gen=g)
    kv = _rand(1, 2, layout.kv_len, 8, gen=g)
    return [
        ("c_adaln_modulate", (x, mod, mod * 0.5, segs, 1e-6)),
        ("c_gated_residual", (x, y, mod, segs)),
        ("c_residual_norm", (x, y, mod, segs, 1e-6, mod, mod * 0.5, None, None)),
        ("c_residual_norm", (x, y, None, segs, 1e-6, None, None, _rand(16, gen=g), None)),
        ("c_qk_norm_rope", (_rand(2, 9, 16, gen=g), _rand(16, gen=g), 1e-6, cos, sin, 2)),
        ("c_apply_rope", (_rand(2, 9, 2, 8, gen=g), cos, sin)),
        ("c_euler_shortcut", (_rand(2, 3, 4, gen=g), _rand(4, 3, 4, gen=g), _rand(2, 3, gen=g), 2.0, 1)),
        ("c_euler_shortcut_out", (_rand(2, 3, 4, gen=g), _rand(2, 3, 4, gen=g), _rand(2, 3, gen=g), 1.0, 0,
                                  _rand(2, 3, 4, gen=g))),
        ("c_segmented_attention", (q, [kv[:, :, :4], kv[:, :, 4:]], [kv[:, :, :4], kv[:, :, 4:]], 0.3, True)),
        ("c_segmented_attention", (q.transpose(1, 2).contiguous().transpose(1, 2), [kv], [kv], 0.3, False)),
        ("c_chunk_causal_attention", (q, kv, kv, O.attention.flat_layout(layout), 0.3, True)),
    ]


@pytest.mark.parametrize("case", range(11))
def test_opcheck(case):
    name, args = _opcheck_cases()[case]
    _cuda._ready()
    torch.library.opcheck(getattr(torch.ops.anyflow, name).default, args)


# ----------------------------------------------------------------------------------------------
# loading
# ----------------------------------------------------------------------------------------------
def test_version_mismatch_refuses_the_cuda_backend(monkeypatch):
    """A build recorded for another torch is refused before loading; the registry reports the reason."""
    monkeypatch.setattr(_ext, "_extension_present", lambda: True)
    monkeypatch.setattr(
        _ext, "_read_build_info", lambda: {"built": True, "torch_version": "2.11.0+cu130", "cuda_version": "13.0"}
    )
    monkeypatch.setattr(_ext.importlib, "import_module", pytest.fail)  # must not load the library
    monkeypatch.setattr(registry, "_REASONS", {})
    _ext.extension_status.cache_clear()
    try:
        reason = registry.backend_reason("cuda")
        assert reason is not None and "built for torch 2.11.0+cu130" in reason, reason
        x, gate = _x(1, 3, 8), _x(1, 1, 8)
        with pytest.raises(registry.BackendUnavailableError, match="built for torch 2.11.0"):
            O.gated_residual(x, x, gate, ((1, 3),), backend="cuda")
    finally:
        _ext.extension_status.cache_clear()


def test_import_does_not_load_the_extension():
    code = (
        "import sys, anyflow.ops._cuda as c, anyflow.ops as O\n"
        "assert 'anyflow._C' not in sys.modules, 'import loaded anyflow._C'\n"
        "print('ok')\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


def test_registry_reports_the_cuda_backend():
    rows = {(r["op"], r["backend"]): r for r in registry.report("cpu")}
    for op in ("adaln_modulate", "gated_residual", "residual_norm", "qk_norm_rope", "apply_rope", "euler_shortcut",
               "segmented_attention", "chunk_causal_attention"):
        assert rows[(op, "cuda")]["available"], rows[(op, "cuda")]
        assert rows[(op, "auto")]["reason"] == "torch", "on CPU auto must stay on the torch backend"


def test_compile_fullgraph_without_recompiles():
    """The cuda backend traces into the c_* ops (fake implementations) without graph breaks."""
    layout = O.far_attention_layout([1, 3, 2], 1, 6, 2, clean_copy=True)
    g = _gen(12)
    q, k = _rand(1, 2, layout.q_len, 16, gen=g), _rand(1, 2, layout.kv_len, 16, gen=g)
    segs = ((2, 3), (1, 5))
    x, mod = _rand(2, 11, 8, gen=g), _rand(2, 3, 8, gen=g)
    z, u = _rand(2, 3, 2, 2, 2, gen=g), _rand(4, 3, 2, 2, 2, gen=g)

    def f(q, k, x, mod, z, u, buf):
        a = O.chunk_causal_attention(q, k, k, layout, return_lse=True, backend="cuda")
        b = O.segmented_attention(q, [k[:, :, :5], k[:, :, 5:]], [k[:, :, :5], k[:, :, 5:]], backend="cuda")
        h = O.adaln_modulate(x, mod, mod, segs, backend="cuda")
        xn, hn = O.residual_norm(x, h, mod, segs, shift=mod, scale=mod, backend="cuda")
        zr = O.euler_shortcut(z, u, 500.0, 250.0, guidance_scale=2.0, backend="cuda")
        O.euler_shortcut(z, u, 400.0, 100.0, out=buf, backend="cuda")
        w = z.clone()
        O.euler_shortcut(w, u, 300.0, 0.0, out=w, backend="cuda")  # in place, as the sampler steps
        return a[0], a[1], b, h, xn, hn, zr, buf, w

    eager = f(q, k, x, mod, z, u, torch.empty_like(z))
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    with torch._dynamo.config.patch(error_on_recompile=True):
        for _ in range(2):
            got = compiled(q, k, x, mod, z, u, torch.empty_like(z))
    for e, o in zip(eager, got):
        torch.testing.assert_close(o, e, rtol=0, atol=0)
    torch._dynamo.reset()
