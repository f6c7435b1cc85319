"""torch.compile(fullgraph=True) over fastrnn modules: one graph, forward and backward, for every T.

Dynamo refuses nn.LSTM/GRU/RNN instances (fastrnn's subclasses included) unless allow_rnn is set; with it,
Dynamo traces our Python forward and meets the recurrence as opaque custom ops with fake kernels. The
backward recurrence is an op too, so AOTAutograd does not unroll a loop over T.
"""

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend

import fastrnn
from conftest import backend_params
from parity import FASTRNN_CLASSES, FP32_TOL, TORCH_CLASSES

CELLS = ("lstm", "gru", "rnn_tanh")


class Model(torch.nn.Module):
    def __init__(self, rnn):
        super().__init__()
        self.rnn = rnn
        self.head = torch.nn.Linear(2 * 6, 1)

    def forward(self, x):
        y, _ = self.rnn(x)
        return self.head(y).sum()


@pytest.mark.parametrize("device,backend", [p for p in backend_params() if p.values[1] != "triton"])
@pytest.mark.parametrize("cell", CELLS)
def test_compile_fullgraph_one_graph_for_all_lengths(cell, device, backend):
    kw = {"nonlinearity": "tanh"} if cell.startswith("rnn") else {}
    rnn = FASTRNN_CLASSES[cell](4, 6, num_layers=2, bidirectional=True, batch_first=True, backend=backend, **kw)
    oracle = TORCH_CLASSES[cell](4, 6, num_layers=2, bidirectional=True, batch_first=True, **kw)
    oracle.load_state_dict(rnn.state_dict())
    model = Model(rnn).to(device)
    reference = Model(oracle).to(device)
    reference.head.load_state_dict(model.head.state_dict())
    counter = CompileCounterWithBackend("aot_eager")
    torch._dynamo.reset()
    with torch._dynamo.config.patch(allow_rnn=True):
        compiled = torch.compile(model, backend=counter, fullgraph=True, dynamic=True)
        compiles_after_first = None
        for T in (3, 5, 8, 13):
            x = torch.randn(2, T, 4, device=device)
            loss = compiled(x)
            loss.backward()
            grads = [p.grad.clone() for p in model.parameters()]
            model.zero_grad()
            expected = reference(x)
            expected.backward()
            # fp32 on both sides (torch.nn in fp32 here, not the fp64 oracle): the fp32 parity tolerance.
            torch.testing.assert_close(loss, expected, **FP32_TOL)
            for g, p in zip(grads, reference.parameters()):
                torch.testing.assert_close(g, p.grad, **FP32_TOL)
            reference.zero_grad()
            compiles_after_first = compiles_after_first or counter.frame_count
    # The first call may trace twice (Dynamo restarts once to turn Python float attributes into tensors).
    assert counter.frame_count == compiles_after_first, "a new sequence length recompiled"


def test_ops_pass_opcheck():
    """torch.library.opcheck on the reference ops: schema, fake kernel and registration agree."""
    from fastrnn.backends import ops

    ref = ops("reference")
    T, B, H, P = 3, 2, 4, 3
    L = torch.tensor([3, 1])
    f64 = dict(dtype=torch.float64)
    y = torch.randn(T, B, H, **f64)
    calls = {
        "lstm_fwd": (torch.randn(T, B, 4 * H, **f64), torch.randn(4 * H, P, **f64), torch.randn(B, P, **f64),
                     torch.randn(B, H, **f64), torch.randn(P, H, **f64), L, None, True, True),
        "lstm_bwd": (torch.randn(T, B, P, **f64), torch.randn(B, P, **f64), torch.randn(B, H, **f64),
                     torch.randn(4 * H, P, **f64), torch.randn(B, H, **f64), torch.randn(P, H, **f64),
                     torch.rand(T, B, 4 * H, **f64), torch.randn(T, B, H, **f64), L, None, False),
        "gru_fwd": (torch.randn(T, B, 3 * H, **f64), torch.randn(3 * H, H, **f64), torch.randn(3 * H, **f64),
                    torch.randn(B, H, **f64), None, None, False, True),
        "gru_bwd": (torch.randn(T, B, H, **f64), torch.randn(B, H, **f64), torch.randn(3 * H, H, **f64), y,
                    torch.randn(B, H, **f64), torch.rand(T, B, 4 * H, **f64), L, None, True),
        "rnn_fwd": (torch.randn(T, B, H, **f64), torch.randn(H, H, **f64), torch.randn(B, H, **f64), L, None, True,
                    True),
        "rnn_bwd": (torch.randn(T, B, H, **f64), torch.randn(B, H, **f64), torch.randn(H, H, **f64), y.tanh(), None,
                    None, False, False),
    }
    for name, args in calls.items():
        torch.library.opcheck(ref[name], args)
        if name.endswith("_fwd"):  # with the optional b_gx, [G*H] as gx's last dimension
            torch.library.opcheck(ref[name], args + (torch.randn(args[0].shape[-1], **f64),))
