"""The drop-in contract of ``anyflow.enable`` (issue 14, items 1-3), on tiny fp32 models on the CPU.

* a pipeline built with ``transformer=None`` (or without a VAE) can be enabled;
* the enabled ``__call__`` has the signature and docstring of diffusers' own;
* every offload form diffusers runs also runs enabled, fused, with diffusers' output: group offloading
  (block level with 1 and 2 blocks per group, leaf level, the pipeline-level ``enable_group_offload``,
  CUDA streams on a GPU) and sequential CPU offload, each applied before or after ``enable``.

On the CPU, group offloading with ``onload_device = offload_device = cpu`` moves nothing, so a forward
that reads a weight its hooks did not load would still see the right numbers. :func:`_poisoned_offload`
makes such a read visible: an offloaded group's tensors hold NaN until the group is onloaded. Sequential
offload needs no help: its offloaded weights are on the meta device.

References are the un-enabled, un-offloaded diffusers models on the same weights (FAR pipelines inside
:func:`anyflow.testing.official.official_far_semantics`, see tests/test_samplers.py). fp32 tolerances
(conventions rule 2): relative L2 <= 1e-5 per forward, <= 1e-4 for sampled latents.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import warnings

import pytest
import torch

import anyflow
from anyflow.testing.official import official_far_semantics
from anyflow.models.tiny import tiny_pipeline, tiny_transformer
from anyflow.testing.tolerances import assert_rel_l2

FWD_TOL = 1e-5
LATENT_TOL = 1e-4
H = W = 32
PROMPT = "a red panda eating bamboo in the forest"
FAR_CP = [1, 2, 2, 1]
CPU = torch.device("cpu")


def _randn(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _kw(kind: str) -> dict:
    kw = dict(prompt=PROMPT, height=H, width=W, num_inference_steps=2, output_type="latent", guidance_scale=3.0)
    if kind == "far":
        kw.update(chunk_partition=FAR_CP, num_frames=4 * (sum(FAR_CP) - 1) + 1)
    else:
        kw.update(num_frames=9)
    return kw


def _official(kind):
    return official_far_semantics() if kind == "far" else contextlib.nullcontext()


def _run(pipe, kind, seed=0):
    with _official(kind):
        return pipe(generator=torch.Generator().manual_seed(seed), **_kw(kind)).frames


def _fresh_pipe(kind):
    pipe = tiny_pipeline(kind, seed=0)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@functools.lru_cache(maxsize=None)
def _reference(kind):
    """diffusers' latents, no anyflow, no offload."""
    return _run(_fresh_pipe(kind), kind)


# ----------------------------------------------------------------------------------------------
# offload forms
# ----------------------------------------------------------------------------------------------
def _group(offload_type, **kw):
    def apply(model):
        model.enable_group_offload(CPU, offload_device=CPU, offload_type=offload_type, **kw)

    return apply


def _sequential(model):
    from accelerate import cpu_offload

    cpu_offload(model, execution_device=CPU, offload_buffers=True)


#: offload of a bare transformer
MODEL_FORMS = {
    "block": _group("block_level", num_blocks_per_group=1),
    "block2": _group("block_level", num_blocks_per_group=2),
    "leaf": _group("leaf_level"),
    "sequential": _sequential,
}

#: offload of a pipeline (its transformer, or every component)
PIPE_FORMS = {
    "transformer-block": lambda pipe: MODEL_FORMS["block"](pipe.transformer),
    "transformer-leaf": lambda pipe: MODEL_FORMS["leaf"](pipe.transformer),
    "pipe-block": lambda pipe: pipe.enable_group_offload(CPU, offload_device=CPU, offload_type="block_level",
                                                         num_blocks_per_group=1),
    "pipe-leaf": lambda pipe: pipe.enable_group_offload(CPU, offload_device=CPU, offload_type="leaf_level"),
    # what pipe.enable_sequential_cpu_offload does to the transformer; the pipeline-level call itself fails in
    # plain diffusers here (accelerate 1.16 restores a weight of the tiny UMT5 text encoder as a plain Tensor)
    "transformer-sequential": lambda pipe: _sequential(pipe.transformer),
}


