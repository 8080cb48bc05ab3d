"""Where kernels run, and the launch configurations they run with.

A tensor goes to a Triton kernel when it lives on a CUDA device, or when it lives on
the CPU and ``TRITON_INTERPRET=1`` was set before Triton was imported (the numpy
interpreter, used by the CPU test suite).  Any other CPU tensor takes the pure-PyTorch
reference path in ``kernels.reference``: slow, but the same numbers.

Recompilation: Triton specialises an integer argument on being 1 or a multiple of 16,
so a batch-dependent size (N, M = N*H*W, row-block counts) would give up to three
binaries per layer as the batch size changes.  Every kernel marks those arguments
``do_not_specialize`` (none of them is a stride, so nothing vectorises on them); the
only batch-dependent choice left is ``conv_config``'s BLOCK_M bucket, so a layer has at
most two binaries per dtype and mode over all batch sizes (tests/test_recompile.py).
"""
import functools
import os
import weakref
from typing import Optional, Tuple

import torch

from . import _targets
from ._targets import Target

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


def use_triton(t: torch.Tensor) -> bool:
    return t.is_cuda or (INTERPRET and t.device.type == "cpu")


def allow_tf32(dtype: torch.dtype) -> bool:
    """fp32 convolutions follow PyTorch's own switch for cuDNN (on by default)."""
    return dtype == torch.float32 and torch.backends.cudnn.allow_tf32


# Host-side integer helpers.  triton.cdiv / triton.next_power_of_2 are constexpr
# functions that cost ~7 us per call from Python (measured here): ~120 calls per bottleneck
# training step made them a large part of its host time.
def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


def _pow2_clamp(n: int, lo: int, hi: int) -> int:
    return max(lo, min(hi, next_power_of_2(max(1, n))))


def memo_call(memo, *args):
    """``memo(*args)`` (a ``functools.lru_cache`` keyed on sizes), or its function uncached when
    an argument has no hash: a symbolic size (a ``SymInt``: torch.export with a dynamic ``Dim``
    runs this code on fake tensors; a memo must not key on it), or a list where an int belongs
    (the function's own checks then say what is wrong)."""
    try:
        return memo(*args)
    except TypeError as err:
        if "unhashable" not in str(err):
            raise
        return memo.__wrapped__(*args)


_DEVICE_TARGETS = {}


def target_of(t: torch.Tensor) -> Target:
    """The target the launch configurations for ``t`` are chosen for: its GPU's description
    (read once per device), the interpreter's for a CPU tensor under TRITON_INTERPRET, else
    the default (cuda:90).  One dict lookup per launch (host time)."""
    index = t.get_device()
    if index < 0:
        return _targets.interpreter_target() if INTERPRET else _targets.default_target()
    target = _DEVICE_TARGETS.get(index)
    if target is None:
        target = _DEVICE_TARGETS[index] = _targets.target_for_device(index)
    return target


def default_launch_target() -> Target:
    """The target when a caller gives none (tests, reports): the interpreter's under
    TRITON_INTERPRET, else the current GPU's, else the default (cuda:90)."""
    if INTERPRET:
        return _targets.interpreter_target()
    if torch.cuda.is_available():
        return _targets.target_for_device(torch.cuda.current_device())
    return _targets.default_target()


def mma_shared_bytes(block_m: int, block_n: int, block_k: int, num_stages: int, elem_bytes: int) -> int:
    """Shared memory of a software-pipelined [BLOCK_M, BLOCK_K] x [BLOCK_K, BLOCK_N] product:
    ``num_stages`` copies of both operand tiles, plus the fp32 accumulator once (the epilogue's
    layout conversion goes through shared memory).  An upper estimate, checked against the
    compiled kernels' ``shared_bytes`` by tests/test_compile_targets.py."""
    return num_stages * (block_m + block_n) * block_k * elem_bytes + block_m * block_n * 4


