"""Suites: plan rows, run them in a worker subprocess, derive ratios, write results as they come.

A row is one (loss, implementation, backend, N, D, dtype, mode, device). Rows of one comparison
group (same loss, N, D, dtype, mode, device) run back to back, so a shared machine's load
drifts as little as possible between the numbers a ratio is made of. Results are rewritten
after every row, so a run cut short (a time budget, a device lease) keeps what it measured.
"""

import json
import math
import os
import selectors
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

from . import results
from .cases import CASES
from .peers import PEERS
from .worker import MARK

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FASTCL_BACKENDS = ("torch", "triton", "cuda")
# a backend may name its gradient pass, "triton:chunked": the row runs with FASTCL_BACKWARD set
PASSES = ("fused", "chunked")
MODES = ("fwd", "fwd+bwd")


# --- the worker subprocess -----------------------------------------------------------------

class Worker:
    """A ``python -m bench.worker`` subprocess, restarted when it dies or is killed."""

    def __init__(self, env: Optional[Dict[str, str]] = None):
        self.env = env
        self.proc = None
        self._buf = b""

    def _start(self):
        env = dict(os.environ, **(self.env or {}))
        env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
        self.proc = subprocess.Popen([sys.executable, "-m", "bench.worker"], cwd=REPO, env=env,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, bufsize=0)
        self._buf = b""

    def run(self, spec: dict, timeout: Optional[float]) -> dict:
        if self.proc is None or self.proc.poll() is not None:
            self._start()
        try:
            self.proc.stdin.write((json.dumps(spec) + "\n").encode())
            self.proc.stdin.flush()
        except BrokenPipeError:
            return self._died()
        deadline = None if timeout is None else time.monotonic() + timeout
        with selectors.DefaultSelector() as sel:
            sel.register(self.proc.stdout, selectors.EVENT_READ)
            while True:
                while b"\n" in self._buf:
                    line, self._buf = self._buf.split(b"\n", 1)
                    text = line.decode(errors="replace")
                    if text.startswith(MARK):
                        result = json.loads(text[len(MARK):])
                        if result.get("fatal"):  # the worker exits after a CUDA error: let it
                            try:
                                self.proc.wait(timeout=60)
                            except subprocess.TimeoutExpired:
                                pass
                            self.close()
                        return result
                    if text.strip():
                        print(f"    (worker) {text}", file=sys.stderr)
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    self.close()
                    return {"status": "timeout", "reason": f"row ran over {timeout:.0f} s; worker killed"}
                if sel.select(left):
                    chunk = os.read(self.proc.stdout.fileno(), 1 << 16)
                    if not chunk:
                        return self._died()
                    self._buf += chunk

    def _died(self) -> dict:
        code = self.proc.wait()
        self.proc = None
        hint = " (killed: out of memory?)" if code in (-9, 137) else ""
        return {"status": "crashed", "reason": f"worker exited with code {code}{hint}"}

    def close(self):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.proc = None


# --- plans ---------------------------------------------------------------------------------

@dataclass
class Block:
    """A cross product of rows: losses x N x D x dtypes x modes x implementations."""

    losses: Sequence[str]
    ns: Sequence[int]
    ds: Sequence[int]
    dtypes: Sequence[str]
    modes: Sequence[str] = ("fwd+bwd",)
    backends: Sequence[str] = ("auto",)  # fastcl's; each is one implementation
    peers: Sequence[str] = PEERS


def impls_of(block: Block):
    return [("fastcl", b) for b in block.backends] + [(p, None) for p in block.peers]


