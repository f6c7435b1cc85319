"""The one registry of benchmark cases: every size the benchmark, the microbenchmarks and the docs use.

A case is one recurrent module (cell, sizes, layers, direction, projection, dtype) on time-major input
[T, B, I]. Named case sets pick cases per device type, because the same sizes cannot be run on two CPU
cores in two minutes and on an H100 in the same two minutes (docs/benchmarks.md lists them).

T: time steps  B: batch  I: input size  H: hidden size  L: layers  P: proj_size (LSTM, 0 = none)
"""

from dataclasses import asdict, dataclass

import torch

CELLS = ("lstm", "gru", "rnn")
PASSES = ("fwd", "fwd+bwd")
DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16, "float16": torch.float16}
_DTYPE_TAGS = {"float32": "", "float64": "-fp64", "bfloat16": "-bf16", "float16": "-fp16"}


@dataclass(frozen=True)
class Case:
    cell: str  # "lstm", "gru" or "rnn" (tanh)
    T: int
    B: int
    I: int  # noqa: E741 (the input size is I everywhere in fastrnn)
    H: int
    layers: int = 1
    bidirectional: bool = False
    proj: int = 0
    dtype: str = "float32"
    # Episode resets (issue 15): the fraction of (step, sequence) pairs where an episode starts. fastrnn runs
    # them with resets=, torch.nn as the per-step loop recurrent RL code writes (runner.PerStepLoop).
    resets: float = 0.0

    def __post_init__(self):
        if self.cell not in CELLS:
            raise ValueError(f"unknown cell {self.cell!r}; expected one of {CELLS}")
        if self.dtype not in DTYPES:
            raise ValueError(f"unknown dtype {self.dtype!r}; expected one of {list(DTYPES)}")
        if self.proj and self.cell != "lstm":
            raise ValueError("proj_size exists for LSTM only")

    @property
    def name(self):
        """A stable id, e.g. 'lstm-T100-B64-I512-H512' or 'gru-T1024-B16-I768-H768-L2-bidir-bf16'."""
        name = f"{self.cell}-T{self.T}-B{self.B}-I{self.I}-H{self.H}"
        if self.layers != 1:
            name += f"-L{self.layers}"
        if self.bidirectional:
            name += "-bidir"
        if self.proj:
            name += f"-P{self.proj}"
        if self.resets:
            name += "-resets"
        return name + _DTYPE_TAGS[self.dtype]

    @property
    def torch_dtype(self):
        return DTYPES[self.dtype]

    @property
    def gates(self):
        return {"lstm": 4, "gru": 3, "rnn": 1}[self.cell]

    def fields(self):
        return asdict(self)


@dataclass(frozen=True)
class CaseSet:
    name: str
    cases: tuple
    threads: int = 0  # torch.set_num_threads for CPU runs; 0 keeps torch's default (one per core)
    help: str = ""


def _each_cell(sizes, cells=CELLS, **kw):
    return tuple(Case(cell, T, B, I, H, **kw) for cell in cells for (T, B, I, H) in sizes)


# The CPU kernel's targets (T, B, I, H): PyTorch's fastrnns default, a mid size, a latency-bound
# single sequence, and a long thin one.
CPU_TARGET_SIZES = ((100, 64, 512, 512), (100, 32, 256, 256), (50, 1, 64, 128), (200, 8, 128, 128))
# Issue 11's targets at those sizes: torch.nn p50 / backend="auto" p50, forward and forward+backward, fp32, per cell:
# (at the first two sizes, at the last two).
CPU_TARGET_SPEEDUPS = {"lstm": (1.1, 2.0), "gru": (1.5, 3.0), "rnn": (1.5, 3.0)}
# PyTorch's benchmarks/fastrnns default: T=100, B=64, I=H=512, one layer.
FASTRNNS_DEFAULT = (100, 64, 512, 512)
# DESIGN.md section 7's small-batch sweep: B in 1..16, H in 128..1024 (I = H, T = 100).
SWEEP_BATCHES = (1, 2, 4, 8, 16)
SWEEP_HIDDEN = (128, 256, 512, 1024)
# The batches and widths around auto's hand-over to cuDNN on CUDA (the "crossover" set).
CROSSOVER_BATCHES = (16, 32, 64, 128)
CROSSOVER_HIDDEN = (256, 512, 1024)
# DESIGN.md section 7's long sequence: T=1024, B=16, H=768, bf16.
LONG_SEQUENCE = (1024, 16, 768, 768)
# CleanRL's ppo_atari_lstm rollout: LSTM(512, 128), 128 steps x 8 environments, episodes ending anywhere
# (2% of the steps start one), forward+backward as the PPO update runs it (issue 15).
RL_ROLLOUT = Case("lstm", 128, 8, 512, 128, resets=0.02)


