"""`anyflow train CONFIG`: YAML -> Trainer -> fit, checkpoints, resume from the run folder; TensorClips."""

import json

import torch

from anyflow.cli import main
from anyflow.training import checkpoint as ckpt
from anyflow.training.data import TensorClips


def _write(path, text):
    path.write_text(text)
    return path


def test_cli_train_tiny_onpolicy_writes_checkpoint_and_resumes(tmp_path, capsys):
    cfg = _write(tmp_path / "run.yaml", """
preset: tiny
phase: onpolicy
batch_size: 2
total_iter: 2
dmd:
  dmd_batch_size: 1
  rollout_steps: [2, 4]
  teacher: {kind: bidirectional, tiny: true, seed: 7}
""")
    out = tmp_path / "run"
    assert main(["train", str(cfg), "--output-dir", str(out), "--steps", "1"]) == 0
    assert (out / "config.yaml").is_file() and ckpt.latest_checkpoint(out).name == "checkpoint-0000001.pt"
    state = ckpt.load(ckpt.latest_checkpoint(out))
    assert state["step"] == 1 and "critic" in state and "critic_optimizer" in state
    # the same command continues from the checkpoint up to total_iter
    assert main(["train", str(cfg), "--output-dir", str(out)]) == 0
    text = capsys.readouterr().out
    assert "resumed from" in text and "step 2: checkpoint" in text
    lines = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [1, 2] and all("loss_critic" in x for x in lines)


def test_cli_train_pretrain_from_tensor_file(tmp_path):
    g = torch.Generator().manual_seed(0)
    data = tmp_path / "clips.pt"
    torch.save({"latents": torch.randn(5, 3, 16, 8, 8, generator=g), "text": torch.randn(5, 7, 32, generator=g),
                "negative": torch.randn(7, 32, generator=g)}, data)
    cfg = _write(tmp_path / "p.yaml", "preset: tiny\ntotal_iter: 2\nbatch_size: 2\n")
    assert main(["train", str(cfg), "--output-dir", str(tmp_path / "o"), "--data", str(data)]) == 0
    assert ckpt.load(ckpt.latest_checkpoint(tmp_path / "o"))["data"] == {"index": 2}


def test_cli_train_usage_errors(tmp_path, capsys):
    bad = _write(tmp_path / "bad.yaml", "preset: tiny\nno_such_key: 1\n")
    assert main(["train", str(bad)]) == 2
    assert "no_such_key" in capsys.readouterr().err
    assert main(["train", "tiny", "--data", str(tmp_path / "missing.pt")]) == 2


def test_tensor_clips_epochs_and_state():
    lat = torch.arange(5.0)[:, None, None, None, None].expand(5, 1, 1, 1, 1).clone()
    txt = torch.arange(5.0)[:, None, None].clone()
    it = TensorClips(lat, txt, batch_size=2, seed=3)
    seen = [next(it)[0].flatten().tolist() for _ in range(5)]  # 10 samples = two epochs
    flat = sum(seen, [])
    assert sorted(flat[:5]) == [0, 1, 2, 3, 4] and sorted(flat[5:]) == [0, 1, 2, 3, 4]
    it2 = TensorClips(lat, txt, batch_size=2, seed=3)
    it2.load_state_dict({"index": 3})
    assert next(it2)[0].flatten().tolist() == seen[3]
    x, t = next(TensorClips(lat, txt, 2, seed=3))
    assert torch.equal(x.flatten(), t.flatten())  # latents and text stay paired


def test_cli_train_consistency_distillation_uses_the_config_teacher(tmp_path, monkeypatch):
    """``consistency.teacher`` in the YAML makes ``anyflow train`` distil that model's ODE (the teacher is
    queried every step); without it the phase is consistency training (no teacher calls)."""
    from anyflow.training import consistency as cons

    calls = []
    real = cons.teacher_velocity

    def counting(model):
        v = real(model)
        return lambda z, t, text: calls.append(z.shape[0]) or v(z, t, text)

    monkeypatch.setattr("anyflow.training.run.teacher_velocity", counting)
    base = "preset: tiny\nphase: consistency\nbatch_size: 2\ntotal_iter: 2\nconsistency: {num_intervals: 8%s}\n"
    cfg = _write(tmp_path / "cd.yaml", base % ", teacher: {kind: bidirectional, tiny: true, seed: 3}")
    assert main(["train", str(cfg), "--output-dir", str(tmp_path / "cd")]) == 0
    assert len(calls) >= 2, calls  # at least one teacher ODE step per optimiser step
    calls.clear()
    plain = _write(tmp_path / "ct.yaml", base % "")
    assert main(["train", str(plain), "--output-dir", str(tmp_path / "ct")]) == 0
    assert calls == []
