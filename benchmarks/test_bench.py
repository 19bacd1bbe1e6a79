"""pytest-benchmark suite: CPU-sized cases (run in CI through tests/test_benchmarks.py) and GPU cases
at the real Wan2.1 1.3B shapes (skipped without CUDA).

    pytest benchmarks/test_bench.py                          # time with pytest-benchmark
    pytest benchmarks/test_bench.py --benchmark-disable      # run each case once (CI smoke)
"""

from __future__ import annotations

import pytest
import torch

from benchmarks import common, nfe

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _loads(model: str, mode: str, device, dtype, frames: int, height: int, width: int, cp):
    label, cfg = nfe.load_config(model, mode, cp)
    m = nfe.build_transformer(cfg, mode, dtype, device)
    f = (frames - 1) // 4 + 1
    return m, nfe.workloads(m, mode, (f, height // 8, width // 8), cp, 1, device, dtype)


def _run(benchmark, model, loads, variant, device, which):
    name, _, _, flops, call = next(w for w in loads if w[0] == which)
    with torch.no_grad(), nfe.applied(model, variant, device):
        out = benchmark(lambda: (call(), common.sync(device)))
    benchmark.extra_info.update(workload=name, variant=variant, tflop=flops / 1e12)
    return out


@pytest.mark.parametrize("variant", ["diffusers", "anyflow:torch"])
@pytest.mark.parametrize("mode,which", [("bidirectional", "nfe"), ("far", "nfe[1]"), ("far", "cache[0]")])
def test_tiny_nfe(benchmark, mode, which, variant):
    device = torch.device("cpu")
    model, loads = _loads("tiny", mode, device, torch.float32, 9, 64, 64, [1, 2])
    _run(benchmark, model, loads, variant, device, which)


def test_tiny_op(benchmark):
    from anyflow import ops

    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 3 * 12, 64, generator=g)
    shift, scale = torch.randn(1, 3, 64, generator=g), torch.randn(1, 3, 64, generator=g)
    out = benchmark(lambda: ops.adaln_modulate(x, shift, scale, ((3, 12),), backend="torch"))
    assert torch.isfinite(out).all()


@gpu
@pytest.mark.parametrize("variant", ["diffusers", "diffusers:cudnn", "anyflow:auto", "anyflow:triton", "anyflow:cuda"])
@pytest.mark.parametrize("mode,which", [("bidirectional", "nfe"), ("far", "nfe[6]"), ("far", "cache[6]")])
def test_gpu_1_3b_nfe(benchmark, mode, which, variant):
    device = torch.device("cuda")
    model, loads = _loads("1.3B", mode, device, torch.bfloat16, 81, 480, 832, list(common.CHUNK_PARTITION))
    try:
        _run(benchmark, model, loads, variant, device, which)
    except nfe.Skip as exc:
        pytest.skip(str(exc))
