"""End-to-end levers of anyflow's samplers, each switched on alone and all together, in one process.

Runs the real sampler loops (``anyflow.samplers.bidirectional.sample`` and the FAR
``FARSession`` + ``generate`` with its cache steps) at transformer level: random bf16 weights at a real
Wan2.1 config, random prompt embeddings, no text encoder or VAE. Each configuration times a whole
video of ``--steps`` flow-map jumps (FAR: per chunk), median of ``--iters`` runs after one warm-up
run, synchronised once per video:

* ``baseline``: every lever off (cross-attention K/V recomputed every step, torch's own SDPA choice,
  eager forward);
* ``cross_kv``: prompt-constant cross-attention K/V computed once per prompt;
* ``sdpa_cudnn`` / ``sdpa_tuned``: ``cross_kv`` + the SDPA policy (cuDNN first / fastest kernel
  measured per shape; the tuning runs in the warm-up video and its table is recorded);
* ``cuda_graphs``: ``cross_kv`` + the per-step forward replayed from a CUDA graph (the timed video
  includes its own eager first step and capture, as every generation pays them);
* ``all``: ``cross_kv`` + ``sdpa_tuned`` + ``cuda_graphs``.

Then, for the headline ratio, whole pipeline calls in the same process: the untouched diffusers
``AnyFlowPipeline`` / ``AnyFlowFARPipeline`` ``__call__`` around the same transformer (prompt embeddings in,
``output_type="latent"``, no VAE or text encoder), then the same pipeline after ``anyflow.enable`` with
its defaults and with every lever (``--pipelines``); every row gets one warm-up call and ``--iters`` timed
calls. For FAR the enabled pipeline's cache steps append (the diffusers one re-encodes the prefix) and its
inference steps use the official semantics (diffusers 0.42.1 adds zero keys), so the FAR output reference
is ``diffusers_official``, diffusers with its padded keys dropped: ``rel_l2_vs_official`` of the
``diffusers`` row is the size of the upstream bug, of the ``anyflow`` rows anyflow's deviation from the
official model.

Two more levers are measured by what they cost, not switched: the fp32 master latent (the fused Euler
update on an fp32 latent vs on a model-dtype latent, per step, next to the NFE time) and host syncs in
the loop (device -> host reads per step of a whole video, counted by a dispatch mode: must be 0).

    python -m benchmarks levers --model 1.3B --mode bidirectional --steps 4 --out OUT
    python -m benchmarks levers --model tiny --mode far --height 64 --width 64 --frames 21 --chunk-partition 1,2,2,1 --steps 2
"""

from __future__ import annotations

import argparse
import contextlib
from pathlib import Path

import torch

from anyflow.samplers.schedule import pairs_of, time_grid
from anyflow.testing.tolerances import rel_l2

from . import common, nfe

LEVERS = {
    "baseline": dict(cache_kv=False, attention="default", cuda_graphs=False),
    "cross_kv": dict(cache_kv=True, attention="default", cuda_graphs=False),
    "sdpa_cudnn": dict(cache_kv=True, attention="cudnn", cuda_graphs=False),
    "sdpa_tuned": dict(cache_kv=True, attention="tuned", cuda_graphs=False),
    "cuda_graphs": dict(cache_kv=True, attention="default", cuda_graphs=True),
    "all": dict(cache_kv=True, attention="tuned", cuda_graphs=True),
}


