"""Result files and tables.

Each run writes ``<date>_<device>_<suite>[_<tag>].json`` (``{"meta": ..., "rows": [...]}``) and
a ``.csv`` of the same rows. ``meta`` names the device, the library versions, the git commit
(and whether fastcl's sources differed from it), a hash of the measured sources, the command
line and the time. Derived columns:

* ``flops``: docs/design.md §9's count for the row (:meth:`bench.cases.Shape.flops`); ``tflops``.
* ``matmul_tflops``/``pct_matmul``: against the dense ``[S, D] @ [D, S]`` matmul of the same
  dtype and D measured in the same run (at its start and end; the faster is kept);
  ``peak_tflops``/``pct_peak``: against the square one.
* ``vs_<impl>``: this row's median time / that implementation's, in the same group (same loss,
  N, D, dtype, mode); ``vs_fastcl`` is against the fastest fastcl backend. Below 1 is faster.
* ``mem_vs_<impl>``: the same for peak extra memory.
* ``loss_rel_diff``: |loss - naive loss| / |naive loss| (are they computing the same thing?).
"""

import csv
import datetime as _dt
import hashlib
import json
import os
import subprocess
from importlib import metadata as _md
from typing import Dict, List, Optional

from .cases import CASES

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS_DIR = os.path.join(REPO, "bench", "results")
REFERENCE_IMPLS = ("naive", "open_clip", "inf_cl", "fastcl")

COLUMNS = [
    "suite", "loss", "impl", "backend", "backend_used", "n", "d", "rows", "cols", "dtype", "input_dtype", "mode",
    "device", "status", "reason", "median_ms", "min_ms", "max_ms", "reps", "first_ms", "peak_mb", "extra_mb",
    "grad_mb", "input_mb", "flops", "tflops", "matmul_tflops", "pct_matmul", "peak_tflops", "pct_peak",
    "vs_fastcl", "vs_naive", "vs_open_clip", "vs_inf_cl", "mem_vs_fastcl", "mem_vs_naive", "mem_vs_open_clip",
    "mem_vs_inf_cl", "loss_value", "loss_rel_diff", "rounds", "wall_s",
]


# --- metadata ------------------------------------------------------------------------------

def _version(dist: str) -> Optional[str]:
    try:
        return _md.version(dist)
    except _md.PackageNotFoundError:
        return None


def _git(*args) -> Optional[str]:
    try:
        out = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def source_hash() -> str:
    """sha256 (first 12 hex) of fastcl's measured sources: identifies the code without git."""
    h = hashlib.sha256()
    for top in ("fastcl", "triton_kernels", "csrc"):
        root = os.path.join(REPO, top)
        for dirpath, dirnames, files in sorted(os.walk(root)):
            dirnames.sort()
            for name in sorted(files):
                if name.endswith((".py", ".cu", ".cuh", ".cpp", ".h")):
                    path = os.path.join(dirpath, name)
                    h.update(os.path.relpath(path, REPO).encode())
                    with open(path, "rb") as f:
                        h.update(f.read())
    return h.hexdigest()[:12]


