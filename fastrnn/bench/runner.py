"""The one benchmark runner: torch.nn and every backend on every case of a set, timed the same way.

For each case the torch.nn module is built once (seeded) and each fastrnn module loads its state_dict,
so all of them compute the same function on the same input. Within a case and pass the modules run one
after the other, so a change of machine load between cases does not bias one backend.
"""

import datetime
import uuid
import warnings

import torch

import fastrnn

from . import roofline
from .machine import environment
from .timing import call_once, measure_interleaved, peak_memory, percentile

TORCH_NN = "torch.nn"
_TORCH_CLASSES = {"lstm": torch.nn.LSTM, "gru": torch.nn.GRU, "rnn": torch.nn.RNN}
_FASTRNN_CLASSES = {"lstm": "LSTM", "gru": "GRU", "rnn": "RNN"}
AUTO = "auto"


def benchmark_backends(device_type, wanted=None):
    """fastrnn's backends to time on this device type: "auto" (what a user who converts a model gets; each row
    records what it resolved to) and every available backend, except the Triton interpreter (triton on a CPU
    runs a Python emulation of the kernel, which measures nothing). By default "auto" is timed on the CPU
    only: there it may hand a layer to torch.nn (modules._torch_nn_is_faster), and the issue's targets are
    about it; on CUDA it always resolves to the first available backend, which is timed anyway."""
    names = [b for b in fastrnn.available_backends(device_type) if not (b == "triton" and device_type != "cuda")]
    if wanted is None:
        return ([AUTO] if device_type == "cpu" else []) + names
    names = [AUTO] + names
    unknown = sorted(set(wanted) - set(names))
    if unknown:
        raise ValueError(f"backend(s) {unknown} cannot be benchmarked on {device_type} here; available: {names}")
    return [b for b in names if b in wanted]


def module_kwargs(case):
    kwargs = {"num_layers": case.layers, "bidirectional": case.bidirectional}
    if case.proj:
        kwargs["proj_size"] = case.proj
    return kwargs


class PerStepLoop(torch.nn.Module):
    """What recurrent RL code runs today for a rollout with episode ends (CleanRL's ppo_atari_lstm,
    sb3-contrib's RecurrentPPO): torch.nn cannot reset a sequence's state inside one call, so the rollout
    is a Python loop, one torch.nn call per step, the state zeroed first where an episode starts."""

    def __init__(self, rnn):
        super().__init__()
        self.rnn = rnn

    def forward(self, x, hx=None, *, resets):
        lstm = isinstance(self.rnn, torch.nn.LSTM)
        state = hx
        if state is None:
            shape = (self.rnn.num_layers * (2 if self.rnn.bidirectional else 1), x.shape[1], self.rnn.hidden_size)
            state = (x.new_zeros(shape), x.new_zeros(shape)) if lstm else x.new_zeros(shape)
        ys = []
        for t in range(x.shape[0]):
            keep = (~resets[t]).to(x.dtype).view(1, -1, 1)
            state = (state[0] * keep, state[1] * keep) if lstm else state * keep
            y, state = self.rnn(x[t : t + 1], state)
            ys.append(y)
        return torch.cat(ys), state


def build_modules(case, backends, device):
    """{name: module} for torch.nn and each backend, sharing torch.nn's (seeded) parameters. With resets,
    torch.nn is the per-step loop (PerStepLoop)."""
    torch.manual_seed(0)
    baseline = _TORCH_CLASSES[case.cell](case.I, case.H, **module_kwargs(case))
    state = baseline.state_dict()
    modules = {TORCH_NN: PerStepLoop(baseline) if case.resets else baseline}
    for backend in backends:
        module = getattr(fastrnn, _FASTRNN_CLASSES[case.cell])(case.I, case.H, backend=backend, **module_kwargs(case))
        module.load_state_dict(state)
        modules[backend] = module
    modules = {name: m.to(device=device, dtype=case.torch_dtype) for name, m in modules.items()}
    # cuDNN at its best: .to() leaves torch.nn's weights in separate tensors, which cuDNN compacts into one
    # buffer at every call (its warning says so); a user who cares about speed calls flatten_parameters().
    baseline.flatten_parameters()
    return modules


def make_inputs(case, device):
    """x [T, B, I], the gradient of the output y [T, B, D*Hout] and the episode starts (the keyword
    arguments of every call: {} or {"resets": [T, B] bool}), seeded."""
    generator = torch.Generator().manual_seed(1)
    directions = 2 if case.bidirectional else 1
    x = torch.randn(case.T, case.B, case.I, generator=generator)
    grad_y = torch.randn(case.T, case.B, directions * (case.proj or case.H), generator=generator)
    kwargs = {}
    if case.resets:
        kwargs["resets"] = (torch.rand(case.T, case.B, generator=generator) < case.resets).to(device)
    return x.to(device=device, dtype=case.torch_dtype), grad_y.to(device=device, dtype=case.torch_dtype), kwargs


def calls(module, x, grad_y, pass_name, kwargs=None):
    """(call, reset) for one pass. fwd runs under no_grad (inference: nothing saved); fwd+bwd takes
    gradients for the input and every parameter; reset drops them so backward never times an add."""
    kwargs = kwargs or {}
    if pass_name == "fwd":

        def forward():
            with torch.no_grad():
                module(x, **kwargs)

        return forward, None
    x = x.detach().requires_grad_(True)
    params = list(module.parameters())

    def forward_backward():
        y, _ = module(x, **kwargs)
        y.backward(grad_y)

    def reset():
        x.grad = None
        for p in params:
            p.grad = None

    return forward_backward, reset