def video_runner(model, mode: str, latent, chunk_partition, pairs, text_raw, device, dtype, lever: dict):
    """``run() -> (latents, nfe)``: one whole video through the sampler with ``lever``'s settings."""
    from anyflow import ops
    from anyflow.models.blocks import prepare_text
    from anyflow.samplers import bidirectional, far

    f, h, w = latent
    gen = torch.Generator(device="cpu").manual_seed(1)
    noise = torch.randn(text_raw.shape[0], f, model.config.in_channels, h, w, generator=gen).to(device)

    if mode == "bidirectional":
        def run():
            text = prepare_text(model, text_raw, cache_kv=lever["cache_kv"])
            with ops.backend("torch"):
                out = bidirectional.sample(model, noise, pairs, text, cuda_graphs=lever["cuda_graphs"],
                                           attention=lever["attention"])
            return out.latents, out.nfe
        return run

    def run():
        text = prepare_text(model, text_raw, cache_kv=lever["cache_kv"])
        session = far.FARSession(model, text, chunk_partition, (h, w), cuda_graphs=lever["cuda_graphs"],
                                 attention=lever["attention"])
        out = None
        with ops.backend("torch"):
            for _, out in far.generate(session, noise, pairs):
                pass
        return out, session.nfe

    return run


def euler_cost(latent, batch: int, device, dtype) -> dict:
    """ms of one fused Euler update with an fp32 master latent vs a model-dtype latent (same u)."""
    from anyflow import ops

    f, h, w = latent
    gen = torch.Generator(device="cpu").manual_seed(2)
    u = torch.randn(batch, f, 16, h, w, generator=gen).to(device, dtype)
    z32 = torch.randn(batch, f, 16, h, w, generator=gen).to(device)
    zlow = z32.to(dtype)
    fp32 = common.kernel_ms(lambda: ops.euler_shortcut(z32, u, 937.5, 833.3, backend="torch"), device)
    low = common.kernel_ms(lambda: ops.euler_shortcut(zlow, u, 937.5, 833.3, backend="torch"), device)
    return {"fp32_master_ms": fp32, "model_dtype_ms": low}


def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--model", default="1.3B", help="1.3B, 14B, tiny, or a JSON transformer config (default 1.3B)")
    ap.add_argument("--mode", choices=["bidirectional", "far"], default="bidirectional")
    ap.add_argument("--height", type=int, default=480)
    ap.add_argument("--width", type=int, default=832)
    ap.add_argument("--frames", type=int, default=81, help="pixel frames, 4k+1")
    ap.add_argument("--chunk-partition", default=None, help="FAR latent frames per chunk (default 1,3,3,3,3,3,3,2)")
    ap.add_argument("--steps", type=int, default=4, help="flow-map jumps per video (FAR: per chunk)")
    ap.add_argument("--shift", type=float, default=5.0, help="time shift of the schedule")
    ap.add_argument("--levers", default=",".join(LEVERS), help=f"comma list of {', '.join(LEVERS)}, or none")
    ap.add_argument("--pipelines", default=",".join(PIPELINES),
                    help=f"comma list of {', '.join(PIPELINES)} (whole pipeline calls, untouched vs enabled) or none")
    ap.add_argument("--dtype", choices=["bfloat16", "float32"], default=None, help="default bf16 on CUDA, fp32 on CPU")
    ap.add_argument("--device", default=None)
    ap.add_argument("--iters", type=int, default=3, help="timed videos per lever (median)")
    ap.add_argument("--out", default=None, help="folder for levers_<model>_<mode>.json and .md (default: print only)")
    ap.add_argument("--jsonl", default=None, help="also append every row to this JSON-lines file as it is measured")
    ap.add_argument("--resume", action="store_true", help="skip the rows an earlier run of the same configuration "
                    "already wrote to --jsonl")


