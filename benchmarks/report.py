"""Tables and a plot from benchmark JSON files; regenerates the README performance table.

    python -m benchmarks report                      # benchmarks/results/**.json -> README.md perf-table block
    python -m benchmarks report --results OUT --no-readme --markdown OUT/summary.md --plot OUT/nfe.png

The README block is the text between two ``<!-- perf-table -->`` lines; only GPU (CUDA) results go
into it, and without any it says so. Ratios come from pairs measured in the same process.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

if __package__:
    from . import common
else:  # pragma: no cover - run as a file
    from benchmarks import common

MARKER = "<!-- perf-table -->"
ROOT = Path(__file__).resolve().parent.parent


KINDS = ("ceilings", "nfe", "kernels", "levers")


def load(results: Path) -> list[dict]:
    """Every benchmark record (``kind`` ceilings, nfe, kernels or levers) under ``results``: JSON files and the
    runs of JSON-lines files (the device check's ``results.jsonl``), sorted by date."""
    records = []
    for path in sorted(results.rglob("*.json")) + sorted(results.rglob("*.jsonl")):
        if path.suffix == ".jsonl":
            found = common.records_from_jsonl(path)
        else:
            try:
                found = [json.loads(path.read_text())]
            except (OSError, json.JSONDecodeError):
                continue
        for rec in found:
            if isinstance(rec, dict) and rec.get("kind") in KINDS:
                rec["_path"] = str(path)
                records.append(rec)
    return sorted(records, key=lambda r: r["meta"]["date"])


def nfe_table(records: list[dict]) -> list[str]:
    lines = ["| device | model | mode | variant | ms/NFE | TFLOP/s (of measured peak) | vs diffusers (per NFE) "
             "| peak GiB | date |", "|---|---|---|---|---|---|---|---|---|"]
    for rec in records:
        c, m = rec["config"], rec["meta"]
        mode = c["mode"] + (" CFG (batch 2)" if c["guidance"] else "")
        for r in rec.get("variants", []):
            if r["status"] != "ok":
                continue
            p = r["per_nfe"]
            ratio = (rec.get("ratios") or {}).get(f"{r['variant']} vs diffusers", {}).get("per_nfe")
            mem = r.get("peak_mem_gib")
            lines.append(
                f"| {m['device']} | {c['model']} {c['width']}x{c['height']}x{c['frames']} | {mode} | {r['variant']} | "
                f"{p['median_ms']:.1f} | {p['tflops']:.0f} ({100 * p['of_peak']:.0f}%) | "
                f"{f'{ratio:.2f}x' if ratio else '-'} | {f'{mem:.1f}' if mem is not None else '-'} | {m['date'][:10]} |")
    return lines


def kernels_table(records: list[dict]) -> list[str]:
    lines = ["| device | shapes | op | backend | ms (call) | ms (graph replay) | TFLOP/s or GB/s (of copy) | check |",
             "|---|---|---|---|---|---|---|---|"]
    for rec in records:
        model = rec["meta"].get("model", "-")
        for r in rec.get("rows", []):
            if "TFLOP/s" in r:
                rate = f"{r['TFLOP/s']:.0f} TFLOP/s"
            elif "GB/s" in r:
                rate = f"{r['GB/s']:.0f} GB/s ({100 * r['of_copy_bw']:.0f}%)"
            else:
                rate = ""
            ok = {True: "pass", False: "FAIL", None: ""}[r["ok"]]
            if r.get("status", "ok") != "ok":
                ok = f"{r['status']}: {r.get('note', '')[:80]}"
            ms = f"{r['ms']:.3f}" if r.get("ms") else "-"
            dms = f"{r['device_ms']:.3f}" if r.get("device_ms") else "-"
            lines.append(f"| {rec['meta']['device']} | {model} | {r['op']} | {r['backend']} | {ms} | {dms} | {rate} | {ok} |")
    return lines


def ceilings_lines(records: list[dict]) -> list[str]:
    out = []
    for rec in records:
        pk = rec.get("peaks")
        if pk:
            out.append(f"- {rec['meta']['device']} ({rec['meta']['date'][:10]}): bf16 matmul {pk['bf16_matmul_tflops']:.0f} "
                       f"TFLOP/s, device copy {pk['copy_gbs']:.0f} GB/s (measured)")
    return out


def parts_lines(records: list[dict]) -> list[str]:
    """One line per NFE record that also timed text encoding and VAE decode (``--pipeline``)."""
    out = []
    for rec in records:
        p, c = rec.get("pipeline"), rec["config"]
        if p and "error" not in p:
            out.append(f"- {rec['meta']['device']}, {p['pipeline']}, {c['width']}x{c['height']}x{c['frames']}: text encoding "
                       f"{p['text_encode_ms']:.1f} ms, VAE decode {p['vae_decode_ms']:.1f} ms (latent {p['vae_latent']})")
    return out


def pipeline_lines(records: list[dict]) -> list[str]:
    """One line per levers record with whole-pipeline rows: each row's video time, its ratio to diffusers and
    its output difference from the official semantics."""
    out = []
    for rec in records:
        rows = [r for r in rec.get("pipelines", []) if r["status"] == "ok"]
        if rows:
            c = rec["config"]
            comp = rec.get("pipeline_comparisons") or {"reference": "-", "rows": {}}
            cells = []
            for r in rows:
                cmp_ = comp["rows"].get(r["pipeline"], {})
                extra = [f"{cmp_['speedup_vs_diffusers']:.2f}x"] if r["pipeline"] != "diffusers" and "speedup_vs_diffusers" in cmp_ else []
                if "rel_l2_vs_official" in cmp_:
                    extra.append(f"rel L2 {cmp_['rel_l2_vs_official']:.1e} vs {comp['reference']}")
                cells.append(f"{r['pipeline']} {r['video_ms'] / 1e3:.2f} s" + (f" ({', '.join(extra)})" if extra else ""))
            out.append(f"- {rec['meta']['device']}, {c['model']} {c['mode']} {c['width']}x{c['height']}x{c['frames']}, "
                       f"{c['steps']} steps{' per chunk' if c['mode'] == 'far' else ''}, measured end to end: "
                       + ", ".join(cells))
    return out


def levers_table(records: list[dict]) -> list[str]:
    lines = ["| device | model | mode | steps | lever | video ms | ms/NFE | vs baseline | fp32 Euler share of NFE "
             "| host reads | date |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for rec in records:
        c, m = rec["config"], rec["meta"]
        share = (rec.get("euler") or {}).get("fp32_share_of_nfe")
        for r in rec.get("levers", []):
            if r["status"] != "ok":
                continue
            sp = r.get("speedup_vs_baseline")
            lines.append(
                f"| {m['device']} | {c['model']} {c['width']}x{c['height']}x{c['frames']} | {c['mode']} | {c['steps']} | "
                f"{r['lever']} | {r['video_ms']:.1f} | {r['video_ms'] / r['nfe']:.2f} | {f'{sp:.2f}x' if sp else '-'} | "
                f"{f'{100 * share:.2f}%' if share is not None else '-'} | {rec.get('host_reads_per_video', '-')} | {m['date'][:10]} |")
    return lines


def readme_block(records: list[dict]) -> str:
    gpu = [r for r in records if r["meta"].get("device_type") == "cuda"]
    if not gpu:
        return ("No GPU results in `benchmarks/results/` yet: the per-NFE, per-video and kernel figures at real Wan2.1 "
                "shapes remain to be measured (`bash benchmarks/device_check.sh OUTDIR` on a GPU machine, then copy "
                "OUTDIR into `benchmarks/results/<device>/` and run `python -m benchmarks report`). CPU runs at tiny "
                "sizes measure Python overhead, not the engine, and are not listed.\n")
    by_kind = {k: [r for r in gpu if r["kind"] == k] for k in KINDS}
    parts = ["Generated by `python -m benchmarks report` from `benchmarks/results/` (bf16, batch 1 unless CFG; "
             "FAR ms/NFE = mean over chunks; whole videos measured end to end; ratios measured in the same process). "
             "Commands, versions, drivers and git commits are in the result files."]
    if by_kind["ceilings"]:
        parts.append("Measured ceilings:\n\n" + "\n".join(ceilings_lines(by_kind["ceilings"])))
    if by_kind["nfe"]:
        parts.append("Per NFE (`python -m benchmarks nfe`):\n\n" + "\n".join(nfe_table(by_kind["nfe"])))
        extra = parts_lines(by_kind["nfe"])
        if extra:
            parts.append("Outside the DiT, per video:\n\n" + "\n".join(extra))
    calls = pipeline_lines(by_kind["levers"])
    if calls:
        parts.append("Whole videos, untouched diffusers vs enabled (same process):\n\n" + "\n".join(calls))
    lev = [r for r in by_kind["levers"] if r.get("levers")]
    if lev:
        parts.append("End-to-end levers (whole video through the sampler, FAR incl. cache steps; `python -m benchmarks "
                     "levers`):\n\n" + "\n".join(levers_table(lev)))
    if by_kind["kernels"]:
        parts.append("Kernels (`python -m benchmarks kernels`):\n\n" + "\n".join(kernels_table(by_kind["kernels"])))
    return "\n\n".join(parts) + "\n"


#: where ``--auto-table`` writes the table that ``backend="auto"`` reads
AUTO_TABLE = ROOT / "anyflow" / "ops" / "measured.py"


def _kernel_time(row: dict, metric: str):
    return row.get(metric) if row.get("status", "ok") == "ok" else None


def auto_table(records: list[dict]) -> dict:
    """``{arch: {op: backend}}`` from GPU kernel records: a backend qualifies for an op on an architecture when
    at every measured shape set its row passed the check and was faster than the ``torch`` row of the same run
    (graph-replay times when both have them, else Python-call times); the fastest qualifying backend wins."""
    runs: dict = {}
    for rec in records:
        meta = rec["meta"]
        if rec["kind"] != "kernels" or meta.get("device_type") != "cuda" or not meta.get("capability"):
            continue
        for r in rec.get("rows", []):
            if r["backend"] != "-":
                runs.setdefault(meta["capability"], {}).setdefault(r["op"], {}).setdefault(meta.get("model"), {})[r["backend"]] = r
    table: dict = {}
    for arch, ops in runs.items():
        for op, shapes in ops.items():
            totals = {}
            for backend in ("triton", "cuda"):
                total = 0.0
                for rows in shapes.values():
                    mine, ref = rows.get(backend), rows.get("torch")
                    if mine is None or ref is None or mine.get("ok") is not True:
                        break
                    metric = "device_ms" if mine.get("device_ms") and ref.get("device_ms") else "ms"
                    t, t_ref = _kernel_time(mine, metric), _kernel_time(ref, metric)
                    if not t or not t_ref or t >= t_ref:
                        break
                    total += t
                else:
                    totals[backend] = total
            if totals:
                table.setdefault(arch, {})[op] = min(totals, key=totals.get)
    return table


def write_auto_table(table: dict, path: Path = AUTO_TABLE) -> None:
    """Rewrite ``anyflow/ops/measured.py`` with ``table`` (its docstring says how it was made)."""
    text = path.read_text()
    head = text[: text.index("#: ``{architecture: {op: backend}}``")]
    body = json.dumps(table, indent=4, sort_keys=True)
    path.write_text(head + "#: ``{architecture: {op: backend}}``; empty until a GPU run is committed.\n"
                    f"AUTO_KERNELS: dict[str, dict[str, str]] = {body}\n")


def update_readme(readme: Path, block: str) -> bool:
    text = readme.read_text()
    parts = text.split(MARKER)
    if len(parts) != 3:
        print(f"report: {readme} needs exactly two '{MARKER}' lines around the performance table "
              f"(found {len(parts) - 1}); add them and run again", file=sys.stderr)
        return False
    readme.write_text(parts[0] + MARKER + "\n" + block + MARKER + parts[2])
    return True


def plot(records: list[dict], path: Path) -> bool:
    """ms/NFE per variant, one panel per NFE record; False (with a message) when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("report: matplotlib is not installed; no plot", file=sys.stderr)
        return False
    nfe = [r for r in records if r["kind"] == "nfe"]
    if not nfe:
        return False
    fig, axes = plt.subplots(len(nfe), 1, figsize=(8, 2.6 * len(nfe)), squeeze=False)
    for ax, rec in zip(axes[:, 0], nfe):
        ok = [r for r in rec.get("variants", []) if r["status"] == "ok"]
        ax.barh([r["variant"] for r in ok], [r["per_nfe"]["median_ms"] for r in ok])
        c = rec["config"]
        ax.set_title(f"{c['model']} {c['mode']}{' CFG' if c['guidance'] else ''} on {rec['meta']['device']}", fontsize=9)
        ax.set_xlabel("ms per NFE (median)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks report", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--results", default=str(ROOT / "benchmarks" / "results"))
    ap.add_argument("--readme", default=str(ROOT / "README.md"))
    ap.add_argument("--no-readme", action="store_true", help="do not touch the README")
    ap.add_argument("--markdown", default=None, help="also write every record (CPU too) as Markdown tables here")
    ap.add_argument("--plot", default=None, help="also write a PNG of ms/NFE per variant here (needs matplotlib)")
    ap.add_argument("--auto-table", action="store_true", help="also rewrite anyflow/ops/measured.py: the kernels "
                    "backend='auto' uses per GPU architecture, from the GPU kernel records")
    args = ap.parse_args(argv)
    records = load(Path(args.results))
    if args.markdown:
        by_kind = {k: [r for r in records if r["kind"] == k] for k in KINDS}
        text = ["# anyflow benchmark summary", ""]
        if by_kind["ceilings"]:
            text += ["## Ceilings", ""] + ceilings_lines(by_kind["ceilings"]) + [""]
        if by_kind["nfe"]:
            text += ["## Per NFE", ""] + nfe_table(by_kind["nfe"]) + [""] + parts_lines(by_kind["nfe"]) + [""]
        if by_kind["kernels"]:
            text += ["## Kernels", ""] + kernels_table(by_kind["kernels"]) + [""]
        if by_kind["levers"]:
            text += ["## End-to-end levers and whole videos", ""] + levers_table(by_kind["levers"]) + [""]
            text += pipeline_lines(by_kind["levers"]) + [""]
        if not records:
            text += ["No benchmark records found."]
        Path(args.markdown).write_text("\n".join(text) + "\n")
    if args.plot:
        plot(records, Path(args.plot))
    if args.auto_table:
        table = auto_table(records)
        write_auto_table(table)
        print(f"report: {AUTO_TABLE}: {json.dumps(table, sort_keys=True)}")
    if not args.no_readme:
        return 0 if update_readme(Path(args.readme), readme_block(records)) else 1
    return 0
