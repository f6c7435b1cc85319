"""Whole modules (input GEMM, recurrence, weight gradients): torch.nn and each backend, forward under
no_grad and forward+backward, on the micro cases. Group = case and pass, so pytest-benchmark's table
compares the backends of one case side by side."""

import pytest

from fastrnn.bench import roofline, runner

from .conftest import DEVICE, ROUNDS, synchronized

# torch.nn's notice that oneDNN has no LSTM with proj_size (it runs its native kernel instead).
pytestmark = pytest.mark.filterwarnings("ignore:LSTM with projections is not supported with oneDNN")


@pytest.mark.with_torch_nn
@pytest.mark.parametrize("pass_name", ["fwd", "fwd+bwd"])
def test_module(benchmark, case, backend, pass_name):
    module = runner.build_modules(case, [] if backend == runner.TORCH_NN else [backend], DEVICE)[backend]
    x, grad_y, kwargs = runner.make_inputs(case, DEVICE)
    call, reset = runner.calls(module, x, grad_y, pass_name, kwargs)
    benchmark.group = f"module {case.name} {pass_name}"
    benchmark.extra_info.update(flops=roofline.flops(case, pass_name), device=str(DEVICE))
    benchmark.pedantic(synchronized(call), setup=reset, rounds=ROUNDS, warmup_rounds=1)
