#!/usr/bin/env bash
# The one command a lent GPU machine runs (issue 13; ../shared/GPU.md): versions, the build, the GPU tests,
# the CUDA-graph tests, `python -m fastrnn check`, the GPU benchmark against torch.nn/cuDNN and a profile,
# everything written to OUTDIR. Each step has its own time limit, clipped to what is left of the budget
# (FASTRNN_GPU_BUDGET_S, default 540 s: the tool's 10 minutes less a margin), so one hang cannot eat the
# lease; steps keep going after a failure, and OUTDIR/summary.txt says what passed. Exit status 1 if any
# step failed.
#
#   bash scripts/gpu.sh OUTDIR            on the GPU machine (python3 there: torch 2.11 CUDA 13, triton 3.6)
#   bash scripts/gpu.sh --dry-run OUTDIR  the same logic on a CPU (CI): GPU steps skipped, the build, the
#                                         tests and the benchmark in quick CPU forms; under 3 minutes
#
# With the device tool: run(command="bash scripts/gpu.sh $OUT", timeout_s=600): the steps end within the
# 540 s budget (each killed at its limit plus 10 s), which leaves the rest of the call for the copy-back.
# OUTDIR holds at most 8 files (the device tool brings back 8): summary.txt, env.log, build.log, tests.log,
# check.log, bench.log (with the profile), bench/<device>.jsonl and bench/<device>-<run>.png.
#
# Time plan on an H200 machine (16 cores), cold build included, against the 9-minute budget:
#   env              nvidia-smi, versions                                       5 s
#   build            setup.py build_ext --inplace, sm_90 only, MAX_JOBS=cores  ~40 s, 90 planned (below)
#   error-messages   test_bad_inputs_raise alone (it segfaulted on the first lease) limit 30 s
#   cuda-graphs      capture/replay (both backends, both schemes) and two-GPU  limit 60 s
#   gpu-tests        pytest -m gpu: test_cuda's ops, the parity suite on CUDA
#                    tensors (cuda and triton backends), in parallel shards     limit 170 s
#   check            python -m fastrnn check (every backend vs torch.nn)        limit 45 s
#   bench            python -m fastrnn bench --quick on cuda (cuda, triton, auto):
#                    fastrnns default per cell in fp32 and bf16, LSTM at
#                    B = 1, 8 (fp32, bf16), the long bf16 LSTM                  limit 120 s
#   crossover        the bench's crossover set, cuda backend                    limit 90 s
#   memcheck,        compute-sanitizer over 8 of test_cuda.py's op tests, and
#   racecheck        the 4 persistent ones                                      limits 90 s, 60 s
#   triton-cuda      tests/test_triton.py on CUDA tensors, shards (triton
#                    compiles each kernel variant, ~1-3 s each, hundreds)      what is left, <= 90 s
#   profile          torch.profiler, one case per scheme                        what is left, <= 60 s
# Measured on the first lease (H200, 2026-12-04, 7986282): env 9 s, build 98, cuda-graphs 21, gpu-tests
# 160, check 26, bench 91 (then with the reference backend), triton-cuda 35, profile 29: 469 s. The budget
# clips the last steps first (triton-cuda, profile) if the crossover sweep and the sanitizer run long.
#
# Build estimate, from CPU seconds measured on this project's CPU machine (AMD EPYC Zen 5, 2026-12-02;
# CPU seconds, not wall time, because 4 engineers share its 2 cores):
#   nvcc 13.0, sm_90 only, the flags of test_cuda.py::test_nvcc_compiles, one file each: persistent_lstm.cu
#   10.4 s, persistent_rnn.cu 9.6 s, persistent_gru.cu 8.6 s, step.cu 3.6 s, persistent.cu 1.1 s (33 s);
#   the C++ files of a full `setup.py build_ext` (g++ -O3, MAX_JOBS=2): 78 s in all, csrc/cpu/lstm.cpp
#   about 26 s, gru.cpp 25 s, rnn.cpp 19 s, ops.cpp 8 s (shares of the ninja log); bindings.cpp (CUDA
#   builds only, not measurable on a CPU torch) guessed at 20 s, like ops.cpp's torch headers plus ATen.
# About 130 CPU seconds in 10 files; with 16 jobs the build lasts as long as its longest file (lstm.cpp,
# ~26 s) plus the link and setup.py's start: about 40 s on cores like these, 90 s planned, 240 s limit.
# Both archs (setup.py's default FASTRNN_CUDA_ARCHS="8.0;9.0") would double the nvcc part only.
set -uo pipefail

