"""What every benchmark shares: real Wan2.1 configs, the FLOP model, timing, peaks and run metadata.

FLOPs of a Wan2.1 DiT block (2 FLOPs per MAC: QKV/O projections, FFN, self-attention scores and values,
cross-attention on the text, the text K/V projections): per layer, ``N`` query and ``M`` key tokens, ``L_t``
text tokens, width ``d``, FFN width ``f``::

    N (12 d^2 + 4 d f) + 4 N M d + 4 N L_t d + 4 L_t d^2
"""

from __future__ import annotations

import datetime
import json
import math
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

#: Wan2.1 transformer sizes (Wan-Video/Wan2.1 README table); the rest of the config is diffusers' default.
CONFIGS = {
    "1.3B": dict(num_attention_heads=12, attention_head_dim=128, ffn_dim=8960, num_layers=30, text_dim=4096, freq_dim=256),
    "14B": dict(num_attention_heads=40, attention_head_dim=128, ffn_dim=13824, num_layers=40, text_dim=4096, freq_dim=256),
}
#: umT5 tokens of one prompt.
TEXT_TOKENS = 512
#: FAR chunk partition of the released 480p/81-frame configs.
CHUNK_PARTITION = (1, 3, 3, 3, 3, 3, 3, 2)


def model_flops(cfg, lq: int, lk: int, lt: int = TEXT_TOKENS, batch: int = 1) -> float:
    """FLOPs of one transformer forward with ``lq`` query and ``lk`` self-attention key tokens."""
    d = cfg.num_attention_heads * cfg.attention_head_dim
    per_layer = lq * (12 * d * d + 4 * d * cfg.ffn_dim) + 4 * lq * lk * d + 4 * lq * lt * d + 4 * lt * d * d
    return float(batch * cfg.num_layers * per_layer)


def masked_flops(cfg, tokens: int, pairs: int, lt: int = TEXT_TOKENS, batch: int = 1) -> float:
    """FLOPs of a masked forward over ``tokens`` tokens whose self-attention keeps ``pairs`` (q, k) pairs."""
    d = cfg.num_attention_heads * cfg.attention_head_dim
    per_layer = tokens * (12 * d * d + 4 * d * cfg.ffn_dim) + 4 * pairs * d + 4 * tokens * lt * d + 4 * lt * d * d
    return float(batch * cfg.num_layers * per_layer)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_ms(fn, device: torch.device, iters: int = 5, warmup: int = 1) -> float:
    """Median wall-clock milliseconds of ``fn()``, synchronised around each call (whole-forward timing)."""
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(max(iters, 1)):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        samples.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(samples)


def kernel_ms(fn, device: torch.device) -> float:
    """Median milliseconds of a short kernel call: CUDA events via ``triton.testing.do_bench`` on a GPU."""
    if device.type == "cuda":
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=10, rep=50, return_mode="median"))
    return median_ms(fn, device, iters=3)


def peaks(device: torch.device, small: bool = False) -> dict:
    """bf16 matmul TFLOP/s and device-to-device copy GB/s (read + write), measured now on ``device``."""
    n = 256 if small or device.type != "cuda" else 8192
    g = torch.Generator(device="cpu").manual_seed(0)
    a = torch.randn(n, n, generator=g).to(device, torch.bfloat16)  # random, never zeros (zeros run faster)
    b = torch.randn(n, n, generator=g).to(device, torch.bfloat16)
    ms = kernel_ms(lambda: a @ b, device)
    buf = torch.randint(0, 255, (2**18 if small or device.type != "cuda" else 2**29,), dtype=torch.uint8).to(device)
    ms_copy = kernel_ms(lambda: buf.clone(), device)
    return {"bf16_matmul_tflops": 2 * n**3 / ms / 1e9, "copy_gbs": 2 * buf.numel() / ms_copy / 1e6, "matmul_n": n}


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_gib(device: torch.device) -> float | None:
    """Peak allocated GiB since the last :func:`reset_peak_memory` (None off CUDA)."""
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def _version(name: str):
    try:
        from importlib.metadata import version

        return version(name)
    except Exception:  # noqa: BLE001 - absent package
        return None


def _driver() -> str | None:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
        return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None
    except (OSError, subprocess.SubprocessError):
        return None


def _git_sha() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10,
                             cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() or None if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def run_meta(device: torch.device, command: str) -> dict:
    """Device (name, CUDA capability), driver, versions, date, git commit and the exact command: recorded with
    every result."""
    import anyflow

    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": command,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or "cpu"),
        "device_type": device.type,
        "capability": "sm_{}{}".format(*torch.cuda.get_device_capability(device)) if device.type == "cuda" else None,
        "git": _git_sha(),
        "driver": _driver() if device.type == "cuda" else None,
        "versions": {
            "torch": torch.__version__, "cuda": torch.version.cuda, "triton": _version("triton"),
            "diffusers": _version("diffusers"), "anyflow": anyflow.__version__, "python": platform.python_version(),
        },
    }


def provenance(meta: dict) -> str:
    """The Markdown line under a result table's title: exact command, versions, driver."""
    v = meta["versions"]
    return (f"`{meta['command']}`; torch {v['torch']}, triton {v['triton']}, CUDA {v['cuda']}, diffusers {v['diffusers']}, "
            f"driver {meta['driver']}")


def failure_reason(exc: Exception) -> str:
    """``Type: first line of the message`` (at most 300 characters) for a result row that failed."""
    text = str(exc)
    return f"{type(exc).__name__}: {text.splitlines()[0][:300] if text else ''}"