def fit_stages(target: Target, shared_at, stages: int = 3) -> int:
    """The most pipeline stages (``stages`` down to 1) whose ``shared_at(stages)`` fits the
    target's shared memory per block: sm_86/89/120 have 99 KB, gfx942 64 KB."""
    while stages > 1 and shared_at(stages) > target.shared_per_block:
        stages -= 1
    return stages


def conv_config(M: int, cout: int, cin_g: int, cout_g: int, dtype: torch.dtype = torch.bfloat16,
                target: Optional[Target] = None, kind: str = "fwd") -> dict:
    """The launch configuration of one convolution (a copy each call): the tuned one when
    ``resnext.tuning`` measured this (kind, sizes, dtype, target) on this device (``TUNED``),
    else the design choice ``_conv_config`` (memoised).  ``target``: what the configuration
    must compile and fit on (``target_of(x)``); None: ``default_launch_target()``.  ``kind``:
    "fwd" (eval forward), "fwd_stats" (train forward, statistics epilogue) or "dgrad".
    Callers memoise what they build from it (``config_memo``): not on the hot path."""
    target = target or default_launch_target()
    key = (kind, M, cout, cin_g, cout_g, dtype, target)
    if _RECORDING is not None:
        _RECORDING.append(key)
    tuned = TUNED.get(key) if TUNED else None
    cfg = dict(_conv_config(M, cout, cin_g, cout_g, dtype, target))
    if tuned is not None:
        cfg.update(tuned)
    return cfg


# MULTI_GROUP values (a constexpr of the convolution kernels)
ONE_GROUP, MULTI_GROUP, MULTI_GROUP_FLAT_CHECK = 0, 1, 2


@functools.lru_cache(maxsize=4096)
def _conv_config(M: int, cout: int, cin_g: int, cout_g: int, dtype: torch.dtype, target: Target) -> dict:
    """Block sizes for the implicit-GEMM convolution kernel.

    Rows are output pixels (M = N*Ho*Wo), columns output channels.  A block of
    ``BLOCK_N`` output channels spans ``ceil(BLOCK_N / cout_g)`` groups; the kernel
    multiplies by a block-diagonal weight tile, so ``BLOCK_K`` covers those groups'
    input channels (4 channels per group x 8 groups = one 32-wide ``tl.dot``).  The
    wasted zero products are free: every grouped 3x3 of ResNeXt is memory-bound.
    Chosen by design, not yet by measurement on a GPU (see docs/performance.md; the
    measured choice, where a user tuned, is ``TUNED``).  Two rules
    come from the sm_90 register report (``python -m kernels._compile``): 8 warps above
    64x32 outputs, and K <= 16 channels in fp32 (32 bf16 channels on 128x64 tiles); without
    them 3x3 tiles spilled.  Per target: the pipeline stages that fit its shared memory
    (``fit_stages``), and on sm_100 with Triton < 3.8 the flat NaN/Inf check.
    """
    if target.interpret:  # fewer, larger programs: the interpreter pays per program
        block_m = _pow2_clamp(M, 16, 64)
    else:
        block_m = 128 if M >= 128 * 132 else 64
    block_n = _pow2_clamp(cout, 16, 64 if cout_g >= 64 else 32)
    return _shaped_config(cout, cin_g, cout_g, dtype, target, block_m, block_n)


