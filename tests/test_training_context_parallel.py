"""FSDP2 x context parallelism on one ``(dp_shard, cp)`` DeviceMesh on the CPU (gloo), fp32: 2 processes
(dp 1 x cp 2) and 4 processes (dp 2 x cp 2) take one training step of the pretrain phase and give the loss,
the gradient norm, the gradients (whole tensors) and the updated parameters of one process on the same global
batch (relative error <= 1e-5), for the bidirectional flow-map loss (27 tokens per sample: uneven shards) and
the FAR window (compressed context, clean copies, per-block checkpointing, plus the bidirectional-modeling
loss), and the teacher phase's flow matching. ``anyflow train`` under ``torchrun`` with the config key
``context_parallel`` logs the loss of one process on the same global batch. Bad combinations raise on every rank
before any collective."""

import json

import pytest
import torch
import torch.distributed as dist

if not dist.is_available() or not dist.is_gloo_available():
    pytest.skip("torch.distributed with gloo is unavailable", allow_module_level=True)

from anyflow.testing.gloo import spawn_cases

TOL = 1e-5
CP = 2
LATENT_HW = (6, 6)  # 9 tokens per frame (patch 2x2), 1 per compressed frame
#: bidirectional pretrain: 3 frames = 27 tokens per sample (14 + 13 on 2 ranks); no clipping, so the gradients
#: compared are the reduced ones; Adam's eps keeps the first update away from sign(grad)
OPTIMIZER = {"lr": 1e-2, "eps": 1e-3, "max_grad_norm": 1e6, "warmup_steps": 0}
BIDIRECTIONAL = {"preset": "tiny", "total_iter": 1, "optimizer": OPTIMIZER}
#: FAR pretrain: chunks (1, 1, 2, 2, 2), compressed context (long_context_ratio 1), the bidirectional-modeling
#: loss in the same step, per-block activation checkpointing (the recompute repeats the all-to-alls)
FAR = {"preset": "tiny-far", "total_iter": 1, "gradient_checkpointing": True,
       "optimizer": OPTIMIZER,
       "far": {"long_context_ratio": 1.0, "bidirectional_modeling_prob": 1.0}}
#: the teacher phase (plain flow matching at r = t) on the bidirectional model
TEACHER = {**BIDIRECTIONAL, "phase": "teacher"}
CONFIGS = {"bidirectional": BIDIRECTIONAL, "far": FAR, "teacher": TEACHER}
GLOBAL_BATCH = {"bidirectional": 4, "far": 2, "teacher": 4}


def _trainer(kind, context_parallel=None, model=None, **kw):
    from anyflow.training.config import from_dict
    from anyflow.training.data import SyntheticClips
    from anyflow.training.run import build_model
    from anyflow.training.trainer import Trainer

    cfg = from_dict(CONFIGS[kind])
    frames = 3 if cfg.far is None else sum(cfg.far.chunk_partition)
    data = SyntheticClips(GLOBAL_BATCH[kind], frames, height=LATENT_HW[0], width=LATENT_HW[1], seed=1)
    negative = torch.randn(1, 7, 32, generator=torch.Generator().manual_seed(123))
    return Trainer(build_model(cfg) if model is None else model, cfg, data, negative, log_stream=None,
                   context_parallel=context_parallel, **kw)


def _rel(a, b):
    assert torch.isfinite(a).all()
    return float((a - b).abs().max() / b.abs().max().clamp(min=1e-30))


