"""Triton backend of the FAR attention ops vs the torch reference (CPU: Triton interpreter).

Tolerances follow anyflow.testing.tolerances: outputs and lse with the kernel rule (fp32 reference vs
reference in the low dtype); fp32 gradients within 1e-4 relative of torch autograd, bf16 gradients
with the kernel rule. Shapes are tiny because interpreter time scales with programs x tiles.
"""

import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("triton")

from anyflow import ops  # noqa: E402
from anyflow.ops import _triton as ta  # noqa: E402
from anyflow.ops.attention import AttentionLayout  # noqa: E402
from anyflow.testing.tolerances import assert_kernel_close  # noqa: E402
from anyflow.testing.triton_compile import COMPILE_ONLY_SM90  # noqa: E402

K = pytest.importorskip("anyflow.kernels.attention")

B, H = 1, 2
# With a GPU the kernels run compiled on it (conftest sets TRITON_INTERPRET=1 only without one, and
# outside the interpreter the backend takes CUDA tensors only); the program-table tests stay on CPU.
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(DEVICE)


def _layouts():
    cp = [1, 3, 3, 3, 3, 3, 3, 2]
    return {
        "far_nc5": ops.far_attention_layout(cp, 5, full_tokens_per_frame=6, compressed_tokens_per_frame=2),
        "far_nc6_clean": ops.far_attention_layout(cp, 6, 6, 2, clean_copy=True),
        "far_nc5_clean": ops.far_attention_layout(cp, 5, 6, 2, clean_copy=True),
        "short_1_2": ops.far_attention_layout([1, 2], 0, 7, 2),
        "short_2_2_1_clean": ops.far_attention_layout([2, 2, 1], 1, 7, 3, clean_copy=True),
        # odd chunk sizes above the 32-row query tile: groups of several tiles, partial last tiles, and
        # tile boundaries that do not line up with group boundaries
        "odd_kv_offset": ops.chunk_causal_layout([37, 21, 45], kv_offset=11),
        "odd_clean_kv_offset": ops.chunk_causal_layout([9, 35, 13], num_context_chunks=1, clean_copy=True, kv_offset=5),
    }


LAYOUTS = _layouts()
# keys 10..15 attended by nobody, touching and disjoint ranges, a query group spanning several tiles
GAP_LAYOUT = AttentionLayout(
    50, 40, ((0, 7, ((0, 10),)), (7, 41, ((15, 25), (25, 30), (35, 40))), (41, 50, ((0, 5), (30, 40))))
)
# overlapping ranges: the layout means their union (AttentionLayout.dense_mask)
OVERLAP_LAYOUT = AttentionLayout(30, 30, ((0, 17, ((0, 12), (5, 20))), (17, 30, ((3, 9), (8, 30), (0, 2)))))


def _qkv(layout, d, seed=0):
    q = randn(B, H, layout.q_len, d, seed=seed)
    k = randn(B, H, layout.kv_len, d, seed=seed + 1)
    v = randn(B, H, layout.kv_len, d, seed=seed + 2)
    return q, k, v


# ------------------------------------------------------------------------------------------------
# program tables
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(LAYOUTS) + ["gap", "overlap"])
@pytest.mark.parametrize("block", [16, 32])
def test_program_tables_cover_the_mask_exactly(name, block):
    layout = {"gap": GAP_LAYOUT, "overlap": OVERLAP_LAYOUT}.get(name) or LAYOUTS[name]
    dense = layout.dense_mask().int()
    group_of = torch.empty(layout.q_len, dtype=torch.long)
    for i, (qs, qe, _) in enumerate(layout.groups):
        group_of[qs:qe] = i

    flat, n = K.query_tiles(layout.groups, layout.kv_len, block)
    progs, ranges = torch.tensor(flat[: 4 * n]).view(-1, 4), torch.tensor(flat[4 * n :]).view(-1, 2)
    seen, rows = torch.zeros_like(dense), torch.zeros(layout.q_len, dtype=torch.int)
    for q_lo, q_hi, r0, r1 in progs.tolist():
        assert 0 < q_hi - q_lo <= block
        assert len(set(group_of[q_lo:q_hi].tolist())) == 1, "a query tile mixes two groups"
        rows[q_lo:q_hi] += 1
        for k_lo, k_hi in ranges[r0:r1].tolist():
            seen[q_lo:q_hi, k_lo:k_hi] += 1
    assert (rows == 1).all()
    assert torch.equal(seen, dense), "forward visits a masked pair or visits a pair twice"

    flat, n = K.key_tiles(layout.groups, layout.kv_len, block)
    progs, ranges = torch.tensor(flat[: 4 * n]).view(-1, 4), torch.tensor(flat[4 * n :]).view(-1, 2)
    seen, cols = torch.zeros_like(dense), torch.zeros(layout.kv_len, dtype=torch.int)
    for k_lo, k_hi, r0, r1 in progs.tolist():
        assert 0 < k_hi - k_lo <= block
        cols[k_lo:k_hi] += 1
        for q_lo, q_hi in ranges[r0:r1].tolist():
            seen[q_lo:q_hi, k_lo:k_hi] += 1
    assert (cols == 1).all(), "every key row needs exactly one dK/dV program (zeros where unattended)"
    assert torch.equal(seen, dense)


