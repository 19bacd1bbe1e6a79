"""Per-NFE time of the diffusers AnyFlow transformers vs the same instance after ``anyflow.enable``.

Builds the transformer at a real Wan2.1 config (or the tiny test config) with random weights (weights
do not change speed; nothing is downloaded), then times one NFE both ways in the same process:

* ``bidirectional``: one forward over the whole clip (``AnyFlowTransformer3DModel``);
* ``far``: one KV-cache inference NFE of chunk ``--chunk`` with the cache filled by the preceding
  cache steps (``AnyFlowFARTransformer3DModel``; diffusers needs its ``flex`` attention).

Reports median ms per NFE, the anyflow/diffusers speed ratio and achieved TFLOP/s from the FLOP model
of ``shared/docs/performance.md`` (2 FLOPs per MAC), and appends a JSON record to ``--out``.

    python benchmarks/bench_nfe.py --model tiny --mode far --height 64 --width 64 --frames 21
    python benchmarks/bench_nfe.py --model 1.3B --mode bidirectional --dtype bfloat16 --device cuda
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import time
from pathlib import Path

import torch

import anyflow

CONFIGS = {
    "1.3B": dict(num_attention_heads=12, attention_head_dim=128, ffn_dim=8960, num_layers=30, text_dim=4096, freq_dim=256),
    "14B": dict(num_attention_heads=40, attention_head_dim=128, ffn_dim=13824, num_layers=40, text_dim=4096, freq_dim=256),
}


def build(model: str, mode: str, dtype, device, chunk_partition):
    from diffusers import AnyFlowFARTransformer3DModel, AnyFlowTransformer3DModel

    from anyflow.testing.tiny import tiny_transformer

    if model == "tiny":
        extra = {"chunk_partition": tuple(chunk_partition)} if mode == "far" else {}
        return tiny_transformer("far" if mode == "far" else "bidirectional", dtype=dtype, **extra).to(device)
    cls = AnyFlowFARTransformer3DModel if mode == "far" else AnyFlowTransformer3DModel
    extra = {"chunk_partition": tuple(chunk_partition)} if mode == "far" else {}
    with torch.device(device):
        m = cls(**CONFIGS[model], **extra)
    return m.to(dtype).eval()


def flops(cfg, lq: int, lk: int, lt: int) -> float:
    d = cfg.num_attention_heads * cfg.attention_head_dim
    per_layer = lq * (12 * d * d + 4 * d * cfg.ffn_dim) + 4 * lq * lk * d + 4 * lq * lt * d + 4 * lt * d * d
    return cfg.num_layers * per_layer


def timed(fn, iters: int, device) -> float:
    fn()
    samples = []
    for _ in range(iters):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        samples.append(time.perf_counter() - t0)
    return statistics.median(samples)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=["tiny", "1.3B", "14B"], default="tiny")
    ap.add_argument("--mode", choices=["bidirectional", "far"], default="bidirectional")
    ap.add_argument("--height", type=int, default=480)
    ap.add_argument("--width", type=int, default=832)
    ap.add_argument("--frames", type=int, default=81, help="pixel frames (latent = (frames - 1) / 4 + 1)")
    ap.add_argument("--chunk-partition", default="1,3,3,3,3,3,3,2")
    ap.add_argument("--chunk", type=int, default=6, help="FAR chunk whose NFE is timed")
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "bench_nfe.jsonl"))
    args = ap.parse_args(argv)

    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    cp = [int(c) for c in args.chunk_partition.split(",")]
    torch.set_grad_enabled(False)
    model = build(args.model, args.mode, dtype, device, cp)
    cfg = model.config
    f, h, w = (args.frames - 1) // 4 + 1, args.height // 8, args.width // 8
    tpf = (h // 2) * (w // 2)
    lt = 512
    text = torch.randn(1, lt, cfg.text_dim, device=device, dtype=dtype)
    gen = torch.Generator(device="cpu").manual_seed(0)

    if args.mode == "bidirectional":
        x = torch.randn(1, f, cfg.in_channels, h, w, generator=gen).to(device, dtype)
        t = torch.full((1, f), 937.5, device=device)
        r = torch.full((1, f), 833.3, device=device)

        def call():
            return model(x, t, r, text)

        total_flops = flops(cfg, f * tpf, f * tpf, lt)
    else:
        if sum(cp) != f:
            raise SystemExit(f"--chunk-partition {cp} sums to {sum(cp)}, but {args.frames} frames give {f} latent frames")
        k = min(args.chunk, len(cp) - 1)
        latents = torch.randn(1, f, cfg.in_channels, h, w, generator=gen).to(device, dtype)
        comp_tpf = (h // 4) * (w // 4)
        lim = cfg.full_chunk_limit
        cache = [
            {
                "full_cache": torch.zeros(2, 1, cfg.num_attention_heads, lim * max(cp) * tpf, cfg.attention_head_dim, device=device, dtype=dtype),
                "compressed_cache": torch.zeros(2, 1, cfg.num_attention_heads, (len(cp) - lim + 1) * max(cp) * comp_tpf, cfg.attention_head_dim, device=device, dtype=dtype),
            }
            for _ in range(cfg.num_layers)
        ]
        for j in range(k):
            n = sum(cp[: j + 1])
            z = torch.zeros(1, n, device=device)
            model(latents[:, :n], z, z, text, chunk_partition=cp[: j + 1], kv_cache=cache,
                  kv_cache_flag={"num_cached_chunks": j, "is_cache_step": True})
        cur = latents[:, sum(cp[:k]) : sum(cp[: k + 1])]
        t = torch.full((1, cp[k]), 937.5, device=device)
        r = torch.full((1, cp[k]), 833.3, device=device)
        flag = {"num_cached_chunks": k, "is_cache_step": False}

        def call():
            return model(cur, t, r, text, chunk_partition=cp[: k + 1], kv_cache=cache, kv_cache_flag=dict(flag))

        nc = (k + 1) - min(k + 1, lim)
        lk = sum(cp[:nc]) * comp_tpf + sum(cp[nc : k + 1]) * tpf
        total_flops = flops(cfg, cp[k] * tpf, lk, lt)

    ref_s = timed(call, args.iters, device)
    handle = anyflow.enable(model, backend=args.backend)
    ours_s = timed(call, args.iters, device)
    handle.disable()

    record = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": "python benchmarks/bench_nfe.py " + " ".join(argv if argv is not None else __import__("sys").argv[1:]),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "versions": {"torch": torch.__version__, "anyflow": anyflow.__version__, "cuda": torch.version.cuda},
        "model": args.model, "mode": args.mode, "dtype": args.dtype, "latent": [f, h, w],
        "diffusers_ms_per_nfe": ref_s * 1e3, "anyflow_ms_per_nfe": ours_s * 1e3, "speedup": ref_s / ours_s,
        "tflop_per_nfe": total_flops / 1e12, "anyflow_tflops": total_flops / ours_s / 1e12,
    }
    print(f"{args.model} {args.mode} {args.dtype} latent {f}x{h}x{w} on {record['device']}: "
          f"diffusers {ref_s * 1e3:.2f} ms/NFE, anyflow {ours_s * 1e3:.2f} ms/NFE, "
          f"speedup {ref_s / ours_s:.2f}x, {record['anyflow_tflops']:.3f} TFLOP/s")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "a") as fh:
        fh.write(json.dumps(record) + "\n")
    return record


if __name__ == "__main__":
    main()
