"""anyflow.samplers: the enabled AnyFlow pipelines against diffusers 0.42.1 (CPU, tiny models, fp32 / bf16).

References: the bidirectional fast sampler is compared with plain diffusers ``AnyFlowPipeline``; the FAR
sampler with diffusers ``AnyFlowFARPipeline`` run inside
:func:`anyflow.testing.official.official_far_semantics` (diffusers 0.42.1 adds zero-padded keys to the
mask-free KV-cache step; the context removes them, which is the official AnyFlow model). Both runs get
the same seeded generator and ``output_type="latent"``. fp32: relative L2 <= 1e-4 (conventions rule 2);
bf16: SQNR >= 30 dB after 4 steps (rule 3). Bitwise equality with diffusers is not expected (the fast
sampler keeps an fp32 master latent and fuses the update), except where a test says so: after
``handle.disable()`` the pipeline *is* diffusers again.

Every measured figure is printed (``pytest -s`` shows them) and is in each assertion message.
"""

from __future__ import annotations

import contextlib
import functools
from pathlib import Path

import pytest
import torch

import anyflow
from anyflow.io import read_image, read_video
from anyflow.models import far as kv_cache_mod
from anyflow.testing.host_reads import HostReads
from anyflow.testing.official import official_far_semantics
from anyflow.models.tiny import tiny_pipeline
from anyflow.testing.tolerances import assert_rel_l2, rel_l2, sqnr_db

H = W = 32  # latent 4x4: 4 full tokens and 1 compressed token per frame
FP32_TOL = 1e-4
BF16_MIN_SQNR_DB = 30.0
REAL_CP = [1, 3, 3, 3, 3, 3, 3, 2]  # the released checkpoints' partition (81 pixel frames)
SHORT_CP = [1, 2, 2, 1]  # 21 pixel frames; 4 chunks keep the compressed branch alive (full_chunk_limit 3)
BIDIR_FRAMES = 21
PROMPT = "a red panda eating bamboo in the forest"