def _group_tensors(group):
    out = []
    for m in group.modules:
        out += list(m.parameters()) + list(m.buffers())
    return out + list(group.parameters) + list(group.buffers)


@pytest.fixture
def poisoned_offload(monkeypatch):
    """Group offloading whose offloaded tensors read NaN until their group is onloaded again.

    Returns the list of groups (``ModuleGroup``) in the order they are onloaded.
    """
    from diffusers.hooks.group_offloading import ModuleGroup

    saved: dict[int, torch.Tensor] = {}
    order: list = []
    onload, offload = ModuleGroup.onload_, ModuleGroup.offload_

    def offload_(self):
        offload(self)
        for t in _group_tensors(self):
            if id(t) not in saved:
                saved[id(t)] = t.data
                t.data = torch.full_like(t.data, float("nan"))

    def onload_(self):
        order.append(self)
        for t in _group_tensors(self):
            if id(t) in saved:
                t.data = saved.pop(id(t))
        onload(self)

    monkeypatch.setattr(ModuleGroup, "offload_", offload_)
    monkeypatch.setattr(ModuleGroup, "onload_", onload_)
    return order


def test_poison_is_visible(poisoned_offload):
    """The poison works: outside its hooks an offloaded weight is NaN, so a read the hooks missed shows."""
    model = tiny_transformer("bidirectional", seed=1)
    MODEL_FORMS["block"](model)
    assert torch.isnan(model.blocks[0].scale_shift_table).all()
    assert torch.isnan(model.scale_shift_table).all()


# ----------------------------------------------------------------------------------------------
# 1. absent components
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["bidirectional", "far"])
def test_enable_skips_absent_transformer(kind):
    full = _fresh_pipe(kind)
    pipe = type(full)(tokenizer=full.tokenizer, text_encoder=full.text_encoder, transformer=None, vae=None,
                      scheduler=full.scheduler)
    ref = pipe.encode_prompt(PROMPT, do_classifier_free_guidance=True, device=CPU)
    with anyflow.enable(pipe) as handle:
        assert type(pipe).__name__ == type(full).__name__ and handle._swapped  # the pipeline itself is enabled
        out = pipe.encode_prompt(PROMPT, do_classifier_free_guidance=True, device=CPU)
        for a, b in zip(out, ref):
            assert torch.equal(a, b)
        with pytest.raises(ValueError, match="transformer is None"):
            pipe(**_kw(kind))
    assert type(pipe) is type(full)


@pytest.mark.parametrize("kind", ["bidirectional", "far"])
def test_enable_without_vae_samples_latents(kind):
    full = _fresh_pipe(kind)
    pipe = type(full)(tokenizer=full.tokenizer, text_encoder=full.text_encoder, transformer=full.transformer,
                      vae=None, scheduler=full.scheduler)
    pipe.set_progress_bar_config(disable=True)
    with anyflow.enable(pipe):
        err = assert_rel_l2(_run(pipe, kind), _reference(kind), LATENT_TOL)
        with pytest.raises(ValueError, match="vae is None"):
            pipe(**dict(_kw(kind), output_type="pt"))
    print(f"[rel L2] {kind} without vae: {err:.3e}")