@torch.no_grad()
def run(args, command: str) -> dict:
    from anyflow import ops

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    if args.frames < 1 or (args.frames - 1) % 4 or args.height % 16 or args.width % 16:
        raise ValueError(f"--frames must be 4k+1 and --height/--width multiples of 16, got "
                         f"{args.frames}, {args.height}x{args.width}")
    if args.steps < 1:
        raise ValueError(f"--steps must be >= 1, got {args.steps}")
    names = [n.strip() for n in args.levers.split(",") if n.strip() and n.strip() != "none"]
    unknown = [n for n in names if n not in LEVERS]
    if unknown:
        raise ValueError(f"--levers: unknown {unknown}; expected some of {list(LEVERS)}")
    pipeline_names = [n.strip() for n in args.pipelines.split(",") if n.strip() and n.strip() != "none"]
    unknown = [n for n in pipeline_names if n not in PIPELINES]
    if unknown:
        raise ValueError(f"--pipelines: unknown {unknown}; expected some of {list(PIPELINES)} or none")
    f = (args.frames - 1) // 4 + 1
    latent = (f, args.height // 8, args.width // 8)
    cp = [int(c) for c in args.chunk_partition.split(",")] if args.chunk_partition else list(common.CHUNK_PARTITION)
    label, cfg = nfe.load_config(args.model, args.mode, cp)
    meta = common.run_meta(device, command)
    model = nfe.build_transformer(cfg, args.mode, dtype, device)
    if args.mode == "far":
        nfe.far_plan(model.config, latent, cp)  # validates the chunk partition against the frame count
    pairs = pairs_of(time_grid(args.steps, args.shift))
    gen = torch.Generator(device="cpu").manual_seed(0)
    text_raw = torch.randn(1, common.TEXT_TOKENS, model.config.text_dim, generator=gen).to(device, dtype)

    n_steps = args.steps * (len(cp) if args.mode == "far" else 1)
    data = {
        "kind": "levers", "meta": meta,
        "config": {"model": label, "mode": args.mode, "dtype": str(dtype).replace("torch.", ""), "height": args.height,
                   "width": args.width, "frames": args.frames, "latent": list(latent), "steps": args.steps,
                   "shift": args.shift, "chunk_partition": cp if args.mode == "far" else None, "iters": args.iters},
        "levers": [], "pipelines": [], "steps_per_video": n_steps,
        "notes": "video_ms = whole video through the sampler (FAR incl. cache steps), median of the timed videos "
                 "after one warm-up video, the same count for every row; rel_l2_vs_first compares each lever's "
                 "latents with the first lever's (same noise; levers change rounding only); pipelines = the whole "
                 "diffusers __call__ (output_type latent, prompt embeddings given, no VAE)",
    }

    def save(d):  # after every row: a stage killed by its time limit still leaves what it measured
        if args.out:
            common.write_json(Path(args.out) / f"levers_{label}_{args.mode}.json", d)
            (Path(args.out) / f"levers_{label}_{args.mode}.md").write_text(markdown(d))

    rec = common.Record(data, key=f"levers:{label}:{args.mode}:{data['config']['dtype']}:{args.steps}:"
                        f"{args.height}x{args.width}x{args.frames}", jsonl=args.jsonl, save=save)
    done = rec.done("levers", "lever") | rec.done("pipelines", "pipeline") if args.resume else set()
    if names:
        from anyflow.testing.host_reads import HostReads

        with HostReads() as reads:  # host syncs of one whole video, every lever that does not change the loop on
            video_runner(model, args.mode, latent, cp, pairs, text_raw, device, dtype, LEVERS["cross_kv"])()
        rec.set("host_reads_per_video", reads.count)
        rec.set("euler", euler_cost(latent, 1, device, dtype))

    reference = None
    for name in names:
        if name in done:
            continue
        lever = LEVERS[name]
        row = {"lever": name, **lever, "status": "ok", "reason": None}
        try:
            runner = video_runner(model, args.mode, latent, cp, pairs, text_raw, device, dtype, lever)
            common.reset_peak_memory(device)
            out, count = runner()  # warm-up video: compiles, tunes SDPA, fills caches
            row["video_ms"] = common.median_ms(runner, device, iters=args.iters, warmup=0)
            row["nfe"] = count
            row["peak_mem_gib"] = common.peak_memory_gib(device)
            if reference is None:
                reference = out
            row["rel_l2_vs_first"] = rel_l2(out, reference)
        except Exception as exc:  # noqa: BLE001 - one failing lever must not stop the others
            row.update(status="failed", reason=common.failure_reason(exc))
        common.add_speedups(rec.data["levers"] + [row], "lever", "baseline", "speedup_vs_baseline")
        rec.add("levers", row)
        rec.set("sdpa_choices", ops.sdpa_choices())
        ok = [r for r in rec.data["levers"] if r["status"] == "ok"]
        if ok and "euler" in rec.data:
            per_nfe = min(r["video_ms"] / r["nfe"] for r in ok)
            rec.set("euler", dict(rec.data["euler"], fp32_share_of_nfe=rec.data["euler"]["fp32_master_ms"] / per_nfe))
        common.stop_if_lost(device, "levers")

    if pipeline_names:
        time_pipelines(model, args, latent, cp, text_raw, device, pipeline_names, rec, done)
    del model
    print(markdown(rec.data))
    return rec.data


#: Pipeline rows: the untouched diffusers ``__call__``, diffusers with the official FAR semantics (its
#: padded zero keys dropped: the output reference for FAR), and enabled ones (``anyflow.enable`` kwargs).
PIPELINES = {
    "diffusers": None,
    "diffusers_official": None,
    "anyflow": {},
    "anyflow_all": {"attention": "tuned", "cuda_graphs": True},
}


def time_pipelines(model, args, latent, cp, text_raw, device, names, rec, done=frozenset()) -> None:
    """Whole ``__call__`` of the diffusers AnyFlow pipeline around ``model`` (no VAE or text encoder: prompt
    embeddings in, latents out), untouched and enabled, same noise, one warm-up call and ``--iters`` timed calls
    each, in the order of ``names`` (the device check puts the rows it cannot lose first); rows appended to
    ``rec``'s ``pipelines``. After every row ``pipeline_comparisons`` is recomputed from the rows so far: each
    row's speed-up over ``diffusers`` and its output difference from the official semantics
    (``diffusers_official`` for FAR, whose diffusers 0.42.1 pads inference-step keys with zeros; ``diffusers``
    for the bidirectional pipeline)."""
    import anyflow
    from diffusers import AnyFlowFARPipeline, AnyFlowPipeline, FlowMapEulerDiscreteScheduler

    from anyflow.testing.official import official_far_semantics

    cls = AnyFlowFARPipeline if args.mode == "far" else AnyFlowPipeline
    pipe = cls(transformer=model, vae=None, text_encoder=None, tokenizer=None,
               scheduler=FlowMapEulerDiscreteScheduler(shift=args.shift))
    pipe.set_progress_bar_config(disable=True)
    kw = dict(prompt_embeds=text_raw, height=args.height, width=args.width, num_frames=args.frames,
              num_inference_steps=args.steps, output_type="latent")
    if args.mode == "far":
        kw["chunk_partition"] = cp

    def call():
        return pipe(generator=torch.Generator(device="cpu").manual_seed(3), **kw).frames

    reference = "diffusers_official" if args.mode == "far" else "diffusers"
    outputs, times = {}, {}
    for name in names:
        if name in done or (name == "diffusers_official" and args.mode != "far"):
            continue  # the bidirectional pipeline has no padded cache step: "diffusers" is the official model
        row = {"pipeline": name, "enable": PIPELINES[name], "status": "ok", "reason": None, "iters": args.iters}
        try:
            with contextlib.ExitStack() as stack:
                if name == "diffusers_official":
                    stack.enter_context(official_far_semantics())
                elif PIPELINES[name] is not None:
                    stack.enter_context(anyflow.enable(pipe, **PIPELINES[name]))
                common.reset_peak_memory(device)
                outs = []
                row["video_ms"] = common.median_ms(lambda: outs.append(call()), device, iters=args.iters, warmup=1)
                row["peak_mem_gib"] = common.peak_memory_gib(device)
            outputs[name], times[name] = outs[-1], row["video_ms"]
        except Exception as exc:  # noqa: BLE001 - recorded; the other rows still run
            row.update(status="failed", reason=common.failure_reason(exc))
        rec.add("pipelines", row)
        comparisons = {}
        for other in times:
            c = comparisons.setdefault(other, {})
            if "diffusers" in times:
                c["speedup_vs_diffusers"] = times["diffusers"] / times[other]
            if reference in outputs and other != reference:
                c["rel_l2_vs_official"] = rel_l2(outputs[other], outputs[reference])
        rec.set("pipeline_comparisons", {"reference": reference, "rows": comparisons})
        common.stop_if_lost(device, "levers")



def markdown(rec: dict) -> str:
    c, m = rec["config"], rec["meta"]
    lines = [
        f"# Levers: {c['model']} {c['mode']} {c['dtype']} {c['width']}x{c['height']}x{c['frames']}, {c['steps']} steps"
        f"{' per chunk' if c['mode'] == 'far' else ''} on {m['device']} ({m['date']})", "",
        f"{common.provenance(m)}. {rec['notes']}.", "",
        "| lever | video ms | NFE | ms/NFE | vs baseline | peak GiB | rel L2 vs first | status |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rec["levers"]:
        if r["status"] != "ok":
            lines.append(f"| {r['lever']} | | | | | | | {r['status']}: {r['reason']} |")
            continue
        mem = f"{r['peak_mem_gib']:.1f}" if r.get("peak_mem_gib") is not None else "-"
        sp = f"{r['speedup_vs_baseline']:.2f}x" if "speedup_vs_baseline" in r else "-"
        lines.append(f"| {r['lever']} | {r['video_ms']:.1f} | {r['nfe']} | {r['video_ms'] / r['nfe']:.2f} | {sp} | {mem} | "
                     f"{r['rel_l2_vs_first']:.1e} | ok |")
    if rec.get("pipelines"):
        comp = rec.get("pipeline_comparisons") or {"reference": "-", "rows": {}}
        lines += ["", "Whole pipeline calls (diffusers `__call__`, untouched vs `anyflow.enable`; prompt embeddings in, "
                  "latents out):", "", "| pipeline | enable() arguments | video ms | vs diffusers | peak GiB | "
                  f"rel L2 vs {comp['reference']} | status |", "|---|---|---|---|---|---|---|"]
        for r in rec["pipelines"]:
            args = "-" if r["enable"] is None else (", ".join(f"{k}={v}" for k, v in r["enable"].items()) or "(defaults)")
            if r["status"] != "ok":
                lines.append(f"| {r['pipeline']} | {args} | | | | | {r['status']}: {r['reason']} |")
                continue
            c = comp["rows"].get(r["pipeline"], {})
            mem = f"{r['peak_mem_gib']:.1f}" if r.get("peak_mem_gib") is not None else "-"
            sp = f"{c['speedup_vs_diffusers']:.2f}x" if "speedup_vs_diffusers" in c else "-"
            err = f"{c['rel_l2_vs_official']:.1e}" if "rel_l2_vs_official" in c else "-"
            lines.append(f"| {r['pipeline']} | {args} | {r['video_ms']:.1f} | {sp} | {mem} | {err} | ok |")
    e = rec.get("euler")
    if e is None:
        return "\n".join(lines) + "\n"
    share = f", {100 * e['fp32_share_of_nfe']:.2f}% of the fastest NFE" if "fp32_share_of_nfe" in e else ""
    lines += ["", f"fp32 master latent: Euler update {e['fp32_master_ms']:.3f} ms vs {e['model_dtype_ms']:.3f} ms on a "
              f"model-dtype latent{share}. Host reads in a whole video: {rec['host_reads_per_video']} "
              f"({rec['steps_per_video']} steps)."]
    if rec.get("sdpa_choices"):
        lines += ["", "SDPA kernel per shape (tuned): " + "; ".join(f"{k}: {v['kernel']}" for k, v in rec["sdpa_choices"].items())]
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(prog="python -m benchmarks levers", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(ap)
    args = ap.parse_args(argv)
    return run(args, common.command_line("python -m benchmarks levers", argv))
