"""The environment of a benchmark run and the ceilings every other figure is measured against.

One row with the versions, the device and the backend table of ``anyflow env``, then the measured peaks
of this device in this process: bf16 matmul TFLOP/s (random 8192^3 on CUDA) and device-to-device copy
GB/s (read + write of 512 MiB). Kernel rows compare their bandwidth with this copy figure, model rows
their TFLOP/s with this matmul figure.

    python -m benchmarks ceilings --jsonl OUT/results.jsonl
    python -m benchmarks ceilings --smoke              # CPU: small sizes, prints the row
"""

from __future__ import annotations

import argparse
import json

import torch

from . import common


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(prog="python -m benchmarks ceilings", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="small sizes (CPU dry run)")
    ap.add_argument("--jsonl", default=None, help="append the environment and the peaks to this JSON-lines file")
    args = ap.parse_args(argv)
    from anyflow import env

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    meta = common.run_meta(device, common.command_line("python -m benchmarks ceilings", argv))
    info = env.collect()
    rec = common.Record({"kind": "ceilings", "meta": meta, "environment": info}, key="ceilings", jsonl=args.jsonl)
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        rec.set("device", {"name": props.name, "capability": f"{props.major}.{props.minor}",
                           "sms": props.multi_processor_count, "memory_gib": props.total_memory / 2**30})
    rec.set("peaks", common.peaks(device, small=args.smoke))
    print(json.dumps({k: rec.data[k] for k in ("meta", "peaks")}, indent=1, default=str))
    return rec.data
