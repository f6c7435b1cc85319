"""Layers x directions around the one-layer, one-direction recurrence of autograd.py.

Everything here is shape plumbing in torch: the input projection, bias folding, stacking layers,
concatenating directions, dropout between layers, and PackedSequence <-> (padded, lengths). The modules
(modules.py) validate and normalise their arguments and call `stacked` or `cell_step`.

T: time steps  B: batch  I: input size  H: hidden size  Hout: proj_size or H  L: layers  D: directions
"""

from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from . import backends
from . import autograd

CELLS = ("lstm", "gru", "rnn_tanh", "rnn_relu")


class LayerWeights(NamedTuple):
    """The parameters of one layer and one direction, as torch names them (w_hr only with proj_size)."""

    w_ih: Tensor
    w_hh: Tensor
    b_ih: Optional[Tensor]
    b_hh: Optional[Tensor]
    w_hr: Optional[Tensor]


def recurrence(cell, x, h0, c0, weights, lengths, resets, reverse, backend, batch_sizes=None):
    """One layer, one direction. x [T, B, I] -> y [T, B, Hout], h_n [B, Hout], c_n [B, H] (LSTM) or None.
    With batch_sizes, x is a PackedSequence's rows [N, I], projected, then padded (autograd.input_projection).

    LSTM and RNN fold both biases into one input bias, added to Gx (by the projection or by the recurrence
    op: autograd.split_input_bias); GRU's input bias is b_ih, and it keeps b_hh for the recurrence, since b_hn
    sits inside r * (W_hn h + b_hn).
    """
    w = weights
    if cell == "gru":
        y, h_n = autograd.gru(x, w.w_ih, w.b_ih, w.w_hh, w.b_hh, h0, lengths, resets, reverse, backend,
                              batch_sizes)
        return y, h_n, None
    bias = None if w.b_ih is None else w.b_ih + w.b_hh
    if cell == "lstm":
        return autograd.lstm(x, w.w_ih, bias, w.w_hh, h0, c0, w.w_hr, lengths, resets, reverse, backend,
                             batch_sizes)
    y, h_n = autograd.rnn(x, w.w_ih, bias, w.w_hh, h0, lengths, resets, reverse, cell == "rnn_relu", backend,
                          batch_sizes)
    return y, h_n, None


def stacked(cell, x, h0, c0, weights, lengths, *, num_layers, bidirectional, dropout, training, backend,
            resets=None, batch_sizes=None):
    """The multi-layer network on padded, time-major input.

    x [T, B, I], or with batch_sizes (host int64 [T], as a PackedSequence holds it) the packed rows [N, I]
    that lengths come from: the first layer projects them before padding where autograd.projects_before_padding
    says so (the CPU), else they are padded first. h0 [L*D, B, Hout]; c0 [L*D, B, H] or None; weights: L*D
    LayerWeights in torch's order (layer-major, forward before reverse); lengths [B] int64 on x's device or None;
    resets [T, B] bool on x's device or None (episode starts, docs/api.md "Episode resets"; the same in every
    layer).
    Returns y [T, B, D*Hout], h_n [L*D, B, Hout], c_n [L*D, B, H] or None.
    """
    if (x.shape[0] if batch_sizes is None else batch_sizes.numel()) == 0:
        # torch.nn's message (ATen's RNN.cpp); the recurrence ops take T >= 1.
        raise RuntimeError("Expected sequence length to be larger than 0 in RNN")
    backend = backends.resolve(backend, x.device)
    if batch_sizes is not None and not autograd.projects_before_padding(x):
        x, batch_sizes = autograd.padded(x, batch_sizes), None
    num_directions = 2 if bidirectional else 1
    h0, c0 = h0.contiguous(), (c0.contiguous() if c0 is not None else None)
    resets_of = (resets, reverse_resets(resets) if bidirectional else None)
    h_n, c_n = [], []
    layer_input = x
    for layer in range(num_layers):
        outputs = []
        for direction in range(num_directions):
            k = layer * num_directions + direction
            y, h, c = recurrence(
                cell, layer_input, h0[k], c0[k] if c0 is not None else None, weights[k], lengths,
                resets_of[direction], direction == 1, backend, batch_sizes if layer == 0 else None,
            )
            outputs.append(y)
            h_n.append(h)
            c_n.append(c)
        layer_input = outputs[0] if num_directions == 1 else torch.cat(outputs, dim=2)
        if dropout > 0 and training and layer < num_layers - 1:
            layer_input = F.dropout(layer_input, p=dropout, training=True)
    # torch.stack even for one layer: a view of the op's h_n would not take in-place ops such as
    # h.detach_() (truncated BPTT), which work on torch.nn's fresh h_n (tests/test_modules.py).
    return layer_input, torch.stack(h_n), (torch.stack(c_n) if c0 is not None else None)


def reverse_resets(resets):
    """The reverse direction's mask: a reset between steps t-1 and t (resets[t]) means that the reverse
    walk, coming from step t, enters step t-1 from zero; the ops index the mask by the step entered
    (docs/contract.md). One small [T, B] copy, no host synchronisation."""
    if resets is None:
        return None
    return torch.cat([resets[1:], torch.zeros_like(resets[:1])])


def packed_lengths(batch_sizes):
    """A PackedSequence's batch_sizes [T] -> the lengths [B] of its sequences in packed order (decreasing),
    on the host; None when every sequence has the full length T (a single sequence, or equal lengths): then
    the packed rows already are the time-major [T, B, *] tensor (a view, no copy, and the ops skip the
    lengths test). batch_sizes is on the host: deciding costs no synchronisation."""
    T = batch_sizes.numel()
    if T == 0 or batch_sizes[0] == batch_sizes[-1]:
        return None
    return (batch_sizes.unsqueeze(1) > torch.arange(int(batch_sizes[0]))).sum(0)


def pack(padded, lengths):
    """Padded, time-major y [T, B, *] with lengths sorted decreasing (None: all T) -> the packed rows."""
    if lengths is None:
        return padded.flatten(0, 1)
    data, _ = torch._VF._pack_padded_sequence(padded, lengths, False)
    return data


def cell_step(cell, x, h0, c0, w_ih, w_hh, b_ih, b_hh, backend):
    """One step of a cell module: x [B, I], h0 [B, H], c0 [B, H] or None -> (h_1, c_1 or None)."""
    weights = LayerWeights(w_ih, w_hh, b_ih, b_hh, None)
    backend = backends.resolve(backend, x.device)
    y, h, c = recurrence(cell, x.unsqueeze(0), h0.contiguous(), c0.contiguous() if c0 is not None else None,
                         weights, None, None, False, backend)
    return h, c
