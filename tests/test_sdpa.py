"""anyflow.ops.sdpa: every attention policy against a float64 reference, the "tuned" table, policy
setting and errors, and the fused bidirectional forward under each policy."""

import importlib
import json
import os
import subprocess
import sys

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from anyflow import ops
from anyflow.testing.tolerances import assert_kernel_close, assert_rel_l2

S = importlib.import_module("anyflow.ops.sdpa")  # the module; ``anyflow.ops.sdpa`` is the function
DTYPES = [torch.float32, torch.bfloat16]
# (B, H, Lq, Lk, D, strided): odd token counts; strided = [B, L, H, D] storage seen as [B, H, L, D]
SHAPES = [(1, 3, 77, 203, 64, False), (2, 3, 77, 203, 128, True), (2, 3, 203, 203, 64, True)]


@pytest.fixture(autouse=True)
def _fresh_state(monkeypatch):
    """Each test starts from the "default" policy and an empty table, and leaves the process's alone."""
    monkeypatch.setattr(S, "_policy", "default")
    monkeypatch.setattr(S, "_choices", {})


def qkv(b, h, lq, lk, d, strided=False, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)

    def one(length):
        if strided:
            return torch.randn(b, length, h, d, generator=g).to(dtype).transpose(1, 2)
        return torch.randn(b, h, length, d, generator=g).to(dtype)

    return one(lq), one(lk), one(lk)


def reference(q, k, v, scale=None):
    """Plain softmax(q k^T * scale) v in float64."""
    q, k, v = q.double(), k.double(), v.double()
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    return torch.softmax(q @ k.transpose(-1, -2) * scale, dim=-1) @ v


class TimingCounter:
    """Stands in for ``_time_ms``: runs the candidate once (so refused kernels still raise), counts the
    calls and makes the first candidate the fastest."""

    def __init__(self):
        self.calls = 0

    def __call__(self, fn, device):
        fn()
        self.calls += 1
        return float(self.calls)


@pytest.fixture
def timing(monkeypatch):
    counter = TimingCounter()
    monkeypatch.setattr(S, "_time_ms", counter)
    return counter


@pytest.fixture
def pinned(monkeypatch):
    """Records the first backend of every ``sdpa_kernel`` list that :func:`sdpa` enters."""
    seen = []
    real = S.sdpa_kernel

    def spy(backends, set_priority=False):
        seen.append(backends[0])
        return real(backends, set_priority=set_priority)

    monkeypatch.setattr(S, "sdpa_kernel", spy)
    return seen


# ----------------------------------------------------------------------------------------------
# every policy vs the float64 reference
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("policy", S.SDPA_POLICIES)
def test_policy_matches_reference(policy, dtype, shape):
    *dims, strided = shape
    q32, k32, v32 = qkv(*dims, strided=strided, seed=sum(dims))
    q, k, v = (x.to(dtype) for x in (q32, k32, v32))
    scale = 0.1 if dims[-1] == 128 else None
    with torch.no_grad(), ops.sdpa_policy(policy):
        out = ops.sdpa(q, k, v, scale=scale)
    assert out.dtype == dtype and out.shape == q.shape
    assert_kernel_close(out, reference(q32, k32, v32, scale), reference(q, k, v, scale).to(dtype))


@pytest.mark.parametrize("policy", ["efficient", "cudnn"])
def test_pinned_kernel_that_cannot_run_falls_back(policy):
    """On CPU there is no efficient or cuDNN kernel: alone they refuse the call, the policy still runs."""
    q, k, v = qkv(1, 3, 77, 203, 64, seed=5, dtype=torch.float64)
    with pytest.raises(RuntimeError), sdpa_kernel([S.KERNELS[policy]]):
        torch.nn.functional.scaled_dot_product_attention(q, k, v)
    with ops.sdpa_policy(policy):
        out = ops.sdpa(q, k, v)
    torch.testing.assert_close(out, reference(q, k, v), rtol=1e-10, atol=1e-12)


def test_backward_through_policies():
    q, k, v = qkv(1, 3, 77, 203, 64, seed=6)
    grads = {}
    for policy in ("default", "math", "flash", "tuned"):
        leaves = [x.clone().requires_grad_() for x in (q, k, v)]
        with ops.sdpa_policy(policy):
            ops.sdpa(*leaves).square().sum().backward()
        grads[policy] = [x.grad for x in leaves]
    for policy in ("math", "flash", "tuned"):
        for got, ref in zip(grads[policy], grads["default"]):
            assert_rel_l2(got, ref, 1e-5)


