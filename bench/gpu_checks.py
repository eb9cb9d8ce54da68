"""GPU agreement checks at sizes the unit tests do not reach (``python -m bench check``).

For each compiled backend usable on the GPU (``triton``, ``cuda``) and clip_loss / siglip_loss:
N beyond 65536 and no multiple of any block size, bf16 inputs, logit scale 100 (logits up to
+-100, where an unshifted exp overflows). The loss and every gradient (both feature tensors,
the scale, the bias) are compared with the torch backend on the same inputs, which accumulates
in fp32 without TF32, by ``|a - b| / |b|`` (Frobenius norms; scalars against ``max(|b|, 1)``).
Tolerances: loss 1e-4, gradients 1e-2 (bf16 output rounding is ~4e-3).

On a machine without CUDA it prints that it skipped and returns 0; it returns 1 if any check
fails. The reference costs ``8·N²·D`` fp32 FLOPs per loss: about 40 s on an H100 at N=65573,
D=64 (the defaults of ``gpu_visit.sh``).
"""

import json
import time
from typing import List, Optional

import torch
import torch.nn.functional as F

import fastcl

LOSS_TOL, GRAD_TOL = 1e-4, 1e-2


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    if b.numel() == 1:
        return float((a - b).abs().max() / max(float(b.abs().max()), 1.0))
    return float((a - b).norm() / b.norm().clamp(min=1e-30))


def _call(loss: str, backend: str, x, y, scale, bias):
    leaves = [t.detach().clone().requires_grad_() for t in (x, y, scale, bias)]
    if loss == "clip_loss":
        value = fastcl.clip_loss(leaves[0], leaves[1], leaves[2], leaves[3], backend=backend)
    else:
        value = fastcl.siglip_loss(leaves[0], leaves[1], leaves[2], leaves[3], backend=backend)
    value.backward()
    torch.cuda.synchronize()
    return value.detach(), [t.grad for t in leaves]


def check(loss: str, backend: str, n: int, d: int, device) -> dict:
    gen = torch.Generator(device).manual_seed(n + d)
    x = F.normalize(torch.randn(n, d, generator=gen, device=device), dim=1).bfloat16()
    y = F.normalize(torch.randn(n, d, generator=gen, device=device), dim=1).bfloat16()
    scale = torch.tensor(100.0, device=device)
    bias = torch.tensor(-10.0 if loss == "siglip_loss" else 0.0, device=device)
    t0 = time.perf_counter()
    got, got_grads = _call(loss, backend, x, y, scale, bias)
    t_backend = time.perf_counter() - t0
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        t0 = time.perf_counter()
        want, want_grads = _call(loss, "torch", x, y, scale, bias)
        t_ref = time.perf_counter() - t0
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
    errs = {"loss": _rel(got, want)}
    for name, g, w in zip(("dx", "dy", "dscale", "dbias"), got_grads, want_grads):
        errs[name] = _rel(g, w) if g is not None and w is not None else float("nan")
    finite = all(torch.isfinite(t).all() for t in [got] + [g for g in got_grads if g is not None])
    ok = finite and errs["loss"] <= LOSS_TOL and all(v <= GRAD_TOL for k, v in errs.items() if k != "loss")
    return dict(loss=loss, backend=backend, n=n, d=d, dtype="bfloat16", scale=100.0, ok=bool(ok), finite=bool(finite),
                errors=errs, backend_s=t_backend, reference_s=t_ref)


def main(ns: List[int], d: int, out: Optional[str] = None) -> int:
    if not torch.cuda.is_available():
        print("check: skipped (no CUDA device)")
        return 0
    device = torch.device("cuda")
    from fastcl._dispatch import unavailable_reason

    backends = []
    for name in ("triton", "cuda"):
        reason = unavailable_reason(name, device)
        if reason:
            print(f"check: backend {name} skipped: {reason}")
        else:
            backends.append(name)
    records = []
    for backend in backends:
        for loss in ("clip_loss", "siglip_loss"):
            for n in ns:
                try:
                    rec = check(loss, backend, n, d, device)
                except Exception as exc:  # noqa: BLE001 - a crash is a failed check, reported
                    rec = dict(loss=loss, backend=backend, n=n, d=d, ok=False, error=f"{type(exc).__name__}: {exc}")
                records.append(rec)
                errs = rec.get("errors", {})
                detail = " ".join(f"{k}={v:.1e}" for k, v in errs.items()) or rec.get("error", "")
                print(f"check {'PASS' if rec['ok'] else 'FAIL'} {backend:<6} {loss:<11} N={n} D={d} bf16 scale=100 "
                      f"{detail} ({rec.get('backend_s', 0):.1f} s vs reference {rec.get('reference_s', 0):.1f} s)",
                      flush=True)
                torch.cuda.empty_cache()
    if out:
        with open(out, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(device), "checks": records}, f, indent=1)
    if not backends:
        print("check: no compiled backend to check")
    return 0 if all(r["ok"] for r in records) else 1
