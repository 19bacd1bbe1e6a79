"""Ulysses context parallelism on anyflow's fast path (``anyflow.enable(..., context_parallel=config)``) on the CPU
with gloo: 2 and 4 processes give the fp32 output of one enabled process (relative L2 error <= 1e-5) for the
bidirectional forward and pipeline (CFG), the FAR training form (compressed context and clean copies), and the FAR
pipeline T2V and I2V (several chunks, compressed context, cache steps), with token counts that do not divide by the
number of ranks (9 tokens per frame, 1 per compressed frame: some ranks hold a cut frame or no token at all);
backends torch and triton (interpreter, tiny cases); the FAR KV cache of a rank holds heads / N heads; bad
configurations raise on every rank before any collective."""

import contextlib
import inspect

import pytest
import torch
import torch.distributed as dist

if not dist.is_available() or not dist.is_gloo_available():
    pytest.skip("torch.distributed with gloo is unavailable", allow_module_level=True)

from anyflow.testing.gloo import spawn_cases

TOL = 1e-5
HEADS = 4  # the tiny models have 2; 4 heads allow 2 and 4 ranks
H = W = 48  # latent 6x6: 9 tokens per frame, 1 per compressed frame
FAR_CP = [1, 2, 2, 1]  # full_chunk_limit 3: the last chunk attends to a compressed chunk; 3 cache steps
PROMPT = "a red panda eating bamboo in the forest"


def _rel(a, b):
    assert torch.isfinite(a).all()
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def _cp_config(n, **kw):
    from diffusers import ContextParallelConfig

    return ContextParallelConfig(ulysses_degree=n, **kw)


def _enable(obj, backend, **kw):
    """``anyflow.enable`` with the op backend ``backend`` (a keyword of ``enable`` or, once the keyword is gone,
    the ``anyflow.ops.backend`` context of the calls: see :func:`_calls`)."""
    import anyflow

    if "backend" in inspect.signature(anyflow.enable).parameters:
        kw["backend"] = backend
    return anyflow.enable(obj, **kw)


def _calls(backend):
    import anyflow

    ctx = getattr(anyflow.ops, "backend", None)
    return ctx(backend) if callable(ctx) and not isinstance(ctx, str) else contextlib.nullcontext()