# ----------------------------------------------------------------------------------------------
# "tuned"
# ----------------------------------------------------------------------------------------------
def test_tuned_times_each_new_key_once(timing, pinned):
    q, k, v = qkv(1, 3, 77, 203, 64, seed=7)
    with ops.sdpa_policy("tuned"):
        ops.sdpa(q, k, v)
        assert timing.calls == len(S.CANDIDATES["cpu"])
        (key, entry), = ops.sdpa_choices().items()
        assert entry == {"kernel": "math", "ms": {"math": 1.0, "flash": 2.0}}
        assert "cpu|float32|B1|H3|Lq77|Lk203|D64|" in key and key.endswith("grad=0")

        out = ops.sdpa(q, k, v)  # remembered: no timing
        assert timing.calls == 2 and len(ops.sdpa_choices()) == 1
        assert pinned[-1] == SDPBackend.MATH
        assert_kernel_close(out, reference(q, k, v))

        ops.sdpa(q, k[:, :, :150], v[:, :, :150])  # new Lk
        ops.sdpa(q.bfloat16(), k.bfloat16(), v.bfloat16())  # new dtype
        ops.sdpa(q, k, v, scale=0.3)  # new scale
        ops.sdpa(q.requires_grad_(), k, v)  # autograd records this one
        assert timing.calls == 10 and len(ops.sdpa_choices()) == 5
        assert sum(key.endswith("grad=1") for key in ops.sdpa_choices()) == 1


def test_tuned_with_real_timing_picks_a_runnable_kernel():
    q, k, v = qkv(2, 3, 77, 203, 64, seed=8)
    with ops.sdpa_policy("tuned"):
        out = ops.sdpa(q, k, v)
    (entry,) = ops.sdpa_choices().values()
    assert set(entry["ms"]) == set(S.CANDIDATES["cpu"]) and all(ms > 0 for ms in entry["ms"].values())
    assert entry["kernel"] == min(entry["ms"], key=entry["ms"].get)
    assert_kernel_close(out, reference(q, k, v))


def test_choices_round_trip_through_json(timing, pinned):
    q, k, v = qkv(1, 3, 77, 203, 128, seed=9)
    with ops.sdpa_policy("tuned"):
        ops.sdpa(q, k, v)
        table = json.loads(json.dumps(ops.sdpa_choices()))
        ops.clear_sdpa_choices()
        assert ops.sdpa_choices() == {}
        (key,) = table
        table[key]["kernel"] = "flash"  # a recorded choice other than the one timing would make
        ops.load_sdpa_choices(table)
        assert ops.sdpa_choices() == table
        ops.sdpa(q, k, v)
    assert timing.calls == 2  # only the first tuning
    assert pinned[-1] == SDPBackend.FLASH_ATTENTION


def test_no_tuning_while_compiling(monkeypatch, timing, pinned):
    q, k, v = qkv(1, 3, 77, 203, 64, seed=10)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    with ops.sdpa_policy("tuned"):
        out = ops.sdpa(q, k, v)
        assert timing.calls == 0 and ops.sdpa_choices() == {} and pinned == []  # torch's default
        assert_kernel_close(out, reference(q, k, v))
        ops.load_sdpa_choices({S._key(q, k, v, None): {"kernel": "flash"}})
        ops.sdpa(q, k, v)  # a remembered choice is still used
        assert pinned == [SDPBackend.FLASH_ATTENTION] and timing.calls == 0


def test_ops_route_their_dense_calls_through_sdpa(timing):
    q, k, v = qkv(1, 3, 77, 203, 64, seed=11)
    layout = ops.chunk_causal_layout([50, 27])
    with torch.no_grad(), ops.sdpa_policy("tuned"):
        ops.segmented_attention(q, [k[:, :, :100], k[:, :, 100:]], [v[:, :, :100], v[:, :, 100:]])
        assert any("Lq77|Lk203|" in key for key in ops.sdpa_choices())
        ops.chunk_causal_attention(q, q, q, layout)
    keys = ops.sdpa_choices()
    assert any("Lq50|Lk50|" in key for key in keys) and any("Lq27|Lk77|" in key for key in keys)


def test_fused_bidirectional_forward_under_policies(timing):
    from anyflow.models.bidirectional import bidirectional_forward
    from anyflow.models.tiny import tiny_transformer

    model = tiny_transformer("bidirectional", seed=1)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(1, 3, 16, 8, 12, generator=g)
    t = torch.rand(1, 3, generator=g, dtype=torch.float64) * 1000
    text = torch.randn(1, 9, 32, generator=g)
    with torch.no_grad():
        ref = bidirectional_forward(model, x, t, t * 0.5, text)
        for policy in ("math", "flash", "tuned"):
            with ops.sdpa_policy(policy):
                assert_rel_l2(bidirectional_forward(model, x, t, t * 0.5, text), ref, 1e-5)
    keys = ops.sdpa_choices()
    assert any("Lq72|Lk72|D12|" in key for key in keys)  # self-attention: 3 frames x 4 x 6 tokens
    assert any("Lq72|Lk9|D12|" in key for key in keys)  # cross-attention to the text


