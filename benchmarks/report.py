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

MARKER = "<!-- perf-table -->"
ROOT = Path(__file__).resolve().parent.parent


def load(results: Path) -> list[dict]:
    """Every benchmark record (``kind`` nfe, kernels or levers) under ``results``, sorted by date."""
    records = []
    for path in sorted(results.rglob("*.json")):
        try:
            rec = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if isinstance(rec, dict) and rec.get("kind") in ("nfe", "kernels", "levers"):
            rec["_path"] = str(path)
            records.append(rec)
    return sorted(records, key=lambda r: r["meta"]["date"])


def nfe_table(records: list[dict]) -> list[str]:
    lines = ["| device | model | mode | variant | ms/NFE | TFLOP/s (of measured peak) | DiT s, 4-step video (+cache steps) "
             "| vs diffusers (per NFE) | peak GiB | date |", "|---|---|---|---|---|---|---|---|---|---|"]
    for rec in records:
        c, m = rec["config"], rec["meta"]
        mode = c["mode"] + (" CFG" if c["guidance"] else "")
        for r in rec["variants"]:
            if r["status"] != "ok":
                continue
            p, v = r["per_nfe"], r["video"]["4"]
            ratio = rec["ratios"].get(f"{r['variant']} vs diffusers", {}).get("per_nfe")
            mem = r.get("peak_mem_gib")
            lines.append(
                f"| {m['device']} | {c['model']} {c['width']}x{c['height']}x{c['frames']} | {mode} | {r['variant']} | "
                f"{p['median_ms']:.1f} | {p['tflops']:.0f} ({100 * p['of_peak']:.0f}%) | "
                f"{v['dit_s_no_cache']:.2f} ({v['dit_s_with_cache']:.2f}) | {f'{ratio:.2f}x' if ratio else '-'} | "
                f"{f'{mem:.1f}' if mem is not None else '-'} | {m['date'][:10]} |")
    return lines


def kernels_table(records: list[dict]) -> list[str]:
    lines = ["| device | shapes | op | backend | ms | TFLOP/s or GB/s | check |", "|---|---|---|---|---|---|---|"]
    for rec in records:
        model = rec["meta"].get("model", "-")
        for r in rec["rows"]:
            rate = f"{r['TFLOP/s']:.0f} TFLOP/s" if "TFLOP/s" in r else (f"{r['GB/s']:.0f} GB/s" if "GB/s" in r else "")
            ok = {True: "pass", False: "FAIL", None: ""}[r["ok"]]
            ms = f"{r['ms']:.3f}" if r["ms"] else "-"
            lines.append(f"| {rec['meta']['device']} | {model} | {r['op']} | {r['backend']} | {ms} | {rate} | {ok} |")
    return lines


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
    """One line per levers record with whole-pipeline rows: each row's video time and ratio to diffusers."""
    out = []
    for rec in records:
        rows = [r for r in rec.get("pipelines", []) if r["status"] == "ok"]
        if rows:
            c = rec["config"]
            cells = ", ".join(f"{r['pipeline']} {r['video_ms'] / 1e3:.2f} s"
                              + (f" ({r['speedup_vs_diffusers']:.2f}x)" if r["pipeline"] != "diffusers" and
                                 "speedup_vs_diffusers" in r else "") for r in rows)
            out.append(f"- {rec['meta']['device']}, {c['model']} {c['mode']} {c['width']}x{c['height']}x{c['frames']}, "
                       f"{c['steps']} steps: {cells}")
    return out


def levers_table(records: list[dict]) -> list[str]:
    lines = ["| device | model | mode | steps | lever | video ms | ms/NFE | vs baseline | fp32 Euler share of NFE "
             "| host reads | date |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for rec in records:
        c, m = rec["config"], rec["meta"]
        share = rec["euler"].get("fp32_share_of_nfe")
        for r in rec["levers"]:
            if r["status"] != "ok":
                continue
            sp = r.get("speedup_vs_baseline")
            lines.append(
                f"| {m['device']} | {c['model']} {c['width']}x{c['height']}x{c['frames']} | {c['mode']} | {c['steps']} | "
                f"{r['lever']} | {r['video_ms']:.1f} | {r['video_ms'] / r['nfe']:.2f} | {f'{sp:.2f}x' if sp else '-'} | "
                f"{f'{100 * share:.2f}%' if share is not None else '-'} | {rec['host_reads_per_video']} | {m['date'][:10]} |")
    return lines


def readme_block(records: list[dict]) -> str:
    gpu = [r for r in records if r["meta"].get("device_type") == "cuda"]
    nfe = [r for r in gpu if r["kind"] == "nfe"]
    if not nfe:
        return ("No GPU results in `benchmarks/results/` yet: the per-NFE and per-video figures at real Wan2.1 shapes "
                "remain to be measured (`bash benchmarks/gpu_harness.sh OUTDIR` on a GPU machine, then copy OUTDIR "
                "into `benchmarks/results/<device>/` and run `python -m benchmarks report`). CPU runs at tiny sizes "
                "measure Python overhead, not the engine, and are not listed.\n")
    head = ("Generated by `python -m benchmarks report` from `benchmarks/results/` (bf16, batch 1 unless CFG; "
            "per-video DiT times computed from measured per-NFE and per-cache-step times; FAR ms/NFE = mean over "
            "chunks; ratios measured in the same process). Commands, versions and drivers are in each JSON file.\n\n")
    levers = [r for r in gpu if r["kind"] == "levers"]
    tail = ("\n\nEnd-to-end levers (whole video through the sampler, FAR incl. cache steps; `python -m benchmarks levers`):"
            "\n\n" + "\n".join(levers_table(levers))) if levers else ""
    calls = pipeline_lines(levers)
    if calls:
        tail += "\n\nWhole pipeline calls, untouched diffusers vs enabled (same process):\n\n" + "\n".join(calls)
    parts = parts_lines(nfe)
    parts_text = ("\n\nOutside the DiT, per video:\n\n" + "\n".join(parts)) if parts else ""
    return head + "\n".join(nfe_table(nfe)) + parts_text + tail + "\n"


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
        ok = [r for r in rec["variants"] if r["status"] == "ok"]
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
    args = ap.parse_args(argv)
    records = load(Path(args.results))
    if args.markdown:
        nfe = [r for r in records if r["kind"] == "nfe"]
        ker = [r for r in records if r["kind"] == "kernels"]
        lev = [r for r in records if r["kind"] == "levers"]
        text = ["# anyflow benchmark summary", ""]
        if nfe:
            text += ["## Per NFE / per video", ""] + nfe_table(nfe) + [""] + parts_lines(nfe) + [""]
        if ker:
            text += ["## Kernels", ""] + kernels_table(ker) + [""]
        if lev:
            text += ["## End-to-end levers", ""] + levers_table(lev) + [""] + pipeline_lines(lev) + [""]
        if not records:
            text += ["No benchmark records found."]
        Path(args.markdown).write_text("\n".join(text) + "\n")
    if args.plot:
        plot(records, Path(args.plot))
    if not args.no_readme:
        return 0 if update_readme(Path(args.readme), readme_block(records)) else 1
    return 0
