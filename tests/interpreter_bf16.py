"""bfloat16 in Triton's CPU interpreter, with the GPU's semantics (test support only).

What the stock interpreter does (Triton 3.6.0, 3.8.0 and 3.9.0 alike, ``triton/runtime/interpreter.py``)
-----------------------------------------------------------------------------------------
``_get_np_dtype`` maps ``tl.bfloat16`` to ``np.uint16``: a bf16 tensor is held as its raw bits.
Casts fp32 <-> bf16 go through ``_convert_float`` (bit manipulation); everything else is numpy
on the uint16 bits.  Measured (Triton 3.9, numpy 2.4):

* ``.to(tl.bfloat16)`` from fp32: ``cast_impl`` calls ``_convert_float(..., rounding_mode=None)``,
  which *truncates* (1 ulp low, e.g. 0.031 at magnitude 4).  Its "RTNE" branch (used by
  ``create_fp_to_fp``) rounds half up and lets a mantissa carry spill into the exponent's bit.
* ``tl.dot`` of bf16 tiles: ``np.matmul`` of the uint16 bits (errors of 1e10).
* bf16 ``+``, ``*``, ``tl.maximum``, comparisons, ``tl.sum``: integer arithmetic on the bits
  (NaN, wrap-around, nonsense orderings for negative numbers).
* fp16 <-> bf16 and int <-> bf16: ``astype`` between integers and uint16 bits.

What the GPU does (checked in Triton's source and in the sm_90 PTX of 3.6, 3.8 and 3.9 compiled
offline: test_interpreter_bf16.py reads the PTX of the installed version)
---------------------------------------------------------------------------------------------
* ``x.to(tl.bfloat16)`` (``language/semantic.py`` ``cast``): the default
  ``fp_downcast_rounding=None`` emits ``arith.truncf``, which the NVIDIA backend lowers to
  ``cvt.rn.bf16.f32`` (``ElementwiseOpToLLVM.cpp``, ``FpToFpOpConversion``): round to nearest
  even.  ``fp_downcast_rounding="rtz"`` emits ``tt.fp_to_fp`` with RTZ (``cvt.rz``).  fp16 <-> bf16
  goes through fp32 (``cast``: "bf16 <=> (not fp32)").  bf16 -> fp32 is exact (``arith.extf``).
* Elementwise arithmetic on bf16 operands stays in bf16 (``computation_type_impl`` returns bf16
  for bf16 operands except for ``/`` and ``%``, which go to fp32): sm_90 PTX has ``add.bf16``,
  ``fma.rn.bf16``, ``max.bf16`` (sm_80: ``fma.rn.bf16``, ``max.bf16``), no fp32 detour.  For +, -,
  * (and / or sqrt in fp32) that is the correctly rounded bf16 result, which is what ml_dtypes'
  ufuncs compute: fp32 arithmetic then round to nearest even (fp32's 24 bits exceed 2 * 8 + 2, so
  the double rounding is innocuous).  Min/max and comparisons are exact.  ``tl.maximum`` /
  ``tl.minimum`` default to ``propagate_nan=NONE`` (``max.bf16``: NaN loses, as ``np.fmax``;
  Triton 3.6's interpreter uses ``np.maximum`` there for every dtype, fixed in 3.8: left alone).
* Not modelled: Triton's default FP fusion (``TRITON_DEFAULT_FP_FUSION``, on in 3.6-3.9)
  contracts a bf16 ``a * b + c`` into one ``fma.rn.bf16`` (one rounding; seen in the sm_90 PTX),
  where the interpreter rounds the product and the sum (at most one bf16 ulp apart; fp32 has
  the same difference in the stock interpreter).
* ``tl.dot(bf16, bf16)`` accumulates in fp32 (``out_dtype=tl.float32``; ``mma``/``wgmma`` with
  f32 accumulators): exact products, fp32 sums.
* ``tl.sum`` of bf16 (``language/standard.py`` ``_pick_sum_dtype``) promotes only integers
  narrower than 32 bits: a bf16 sum is a tree of bf16 additions, each rounded to bf16 (the
  reduction order differs between the GPU and numpy's pairwise sum: equal within
  accumulation-order error, not bit for bit).  ``tl.max``/``tl.min`` are exact.

What this patch changes (nothing else)
--------------------------------------
* ``interpreter._get_np_dtype``: ``tl.bfloat16`` -> ``ml_dtypes.bfloat16``, a real numpy type
  whose ufuncs (add, multiply, maximum, comparisons, ``np.sum``...) compute in fp32 and round to
  nearest even, i.e. the GPU's semantics above.  Loads and stores move the same 2-byte bits.
* ``InterpreterBuilder.create_masked_load`` / ``create_masked_store`` for bf16 pointers: the C++
  ``_interpreter.load``/``store`` accept numpy's own dtypes only, so they move the uint16 bits and
  the patch views them as ``ml_dtypes.bfloat16``.
* ``InterpreterBuilder.cast_impl`` (``create_fp_trunc``/``fp_ext``/``si_to_fp``/``fp_to_si``...)
  and ``create_fp_to_fp`` when bf16 is the source or the destination: exact upcasts; downcasts
  correctly rounded to nearest even (from fp64 and int64 too, through a round-to-odd fp32
  step), or toward zero when RTZ is asked for; NaN stays NaN.  fp8 <-> bf16 keeps the stock code.
* ``InterpreterBuilder.create_fma`` with bf16 operands: one rounding (as ``fma.rn.bf16``).
* ``InterpreterBuilder.create_dot`` with bf16 operands: the operands upcast exactly to fp32 and
  ``np.matmul`` in fp32 (the accumulator's dtype).

``install()`` applies it once, only under ``TRITON_INTERPRET=1``, before any kernel module is
imported (``tests/conftest.py``).  On a Triton version outside ``VERIFIED`` it checks that the
patched functions still exist and runs a self-check (``status()``); the bf16 tests then fail
loudly through ``require()`` instead of running with wrong numbers.
"""
import os

