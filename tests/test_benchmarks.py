"""Smoke test of benchmarks/: every path runs once at tiny sizes on CPU and writes finite, complete JSON.

Times are not asserted (conventions: no test asserts a time); the GPU figures come from
benchmarks/device_check.sh.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks import common, kernels, levers, nfe, report  # noqa: E402
from benchmarks.__main__ import main as bench_main  # noqa: E402


def _finite(x):
    return isinstance(x, (int, float)) and math.isfinite(x)


@pytest.mark.parametrize("mode,extra", [("bidirectional", ["--guidance"]), ("far", ["--chunk-partition", "1,2"])])
def test_nfe_tiny(tmp_path, mode, extra):
    rec = nfe.main(["--model", "tiny", "--mode", mode, "--height", "32", "--width", "32", "--frames", "9",
                    "--iters", "1", "--backends", "diffusers,diffusers:cudnn,torch,anyflow:cuda,auto,torch+cudnn,auto+tuned",
                    "--out", str(tmp_path)] + extra)
    path = next(tmp_path.glob("nfe_tiny_*.json"))
    assert json.loads(path.read_text())["config"] == rec["config"]
    assert (path.with_suffix(".md")).is_file()
    for key in ("date", "command", "device", "driver", "versions"):
        assert key in rec["meta"]
    assert _finite(rec["peaks"]["bf16_matmul_tflops"])
    rows = {r["variant"]: r for r in rec["variants"]}
    assert rows["diffusers:cudnn"]["status"] == "skipped" and rows["diffusers:cudnn"]["reason"]
    assert rows["anyflow:torch+cudnn"]["status"] == "skipped" and "needs CUDA" in rows["anyflow:torch+cudnn"]["reason"]
    ok = [r for r in rec["variants"] if r["status"] == "ok"]
    assert {"diffusers", "anyflow:torch", "anyflow:auto", "anyflow:auto+tuned"} <= {r["variant"] for r in ok}
    for r in ok:
        assert all(_finite(r["per_nfe"][k]) and r["per_nfe"][k] > 0 for k in ("median_ms", "nfe_per_s", "tflops", "of_peak"))
        assert "video" not in r  # whole videos are measured by levers, never computed as steps x per-NFE
        assert (mode == "far") == _finite(r.get("per_cache_step_ms"))
        assert all(_finite(w["ms"]) and w["tflop"] > 0 for w in r["workloads"])
    assert _finite(rec["ratios"]["anyflow:torch vs diffusers"]["per_nfe"])


def test_nfe_custom_config_and_pipeline(tmp_path):
    from anyflow.models.tiny import TINY_TRANSFORMER

    cfg = tmp_path / "mini.json"
    cfg.write_text(json.dumps(dict(TINY_TRANSFORMER, num_layers=1, _class_name="AnyFlowTransformer3DModel")))
    rec = nfe.main(["--model", str(cfg), "--height", "32", "--width", "32", "--frames", "5", "--iters", "1",
                    "--backends", "diffusers,torch", "--pipeline", "tiny"])
    assert rec["config"]["model"] == "mini"
    p = rec["pipeline"]
    assert "error" not in p, p
    assert _finite(p["text_encode_ms"]) and _finite(p["vae_decode_ms"])


@pytest.mark.parametrize("mode,extra", [("bidirectional", []), ("far", ["--chunk-partition", "1,2,2,1"])])
def test_levers_tiny(tmp_path, mode, extra):
    rec = levers.main(["--model", "tiny", "--mode", mode, "--height", "64", "--width", "64", "--frames", "21",
                       "--steps", "3", "--iters", "1", "--out", str(tmp_path)] + extra)
    assert json.loads((tmp_path / f"levers_tiny_{mode}.json").read_text())["config"] == rec["config"]
    rows = {r["lever"]: r for r in rec["levers"]}
    assert list(rows) == list(levers.LEVERS)
    chunks = 4 if mode == "far" else 1
    for name, r in rows.items():
        assert r["status"] == "ok", (name, r["reason"])
        assert r["nfe"] == 3 * chunks and _finite(r["video_ms"]) and _finite(r["speedup_vs_baseline"])
        assert r["rel_l2_vs_first"] < 1e-4, (name, r["rel_l2_vs_first"])  # levers change rounding only
    assert rec["host_reads_per_video"] == 0 and rec["steps_per_video"] == 3 * chunks
    calls = {r["pipeline"]: r for r in rec["pipelines"]}
    expected = [p for p in levers.PIPELINES if mode == "far" or p != "diffusers_official"]
    assert list(calls) == expected
    assert all(r["status"] == "ok" and _finite(r["video_ms"]) and r["iters"] == 1 for r in calls.values()), calls
    comp = rec["pipeline_comparisons"]
    assert comp["reference"] == ("diffusers_official" if mode == "far" else "diffusers")
    assert _finite(comp["rows"]["anyflow_all"]["speedup_vs_diffusers"])
    # same model, same noise: the enabled pipeline computes the official model (diffusers bidirectional, diffusers
    # with its FAR padded keys dropped); diffusers as shipped deviates from it in FAR (the upstream bug)
    assert comp["rows"]["anyflow"]["rel_l2_vs_official"] < 1e-4 and comp["rows"]["anyflow_all"]["rel_l2_vs_official"] < 1e-4
    if mode == "far":
        assert comp["rows"]["diffusers"]["rel_l2_vs_official"] > 1e-3
    assert rec["sdpa_choices"], "the tuned levers record their per-shape kernel table"
    assert all(_finite(v) for v in rec["euler"].values())
    summary = tmp_path / "summary.md"
    assert report.main(["--results", str(tmp_path), "--no-readme", "--markdown", str(summary)]) == 0
    assert "End-to-end levers" in summary.read_text() and "cuda_graphs" in summary.read_text()
    assert "anyflow_all" in summary.read_text()
    with pytest.raises(ValueError, match="--levers"):
        levers.main(["--model", "tiny", "--levers", "baseline,turbo"])
    with pytest.raises(ValueError, match="--pipelines"):
        levers.main(["--model", "tiny", "--pipelines", "diffusers,vllm"])


def test_nfe_wan_pipeline_parts(monkeypatch):
    """``--pipeline wan`` builds Wan2.1's text encoder and VAE classes with random weights and times them
    (here shrunk: the real UMT5-XXL alone is 5.7 B parameters)."""
    monkeypatch.setattr(nfe, "WAN_TEXT_ENCODER", dict(nfe.WAN_TEXT_ENCODER, vocab_size=64, d_model=32, d_ff=64,
                                                      num_layers=1, num_heads=2, d_kv=16))
    monkeypatch.setattr(nfe, "WAN_VAE", dict(base_dim=8))
    rec = nfe.main(["--model", "tiny", "--height", "32", "--width", "32", "--frames", "5", "--iters", "1",
                    "--backends", "torch", "--pipeline", "wan"])
    p = rec["pipeline"]
    assert "error" not in p, p
    assert _finite(p["text_encode_ms"]) and _finite(p["vae_decode_ms"]) and p["vae_latent"] == [1, 16, 2, 4, 4]


def test_nfe_rejects_bad_arguments():
    with pytest.raises(ValueError, match="--backends"):
        nfe.parse_variants("diffusers,fast")
    with pytest.raises(ValueError, match="--backends"):
        nfe.parse_variants("torch+fastest")
    assert nfe.parse_variants("torch+tuned,anyflow:cuda+cudnn") == ["anyflow:torch+tuned", "anyflow:cuda+cudnn"]
    with pytest.raises(ValueError, match="--model"):
        nfe.load_config("7B", "bidirectional", [1])


def test_kernels_smoke_and_report(tmp_path):
    kernels.main(["--smoke", "--backends", "torch,cuda", "--out", str(tmp_path / "k")])
    rec = json.loads((tmp_path / "k" / "kernels_smoke.json").read_text())
    assert rec["kind"] == "kernels" and "command" in rec["meta"]
    assert all(r["ok"] is not False for r in rec["rows"]), [r for r in rec["rows"] if r["ok"] is False]
    assert all(_finite(r["ms"]) for r in rec["rows"] if r["ms"] is not None)
    nfe.main(["--model", "tiny", "--height", "32", "--width", "32", "--frames", "5", "--iters", "1",
              "--backends", "diffusers,torch", "--out", str(tmp_path / "n")])

    readme = tmp_path / "README.md"
    readme.write_text(f"# x\n\n## Performance\n{report.MARKER}\nold\n{report.MARKER}\n\n## After\n")
    assert bench_main(["report", "--results", str(tmp_path), "--readme", str(readme),
                       "--markdown", str(tmp_path / "summary.md"), "--plot", str(tmp_path / "nfe.png")]) == 0
    text = readme.read_text()
    assert "old" not in text and "No GPU results" in text and text.endswith("## After\n")
    summary = (tmp_path / "summary.md").read_text()
    assert "anyflow:torch" in summary and "adaln_modulate" in summary
    pytest.importorskip("matplotlib")
    assert (tmp_path / "nfe.png").stat().st_size > 0


def test_report_without_markers(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("# no markers\n")
    assert report.main(["--results", str(tmp_path), "--readme", str(readme)]) == 1
    assert readme.read_text() == "# no markers\n"


def test_pytest_benchmark_suite_cpu_cases():
    pytest.importorskip("pytest_benchmark")
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--benchmark-disable",
                           str(ROOT / "benchmarks" / "test_bench.py")], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert " passed" in proc.stdout


@pytest.mark.parametrize("size,bidir,far_s1,far_s4", [("1.3B", 283.0, 442, 944), ("14B", 1678, 3279, 6806)])
def test_flop_model_matches_performance_doc(size, bidir, far_s1, far_s4):
    """performance.md 2.1/2.2 at 480x832x81: bidirectional NFE TFLOP and FAR totals (NFEs + 7 cache steps)."""
    from types import SimpleNamespace

    from benchmarks import common

    cfg = SimpleNamespace(**common.CONFIGS[size], patch_size=(1, 2, 2), compressed_patch_size=(1, 4, 4),
                          full_chunk_limit=3)
    assert common.model_flops(cfg, 32760, 32760) / 1e12 == pytest.approx(bidir, rel=2e-3)
    plan = nfe.far_plan(cfg, (21, 60, 104), common.CHUNK_PARTITION)
    assert [p["k_tokens"] for p in plan if p["kind"] == "nfe"] == [1560, 6240, 10920, 14430, 15600, 16770, 17940, 17550]
    assert [p["q_tokens"] for p in plan if p["kind"] == "cache"] == [1560, 6240, 9750, 10920, 12090, 13260, 14430]
    n = sum(p["flops"] for p in plan if p["kind"] == "nfe") / 1e12
    c = sum(p["flops"] for p in plan if p["kind"] == "cache") / 1e12
    assert n + c == pytest.approx(far_s1, rel=2e-3)
    assert 4 * n + c == pytest.approx(far_s4, rel=2e-3)


def test_diffusers_attention_variant_restores_state(monkeypatch):
    """A diffusers attention-backend variant (here the always-available ``_native_math`` standing in for
    cuDNN) keeps FAR's flex self-attention, runs, and leaves processors and diffusers' global default as found."""
    import torch
    from diffusers.models.attention_dispatch import _AttentionBackendRegistry

    from anyflow.models.tiny import tiny_transformer

    monkeypatch.setitem(nfe.DIFFUSERS_ATTENTION, "flash", "_native_math")
    model = tiny_transformer("far", chunk_partition=(1, 2)).eval()
    loads = nfe.workloads(model, "far", (3, 4, 4), [1, 2], 1, torch.device("cpu"), torch.float32)
    procs = [m.processor for m in model.modules() if hasattr(getattr(m, "processor", None), "_attention_backend")]
    before = [p._attention_backend for p in procs]
    active = _AttentionBackendRegistry._active_backend
    with torch.no_grad():
        row = nfe.time_variant(model, "diffusers:flash", loads, torch.device("cpu"), 1, 1.0)
    assert row["status"] == "ok", row["reason"]
    assert [p._attention_backend for p in procs] == before
    assert _AttentionBackendRegistry._active_backend == active


def test_readme_block_from_gpu_records(tmp_path):
    """The README block lists NFE rows, the text-encoder/VAE line and the levers of CUDA records (CPU records
    relabelled here; real ones come from the GPU harness)."""
    rec = nfe.main(["--model", "tiny", "--height", "32", "--width", "32", "--frames", "5", "--iters", "1",
                    "--backends", "diffusers,torch", "--pipeline", "tiny"])
    lev = levers.main(["--model", "tiny", "--height", "32", "--width", "32", "--frames", "5", "--steps", "2",
                       "--iters", "1", "--levers", "baseline,all"])
    for r in (rec, lev):
        r["meta"]["device_type"] = "cuda"
    block = report.readme_block([rec, lev])
    assert "anyflow:torch" in block and "vs diffusers" in block
    assert "Outside the DiT" in block and "VAE decode" in block
    assert "End-to-end levers" in block and "| all |" in block
    assert "Whole videos" in block and "anyflow_all" in block and "measured end to end" in block


def test_device_check_rehearsal_on_cpu(tmp_path):
    """``HARNESS_SMOKE=1``: the device check runs every stage at tiny sizes on CPU (Triton in the interpreter, the
    CUDA ops through their C++ CPU twins), so an import, an argument or an API that rotted is found here and not in
    a GPU lease. Its figures land in one JSON-lines file that the report reads back; at most 8 files."""
    import os

    # the first row check "loses" the device once: the stage must exit 75 and rerun the rows not yet written
    env = dict(os.environ, HARNESS_SMOKE="1", PYTHON=sys.executable, OMP_NUM_THREADS="1",
               BENCH_SIMULATE_DEVICE_LOST=str(tmp_path.parent / f"{tmp_path.name}-lost"))
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "device_check.sh"), str(tmp_path)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    log = (tmp_path / "log.txt").read_text() if (tmp_path / "log.txt").exists() else ""
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:] + log[-3000:]
    assert len(list(tmp_path.iterdir())) <= 8
    stages = [line.split("\t") for line in (tmp_path / "stages.tsv").read_text().splitlines()[1:]]
    ran = {name: rc for name, rc, _ in stages if not rc.startswith("skipped")}
    assert [n for n in ran if n != "install"][:6] == ["ceilings", "kernels_triton_1.3B", "kernels_triton_14B", "nfe_1.3B_bidirectional",
                             "nfe_1.3B_bidirectional_cfg", "far_video_1.3B"], stages  # the order of value
    assert {"cuda_1.3B", "summary"} <= set(ran), stages
    assert all(rc == "0" for rc in ran.values()), (stages, log[-3000:])
    assert log.count("CUDA context lost, rerunning the rows not yet written") == 1
    records = report.load(tmp_path)
    kinds = [r["kind"] for r in records]
    assert kinds.count("ceilings") == 1 and kinds.count("nfe") == 3 and kinds.count("levers") == 1
    for r in records:
        assert r["meta"]["git"] and r["meta"]["command"] and r["meta"]["versions"]["torch"]
    rows = [row for r in records if r["kind"] == "kernels" for row in r["rows"]]
    # the stage that lost its device: the rerun (--resume) measured exactly the rows the first run had not written
    entries = common.read_jsonl(tmp_path / "results.jsonl")
    runs = [e for e in entries if e.get("type") == "run"]
    resumed = next(i for i, e in enumerate(runs) if "--resume" in e["meta"]["command"])
    first = runs[resumed - 1]
    assert first["key"] == runs[resumed]["key"]

    def row_ids(run):
        return [e["row"]["id"] for e in entries if e.get("type") == "row" and e["run"] == run["run"]]

    before, after = row_ids(first), row_ids(runs[resumed])
    assert before and after and not set(before) & set(after)
    complete = row_ids(runs[resumed + 1])  # the 14B stage: the same smoke shapes and backends, never interrupted
    union = set(before) | set(after)
    assert set(complete) <= union and all(r.startswith("baseline") for r in union - set(complete))
    ops_run = {(row["op"], row["backend"]) for row in rows if row["status"] == "ok"}
    assert ("segmented_attention (3 separate segments)", "triton") in ops_run and ("adaln_modulate", "cuda") in ops_run
    assert all(row["ok"] is not False for row in rows), [row for row in rows if row["ok"] is False]
    bidir = [r for r in records if r["kind"] == "nfe" and r["config"]["model"] == "tiny"]
    assert {r["config"]["batch"] for r in bidir} == {1, 2}
    far = next(r for r in records if r["kind"] == "levers")
    assert [p["pipeline"] for p in far["pipelines"]] == ["anyflow", "diffusers", "diffusers_official", "anyflow_all"]
    builds = [e for e in common.read_jsonl(tmp_path / "results.jsonl") if e.get("type") == "build"]
    assert len(builds) == 1 and builds[0]["status"] == "ok"
    summary = (tmp_path / "summary.md").read_text()
    assert "Ceilings" in summary and "Per NFE" in summary and "Kernels" in summary and "measured end to end" in summary


def test_jsonl_record_survives_a_kill_and_resumes(tmp_path):
    """Every row reaches the JSON-lines file when it is measured; a torn last line (kill mid-write) is skipped;
    a rerun with the same key and --resume skips the rows already written."""
    path = tmp_path / "r.jsonl"
    rec = common.Record({"kind": "nfe", "meta": {"date": "x"}, "variants": []}, key="k", jsonl=path)
    rec.add("variants", {"variant": "diffusers", "v": 1})
    rec.set("ratios", {"a": 1})
    with open(path, "a") as f:
        f.write('{"type": "row", "run": "')  # a write cut short
    again = common.Record({"kind": "nfe", "meta": {"date": "y"}, "variants": []}, key="k", jsonl=path)
    assert again.done("variants", "variant") == {"diffusers"}
    assert common.Record({"kind": "nfe", "meta": {}}, key="other", jsonl=path).done("variants", "variant") == set()
    again.add("variants", {"variant": "anyflow:torch", "v": 2})
    runs = common.records_from_jsonl(path)
    assert [len(r.get("variants", [])) for r in runs] == [1, 1, 0]
    assert runs[0]["ratios"] == {"a": 1} and runs[1]["variants"][0]["variant"] == "anyflow:torch"


def test_nfe_resume_skips_written_variants(tmp_path):
    path = tmp_path / "r.jsonl"
    args = ["--model", "tiny", "--height", "32", "--width", "32", "--frames", "5", "--iters", "1", "--jsonl", str(path)]
    nfe.main(args + ["--backends", "diffusers"])
    rec = nfe.main(args + ["--backends", "diffusers,torch", "--resume"])
    assert [r["variant"] for r in rec["variants"]] == ["anyflow:torch"]


def test_auto_table_from_gpu_kernel_records(tmp_path):
    """A kernel enters the ``auto`` table of an architecture only if it passed and beat torch at every shape set."""
    def rec(model, rows):
        return {"kind": "kernels", "meta": {"device_type": "cuda", "capability": "sm_90", "model": model, "date": "d",
                                            "device": "H200"}, "rows": rows}

    def row(op, backend, ms, ok=True, device_ms=None):
        return {"op": op, "backend": backend, "ms": ms, "device_ms": device_ms, "ok": ok, "status": "ok"}

    records = [
        rec("1.3B", [row("a", "torch", 1.0), row("a", "triton", 0.5), row("a", "cuda", 0.7),
                     row("b", "torch", 1.0), row("b", "triton", 0.5, ok=False),
                     row("c", "torch", 1.0, device_ms=0.2), row("c", "triton", 0.9, device_ms=0.3),
                     row("d", "torch", 1.0), row("d", "cuda", 0.5)]),
        rec("14B", [row("a", "torch", 2.0), row("a", "triton", 1.0), row("a", "cuda", 1.5),
                    row("b", "torch", 2.0), row("b", "triton", 1.0),
                    row("c", "torch", 2.0, device_ms=0.5), row("c", "triton", 1.0, device_ms=0.4),
                    row("d", "torch", 1.0), row("d", "cuda", 1.5)]),
    ]
    # a: both kernels win everywhere, triton faster; b: failed its check once; c: slower on graph replay at 1.3B;
    # d: slower at 14B
    assert report.auto_table(records) == {"sm_90": {"a": "triton"}}
    path = tmp_path / "measured.py"
    path.write_text((ROOT / "anyflow" / "ops" / "measured.py").read_text())
    report.write_auto_table({"sm_90": {"a": "triton"}}, path)
    namespace = {}
    exec(path.read_text(), namespace)
    assert namespace["AUTO_KERNELS"] == {"sm_90": {"a": "triton"}}
    assert namespace["__doc__"].startswith("Where ``backend=\"auto\"`` uses a kernel")
