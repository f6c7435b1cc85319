"""The recurrence op schemas and their fake (meta) kernels, written once for every backend.

docs/contract.md defines what each op computes. The compiled extension declares the same strings in
csrc/ops.cpp (tests/test_native.py checks that they agree); Python backends register them under their own
namespace with `define_ops`.
"""

import torch

from . import vmap

SCHEMAS = {
    "lstm_fwd": "(Tensor gx, Tensor w_hh, Tensor h0, Tensor c0, Tensor? w_hr, Tensor? lengths, Tensor? resets, "
    "bool reverse, bool save, Tensor? b_gx=None) -> (Tensor, Tensor, Tensor, Tensor, Tensor)",
    "lstm_bwd": "(Tensor dy, Tensor dh_n, Tensor dc_n, Tensor w_hh, Tensor c0, Tensor? w_hr, Tensor gates, "
    "Tensor cs, Tensor? lengths, Tensor? resets, bool reverse) -> (Tensor, Tensor, Tensor, Tensor)",
    "gru_fwd": "(Tensor gx, Tensor w_hh, Tensor? b_hh, Tensor h0, Tensor? lengths, Tensor? resets, bool reverse, "
    "bool save, Tensor? b_gx=None) -> (Tensor, Tensor, Tensor)",
    "gru_bwd": "(Tensor dy, Tensor dh_n, Tensor w_hh, Tensor y, Tensor h0, Tensor saved, Tensor? lengths, "
    "Tensor? resets, bool reverse) -> (Tensor, Tensor, Tensor)",
    "rnn_fwd": "(Tensor gx, Tensor w_hh, Tensor h0, Tensor? lengths, Tensor? resets, bool reverse, bool relu, "
    "Tensor? b_gx=None) -> (Tensor, Tensor)",
    "rnn_bwd": "(Tensor dy, Tensor dh_n, Tensor w_hh, Tensor y, Tensor? lengths, Tensor? resets, bool reverse, "
    "bool relu) -> (Tensor, Tensor)",
}


def _saved_or_empty(save, gx, shape):
    return gx.new_empty(shape if save else (0,))


def lstm_fwd_fake(gx, w_hh, h0, c0, w_hr, lengths, resets, reverse, save, b_gx=None):
    T, B, _ = gx.shape
    H = c0.shape[1]
    return (
        gx.new_empty(T, B, h0.shape[1]),
        h0.new_empty(h0.shape),
        c0.new_empty(c0.shape),
        _saved_or_empty(save, gx, (T, B, 4 * H)),
        _saved_or_empty(save, gx, (T, B, H)),
    )


def lstm_bwd_fake(dy, dh_n, dc_n, w_hh, c0, w_hr, gates, cs, lengths, resets, reverse):
    dw_hr = w_hr.new_empty(w_hr.shape) if w_hr is not None else dy.new_empty(0)
    return gates.new_empty(gates.shape), dh_n.new_empty(dh_n.shape), dc_n.new_empty(dc_n.shape), dw_hr


def gru_fwd_fake(gx, w_hh, b_hh, h0, lengths, resets, reverse, save, b_gx=None):
    T, B, _ = gx.shape
    H = h0.shape[1]
    return gx.new_empty(T, B, H), h0.new_empty(h0.shape), _saved_or_empty(save, gx, (T, B, 4 * H))


def gru_bwd_fake(dy, dh_n, w_hh, y, h0, saved, lengths, resets, reverse):
    T, B, H = y.shape
    return dy.new_empty(T, B, 3 * H), dy.new_empty(T, B, 3 * H), dh_n.new_empty(dh_n.shape)


def rnn_fwd_fake(gx, w_hh, h0, lengths, resets, reverse, relu, b_gx=None):
    return gx.new_empty(gx.shape), h0.new_empty(h0.shape)


def rnn_bwd_fake(dy, dh_n, w_hh, y, lengths, resets, reverse, relu):
    return dy.new_empty(dy.shape), dh_n.new_empty(dh_n.shape)


FAKES = {
    "lstm_fwd": lstm_fwd_fake,
    "lstm_bwd": lstm_bwd_fake,
    "gru_fwd": gru_fwd_fake,
    "gru_bwd": gru_bwd_fake,
    "rnn_fwd": rnn_fwd_fake,
    "rnn_bwd": rnn_bwd_fake,
}


def define_ops(namespace, impls):
    """Registers `impls` (op name -> Python function over tensors, any device) as the custom ops
    `namespace::name` with the shared schemas, fake kernels and batching rules. Returns {name: op}."""
    ops = {}
    for name, fn in impls.items():
        op = torch.library.custom_op(f"{namespace}::{name}", fn, mutates_args=(), schema=SCHEMAS[name])
        op.register_fake(FAKES[name])
        ops[name] = op
    vmap.register(namespace)
    return ops


def register_fakes(namespace):
    """Registers the fake kernels and batching rules for ops that C++ defined (the compiled extension)."""
    for name, fake in FAKES.items():
        torch.library.register_fake(f"{namespace}::{name}", fake)
    vmap.register(namespace)
