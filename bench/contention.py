"""CPU under contention: fastcl's blockwise engine against the peers while other processes hold
cores, and in a quiet machine, interleaved in one run.

Training machines are rarely quiet (data-loader workers, a second job). Each round times every
implementation twice: once with no load, once with ``--busy`` spinning processes started by this
script (each keeps one core at 100%). Ratios are taken within a round (same load, same minute),
then the median over rounds is reported, so drift between rounds cancels.

    python -m bench contention [--loss clip_loss] [--n 4096] [--d 256] [--rounds 6] [--busy 1]
"""

import json
import os
import statistics
import subprocess
import sys
import time
from typing import Dict, List

import torch

from . import peers as peer_impls
from . import results
from .cases import CASES
from .measure import Clock, device_info, device_slug, time_calls

SPIN = "while True: pass"


class Spinners:
    """``count`` processes that each keep one core busy while the block runs."""

    def __init__(self, count: int):
        self.count = count
        self.procs: List[subprocess.Popen] = []

    def __enter__(self):
        self.procs = [subprocess.Popen([sys.executable, "-c", SPIN]) for _ in range(self.count)]
        time.sleep(0.3 if self.count else 0)  # let them reach the loop
        return self

    def __exit__(self, *exc):
        for p in self.procs:
            p.kill()
        for p in self.procs:
            p.wait()


def _impls(loss: str, d: int, peers: List[str]) -> Dict[str, object]:
    case = CASES[loss]
    impls = {"fastcl": lambda i: case.fastcl(i, "torch")}
    for peer in peers:
        reason = peer_impls.unavailable(peer, loss, torch.device("cpu"), d)
        if reason:
            print(f"  {peer}: skipped ({reason})", flush=True)
        else:
            impls[peer] = peer_impls.make(peer, loss, d)
    return impls


def _step(fn, inputs, leaves):
    def call():
        for t in leaves:
            t.grad = None
        fn(inputs).backward()

    return call


def run(args, argv) -> dict:
    """Run the interleaved rounds; print per-round times and the median ratios; write JSON."""
    device = torch.device("cpu")
    info = device_info(device)
    meta = results.metadata("contention", info, argv, args.note)
    case = CASES[args.loss]
    gen = torch.Generator().manual_seed(0)
    inputs, leaves = case.make(args.n, args.d, torch.float32, device, True, gen)
    impls = _impls(args.loss, args.d, args.peers)
    loads = {"quiet": 0, f"{args.busy} core(s) busy": args.busy}
    print(f"fastcl bench contention: {args.loss} fwd+bwd, N={args.n}, D={args.d}, fp32, "
          f"{torch.get_num_threads()} torch threads, {os.cpu_count()} cores; {args.rounds} rounds of "
          f"{', '.join(loads)}", flush=True)
    clock = Clock(device)
    times: Dict[str, Dict[str, List[float]]] = {load: {name: [] for name in impls} for load in loads}
    for r in range(args.rounds):
        for load, count in loads.items():
            with Spinners(count):
                for name, fn in impls.items():
                    t = time_calls(_step(fn, inputs, leaves), clock, target_s=args.target_s, min_reps=3)
                    times[load][name].append(t["median_ms"])
            line = ", ".join(f"{name} {times[load][name][-1]:.0f} ms" for name in impls)
            print(f"  round {r + 1} {load}: {line}", flush=True)

    summary = {}
    for load in loads:
        entry = {name: statistics.median(ts) for name, ts in times[load].items()}
        for name in impls:
            if name != "fastcl":
                per_round = [f / p for f, p in zip(times[load]["fastcl"], times[load][name])]
                entry[f"fastcl/{name}"] = statistics.median(per_round)
                entry[f"fastcl/{name} range"] = [min(per_round), max(per_round)]
        summary[load] = entry
    print()
    for load, entry in summary.items():
        ratios = ", ".join(f"{k} {v:.2f}x" for k, v in entry.items() if k.startswith("fastcl/") and "range" not in k)
        print(f"{load:>18}: fastcl {entry['fastcl']:.0f} ms (median of rounds); {ratios or 'no peer ran'}")
    out = {"meta": meta, "case": dict(loss=args.loss, n=args.n, d=args.d, dtype="float32", mode="fwd+bwd"),
           "busy_processes": args.busy, "times_ms": times, "summary": summary}
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, results.stem(meta, device_slug(info), args.tag) + ".json")
    with open(path, "w") as f:
        json.dump(out, f, indent=1)
    print(f"\nresults: {path}")
    return out
