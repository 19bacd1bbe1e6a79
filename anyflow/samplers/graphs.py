"""CUDA-graph capture of the per-step forward of the samplers (static shapes, replayed every step).

Within one generation every flow-map jump of the bidirectional sampler, and every jump on one FAR chunk,
runs the same forward on tensors of the same shapes: only the latent and the time pair change. A
:class:`StepGraph` records that forward once as a CUDA graph and replays it, so a step costs one
graph launch instead of several hundred kernel launches (30 blocks x ~20 kernels for Wan 1.3B). This
matters where launches are a visible share of the step: small latents, FAR chunks of one frame, the
14B model's many small elementwise kernels; at 480x832x81 bidirectional it is within noise.

Protocol (what the samplers do): call 1 runs eagerly on a side stream (warm-up: cuBLAS handles,
Triton compilation, the RoPE table cache, a tuned SDPA choice); call 2 copies its inputs into static
buffers, captures the forward and replays it; later calls copy their inputs into those buffers and
replay. The returned tensor is the graph's static output: it is overwritten by the next replay, so the
caller must consume it first (the Euler update does). Everything the forward reads that is not an
argument (weights, the prompt's cross-attention K/V, the FAR KV cache, the cache write offset) is
baked into the graph: a :class:`StepGraph` must be dropped when any of them changes (new prompt,
new FAR chunk), which is why the samplers make one per generation and per chunk.

Off by default (``anyflow.enable(pipe, cuda_graphs=True)`` turns it on) until timed on a GPU; on a
non-CUDA device, under autograd, or while compiling it runs eagerly.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch


def graphs_reason(device, enabled: bool) -> Optional[str]:
    """Why a :class:`StepGraph` on ``device`` runs eagerly (``None`` when it captures)."""
    if not enabled:
        return "CUDA graphs are off (anyflow.enable(..., cuda_graphs=True) turns them on)"
    if torch.device(device).type != "cuda":
        return f"CUDA graphs need a CUDA device, the sampler runs on {torch.device(device).type}"
    if torch.is_grad_enabled():
        return "CUDA graphs are used for inference only (autograd is enabled)"
    if torch.compiler.is_compiling():
        return "inside torch.compile (use mode='reduce-overhead' there instead)"
    return None


class StepGraph:
    """One static-shape forward ``fn(*tensors) -> tensor``, captured on its second call and replayed.

    Args:
        fn: the step's forward. Its tensor arguments are the only inputs that may change between
            calls; everything else it reads is frozen into the graph.
        device: device of the inputs; anything but CUDA runs ``fn`` eagerly every call.
        enabled: ``False`` runs ``fn`` eagerly every call.
        pool: optional memory pool handle (``torch.cuda.graph_pool_handle()``) shared between the
            graphs of one generation, so the FAR chunks' graphs reuse one pool.

    Attributes:
        reason: why this instance runs eagerly (``None`` when it captures).
        replays: number of graph replays so far (0 when eager).

    Raises:
        ValueError: a later call's inputs differ in number, shape, dtype or device from the captured ones.
    """

    def __init__(self, fn: Callable[..., torch.Tensor], device, *, enabled: bool = True, pool=None):
        self.fn = fn
        self.reason = graphs_reason(device, enabled)
        self.pool = pool
        self.calls = 0
        self.replays = 0
        self.graph = None
        self.static_in: Sequence[torch.Tensor] = ()
        self.static_out: Optional[torch.Tensor] = None

    def __call__(self, *inputs: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if self.reason is not None:
            return self.fn(*inputs)
        if self.calls == 1:
            return _run_on_side_stream(self.fn, inputs)
        if self.graph is None:
            self.static_in = tuple(x.clone() for x in inputs)
            self.graph, self.static_out = _capture(self.fn, self.static_in, self.pool)
        else:
            got = [(tuple(x.shape), x.dtype, x.device) for x in inputs]
            want = [(tuple(x.shape), x.dtype, x.device) for x in self.static_in]
            if got != want:
                raise ValueError(f"StepGraph inputs changed after capture: captured {want}, got {got}")
            for buf, x in zip(self.static_in, inputs):
                buf.copy_(x)
        self.graph.replay()
        self.replays += 1
        return self.static_out


def _run_on_side_stream(fn, inputs):
    """Warm-up call: run ``fn`` eagerly on a side stream (as CUDA-graph capture requires) and wait for it."""
    main = torch.cuda.current_stream()
    side = torch.cuda.Stream()
    side.wait_stream(main)
    with torch.cuda.stream(side):
        out = fn(*inputs)
    main.wait_stream(side)
    out.record_stream(main)
    return out


def _capture(fn, static_in, pool):
    """Record ``fn(*static_in)`` into a new CUDA graph; returns ``(graph, static output)`` (not yet run)."""
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool):
        out = fn(*static_in)
    return graph, out


def new_pool(device, enabled: bool):
    """A shared graph memory pool for one generation, or ``None`` when graphs will not be captured."""
    return torch.cuda.graph_pool_handle() if graphs_reason(device, enabled) is None else None
