"""FSDP2 data parallelism on the CPU (gloo): 2 processes give the loss, gradients and updated parameters of
1 process on the same global batch (bidirectional forward, FAR pretrain trainer, FAR on-policy rollout);
sharded checkpoints load exactly; ``anyflow train`` under ``torchrun`` writes a checkpoint that a
1-process run resumes from."""

import json
import os
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist

if not dist.is_available() or not dist.is_gloo_available():
    pytest.skip("torch.distributed with gloo is unavailable", allow_module_level=True)

import torch.multiprocessing as mp

from anyflow.testing.gloo import free_port

SHAPE = (4, 2, 16, 8, 8)  # global batch B, F, C, H, W
PARAMS = ("blocks.0.attn1.to_q.weight", "blocks.1.scale_shift_table", "blocks.1.ffn.net.2.weight",
          "condition_embedder.text_embedder.linear_1.weight", "patch_embedding.weight", "proj_out.weight")
FAR_PARAMS = PARAMS + ("far_patch_embedding.weight", "condition_embedder.delta_embedder.linear_2.weight")
#: FAR pretrain with compressed context (long_context_ratio 1: n ~ U{3, 4, 5} chunks of (1, 1, 2, 2, 2)) and the
#: extra bidirectional loss every step; Adam's eps keeps the first updates away from sign(grad), where a
#: gradient entry near zero could flip between reduction orders.
FAR_CFG = {"preset": "tiny-far", "total_iter": 3, "optimizer": {"eps": 1e-3},
           "far": {"long_context_ratio": 1.0, "bidirectional_modeling_prob": 1.0}}
FAR_GLOBAL_BATCH = 4
KIND_KEYS = ("loss_diffusion", "loss_consistency", "loss_free")
#: FAR on-policy with LoRA, per-block checkpointing and the "mid" rollout; global batch 2, every sample in DMD
ONPOLICY_CFG = {"preset": "tiny-far", "phase": "onpolicy", "total_iter": 2, "gradient_checkpointing": True,
                "lora": {"rank": 4, "alpha": 4, "extra_trainable": ["far_patch_embedding"]},
                "optimizer": {"eps": 1e-3}, "far": {"long_context_ratio": 1.0},
                "dmd": {"rollout_steps": [4], "grad_segments": "mid", "critic_optimizer": {"lr": 1e-3, "eps": 1e-3}}}


def _batch():
    from anyflow.training import flowmap as fm
    from anyflow.training.config import FlowMapConfig

    g = torch.Generator().manual_seed(0)
    x = torch.randn(SHAPE, generator=g)
    noise = torch.randn(SHAPE, generator=g)
    text = torch.randn(SHAPE[0], 7, 32, generator=g)
    neg = fm.expand_negative(torch.randn(1, 7, 32, generator=g), text)
    cfg = FlowMapConfig()
    pairs = fm.sample_time_pairs(SHAPE[0], cfg, 5.0, g)
    t, r = pairs.per_frame(SHAPE[1])
    return cfg, x, noise, t, r, pairs.kind, text, neg


def _model(kind="bidirectional"):
    import anyflow
    from anyflow.models.tiny import tiny_transformer

    extra = {"chunk_partition": (1, 1, 2, 2, 2)} if kind == "far" else {}
    model = tiny_transformer(kind, seed=3, **extra).train()
    anyflow.enable(model, backend="torch")
    return model


def _loss(forward, rows, all_reduce=None, derivative="fd"):
    import dataclasses

    from anyflow.training import flowmap as fm

    cfg, *tensors = _batch()
    cfg = dataclasses.replace(cfg, derivative=derivative)
    x, noise, t, r, kind, text, neg = (a[rows] for a in tensors)
    return fm.flow_map_loss(forward, x, noise, t, r, kind, text, neg, cfg, fm.TrainWeighting("beta08"), all_reduce)