def _step_case(kind):
    """One step with context parallelism (every rank), then on rank 0 the same step in one process."""

    def case(world):
        from anyflow.training.distributed import full_tensor

        tr = _trainer(kind, CP, fsdp=True)
        record = tr.train_step()
        grads = {n: full_tensor(p.grad) for n, p in tr.named_params}  # collectives: every rank
        params = {n: full_tensor(p.detach()) for n, p in tr.named_params}
        out = {f"{kind} mesh": [tr.dp_rank, tr.dp_size, tr.mesh.cp_rank, tr.mesh.cp_size],
               f"{kind} logged": [record["loss"], record["grad_norm"]]}
        if dist.get_rank() == 0:
            one = _trainer(kind)
            before = {n: p.detach().clone() for n, p in one.named_params}
            ref = one.train_step()
            out[f"{kind} loss"] = abs(record["loss"] - ref["loss"]) / abs(ref["loss"])
            out[f"{kind} grad_norm"] = abs(record["grad_norm"] - ref["grad_norm"]) / ref["grad_norm"]
            named = dict(one.named_params)
            assert set(named) == set(grads)
            unused = sorted(n for n in named if named[n].grad is None)  # not reached by this loss
            assert unused == sorted(n for n in named if grads[n] is None) and len(unused) < len(named) // 4, unused
            errs = {n: _rel(grads[n], named[n].grad) for n in named if n not in unused}
            worst = max(errs, key=errs.get)
            out[f"{kind} gradients"], out[f"{kind} worst gradient"] = errs[worst], worst
            errs = {n: _rel(params[n], named[n].detach()) for n in named}
            out[f"{kind} parameters"] = max(errs.values())
            moved = sorted(_rel(named[n].detach(), before[n]) for n in named)
            out[f"{kind} update"] = moved[len(moved) // 2]  # median relative change of a parameter in the step
        return out

    return case


def _error_case(world):
    """Each bad combination raises on every rank before a collective (the barrier then completes)."""
    from anyflow.models.tiny import tiny_transformer

    def message(fn):
        try:
            fn()
        except (ValueError, RuntimeError) as e:
            return f"{type(e).__name__}: {e}"
        return "no error"

    out = {
        "world": message(lambda: _trainer("bidirectional", world + 1, fsdp=True)),
        "heads": message(lambda: _trainer("bidirectional", CP, fsdp=True,
                                          model=tiny_transformer("bidirectional", num_attention_heads=3))),
    }
    dist.barrier()
    return out


CASES = {**{kind: _step_case(kind) for kind in CONFIGS}, "errors": _error_case}


def _check(per_rank, world):
    dp = world // CP
    for rank, out in enumerate(per_rank):
        for kind in CONFIGS:
            assert out[f"{kind} mesh"] == [rank // CP, dp, rank % CP, CP]
            assert out[f"{kind} logged"] == per_rank[0][f"{kind} logged"]  # global figures on every rank
        assert out["world"].startswith("ValueError") and "must divide the number of processes" in out["world"]
        assert out["heads"].startswith("ValueError") and "3 attention heads" in out["heads"]
    res = per_rank[0]
    for kind in CONFIGS:
        for what in ("loss", "grad_norm", "gradients", "parameters"):
            err = res[f"{kind} {what}"]
            detail = f" ({res[f'{kind} worst gradient']})" if what == "gradients" else ""
            assert err <= TOL, f"{world} processes, {kind}: {what} relative error {err:.2e} > {TOL}{detail}"
        assert res[f"{kind} update"] > 100 * TOL  # the parameters compared are not the unchanged ones


@pytest.mark.parametrize("world", [2, 4])
def test_fsdp2_context_parallel_step_matches_one_process(tmp_path, world):
    _check(spawn_cases(world, "test_training_context_parallel", [*CONFIGS, "errors"], tmp_path), world)


def test_bad_configurations_raise_without_processes():
    from anyflow.training.config import from_dict
    from anyflow.training.distributed import check_context_parallel
    from anyflow.training.run import train_from_config

    for bad in (0, -2):
        with pytest.raises(ValueError, match="context_parallel must be a positive int"):
            from_dict({"preset": "tiny", "context_parallel": bad})
    with pytest.raises(TypeError, match="context_parallel must be an int"):
        from_dict({"preset": "tiny", "context_parallel": 1.5})
    with pytest.raises(ValueError, match="phase must be one of"):
        from_dict({"preset": "tiny", "phase": "consistency", "context_parallel": 2})
    with pytest.raises(ValueError, match="flowmap.derivative must be 'fd'"):
        from_dict({"preset": "tiny", "context_parallel": 2, "flowmap": {"derivative": "jvp"}})
    with pytest.raises(ValueError, match="needs fsdp=True"):
        _trainer("bidirectional", CP)
    assert check_context_parallel(2, 6, heads=4) == 3
    with pytest.raises(ValueError, match="must divide the number of processes 1"):
        train_from_config({"preset": "tiny", "context_parallel": 2}, output_dir=None, steps=0, log_stream=None)


def test_torchrun_anyflow_train_with_context_parallel(tmp_path):
    """``context_parallel: 2`` on 2 processes: one batch slice of ``batch_size`` rows (not 2 slices), the step's
    logged loss that of one process, rank 0 alone reports; the checkpoint holds whole tensors."""
    from anyflow.training import checkpoint as ckpt
    from anyflow.training.run import train_from_config
    from test_training_distributed import torchrun_train

    text = "preset: tiny\nbatch_size: 2\ntotal_iter: 1\ncontext_parallel: 2\n"
    cfg = tmp_path / "run.yaml"
    cfg.write_text(text)
    out = tmp_path / "run"
    assert torchrun_train(cfg, out).count("step 1: checkpoint in") == 1  # rank 0 alone reports
    state = ckpt.load(ckpt.latest_checkpoint(out))
    assert state["step"] == 1 and state["config"]["context_parallel"] == 2
    assert all(not hasattr(v, "device_mesh") for v in state["model"].values())
    got = json.loads((out / "log.jsonl").read_text())["loss"]

    cfg.write_text(text.replace("context_parallel: 2", "context_parallel: 1"))
    train_from_config(str(cfg), output_dir=tmp_path / "one", log_stream=None)
    want = json.loads((tmp_path / "one" / "log.jsonl").read_text())["loss"]
    assert abs(got - want) <= TOL * abs(want), (got, want)
