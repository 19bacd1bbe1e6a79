"""Command line: ``anyflow`` / ``python -m anyflow`` with ``generate``, ``env``, ``make-tiny`` and ``bench``.

Examples::

    anyflow make-tiny tiny-anyflow-far
    anyflow generate --model tiny-anyflow-far --prompt "a red panda eating bamboo" --steps 4 \\
        --height 64 --width 64 --out out.mp4
    anyflow generate --model ckpt/AnyFlow-FAR-Wan2.1-1.3B --prompt "..." --steps 4 \\
        --image first_frame.jpg --out i2v.mp4
    anyflow env

``generate --context-parallel N`` under ``torchrun --nproc_per_node N -m anyflow generate ...`` splits every
transformer forward across the N processes (Ulysses sequence parallelism, :mod:`anyflow.parallel`) and gives
the output of one process; every process runs the pipeline call (text encoding and VAE decode included), rank 0
alone shows progress, prints and writes ``--out``.

``generate`` without ``--model`` uses the shipped default model (:mod:`anyflow.default_model`) with its size and
sampling defaults; ``--grid 1,2,4,8,16`` samples each step count from the same noise into one video or PNG strip.

``generate`` ends with ``done: N NFE (+C cache steps), X s/NFE, total Y s -> OUT``: N counts the
denoising transformer forwards (one per step, per chunk for FAR; a CFG batch counts once), C the FAR
KV-cache steps, X the sampler's denoising-loop time (cache steps included) divided by N, Y the
pipeline call (text encoding, denoising, VAE decode; not model loading or writing the file). N, C and
X are measured by the engine (``pipe.anyflow_stats``).

Bad arguments and unusable inputs print ``error: ...`` on stderr and exit with status 2 (no
traceback); an interrupted run exits with 130 and leaves no partial output file.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
from pathlib import Path

__all__ = ["main", "build_parser", "UsageError"]

#: Number of conditioning frames read from ``--video`` by default (the official V2V setting).
DEFAULT_CONTEXT_FRAMES = 25


class UsageError(Exception):
    """A user-facing problem with the arguments or inputs; reported as ``error: ...``, exit status 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse's own errors follow the same ``error: ...`` / exit 2 rule
        self.print_usage(sys.stderr)
        self.exit(2, f"error: {message}\n")


def _chunk_partition(text: str) -> list[int]:
    try:
        parts = [int(p) for p in text.replace(" ", "").split(",") if p]
    except ValueError:
        parts = []
    if not parts or any(p < 1 for p in parts):
        raise argparse.ArgumentTypeError(f"expected comma-separated positive integers like 1,2,3, got {text!r}")
    return parts


