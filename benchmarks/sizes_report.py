"""The real-size sweep in one table and two plots, from benchmarks.decode's result files.

    python -m benchmarks.sizes_report [--results benchmarks/results] [--docs docs]

Reads every decode-<model>-k<k>-r<rank>-<outtype>.json that `python -m benchmarks.decode`
wrote (each holds base, stock_static_patched and flow_dynamic rounds), prints one markdown
row per run (ratios are medians of same-round ratios, with their range) and draws:
    <docs>/speed-size.png   decode of flow dynamic and stock static against the bare base, by
                            base model size (k = 2, rank 16, one LoRA type)
    <docs>/speed-k.png      flow dynamic decode against stock static k LoRAs, by k (rank 16)
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
from pathlib import Path

from benchmarks.decode import round_ratios

FLOW, STOCK, BASE = "flow_dynamic", "stock_static_patched", "base"
NAME = re.compile(r"decode-(?P<model>.+)-k(?P<k>\d+)-r(?P<rank>\d+)-(?P<outtype>f32|f16|q8_0)\.json$")


def load(results: Path) -> list[dict]:
    runs = []
    for path in sorted(results.glob("decode-*.json")):
        m = NAME.match(path.name)
        if not m:
            continue
        data = json.loads(path.read_text())
        if not {FLOW, STOCK, BASE} <= data["rounds"].keys():
            continue
        runs.append(dict(model=m["model"], k=int(m["k"]), rank=int(m["rank"]), outtype=m["outtype"],
                         base_mib=data["sizes"]["base"] / 2**20, flow_mib=data["sizes"]["flow"] / 2**20,
                         rounds=data["rounds"]))
    return sorted(runs, key=lambda r: (r["base_mib"], r["k"], r["rank"], r["outtype"]))


def ratio(run: dict, name: str, ref: str, key: str) -> tuple[float, float, float] | None:
    if key not in run["rounds"][name][0] or key not in run["rounds"][ref][0]:
        return None
    r = round_ratios(run["rounds"], name, ref, key)
    return statistics.median(r), min(r), max(r)


def cell(x) -> str:
    return "-" if x is None else f"{x[0]:.2f}x ({x[1]:.2f}-{x[2]:.2f})"


def table(runs: list[dict]) -> str:
    cols = [("flow / base decode", FLOW, BASE, "decode"), ("stock / base decode", STOCK, BASE, "decode"),
            ("flow / stock decode", FLOW, STOCK, "decode"), ("flow / base after long context", FLOW, BASE,
                                                               "decode_long"),
            ("flow / stock prefill 512", FLOW, STOCK, "prefill512"), ("flow / base prefill 512", FLOW, BASE,
                                                                       "prefill512")]
    lines = ["| base (MiB) | k | rank | LoRA type | flow file MiB | rounds | base decode tok/s | "
             + " | ".join(c[0] for c in cols) + " |", "|---|---:|---:|---|---:|---:|---:|" + "---:|" * len(cols)]
    for run in runs:
        base_tok = statistics.median(r["decode"] for r in run["rounds"][BASE])
        lines.append(f"| {run['model']} ({run['base_mib']:.0f}) | {run['k']} | {run['rank']} | {run['outtype']} | "
                     f"{run['flow_mib']:.1f} | {len(run['rounds'][BASE])} | {base_tok:.1f} | "
                     + " | ".join(cell(ratio(run, *c[1:])) for c in cols) + " |")
    return "\n".join(lines)


def errorbar(ax, pts: list[tuple[float, tuple[float, float, float]]], label: str) -> None:
    """(x, (median, low, high)) points as a line with the range of rounds as error bars."""
    ax.errorbar([x for x, _ in pts], [r[0] for _, r in pts],
                yerr=[[r[0] - r[1] for _, r in pts], [r[2] - r[0] for _, r in pts]], fmt="o-", capsize=3, label=label)


def plots(runs: list[dict], docs: Path, outtype: str) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    by_size = [r for r in runs if r["k"] == 2 and r["rank"] == 16 and r["outtype"] == outtype]
    if by_size:
        fig, ax = plt.subplots(figsize=(5.5, 3.5))
        for name, label in ((FLOW, "flow dynamic / bare base"), (STOCK, "stock static 2 LoRAs / bare base")):
            errorbar(ax, [(r["base_mib"], ratio(r, name, BASE, "decode")) for r in by_size], label)
        for r in by_size:  # the model's name under its stock point
            ax.annotate(re.sub(r"\.Q\w+$", "", r["model"]), (r["base_mib"], ratio(r, STOCK, BASE, "decode")[1]),
                        xytext=(0, -12), textcoords="offset points", fontsize=7, ha="center")
        ax.axhline(1.0, color="grey", lw=0.5)
        ax.margins(y=0.15)
        ax.set_xscale("log")
        ax.set_xlabel("base model file (MiB, Q4_K_M / Q4_1)")
        ax.set_ylabel("decode speed ratio")
        ax.set_title(f"k = 2, rank 16, LoRA tensors {outtype}, 2 threads (median, range of rounds)", fontsize=8)
        ax.legend(fontsize=8)
        fig.tight_layout()
        written.append(docs / "speed-size.png")
        fig.savefig(written[-1], dpi=120)
    by_k = {}
    for r in runs:
        if r["rank"] == 16 and r["outtype"] == outtype:
            by_k.setdefault(r["model"], []).append(r)
    by_k = {m: sorted(rs, key=lambda r: r["k"]) for m, rs in by_k.items() if len(rs) > 1}
    if by_k:
        fig, ax = plt.subplots(figsize=(5.5, 3.5))
        for model, rs in by_k.items():
            errorbar(ax, [(r["k"], ratio(r, FLOW, STOCK, "decode")) for r in rs], model)
        ax.axhline(1.0, color="grey", lw=0.5)
        ax.set_xscale("log", base=2)
        ks = sorted({r["k"] for rs in by_k.values() for r in rs})
        ax.set_xticks(ks, [str(k) for k in ks])
        ax.set_xlabel("k (LoRAs)")
        ax.set_ylabel("flow dynamic / stock static k LoRAs")
        ax.set_title(f"decode, rank 16, LoRA tensors {outtype}, 2 threads", fontsize=8)
        ax.legend(fontsize=8)
        fig.tight_layout()
        written.append(docs / "speed-k.png")
        fig.savefig(written[-1], dpi=120)
    return written


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--results", type=Path, default=Path("benchmarks/results"))
    ap.add_argument("--docs", type=Path, default=Path("docs"))
    ap.add_argument("--outtype", default="q8_0", help="the LoRA type the plots show")
    args = ap.parse_args()
    runs = load(args.results)
    args.docs.mkdir(parents=True, exist_ok=True)
    if not runs:
        raise SystemExit(f"no decode-<model>-k<k>-r<rank>-<outtype>.json results in {args.results}")
    print(table(runs))
    for path in plots(runs, args.docs, args.outtype):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
