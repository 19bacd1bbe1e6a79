"""Multi-process tests on CPU: spawn N gloo ranks that each run named cases and return their JSON results."""

from __future__ import annotations

import importlib
import json
import os
import socket


def free_port() -> int:
    """A free TCP port on 127.0.0.1 for a process group's rendezvous."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world, port, module, cases, path):
    import torch
    import torch.distributed as dist
    import transformers  # noqa: F401  diffusers' logger.warning_once needs it imported (diffusers 0.42.1)

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        table = importlib.import_module(module).CASES
        out = {}
        for case in cases:
            out.update(table[case](world))
        with open(os.path.join(path, f"{rank}.json"), "w") as f:
            json.dump(out, f)
    finally:
        dist.destroy_process_group()


def spawn_cases(world: int, module: str, cases, tmp_path) -> list[dict]:
    """Run ``module.CASES[name](world)`` for every name in ``cases`` on ``world`` gloo ranks (one process each);
    returns each rank's merged result dict (JSON-serialisable values)."""
    import torch.multiprocessing as mp

    mp.spawn(_worker, args=(world, free_port(), module, list(cases), str(tmp_path)), nprocs=world, join=True)
    per_rank = [json.loads((tmp_path / f"{r}.json").read_text()) for r in range(world)]
    print(world, "processes:", per_rank[0])
    return per_rank
