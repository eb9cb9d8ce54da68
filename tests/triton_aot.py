"""Compile, ahead of time for sm_90 (Triton's bundled ptxas; no GPU needed), every Triton kernel
launch that ``fastcl.backends.triton`` makes for a spread of variants and dtypes, with the
launcher's own arguments and flags. Run by ``tests/test_triton.py`` in a process without
``TRITON_INTERPRET``; exit 0 when all compiled, 3 when this Triton has no ahead-of-time API.
Every half-precision config must compile without spills (stack 0) and, with 64 rows or more, to
wgmma (HGMMA); exit 4 lists those that do not. ``--report`` prints each compiled launch's
registers, stack bytes and HGMMA count."""

import os
import sys

import torch

import fastcl
from fastcl.backends import triton as tb

TRITON_TYPES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32", torch.float64: "fp64",
                torch.int64: "i64", torch.int32: "i32"}


def record_launches():
    """Run the losses with the launcher recording ``(kernel name, args, flags)`` instead of launching."""
    launches = []

    def record(self, name, grid, args, flags):
        launches.append((name, args, flags))

    tb._Launcher._launch = record
    tb._fixed_launch = lambda module, kernel, grid, args, flags: launches.append((kernel.fn.__name__, args, flags))
    tb.available = lambda device: None  # CPU tensors; the kernels never run
    tb._fixed_blocks = lambda: None  # the GPU's block choice

    def leaves(dtype, *shapes):
        return [torch.randn(*s, dtype=dtype).requires_grad_() for s in shapes]

    q, k = leaves(torch.bfloat16, (8, 64), (8, 64))
    fastcl.clip_loss(q, k, torch.tensor(10.0, requires_grad=True), torch.tensor(-1.0, requires_grad=True),
                     backend="triton").backward()
    q, k = leaves(torch.float16, (8, 48), (8, 48))
    fastcl.siglip_loss(q, k, 10.0, -10.0, backend="triton").backward()
    q, k, neg = leaves(torch.float64, (8, 32), (8, 32), (5, 32))
    fastcl.info_nce(q, k, negatives=neg.detach(), labels=torch.arange(8) % 3, backend="triton").backward()
    q, k = leaves(torch.float32, (8, 20), (12, 20))
    fastcl.info_nce(q, k, positive_index=torch.arange(8) + 2, exclude_self=True, decoupled=True,
                    temperature=torch.full((8,), 0.2, requires_grad=True), backend="triton").backward()
    q, k = leaves(torch.bfloat16, (8, 40), (8, 40))
    fastcl.info_nce(q, k, symmetric=True, debias=0.1, backend="triton").backward()
    # the widths that matter on a GPU: a whole 256-wide accumulator, and D split into 256-wide chunks
    q, k = leaves(torch.bfloat16, (8, 256), (8, 256))
    fastcl.siglip_loss(q, k, 10.0, -10.0, backend="triton").backward()
    q, k = leaves(torch.bfloat16, (8, 768), (8, 768))
    fastcl.clip_loss(q, k, torch.tensor(10.0, requires_grad=True), backend="triton").backward()
    # the false-negative mask at the resident width: two masks and two softmax terms per tile
    q, k = leaves(torch.bfloat16, (8, 256), (8, 256))
    fastcl.clip_loss(q, k, torch.tensor(10.0, requires_grad=True), false_negative_margin=0.1,
                     backend="triton").backward()
    # distillation: a student and a teacher of another width, both with gradients
    q, k, tq, tk = leaves(torch.bfloat16, (8, 256), (8, 256), (8, 384), (8, 384))
    sum(fastcl.distill_clip_loss(q, k, torch.tensor(10.0, requires_grad=True), tq, tk,
                                 torch.tensor(14.0, requires_grad=True), backend="triton")).backward()
    # the guide-model mask (GIST): a second, fp32 dot per tile for the mask's test
    q, k, neg = leaves(torch.bfloat16, (8, 256), (8, 256), (8, 256))
    fastcl.info_nce(q, k, negatives=neg, guide_query=torch.randn(8, 384), guide_key=torch.randn(8, 384),
                    guide_negatives=torch.randn(8, 384), guide_margin=0.05, backend="triton").backward()
    # Matryoshka prefixes in one sweep: a halving ladder in bf16 (and fp16's fp32 product), with labels
    q, k = leaves(torch.bfloat16, (8, 768), (8, 768))
    fastcl.clip_loss(q, k, torch.tensor(10.0, requires_grad=True), matryoshka_dims=[96, 192, 384, 768],
                     backend="triton").backward()
    q, k = leaves(torch.float16, (8, 256), (8, 256))
    fastcl.info_nce(q, k, labels=torch.arange(8) % 3, matryoshka_dims=[32, 64, 128, 256], backend="triton").backward()
    return launches


def record_all_launches():
    """The launches of both gradient passes (the chunked one writes ``G`` with its own kernel)."""
    launches = record_launches()
    os.environ["FASTCL_BACKWARD"] = "chunked"
    try:
        return launches + [launch for launch in record_launches() if launch[0] == "logit_grad_kernel"]
    finally:
        del os.environ["FASTCL_BACKWARD"]


