"""PNGs from benchmark result files.

``python -m bench plot [FILE.json ...]`` (or ``python -m bench.plot``; default: every JSON in
``bench/results``) writes beside each result file:

* ``<stem>_<loss>.png`` for quick/full runs: median time, peak extra memory and % of the dense
  matmul rate against N, one line per implementation (solid: forward+backward, dashed: forward);
* ``<stem>.png`` for max-batch runs: peak memory growth and time against N, with the cap.
"""

import glob
import os
import sys
from typing import Iterable, List, Optional

from . import results

COLORS = {"fastcl": "#1f77b4", "naive": "#ff7f0e", "open_clip": "#2ca02c", "inf_cl": "#d62728"}
BACKEND_COLORS = {"torch": "#1f77b4", "triton": "#9467bd", "cuda": "#17becf"}
MARKERS = "osD^v<>p*h"


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _color(r):
    if r["impl"] == "fastcl":
        return BACKEND_COLORS.get(r.get("backend_used") or r.get("backend") or "torch", COLORS["fastcl"])
    return COLORS.get(r["impl"], "gray")


def _series(rows):
    """(label, style, sorted rows) per implementation x dtype x D x mode."""
    groups = {}
    for r in rows:
        if r.get("status") != "ok" or r["impl"] == "matmul":
            continue
        key = (results.impl_name(r), r["dtype"], r["d"], r["mode"])
        groups.setdefault(key, []).append(r)
    variants = sorted({(k[1], k[2]) for k in groups})
    out = []
    for key, rs in sorted(groups.items()):
        name, dtype, d, mode = key
        label = name + (f" {dtype} D={d}" if len(variants) > 1 else "") + (" fwd" if mode == "fwd" else "")
        style = dict(color=_color(rs[0]), linestyle="-" if mode == "fwd+bwd" else "--",
                     marker=MARKERS[variants.index((dtype, d)) % len(MARKERS)])
        out.append((label, style, sorted(rs, key=lambda r: r["n"])))
    return out


def _title(meta, what):
    dev = meta.get("device", {}).get("name", "?")
    commit = str(meta.get("git_commit", "?"))[:10]
    return f"{what}\n{dev} · torch {meta.get('versions', {}).get('torch')} · fastcl {commit} · {meta.get('date')}"


def plot_losses(data: dict, stem_path: str) -> List[str]:
    plt = _plt()
    meta, rows = data["meta"], data["rows"]
    paths = []
    for loss in sorted({r["loss"] for r in rows if r["impl"] != "matmul"}):
        series = _series([r for r in rows if r["loss"] == loss])
        if not series:
            continue
        fig, axes = plt.subplots(1, 3, figsize=(16, 4.8))
        for label, style, rs in series:
            ns = [r["n"] for r in rs]
            axes[0].plot(ns, [r["median_ms"] for r in rs], label=label, **style)
            mem = [(r["n"], r["extra_mb"]) for r in rs if r.get("extra_mb") is not None and r["extra_mb"] > 0]
            if mem:
                axes[1].plot(*zip(*mem), label=label, **style)
            pct = [(r["n"], r["pct_matmul"]) for r in rs if r.get("pct_matmul") is not None]
            if pct:
                axes[2].plot(*zip(*pct), label=label, **style)
        for ax, ylabel, logy in ((axes[0], "median time (ms)", True), (axes[1], "peak extra memory (MB)", True),
                                 (axes[2], "% of dense matmul rate (same dtype, D)", False)):
            ax.set_xscale("log", base=2)
            if logy:
                ax.set_yscale("log")
            ax.set_xlabel("N (batch size)")
            ax.set_ylabel(ylabel)
            ax.grid(True, which="both", alpha=0.3)
        axes[2].set_ylim(bottom=0)
        axes[0].legend(fontsize=8)
        fig.suptitle(_title(meta, f"{loss} ({meta.get('suite')})"), fontsize=10)
        fig.tight_layout()
        path = f"{stem_path}_{loss}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


def plot_maxbatch(data: dict, stem_path: str) -> List[str]:
    plt = _plt()
    meta, rows = data["meta"], data["rows"]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8))
    for label, style, rs in _series(rows):
        ns = [r["n"] for r in rs]
        axes[0].plot(ns, [max(r.get("peak_mb") or 0, 1e-3) for r in rs], label=label, **style)
        axes[1].plot(ns, [r["median_ms"] / 1e3 for r in rs], label=label, **style)
    cap = meta.get("mem_cap_gb")
    if cap:
        axes[0].axhline(cap * 1024, color="k", linestyle=":", label=f"cap {cap:g} GB")
    for ax, ylabel in ((axes[0], "peak memory growth (MB)"), (axes[1], "time of one call (s)")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("N (batch size)")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=8)
    largest = ", ".join(f"{s['impl']}{'(' + s['backend'] + ')' if s.get('backend') else ''}: "
                        f"{s['largest_n'] if s['largest_n'] else 'did not run'}" for s in meta.get("maxbatch", []))
    fig.suptitle(_title(meta, f"max batch: largest N that ran — {largest}"), fontsize=10)
    fig.tight_layout()
    path = f"{stem_path}.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [path]


def plot_file(path: str) -> List[str]:
    data = results.load(path)
    stem_path = path[: -len(".json")]
    if data["meta"].get("suite") == "maxbatch":
        return plot_maxbatch(data, stem_path)
    return plot_losses(data, stem_path)


def main(files: Optional[Iterable[str]] = None) -> List[str]:
    files = list(files) if files else sorted(glob.glob(os.path.join(results.RESULTS_DIR, "*.json")))
    out = []
    for f in files:
        out.extend(plot_file(f))
    return out


if __name__ == "__main__":
    for p in main(sys.argv[1:]):
        print(p)