def test_layout_int_list_round_trip():
    for layout in (*LAYOUTS.values(), GAP_LAYOUT, OVERLAP_LAYOUT):
        assert ta.decode_layout(tuple(ta.encode_layout(layout))) == (layout.q_len, layout.kv_len, layout.groups)


# ------------------------------------------------------------------------------------------------
# segmented attention
# ------------------------------------------------------------------------------------------------
def _segments(mode, d, lens=(13, 0, 21, 9), lq=19):
    q = randn(B, H, lq, d, seed=3)
    if mode == "separate":
        keys = [randn(B, H, n, d, seed=10 + i) for i, n in enumerate(lens)]
        values = [randn(B, H, n, d, seed=20 + i) for i, n in enumerate(lens)]
    else:  # adjacent token ranges of one [2, B, H, cap, D] cache buffer (K and V planes), cap > sum
        buf = randn(2, B, H, sum(lens) + 5, d, seed=4)
        bounds = [sum(lens[:i]) for i in range(len(lens) + 1)]
        keys = [buf[0, :, :, a:b] for a, b in zip(bounds, bounds[1:])]
        values = [buf[1, :, :, a:b] for a, b in zip(bounds, bounds[1:])]
    return q, keys, values


def _low(ts, dtype):
    return [t.to(dtype) for t in ts]


@pytest.mark.parametrize("mode", ["separate", "adjacent"])
@pytest.mark.parametrize("d", [12, 64])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_segmented_attention_matches_torch(mode, d, dtype):
    q, keys, values = _segments(mode, d)
    out32, lse32 = ops.segmented_attention(q, keys, values, return_lse=True, backend="torch")
    if dtype == torch.float32:
        low = (q, keys, values)
        ref_low, lse_low = None, None
    else:
        low = (q.to(dtype), _low(keys, dtype), _low(values, dtype))
        ref_low, lse_low = ops.segmented_attention(*low, return_lse=True, backend="torch")
    out, lse = ops.segmented_attention(*low, return_lse=True, backend="triton")
    assert out.dtype == dtype and lse.dtype == torch.float32
    assert_kernel_close(out, out32, ref_low)
    assert_kernel_close(lse, lse32, lse_low)
    # without lse the op returns just the output, the same values
    assert torch.equal(ops.segmented_attention(*low, backend="triton"), out)


def test_segmented_attention_adjacent_views_are_merged_not_copied():
    q, keys, values = _segments("adjacent", 12)
    segs = K._segments(q, keys, values)
    assert len(segs) == 1
    k, v = segs[0]
    assert k.data_ptr() == keys[0].data_ptr() and v.data_ptr() == values[0].data_ptr()
    assert k.shape[2] == sum(t.shape[2] for t in keys)
    # separate tensors stay separate, the empty one is dropped
    assert len(K._segments(*_segments("separate", 12))) == 3


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_segmented_attention_head_dim_128(dtype):
    q, keys, values = _segments("separate", 128, lens=(7, 18), lq=9)
    ref32 = ops.segmented_attention(q, keys, values, backend="torch")
    low = (q.to(dtype), _low(keys, dtype), _low(values, dtype))
    assert_kernel_close(ops.segmented_attention(*low, backend="triton"), ref32,
                        ops.segmented_attention(*low, backend="torch"))


