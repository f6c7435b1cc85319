"""GPU-only checks shared by the CUDA and Triton backend tests (issue 13): CUDA-graph capture of a
forward + backward, and a module on another device than the current one. They skip without the GPUs
they need (tests/test_cuda.py and tests/test_triton.py mark them `gpu`).
"""

import pytest
import torch

import fastrnn

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
needs_two_gpus = pytest.mark.skipif(
    torch.cuda.device_count() < 2,
    reason=f"needs two CUDA devices (this machine has {torch.cuda.device_count()})",
)


def lstm_pair(backend, dtype, device, I=24, H=40):
    """(module under test, the same weights in a second module) on `device`; H=40 is not a multiple of 16."""
    torch.manual_seed(0)
    m = fastrnn.LSTM(I, H, backend=backend).to(device=device, dtype=dtype)
    twin = fastrnn.LSTM(I, H, backend=backend).to(device=device, dtype=dtype)
    twin.load_state_dict(m.state_dict())
    return m, twin


def _loss(out):
    return out.float().square().sum()


def _grads(m, x):
    return [x.grad] + [p.grad for p in m.parameters()]


def graph_replay_matches_eager(backend, dtype=torch.float32, T=9, B=5):
    """Warm up on a side stream, capture one forward + backward in a CUDA graph, replay it on two new
    inputs and compare the outputs and every gradient with an eager run of a twin module on the same
    inputs. Anything that synchronises with the host, allocates outside the graph's pool, or loads a
    module inside the capture makes the capture raise; a value captured instead of read on replay (a
    stale pointer, a cached plan) makes the comparison fail."""
    m, twin = lstm_pair(backend, dtype, "cuda")
    static_x = torch.randn(T, B, 24, device="cuda", dtype=dtype, requires_grad=True)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):  # compiles/loads every kernel, fills the per-device caches
            m.zero_grad(set_to_none=True)
            static_x.grad = None
            _loss(m(static_x)[0]).backward()
    torch.cuda.current_stream().wait_stream(side)
    m.zero_grad(set_to_none=True)
    static_x.grad = None
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = m(static_x)[0]
        _loss(static_out).backward()
    for seed in (1, 2):
        new_x = torch.randn(T, B, 24, device="cuda", dtype=dtype, generator=torch.Generator("cuda").manual_seed(seed))
        with torch.no_grad():
            static_x.copy_(new_x)
        graph.replay()
        x = new_x.clone().requires_grad_(True)
        twin.zero_grad(set_to_none=True)
        out = twin(x)[0]
        _loss(out).backward()
        torch.cuda.synchronize()
        # The same kernels on the same data; only cuBLAS may pick another algorithm inside a capture, so
        # the comparison allows rounding (assert_close's defaults for the dtype), not more.
        torch.testing.assert_close(static_out, out, msg=lambda s: f"replay {seed}: output: {s}")
        names = ["x"] + [n for n, _ in m.named_parameters()]
        for name, a, b in zip(names, _grads(m, static_x), _grads(twin, x)):
            torch.testing.assert_close(a, b, msg=lambda s, name=name: f"replay {seed}: grad of {name}: {s}")


def runs_on_the_tensors_device(backend):
    """With cuda:0 current, a module and input on cuda:1 compute on cuda:1 (outputs there, the current
    device unchanged) and agree with the reference backend in fp64 on the CPU."""
    m, _ = lstm_pair(backend, torch.float32, "cuda:1")
    ref, _ = lstm_pair("reference", torch.float64, "cpu")
    ref.load_state_dict({k: v.double().cpu() for k, v in m.state_dict().items()})
    x = torch.randn(7, 3, 24, device="cuda:1", requires_grad=True)
    x_ref = x.detach().double().cpu().requires_grad_(True)
    with torch.cuda.device(0):
        out, (h, c) = m(x)
        _loss(out).backward()
        assert torch.cuda.current_device() == 0
    torch.cuda.synchronize(1)
    out_ref, (h_ref, c_ref) = ref(x_ref)
    _loss(out_ref).backward()
    for name, a, b in (("output", out, out_ref), ("h_n", h, h_ref), ("c_n", c, c_ref), ("dx", x.grad, x_ref.grad)):
        assert a.device == torch.device("cuda:1"), f"{name} is on {a.device}"
        torch.testing.assert_close(a.double().cpu(), b, atol=1e-5, rtol=1e-5, msg=lambda s, name=name: f"{name}: {s}")
