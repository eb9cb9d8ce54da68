"""The torch backend's tile loop on CPU worker threads (fastcl/backends/_cpu_threads.py): the same
bits for any thread count, no change to the caller's or later threads' thread settings."""

import os
import signal
import threading
import time

import pytest
import torch

import fastcl
from fastcl.backends import _cpu_threads

CALLS = {
    "clip": lambda x, y, q: fastcl.clip_loss(x, y, logit_scale=torch.tensor(20.0), backend="torch"),
    "siglip": lambda x, y, q: fastcl.siglip_loss(x, y, logit_scale=torch.tensor(10.0), logit_bias=torch.tensor(-5.0),
                                                 backend="torch"),
    "queue": lambda x, y, q: fastcl.info_nce(x, y, negatives=q, temperature=0.1, backend="torch"),
    "labels": lambda x, y, q: fastcl.info_nce(x, y, labels=torch.arange(x.shape[0]) % 5, temperature=0.1,
                                              backend="torch"),
}


def _grads(call, threads):
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        g = torch.Generator().manual_seed(3)
        x, y = (torch.randn(53, 12, generator=g).requires_grad_() for _ in range(2))
        q = torch.randn(17, 12, generator=g).requires_grad_()
        loss = CALLS[call](x, y, q)
        loss.backward()
        return [loss.detach()] + [t.grad for t in (x, y, q) if t.grad is not None]
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("call", sorted(CALLS))
def test_same_bits_for_any_thread_count(call, monkeypatch):
    monkeypatch.setenv("FASTCL_TORCH_BLOCK", "5,7")  # 11 row blocks: several pieces per worker
    one, three = _grads(call, 1), _grads(call, 3)
    assert 3 in _cpu_threads._pools  # the pieces did go to worker threads
    for a, b in zip(one, three):
        assert torch.equal(a, b)
    assert len(one) >= 3


def test_thread_settings_untouched():
    torch.set_num_threads(2)
    _cpu_threads._pool(2)
    assert torch.get_num_threads() == 2
    seen = []
    t = threading.Thread(target=lambda: seen.append(torch.get_num_threads()))
    t.start()
    t.join()
    assert seen == [2]


def test_worker_error_reaches_the_caller():
    def job(i):
        if i == 2:
            raise RuntimeError("piece 2 failed")
        return i

    with pytest.raises(RuntimeError, match="piece 2 failed"):
        list(_cpu_threads.map_in_order(job, range(4), workers=2))


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_forked_child_computes(monkeypatch):
    """A forked child (a DataLoader worker) has none of the parent's worker threads."""
    monkeypatch.setenv("FASTCL_TORCH_BLOCK", "5,7")
    _grads("clip", 2)  # the parent now has a pool
    pid = os.fork()
    if pid == 0:  # child: compute, then leave without running the parent's pytest teardown
        ok = False
        try:
            ok = all(torch.isfinite(t).all() for t in _grads("clip", 2))
        finally:
            os._exit(0 if ok else 1)
    deadline = time.time() + 60
    while time.time() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            assert os.waitstatus_to_exitcode(status) == 0
            return
        time.sleep(0.1)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    pytest.fail("the forked child hung computing a loss")