dry=0
if [ "${1:-}" = "--dry-run" ]; then
  dry=1
  shift
fi
if [ $# -ne 1 ]; then
  echo "usage: bash scripts/gpu.sh [--dry-run] OUTDIR" >&2
  exit 2
fi
mkdir -p "$1"
out=$(cd "$1" && pwd)
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
py=${PYTHON:-python3}
budget=${FASTRNN_GPU_BUDGET_S:-540}
cores=$(nproc)
start=$SECONDS
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
# The package never reads TRITON_INTERPRET; on the GPU machine the kernels are compiled for real, and the
# tests' conftest.py switches the interpreter on only where no CUDA device exists.
unset TRITON_INTERPRET
: > "$out/summary.txt"
failed=0
# One test that hangs (a kernel that never returns to Python is left to the shard's limit) fails alone.
per_test_timeout=""
if "$py" -c "import pytest_timeout" 2> /dev/null; then per_test_timeout="--timeout=100"; fi

record() {  # record STEP STATUS SECONDS [NOTE]
  printf '%-12s %-14s %5ss  %s\n' "$1" "$2" "$3" "${4:-}" | tee -a "$out/summary.txt"
  case "$2" in PASS | SKIPPED*) ;; *) failed=1 ;; esac
}

limit_for() {  # limit_for WANTED_S: the step's limit, clipped to what is left of the budget (0: none left)
  local left=$((budget - (SECONDS - start)))
  if ((left < 15)); then echo 0; elif (($1 < left)); then echo "$1"; else echo "$left"; fi
}

status_of() {  # status_of RC: PASS, TIMEOUT or FAIL(rc=N); pytest's 5 (no test selected) counts as PASS
  case "$1" in 0 | 5) echo PASS ;; 124 | 137) echo TIMEOUT ;; *) echo "FAIL(rc=$1)" ;; esac
}

step() {  # step NAME WANTED_S LOG CMD...: CMD under its own time limit, output appended to LOG
  local name=$1 limit log=$3 t0=$SECONDS rc
  limit=$(limit_for "$2")
  shift 3
  if ((limit == 0)); then
    record "$name" "SKIPPED" 0 "the budget of ${budget}s is spent"
    return
  fi
  echo "=== $name (limit ${limit}s): $*" >> "$log"
  timeout --kill-after=10 "$limit" "$@" >> "$log" 2>&1
  rc=$?
  record "$name" "$(status_of $rc)" $((SECONDS - t0)) "$(basename "$log")"
}

pytest_shards() {  # pytest_shards NAME WANTED_S SHARDS PYTEST_ARGS...: SHARDS pytest processes at once
  # (tests/conftest.py's FASTRNN_TEST_SHARD=i/n keeps every n-th test), so triton's compiles use the cores
  local name=$1 limit shards=$3 t0=$SECONDS i rc worst=0 log=$out/tests.log
  limit=$(limit_for "$2")
  shift 3
  if ((limit == 0)); then
    record "$name" "SKIPPED" 0 "the budget of ${budget}s is spent"
    return
  fi
  echo "=== $name (limit ${limit}s, $shards shards): pytest $*" >> "$log"
  local pids=()
  for ((i = 0; i < shards; i++)); do
    # -v names each test as it starts, so the log of a shard killed at its limit ends with the one that hung;
    # FASTRNN_TEST_FAILURE_LOG (tests/conftest.py) keeps each failure's details, which pytest prints last.
    FASTRNN_TEST_SHARD="$i/$shards" FASTRNN_TEST_FAILURE_LOG="$scratch/$name.$i.failures" \
      timeout --kill-after=10 "$limit" "$py" -m pytest "$@" -v -rfEs --tb=short $per_test_timeout \
      --benchmark-disable -p no:cacheprovider > "$scratch/$name.$i.log" 2>&1 &
    pids+=($!)
  done
  for i in "${!pids[@]}"; do
    wait "${pids[$i]}"
    rc=$?
    echo "--- shard $i/$shards: exit $rc" >> "$log"
    cat "$scratch/$name.$i.log" >> "$log"
    if [ -s "$scratch/$name.$i.failures" ]; then
      echo "--- shard $i/$shards: failures as they happened" >> "$log"
      cat "$scratch/$name.$i.failures" >> "$log"
    fi
    if [ "$(status_of $rc)" != PASS ] && [ "$worst" = 0 ]; then worst=$rc; fi
  done
  local summary
  summary=$(grep -hE "^(=+ )?[0-9]+ (passed|failed|skipped|error|deselected)" "$scratch/$name".*.log | tr '\n' ';')
  record "$name" "$(status_of $worst)" $((SECONDS - t0)) "tests.log: ${summary:0:160}"
}

