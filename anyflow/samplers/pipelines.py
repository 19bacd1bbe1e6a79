"""Drop-in ``__call__`` for diffusers ``AnyFlowPipeline`` / ``AnyFlowFARPipeline``, plus ``stream``.

These functions become methods of an enabled pipeline (see :func:`anyflow.enable`). They accept the
diffusers 0.42 arguments and return the same outputs; the pipeline's own helpers do prompt encoding,
noise, VAE encode/decode, progress bars and callbacks. What changes is the denoising loop: per-frame
time-pair conditioning, prompt-constant cross-attention K/V computed once, an fp32 master latent with
the fused Euler/CFG update, (FAR) the :class:`~anyflow.models.far.FARKVCache`, and, when enabled
with ``cuda_graphs=True`` / ``attention=...``, CUDA-graph replay of the per-step forward
(:mod:`~anyflow.samplers.graphs`) and the SDPA kernel policy (:mod:`anyflow.ops.sdpa`).

Differences from diffusers 0.42.1, on purpose:

* the latent between steps is fp32 (diffusers rounds it to the model dtype every step); the returned
  latents / decoded video are computed from it. In fp32 both agree to rounding; in bf16 they differ by
  the rounding diffusers adds (tests bound it by SQNR).
* FAR KV-cache inference steps attend only to real cached keys (official AnyFlow semantics; diffusers
  0.42.1 adds zero-padded keys, see the README).
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass
from types import SimpleNamespace

import torch

from ..models import offload
from ..models.blocks import prepare_text
from ..models.far import check_chunk_partition
from . import bidirectional as bidirectional_sampler
from . import far as far_sampler
from .schedule import time_pairs


def _validate_tensor_arg(name, x, device, ndim=None):
    if x is None:
        return
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if ndim is not None and x.ndim != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating point tensor, got {x.dtype}")
    if x.device.type != torch.device(device).type:
        raise ValueError(f"{name} is on {x.device} but the pipeline runs on {device}")


def _onload(model) -> None:
    """Bring the transformer's weights to the execution device under ``enable_model_cpu_offload``.

    The sampler calls the transformer's submodules, not ``transformer.forward``, so accelerate's
    offload hook on ``forward`` would not fire; run its ``pre_forward`` once here. Group offloading and
    sequential CPU offload load weights per module: every fused forward fires those hooks itself
    (:mod:`anyflow.models.offload`).
    """
    if offload.is_offloaded(model):
        return
    if any(p.device.type == "meta" for p in model.parameters()):
        raise ValueError(
            "pipe.transformer has parameters on the meta device and no offload hooks to load them (what "
            "sequential CPU offload leaves behind once its hooks are removed, or an empty-weights model): "
            "load its weights, or enable the offload again"
        )
    hook = getattr(model, "_hf_hook", None)
    if hook is not None and hasattr(hook, "pre_forward"):
        hook.pre_forward(model)


def _cuda_graphs(pipe, model) -> bool:
    """``cuda_graphs`` of the enabled pipeline, off (with one warning per pipeline) under offloading:
    a graph cannot replay the weight transfers of the offload hooks."""
    wanted = getattr(pipe, "_anyflow_cuda_graphs", False)
    if wanted and offload.is_offloaded(model):
        if not pipe.__dict__.get("_anyflow_graphs_warned"):
            warnings.warn("anyflow: cuda_graphs=True is ignored while the transformer is offloaded "
                          "(group offloading / sequential CPU offload); the forwards run eagerly", stacklevel=3)
            pipe.__dict__["_anyflow_graphs_warned"] = True
        return False
    return wanted


@dataclass
class RunStats:
    """What the last call of an enabled pipeline did; stored as ``pipe.anyflow_stats``.

    Attributes:
        nfe: denoising transformer evaluations (CFG counts one per batched forward).
        cache_steps: FAR KV-cache steps (prefix re-encodes at t = r = 0).
        dit_seconds: wall time of the denoising loop including cache steps (excludes text encoding
            and VAE), synchronised once at its end.
        graph_replays: NFEs that replayed a captured CUDA graph (``cuda_graphs=True``; 0 when eager).
    """

    nfe: int = 0
    cache_steps: int = 0
    dit_seconds: float = 0.0
    graph_replays: int = 0


def _sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def _prepare(pipe, kw: dict) -> SimpleNamespace:
    """Everything before the denoising loop, through the pipeline's own helpers."""
    if pipe.transformer is None:
        raise ValueError("the pipeline's transformer is None: it can encode prompts (pipe.encode_prompt) but not "
                         "generate; build it with a transformer")
    prompt, negative_prompt = kw["prompt"], kw["negative_prompt"]
    if isinstance(prompt, list) and len(prompt) == 0:
        raise ValueError("prompt must not be an empty list")
    if isinstance(prompt, list) and not all(isinstance(p, str) for p in prompt):
        raise TypeError("prompt must be a str or a list of str")
    pipe.check_inputs(
        prompt, negative_prompt, kw["height"], kw["width"], kw["prompt_embeds"], kw["negative_prompt_embeds"],
        video=kw["video"], video_latents=kw["video_latents"],
        callback_on_step_end_tensor_inputs=kw["callback_on_step_end_tensor_inputs"],
    )
    device = pipe._execution_device
    for name, ndim in (("prompt_embeds", 3), ("negative_prompt_embeds", 3), ("latents", 5), ("video_latents", 5)):
        _validate_tensor_arg(name, kw[name], device, ndim=ndim)
    if isinstance(kw["video"], torch.Tensor):
        _validate_tensor_arg("video", kw["video"], kw["video"].device, ndim=5)

    p = SimpleNamespace()
    p.pairs = time_pairs(pipe.scheduler, kw["num_inference_steps"], kw["sigmas"], kw["timesteps"])
    num_frames = kw["num_frames"]
    vt = pipe.vae_scale_factor_temporal
    if num_frames % vt != 1:
        num_frames = num_frames // vt * vt + 1
    num_frames = max(num_frames, 1)
    pipe._guidance_scale = kw["guidance_scale"]
    pipe._attention_kwargs = kw["attention_kwargs"]
    pipe._interrupt = False
    pipe._num_timesteps = len(p.pairs)

    batch = kw["prompt_embeds"].shape[0] if prompt is None else 1 if isinstance(prompt, str) else len(prompt)
    prompt_embeds, negative_prompt_embeds = pipe.encode_prompt(
        prompt=prompt, negative_prompt=negative_prompt, do_classifier_free_guidance=pipe.do_classifier_free_guidance,
        num_videos_per_prompt=kw["num_videos_per_prompt"], prompt_embeds=kw["prompt_embeds"],
        negative_prompt_embeds=kw["negative_prompt_embeds"], max_sequence_length=kw["max_sequence_length"],
        device=device,
    )
    model = pipe.transformer
    _onload(model)
    dtype = model.dtype
    prompt_embeds = prompt_embeds.to(dtype)
    if negative_prompt_embeds is not None:
        negative_prompt_embeds = negative_prompt_embeds.to(dtype)
    p.prompt_embeds, p.negative_prompt_embeds = prompt_embeds, negative_prompt_embeds
    text = torch.cat([negative_prompt_embeds, prompt_embeds]) if negative_prompt_embeds is not None else prompt_embeds
    p.text = prepare_text(model, text, cache_kv=True)

    b = batch * kw["num_videos_per_prompt"]
    noise = pipe.prepare_latents(
        b, model.config.in_channels, kw["height"], kw["width"], num_frames, torch.float32, device,
        kw["generator"], kw["latents"],
    )
    # diffusers rounds the fp32 noise to the model dtype; start from the same point
    p.noise = noise.to(dtype).permute(0, 2, 1, 3, 4).float()
    if p.noise.shape[3:] != (kw["height"] // pipe.vae_scale_factor_spatial, kw["width"] // pipe.vae_scale_factor_spatial):
        raise ValueError(f"latents have spatial shape {tuple(p.noise.shape[3:])}, which does not match height/width")

    video_latents = kw["video_latents"]
    if kw["video"] is not None:
        video_latents = pipe.encode_video(kw["video"], height=kw["height"], width=kw["width"])
    if video_latents is not None and video_latents.shape[2:] != p.noise.shape[2:]:
        raise ValueError(
            f"video_latents must be [B, T, C, h, w] with (C, h, w) = {tuple(p.noise.shape[2:])}, got {tuple(video_latents.shape)}"
        )
    p.context = video_latents
    p.device = device
    return p


def _callback(pipe, kw, p: SimpleNamespace, i, t, z):
    cb = kw["callback_on_step_end"]
    if cb is None:
        return None
    tensors = {"latents": z, "prompt_embeds": p.prompt_embeds, "negative_prompt_embeds": p.negative_prompt_embeds}
    inputs = {k: tensors[k] for k in kw["callback_on_step_end_tensor_inputs"] or []}
    outputs = cb(pipe, i, torch.tensor(t, dtype=torch.float64), inputs) or {}
    return outputs.pop("latents", None)


def _finish(pipe, latents_bfchw: torch.Tensor, output_type: str, return_dict: bool):
    """Latents ``[B, F, C, h, w]`` -> diffusers output (decoded unless ``output_type == "latent"``)."""
    from diffusers.pipelines.anyflow.pipeline_output import AnyFlowPipelineOutput

    latents = latents_bfchw.permute(0, 2, 1, 3, 4)
    if output_type == "latent":
        video = latents.to(pipe.transformer.dtype)
    else:
        video = decode(pipe, latents, output_type)
    pipe.maybe_free_model_hooks()
    return AnyFlowPipelineOutput(frames=video) if return_dict else (video,)


def decode(pipe, latents_bcfhw: torch.Tensor, output_type: str = "np"):
    """Denormalise ``[B, C, F, h, w]`` latents and decode them with the pipeline's VAE."""
    vae = pipe.vae
    if vae is None:
        raise ValueError(f"the pipeline's vae is None: it cannot decode to output_type={output_type!r}; "
                         "pass output_type='latent'")
    latents = latents_bcfhw.to(vae.dtype)
    mean = torch.tensor(vae.config.latents_mean).view(1, vae.config.z_dim, 1, 1, 1).to(latents.device, latents.dtype)
    inv_std = 1.0 / torch.tensor(vae.config.latents_std).view(1, vae.config.z_dim, 1, 1, 1).to(latents.device, latents.dtype)
    video = vae.decode(latents / inv_std + mean, return_dict=False)[0]
    return pipe.video_processor.postprocess_video(video, output_type=output_type)


_COMMON = dict(
    prompt=None, video=None, video_latents=None, negative_prompt=None, height=480, width=832, num_frames=81,
    num_inference_steps=50, sigmas=None, timesteps=None, guidance_scale=1.0, num_videos_per_prompt=1,
    generator=None, latents=None, prompt_embeds=None, negative_prompt_embeds=None, output_type="np",
    return_dict=True, attention_kwargs=None, callback_on_step_end=None,
    callback_on_step_end_tensor_inputs=["latents"], max_sequence_length=512, use_mean_velocity=True,
)


def _collect(args, kwargs, extra=()):
    names = list(_COMMON) + [n for n, _ in extra]
    if len(args) > len(names):
        raise TypeError(f"too many positional arguments ({len(args)})")
    kw = dict(_COMMON, **dict(extra))
    for n, a in zip(names, args):
        kw[n] = a
    unknown = set(kwargs) - set(kw)
    if unknown:
        raise TypeError(f"unexpected keyword arguments: {sorted(unknown)}")
    kw.update(kwargs)
    if hasattr(kw["callback_on_step_end"], "tensor_inputs"):
        kw["callback_on_step_end_tensor_inputs"] = kw["callback_on_step_end"].tensor_inputs
    return kw


# ----------------------------------------------------------------------------------------------
# bidirectional
# ----------------------------------------------------------------------------------------------
@torch.no_grad()
def bidirectional_call(self, *args, **kwargs):
    """Fast ``AnyFlowPipeline.__call__`` (same arguments and outputs as diffusers 0.42).

    Raises:
        ValueError / TypeError: bad prompts, steps < 1, non-decreasing sigmas/timesteps, height/width not
            divisible by 16, tensors on the wrong device, and every check of the diffusers pipeline.
    """
    kw = _collect(args, kwargs)
    p = _prepare(self, kw)
    model = self.transformer

    def on_step(i, t, z):
        bar.update()
        return _callback(self, kw, p, i, t, z)

    start = time.perf_counter()
    with self.progress_bar(total=len(p.pairs)) as bar:
        run = bidirectional_sampler.sample(
            model, p.noise, p.pairs, p.text, context=p.context, guidance_scale=kw["guidance_scale"],
            use_mean_velocity=kw["use_mean_velocity"], cuda_graphs=_cuda_graphs(self, model),
            attention=getattr(model, "_anyflow_attention", None), on_step=on_step, interrupted=lambda: self.interrupt,
        )
    _sync(p.device)
    self.anyflow_stats = RunStats(run.nfe, 0, time.perf_counter() - start, run.graph_replays)
    return _finish(self, run.latents, kw["output_type"], kw["return_dict"])


# ----------------------------------------------------------------------------------------------
# FAR
# ----------------------------------------------------------------------------------------------
_FAR_EXTRA = (("use_kv_cache", True), ("chunk_partition", None))


def _far_setup(pipe, args, kwargs):
    kw = _collect(args, kwargs, _FAR_EXTRA)
    if not kw["use_kv_cache"]:
        raise ValueError("use_kv_cache=False is not supported by anyflow's FAR sampler (it always uses the KV cache)")
    p = _prepare(pipe, kw)
    model = pipe.transformer
    cp = kw["chunk_partition"]
    cp = check_chunk_partition(list(model.config.chunk_partition) if cp is None else cp, p.noise.shape[1])
    session = far_sampler.FARSession(model, p.text, cp, p.noise.shape[3:], cuda_graphs=_cuda_graphs(pipe, model),
                                     attention=getattr(model, "_anyflow_attention", None))
    return kw, p, session


def _far_chunks(pipe, kw, p, session):
    """Generator over finished chunks: ``(chunk_index, frame range, latents [B, F, C, h, w] fp32)``."""
    cp = session.cp
    n_ctx = 0 if p.context is None else next(i + 1 for i in range(len(cp)) if sum(cp[: i + 1]) >= p.context.shape[1])
    pipe._num_timesteps = (len(cp) - n_ctx) * len(p.pairs)

    def on_step(k, i, t, z):
        bar.update()
        return _callback(pipe, kw, p, i, t, z)

    start = time.perf_counter()
    with pipe.progress_bar(total=(len(cp) - n_ctx) * len(p.pairs)) as bar:
        context = None if p.context is None else p.context.to(pipe.transformer.dtype)
        for k, out in far_sampler.generate(
            session, p.noise, p.pairs, context=context, guidance_scale=kw["guidance_scale"],
            use_mean_velocity=kw["use_mean_velocity"], on_step=on_step,
        ):
            if k == len(cp) - 1:
                _sync(p.device)
                pipe.anyflow_stats = RunStats(session.nfe, session.cache_steps, time.perf_counter() - start,
                                              session.graph_replays)
            yield k, session.chunk_frames(k), out


@torch.no_grad()
def far_call(self, *args, **kwargs):
    """Fast ``AnyFlowFARPipeline.__call__`` (same arguments and outputs as diffusers 0.42).

    ``use_kv_cache=False`` raises (the sampler is built around the KV cache). The KV-cache inference
    steps follow the official AnyFlow semantics (see the module docstring).

    Raises:
        ValueError / TypeError: as :func:`bidirectional_call`, plus a ``chunk_partition`` that does not
            sum to the latent frame count.
    """
    kw, p, session = _far_setup(self, args, kwargs)
    out = None
    for _, _, out in _far_chunks(self, kw, p, session):
        if self.interrupt:
            break
    return _finish(self, out, kw["output_type"], kw["return_dict"])


def far_stream(self, *args, decode_frames: bool = False, **kwargs):
    """Generate a FAR video chunk by chunk, yielding each chunk as soon as it is final.

    Takes the arguments of ``__call__`` (``output_type`` / ``return_dict`` are ignored) and yields dicts:
    ``{"chunk": k, "frames": (f0, f1), "latents": [B, f1 - f0, C, h, w] (model dtype)}``, plus
    ``"video"`` when ``decode_frames=True``: the new pixel frames of this chunk as ``[B, T, 3, H, W]``
    float in [0, 1]. Decoding re-runs the VAE on the whole finished prefix (the Wan VAE is causal in
    time, so decoding a chunk on its own would not give the frames of a whole-video decode); this costs
    more VAE time than one final decode.

    Example:
        >>> for chunk in pipe.stream("a red panda", num_inference_steps=4, decode_frames=True):
        ...     show(chunk["video"])
    """
    with torch.no_grad():
        kw, p, session = _far_setup(self, args, kwargs)
        vt = self.vae_scale_factor_temporal
        for k, (f0, f1), out in _far_chunks(self, kw, p, session):
            item = {"chunk": k, "frames": (f0, f1), "latents": out[:, f0:f1].to(self.transformer.dtype)}
            if decode_frames:
                pixels = decode(self, out[:, :f1].permute(0, 2, 1, 3, 4), output_type="pt")
                p0 = 0 if f0 == 0 else 1 + (f0 - 1) * vt
                item["video"] = pixels[:, p0:]
            yield item
            if self.interrupt:
                return