def run(case_set, device, backends, passes, repeats, progress, measure_memory=True, label=""):
    """Times every case of `case_set` and returns the result rows (dicts, docs/benchmarks.md lists
    the fields). `progress` gets start(text) before and advance() after each measurement."""
    device = torch.device(device)
    now = datetime.datetime.now(datetime.timezone.utc)
    common = {
        "run_id": now.strftime("%Y%m%dT%H%M%SZ-") + uuid.uuid4().hex[:6],
        "date": now.isoformat(timespec="seconds"),
        "label": label,
        "case_set": case_set.name,
        **environment(device),
    }
    if device.type == "cpu":
        # The fp32 FMA peak of fastrnn's ISA on torch's threads, measured once per run (roofline.fma_peak).
        progress.start("FMA peak")
        peak = roofline.fma_peak(common["fastrnn_isa"]) or {}
        common.update({"fma_peak_flops_per_s": peak.get("flops"), "fma_peak_source": peak.get("source"),
                       "fma_clock_hz": peak.get("clock_hz")})
    else:
        common.update({"fma_peak_flops_per_s": None, "fma_peak_source": None, "fma_clock_hz": None})
    # The roofline reference of each dtype: the best GEMM path of this device in that dtype (on the CPU the fastest
    # of MKL, oneDNN and fastrnn's own path: torch.mm alone under-states an AVX-512 AMD CPU in fp32, and bf16 on
    # AMX runs several times the fp32 rate), measured before the cases and again after them, each path's best
    # of the two: on a shared machine a neighbour's job during one measurement put torch.nn at 178% of "the
    # GEMM rate" (Xeon, 2026-12-02, load 6-7).
    dtypes = {c.dtype: c.torch_dtype for c in case_set.cases}
    before = {name: _gemm_rates(device, dtype, f"GEMM rate, {name}", progress) for name, dtype in dtypes.items()}
    rows = []
    with warnings.catch_warnings():
        # torch.nn's notice that oneDNN has no LSTM with proj_size (its native kernel runs): docs/benchmarks.md.
        warnings.filterwarnings("ignore", message="LSTM with projections is not supported with oneDNN")
        for case in case_set.cases:
            rows += _run_case(case, device, backends, passes, repeats, progress, measure_memory, common)
            if device.type == "cuda":
                torch.cuda.empty_cache()
    references = {}
    for name, dtype in dtypes.items():
        after = _gemm_rates(device, dtype, f"GEMM rate again, {name}", progress)
        rates = {path: max(before[name].get(path, 0), after.get(path, 0)) for path in {**before[name], **after}}
        best = max(rates, key=rates.get)
        references[name] = {"gemm_flops_per_s": rates[best], "gemm_path": best, "gemm_rates": rates}
    for row in rows:
        row.update(references[row["dtype"]])
        row["roofline"] = row["flops"] / row["p50_s"] / row["gemm_flops_per_s"] if row.get("p50_s") else None
    return rows


def _gemm_rates(device, dtype, text, progress):
    progress.start(text)
    return roofline.best_gemm(device, dtype)["rates"]


def _run_case(case, device, backends, passes, repeats, progress, measure_memory, common):
    modules = build_modules(case, backends, device)
    x, grad_y, kwargs = make_inputs(case, device)
    rows = []
    for pass_name in passes:
        progress.start(f"{case.name} {pass_name}: {', '.join(modules)}")
        results = _measure_pass(modules, x, grad_y, kwargs, pass_name, device, repeats, measure_memory)
        progress.advance(len(modules))
        baseline_p50 = results[TORCH_NN].get("p50_s")
        case_flops = roofline.flops(case, pass_name)
        for name, result in results.items():
            p50 = result.get("p50_s")
            rows.append({
                **common, "case": case.name, **case.fields(), "pass": pass_name, "backend": name, **result,
                "torch_p50_s": baseline_p50, "flops": case_flops,
                "speedup": baseline_p50 / p50 if p50 is not None and baseline_p50 is not None else None,
            })
    return rows


def resolved_backend(name, module, x, pass_name, kwargs):
    """What the module named `name` runs in this pass: "torch.nn" for torch.nn, else the module's own answer
    (modules.resolved_backend) under the pass's conditions, the ones `calls` sets: no_grad for fwd; grad mode
    and an input that requires grad for fwd+bwd (backend="auto" on the CPU decides by them)."""
    if name == TORCH_NN:
        return TORCH_NN
    if not hasattr(module, "resolved_backend"):  # a --base revision from before it existed
        return None
    training = pass_name != "fwd"
    with torch.set_grad_enabled(training):
        return module.resolved_backend(x.detach().requires_grad_(training), kwargs.get("resets"))


def _measure_pass(modules, x, grad_y, kwargs, pass_name, device, repeats, measure_memory):
    """{name: result fields} for one pass of every module, timed round-robin (measure_interleaved).
    A backend that raises on its first call becomes a row with the error (shown in the table and
    counted in the exit status), and the others are still measured."""
    results, runnable = {}, {}
    resolved = {name: resolved_backend(name, module, x, pass_name, kwargs) for name, module in modules.items()}
    for name, module in modules.items():
        call, reset = calls(module, x, grad_y, pass_name, kwargs)
        try:
            call_once(call, reset)  # also the first warm-up call
        except Exception as e:  # reported in the row, the table and the exit status
            results[name] = {"resolved_backend": resolved[name], "error": f"{type(e).__name__}: {e}"}
            continue
        runnable[name] = (call, reset)
    times = measure_interleaved(runnable, device, repeats)
    for name, (call, reset) in runnable.items():
        results[name] = {
            "resolved_backend": resolved[name],
            "p20_s": percentile(times[name], 20), "p50_s": percentile(times[name], 50),
            "p80_s": percentile(times[name], 80), "reps": len(times[name]),
            "peak_bytes": peak_memory(call, device, reset) if measure_memory else None,
        }
    return {name: results[name] for name in modules}
