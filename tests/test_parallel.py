"""Ulysses context parallelism for plain diffusers AnyFlow models (``anyflow.parallel``) on the CPU with gloo:
2 and 4 processes give the fp32 output of one process (relative L2 error <= 1e-5) for the bidirectional forward
and pipeline and the FAR pipeline (T2V and I2V, several chunks with compressed context, cache steps) and FAR
training forward, with token counts that do not divide by the number of ranks; bad configurations raise the same
clear error on every rank before any collective (the workers then still meet at a barrier)."""

import json
import os

import pytest
import torch
import torch.distributed as dist

if not dist.is_available() or not dist.is_gloo_available():
    pytest.skip("torch.distributed with gloo is unavailable", allow_module_level=True)

from anyflow.testing.gloo import free_port, spawn_cases

TOL = 1e-5
HEADS = 4  # the tiny models have 2; 4 heads allow 2 and 4 ranks
H = W = 48  # latent 6x6: 9 tokens per frame, 1 per compressed frame, so no chunk divides evenly by 2 or 4
FAR_CP = [1, 2, 2, 1]  # full_chunk_limit 3: the last chunk attends to a compressed chunk; 3 cache steps
PROMPT = "a red panda eating bamboo in the forest"


def _tiny():
    """The tiny model builders (anyflow.models.tiny; anyflow.testing.tiny before the move)."""
    try:
        from anyflow.models import tiny
    except ImportError:
        from anyflow.testing import tiny
    return tiny


def _rel(a, b):
    assert torch.isfinite(a).all()
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def _cp_config(n, **kw):
    from diffusers import ContextParallelConfig

    return ContextParallelConfig(ulysses_degree=n, **kw)


def _forward_cases(world):
    """Bidirectional forward (45 tokens) and FAR training forward (chunk-causal BlockMask, 2 chunks)."""
    from anyflow.parallel import apply_context_parallel
    tiny_transformer = _tiny().tiny_transformer

    g = torch.Generator().manual_seed(5)
    out = {}
    x = torch.randn(1, 3, 16, 6, 10, generator=g)
    t = torch.rand(1, 3, generator=g) * 1000
    text = torch.randn(1, 7, 32, generator=g)
    ref_model = tiny_transformer("bidirectional", seed=1, num_attention_heads=HEADS)
    model = tiny_transformer("bidirectional", seed=1, num_attention_heads=HEADS)
    with torch.no_grad():
        ref = ref_model(x, t, 0.4 * t, text, return_dict=False)[0]
        apply_context_parallel(model, _cp_config(world))
        out["bidirectional forward"] = _rel(model(x, t, 0.4 * t, text, return_dict=False)[0], ref)

    x = torch.randn(1, 3, 16, 6, 6, generator=g)
    t = torch.rand(1, 3, generator=g) * 1000
    ref_model = tiny_transformer("far", seed=2, num_attention_heads=HEADS, chunk_partition=(1, 2))
    model = tiny_transformer("far", seed=2, num_attention_heads=HEADS, chunk_partition=(1, 2))
    with torch.no_grad():
        kw = dict(chunk_partition=[1, 2], return_dict=False)
        ref = ref_model(x, t, 0.4 * t, text, **kw)[0]
        apply_context_parallel(model, _cp_config(world))
        out["far training forward"] = _rel(model(x, t, 0.4 * t, text, **kw)[0], ref)
    return out