def plan(blocks: Sequence[Block], device: str, timing: dict, rounds: int = 1) -> List[dict]:
    """Row specs, each comparison group's rows together, smallest problems first.

    With ``rounds > 1`` a group's implementations run round-robin that many times (A B C A B C);
    :func:`merge_rounds` then keeps the median over rounds, so a load spike on a shared machine
    hits one round of every implementation rather than all rounds of one.
    """
    specs, seen = [], set()
    for block in blocks:
        for loss in block.losses:
            for dtype in block.dtypes:
                for d in block.ds:
                    for mode in block.modes:
                        for n in block.ns:
                            group = []
                            for impl, backend in impls_of(block):
                                key = (loss, impl, backend, n, d, dtype, mode)
                                if key in seen:
                                    continue
                                seen.add(key)
                                group.append(dict(loss=loss, impl=impl, backend=backend, n=n, d=d, dtype=dtype,
                                                  mode=mode, device=device, seed=_seed(loss, n, d), **timing))
                            for r in range(rounds):
                                specs.extend(dict(spec, round=r) if rounds > 1 else spec for spec in group)
    return specs


def merge_rounds(rows: List[dict]) -> List[dict]:
    """One row per key: the median over rounds of time and memory; the rounds' times kept.

    The matmul references (measured at the start and the end of a run) keep their fastest.
    """
    merged, order = {}, []
    for r in rows:
        key = (r["loss"], r["impl"], r.get("backend"), r["n"], r["d"], r["dtype"], r["mode"])
        if key not in merged:
            merged[key] = []
            order.append(key)
        merged[key].append(r)
    out = []
    for key in order:
        group = merged[key]
        if len(group) == 1:
            out.append(group[0])
            continue
        ok = [r for r in group if r.get("status") == "ok"]
        if not ok:
            out.append(dict(group[-1], rounds=len(group)))
            continue
        if key[1] == "matmul":
            # a ceiling: the fastest of its measurements (the least disturbed one)
            best = min(ok, key=lambda r: r["median_ms"])
            out.append(dict(best, rounds=len(ok), round_ms=[r["median_ms"] for r in ok]))
            continue
        row = dict(ok[0], rounds=len(ok), round_ms=[r["median_ms"] for r in ok])
        for col in ("median_ms", "peak_mb", "extra_mb"):
            vals = [r[col] for r in ok if r.get(col) is not None]
            if vals:
                row[col] = statistics.median(vals)
        row["min_ms"] = min(r["min_ms"] for r in ok)
        row["max_ms"] = max(r["max_ms"] for r in ok)
        row["reps"] = sum(r["reps"] for r in ok)
        row["wall_s"] = sum(r.get("wall_s", 0) for r in group)
        row.pop("round", None)
        out.append(row)
    return out


def _seed(loss: str, n: int, d: int) -> int:
    # the same inputs for every implementation of a group, different ones across groups
    return (sum(map(ord, loss)) * 1_000_003 + n * 7919 + d) % (2**31)


def matmul_specs(dtypes, ds, max_n: int, device_type: str, device: str, timing: dict) -> List[dict]:
    """The roofline references: ``[S, D] @ [D, S]`` per (dtype, D) and a square ``P^3`` per dtype.

    ``S`` is the run's largest N, capped where the matmul rate has long saturated (4096 CPU,
    16384 GPU); ``P`` is 2048 on the CPU and 8192 on a GPU (smaller for tiny runs).
    """
    s_cap, p_cap = (16384, 8192) if device_type == "cuda" else (4096, 2048)
    s, p = min(s_cap, max_n), min(p_cap, max(256, max_n))
    specs = []
    for dtype in dtypes:
        specs.append(dict(loss="matmul_peak", impl="matmul", backend=None, n=p, d=p, dtype=dtype, mode="fwd",
                          device=device, seed=1, **timing))
        for d in ds:
            specs.append(dict(loss="matmul", impl="matmul", backend=None, n=s, d=d, dtype=dtype, mode="fwd",
                              device=device, seed=1, **timing))
    return specs


# --- running -------------------------------------------------------------------------------

def _fmt_time(s: float) -> str:
    s = int(s)
    return f"{s // 60}:{s % 60:02d}"