def build_parser() -> argparse.ArgumentParser:
    """The ``anyflow`` argument parser (exposed for documentation and tests)."""
    from . import __version__

    parser = _Parser(prog="anyflow", description="Fast AnyFlow any-step video generation (diffusers pipelines).")
    parser.add_argument("--version", action="version", version=f"anyflow {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    gen = sub.add_parser("generate", help="generate a video (T2V, or I2V with --image, V2V with --video)")
    gen.add_argument("--model", default=None, help="diffusers-format AnyFlow folder (upstream or legacy layout); "
                     "default: the shipped anyflow-far-mini model, with its size and sampling defaults")
    gen.add_argument("--prompt", required=True, help="text prompt")
    gen.add_argument("--negative-prompt", default=None, help="negative prompt (used only with --guidance-scale > 1)")
    steps = gen.add_mutually_exclusive_group()
    steps.add_argument("--steps", type=int, default=None,
                       help="flow-map steps (per chunk for FAR models), >= 1 (default: the model's, else 4)")
    steps.add_argument("--grid", type=_chunk_partition, default=None,
                       help="step counts, e.g. 1,2,4,8,16: sample each from the same noise and write them side by "
                       "side (a video), or as a frame strip with one row per step count (--out .png)")
    cond = gen.add_mutually_exclusive_group()
    cond.add_argument("--image", default=None, help="first frame for image-to-video")
    cond.add_argument("--video", default=None, help="conditioning clip for video-to-video")
    gen.add_argument("--context-frames", type=int, default=None,
                     help=f"frames read from --video, snapped down to 4k+1 (default {DEFAULT_CONTEXT_FRAMES}, "
                     "reduced when needed so that at least one chunk / latent frame is generated)")
    gen.add_argument("--height", type=int, default=None, help="multiple of 16 (default: the model's, else 480)")
    gen.add_argument("--width", type=int, default=None, help="multiple of 16 (default: the model's, else 832)")
    gen.add_argument("--num-frames", type=int, default=None,
                     help="4k+1 pixel frames; default: what the FAR chunk partition covers, else 81")
    gen.add_argument("--chunk-partition", type=_chunk_partition, default=None,
                     help="FAR only: latent frames per chunk, e.g. 1,2,3 (default: the model config's)")
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--guidance-scale", type=float, default=1.0, help="CFG scale (released models: 1.0)")
    gen.add_argument("--dtype", choices=("float32", "bfloat16"), default=None,
                     help="default: bfloat16 on CUDA, float32 on CPU")
    gen.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    gen.add_argument("--threads", type=int, default=None,
                     help="CPU intra-op threads (default: the idle cores by the 1-minute load average, >= 1; "
                     "threads beyond the idle cores make PyTorch's CPU kernels wait on each other)")
    gen.add_argument("--backend", choices=("auto", "torch", "triton", "cuda"), default="auto",
                     help="anyflow kernel backend (default auto)")
    gen.add_argument("--attention", choices=("default", "math", "flash", "efficient", "cudnn", "tuned"), default=None,
                     help="SDPA kernel policy of the dense attentions (default: ANYFLOW_SDPA, else torch's choice); "
                     "'tuned' times the kernels once per shape and keeps the fastest")
    gen.add_argument("--cuda-graphs", action="store_true",
                     help="replay the per-step forward from a CUDA graph (CUDA only; eager elsewhere)")
    gen.add_argument("--context-parallel", type=int, default=1, metavar="N",
                     help="split each transformer forward across N processes (Ulysses; N must divide the attention "
                     "heads); launch as torchrun --nproc_per_node N -m anyflow generate --context-parallel N ... "
                     "(gloo on CPU, NCCL on CUDA with cuda:LOCAL_RANK); rank 0 writes --out (default 1)")
    gen.add_argument("--fps", type=float, default=None, help="output frame rate (default: the model's, else 16)")
    gen.add_argument("--out", required=True, help="output video (.mp4, .mkv, .mov, .avi, .webm); with --grid also "
                     "an image (.png, .jpg)")

    sub.add_parser("env", help="print the environment and backend report")

    bench = sub.add_parser("bench", add_help=False,
                           help="benchmarks (source checkout): nfe, kernels, report; `anyflow bench --help` lists them")
    bench.add_argument("bench_args", nargs=argparse.REMAINDER)

    tiny = sub.add_parser("make-tiny", help="write a tiny random AnyFlow checkpoint (for demos and tests)")
    tiny.add_argument("dir", help="output folder")
    tiny.add_argument("--kind", choices=("far", "bidirectional"), default="far")
    tiny.add_argument("--layout", choices=("upstream", "legacy"), default="upstream")
    tiny.add_argument("--seed", type=int, default=0)
    tiny.add_argument("--force", action="store_true", help="write into a non-empty folder")

    train = sub.add_parser("train", help="train / distil from a YAML config (resumes from its output folder); "
                           "under torchrun (e.g. torchrun --nproc_per_node 8 -m anyflow train CONFIG) FSDP2 data "
                           "parallel with batch_size per process")
    train.add_argument("config", help="YAML config (`preset: NAME` plus overrides) or a preset name")
    train.add_argument("--output-dir", default=None, help="run folder (default: the config's output_dir, "
                       "else runs/<name>)")
    train.add_argument("--data", default="synthetic", help="'synthetic' or a .pt file with latents, text, negative")
    train.add_argument("--steps", type=int, default=None, help="steps to run now (default: up to total_iter)")
    train.add_argument("--no-resume", action="store_true", help="start fresh even if the folder has checkpoints")
    return parser


# ------------------------------------------------------------------------------------------------
# generate
# ------------------------------------------------------------------------------------------------


def _resolve_model(args) -> None:
    """Fill ``args.model`` (default model) and the size / sampling options the user left unset."""
    from .default_model import default_model_path, model_defaults

    if args.model is None:
        try:
            args.model = str(default_model_path())
        except (FileNotFoundError, ImportError) as exc:
            raise UsageError(f"no --model given and the default model is unavailable: {exc}") from exc
    elif not Path(args.model).expanduser().is_dir():
        raise UsageError(f"--model {args.model}: no such folder")
    d = model_defaults(Path(args.model).expanduser())
    for name, key, fallback in (("height", "height", 480), ("width", "width", 832), ("fps", "fps", 16.0),
                                ("steps", "num_inference_steps", 4)):
        if getattr(args, name) is None:
            setattr(args, name, d.get(key, fallback))
    if args.num_frames is None and "num_frames" in d and args.chunk_partition is None:
        args.num_frames = d["num_frames"]


def _validate_generate(args) -> None:
    """Cheap checks done before any model is loaded."""
    from .io import IMAGE_SUFFIXES, VIDEO_SUFFIXES

    if args.steps < 1:
        raise UsageError(f"--steps must be >= 1, got {args.steps}")
    if not args.prompt.strip():
        raise UsageError("--prompt must not be empty")
    for name in ("height", "width"):
        value = getattr(args, name)
        if value < 16 or value % 16:
            raise UsageError(f"--{name} must be a positive multiple of 16, got {value}")
    if args.num_frames is not None and (args.num_frames < 1 or (args.num_frames - 1) % 4):
        raise UsageError(f"--num-frames must be 4k+1 (1, 5, 9, ..., 81), got {args.num_frames}")
    if args.context_frames is not None and args.context_frames < 1:
        raise UsageError(f"--context-frames must be >= 1, got {args.context_frames}")
    if not args.fps > 0:
        raise UsageError(f"--fps must be > 0, got {args.fps}")
    if args.guidance_scale < 0:
        raise UsageError(f"--guidance-scale must be >= 0, got {args.guidance_scale}")
    if args.context_parallel < 1:
        raise UsageError(f"--context-parallel must be >= 1, got {args.context_parallel}")
    for name in ("image", "video"):
        value = getattr(args, name)
        if value is not None and not Path(value).expanduser().is_file():
            raise UsageError(f"--{name} {value}: no such file")
    out = Path(args.out).expanduser()
    allowed = VIDEO_SUFFIXES + (IMAGE_SUFFIXES if args.grid else ())
    if out.suffix.lower() not in allowed:
        raise UsageError(f"--out {args.out}: the suffix must be one of {', '.join(allowed)}"
                         + ("" if args.grid else " (images only with --grid)"))
    if not out.parent.is_dir():
        raise UsageError(f"--out {args.out}: the directory {out.parent} does not exist")


def _frames_plan(args, pipe, is_far: bool) -> tuple[int, list[int] | None]:
    """Resolve ``num_frames`` and the FAR chunk partition; check they agree."""
    temporal = int(getattr(pipe, "vae_scale_factor_temporal", 4))
    if not is_far:
        if args.chunk_partition is not None:
            raise UsageError("--chunk-partition applies to FAR (causal) models only; this model is bidirectional")
        return (args.num_frames or 81), None
    cp = list(args.chunk_partition or pipe.transformer.config.chunk_partition)
    covered = (sum(cp) - 1) * temporal + 1
    num_frames = args.num_frames or covered
    latent_frames = (num_frames - 1) // temporal + 1
    if sum(cp) != latent_frames:
        source = "--chunk-partition" if args.chunk_partition else "the model's chunk_partition"
        raise UsageError(
            f"{source} {','.join(map(str, cp))} covers {sum(cp)} latent frames = {covered} pixel frames, but "
            f"--num-frames {num_frames} needs {latent_frames} latent frames; pass --num-frames {covered} or a "
            f"--chunk-partition that sums to {latent_frames}"
        )
    return num_frames, cp


def _context_frame_budget(args, num_frames: int, cp: list[int] | None, temporal: int) -> int:
    """Pixel frames to read from ``--video``: the request, checked (or, by default, reduced) to leave work."""
    if cp is None:  # bidirectional: at least one latent frame must remain to be generated
        allowed = (num_frames - 1) // temporal * temporal - temporal + 1
    else:  # FAR: the context must leave at least the last chunk to be generated
        allowed = (sum(cp[:-1]) - 1) * temporal + 1
    if args.context_frames is None:
        budget = min(DEFAULT_CONTEXT_FRAMES, num_frames, allowed)
    else:
        budget = min(args.context_frames, num_frames)
        if budget > allowed:
            raise UsageError(
                f"--context-frames {args.context_frames} leaves nothing to generate in {num_frames} frames"
                + (f" with chunk partition {','.join(map(str, cp))}" if cp else "")
                + f"; use at most {max(allowed, 0)}"
            )
    if budget < 1:
        raise UsageError(
            f"--video needs at least one chunk of context and one to generate; {num_frames} frames are too few"
        )
    return budget


def _generate(args) -> int:
    """The generate command; the CPU thread count it sets is restored on return (``main`` may run in a caller's process)."""
    import torch

    threads = torch.get_num_threads()
    try:
        _resolve_model(args)
        _validate_generate(args)
        device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        try:
            device = torch.device(device)
        except RuntimeError as exc:
            raise UsageError(f"--device {args.device}: {exc}") from exc
        if device.type == "cuda" and not torch.cuda.is_available():
            raise UsageError(f"--device {args.device}: CUDA is not available on this machine")
        default_dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        dtype = getattr(torch, args.dtype) if args.dtype else default_dtype
        if device.type == "cpu":
            torch.set_num_threads(_cpu_threads(args.threads))
        with _process_group(args.context_parallel, device) as (rank, device, parallel):
            return _sample(args, device, dtype, rank, parallel)
    finally:
        torch.set_num_threads(threads)


#: Environment variables that torchrun sets in every process it starts (``--context-parallel`` needs them).
_TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR")


@contextlib.contextmanager
def _process_group(n: int, device):
    """The process group of ``--context-parallel n``: yields ``(rank, device, config)``.

    ``n == 1``: ``(0, device, None)``, nothing initialised. ``n > 1``: checks that this process is one of ``n``
    started by torchrun, then initialises the default process group from the environment (gloo for a CPU
    ``device``; NCCL for CUDA, each process on ``cuda:LOCAL_RANK``) and yields ``(rank, device of this process,
    diffusers.ContextParallelConfig(ulysses_degree=n))``; the group is destroyed on exit, also on error (one
    initialised before the call is left alone).

    Raises:
        UsageError: not under torchrun, ``WORLD_SIZE != n`` (also ``n == 1`` under a multi-process launch, whose
            processes would all write ``--out``), a CUDA index in ``--device``, fewer GPUs than processes on
            this node; all raised before any collective, identically on every process of a launch.
    """
    from .training.distributed import destroy, init_from_env, world_size_from_env

    launch = f"torchrun --nproc_per_node {n} -m anyflow generate --context-parallel {n} ..."
    try:
        world = world_size_from_env()
    except ValueError as exc:
        raise UsageError(f"--context-parallel {n}: {exc}") from exc
    if n == 1:
        if world > 1:
            raise UsageError(f"this is one of WORLD_SIZE={world} processes but --context-parallel is 1: pass "
                             f"--context-parallel {world} to split the model across them, or run one process")
        yield 0, device, None
        return
    missing = [name for name in _TORCHRUN_ENV if name not in os.environ]
    if missing:
        raise UsageError(f"--context-parallel {n} needs {n} processes started by torchrun ({', '.join(missing)} "
                         f"unset): launch {launch}")
    if world != n:
        raise UsageError(f"--context-parallel {n} must equal the number of processes, WORLD_SIZE={world}: launch "
                         f"{launch} or pass --context-parallel {world}")
    if device.type == "cuda":
        import torch

        if device.index is not None:
            raise UsageError(f"--device {device}: with --context-parallel each process uses cuda:LOCAL_RANK; "
                             "pass --device cuda")
        local = os.environ.get("LOCAL_WORLD_SIZE", "1")
        if local.isdigit() and int(local) > torch.cuda.device_count():
            raise UsageError(f"--context-parallel {n}: {local} processes on this node but "
                             f"{torch.cuda.device_count()} CUDA devices; launch at most one process per GPU")
    import torch.distributed as dist
    from diffusers import ContextParallelConfig

    owned = not (dist.is_available() and dist.is_initialized())
    try:
        ctx = init_from_env("nccl" if device.type == "cuda" else "gloo")
    except (RuntimeError, ValueError) as exc:
        raise UsageError(f"--context-parallel {n}: {exc}") from exc
    try:
        yield ctx.rank, ctx.device, ContextParallelConfig(ulysses_degree=n)
    finally:
        if owned:
            destroy()


def _sample(args, device, dtype, rank: int, parallel) -> int:
    """Load, enable and run the pipeline; rank 0 alone shows progress, prints and writes ``--out``."""
    import torch

    import anyflow

    from .io import IMAGE_SUFFIXES, frame_strip, read_image, read_video, side_by_side, write_image_atomic, write_video_atomic
    from .models.loading import load_pipeline

    if rank != 0:  # the other ranks of a launch stay silent: no loading bars, no library warnings
        from diffusers.utils import logging as diffusers_logging
        from transformers.utils import logging as transformers_logging

        for lib in (diffusers_logging, transformers_logging):
            lib.disable_progress_bar()
            lib.set_verbosity_error()
    try:
        pipe = load_pipeline(args.model, dtype=dtype, device=device)
    except (FileNotFoundError, ValueError) as exc:
        raise UsageError(str(exc)) from exc
    if rank != 0:
        pipe.set_progress_bar_config(disable=True)
    from diffusers import AnyFlowFARPipeline

    is_far = isinstance(pipe, AnyFlowFARPipeline)
    num_frames, cp = _frames_plan(args, pipe, is_far)

    context = None
    try:
        if args.image is not None:
            context = read_image(args.image, args.height, args.width)
        elif args.video is not None:
            budget = _context_frame_budget(args, num_frames, cp, int(getattr(pipe, "vae_scale_factor_temporal", 4)))
            context = read_video(args.video, args.height, args.width, num_frames=budget)
    except (FileNotFoundError, ValueError) as exc:
        raise UsageError(str(exc)) from exc

    if parallel is not None:  # heads not divisible by N etc.: raised on every rank, before any collective
        from .parallel import check_context_parallel

        try:
            check_context_parallel(pipe.transformer, parallel)
        except (TypeError, ValueError, RuntimeError) as exc:
            raise UsageError(f"--context-parallel {args.context_parallel}: {exc}") from exc
    try:
        handle = anyflow.enable(pipe, backend=args.backend, attention=args.attention, cuda_graphs=args.cuda_graphs,
                                context_parallel=parallel)
    except ImportError as exc:
        print(f"error: anyflow.enable is unavailable ({type(exc).__name__}: {exc})", file=sys.stderr)
        return 1
    except (ValueError, RuntimeError) as exc:  # unknown backend name, or one that cannot run here
        raise UsageError(f"--backend {args.backend}: {exc}") from exc
    if parallel is not None and rank == 0:  # what the engine will run with, read back from the enabled model
        import torch.distributed as dist

        from .parallel import context_parallel_of

        group, heads = context_parallel_of(pipe.transformer), pipe.transformer.config.num_attention_heads
        print(f"context parallel: {group.world_size} processes ({dist.get_backend()}), "
              f"{group.local_heads(heads)} of {heads} attention heads each")

    call = dict(
        prompt=args.prompt,
        negative_prompt=args.negative_prompt,
        height=args.height,
        width=args.width,
        num_frames=num_frames,
        num_inference_steps=args.steps,
        guidance_scale=args.guidance_scale,
        generator=torch.Generator("cpu").manual_seed(args.seed),
        output_type="np",
    )
    if context is not None:
        call["video"] = context.to(device)
    if cp is not None:
        call["chunk_partition"] = cp

    from .ops.registry import BackendUnavailableError

    try:
        if args.grid:
            videos, lines = [], []
            for n in args.grid:
                call.update(num_inference_steps=n, generator=torch.Generator("cpu").manual_seed(args.seed))
                start = time.perf_counter()
                videos.append(pipe(**call).frames[0])
                lines.append(_stats_line(pipe.anyflow_stats, time.perf_counter() - start, f"{n} steps"))
            labels = [f"{n} step" + ("s" if n > 1 else "") for n in args.grid]
            if rank == 0 and Path(args.out).suffix.lower() in IMAGE_SUFFIXES:  # all ranks hold the same frames
                write_image_atomic(frame_strip(videos, labels), args.out)
            elif rank == 0:
                write_video_atomic(side_by_side(videos, labels), args.out, fps=args.fps)
        else:
            start = time.perf_counter()
            frames = pipe(**call).frames[0]
            total = time.perf_counter() - start
            if rank == 0:
                write_video_atomic(frames, args.out, fps=args.fps)
    except BackendUnavailableError as exc:  # a forced backend that cannot run on this machine / input
        raise UsageError(f"--backend {args.backend}: {exc}") from exc
    finally:
        disable = getattr(handle, "disable", None)
        if callable(disable):
            disable()

    if rank != 0:
        return 0
    if args.grid:
        for line in lines:
            print(line)
        print(f"done: {len(args.grid)} samples from one noise -> {args.out}")
    else:
        # measured by the engine's sampler during this call
        print(_stats_line(pipe.anyflow_stats, total, "done") + f" -> {args.out}")
    return 0


def _cpu_threads(requested) -> int:
    """``--threads``, else the cores not busy with other work (1-minute load average), at least 1."""
    import torch

    if requested is not None:
        if requested < 1:
            raise UsageError(f"--threads must be >= 1, got {requested}")
        return requested
    try:
        busy = int(os.getloadavg()[0] + 0.5)
    except (AttributeError, OSError):  # not available on this platform
        busy = 0
    return max(1, min(torch.get_num_threads(), (os.cpu_count() or 1) - busy))


def _stats_line(stats, total: float, head: str) -> str:
    cache = f" (+{stats.cache_steps} cache steps)" if stats.cache_steps else ""
    per_nfe = stats.dit_seconds / max(stats.nfe, 1)
    return f"{head}: {stats.nfe} NFE{cache}, {per_nfe:.3f} s/NFE, total {total:.2f} s"


# ------------------------------------------------------------------------------------------------
# env, make-tiny
# ------------------------------------------------------------------------------------------------


def _env(args) -> int:
    from .env import format_report

    print(format_report())
    return 0


def _make_tiny(args) -> int:
    from .models.tiny import save_tiny_checkpoint

    folder = Path(args.dir).expanduser()
    if folder.exists() and not folder.is_dir():
        raise UsageError(f"{folder} exists and is not a folder")
    if folder.is_dir() and any(folder.iterdir()) and not args.force:
        raise UsageError(f"{folder} is not empty (pass --force to overwrite)")
    save_tiny_checkpoint(folder, kind=args.kind, seed=args.seed, layout=args.layout)
    print(f"wrote tiny {args.kind} checkpoint ({args.layout} layout) to {folder}")
    return 0


def _bench(args) -> int:
    """``anyflow bench ...`` = ``python -m benchmarks ...`` (the benchmarks live beside the package, not in it)."""
    root = str(Path(__file__).resolve().parent.parent)
    if not (Path(root) / "benchmarks" / "__main__.py").is_file():
        raise UsageError("anyflow bench needs a source checkout (benchmarks/ beside the anyflow package)")
    if root not in sys.path:
        sys.path.insert(0, root)
    from benchmarks.__main__ import main as bench_main

    rest = args.bench_args[1:] if args.bench_args[:1] == ["--"] else args.bench_args
    return bench_main(rest)


def _train(args) -> int:
    from .training.config import resolve
    from .training.run import train_from_config

    if args.steps is not None and args.steps < 0:
        raise UsageError(f"--steps must be >= 0, got {args.steps}")
    try:
        cfg = resolve(args.config)
    except (ValueError, TypeError, FileNotFoundError) as exc:
        raise UsageError(f"bad config {args.config}: {exc}") from None
    if args.data != "synthetic" and not Path(args.data).is_file():
        raise UsageError(f"--data must be 'synthetic' or an existing .pt file, got {args.data}")
    trainer = train_from_config(cfg, output_dir=args.output_dir, data=args.data, steps=args.steps,
                                resume=not args.no_resume)
    if trainer.rank == 0:  # under torchrun every process runs this
        print(f"step {trainer.step}: checkpoint in {trainer.output_dir}")
    return 0


_COMMANDS = {"generate": _generate, "env": _env, "make-tiny": _make_tiny, "bench": _bench, "train": _train}


def main(argv: list[str] | None = None) -> int:
    """Run the CLI.

    Args:
        argv: arguments without the program name (default ``sys.argv[1:]``).

    Returns:
        Exit status: 0 success, 1 runtime failure, 2 bad arguments or unusable inputs, 130 interrupted.
        argparse's own errors (unknown options, --image with --video) exit 2 through ``SystemExit``.
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["bench"]:  # everything after `bench` (options too) belongs to the benchmarks' own parser
        argv = ["bench", "--", *argv[1:]] if len(argv) > 1 else argv
    args = build_parser().parse_args(argv)
    try:
        return _COMMANDS[args.command](args)
    except UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