def test_segmented_attention_writes_every_output_element():
    q, keys, values = _segments("separate", 12)
    out = torch.full_like(q, float("nan"))
    lse = torch.full(q.shape[:3], float("nan"), device=q.device)
    K.segmented_attention_fwd(q, keys, values, 0.3, out=out, lse=lse)
    ref, ref_lse = ops.segmented_attention(q, keys, values, scale=0.3, return_lse=True, backend="torch")
    assert_kernel_close(out, ref)
    assert_kernel_close(lse, ref_lse)


# ------------------------------------------------------------------------------------------------
# chunk-causal attention: forward
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(LAYOUTS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunk_causal_attention_matches_torch(name, dtype):
    layout = LAYOUTS[name]
    d = 64 if name in ("far_nc5_clean", "odd_kv_offset") else 12
    q, k, v = _qkv(layout, d)
    out32, lse32 = ops.chunk_causal_attention(q, k, v, layout, return_lse=True, backend="torch")
    low = (q.to(dtype), k.to(dtype), v.to(dtype))
    ref_low, lse_low = (None, None) if dtype == torch.float32 else ops.chunk_causal_attention(
        *low, layout, return_lse=True, backend="torch")
    out, lse = ops.chunk_causal_attention(*low, layout, return_lse=True, backend="triton")
    assert out.dtype == dtype
    assert_kernel_close(out, out32, ref_low)
    assert_kernel_close(lse, lse32, lse_low)


def test_chunk_causal_attention_head_dim_128():
    layout = LAYOUTS["short_2_2_1_clean"]
    q, k, v = _qkv(layout, 128)
    assert_kernel_close(ops.chunk_causal_attention(q, k, v, layout, backend="triton"),
                        ops.chunk_causal_attention(q, k, v, layout, backend="torch"))


@pytest.mark.parametrize("block_m", [16, 32])
def test_chunk_causal_fwd_writes_every_output_element(block_m):
    layout = GAP_LAYOUT
    q, k, v = _qkv(layout, 12, seed=5)
    out = torch.full_like(q, float("nan"))
    lse = torch.full(q.shape[:3], float("nan"), device=q.device)
    K.chunk_causal_fwd(q, k, v, layout.groups, 0.25, out=out, lse=lse, block_m=block_m)
    ref, ref_lse = ops.chunk_causal_attention(q, k, v, layout, scale=0.25, return_lse=True, backend="torch")
    assert_kernel_close(out, ref)
    assert_kernel_close(lse, ref_lse)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_chunk_causal_attention_rejects_overlapping_ranges(backend):
    # overlapping key ranges meant their union to the Triton kernel but counted the overlap twice in the
    # torch reference (it concatenates the ranges): a backend-dependent result, so the op rejects them (the
    # layouts built by chunk_causal_layout never overlap; the kernels' program tables still merge them,
    # test_program_tables_cover_the_mask_exactly)
    q, k, v = _qkv(OVERLAP_LAYOUT, 12, seed=4)
    with pytest.raises(ValueError, match="layout group .* sorted, disjoint"):
        ops.chunk_causal_attention(q, k, v, OVERLAP_LAYOUT, backend=backend)


def test_chunk_causal_attention_strided_inputs_keep_their_layout():
    # q, k, v as [B, L, H, D] buffers viewed as [B, H, L, D] (how a projection produces them)
    layout = LAYOUTS["odd_kv_offset"]
    q = randn(B, layout.q_len, H, 16, seed=6).transpose(1, 2)
    k = randn(B, layout.kv_len, H, 16, seed=7).transpose(1, 2)
    v = randn(B, layout.kv_len, H, 16, seed=8).transpose(1, 2)
    out = ops.chunk_causal_attention(q, k, v, layout, backend="triton")
    assert out.stride() == q.stride()
    assert_kernel_close(out, ops.chunk_causal_attention(q, k, v, layout, backend="torch"))


# ------------------------------------------------------------------------------------------------
# chunk-causal attention: backward
# ------------------------------------------------------------------------------------------------
def _grads(layout, q, k, v, backend, return_lse, seed=9):
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    res = ops.chunk_causal_attention(q, k, v, layout, return_lse=return_lse, backend=backend)
    out, lse = res if return_lse else (res, None)
    loss = (out.float() * randn(*out.shape, seed=seed)).sum()
    if lse is not None:
        loss = loss + (lse * randn(*lse.shape, seed=seed + 1)).sum()
    return torch.autograd.grad(loss, (q, k, v))


def _assert_grad_close(got, ref, rel=1e-4):
    for name, a, b in zip("qkv", got, ref):
        assert torch.isfinite(a).all(), f"d{name} has NaN/Inf"
        err = (a - b).abs().max().item()
        assert err <= rel * b.abs().max().item(), f"d{name}: max error {err:.3e} vs max |ref| {b.abs().max():.3e}"


@pytest.mark.parametrize("name", ["far_nc5_clean", "odd_clean_kv_offset", "short_1_2"])
def test_chunk_causal_backward_fp32_matches_torch_autograd(name):
    layout = LAYOUTS[name]
    q, k, v = _qkv(layout, 12, seed=1)
    _assert_grad_close(_grads(layout, q, k, v, "triton", True), _grads(layout, q, k, v, "torch", True))


def test_chunk_causal_backward_bf16_kernel_rule():
    layout = LAYOUTS["far_nc6_clean"]
    q, k, v = _qkv(layout, 64, seed=2)
    ref32 = _grads(layout, q, k, v, "torch", False)
    low = [t.to(torch.bfloat16) for t in (q, k, v)]
    ref_low = _grads(layout, *low, "torch", False)
    for g, r32, rlow in zip(_grads(layout, *low, "triton", False), ref32, ref_low):
        assert g.dtype == torch.bfloat16
        assert_kernel_close(g, r32, rlow)


def test_chunk_causal_bwd_writes_every_gradient_element():
    # keys 10..15 of GAP_LAYOUT are attended by nobody: their dK, dV must be written as exact zeros
    layout = GAP_LAYOUT
    q, k, v = _qkv(layout, 12, seed=3)
    out, lse = K.chunk_causal_fwd(q, k, v, layout.groups, 0.25)
    dout, dlse = randn(*out.shape, seed=4), randn(*lse.shape, seed=5)
    dq, dk, dv = (torch.full_like(t, float("nan")) for t in (q, k, v))
    K.chunk_causal_bwd(q, k, v, out, lse, dout, dlse, layout.groups, 0.25, dq=dq, dk=dk, dv=dv, block_m=16, block_n=16)
    qr, kr, vr = (t.detach().requires_grad_() for t in (q, k, v))
    o_ref, l_ref = ops.chunk_causal_attention(qr, kr, vr, layout, scale=0.25, return_lse=True, backend="torch")
    ref = torch.autograd.grad((o_ref * dout).sum() + (l_ref * dlse).sum(), (qr, kr, vr))
    _assert_grad_close((dq, dk, dv), ref)
    assert (dk[:, :, 10:15] == 0).all() and (dv[:, :, 10:15] == 0).all()


# ------------------------------------------------------------------------------------------------
# torch.library ops
# ------------------------------------------------------------------------------------------------
def test_opcheck_chunk_causal_ops():
    layout = LAYOUTS["short_2_2_1_clean"]
    q, k, v = (t.requires_grad_() for t in _qkv(layout, 12, seed=6))
    flat, defined = ta.encode_layout(layout), ta.define_ops()
    torch.library.opcheck(defined["chunk_causal_attention"], (q, k, v, flat, 0.3))
    out, lse = defined["chunk_causal_attention"](q.detach(), k.detach(), v.detach(), flat, 0.3)
    dout, dlse = randn(*out.shape, seed=7), randn(*lse.shape, seed=8)
    q, k, v = q.detach(), k.detach(), v.detach()
    torch.library.opcheck(defined["chunk_causal_attention_backward"], (q, k, v, out, lse, dout, dlse, flat, 0.3))
    torch.library.opcheck(defined["chunk_causal_attention_backward"], (q, k, v, out, lse, dout, None, flat, 0.3))


def test_opcheck_segmented_op():
    q, keys, values = _segments("separate", 12, lens=(5, 0, 8), lq=7)
    torch.library.opcheck(ta.define_ops()["segmented_attention"], (q, keys, values, 0.3))
    q, keys, values = _segments("adjacent", 12, lens=(5, 8), lq=7)
    torch.library.opcheck(ta.define_ops()["segmented_attention"], (q, keys, values, 0.3))


def test_compiled_chunk_causal_attention_fullgraph_with_backward():
    # aot_eager: dynamo + AOTAutograd over the registry dispatch and the custom op with its backward,
    # without Inductor's C++ compile (the GPU test_compile covers Inductor)
    torch._dynamo.reset()
    layout = LAYOUTS["short_2_2_1_clean"]
    q, k, v = _qkv(layout, 12, seed=8)

    def f(q, k, v):
        out, lse = ops.chunk_causal_attention(q, k, v, layout, return_lse=True, backend="triton")
        return (out * out).sum() + lse.sum()

    try:
        compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
        args = [t.detach().requires_grad_() for t in (q, k, v)]
        grads = torch.autograd.grad(compiled(*args), args)
        args = [t.detach().requires_grad_() for t in (q, k, v)]
        ref = torch.autograd.grad(f(*args), args)
    finally:
        torch._dynamo.reset()
    _assert_grad_close(grads, ref, rel=1e-6)


def _python_without_interpreter(code):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-3000:]
    return res


