"""Run-time failures of a kernel backend: named backends raise with context, ``"auto"`` falls back once.

A failing kernel is simulated by replacing a registered implementation with one that raises the kind of
error a GPU run can hit (a Triton out-of-resources error, a CUDA error); the tests then check what the
user sees. ``"auto"`` on CPU never picks a kernel, so its GPU priority list is monkeypatched in.
"""

from __future__ import annotations

import warnings

import pytest
import torch

from anyflow import ops
from anyflow.ops import measured, registry


def _inputs(tokens: int = 37):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, tokens, 16, generator=g)
    shift, scale = torch.randn(1, 1, 16, generator=g), torch.randn(1, 1, 16, generator=g)
    return x, shift, scale, ((1, tokens),)


@pytest.fixture
def failing_triton(monkeypatch):
    """``adaln_modulate``'s triton implementation fails at run time; counts its calls."""
    calls = []

    def broken(*args, **kwargs):
        calls.append(args[0].shape)
        raise RuntimeError("out of resource: shared memory, Required: 327680, Hardware limit: 232448")

    impls = dict(registry._IMPLS["adaln_modulate"])
    impls["triton"] = registry.Implementation("adaln_modulate", "triton", broken, None)
    monkeypatch.setitem(registry._IMPLS, "adaln_modulate", impls)
    monkeypatch.setattr(registry, "_REASONS", dict(registry._REASONS, triton=None))
    monkeypatch.setattr(registry, "_FAILED", set())
    return calls


def test_named_backend_failure_names_op_backend_shapes_and_reason(failing_triton):
    x, shift, scale, segs = _inputs()
    with pytest.raises(registry.KernelRuntimeError) as info:
        ops.adaln_modulate(x, shift, scale, segs, backend="triton")
    text = str(info.value)
    assert "anyflow.ops.adaln_modulate" in text and "'triton'" in text
    assert "[1, 37, 16] float32" in text and "out of resource: shared memory" in text
    assert isinstance(info.value.__cause__, RuntimeError)
    # enable(pipe, backend="triton") passes the preference ("triton", "torch"): still a named backend, still raises
    with pytest.raises(registry.KernelRuntimeError):
        ops.adaln_modulate(x, shift, scale, segs, backend=registry.prefer("triton"))


def test_auto_falls_back_once_per_op_and_shape(failing_triton, monkeypatch):
    monkeypatch.setattr(registry, "auto_priority", lambda op, device_type, index=None: ("triton", "torch"))
    x, shift, scale, segs = _inputs()
    expected = ops.adaln_modulate(x, shift, scale, segs, backend="torch")
    with pytest.warns(RuntimeWarning, match=r"adaln_modulate.*'triton'.*\[1, 37, 16\].*falling back") as record:
        out = ops.adaln_modulate(x, shift, scale, segs)
    assert len(record) == 1
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the same shapes again: no warning, the kernel is not retried
        torch.testing.assert_close(ops.adaln_modulate(x, shift, scale, segs), expected, rtol=0, atol=0)
    assert len(failing_triton) == 1
    x2, shift2, scale2, segs2 = _inputs(41)
    with pytest.warns(RuntimeWarning, match=r"\[1, 41, 16\]"):
        ops.adaln_modulate(x2, shift2, scale2, segs2)
    assert len(failing_triton) == 2


def test_argument_errors_are_not_swallowed_by_the_fallback(failing_triton, monkeypatch):
    """Bad input is the caller's error under every backend: it raises before any kernel or fallback runs."""
    monkeypatch.setattr(registry, "auto_priority", lambda op, device_type, index=None: ("triton", "torch"))
    x, shift, scale, segs = _inputs()
    with pytest.raises(ValueError, match="segments"):
        ops.adaln_modulate(x, shift, scale, ((2, 37),))
    assert failing_triton == []


def test_auto_uses_only_measured_kernels(monkeypatch):
    """On CUDA ``auto`` takes a kernel only where the committed GPU results list it for the architecture."""
    assert registry.auto_priority("adaln_modulate", "cpu") == ("torch",)
    monkeypatch.setattr(registry, "_arch", lambda index: "sm_90")
    monkeypatch.setattr(measured, "AUTO_KERNELS", {"sm_90": {"adaln_modulate": "triton"}})
    assert registry.auto_priority("adaln_modulate", "cuda", 0) == ("triton", "torch")
    assert registry.auto_priority("gated_residual", "cuda", 0) == ("torch",)
    monkeypatch.setattr(registry, "_arch", lambda index: "sm_80")
    assert registry.auto_priority("adaln_modulate", "cuda", 0) == ("torch",)


def test_committed_auto_table_is_well_formed():
    for arch, table in measured.AUTO_KERNELS.items():
        assert arch.startswith("sm_")
        for op, backend in table.items():
            assert op in registry._IMPLS and backend in ("triton", "cuda"), (arch, op, backend)
