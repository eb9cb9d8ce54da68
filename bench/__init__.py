"""fastcl's benchmark suite: speed, memory and roofline of the fused losses against the
implementations people use today (naive materialised PyTorch, open_clip, Inf-CL).

Layout:

    bench/__main__.py    the command line (``python -m bench --help``)
    bench/cases.py       the losses benchmarked: inputs, FLOP counts, the fastcl call
    bench/peers.py       the same losses as others compute them (naive, open_clip, Inf-CL)
    bench/measure.py     timing (CPU clock / CUDA events) and peak memory (RSS / allocator)
    bench/worker.py      the subprocess that runs rows and reports one JSON line per row
    bench/runner.py      suites (quick, full, maxbatch): plan rows, drive the worker, ratios
    bench/results.py     result files (CSV + JSON with device, versions, commit) and tables
    bench/plot.py        PNGs from the result files
    bench/gpu_checks.py  large-N / bf16 agreement checks between backends on a GPU
    bench/gpu_visit.sh   the one script a lent-GPU visit runs
    bench/results/       committed results, named by date, device and suite
"""