def _shaped_config(cout: int, cin_g: int, cout_g: int, dtype: torch.dtype, target: Target, block_m: int,
                   block_n: int, num_warps: Optional[int] = None, num_stages: Optional[int] = None) -> dict:
    """The configuration for a (BLOCK_M, BLOCK_N) tile: what follows from it (BLOCK_K, the
    MULTI_GROUP path, the warps, the stages that fit) by the design's rules; ``num_warps`` /
    ``num_stages`` given: those instead (the stages still capped by what fits)."""
    groups_per_block = -(-block_n // cout_g)
    # Blocks that may span several groups need the kernel's exact NaN/Inf path (a NaN
    # input times another group's zero weight is NaN); dense and group-aligned blocks do not.
    multi_group = ONE_GROUP
    if cout_g < cout and cout_g % block_n != 0:
        multi_group = MULTI_GROUP_FLAT_CHECK if target.tcgen05_before_3_8 else MULTI_GROUP
    # K <= 32 channels on the largest tiles and 16 in fp32: wider 3x3 tiles spilled on sm_90
    big = block_m * block_n >= 128 * 64
    k_cap = 16 if dtype == torch.float32 else (32 if big else 64)
    block_k = _pow2_clamp(groups_per_block * cin_g, 16, k_cap)
    if num_warps is None:
        num_warps = 4 if block_m * block_n <= 64 * 32 else 8
    elem = torch.empty((), dtype=dtype).element_size()
    num_stages = fit_stages(target, lambda s: mma_shared_bytes(block_m, block_n, block_k, s, elem),
                            3 if num_stages is None else num_stages)
    return dict(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, MULTI_GROUP=multi_group,
                num_warps=num_warps, num_stages=num_stages)


def conv_candidates(kind: str, M: int, cout: int, cin_g: int, cout_g: int, dtype: torch.dtype,
                    target: Target) -> list:
    """The configurations ``resnext.tuning`` times for one convolution: the design choice
    first, then tiles of half and twice its BLOCK_M / BLOCK_N, 4 or 8 warps, 2 to 4 stages,
    each completed by the design's rules (BLOCK_K, MULTI_GROUP) and kept only if it fits the
    target (shared memory: ``mma_shared_bytes``; the stages are capped, never over).  Under
    the interpreter: the design choice and one other tile (its times mean nothing; the tests
    only need a choice to make).  ``kind`` does not change the candidates (same kernel
    family); it is part of what a measurement is kept for."""
    base = _conv_config(M, cout, cin_g, cout_g, dtype, target)
    bm, bn = base["BLOCK_M"], base["BLOCK_N"]
    n_max = _pow2_clamp(cout, 16, 128)
    if target.interpret:
        shapes = [(bm, bn, None, None), (max(16, bm // 2), bn, None, None), (bm, max(16, bn // 2), None, None)]
    else:  # ~16: the tiles around the design's, and its own tile with other warps and stages
        shapes = [(m, n, None, None) for m in (bm, 64, 128, max(32, bm // 2))
                  for n in (bn, max(16, bn // 2), min(n_max, bn * 2))]
        shapes += [(bm, bn, w, st) for w in (4, 8) for st in (2, 3, 4)]
    out, seen, elem = [], set(), torch.empty((), dtype=dtype).element_size()
    for m, n, warps, stages in shapes:
        cfg = _shaped_config(cout, cin_g, cout_g, dtype, target, m, n, warps, stages)
        fits = mma_shared_bytes(m, n, cfg["BLOCK_K"], cfg["num_stages"], elem) <= target.shared_per_block
        key = tuple(sorted(cfg.items()))
        if fits and key not in seen:
            seen.add(key)
            out.append(cfg)
    return out


# --------------------------------------------------------------------------------------
# Tuned launch configurations (resnext.tuning measures them on the user's device)
# --------------------------------------------------------------------------------------
# conv_config's key (kind, M, cout, cin_g, cout_g, dtype, target) -> the configuration a
# measurement chose there.  Everything built from a configuration is memoised per shape (the
# launch plans: host time), so the memos register with ``config_memo`` and ``set_tuned``
# clears them: a new table is seen by the next launch, and no stale plan survives it.
TUNED = {}
_CONFIG_MEMOS = []
_RECORDING = None  # a list while ``recording_configs`` runs


def config_memo(memo):
    """Register a memo built from launch configurations (an ``lru_cache``d function, or a dict)
    to be cleared when the tuned table changes; returns it (a decorator)."""
    _CONFIG_MEMOS.append(memo.cache_clear if hasattr(memo, "cache_clear") else memo.clear)
    return memo


def clear_config_memos() -> None:
    for clear in _CONFIG_MEMOS:
        clear()


def set_tuned(entries: dict, replace: bool = False) -> None:
    """Add (or with ``replace``, make the whole table) tuned configurations
    ``{conv_config key: config}``; the launch plans are rebuilt from the next launch on."""
    if replace:
        TUNED.clear()
    TUNED.update(entries)
    clear_config_memos()


class recording_configs:
    """``with recording_configs() as keys:`` every ``conv_config`` key a launch asks for in the
    block, in order (the memos are cleared on entry and exit, so each launch asks again)."""

    def __enter__(self):
        global _RECORDING
        clear_config_memos()
        _RECORDING = []
        return _RECORDING

    def __exit__(self, *exc):
        global _RECORDING
        _RECORDING = None
        clear_config_memos()


def rows_config(M: int, C: int) -> dict:
    """Block sizes for elementwise / per-channel kernels over an [M, C] NHWC matrix (memoised; a copy)."""
    return dict(_rows_config(M, C, INTERPRET))


@functools.lru_cache(maxsize=4096)
def _rows_config(M: int, C: int, interpret: bool) -> dict:
    block_c = _pow2_clamp(C, 16, 64)
    block_m = _pow2_clamp(M, 16, 64 if interpret else max(16, 4096 // block_c))
    return dict(BLOCK_M=block_m, BLOCK_C=block_c, num_warps=4)


def eager_or_op(op, impl):
    """The function to call: the custom operator while ``torch.compile`` traces (an opaque
    node with a fake implementation), else its plain implementation.  A custom-op call costs
    ~55 us of host time on top of its body (measured here, torch 2.13), more than the
    kernels of a small layer take on an H100: the eager hot path goes around it."""
    return op if torch.compiler.is_compiling() else impl


class DerivedCache:
    """Tensors derived from others (a packed weight, BN folded into a scale/shift), computed
    again only when a source changes.

    An entry is keyed on each source's storage pointer, version counter, dtype, device and
    shape, so in-place updates (optimizer steps, ``load_state_dict``, ``torch.nn.init``) and
    ``.to()`` / ``.half()`` invalidate it; writes through ``.data`` bypass version counters
    and are not seen.  An entry holds its sources' storages, so their addresses cannot be
    reused while it lives (a weight replaced by ``.to()`` stays allocated until its slot is
    recomputed).  Entries are held per owner object (weakly) and vanish with it.  Under
    ``torch.compile`` nothing is cached: the derivation is traced into the graph.
    """

    instances = []  # every cache made (two: packed weights, eval folds)

    def __init__(self):
        self._entries = {}
        DerivedCache.instances.append(self)

    def values(self):
        """The cached values (tensors, or tuples of them)."""
        return [entry[2] for entry in self._entries.values()]

    @staticmethod
    def _key(sources):
        # (a list, not a generator: this runs per module call, and a generator costs ~1 us more)
        return tuple([None if t is None else (t.data_ptr(), t._version, t.dtype, t.device, t.shape)
                      for t in sources])

    def get(self, owner, sources, tag, make):
        if torch.compiler.is_compiling():
            return make()
        try:
            key = self._key(sources)
        except RuntimeError:  # inference tensors have no version counter
            return make()
        slot = (id(owner), tag)
        entry = self._entries.get(slot)
        if entry is not None and entry[0]() is owner and entry[1] == key:
            return entry[2]
        value = make()
        if entry is None or entry[0]() is not owner:
            weakref.finalize(owner, self._entries.pop, slot, None)
        # The entry keeps its sources' storages alive (detached views): a freed storage's
        # address could be reused by a new tensor at version 0, and the key would then match.
        pinned = tuple(t.detach() for t in sources if t is not None)
        self._entries[slot] = (weakref.ref(owner), key, value, pinned)
        return value

    def clear(self):
        self._entries.clear()


_PER_STREAM = {}


def _per_stream(kind, device: torch.device, n: int, dtype: torch.dtype, make) -> torch.Tensor:
    """A buffer of at least ``n`` elements kept per ``kind``, device and stream (launches on one
    stream run one after another, so each finds it as the last one left it).  While a CUDA
    graph is being captured a new buffer is not kept (its allocation, and a fill, belong to
    the graph)."""
    stream = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else None
    key = (kind, device, stream)  # (the CPU interpreter runs launches in order: one stream)
    buf = _PER_STREAM.get(key)
    if buf is not None and buf.numel() >= n:
        return buf
    buf = make(max(n, 4096), device=device, dtype=dtype)
    if not (device.type == "cuda" and torch.cuda.is_current_stream_capturing()):
        _PER_STREAM[key] = buf
    return buf


def arrival_counters(device: torch.device, n: int, slot: int = 0) -> torch.Tensor:
    """At least ``n`` int32 zeros for ``_triton_helpers.last_arrival`` (one per reduction
    group of a launch; ``slot``: another set, for a launch with two kinds of groups).  Reused:
    every launch leaves them zero, so no launch pays a fill (one at first use)."""
    return _per_stream(("counters", slot), device, n, torch.int32, torch.zeros)


def scratch(device: torch.device, n: int, slot: int = 0) -> torch.Tensor:
    """At least ``n`` fp32 elements of a launch's own scratch (partials written and merged by
    the same launch, never read after it), one buffer per ``slot``: not an allocation per launch
    (host time).  The tests replace this with fresh NaN-filled buffers (tests/conftest.py)."""
    return _per_stream(("scratch", slot), device, n, torch.float32, torch.empty)


def positional_launch_args(kernel, n_operands: int, kwargs: dict) -> Tuple[tuple, dict]:
    """A launch's sizes and constexprs (``kwargs``) split into the positional arguments that
    follow the kernel's first ``n_operands`` parameters (as far as ``kwargs`` has them) and
    the rest, keywords: the same launch, but a tuple goes down Triton's call levels more
    cheaply than ~40 keywords (~3 us of host time per launch, measured here)."""
    names = []
    for name in kernel.arg_names[n_operands:]:
        if name not in kwargs:
            break
        names.append(name)
    return tuple(kwargs[name] for name in names), {k: v for k, v in kwargs.items() if k not in names}


# --------------------------------------------------------------------------------------
# Safe fallback: a kernel that cannot compile or launch on this device
# --------------------------------------------------------------------------------------
# (op, key) -> the first line of the error, for every Triton launch that failed to compile or
# launch (Triton's CompilationError, OutOfResources, PTXASError, an MLIR pass failure): that
# op runs its PyTorch path for that key from then on.  Every launcher follows one pattern:
#
#     if not use_triton(t) or ... or (_runtime.FAILED and _runtime.failed(op, t, *shapes)):
#         return <the PyTorch path>
#     try:
#         kernel[grid](...)
#     except Exception as err:  # a compile/launch failure raises before the kernel runs
#         _runtime.record_failure(err, _runtime.failure_key(op, t, *shapes))
#         return <the PyTorch path>
#
# The hot path only tests whether the dict is empty; the key is built once something failed.
# An op of several launches falls back piece by piece: each failing launch has an exact
# PyTorch equivalent from the same inputs, and a failed launch wrote nothing.
FAILED = {}

# Fused modules named by ``resnext.convert`` (their ``fused_name``: the qualified name in the
# converted model): the backward's warning finds its module through the parameters.
NAMED_MODULES = weakref.WeakSet()


def is_launch_failure(err: BaseException) -> bool:
    """Whether ``err`` says a kernel cannot be built or started here (not a bug of the caller:
    bad arguments, a device error while running, ...)."""
    from triton.compiler.errors import CompilationError
    from triton.runtime import errors
    kinds = (CompilationError, errors.OutOfResources) + tuple(
        getattr(errors, name) for name in ("PTXASError",) if hasattr(errors, name))
    if isinstance(err, kinds):
        return True
    # the MLIR pass manager's failure comes as a plain RuntimeError ("PassManager::run failed")
    return isinstance(err, RuntimeError) and "PassManager::run failed" in str(err)


def first_error_line(err: BaseException) -> str:
    """"Type: first line" of an error (a CompilationError's message, not its source excerpt)."""
    text = getattr(err, "error_message", None) or str(err)
    lines = [ln.strip() for ln in str(text).splitlines() if ln.strip()]
    return f"{type(err).__name__}: {lines[0] if lines else ''}"


def failure_key(op: str, t: torch.Tensor, *shapes) -> tuple:
    """What a failure is recorded for: the op, the device, the dtype and the shapes."""
    return (op, t.device, t.dtype, tuple(t.shape), *(tuple(s) for s in shapes))


def failed(op: str, t: torch.Tensor, *shapes) -> bool:
    """Whether ``op``'s kernel failed to compile or launch for this key (``record_failure``):
    then its PyTorch path, without a new try.  Call it behind ``FAILED and``: the key is
    built only once something failed."""
    return failure_key(op, t, *shapes) in FAILED


def module_name(module: torch.nn.Module) -> str:
    """``layer1.0 (FusedBottleneck)`` for a module ``resnext.convert`` named, else its class."""
    name = module.__dict__.get("fused_name")
    return f"{name} ({type(module).__name__})" if name else type(module).__name__


def failing_module() -> Optional[str]:
    """The module whose call is running the failed launch (only read when a launch failed):
    in a backward, the named fused module that owns a parameter of the autograd node being run
    (its smallest); else the innermost ``nn.Module`` method on the Python stack; None if none."""
    import sys
    node = getattr(torch._C, "_current_autograd_node", lambda: None)()
    if node is not None:
        params, todo, seen = [], [(node, 0)], set()
        while todo:  # the node's inputs, a few levels deep (a cast, a view before the leaf)
            fn, depth = todo.pop()
            if fn is None or id(fn) in seen or depth > 4:
                continue
            seen.add(id(fn))
            if hasattr(fn, "variable"):
                params.append(fn.variable)
            todo += [(nxt, depth + 1) for nxt, _ in fn.next_functions]
        owners = [m for m in list(NAMED_MODULES) if any(p is q for p in m.parameters() for q in params)]
        if owners:
            return module_name(min(owners, key=lambda m: sum(1 for _ in m.parameters())))
        return f"the backward of {node.name()}"
    frame = sys._getframe(1)
    while frame is not None:
        owner = frame.f_locals.get("self")
        if isinstance(owner, torch.nn.Module):
            return module_name(owner)
        frame = frame.f_back
    return None


def record_failure(err: BaseException, key: tuple) -> None:
    """Re-raise ``err`` unless it is a launch failure; else remember ``key`` (its op then takes
    the PyTorch path for it) and warn once, naming the module that ran it (``failing_module``),
    the op, the device, the Triton version and the error's first line."""
    if not is_launch_failure(err):
        raise err
    import warnings

    import triton
    first = first_error_line(err)
    FAILED[key] = first
    device = key[1]
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{device.type} (interpreter)"
    module = failing_module()
    where = f"{module}: " if module else ""
    warnings.warn(f"{where}kernels.{key[0]}: the Triton kernel cannot compile or launch on {device} ({name}) with "
                  f"Triton {triton.__version__} for {key[2]} {list(key[3])}: {first}. That op runs its "
                  f"PyTorch path for this shape and dtype from now on.", RuntimeWarning, stacklevel=3)