def _forward_cases(world, backend):
    """Enabled transformers: bidirectional forward (3 frames, 45 tokens) and the FAR training form (chunks
    [1, 2, 1], one compressed chunk, clean copies of the full chunks: 3 segments), with the input gradient."""
    from anyflow.models.tiny import tiny_transformer
    from anyflow.parallel import context_parallel_of

    g = torch.Generator().manual_seed(5)
    out = {}
    x = torch.randn(1, 3, 16, 6, 10, generator=g)
    t = torch.rand(1, 3, generator=g) * 1000
    text = torch.randn(1, 7, 32, generator=g)
    res = []
    for cp in (None, _cp_config(world)):
        model = tiny_transformer("bidirectional", seed=1, num_attention_heads=HEADS)
        _enable(model, backend, context_parallel=cp)
        with torch.no_grad(), _calls(backend):
            res.append(model(x, t, 0.4 * t, text, return_dict=False)[0])
    out[f"bidirectional forward {backend}"] = _rel(res[1], res[0])

    x = torch.randn(1, 4, 16, 6, 6, generator=g)
    t = torch.rand(1, 4, generator=g) * 1000
    clean = torch.randn(1, 3, 16, 6, 6, generator=g)
    res, grads = [], []
    for cp in (None, _cp_config(world)):
        model = tiny_transformer("far", seed=2, num_attention_heads=HEADS, chunk_partition=(1, 2, 1),
                                 full_chunk_limit=2)
        _enable(model, backend, context_parallel=cp)
        xi = x.clone().requires_grad_(True)
        with _calls(backend):
            y = model(xi, t, 0.4 * t, text, chunk_partition=[1, 2, 1], clean_hidden_states=clean,
                      clean_timestep=torch.zeros(1, 3), return_dict=False)[0]
            (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
        if cp is not None:  # a replicated input (or parameter) gets each rank's part: sum over the ranks
            assert context_parallel_of(model) is not None
            dist.all_reduce(xi.grad)
        res.append(y.detach())
        grads.append(xi.grad)
    out[f"far training forward {backend}"] = _rel(res[1], res[0])
    out[f"far training input gradient {backend}"] = _rel(grads[1], grads[0])
    return out


def _pipeline_cases(world, kinds, backend="torch"):
    from anyflow.models.tiny import tiny_pipeline

    out = {}
    for name in kinds:
        kind = "bidirectional" if name == "bidirectional" else "far"
        kw = dict(prompt=PROMPT, height=H, width=W, num_inference_steps=2, output_type="latent")
        if kind == "far":
            kw.update(chunk_partition=FAR_CP, num_frames=4 * (sum(FAR_CP) - 1) + 1)
        else:
            kw.update(num_frames=9, guidance_scale=3.0, negative_prompt="blurry")
        if name == "far i2v":
            kw["video_latents"] = torch.randn(1, 1, 16, H // 8, W // 8, generator=torch.Generator().manual_seed(9))
        results = []
        for cp in (None, _cp_config(world)):
            pipe = tiny_pipeline(kind, seed=0, num_attention_heads=HEADS)
            pipe.set_progress_bar_config(disable=True)
            _enable(pipe, backend, context_parallel=cp)
            with torch.no_grad(), _calls(backend):
                results.append(pipe(generator=torch.Generator().manual_seed(0), **kw).frames)
        out[f"{name} pipeline {backend}"] = _rel(results[1], results[0])
    return out


def _cache_case(world):
    """The FAR KV cache of one rank holds heads / N heads."""
    from anyflow.models.far import FARRunner
    from anyflow.models.tiny import tiny_transformer

    model = tiny_transformer("far", num_attention_heads=HEADS)
    _enable(model, "torch", context_parallel=_cp_config(world))
    cache = FARRunner(model, FAR_CP, (6, 6)).new_cache(2, torch.float32, "cpu")
    return {"cache heads": cache.k.shape[2]}


def _error_cases(world):
    """Each bad configuration must raise on every rank without entering a collective."""
    from anyflow.models.tiny import tiny_transformer

    def message(fn):
        try:
            fn()
        except (ValueError, TypeError, RuntimeError, NotImplementedError) as e:
            return f"{type(e).__name__}: {e}"
        return "no error"

    out = {
        "world": message(lambda: _enable(tiny_transformer(num_attention_heads=HEADS), "torch",
                                         context_parallel=_cp_config(2 * world))),
        "heads": message(lambda: _enable(tiny_transformer(num_attention_heads=2 * world - 1), "torch",
                                         context_parallel=_cp_config(world))),
        "ring": message(lambda: _enable(tiny_transformer(num_attention_heads=HEADS), "torch",
                                        context_parallel=_cp_config(1, ring_degree=world))),
        "type": message(lambda: _enable(tiny_transformer(num_attention_heads=HEADS), "torch",
                                        context_parallel=object())),
    }
    dist.barrier()
    return out


CASES = {
    "forward torch": lambda world: _forward_cases(world, "torch"),
    "forward triton": lambda world: _forward_cases(world, "triton"),
    "pipelines": lambda world: _pipeline_cases(world, ("bidirectional", "far t2v", "far i2v")),
    "far t2v": lambda world: _pipeline_cases(world, ("far t2v",)),
    "far t2v triton": lambda world: _pipeline_cases(world, ("far t2v",), "triton"),
    "cache": _cache_case,
    "errors": _error_cases,
}


def _spawn(world, cases, tmp_path):
    return spawn_cases(world, "test_parallel_fast", cases, tmp_path)


def _check(per_rank, world, expected):
    for rank, out in enumerate(per_rank):
        errs = {k: v for k, v in out.items() if isinstance(v, float)}
        assert set(errs) == expected
        for name, err in errs.items():
            assert err <= TOL, f"rank {rank}: {name}: relative error {err:.2e} > {TOL}"
        if "cache heads" in out:
            assert out["cache heads"] == HEADS // world
        if "world" in out:
            assert out["world"].startswith("ValueError") and "does not match the world size" in out["world"]
            assert out["heads"].startswith("ValueError") and "not divisible by ulysses_degree" in out["heads"]
            assert out["ring"].startswith("ValueError") and "ring_degree must be 1" in out["ring"]
            assert out["type"].startswith("TypeError") and "ContextParallelConfig" in out["type"]


FORWARD = {"bidirectional forward {}", "far training forward {}", "far training input gradient {}"}


def test_two_processes_match_one(tmp_path):
    per_rank = _spawn(2, ["forward torch", "pipelines", "cache", "errors"], tmp_path)
    _check(per_rank, 2, {n.format("torch") for n in FORWARD} | {
        "bidirectional pipeline torch", "far t2v pipeline torch", "far i2v pipeline torch"})


def test_four_processes_match_one(tmp_path):
    per_rank = _spawn(4, ["forward torch", "far t2v", "cache", "errors"], tmp_path)
    _check(per_rank, 4, {n.format("torch") for n in FORWARD} | {"far t2v pipeline torch"})


def test_two_processes_triton(tmp_path):
    per_rank = _spawn(2, ["forward triton"], tmp_path)
    _check(per_rank, 2, {n.format("triton") for n in FORWARD})


@pytest.mark.slow
def test_two_processes_triton_far_pipeline(tmp_path):
    per_rank = _spawn(2, ["far t2v triton"], tmp_path)
    _check(per_rank, 2, {"far t2v pipeline triton"})


def test_local_segments():
    from anyflow.parallel import local_segments, split_sizes

    # one frame of 9 tokens cut in two, rows keep the frame index
    assert local_segments(((3, 9),), 0, 14) == (((1, 9), (1, 5)), (0, 1))
    assert local_segments(((3, 9),), 14, 27) == (((1, 4), (1, 9)), (1, 2))
    # [compressed | full | clean]: equal widths merge; an empty range has no segment
    assert local_segments(((2, 1), (2, 9), (2, 9)), 20, 38) == (((2, 9),), (4, 5))
    assert local_segments(((1, 1),), 1, 1) == ((), ())
    # 480p: 1,560 tokens per frame, a 3-frame chunk on 16 ranks
    sizes = split_sizes(3 * 1560, 16)
    segs, rows = local_segments(((3, 1560),), sum(sizes[:5]), sum(sizes[:6]))
    assert sum(f * n for f, n in segs) == sizes[5] and len(rows) == sum(f for f, _ in segs)
    with pytest.raises(ValueError, match="outside the sequence"):
        local_segments(((1, 9),), 0, 10)


def test_enable_without_distributed():
    import anyflow
    from anyflow.models.tiny import tiny_transformer

    with pytest.raises(RuntimeError, match="torch.distributed is not initialised"):
        anyflow.enable(tiny_transformer(), context_parallel=_cp_config(2))
