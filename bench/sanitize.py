"""One small call of every kernel mode of a backend, for ``compute-sanitizer --tool memcheck``.

    compute-sanitizer --tool memcheck --error-exitcode 1 python -m bench.sanitize --backend cuda
    python -m bench.sanitize --backend triton

Shapes are small, odd and unequal (37 x 45 x 19: no multiple of any block) so every tail mask is
exercised; each call runs forward and backward in every dtype the backend takes. The modes: plain
row softmax (one positive per row), symmetric CLIP, label positives with exclude_self and
decoupled, a detached queue, per-row temperatures, and the sigmoid loss with bias (one-hot and
label positives), each with the
fused and with the chunked gradient pass (chunks of a few rows). Exits 0 when every call finished
(the sanitizer's own exit code reports memory errors).
"""

import argparse
import os
import sys

import torch

import fastcl

DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def calls(n: int, m: int, d: int, dtype, device, backend: str):
    """(name, thunk) for every kernel mode; each thunk runs forward and backward once."""
    gen = torch.Generator(device=device).manual_seed(0)

    def feats(rows, grad=True):
        return torch.randn(rows, d, generator=gen, device=device, dtype=dtype).requires_grad_(grad)

    q, k, kn = feats(n), feats(m), feats(n)
    queue = feats(m - n + 3, grad=False)
    lab = torch.randint(0, 3, (n,), generator=gen, device=device)
    klab = torch.randint(0, 3, (m,), generator=gen, device=device)
    temps = torch.rand(n, generator=gen, device=device) * 0.5 + 0.05
    kw = dict(backend=backend)
    return [
        ("row softmax", lambda: fastcl.info_nce(q, k, positive_index=torch.arange(n, device=device), **kw)),
        ("symmetric clip", lambda: fastcl.clip_loss(q, kn, 10.0, **kw)),
        ("labels exclude_self decoupled", lambda: fastcl.info_nce(
            q, k, labels=lab, key_labels=klab, exclude_self=True, decoupled=True, **kw)),
        ("detached queue", lambda: fastcl.info_nce(q, kn, negatives=queue, **kw)),
        ("per-row temperature", lambda: fastcl.info_nce(q, kn, temperature=temps, **kw)),
        ("sigmoid with bias", lambda: fastcl.siglip_loss(q, kn, 10.0, -10.0, **kw)),
        ("sigmoid with labels", lambda: fastcl.siglip_loss(q, kn, 10.0, -10.0, labels=lab, **kw)),
    ]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.sanitize", description=__doc__.split("\n\n")[0])
    p.add_argument("--backend", default="cuda", help="cuda, triton or torch")
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtypes", nargs="+", default=None, help="default: every dtype the backend takes")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    dtypes = [getattr(torch, t) for t in args.dtypes] if args.dtypes else DTYPES
    if device.type == "cpu":  # half-precision matmuls on a CPU are slow and add nothing here
        dtypes = [t for t in dtypes if t in (torch.float32, torch.float64)]
    done = 0
    for dtype in dtypes:
        for backward in ("fused", "chunked"):  # the chunked pass writes G with its own kernel (mode)
            os.environ["FASTCL_BACKWARD"] = backward
            os.environ["FASTCL_MEMORY_BUDGET_MB"] = "0.002"  # a few rows per chunk: odd chunk tails
            for name, call in calls(37, 45, 19, dtype, device, args.backend):
                call().backward()
                done += 1
            if device.type == "cuda":
                torch.cuda.synchronize()
        print(f"sanitize {args.backend} {str(dtype).replace('torch.', '')}: every mode ran, both gradient passes",
              flush=True)
    print(f"sanitize {args.backend}: {done} calls finished")
    return 0


if __name__ == "__main__":
    sys.exit(main())
