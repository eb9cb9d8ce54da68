"""fastcl benchmark suite.

Usage (from the repository root)::

    python -m bench                     # = quick: fastcl vs naive vs open_clip, prints a table
    python -m bench quick  [--n 1024 2048 4096] [--d 256] [--dtype float32]
    python -m bench full   [--preset cpu-lite|gpu|gpu-targets] [--losses ...] [--n ...] [--d ...]
                           [--dtypes ...] [--modes fwd fwd+bwd] [--backends torch triton:chunked ...]
                           [--peers naive open_clip inf_cl]
    python -m bench maxbatch [--losses clip_loss] [--d 256] [--dtype float32] [--mem-cap-gb 8]
                           [--start-n 1024] [--max-n 32768] [--backends auto] [--peers ...]
    python -m bench plot   [results/*.json ...]
    python -m bench check                       # GPU: large-N / bf16 agreement between backends
    python -m bench summary FILE.json ...       # short table: fastcl against each peer
    python -m bench profile --loss clip_loss --n 4096 --d 256 [--backend torch]
    python -m bench contention [--loss clip_loss] [--n 4096] [--d 256] [--rounds 6] [--busy 1]
    python -m bench compile [--loss clip_loss] [--n 2048] [--d 256] [--rounds 7] [--backend inductor]

Suites:
  quick     The README's main job; runs on whatever device exists. clip_loss and siglip_loss,
            forward+backward, fastcl (backend auto) against naive materialised PyTorch, open_clip
            (if importable) and Inf-CL (CUDA, if importable). CPU: N = 1024, 2048, 4096 at D=256,
            fp32, under two minutes on two cores. GPU: N = 8192, 32768 at D=768, bf16.
  full      The matrix: loss x N x D x dtype x fastcl backend x mode x peers. ``--preset``
            picks a prepared matrix (default: ``cpu-lite`` on the CPU, ``gpu`` on CUDA);
            any of --losses/--n/--d/--dtypes/--modes/--backends/--peers replaces that axis.
            Backends or peers that cannot run are rows with status ``skipped`` and the reason.
  maxbatch  For each implementation, double N until a forward+backward no longer fits: GPU
            out-of-memory, or on the CPU a peak RSS growth above --mem-cap-gb (default 8). A size
            predicted from the smaller ones to exceed the cap (or --max-call-s) is not attempted;
            the CPU worker also runs under an RLIMIT_AS guard. Reports the largest N that ran.
  plot      PNGs (time, memory, roofline % vs N per loss; max batch) next to each result file.
  check     GPU only (skips on CPU): each compiled backend against the torch backend at
            N = 65573 (= 2**16 + 37: large, and no multiple of any block), bf16, logit scale 100.
  summary   fastcl's fastest backend per comparison against each peer (the visit's last table).
  profile   torch.profiler table of one fastcl call (where the time goes).
  contention  CPU: fastcl (torch backend) against open_clip with --busy cores kept busy by
            spinning processes and with none, alternating within each round (bench/contention.py).
  compile   CPU: torch.compile against eager, interleaved: a two-tower training step with a
            fastcl loss, and the loss alone (bench/compile_step.py).

Losses: clip_loss, siglip_loss, info_nce_labels, info_nce_queue, info_nce_hardneg, nt_xent,
supcon, dcl (see bench/cases.py; N is the batch size as passed, so the two-view losses have a
2N x 2N similarity matrix).

Every row reports the median time, the peak extra memory (beyond inputs and gradients), the
achieved TFLOP/s by docs/design.md §9's count (8·N·M·D forward+backward, 2·N·M·D forward), its
percentage of dense matmuls of the same dtype measured in the same run ([S, D] @ [D, S]: "%
matmul"; a large square one: "% peak"), and time and memory ratios against every other
implementation of the same group. Results go to
``bench/results/<date>_<device>_<suite>[_<tag>].{json,csv}`` (or --out), rewritten after every
row; progress lines go to stdout as rows finish.

On a shared CPU, other processes' load wrecks multi-threaded timings (an op's threads wait for
each other's time slices): ``--threads 1 --rounds 3`` gives stable ratios. ``--mem-cap-gb``
(default 8) bounds every CPU row; a row that would pass it fails instead of taking the machine.
"""

import argparse
import os
import sys