def busy_warning(device_type: str) -> str:
    """A warning when other processes keep the CPU busy (timings then measure the scheduler)."""
    if not hasattr(os, "getloadavg"):
        return ""
    load, cores = os.getloadavg()[0], os.cpu_count() or 1
    if load < 0.75 * cores:
        return ""
    hint = " (use --threads 1 --rounds 3 on a shared machine)" if device_type == "cpu" else ""
    return (f"warning: load average {load:.1f} on {cores} cores: other processes compete for the CPU, "
            f"timings will be noisy{hint}")


def _tflops(row: dict):
    if row.get("status") != "ok" or row.get("median_ms") is None:
        return None
    if row["impl"] == "matmul":
        flops = 2 * row["n"] * row["n"] * row["d"]
    else:
        flops = CASES[row["loss"]].shape(row["n"]).flops(row["d"], row["mode"] == "fwd+bwd")
    return flops / (row["median_ms"] / 1e3) / 1e12


def describe(row: dict) -> str:
    impl = row["impl"] + (f"({row['backend']})" if row.get("backend") else "")
    head = f"{row['loss']:<16} {row['mode']:<7} N={row['n']:>7} D={row['d']:>4} {row['dtype']:<8} {impl:<16}"
    if row.get("status") != "ok":
        return f"{head} {row.get('status')}: {row.get('reason', '')}"
    mem = row.get("extra_mb")
    mem_txt = f"{mem:9.1f} MB" if mem is not None else "      n/a   "
    tf = _tflops(row)
    return f"{head} {row['median_ms']:10.2f} ms {mem_txt} " + (f"{tf:8.3f} TFLOP/s" if tf is not None else "")


@dataclass
class Run:
    """One invocation of a suite: its rows, metadata and where it writes them."""

    suite: str
    meta: dict
    out_dir: str
    stem: str
    rows: List[dict] = field(default_factory=list)
    extra_meta: dict = field(default_factory=dict)

    def merged(self) -> List[dict]:
        rows = merge_rounds(self.rows)
        results.derive(rows)
        return rows

    def save(self):
        if hasattr(os, "getloadavg"):
            self.extra_meta["loadavg_end"] = list(os.getloadavg())
        return results.write(self.merged(), {**self.meta, **self.extra_meta}, self.out_dir, self.stem)


class Driver:
    """Runs specs through one worker with progress lines, a time budget and per-row timeouts."""

    def __init__(self, run: Run, *, time_budget: Optional[float] = None, row_timeout: Optional[float] = None,
                 fresh: bool = False, quiet: bool = False, env: Optional[Dict[str, str]] = None):
        self.run_ = run
        self.worker = Worker(env)
        self.deadline = None if time_budget is None else time.monotonic() + time_budget
        self.row_timeout = row_timeout
        self.fresh = fresh
        self.quiet = quiet
        self.t0 = time.monotonic()
        self.done = 0

    def out_of_time(self) -> bool:
        return self.deadline is not None and time.monotonic() >= self.deadline

    def run_spec(self, spec: dict, total: Optional[int] = None) -> dict:
        if self.out_of_time():
            res = {"status": "not_run", "reason": "time budget spent"}
        else:
            timeout = self.row_timeout
            if self.deadline is not None:
                left = max(1.0, self.deadline - time.monotonic())
                timeout = left if timeout is None else min(timeout, left)
            res = self.worker.run(spec, timeout)
            if self.fresh:
                self.worker.close()
        row = {**spec, **res}
        self.run_.rows.append(row)
        self.run_.save()
        self.done += 1
        if not self.quiet:
            count = f"{self.done:>4}" + (f"/{total:<4}" if total else "")
            print(f"[{count} {_fmt_time(time.monotonic() - self.t0)}] {describe(row)}", flush=True)
        return row

    def run_all(self, specs: List[dict]) -> List[dict]:
        return [self.run_spec(s, len(specs)) for s in specs]

    def close(self):
        self.worker.close()


