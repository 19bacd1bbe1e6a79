"""Check and time every fused op per backend at real Wan2.1 shapes; write JSON + a Markdown table.

One run does, on the current device:
1. peaks measured in the same process: bf16 matmul TFLOP/s and device-to-device copy GB/s;
2. for each op and each backend (``torch`` reference, ``triton``, ``cuda`` where registered): a
   correctness check against the fp32 torch reference (the project's tolerance rule) and the median
   time of the Python call (``ms``: ``triton.testing.do_bench`` on CUDA, a wall-clock loop on CPU) and,
   on CUDA, of the same call replayed from a CUDA graph (``device_ms``: the kernels alone, without the
   registry, argument checks and launch overhead that dominate below ~100 us);
3. baselines: concatenate + RoPE + SDPA (what diffusers does at a FAR inference step), SDPA with the
   cuDNN backend on the same dense shape, FlexAttention with a block mask for the chunk-causal form
   (forward and forward+backward).

    python -m benchmarks kernels --out benchmarks/results/h200 --model 1.3B        # on a GPU
    TRITON_INTERPRET=1 python -m benchmarks kernels --smoke --out /tmp/k          # CPU smoke run

Every (op, backend) row is caught on its own: an exception (a Triton compile or out-of-resources
error, a CUDA error) costs that row, which records the reason; a lost CUDA context ends the process
with exit status 75 after recording the row, and ``--resume`` reruns skip the rows already in
``--jsonl``. Ratios are only meaningful within one run (same device, same process).
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
    # adjacent views of one cache buffer: the Triton launcher merges them into one segment
    yield "segmented_attention", lambda b: ops.segmented_attention(q, keys, values, backend=b), 0, att_flops
    # the same keys in separate allocations, keys and values interleaved so that no two key (or value)
    # segments are adjacent in memory: the multi-segment path of the kernels
    apart = [t.clone() for kv in zip(keys, values) for t in kv]
    keys_apart, values_apart = apart[0::2], apart[1::2]
    yield ("segmented_attention (3 separate segments)",
           lambda b: ops.segmented_attention(q, keys_apart, values_apart, backend=b), 0, att_flops)

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


def graph_ms(fn, device) -> tuple[float | None, str | None]:
    """Median ms of ``fn()`` replayed from a CUDA graph (device time without Python dispatch), or
    ``(None, reason)`` off CUDA or when the call cannot be captured (it syncs with the host, say)."""
    if device.type != "cuda":
        return None, "CUDA graphs need CUDA"
    try:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):
                fn()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
        return common.kernel_ms(graph.replay, device), None
    except Exception as exc:  # noqa: BLE001 - recorded next to the Python-call time
        torch.cuda.synchronize(device)
        return None, common.failure_reason(exc)


def measure(fn, backend, ref, ref32, nbytes, flops, device, peak_copy_gbs) -> dict:
    """One (op, backend) row: check against the fp32 reference, Python-call time, graph-replay time."""
    row = {"backend": backend, "ms": None, "device_ms": None, "ok": None, "note": ""}
    try:
        out = fn(backend)
        if backend != "torch":
            try:
                assert_kernel_close(out, ref32, ref if ref is not ref32 else None)
                row["ok"] = True
            except AssertionError as exc:
                row["ok"], row["note"] = False, str(exc).splitlines()[0][:200]
        del out
        row["ms"] = common.kernel_ms(lambda: fn(backend), device)
        row["device_ms"], why = graph_ms(lambda: fn(backend), device)
        if why and device.type == "cuda":
            row["note"] = (row["note"] + "; " if row["note"] else "") + f"no graph replay: {why}"
    except registry.BackendUnavailableError as exc:
        row["status"], row["note"] = "skipped", str(exc).split(": ", 2)[-1][:300]
        return row
    except Exception as exc:  # noqa: BLE001 - one failing kernel costs one row
        row["status"], row["note"] = "failed", common.failure_reason(exc)
        return row
    row["status"] = "ok"
    best = row["device_ms"] or row["ms"]
    if nbytes:
        row["GB/s"] = nbytes / best / 1e6
        row["of_copy_bw"] = row["GB/s"] / peak_copy_gbs
    if flops:
        row["TFLOP/s"] = flops / best / 1e9
    return row


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m benchmarks kernels", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=["1.3B", "14B"], default="1.3B")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes (CPU / interpreter smoke run)")
    ap.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16")
    ap.add_argument("--backends", default="torch,triton,cuda")
    ap.add_argument("--no-baselines", action="store_true", help="skip the SDPA / cuDNN / FlexAttention baseline rows")
    ap.add_argument("--out", default=None, help="output folder for kernels_<model>.json and .md")
    ap.add_argument("--jsonl", default=None, help="also append every row to this JSON-lines file as it is measured")
    ap.add_argument("--resume", action="store_true", help="skip the rows an earlier run of the same shapes and "
                    "backends already wrote to --jsonl (after a lost CUDA context)")
    args = ap.parse_args(argv)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, args.dtype)
    label = "smoke" if args.smoke else args.model
    shape = SHAPES[label]
    backends = [b for b in args.backends.split(",") if b]
    meta = dict(common.run_meta(device, common.command_line("python -m benchmarks kernels", argv)),
                model=label, shape=shape, dtype=args.dtype)
    out = Path(args.out) if args.out else None

    def save(data):
        if out is not None:
            common.write_json(out / f"kernels_{label}.json", data)
            (out / f"kernels_{label}.md").write_text(markdown(data))

    rec = common.Record({"kind": "kernels", "meta": meta, "rows": []},
                        key=f"kernels:{label}:{args.dtype}:{','.join(backends)}", jsonl=args.jsonl, save=save)
    done = rec.done("rows", "id") if args.resume else set()
    pk = common.peaks(device, small=args.smoke)
    rec.data["meta"]["peaks"] = pk
    rec.set("peaks", pk)
    # the same inputs in fp32 give the truth of the tolerance rule (conventions: kernel vs fp32 reference)
    truth = _cases(shape, device, torch.float32) if dtype != torch.float32 else None
    for name, fn, nbytes, flops in _cases(shape, device, dtype):
        fn32 = next(truth)[1] if truth is not None else None
        if name.startswith("baseline"):
            if args.no_baselines or name in done:
                continue
            row = {"id": name, "op": name, "backend": "-", "ok": None, "note": "", "device_ms": None}
            try:
                row["ms"] = common.kernel_ms(lambda: fn(None), device)
                row["status"] = "ok"
                if flops:
                    row["TFLOP/s"] = flops / row["ms"] / 1e9
            except Exception as exc:  # noqa: BLE001
                row.update(ms=None, status="failed", note=common.failure_reason(exc))
            rec.add("rows", row)
            common.stop_if_lost(device, "kernels")
            continue
        todo = [b for b in backends if f"{name}|{b}" not in done]
        if not todo:
            continue
        try:
            ref = fn("torch")
            ref32 = fn32("torch").float() if fn32 is not None else ref
        except Exception as exc:  # noqa: BLE001 - without a reference the op's rows cannot be checked
            for b in todo:
                rec.add("rows", {"id": f"{name}|{b}", "op": name, "backend": b, "ms": None, "device_ms": None, "ok": None,
                                 "status": "failed", "note": f"torch reference failed: {common.failure_reason(exc)}"})
            common.stop_if_lost(device, "kernels")
            continue
        for backend in todo:
            row = measure(fn, backend, ref, ref32, nbytes, flops, device, pk["copy_gbs"])
            rec.add("rows", {"id": f"{name}|{backend}", "op": name, **row})
            common.stop_if_lost(device, "kernels")
        del ref, ref32
    print(markdown(rec.data))
    return rec.data



def markdown(rec: dict) -> str:
    meta, pk = rec["meta"], rec.get("peaks") or {}
    peaks = (f"; peaks: {pk['bf16_matmul_tflops']:.0f} TFLOP/s bf16 matmul, {pk['copy_gbs']:.0f} GB/s copy" if pk else "")
    lines = [f"# anyflow kernels, {meta['model']} shapes, on {meta['device']} ({meta['date']})", "",
             f"{common.provenance(meta)}{peaks}", "",
             "| op | backend | ms (Python call) | ms (graph replay) | GB/s (of copy) | TFLOP/s | check | note |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rec["rows"]:
        bw = f"{r['GB/s']:.0f} ({100 * r['of_copy_bw']:.0f}%)" if "GB/s" in r else ""
        tf = f"{r['TFLOP/s']:.1f}" if "TFLOP/s" in r else ""
        ms = f"{r['ms']:.3f}" if r.get("ms") else "-"
        dms = f"{r['device_ms']:.3f}" if r.get("device_ms") else "-"
        ok = {True: "pass", False: "FAIL", None: ""}[r["ok"]]
        status = "" if r.get("status", "ok") == "ok" else f"{r['status']}: "
        lines.append(f"| {r['op']} | {r['backend']} | {ms} | {dms} | {bw} | {tf} | {ok} | {status}{r['note']} |")
    return "\n".join(lines) + "\n"