# ----------------------------------------------------------------------------------------------
# setting the policy, errors
# ----------------------------------------------------------------------------------------------
def test_set_policy_returns_previous_and_none_leaves_it():
    assert ops.set_sdpa_policy("math") == "default"
    assert ops.set_sdpa_policy(None) == "math"
    assert ops.set_sdpa_policy("tuned") == "math"
    assert S.get_sdpa_policy() == "tuned"


def test_context_manager_restores_even_on_exceptions():
    ops.set_sdpa_policy("math")
    with pytest.raises(KeyError):
        with ops.sdpa_policy("flash") as active:
            assert active == "flash" and S.get_sdpa_policy() == "flash"
            with ops.sdpa_policy("tuned"):
                raise KeyError("boom")
    assert S.get_sdpa_policy() == "math"
    with ops.sdpa_policy(None) as active:
        assert active == "math"
        ops.set_sdpa_policy("cudnn")  # None restores nothing
    assert S.get_sdpa_policy() == "cudnn"


def test_invalid_policy_names():
    with pytest.raises(ValueError, match=r"name must be one of .*'tuned'.*got 'fastest'"):
        ops.set_sdpa_policy("fastest")
    with pytest.raises(TypeError, match="name must be a str"):
        ops.set_sdpa_policy(3)
    with pytest.raises(ValueError, match="got 'Flash'"):
        with ops.sdpa_policy("Flash"):
            pytest.fail("entered the block")
    assert S.get_sdpa_policy() == "default"


def test_env_var_sets_the_initial_policy(monkeypatch):
    q, k, v = qkv(1, 3, 77, 203, 64, seed=12)
    monkeypatch.setattr(S, "_policy", None)
    monkeypatch.setenv("ANYFLOW_SDPA", "math")
    assert S.get_sdpa_policy() == "math"
    monkeypatch.setattr(S, "_policy", None)
    monkeypatch.setenv("ANYFLOW_SDPA", "fastest")
    with pytest.raises(ValueError, match=r"ANYFLOW_SDPA must be one of .*got 'fastest'"):
        ops.sdpa(q, k, v)


def test_invalid_env_var_does_not_break_import():
    code = "import anyflow.ops, anyflow.models.blocks, anyflow.models.bidirectional, anyflow.models.far; print('imported')"
    env = dict(os.environ, ANYFLOW_SDPA="fastest")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "imported" in out.stdout, out.stderr


def test_load_rejects_bad_tables():
    with pytest.raises(TypeError, match="table must be a dict"):
        ops.load_sdpa_choices([("k", "math")])
    with pytest.raises(TypeError, match=r"table\['k'\] must be a dict"):
        ops.load_sdpa_choices({"k": "math"})
    with pytest.raises(ValueError, match=r"table\['k'\]\['kernel'\] must be one of"):
        ops.load_sdpa_choices({"k": {"kernel": "tuned"}})
    assert ops.sdpa_choices() == {}


def test_available_kernels_on_cpu():
    assert set(S.available_kernels("cpu")) == {"math", "flash"}


@pytest.mark.parametrize("kind", ["bidirectional", "far"])
def test_enabled_pipeline_runs_under_its_policy(kind, monkeypatch):
    """``anyflow.enable(pipe, attention=...)``: every dense attention of the call runs under that policy, and
    the process policy is back to what it was afterwards."""
    import anyflow
    from anyflow.models.tiny import tiny_pipeline

    from types import SimpleNamespace

    seen = []
    real = S.F.scaled_dot_product_attention

    def recording(*args, **kwargs):  # every SDPA call of the op layer, with the policy in force
        seen.append(S.get_sdpa_policy())
        return real(*args, **kwargs)

    monkeypatch.setattr(S, "F", SimpleNamespace(scaled_dot_product_attention=recording))
    pipe = tiny_pipeline(kind, seed=0)
    pipe.set_progress_bar_config(disable=True)
    kw = dict(prompt="a red panda", height=32, width=32, num_inference_steps=2, output_type="latent")
    kw.update(num_frames=9, chunk_partition=[1, 2]) if kind == "far" else kw.update(num_frames=5)
    with anyflow.enable(pipe, attention="math"):
        pipe(generator=torch.Generator().manual_seed(0), **kw)
    assert seen and set(seen) == {"math"}, sorted(set(seen))
    assert S.get_sdpa_policy() == "default"
    with pytest.raises(ValueError, match="attention must be None or one of"):
        anyflow.enable(pipe, attention="fastest")
