"""fastrnn: fused LSTM/GRU/RNN kernels behind drop-in replacements for torch.nn's recurrent modules."""

from .backends import available_backends
from .modules import GRU, LSTM, RNN, GRUCell, LSTMCell, RNNCell, convert

__version__ = "0.1.0"

__all__ = ["LSTM", "GRU", "RNN", "LSTMCell", "GRUCell", "RNNCell", "convert", "available_backends", "__version__"]
