"""torch.compile: every public loss traces into one graph (``fullgraph=True``) through the custom
operators of ``fastcl.ops.library``, forward and backward, and equals eager; dynamic shapes do
not recompile per batch size; ``torch.library.opcheck`` passes for every operator; a compiled
training step follows the eager one."""

import os

import pytest
import torch
import torch.nn.functional as F
from torch._dynamo.testing import CompileCounterWithBackend

import fastcl
from fastcl.ops import library

DEVICE = os.environ.get("FASTCL_TEST_DEVICE", "cpu")


def _unit(n, d=12, dtype=torch.float32):
    return F.normalize(torch.randn(n, d, device=DEVICE, dtype=torch.float64), dim=1).to(dtype)


def _scalar(value):
    return torch.tensor(value, device=DEVICE, requires_grad=True)


# name -> (loss(x, y, extras), extras builder(n)): the six losses with their common options
CASES = {
    "info_nce": (lambda x, y, e: fastcl.info_nce(x, y, temperature=e["t"]), lambda n: {"t": _scalar(0.2)}),
    "info_nce_labels_queue": (
        lambda x, y, e: fastcl.info_nce(x, y, labels=e["labels"], negatives=e["queue"], temperature=0.1),
        lambda n: {"labels": torch.arange(n, device=DEVICE) % 3, "queue": _unit(5)}),
    "info_nce_rows_temperature_symmetric": (
        lambda x, y, e: fastcl.info_nce(x, y, temperature=e["t"], symmetric=True),
        lambda n: {"t": (torch.rand(n, device=DEVICE) * 0.2 + 0.1).requires_grad_()}),
    "info_nce_hard_negatives_exclude_self": (
        lambda x, y, e: fastcl.info_nce(x, y, positive_index=e["pos"], exclude_self=True, decoupled=True),
        lambda n: {"pos": (torch.arange(n, device=DEVICE) + 1) % n}),
    "info_nce_debias_hardness": (lambda x, y, e: fastcl.info_nce(x, y, debias=0.1, hardness=0.5), lambda n: {}),
    "info_nce_false_negative_margin": (lambda x, y, e: fastcl.info_nce(x, y, false_negative_margin=0.0),
                                       lambda n: {}),
    "info_nce_guide_mask_queue": (
        lambda x, y, e: fastcl.info_nce(x, y, negatives=e["queue"], guide_query=e["gq"], guide_key=e["gk"],
                                        guide_negatives=e["gn"], guide_margin=0.05),
        lambda n: {"queue": _unit(5), "gq": _unit(n, 4), "gk": _unit(n, 4), "gn": _unit(5, 4)}),
    "clip_loss_bias_smoothing": (
        lambda x, y, e: fastcl.clip_loss(x, y, e["scale"], e["bias"], label_smoothing=0.1),
        lambda n: {"scale": _scalar(10.0), "bias": _scalar(-1.0)}),
    "siglip_loss": (lambda x, y, e: fastcl.siglip_loss(x, y, e["scale"], e["bias"]),
                    lambda n: {"scale": _scalar(10.0), "bias": _scalar(-10.0)}),
    "siglip_loss_labels": (lambda x, y, e: fastcl.siglip_loss(x, y, 10.0, -5.0, labels=e["labels"]),
                           lambda n: {"labels": torch.arange(n, device=DEVICE) % 4}),
    "nt_xent": (lambda x, y, e: fastcl.nt_xent(x, y, temperature=0.3), lambda n: {}),
    "supcon": (lambda x, y, e: fastcl.supcon(torch.stack([x, y], dim=1), e["labels"]),
               lambda n: {"labels": torch.arange(n, device=DEVICE) % 5}),
    "dcl_weighted": (lambda x, y, e: fastcl.dcl(x, y, weight_sigma=0.5), lambda n: {}),
    "info_nce_matryoshka_labels_queue": (
        lambda x, y, e: fastcl.info_nce(x, y, labels=e["labels"], negatives=e["queue"], temperature=e["t"],
                                        matryoshka_dims=[3, 12, 7], matryoshka_weights=[0.5, 1.0, 2.0]),
        lambda n: {"labels": torch.arange(n, device=DEVICE) % 3, "queue": _unit(5), "t": _scalar(0.2)}),
    "distill_clip_loss": (
        lambda x, y, e: sum(fastcl.distill_clip_loss(x, y, e["scale"], e["tx"], e["ty"], e["t_scale"])),
        lambda n: {"scale": _scalar(10.0), "tx": _unit(n, 7).requires_grad_(), "ty": _unit(n, 7).requires_grad_(),
                   "t_scale": _scalar(15.0)}),
    "clip_loss_matryoshka": (
        lambda x, y, e: fastcl.clip_loss(x, y, e["scale"], matryoshka_dims=[12, 4]),
        lambda n: {"scale": _scalar(10.0)}),
}


