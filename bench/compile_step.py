"""torch.compile against eager for a small two-tower training step with a fastcl loss, and for the
loss alone, interleaved in one run (a benchmark, not a timed test).

Each round times four things once each, in turn: the eager step, the compiled step (the model and
the loss in one ``fullgraph`` graph, its backward from AOTAutograd), the eager loss and the
compiled loss (forward + backward on fixed features). Ratios are taken within a round, and the
median over rounds is reported, so drift on a shared machine cancels.

    python -m bench compile [--loss clip_loss] [--n 2048] [--d 256] [--rounds 7] [--backend inductor]
"""

import json
import statistics
import time

import torch
import torch.nn.functional as F

import fastcl

from . import results
from .measure import device_info, device_slug

LOSSES = {
    "clip_loss": lambda a, b, s: fastcl.clip_loss(a, b, s),
    "siglip_loss": lambda a, b, s: fastcl.siglip_loss(a, b, s, -10.0),
}


class TwoTower(torch.nn.Module):
    """Two MLP towers to a shared ``d``-wide unit embedding, and a learnable log logit scale."""

    def __init__(self, d_in: int, d: int):
        super().__init__()
        self.image = torch.nn.Sequential(torch.nn.Linear(d_in, 2 * d), torch.nn.GELU(), torch.nn.Linear(2 * d, d))
        self.text = torch.nn.Sequential(torch.nn.Linear(d_in, 2 * d), torch.nn.GELU(), torch.nn.Linear(2 * d, d))
        self.log_scale = torch.nn.Parameter(torch.tensor(2.659))  # log(1 / 0.07)

    def forward(self, a, b):
        return F.normalize(self.image(a), dim=-1), F.normalize(self.text(b), dim=-1), self.log_scale.exp()


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def run(args, argv) -> None:
    torch.manual_seed(0)
    loss_fn = LOSSES[args.loss]
    model = TwoTower(args.d_in, args.d)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    a, b = torch.randn(args.n, args.d_in), torch.randn(args.n, args.d_in)

    def forward(x, y):
        img, txt, scale = model(x, y)
        return loss_fn(img, txt, scale)

    compiled_forward = torch.compile(forward, fullgraph=True, backend=args.backend)

    def step(fwd):
        opt.zero_grad()
        fwd(a, b).backward()
        opt.step()

    feats = [F.normalize(torch.randn(args.n, args.d), dim=1).requires_grad_() for _ in range(2)]
    scale = torch.tensor(14.3, requires_grad=True)

    def loss_only(fn):
        fn(feats[0], feats[1], scale).backward()

    compiled_loss = torch.compile(loss_fn, fullgraph=True, backend=args.backend)
    calls = {"step eager": lambda: step(forward), "step compiled": lambda: step(compiled_forward),
             "loss eager": lambda: loss_only(loss_fn), "loss compiled": lambda: loss_only(compiled_loss)}
    start = time.perf_counter()
    for fn in calls.values():  # compile and warm up
        fn()
        fn()
    print(f"compiled and warmed up in {time.perf_counter() - start:.1f} s", flush=True)
    times = {k: [] for k in calls}
    for r in range(args.rounds):
        for k, fn in calls.items():
            times[k].append(_timed(fn))
        print(f"round {r + 1}/{args.rounds}: " + ", ".join(f"{k} {v[-1] * 1e3:.0f} ms" for k, v in times.items()),
              flush=True)
    step_ratio = statistics.median(c / e for c, e in zip(times["step compiled"], times["step eager"]))
    loss_ratio = statistics.median(c / e for c, e in zip(times["loss compiled"], times["loss eager"]))
    info = device_info(torch.device("cpu"))
    summary = {"loss": args.loss, "n": args.n, "d": args.d, "d_in": args.d_in, "rounds": args.rounds,
               "compile_backend": args.backend, "median_seconds": {k: statistics.median(v) for k, v in times.items()},
               "compiled_over_eager": {"step": step_ratio, "loss": loss_ratio}, "device": info, "argv": argv}
    print(f"compiled / eager (median of per-round ratios): step {step_ratio:.2f}x, loss {loss_ratio:.2f}x")
    if args.out:
        path = f"{args.out}/compile_{device_slug(info)}{args.tag}.json"
        with open(path, "w") as f:
            json.dump(summary, f, indent=1)
        print(f"wrote {path}")


def add_parser(sub) -> None:
    p = sub.add_parser("compile", help="CPU: torch.compile vs eager, a two-tower step and the loss alone")
    p.add_argument("--loss", default="clip_loss", choices=sorted(LOSSES))
    p.add_argument("--n", type=int, default=2048)
    p.add_argument("--d", type=int, default=256)
    p.add_argument("--d-in", type=int, default=128)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--backend", default="inductor", help="torch.compile backend (inductor, aot_eager, ...)")
    p.add_argument("--out", default=results.RESULTS_DIR)
    p.add_argument("--tag", default="")
