"""Backend registry: which recurrence kernels run where.

A backend is a module that defines `OPS` (op name -> callable, the six ops of docs/contract.md) and
`devices()` (the device types it can run on, here and now). Modules are imported lazily so that a
missing optional dependency (triton, the compiled extension) only removes that backend.
"""

import importlib
import warnings

import torch

_MODULES = {
    "reference": "fastrnn.backends.reference",
    "cpu": "fastrnn.backends.native",
    "cuda": "fastrnn.backends.native",
    "triton": "fastrnn.backends.triton",
}
# The device type each backend name is for (None: any device).
_DEVICE_OF = {"reference": None, "cpu": "cpu", "cuda": "cuda", "triton": None}

# backend="auto" on each device type, fastest first; see docs/benchmarks.md for the measurements.
AUTO_ORDER = {"cpu": ("cpu", "reference"), "cuda": ("cuda", "triton", "reference")}

BACKENDS = tuple(_MODULES)
_loaded = {}
_warned = set()
# (name, device type) -> the backend resolve() chose: what a backend can run on does not change within a
# process, and the modules call resolve() on every forward (a few us each, visible at small sizes).
_resolved = {}


class BackendUnavailable(RuntimeError):
    pass


def _module(name):
    if name not in _MODULES:
        raise ValueError(f"fastrnn: unknown backend {name!r}; expected 'auto' or one of {list(BACKENDS)}")
    if name not in _loaded:
        try:
            mod = importlib.import_module(_MODULES[name])
            if not (hasattr(mod, "OPS") and hasattr(mod, "devices")):
                raise ImportError(f"{mod.__name__} defines no OPS/devices()")
            _loaded[name] = mod
        except ImportError as e:
            _loaded[name] = e
    mod = _loaded[name]
    if isinstance(mod, ImportError):
        raise BackendUnavailable(f"fastrnn: backend {name!r} is not available: {mod}") from mod
    return mod


def _runs_on(name, device_type):
    """Whether backend `name` can run on `device_type` here (raises BackendUnavailable if not built)."""
    wanted = _DEVICE_OF[name]
    return (wanted is None or wanted == device_type) and device_type in _module(name).devices()


def available_backends(device_type=None):
    """The backends this machine can run (on `device_type`, or on any device it has)."""
    names = []
    for name in BACKENDS:
        types = [device_type] if device_type else ["cpu", "cuda"]
        try:
            if any(_runs_on(name, t) for t in types):
                names.append(name)
        except BackendUnavailable:
            pass
    return names


def resolve(name, device):
    """The concrete backend for `name` ('auto' or a backend name) on `device`; raises if it cannot run there."""
    device_type = device.type if isinstance(device, torch.device) else torch.device(device).type
    return _resolve_cached(name, device_type)


@torch.compiler.assume_constant_result
def _resolve_cached(name, device_type):
    # Dynamo calls this eagerly and takes the result as a constant (no tracing): a compiled first call
    # would otherwise meet importlib (a function Dynamo refuses) and the cache's dict (a guard that the
    # cache's own filling would fail on the next call, recompiling). What a backend can run on does not
    # change within a process, so the constant stays true.
    key = (name, device_type)
    if key not in _resolved:
        _resolved[key] = _resolve(name, device_type)
    return _resolved[key]


def _resolve(name, device_type):
    if name == "auto":
        for candidate in AUTO_ORDER.get(device_type, ("reference",)):
            try:
                if _runs_on(candidate, device_type):
                    return candidate
            except BackendUnavailable as e:
                if candidate not in _warned:
                    _warned.add(candidate)
                    warnings.warn(f"{e}; backend='auto' uses the next one", stacklevel=4)
        raise AssertionError("the reference backend runs everywhere")
    if not _runs_on(name, device_type):
        raise ValueError(
            f"fastrnn: backend {name!r} cannot run on {device_type} tensors here; "
            f"available on {device_type}: {available_backends(device_type)}"
        )
    return name


def ops(name):
    """The op table of a concrete backend name."""
    return _module(name).OPS
