"""Per-NFE DiT time: untouched diffusers vs anyflow, every backend, in one process.

Builds the transformer at a real Wan2.1 config (``1.3B``, ``14B``), the tiny test config or a custom
JSON config, with random weights created directly on the device in the benchmark dtype (weights do not
change speed; nothing is downloaded), then times each *variant* on the same inputs:

* ``diffusers``: the untouched diffusers transformer with its default attention (FAR: ``flex``);
* ``diffusers:cudnn`` / ``diffusers:flash`` / ``diffusers:xformers``: the same after
  ``set_attention_backend`` (``_native_cudnn``, ``flash``, ``xformers``; the latter two only when
  importable). diffusers' FAR self-attention accepts only ``flex``, so for FAR the backend applies to the
  dense cross-attention and the self-attention stays on flex;
* ``anyflow:torch|triton|cuda|auto``: the same instance after ``anyflow.enable(model, backend=...)``;
* ``anyflow:<backend>+<policy>``: that backend with an SDPA policy of :mod:`anyflow.ops.sdpa` on its dense
  attentions (``anyflow:torch+cudnn``: cuDNN first; ``anyflow:auto+tuned``: fastest kernel per shape,
  tuned in the warm-up call), through ``anyflow.enable(model, backend, attention=policy)``.

Workloads: ``bidirectional`` = one forward over the whole clip. ``far`` = the inference NFE of every
chunk (query chunk over its KV cache) and every cache step (the masked forward over the prefix that
rebuilds the cache after each chunk but the last), all at transformer level with a diffusers-format KV
cache. Guidance on = batch 2 (conditional + unconditional in one forward).

Reported per variant: median ms per NFE (FAR: mean over chunks of the per-chunk medians) and per cache
step, NFE/s, achieved TFLOP/s (FLOP model of ``benchmarks.common``) and its fraction of the bf16 matmul
peak measured in the same run, peak memory (CUDA). Every variant gets the same warm-up call and the same
number of timed calls. Whole-video times are *measured* by ``python -m benchmarks levers`` (the real
sampler loops and pipeline calls), never computed here as steps x per-NFE. With ``--pipeline tiny|DIR``
the text encoding (``encode_prompt``) and the VAE decode of one video are timed separately.

Rows are saved as they are measured (``--out`` rewrites the JSON atomically, ``--jsonl`` appends a line);
a variant that raises costs its own row; a lost CUDA context ends the process with exit status 75 and
``--resume`` skips the variants already written to ``--jsonl``.

    python -m benchmarks nfe --model tiny --mode far --height 64 --width 64 --frames 21 --chunk-partition 1,2,2,1 --out /tmp/nfe
    python -m benchmarks nfe --model 1.3B --mode bidirectional --guidance --out benchmarks/results/h200

``--context-parallel N`` (under ``torchrun --nproc_per_node N``) times the plain diffusers transformer with
``anyflow.parallel.apply_context_parallel`` (Ulysses over N ranks; only the ``diffusers`` variant runs, the record
is named ``nfe_<model>_cpN_<mode>``); TFLOP/s and "of peak" are for the whole job (peak = N x the measured
one-device peak); rank 0 prints and writes. ``docs/context_parallel.md`` has the cost model to compare with::

    torchrun --nproc_per_node 2 -m benchmarks nfe --model tiny --mode far --height 64 --width 64 --frames 21 --chunk-partition 1,2,2,1 --context-parallel 2
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
from pathlib import Path

import torch

from anyflow.ops.sdpa import SDPA_POLICIES

from . import common

ANYFLOW_BACKENDS = ("torch", "triton", "cuda", "auto")
DIFFUSERS_ATTENTION = {"cudnn": "_native_cudnn", "flash": "flash", "xformers": "xformers"}


def default_variants() -> list[str]:
    names = ["diffusers", "diffusers:cudnn"]
    names += [f"diffusers:{k}" for k, mod in (("flash", "flash_attn"), ("xformers", "xformers"))
              if importlib.util.find_spec(mod) is not None]
    return names + ["anyflow:torch", "anyflow:torch+cudnn", "anyflow:triton", "anyflow:cuda", "anyflow:auto",
                     "anyflow:auto+tuned"]


def parse_variants(text: str) -> list[str]:
    """``"diffusers,torch,anyflow:triton"`` -> canonical names (a bare backend means ``anyflow:<backend>``)."""
    if text == "default":
        return default_variants()
    out = []
    for name in (t.strip() for t in text.split(",") if t.strip()):
        if name.partition("+")[0] in ANYFLOW_BACKENDS:
            name = f"anyflow:{name}"
        kind, _, sub = name.partition(":")
        backend, plus, policy = sub.partition("+")
        ok = (name == "diffusers" or (kind == "diffusers" and sub in DIFFUSERS_ATTENTION)
              or (kind == "anyflow" and backend in ANYFLOW_BACKENDS and (not plus or policy in SDPA_POLICIES)))
        if not ok:
            raise ValueError(f"--backends: unknown variant {name!r}; expected diffusers, diffusers:{{cudnn,flash,xformers}}, "
                             f"anyflow:{{torch,triton,cuda,auto}}[+{{{','.join(SDPA_POLICIES)}}}] or a bare backend name")
        out.append(name)
    return out


# ------------------------------------------------------------------------------------------------
# model
# ------------------------------------------------------------------------------------------------


def load_config(model: str, mode: str, chunk_partition) -> tuple[str, dict]:
    """(label, transformer config) for ``1.3B``/``14B``/``tiny`` or a JSON file (diffusers ``config.json``)."""
    far = {"chunk_partition": tuple(chunk_partition)} if mode == "far" else {}
    if model in common.CONFIGS:
        return model, dict(common.CONFIGS[model], **far)
    if model == "tiny":
        from anyflow.models.tiny import TINY_FAR_EXTRA, TINY_TRANSFORMER

        return "tiny", dict(TINY_TRANSFORMER, **(dict(TINY_FAR_EXTRA, **far) if mode == "far" else {}))
    path = Path(model)
    if not path.is_file():
        raise ValueError(f"--model must be 1.3B, 14B, tiny or a JSON config file, got {model!r}")
    cfg = {k: v for k, v in json.loads(path.read_text()).items() if not k.startswith("_")}
    if mode == "far":
        cfg.update(far)
    return path.stem, cfg


def _random_module(build, device, dtype):
    """``build()`` constructed directly on ``device`` in ``dtype`` (random init, no fp32 copy on the host)."""
    previous = torch.get_default_dtype()
    try:
        torch.set_default_dtype(dtype)
        with torch.device(device):
            module = build()
    finally:
        torch.set_default_dtype(previous)
    return module.to(device, dtype).eval().requires_grad_(False)


def build_transformer(cfg: dict, mode: str, dtype, device):
    """The diffusers AnyFlow transformer with random weights, created on ``device`` in ``dtype`` (so a 14B
    model never exists in fp32 on the device)."""
    from diffusers import AnyFlowFARTransformer3DModel, AnyFlowTransformer3DModel

    cls = AnyFlowFARTransformer3DModel if mode == "far" else AnyFlowTransformer3DModel
    torch.manual_seed(0)
    return _random_module(lambda: cls(**cfg), device, dtype)


# ------------------------------------------------------------------------------------------------
# workloads
# ------------------------------------------------------------------------------------------------


def far_plan(cfg, latent, chunk_partition, batch: int = 1) -> list[dict]:
    """The forwards of one FAR video: every chunk's inference NFE and every cache step.

    Each entry: ``name``, ``kind`` (``nfe`` / ``cache``), ``chunk``, ``q_tokens``, ``k_tokens`` and
    ``flops`` (performance.md 2.2: chunk k's query over [compressed | full | current]; the cache step
    after chunk j re-encodes the prefix, its last ``full_chunk_limit - 1`` chunks at full resolution, with
    chunk-causal attention, counting only the kept (q, k) pairs).
    """
    f, h, w = latent
    cp = list(chunk_partition)
    if sum(cp) != f:
        raise ValueError(f"--chunk-partition {cp} sums to {sum(cp)} latent frames, but the clip has {f}")
    pt, cpt, lim = cfg.patch_size, cfg.compressed_patch_size, cfg.full_chunk_limit
    tpf = (h // pt[1]) * (w // pt[2])
    ctpf = (h // cpt[1]) * (w // cpt[2])
    plan = []
    for k in range(len(cp)):
        nc = (k + 1) - min(k + 1, lim)
        lk = sum(cp[:nc]) * ctpf + sum(cp[nc : k + 1]) * tpf
        plan.append(dict(name=f"nfe[{k}]", kind="nfe", chunk=k, q_tokens=cp[k] * tpf, k_tokens=lk,
                         flops=common.model_flops(cfg, cp[k] * tpf, lk, batch=batch)))
    for j in range(len(cp) - 1):
        nfull = min(j + 1, lim - 1)
        sizes = [c * ctpf for c in cp[: j + 1 - nfull]] + [c * tpf for c in cp[j + 1 - nfull : j + 1]]
        pairs = sum(s * sum(sizes[: i + 1]) for i, s in enumerate(sizes))  # chunk-causal kept (q, k) pairs
        plan.append(dict(name=f"cache[{j}]", kind="cache", chunk=j, q_tokens=sum(sizes), k_tokens=sum(sizes),
                         flops=common.masked_flops(cfg, sum(sizes), pairs, batch=batch)))
    return plan


def workloads(model, mode: str, latent, chunk_partition, batch: int, device, dtype):
    """``[(name, kind, chunk, flops, call)]``: the forwards of one video, each callable on its own."""
    cfg = model.config
    f, h, w = latent
    pt = cfg.patch_size
    tpf = (h // pt[1]) * (w // pt[2])
    gen = torch.Generator(device="cpu").manual_seed(0)
    text = torch.randn(batch, common.TEXT_TOKENS, cfg.text_dim, generator=gen).to(device, dtype)

    if mode == "bidirectional":
        x = torch.randn(batch, f, cfg.in_channels, h, w, generator=gen).to(device, dtype)
        t = torch.full((batch, f), 937.5, device=device)
        r = torch.full((batch, f), 833.3, device=device)
        return [("nfe", "nfe", None, common.model_flops(cfg, f * tpf, f * tpf, batch=batch),
                 lambda: model(x, t, r, text))]

    cp = list(chunk_partition)
    plan = far_plan(cfg, latent, cp, batch)
    cpt = cfg.compressed_patch_size
    ctpf = (h // cpt[1]) * (w // cpt[2])
    lim = cfg.full_chunk_limit
    heads, hd = cfg.num_attention_heads, cfg.attention_head_dim
    latents = torch.randn(batch, f, cfg.in_channels, h, w, generator=gen).to(device, dtype)
    cache = [  # random contents: timing must not see zeros; cache steps overwrite them anyway
        {
            "full_cache": torch.randn(2, batch, heads, lim * max(cp) * tpf, hd, generator=gen).to(device, dtype),
            "compressed_cache": torch.randn(2, batch, heads, (len(cp) - lim + 1) * max(cp) * ctpf, hd,
                                            generator=gen).to(device, dtype),
        }
        for _ in range(cfg.num_layers)
    ]
    out = []
    for p in plan:
        k = p["chunk"]
        if p["kind"] == "nfe":
            cur = latents[:, sum(cp[:k]) : sum(cp[: k + 1])]
            t = torch.full((batch, cp[k]), 937.5, device=device)
            r = torch.full((batch, cp[k]), 833.3, device=device)
            call = _far_call(model, cur, t, r, text, cp[: k + 1], cache, k, False)
        else:
            n = sum(cp[: k + 1])
            z = torch.zeros(batch, n, device=device)
            call = _far_call(model, latents[:, :n], z, z, text, cp[: k + 1], cache, k, True)
        out.append((p["name"], p["kind"], k, p["flops"], call))
    return out


def _far_call(model, x, t, r, text, cp, cache, k, is_cache_step):
    def call():
        return model(x, t, r, text, chunk_partition=cp, kv_cache=cache,
                     kv_cache_flag={"num_cached_chunks": k, "is_cache_step": is_cache_step})

    return call


# ------------------------------------------------------------------------------------------------
# variants
# ------------------------------------------------------------------------------------------------


class Skip(Exception):
    """A variant that cannot run here; the message is recorded as the reason."""


@contextlib.contextmanager
def applied(model, variant: str, device):
    """Apply ``variant`` to ``model`` for the duration of the block, then restore it."""
    kind, _, sub = variant.partition(":")
    if kind == "diffusers":
        if not sub:
            yield
            return
        if sub == "cudnn" and device.type != "cuda":
            raise Skip("cuDNN attention needs CUDA")
        from diffusers.models.attention_dispatch import _AttentionBackendRegistry

        # set_attention_backend also changes a global default and reset_attention_backend sets every
        # processor to None (FAR's causal processor needs "flex"): save and restore both exactly
        procs = [m.processor for m in model.modules() if hasattr(getattr(m, "processor", None), "_attention_backend")]
        saved = [p._attention_backend for p in procs]
        active = _AttentionBackendRegistry._active_backend
        try:
            try:
                model.set_attention_backend(DIFFUSERS_ATTENTION[sub])
            except Exception as exc:  # noqa: BLE001 - diffusers raises several types for missing backends
                raise Skip(f"set_attention_backend({DIFFUSERS_ATTENTION[sub]!r}): {type(exc).__name__}: {exc}") from exc
            for p, b in zip(procs, saved):
                if hasattr(p, "_SUPPORTED_BACKENDS"):  # FAR self-attention accepts flex only: keep it, switch the rest
                    p._attention_backend = b
            yield
        finally:
            for p, b in zip(procs, saved):
                p._attention_backend = b
            _AttentionBackendRegistry._active_backend = active
        return
    import anyflow
    from anyflow.ops import registry

    backend, _, policy = sub.partition("+")
    if backend not in ("auto", "torch"):
        reason = registry.backend_reason(backend)
        if reason:
            raise Skip(reason)
    if policy in ("cudnn", "efficient") and device.type != "cuda":
        raise Skip(f"the {policy} SDPA kernel needs CUDA (elsewhere the policy falls back to torch's choice)")
    with anyflow.enable(model, backend=backend, attention=policy or None):
        yield


def time_variant(model, variant: str, loads, device, iters: int, peak_tflops: float) -> dict:
    row = {"variant": variant, "status": "ok", "reason": None, "workloads": []}
    common.reset_peak_memory(device)
    try:
        with applied(model, variant, device):
            for name, kind, chunk, flops, call in loads:
                ms = common.median_ms(call, device, iters=iters, warmup=1)
                row["workloads"].append({
                    "name": name, "kind": kind, "chunk": chunk, "ms": ms, "tflop": flops / 1e12,
                    "tflops": flops / ms / 1e9, "of_peak": flops / ms / 1e9 / peak_tflops,
                })
    except Skip as exc:
        row.update(status="skipped", reason=str(exc)[:300], workloads=[])
        return row
    except Exception as exc:  # noqa: BLE001 - one failing variant must not stop the others
        row.update(status="failed", reason=common.failure_reason(exc), workloads=[])
        return row
    row["peak_mem_gib"] = common.peak_memory_gib(device)
    nfes = [w for w in row["workloads"] if w["kind"] == "nfe"]
    caches = [w for w in row["workloads"] if w["kind"] == "cache"]
    ms = sum(w["ms"] for w in nfes) / len(nfes)
    flops = sum(w["tflop"] for w in nfes) / len(nfes) * 1e12
    row["per_nfe"] = {"median_ms": ms, "nfe_per_s": 1e3 / ms, "tflops": flops / ms / 1e9,
                      "of_peak": flops / ms / 1e9 / peak_tflops}
    if caches:
        row["per_cache_step_ms"] = sum(w["ms"] for w in caches) / len(caches)
    return row


def ratios(rows: list[dict], baselines=("diffusers", "diffusers:cudnn")) -> dict:
    """Per-NFE speed-ups of every variant over each baseline run in the same process."""
    ok = {r["variant"]: r for r in rows if r["status"] == "ok"}
    out = {}
    for base in baselines:
        if base not in ok:
            continue
        b = ok[base]
        for name, r in ok.items():
            if name != base:
                out[f"{name} vs {base}"] = {"per_nfe": b["per_nfe"]["median_ms"] / r["per_nfe"]["median_ms"]}
    return out


# ------------------------------------------------------------------------------------------------
# pipeline parts: text encoding and VAE decode
# ------------------------------------------------------------------------------------------------


#: UMT5-XXL, the text encoder of Wan2.1 (its diffusers folder's ``text_encoder/config.json``).
WAN_TEXT_ENCODER = dict(vocab_size=256384, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
                        feed_forward_proj="gated-gelu", relative_attention_num_buckets=32,
                        relative_attention_max_distance=128, tie_word_embeddings=False)
#: The Wan2.1 VAE is ``AutoencoderKLWan()`` with diffusers' defaults; overrides for tests only.
WAN_VAE: dict = {}


def _wan_parts(dtype, device, latent, guidance: bool, iters: int) -> dict:
    """Text encoding and VAE decode at Wan2.1's real sizes with random weights (UMT5-XXL on 512 tokens in the
    benchmark dtype; the Wan VAE in fp32, as Wan's pipelines run it)."""
    from diffusers import AutoencoderKLWan
    from transformers import UMT5Config, UMT5EncoderModel

    batch = 2 if guidance else 1
    gen = torch.Generator(device="cpu").manual_seed(0)
    out = {"pipeline": "wan (random weights)"}
    encoder = _random_module(lambda: UMT5EncoderModel(UMT5Config(**WAN_TEXT_ENCODER)), device, dtype)
    ids = torch.randint(0, WAN_TEXT_ENCODER["vocab_size"], (batch, common.TEXT_TOKENS), generator=gen).to(device)
    mask = torch.ones_like(ids)
    out["text_encode_ms"] = common.median_ms(lambda: encoder(ids, attention_mask=mask), device, iters=iters)
    out["text_encoder_params_b"] = sum(p.numel() for p in encoder.parameters()) / 1e9
    encoder = None  # free its memory before the VAE
    common.reset_peak_memory(device)
    vae = _random_module(lambda: AutoencoderKLWan(**WAN_VAE), device, torch.float32)
    z = torch.randn(1, vae.config.z_dim, *latent, generator=gen).to(device)
    out["vae_decode_ms"] = common.median_ms(lambda: vae.decode(z, return_dict=False), device, iters=max(1, iters // 2))
    out["vae_latent"] = list(z.shape)
    out["vae_peak_mem_gib"] = common.peak_memory_gib(device)
    return out


def time_pipeline_parts(spec: str, mode: str, dtype, device, frames: int, height: int, width: int,
                        guidance: bool, iters: int) -> dict:
    """Text encoding and one VAE decode, timed apart from the DiT: ``spec`` is ``"wan"`` (Wan2.1's UMT5-XXL and
    VAE with random weights, built here), ``"tiny"`` or a pipeline folder."""
    if spec == "wan":
        return _wan_parts(dtype, device, ((frames - 1) // 4 + 1, height // 8, width // 8), guidance, iters)
    if spec == "tiny":
        from anyflow.models.tiny import tiny_pipeline

        pipe = tiny_pipeline("far" if mode == "far" else "bidirectional", dtype=dtype).to(device)
    else:
        from anyflow.models.loading import load_pipeline

        pipe = load_pipeline(spec, dtype=dtype, device=device)
    st, ss = pipe.vae_scale_factor_temporal, pipe.vae_scale_factor_spatial
    z = torch.randn(1, pipe.vae.config.z_dim, (frames - 1) // st + 1, height // ss, width // ss,
                    generator=torch.Generator().manual_seed(0)).to(device, pipe.vae.dtype)
    prompt = "a red panda eating bamboo in a misty forest"
    with torch.no_grad():
        text_ms = common.median_ms(lambda: pipe.encode_prompt(prompt, do_classifier_free_guidance=guidance,
                                                              device=device), device, iters=iters)
        vae_ms = common.median_ms(lambda: pipe.vae.decode(z, return_dict=False), device, iters=max(1, iters // 2))
    return {"pipeline": spec, "text_encode_ms": text_ms, "vae_decode_ms": vae_ms, "vae_latent": list(z.shape)}


# ------------------------------------------------------------------------------------------------
# entry point
# ------------------------------------------------------------------------------------------------


def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--model", default="1.3B", help="1.3B, 14B, tiny, or a JSON transformer config (default 1.3B)")
    ap.add_argument("--mode", choices=["bidirectional", "far"], default="bidirectional")
    ap.add_argument("--height", type=int, default=480)
    ap.add_argument("--width", type=int, default=832)
    ap.add_argument("--frames", type=int, default=81, help="pixel frames, 4k+1 (latent = (frames - 1) / 4 + 1)")
    ap.add_argument("--chunk-partition", default=None, help="FAR latent frames per chunk (default 1,3,3,3,3,3,3,2)")
    ap.add_argument("--guidance", action="store_true", help="CFG on: conditional + unconditional in one batch-2 forward")
    ap.add_argument("--backends", default="default",
                    help="comma list of variants (diffusers, diffusers:cudnn|flash|xformers, anyflow:torch|triton|cuda|auto[+POLICY], "
                    "POLICY an SDPA policy (cudnn, tuned, ...); a bare backend name means anyflow:<name>); "
                    "'default' = all that may apply")
    ap.add_argument("--dtype", choices=["bfloat16", "float32"], default=None, help="default bf16 on CUDA, fp32 on CPU")
    ap.add_argument("--device", default=None)
    ap.add_argument("--iters", type=int, default=5, help="timed repetitions per forward (median)")
    ap.add_argument("--pipeline", default=None, help="also time text encoding + VAE decode: 'wan' (Wan2.1's UMT5-XXL "
                    "and VAE, random weights), 'tiny' or a pipeline folder")
    ap.add_argument("--context-parallel", type=int, default=1, metavar="N",
                    help="Ulysses context parallelism over N ranks (run under torchrun --nproc_per_node N); "
                         "times the plain diffusers transformer only")
    ap.add_argument("--out", default=None, help="folder for nfe_<model>_<mode>[_cfg].json and .md (default: print only)")
    ap.add_argument("--jsonl", default=None, help="also append every row to this JSON-lines file as it is measured")
    ap.add_argument("--resume", action="store_true", help="skip the variants an earlier run of the same configuration "
                    "already wrote to --jsonl")


@torch.no_grad()
def _init_context_parallel(n: int) -> int:
    """``torch.distributed`` for ``--context-parallel n`` (nccl on CUDA, gloo on CPU); returns the rank."""
    import os

    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) != n:
        raise SystemExit(f"--context-parallel {n} needs torchrun --nproc_per_node {n} "
                         f"(WORLD_SIZE is {os.environ.get('WORLD_SIZE', 'unset')})")
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return dist.get_rank()


def run(args, command: str) -> dict:
    cp_n = getattr(args, "context_parallel", 1)
    if cp_n > 1 and _init_context_parallel(cp_n) != 0:
        args.out = args.jsonl = None  # rank 0 alone writes
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    if args.frames < 1 or (args.frames - 1) % 4:
        raise ValueError(f"--frames must be 4k+1, got {args.frames}")
    if args.height % 16 or args.width % 16:
        raise ValueError(f"--height and --width must be multiples of 16, got {args.height}x{args.width}")
    f = (args.frames - 1) // 4 + 1
    cp = [int(c) for c in args.chunk_partition.split(",")] if args.chunk_partition else list(common.CHUNK_PARTITION)
    label, cfg = load_config(args.model, args.mode, cp)
    variants = parse_variants(args.backends)
    meta = common.run_meta(device, command)
    pk = common.peaks(device)
    model = build_transformer(cfg, args.mode, dtype, device)
    if cp_n > 1:
        from diffusers import ContextParallelConfig

        from anyflow.parallel import apply_context_parallel

        apply_context_parallel(model, ContextParallelConfig(ulysses_degree=cp_n))
        variants, label = ["diffusers"], f"{label}_cp{cp_n}"
        pk = dict(pk, bf16_matmul_tflops=cp_n * pk["bf16_matmul_tflops"])
    batch = 2 if args.guidance else 1
    loads = workloads(model, args.mode, (f, args.height // 8, args.width // 8), cp, batch, device, dtype)
    data = {
        "kind": "nfe", "meta": meta, "peaks": pk,
        "config": {"model": label, "mode": args.mode, "dtype": str(dtype).replace("torch.", ""), "batch": batch,
                   "guidance": args.guidance, "height": args.height, "width": args.width, "frames": args.frames,
                   "latent": [f, args.height // 8, args.width // 8],
                   "chunk_partition": cp if args.mode == "far" else None,
                   "params_b": sum(p.numel() for p in model.parameters()) / 1e9, "iters": args.iters,
                   "context_parallel": cp_n},
        "notes": "one warm-up and the same timed calls per variant; FAR per-NFE = mean over chunks of per-chunk "
                 "medians; FAR cache steps are transformer-level re-encodes of the prefix (anyflow's sampler "
                 "appends instead); whole-video times: the levers benchmark",
        "variants": [], "ratios": {},
    }
    name = f"nfe_{label}_{args.mode}{'_cfg' if args.guidance else ''}"

    def save(d):  # after every variant: a run stopped by a time limit keeps what it measured
        if args.out:
            common.write_json(Path(args.out) / f"{name}.json", d)
            (Path(args.out) / f"{name}.md").write_text(markdown(d))

    rec = common.Record(data, key=f"{name}:{data['config']['dtype']}:{args.height}x{args.width}x{args.frames}",
                        jsonl=args.jsonl, save=save)
    done = rec.done("variants", "variant") if args.resume else set()
    for v in variants:
        if v in done:
            continue
        rec.add("variants", time_variant(model, v, loads, device, args.iters, pk["bf16_matmul_tflops"]))
        rec.set("ratios", ratios(rec.data["variants"]))
        common.stop_if_lost(device, f"nfe (after {v})")
    del model, loads
    if args.pipeline:
        try:
            parts = time_pipeline_parts(args.pipeline, args.mode, dtype, device, args.frames,
                                        args.height, args.width, args.guidance, args.iters)
        except Exception as exc:  # noqa: BLE001 - recorded, the DiT numbers still stand
            parts = {"pipeline": args.pipeline, "error": common.failure_reason(exc)}
        rec.set("pipeline", parts)
    if _is_rank0():
        print(markdown(rec.data))
    return rec.data


def _is_rank0() -> bool:
    import torch.distributed as dist

    return not dist.is_initialized() or dist.get_rank() == 0


def markdown(rec: dict) -> str:
    c, m, pk = rec["config"], rec["meta"], rec["peaks"]
    lines = [
        f"# {c['model']} {c['mode']} {c['dtype']} {c['width']}x{c['height']}x{c['frames']}"
        f"{' CFG' if c['guidance'] else ''} on {m['device']} ({m['date']})", "",
        f"{common.provenance(m)}; peak {pk['bf16_matmul_tflops']:.1f} TFLOP/s bf16 matmul (measured). {rec['notes']}.", "",
        "| variant | ms/NFE | NFE/s | TFLOP/s | of peak | ms/cache step | peak GiB | status |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rec["variants"]:
        if r["status"] != "ok":
            lines.append(f"| {r['variant']} | | | | | | | {r['status']}: {r['reason']} |")
            continue
        p = r["per_nfe"]
        mem = f"{r['peak_mem_gib']:.1f}" if r.get("peak_mem_gib") is not None else "-"
        cache = f"{r['per_cache_step_ms']:.2f}" if "per_cache_step_ms" in r else "-"
        lines.append(f"| {r['variant']} | {p['median_ms']:.2f} | {p['nfe_per_s']:.2f} | {p['tflops']:.3g} | "
                     f"{100 * p['of_peak']:.1f}% | {cache} | {mem} | ok |")
    if rec["ratios"]:
        lines += ["", "| pair | per NFE |", "|---|---|"]
        lines += [f"| {k} | {v['per_nfe']:.2f}x |" for k, v in rec["ratios"].items()]
    p = rec.get("pipeline")
    if p:
        lines += ["", f"Pipeline `{p['pipeline']}`: " + (f"error {p['error']}" if "error" in p else
                  f"text encoding {p['text_encode_ms']:.1f} ms, VAE decode {p['vae_decode_ms']:.1f} ms (latent {p['vae_latent']})")]
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(prog="python -m benchmarks nfe", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(ap)
    args = ap.parse_args(argv)
    return run(args, common.command_line("python -m benchmarks nfe", argv))

