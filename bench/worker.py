"""The benchmark worker: a subprocess that runs rows and reports each as one JSON line.

``python -m bench.worker`` reads row specs (JSON, one per line) on stdin and answers each with
one line ``@@bench@@ {json}`` on stdout; anything else on stdout is library chatter. Running the
rows in a subprocess keeps the measuring process's memory apart from the driver's, lets the
driver kill a row that runs too long, and survives a crashed or poisoned device context (the
driver starts a fresh worker). A CUDA error other than out-of-memory is sticky: the row reports it
(``fatal``) and the worker exits.

A row spec holds ``loss`` (a case name, or ``matmul`` for the roofline reference), ``impl``
(``fastcl``, a peer name, or ``matmul``), ``backend`` (fastcl's), ``n``, ``d``, ``dtype``,
``mode`` (``fwd`` or ``fwd+bwd``), ``device``, ``seed``, the timing policy (``timing``:
``auto`` or ``single``, ``target_s``, ``min_reps``, ``max_reps``, ``slow_s``, ``warmup``) and,
on the CPU, ``mem_cap`` (bytes; the row fails beyond it).
"""

import gc
import json
import os
import re
import resource
import sys
import time
import traceback

import torch

from . import measure, peers
from .cases import CASES, matmul_inputs

MARK = "@@bench@@ "
# above this N a torch-backend row on a GPU only burns the visit's minutes
TORCH_ON_GPU_MAX_N = 65536


_BACKWARD_AS_GIVEN = os.environ.get("FASTCL_BACKWARD")


def _force_pass(backend: str) -> str:
    """``"triton:chunked"`` -> ``"triton"`` with ``FASTCL_BACKWARD=chunked`` for this row (the
    worker runs one row at a time); a plain name restores the variable as the worker got it."""
    name, _, forced = backend.partition(":")
    if forced:
        os.environ["FASTCL_BACKWARD"] = forced
    elif _BACKWARD_AS_GIVEN is None:
        os.environ.pop("FASTCL_BACKWARD", None)
    else:
        os.environ["FASTCL_BACKWARD"] = _BACKWARD_AS_GIVEN
    return name


def _is_oom(exc: BaseException) -> bool:
    if isinstance(exc, (MemoryError, torch.cuda.OutOfMemoryError)):
        return True
    text = str(exc)
    return "can't allocate memory" in text or "out of memory" in text.lower()


def _is_device_fault(exc: BaseException, device: torch.device) -> bool:
    """A CUDA error other than out-of-memory (illegal address, launch failure, ...): it is sticky,
    so every later call in this process would fail or measure garbage."""
    if device.type != "cuda" or _is_oom(exc):
        return False
    accelerator_error = getattr(torch, "AcceleratorError", ())
    if accelerator_error and isinstance(exc, accelerator_error):
        return True
    text = str(exc)
    return "CUDA error" in text or "illegal memory access" in text or "CUDA driver error" in text


def _oom_reason(exc: BaseException, cap) -> str:
    """One short line: how much the failed allocation asked for, and under which limit."""
    text = str(exc).strip()
    m = re.search(r"allocate (\d+) bytes", text)
    if m:
        size = f"{int(m.group(1)) / 2**30:.2f} GB"
    else:
        m = re.search(r"Tried to allocate ([\d.]+ [KMG]iB)", text)
        size = m.group(1) if m else None
    where = f" (CPU cap {cap / 2**30:g} GB, enforced with RLIMIT_AS)" if cap else ""
    if size:
        return f"out of memory: an allocation of {size} failed{where}"
    return f"out of memory{where}: {text.splitlines()[0][:200] if text else type(exc).__name__}"


def _tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))


class _Row:
    """One row's inputs and the call to measure."""

    def __init__(self, spec, device, dtype):
        self.backward = spec["mode"] == "fwd+bwd"
        self.extra = {}
        gen = torch.Generator(device).manual_seed(int(spec["seed"]))
        n, d, impl = int(spec["n"]), int(spec["d"]), spec["impl"]
        if impl == "matmul":
            a, b = matmul_inputs(n, d, dtype, device, gen)
            self.leaves, self.input_bytes = [], _tensor_bytes([a, b])
            self.loss_fn = lambda: a @ b.T
            return
        case = CASES[spec["loss"]]
        inputs, leaves = case.make(n, d, dtype, device, self.backward, gen)
        if impl == "fastcl":
            from fastcl._dispatch import resolve

            backend = _force_pass(spec.get("backend") or "auto")
            self.extra["backend_used"] = resolve(backend, device).__name__.rsplit(".", 1)[-1]
            self.loss_fn = lambda: case.fastcl(inputs, backend)
        else:
            if impl == "inf_cl":
                inputs, leaves = peers.inf_cl_inputs(inputs, leaves)
            fn = peers.make(impl, spec["loss"], d)
            self.loss_fn = lambda: fn(inputs)
        floats = [v for v in inputs.values() if isinstance(v, torch.Tensor) and v.is_floating_point()]
        self.extra["input_dtype"] = str(floats[0].dtype).replace("torch.", "")
        self.leaves = leaves
        self.input_bytes = _tensor_bytes(inputs.values())

    def clear_grads(self):
        for t in self.leaves:
            t.grad = None

    def __call__(self):
        self.clear_grads()
        if self.backward:
            loss = self.loss_fn()
            loss.backward()
            return loss
        with torch.no_grad():
            return self.loss_fn()

    def grad_bytes(self) -> int:
        return _tensor_bytes([t.grad for t in self.leaves])


