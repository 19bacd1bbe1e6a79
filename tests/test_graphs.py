"""CUDA-graph replay of the per-step forward (anyflow.samplers.graphs), checked on CPU by emulation.

A CUDA graph replays the recorded kernels on the recorded memory and ignores Python. The emulator here
does the same with ATen: while "capturing" it records every op (function, argument tensors, output
tensors) through a TorchDispatchMode; ``replay()`` re-executes that op list and writes each result into
the recorded output tensors, without calling the Python forward again. Anything the forward takes
from Python state that changes between steps (a time value, a cache offset, a fresh tensor not passed
as an input) is frozen, exactly as on a GPU, and makes the replayed result differ from the eager one.
A device -> host read during capture (``.item()``), illegal in a real capture, raises.

Owed on a GPU: the real ``torch.cuda.graph`` path (``benchmarks/levers.py`` times and checks it).
"""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import anyflow
from anyflow.samplers import graphs
from anyflow.testing.official import official_far_semantics
from anyflow.models.tiny import tiny_pipeline
from anyflow.testing.tolerances import rel_l2

H = W = 32
CP = [1, 2, 2, 1]
PROMPT = "a red panda eating bamboo in the forest"


class _Recorder(TorchDispatchMode):
    def __init__(self, ops):
        super().__init__()
        self.ops = ops

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.ops.aten._local_scalar_dense.default:
            raise RuntimeError("device -> host read during CUDA-graph capture")
        out = func(*args, **kwargs)
        self.ops.append((func, args, kwargs, out))
        return out


def _write(dst, src):
    if isinstance(dst, torch.Tensor):
        if dst.data_ptr() != src.data_ptr() or dst.stride() != src.stride():
            dst.copy_(src)
    elif isinstance(dst, (list, tuple)):
        for d, s in zip(dst, src):
            _write(d, s)


class _EmulatedGraph:
    def __init__(self):
        self.ops = []

    def replay(self):
        for func, args, kwargs, out in self.ops:
            _write(out, func(*args, **kwargs))


def _emulated_capture(fn, static_in, pool):
    graph = _EmulatedGraph()
    with _Recorder(graph.ops):
        out = fn(*static_in)
    return graph, out


@pytest.fixture
def emulated(monkeypatch):
    """StepGraph on CPU with the emulated capture instead of ``torch.cuda.graph``."""
    monkeypatch.setattr(graphs, "graphs_reason", lambda device, enabled: None if enabled else "off")
    monkeypatch.setattr(graphs, "_capture", _emulated_capture)
    monkeypatch.setattr(graphs, "_run_on_side_stream", lambda fn, inputs: fn(*inputs))
    monkeypatch.setattr(graphs, "new_pool", lambda device, enabled: None)


def test_emulator_freezes_python_state(emulated):
    """The emulator is strict: a value read from Python at capture stays frozen at replay."""
    offset = {"v": 1.0}
    step = graphs.StepGraph(lambda x: x * 2 + offset["v"], "cpu")
    x = torch.randn(5)
    torch.testing.assert_close(step(x), x * 2 + 1)  # eager warm-up
    torch.testing.assert_close(step(x), x * 2 + 1)  # capture + replay
    offset["v"] = 5.0
    y = torch.randn(5)
    torch.testing.assert_close(step(y), y * 2 + 1)  # replay: new input, frozen Python value
    assert step.replays == 2


def test_emulator_rejects_host_reads(emulated):
    step = graphs.StepGraph(lambda x: x * x.sum().item(), "cpu")
    step(torch.randn(3))
    with pytest.raises(RuntimeError, match="device -> host"):
        step(torch.randn(3))


def test_input_change_after_capture_raises(emulated):
    step = graphs.StepGraph(lambda x: x + 1, "cpu")
    step(torch.randn(4))
    step(torch.randn(4))
    with pytest.raises(ValueError, match="inputs changed after capture"):
        step(torch.randn(5))


def test_eager_reasons():
    assert "CUDA device" in graphs.graphs_reason("cpu", True)
    assert "off" in graphs.graphs_reason("cpu", False)
    if torch.cuda.is_available():
        assert graphs.graphs_reason("cuda", True) == "CUDA graphs are used for inference only (autograd is enabled)"
        with torch.no_grad():
            assert graphs.graphs_reason("cuda", True) is None
    step = graphs.StepGraph(lambda x: x + 1, "cpu")
    for _ in range(3):
        step(torch.randn(2))
    assert step.replays == 0 and step.graph is None


def _run(pipe, steps, cuda_graphs, kind):
    kw = dict(prompt=PROMPT, height=H, width=W, num_inference_steps=steps, output_type="latent",
              generator=torch.Generator().manual_seed(0))
    if kind == "far":
        kw.update(chunk_partition=CP, num_frames=4 * (sum(CP) - 1) + 1)
    else:
        kw.update(num_frames=21)
    with anyflow.enable(pipe, cuda_graphs=cuda_graphs):
        out = pipe(**kw).frames
        return out, pipe.anyflow_stats