# ----------------------------------------------------------------------------------------------
# 2. signature and docstring of the call
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["bidirectional", "far"])
def test_call_keeps_signature_and_docstring(kind):
    pipe = _fresh_pipe(kind)
    cls = type(pipe)
    sig, doc = inspect.signature(pipe.__call__), pipe.__call__.__doc__
    assert "num_inference_steps" in sig.parameters and doc
    with anyflow.enable(pipe):
        assert type(pipe) is not cls
        assert inspect.signature(pipe.__call__) == sig
        assert pipe.__call__.__doc__ == doc
        assert inspect.signature(type(pipe).__call__) == inspect.signature(cls.__call__)
        assert pipe.__call__.__name__ == "__call__"
        # positional arguments bind as in diffusers: (prompt, video, video_latents, negative_prompt, height, ...)
        kw = _kw(kind)
        out = pipe(kw.pop("prompt"), None, None, None, kw.pop("height"), kw.pop("width"),
                   generator=torch.Generator().manual_seed(0), **kw)
    assert inspect.signature(pipe.__call__) == sig
    assert_rel_l2(out.frames, _reference(kind), LATENT_TOL)


# ----------------------------------------------------------------------------------------------
# 3. offloading: bare transformers, one forward
# ----------------------------------------------------------------------------------------------
def _bidirectional_forward(model):
    b, f = 2, 3
    x = _randn(b, f, 16, 8, 8, seed=11)
    t = 1000 * torch.rand(b, f, generator=torch.Generator().manual_seed(12), dtype=torch.float64)
    text = _randn(b, 9, 32, seed=13)
    return model(x, t, 0.6 * t, text).sample


def _far_training_forward(model):
    cp = [1, 2, 2, 1]
    b, f = 2, sum(cp)
    x = _randn(b, f, 16, 8, 8, seed=21)
    t = 1000 * torch.rand(b, f, generator=torch.Generator().manual_seed(22), dtype=torch.float64)
    t[:, :1] = 0
    text = _randn(b, 9, 32, seed=23)
    return model(x, t, 0.5 * t, text, chunk_partition=cp).sample


def _far_cached_forward(model):
    """Two cache steps then a mask-free KV-cache step (diffusers' cache format)."""
    cp, (b, h, w) = [1, 2, 2], (2, 8, 8)
    cfg = model.config
    latents = _randn(b, sum(cp), 16, h, w, seed=31)
    text = _randn(b, 9, 32, seed=32)
    shape = lambda n: (2, b, cfg.num_attention_heads, n, cfg.attention_head_dim)  # noqa: E731
    cache = [{"full_cache": torch.zeros(shape(cfg.full_chunk_limit * 2 * 16)),
              "compressed_cache": torch.zeros(shape((len(cp) - cfg.full_chunk_limit + 1) * 2 * 4))} for _ in range(cfg.num_layers)]
    flag = {"num_cached_chunks": 0, "is_cache_step": False}
    for j in range(len(cp) - 1):
        f = sum(cp[: j + 1])
        zeros = torch.zeros(b, f, dtype=torch.long)
        model(latents[:, :f], zeros, zeros, text, chunk_partition=cp[: j + 1], kv_cache=cache,
              kv_cache_flag=dict(flag, is_cache_step=True))
        flag["num_cached_chunks"] += 1
    t = torch.full((b, cp[-1]), 937.5, dtype=torch.float64)
    out = model(_randn(b, cp[-1], 16, h, w, seed=33), t, 0.8 * t, text, chunk_partition=cp, kv_cache=cache,
                kv_cache_flag=dict(flag)).sample
    return torch.cat([out.flatten()] + [c[k].flatten() for c in cache for k in ("full_cache", "compressed_cache")])


FORWARDS = {
    "bidirectional": ("bidirectional", _bidirectional_forward),
    "far-training": ("far", _far_training_forward),
    "far-cached": ("far", _far_cached_forward),
}


