"""Counting device operations: how many kernels a step asks the device to run.

``count_device_ops(fn)`` runs ``fn()`` once under ``torch.profiler`` (CPU activity only, so
it works the same with or without a GPU) and walks the event tree of that call:

* every Triton launch counts 1.  While counting, ``JITFunction.run`` (and, under
  ``TRITON_INTERPRET=1``, ``InterpretedFunction.run``) run each launch inside a
  ``record_function("triton::<kernel>")``; the subtree of that event is not descended
  into (the interpreter's own host copies are no device work);
* every ``aten::`` event that launches device work counts 1, and its subtree is not
  descended into (a ``conv2d`` is one operation, whatever it calls);
* ``aten::`` ops in ``NO_DEVICE_WORK`` (views, metadata, allocations) count 0 and launch
  nothing below them: skipped;
* ``aten::`` ops in ``COMPOSITE`` count what their children count (``x.contiguous()`` of a
  contiguous tensor has no child: 0; of an NCHW tensor, its ``clone``: 1);
* anything else (our ``resnext::`` custom ops, autograd engine nodes, ``record_function``
  ranges, ``Optimizer.step``) is descended into.

A ``TorchDispatchMode`` is not enough for this: it is popped while a custom op's body runs,
so it misses every aten op issued there (it counted 634 where the profiler counts 787 on
stages 1-2 of ResNeXt-50, /work/shared/NOTES.md).

``launches("noop")`` replaces every Triton launch by a no-op (still counted): with
``forced_triton_path()`` the fused modules take their Triton path on CPU tensors without
running any kernel, so a ResNeXt-101 training step is counted (or its host time measured)
in a second on a CPU.  Outputs of no-op launches are uninitialised memory: only the number
of operations and the host time mean anything then.
"""
import collections
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Counter, Iterator, List

import torch

# Count 0 and launch nothing: views, metadata and allocation ops (their subtrees hold
# only more of the same).  An op that may sync the host (``item``) is NOT here: it counts.
NO_DEVICE_WORK = frozenset({
    # views
    "view", "_unsafe_view", "as_strided", "permute", "expand", "unsqueeze", "squeeze", "select", "slice",
    "t", "transpose", "numpy_T", "detach", "alias", "_reshape_alias", "unfold", "split", "split_with_sizes",
    "chunk", "unbind", "narrow", "diagonal", "movedim", "view_as_real", "view_as_complex", "_view",
    "as_strided_", "squeeze_", "unsqueeze_", "t_", "transpose_", "detach_",
    # metadata, allocation without initialisation
    "lift_fresh", "empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "resize_",
    "resize_as_", "set_", "result_type", "size", "stride", "dim", "numel", "is_same_size", "is_complex",
    "is_floating_point", "_has_compatible_shallow_copy_type", "_shape_as_tensor",
})

# Count only what their children count (each either dispatches to other aten ops or does
# nothing): e.g. ``to`` without a dtype/device/layout change, ``contiguous`` of a contiguous
# tensor, ``reshape`` that is a view.  ``_to_copy`` and ``clone`` copy: they count.
COMPOSITE = frozenset({
    "to", "contiguous", "reshape", "reshape_as", "flatten", "type_as", "expand_as", "view_as",
    "item", "is_nonzero", "linear", "matmul", "dropout", "feature_dropout",
})

TRITON_PREFIX = "triton::"


@dataclass
class DeviceOps:
    """Device operations of one call: ``total = triton + aten``; ``by_name`` counts each op."""
    total: int
    triton: int
    aten: int
    by_name: Counter = field(default_factory=collections.Counter)

    def as_dict(self, top: int = 0) -> dict:
        names = self.by_name.most_common(top or None)
        return dict(total=self.total, triton=self.triton, aten=self.aten, by_name=dict(names))

    def table(self, top: int = 0) -> str:
        rows = self.by_name.most_common(top or None)
        width = max([len(n) for n, _ in rows] + [10])
        lines = [f"device ops: {self.total} ({self.triton} Triton launches + {self.aten} aten ops)"]
        lines += [f"  {n.ljust(width)}  {c:5d}" for n, c in rows]
        left = len(self.by_name) - len(rows)
        if left > 0:
            lines.append(f"  ... and {left} more op names")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()