import numpy as np

try:
    import ml_dtypes
except ImportError:  # the bf16 tests fail through require() with this message
    ml_dtypes = None

VERIFIED = ("3.6", "3.8", "3.9")  # Triton major.minor whose interpreter this patch was written against
_PATCHED = ("create_masked_load", "create_masked_store", "cast_impl", "create_fp_to_fp", "create_fma", "create_dot")

_state = {"installed": False, "message": "not installed (TRITON_INTERPRET is not 1)"}


def status():
    """(ok, message): whether bf16 runs in the interpreter with the GPU's semantics."""
    return _state["installed"], _state["message"]


def require():
    """Fail (not skip) the calling test when the interpreter is on but bf16 is not patched."""
    import pytest
    if os.environ.get("TRITON_INTERPRET", "0") == "1" and not _state["installed"]:
        pytest.fail(f"bf16 in Triton's interpreter: {_state['message']}", pytrace=False)


# ---------------------------------------------------------------------------------------
# Conversions (numpy only; also used by the tests as the reference for rounding)
# ---------------------------------------------------------------------------------------
def _f32_round_to_odd(x64):
    """float64 -> float32 rounded to odd (truncate, then set the last bit if inexact): a
    following round to nearest even at fewer than 23 bits is then correctly rounded."""
    x64 = np.asarray(x64, dtype=np.float64)
    with np.errstate(over="ignore", invalid="ignore"):
        t = x64.astype(np.float32)
        back = t.astype(np.float64)
        inexact = (back != x64) & np.isfinite(x64)
        toward_zero = inexact & (np.abs(back) > np.abs(x64))
        t = np.where(toward_zero, np.nextafter(t, np.float32(0)), t)
    bits = t.view(np.uint32) | inexact.astype(np.uint32)
    return bits.view(np.float32)


def bf16_bits_from_f32(x32, rtz=False):
    """uint16 bits of float32 values rounded to bfloat16: to nearest even (``cvt.rn.bf16.f32``)
    or toward zero (``cvt.rz.bf16.f32``); NaN stays a quiet NaN with its sign."""
    u = np.ascontiguousarray(x32, dtype=np.float32).view(np.uint32)
    nan = (u & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000)
    if rtz:
        r = u >> np.uint32(16)
    else:
        r = (u + np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16)
    r = np.where(nan, (u >> np.uint32(16)) | np.uint32(0x0040), r)
    return r.astype(np.uint16)


def to_bf16(data, rtz=False):
    """Any numpy float/int array -> ml_dtypes.bfloat16 array, correctly rounded."""
    data = np.asarray(data)
    if data.dtype == _BF16:
        return data
    if data.dtype == np.float32:
        x32 = data
    elif data.dtype in (np.float16, np.bool_, np.int8, np.uint8, np.int16, np.uint16):
        x32 = data.astype(np.float32)  # exact
    else:  # float64, 32/64-bit integers: one correct rounding, not two
        x64 = data.astype(np.float64)
        x32 = x64.astype(np.float32) if rtz else _f32_round_to_odd(x64)
        if rtz:  # float64 -> float32 rounds to nearest: step back toward zero where it went up
            with np.errstate(invalid="ignore"):
                up = np.abs(x32.astype(np.float64)) > np.abs(x64)
            x32 = np.where(up, np.nextafter(x32, np.float32(0)), x32)
    return bf16_bits_from_f32(x32, rtz).view(_BF16)