_GPU_TRACE = """
import torch, triton
from triton.backends.compiler import GPUTarget
from torch._functorch.aot_autograd import aot_export_joint_simple
from torch._higher_order_ops.triton_kernel_wrap import kernel_side_table
from anyflow import ops
from anyflow.ops import _triton as ta


class TargetOnly:  # torch's TTIR mutation analysis only asks the driver for the compile target
    def get_current_target(self):
        return GPUTarget("cuda", 90, 32)


triton.runtime.driver.set_active(TargetOnly())
assert ta._TRITON_OP, "expected the triton_op registration"
chunk_causal_op = ta.define_ops()["chunk_causal_attention"]
layout = ops.far_attention_layout([1, 3, 3, 2], 2, 6, 2, clean_copy=True)
q, k, v = (torch.randn(1, 2, n, 64, dtype=torch.bfloat16, requires_grad=True)
           for n in (layout.q_len, layout.kv_len, layout.kv_len))

def loss(q, k, v):  # the op directly: the registry rightly refuses "triton" here (no GPU, no interpreter)
    out, lse = chunk_causal_op(q, k, v, ta.encode_layout(layout), 0.125)
    return (out.float().sum() + lse.sum(),)

code = aot_export_joint_simple(loss, [q, k, v], trace_joint=True).code
names = set()
for line in code.splitlines():
    if "triton_kernel_wrapper_functional(" in line:
        idx = int(line.split("kernel_idx = ")[1].split(",")[0])
        names.add(kernel_side_table.get_kernel(idx).fn.__name__)
print(sorted(names))
assert names == {"_chunk_fwd_kernel", "_bwd_preprocess_kernel", "_chunk_bwd_dkdv_kernel", "_chunk_bwd_dq_kernel"}
"""


