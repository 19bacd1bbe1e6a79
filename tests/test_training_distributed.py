"""FSDP2 data parallelism: 2 processes (gloo, CPU) give the loss and gradients of 1 process on the global batch."""

import socket

import pytest
import torch
import torch.distributed as dist

if not dist.is_available() or not dist.is_gloo_available():
    pytest.skip("torch.distributed with gloo is unavailable", allow_module_level=True)

import torch.multiprocessing as mp

SHAPE = (4, 2, 16, 8, 8)  # global batch B, F, C, H, W
PARAMS = ("blocks.0.attn1.to_q.weight", "blocks.1.scale_shift_table", "blocks.1.ffn.net.2.weight",
          "condition_embedder.text_embedder.linear_1.weight", "patch_embedding.weight", "proj_out.weight")


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


def _model():
    import anyflow
    from anyflow.testing.tiny import tiny_transformer

    model = tiny_transformer("bidirectional", seed=3).train()
    anyflow.enable(model, backend="torch")
    return model


def _loss(forward, rows, all_reduce=None):
    from anyflow.training import flowmap as fm

    cfg, *tensors = _batch()
    x, noise, t, r, kind, text, neg = (a[rows] for a in tensors)
    return fm.flow_map_loss(forward, x, noise, t, r, kind, text, neg, cfg, fm.TrainWeighting("beta08"), all_reduce)


def _worker(rank, world, port, path):
    from anyflow.training import distributed as D

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        model = D.shard_model(_model())
        n = SHAPE[0] // world
        results = []
        for checkpointing in (False, True):  # the checkpointed block call re-gathers in the backward
            model.gradient_checkpointing = checkpointing
            model.zero_grad()
            out = _loss(D.ShardedForward(model), slice(rank * n, (rank + 1) * n), D.all_reduce_sum)
            out.loss.backward()
            loss = D.all_reduce_sum(out.loss.detach()) / world
            params = dict(model.named_parameters())
            grads = {name: params[name].grad.full_tensor() for name in PARAMS}  # collective: every rank
            results.append({"loss": loss, "grads": grads})
        if rank == 0:
            torch.save(results, path)
    finally:
        dist.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_fsdp2_two_processes_match_one(tmp_path):
    from anyflow.training.flowmap import BidirectionalForward

    path = str(tmp_path / "rank0.pt")
    mp.spawn(_worker, args=(2, _free_port(), path), nprocs=2, join=True)
    results = torch.load(path)

    model = _model()  # one process, the whole batch, no sharding (blocks run fused)
    out = _loss(BidirectionalForward(model), slice(None))
    out.loss.backward()
    params = dict(model.named_parameters())
    for got in results:
        torch.testing.assert_close(got["loss"], out.loss.detach(), rtol=1e-6, atol=0)
        for name in PARAMS:
            ref = params[name].grad
            err = (got["grads"][name] - ref).abs().max() / ref.abs().max()
            assert err < 1e-5, (name, float(err))


def test_enable_swaps_and_restores_block_classes():
    import anyflow
    from anyflow.models import fused
    from anyflow.testing.tiny import tiny_transformer

    model = tiny_transformer("bidirectional", seed=3)
    original = [type(b) for b in model.blocks]
    handle = anyflow.enable(model, backend="torch")
    assert all(b._anyflow_block and type(b).__name__ == "AnyFlowTransformerBlock" for b in model.blocks)
    assert all(isinstance(b, cls) for b, cls in zip(model.blocks, original))
    # blocks called as modules (their own norm1 modulation, as under FSDP) = the fused block loop
    x, m_rows = torch.randn(1, 8, 24), torch.randn(1, 2, 6, 24)
    text = fused.prepare_text(model, torch.randn(1, 7, 32))
    cos, sin = fused.rope_for(model, 0, 2, (2, 2), False, x.device)
    attend, segs = fused.dense_self_attention(cos, sin, "torch"), ((2, 4),)
    y = x
    for i, block in enumerate(model.blocks):
        y = block(i, y, text, m_rows, segs, attend, "torch")
    torch.testing.assert_close(y, fused.run_blocks(model, x, text, m_rows, segs, attend, "torch"), rtol=1e-5, atol=1e-5)
    handle.disable()
    assert [type(b) for b in model.blocks] == original
