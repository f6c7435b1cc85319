"""Compile every Triton kernel of this backend for a GPU target, without a GPU, and report its resources.

    python -m fastrnn.backends.triton.compile_check [--arch 80 90] [--dtype fp16 bf16 fp32 tf32 fp64]
                                                    [--resets no yes]

The six ops' launchers run on CPU tensors of the real sizes with every kernel replaced by a recorder, at
each size class the plan can choose (step kernels with 16 or 32 batch rows, H a multiple of 16 or not;
the persistent kernels at the largest padded H the plan runs persistent, without a projection, with
proj_size <= 16 and with proj_size = H/2; fp32 with and without TF32). Each recorded launch is then
compiled the way triton's own launcher (JITFunction.run) would compile it on a GPU of the given compute
capability: the same binder types each argument (i32 or i64 from its value, i1, pointer dtypes), marks
what it specialises (16-byte aligned pointers, integers divisible by 16, integers equal to 1) and folds
the constexprs, so the binary is the one a launch runs. Triton's ptxas builds the cubin and cuobjdump
reports registers, spills and shared memory. Nothing runs; it needs triton's interpreter off (the
interpreter replaces @triton.jit functions with Python ones). Works with triton 3.6 and 3.9.
`--resets` picks the variants: without a reset mask (HAS_RESETS=False, the kernels as they were before
issue 15; the default) and with one (a [T, B] bool tensor); the CSV's `resets` column says which.
"""

import argparse
import contextlib
import os
import re
import subprocess
import tempfile
import time

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, make_backend
from triton.runtime.jit import create_function_from_signature

from . import gru, lstm, rnn
from . import recurrence as rec

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32, "tf32": torch.float32,
          "fp64": torch.float64}
_KERNEL_MODULES = (lstm, gru, rnn)
# The time steps of the recorded calls: T is an int argument, so its class matters as for every size
# (T = 100, the fastrnns default, is neither 1 nor a multiple of 16, like most sequence lengths).
T_CHECK = 100


class _Recorder:
    """Stands in for a @triton.jit kernel: kernel[grid](*args, **meta) records instead of launching."""

    def __init__(self, fn, log):
        self.fn, self.log = fn, log
        self.__name__ = fn.__name__

    def __getitem__(self, grid):
        def record(*args, **meta):
            self.log.append((self.fn, args, meta))
        return record


def _launch_kwargs(kernel, meta):
    """The keywords JITFunction.run adds to a launch's before binding (debug and the knobs it reads)."""
    kw = dict(meta)
    knobs = triton.knobs
    kw["debug"] = kw.get("debug", kernel.debug) or knobs.runtime.debug
    for name in ("instrumentation_mode", "fpsan_homomorphic_casts"):  # 3.6 reads the first, 3.9 both
        if hasattr(knobs.compilation, name):
            kw[name] = getattr(knobs.compilation, name)
    return kw


def launch_source(kernel, args, meta, target):
    """(ASTSource, options, attrs) of what kernel[grid](*args, **meta) compiles on `target`, through the
    binder and _pack_args of triton's launcher (as JITFunction.run and _do_compile do)."""
    backend = make_backend(target)
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    kwargs = _launch_kwargs(kernel, meta)
    bound, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound, specialization, options)
    return ASTSource(kernel, signature, constexprs, attrs), options, signature, attrs


def describe(signature, attrs, kernel):
    """'H:i32/16 T:i32 gx_ptr:*fp16/16 ...': each runtime argument's type and its divisibility hint."""
    names = [p.name for p in kernel.params]
    hinted = {names[path[0]] for path, kv in attrs.items() if any(k == "tt.divisibility" for k, _ in kv)}
    return " ".join(f"{n}:{t}{'/16' if n in hinted else ''}" for n, t in signature.items() if t != "constexpr")

