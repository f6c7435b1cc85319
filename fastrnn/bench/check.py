"""`python -m fastrnn check`: is fastrnn right on this machine? Parity of every available backend
against torch.nn, in seconds.

Each backend runs small LSTM (with and without proj_size), GRU and RNN (tanh, relu) modules in fp32 and
fp64 on odd sizes: one layer; two bidirectional layers on an unsorted PackedSequence with batch_first;
one step of one sequence without biases; two layers with episode resets (`resets=`, against torch.nn run
as the per-step loop RL code writes). Every output (y, h_n, c_n) and every gradient (input, h0, c0,
each weight and bias) is compared with torch.nn in fp64 on the CPU (the oracle), with the weights
copied by state_dict.

The error of a tensor is max|value - oracle| / max(1, max|oracle|): relative for tensors of magnitude
above 1, absolute below. A tensor passes when its error is at most 2x that of torch.nn itself in the same
dtype on the same device (the flash-attention rule, DESIGN.md section 6) plus a floor: 1e-5 in fp32
(the agreement DESIGN.md section 6 asks of fp32 backends) and 1e-10 in fp64 (rounding differences of
a different summation order stay near 1e-15; a wrong formula is off by far more than either floor).
"""

import warnings
from dataclasses import dataclass

import torch
from torch.nn.utils.rnn import pack_padded_sequence

import fastrnn

from .runner import PerStepLoop

FLOORS = {torch.float32: 1e-5, torch.float64: 1e-10}
DTYPES = {"fp32": torch.float32, "fp64": torch.float64}


@dataclass(frozen=True)
class Variant:
    """A cell as a user builds it: the module class name and its extra constructor arguments."""

    name: str
    module: str
    kwargs: tuple = ()


VARIANTS = (
    Variant("lstm", "LSTM"),
    Variant("lstm-proj", "LSTM", (("proj_size", 3),)),
    Variant("gru", "GRU"),
    Variant("rnn-tanh", "RNN"),
    Variant("rnn-relu", "RNN", (("nonlinearity", "relu"),)),
)


@dataclass(frozen=True)
class Layout:
    name: str
    T: int
    B: int
    I: int  # noqa: E741
    H: int
    layers: int = 1
    bidirectional: bool = False
    batch_first: bool = False
    bias: bool = True
    lengths: tuple = ()  # a PackedSequence (enforce_sorted=False) of these lengths; () = a padded tensor
    resets: tuple = ()  # (t, b) where an episode starts (resets=; torch.nn runs as the per-step RL loop)


# Odd sizes on purpose (H not a multiple of 8; T=1; B=1; unsorted lengths including 1 and T).
LAYOUTS = (
    Layout("T7-B3-H6", T=7, B=3, I=5, H=6),
    Layout("L2-bidir-packed", T=6, B=4, I=5, H=7, layers=2, bidirectional=True, batch_first=True,
           lengths=(6, 2, 5, 1)),
    Layout("T1-B1-nobias", T=1, B=1, I=3, H=5, bias=False),
    Layout("L2-resets", T=7, B=3, I=5, H=6, layers=2, resets=((0, 1), (3, 0), (3, 2), (6, 1))),
)


def _build(variant, layout, backend):
    kwargs = dict(variant.kwargs, num_layers=layout.layers, bidirectional=layout.bidirectional,
                  batch_first=layout.batch_first, bias=layout.bias)
    if backend is None:
        return getattr(torch.nn, variant.module)(layout.I, layout.H, **kwargs)
    return getattr(fastrnn, variant.module)(layout.I, layout.H, backend=backend, **kwargs)


def _problem(variant, layout):
    """The oracle module (fp64, CPU, seeded), the inputs, and the gradients of the outputs."""
    torch.manual_seed(0)
    oracle = _build(variant, layout, None).double()
    lstm = variant.module == "LSTM"
    hout = dict(variant.kwargs).get("proj_size") or layout.H
    states = layout.layers * (2 if layout.bidirectional else 1)
    shape = (layout.B, layout.T, layout.I) if layout.batch_first else (layout.T, layout.B, layout.I)
    inputs = {"x": torch.randn(shape, dtype=torch.float64), "h0": torch.randn(states, layout.B, hout, dtype=torch.float64)}
    if lstm:
        inputs["c0"] = torch.randn(states, layout.B, layout.H, dtype=torch.float64)
    return oracle, inputs


def _run(module, variant, layout, inputs, device, dtype, grad_seed=1):
    """{tensor name: value in fp64 on the CPU}: y, h_n, (c_n), and d<input> / d<parameter> of a loss
    that weights every output element by a fixed random number."""
    module = module.to(device=device, dtype=dtype)
    leaves = {k: v.to(device=device, dtype=dtype).requires_grad_(True) for k, v in inputs.items()}
    x = leaves["x"]
    if layout.lengths:
        x = pack_padded_sequence(x, torch.tensor(layout.lengths), batch_first=layout.batch_first, enforce_sorted=False)
    hx = (leaves["h0"], leaves["c0"]) if "c0" in leaves else leaves["h0"]
    params = dict(module.named_parameters())
    if layout.resets:
        resets = torch.zeros(layout.T, layout.B, dtype=torch.bool, device=device)
        resets[tuple(zip(*layout.resets))] = True
        call = module if isinstance(module, fastrnn.modules._RecurrentMixin) else PerStepLoop(module)
        out, hidden = call(x, hx, resets=resets)
    else:
        out, hidden = module(x, hx)
    outputs = {"y": out.data if layout.lengths else out}
    if isinstance(hidden, tuple):
        outputs["h_n"], outputs["c_n"] = hidden
    else:
        outputs["h_n"] = hidden
    generator = torch.Generator().manual_seed(grad_seed)
    loss = sum(
        (value * torch.randn(value.shape, generator=generator, dtype=torch.float64).to(device, dtype)).sum()
        for value in outputs.values()
    )
    wrt = {**{f"d{k}": v for k, v in leaves.items()}, **{f"d{k}": v for k, v in params.items()}}
    grads = torch.autograd.grad(loss, list(wrt.values()))
    values = {**outputs, **dict(zip(wrt, grads))}
    return {k: v.detach().to("cpu", torch.float64) for k, v in values.items()}