def test_gpu_registration_traces_into_the_kernels():
    # Without the interpreter the ops are triton_ops: AOTAutograd must decompose forward and backward
    # into the four Triton kernels (what Inductor compiles on a GPU). Tracing needs no GPU, only a
    # compile target for torch's mutation analysis; nothing is launched.
    _python_without_interpreter(_GPU_TRACE)


_GPU_TRACE_DYNAMIC = """
import torch, triton
from triton.backends.compiler import GPUTarget
from torch._dynamo.backends.common import aot_autograd
from anyflow import ops
from anyflow.ops import _triton as ta


class TargetOnly:
    def get_current_target(self):
        return GPUTarget("cuda", 90, 32)


class Traced(Exception):
    pass


def stub(gm, example_inputs):  # tracing is the point; nothing can launch without a GPU
    def run(*args):
        raise Traced
    return run


triton.runtime.driver.set_active(TargetOnly())
assert ta._TRITON_OP
chunk_causal_op = ta.define_ops()["chunk_causal_attention"]


def loss(q, k, v, layout):
    out, lse = chunk_causal_op(q, k, v, ta.encode_layout(layout), 0.125)
    return out.float().sum() + lse.sum()


for dynamic in (True, None):  # SymInt sizes and layout ints; automatic dynamic after a new shape
    torch._dynamo.reset()
    f = torch.compile(loss, backend=aot_autograd(fw_compiler=stub, bw_compiler=stub), dynamic=dynamic,
                      fullgraph=True)
    for sizes in ([3, 5], [4, 6, 2]):
        layout = ops.chunk_causal_layout(sizes)
        q = torch.randn(1, 2, layout.q_len, 16, dtype=torch.bfloat16, requires_grad=True)
        try:
            f(q, q, q, layout)
            raise AssertionError("the stub compiler did not run")
        except Traced:
            pass
"""