_BF16 = np.dtype(ml_dtypes.bfloat16) if ml_dtypes is not None else None


# ---------------------------------------------------------------------------------------
# The patch
# ---------------------------------------------------------------------------------------
def install():
    """Patch Triton's interpreter (idempotent).  Call before any @triton.jit module is imported."""
    if _state["installed"] or os.environ.get("TRITON_INTERPRET", "0") != "1":
        return status()
    if ml_dtypes is None:
        _state["message"] = "ml_dtypes is not installed (pip install ml_dtypes; setup.py's test extra)"
        return status()
    import triton
    import triton.language as tl
    from triton.runtime import interpreter as interp

    version = ".".join(triton.__version__.split(".")[:2])
    builder = getattr(interp, "InterpreterBuilder", None)
    missing = [n for n in ("_get_np_dtype", "TensorHandle", "InterpreterBuilder") if not hasattr(interp, n)]
    missing += [f"InterpreterBuilder.{n}" for n in _PATCHED if builder is not None and not hasattr(builder, n)]
    if missing:
        _state["message"] = f"Triton {triton.__version__}: interpreter lacks {', '.join(missing)}; patch not applied"
        return status()
    if interp._get_np_dtype(tl.bfloat16) != np.dtype(np.uint16):
        _state["message"] = (f"Triton {triton.__version__}: the interpreter no longer stores bf16 as uint16 "
                             f"({interp._get_np_dtype(tl.bfloat16)}); re-check this patch against it")
        return status()

    TensorHandle = interp.TensorHandle
    stock_get_np_dtype = interp._get_np_dtype
    stock = {n: getattr(builder, n) for n in _PATCHED}

    def is_bf16(tt):
        return tt.scalar == tl.bfloat16

    def _get_np_dtype(tt_dtype):
        if not isinstance(tt_dtype, tl.pointer_type):
            scalar = tt_dtype.element_ty if isinstance(tt_dtype, tl.block_type) else tt_dtype
            if scalar == tl.bfloat16:
                return _BF16
        return stock_get_np_dtype(tt_dtype)

    def convert(data, src, dst, rtz=False):
        """bf16 on one side: upcasts exact, downcasts correctly rounded."""
        if is_bf16(dst):
            if is_bf16(src):
                return data
            return to_bf16(data, rtz)
        # bf16 -> anything: exact fp32 first (fp16: numpy rounds to nearest even; ints truncate
        # toward zero as fptosi does)
        return data.astype(np.float32).astype(_get_np_dtype(dst))

    def create_masked_load(self, ptrs, mask, other, *rest):
        # the C++ load (_interpreter.load) knows numpy's own dtypes only: move uint16 bits
        if is_bf16(ptrs.get_element_ty()):
            bits = np.zeros_like(ptrs.data, dtype=np.uint16) if other is None else other.data.view(np.uint16)
            ret = interp._interpreter.load(ptrs.data, mask.data, bits, np.dtype(np.uint16))
            return TensorHandle(ret.view(_BF16), ptrs.get_element_ty())
        return stock["create_masked_load"](self, ptrs, mask, other, *rest)

    def create_masked_store(self, ptrs, value, mask, *rest):
        if value.data.dtype == _BF16:
            value = TensorHandle(value.data.view(np.uint16), value.dtype)
        return stock["create_masked_store"](self, ptrs, value, mask, *rest)

    def cast_impl(self, src, dst_type):
        if is_bf16(src.dtype) or is_bf16(dst_type):
            return TensorHandle(convert(src.data, src.dtype, dst_type), dst_type.scalar)
        return stock["cast_impl"](self, src, dst_type)

    def create_fp_to_fp(self, src, dst_type, rounding_mode):
        fp8 = src.dtype.scalar.primitive_bitwidth == 8 or dst_type.scalar.primitive_bitwidth == 8
        if (is_bf16(src.dtype) or is_bf16(dst_type)) and not fp8:
            rtz = rounding_mode is not None and rounding_mode == interp._ir.ROUNDING_MODE.RTZ
            return TensorHandle(convert(src.data, src.dtype, dst_type, rtz), dst_type.scalar)
        return stock["create_fp_to_fp"](self, src, dst_type, rounding_mode)

    def create_fma(self, x, y, z):
        if is_bf16(z.dtype):
            # bf16 x bf16 is exact in float64 and so is the sum with a bf16 addend unless their
            # exponents are ~40 apart; then one correct rounding (fma.rn.bf16)
            acc = np.add(np.multiply(x.data.astype(np.float64), y.data.astype(np.float64)),
                         z.data.astype(np.float64))
            return TensorHandle(to_bf16(acc), z.dtype.scalar)
        return stock["create_fma"](self, x, y, z)

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        if is_bf16(a.dtype) or is_bf16(b.dtype):
            acc = np.matmul(a.data.astype(np.float32), b.data.astype(np.float32), dtype=np.float32)
            out = acc + d.data.astype(np.float32)
            if d.data.dtype != np.float32:
                out = convert(out, tl.float32, d.dtype) if is_bf16(d.dtype) else out.astype(d.data.dtype)
            return TensorHandle(out, d.dtype.scalar)
        return stock["create_dot"](self, a, b, d, input_precision, max_num_imprecise_acc)

    interp._get_np_dtype = _get_np_dtype
    for name, fn in (("create_masked_load", create_masked_load), ("create_masked_store", create_masked_store),
                     ("cast_impl", cast_impl), ("create_fp_to_fp", create_fp_to_fp),
                     ("create_fma", create_fma), ("create_dot", create_dot)):
        fn.__qualname__ = f"InterpreterBuilder.{name} (tests/interpreter_bf16.py)"
        setattr(builder, name, fn)
    _state["installed"] = True
    _state["stock"] = stock  # the replaced builder methods (the mutation tests use them)
    _state["message"] = (f"Triton {triton.__version__}: bf16 -> ml_dtypes.bfloat16 {ml_dtypes.__version__}, "
                         "round-to-nearest-even casts, fp32-accumulated bf16 dots")
    if version not in VERIFIED:
        problem = _self_check()
        if problem:
            _state["installed"] = False
            _state["message"] = (f"Triton {triton.__version__} is not one of {VERIFIED} and the patched "
                                 f"interpreter fails its self-check: {problem}")
        else:
            _state["message"] += f" (Triton {version} unverified: self-check passed)"
    return status()


