"""Batching rules (torch.vmap) for the recurrence ops of every namespace, written once from the op layouts.

The recurrence is independent across its batch rows, so a vmapped dimension of size N folds into the
batch: gx [N, T, B, G] becomes one call on [T, N*B, G], the same kernels, one launch sequence for the whole
ensemble (torch.nn has no batching rule: pytorch #105982). That holds while the weights are shared; where a
weight is itself vmapped (an ensemble of stacked parameters) or an output sums over the batch (lstm_bwd's
dw_hr), the rule runs the op once per slice instead.

Layouts: "tb" time-major [T, B, ...], "b" batch-major [B, ...], "w" a weight (no batch dimension), None a
non-tensor argument. Outputs of shape [0] (the saved tensors of an inference forward) stay unbatched.
"""

import torch

# op -> (argument layouts, output layouts), in the order of schemas.SCHEMAS.
LAYOUTS = {
    "lstm_fwd": (("tb", "w", "b", "b", "w", "b", "tb", None, None, "w"), ("tb", "b", "b", "tb", "tb")),
    "lstm_bwd": (("tb", "b", "b", "w", "b", "w", "tb", "tb", "b", "tb", None), ("tb", "b", "b", "w")),
    "gru_fwd": (("tb", "w", "w", "b", "b", "tb", None, None, "w"), ("tb", "b", "tb")),
    "gru_bwd": (("tb", "b", "w", "tb", "b", "tb", "b", "tb", None), ("tb", "tb", "b")),
    "rnn_fwd": (("tb", "w", "b", "b", "tb", None, None, "w"), ("tb", "b")),
    "rnn_bwd": (("tb", "b", "w", "tb", "b", "tb", None, None), ("tb", "b")),
}

_BATCH_DIM = {"tb": 1, "b": 0}
# op -> (output, argument): that output is a sum over the batch when that argument is given (lstm_bwd's
# dw_hr = sum over b of dh^T m, present with proj_size), so folding the vmapped dimension would mix samples.
_SUMS_OVER_BATCH = {"lstm_bwd": (3, 5)}


def _fold(arg, layout, bdim, n):
    """The argument with the vmapped dimension folded into its batch dimension (broadcast if unbatched)."""
    d = _BATCH_DIM[layout]
    if bdim is None:
        arg = arg.unsqueeze(d).expand(*arg.shape[:d], n, *arg.shape[d:])
    else:
        arg = arg.movedim(bdim, d)
    return arg.flatten(d, d + 1).contiguous()


def _unfold(out, layout, n):
    """An output of a folded call, split back into [N, ...] at its batch position; (tensor, out_dim)."""
    if out.dim() == 1 and out.numel() == 0:  # an unsaved output
        return out, None
    d = _BATCH_DIM[layout]
    return out.unflatten(d, (n, out.shape[d] // n)), d


def _per_slice(op, n, in_dims, args):
    """The op once per slice of the vmapped dimension, results stacked on dim 0."""
    results = []
    for k in range(n):
        sliced = [a.select(d, k) if d is not None else a for a, d in zip(args, in_dims)]
        results.append(op(*sliced))
    outputs = tuple(torch.stack(parts) for parts in zip(*results))
    return outputs, (0,) * len(outputs)


def make_rule(name, op):
    arg_layouts, out_layouts = LAYOUTS[name]

    def rule(info, in_dims, *args):
        n = info.batch_size
        batched_weight = any(l == "w" and d is not None for l, d in zip(arg_layouts, in_dims))
        sums_over_batch = name in _SUMS_OVER_BATCH and args[_SUMS_OVER_BATCH[name][1]] is not None
        if batched_weight or sums_over_batch:
            return _per_slice(op, n, in_dims, args)
        folded = [_fold(a, l, d, n) if l in _BATCH_DIM and a is not None else a
                  for a, l, d in zip(args, arg_layouts, in_dims)]
        outputs = [_unfold(o, l, n) for o, l in zip(op(*folded), out_layouts)]
        return tuple(o for o, _ in outputs), tuple(d for _, d in outputs)

    return rule


def register(namespace):
    """Registers the batching rule of every recurrence op in `namespace` (ops already defined)."""
    for name in LAYOUTS:
        op = getattr(getattr(torch.ops, namespace), name).default
        torch.library.register_vmap(op, make_rule(name, op))