from . import results
from .cases import CASES
from .peers import PEERS
from .runner import FASTCL_BACKENDS, MODES, Block, Driver, Run, busy_warning, check_names, matmul_specs, max_batch, plan

ALL_LOSSES = tuple(CASES)

PRESETS = {
    # CPU: the whole loss matrix at sizes two shared cores finish in a few minutes
    "cpu-lite": [Block(ALL_LOSSES, (1024, 2048, 4096), (256,), ("float32",), MODES, FASTCL_BACKENDS, PEERS)],
    # GPU: every loss and mode at two sizes, bf16
    "gpu": [Block(ALL_LOSSES, (16384, 65536), (768,), ("bfloat16",), MODES, FASTCL_BACKENDS, PEERS)],
    # GPU: what issue 7's targets need, in priority order (a time budget cuts from the end)
    "gpu-targets": [
        # targets 1-2: clip/siglip at N=65536, D=768, bf16 against the matmul roofline
        Block(("clip_loss", "siglip_loss"), (65536,), (768,), ("bfloat16",), ("fwd+bwd",), FASTCL_BACKENDS,
              ("naive", "open_clip")),
        # the fused/chunked gradient pass crossover (docs/design.md §7): each pass forced
        Block(("clip_loss", "siglip_loss"), (65536, 262144), (256, 512, 768, 1024), ("bfloat16",), ("fwd+bwd",),
              ("triton:fused", "triton:chunked", "cuda"), ()),
        Block(("clip_loss", "siglip_loss"), (65536,), (256, 512, 768, 1024), ("float32",), ("fwd+bwd",),
              ("triton:fused", "triton:chunked"), ()),
        # targets 3-4: against Inf-CL (fp32 inputs) and open_clip at N=32768 and 65536, D=768
        Block(("clip_loss",), (32768, 65536), (768,), ("bfloat16", "float32"), ("fwd+bwd",), FASTCL_BACKENDS,
              ("inf_cl", "open_clip")),
        # target 7: the sweep over N and D
        Block(("clip_loss", "siglip_loss"), (4096, 16384, 65536), (256, 768, 1024), ("bfloat16",), ("fwd+bwd",),
              FASTCL_BACKENDS, ("naive", "open_clip")),
        Block(("clip_loss", "siglip_loss"), (262144,), (256, 768, 1024), ("bfloat16",), ("fwd+bwd",),
              FASTCL_BACKENDS, ()),
    ],
}

TIMING = {
    "cpu": dict(target_s=0.5, min_reps=3, max_reps=20, slow_s=5.0),
    "cuda": dict(target_s=0.3, min_reps=5, max_reps=100, slow_s=2.0),
}


def _common(p: argparse.ArgumentParser):
    p.add_argument("--device", default="auto", help="auto (CUDA if visible, else CPU), cpu, cuda, cuda:1 ...")
    p.add_argument("--out", default=results.RESULTS_DIR, help="directory for the result files (default bench/results)")
    p.add_argument("--tag", default="", help="suffix for the result file names")
    p.add_argument("--note", default="", help="free text stored in the results' metadata")
    p.add_argument("--time-budget", type=float, default=None, metavar="S",
                   help="stop starting rows after S seconds; rows not run are recorded as not_run")
    p.add_argument("--row-timeout", type=float, default=None, metavar="S", help="kill a row after S seconds")
    p.add_argument("--fresh", action="store_true", help="a new worker process for every row")
    p.add_argument("--target-s", type=float, default=None,
                   help="time spent timing each row (default 0.5 s CPU, 0.3 s GPU)")
    p.add_argument("--min-reps", type=int, default=None, help="fewest timed calls per row")
    p.add_argument("--mem-cap-gb", type=float, default=8.0,
                   help="CPU: a row whose peak RSS growth would pass this fails (RLIMIT_AS guard); default 8")
    p.add_argument("--tf32", action="store_true", help="allow TF32 for fp32 matmuls on CUDA (every implementation)")
    p.add_argument("--rounds", type=int, default=None,
                   help="run each comparison group's implementations round-robin this many times; report medians "
                        "(default 3 for quick, 1 otherwise)")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads per op (torch.set_num_threads) for every implementation; default torch's")