def scaled_error(value, oracle):
    """max|value - oracle| / max(1, max|oracle|); inf when the value is not finite or misshapen."""
    if value.shape != oracle.shape or not torch.isfinite(value).all():
        return float("inf")
    scale = max(1.0, oracle.abs().max().item()) if oracle.numel() else 1.0
    return (value - oracle).abs().max().item() / scale if value.numel() else 0.0


@dataclass
class Outcome:
    device: str
    backend: str
    variant: str
    dtype: str
    error: float = 0.0  # of the worst tensor (the one nearest its limit)
    limit: float = float("inf")
    torch_error: float = 0.0
    where: str = ""  # "<layout> <tensor>" of the worst tensor, or the exception
    failed: bool = False

    def record(self, layout, name, error, torch_error, floor):
        limit = 2 * torch_error + floor
        if not self.where or error / limit > self.error / self.limit:
            self.error, self.limit, self.torch_error, self.where = error, limit, torch_error, f"{layout} {name}"
        if not error <= limit:
            self.failed = True


def run_checks(device, backends, variants=None):
    """One Outcome per (backend, variant, dtype), the worst over the layouts and tensors."""
    device = torch.device(device)
    outcomes = []
    for variant in variants or VARIANTS:
        for dtype_name, dtype in DTYPES.items():
            per_backend = {b: Outcome(device.type, b, variant.name, dtype_name) for b in backends}
            for layout in LAYOUTS:
                oracle, inputs = _problem(variant, layout)
                state = oracle.state_dict()
                expected = _run(oracle, variant, layout, inputs, "cpu", torch.float64)
                baseline = _build(variant, layout, None)
                baseline.load_state_dict(state)
                torch_values = _run(baseline, variant, layout, inputs, device, dtype)
                for backend in backends:
                    outcome = per_backend[backend]
                    if outcome.failed and outcome.where.startswith("raised"):
                        continue
                    try:
                        module = _build(variant, layout, backend)
                        module.load_state_dict(state)
                        values = _run(module, variant, layout, inputs, device, dtype)
                    except Exception as e:  # a backend that raises fails the check, with its message
                        outcome.failed, outcome.where = True, f"raised {type(e).__name__}: {e}"
                        continue
                    for name, oracle_value in expected.items():
                        outcome.record(layout.name, name, scaled_error(values[name], oracle_value),
                                       scaled_error(torch_values[name], oracle_value), FLOORS[dtype])
            outcomes.extend(per_backend.values())
    return outcomes


def table(outcomes):
    lines = [["device", "backend", "cell", "dtype", "result", "worst error", "limit", "torch.nn error",
              "worst tensor"]]
    for o in sorted(outcomes, key=lambda o: (o.device, o.backend)):  # stable: cells and dtypes stay in order
        raised = o.where.startswith("raised")
        lines.append([
            o.device, o.backend, o.variant, o.dtype, "FAIL" if o.failed else "PASS",
            "-" if raised else f"{o.error:.2e}", "-" if raised else f"{o.limit:.2e}",
            "-" if raised else f"{o.torch_error:.2e}", o.where,
        ])
    widths = [max(len(line[k]) for line in lines) for k in range(len(lines[0]))]
    return ["  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip() for line in lines]


def main(devices=None, backends=None):
    """Checks `backends` (default: every available one) on `devices` (default: the CPU, and CUDA when
    present); prints the table and returns the exit status (1 on any FAIL)."""
    from .machine import cpu_isa, device_name

    devices = devices or (["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"])
    plan = {d: [b for b in fastrnn.available_backends(d) if backends is None or b in backends] for d in devices}
    unknown = sorted(set(backends or []) - {b for names in plan.values() for b in names})
    if unknown:
        print(f"fastrnn check: backend(s) {unknown} are not available on {devices}; available: "
              + ", ".join(f"{d}: {fastrnn.available_backends(d)}" for d in devices))
        return 1
    outcomes = []
    for device, names in plan.items():
        isa = cpu_isa()
        print(f"fastrnn check on {device_name(device)} ({device}), torch {torch.__version__}, backends {names}, "
              f"CPU ISA: fastrnn {isa['fastrnn_isa']}, torch {isa['torch_isa']}")
        with warnings.catch_warnings():
            # torch.nn's own notice that oneDNN has no LSTM with proj_size (it runs its native kernel).
            warnings.filterwarnings("ignore", message="LSTM with projections is not supported with oneDNN")
            outcomes += run_checks(device, names)
    print("every output and gradient against torch.nn in fp64 on the CPU; error = max|diff| / max(1, max|oracle|)")
    for line in table(outcomes):
        print(line)
    failed = [o for o in outcomes if o.failed]
    print(f"\n{len(outcomes) - len(failed)}/{len(outcomes)} PASS" + (f", {len(failed)} FAIL" if failed else ""))
    return 1 if failed else 0