def _variant(flags: dict) -> str:
    on = [k.lower() for k, v in flags.items() if v is True and k not in ("ACCUMULATE", "STORE_OUT")]
    return ",".join(on) + (f" x{flags['BLOCK_X']}" if "BLOCK_X" in flags else "")


def _config_name(config) -> str:
    kw = config.kwargs
    return f"{kw['BLOCK_A']}x{kw['BLOCK_B']}x{kw['BLOCK_D']} w{config.num_warps} s{config.num_stages}"


def _resources(cubin: bytes) -> dict:
    """``regs``, ``stack`` (bytes of local memory: spills) and ``hgmma`` (wgmma instructions) of
    one sm_90 cubin, read with the cuobjdump Triton ships (``{}`` if it has none)."""
    import glob
    import re
    import subprocess
    import tempfile

    import triton

    tool = glob.glob(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump"))
    if not tool:
        return {}
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        usage = subprocess.run([tool[0], "-res-usage", f.name], capture_output=True, text=True).stdout
        sass = subprocess.run([tool[0], "-sass", f.name], capture_output=True, text=True).stdout
    regs, stack = re.search(r"REG:(\d+)", usage), re.search(r"STACK:(\d+)", usage)
    if not (regs and stack):
        return {}
    return dict(regs=int(regs.group(1)), stack=int(stack.group(1)), hgmma=sass.count("HGMMA"))


HALF = (torch.bfloat16, torch.float16)


def main() -> int:
    report = "--report" in sys.argv[1:]
    try:
        import triton
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource
    except ImportError as exc:
        print(f"this Triton has no ahead-of-time compile API ({exc})")
        return 3
    module = tb._kernels()
    if tb._kernels_interpreted(module):
        print("TRITON_INTERPRET is set: the kernels were loaded for the interpreter")
        return 1
    target = GPUTarget("cuda", 90, 32)
    compiled, problems = set(), []
    fixed = {"distill_": tb._distill_kernels(), "prefix_": tb._prefix_kernels()}
    for name, args, flags in record_all_launches():
        owner = next((m for prefix, m in fixed.items() if name.startswith(prefix)), None)
        if owner is not None:  # fixed GPU blocks, no autotuning
            kernel = getattr(owner, name)
            blocks = {k: v for k, v in owner.GPU_BLOCKS.items() if k in kernel.arg_names}
            fitted = [triton.Config(blocks, num_warps=owner.GPU_WARPS, num_stages=3)]
            named = dict(zip(kernel.arg_names, args))
            dtype = named["a_ptr"].dtype
        else:
            kernel = getattr(module, name)
            configs = {"softmax_stats_kernel": module.STATS_CONFIGS, "grad_kernel": module.GRAD_CONFIGS,
                       "logit_grad_kernel": module.LOGIT_CONFIGS}[name]
            named = dict(zip(kernel.arg_names, args))
            dtype = named["a_ptr"].dtype
            fitted = module.fit_to_width(configs, named, **flags)
        # half precision is the GPU's main path: every config the autotuner may pick; else the first
        for config in fitted if dtype in HALF else fitted[:1]:
            constexprs = dict(flags, **config.kwargs)
            signature, attrs = {}, {}
            for i, arg_name in enumerate(kernel.arg_names):
                if arg_name in constexprs:
                    signature[arg_name] = "constexpr"
                elif isinstance(named[arg_name], torch.Tensor):
                    signature[arg_name] = "*" + TRITON_TYPES[named[arg_name].dtype]
                    attrs[(i,)] = [["tt.divisibility", 16]]
                else:
                    signature[arg_name] = "i32"
            key = (name, tuple(sorted(signature.items())), tuple(sorted((k, str(v)) for k, v in constexprs.items())),
                   config.num_warps, config.num_stages)
            if key in compiled:
                continue
            compiled.add(key)
            src = ASTSource(kernel, signature, constexprs=constexprs, attrs=attrs)
            binary = triton.compile(src, target=target, options={"num_warps": config.num_warps,
                                                                  "num_stages": config.num_stages})
            use = _resources(binary.asm["cubin"])
            line = (f"{name:<20} {str(dtype).replace('torch.', ''):<9} D={named['D']:<4} {_variant(flags):<40} "
                    f"{_config_name(config):<18} regs {use.get('regs', '?')} stack {use.get('stack', '?')} B "
                    f"HGMMA {use.get('hgmma', '?')}")
            if report:
                print(line)
            if use and dtype in HALF and (use["stack"] > 0 or (config.kwargs["BLOCK_A"] >= 64 and not use["hgmma"])):
                problems.append(line)
    if not any(k[0] == "logit_grad_kernel" for k in compiled):
        print("the chunked pass's logit_grad_kernel was not recorded")
        return 1
    if len(compiled) < 8:
        print(f"only {len(compiled)} distinct launches recorded: {sorted(k[0] for k in compiled)}")
        return 1
    print(f"compiled {len(compiled)} distinct launches for sm_90")
    if problems:
        print("half-precision configs that spill, or have >= 64 rows and no wgmma (HGMMA):")
        print("\n".join(problems))
        return 4
    return 0


if __name__ == "__main__":
    sys.exit(main())