def metadata(suite: str, device_info: dict, argv: List[str], note: str = "") -> dict:
    import torch

    import fastcl

    commit = _git("rev-parse", "HEAD") or os.environ.get("FASTCL_GIT_COMMIT") or "unknown"
    dirty = _git("status", "--porcelain", "--untracked-files=no", "--", "fastcl", "triton_kernels", "csrc",
                 "setup.py")
    now = _dt.datetime.now(_dt.timezone.utc)
    return {
        "suite": suite,
        "date": now.strftime("%Y-%m-%d"),
        "time_utc": now.strftime("%Y-%m-%dT%H:%M:%SZ"),
        "device": device_info,
        "versions": {
            "fastcl": fastcl.__version__,
            "torch": torch.__version__,
            "triton": _version("triton"),
            "open_clip": _version("open_clip_torch"),
            "inf_cl": _version("inf-cl"),
            "siglip_kernel": _version("siglip-kernel"),
            "memeff": _version("memeff"),
            "python": ".".join(map(str, __import__("sys").version_info[:3])),
        },
        "fastcl_backends": fastcl.build_info()["backends"],
        # the torch backend's compiled CPU epilogues (fastcl._cpu), and whether they were switched off
        "cpu_epilogues": fastcl.build_info()["cpu_extension"] and os.environ.get("FASTCL_CPU_EPILOGUES", "1") != "0",
        "git_commit": commit,
        "git_dirty": bool(dirty) if dirty is not None else None,
        "source_sha": source_hash(),
        "command": "python -m bench " + " ".join(argv),
        "loadavg_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "note": note,
        "flops": "fwd 2*R*C*D; fwd+bwd 3*2*R*C*D + 2*R*Cgrad*D (8NMD when every column gets a gradient)",
        "memory": ("cuda: max_memory_allocated during the call minus allocated before (inputs); "
                   "cpu: peak RSS growth during the call (VmHWM reset via /proc/self/clear_refs, after "
                   "malloc_trim). extra_mb = that minus the gradients' bytes"),
    }


def stem(meta: dict, slug: str, tag: str = "") -> str:
    return f"{meta['date']}_{slug}_{meta['suite']}" + (f"_{tag}" if tag else "")


# --- derived columns -----------------------------------------------------------------------

def _group(row) -> tuple:
    return row["loss"], row["n"], row["d"], row["dtype"], row["mode"], row["device"]


def _ok(row) -> bool:
    return row.get("status") == "ok" and row.get("median_ms") is not None


def derive(rows: List[dict]) -> None:
    """Fill in FLOP counts, rates, roofline fractions, peer ratios and loss agreement (in place)."""
    mm, peak = {}, {}
    for r in rows:
        if r["impl"] == "matmul" and _ok(r):
            tf = 2 * r["n"] * r["n"] * r["d"] / (r["median_ms"] / 1e3) / 1e12
            r["flops"], r["tflops"] = 2 * r["n"] * r["n"] * r["d"], tf
            if r["loss"] == "matmul":
                mm[(r["device"], r["dtype"], r["d"])] = tf
            else:
                peak[(r["device"], r["dtype"])] = tf
    groups: Dict[tuple, Dict[str, dict]] = {}
    for r in rows:
        if r["impl"] == "matmul" or r["loss"] not in CASES:
            continue
        shape = CASES[r["loss"]].shape(r["n"])
        r["rows"], r["cols"] = shape.rows, shape.cols
        r["flops"] = shape.flops(r["d"], r["mode"] == "fwd+bwd")
        if _ok(r):
            r["tflops"] = r["flops"] / (r["median_ms"] / 1e3) / 1e12
            ref = mm.get((r["device"], r["dtype"], r["d"]))
            if ref:
                r["matmul_tflops"], r["pct_matmul"] = ref, 100 * r["tflops"] / ref
            ref = peak.get((r["device"], r["dtype"]))
            if ref:
                r["peak_tflops"], r["pct_peak"] = ref, 100 * r["tflops"] / ref
            best = groups.setdefault(_group(r), {})
            prev = best.get(r["impl"])
            if prev is None or r["median_ms"] < prev["median_ms"]:
                best[r["impl"]] = r
    for r in rows:
        if r["impl"] == "matmul" or r["loss"] not in CASES:
            continue
        best = groups.get(_group(r), {})
        for ref in REFERENCE_IMPLS:
            other = best.get(ref)
            ok = _ok(r) and other is not None
            r[f"vs_{ref}"] = r["median_ms"] / other["median_ms"] if ok else None
            mine_rounds, theirs_rounds = r.get("round_ms"), (other or {}).get("round_ms")
            if ok and mine_rounds and theirs_rounds and len(mine_rounds) == len(theirs_rounds) > 1:
                # round i of each ran back to back: the spread of these ratios is the load's doing
                per_round = [a / b for a, b in zip(mine_rounds, theirs_rounds)]
                r[f"vs_{ref}_range"] = [min(per_round), max(per_round)]
            mine, theirs = r.get("extra_mb"), (other or {}).get("extra_mb")
            r[f"mem_vs_{ref}"] = mine / theirs if ok and mine is not None and theirs and theirs > 0 else None
        naive = best.get("naive")
        if r.get("loss_value") is not None and naive and naive.get("loss_value"):
            r["loss_rel_diff"] = abs(r["loss_value"] - naive["loss_value"]) / abs(naive["loss_value"])