def _leaves(n, extras_of):
    x = _unit(n).requires_grad_()
    y = _unit(n).requires_grad_()
    return x, y, extras_of(n)


def _grads(loss, x, y, extras):
    tensors = [x, y] + [v for v in extras.values() if isinstance(v, torch.Tensor) and v.requires_grad]
    return torch.autograd.grad(loss, tensors)


@pytest.mark.parametrize("name", sorted(CASES))
def test_fullgraph_compile_equals_eager(name):
    fn, extras_of = CASES[name]
    x, y, extras = _leaves(19, extras_of)
    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(fn, fullgraph=True, backend=counter)
    got = compiled(x, y, extras)
    want = fn(x, y, extras)
    assert counter.frame_count == 1, "the loss must trace as one graph"
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    for g, w in zip(_grads(got, x, y, extras), _grads(want, x, y, extras)):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["info_nce_labels_queue", "clip_loss_bias_smoothing", "siglip_loss", "nt_xent",
                                  "clip_loss_matryoshka"])
def test_dynamic_batch_size_compiles_once(name):
    fn, extras_of = CASES[name]
    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(fn, fullgraph=True, dynamic=True, backend=counter)
    first = None
    for n in (16, 23, 40):
        x, y, extras = _leaves(n, extras_of)
        got = compiled(x, y, extras)
        torch.testing.assert_close(got, fn(x, y, extras), rtol=1e-6, atol=1e-6)
        got.backward()
        first = counter.frame_count if first is None else first
    assert counter.frame_count == first, f"recompiled for new batch sizes: {counter.frame_count} compiles after {first}"


def test_inductor_compiles_a_loss():
    """The default backend (Inductor) around the operators: same value and gradient."""
    fn, extras_of = CASES["clip_loss_bias_smoothing"]
    x, y, extras = _leaves(17, extras_of)
    torch._dynamo.reset()
    got = torch.compile(fn, fullgraph=True)(x, y, extras)
    want = fn(x, y, extras)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    for g, w in zip(_grads(got, x, y, extras), _grads(want, x, y, extras)):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)


def _opcheck_samples():
    n, d = 7, 5
    q, k = _unit(n, d), _unit(n + 2, d)
    s = torch.full((n,), 5.0, device=DEVICE)
    pos = torch.randperm(n + 2, device=DEVICE)[:n]
    labels = torch.arange(n, device=DEVICE) % 3
    col_labels = torch.arange(n + 2, device=DEVICE) % 3
    fn_row = torch.full((n,), 2.0, device=DEVICE)
    fn_col = torch.full((n + 2,), 2.5, device=DEVICE)

    def grads(*ts):
        return [t.clone().requires_grad_() for t in ts]

    yield "stats_symmetric_margin", library.softmax_stats_op, (
        *grads(q, k, s), pos, None, None, None, fn_row, fn_col, None, None, False, False, True, -1, "torch")
    yield "stats_labels_decoupled", library.softmax_stats_op, (
        *grads(q, k, s), None, labels, col_labels, None, None, None, None, None, False, True, False, -1, "torch")
    yield "stats_guide_mask", library.softmax_stats_op, (
        *grads(q, k, s), pos, None, None, None, fn_row * 0.1, None, _unit(n, 3), _unit(n + 2, 3), False, False, False, -1,
        "torch")
    lse = torch.randn(n, device=DEVICE) + 3
    yield "grad", library.softmax_grad_op, (
        q, k, s, lse, torch.rand(n, device=DEVICE), torch.rand(n, device=DEVICE), torch.randn(n + 2, device=DEVICE) + 3,
        torch.rand(n + 2, device=DEVICE), pos, None, None, None, None, None, None, None, False, False, True, n, "torch",
        True, True)
    dims = [2, 5]
    rows, cols = torch.rand(2, n, device=DEVICE) + 0.5, torch.rand(2, n + 2, device=DEVICE) + 0.5
    yield "prefix_stats_symmetric", library.prefix_stats_op, (
        *grads(q, k, rows, cols), dims, torch.float32, pos, None, None, None, None, None, None, None, False, False, True,
        -1, "torch")
    yield "prefix_stats_labels_exclude_self", library.prefix_stats_op, (
        *grads(q, k, rows, cols), dims, torch.float32, None, labels, col_labels, None, None, None, None, None, True,
        True, False, -1, "torch")
    yield "prefix_grad", library.prefix_grad_op, (
        q, k, rows, cols, dims, torch.float32, torch.randn(2, n, device=DEVICE) + 3, torch.rand(2, n, device=DEVICE),
        torch.rand(2, n, device=DEVICE), torch.randn(2, n + 2, device=DEVICE) + 3, torch.rand(2, n + 2, device=DEVICE),
        pos, None, None, None, None, None, None, None, False, False, True, n, "torch", True, True)
    from fastcl.ops import distill

    tq, tk = _unit(n, 3), _unit(n, 3)
    arange = torch.arange(n, device=DEVICE)
    for symmetric in (True, False):
        yield f"distill_stats_{'symmetric' if symmetric else 'rows'}", distill.distill_stats_op, (
            *grads(q, k[:n], s, tq, tk, s * 0.5), arange, symmetric, "torch")
    vec = [torch.rand(n, device=DEVICE) for _ in range(12)]
    yield "distill_grad", distill.distill_grad_op, (
        q, k[:n], s, tq, tk, s, arange, *(v + 3 for v in vec[:4]), *vec[4:11], "torch", True, True)
    x, y = _unit(n, d), _unit(n, d)
    yield "sigmoid", library.sigmoid_loss_op, (
        *grads(x, y), torch.tensor(5.0, device=DEVICE, requires_grad=True),
        torch.tensor(-2.0, device=DEVICE, requires_grad=True), torch.arange(n, device=DEVICE), None, None, n,
        [True, True, True, True], "torch")