# ---- env -----------------------------------------------------------------------------------------------
env_rc=0
{
  date -u
  echo "commit $(git rev-parse HEAD 2>/dev/null || echo unknown)$(git diff --quiet 2>/dev/null || echo ' (with local changes)')"
  uname -a
  echo "cores: $cores"
  if [ $dry = 0 ]; then nvidia-smi || env_rc=$?; else echo "dry run: nvidia-smi skipped"; fi
  "$py" -c 'import sys, torch, numpy; print("python", sys.version.split()[0], "torch", torch.__version__, "CUDA", torch.version.cuda, "cuDNN", torch.backends.cudnn.version(), "numpy", numpy.__version__); print("devices:", [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())])' || env_rc=$?
  "$py" -c 'import triton; print("triton", triton.__version__)' || echo "triton: not importable"
  if command -v nvcc > /dev/null; then nvcc --version | tail -2; else echo "nvcc: not found"; fi
  # The host compiler the build takes and the libstdc++ it pairs with: on the first H200 lease an extension
  # built by /opt/gcc/bin/g++ segfaulted formatting an integer into an error message (docs/cuda.md).
  echo "CXX=${CXX:-} c++: $(command -v c++) g++: $(command -v g++)"
  "${CXX:-c++}" --version | head -1
  echo "its libstdc++: $("${CXX:-c++}" -print-file-name=libstdc++.so.6)"
  "$py" -c 'import torch; print("torch CXX11 ABI", torch._C._GLIBCXX_USE_CXX11_ABI)'
} > "$out/env.log" 2>&1
record env "$(status_of $env_rc)" $((SECONDS - start)) env.log

# ---- build ---------------------------------------------------------------------------------------------
if [ $dry = 0 ]; then
  # Only the GPU that is here (9.0 on an H100/H200): half the nvcc time of setup.py's "8.0;9.0". Only the
  # portable copy of the CPU kernels: setuptools builds the libraries one after another, and each AVX copy is
  # one translation unit of ~35-45 s that no core count shortens; nothing here times the CPU kernels, and
  # FASTRNN_CPU_CAPABILITY=default keeps the missing copies' warning away.
  arch=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -1)
  export FASTRNN_CPU_CAPABILITY=default
  # If the build fails, no step after it compiles the ops again on first use (minutes, in every process).
  export FASTRNN_EXTENSION=prebuilt
  step build 240 "$out/build.log" env FASTRNN_CUDA_ARCHS="${FASTRNN_CUDA_ARCHS:-${arch:-9.0}}" MAX_JOBS="$cores" \
    FASTRNN_CPU_CAPABILITIES=default "$py" setup.py build_ext --inplace
  step build-check 30 "$out/build.log" "$py" -c "
import torch, fastrnn._C
assert torch._C._dispatch_has_kernel_for_dispatch_key('fastrnn::lstm_fwd', 'CUDA'), 'fastrnn._C has no CUDA kernels'
print('fastrnn._C:', fastrnn._C.__file__, 'CUDA kernels registered')"
  { ldd fastrnn/_C*.so | grep -E 'stdc|gcc'
    # libstdc++'s own code defined inside _C.so (0 with the system g++ on the CPU machines): on the first lease
    # std::ostream::_M_insert<long> and codecvt members were, and formatting an integer there crashed.
    own=$(nm -D --defined-only fastrnn/_C*.so | grep -cE '_ZNSo9_M_insert|codecvt')
    echo "libstdc++ symbols defined in _C.so: $own"
  } >> "$out/build.log" 2>&1
  # An op's shape error in a process of its own: it segfaulted on the first lease, which took a shard down.
  step error-messages 30 "$out/tests.log" "$py" -m pytest tests/test_cuda.py -k bad_inputs_raise -v -p no:cacheprovider