def _self_check():
    """A small bf16 kernel through the patched interpreter (for Triton versions not in VERIFIED):
    None if it gives the GPU's bits, else what went wrong."""
    import torch
    import triton
    import triton.language as tl

    @triton.jit
    def probe(x_ptr, y_ptr, f_ptr, out_ptr, cast_ptr, dot_ptr, N: tl.constexpr):
        i = tl.arange(0, N)
        x = tl.load(x_ptr + i)                                  # bf16
        y = tl.load(y_ptr + i)
        tl.store(cast_ptr + i, tl.load(f_ptr + i).to(tl.bfloat16))  # fp32 -> bf16 rounding
        tl.store(out_ptr + i, tl.maximum(x + y, x * y))        # bf16 add, mul, max
        a = tl.load(x_ptr + i[:, None] * 0 + i[None, :])
        b = tl.load(y_ptr + i[:, None] + i[None, :] * 0)
        tl.store(dot_ptr + i[:, None] * N + i[None, :], tl.dot(a, b))

    n = 16
    g = torch.Generator().manual_seed(0)
    x, y = (torch.randn(n, generator=g) * 4).bfloat16(), torch.randn(n, generator=g).bfloat16()
    f = torch.randn(n, generator=g) * 3
    out, cast, dot = torch.empty(n, dtype=torch.bfloat16), torch.empty(n, dtype=torch.bfloat16), torch.empty(n, n)
    try:
        probe[(1,)](x, y, f, out, cast, dot, N=n)
    except Exception as e:  # noqa: BLE001 - reported, not hidden
        return f"{type(e).__name__}: {e}"
    if not torch.equal(cast.view(torch.int16), f.bfloat16().view(torch.int16)):
        return "fp32 -> bf16 casts differ from PyTorch's (round to nearest even)"
    if not torch.equal(out.view(torch.int16), torch.maximum(x + y, x * y).view(torch.int16)):
        return "bf16 add/mul/max differ from PyTorch's"
    want_dot = x.float()[None, :].expand(n, n) @ y.float()[:, None].expand(n, n)
    if not torch.allclose(dot, want_dot, rtol=1e-5, atol=1e-5):
        return "tl.dot differs from an fp32 product"
    return None