@pytest.mark.parametrize("sample", list(_opcheck_samples()), ids=lambda s: s[0] if isinstance(s, tuple) else None)
def test_opcheck(sample):
    """Schema, fake (meta) implementation, autograd registration and AOT dispatch of each
    operator (``torch.library.opcheck``)."""
    _, op, args = sample
    torch.library.opcheck(op, args)


class _TwoTower(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.image = torch.nn.Sequential(torch.nn.Linear(10, 32), torch.nn.GELU(), torch.nn.Linear(32, 16))
        self.text = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.GELU(), torch.nn.Linear(32, 16))
        self.logit_scale = torch.nn.Parameter(torch.tensor(2.0))

    def forward(self, a, b):
        return F.normalize(self.image(a), dim=-1), F.normalize(self.text(b), dim=-1)


def _train(compiled: bool, steps: int = 5):
    torch.manual_seed(3)
    model = _TwoTower().to(DEVICE)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)

    def forward(a, b):
        img, txt = model(a, b)
        return fastcl.clip_loss(img, txt, model.logit_scale.exp())

    # the model and the loss in one graph; its backward is compiled by AOTAutograd
    run = torch.compile(forward, fullgraph=True) if compiled else forward
    losses = []
    gen = torch.Generator().manual_seed(11)
    for _ in range(steps):
        a = torch.randn(24, 10, generator=gen).to(DEVICE)
        b = torch.randn(24, 8, generator=gen).to(DEVICE)
        opt.zero_grad()
        loss = run(a, b)
        loss.backward()
        opt.step()
        losses.append(float(loss))
    return losses


def test_compiled_training_step_follows_eager():
    torch._dynamo.reset()
    eager, compiled = _train(False), _train(True)
    assert eager[0] != eager[-1], "the step must move the loss"
    torch.testing.assert_close(torch.tensor(compiled), torch.tensor(eager), rtol=1e-5, atol=1e-6)


def test_double_backward_raises_eager_and_compiled():
    """Eager: fastcl's own error at ``create_graph=True``; compiled: PyTorch's at the second
    backward (AOTAutograd does not support double backward). Never a silent wrong gradient."""
    fn, extras_of = CASES["info_nce"]
    x, y, extras = _leaves(9, extras_of)
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(fn(x, y, extras), x, create_graph=True)
    torch._dynamo.reset()
    loss = torch.compile(fn, fullgraph=True, backend="aot_eager")(x, y, extras)
    (g,) = torch.autograd.grad(loss, x, create_graph=True)
    with pytest.raises(RuntimeError, match="double backward"):
        g.sum().backward()


@pytest.mark.parametrize("loss", ["clip", "siglip", "info_nce_labels_queue"])
def test_fullgraph_compile_on_every_backend(loss, backend):
    """The operators run whichever backend is named (Triton's interpreter and the emulated CUDA
    kernels here), both gradient passes: the compiled loss equals the eager one."""
    n = 18
    x, y = _unit(n).requires_grad_(), _unit(n).requires_grad_()
    scale, bias = _scalar(8.0), _scalar(-2.0)
    labels, queue = torch.arange(n, device=DEVICE) % 4, _unit(6)
    fns = {
        "clip": lambda x, y: fastcl.clip_loss(x, y, scale, bias, backend=backend),
        "siglip": lambda x, y: fastcl.siglip_loss(x, y, scale, bias, backend=backend),
        "info_nce_labels_queue": lambda x, y: fastcl.info_nce(x, y, labels=labels, negatives=queue,
                                                              temperature=0.2, backend=backend),
    }
    fn = fns[loss]
    torch._dynamo.reset()
    got = torch.compile(fn, fullgraph=True, backend="aot_eager")(x, y)
    want = fn(x, y)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    leaves = [x, y, scale] + ([bias] if loss != "info_nce_labels_queue" else [])
    got_grads = torch.autograd.grad(got, leaves, allow_unused=True)
    want_grads = torch.autograd.grad(want, leaves, allow_unused=True)
    for g, w in zip(got_grads, want_grads):
        if w is None:
            assert g is None
            continue
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)
