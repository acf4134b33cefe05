#!/usr/bin/env python3
"""Plot a benchmark results JSON: speedup vs batch size, one panel per (family, shape, rank).

    python bench/plot.py bench/results/<run>/lowrank-quick.json            # -> lowrank-quick.png beside it
    python bench/plot.py RESULTS.json -o out.png --baseline unfused
    python bench/plot.py bench/results/<run>/quant-quick.json [--baseline int4pack]  # one panel per (shape, config)

y = baseline time / method time (> 1: faster than the baseline), x = batch M (log scale), one
line per method that was measured (skipped / failed rows are left out). The dashed line is the
batch-1 byte limit of the low-rank format against dense fp16 (dense bytes / factor bytes).

Needs only matplotlib (the ``bench`` extra) and the JSON; it never imports torch.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Optional, Sequence

BASELINES = {"dense": "vs_dense", "unfused": "vs_unfused", "int4pack": "vs_int4pack"}


def panels(rows: Sequence[dict], baseline: str) -> dict[tuple, dict[str, list[tuple[int, float]]]]:
    """{(family, shape, rank): {method: [(M, speedup), ...]}} from measured rows."""
    key = BASELINES[baseline]
    out: dict[tuple, dict[str, list[tuple[int, float]]]] = {}
    for row in rows:
        value = row.get(key)
        if row.get("status", "ok") != "ok" or value is None or not math.isfinite(value):
            continue
        method = row["method"] + ("*" if row.get("auto") else "")
        if row["method"] == "triton" and row.get("path"):
            method = "triton(auto path)" + ("*" if row.get("auto") else "")
        # quant rows (bench quant suite): one panel per configuration; its baselines get their own
        third = (row.get("config") or "baselines") if row["family"] == "quant" else row["rank"]
        panel = out.setdefault((row["family"], row["shape"], third), {})
        panel.setdefault(method, []).append((int(row["m"]), float(value)))
    for panel in out.values():
        for points in panel.values():
            points.sort()
    return out


def byte_limit(row_key: tuple) -> Optional[float]:
    family, shape, rank = row_key
    if family != "lowrank":
        return None
    n, k = (int(v) for v in shape.split("x"))
    return (n * k + k + n) / (rank * (n + k) + k + n)  # batch 1: (W + x + y) / (V + U + x + y)


def plot(payload: dict, out: Path, baseline: str = "dense") -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = panels(payload.get("rows", []), baseline)
    if not data:
        raise SystemExit("plot.py: no measured rows with a speedup to plot")
    keys = sorted(data)
    cols = min(3, len(keys))
    nrows = math.ceil(len(keys) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(5.2 * cols, 3.8 * nrows), squeeze=False)
    names = sorted({method.rstrip("*") for panel in data.values() for method in panel})
    cmap = plt.get_cmap("tab10" if len(names) <= 10 else "tab20")
    colour = {name: cmap(i % cmap.N) for i, name in enumerate(names)}  # one colour per method everywhere
    for ax, key in zip(axes.flat, keys):
        for method, points in sorted(data[key].items()):
            xs, ys = zip(*points)
            style = "--" if method.rstrip("*") in ("dense", "two_matmul", "dense+adapter", "int4pack") else "-"
            ax.plot(xs, ys, style, marker="o", ms=3, label=method, color=colour[method.rstrip("*")])
        ax.axhline(1.0, color="grey", lw=0.8)
        limit = byte_limit(key)
        if limit:
            ax.axhline(limit, color="black", ls=":", lw=0.8, label=f"batch-1 byte limit {limit:.2f}x")
        ax.set_xscale("log", base=2)
        ax.set_title(f"{key[0]} {key[1]} {key[2]}" if key[0] == "quant" else f"{key[0]} {key[1]} r={key[2]}", fontsize=9)
        ax.set_xlabel("batch M")
        ax.set_ylabel(f"speedup vs {baseline}")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=6)
    for ax in list(axes.flat)[len(keys):]:
        ax.axis("off")
    meta = payload.get("meta", {})
    bw = payload.get("copy_bandwidth_gbps")
    fig.suptitle(f"{payload.get('suite', '?')} [{payload.get('mode', '?')}] {meta.get('device', '?')} "
                 f"{meta.get('dtype', '')} {meta.get('date', '')} {str(meta.get('git_commit') or '')[:12]}"
                 + (f" copy {bw:.0f} GB/s" if bw else ""), fontsize=9)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("results", help="results JSON written by a benchmark suite")
    p.add_argument("-o", "--out", help="PNG path (default: the JSON path with .png)")
    p.add_argument("--baseline", choices=sorted(BASELINES), default="dense")
    args = p.parse_args(argv)
    src = Path(args.results)
    with open(src) as f:
        payload = json.load(f)
    out = Path(args.out) if args.out else src.with_suffix(".png")
    print(f"wrote {plot(payload, out, args.baseline)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