def _case_inputs(op, T, B, H, P, dtype, lengths, resets=False):
    """Arguments of `op` on small CPU tensors (the kernels never run; only shapes and dtypes matter)."""
    Hout = P or H

    def r(*shape):
        return torch.empty(*shape, dtype=dtype)

    lens = torch.full((B,), T, dtype=torch.int64) if lengths else None
    rst = torch.zeros(T, B, dtype=torch.bool) if resets else None
    if op == "lstm_fwd":
        return (r(T, B, 4 * H), r(4 * H, Hout), r(B, Hout), r(B, H), r(Hout, H) if P else None, lens, rst, False,
                True)
    if op == "lstm_bwd":
        return (r(T, B, Hout), r(B, Hout), r(B, H), r(4 * H, Hout), r(B, H), r(Hout, H) if P else None,
                r(T, B, 4 * H), r(T, B, H), lens, rst, False)
    if op == "gru_fwd":
        return (r(T, B, 3 * H), r(3 * H, H), r(3 * H), r(B, H), lens, rst, False, True)
    if op == "gru_bwd":
        return (r(T, B, H), r(B, H), r(3 * H, H), r(T, B, H), r(B, H), r(T, B, 4 * H), lens, rst, False)
    if op == "rnn_fwd":
        return (r(T, B, H), r(H, H), r(B, H), lens, rst, False, False)
    return (r(T, B, H), r(B, H), r(H, H), r(T, B, H), lens, rst, False, False)


OPS = ("lstm_fwd", "lstm_bwd", "gru_fwd", "gru_bwd", "rnn_fwd", "rnn_bwd")
GATES = {"lstm": 4, "gru": 3, "rnn": 1}
SMALL_PROJ = 16  # proj_size <= 16 pads to OP = 16, which lets the plan run LSTM persistent up to H = 256


@contextlib.contextmanager
def matmul_precision(dname):
    """fp32 as the plan sees it: 'tf32' under set_float32_matmul_precision('high'), 'fp32' under 'highest'."""
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high" if dname == "tf32" else "highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(before)