@pytest.mark.parametrize("kind", ["bidirectional", "far"])
@pytest.mark.parametrize("steps", [1, 2, 4])
def test_replayed_sampler_equals_eager(emulated, kind, steps):
    """Whole generations with the per-step forward replayed from the emulated graph equal the eager run
    bit for bit: the forward depends on nothing but its inputs, the cache and the prompt context."""
    pipe = tiny_pipeline(kind, seed=0)
    pipe.set_progress_bar_config(disable=True)
    with official_far_semantics() if kind == "far" else torch.no_grad():
        eager, s_eager = _run(pipe, steps, False, kind)
        graphed, s_graph = _run(pipe, steps, True, kind)
    assert s_eager.graph_replays == 0
    chunks = len(CP) if kind == "far" else 1
    assert s_graph.graph_replays == chunks * (steps - 1)  # call 1 eager, call 2 captures and replays
    assert s_graph.nfe == s_eager.nfe == chunks * steps
    err = rel_l2(graphed, eager)
    print(f"[graph replay] {kind} {steps} steps: rel L2 {err:.2e}, replays {s_graph.graph_replays}")
    assert torch.equal(graphed, eager), f"{kind}, {steps} steps: replayed != eager (rel L2 {err:.2e})"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("kind", ["bidirectional", "far"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_real_cuda_graphs_equal_eager(kind, dtype):
    """On a GPU: the captured per-step forward replays to the eager result (same kernels, same inputs)."""
    pipe = tiny_pipeline(kind, seed=0, dtype=dtype).to("cuda")
    pipe.set_progress_bar_config(disable=True)
    eager, _ = _run(pipe, 4, False, kind)
    graphed, stats = _run(pipe, 4, True, kind)
    chunks = len(CP) if kind == "far" else 1
    assert stats.graph_replays == chunks * 3
    err = rel_l2(graphed.float(), eager.float())
    print(f"[cuda graph] {kind} {dtype}: rel L2 vs eager {err:.2e}")
    assert err <= 1e-6, f"{kind} {dtype}: CUDA-graph replay differs from eager (rel L2 {err:.2e})"


def test_cuda_graphs_flag_validation():
    from anyflow.models.tiny import tiny_transformer

    model = tiny_transformer("bidirectional", seed=0)
    with pytest.raises(ValueError, match="cuda_graphs=True applies to pipelines"):
        anyflow.enable(model, cuda_graphs=True)


class _HostToDevice(TorchDispatchMode):
    """Records copies of host tensors to the device and ops mixing host (non-scalar) and device tensors: in a
    CUDA-graph capture each is an error (a pageable host copy) or a baked-in stale value. Run on the meta
    device, where "device" is meta and every such copy is visible as an op on a CPU tensor."""

    def __init__(self):
        super().__init__()
        self.hits = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        tensors = [a for a in list(args) + list(kwargs.values()) for a in (a if isinstance(a, (list, tuple)) else [a])
                   if isinstance(a, torch.Tensor)]
        host = [a for a in tensors if a.device.type == "cpu" and a.dim() > 0]
        to_device = func is torch.ops.aten._to_copy.default and str(kwargs.get("device", "")) == "meta"
        if (host and any(a.device.type == "meta" for a in tensors)) or (to_device and args[0].device.type == "cpu"):
            self.hits.append(str(func))
        return func(*args, **kwargs)


def test_detector_sees_host_copies():
    with _HostToDevice() as mode:
        torch.arange(3).to("meta")
        torch.ones(3, device="meta").copy_(torch.ones(3))
    assert len(mode.hits) == 2, mode.hits


@pytest.mark.parametrize("kind", ["bidirectional", "far"])
def test_step_forward_is_capture_safe(kind):
    """The forward a StepGraph captures moves nothing from the host: run on the meta device, it makes no
    host -> device copy and mixes no host tensor into device ops (RoPE tables, segment tables, time rows
    are built on the device)."""
    from anyflow.models.bidirectional import bidirectional_forward
    from anyflow.models.blocks import prepare_text
    from anyflow.samplers.far import FARSession
    from anyflow.models.tiny import tiny_transformer

    model = tiny_transformer(kind, **({"chunk_partition": tuple(CP)} if kind == "far" else {})).to("meta")
    text = prepare_text(model, torch.randn(2, 7, model.config.text_dim, device="meta"), cache_kv=True)
    t = torch.full((2, 2), 900.0, dtype=torch.float64, device="meta")
    r = torch.full((2, 2), 700.0, dtype=torch.float64, device="meta")
    x = torch.randn(2, 2, model.config.in_channels, 4, 4, device="meta")
    with torch.no_grad():
        if kind == "far":
            session = FARSession(model, text, CP, (4, 4))
            session.cache_step(0, torch.randn(2, 1, model.config.in_channels, 4, 4, device="meta"))
            step = lambda: session.velocity(1, x, t, r)  # noqa: E731
        else:
            step = lambda: bidirectional_forward(model, x, t, r, text)  # noqa: E731
        step()  # the eager warm-up fills the RoPE table cache, as StepGraph's first call does
        with _HostToDevice() as mode:
            out = step()
    assert out.device.type == "meta" and out.shape == x.shape
    assert mode.hits == [], f"host -> device traffic in the captured forward: {mode.hits}"
