"""Where one fastcl call spends its time: a ``torch.profiler`` table (``python -m bench profile``)."""

import torch

from .cases import CASES
from .measure import resolve_device


def main(args) -> None:
    device = resolve_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    case = CASES[args.loss]
    backward = args.mode == "fwd+bwd"
    gen = torch.Generator(device).manual_seed(0)
    inputs, leaves = case.make(args.n, args.d, dtype, device, backward, gen)

    def call():
        for t in leaves:
            t.grad = None
        loss = case.fastcl(inputs, args.backend)
        if backward:
            loss.backward()

    call()  # warm-up
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        call()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    print(f"{args.loss} {args.mode} N={args.n} D={args.d} {args.dtype} backend={args.backend} on {device}")
    print(prof.key_averages().table(sort_by=key, row_limit=args.rows))