# ----------------------------------------------------------------------------------------
# Triton launches
# ----------------------------------------------------------------------------------------
def _launch_classes() -> List[type]:
    """The classes whose ``run`` is one launch: ``JITFunction`` and, when present,
    the interpreter's ``InterpretedFunction`` (what ``@triton.jit`` gives under TRITON_INTERPRET=1)."""
    from triton.runtime import jit
    classes = [jit.JITFunction]
    try:
        from triton.runtime import interpreter
        if hasattr(interpreter, "InterpretedFunction"):
            classes.append(interpreter.InterpretedFunction)
    except ImportError:  # pragma: no cover  (older Triton without the interpreter)
        pass
    return classes


def kernel_name(kernel) -> str:
    fn = getattr(kernel, "fn", None)
    return getattr(fn, "__name__", None) or getattr(kernel, "__name__", None) or type(kernel).__name__


@contextmanager
def launches(mode: str = "count") -> Iterator[None]:
    """Patch the Triton launch classes (class-level, restored on exit).

    ``count``: each launch runs inside ``record_function("triton::<kernel>")``;
    ``noop``: the same, but the kernel does not run (the launch returns None); outside a
    profiler nothing is recorded, so host timings carry no profiler cost.  Triton's own
    launcher work (binding arguments, ~tens of us a launch on a GPU) is left out too: it
    cannot run without a GPU.
    """
    if mode not in ("count", "noop"):
        raise ValueError(f"mode must be 'count' or 'noop', got {mode!r}")
    saved = []
    for cls in _launch_classes():
        orig = cls.__dict__.get("run")
        if orig is None:  # inherited: patch on this class, delete afterwards
            orig_fn, had = cls.run, False
        else:
            orig_fn, had = orig, True

        def run(self, *args, _orig=orig_fn, **kwargs):
            if kwargs.get("warmup", False):  # compiles only: no launch
                return _orig(self, *args, **kwargs)
            if mode == "noop" and not torch.autograd.profiler._is_profiler_enabled:
                return None  # timing the host, not counting: no record_function cost either
            with torch.profiler.record_function(TRITON_PREFIX + kernel_name(self)):
                if mode == "noop":
                    return None
                return _orig(self, *args, **kwargs)

        saved.append((cls, orig, had))
        cls.run = run
    try:
        yield
    finally:
        for cls, orig, had in reversed(saved):
            if had:
                cls.run = orig
            else:
                del cls.run


@contextmanager
def forced_triton_path(on: bool = True) -> Iterator[None]:
    """``kernels._runtime.INTERPRET = on`` while inside: with ``on``, ``kernels.use_triton`` is
    true for CPU tensors (pair it with ``launches("noop")`` when Triton cannot run them);
    with ``on=False``, CPU tensors take the PyTorch reference path even under TRITON_INTERPRET=1."""
    from kernels import _runtime
    before = _runtime.INTERPRET
    _runtime.INTERPRET = on
    try:
        yield
    finally:
        _runtime.INTERPRET = before


@contextmanager
def host_only() -> Iterator[None]:
    """Device work left out: the Triton path forced, every launch a no-op (CPU tensors)."""
    with forced_triton_path(True), launches("noop"):
        yield


# ----------------------------------------------------------------------------------------
# The counter
# ----------------------------------------------------------------------------------------
def _walk(evt, counts: Counter) -> None:
    name = evt.name
    if name.startswith(TRITON_PREFIX):
        counts[name] += 1
        return  # the interpreter's host copies inside are no device work
    if name.startswith("aten::"):
        op = name[len("aten::"):]
        if op in NO_DEVICE_WORK:
            return
        if op not in COMPOSITE:
            counts[name] += 1
            return
    for child in evt.cpu_children:
        _walk(child, counts)


def count_events(events) -> DeviceOps:
    """Count the device operations of a profiler's ``FunctionEvent`` list (roots: no ``cpu_parent``)."""
    counts: Counter = collections.Counter()
    for evt in events:
        if evt.cpu_parent is None:
            _walk(evt, counts)
    triton = sum(c for n, c in counts.items() if n.startswith(TRITON_PREFIX))
    total = sum(counts.values())
    return DeviceOps(total, triton, total - triton, counts)


def count_device_ops(fn: Callable[[], object], noop_launches: bool = False) -> DeviceOps:
    """Run ``fn()`` once under the profiler and count its device operations (rules above).

    ``noop_launches``: Triton launches are counted but not run (see ``launches``).
    """
    from torch.profiler import ProfilerActivity, profile
    with launches("noop" if noop_launches else "count"):
        with profile(activities=[ProfilerActivity.CPU], record_shapes=False, with_stack=False,
                     profile_memory=False) as prof:
            fn()
    return count_events(prof.events())