def _far_trainer(batch_size, fsdp=False, model_seed=None):
    from anyflow.training.config import from_dict
    from anyflow.training.data import SyntheticClips
    from anyflow.training.run import build_model
    from anyflow.training.trainer import Trainer

    cfg = from_dict({**FAR_CFG, "batch_size": batch_size})
    if model_seed is not None:
        cfg.model.seed = model_seed
    data = SyntheticClips(FAR_GLOBAL_BATCH, sum(cfg.far.chunk_partition), seed=1)  # the global batch
    negative = torch.randn(1, 7, 32, generator=torch.Generator().manual_seed(123))
    return Trainer(build_model(cfg), cfg, data, negative, log_stream=None, fsdp=fsdp)


def _onpolicy_trainer(world, overrides=None):
    from anyflow.models.tiny import tiny_transformer
    from anyflow.training.config import from_dict
    from anyflow.training.data import SyntheticClips
    from anyflow.training.run import build_model
    from anyflow.training.trainer import Trainer

    over = {**ONPOLICY_CFG, **(overrides or {}), "batch_size": 2 // world}
    over["dmd"] = {**ONPOLICY_CFG["dmd"], "dmd_batch_size": 2 // world}
    cfg = from_dict(over)
    negative = torch.randn(1, 7, 32, generator=torch.Generator().manual_seed(123))
    torch.manual_seed(0)  # peft initialises LoRA A from the global generator
    return Trainer(build_model(cfg), cfg, SyntheticClips(2, 8, seed=2), negative, log_stream=None, fsdp=world > 1,
                   real_score=tiny_transformer("bidirectional", seed=7))


def _rollout_grads(model, rows, mode):
    """Gradients of ``mean_b sum(w * x_hat)`` of a FAR rollout (S1, S2, S3 on every chunk) over ``rows``."""
    from anyflow.training import onpolicy as op

    g = torch.Generator().manual_seed(4)
    b = FAR_GLOBAL_BATCH
    noise, text = torch.randn(b, 8, 16, 8, 8, generator=g), torch.randn(b, 7, 32, generator=g)
    w = torch.randn(b, 8, 16, 8, 8, generator=g)
    params = [p for p in model.parameters()]
    model.zero_grad()
    ro = op.FARRollout(model, text[rows], (1, 1, 2, 2, 2), (8, 8))
    x, nfe = ro.run(noise[rows], op.rollout_plan(4, 1, 5.0), grad=True, grad_segments=mode, params=params)
    ((x * w[rows]).sum() / x.shape[0]).backward()  # a local mean: FSDP averages over processes
    return x.detach(), nfe


def _full(t):
    from anyflow.training.distributed import full_tensor

    return None if t is None else full_tensor(t).detach().clone()


def _worker(rank, world, port, path):
    from anyflow.training import distributed as D

    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        out = {}
        # 1. bidirectional flow-map loss, with and without per-block checkpointing
        model = D.shard_model(_model())
        n = SHAPE[0] // world
        results = []
        for checkpointing in (False, True):  # the checkpointed block call re-gathers in the backward
            model.gradient_checkpointing = checkpointing
            model.zero_grad()
            loss = _loss(D.ShardedForward(model), slice(rank * n, (rank + 1) * n), D.all_reduce_sum)
            loss.loss.backward()
            params = dict(model.named_parameters())
            results.append({"loss": D.all_reduce_sum(loss.loss.detach()) / world,
                            "grads": {name: _full(params[name].grad) for name in PARAMS}})  # collective
        out["bidirectional"] = results
        # the mean-velocity target by forward-mode autodiff (torch.func.jvp through the sharded blocks)
        model.gradient_checkpointing = False
        model.zero_grad()
        loss = _loss(D.ShardedForward(model), slice(rank * n, (rank + 1) * n), D.all_reduce_sum, derivative="jvp")
        loss.loss.backward()
        params = dict(model.named_parameters())
        out["bidirectional_jvp"] = {"loss": D.all_reduce_sum(loss.loss.detach()) / world,
                                    "grads": {name: _full(params[name].grad) for name in PARAMS}}

        # 2. FAR on-policy rollout through the KV cache, "all" and "mid" gradients
        far = D.shard_model(_model("far"))
        m = FAR_GLOBAL_BATCH // world
        rows = slice(rank * m, (rank + 1) * m)
        named = dict(far.named_parameters())
        for mode in ("all", "mid"):
            x, nfe = _rollout_grads(far, rows, mode)
            xs = [torch.empty_like(x) for _ in range(world)]
            dist.all_gather(xs, x)
            out[f"rollout_{mode}"] = {"x": torch.cat(xs), "nfe": nfe,
                                      "grads": {name: _full(named[name].grad) for name in FAR_PARAMS}}

        # 3. the FAR pretrain trainer: 3 steps on its slice of the global batch
        trainer = _far_trainer(FAR_GLOBAL_BATCH // world, fsdp=True)
        records = trainer.fit()
        out["far_losses"] = [r["loss"] for r in records]
        out["far_extra"] = [r["loss_bidirectional"] for r in records]
        out["far_kinds"] = [{k: v for k, v in r.items() if k in KIND_KEYS} for r in records]
        out["far_params"] = {n: _full(p) for n, p in trainer.named_params}
        # a sharded checkpoint restores exactly into a fresh sharded trainer (other initial weights)
        state = trainer.state_dict()  # collective
        fresh = _far_trainer(FAR_GLOBAL_BATCH // world, fsdp=True, model_seed=11)
        fresh.load_state_dict(state)
        again = fresh.state_dict()
        same = all(torch.equal(state["model"][k], again["model"][k]) for k in state["model"])
        same &= all(torch.equal(state["ema"]["shadow"][k], again["ema"]["shadow"][k]) for k in state["ema"]["shadow"])
        same &= all(torch.equal(v, again["optimizer"]["state"][i][k])
                    for i, s in state["optimizer"]["state"].items() for k, v in s.items())
        out["restore_exact"] = bool(same) and again["step"] == state["step"]
        out["next_loss"] = [trainer.train_step()["loss"], fresh.train_step()["loss"]]

        # 4. the FAR on-policy trainer (DMD + critic + co-trained forward loss), then bf16 under FSDP's policy
        trainer = _onpolicy_trainer(world)
        out["onpolicy"] = trainer.fit()
        out["onpolicy_params"] = [{n: _full(p) for n, p in named}  # student, critic (names overlap)
                                  for named in (trainer.named_params, trainer.critic_params)]
        out["onpolicy_bf16"] = _onpolicy_trainer(world, {"mixed_precision": True, "total_iter": 1}).fit()
        if rank == 0:
            torch.save(out, path)
    finally:
        dist.destroy_process_group()


def _rel(a, b):
    return float((a - b).abs().max() / b.abs().max().clamp(min=1e-30))


@pytest.fixture(scope="module")
def two_process_results(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("fsdp") / "rank0.pt")
    mp.spawn(_worker, args=(2, free_port(), path), nprocs=2, join=True)
    return torch.load(path)


def test_fsdp2_bidirectional_loss_matches_one_process(two_process_results):
    from anyflow.training.flowmap import BidirectionalForward

    model = _model()  # one process, the whole batch, no sharding (blocks run fused)
    out = _loss(BidirectionalForward(model), slice(None))
    out.loss.backward()
    params = dict(model.named_parameters())
    for got in two_process_results["bidirectional"]:
        torch.testing.assert_close(got["loss"], out.loss.detach(), rtol=1e-6, atol=0)
        for name in PARAMS:
            assert _rel(got["grads"][name], params[name].grad) < 1e-5, name


def test_fsdp2_jvp_target_matches_one_process(two_process_results):
    """``derivative="jvp"`` under FSDP2: forward-mode autodiff through the sharded blocks gives the
    1-process loss and gradients."""
    from anyflow.training.flowmap import BidirectionalForward

    model = _model()
    out = _loss(BidirectionalForward(model), slice(None), derivative="jvp")
    out.loss.backward()
    params = dict(model.named_parameters())
    got = two_process_results["bidirectional_jvp"]
    fd = two_process_results["bidirectional"][0]["loss"]
    assert not torch.equal(got["loss"], fd)  # the JVP target is a different computation than the FD one
    torch.testing.assert_close(got["loss"], out.loss.detach(), rtol=1e-6, atol=0)
    for name in PARAMS:
        assert _rel(got["grads"][name], params[name].grad) < 1e-5, name


@pytest.mark.parametrize("mode", ["all", "mid"])
def test_fsdp2_far_rollout_gradients_match_one_process(two_process_results, mode):
    got = two_process_results[f"rollout_{mode}"]
    model = _model("far")
    x, nfe = _rollout_grads(model, slice(None), mode)
    assert got["nfe"] == nfe == 15  # 5 chunks x 3 jumps
    assert _rel(got["x"], x) < 1e-5
    params = dict(model.named_parameters())
    assert got["grads"]["far_patch_embedding.weight"] is None  # compressed patches: cache steps only (no grad)
    for name in FAR_PARAMS[:-2] + FAR_PARAMS[-1:]:
        assert _rel(got["grads"][name], params[name].grad) < 1e-5, (mode, name)


def test_fsdp2_far_pretrain_trainer_matches_one_process(two_process_results):
    res = two_process_results
    one = _far_trainer(FAR_GLOBAL_BATCH)  # one process, batch = the global batch
    records = one.fit()
    for a, b in zip(res["far_losses"], [r["loss"] for r in records]):
        assert abs(a - b) <= 1e-5 * abs(b), (a, b)
    for a, b in zip(res["far_extra"], [r["loss_bidirectional"] for r in records]):
        assert abs(a - b) <= 1e-5 * abs(b), (a, b)
    # per pair-kind losses are global-batch means too (each process holds only some of the kinds)
    for got, r in zip(res["far_kinds"], records):
        want = {k: v for k, v in r.items() if k in KIND_KEYS}
        assert set(got) == set(want) and want, (got, want)
        assert all(abs(got[k] - want[k]) <= 1e-5 * abs(want[k]) for k in want), (got, want)
        assert not any(k.startswith("_") for k in r), sorted(r)
    for name, p in one.named_params:
        assert _rel(res["far_params"][name], p.detach()) < 1e-5, name
    # the restored trainer holds the same state and takes the same next step
    assert res["restore_exact"]
    assert res["next_loss"][0] == res["next_loss"][1]


def test_fsdp2_far_onpolicy_trainer_matches_one_process(two_process_results):
    res = two_process_results
    one = _onpolicy_trainer(1)
    records = one.fit()
    for got, ref in zip(res["onpolicy"], records):
        for key in ("loss", "loss_dmd", "loss_forward", "loss_critic", "grad_norm", "critic_grad_norm"):
            assert abs(got[key] - ref[key]) <= 1e-5 * abs(ref[key]), (key, got[key], ref[key])
    for got, named in zip(res["onpolicy_params"], (one.named_params, one.critic_params)):  # student, critic
        for name, p in named:
            assert _rel(got[name], p.detach()) < 1e-5, name
    # bf16 parameters in the forward (fp32 master shards, fp32 reduction): close to fp32, not equal
    bf16, fp32 = res["onpolicy_bf16"][0], records[0]
    for key in ("loss", "loss_critic"):
        assert abs(bf16[key] - fp32[key]) <= 2e-2 * abs(fp32[key]) and bf16[key] != fp32[key], key


def torchrun_train(config, out, nproc: int = 2) -> str:
    """Run ``torchrun --nproc_per_node nproc -m anyflow train config --output-dir out`` on the CPU (one thread
    per process); returns its stdout after checking that it exited 0."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
           "-m", "anyflow", "train", str(config), "--output-dir", str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_torchrun_anyflow_train_checkpoint_resumes_in_one_process(tmp_path):
    from anyflow.training import checkpoint as ckpt
    from anyflow.training.run import train_from_config

    cfg = tmp_path / "run.yaml"
    cfg.write_text("preset: tiny-far\nbatch_size: 1\ntotal_iter: 2\nfar: {bidirectional_modeling_prob: 0.5}\n")
    out = tmp_path / "run"
    assert torchrun_train(cfg, out).count("step 2: checkpoint in") == 1  # rank 0 alone reports
    state = ckpt.load(ckpt.latest_checkpoint(out))
    assert state["step"] == 2 and state["data"] == {"index": 2}
    assert all(not hasattr(v, "device_mesh") for v in state["model"].values())  # whole tensors
    lines = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [1, 2]
    # rank 0 exported the EMA transformer (whole weights)
    from diffusers import AnyFlowFARTransformer3DModel

    exported = AnyFlowFARTransformer3DModel.from_pretrained(out / "transformer").state_dict()
    for name, v in state["ema"]["shadow"].items():
        assert torch.equal(exported[name], v), name
    # one process picks the run up from the 2-process checkpoint
    cfg.write_text(cfg.read_text().replace("total_iter: 2", "total_iter: 3"))
    trainer = train_from_config(str(cfg), output_dir=out, log_stream=None)
    assert trainer.step == 3 and trainer.world_size == 1
    lines = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [1, 2, 3] and all(torch.isfinite(torch.tensor(x["loss"])) for x in lines)


def test_enable_swaps_and_restores_block_classes():
    import anyflow
    from anyflow.models.bidirectional import dense_self_attention
    from anyflow.models.blocks import prepare_text, rope_for, run_blocks
    from anyflow.models.tiny import tiny_transformer

    model = tiny_transformer("bidirectional", seed=3)
    original = [type(b) for b in model.blocks]
    handle = anyflow.enable(model, backend="torch")
    assert all(b._anyflow_block and type(b).__name__ == "AnyFlowTransformerBlock" for b in model.blocks)
    assert all(isinstance(b, cls) for b, cls in zip(model.blocks, original))
    # blocks called as modules (their own norm1 modulation, as under FSDP) = the fused block loop
    x, m_rows = torch.randn(1, 8, 24), torch.randn(1, 2, 6, 24)
    text = prepare_text(model, torch.randn(1, 7, 32))
    cos, sin = rope_for(model, 0, 2, (2, 2), False, x.device)
    attend, segs = dense_self_attention(cos, sin), ((2, 4),)
    y = x
    for i, block in enumerate(model.blocks):
        y = block(i, y, text, m_rows, segs, attend)
    torch.testing.assert_close(y, run_blocks(model, x, text, m_rows, segs, attend), rtol=1e-5, atol=1e-5)
    handle.disable()
    assert [type(b) for b in model.blocks] == original


def test_single_process_helpers_without_process_group():
    from anyflow.training import distributed as D

    assert D.init_from_env() is None or dist.is_initialized()  # WORLD_SIZE unset under pytest
    with pytest.raises(ValueError, match="WORLD_SIZE"):
        D.world_size_from_env({"WORLD_SIZE": "two"})
    assert D.world_size_from_env({}) == 1
    model = _model()
    assert not D.is_sharded(model) and D.compute_dtype(model) == torch.float32
    assert D.run_sharded(model, lambda m, a: (m, a), 3) == (model, 3)
    p = torch.nn.Parameter(torch.randn(3, 2))
    D.load_full_(p, torch.ones(3, 2))
    assert torch.equal(p.detach(), torch.ones(3, 2))
    with pytest.raises(ValueError, match="shape"):
        D.load_full_(p, torch.ones(2, 3))
    with pytest.raises(RuntimeError, match="process group"):
        D.shard_model(model)