def _axes(p: argparse.ArgumentParser, quick: bool):
    p.add_argument("--losses", nargs="+", default=None, help=f"of: {', '.join(ALL_LOSSES)}")
    p.add_argument("--n", nargs="+", type=int, default=None, help="batch sizes")
    p.add_argument("--d", nargs="+", type=int, default=None, help="feature widths")
    p.add_argument("--dtypes", "--dtype", nargs="+", default=None, help="float32, bfloat16, float16, float64")
    p.add_argument("--peers", nargs="+", default=None, help=f"of: {', '.join(PEERS)} (none: --peers '')")
    if not quick:
        p.add_argument("--preset", choices=sorted(PRESETS), default=None)
        p.add_argument("--modes", nargs="+", default=None, help="fwd, fwd+bwd")
        p.add_argument("--backends", nargs="+", default=None, help="fastcl backends: auto, torch, triton, cuda; "
                       "name:fused or name:chunked forces the gradient pass")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    sub = parser.add_subparsers(dest="suite")
    q = sub.add_parser("quick", help="fastcl vs naive vs open_clip on this device (the default)")
    _common(q)
    _axes(q, quick=True)
    f = sub.add_parser("full", help="the loss x N x D x dtype x backend x mode x peer matrix")
    _common(f)
    _axes(f, quick=False)
    m = sub.add_parser("maxbatch", help="largest N each implementation fits")
    _common(m)
    m.add_argument("--losses", nargs="+", default=["clip_loss"])
    m.add_argument("--d", type=int, default=None, help="feature width (default 256 CPU, 768 GPU)")
    m.add_argument("--dtype", default=None, help="default float32 CPU, bfloat16 GPU")
    m.add_argument("--mode", default="fwd+bwd", choices=MODES)
    m.add_argument("--backends", nargs="+", default=["auto"], help="fastcl backends to sweep")
    m.add_argument("--peers", nargs="+", default=list(PEERS))
    m.add_argument("--start-n", type=int, default=None, help="default 1024 CPU, 16384 GPU")
    m.add_argument("--max-n", type=int, default=None, help="default 32768 CPU, 1048576 GPU")
    m.add_argument("--max-call-s", type=float, default=None,
                   help="skip sizes predicted to take longer (default 300 CPU, 60 GPU)")
    pl = sub.add_parser("plot", help="PNGs from result files")
    pl.add_argument("files", nargs="*", help="result JSON files (default: all in bench/results)")
    c = sub.add_parser("check", help="GPU large-N / bf16 agreement between backends (skips on CPU)")
    c.add_argument("--n", nargs="+", type=int, default=[65573], help="default 65573 (= 2**16 + 37)")
    c.add_argument("--d", type=int, default=64)
    c.add_argument("--out", default=None, help="write the check results as JSON here")
    sm = sub.add_parser("summary", help="short table of result files (fastcl vs each peer)")
    sm.add_argument("files", nargs="+")
    ct = sub.add_parser("contention", help="CPU: fastcl vs peers with cores kept busy, and quiet, interleaved")
    ct.add_argument("--loss", default="clip_loss", choices=("clip_loss", "siglip_loss"))
    ct.add_argument("--n", type=int, default=4096)
    ct.add_argument("--d", type=int, default=256)
    ct.add_argument("--rounds", type=int, default=6)
    ct.add_argument("--busy", type=int, default=1, help="spinning processes in the busy half of each round")
    ct.add_argument("--peers", nargs="+", default=["open_clip"], help="of: naive, open_clip")
    ct.add_argument("--target-s", type=float, default=1.0, help="time spent timing each implementation per half")
    ct.add_argument("--out", default=results.RESULTS_DIR)
    ct.add_argument("--tag", default="")
    ct.add_argument("--note", default="")
    from . import compile_step

    compile_step.add_parser(sub)
    pr = sub.add_parser("profile", help="torch.profiler table of one fastcl call")
    pr.add_argument("--loss", default="clip_loss", choices=ALL_LOSSES)
    pr.add_argument("--n", type=int, default=4096)
    pr.add_argument("--d", type=int, default=256)
    pr.add_argument("--dtype", default="float32")
    pr.add_argument("--backend", default="auto")
    pr.add_argument("--mode", default="fwd+bwd", choices=MODES)
    pr.add_argument("--device", default="auto")
    pr.add_argument("--rows", type=int, default=25, help="table rows to print")
    pr.add_argument("--threads", type=int, default=None, help="torch.set_num_threads for the profiled call")
    return parser