else
  # Quick CPU form: CI's env.sh has just built the extension (pip's editable build, in a temporary build
  # directory, so building again here would recompile every file: minutes on 2 cores). So: what the GPU
  # build needs (setuptools, torch's cpp_extension, ninja for parallel jobs), and the same import check.
  step build 30 "$out/build.log" "$py" -c "
import shutil, setuptools, torch.utils.cpp_extension as ext
assert ext.is_ninja_available(), 'ninja is missing: the build would run one job at a time'
print('setuptools', setuptools.__version__, 'ninja', shutil.which('ninja'), 'CUDA_HOME', ext.CUDA_HOME)
print('the GPU run builds with: FASTRNN_CUDA_ARCHS=<compute_cap> MAX_JOBS=<cores> python3 setup.py build_ext --inplace')"
  step build-check 30 "$out/build.log" "$py" -c "
import torch, fastrnn._C
assert torch._C._dispatch_has_kernel_for_dispatch_key('fastrnn::lstm_fwd', 'CPU'), 'fastrnn._C has no CPU kernels'
print('fastrnn._C:', fastrnn._C.__file__, 'CPU kernels registered')"
fi

# ---- tests, check, bench -------------------------------------------------------------------------------
# Order by value per second of lease: the CUDA-graph and two-device tests (short), every gpu-marked test,
# the parity check, the benchmark, and last the Triton op tests on CUDA tensors (hundreds of kernel
# variants to compile), which the budget clips first.
if [ $dry = 0 ]; then
  shards=$(((cores + 1) / 2))
  pytest_shards cuda-graphs 60 4 tests/test_cuda.py tests/test_triton.py -m gpu -k "graph or tensors_device"
  # test_cuda's op tests, the parity suite's CUDA cases (cuda and triton backends), every other gpu test.
  pytest_shards gpu-tests 170 "$shards" tests -m "gpu and not slow" \
    -k "not graph and not tensors_device and not bad_inputs_raise"
  step check 45 "$out/check.log" "$py" -m fastrnn check --device cuda
  # The cuda quick set is the issue's GPU set: fp32 and bf16, B in 1/8/64, the fastrnns default size,
  # B=16 T=1024 H=768 bf16 (fastrnn/bench/cases.py).
  # Not the reference backend: it takes most of the step's time and nobody runs it for speed; auto's rows
  # record what it resolved to (torch.nn where it hands over).
  step bench 120 "$out/bench.log" "$py" -m fastrnn bench --quick --device cuda --backends cuda,triton,auto \
    --results "$out/bench"
  # Where auto hands over to cuDNN: B = 16-128, H = 256-1024, every cell (fastrnn/bench/cases.py).
  step crossover 90 "$out/bench.log" "$py" -m fastrnn bench --cases crossover --device cuda --backends cuda \
    --no-plot --no-memory --results "$out/bench"
  # compute-sanitizer on a few of the CUDA backend's op tests (T=7, B=5, H=37, lengths, reverse; every cell,
  # both schemes, fp32): out-of-bounds accesses (memcheck), and shared-memory races in the persistent kernels
  # (racecheck). Never run before; torch's own API probes are not errors here (--report-api-errors no).
  if command -v compute-sanitizer > /dev/null; then
    sanitize="compute-sanitizer --error-exitcode 1 --report-api-errors no --leak-check none"
    sel="test_ops_match_reference and float32 and T7-B5-H37"
    step memcheck 90 "$out/tests.log" $sanitize --tool memcheck "$py" -m pytest tests/test_cuda.py -k "$sel" -q \
      -p no:cacheprovider
    step racecheck 60 "$out/tests.log" $sanitize --tool racecheck "$py" -m pytest tests/test_cuda.py \
      -k "$sel and persistent" -q -p no:cacheprovider
  else
    record memcheck "SKIPPED" 0 "no compute-sanitizer on PATH"
  fi
  # test_triton.py's op tests follow the device: on CUDA tensors here (not the slow compile-only ones).
  pytest_shards triton-cuda 90 "$shards" tests/test_triton.py -m "not slow and not gpu"