def _pipeline_cases(world, kinds):
    from anyflow.parallel import apply_context_parallel
    tiny_pipeline = _tiny().tiny_pipeline

    out = {}
    for name in kinds:
        kind = "bidirectional" if name == "bidirectional" else "far"
        kw = dict(prompt=PROMPT, height=H, width=W, num_inference_steps=3, output_type="latent")
        if kind == "far":
            kw.update(chunk_partition=FAR_CP, num_frames=4 * (sum(FAR_CP) - 1) + 1)
        else:
            kw.update(num_frames=9, guidance_scale=3.0, negative_prompt="blurry")
        if name == "far i2v":
            kw["video_latents"] = torch.randn(1, 1, 16, H // 8, W // 8, generator=torch.Generator().manual_seed(9))
        results = []
        for parallel in (False, True):
            pipe = tiny_pipeline(kind, seed=0, num_attention_heads=HEADS)
            pipe.set_progress_bar_config(disable=True)
            if parallel:
                apply_context_parallel(pipe.transformer, _cp_config(world))
            with torch.no_grad():
                results.append(pipe(generator=torch.Generator().manual_seed(0), **kw).frames)
        out[f"{name} pipeline"] = _rel(results[1], results[0])
    return out


def _error_cases(world):
    """Each bad configuration must raise on every rank without entering a collective."""
    from anyflow.parallel import apply_context_parallel
    tiny_transformer = _tiny().tiny_transformer

    def message(fn):
        try:
            fn()
        except (ValueError, TypeError, RuntimeError) as e:
            return f"{type(e).__name__}: {e}"
        return "no error"

    out = {
        "world": message(lambda: apply_context_parallel(tiny_transformer(num_attention_heads=HEADS),
                                                        _cp_config(2 * world))),
        "heads": message(lambda: apply_context_parallel(tiny_transformer(num_attention_heads=2 * world - 1),
                                                        _cp_config(world))),
        "ring": message(lambda: apply_context_parallel(tiny_transformer(num_attention_heads=HEADS),
                                                       _cp_config(1, ring_degree=world))),
    }
    model = tiny_transformer("far", num_attention_heads=HEADS)
    apply_context_parallel(model, _cp_config(world))
    out["twice"] = message(lambda: apply_context_parallel(model, _cp_config(world)))
    dist.barrier()
    return out


CASES = {"forward": _forward_cases, "errors": _error_cases,
         "pipelines": lambda world: _pipeline_cases(world, ("bidirectional", "far t2v", "far i2v")),
         "far t2v": lambda world: _pipeline_cases(world, ("far t2v",))}


def _spawn(world, cases, tmp_path):
    return spawn_cases(world, "test_parallel", cases, tmp_path)


def _check_errors(per_rank):
    for out in per_rank:
        assert out["world"].startswith("ValueError") and "does not match the world size" in out["world"]
        assert out["heads"].startswith("ValueError") and "not divisible by ulysses_degree" in out["heads"]
        assert out["ring"].startswith("ValueError") and "ring_degree must be 1" in out["ring"]
        assert out["twice"].startswith("RuntimeError") and "already applied" in out["twice"]


def test_two_processes_match_one(tmp_path):
    per_rank = _spawn(2, ["forward", "pipelines", "errors"], tmp_path)
    for rank, out in enumerate(per_rank):
        for name, err in out.items():
            if isinstance(err, float):
                assert err <= TOL, f"rank {rank}: {name}: relative error {err:.2e} > {TOL}"
    assert {k for k, v in per_rank[0].items() if isinstance(v, float)} == {
        "bidirectional forward", "far training forward", "bidirectional pipeline", "far t2v pipeline",
        "far i2v pipeline"}
    _check_errors(per_rank)


def test_four_processes_match_one(tmp_path):
    per_rank = _spawn(4, ["forward", "far t2v", "errors"], tmp_path)
    for rank, out in enumerate(per_rank):
        for name, err in out.items():
            if isinstance(err, float):
                assert err <= TOL, f"rank {rank}: {name}: relative error {err:.2e} > {TOL}"
    _check_errors(per_rank)


def test_errors_without_distributed():
    from anyflow.parallel import apply_context_parallel, split_sizes
    tiny_transformer = _tiny().tiny_transformer

    with pytest.raises(RuntimeError, match="torch.distributed is not initialised"):
        apply_context_parallel(tiny_transformer(), _cp_config(2))
    with pytest.raises(TypeError, match="AnyFlowTransformer3DModel"):
        apply_context_parallel(torch.nn.Linear(2, 2), _cp_config(2))
    with pytest.raises(TypeError, match="ContextParallelConfig"):
        apply_context_parallel(tiny_transformer(), object())
    assert split_sizes(1560 * 3, 16) == [293] * 8 + [292] * 8
    assert split_sizes(9, 4) == [3, 2, 2, 2]


def test_nfe_benchmark_context_parallel_command(tmp_path):
    """The measuring command of docs/context_parallel.md runs (tiny FAR model, 2 gloo ranks) and rank 0 writes."""
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           "-m", "benchmarks", "nfe", "--model", "tiny", "--mode", "far", "--height", "64", "--width", "64",
           "--frames", "21", "--chunk-partition", "1,2,2,1", "--context-parallel", "2", "--iters", "1",
           "--out", str(tmp_path)]
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rec = json.loads((tmp_path / "nfe_tiny_cp2_far.json").read_text())
    assert rec["config"]["context_parallel"] == 2
    assert [v["status"] for v in rec["variants"]] == ["ok"]
