"""``python -m benchmarks {ceilings,nfe,kernels,levers,report} ...`` (also ``anyflow bench ...``)."""

from __future__ import annotations

import sys

COMMANDS = ("ceilings", "nfe", "kernels", "levers", "report")
USAGE = ("usage: python -m benchmarks {ceilings,nfe,kernels,levers,report} [options]   (--help after a command for its options)\n"
         "  ceilings environment + measured bf16 matmul TFLOP/s and copy GB/s of this device\n"
         "  nfe      per-NFE DiT time, diffusers vs anyflow backends and SDPA policies, in one process\n"
         "  kernels  per-op correctness check + timing per backend at real shapes, with SDPA/cuDNN/Flex baselines\n"
         "  levers   whole-video sampler time with each end-to-end lever alone and all together\n"
         "  report   regenerate the README performance table from benchmarks/results/")


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        print(USAGE, file=sys.stdout if argv and argv[0] in ("-h", "--help") else sys.stderr)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    from importlib import import_module

    rc = import_module(f"benchmarks.{argv[0]}").main(argv[1:])
    return rc if isinstance(rc, int) else 0


if __name__ == "__main__":
    sys.exit(main())
