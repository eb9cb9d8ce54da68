"""Start gloo worker processes for the distributed tests and wait for all of them."""

import os
import subprocess
import sys
import time


def run_ranks(script: str, world: int, args, env_extra: dict, timeout_s: float, required_files) -> None:
    """Run ``python script <rank> <world> *args`` for every rank, killing every rank once
    ``timeout_s`` has passed; raise with each rank's output tail if any failed or a file in
    ``required_files`` is missing."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "FASTCL_BACKEND": "torch", **env_extra}
    if os.path.isdir("/sys/class/net/lo"):
        env.setdefault("GLOO_SOCKET_IFNAME", "lo")
    procs = [subprocess.Popen([sys.executable, os.path.abspath(script), str(r), str(world), *map(str, args)],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
             for r in range(world)]
    deadline = time.monotonic() + timeout_s
    logs = []
    for p in procs:
        try:
            out, _ = p.communicate(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            for q in procs:
                if q.poll() is None:
                    q.kill()
            out, _ = p.communicate()
        logs.append(out.decode(errors="replace"))
    if any(p.returncode for p in procs) or not all(os.path.exists(x) for x in required_files):
        tails = "\n".join(f"--- rank {r} (exit {p.returncode}) ---\n{log[-3000:]}"
                          for r, (p, log) in enumerate(zip(procs, logs)))
        raise RuntimeError(f"gloo workers for W={world} failed:\n{tails}")


def leave() -> None:
    """End a rank once its report is written: every rank meets once more, then exits at once.
    gloo's teardown at interpreter exit sometimes aborts a rank ("terminate called without an
    active exception", seen in a few W=4 runs) after all its work is done; exiting
    without the teardown keeps that noise out of the results."""
    import torch.distributed as dist

    dist.barrier()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
