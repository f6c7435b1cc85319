"""The Triton backend: the six recurrence ops of docs/contract.md as fused Triton kernels.

Runs on CUDA GPUs, and on the CPU under triton's interpreter (switched on through triton's environment
before triton is first imported; tests/conftest.py does this when there is no GPU). The package reads
only triton.knobs, never the environment. Design and cost model: docs/triton.md.
Importing this module raises ImportError without triton, which removes the backend from the registry.
"""

from ..schemas import define_ops
from . import gru, lstm, rnn
from .recurrence import devices, force_kernel

OPS = define_ops(
    "fastrnn_triton",
    {
        "lstm_fwd": lstm.lstm_fwd,
        "lstm_bwd": lstm.lstm_bwd,
        "gru_fwd": gru.gru_fwd,
        "gru_bwd": gru.gru_bwd,
        "rnn_fwd": rnn.rnn_fwd,
        "rnn_bwd": rnn.rnn_bwd,
    },
)

__all__ = ["OPS", "devices", "force_kernel"]