def target_speedup(case):
    """Issue 11's speedup target of `case` over torch.nn (CPU_TARGET_SPEEDUPS), or None where it sets none."""
    size = (case.T, case.B, case.I, case.H)
    if case != Case(case.cell, *size) or size not in CPU_TARGET_SIZES:  # one plain fp32 layer at a target size
        return None
    return CPU_TARGET_SPEEDUPS[case.cell][CPU_TARGET_SIZES.index(size) // 2]


def _sweep(batches, hiddens, cells, dtype="float32"):
    return tuple(Case(cell, 100, B, H, H, dtype=dtype) for cell in cells for H in hiddens for B in batches)


_CPU_TARGETS = _each_cell(CPU_TARGET_SIZES)

_SETS = {
    "cpu": {
        "cpu": CaseSet(
            "cpu", _CPU_TARGETS, threads=2,
            help="the CPU kernel's 12 target cases (LSTM/GRU/RNN x 4 sizes), fp32, 2 threads",
        ),
        "cuda": CaseSet("cpu", _CPU_TARGETS, help="the CPU kernel's 12 target cases, run on the GPU"),
    },
    "quick": {
        "cpu": CaseSet("quick", _CPU_TARGETS + (RL_ROLLOUT,),
                       help="the 12 CPU target cases and the RL rollout with resets (about 3 minutes on 2 cores)"),
        "cuda": CaseSet(
            "quick",
            _each_cell((FASTRNNS_DEFAULT,))
            + _each_cell((FASTRNNS_DEFAULT,), dtype="bfloat16")
            + tuple(Case("lstm", 100, b, 512, 512, dtype=d) for b in (1, 8) for d in ("float32", "bfloat16"))
            + (Case("lstm", *LONG_SEQUENCE, dtype="bfloat16"), RL_ROLLOUT),
            help="scripts/gpu.sh's set: fastrnns default per cell in fp32 and bf16, LSTM at B = 1 and 8 "
                 "(fp32, bf16), the long bf16 LSTM (FlashRNN's B=16, T=1024, H=768), the RL rollout with resets",
        ),
    },
    "full": {
        # No bf16 on the CPU: without AVX512-BF16/AMX, bf16 GEMMs are emulated and measure the
        # emulation, not the recurrence; the long sequence runs in fp32 there.
        "cpu": CaseSet(
            "full",
            _CPU_TARGETS
            + _sweep((1, 4, 16), SWEEP_HIDDEN, ("lstm", "gru"))
            + (Case("lstm", *FASTRNNS_DEFAULT, layers=2, bidirectional=True),
               Case("lstm", 100, 64, 512, 1024, proj=256),
               Case("lstm", *LONG_SEQUENCE), RL_ROLLOUT),
            help="CPU targets, the small-batch sweep, a 2-layer bidirectional LSTM, proj, the long sequence, "
                 "the RL rollout with resets",
        ),
        "cuda": CaseSet(
            "full",
            _each_cell((FASTRNNS_DEFAULT,))
            + _each_cell((FASTRNNS_DEFAULT,), dtype="bfloat16")
            + _sweep(SWEEP_BATCHES, SWEEP_HIDDEN, ("lstm", "gru"))
            + (Case("lstm", *FASTRNNS_DEFAULT, layers=2, bidirectional=True),
               Case("lstm", 100, 64, 512, 1024, proj=256))
            + _each_cell((LONG_SEQUENCE,), cells=("lstm", "gru"), dtype="bfloat16") + (RL_ROLLOUT,),
            help="fastrnns default (fp32, bf16), the full small-batch sweep, 2-layer bidir, proj, long bf16, "
                 "the RL rollout with resets",
        ),
    },
    # Sizes for the pytest-benchmark microbenchmarks (bench/test_*.py): big enough to time the
    # recurrence, small enough that every backend runs each in well under a second on 2 cores.
    # The RL rollout alone: fastrnn with resets= against the per-step torch.nn loop.
    "rl": {dev: CaseSet("rl", (RL_ROLLOUT,), help="CleanRL's LSTM rollout with episode resets") for dev in ("cpu", "cuda")},
    "micro": {
        dev: CaseSet("micro", _each_cell(((50, 1, 64, 128), (100, 32, 256, 256))), help="microbenchmark sizes")
        for dev in ("cpu", "cuda")
    },
    # Where backend="auto" on CUDA changes hands (fastrnn.modules._cuda_torch_nn_is_faster): measured faster
    # at B = 1-16 and slower at B = 64, H = 512 on an H200; this fills in the batches and widths around it.
    "crossover": {
        dev: CaseSet("crossover", _sweep(CROSSOVER_BATCHES, CROSSOVER_HIDDEN, CELLS),
                     help="every cell at T = 100, I = H, B = 16-128, H = 256-1024, fp32: where auto on CUDA "
                          "hands over to cuDNN (scripts/gpu.sh)")
        for dev in ("cpu", "cuda")
    },
    # Tiny sizes for the smoke test of the command (tests/test_bench.py): seconds, not a measurement.
    "smoke": {
        dev: CaseSet(
            "smoke",
            _each_cell(((5, 2, 3, 4),)) + (Case("lstm", 4, 3, 5, 6, layers=2, bidirectional=True, proj=3),
                                           Case("gru", 6, 3, 5, 4, resets=0.3)),
            help="tiny sizes that exercise every code path of the runner",
        )
        for dev in ("cpu", "cuda")
    },
}

SET_NAMES = tuple(_SETS)


def case_set(name, device_type):
    """The named case set for a device type ('cpu' or 'cuda')."""
    if name not in _SETS:
        raise ValueError(f"unknown case set {name!r}; expected one of {list(SET_NAMES)}")
    per_device = _SETS[name]
    return per_device.get(device_type, per_device["cpu"])