def _skip_reason(spec, device) -> str:
    impl = spec["impl"]
    if impl == "matmul":
        return ""
    if spec["loss"] not in CASES:
        return f"unknown loss {spec['loss']!r}"
    if impl == "fastcl":
        from fastcl._dispatch import unavailable_reason, unsupported_reason

        backend = (spec.get("backend") or "auto").partition(":")[0]
        if backend == "torch" and device.type == "cuda" and int(spec["n"]) > TORCH_ON_GPU_MAX_N:
            return (f"the torch backend is the CPU path (a slow fallback on a GPU): not run on a GPU "
                    f"above N={TORCH_ON_GPU_MAX_N}")
        if backend == "auto":
            return ""
        return unavailable_reason(backend, device) or unsupported_reason(backend, CASES[spec["loss"]].needs) or ""
    return peers.unavailable(impl, spec["loss"], device, int(spec["d"])) or ""


def _limit_address_space(cap):
    """Make allocations beyond ``cap`` bytes of growth fail (CPU guard for the memory cap)."""
    if not cap:
        return None
    old = resource.getrlimit(resource.RLIMIT_AS)
    # virtual size also grows by thread stacks and allocator arenas: allow a fixed slack
    soft = measure.address_space_bytes() + int(cap) + (1 << 30)
    if old[1] != resource.RLIM_INFINITY:
        soft = min(soft, old[1])
    resource.setrlimit(resource.RLIMIT_AS, (soft, old[1]))
    return old


def run_row(spec: dict) -> dict:
    """Measure one row; never raises (failures come back as ``status`` and ``reason``)."""
    device = torch.device(spec["device"])
    dtype = getattr(torch, spec["dtype"])
    t_start = time.perf_counter()
    reason = _skip_reason(spec, device)
    if reason:
        return {"status": "skipped", "reason": reason, "wall_s": time.perf_counter() - t_start}
    result = {"status": "ok", "reason": ""}
    no_memory = measure.cpu_peak_supported() if device.type == "cpu" else None
    if no_memory:
        result["reason"] = f"memory not measured: {no_memory}"
    row = None
    old_limit = _limit_address_space(spec.get("mem_cap")) if device.type == "cpu" else None
    try:
        row = _Row(spec, device, dtype)
        result.update(row.extra)
        result["input_mb"] = row.input_bytes / 2**20
        clock = measure.Clock(device)
        out = {}

        def once():
            out["loss"] = row()

        if spec.get("timing", "auto") == "single":
            # one call measured for both time and memory (max-batch sweeps: calls are long)
            if spec.get("warmup", True):
                row()
                row.clear_grads()  # so the measured call starts from inputs alone

            def timed_once():
                out["s"] = clock(once)

            growth = None if no_memory else measure.peak_growth(timed_once, device)[0]
            if no_memory:
                timed_once()
            ms = out["s"] * 1e3
            result.update(median_ms=ms, min_ms=ms, max_ms=ms, reps=1, first_ms=ms)
        else:
            result.update(measure.time_calls(
                once, clock, target_s=spec.get("target_s", 1.0), min_reps=spec.get("min_reps", 3),
                max_reps=spec.get("max_reps", 50), warmup_s=spec.get("target_s", 1.0) / 4,
                slow_s=spec.get("slow_s", 5.0)))
            out.clear()
            row.clear_grads()
            growth = None if no_memory else measure.peak_growth(once, device)[0]
            if no_memory:
                once()
        loss = out.get("loss")
        if isinstance(loss, torch.Tensor) and loss.dim() == 0:
            result["loss_value"] = float(loss.detach().double())
        grads = row.grad_bytes()
        result["grad_mb"] = grads / 2**20
        if growth is not None:
            result["peak_mb"] = growth / 2**20
            result["extra_mb"] = (growth - grads) / 2**20
        cap = spec.get("mem_cap")
        if cap and growth is not None and growth > cap:
            result["status"] = "over_cap"
            result["reason"] = f"peak growth {growth / 2**30:.2f} GB > cap {cap / 2**30:.2f} GB"
    except Exception as exc:  # noqa: BLE001 - every failure becomes a row
        if _is_oom(exc):
            result["status"] = "oom"
            result["reason"] = _oom_reason(exc, spec.get("mem_cap") if device.type == "cpu" else None)
        else:
            result["status"] = "error"
            result["reason"] = f"{type(exc).__name__}: {str(exc).strip()[:300]}"
            if _is_device_fault(exc, device):
                result["fatal"] = True
                result["reason"] = "CUDA error, worker exits: " + result["reason"]
            traceback.print_exc(file=sys.stderr)
    finally:
        if old_limit is not None:
            resource.setrlimit(resource.RLIMIT_AS, old_limit)
        row = out = None
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    result["wall_s"] = time.perf_counter() - t_start
    return result


def main() -> None:
    if os.environ.get("FASTCL_BENCH_TF32"):
        torch.backends.cuda.matmul.allow_tf32 = True
    if os.environ.get("FASTCL_BENCH_THREADS"):
        torch.set_num_threads(int(os.environ["FASTCL_BENCH_THREADS"]))
    for line in sys.stdin:
        line = line.strip()
        if not line:
            continue
        spec = json.loads(line)
        out = run_row(spec)
        sys.stdout.write(MARK + json.dumps(out) + "\n")
        sys.stdout.flush()
        if out.get("fatal"):
            sys.exit(3)  # the device context is poisoned: the driver starts a fresh worker


if __name__ == "__main__":
    main()