else
  # Quick CPU forms: the GPU selections collect and skip with their reasons; a few interpreter tests of
  # issue 13's fixes run; the check on the CPU kernels; the benchmark's smoke set.
  pytest_shards cuda-graphs 60 1 tests/test_cuda.py tests/test_triton.py -m gpu -k "graph or tensors_device"
  pytest_shards gpu-tests 60 1 tests/test_cuda.py tests/test_triton.py -m "gpu and not slow" \
    -k "not graph and not tensors_device"
  step check 60 "$out/check.log" "$py" -m fastrnn check --device cpu --backends cpu
  step bench 60 "$out/bench.log" "$py" -m fastrnn bench --cases smoke --device cpu --backends cpu,reference \
    --results "$out/bench"
  pytest_shards triton-cuda 60 2 tests/test_triton.py -m "not slow and not gpu" \
    -k "clear_error or interpreter or lstm-T1-B2-H17"
fi

# ---- profile -------------------------------------------------------------------------------------------
# One case per scheme (the cuda backend's step and persistent schemes, triton's step and persistent
# kernels): the top kernels by CUDA time, forward + backward of an LSTM at T=100, B=8, H=256 (64 for
# triton's persistent kernels), fp32; first the cuda backend and cuDNN at B=64, I=H=512, with wall times.
# Not named profile.py: the script's directory comes first on sys.path, and cProfile (imported by torch on
# the way) would import the script as the standard library's `profile` module.
cat > "$scratch/profile_schemes.py" << 'PROFILE'
import contextlib, os, sys, time, torch, fastrnn
from torch.profiler import ProfilerActivity, profile
device = sys.argv[1]
acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
def run(backend, label, setup=contextlib.nullcontext, H=256, B=8, I=256):
    torch.manual_seed(0)
    m = (torch.nn.LSTM(I, H) if backend == "torch.nn" else fastrnn.LSTM(I, H, backend=backend)).to(device)
    if backend == "torch.nn" and device == "cuda":
        m.flatten_parameters()
    x = torch.randn(100, B, I, device=device, requires_grad=True)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    with setup():
        for _ in range(2):
            m(x)[0].sum().backward()
        walls = []  # without the profiler: host-bound if the wall time is far above the device time below
        for _ in range(5):
            sync(); t0 = time.perf_counter(); m(x)[0].sum().backward(); sync()
            walls.append(time.perf_counter() - t0)
        with profile(activities=acts) as prof:
            m(x)[0].sum().backward()
            sync()
    key = "cuda_time_total" if device == "cuda" else "cpu_time_total"
    print(f"--- {label}: B={B} I={I} H={H}, forward+backward wall {1e3 * sorted(walls)[2]:.3f} ms (median of 5)\n"
          + prof.key_averages().table(sort_by=key, row_limit=12))
def env(name, value):
    @contextlib.contextmanager
    def ctx():
        before = os.environ.get(name); os.environ[name] = value
        try: yield
        finally:
            if before is None: os.environ.pop(name)
            else: os.environ[name] = before
    return ctx
if device == "cuda":
    from fastrnn.backends.triton import force_kernel
    # Where the cuda backend lost to cuDNN on the first lease (the step scheme runs at B = 64): host or device?
    run("cuda", "cuda backend, its own choice", B=64, I=512, H=512)
    run("torch.nn", "torch.nn (cuDNN)", B=64, I=512, H=512)
    run("cuda", "cuda step scheme", env("FASTRNN_CUDA_SCHEME", "step"))
    run("cuda", "cuda persistent scheme", env("FASTRNN_CUDA_SCHEME", "persistent"))
    run("triton", "triton step kernels", lambda: force_kernel("step"))
    # triton's persistent LSTM holds W_hh in one block's shared memory: H=256 needs 1 MB, H=64 64 KiB
    run("triton", "triton persistent kernels (H=64)", lambda: force_kernel("persistent"), H=64)
else:
    run("cpu", "cpu kernels (dry run)")
PROFILE
if [ $dry = 0 ]; then
  step profile 60 "$out/bench.log" "$py" "$scratch/profile_schemes.py" cuda
else
  step profile 30 "$out/bench.log" "$py" "$scratch/profile_schemes.py" cpu
fi

passed=$(grep -cE '^[a-z-]+ +PASS' "$out/summary.txt")
skipped=$(grep -cE '^[a-z-]+ +SKIPPED' "$out/summary.txt")
steps=$(grep -cE '^[a-z-]+ +[A-Z]' "$out/summary.txt")
echo "total $((SECONDS - start))s of a ${budget}s budget$([ $dry = 1 ] && echo ' (dry run)')" | tee -a "$out/summary.txt"
ls -R "$out" >> "$out/summary.txt"
echo "gpu.sh: $passed passed, $((steps - passed - skipped)) failed, $skipped skipped"
exit $failed
