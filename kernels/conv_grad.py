"""Backward of the (grouped) KxK convolution: data gradient and weight gradient, NHWC inside.

Forward (see ``conv_bn_act``), for output pixel m = (n, oh, ow) and output channel co of
group g::

    z[m, co] = sum_{kh, kw, ci in group g} a[n, oh*s - p + kh, ow*s - p + kw, ci]
               * w[co, ci - g*Cin_g, kh, kw]

Data gradient (``conv_dgrad``): an implicit GEMM over the NHWC rows of dx.  Input pixel
(ih, iw) receives, through tap (kh, kw), from output pixel ``oh = (ih + p - kh) / s`` when
that division is exact and ``0 <= oh < Ho`` (same for w).  With stride s the pixels are
split into s*s parity classes ``(ih % s, iw % s)`` (a grid axis): inside one class the
exactness of the division depends only on the tap, so a program skips the taps that
cannot contribute with one scalar test instead of multiplying masked zeros; e.g. stride 2
with a 3x3 kernel does 9 tap-GEMMs over 4 classes instead of 36.  No zero-inserted
tensor is ever built.  Grouped convolutions use the forward's block-diagonal trick with
the roles swapped: a program owns ``BLOCK_N`` input channels, possibly spanning several
groups, and K runs over those groups' output channels against a weight tile that is
zero across groups, so ``tl.dot`` always has K, N >= 16.

Weight gradient (``conv_wgrad``): ``dw[co, ci, kh, kw] = sum_m dz[m, co] * a[m + tap, ci]``
is a GEMM whose reduction runs over the N*Ho*Wo pixels.  That reduction is split over
programs (a grid axis); each writes fp32 partials to its own slice of a
``[splits, Cout, Cin_g, k, k]`` buffer, and the last split of each tile to finish (an
integer counter elects it, ``_triton_helpers.last_arrival``) sums them in split order and
writes dw in the weight's memory layout: one launch, no float atomics, so the result is
bit-identical run to run.
"""
import functools
from typing import Optional, Sequence, Tuple

import torch
import triton
import triton.language as tl


from . import _runtime, reference
from ._runtime import allow_tf32, arrival_counters, cdiv, conv_config, positional_launch_args, _pow2_clamp, use_triton
from ._runtime import Target, target_of
from ._triton_helpers import bn_stats_backward, has_nonfinite, last_arrival, mma
from .bn_backward import StatsGrad
from .weights import weight_operand, weight_strides

Tensor = torch.Tensor


# --------------------------------------------------------------------------------------
# Data gradient
# --------------------------------------------------------------------------------------
@triton.jit
def _stats_terms(offs, ok, mean_ptr, var_ptr, dscale_ptr, dshift_ptr, gamma_ptr, count, eps,
                 HAS_GAMMA: tl.constexpr, BLOCK: tl.constexpr):
    """The batch-statistics BN after the convolution, on [BLOCK] output channels: (mean,
    dmean/count, dvar*2/count, d gamma, d beta), with dz = dy + dmean/count + dvar*2/count *
    (z - mean) (``bn_backward``'s STATS terms, from the gradients of the BN's scale and shift)."""
    mean = tl.load(mean_ptr + offs, mask=ok, other=0.0)
    d_mean, d_var, d_gamma, d_beta = bn_stats_backward(offs, ok, mean, var_ptr, dscale_ptr, dshift_ptr, gamma_ptr,
                                                       eps, HAS_GAMMA, BLOCK)
    return mean, d_mean / count, d_var * (2.0 / count), d_gamma, d_beta


@triton.jit
def _plus_stats_terms(g, z, mean, dmean_term, dvar_coef):
    """dy + the statistics terms, in fp32 (as ``bn_backward_kernel`` computes them)."""
    return g.to(tl.float32) + (dmean_term[None, :] + dvar_coef[None, :] * (z.to(tl.float32) - mean[None, :]))