@pytest.mark.parametrize("order", ["offload-then-enable", "enable-then-offload"])
@pytest.mark.parametrize("form", list(MODEL_FORMS))
@pytest.mark.parametrize("case", list(FORWARDS))
def test_offloaded_transformer_forward_matches_diffusers(case, form, order, poisoned_offload):
    kind, forward = FORWARDS[case]
    model = tiny_transformer(kind, seed=3)
    with torch.no_grad(), official_far_semantics():
        ref = forward(model)
        if order == "offload-then-enable":
            MODEL_FORMS[form](model)
            handle = anyflow.enable(model)
        else:
            handle = anyflow.enable(model)
            MODEL_FORMS[form](model)
        calls = []
        real = anyflow.models.blocks.run_blocks
        try:  # the fused forward runs (not diffusers' behind the hook)
            anyflow.models.blocks.run_blocks = lambda *a, **k: calls.append(1) or real(*a, **k)
            out = forward(model)
        finally:
            anyflow.models.blocks.run_blocks = real
        assert calls, "the enabled forward did not run"
        err = assert_rel_l2(out, ref, FWD_TOL)
        handle.disable()  # diffusers again, still offloaded
        assert_rel_l2(forward(model), ref, FWD_TOL)
    print(f"[rel L2] {case} {form} {order}: {err:.3e}")


def test_block_offload_onloads_in_diffusers_order(poisoned_offload):
    """Block-level groups are onloaded in the order of a diffusers forward (what stream prefetching records)."""
    model = tiny_transformer("bidirectional", seed=3, num_layers=3)
    MODEL_FORMS["block"](model)
    with torch.no_grad():
        poisoned_offload.clear()
        _bidirectional_forward(model)
        theirs = list(poisoned_offload)
        with anyflow.enable(model):
            poisoned_offload.clear()
            _bidirectional_forward(model)
            ours = list(poisoned_offload)
    assert theirs[0].offload_leader is model and len(theirs) == 4  # everything outside the blocks, then 3 blocks
    assert [id(g) for g in ours] == [id(g) for g in theirs]


# ----------------------------------------------------------------------------------------------
# 3. offloading: whole pipelines
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("order", ["offload-then-enable", "enable-then-offload"])
@pytest.mark.parametrize("form", list(PIPE_FORMS))
@pytest.mark.parametrize("kind", ["bidirectional", "far"])
def test_offloaded_pipeline_matches_diffusers(kind, form, order, poisoned_offload):
    pipe = _fresh_pipe(kind)
    if order == "offload-then-enable":
        PIPE_FORMS[form](pipe)
        handle = anyflow.enable(pipe, cuda_graphs=True)
    else:
        handle = anyflow.enable(pipe, cuda_graphs=True)
        PIPE_FORMS[form](pipe)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = _run(pipe, kind)
        again = _run(pipe, kind)
    graph_warnings = [w for w in caught if "cuda_graphs" in str(w.message)]
    assert len(graph_warnings) == 1, [str(w.message) for w in caught]
    assert pipe.anyflow_stats.nfe > 0
    err = assert_rel_l2(out, _reference(kind), LATENT_TOL)
    assert torch.equal(out, again)
    handle.disable()
    print(f"[rel L2] {kind} {form} {order}: {err:.3e}")


# ----------------------------------------------------------------------------------------------
# GPU: CUDA streams (prefetching)
# ----------------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("offload_type", ["block_level", "leaf_level"])
@pytest.mark.parametrize("kind", ["bidirectional", "far"])
def test_stream_group_offload_matches_diffusers_gpu(kind, offload_type):
    cuda = torch.device("cuda")
    ref_pipe = _fresh_pipe(kind).to(cuda)
    ref = _run(ref_pipe, kind)
    del ref_pipe
    pipe = _fresh_pipe(kind)
    extra = {"num_blocks_per_group": 1} if offload_type == "block_level" else {}
    pipe.enable_group_offload(cuda, offload_device=CPU, offload_type=offload_type, use_stream=True, **extra)
    with anyflow.enable(pipe):
        outs = [_run(pipe, kind) for _ in range(2)]  # the first call records the prefetch order, the second uses it
    for out in outs:
        assert out.device.type == "cuda"
        err = assert_rel_l2(out, ref, LATENT_TOL)
        print(f"[rel L2] {kind} {offload_type} streams: {err:.3e}")