# --- max batch -----------------------------------------------------------------------------

def _predict(points, n_next):
    """Extrapolate (memory, seconds) at ``n_next`` from measured (n, memory, seconds) points.

    Memory follows the growth seen between the last two points (between linear and quadratic
    in N); with one point it is assumed quadratic, the worst case. Time is quadratic in N.
    """
    n1, m1, t1 = points[-1]
    r = n_next / n1
    if len(points) >= 2 and points[-2][1] > 0 and m1 > 0:
        n0, m0, _ = points[-2]
        k = math.log(m1 / m0) / math.log(n1 / n0)
        k = min(2.0, max(1.0, k))
    else:
        k = 2.0
    return m1 * r**k, t1 * r**2


def max_batch(driver: Driver, losses, impls, d: int, dtype: str, mode: str, device: str, start_n: int,
              max_n: int, mem_cap: Optional[int], max_call_s: float, warm_below_s: float) -> List[dict]:
    """For each (loss, implementation) double N from ``start_n`` until a call no longer fits.

    "Fits": it ran without running out of device memory and, on the CPU, its peak RSS growth
    stayed under ``mem_cap``. A size predicted (from the sizes before it) to exceed the cap or
    to take longer than ``max_call_s`` is not attempted; the summary says which stopped it.
    """
    summary = []
    for loss in losses:
        for impl, backend in impls:
            largest, points, stop = None, [], f"reached --max-n {max_n}"
            n = start_n
            while n <= max_n:
                spec = dict(loss=loss, impl=impl, backend=backend, n=n, d=d, dtype=dtype, mode=mode, device=device,
                            seed=_seed(loss, n, d), timing="single", mem_cap=mem_cap)
                if points:
                    mem, secs = _predict(points, n)
                    if mem_cap and mem > mem_cap:
                        stop = f"N={n} predicted to need {mem / 2**30:.1f} GB > cap {mem_cap / 2**30:.1f} GB"
                        break
                    if secs > max_call_s:
                        stop = f"N={n} predicted to take {secs:.0f} s > --max-call-s {max_call_s:.0f}"
                        break
                    spec["warmup"] = secs < warm_below_s
                row = driver.run_spec(spec)
                if row["status"] == "skipped":
                    stop = f"skipped: {row['reason']}"
                    break
                if row["status"] != "ok":
                    stop = f"N={n}: {row['status']}: {row.get('reason', '')}"
                    break
                largest = n
                points.append((n, (row.get("peak_mb") or 0.0) * 2**20, row["median_ms"] / 1e3))
                n *= 2
            last = next((r for r in reversed(driver.run_.rows)
                         if r["loss"] == loss and r["impl"] == impl and r.get("backend") == backend
                         and r["n"] == largest), None)
            entry = dict(loss=loss, impl=impl, backend=backend, d=d, dtype=dtype, mode=mode, largest_n=largest,
                         peak_mb=last.get("peak_mb") if last else None,
                         extra_mb=last.get("extra_mb") if last else None, stopped=stop)
            summary.append(entry)
            driver.run_.extra_meta["maxbatch"] = summary
            driver.run_.save()
            name = impl + (f"({backend})" if backend else "")
            print(f"==> {loss} {name}: largest N that ran = {largest} ({stop})", flush=True)
    return summary


def check_names(losses=(), backends=(), peers=(), modes=()):
    """Reject unknown names early, with the list of known ones."""
    for kind, given, known in (("loss", losses, tuple(CASES)), ("backend", backends, ("auto",) + FASTCL_BACKENDS),
                               ("peer", peers, PEERS), ("mode", modes, MODES)):
        if kind == "backend":  # "name:pass" is known when both parts are
            given = [g.partition(":")[0] if g.partition(":")[2] in PASSES else g for g in given]
        bad = [g for g in given if g not in known]
        if bad:
            raise SystemExit(f"unknown {kind} {', '.join(bad)}; known: {', '.join(known)}")