@triton.jit
def _dz_tile(dz_ptr, img, ih, iw, m_ok, offs_k, k_ok, tap_c, kh0, kw0, n_kw, Ho, Wo, Cout, stride, padding,
             z_ptr, st_mean_ptr, st_var_ptr, st_dscale_ptr, st_dshift_ptr, st_gamma_ptr, st_count, st_eps,
             STATS_DZ: tl.constexpr, ST_GAMMA: tl.constexpr, BLOCK_K: tl.constexpr):
    """[BLOCK_M, BLOCK_K] tile of dz reaching input pixels (ih, iw) through the tap_c-th tap of their class.
    ``STATS_DZ``: dz_ptr holds dy, and dz = dy + the statistics terms (``_stats_terms``) of z_ptr's
    raw output, rounded to dy's dtype as a separate pass would store it."""
    kh = kh0 + (tap_c // n_kw) * stride
    kw = kw0 + (tap_c % n_kw) * stride
    # Exact divisions (by the choice of kh, kw), so rounding direction is moot.
    oh = (ih + padding - kh) // stride
    ow = (iw + padding - kw) // stride
    pix_ok = m_ok & (oh >= 0) & (oh < Ho) & (ow >= 0) & (ow < Wo)
    dz_row = ((img * Ho + oh) * Wo + ow) * Cout
    # Mask the load by "< Cout" only (constant over 16 channels: vector loads), then zero
    # the channels outside this block's groups in registers.
    ld_ok = pix_ok[:, None] & (offs_k < Cout)[None, :]
    g = tl.load(dz_ptr + dz_row[:, None] + offs_k[None, :], mask=ld_ok, other=0.0)
    if STATS_DZ:
        mean, dmean_term, dvar_coef, _, _ = _stats_terms(offs_k, offs_k < Cout, st_mean_ptr, st_var_ptr, st_dscale_ptr,
                                                         st_dshift_ptr, st_gamma_ptr, st_count, st_eps, ST_GAMMA,
                                                         BLOCK_K)
        z = tl.load(z_ptr + dz_row[:, None] + offs_k[None, :], mask=ld_ok, other=0.0)
        # the terms are not zero outside the image: those pixels get none
        g = tl.where(ld_ok, _plus_stats_terms(g, z, mean, dmean_term, dvar_coef), 0.0).to(dz_ptr.dtype.element_ty)
    return tl.where(k_ok[None, :], g, 0.0)


@triton.jit
def _dgrad_weight_tile(w_ptr, offs_k, k_ok, tap_c, kh0, kw0, n_kw, n_ok, group_n, ci_local,
                       COUT_G, stride, w_stride_tap, w_stride_ci, w_stride_co, KSIZE: tl.constexpr):
    """[BLOCK_K, BLOCK_N] block-diagonal tile: w[co, ci] is zero unless co and ci share a group."""
    kh = kh0 + (tap_c // n_kw) * stride
    kw = kw0 + (tap_c % n_kw) * stride
    group_k = offs_k // COUT_G
    w_off = (kh * KSIZE + kw) * w_stride_tap + ci_local[None, :] * w_stride_ci + offs_k[:, None] * w_stride_co
    w_ok = (group_k[:, None] == group_n[None, :]) & k_ok[:, None] & n_ok[None, :]
    return tl.load(w_ptr + w_off, mask=w_ok, other=0.0)


@triton.jit
def _dgrad_program(
    pid_m, pid_n,  # this program's row block and input-channel block
    parity,  # which (ih % stride, iw % stride) class this program covers
    dx_ptr,  # [N, H, W, Cin] NHWC, activation dtype: every element is written
    dz_ptr,  # [N, Ho, Wo, Cout] NHWC
    w_ptr,  # the forward's weight operand, read at (tap, ci, co) through the strides below
    N, H, W, Cin, Ho, Wo, Cout,
    CIN_G, COUT_G,  # channels per group, input and output
    stride, padding,
    w_stride_tap, w_stride_ci, w_stride_co,  # weights.weight_strides: packed or as stored
    KSIZE: tl.constexpr, ALLOW_TF32: tl.constexpr,
    BLOCK_M: tl.constexpr,  # input pixels of one parity class
    BLOCK_N: tl.constexpr,  # input channels
    BLOCK_K: tl.constexpr,  # output channels (the reduction)
    MULTI_GROUP: tl.constexpr,  # a block of BLOCK_N input channels may span groups (1; 2: flat NaN check)
    x_ptr=None,  # [N, H, W, Cin] NHWC (PRO_BWD): the forward's x, before its prologue
    in_scale_ptr=None, in_shift_ptr=None,  # [Cin] fp32 (PRO_BWD): the prologue x*s + b (then ReLU)
    psum_ptr=None,  # [2, n_rows, Cin] fp32 scratch (PRO_BWD): per-program sums of g and g*x
    sums_ptr=None,  # [2, Cin] fp32 out (PRO_BWD): sum g (d in_shift), sum g*x (d in_scale)
    counter_ptr=None,  # int32 [channel blocks], zero (PRO_BWD): programs arrived per channel block
    n_rows=1,  # (PRO_BWD) partial rows per channel block: row blocks x parity classes
    PRO_BWD: tl.constexpr = False,  # apply the prologue's backward to the tile: dx = g*s, g = da*mask
    IN_RELU: tl.constexpr = False,  # (PRO_BWD) the prologue has a ReLU: mask x*s + b > 0
    z_ptr=None,  # [N, Ho, Wo, Cout] NHWC (STATS_DZ): the convolution's raw output
    st_mean_ptr=None, st_var_ptr=None,  # [Cout] fp32 (STATS_DZ): its batch mean and biased variance
    st_dscale_ptr=None, st_dshift_ptr=None,  # [Cout] fp32 (STATS_DZ): the gradients of its BN's scale, shift
    st_gamma_ptr=None,  # [Cout] fp32 (ST_GAMMA): the BN weight
    st_count=1.0, st_eps=0.0,  # (STATS_DZ) elements per channel of the statistics; the BN's eps
    STATS_DZ: tl.constexpr = False,  # dz_ptr holds dy: dz = dy + the statistics terms, applied on load
    ST_GAMMA: tl.constexpr = False,
    dx_add_ptr=None,  # [N, H, W, Cin] NHWC, dx's dtype (DX_ADD, not PRO_BWD): added to dx
    DX_ADD: tl.constexpr = False,  # another branch's gradient of the same input (a block's shortcut)
):
    ph = parity // stride
    pw = parity % stride
    # Pixels of the class: ih = ihc*stride + ph for ihc < Hc.
    Hc = (H - ph + stride - 1) // stride
    Wc = (W - pw + stride - 1) // stride
    Mc = N * Hc * Wc
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = offs_m < Mc
    n_ok = offs_n < Cin
    # An image smaller than the stride has empty classes: keep the divisors non-zero.
    Hd = tl.maximum(Hc, 1)
    Wd = tl.maximum(Wc, 1)
    iwc = offs_m % Wd
    ihc = (offs_m // Wd) % Hd
    img = (offs_m // (Wd * Hd)).to(tl.int64)  # int64: activations may exceed 2**31 elements
    ih = ihc * stride + ph
    iw = iwc * stride + pw

    # Output channels feeding this block: the groups its input channels belong to.
    n_last = tl.minimum(pid_n * BLOCK_N + BLOCK_N, Cin) - 1
    co_start = ((pid_n * BLOCK_N) // CIN_G) * COUT_G
    co_end = (n_last // CIN_G + 1) * COUT_G
    group_n = offs_n // CIN_G
    ci_local = offs_n - group_n * CIN_G

    # Taps that reach this class: kh = kh0, kh0 + stride, ... < KSIZE (likewise kw), where
    # ih + padding - kh is a multiple of stride.  Zero of them for some classes of a
    # strided 1x1 convolution.
    kh0 = (ph + padding) % stride
    kw0 = (pw + padding) % stride
    n_kh = (KSIZE - kh0 + stride - 1) // stride
    n_kw = (KSIZE - kw0 + stride - 1) // stride
    # K blocks start at a multiple of 16 below co_start so the compiler can prove 16-byte
    # alignment and vectorise the dz loads (channels per group are rarely multiples of 16).
    k_base = (co_start // 16) * 16
    n_k = (co_end - k_base + BLOCK_K - 1) // BLOCK_K
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    # One flat loop over (tap, output-channel block), not nested static loops: the
    # pipeliner then prefetches across taps, and the registers of one tap suffice.
    for it in range(0, n_kh * n_kw * n_k):
        tap_c = it // n_k
        offs_k = k_base + (it % n_k) * BLOCK_K + tl.arange(0, BLOCK_K)
        k_ok = (offs_k >= co_start) & (offs_k < co_end)
        g = _dz_tile(dz_ptr, img, ih, iw, m_ok, offs_k, k_ok, tap_c, kh0, kw0, n_kw, Ho, Wo, Cout,
                     stride, padding, z_ptr, st_mean_ptr, st_var_ptr, st_dscale_ptr, st_dshift_ptr, st_gamma_ptr,
                     st_count, st_eps, STATS_DZ, ST_GAMMA, BLOCK_K)
        wt = _dgrad_weight_tile(w_ptr, offs_k, k_ok, tap_c, kh0, kw0, n_kw, n_ok, group_n, ci_local,
                                COUT_G, stride, w_stride_tap, w_stride_ci, w_stride_co, KSIZE)
        acc = mma(g, wt, acc, ALLOW_TF32)

    if MULTI_GROUP:
        # As in the forward kernel: a NaN/Inf in dz times another group's zero weight would
        # reach every channel of its row.  Tiles whose result holds a NaN/Inf (rare) are
        # recomputed one group at a time, which is exact.
        if has_nonfinite(acc, MULTI_GROUP == 2):
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            g_first = (pid_n * BLOCK_N) // CIN_G
            num_kg = tl.cdiv(COUT_G, BLOCK_K)
            steps = n_kh * n_kw * num_kg
            for it in tl.range(0, (n_last // CIN_G + 1 - g_first) * steps, num_stages=1):  # rare: no pipelining
                grp = g_first + it // steps
                tap_c = (it % steps) // num_kg
                offs_k = grp * COUT_G + (it % num_kg) * BLOCK_K + tl.arange(0, BLOCK_K)
                k_ok = offs_k < (grp + 1) * COUT_G
                g = _dz_tile(dz_ptr, img, ih, iw, m_ok, offs_k, k_ok, tap_c, kh0, kw0, n_kw, Ho, Wo, Cout,
                             stride, padding, z_ptr, st_mean_ptr, st_var_ptr, st_dscale_ptr, st_dshift_ptr,
                             st_gamma_ptr, st_count, st_eps, STATS_DZ, ST_GAMMA, BLOCK_K)
                wt = _dgrad_weight_tile(w_ptr, offs_k, k_ok, tap_c, kh0, kw0, n_kw, n_ok, group_n, ci_local,
                                        COUT_G, stride, w_stride_tap, w_stride_ci, w_stride_co, KSIZE)
                acc = tl.where((group_n == grp)[None, :], mma(g, wt, acc, ALLOW_TF32), acc)

    # Pixels no tap reaches (e.g. odd rows of a strided 1x1) get their zeros here too.
    dx_row = ((img * H + ih) * W + iw) * Cin
    out_ok = m_ok[:, None] & n_ok[None, :]
    if PRO_BWD:
        # The forward's prologue a = relu(x*s + b), backward: g = da * (mask), dx = g*s, and
        # per-channel sums of g and g*x.  da rounded to dx's dtype first, as a separate pass
        # would read it; the mask as bn_backward's RELU_MODE 2 (NaN passes g).  Each
        # (row, channel) belongs to exactly one program (channel blocks do not overlap, even
        # across groups), so each partial row holds each element once.
        xv = tl.load(x_ptr + dx_row[:, None] + offs_n[None, :], mask=out_ok, other=0.0)
        s = tl.load(in_scale_ptr + offs_n, mask=n_ok, other=0.0)
        g = acc.to(dx_ptr.dtype.element_ty).to(tl.float32)
        if IN_RELU:
            b = tl.load(in_shift_ptr + offs_n, mask=n_ok, other=0.0)
            pre = (xv.to(tl.float32) * s[None, :] + b[None, :]).to(x_ptr.dtype.element_ty)
            g = tl.where(pre <= 0.0, 0.0, g)
        g = tl.where(out_ok, g, 0.0)
        tl.store(dx_ptr + dx_row[:, None] + offs_n[None, :], (g * s[None, :]).to(dx_ptr.dtype.element_ty),
                 mask=out_ok)
        row = parity * (n_rows // (stride * stride)) + pid_m  # n_rows: row blocks x classes
        part = row.to(tl.int64) * Cin + offs_n
        tl.store(psum_ptr + part, tl.sum(g, axis=0), mask=n_ok)
        tl.store(psum_ptr + n_rows * Cin + part, tl.sum(g * xv.to(tl.float32), axis=0), mask=n_ok)
        # The last program of this channel block sums every row's partials in row order:
        # the same bits whichever arrives last; it leaves the counter zero (idempotent).
        if last_arrival(counter_ptr + pid_n, n_rows):
            tot_g = tl.zeros((BLOCK_N,), dtype=tl.float32)
            tot_gx = tl.zeros((BLOCK_N,), dtype=tl.float32)
            for t0 in range(0, n_rows, 32):
                offs_t = t0 + tl.arange(0, 32)
                ok_t = (offs_t < n_rows)[:, None] & n_ok[None, :]
                off_t = offs_t.to(tl.int64)[:, None] * Cin + offs_n[None, :]
                tot_g += tl.sum(tl.load(psum_ptr + off_t, mask=ok_t, other=0.0, cache_modifier=".cg"), axis=0)
                tot_gx += tl.sum(tl.load(psum_ptr + n_rows * Cin + off_t, mask=ok_t, other=0.0,
                                         cache_modifier=".cg"), axis=0)
            tl.store(sums_ptr + offs_n, tot_g, mask=n_ok)
            tl.store(sums_ptr + Cin + offs_n, tot_gx, mask=n_ok)
    else:
        dx = acc.to(dx_ptr.dtype.element_ty)
        if DX_ADD:  # as PyTorch's add of the two gradients: each rounded to dx's dtype, summed in fp32
            dx = (dx.to(tl.float32) + tl.load(dx_add_ptr + dx_row[:, None] + offs_n[None, :], mask=out_ok,
                                              other=0.0).to(tl.float32)).to(dx_ptr.dtype.element_ty)
        tl.store(dx_ptr + dx_row[:, None] + offs_n[None, :], dx, mask=out_ok)


@triton.jit(do_not_specialize=["N"])  # batch-dependent sizes: see _runtime
def conv_dgrad_kernel(
    dx_ptr,  # [N, H, W, Cin] NHWC, activation dtype: every element is written
    dz_ptr,  # [N, Ho, Wo, Cout] NHWC
    w_ptr,  # the forward's weight operand, read at (tap, ci, co) through the strides below
    N, H, W, Cin, Ho, Wo, Cout,
    CIN_G, COUT_G,  # channels per group, input and output
    stride, padding,
    w_stride_tap, w_stride_ci, w_stride_co,  # weights.weight_strides: packed or as stored
    KSIZE: tl.constexpr, ALLOW_TF32: tl.constexpr,
    BLOCK_M: tl.constexpr,  # input pixels of one parity class
    BLOCK_N: tl.constexpr,  # input channels
    BLOCK_K: tl.constexpr,  # output channels (the reduction)
    MULTI_GROUP: tl.constexpr,  # a block of BLOCK_N input channels may span groups (1; 2: flat NaN check)
):
    _dgrad_program(tl.program_id(0), tl.program_id(1), tl.program_id(2),
                   dx_ptr, dz_ptr, w_ptr, N, H, W, Cin, Ho, Wo, Cout, CIN_G, COUT_G, stride, padding,
                   w_stride_tap, w_stride_ci, w_stride_co, KSIZE, ALLOW_TF32, BLOCK_M, BLOCK_N, BLOCK_K, MULTI_GROUP)


def dgrad_config(N: int, H: int, W: int, cin: int, cin_g: int, cout_g: int, stride: int,
                 dtype: torch.dtype, target: Optional[Target] = None) -> dict:
    """Block sizes of ``conv_dgrad_kernel``: the forward's with input and output channels swapped.

    Rows are the input pixels of one parity class; columns input channels (``cin_g`` per
    group); the reduction runs over output channels (``cout_g`` per group).
    """
    return dict(_dgrad_config(N * cdiv(H, stride) * cdiv(W, stride), cin, cout_g, cin_g, dtype,
                              target or _runtime.default_launch_target()))


@_runtime.config_memo
@functools.lru_cache(maxsize=4096)
def _dgrad_config(rows_per_class, cin, cout_g, cin_g, dtype, target) -> dict:
    return conv_config(rows_per_class, cin, cout_g, cin_g, dtype, target, kind="dgrad")


def dgrad_launch(N, Cin, H, W, Cout, Ho, Wo, ksize, stride, padding, groups, dtype, w_strides=None, target=None):
    """(grid, size arguments, constexprs and launch options) of ``conv_dgrad_kernel``.

    The launcher and the offline-compilation test both use it: the test compiles exactly
    what runs.  ``w_strides``: the weight operand's (tap, ci, co) strides
    (``weights.weight_strides``); None: the packed layout.  Memoised: do not edit the
    dicts it returns.  ``target``: what to configure for (None: ``_runtime.default_launch_target()``).
    """
    return _memoised(_dgrad_launch, (N, Cin, H, W, Cout, Ho, Wo, ksize, stride, padding, groups, dtype,
                                     w_strides, target or _runtime.default_launch_target()))[:3]


def _dgrad_launch(N, Cin, H, W, Cout, Ho, Wo, ksize, stride, padding, groups, dtype, w_strides, target):
    cin_g, cout_g = Cin // groups, Cout // groups
    meta = dgrad_config(N, H, W, Cin, cin_g, cout_g, stride, dtype, target)
    s_tap, s_ci, s_co = w_strides if w_strides is not None else (cin_g * Cout, Cout, 1)
    sizes = dict(N=N, H=H, W=W, Cin=Cin, Ho=Ho, Wo=Wo, Cout=Cout, CIN_G=cin_g, COUT_G=cout_g,
                 stride=stride, padding=padding, w_stride_tap=s_tap, w_stride_ci=s_ci, w_stride_co=s_co)
    rows_per_class = N * cdiv(H, stride) * cdiv(W, stride)
    grid = (cdiv(rows_per_class, meta["BLOCK_M"]), cdiv(Cin, meta["BLOCK_N"]), stride * stride)
    meta = dict(KSIZE=ksize, ALLOW_TF32=allow_tf32(dtype), **meta)
    return grid, sizes, meta, positional_launch_args(conv_dgrad_kernel, 3, {**sizes, **meta})


_LAUNCHES = _runtime.config_memo({})


def _memoised(build, args: tuple) -> tuple:
    """``build(*args)``, kept per arguments and the settings the launch configurations read
    (every backward of every convolution asks; the callers may replace the config functions):
    do not edit what it returns.  A ``_*_launch`` builder returns its public launcher's
    tuple plus ``positional_launch_args`` of its kernel."""
    key = (build, args, torch.backends.cudnn.allow_tf32, wgrad_config, dgrad_config)  # (args end with the target)
    launch = _LAUNCHES.get(key)
    if launch is None:
        if len(_LAUNCHES) > 4096:
            _LAUNCHES.clear()
        launch = _LAUNCHES[key] = build(*args)
    return launch


def _empty(shape, *, device, dtype, memory_format=torch.contiguous_format) -> Tensor:
    """Every buffer the launchers allocate (a test poisons it with NaN)."""
    return torch.empty(shape, device=device, dtype=dtype, memory_format=memory_format)


def _check_shapes(dz: Tensor, weight_shape: Sequence[int], H: int, W: int, stride: int, padding: int,
                  groups: int):
    """A mismatch would silently give a wrong gradient: raise instead."""
    try:
        _check_sizes(dz.shape, tuple(weight_shape), H, W, stride, padding, groups)  # memoised: every backward checks
    except TypeError:  # a malformed argument: the check itself, unmemoised, says what is wrong with it
        _check_sizes.__wrapped__(dz.shape, weight_shape, H, W, stride, padding, groups)


@functools.lru_cache(maxsize=4096)  # a mismatch raises: not kept, raised again each call
def _check_sizes(dz_shape, weight_shape, H, W, stride, padding, groups) -> None:
    if len(dz_shape) != 4 or len(weight_shape) != 4 or weight_shape[2] != weight_shape[3]:
        raise ValueError(f"expected dz [N, Cout, Ho, Wo] and a square weight [Cout, Cin/groups, k, k], "
                         f"got {list(dz_shape)} and {list(weight_shape)}")
    k = weight_shape[2]
    expected = [weight_shape[0], (H + 2 * padding - k) // stride + 1, (W + 2 * padding - k) // stride + 1]
    if groups < 1 or weight_shape[0] % groups or list(dz_shape[1:]) != expected:
        raise ValueError(f"dz {list(dz_shape)} does not match a {k}x{k} convolution of a {H}x{W} input "
                         f"(stride {stride}, padding {padding}, groups {groups}, "
                         f"weight {list(weight_shape)})")


def _channels_last(t: Tensor) -> Tensor:
    return t.contiguous(memory_format=torch.channels_last)


def conv_dgrad(dz: Tensor, weight: Tensor, input_hw: Sequence[int], stride: int, padding: int,
               groups: int, packed: Optional[Tensor] = None) -> Tensor:
    """Gradient of ``conv2d(x, weight, stride, padding, groups=groups)`` with respect to x.

    dz: [N, Cout, Ho, Wo], any memory format; weight: [Cout, Cin/groups, k, k];
    input_hw: (H, W) of x (a strided convolution cannot recover it from Ho, Wo);
    packed: the forward's packed weight (``weights.pack_weight``) in dz's dtype, or None
    (then the weight itself when ``conv_bn_act.readable_in_place``, else a fresh pack).
    Returns dx: [N, Cin, H, W] channels_last in dz's dtype (fp32 accumulation).
    """
    N, Cout, Ho, Wo = dz.shape
    _, cin_g, ksize, _ = weight.shape
    H, W = int(input_hw[0]), int(input_hw[1])
    Cin = cin_g * groups
    _check_shapes(dz, weight.shape, H, W, stride, padding, groups)
    # plain CPU, float64 for gradcheck, or a kernel that failed to compile or launch here
    if not use_triton(dz) or dz.dtype == torch.float64 or \
            (_runtime.FAILED and _runtime.failed("conv_dgrad", dz, weight.shape)):
        x_shape = dz.new_empty(1).expand(N, Cin, H, W)  # only its shape is read
        dx = torch.ops.aten.convolution_backward(
            dz, x_shape, weight.to(dz.dtype), None, [stride] * 2, [padding] * 2, [1, 1],
            False, [0, 0], groups, [True, False, False])[0]
        return _channels_last(dx)
    if dz.numel() == 0:  # empty batch: nothing to launch
        return torch.zeros((N, Cin, H, W), device=dz.device, dtype=dz.dtype).contiguous(
            memory_format=torch.channels_last)

    dz = _channels_last(dz)
    dx = _empty((N, Cin, H, W), device=dz.device, dtype=dz.dtype, memory_format=torch.channels_last)
    w = weight_operand(weight, packed, dz.dtype)
    grid, _, _, (size_args, options) = _memoised(_dgrad_launch, (N, Cin, H, W, Cout, Ho, Wo, ksize, stride, padding,
                                                                 groups, dz.dtype, weight_strides(w), target_of(dz)))
    try:
        conv_dgrad_kernel[grid](dx, dz, w, *size_args, **options)
    except Exception as err:  # a compile/launch failure raises before the kernel runs
        _runtime.record_failure(err, _runtime.failure_key("conv_dgrad", dz, weight.shape))
        return conv_dgrad(dz, weight, input_hw, stride, padding, groups, packed)
    return dx


# --------------------------------------------------------------------------------------
# Weight gradient
# --------------------------------------------------------------------------------------
@triton.jit
def _wgrad_program(
    pid_c,  # output-channel block x input-channel block
    tap,  # kh * KSIZE + kw
    split, splits,  # which of the splits of the pixel reduction, and how many
    part_ptr,  # [splits, Cout, Cin_g, KSIZE, KSIZE] fp32: this split's sum, every element written
    dz_ptr,  # [N, Ho, Wo, Cout] NHWC
    a_ptr,  # [N, H, W, Cin] NHWC: the convolution's input, or x with the prologue below
    in_scale_ptr, in_shift_ptr,  # [Cin] fp32 (IN_AFFINE): a = act(x * in_scale + in_shift), as the forward
    N, H, W, Cin, Ho, Wo, Cout,
    CIN_G, COUT_G,  # channels per group, input and output
    stride, padding,
    rows_per_split,  # output pixels reduced by one program, a multiple of BLOCK_M
    n_ci_blocks,  # input-channel blocks per output-channel block (grid axis 0 = co block x ci block)
    KSIZE: tl.constexpr, ALLOW_TF32: tl.constexpr,
    IN_AFFINE: tl.constexpr, IN_RELU: tl.constexpr,
    BLOCK_M: tl.constexpr,  # output pixels (the reduction)
    BLOCK_CO: tl.constexpr,  # output channels
    BLOCK_CI: tl.constexpr,  # input channels of the groups those output channels belong to
    dw_ptr,  # [Cout, Cin_g, KSIZE, KSIZE] fp32 out, at the strides below (the weight's layout)
    counter_ptr,  # int32 [grid[0] * KSIZE * KSIZE], zero (_runtime.arrival_counters): splits arrived
    dw_stride_co, dw_stride_ci, dw_stride_kh, dw_stride_kw,
    in_gate_ptr,  # [N, Cin] fp32 (IN_GATE): the forward prologue's gate, after its ReLU
    IN_GATE: tl.constexpr,
    z_ptr=None, st_mean_ptr=None, st_var_ptr=None, st_dscale_ptr=None, st_dshift_ptr=None,  # (STATS_DZ) as
    st_gamma_ptr=None, st_count=1.0, st_eps=0.0,  # _dgrad_program's
    dparam_ptr=None,  # [2, Cout] fp32 out (STATS_DZ): the gradients of the BN's gamma and beta
    STATS_DZ: tl.constexpr = False, ST_GAMMA: tl.constexpr = False,
):
    pid_co = pid_c // n_ci_blocks
    pid_ci = pid_c % n_ci_blocks
    kh = tap // KSIZE
    kw = tap % KSIZE
    M = N * Ho * Wo

    offs_co = pid_co * BLOCK_CO + tl.arange(0, BLOCK_CO)
    co_ok = offs_co < Cout
    # Input channels of the groups of this output-channel block; this program takes the
    # pid_ci-th BLOCK_CI-wide slice of them (past their end: nothing to do).
    co_last = tl.minimum(pid_co * BLOCK_CO + BLOCK_CO, Cout) - 1
    ci_start = ((pid_co * BLOCK_CO) // COUT_G) * CIN_G
    ci_end = (co_last // COUT_G + 1) * CIN_G
    # Slices start at a multiple of 16 below ci_start: provably aligned, so the loads of a
    # are vectorised; the extra columns (other groups) are dropped at the store.
    ci_base = (ci_start // 16) * 16 + pid_ci * BLOCK_CI
    offs_ci = ci_base + tl.arange(0, BLOCK_CI)
    ci_ok = (offs_ci >= ci_start) & (offs_ci < ci_end)

    m_start = split * rows_per_split
    m_end = tl.minimum(m_start + rows_per_split, M)
    m_end = tl.where(ci_base < ci_end, m_end, m_start)  # empty slice: skip the loop

    # Over several groups the [BLOCK_CO, BLOCK_CI] product also holds cross-group terms,
    # dropped at the store: with 4 channels per group that keeps every tl.dot dimension
    # >= 16 (the tensor cores' minimum) for 8x the MMA work, which is free because the
    # kernel is memory-bound (an FMA path would read the same bytes, more slowly).
    acc = tl.zeros((BLOCK_CO, BLOCK_CI), dtype=tl.float32)
    for m0 in range(m_start, m_end, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        m_ok = offs_m < m_end
        ow = offs_m % Wo
        oh = (offs_m // Wo) % Ho
        img = (offs_m // (Wo * Ho)).to(tl.int64)  # int64: activations may exceed 2**31 elements
        ih = oh * stride - padding + kh
        iw = ow * stride - padding + kw
        pix_ok = m_ok & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
        g_ok = m_ok[:, None] & co_ok[None, :]
        g = tl.load(dz_ptr + offs_m.to(tl.int64)[:, None] * Cout + offs_co[None, :], mask=g_ok, other=0.0)
        if STATS_DZ:  # dz = dy + the statistics terms, as in _dz_tile (the vectors re-read from L1, as below)
            mean, dmean_term, dvar_coef, _, _ = _stats_terms(offs_co, co_ok, st_mean_ptr, st_var_ptr, st_dscale_ptr,
                                                             st_dshift_ptr, st_gamma_ptr, st_count, st_eps, ST_GAMMA,
                                                             BLOCK_CO)
            z = tl.load(z_ptr + offs_m.to(tl.int64)[:, None] * Cout + offs_co[None, :], mask=g_ok, other=0.0)
            g = tl.where(g_ok, _plus_stats_terms(g, z, mean, dmean_term, dvar_coef), 0.0).to(dz_ptr.dtype.element_ty)
        a_row = ((img * H + ih) * W + iw) * Cin
        a_ok = pix_ok[:, None] & (offs_ci < Cin)[None, :]
        a = tl.load(a_ptr + a_row[:, None] + offs_ci[None, :], mask=a_ok, other=0.0)
        if IN_AFFINE:  # the forward's prologue recomputed on load: the activation a is never stored
            # (the [BLOCK_CI] vectors are re-read from L1 each step: kept live across the loop
            # they cost an 8-byte stack frame on one sm_90 configuration)
            in_s = tl.load(in_scale_ptr + offs_ci, mask=offs_ci < Cin, other=0.0)
            in_b = tl.load(in_shift_ptr + offs_ci, mask=offs_ci < Cin, other=0.0)
            af = a.to(tl.float32) * in_s[None, :] + in_b[None, :]
            if IN_RELU:
                af = tl.where(af < 0.0, 0.0, af)  # keeps NaN, like torch.relu
            if IN_GATE:
                af = af * tl.load(in_gate_ptr + img[:, None] * Cin + offs_ci[None, :], mask=a_ok, other=0.0)
            # zero padding applies to the normalised activation; rounded as the forward's a
            a = tl.where(a_ok, af, 0.0).to(a_ptr.dtype.element_ty)
        if ALLOW_TF32:
            acc = tl.dot(tl.trans(g), a, acc)
        else:
            acc = tl.dot(tl.trans(g), a, acc, input_precision="ieee")

    if STATS_DZ:
        if (pid_ci == 0) & (tap == 0) & (split == 0):  # one program per output-channel block
            _, _, _, d_gamma, d_beta = _stats_terms(offs_co, co_ok, st_mean_ptr, st_var_ptr, st_dscale_ptr,
                                                    st_dshift_ptr, st_gamma_ptr, st_count, st_eps, ST_GAMMA, BLOCK_CO)
            tl.store(dparam_ptr + offs_co, d_gamma, mask=co_ok)
            tl.store(dparam_ptr + Cout + offs_co, d_beta, mask=co_ok)

    # Keep the block diagonal: dw[co, ci] exists only when co and ci share a group.
    group_co = offs_co // COUT_G
    group_ci = offs_ci // CIN_G
    ci_local = offs_ci - group_ci * CIN_G
    keep = (group_co[:, None] == group_ci[None, :]) & co_ok[:, None] & ci_ok[None, :]
    dw_off = offs_co[:, None] * dw_stride_co + ci_local[None, :] * dw_stride_ci + kh * dw_stride_kh + kw * dw_stride_kw
    if splits == 1:
        tl.store(dw_ptr + dw_off, acc, mask=keep)
    else:
        # Each split stores its partial; the last of this tile's splits to finish sums them
        # all in split order (deterministic: the same bits whichever arrives last).
        split_size = Cout * CIN_G * (KSIZE * KSIZE)
        part_off = (offs_co[:, None] * CIN_G + ci_local[None, :]) * (KSIZE * KSIZE) + tap
        tl.store(part_ptr + split.to(tl.int64) * split_size + part_off, acc, mask=keep)
        if last_arrival(counter_ptr + pid_c * (KSIZE * KSIZE) + tap, splits):
            total = tl.zeros((BLOCK_CO, BLOCK_CI), dtype=tl.float32)
            ptrs = part_ptr + part_off  # pointer steps: 64-bit, whatever splits * split_size is
            for _ in range(0, splits):
                total += tl.load(ptrs, mask=keep, other=0.0, cache_modifier=".cg")
                ptrs += split_size
            tl.store(dw_ptr + dw_off, total, mask=keep)


@triton.jit(do_not_specialize=["N", "rows_per_split"])  # batch-dependent sizes: see _runtime
def conv_wgrad_kernel(
    part_ptr,  # [splits, Cout, Cin_g, KSIZE, KSIZE] fp32: this split's sum, every element written
    dz_ptr,  # [N, Ho, Wo, Cout] NHWC
    a_ptr,  # [N, H, W, Cin] NHWC: the convolution's input, or x with the prologue below
    in_scale_ptr, in_shift_ptr,  # [Cin] fp32 (IN_AFFINE): a = act(x * in_scale + in_shift), as the forward
    N, H, W, Cin, Ho, Wo, Cout,
    CIN_G, COUT_G,  # channels per group, input and output
    stride, padding,
    rows_per_split,  # output pixels reduced by one program, a multiple of BLOCK_M
    n_ci_blocks,  # input-channel blocks per output-channel block (grid axis 0 = co block x ci block)
    KSIZE: tl.constexpr, ALLOW_TF32: tl.constexpr,
    IN_AFFINE: tl.constexpr, IN_RELU: tl.constexpr,
    BLOCK_M: tl.constexpr,  # output pixels (the reduction)
    BLOCK_CO: tl.constexpr,  # output channels
    BLOCK_CI: tl.constexpr,  # input channels of the groups those output channels belong to
    dw_ptr,  # [Cout, Cin_g, KSIZE, KSIZE] fp32 out, at the strides below (the weight's layout)
    counter_ptr,  # int32 [grid[0] * KSIZE * KSIZE], zero (_runtime.arrival_counters): splits arrived
    dw_stride_co, dw_stride_ci, dw_stride_kh, dw_stride_kw,
    in_gate_ptr=None,  # [N, Cin] fp32 (IN_GATE, with IN_AFFINE): the forward prologue's gate
    IN_GATE: tl.constexpr = False,
):
    _wgrad_program(tl.program_id(0), tl.program_id(1), tl.program_id(2), tl.num_programs(2),
                   part_ptr, dz_ptr, a_ptr, in_scale_ptr, in_shift_ptr, N, H, W, Cin, Ho, Wo, Cout, CIN_G, COUT_G,
                   stride, padding, rows_per_split, n_ci_blocks, KSIZE, ALLOW_TF32, IN_AFFINE, IN_RELU,
                   BLOCK_M, BLOCK_CO, BLOCK_CI, dw_ptr, counter_ptr, dw_stride_co, dw_stride_ci, dw_stride_kh,
                   dw_stride_kw, in_gate_ptr, IN_GATE)


_WGRAD_TARGET_PROGRAMS = 1024  # ~8 per SM of an H100: enough to hide load latency


def wgrad_config(M: int, cout: int, cin_g: int, cout_g: int, ksize: int, dtype: torch.dtype = torch.bfloat16,
                 target: Optional[Target] = None) -> dict:
    """Block sizes and M-split of ``conv_wgrad_kernel``; M = N*Ho*Wo output pixels.

    The blocks and splits depend on the shape only (not on the device), so a given
    convolution always sums its partials in the same order: same bits on any GPU; the
    pipeline stages (which do not change the order) are those that fit ``target``'s shared
    memory in ``dtype``.  Memoised (host time, every backward of every convolution): a copy
    each call.
    """
    return dict(_wgrad_config(M, cout, cin_g, cout_g, ksize, dtype, target or _runtime.default_launch_target()))


@functools.lru_cache(maxsize=4096)
def _wgrad_config(M: int, cout: int, cin_g: int, cout_g: int, ksize: int, dtype: torch.dtype,
                  target: Target) -> dict:
    interpret = target.interpret
    block_co = _pow2_clamp(cout, 16, 64 if cout_g >= 64 else 32)
    groups_per_block = -(-block_co // cout_g)
    block_ci = _pow2_clamp(groups_per_block * cin_g, 16, 64)
    # Widest input-channel range of an output-channel block (a block may start mid-group;
    # the kernel starts the range at a multiple of 16).
    ci_width = max(
        ((min(c0 + block_co, cout) - 1) // cout_g + 1) * cin_g - (c0 // cout_g * cin_g) // 16 * 16
        for c0 in range(0, cout, block_co))
    n_ci_blocks = cdiv(ci_width, block_ci)
    if interpret:  # the interpreter pays per loop step: big steps, 2 splits
        block_m, splits = _pow2_clamp(M, 16, 64), 2
    else:
        block_m = 64
        other_programs = cdiv(cout, block_co) * n_ci_blocks * ksize * ksize
        splits = cdiv(_WGRAD_TARGET_PROGRAMS, other_programs)
    m_blocks = cdiv(M, block_m)
    rows_per_split = cdiv(m_blocks, max(1, min(m_blocks, splits))) * block_m
    num_warps = 4 if block_co * block_ci <= 32 * 64 else 8
    elem = torch.empty((), dtype=dtype).element_size()  # ([BLOCK_CO, BLOCK_M] x [BLOCK_M, BLOCK_CI] tiles)
    num_stages = _runtime.fit_stages(target, lambda s: _runtime.mma_shared_bytes(block_co, block_ci, block_m, s, elem))
    return dict(BLOCK_M=block_m, BLOCK_CO=block_co, BLOCK_CI=block_ci, n_ci_blocks=n_ci_blocks,
                rows_per_split=rows_per_split, num_warps=num_warps, num_stages=num_stages)


def wgrad_launch(N, Cin, H, W, Cout, Ho, Wo, ksize, stride, padding, groups, dtype, in_affine=False,
                 in_relu=False, dw_strides=None, in_gate=False, target=None):
    """(grid, size arguments, constexprs and launch options) of ``conv_wgrad_kernel``.

    The number of splits (partial sums) is ``grid[2]``.  Shared with the offline
    compilation test, like ``dgrad_launch``.  ``dw_strides``: dw's four strides (the
    weight's layout); None: contiguous.  Memoised: do not edit the dicts it returns.
    """
    return _memoised(_wgrad_launch, (N, Cin, H, W, Cout, Ho, Wo, ksize, stride, padding, groups, dtype, in_affine,
                                     in_relu, dw_strides, in_gate, target or _runtime.default_launch_target()))[:3]


def _wgrad_launch(N, Cin, H, W, Cout, Ho, Wo, ksize, stride, padding, groups, dtype, in_affine, in_relu,
                  dw_strides, in_gate, target):
    cin_g, cout_g = Cin // groups, Cout // groups
    M = N * Ho * Wo
    meta = wgrad_config(M, Cout, cin_g, cout_g, ksize, dtype, target)
    n_ci_blocks, rows_per_split = meta.pop("n_ci_blocks"), meta.pop("rows_per_split")
    sizes = dict(N=N, H=H, W=W, Cin=Cin, Ho=Ho, Wo=Wo, Cout=Cout, CIN_G=cin_g, COUT_G=cout_g,
                 stride=stride, padding=padding, rows_per_split=rows_per_split, n_ci_blocks=n_ci_blocks)
    dw_strides = dw_strides if dw_strides is not None else (cin_g * ksize * ksize, ksize * ksize, ksize, 1)
    sizes.update(zip(("dw_stride_co", "dw_stride_ci", "dw_stride_kh", "dw_stride_kw"), dw_strides))
    if in_affine:  # the prologue's extra live values spilled 2 registers at 4 warps (sm_90 report)
        meta["num_warps"] = max(meta["num_warps"], 8)
    splits = cdiv(M, rows_per_split)  # none empty
    grid = (cdiv(Cout, meta["BLOCK_CO"]) * n_ci_blocks, ksize * ksize, splits)
    meta = dict(KSIZE=ksize, ALLOW_TF32=allow_tf32(dtype), IN_AFFINE=in_affine, IN_RELU=in_relu,
                IN_GATE=in_gate and in_affine, **meta)
    return grid, sizes, meta, positional_launch_args(conv_wgrad_kernel, 5, {**sizes, **meta})


def conv_wgrad(dz: Tensor, a: Tensor, weight_shape: Sequence[int], stride: int, padding: int,
               groups: int, deterministic: bool = True, in_scale: Optional[Tensor] = None,
               in_shift: Optional[Tensor] = None, in_relu: bool = False,
               layout_like: Optional[Tensor] = None, in_gate: Optional[Tensor] = None) -> Tensor:
    """Gradient of ``conv2d(a, w, stride, padding, groups=groups)`` with respect to w.

    dz: [N, Cout, Ho, Wo] and a: [N, Cin, H, W] (the convolution's input), any memory
    format; a is cast to dz's dtype.  Returns dw with shape ``weight_shape``
    ([Cout, Cin/groups, k, k]) in fp32 (float64 for float64 inputs); the caller casts.

    ``in_scale, in_shift, in_relu``: a is given as x, and the convolution's input is
    ``act(x * in_scale + in_shift)`` (the forward's prologue, recomputed on load), times
    ``in_gate`` [N, Cin] per (image, channel) when given.

    ``layout_like``: a tensor of ``weight_shape`` (the weight) whose memory layout dw takes
    on the Triton path, so that AccumulateGrad keeps it without a copy.

    ``deterministic``: the Triton path never adds floats atomically (an integer counter
    only elects which program sums the splits, in a fixed order), so it is bit-identical
    run to run either way; the flag lets a caller state the requirement (and would forbid
    an atomic fast path, were one added).
    """
    del deterministic  # always honoured, see above
    Cout, cin_g, ksize, _ = weight_shape
    if a.dim() != 4 or a.shape[0] != dz.shape[0] or a.shape[1] != cin_g * groups:
        raise ValueError(f"input {list(a.shape)} does not match weight {list(weight_shape)} "
                         f"with groups {groups}")
    _check_shapes(dz, weight_shape, a.shape[2], a.shape[3], stride, padding, groups)
    # plain CPU, float64 for gradcheck, or a kernel that failed to compile or launch here
    if not use_triton(dz) or dz.dtype == torch.float64 or \
            (_runtime.FAILED and _runtime.failed("conv_wgrad", dz, weight_shape)):
        a = reference.input_prologue(a, in_scale, in_shift, in_relu, in_gate)
        w_shape = dz.new_empty(1).expand(*weight_shape)  # only its shape is read
        dw = torch.ops.aten.convolution_backward(
            dz, a.to(dz.dtype), w_shape, None, [stride] * 2, [padding] * 2, [1, 1],
            False, [0, 0], groups, [False, True, False])[1]
        dw = dw if dw.dtype == torch.float64 else dw.float()
        if layout_like is not None and dw.stride() != layout_like.stride():  # as the Triton path (and the fake)
            dw = torch.empty_like(layout_like, dtype=dw.dtype).copy_(dw)
        return dw
    if dz.numel() == 0:  # empty batch: nothing to sum
        return torch.zeros(tuple(weight_shape), device=dz.device, dtype=torch.float32)

    N, Cin, H, W = a.shape
    _, _, Ho, Wo = dz.shape
    dz = _channels_last(dz)
    a = _channels_last(a.to(dz.dtype))
    affine = in_scale is not None
    like = layout_like if layout_like is not None and tuple(layout_like.shape) == tuple(weight_shape) else None
    dw = torch.empty_like(like, dtype=torch.float32) if like is not None else \
        _empty(tuple(weight_shape), device=dz.device, dtype=torch.float32)
    gated = affine and in_gate is not None
    grid, _, _, (size_args, options) = _memoised(_wgrad_launch, (N, Cin, H, W, Cout, Ho, Wo, ksize, stride, padding,
                                                                 groups, dz.dtype, affine, in_relu and affine,
                                                                 dw.stride(), gated, target_of(dz)))
    # split partials, summed in the kernel by the last split of each tile (one split: dw itself
    # is the partials operand, never read)
    partials = _empty((grid[2], Cout, cin_g, ksize, ksize), device=dz.device, dtype=torch.float32) \
        if grid[2] > 1 else dw
    counters = arrival_counters(dz.device, grid[0] * grid[1])  # (also unused: one pointer type, one binary)
    gate = in_gate.detach().float().reshape(N, Cin).contiguous() if gated else None
    # without the prologue dw stands in for the vectors (not read: one pointer type, one binary)
    scale, shift = (_vector_operand(in_scale), _vector_operand(in_shift)) if affine else (dw, dw)
    try:
        conv_wgrad_kernel[grid](partials, dz, a, scale, shift, *size_args, dw_ptr=dw, counter_ptr=counters,
                                in_gate_ptr=gate, **options)
    except Exception as err:  # a compile/launch failure raises before the kernel runs
        _runtime.record_failure(err, _runtime.failure_key("conv_wgrad", dz, weight_shape))
        return conv_wgrad(dz, a, weight_shape, stride, padding, groups, True, in_scale, in_shift, in_relu,
                          layout_like, in_gate)
    return dw


def _vector_operand(t: Tensor) -> Tensor:
    """A per-channel vector as the kernels read it, fp32 contiguous: most already are, and are
    passed as they are (no copy, and no detach: a Triton operand needs none)."""
    return t if t.dtype == torch.float32 and t.is_contiguous() else t.detach().float().contiguous()


# --------------------------------------------------------------------------------------
# Both gradients in one launch
# --------------------------------------------------------------------------------------
@triton.jit(do_not_specialize=["N", "rows_per_split", "dgrad_m_blocks", "dgrad_programs", "wgrad_splits"])
def conv_grads_kernel(
    dx_ptr,  # [N, H, W, Cin] NHWC out, activation dtype (as conv_dgrad_kernel)
    part_ptr,  # [splits, Cout, Cin_g, KSIZE, KSIZE] fp32 scratch (as conv_wgrad_kernel; splits > 1)
    dw_ptr,  # [Cout, Cin_g, KSIZE, KSIZE] fp32 out, at the dw strides (the weight's layout)
    counter_ptr,  # int32, zero (_runtime.arrival_counters; splits > 1)
    dz_ptr,  # [N, Ho, Wo, Cout] NHWC
    w_ptr,  # the forward's weight operand, at the w strides
    a_ptr,  # [N, H, W, Cin] NHWC: the convolution's input, or x with the prologue (IN_AFFINE)
    in_scale_ptr, in_shift_ptr,  # [Cin] fp32 (IN_AFFINE)
    N, H, W, Cin, Ho, Wo, Cout,
    CIN_G, COUT_G,
    stride, padding,
    w_stride_tap, w_stride_ci, w_stride_co,
    rows_per_split, n_ci_blocks,
    dw_stride_co, dw_stride_ci, dw_stride_kh, dw_stride_kw,
    dgrad_m_blocks, dgrad_n_blocks,  # the data-gradient grid (x parity classes): its first programs
    dgrad_programs,
    wgrad_c_blocks, wgrad_splits,  # the weight-gradient grid (x taps): the programs after those
    KSIZE: tl.constexpr, ALLOW_TF32: tl.constexpr,
    IN_AFFINE: tl.constexpr, IN_RELU: tl.constexpr,
    D_BLOCK_M: tl.constexpr, D_BLOCK_N: tl.constexpr, D_BLOCK_K: tl.constexpr, MULTI_GROUP: tl.constexpr,
    W_BLOCK_M: tl.constexpr, W_BLOCK_CO: tl.constexpr, W_BLOCK_CI: tl.constexpr,
    in_gate_ptr=None,  # [N, Cin] fp32 (IN_GATE, with IN_AFFINE): the forward prologue's gate
    IN_GATE: tl.constexpr = False,
    psum_ptr=None,  # [2, dgrad_programs // dgrad_n_blocks, Cin] fp32 scratch (PRO_BWD)
    sums_ptr=None,  # [2, Cin] fp32 out (PRO_BWD): sum g, sum g*x of the prologue's backward
    pro_counter_ptr=None,  # int32 [dgrad_n_blocks], zero (PRO_BWD)
    PRO_BWD: tl.constexpr = False,  # (IN_AFFINE, not IN_GATE) dx_ptr gets the prologue's backward
    z_ptr=None,  # [N, Ho, Wo, Cout] NHWC (STATS_DZ): the convolution's raw output
    st_mean_ptr=None, st_var_ptr=None,  # [Cout] fp32 (STATS_DZ): its batch mean and biased variance
    st_dscale_ptr=None, st_dshift_ptr=None,  # [Cout] fp32 (STATS_DZ): the gradients of its BN's scale, shift
    st_gamma_ptr=None,  # [Cout] fp32 (ST_GAMMA): the BN weight
    dparam_ptr=None,  # [2, Cout] fp32 out (STATS_DZ): the gradients of gamma and beta
    st_count=1.0, st_eps=0.0,  # (STATS_DZ) elements per channel of the statistics (N*Ho*Wo); the BN's eps
    STATS_DZ: tl.constexpr = False,  # dz_ptr holds dy; dz = dy + the BN's statistics terms, on load
    ST_GAMMA: tl.constexpr = False,
    dx_add_ptr=None,  # [N, H, W, Cin] NHWC, dx's dtype (DX_ADD, not PRO_BWD): added to dx as it is stored
    DX_ADD: tl.constexpr = False,
):
    """``conv_dgrad_kernel`` and ``conv_wgrad_kernel`` in one launch: a 1-D grid whose first
    ``dgrad_programs`` programs are the data gradient's grid and the rest the weight
    gradient's.  Both only read dz (and w / a): nothing orders one after the other."""
    pid = tl.program_id(0)
    if pid < dgrad_programs:
        pid_m = pid % dgrad_m_blocks
        rest = pid // dgrad_m_blocks
        _dgrad_program(pid_m, rest % dgrad_n_blocks, rest // dgrad_n_blocks,
                       dx_ptr, dz_ptr, w_ptr, N, H, W, Cin, Ho, Wo, Cout, CIN_G, COUT_G, stride, padding,
                       w_stride_tap, w_stride_ci, w_stride_co, KSIZE, ALLOW_TF32, D_BLOCK_M, D_BLOCK_N, D_BLOCK_K,
                       MULTI_GROUP, a_ptr, in_scale_ptr, in_shift_ptr, psum_ptr, sums_ptr, pro_counter_ptr,
                       dgrad_programs // dgrad_n_blocks, PRO_BWD, IN_RELU, z_ptr, st_mean_ptr, st_var_ptr,
                       st_dscale_ptr, st_dshift_ptr, st_gamma_ptr, st_count, st_eps, STATS_DZ, ST_GAMMA,
                       dx_add_ptr, DX_ADD)
    else:
        q = pid - dgrad_programs
        rest = q // wgrad_c_blocks
        _wgrad_program(q % wgrad_c_blocks, rest % (KSIZE * KSIZE), rest // (KSIZE * KSIZE), wgrad_splits,
                       part_ptr, dz_ptr, a_ptr, in_scale_ptr, in_shift_ptr, N, H, W, Cin, Ho, Wo, Cout, CIN_G, COUT_G,
                       stride, padding, rows_per_split, n_ci_blocks, KSIZE, ALLOW_TF32, IN_AFFINE, IN_RELU,
                       W_BLOCK_M, W_BLOCK_CO, W_BLOCK_CI, dw_ptr, counter_ptr, dw_stride_co, dw_stride_ci,
                       dw_stride_kh, dw_stride_kw, in_gate_ptr, IN_GATE, z_ptr, st_mean_ptr, st_var_ptr,
                       st_dscale_ptr, st_dshift_ptr, st_gamma_ptr, st_count, st_eps, dparam_ptr, STATS_DZ, ST_GAMMA)


def grads_launch(N, Cin, H, W, Cout, Ho, Wo, ksize, stride, padding, groups, dtype, in_affine=False,
                 in_relu=False, w_strides=None, dw_strides=None, in_gate=False, prologue_backward=False,
                 stats_dz=False, stats_gamma=False, dx_add=False, target=None):
    """(grid, size arguments, constexprs and launch options, wgrad grid) of
    ``conv_grads_kernel``: ``dgrad_launch`` and ``wgrad_launch`` side by side (the block
    sizes of each, the larger warp count).  Shared with the offline compilation test.
    Memoised (every training backward of every convolution builds it): do not edit the
    dicts it returns."""
    return _memoised(_grads_launch, (N, Cin, H, W, Cout, Ho, Wo, ksize, stride, padding, groups, dtype, in_affine,
                                     in_relu, w_strides, dw_strides, in_gate, prologue_backward, stats_dz,
                                     stats_gamma, dx_add, target or _runtime.default_launch_target()))[:4]


def _grads_launch(N, Cin, H, W, Cout, Ho, Wo, ksize, stride, padding, groups, dtype, in_affine, in_relu,
                  w_strides, dw_strides, in_gate, prologue_backward, stats_dz, stats_gamma, dx_add, target):
    d_grid, d_sizes, d_meta = dgrad_launch(N, Cin, H, W, Cout, Ho, Wo, ksize, stride, padding, groups, dtype,
                                           w_strides, target)
    w_grid, w_sizes, w_meta = wgrad_launch(N, Cin, H, W, Cout, Ho, Wo, ksize, stride, padding, groups, dtype,
                                           in_affine, in_relu, dw_strides, in_gate, target)
    dgrad_programs = d_grid[0] * d_grid[1] * d_grid[2]
    sizes = dict(d_sizes, **w_sizes, dgrad_m_blocks=d_grid[0], dgrad_n_blocks=d_grid[1],
                 dgrad_programs=dgrad_programs, wgrad_c_blocks=w_grid[0], wgrad_splits=w_grid[2])
    meta = dict(KSIZE=ksize, ALLOW_TF32=d_meta["ALLOW_TF32"], IN_AFFINE=w_meta["IN_AFFINE"],
                IN_RELU=w_meta["IN_RELU"], IN_GATE=w_meta["IN_GATE"], D_BLOCK_M=d_meta["BLOCK_M"], D_BLOCK_N=d_meta["BLOCK_N"],
                D_BLOCK_K=d_meta["BLOCK_K"], MULTI_GROUP=d_meta["MULTI_GROUP"], W_BLOCK_M=w_meta["BLOCK_M"],
                W_BLOCK_CO=w_meta["BLOCK_CO"], W_BLOCK_CI=w_meta["BLOCK_CI"],
                num_warps=max(d_meta["num_warps"], w_meta["num_warps"]),
                num_stages=min(d_meta["num_stages"], w_meta["num_stages"]),  # what fits both bodies
                PRO_BWD=bool(prologue_backward and in_affine and not in_gate),
                STATS_DZ=bool(stats_dz), ST_GAMMA=bool(stats_dz and stats_gamma), DX_ADD=bool(dx_add))
    if stats_dz:
        sizes["st_count"] = float(N * Ho * Wo)
    grid = (dgrad_programs + w_grid[0] * w_grid[1] * w_grid[2],)
    return grid, sizes, meta, w_grid, positional_launch_args(conv_grads_kernel, 9, {**sizes, **meta})


def conv_grads(dz: Tensor, a: Tensor, weight: Tensor, stride: int, padding: int, groups: int,
               packed: Optional[Tensor] = None, in_scale: Optional[Tensor] = None,
               in_shift: Optional[Tensor] = None, in_relu: bool = False, in_gate: Optional[Tensor] = None,
               prologue_backward: bool = False, stats: Optional[StatsGrad] = None, dx_add: Optional[Tensor] = None):
    """(``conv_dgrad(...)``, ``conv_wgrad(..., layout_like=weight)``) in one launch.

    Arguments as those two: a is the convolution's input (x with ``in_scale/in_shift/in_relu``:
    the prologue is recomputed on load for the weight gradient).  Returns (dx channels_last
    in dz's dtype, dw fp32 in the weight's layout); the same bits as the two separate calls.

    ``prologue_backward`` (with ``in_scale``, without ``in_gate``): the data gradient's
    epilogue also applies the prologue's backward, g = da * [x*in_scale + in_shift > 0]
    (the mask with ``in_relu``): returns (dx = g * in_scale in x's dtype, dw, sums [2, Cin]
    fp32 = (sum g, sum g*x) per channel: the gradients of in_shift and in_scale).

    ``stats`` (``bn_backward.StatsGrad`` of the batch-statistics BN after the convolution: z
    its raw output, with dscale and dshift, without dmean/dvar): dz is the gradient reaching
    z through the BN's normalisation only, and both gradients take dz + the statistics terms
    (dmean/M + dvar*2/M*(z - mean)) on load, as ``bn_backward`` would have written it; one
    more output, last: [2, Cout] fp32, the gradients of the BN's gamma and beta.

    ``dx_add`` (x's shape, channels_last, dz's dtype; not with ``prologue_backward``): added to dx
    as it is stored (another branch's gradient of the same input: a bottleneck's shortcut), as
    ``dx + dx_add`` would round it.
    """
    if prologue_backward and (in_scale is None or in_gate is not None):
        raise ValueError("prologue_backward needs in_scale/in_shift and no in_gate")
    if stats is not None and (stats.dmean is not None or stats.dvar is not None or stats.dscale is None
                              or stats.dshift is None or tuple(stats.z.shape) != tuple(dz.shape)):
        raise ValueError("stats needs z of dz's shape, dscale and dshift, and no dmean/dvar")
    if dx_add is not None and (prologue_backward or tuple(dx_add.shape) != tuple(a.shape) or dx_add.dtype != dz.dtype):
        raise ValueError("dx_add needs the input's shape, dz's dtype and no prologue_backward")
    N, Cout, Ho, Wo = dz.shape
    _, cin_g, ksize, _ = weight.shape
    if a.dim() != 4 or a.shape[0] != N or a.shape[1] != cin_g * groups:
        raise ValueError(f"input {list(a.shape)} does not match weight {list(weight.shape)} with groups {groups}")
    H, W = a.shape[2], a.shape[3]
    # the separate paths handle these (and a kernel that failed to compile or launch here)
    if not use_triton(dz) or dz.dtype == torch.float64 or dz.numel() == 0 or \
            (_runtime.FAILED and _runtime.failed("conv_grads", dz, weight.shape)):
        dparam = ()
        if stats is not None:
            dz, dparam = stats_terms_reference(dz, stats)
            dparam = (dparam,)
        da = conv_dgrad(dz, weight, (H, W), stride, padding, groups, packed=packed)
        if dx_add is not None:
            da = da + dx_add
        dw = conv_wgrad(dz, a, weight.shape, stride, padding, groups, in_scale=in_scale, in_shift=in_shift,
                        in_relu=in_relu, layout_like=weight, in_gate=in_gate)
        if not prologue_backward:
            return (da, dw, *dparam)
        dx, sums = prologue_backward_reference(da, a, in_scale, in_shift, in_relu)
        return (dx, dw, sums, *dparam)
    _check_shapes(dz, weight.shape, H, W, stride, padding, groups)
    Cin = cin_g * groups
    dz = _channels_last(dz)
    a = _channels_last(a if a.dtype == dz.dtype else a.to(dz.dtype))
    w = weight_operand(weight, packed, dz.dtype)
    dx = _empty((N, Cin, H, W), device=dz.device, dtype=dz.dtype, memory_format=torch.channels_last)
    dw = torch.empty_like(weight, dtype=torch.float32)
    affine = in_scale is not None
    gated = affine and in_gate is not None
    grid, sizes, _, w_grid, (size_args, options) = _memoised(_grads_launch, (
        N, Cin, H, W, Cout, Ho, Wo, ksize, stride, padding, groups, dz.dtype, affine, in_relu and affine,
        weight_strides(w), dw.stride(), gated, prologue_backward, stats is not None,
        stats is not None and stats.gamma is not None, dx_add is not None, target_of(dz)))
    splits = w_grid[2]
    # the split partials [splits, Cout, Cin/groups, k, k] and the prologue's row partials are
    # merged inside the launch: kept scratch (one split: dw itself is the operand, never read)
    partials = _runtime.scratch(dz.device, splits * dw.numel()) if splits > 1 else dw
    # without the prologue dw stands in for the vectors (not read: one pointer type, one binary)
    scale, shift = (_vector_operand(in_scale), _vector_operand(in_shift)) if affine else (dw, dw)
    counters = arrival_counters(dz.device, w_grid[0] * w_grid[1])
    gate = in_gate.detach().float().reshape(N, Cin).contiguous() if gated else None
    sums = psum = pro_counters = None
    if prologue_backward:  # the prologue's backward: its own partials [2, rows, Cin] and counters
        n_rows = sizes["dgrad_programs"] // sizes["dgrad_n_blocks"]
        sums = _empty((2, Cin), device=dz.device, dtype=torch.float32)
        psum = _runtime.scratch(dz.device, 2 * n_rows * Cin, slot=1)
        pro_counters = arrival_counters(dz.device, sizes["dgrad_n_blocks"], slot=1)
    st = {} if dx_add is None else {"dx_add_ptr": _channels_last(dx_add)}
    if stats is not None:  # (without gamma, the mean stands in for it: not read)
        dparam = st["dparam_ptr"] = _empty((2, Cout), device=dz.device, dtype=torch.float32)
        st.update(z_ptr=_channels_last(stats.z), st_mean_ptr=_vector_operand(stats.mean),
                  st_var_ptr=_vector_operand(stats.var), st_dscale_ptr=_vector_operand(stats.dscale),
                  st_dshift_ptr=_vector_operand(stats.dshift), st_eps=float(stats.eps),
                  st_gamma_ptr=_vector_operand(stats.gamma if stats.gamma is not None else stats.mean))
    # (None: the keyword arguments' defaults, as when they are left out)
    try:
        conv_grads_kernel[grid](dx, partials, dw, counters, dz, w, a, scale, shift, *size_args, in_gate_ptr=gate,
                                psum_ptr=psum, sums_ptr=sums, pro_counter_ptr=pro_counters, **st, **options)
    except Exception as err:  # a compile/launch failure raises before the kernel runs
        _runtime.record_failure(err, _runtime.failure_key("conv_grads", dz, weight.shape))
        return conv_grads(dz, a, weight, stride, padding, groups, packed, in_scale, in_shift, in_relu, in_gate,
                          prologue_backward, stats, dx_add)
    out = (dx, dw, sums) if prologue_backward else (dx, dw)
    return out if stats is None else (*out, dparam)


def stats_terms_reference(dy: Tensor, stats: StatsGrad) -> Tuple[Tensor, Tensor]:
    """PyTorch formulas of ``conv_grads(..., stats=...)``'s load (fp32, or float64 for float64):
    (dz = dy + dmean/M + dvar*2/M*(z - mean) in dy's dtype, [2, Cout] = (d gamma, d beta))."""
    acc = reference.acc_dtype(dy)
    dz, dgamma, dbeta = reference.bn_stats_terms(dy.to(acc), stats, acc)
    return dz.to(dy.dtype), torch.stack([dgamma, dbeta])


def prologue_backward_reference(da: Tensor, x: Tensor, in_scale: Tensor, in_shift: Tensor, in_relu: bool):
    """PyTorch formulas of ``conv_grads(..., prologue_backward=True)``'s epilogue (fp32, or
    float64 for float64): (dx in x's dtype, sums [2, Cin] = (sum g, sum g*x))."""
    acc = torch.float64 if da.dtype == torch.float64 else torch.float32
    c = lambda v: v.to(acc).reshape(1, -1, 1, 1)  # noqa: E731
    g = da.to(acc)
    if in_relu:  # as threshold_backward: NaN passes
        g = torch.where((x.to(acc) * c(in_scale) + c(in_shift)).to(x.dtype) <= 0, 0.0, g)
    dx = (g * c(in_scale)).to(x.dtype)
    return dx, torch.stack([g.sum(dim=(0, 2, 3)), (g * x.to(acc)).sum(dim=(0, 2, 3))]).to(acc)