def add_speedups(rows: list[dict], name_key: str, base_name: str, field: str) -> None:
    """``row[field] = base video_ms / row video_ms`` for every ok row, the base being the ok row whose
    ``name_key`` is ``base_name`` (nothing when it is missing or failed)."""
    base = next((r for r in rows if r[name_key] == base_name and r["status"] == "ok"), None)
    if base is None:
        return
    for r in rows:
        if r["status"] == "ok":
            r[field] = base["video_ms"] / r["video_ms"]


def command_line(prog: str, argv) -> str:
    return " ".join([prog] + [shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv)])


def finite(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def append_jsonl(path, obj) -> None:
    """Append ``obj`` as one JSON line to ``path`` and push it to disk at once (fsync): a stage killed by a
    time limit or a CUDA fault keeps every line written before it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torn = False
    if path.exists() and path.stat().st_size:
        with open(path, "rb") as f:  # a line cut short by a kill: start on a fresh line
            f.seek(-1, os.SEEK_END)
            torn = f.read(1) != b"\n"
    with open(path, "a", encoding="utf-8") as f:
        f.write(("\n" if torn else "") + json.dumps(obj, default=str) + "\n")
        f.flush()
        os.fsync(f.fileno())


def read_jsonl(path) -> list[dict]:
    """The JSON lines of ``path`` (a torn last line, from a kill mid-write, is skipped)."""
    out = []
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except OSError:
        return out
    for line in lines:
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


class Record:
    """A benchmark result being built row by row, saved after every change.

    ``data`` is the record (``kind``, ``meta``, ``config`` and lists of rows). With ``jsonl`` every change
    is also appended to that JSON-lines file as it happens (``{"type": "run"|"row"|"set", "run": id,
    ...}``; :func:`records_from_jsonl` rebuilds the records), so a run cut short keeps each finished row.
    ``key`` names the run for resuming (:meth:`done`): a rerun with the same key skips the rows a killed
    earlier run already wrote.
    """

    def __init__(self, data: dict, key: str, jsonl=None, save=None):
        self.data, self.key, self.jsonl, self._save = data, key, jsonl, save
        self.run = f"{key}@{time.time_ns()}"
        if jsonl:
            append_jsonl(jsonl, {"type": "run", "run": self.run, "key": key, **data})

    def done(self, list_name: str, field: str) -> set:
        """``field`` of every row in ``list_name`` that an earlier run with this key wrote to the JSONL file."""
        if not self.jsonl:
            return set()
        runs = {e["run"] for e in read_jsonl(self.jsonl) if e.get("type") == "run" and e.get("key") == self.key}
        return {e["row"].get(field) for e in read_jsonl(self.jsonl)
                if e.get("type") == "row" and e.get("run") in runs and e.get("list") == list_name}

    def add(self, list_name: str, row: dict) -> dict:
        self.data.setdefault(list_name, []).append(row)
        if self.jsonl:
            append_jsonl(self.jsonl, {"type": "row", "run": self.run, "list": list_name, "row": row})
        self.save()
        return row

    def set(self, name: str, value) -> None:
        self.data[name] = value
        if self.jsonl:
            append_jsonl(self.jsonl, {"type": "set", "run": self.run, "name": name, "value": value})
        self.save()

    def save(self) -> None:
        if self._save is not None:
            self._save(self.data)


def records_from_jsonl(path) -> list[dict]:
    """Rebuild the records of a JSON-lines file written through :class:`Record` (one per run, in order).
    Rows computed from others after the fact (ratios, speed-ups) are whatever the run last set."""
    runs: dict[str, dict] = {}
    for e in read_jsonl(path):
        kind, run = e.get("type"), e.get("run")
        if kind == "run":
            runs[run] = {k: v for k, v in e.items() if k not in ("type", "run", "key")}
        elif run in runs and kind == "row":
            runs[run].setdefault(e["list"], []).append(e["row"])
        elif run in runs and kind == "set":
            runs[run][e["name"]] = e["value"]
    return list(runs.values())


def device_lost(device: torch.device) -> str | None:
    """Why the CUDA context of ``device`` can no longer be used (a sticky fault such as an illegal memory
    access poisons every later call in the process), or ``None`` when it still works.

    ``BENCH_SIMULATE_DEVICE_LOST=FILE`` makes the first call (the one that creates FILE) report a loss, so
    that the recovery path (exit 75, rerun with ``--resume``) is rehearsed on CPU."""
    flag = os.environ.get("BENCH_SIMULATE_DEVICE_LOST")  # rehearsal of the recovery path: lose it once
    if flag and not os.path.exists(flag):
        Path(flag).touch()
        return "simulated by BENCH_SIMULATE_DEVICE_LOST"
    if device.type != "cuda":
        return None
    try:
        torch.cuda.synchronize(device)
        torch.ones(1, device=device).add_(1).item()
    except Exception as exc:  # noqa: BLE001 - any failure here means the context is gone
        return failure_reason(exc)
    return None


#: Exit status of a benchmark process that stopped because its CUDA context was lost; the device check
#: reruns such a stage with the rows already written skipped.
EXIT_DEVICE_LOST = 75


def stop_if_lost(device: torch.device, who: str) -> None:
    """End the process with :data:`EXIT_DEVICE_LOST` when the CUDA context is gone (after a row was recorded)."""
    lost = device_lost(device)
    if lost:
        print(f"{who}: CUDA context lost ({lost}); stopping (rerun with --resume)")
        raise SystemExit(EXIT_DEVICE_LOST)


def write_json(path: Path, obj) -> None:
    """Write ``obj`` as JSON atomically (a run killed by a time limit leaves the previous version, never half)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1) + "\n")
    os.replace(tmp, path)