def _setup(args):
    from .measure import device_info, device_slug, resolve_device

    device = resolve_device(args.device)
    # settings for the worker process, which does the measuring
    args.worker_env = {}
    if args.threads:
        args.worker_env["FASTCL_BENCH_THREADS"] = str(args.threads)
    if args.tf32:
        args.worker_env["FASTCL_BENCH_TF32"] = "1"
    info = device_info(device)
    if args.threads and info["type"] == "cpu":
        info["torch_threads"] = args.threads
    timing = dict(TIMING[device.type])
    if args.target_s is not None:
        timing["target_s"] = args.target_s
    if args.min_reps is not None:
        timing["min_reps"] = args.min_reps
    if device.type == "cpu" and args.mem_cap_gb:
        timing["mem_cap"] = int(args.mem_cap_gb * 2**30)
    return device, info, device_slug(info), timing


def _peers(given):
    return tuple(p for p in given if p) if given is not None else None


def _run(args, argv, blocks):
    device, info, slug, timing = _setup(args)
    for b in blocks:
        check_names(b.losses, b.backends, b.peers, b.modes)
    meta = results.metadata(args.suite, info, argv, args.note)
    meta["tf32_matmul"] = bool(args.tf32)
    meta["mem_cap_gb"] = args.mem_cap_gb if device.type == "cpu" else None
    run = Run(args.suite, meta, args.out, results.stem(meta, slug, args.tag))
    print(f"fastcl bench {args.suite} on {info['name']} ({device}); results -> {os.path.join(args.out, run.stem)}.json",
          flush=True)
    print(_build_line(), flush=True)
    warning = busy_warning(device.type)
    if warning:
        print(warning, flush=True)
    dtypes = sorted({t for b in blocks for t in b.dtypes})
    ds = sorted({d for b in blocks for d in b.ds})
    max_n = max(n for b in blocks for n in b.ns)
    # the matmul ceilings before and after the losses: a load change in between shows, and the
    # faster of the two is kept
    ceilings = matmul_specs(dtypes, ds, max_n, device.type, str(device), timing)
    rounds = args.rounds or (3 if args.suite == "quick" else 1)
    specs = ceilings + plan(blocks, str(device), timing, rounds) + ceilings
    driver = Driver(run, time_budget=args.time_budget, row_timeout=args.row_timeout, fresh=args.fresh,
                    env=args.worker_env)
    try:
        driver.run_all(specs)
    finally:
        driver.close()
    js, cs = run.save()
    busy = bool(warning or busy_warning(device.type))
    _report(run.merged(), busy)
    print(f"\nresults: {js}\n         {cs}")
    return run


def _build_line() -> str:
    """What this install can run, and loudly whether the CUDA extension or the CPU epilogues are
    missing."""
    import fastcl

    info = fastcl.build_info()
    if info["cuda_extension"]:
        ext = f"CUDA extension built for sm_{', sm_'.join(info['cuda_archs'])}"
    else:
        ext = f"CUDA extension NOT BUILT ({info['cuda_extension_reason']})"
    cpu = ("CPU epilogues built" if info["cpu_extension"]
           else f"CPU epilogues NOT BUILT ({info['cpu_extension_reason']})")
    backends = ", ".join(info["backends"])
    return f"fastcl {info['version']} (torch {info['torch']}): backends here {backends}; {ext}; {cpu}"


def _report(rows, busy: bool = False):
    print()
    print(results.matmul_lines(rows))
    print()
    print(results.table(rows))
    skipped = {}
    for r in rows:
        if r.get("status") == "skipped":
            skipped.setdefault(results.impl_name(r), set()).add(r["reason"])
    for impl, reasons in skipped.items():
        print(f"  {impl} skipped: {'; '.join(sorted(reasons))}")
    for line in results.headlines(rows, busy):
        print(line)


def cmd_quick(args, argv):
    _, info, _, _ = _setup(args)
    gpu = info["type"] == "cuda"
    block = Block(
        losses=args.losses or ("clip_loss", "siglip_loss"),
        ns=args.n or ((8192, 32768) if gpu else (1024, 2048, 4096)),
        ds=args.d or ((768,) if gpu else (256,)),
        dtypes=args.dtypes or (("bfloat16",) if gpu else ("float32",)),
        modes=("fwd+bwd",),
        backends=("auto",),
        peers=_peers(args.peers) if args.peers is not None else PEERS,
    )
    return _run(args, argv, [block])


