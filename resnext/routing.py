"""Per-block routing: whether a fused block runs the Triton kernels or PyTorch's own ops.

``resnext.tuning`` times each fused block against the same block on PyTorch (cuDNN) and
records, per block *signature*, which was faster.  A block routed to PyTorch runs its
``_eager_forward``: the unconverted block's ops on the same parameters and buffers, so its
results and ``state_dict`` are those of the model it replaced.

A signature is what the measurement holds for: the block's structure (class and every
convolution's weight shape, stride, padding, groups), the input's device type, shape,
dtype and memory format, the compute dtype under autocast, and train/eval.  Blocks of equal
signature share a decision (they run the same launches on the same sizes).

Hot path: every fused forward asks ``routed_to_pytorch``.  While nothing is routed to
PyTorch and tune-on-first-call is off it costs a function call and two global tests; else one
signature tuple and a dict lookup (~2 us).  ``torch.compile`` reads the same globals (Dynamo
guards on them) and CUDA-graph capture runs the forward, so both take the routed path.
"""
from typing import Callable, Optional

import torch
from torch import nn

# signature -> "ours" | "pytorch": every decision loaded or measured in this process
ROUTES = {}
_ANY_PYTORCH = False  # whether some signature is routed to PyTorch (the hot path's first test)
AUTO = False  # tune-on-first-call (resnext.tuning.enable()): an unknown signature is measured
LOADED = False  # whether the tuning cache was read (resnext.tuning registers the loader)
_LOADER: Optional[Callable[[], None]] = None
_AUTO_TUNER: Optional[Callable[[nn.Module, torch.Tensor, tuple], str]] = None


def set_routes(routes: dict, replace: bool = False) -> None:
    """Record decisions ``{signature: "ours" | "pytorch"}`` (``replace``: forget the others)."""
    global _ANY_PYTORCH
    bad = {v for v in routes.values() if v not in ("ours", "pytorch")}
    if bad:
        raise ValueError(f"a route is 'ours' or 'pytorch', got {sorted(map(repr, bad))}")
    if replace:
        ROUTES.clear()
    ROUTES.update(routes)
    _ANY_PYTORCH = "pytorch" in ROUTES.values()


def set_auto(on: bool) -> None:
    global AUTO
    AUTO = bool(on)


def mark_loaded(loaded: bool = True) -> None:
    global LOADED
    LOADED = loaded


def structure(module: nn.Module) -> tuple:
    """(class name, (weight shape, stride, padding, groups) of every Conv2d inside), kept on
    the module (its ``__dict__``: not a buffer, not in ``state_dict``)."""
    struct = module.__dict__.get("_routing_structure")
    if struct is None:
        convs = tuple((tuple(m.weight.shape), m.stride[0], m.padding[0], m.groups)
                      for m in module.modules() if isinstance(m, nn.Conv2d))
        struct = module.__dict__["_routing_structure"] = (type(module).__name__, convs)
    return struct


def memory_format_of(x: torch.Tensor) -> str:
    if x.is_contiguous():
        return "contiguous"
    return "channels_last" if x.is_contiguous(memory_format=torch.channels_last) else "strided"


def signature(module: nn.Module, x: torch.Tensor) -> tuple:
    """What a routing decision is kept for (see the module's docstring)."""
    dev = x.device.type
    compute = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype
    return (structure(module), dev, tuple(x.shape), x.dtype, memory_format_of(x), compute, module.training)


def routed_to_pytorch(module: nn.Module, x: torch.Tensor) -> bool:
    """Whether ``module`` runs PyTorch's ops for input ``x`` (a measurement said PyTorch is
    faster there); with tune-on-first-call on, an unknown signature is measured first."""
    if not LOADED and _LOADER is not None and not torch.compiler.is_compiling():
        # (a plain file read: no collective on the hot path; under torch.distributed every rank
        # calls resnext.tuning.load() after init_process_group to take rank 0's entry)
        _LOADER()
    if not (_ANY_PYTORCH or AUTO):
        return False
    sig = signature(module, x)
    choice = ROUTES.get(sig)
    if choice is None and AUTO and _AUTO_TUNER is not None and not _capturing(x):
        choice = _AUTO_TUNER(module, x, sig)
    return choice == "pytorch"


def _capturing(x: torch.Tensor) -> bool:
    """Nothing is timed while torch.compile traces or a CUDA graph is being captured."""
    return torch.compiler.is_compiling() or (x.is_cuda and torch.cuda.is_current_stream_capturing())
