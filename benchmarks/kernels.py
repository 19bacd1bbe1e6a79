"""Check and time every fused op per backend at real Wan2.1 shapes; write JSON + a Markdown table.

One run does, on the current device:
1. peaks measured in the same process: bf16 matmul TFLOP/s and device-to-device copy GB/s;
2. for each op and each backend (``torch`` reference, ``triton``, ``cuda`` where registered): a
   correctness check against the fp32 torch reference (the project's tolerance rule) and the median
   time (``triton.testing.do_bench`` on CUDA, a wall-clock loop on CPU);
3. baselines: concatenate + RoPE + SDPA (what diffusers does at a FAR inference step), SDPA with the
   cuDNN backend on the same dense shape, FlexAttention with a block mask for the chunk-causal form
   (forward and forward+backward).

    python -m benchmarks kernels --out benchmarks/results/h100 --model 1.3B        # on a GPU
    TRITON_INTERPRET=1 python -m benchmarks kernels --smoke --out /tmp/k          # CPU smoke run

Ratios are only meaningful within one run (same device, same process).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.nn.functional as F

from anyflow import ops
from anyflow.ops import registry
from anyflow.testing.tolerances import assert_kernel_close

from . import common

SHAPES = {  # d, heads, full tokens/frame, compressed tokens/frame, latent frames
    "1.3B": dict(d=1536, heads=12, tpf=1560, ctpf=390, frames=21, grid=(30, 52)),
    "14B": dict(d=5120, heads=40, tpf=1560, ctpf=390, frames=21, grid=(30, 52)),
    "smoke": dict(d=64, heads=2, tpf=12, ctpf=3, frames=21, grid=(3, 4)),
}
CP = list(common.CHUNK_PARTITION)


def _cases(s: dict, device, dtype):
    """(name, {backend-independent kwargs builder}, bytes moved, flops) for every op."""
    g = torch.Generator(device="cpu").manual_seed(0)

    def rnd(*shape, dt=dtype):
        return torch.randn(*shape, generator=g).to(device=device, dtype=dt)

    d, heads, tpf, ctpf, nf = s["d"], s["heads"], s["tpf"], s["ctpf"], s["frames"]
    dh = d // heads
    n = nf * tpf
    segs = ((nf, tpf),)
    x, y = rnd(1, n, d), rnd(1, n, d)
    shift, scale, gate = rnd(1, nf, d, dt=torch.float32), rnd(1, nf, d, dt=torch.float32), rnd(1, nf, d, dt=torch.float32)
    el = x.element_size()
    cos, sin = ops.rope_table(ops.rope_angles(dh, torch.arange(nf), *s["grid"]).to(device))
    yield "adaln_modulate", lambda b: ops.adaln_modulate(x, shift, scale, segs, backend=b), 2 * n * d * el, 0
    yield "gated_residual", lambda b: ops.gated_residual(x, y, gate, segs, backend=b), 3 * n * d * el, 0
    yield "residual_norm", lambda b: ops.residual_norm(x, y, gate, segs, shift=shift, scale=scale, backend=b)[1], 4 * n * d * el, 0
    w = 1 + 0.1 * rnd(d)
    yield "qk_norm_rope", lambda b: ops.qk_norm_rope(x, w, cos, sin, heads, backend=b), 2 * n * d * el, 0
    z = rnd(1, nf, 16, s["grid"][0] * 2, s["grid"][1] * 2, dt=torch.float32)
    u = rnd(1, nf, 16, s["grid"][0] * 2, s["grid"][1] * 2)
    yield "euler_shortcut", lambda b: ops.euler_shortcut(z, u, 937.5, 833.3, backend=b), z.numel() * (8 + el), 0

    # FAR inference NFE of chunk 6: 4,680 queries over [3,900 compressed | 9,360 full | 4,680 current]
    lq, lc, lf = 3 * tpf, 10 * ctpf, 6 * tpf
    buf_k, buf_v = rnd(1, heads, lc + lf + lq, dh), rnd(1, heads, lc + lf + lq, dh)
    q = rnd(1, heads, lq, dh)
    bounds = [0, lc, lc + lf, lc + lf + lq]
    keys = [buf_k[:, :, a:c] for a, c in zip(bounds, bounds[1:])]
    values = [buf_v[:, :, a:c] for a, c in zip(bounds, bounds[1:])]
    att_flops = 4 * lq * (lc + lf + lq) * dh * heads
    yield "segmented_attention", lambda b: ops.segmented_attention(q, keys, values, backend=b), 0, att_flops

    # cache step after chunk 6: 14,430 tokens, chunk-causal, 5 compressed + 2 full chunks
    layout = ops.far_attention_layout(CP[:7], 5, tpf, ctpf)
    lt = layout.q_len
    qc, kc, vc = rnd(1, heads, lt, dh), rnd(1, heads, lt, dh), rnd(1, heads, lt, dh)
    dense = layout.dense_mask()
    mask_flops = 4 * int(dense.sum()) * dh * heads
    yield "chunk_causal_attention", lambda b: ops.chunk_causal_attention(qc, kc, vc, layout, backend=b), 0, mask_flops

    def fwd_bwd(b):
        qq, kk, vv = (t.detach().requires_grad_() for t in (qc, kc, vc))
        ops.chunk_causal_attention(qq, kk, vv, layout, backend=b).sum().backward()
        return qq.grad

    yield "chunk_causal_attention fwd+bwd", fwd_bwd, 0, 3.5 * mask_flops

    # baselines (reported as extra rows)
    rot = torch.polar(torch.ones(lc + lf + lq, dh // 2, dtype=torch.float64), torch.rand(lc + lf + lq, dh // 2, dtype=torch.float64))
    rot = rot.to(device)

    def concat_rope_sdpa(_):  # diffusers 0.42 at a FAR inference step: cat the cache, re-rotate every key in f64
        k = torch.cat(keys, dim=2)
        v = torch.cat(values, dim=2)
        kr = torch.view_as_real(torch.view_as_complex(k.double().unflatten(-1, (-1, 2))) * rot).flatten(-2).to(k.dtype)
        return F.scaled_dot_product_attention(q, kr, v)

    yield "baseline: concat+RoPE(f64)+SDPA default", concat_rope_sdpa, 0, att_flops
    k_all, v_all = buf_k, buf_v
    if device.type == "cuda":
        from torch.nn.attention import SDPBackend, sdpa_kernel

        def cudnn(_):
            with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
                return F.scaled_dot_product_attention(q, k_all, v_all)

        yield "baseline: cuDNN SDPA (dense, same shape)", cudnn, 0, att_flops
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        dense_dev = dense.to(device)
        block_mask = create_block_mask(lambda b_, h_, qi, ki: dense_dev[qi, ki], None, None, lt, lt, device=device)
        flex = torch.compile(flex_attention)
        yield "baseline: FlexAttention (block mask)", lambda _: flex(qc, kc, vc, block_mask=block_mask), 0, mask_flops

        def flex_fb(_):
            qq, kk, vv = (t.detach().requires_grad_() for t in (qc, kc, vc))
            flex(qq, kk, vv, block_mask=block_mask).sum().backward()
            return qq.grad

        yield "baseline: FlexAttention fwd+bwd", flex_fb, 0, 3.5 * mask_flops


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m benchmarks kernels", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=["1.3B", "14B"], default="1.3B")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes (CPU / interpreter smoke run)")
    ap.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16")
    ap.add_argument("--backends", default="torch,triton,cuda")
    ap.add_argument("--out", required=True, help="output folder for kernels_<model>.json and .md")
    args = ap.parse_args(argv)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, args.dtype)
    shape = SHAPES["smoke" if args.smoke else args.model]
    pk = common.peaks(device, small=args.smoke)
    rows = []
    # the same inputs in fp32 give the truth of the tolerance rule (conventions: kernel vs fp32 reference)
    truth = _cases(shape, device, torch.float32) if dtype != torch.float32 else None
    for name, fn, nbytes, flops in _cases(shape, device, dtype):
        fn32 = next(truth)[1] if truth is not None else None
        if name.startswith("baseline"):
            ms = common.kernel_ms(lambda: fn(None), device)
            rows.append({"op": name, "backend": "-", "ms": ms, "ok": None, "note": ""})
            continue
        ref = fn("torch")
        ref32 = fn32("torch").float() if fn32 is not None else ref
        for backend in args.backends.split(","):
            row = {"op": name, "backend": backend, "ms": None, "ok": None, "note": ""}
            try:
                out = fn(backend)
                if backend != "torch":
                    try:
                        assert_kernel_close(out, ref32, ref if fn32 is not None else None)
                        row["ok"] = True
                    except AssertionError as exc:
                        row["ok"], row["note"] = False, str(exc).splitlines()[0][:200]
                row["ms"] = common.kernel_ms(lambda: fn(backend), device)
            except registry.BackendUnavailableError as exc:
                row["note"] = str(exc).split(": ", 2)[-1][:200]
            if row["ms"]:
                if nbytes:
                    row["GB/s"] = nbytes / row["ms"] / 1e6
                    row["of_copy_bw"] = row["GB/s"] / pk["copy_gbs"]
                if flops:
                    row["TFLOP/s"] = flops / row["ms"] / 1e9
            rows.append(row)
    label = "smoke" if args.smoke else args.model
    meta = dict(common.run_meta(device, common.command_line("python -m benchmarks kernels", argv)),
                model=label, shape=shape, dtype=args.dtype, peaks=pk)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    common.write_json(out / f"kernels_{label}.json", {"kind": "kernels", "meta": meta, "rows": rows})
    lines = [f"# anyflow kernels, {label} shapes, on {meta['device']} ({meta['date']})", "",
             f"{common.provenance(meta)}; peaks: {pk['bf16_matmul_tflops']:.0f} TFLOP/s bf16 matmul, {pk['copy_gbs']:.0f} GB/s copy", "",
             "| op | backend | ms | GB/s (of copy) | TFLOP/s | check | note |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        bw = f"{r['GB/s']:.0f} ({100 * r['of_copy_bw']:.0f}%)" if "GB/s" in r else ""
        tf = f"{r['TFLOP/s']:.1f}" if "TFLOP/s" in r else ""
        ms = f"{r['ms']:.3f}" if r["ms"] else "-"
        ok = {True: "pass", False: "FAIL", None: ""}[r["ok"]]
        lines.append(f"| {r['op']} | {r['backend']} | {ms} | {bw} | {tf} | {ok} | {r['note']} |")
    (out / f"kernels_{label}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))