def cmd_full(args, argv):
    _, info, _, _ = _setup(args)
    preset = args.preset or ("gpu" if info["type"] == "cuda" else "cpu-lite")
    blocks = PRESETS[preset]
    overrides = dict(losses=args.losses, ns=args.n, ds=args.d, dtypes=args.dtypes, modes=args.modes,
                     backends=args.backends, peers=_peers(args.peers))
    if any(v is not None for v in overrides.values()):
        base = blocks[0]
        blocks = [Block(**{k: (v if v is not None else getattr(base, k)) for k, v in overrides.items()})]
    args.tag = args.tag or ("" if args.preset is None else preset)
    return _run(args, argv, blocks)


def cmd_maxbatch(args, argv):
    device, info, slug, _ = _setup(args)
    gpu = device.type == "cuda"
    check_names(args.losses, args.backends, [p for p in args.peers if p], [args.mode])
    d = args.d or (768 if gpu else 256)
    dtype = args.dtype or ("bfloat16" if gpu else "float32")
    start_n = args.start_n or (16384 if gpu else 1024)
    max_n = args.max_n or (1 << 20 if gpu else 32768)
    max_call = args.max_call_s or (60.0 if gpu else 300.0)
    cap = None if gpu else int(args.mem_cap_gb * 2**30)
    meta = results.metadata("maxbatch", info, argv, args.note)
    meta["tf32_matmul"] = bool(args.tf32)
    meta.update(mem_cap_gb=None if gpu else args.mem_cap_gb, max_n=max_n, max_call_s=max_call)
    run = Run("maxbatch", meta, args.out, results.stem(meta, slug, args.tag))
    where = "device memory" if gpu else f"a {args.mem_cap_gb:g} GB peak-RSS cap"
    print(f"fastcl bench maxbatch on {info['name']}: N from {start_n} doubling to {max_n}, within {where}", flush=True)
    if busy_warning(device.type):
        print(busy_warning(device.type), flush=True)
    impls = [("fastcl", b) for b in args.backends] + [(p, None) for p in args.peers if p]
    driver = Driver(run, time_budget=args.time_budget, row_timeout=args.row_timeout, fresh=args.fresh,
                    env=args.worker_env)
    try:
        summary = max_batch(driver, args.losses, impls, d, dtype, args.mode, str(device), start_n, max_n, cap,
                            max_call, warm_below_s=30.0)
    finally:
        driver.close()
    js, cs = run.save()
    print("\nlargest N that ran (" + f"D={d}, {dtype}, {args.mode}):")
    for s in summary:
        name = s["impl"] + (f"({s['backend']})" if s["backend"] else "")
        peak = "-" if s["peak_mb"] is None else f"{s['peak_mb']:.0f} MB peak ({s['extra_mb']:.0f} beyond grads)"
        print(f"  {s['loss']:<12} {name:<16} {str(s['largest_n']):>8}  {peak:<24} stopped: {s['stopped']}")
    print(f"\nresults: {js}\n         {cs}")
    return run


def cmd_plot(args, argv):
    from . import plot

    files = args.files or None
    for path in plot.main(files):
        print(path)


def cmd_check(args, argv):
    from . import gpu_checks

    return gpu_checks.main(args.n, args.d, args.out)


def cmd_summary(args, argv):
    for path in args.files:
        print(results.summary(path))
        print()


def cmd_contention(args, argv):
    from . import contention

    contention.run(args, argv)


def cmd_compile(args, argv):
    from . import compile_step

    compile_step.run(args, argv)


def cmd_profile(args, argv):
    from . import profile

    profile.main(args)


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    if not argv or argv[0].startswith("-") and argv[0] not in ("-h", "--help"):
        argv = ["quick"] + argv
    args = parser.parse_args(argv)
    commands = dict(quick=cmd_quick, full=cmd_full, maxbatch=cmd_maxbatch, plot=cmd_plot, check=cmd_check,
                    summary=cmd_summary, contention=cmd_contention, profile=cmd_profile,
                    compile=cmd_compile)
    return commands[args.suite](args, argv)


if __name__ == "__main__":
    rc = main()
    sys.exit(rc if isinstance(rc, int) else 0)
