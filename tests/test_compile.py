"""torch.compile(fullgraph=True) of enable()d transformers: no graph break, no recompilation.

On CPU the ops run on the "torch" backend; with a GPU the same test runs the Triton custom ops."""

import pytest
import torch

import anyflow
from anyflow.models.tiny import tiny_transformer
from anyflow.testing.tolerances import assert_rel_l2


def _inputs(kind, seed):
    g = torch.Generator().manual_seed(seed)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    f = 6
    x = torch.randn(1, f, 16, 8, 8, generator=g)
    t = torch.rand(1, f, generator=g, dtype=torch.float64) * 1000
    args = [x, t, t * 0.5, torch.randn(1, 5, 32, generator=g)]
    kwargs = {}
    if kind == "far":
        kwargs = dict(chunk_partition=[1, 2, 2, 1], clean_hidden_states=torch.randn(1, 5, 16, 8, 8, generator=g),
                      clean_timestep=torch.zeros(1, 5))
    to = lambda v: v.to(dev) if isinstance(v, torch.Tensor) else v  # noqa: E731
    return [to(a) for a in args], {k: to(v) for k, v in kwargs.items()}


@pytest.mark.parametrize("backend", ["auto", "triton", "cuda"])
@pytest.mark.parametrize("kind", ["bidirectional", "far"])
def test_compiled_enabled_transformer_fullgraph_no_recompile(kind, backend):
    """"triton" / "cuda" run their torch.library custom ops (on CPU: the Triton interpreter and the C++
    CPU twins, compiled with the aot_eager backend; Inductor cannot generate code around interpreted
    kernels); "auto" is the PyTorch path, compiled with Inductor."""
    from anyflow.ops import registry

    if backend != "auto" and registry.backend_reason(backend):
        pytest.skip(f"{backend} backend unavailable: {registry.backend_reason(backend)}")
    torch._dynamo.reset()
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    model = tiny_transformer(kind, seed=2).to(dev)
    handle = anyflow.enable(model, backend=backend)
    compile_backend = "inductor" if dev == "cuda" or backend == "auto" else "aot_eager"
    try:
        compiled = torch.compile(model, fullgraph=True, backend=compile_backend)
        with torch.no_grad():
            args, kwargs = _inputs(kind, 0)
            assert_rel_l2(compiled(*args, **kwargs).sample, model(*args, **kwargs).sample, 1e-5)
            with torch._dynamo.config.patch(error_on_recompile=True):
                args, kwargs = _inputs(kind, 1)  # new values, same shapes: must reuse the graph
                assert_rel_l2(compiled(*args, **kwargs).sample, model(*args, **kwargs).sample, 1e-5)
    finally:
        handle.disable()
        torch._dynamo.reset()