# --- files ---------------------------------------------------------------------------------

def write(rows: List[dict], meta: dict, out_dir: str, name: str):
    """Write ``name.json`` and ``name.csv`` under ``out_dir``; return their paths."""
    os.makedirs(out_dir, exist_ok=True)
    for r in rows:
        r.setdefault("suite", meta["suite"])
    js, cs = os.path.join(out_dir, name + ".json"), os.path.join(out_dir, name + ".csv")
    tmp = js + ".tmp"
    with open(tmp, "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1, default=str)
    os.replace(tmp, js)
    with open(cs, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: _csv_value(r.get(k)) for k in COLUMNS})
    return js, cs


def _csv_value(v):
    if isinstance(v, float):
        return f"{v:.6g}"
    return "" if v is None else v


def load(path: str) -> dict:
    with open(path) as f:
        return json.load(f)


# --- tables --------------------------------------------------------------------------------

def _num(v, fmt):
    return "-" if v is None else format(v, fmt)


def impl_name(r) -> str:
    if r["impl"] != "fastcl":
        return r["impl"]
    used = r.get("backend_used")
    if r.get("backend") in (None, "auto"):
        return f"fastcl[{used}]" if used else "fastcl"
    return f"fastcl-{r['backend']}"


def _aligned(head: List[str], lines: List[list], notes: List[str]) -> str:
    """Columns padded to their widest cell; text columns left, numbers right; notes trail."""
    widths = [max([len(h)] + [len(l[i]) for l in lines]) for i, h in enumerate(head)]

    def fmt(cells):
        return "  ".join(c.rjust(w) if i >= 2 else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    out = [fmt(head), fmt(["-" * w for w in widths])]
    out += [(fmt(l) + ("  " + n if n else "")).rstrip() for l, n in zip(lines, notes)]
    return "\n".join(out)


def table(rows: List[dict]) -> str:
    """A plain-text table of the loss rows: time, memory, rate, roofline and ratio to fastcl."""
    head = ["loss", "mode", "N", "D", "dtype", "impl", "median ms", "extra MB", "TFLOP/s", "% matmul", "% peak",
            "x fastcl"]
    lines, notes = [], []
    for r in rows:
        if r["impl"] == "matmul" or r.get("status") == "skipped":
            continue
        cells = [r["loss"], r["mode"], str(r["n"]), str(r["d"]), r["dtype"], impl_name(r)]
        if r.get("status") != "ok":
            lines.append(cells + [r.get("status", "?"), "", "", "", "", ""])
            notes.append((r.get("reason") or "")[:90])
            continue
        lines.append(cells + [_num(r["median_ms"], ".1f"), _num(r.get("extra_mb"), ".1f"),
                              _num(r.get("tflops"), ".3f"), _num(r.get("pct_matmul"), ".0f"),
                              _num(r.get("pct_peak"), ".0f"), _num(r.get("vs_fastcl"), ".2f")])
        notes.append("")
    return _aligned(head, lines, notes)


def matmul_lines(rows: List[dict]) -> str:
    out = []
    for r in rows:
        if r["impl"] == "matmul" and r.get("status") == "ok":
            shape = f"[{r['n']},{r['d']}]@[{r['d']},{r['n']}]"
            out.append(f"  dense matmul {r['dtype']:<8} {shape:<24} {r['tflops']:.3f} TFLOP/s")
    return "\n".join(out)


# rounds whose time ratios differ by more than this factor say the machine was busy
UNSTEADY_SPREAD = 1.3


def headlines(rows: List[dict], busy: bool = False) -> List[str]:
    """One line per (loss, mode, D, dtype): fastcl against each peer at the largest N both ran.

    When the machine was ``busy`` or the interleaved rounds disagree by more than
    ``UNSTEADY_SPREAD``, a ratio is given as the range over rounds, not as one number."""
    best: Dict[tuple, dict] = {}
    for r in rows:
        if r["impl"] != "fastcl" or not _ok(r):
            continue
        key = (r["loss"], r["mode"], r["d"], r["dtype"])
        peers = [p for p in ("open_clip", "naive", "inf_cl") if r.get(f"vs_{p}") is not None]
        if not peers:
            continue
        cur = best.get(key)
        if cur is None or r["n"] > cur["n"] or (r["n"] == cur["n"] and r["median_ms"] < cur["median_ms"]):
            best[key] = r
    lines = []
    for (loss, mode, d, dtype), r in sorted(best.items()):
        parts = []
        for p in ("open_clip", "naive", "inf_cl"):
            t, m, span = r.get(f"vs_{p}"), r.get(f"mem_vs_{p}"), r.get(f"vs_{p}_range")
            if t is not None:
                mem = "" if not m else (f", {1 / m:.1f}x less memory" if m < 1 else f", {m:.2f}x the memory")
                if span and (busy or span[1] > UNSTEADY_SPREAD * span[0]):
                    parts.append(f"{span[0]:.2f}x to {span[1]:.2f}x {p}'s time over {len(r['round_ms'])} rounds "
                                 f"(unsteady: the machine is busy){mem}")
                else:
                    parts.append(f"{t:.2f}x {p}'s time{mem}")
        lines.append(f"  {loss} {mode} N={r['n']} D={d} {dtype}: {impl_name(r)} takes " + "; ".join(parts))
    return lines


def short_table(rows: List[dict]) -> str:
    """fastcl's fastest backend per group against each peer: the visit's closing table."""
    best: Dict[tuple, dict] = {}
    for r in rows:
        if r["impl"] == "fastcl" and _ok(r):
            key = _group(r)
            if key not in best or r["median_ms"] < best[key]["median_ms"]:
                best[key] = r
    head = ["loss", "mode", "N", "D", "dtype", "fastcl", "ms", "TFLOP/s", "% peak", "extra MB",
            "x naive", "x open_clip", "x inf_cl"]
    lines = [[r["loss"], r["mode"], str(r["n"]), str(r["d"]), r["dtype"], impl_name(r), _num(r["median_ms"], ".2f"),
              _num(r.get("tflops"), ".2f"), _num(r.get("pct_peak"), ".0f"), _num(r.get("extra_mb"), ".0f"),
              _num(r.get("vs_naive"), ".2f"), _num(r.get("vs_open_clip"), ".2f"), _num(r.get("vs_inf_cl"), ".2f")]
             for _, r in sorted(best.items(), key=lambda kv: (kv[0][0], kv[0][4], kv[0][3], kv[0][2], kv[0][1]))]
    return _aligned(head, lines, [""] * len(lines))


def summary(path: str) -> str:
    data = load(path)
    meta, rows = data["meta"], data["rows"]
    head = f"{os.path.basename(path)}: {meta['device'].get('name')}, commit {str(meta.get('git_commit'))[:10]}"
    if meta.get("suite") == "maxbatch":
        lines = [head, "  largest N that ran:"]
        for s in meta.get("maxbatch", []):
            name = s["impl"] + (f"({s['backend']})" if s.get("backend") else "")
            peak = ("" if s.get("peak_mb") is None
                    else f", {s['peak_mb']:.0f} MB peak, {s['extra_mb']:.0f} MB beyond grads")
            lines.append(f"  {s['loss']} {name}: {s['largest_n']}{peak} (stopped: {s['stopped']})")
        return "\n".join(lines)
    failed = [r for r in rows if r.get("status") not in ("ok", "skipped")]
    tail = f"\n  {len(failed)} rows not ok: " + ", ".join(sorted({r['status'] for r in failed})) if failed else ""
    return head + "\n" + short_table(rows) + tail
