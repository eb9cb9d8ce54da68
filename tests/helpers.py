"""Comparison of a fastcl call with the float64 oracle, for the loss and every gradient."""

import torch

# Relative tolerance (against the largest magnitude of the reference) per input dtype. The
# backends accumulate in fp32 (fp64 for fp64 inputs); bf16/fp16 gradients are rounded to the
# input dtype on the way out.
RTOL = {torch.float64: 1e-10, torch.float32: 2e-5, torch.bfloat16: 1.6e-2, torch.float16: 2e-3}
LOSS_RTOL = {torch.float64: 1e-10, torch.float32: 2e-5, torch.bfloat16: 2e-5, torch.float16: 2e-5}


def leaf(t: torch.Tensor, dtype=None, grad=True) -> torch.Tensor:
    t = t.detach().to(dtype or t.dtype).clone()
    return t.requires_grad_(grad)


def _flatten(out):
    return torch.cat([o.reshape(-1) for o in out]) if isinstance(out, tuple) else out.reshape(-1)


def assert_close(name, got, want, rtol, floor=1e-2):
    """max |got - want| <= rtol * max(max|want|, floor).

    ``floor`` is the magnitude below which errors are judged absolutely: 1 for losses and for
    scalar gradients (sums over all logits whose terms cancel, e.g. d(bias) of a softmax loss is
    exactly 0), 1e-2 for feature gradients.
    """
    got, want = got.detach().double(), want.detach().double()
    assert got.shape == want.shape, f"{name}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    assert torch.isfinite(got).all(), f"{name}: non-finite values {got}"
    scale = max(want.abs().max().item(), floor) if want.numel() else 1.0
    err = (got - want).abs().max().item() if want.numel() else 0.0
    assert err <= rtol * scale + 1e-12, f"{name}: max |err| {err:.3e} > {rtol:.1e} x {scale:.3e}"


def check_against_oracle(fast, oracle, inputs: dict, dtype: torch.dtype, differentiable=None, loss_rtol=None,
                         grad_floor=1e-2):
    """Run ``fast(**inputs_in_dtype)`` and ``oracle(**inputs_in_fp64)`` and compare the loss and the
    gradient of every floating input listed in ``differentiable`` (default: all floating ones).

    Feature tensors are cast to ``dtype`` first and the oracle gets those same (rounded) values.
    ``loss_rtol`` loosens the loss check where the op itself rounds an intermediate to ``dtype``
    (normalisation inside the op). ``grad_floor`` is the feature gradients' ``floor``: raise it
    where the exact gradient is 0 only through cancelling terms of a larger size.
    A random upstream gradient checks that the backward scales by it.
    """
    names = differentiable if differentiable is not None else [
        k for k, v in inputs.items() if isinstance(v, torch.Tensor) and v.dtype.is_floating_point]
    fast_in, ref_in = {}, {}
    for k, v in inputs.items():
        if isinstance(v, torch.Tensor) and v.dtype.is_floating_point:
            rounded = v.detach().to(dtype if v.dim() >= 2 else v.dtype)
            fast_in[k] = leaf(rounded, grad=k in names)
            ref_in[k] = leaf(rounded, torch.float64, grad=k in names)
        else:
            fast_in[k] = ref_in[k] = v
    got = fast(**fast_in)
    want = oracle(**ref_in)
    out_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    for g in (got if isinstance(got, tuple) else (got,)):
        assert g.dtype == out_dtype, f"loss dtype {g.dtype}, expected {out_dtype}"
    got_flat, want_flat = _flatten(got), _flatten(want)
    assert_close("loss", got_flat, want_flat, loss_rtol or LOSS_RTOL[dtype], floor=1.0)
    if not names:
        return
    upstream = torch.rand(want_flat.shape, dtype=torch.float64, device=want_flat.device) + 0.5
    (got_flat * upstream.to(got_flat.dtype)).sum().backward()
    (want_flat * upstream).sum().backward()
    for k in names:
        g_fast, g_ref = fast_in[k].grad, ref_in[k].grad
        assert g_fast is not None, f"no gradient for {k}"
        assert g_fast.dtype == fast_in[k].dtype, f"grad of {k} has dtype {g_fast.dtype}"
        if fast_in[k].dim() >= 2:
            assert_close(f"d{k}", g_fast, g_ref, RTOL[dtype], floor=grad_floor)
        else:
            assert_close(f"d{k}", g_fast, g_ref, max(RTOL[dtype], LOSS_RTOL[dtype]), floor=1.0)


class InsideOperators(torch.utils._python_dispatch.TorchDispatchMode):
    """A dispatch mode that also sees the tensors fastcl's custom operators create inside: their
    Python implementations (``fastcl.ops.library.IMPLEMENTATIONS``) run under the mode instead of
    as one opaque call. Subclasses override :meth:`seen` (called with every op's output)."""

    def seen(self, func, out) -> None:
        raise NotImplementedError

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        from fastcl.ops.library import IMPLEMENTATIONS

        impl = IMPLEMENTATIONS.get(func._schema.name) if func.namespace == "fastcl" else None
        if impl is not None:
            with self:
                out = impl(*args, **(kwargs or {}))
        else:
            out = func(*args, **(kwargs or {}))
        self.seen(func, out)
        return out