# ----------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def _pipe(kind: str, dtype: torch.dtype = torch.float32):
    """One tiny diffusers pipeline per (kind, dtype) for the whole module; tests enable it in a ``with``."""
    pipe = tiny_pipeline(kind, seed=0, dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _is_enabled(pipe) -> bool:
    return getattr(type(pipe), "_anyflow_original_class", None) is not None


def _pixel_frames(latent_frames: int) -> int:
    return 4 * (latent_frames - 1) + 1


def _kw(kind: str, steps: int = 2, cp=None, **extra) -> dict:
    """Call arguments shared by the reference and the enabled run (the generator is added per run)."""
    kw = dict(prompt=PROMPT, height=H, width=W, num_inference_steps=steps, output_type="latent")
    if kind == "far":
        cp = list(cp or SHORT_CP)
        kw.update(chunk_partition=cp, num_frames=_pixel_frames(sum(cp)))
    else:
        kw.update(num_frames=BIDIR_FRAMES)
    kw.update(extra)
    return kw


def _reference(pipe, seed: int = 0, **kw):
    """diffusers itself (FAR: with the official semantics of the KV-cache step)."""
    assert not _is_enabled(pipe), "the reference must run on a pipeline that is not enabled"
    far = type(pipe).__name__ == "AnyFlowFARPipeline"
    with official_far_semantics() if far else contextlib.nullcontext():
        return pipe(generator=torch.Generator().manual_seed(seed), **kw).frames


def _enabled(pipe, seed: int = 0, **kw):
    with anyflow.enable(pipe):
        return pipe(generator=torch.Generator().manual_seed(seed), **kw).frames


def _check_fp32(case: str, out, ref) -> float:
    assert out.shape == ref.shape, f"{case}: shape {tuple(out.shape)} != diffusers {tuple(ref.shape)}"
    err = rel_l2(out, ref)
    print(f"[rel L2] {case}: {err:.3e}")
    try:
        assert_rel_l2(out, ref, FP32_TOL)
    except AssertionError as exc:
        raise AssertionError(f"{case}: {exc}") from None
    return err


def _eval_file(sub: str, name: str) -> Path:
    from anyflow.training.data import eval_data_root

    try:
        path = eval_data_root() / sub / name
    except FileNotFoundError as exc:  # same reason as the eval_data marker of conftest.py
        pytest.skip(f"needs the evaluation data (anyflow_eval), which the repository does not ship: {exc}")
    if not path.is_file():
        pytest.skip(f"evaluation file {path} is absent")
    return path


def _conditioning(mode: str, index: int, pixel_frames: int = 1) -> torch.Tensor:
    """Real I2V image / V2V video from the evaluation set, resized to the tiny size."""
    if mode == "i2v":
        video = read_image(_eval_file("images", f"{index}.jpg"), H, W)
    else:
        video = read_video(_eval_file("videos", f"{index}.mp4"), H, W, num_frames=pixel_frames)
        assert video.shape[1] == pixel_frames, f"{index}.mp4 gave {video.shape[1]} frames, wanted {pixel_frames}"
    assert video.shape[2:] == (3, H, W) and 0.0 <= video.min() and video.max() <= 1.0
    assert video.std() > 0.01, "conditioning frames should be a real picture, not a flat one"
    return video


# ----------------------------------------------------------------------------------------------
# T2V vs diffusers, 1 / 2 / 4 / 8 steps
# ----------------------------------------------------------------------------------------------
T2V_CASES = (
    [("bidirectional", None, s) for s in (1, 2, 4, 8)]
    + [("far", SHORT_CP, s) for s in (1, 2, 4, 8)]
    + [("far", REAL_CP, s) for s in (1, 2, 4, 8)]
    + [("far", [2, 2, 1], 2), ("far", [1, 2], 4)]
)


@pytest.mark.parametrize(
    "kind, cp, steps", T2V_CASES, ids=[f"{k}-{'x'.join(map(str, c or []))}-{s}step" for k, c, s in T2V_CASES]
)
def test_t2v_matches_diffusers(kind, cp, steps):
    pipe = _pipe(kind)
    kw = _kw(kind, steps, cp)
    ref = _reference(pipe, seed=steps, **kw)
    out = _enabled(pipe, seed=steps, **kw)
    _check_fp32(f"T2V {kind} cp={cp} steps={steps}", out, ref)


# ----------------------------------------------------------------------------------------------
# I2V / V2V with the real evaluation images and videos
# ----------------------------------------------------------------------------------------------
# (kind, mode, steps, chunk partition, file index, pixel frames of the conditioning)
COND_CASES = (
    [("far", "i2v", s, SHORT_CP, i, 1) for i, s in enumerate((1, 2, 4, 8), start=1)]
    + [("far", "i2v", s, REAL_CP, i, 1) for i, s in ((5, 1), (6, 2), (7, 4), (8, 8))]
    # 5 pixel frames = 2 latent frames: the context ends inside chunk 1 of [1, 2, 2, 1]
    # 9 pixel frames = 3 latent frames: exactly chunks 0 and 1
    + [("far", "v2v", s, SHORT_CP, i, n) for (i, s, n) in ((1, 1, 5), (2, 2, 9), (3, 4, 5), (4, 8, 9))]
    + [("far", "v2v", 2, [2, 2, 1], 5, 5)]
    + [("far", "v2v", s, REAL_CP, i, n) for (i, s, n) in ((6, 1, 9), (7, 2, 5), (8, 4, 9), (1, 8, 9))]
    + [("bidirectional", "i2v", s, None, i, 1) for i, s in ((1, 1), (3, 2), (6, 4), (8, 8))]
    + [("bidirectional", "v2v", s, None, i, n) for (i, s, n) in ((2, 1, 5), (7, 2, 9), (5, 4, 5), (3, 8, 9))]
)


@pytest.mark.parametrize(
    "kind, mode, steps, cp, index, frames",
    COND_CASES,
    ids=[f"{k}-{m}-{'x'.join(map(str, c or []))}-{s}step-file{i}-{n}f" for k, m, s, c, i, n in COND_CASES],
)
def test_i2v_v2v_real_data_matches_diffusers(kind, mode, steps, cp, index, frames):
    video = _conditioning(mode, index, frames)
    pipe = _pipe(kind)
    kw = _kw(kind, steps, cp, video=video)
    ref = _reference(pipe, seed=index, **kw)
    out = _enabled(pipe, seed=index, **kw)
    _check_fp32(f"{mode.upper()} {kind} cp={cp} steps={steps} file={index} frames={frames}", out, ref)
    # the context frames come back as the VAE encoding of the conditioning, unchanged by sampling
    n_ctx = (frames - 1) // 4 + 1
    with torch.no_grad():
        ctx = pipe.encode_video(video, height=H, width=W).permute(0, 2, 1, 3, 4)
    torch.testing.assert_close(out[:, :, :n_ctx], ctx, rtol=0, atol=1e-6)


# ----------------------------------------------------------------------------------------------
# custom schedules, CFG, batching, use_mean_velocity=False
# ----------------------------------------------------------------------------------------------
OPTIONS = {
    "sigmas": dict(sigmas=[1.0, 0.8, 0.5, 0.2]),
    "timesteps": dict(timesteps=[999.0, 750.0, 400.0, 120.0]),
    "cfg": dict(guidance_scale=4.0, negative_prompt="blurry dark scene"),
    "num_videos_per_prompt": dict(num_videos_per_prompt=2),
    "prompt_list": dict(prompt=[PROMPT, "a blue boat on the sea at sunset"]),
    "prompt_list_cfg": dict(
        prompt=[PROMPT, "a blue boat on the sea at sunset"], negative_prompt=["dark", "blurry"], guidance_scale=2.5
    ),
    "no_mean_velocity": dict(use_mean_velocity=False),
}


@pytest.mark.parametrize("option", list(OPTIONS))
@pytest.mark.parametrize("kind", ["bidirectional", "far"])
def test_options_match_diffusers(kind, option):
    pipe = _pipe(kind)
    kw = _kw(kind, 2, **OPTIONS[option])
    ref = _reference(pipe, **kw)
    out = _enabled(pipe, **kw)
    if option in ("num_videos_per_prompt", "prompt_list", "prompt_list_cfg"):
        assert out.shape[0] == 2
        assert rel_l2(out[0], out[1]) > 1e-2, "the two videos of the batch should differ"
    _check_fp32(f"{option} {kind}", out, ref)


# ----------------------------------------------------------------------------------------------
# bf16
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind, cp", [("bidirectional", None), ("far", SHORT_CP), ("far", REAL_CP)])
def test_bf16_sqnr(kind, cp):
    pipe = _pipe(kind, torch.bfloat16)
    kw = _kw(kind, 4, cp)
    ref = _reference(pipe, **kw)
    out = _enabled(pipe, **kw)
    assert out.dtype == ref.dtype == torch.bfloat16 and out.shape == ref.shape
    assert torch.isfinite(out.float()).all()
    db = sqnr_db(ref, out)
    print(f"[SQNR] bf16 {kind} cp={cp} 4 steps: {db:.2f} dB")
    assert db >= BF16_MIN_SQNR_DB, f"bf16 {kind} cp={cp}: SQNR {db:.2f} dB < {BF16_MIN_SQNR_DB} dB"


# ----------------------------------------------------------------------------------------------
# streaming
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["t2v", "i2v"])
def test_stream_latents_equal_call(mode):
    pipe = _pipe("far")
    extra = {} if mode == "t2v" else {"video": _conditioning("i2v", 7)}
    kw = _kw("far", 2, **extra)
    with anyflow.enable(pipe):
        full = pipe(generator=torch.Generator().manual_seed(0), **kw).frames  # [B, C, F, h, w]
        items = list(pipe.stream(generator=torch.Generator().manual_seed(0), **kw))
    full = full.permute(0, 2, 1, 3, 4)
    assert [it["chunk"] for it in items] == list(range(len(SHORT_CP)))
    f0 = 0
    for it, n in zip(items, SHORT_CP):
        assert it["frames"] == (f0, f0 + n)
        assert "video" not in it
        assert it["latents"].shape == (1, n, 16, H // 8, W // 8)
        assert torch.equal(it["latents"], full[:, f0 : f0 + n]), f"chunk {it['chunk']} differs from pipe(...)"
        f0 += n
    torch.testing.assert_close(torch.cat([it["latents"] for it in items], dim=1), full, rtol=0, atol=0)


def test_stream_decode_frames_matches_whole_video_decode():
    pipe = _pipe("far")
    kw = _kw("far", 2)
    with anyflow.enable(pipe):
        whole = pipe(generator=torch.Generator().manual_seed(0), **dict(kw, output_type="pt")).frames
        items = list(pipe.stream(generator=torch.Generator().manual_seed(0), decode_frames=True, **kw))
    n_pixel = _pixel_frames(sum(SHORT_CP))
    assert whole.shape == (1, n_pixel, 3, H, W)
    expected = [1] + [4 * n for n in SHORT_CP[1:]]  # Wan VAE: 1 pixel frame for latent 0, then 4 per latent
    assert [it["video"].shape[1] for it in items] == expected
    for it in items:
        assert it["video"].shape[0] == 1 and it["video"].shape[2:] == (3, H, W)
    streamed = torch.cat([it["video"] for it in items], dim=1)
    assert streamed.shape == whole.shape
    err = rel_l2(streamed, whole)
    print(f"[rel L2] stream decode_frames vs whole-video decode: {err:.3e}")
    torch.testing.assert_close(streamed, whole, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------------------
# callbacks
# ----------------------------------------------------------------------------------------------
def _recorder(calls: list, transform=None):
    def cb(pipe, i, t, kwargs):
        calls.append((i, float(t), kwargs["latents"].detach().clone()))
        return {} if transform is None else {"latents": transform(i, kwargs["latents"])}

    return cb


@pytest.mark.parametrize("kind, mode", [("bidirectional", "t2v"), ("far", "t2v"), ("far", "i2v"), ("far", "v2v")])
def test_callback_once_per_step_per_chunk(kind, mode):
    steps = 2
    extra = {}
    if mode == "i2v":
        extra["video"] = _conditioning("i2v", 8)
    elif mode == "v2v":
        extra["video"] = _conditioning("v2v", 8, 9)  # 3 latent frames = chunks 0 and 1 of [1, 2, 2, 1]
    pipe = _pipe(kind)
    ours, theirs = [], []
    kw = _kw(kind, steps, **extra)
    _reference(pipe, callback_on_step_end=_recorder(theirs), **kw)
    _enabled(pipe, callback_on_step_end=_recorder(ours), **kw)
    if kind == "far":
        n_ctx_chunks = {"t2v": 0, "i2v": 1, "v2v": 2}[mode]
        sampled = SHORT_CP[n_ctx_chunks:]
    else:
        sampled = [BIDIR_FRAMES // 4 + 1]
    assert [c[0] for c in ours] == list(range(steps)) * len(sampled)
    assert [tuple(c[2].shape) for c in ours] == [(1, n, 16, H // 8, W // 8) for n in sampled for _ in range(steps)]
    assert len(ours) == len(theirs)
    for j, ((i, t, z), (i_ref, t_ref, z_ref)) in enumerate(zip(ours, theirs)):
        assert i == i_ref and t == pytest.approx(t_ref, abs=1e-3), (j, i, t, i_ref, t_ref)
        _check_fp32(f"callback latents {kind} {mode} call {j}", z, z_ref)


@pytest.mark.parametrize("kind", ["bidirectional", "far"])
def test_callback_returned_latents_are_honoured(kind):
    steps = 3
    pipe = _pipe(kind)
    kw = _kw(kind, steps)

    def halve_first(i, z):
        return z * 0.5 if i == 0 else z

    ref = _reference(pipe, callback_on_step_end=_recorder([], halve_first), **kw)
    out = _enabled(pipe, callback_on_step_end=_recorder([], halve_first), **kw)
    plain = _enabled(pipe, **kw)
    assert rel_l2(out, plain) > 1e-2, "halving the latents after step 0 must change the result"
    _check_fp32(f"callback halving latents after step 0, {kind}", out, ref)

    def zero_last(i, z):
        return torch.zeros_like(z) if i == steps - 1 else z

    zeroed = _enabled(pipe, callback_on_step_end=_recorder([], zero_last), **kw)
    assert zeroed.shape == plain.shape and zeroed.abs().max().item() == 0.0


# ----------------------------------------------------------------------------------------------
# decoded output types
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("output_type", ["np", "pt"])
@pytest.mark.parametrize("kind", ["bidirectional", "far"])
def test_output_types_match_diffusers(kind, output_type):
    pipe = _pipe(kind)
    kw = _kw(kind, 2, output_type=output_type)
    ref = _reference(pipe, **kw)
    out = _enabled(pipe, **kw)
    assert type(out) is type(ref)
    assert out.shape == ref.shape
    n = _pixel_frames(sum(SHORT_CP)) if kind == "far" else BIDIR_FRAMES
    assert tuple(out.shape) == ((1, n, H, W, 3) if output_type == "np" else (1, n, 3, H, W))
    if output_type == "np":
        out, ref = torch.from_numpy(out), torch.from_numpy(ref)
    _check_fp32(f"decoded output_type={output_type} {kind}", out, ref)


# ----------------------------------------------------------------------------------------------
# enable / disable
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["bidirectional", "far"])
def test_disable_restores_diffusers_bit_for_bit(kind):
    pipe = _pipe(kind)
    pipe_cls, model_cls = type(pipe), type(pipe.transformer)
    kw = _kw(kind, 2, guidance_scale=2.0, negative_prompt="dark")
    before = pipe(generator=torch.Generator().manual_seed(5), **kw).frames  # shipped diffusers (no patch)
    state = {k: v.clone() for k, v in pipe.transformer.state_dict().items()}
    handle = anyflow.enable(pipe)
    try:
        assert type(pipe) is not pipe_cls and type(pipe.transformer) is not model_cls
        assert type(pipe).__name__ == pipe_cls.__name__ and isinstance(pipe, pipe_cls)
        enabled_state = pipe.transformer.state_dict()
        assert enabled_state.keys() == state.keys()
        for key, value in state.items():
            assert enabled_state[key].dtype == value.dtype and torch.equal(enabled_state[key], value), key
        pipe(generator=torch.Generator().manual_seed(5), **kw)
        if kind == "far":
            next(iter(pipe.stream(generator=torch.Generator().manual_seed(5), **kw)))
    finally:
        handle.disable()
    handle.disable()  # idempotent
    assert type(pipe) is pipe_cls and type(pipe.transformer) is model_cls
    assert not hasattr(pipe, "stream")
    after = pipe(generator=torch.Generator().manual_seed(5), **kw).frames
    assert torch.equal(after, before), f"after disable: rel L2 {rel_l2(after, before):.3e} vs diffusers"
    for key, value in pipe.transformer.state_dict().items():
        assert torch.equal(value, state[key]), key


# ----------------------------------------------------------------------------------------------
# FAR KV cache
# ----------------------------------------------------------------------------------------------
def _capture_caches(monkeypatch) -> list:
    caches = []
    original = kv_cache_mod.FARKVCache.__init__

    def init(self, *args, **kwargs):
        original(self, *args, **kwargs)
        caches.append(self)

    monkeypatch.setattr(kv_cache_mod.FARKVCache, "__init__", init)
    return caches


def test_far_kv_cache_is_never_concatenated(monkeypatch):
    caches = _capture_caches(monkeypatch)
    calls, offending = [], []

    def cache_storages():
        return {t.untyped_storage().data_ptr() for c in caches for t in (c.k, c.v)}

    def spy(original, name):
        def wrapped(tensors, *args, **kwargs):
            tensors = list(tensors)
            calls.append(name)
            shared = cache_storages()
            if any(isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() in shared for t in tensors):
                offending.append((name, [tuple(t.shape) for t in tensors]))
            return original(tensors, *args, **kwargs)

        return wrapped

    for name in ("cat", "concat", "concatenate"):
        monkeypatch.setattr(torch, name, spy(getattr(torch, name), name))
    pipe = _pipe("far")
    # CFG makes the sampler itself call torch.cat (model batch [uncond; cond]): proves the spy is live
    _enabled(pipe, **_kw("far", 2, REAL_CP, guidance_scale=3.0, negative_prompt="dark"))
    assert len(caches) == 1, f"expected one FARKVCache per generation, got {len(caches)}"
    assert calls, "the torch.cat spy saw no call at all"
    assert not offending, f"torch.cat called on FAR KV-cache storage: {offending[:5]}"
    # the spy does recognise the cache: concatenating two of its views is reported
    k = caches[0].k
    torch.cat([k[0, :, :, :2], k[0, :, :, 2:4]], dim=2)
    assert len(offending) == 1


@pytest.mark.parametrize("kind", ["bidirectional", "far"])
def test_no_host_sync_per_step(kind):
    """The sampling loop reads no tensor value on the host per step: the scalar reads of a whole call
    (prompt encoding, timestep set-up) do not grow with the number of steps."""
    pipe = _pipe(kind)
    counts = {}
    with anyflow.enable(pipe):
        for steps in (2, 8):
            with HostReads() as mode:
                pipe(generator=torch.Generator().manual_seed(0), **_kw(kind, steps, REAL_CP if kind == "far" else None))
            counts[steps] = mode.count
    assert counts[2] == counts[8], f"scalar reads grow with the step count: {counts}"
    with HostReads() as mode:  # the counter is live
        torch.randn(3).sum().item()
    assert mode.count == 1


def test_kv_capacity_real_partition():
    """480x832 Wan geometry: 1560 full / 390 compressed tokens per frame, full_chunk_limit 3."""
    # chunk 6's NFE: compressed chunks 0-3 (10 frames x 390) + full chunks 4-5 (6 x 1560) + current (3 x 1560)
    assert kv_cache_mod.kv_capacity(REAL_CP, 3, 1560, 390) == 3900 + 9360 + 4680 == 17940
    # the largest cache step (after chunk 6: compressed chunks 0-4, full chunks 5-6) is smaller
    assert 13 * 390 + 6 * 1560 == 14430 < 17940


@pytest.mark.parametrize("height, width", [(32, 32), (64, 96)])
def test_kv_capacity_equals_what_the_sampler_uses(monkeypatch, height, width):
    """The preallocated capacity is the largest token index the sampler writes or attends to, no more."""
    caches = _capture_caches(monkeypatch)
    ends = []
    original_write, original_segments = kv_cache_mod.FARKVCache.write, kv_cache_mod.FARKVCache.segments

    def write(self, layer, start, k, v):
        ends.append(start + k.shape[1])
        return original_write(self, layer, start, k, v)

    def segments(self, layer, end):
        ends.append(end)
        return original_segments(self, layer, end)

    monkeypatch.setattr(kv_cache_mod.FARKVCache, "write", write)
    monkeypatch.setattr(kv_cache_mod.FARKVCache, "segments", segments)
    _enabled(_pipe("far"), **_kw("far", 1, REAL_CP, height=height, width=width))
    full_tpf = (height // 16) * (width // 16)
    compressed_tpf = (height // 32) * (width // 32)
    expected = kv_cache_mod.kv_capacity(REAL_CP, 3, full_tpf, compressed_tpf)
    assert len(caches) == 1 and caches[0].capacity == expected
    assert max(ends) == expected, f"sampler needs {max(ends)} tokens, kv_capacity gives {expected}"


# ----------------------------------------------------------------------------------------------
# errors
# ----------------------------------------------------------------------------------------------
BOTH = ("bidirectional", "far")
ERROR_CASES = [
    ("far", dict(chunk_partition=[1, 2, 2]), ValueError, r"chunk_partition=\[1, 2, 2\] sums to 5 but there are 6"),
    ("far", dict(chunk_partition=[1, 2, 2, 1, 1]), ValueError, r"sums to 7 but there are 6 latent frames"),
    ("far", dict(use_kv_cache=False), ValueError, r"use_kv_cache=False"),
    *[(k, dict(height=40), ValueError, r"divisible by 16") for k in BOTH],
    *[(k, dict(width=24), ValueError, r"divisible by 16") for k in BOTH],
    *[(k, dict(prompt=[]), ValueError, r"prompt must not be an empty list") for k in BOTH],
    *[
        (k, dict(num_inference_steps=n), ValueError, rf"num_inference_steps must be in \[1, 1000\], got {n}")
        for k in BOTH
        for n in (0, -1)
    ],
    *[(k, dict(sigmas=[0.5, 0.8]), ValueError, r"sigmas must be strictly decreasing") for k in BOTH],
    *[(k, dict(sigmas=[0.8, 0.8, 0.1]), ValueError, r"sigmas must be strictly decreasing") for k in BOTH],
    *[(k, dict(timesteps=[1500.0, 500.0]), ValueError, r"timesteps must lie in \[0.0, 1000.0\]") for k in BOTH],
    *[(k, dict(timesteps=[500.0, -5.0]), ValueError, r"timesteps must lie in") for k in BOTH],
    *[(k, dict(latents=torch.empty(1, 16, 6, 4, 4, device="meta")), ValueError, r"latents is on meta") for k in BOTH],
    *[(k, dict(latents=torch.randn(16, 6, 4, 4)), ValueError, r"latents must have 5 dimensions") for k in BOTH],
]


@pytest.mark.parametrize(
    "kind, extra, exc, match",
    ERROR_CASES,
    ids=[f"{k}-{'-'.join(e)}-{i}" for i, (k, e, _, _) in enumerate(ERROR_CASES)],
)
def test_bad_input_raises_clear_error(kind, extra, exc, match):
    pipe = _pipe(kind)
    with anyflow.enable(pipe), pytest.raises(exc, match=match):
        pipe(generator=torch.Generator().manual_seed(0), **_kw(kind, 2, **extra))
    assert not _is_enabled(pipe)


@pytest.mark.parametrize("kind", ["bidirectional", "far"])
def test_model_cpu_offload_keeps_working(kind):
    """The sampler calls submodules directly, so it must trigger accelerate's offload hook itself."""
    pipe = tiny_pipeline(kind, seed=0)  # fresh: offload hooks must not leak into the shared pipelines
    pipe.set_progress_bar_config(disable=True)
    kw = _kw(kind, steps=2, cp=[1, 2, 2, 1] if kind == "far" else None)
    ref = _reference(pipe, **kw)
    pipe.enable_model_cpu_offload(device="cpu")
    hook_cls = type(pipe.transformer._hf_hook)
    seen = []
    orig = hook_cls.pre_forward

    def spy(self, module, *args, **kwargs):
        seen.append(type(module).__name__)
        return orig(self, module, *args, **kwargs)

    hook_cls.pre_forward = spy
    try:
        out = _enabled(pipe, **kw)
    finally:
        hook_cls.pre_forward = orig
    assert type(pipe.transformer).__name__ in seen
    _check_fp32(f"{kind} offload", out, ref)


def test_sequential_offload_is_refused():
    pipe = tiny_pipeline("bidirectional", seed=0)
    pipe.transformer.proj_out.to("meta")  # what sequential offload leaves behind between calls
    with anyflow.enable(pipe):
        with pytest.raises(ValueError, match="sequential CPU offload"):
            pipe(**_kw("bidirectional", steps=1))


@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("kind", ["bidirectional", "far"])
def test_kernel_backends_match_diffusers(kind, backend):
    """The whole sampler on the Triton kernels (CPU interpreter) and the CUDA backend's C++ CPU twins."""
    from anyflow.ops import registry

    if registry.backend_reason(backend):
        pytest.skip(f"{backend} backend unavailable: {registry.backend_reason(backend)}")
    pipe = _pipe(kind)
    kw = _kw(kind, steps=2, cp=[1, 2, 2, 1] if kind == "far" else None)
    ref = _reference(pipe, **kw)
    with anyflow.enable(pipe, backend=backend):
        out = pipe(generator=torch.Generator().manual_seed(0), **kw).frames
    _check_fp32(f"{kind} {backend}", out, ref)
