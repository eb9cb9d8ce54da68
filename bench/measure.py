"""Time and peak memory of one callable, on the CPU or a CUDA device.

Time (median of individually timed calls, after warm-up):
  * CPU: ``time.perf_counter`` around each call.
  * CUDA: CUDA events around each call, with the L2 cache flushed before it (a 256 MB buffer is
    zeroed, as ``triton.testing.do_bench`` does), so repeated calls do not time a warm cache.

Peak extra memory of one call:
  * CUDA: ``torch.cuda.max_memory_allocated()`` during the call minus what was allocated before
    it (the inputs). The caller subtracts the gradients' bytes to get memory beyond
    inputs + gradients.
  * CPU: growth of the resident set during the call. Before it, free heap memory is handed back
    to the OS (glibc ``malloc_trim``) and the kernel's peak-RSS mark is reset (``5`` written to
    ``/proc/self/clear_refs``); after it the mark (``VmHWM``, which ``getrusage().ru_maxrss``
    also reports) minus the RSS before the call is the growth. Memory the allocator kept from
    earlier calls is therefore counted again when it is touched, so a long-lived worker process
    measures what a fresh one would.
"""

import ctypes
import gc
import math
import os
import re
import resource
import statistics
import time
from typing import Callable, Dict, Optional

import torch

_PAGE = os.sysconf("SC_PAGE_SIZE")
_FLUSH_BYTES = 256 << 20


# --- devices -------------------------------------------------------------------------------

def resolve_device(name: str) -> torch.device:
    """``"auto"`` is the first CUDA device when one is visible, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device {name}: no CUDA device is visible")
    return device


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()


def device_info(device: torch.device) -> Dict[str, object]:
    """Name and size of the device: what the results are tagged with."""
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return {
            "type": "cuda",
            "name": props.name,
            "memory_gb": round(props.total_memory / 2**30, 1),
            "multiprocessors": props.multi_processor_count,
            "capability": f"{props.major}.{props.minor}",
            "cuda": torch.version.cuda,
        }
    return {
        "type": "cpu",
        "name": _cpu_model(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "memory_gb": round(os.sysconf("SC_PHYS_PAGES") * _PAGE / 2**30, 1),
    }


def device_slug(info: Dict[str, object]) -> str:
    """A file-name-safe device name, e.g. ``nvidia-h100-80gb-hbm3`` or ``cpu-amd-epyc-2c``."""
    name = str(info["name"]).lower()
    if info["type"] == "cpu":
        name = f"cpu-{name}-{info['cores']}c"
    return re.sub(r"[^a-z0-9]+", "-", name).strip("-")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# --- time ----------------------------------------------------------------------------------

class Clock:
    """Times one call on ``device``: wall clock on the CPU, events after an L2 flush on CUDA."""

    def __init__(self, device: torch.device):
        self.device = device
        if device.type == "cuda":
            self._flush = torch.empty(_FLUSH_BYTES, dtype=torch.uint8, device=device)
            self._start = torch.cuda.Event(enable_timing=True)
            self._end = torch.cuda.Event(enable_timing=True)

    def __call__(self, fn: Callable[[], object]) -> float:
        """Seconds taken by ``fn()``."""
        if self.device.type == "cuda":
            self._flush.zero_()
            self._start.record()
            fn()
            self._end.record()
            self._end.synchronize()
            return self._start.elapsed_time(self._end) / 1e3
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0


def time_calls(fn: Callable[[], object], clock: Clock, *, target_s: float = 1.0, min_reps: int = 3,
               max_reps: int = 50, warmup_s: float = 0.25, slow_s: float = 5.0) -> Dict[str, float]:
    """Warm up, then time ``fn`` repeatedly; returns milliseconds (median, min, max) and counts.

    The first call pays for compilation, autotuning and lazy initialisation and is never part of
    the result. Warm-up continues until ``warmup_s`` has been spent; then
    ``clamp(target_s / t, min_reps, max_reps)`` calls are timed one by one. A call slower than
    ``slow_s`` is timed once after its warm-up call (a long call averages its own noise).
    """
    first = clock(fn)
    if first >= slow_s:
        times = [clock(fn)]
    else:
        spent, last, warm = first, first, 0
        while spent < warmup_s and warm < 50:
            last = clock(fn)
            spent += last
            warm += 1
        reps = int(min(max_reps, max(min_reps, math.ceil(target_s / max(last, 1e-9)))))
        times = [clock(fn) for _ in range(reps)]
    return {
        "median_ms": statistics.median(times) * 1e3,
        "min_ms": min(times) * 1e3,
        "max_ms": max(times) * 1e3,
        "reps": len(times),
        "first_ms": first * 1e3,
    }


# --- memory --------------------------------------------------------------------------------

def _libc():
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


_LIBC = _libc()


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * _PAGE


def _hwm_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def cpu_peak_supported() -> Optional[str]:
    """``None`` if CPU peak-RSS growth can be measured here, else why not."""
    if not os.path.exists("/proc/self/statm"):
        return "no /proc (not Linux)"
    if not _reset_hwm():
        return "cannot reset the peak-RSS mark (/proc/self/clear_refs)"
    return None


def peak_growth(fn: Callable[[], object], device: torch.device):
    """Run ``fn()`` once; return ``(peak bytes above the state before the call, fn's result)``."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        out = fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - base, out
    if _LIBC is not None:
        _LIBC.malloc_trim(0)
    if not _reset_hwm():
        raise RuntimeError(cpu_peak_supported() or "cannot reset the peak-RSS mark")
    base = _rss_bytes()
    out = fn()
    return max(0, _hwm_bytes() - base), out


def address_space_bytes() -> int:
    """Current virtual size of this process (what RLIMIT_AS limits)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[0]) * _PAGE
