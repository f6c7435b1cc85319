"""fastrnn: fused LSTM/GRU/RNN kernels behind drop-in replacements for torch.nn's recurrent modules."""

import sys

from .backends import available_backends
from .modules import GRU, LSTM, RNN, GRUCell, LSTMCell, RNNCell, convert

__version__ = "0.1.0"

__all__ = ["LSTM", "GRU", "RNN", "LSTMCell", "GRUCell", "RNNCell", "convert", "available_backends", "empty_cache",
           "__version__"]


def empty_cache():
    """Frees the memory that the cpu backend keeps for reuse between calls (its ops' large outputs are made in
    blocks kept when their tensors die: docs/api.md, FASTRNN_CPU_OUTPUT_CACHE_MB), as torch.cuda.empty_cache does
    for CUDA's. Returns the bytes freed (0 without the compiled extension)."""
    native = sys.modules.get(f"{__name__}.backends.native")  # not loaded: nothing was kept
    return 0 if native is None else native.empty_output_cache()
