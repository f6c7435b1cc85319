"""Compile every Triton kernel of this backend for a GPU target, without a GPU, and report its resources.

    python -m fastrnn.backends.triton.compile_check [--arch 80 90] [--dtype fp16 bf16 fp32 fp64]

The six ops' launchers run on CPU meta-sized tensors with every kernel replaced by a recorder, so the
kernels are compiled with exactly the arguments and constexprs the launchers choose (step and persistent
paths, with and without proj_size). triton.compile then lowers each to PTX and a cubin with triton's own
ptxas for the given compute capability, and cuobjdump reports registers, spills and shared memory.
This is what "the kernels compile for sm_80/sm_90" means here; nothing is run. It needs triton's
interpreter off (the interpreter replaces @triton.jit functions with Python ones).
"""

import argparse
import os
import re
import subprocess
import tempfile
import time

import torch
import triton
from triton.backends.compiler import GPUTarget

from . import gru, lstm, rnn
from . import recurrence as rec

_TYPES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32", torch.float64: "fp64",
          torch.int64: "i64", torch.int32: "i32"}
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32, "fp64": torch.float64}
_KERNEL_MODULES = (lstm, gru, rnn)


class _Recorder:
    """Stands in for a @triton.jit kernel: kernel[grid](*args, **meta) records instead of launching."""

    def __init__(self, fn, log):
        self.fn, self.log = fn, log

    def __getitem__(self, grid):
        def record(*args, **meta):
            self.log.append((self.fn, args, meta))
        return record


_LAUNCH_OPTIONS = ("num_warps", "num_stages")


def _signature(fn, args, meta):
    sig, constexprs = {}, {}
    values = dict(zip(fn.arg_names, args))
    values.update({k: v for k, v in meta.items() if k not in _LAUNCH_OPTIONS})
    for p in fn.params:
        v = values[p.name]
        if p.is_constexpr:
            sig[p.name] = "constexpr"
            constexprs[p.name] = v
        elif isinstance(v, torch.Tensor):
            sig[p.name] = "*" + _TYPES[v.dtype]
        elif isinstance(v, bool):
            sig[p.name] = "i1"
        elif isinstance(v, int):
            sig[p.name] = "i32"
        else:
            raise TypeError(f"{fn.__name__}: cannot type argument {p.name}={v!r}")
    return sig, constexprs


def _case_inputs(op, T, B, H, P, dtype, lengths):
    """Arguments of `op` on small CPU tensors (the kernels never run; only shapes and dtypes matter)."""
    Hout = P or H
    g = torch.Generator().manual_seed(0)

    def r(*shape):
        return torch.randn(*shape, generator=g).to(dtype)

    lens = torch.full((B,), T, dtype=torch.int64) if lengths else None
    if op == "lstm_fwd":
        return (r(T, B, 4 * H), r(4 * H, Hout), r(B, Hout), r(B, H), r(Hout, H) if P else None, lens, False, True)
    if op == "lstm_bwd":
        return (r(T, B, Hout), r(B, Hout), r(B, H), r(4 * H, Hout), r(B, H), r(Hout, H) if P else None,
                r(T, B, 4 * H), r(T, B, H), lens, False)
    if op == "gru_fwd":
        return (r(T, B, 3 * H), r(3 * H, H), r(3 * H), r(B, H), lens, False, True)
    if op == "gru_bwd":
        return (r(T, B, H), r(B, H), r(3 * H, H), r(T, B, H), r(B, H), r(T, B, 4 * H), lens, False)
    if op == "rnn_fwd":
        return (r(T, B, H), r(H, H), r(B, H), lens, False, False)
    return (r(T, B, H), r(B, H), r(H, H), r(T, B, H), lens, False, False)


OPS = ("lstm_fwd", "lstm_bwd", "gru_fwd", "gru_bwd", "rnn_fwd", "rnn_bwd")
GATES = {"lstm": 4, "gru": 3, "rnn": 1}


