"""Smoke test of an installed fastcl (run from outside the source tree): it imports from
site-packages, ships its Triton kernels, CUDA extension and CPU epilogues, and one loss and its gradients match
a materialised cross-entropy."""

import torch
import torch.nn.functional as F

import fastcl
import fastcl.triton_kernels.info_nce  # noqa: F401  (the kernels ship as fastcl.triton_kernels)

assert "site-packages" in fastcl.__file__, f"fastcl imported from {fastcl.__file__}, not the installed wheel"
info = fastcl.build_info()
assert info["cuda_extension"] and info["cpu_extension"], info
q = F.normalize(torch.randn(37, 24, dtype=torch.float64), dim=1).requires_grad_()
k = F.normalize(torch.randn(37, 24, dtype=torch.float64), dim=1).requires_grad_()
loss = fastcl.clip_loss(q, k, 14.0)
dq, dk = torch.autograd.grad(loss, (q, k))
logits = 14.0 * q @ k.T
target = torch.arange(37)
ref = (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2
rq, rk = torch.autograd.grad(ref, (q, k))
assert abs(float(loss - ref)) < 1e-10 and torch.allclose(dq, rq, atol=1e-10) and torch.allclose(dk, rk, atol=1e-10)
print(f"installed fastcl {info['version']} from {fastcl.__file__}: ok ({info})")