def test_gpu_registration_traces_with_dynamic_shapes():
    # torch.compile marks sizes (and the layout ints) dynamic after a shape change: the triton_op
    # bodies then see SymInts, which the cached layout decode / program tables must not hash.
    _python_without_interpreter(_GPU_TRACE_DYNAMIC)


_SM90_COMPILE = COMPILE_ONLY_SM90 + """
from anyflow.kernels import attention as A

def launch_all(dtype, d, block_m=None, block_n=None):
    # Wan-like shapes: [B, L, H, D] buffers viewed as [B, H, L, D], a KV-cache view plus a chunk
    B, H, L = 2, 40, 1560
    blhd = lambda n: torch.empty(B, n, H, d, dtype=dtype).transpose(1, 2)
    q, cache = blhd(L), torch.empty(B, H, 2 * L, d, dtype=dtype)
    A.segmented_attention_fwd(q, [cache[:, :, : L + 7], blhd(L)], [cache[:, :, : L + 7], blhd(L)], 0.09)
    groups = ((0, 780, ((0, 780),)), (780, L, ((0, L),)))
    out, lse = A.chunk_causal_fwd(q, q, q, groups, 0.09, block_m=block_m)
    A.chunk_causal_bwd(q, q, q, out, lse, q, lse, groups, 0.09, block_m=block_m, block_n=block_n)


def compile_all(every_config):
    for name, fits in compile_launches(every_config):
        assert any(fits), f"{name}: no autotune config fits in shared memory"
        print(name, fits)


launch_all(torch.bfloat16, 128)  # production: every config compiles, one at least fits
compile_all(True)
launch_all(torch.float32, 12, block_m=16, block_n=16)  # IEEE dots, masked head dim, 16-row tiles
compile_all(False)
"""


def test_kernels_compile_for_sm90():
    # The interpreter checks neither tl.dot shapes, constexpr typing and loop-carried types as the
    # compiler does, nor shared memory. This compiles every launch (no GPU needed) for Hopper.
    _python_without_interpreter(_SM90_COMPILE)


# ------------------------------------------------------------------------------------------------
# what the backend declines
# ------------------------------------------------------------------------------------------------
def test_triton_backend_reasons():
    q = randn(1, 1, 4, 512)
    with pytest.raises(ops.BackendUnavailableError, match="head dim 512"):
        ops.segmented_attention(q, [q], [q], backend="triton")
    q = randn(1, 1, 4, 8)
    with pytest.raises(ops.BackendUnavailableError, match="at most 4"):
        ops.segmented_attention(q, [q] * 5, [q] * 5, backend="triton")
    with pytest.raises(ops.BackendUnavailableError, match="forward-only"):
        ops.segmented_attention(q.requires_grad_(), [q], [q], backend="triton")
    q = randn(1, 1, 8, 4).transpose(2, 3)
    with pytest.raises(ops.BackendUnavailableError, match="unit stride"):
        ops.chunk_causal_attention(q, q, q, ops.chunk_causal_layout([2, 2]), backend="triton")


def test_backend_module_imports_without_triton():
    # triton blocked as if not installed, no interpreter: registers quietly, imports no triton
    res = _python_without_interpreter(
        "import importlib.abc, sys\n"
        "import torch\n"
        "class Blocker(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'triton' or name.startswith('triton.'):\n"
        "            raise ImportError('blocked')\n"
        "sys.meta_path.insert(0, Blocker())\n"
        "import anyflow.ops._triton as m\n"
        "from anyflow.ops import registry\n"
        "assert 'triton' not in sys.modules\n"
        "assert registry._IMPLS['chunk_causal_attention']['triton'].fn is m._chunk_causal_attention_triton\n"
        "assert 'triton' in registry._IMPLS['euler_shortcut']\n"
        "assert registry.backend_reason('triton') is not None\n"
    )
    assert not res.stderr.strip(), res.stderr
