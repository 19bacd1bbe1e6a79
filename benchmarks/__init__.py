"""anyflow benchmarks: per-NFE / per-video DiT timing (``nfe``), per-op kernel checks (``kernels``) and the
README performance table (``report``). Run as ``python -m benchmarks <command>`` or ``anyflow bench <command>``."""