def cases(op, dtype):
    """(kind, B, H, proj) to compile for `op`: the step path at the fastrnns size (B=64, H=512), and the
    persistent path at the largest power-of-two H that rec.plan runs persistent in this dtype; LSTM with
    and without proj_size = H/2."""
    cell = op.split("_")[0]
    out = []
    for proj in (False, True) if cell == "lstm" else (False,):
        out.append(("step", 64, 512, 256 if proj else 0))
        fits = [h for h in (16, 32, 64, 128, 256)
                if rec.plan(64, h, h // 2 if proj else h, GATES[cell], proj, dtype).persistent]
        if fits:
            out.append(("persistent", 64, fits[-1], fits[-1] // 2 if proj else 0))
    return out


def record_launches(op, kind, B, H, P, dtype):
    """The distinct (kernel, args, meta) the launcher of `op` issues for these sizes."""
    log = []
    saved = {}
    for mod in _KERNEL_MODULES:
        for name, obj in vars(mod).items():
            if name.endswith("_kernel"):
                saved[(mod, name)] = obj
                setattr(mod, name, _Recorder(obj, log))
    devices = rec.devices
    rec.devices = lambda: ("cpu",)
    try:
        fn = {"lstm": lstm, "gru": gru, "rnn": rnn}[op.split("_")[0]]
        with rec.force_kernel(kind):
            getattr(fn, op)(*_case_inputs(op, 2, B, H, P, dtype, lengths=True))
    finally:
        rec.devices = devices
        for (mod, name), obj in saved.items():
            setattr(mod, name, obj)
    distinct = {}
    for kernel, args, meta in log:
        sig, constexprs = _signature(kernel, args, meta)
        options = {k: meta[k] for k in _LAUNCH_OPTIONS if k in meta}
        key = (kernel.__name__, tuple(sorted(sig.items())), repr(sorted(constexprs.items())), repr(options))
        distinct[key] = (kernel, sig, constexprs, options)
    return list(distinct.values())


def _resources(cubin):
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True, check=True).stdout
    m = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", out)
    return dict(zip(("regs", "stack", "shared", "local"), map(int, m.groups()))) if m else {}


def compile_kernel(kernel, sig, constexprs, options, arch):
    src = triton.compiler.ASTSource(fn=kernel, signature=sig, constexprs=constexprs)
    t0 = time.perf_counter()
    compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)
    info = dict(seconds=time.perf_counter() - t0, smem=compiled.metadata.shared,
                num_warps=compiled.metadata.num_warps)
    info.update(_resources(compiled.asm["cubin"]))
    return info


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", type=int, nargs="+", default=[80, 90])
    ap.add_argument("--dtype", nargs="+", default=["fp16", "bf16", "fp32", "fp64"], choices=list(DTYPES))
    ap.add_argument("--ops", nargs="+", default=None, help="only these ops (default: all six)")
    args = ap.parse_args(argv)
    if rec.interpreting():
        raise SystemExit("compile_check needs triton's interpreter off (it compiles real kernels)")
    print("kernel,op,path,B,H,proj,dtype,arch,regs,local_bytes,stack_bytes,smem_bytes,warps,seconds")
    failures = 0
    for op in args.ops or OPS:
        for dname in args.dtype:
            for kind, B, H, P in cases(op, DTYPES[dname]):
                failures += compile_op(op, kind, B, H, P, dname, args.arch)
    if failures:
        raise SystemExit(f"{failures} kernel compilations failed")


def compile_op(op, kind, B, H, P, dname, archs):
    """Compiles and reports every kernel of one launcher call; returns the number of failures."""
    failures = 0
    for kernel, sig, constexprs, options in record_launches(op, kind, B, H, P, DTYPES[dname]):
        step = [p for p in kernel.params if p.name == "s"]
        if step and not step[0].do_not_specialize:
            failures += 1
            print(f"{kernel.__name__}: the step index s must be do_not_specialize (one binary for all steps)",
                  flush=True)
        for arch in archs:
            row = f"{kernel.__name__},{op},{kind},{B},{H},{P},{dname},sm_{arch}"
            try:
                r = compile_kernel(kernel, sig, constexprs, options, arch)
            except Exception as e:  # report every failing kernel, then fail at the end
                failures += 1
                print(f"{row},FAILED: {type(e).__name__}: {(str(e).splitlines() or [''])[0]}", flush=True)
                continue
            print(f"{row},{r.get('regs')},{r.get('local')},{r.get('stack')},{r['smem']},{r['num_warps']},"
                  f"{r['seconds']:.1f}", flush=True)
    return failures


if __name__ == "__main__":
    main()