def cases(op, dname):
    """(kind, B, H, proj) to compile for `op` in dtype `dname`: every size class the plan chooses.

    Step path: B=64 at H=512 (BB = 32 in fp16/bf16/tf32, 16 in fp32/fp64; B and H multiples of 16) and
    B=5 at H=500 (BB = 16; B and H not multiples of 16), LSTM also with proj_size = H/2. Persistent path:
    for each projection class (none; proj_size <= 16; proj_size = H/2) the largest power-of-two H that
    the plan runs persistent (the most registers and shared memory of that class), at H = HP and at an H
    that is not a multiple of 16 (HP*3/4 + 1, the hint-less variant: H = 37 is such a size)."""
    cell = op.split("_")[0]
    dtype = DTYPES[dname]
    out = []
    projs = (None, "small", "half") if cell == "lstm" else (None,)
    with matmul_precision(dname):
        for proj in projs:
            if proj != "small":
                for B, H in ((64, 512), (5, 500)):
                    out.append(("step", B, H, H // 2 if proj else 0))
            fits = [h for h in (16, 32, 64, 128, 256, 512)
                    if rec.plan(64, h, _proj_size(proj, h) or h, GATES[cell], proj is not None, dtype).persistent]
            if fits:
                hp = fits[-1]
                for H in (hp, hp * 3 // 4 + 1):
                    out.append(("persistent", 64, H, _proj_size(proj, H)))
    return out


def _proj_size(proj, H):
    return {None: 0, "small": min(SMALL_PROJ, H - 1), "half": H // 2}[proj]


def record_launches(op, kind, B, H, P, dname, T=T_CHECK, resets=False):
    """The distinct (kernel, args, meta) the launcher of `op` issues for these sizes."""
    log = []
    saved = {}
    for mod in _KERNEL_MODULES:
        for name, obj in vars(mod).items():
            if name.endswith("_kernel"):
                saved[(mod, name)] = obj
                setattr(mod, name, _Recorder(obj, log))
    devices, shared = rec.devices, rec.compiled_shared_memory
    rec.devices = lambda: ("cpu",)
    rec.compiled_shared_memory = lambda *a: None  # Launch.fits: nothing compiled while recording
    try:
        fn = {"lstm": lstm, "gru": gru, "rnn": rnn}[op.split("_")[0]]
        with rec.force_kernel(kind), matmul_precision(dname):
            getattr(fn, op)(*_case_inputs(op, T, B, H, P, DTYPES[dname], lengths=True, resets=resets))
    finally:
        rec.devices, rec.compiled_shared_memory = devices, shared
        for (mod, name), obj in saved.items():
            setattr(mod, name, obj)
    distinct = {}
    for kernel, args, meta in log:
        # One entry per binary: the step index s (do_not_specialize) differs between launches, the rest not.
        values = [(type(a).__name__, getattr(a, "dtype", a)) for name, a in zip(kernel.arg_names, args) if name != "s"]
        distinct.setdefault((kernel.__name__, repr(values), repr(meta)), (kernel, args, meta))
    return list(distinct.values())


def _resources(cubin):
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True, check=True).stdout
    m = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", out)
    return dict(zip(("regs", "stack", "shared", "local"), map(int, m.groups()))) if m else {}


def compile_kernel(kernel, args, meta, arch):
    target = GPUTarget("cuda", arch, 32)
    src, options, signature, attrs = launch_source(kernel, args, meta, target)
    t0 = time.perf_counter()
    compiled = triton.compile(src, target=target, options=options.__dict__)
    info = dict(seconds=time.perf_counter() - t0, smem=compiled.metadata.shared,
                num_warps=compiled.metadata.num_warps, spec=describe(signature, attrs, kernel))
    info.update(_resources(compiled.asm["cubin"]))
    return info


HEADER = ("kernel,op,path,B,H,proj,dtype,resets,arch,regs,local_bytes,stack_bytes,smem_bytes,warps,seconds,triton,"
          "specialisation")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", type=int, nargs="+", default=[80, 90])
    ap.add_argument("--dtype", nargs="+", default=list(DTYPES), choices=list(DTYPES))
    ap.add_argument("--ops", nargs="+", default=None, help="only these ops (default: all six)")
    ap.add_argument("--path", choices=("step", "persistent"), default=None, help="only this kernel path")
    ap.add_argument("--resets", nargs="+", default=["no"], choices=("no", "yes"),
                    help="compile the kernels without a reset mask (HAS_RESETS=False), with one, or both")
    ap.add_argument("--case", nargs="+", default=None, metavar="OP:PATH:T:B:H:PROJ:DTYPE",
                    help="compile these launcher calls instead of the plan's size classes (e.g. "
                    "lstm_bwd:persistent:4:5:29:0:fp64, what a test forces)")
    args = ap.parse_args(argv)
    if rec.interpreting():
        raise SystemExit("compile_check needs triton's interpreter off (it compiles real kernels)")
    print(HEADER)
    failures = 0
    for resets in args.resets:
        for case in args.case or ():
            op, kind, T, B, H, P, dname = case.split(":")
            failures += compile_op(op, kind, int(B), int(H), int(P), dname, args.arch, T=int(T), resets=resets)
        for op in () if args.case else args.ops or OPS:
            for dname in args.dtype:
                for kind, B, H, P in cases(op, dname):
                    if args.path in (None, kind):
                        failures += compile_op(op, kind, B, H, P, dname, args.arch, resets=resets)
    if failures:
        raise SystemExit(f"{failures} kernel compilations failed")


def compile_op(op, kind, B, H, P, dname, archs, T=T_CHECK, resets="no"):
    """Compiles and reports every kernel of one launcher call (resets: "yes" with a reset mask, "no"
    without); returns the number of failures."""
    failures = 0
    for kernel, args, meta in record_launches(op, kind, B, H, P, dname, T, resets=resets == "yes"):
        step = [p for p in kernel.params if p.name == "s"]
        if step and not step[0].do_not_specialize:
            failures += 1
            print(f"{kernel.__name__}: the step index s must be do_not_specialize (one binary for all steps)",
                  flush=True)
        for arch in archs:
            row = f"{kernel.__name__},{op},{kind},{B},{H},{P},{dname},{resets},sm_{arch}"
            try:
                r = compile_kernel(kernel, args, meta, arch)
            except Exception as e:  # report every failing kernel, then fail at the end
                failures += 1
                print(f"{row},FAILED: {type(e).__name__}: {(str(e).splitlines() or [''])[0]}", flush=True)
                continue
            print(f"{row},{r.get('regs')},{r.get('local')},{r.get('stack')},{r['smem']},{r['num_warps']},"
                  f"{r['seconds']:.1f},{triton.__version__},{r['spec']}", flush=True)
    return failures


if __name__ == "__main__":
    main()
