"""Fused convolution + BatchNorm + residual + ReLU (grouped 3x3 and 1x1), NHWC inside.

One implicit-GEMM kernel serves both fused operations of the bottleneck:

* the grouped 3x3 convolution + BN + ReLU (``conv2/bn2``), any groups, stride, padding;
* the 1x1 convolution (a GEMM over NHWC rows) with BN, optional residual add and ReLU in
  the epilogue: ``relu(bn3(conv3(x)) + identity)``, ``relu(bn1(conv1(x)))`` and the
  strided downsample ``bn(conv(x))``.

Math, for output pixel m (= n, oh, ow) and output channel co in group g::

    a[m', ci]  = act_in(x[m', ci] * in_scale[ci] + in_shift[ci])      (optional prologue)
    z[m, co]   = sum_{kh, kw, ci in group g} a[m + tap, ci] * w[co, ci - g*Cin_g, kh, kw]
    y[m, co]   = act_out(z * out_scale[co] + out_shift[co] + residual[m, co])

Eval mode folds BN into ``out_scale/out_shift``.  Train mode sets ``stats``: the epilogue
writes, per block of rows, each channel's mean and sum of squared deviations of z; a
small kernel merges those partials (Chan's parallel formula, fp32, no E[z^2]-E[z]^2
cancellation) into the batch mean and variance.  The next layer then applies
``scale/shift + ReLU`` *while loading z* (the prologue), so the normalised activation
never goes through memory.

Grouped convolution: a program owns ``BLOCK_N`` output channels, which may span several
groups (with 4 channels per group, 8 groups in a 32-wide block).  It multiplies the
input channels of those groups by a block-diagonal weight tile (zeros across groups),
so ``tl.dot`` always sees K, N >= 16; see ``_runtime.conv_config``.  Those zeros would turn
one group's NaN/Inf input into NaN for every group of the tile (NaN * 0 = NaN), so a tile
that ends up holding a NaN/Inf is recomputed one group at a time (``MULTI_GROUP``).
"""
import functools
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl


from . import reference, sync_bn
from . import _runtime
from ._runtime import allow_tf32, arrival_counters, cdiv, conv_config, eager_or_op, memo_call, next_power_of_2
from ._runtime import positional_launch_args, Target, target_of, use_triton
from ._triton_helpers import has_nonfinite, last_arrival, mma
from .batchnorm import BNStats, bn_finalize, finalize_channels, finalize_done, finalize_flags, finalize_kinds
from .batchnorm import finalize_outputs, run_bn_act
from .bn_backward import StatsGrad, bn_backward
from .conv_grad import conv_dgrad, conv_grads, conv_wgrad
from .weights import weight_operand, weight_strides

Tensor = torch.Tensor


@triton.jit
def _input_tile(x_ptr, in_scale_ptr, in_shift_ptr, img, oh, ow, m_ok, offs_k, k_ok, tap,
                H, W, Cin, stride, padding,
                KSIZE: tl.constexpr, IN_AFFINE: tl.constexpr, IN_RELU: tl.constexpr,
                in_gate_ptr, IN_GATE: tl.constexpr):
    """[BLOCK_M, BLOCK_K] input tile under one tap, with the optional BN + ReLU prologue and,
    after the ReLU, a per-(image, channel) gate (IN_GATE: RegNetY's SE between conv2 and conv3)."""
    ih = oh * stride - padding + tap // KSIZE
    iw = ow * stride - padding + tap % KSIZE
    pix_ok = m_ok & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
    x_row = ((img * H + ih) * W + iw) * Cin
    a_ok = pix_ok[:, None] & k_ok[None, :]
    # Mask the load by "< Cin" only (constant over 16 channels when Cin is a multiple of 16,
    # so the loads vectorise), then zero the channels outside this block's groups in registers.
    a = tl.load(x_ptr + x_row[:, None] + offs_k[None, :], mask=pix_ok[:, None] & (offs_k < Cin)[None, :],
                other=0.0)
    a = tl.where(a_ok, a, 0.0)
    if IN_AFFINE:
        s = tl.load(in_scale_ptr + offs_k, mask=k_ok, other=0.0)
        b = tl.load(in_shift_ptr + offs_k, mask=k_ok, other=0.0)
        af = a.to(tl.float32) * s[None, :] + b[None, :]
        if IN_RELU:
            af = tl.where(af < 0.0, 0.0, af)  # keeps NaN, like torch.relu
        if IN_GATE:  # x * gate after the activation, as timm's SEModule (NaN/Inf propagate as there)
            af = af * tl.load(in_gate_ptr + img[:, None] * Cin + offs_k[None, :], mask=a_ok, other=0.0)
        # zero padding applies to the normalised activation, not to x
        a = tl.where(a_ok, af, 0.0).to(x_ptr.dtype.element_ty)
    return a


@triton.jit
def _weight_tile(w_ptr, offs_k, k_ok, tap, offs_n, n_ok, group_n, CIN_G, w_stride_tap, w_stride_ci, w_stride_co):
    """[BLOCK_K, BLOCK_N] block-diagonal weight tile: w[ci, co] is zero unless ci and co share a group."""
    group_k = offs_k // CIN_G
    ci_local = offs_k - group_k * CIN_G
    w_off = tap * w_stride_tap + ci_local[:, None] * w_stride_ci + offs_n[None, :] * w_stride_co
    # Load whole rows or columns (vectorised along the stride-1 axis), then zero the other groups.
    w = tl.load(w_ptr + w_off, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
    return tl.where(group_k[:, None] == group_n[None, :], w, 0.0)


@triton.jit(do_not_specialize=["N"])  # batch-dependent sizes: see _runtime
def conv_bn_act_fwd_kernel(
    out_ptr,  # [N, Ho, Wo, Cout] NHWC, activation dtype
    part_mean_ptr,  # [cdiv(M, BLOCK_M), Cout] fp32: per row-block channel mean of z (STATS)
    part_m2_ptr,  # [cdiv(M, BLOCK_M), Cout] fp32: per row-block sum of squared deviations (STATS)
    x_ptr,  # [N, H, W, Cin] NHWC
    w_ptr,  # the weight read at (tap, ci, co) through the strides below: packed or as stored
    in_scale_ptr,  # [Cin] fp32 (IN_AFFINE)
    in_shift_ptr,  # [Cin] fp32 (IN_AFFINE)
    out_scale_ptr,  # [Cout] fp32 (OUT_AFFINE)
    out_shift_ptr,  # [Cout] fp32 (OUT_AFFINE)
    res_ptr,  # [N, Ho, Wo, Cout] NHWC (HAS_RESIDUAL)
    N, H, W, Cin, Ho, Wo, Cout,
    CIN_G, COUT_G,  # channels per group, input and output
    stride, padding,
    KSIZE: tl.constexpr,
    IN_AFFINE: tl.constexpr, IN_RELU: tl.constexpr,
    OUT_AFFINE: tl.constexpr, HAS_RESIDUAL: tl.constexpr, OUT_RELU: tl.constexpr,
    STATS: tl.constexpr, ALLOW_TF32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    MULTI_GROUP: tl.constexpr,  # a block of BLOCK_N output channels may span groups (1; 2: flat NaN check)
    # element strides of w along (tap, ci, co): the packed layout (Cin_g*Cout, Cout, 1) or
    # the weight's own [Cout, Cin_g, k, k] storage (see ``weight_strides``)
    w_stride_tap, w_stride_ci, w_stride_co,
    sq_part_ptr=None,  # [cdiv(M, BLOCK_M), sq_slots, Cout] fp32 out (SQUEEZE): per-image sums of y
    sq_slots=1,  # images one row block can touch: (BLOCK_M - 1) // (Ho*Wo) + 2, at most N
    SQUEEZE: tl.constexpr = False,
    in_gate_ptr=None,  # [N, Cin] fp32 (IN_GATE, with IN_AFFINE): multiplies the prologue's output
    IN_GATE: tl.constexpr = False,
    # FINALIZE (with STATS): the last row block of each channel block to finish merges the
    # partials and writes what a bn_finalize launch would (batchnorm.finalize_channels)
    mean_ptr=None, var_ptr=None, scale_ptr=None, shift_ptr=None,  # [Cout] fp32 out
    gamma_ptr=None, beta_ptr=None,  # [Cout] (FIN_AFFINE), any float dtype
    run_mean_ptr=None, run_var_ptr=None, nbt_ptr=None,  # (FIN_UPDATE, FIN_COUNT) updated in place
    counter_ptr=None,  # int32 [channel blocks], zero (_runtime.arrival_counters): row blocks arrived
    momentum=0.0, eps=1e-5,  # fp32
    FINALIZE: tl.constexpr = False, FIN_AFFINE: tl.constexpr = False, FIN_UPDATE: tl.constexpr = False,
    FIN_CUMULATIVE: tl.constexpr = False, FIN_COUNT: tl.constexpr = False, FIN_BLOCK_T: tl.constexpr = 32,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    M = N * Ho * Wo
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = offs_m < M
    n_ok = offs_n < Cout
    ow = offs_m % Wo
    oh = (offs_m // Wo) % Ho
    img = (offs_m // (Wo * Ho)).to(tl.int64)  # int64: activations may exceed 2**31 elements

    # Input channels feeding this block: the groups its output channels belong to.
    n_last = tl.minimum(pid_n * BLOCK_N + BLOCK_N, Cout) - 1
    ci_start = ((pid_n * BLOCK_N) // COUT_G) * CIN_G
    ci_end = (n_last // COUT_G + 1) * CIN_G
    group_n = offs_n // COUT_G

    # One flat loop over (tap, input-channel chunk): a single software-pipelined loop keeps
    # register pressure low (nine unrolled tap loops spilled on sm_90).
    # K chunks start at a multiple of 16 below ci_start, so the compiler can prove 16-byte
    # alignment of the activation loads (ci_start = first group * Cin_g is not, as far as it knows).
    k_base = (ci_start // 16) * 16
    num_k = tl.cdiv(ci_end - k_base, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for it in range(0, KSIZE * KSIZE * num_k):
        if KSIZE == 1:  # a plain GEMM: keep the loop free of divisions
            tap = 0
            kc = it
        else:
            tap = it // num_k
            kc = it - tap * num_k
        offs_k = k_base + kc * BLOCK_K + tl.arange(0, BLOCK_K)
        k_ok = (offs_k >= ci_start) & (offs_k < ci_end)
        a = _input_tile(x_ptr, in_scale_ptr, in_shift_ptr, img, oh, ow, m_ok, offs_k, k_ok, tap,
                        H, W, Cin, stride, padding, KSIZE, IN_AFFINE, IN_RELU, in_gate_ptr, IN_GATE)
        wt = _weight_tile(w_ptr, offs_k, k_ok, tap, offs_n, n_ok, group_n, CIN_G,
                          w_stride_tap, w_stride_ci, w_stride_co)
        acc = mma(a, wt, acc, ALLOW_TF32)

    if OUT_AFFINE:  # loaded before the NaN/Inf check below, whose latency they then hide
        out_s = tl.load(out_scale_ptr + offs_n, mask=n_ok, other=0.0)
        out_b = tl.load(out_shift_ptr + offs_n, mask=n_ok, other=0.0)
    if MULTI_GROUP:
        # The block-diagonal tile multiplies other groups' inputs by zero weights, and a NaN
        # or Inf input times zero is NaN: one bad input would reach every channel of its
        # row, not just its group's.  It also leaves a NaN/Inf in acc, so one check after
        # the loop finds every such tile (real NaN/Inf or overflow: rare), and only those
        # are recomputed one group at a time, which is exact.
        if has_nonfinite(acc, MULTI_GROUP == 2):
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            g_first = (pid_n * BLOCK_N) // COUT_G
            num_kg = tl.cdiv(CIN_G, BLOCK_K)
            steps = KSIZE * KSIZE * num_kg
            for it in tl.range(0, (n_last // COUT_G + 1 - g_first) * steps, num_stages=1):  # rare: no pipelining
                g = g_first + it // steps
                tap = (it % steps) // num_kg
                offs_k = g * CIN_G + (it % num_kg) * BLOCK_K + tl.arange(0, BLOCK_K)
                k_ok = offs_k < (g + 1) * CIN_G
                a = _input_tile(x_ptr, in_scale_ptr, in_shift_ptr, img, oh, ow, m_ok, offs_k, k_ok, tap,
                                H, W, Cin, stride, padding, KSIZE, IN_AFFINE, IN_RELU, in_gate_ptr, IN_GATE)
                wt = _weight_tile(w_ptr, offs_k, k_ok, tap, offs_n, n_ok, group_n, CIN_G,
                                  w_stride_tap, w_stride_ci, w_stride_co)
                acc = tl.where((group_n == g)[None, :], mma(a, wt, acc, ALLOW_TF32), acc)

    y = acc
    out_ok = m_ok[:, None] & n_ok[None, :]
    if STATS:
        # Statistics of z as stored (rounded to the activation dtype), like BN on that tensor.
        zq = acc.to(out_ptr.dtype.element_ty).to(tl.float32)
        rows = tl.minimum(M - pid_m * BLOCK_M, BLOCK_M).to(tl.float32)
        tile_mean = tl.sum(tl.where(m_ok[:, None], zq, 0.0), axis=0) / rows
        dev = tl.where(m_ok[:, None], zq - tile_mean[None, :], 0.0)
        tile_m2 = tl.sum(dev * dev, axis=0)
        tl.store(part_mean_ptr + pid_m * Cout + offs_n, tile_mean, mask=n_ok)
        tl.store(part_m2_ptr + pid_m * Cout + offs_n, tile_m2, mask=n_ok)
    if OUT_AFFINE:
        y = y * out_s[None, :] + out_b[None, :]
    out_off = offs_m.to(tl.int64)[:, None] * Cout + offs_n[None, :]
    if HAS_RESIDUAL:
        y += tl.load(res_ptr + out_off, mask=out_ok, other=0.0).to(tl.float32)
    if OUT_RELU:
        y = tl.where(y < 0.0, 0.0, y)  # keeps NaN, like torch.relu
    if SQUEEZE:
        # Per-(image, channel) sums of y as stored, for a squeeze-excite's mean: a row block
        # may span several images, so one sum per image it touches (slot k = image - the
        # block's first image; every slot written, 0 if untouched), merged in a fixed order
        # by squeeze_sum_kernel.  No atomics.
        yq = tl.where(out_ok, y.to(out_ptr.dtype.element_ty).to(tl.float32), 0.0)
        img_local = offs_m // (Ho * Wo) - (pid_m * BLOCK_M) // (Ho * Wo)
        for k in range(0, sq_slots):
            sq = tl.sum(tl.where((img_local == k)[:, None], yq, 0.0), axis=0)
            tl.store(sq_part_ptr + (pid_m * sq_slots + k) * Cout + offs_n, sq, mask=n_ok)
    tl.store(out_ptr + out_off, y.to(out_ptr.dtype.element_ty), mask=out_ok)
    if FINALIZE:  # after the tile's store: acc's registers are free for the merge
        if last_arrival(counter_ptr + pid_n, tl.num_programs(0)):
            finalize_channels(pid_n, mean_ptr, var_ptr, scale_ptr, shift_ptr, part_mean_ptr, part_m2_ptr, gamma_ptr,
                              beta_ptr, run_mean_ptr, run_var_ptr, nbt_ptr, tl.num_programs(0), Cout, M, BLOCK_M,
                              momentum, eps, FIN_AFFINE, FIN_UPDATE, FIN_CUMULATIVE, FIN_COUNT, FIN_BLOCK_T, BLOCK_N,
                              False, False)


@triton.jit
def squeeze_sum_kernel(
    out_ptr,  # [N, C] fp32 out: sum over H, W of the convolution output
    part_ptr,  # [T, SLOTS, C] fp32: per row block, one partial sum per image the block touches
    C, HW,  # channels, rows per image
    ROWS, SLOTS,  # rows per block (the conv's BLOCK_M), slots per block
    BLOCK_C: tl.constexpr,
):
    """One program per (image, channel block): the row blocks covering the image, in order."""
    n = tl.program_id(0)
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = offs_c < C
    acc = tl.zeros((BLOCK_C,), dtype=tl.float32)
    for t in range((n * HW) // ROWS, ((n + 1) * HW - 1) // ROWS + 1):
        k = n - (t * ROWS) // HW  # this image's slot in block t
        acc += tl.load(part_ptr + (t * SLOTS + k) * C + offs_c, mask=c_ok, other=0.0)
    tl.store(out_ptr + n * C + offs_c, acc, mask=c_ok)


def merge_squeeze_sums(out: Tensor, part: Tensor, hw: int, rows_per_block: int):
    """[T, SLOTS, C] per-block partials of the conv epilogue (SQUEEZE) -> ``out`` [N, C], in place."""
    N, C = out.shape
    if not (_runtime.FAILED and _runtime.failed("squeeze_sum", out, part.shape)):
        block_c = min(64, next_power_of_2(max(C, 1)))
        try:
            squeeze_sum_kernel[(N, cdiv(C, block_c))](out, part, C, hw, rows_per_block, part.shape[1],
                                                      BLOCK_C=block_c)
            return
        except Exception as err:  # a compile/launch failure raises before the kernel runs
            _runtime.record_failure(err, _runtime.failure_key("squeeze_sum", out, part.shape))
    # the same sums in PyTorch: slot k of block t is image t * rows_per_block // hw + k (0 if untouched)
    T, slots, _ = part.shape
    image = (torch.arange(T, device=part.device) * rows_per_block // hw).view(-1, 1) + \
        torch.arange(slots, device=part.device)
    ok = image < N
    out.zero_().index_add_(0, image[ok], part[ok])


def out_size(size: int, ksize: int, stride: int, padding: int) -> int:
    return (size + 2 * padding - ksize) // stride + 1


def _channels_last(t: Tensor) -> Tensor:
    return t.contiguous(memory_format=torch.channels_last)


def _f32(t: Optional[Tensor]) -> Optional[Tensor]:
    if t is None:
        return None
    t = t.detach()
    return t if t.dtype == torch.float32 and t.is_contiguous() else t.float().contiguous()


def conv_bn_act_forward(
    x: Tensor, weight: Tensor, packed: Optional[Tensor], stride: int, padding: int, groups: int,
    in_scale: Optional[Tensor], in_shift: Optional[Tensor], in_relu: bool,
    out_scale: Optional[Tensor], out_shift: Optional[Tensor], residual: Optional[Tensor],
    out_relu: bool, stats: bool, bn_weight: Optional[Tensor], bn_bias: Optional[Tensor],
    running_mean: Optional[Tensor], running_var: Optional[Tensor], num_batches_tracked: Optional[Tensor],
    momentum: Optional[float], eps: float, group_name: Optional[str] = None,
    squeeze_sums: Optional[Tensor] = None, in_gate: Optional[Tensor] = None,
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Launch the Triton kernels (or run the reference on a plain CPU tensor).

    Returns (y, mean, var, scale, shift); the last four are empty unless ``stats``: then the
    batch statistics of y (the raw convolution output) and the BN's scale/shift from them,
    with the running statistics (when given) updated in place: one finalize launch.
    ``group_name``: the statistics are those of that process group's ranks (``kernels.sync_bn``).
    ``squeeze_sums`` ([N, Cout] fp32, optional): filled with the per-(image, channel) sums of
    y over H, W (the squeeze of a squeeze-excite; one more small launch).
    ``in_gate`` ([N, Cin] or [N, Cin, 1, 1], with in_scale): the prologue's output is multiplied by
    it per (image, channel), after the ReLU (``squeeze_excite.GatedConvFn``).
    """
    # float64: reference (for gradcheck); a kernel that failed to compile or launch here: reference
    if not use_triton(x) or x.dtype == torch.float64 or \
            (_runtime.FAILED and _runtime.failed("conv_bn_act", x, weight.shape)):
        if in_gate is not None:
            x = reference.input_prologue(x, in_scale, in_shift, in_relu, in_gate)
            in_scale = in_shift = None
        y, mean, var = reference.conv_bn_act_reference(
            x, weight, stride, padding, groups, in_scale, in_shift, in_relu,
            out_scale, out_shift, residual, out_relu, stats)
        stat_dtype = reference.acc_dtype(x)
        mean, var = mean.to(stat_dtype), var.to(stat_dtype)
        if stats:
            count = y.numel() // max(y.shape[1], 1)
            if group_name is not None:
                mean, var, count = sync_bn.merge_rank_stats_reference(mean, var, count, group_name)
            scale, shift = reference.bn_finalize_reference(
                mean, var, count, bn_weight, bn_bias, running_mean, running_var,
                num_batches_tracked, momentum, eps)
        else:
            scale, shift = mean.new_empty(0), mean.new_empty(0)
        if squeeze_sums is not None:
            squeeze_sums.copy_(y.to(reference.acc_dtype(y)).sum(dim=(2, 3)))
        return _channels_last(y), mean, var, scale, shift

    # The statistics finalized in the convolution's own launch, unless they are a process
    # group's (a gather between the two merges) or the batch is empty (no program runs).
    in_launch = stats and group_name is None and x.numel() > 0
    try:
        y, part_mean, part_m2, sq_part, (M, block_m, hw), bn_stats = _launch(
            x, weight, packed, stride, padding, groups, in_scale, in_shift, in_relu, out_scale, out_shift, residual,
            out_relu, stats, squeeze_sums is not None, in_gate,
            (bn_weight, bn_bias, running_mean, running_var, num_batches_tracked, momentum, eps) if in_launch else None)
    except Exception as err:  # a compile/launch failure raises before the kernel runs: nothing was written
        _runtime.record_failure(err, _runtime.failure_key("conv_bn_act", x, weight.shape))
        return conv_bn_act_forward(x, weight, packed, stride, padding, groups, in_scale, in_shift, in_relu, out_scale,
                                   out_shift, residual, out_relu, stats, bn_weight, bn_bias, running_mean,
                                   running_var, num_batches_tracked, momentum, eps, group_name, squeeze_sums, in_gate)
    if sq_part is not None:
        merge_squeeze_sums(squeeze_sums, sq_part, hw, block_m)
    if bn_stats is not None:
        return (y, *bn_stats)
    if stats:
        return (y, *bn_finalize(part_mean, part_m2, M, block_m, bn_weight, bn_bias, running_mean,
                                running_var, num_batches_tracked, momentum, eps, group_name))
    # distinct empties: op outputs may not alias
    empty = y.new_empty
    return y, empty(0, dtype=torch.float32), empty(0, dtype=torch.float32), empty(0, dtype=torch.float32), \
        empty(0, dtype=torch.float32)


def conv_bn_act_eval(
    x: Tensor, weight: Tensor, packed: Optional[Tensor], stride: int, padding: int, groups: int,
    in_scale: Optional[Tensor], in_shift: Optional[Tensor], in_relu: bool,
    out_scale: Optional[Tensor], out_shift: Optional[Tensor], residual: Optional[Tensor], out_relu: bool,
) -> Tensor:
    """y of ``conv_bn_act_forward`` without statistics (an eval-mode stage) when nothing is
    recorded (no autograd, no torch.compile trace): the same launch, without the op's four
    empty statistics outputs."""
    if not use_triton(x) or x.dtype == torch.float64 or \
            (_runtime.FAILED and _runtime.failed("conv_bn_act", x, weight.shape)):
        return conv_bn_act_forward(x, weight, packed, stride, padding, groups, in_scale, in_shift, in_relu,
                                   out_scale, out_shift, residual, out_relu, False, None, None, None, None,
                                   None, None, 0.0)[0]
    try:
        return _launch(x, weight, packed, stride, padding, groups, in_scale, in_shift, in_relu, out_scale,
                       out_shift, residual, out_relu, False, False, None)[0]
    except Exception as err:
        _runtime.record_failure(err, _runtime.failure_key("conv_bn_act", x, weight.shape))
        return conv_bn_act_eval(x, weight, packed, stride, padding, groups, in_scale, in_shift, in_relu,
                                out_scale, out_shift, residual, out_relu)


@_runtime.config_memo
@functools.lru_cache(maxsize=4096)
def _launch_consts(N: int, H: int, W: int, Cin: int, Cout: int, cin_g: int, groups: int, ksize: int,
                   stride: int, padding: int, dtype: torch.dtype, in_affine: bool, in_relu: bool,
                   out_affine: bool, has_residual: bool, out_relu: bool, stats: bool, squeeze: bool,
                   in_gate: bool, tf32: bool, w_strides: Tuple[int, int, int], target: Target,
                   config=conv_config, finalize: Optional[Tuple[bool, bool, bool, bool]] = None):
    """The constant part of a forward launch, per shape, dtype and flags (host time: ~40
    arguments built per call otherwise): the output shape, the grid, the arguments after the
    ten pointers (``positional_launch_args``: positional, keywords), the partials' shapes and
    (M, BLOCK_M, Ho*Wo).  ``finalize``: the
    launch also finalizes the statistics (its ``batchnorm.finalize_kinds``).  ``target``: the
    device's (``_runtime.target_of``); ``config``: the configuration function in use."""
    Ho, Wo = out_size(H, ksize, stride, padding), out_size(W, ksize, stride, padding)
    M = N * Ho * Wo
    cfg = config(M, Cout, cin_g, Cout // groups, dtype, target, kind="fwd_stats" if stats else "fwd")
    n_row_blocks = cdiv(M, cfg["BLOCK_M"])
    grid = (n_row_blocks, cdiv(Cout, cfg["BLOCK_N"]))
    kwargs = dict(N=N, H=H, W=W, Cin=Cin, Ho=Ho, Wo=Wo, Cout=Cout, CIN_G=cin_g, COUT_G=Cout // groups,
                  stride=stride, padding=padding, KSIZE=ksize, IN_AFFINE=in_affine, IN_RELU=in_relu,
                  OUT_AFFINE=out_affine, HAS_RESIDUAL=has_residual, OUT_RELU=out_relu, STATS=stats,
                  ALLOW_TF32=tf32, **cfg, w_stride_tap=w_strides[0], w_stride_ci=w_strides[1],
                  w_stride_co=w_strides[2])
    sq_shape = None
    if squeeze:  # images one row block can touch: at most N
        sq_slots = min(N, (cfg["BLOCK_M"] - 1) // (Ho * Wo) + 2)
        sq_shape = (n_row_blocks, sq_slots, Cout)
        kwargs.update(sq_slots=sq_slots, SQUEEZE=True)
    if in_gate:
        kwargs.update(IN_GATE=True)
    if finalize is not None:
        kwargs.update(finalize_constexprs(finalize, cfg["BLOCK_N"]))
    return (N, Cout, Ho, Wo), grid, positional_launch_args(conv_bn_act_fwd_kernel, 10, kwargs), \
        (n_row_blocks, Cout) if stats else None, sq_shape, \
        (M, cfg["BLOCK_M"], Ho * Wo)


def finalize_block_t(block_n: int) -> int:
    """Partial rows the FINALIZE merge reads at a time: [FIN_BLOCK_T, BLOCK_N] tiles of at most
    4096 elements (the registers of the finished main loop)."""
    return max(8, min(32, 4096 // block_n))


def finalize_constexprs(kinds: Tuple[bool, bool, bool, bool], block_n: int) -> dict:
    """The kernel's FINALIZE constexprs for a BN of these ``batchnorm.finalize_kinds`` (the
    launcher, the offline compilation and the kernel report all use it)."""
    return dict({"FIN_" + k: v for k, v in finalize_flags(*kinds).items()}, FINALIZE=True,
                FIN_BLOCK_T=finalize_block_t(block_n))


def _launch(x: Tensor, weight: Tensor, packed: Optional[Tensor], stride: int, padding: int, groups: int,
            in_scale: Optional[Tensor], in_shift: Optional[Tensor], in_relu: bool,
            out_scale: Optional[Tensor], out_shift: Optional[Tensor], residual: Optional[Tensor], out_relu: bool,
            stats: bool, squeeze: bool, in_gate: Optional[Tensor], finalize: Optional[tuple] = None):
    """One ``conv_bn_act_fwd_kernel`` launch: (y, statistics partials or None (x2), squeeze
    partials or None, (M, BLOCK_M, Ho*Wo), BNStats or None).  ``finalize`` (with stats):
    (gamma, beta, running_mean, running_var, num_batches_tracked, momentum, eps) of the BN the
    launch also finalizes, as ``batchnorm.bn_finalize`` would (then the BNStats)."""
    x = _channels_last(x)
    w = weight_operand(weight, packed, x.dtype)
    N, Cin, H, W = x.shape
    Cout, cin_g, ksize, _ = weight.shape
    y_shape, grid, (args, kwargs), part_shape, sq_shape, sizes = _launch_consts(
        N, H, W, Cin, Cout, cin_g, groups, ksize, stride, padding, x.dtype, in_scale is not None, in_relu,
        out_scale is not None, residual is not None, out_relu, stats, squeeze, in_gate is not None,
        allow_tf32(x.dtype), weight_strides(w), target_of(x), conv_config,
        None if finalize is None else finalize_kinds(finalize[0], finalize[2], finalize[4], finalize[5]))
    y = torch.empty(y_shape, device=x.device, dtype=x.dtype, memory_format=torch.channels_last)
    part_mean = part_m2 = sq_part = None
    if part_shape is not None and finalize is not None:  # merged inside the launch: kept scratch
        n_part = part_shape[0] * part_shape[1]
        part_mean, part_m2 = _runtime.scratch(x.device, n_part), _runtime.scratch(x.device, n_part, slot=1)
    elif part_shape is not None:  # merged by a later launch (bn_finalize)
        part_mean = torch.empty(part_shape, device=x.device, dtype=torch.float32)
        part_m2 = torch.empty(part_shape, device=x.device, dtype=torch.float32)
    extra = {}
    if sq_shape is not None:
        sq_part = extra["sq_part_ptr"] = torch.empty(sq_shape, device=x.device, dtype=torch.float32)
    if in_gate is not None:
        extra["in_gate_ptr"] = _f32(in_gate.reshape(N, Cin))
    fin_out = None
    if finalize is not None:
        gamma, beta, running_mean, running_var, nbt, momentum, eps = finalize
        fin_out = finalize_outputs(Cout, x.device)
        d = fin_out[0]  # stands in for what is not given (not read)
        extra.update(mean_ptr=fin_out[0], var_ptr=fin_out[1], scale_ptr=fin_out[2], shift_ptr=fin_out[3],
                     gamma_ptr=d if gamma is None else gamma, beta_ptr=d if beta is None else beta,
                     run_mean_ptr=d if running_mean is None else running_mean,
                     run_var_ptr=d if running_var is None else running_var, nbt_ptr=d if nbt is None else nbt,
                     counter_ptr=arrival_counters(x.device, grid[1]), momentum=float(momentum or 0.0), eps=float(eps))
    conv_bn_act_fwd_kernel[grid](
        y, y if part_mean is None else part_mean, y if part_m2 is None else part_m2, x, w,  # (y: never read)
        y if in_scale is None else _f32(in_scale), y if in_shift is None else _f32(in_shift),
        y if out_scale is None else _f32(out_scale), y if out_shift is None else _f32(out_shift),
        y if residual is None else _channels_last(residual),
        *args, **kwargs, **extra)
    if finalize is not None:
        finalize_done(running_mean, running_var, nbt, momentum)
        fin_out = BNStats(*fin_out)
    return y, part_mean, part_m2, sq_part, sizes, fin_out


# --------------------------------------------------------------------------------------
# Custom operators (torch.compile sees opaque nodes) and the autograd formula.
# --------------------------------------------------------------------------------------
# The operators are the plain implementations registered with torch.library: what
# torch.compile sees (see _runtime.eager_or_op).  This one writes the running statistics.
conv_bn_act_op = torch.library.custom_op(
    "resnext::conv_bn_act", conv_bn_act_forward,
    mutates_args=("running_mean", "running_var", "num_batches_tracked"))


@conv_bn_act_op.register_fake
def _(x, weight, packed, stride, padding, groups, in_scale, in_shift, in_relu,
      out_scale, out_shift, residual, out_relu, stats, bn_weight, bn_bias, running_mean, running_var,
      num_batches_tracked, momentum, eps, group_name=None, squeeze_sums=None, in_gate=None):
    return fake_conv_outputs(x, weight, stride, padding, stats)


def fake_conv_outputs(x: Tensor, weight: Tensor, stride: int, padding: int, stats: bool,
                      per_image: int = 0) -> Tuple[Tensor, ...]:
    """The fake outputs of a conv operator: y (channels_last), 4 statistics vectors ([Cout]
    with ``stats``, else empty), then ``per_image`` [N, Cout] tensors (the squeeze operators)."""
    N, _, H, W = x.shape
    Cout, _, ksize, _ = weight.shape
    Ho, Wo = out_size(H, ksize, stride, padding), out_size(W, ksize, stride, padding)
    y = torch.empty((N, Cout, Ho, Wo), device=x.device, dtype=x.dtype, memory_format=torch.channels_last)
    n_stats, stat_dtype = (Cout if stats else 0), reference.acc_dtype(x)
    return (y, *(x.new_empty(n_stats, dtype=stat_dtype) for _ in range(4)),
            *(x.new_empty((N, Cout), dtype=stat_dtype) for _ in range(per_image)))


def conv_grads_impl(dz: Tensor, a: Tensor, weight: Tensor, packed: Optional[Tensor], stride: int,
                    padding: int, groups: int, need_input: bool, need_weight: bool,
                    in_scale: Optional[Tensor], in_shift: Optional[Tensor], in_relu: bool,
                    in_gate: Optional[Tensor] = None, prologue_backward: bool = False,
                    stats_z: Optional[Tensor] = None, stats_mean: Optional[Tensor] = None,
                    stats_var: Optional[Tensor] = None, stats_dscale: Optional[Tensor] = None,
                    stats_dshift: Optional[Tensor] = None, stats_gamma: Optional[Tensor] = None,
                    stats_eps: float = 0.0, dx_add: Optional[Tensor] = None) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """Data and weight gradients of the convolution (Triton dgrad / wgrad kernels).

    Returns (da [N, Cin, H, W] channels_last in dz's dtype, dw fp32 in the weight's memory
    layout); an output that is not needed comes back empty; both needed: one launch.
    ``packed``: the forward's packed weight in dz's dtype, or None.
    ``in_scale/in_shift/in_relu``: a is x, and the weight gradient applies the forward's
    prologue to it on load (``in_gate``: and the prologue's gate after it).
    ``prologue_backward`` (both needed, in_scale, no gate): the data gradient's epilogue applies
    the prologue's backward (``conv_grad.conv_grads``): da is dx, and the third output holds
    [2, Cin] fp32 (sum g, sum g*x); otherwise the third output is empty.
    ``stats_*`` (both needed; ``stats_z`` given): dz reaches z through its BN's scale and shift only, and
    the batch-statistics terms join it on load (``conv_grad.conv_grads``' ``stats``): the fourth output
    holds [2, Cout] fp32 (d gamma, d beta); otherwise it is empty.
    ``dx_add`` (both needed, no prologue_backward): added to da (``conv_grad.conv_grads``).
    """
    if need_input and need_weight:
        stats = None if stats_z is None else \
            StatsGrad(stats_z, stats_mean, stats_var, None, None, stats_dscale, stats_dshift, stats_gamma, stats_eps)
        out = conv_grads(dz, a, weight, stride, padding, groups, packed=packed, in_scale=in_scale,
                         in_shift=in_shift, in_relu=in_relu, in_gate=in_gate, prologue_backward=prologue_backward,
                         stats=stats, dx_add=dx_add)
        empty = dz.new_empty
        if not prologue_backward:
            out = (out[0], out[1], empty(0, dtype=torch.float32), *out[2:])
        return out if stats is not None else (*out, empty(0, dtype=torch.float32))
    if prologue_backward or stats_z is not None or dx_add is not None:
        raise ValueError("prologue_backward, stats and dx_add need both gradients")
    da = conv_dgrad(dz, weight, a.shape[2:], stride, padding, groups, packed=packed) if need_input \
        else dz.new_empty(0)
    dw = conv_wgrad(dz, a, weight.shape, stride, padding, groups, in_scale=in_scale, in_shift=in_shift,
                    in_relu=in_relu, layout_like=weight, in_gate=in_gate) if need_weight \
        else dz.new_empty(0, dtype=torch.float32)
    return da, dw, dz.new_empty(0, dtype=torch.float32), dz.new_empty(0, dtype=torch.float32)


conv_grads_op = torch.library.custom_op("resnext::conv_grads", conv_grads_impl, mutates_args=())


@conv_grads_op.register_fake
def _(dz, a, weight, packed, stride, padding, groups, need_input, need_weight, in_scale, in_shift, in_relu,
      in_gate=None, prologue_backward=False, stats_z=None, stats_mean=None, stats_var=None, stats_dscale=None,
      stats_dshift=None, stats_gamma=None, stats_eps=0.0, dx_add=None):
    da = torch.empty(a.shape, device=a.device, dtype=dz.dtype, memory_format=torch.channels_last) if need_input \
        else dz.new_empty(0)
    dw_dtype = reference.acc_dtype(dz)
    dw = torch.empty_like(weight, dtype=dw_dtype) if need_weight else dz.new_empty(0, dtype=torch.float32)
    sums = dz.new_empty((2, a.shape[1]) if prologue_backward else (0,), dtype=torch.float32)
    dparam = dz.new_empty((2, dz.shape[1]) if stats_z is not None else (0,), dtype=torch.float32)
    return da, dw, sums, dparam


def _channel_sum(t: Tensor) -> Tensor:
    return t.sum(dim=(0, 2, 3))


# Argument positions of ConvBNActFn.apply (ctx.needs_input_grad)
(_X, _W, _PACK, _STRIDE, _PAD, _GROUPS, _IN_SCALE, _IN_SHIFT, _IN_RELU, _OUT_SCALE, _OUT_SHIFT, _RES, _OUT_RELU,
 _STATS, _GAMMA, _BETA, _RMEAN, _RVAR, _NBT, _MOMENTUM, _EPS) = range(21)


class ConvBNActFn(torch.autograd.Function):
    """Autograd of the fused convolution: an ``autograd.Function`` around the operator (the
    operator itself only while ``torch.compile`` traces; see ``_runtime.eager_or_op``).
    The operator mutates the running statistics, and PyTorch gives mutating custom operators
    no autograd formula of their own: the Function carries it."""

    @staticmethod
    def forward(ctx, x, weight, packed, stride, padding, groups, in_scale, in_shift, in_relu,
                out_scale, out_shift, residual, out_relu, stats, bn_weight, bn_bias,
                running_mean, running_var, num_batches_tracked, momentum, eps, group_name=None):
        y, mean, var, scale, shift = eager_or_op(conv_bn_act_op, conv_bn_act_forward)(
            x, weight, packed, stride, padding, groups, in_scale, in_shift, in_relu,
            out_scale, out_shift, residual, out_relu, stats,
            bn_weight, bn_bias, running_mean, running_var, num_batches_tracked, momentum, eps, group_name)
        # Only x, the weight (and its packed copy), the per-channel vectors and y are kept:
        # the prologue (BN + ReLU of the previous layer) is recomputed from x in the backward.
        ctx.save_for_backward(x, weight, packed, in_scale, in_shift, out_scale, out_shift, y, mean, var,
                              bn_weight)
        ctx.conf = (stride, padding, groups, in_relu, residual is not None, out_relu, stats, eps)
        ctx.group_name = group_name  # statistics merged across that process group's ranks
        ctx.set_materialize_grads(False)  # outputs nobody used get None, not zero tensors
        if not stats:
            ctx.mark_non_differentiable(mean, var, scale, shift)
        return y, mean, var, scale, shift

    @staticmethod
    def backward(ctx, dy, dmean, dvar, dscale, dshift):
        return (*_backward(ctx, dy, dmean, dvar, dscale, dshift), None)  # None: group_name


def _backward(ctx, dy, dmean, dvar, dscale, dshift, image_grad=None, image_mask=None, in_gate=None, dx_add=None):
    """``image_grad`` ([N, Cout] or None): a gradient added to dy per (image, channel), that
    of the squeeze sums (``squeeze_excite.ConvSqueezeFn``), applied in the same pass;
    ``image_mask`` ((scale, shift) [Cout]): only where y*scale + shift > 0, a squeeze after a
    ReLU (``squeeze_excite.ConvReluSqueezeFn``).  ``in_gate`` ([N, Cin] fp32): the forward's
    prologue gate (``squeeze_excite.GatedConvFn``).  ``dx_add`` (x's shape and dtype, with need[_X]):
    another branch's gradient of x, summed into dx (by the gradient launch when it can).
    Returns the gradients of ConvBNActFn's first 21 arguments (all but ``group_name``), then
    with ``in_gate`` the gate's ([N, Cin] fp32)."""
    x, weight, packed, in_scale, in_shift, out_scale, out_shift, y, mean, var, bn_weight = ctx.saved_tensors
    stride, padding, groups, in_relu, has_res, out_relu, stats, eps = ctx.conf
    need = ctx.needs_input_grad
    pc = reference._per_channel
    acc = reference.acc_dtype(x)  # elementwise work in fp32 (float64 for gradcheck)
    # Triton path: each elementwise step below is one pass of bn_backward_kernel.  The
    # PyTorch formulas stay for float64 (gradcheck) and plain CPU tensors: they are the reference.
    fused = use_triton(x) and x.dtype != torch.float64
    need_z = out_scale is not None and need[_OUT_SCALE]  # frozen BN with a trainable gamma
    stats_terms = stats and any(t is not None for t in (dmean, dvar, dscale, dshift))
    compute_dtype = x.dtype
    synced = stats_terms and ctx.group_name is not None
    if synced:
        # The statistics are the group's: the gradients reaching them, summed over the ranks (one
        # all-reduce), feed the statistics terms below; gamma and beta keep this rank's gradient
        # (DDP averages those, as for nn.SyncBatchNorm).  See kernels.sync_bn.
        sync_dgamma, sync_dbeta = sync_bn.local_affine_grads(mean, var, eps, dscale, dshift)
        dmean, dvar, dscale, dshift = sync_bn.sum_stats_grads([dmean, dvar, dscale, dshift],
                                                              y.numel() // max(y.shape[1], 1), ctx.group_name)

    if not fused or (in_gate is not None and need_z):  # (the gated one: bn_act gates before its ReLU)
        a = reference.input_prologue(x, in_scale, in_shift, in_relu, in_gate)
    elif in_scale is not None and need_z:
        a = run_bn_act(x, in_scale, in_shift, None, None, None, in_relu)  # one Triton pass
    else:
        a = x  # the weight gradient applies the prologue to x on load

    need_da = need[_X] or need[_IN_SCALE] or need[_IN_SHIFT] or in_gate is not None
    # Only the statistics terms between dy and z, and both gradients wanted: they join the
    # gradients' loads (conv_grads' stats), which also give gamma's and beta's: no pass of their own.
    stats_on_load = fused and stats_terms and not synced and dmean is None and dvar is None \
        and dscale is not None and dshift is not None and dy is not None and not out_relu and out_scale is None \
        and not (has_res and need[_RES]) and image_grad is None and need_da and need[_W] \
        and dy.dtype == compute_dtype and dy.is_contiguous(memory_format=torch.channels_last)

    d_res = d_out_scale = d_out_shift = d_gamma = d_beta = None
    if fused:
        if stats_on_load or (dy is not None and not out_relu and out_scale is None and not stats_terms
                             and not (has_res and need[_RES]) and image_grad is None):
            dz = dy  # nothing to do between y and z here
        else:
            # Recompute z rather than keep it; then one pass: ReLU mask from y, scale,
            # statistics terms (with the finalize's backward), d_res, the sums for gamma and beta.
            z = torch.nn.functional.conv2d(a, weight.to(a.dtype), stride=stride, padding=padding,
                                           groups=groups) if need_z else None
            ep = bn_backward(
                dy, relu_out=y if out_relu else None, scale=out_scale,
                stats=StatsGrad(y, mean, var, dmean, dvar, dscale, dshift, bn_weight, eps) if stats_terms else None,
                dz_dtype=a.dtype, dres_dtype=y.dtype if has_res and need[_RES] else None,
                sum_g=out_scale is not None and need[_OUT_SHIFT], sum_gv=z, image_add=image_grad,
                image_mask=(y, *image_mask) if image_mask is not None and image_grad is not None else None)
            dz, d_res = ep.dz, ep.dres
            d_gamma, d_beta = ep.dgamma, ep.dbeta
            d_out_scale = ep.sum_gv if need_z else None
            d_out_shift = ep.sum_g if out_scale is not None and need[_OUT_SHIFT] else None
    else:
        du = dy.to(acc) if dy is not None else torch.zeros_like(y, dtype=acc)
        if image_grad is not None:
            img = image_grad.to(acc)[:, :, None, None]
            if image_mask is not None:  # NaN passes, as the kernel's mask
                img = img * ~(y.to(acc) * pc(image_mask[0].to(acc)) + pc(image_mask[1].to(acc)) <= 0)
            du = du + img
        if out_relu:
            du = du * (y > 0)
        d_res = du.to(y.dtype) if has_res and need[_RES] else None
        dz = du
        if out_scale is not None:
            dz = du * pc(out_scale.to(acc))
            if need_z:  # frozen BN with a trainable gamma: recompute z rather than keep it
                z = torch.nn.functional.conv2d(a, weight.to(a.dtype), stride=stride, padding=padding,
                                               groups=groups)
                d_out_scale = _channel_sum(du * z.to(acc)).to(out_scale.dtype)
            if need[_OUT_SHIFT]:
                d_out_shift = _channel_sum(du).to(out_shift.dtype)
        if stats_terms:
            # y is the raw convolution output z here (no epilogue is allowed with stats).
            dz, d_gamma, d_beta = reference.bn_stats_terms(
                dz, StatsGrad(y, mean, var, dmean, dvar, dscale, dshift, bn_weight, eps), acc)

    if packed is not None and packed.dtype != compute_dtype:
        packed = None
    wgrad_prologue = fused and in_scale is not None and a is x
    # Ungated prologue, both gradients: its backward runs in the data gradient's epilogue
    # (dx and the sums for in_scale / in_shift from the same launch; no pass of its own).
    in_epilogue = wgrad_prologue and in_gate is None and need_da and need[_W]
    stats_args = (y, mean, var, dscale, dshift, bn_weight, eps) if stats_on_load else ()
    # the other branch's gradient of x added as dx is stored (no prologue: da is dx)
    add_in_launch = dx_add is not None and fused and in_scale is None and need[_X] and need[_W] \
        and dx_add.dtype == x.dtype and dx_add.shape == x.shape
    da, dw, pro_sums, stats_dparam = eager_or_op(conv_grads_op, conv_grads_impl)(
        dz.to(compute_dtype), a, weight, packed, stride, padding, groups, need_da, need[_W],
        in_scale if wgrad_prologue else None, in_shift if wgrad_prologue else None, in_relu and wgrad_prologue,
        in_gate if wgrad_prologue else None, in_epilogue, *stats_args, dx_add=dx_add if add_in_launch else None)
    if stats_on_load:
        d_gamma, d_beta = stats_dparam[0], stats_dparam[1]
    da = da if need_da else None
    dx = d_in_scale = d_in_shift = d_in_gate = None
    if in_epilogue:
        dx = da if need[_X] else None
        d_in_shift = pro_sums[0] if need[_IN_SHIFT] else None
        d_in_scale = pro_sums[1] if need[_IN_SCALE] else None
    elif in_scale is not None and da is not None and fused:
        # One pass: ReLU mask recomputed from x (a is not kept), scale, sums for gamma and beta.
        pr = bn_backward(
            da, relu_in=x if in_relu else None, relu_in_scale=in_scale if in_relu else None,
            relu_in_shift=in_shift if in_relu else None, scale=in_scale,
            dz_dtype=x.dtype if need[_X] else None, sum_g=need[_IN_SHIFT],
            sum_gv=x if (need[_IN_SCALE] or in_gate is not None) and not in_relu else None,
            sum_gv_is_relu_in=need[_IN_SCALE] and in_relu, gate=in_gate,
            gate_shift=in_shift if in_gate is not None else None)
        dx, d_in_gate = pr.dz, pr.dgate
        d_in_scale = pr.sum_gv if need[_IN_SCALE] else None
        d_in_shift = pr.sum_g if need[_IN_SHIFT] else None
    elif in_scale is not None and da is not None:
        da = da.to(acc)
        if in_gate is not None:  # d gate = sum over H, W of da * the prologue's pre-gate output
            d_in_gate = (da * reference.input_prologue(x.to(acc), in_scale, in_shift, in_relu)).sum(dim=(2, 3))
            da = da * in_gate.to(acc).reshape(in_gate.shape[0], -1, 1, 1)
        if in_relu:
            da = da * (a > 0) if in_gate is None else \
                da * ~(x.to(acc) * pc(in_scale.to(acc)) + pc(in_shift.to(acc)) <= 0)
        dx = (da * pc(in_scale.to(acc))).to(x.dtype) if need[_X] else None
        d_in_scale = _channel_sum(da * x.to(acc)).to(in_scale.dtype) if need[_IN_SCALE] else None
        d_in_shift = _channel_sum(da).to(in_shift.dtype) if need[_IN_SHIFT] else None
    elif da is not None:
        dx = da if da.dtype == x.dtype else da.to(x.dtype)
    if dx_add is not None and not add_in_launch and dx is not None:
        dx = dx + dx_add
    if synced:
        d_gamma, d_beta = sync_dgamma, sync_dbeta
    dw = (dw if dw.dtype == weight.dtype else dw.to(weight.dtype)) if need[_W] else None
    def cast(g, like):
        return None if g is None or like is None else g if g.dtype == like.dtype else g.to(like.dtype)

    grads = (dx, dw, None, None, None, None, cast(d_in_scale, in_scale), cast(d_in_shift, in_shift), None,
             cast(d_out_scale, out_scale), cast(d_out_shift, out_shift), d_res, None, None,
             cast(d_gamma, bn_weight) if need[_GAMMA] else None, cast(d_beta, bn_weight) if need[_BETA] else None,
             None, None, None, None, None)
    return grads if in_gate is None else (*grads, d_in_gate)


# --------------------------------------------------------------------------------------
# Public function: validates, then calls the operator.
# --------------------------------------------------------------------------------------
def _check_vector(name: str, v: Optional[Tensor], n: int, x: Tensor):
    if v is None:
        return
    if v.dim() != 1 or v.shape[0] != n:
        raise ValueError(f"{name} must have shape [{n}], got {list(v.shape)}")
    if v.device != x.device:
        raise ValueError(f"{name} is on {v.device} but the input is on {x.device}")
    if not v.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {v.dtype}")


def check_conv_inputs(x: Tensor, weight: Tensor, stride: int, padding: int, groups: int,
                      same_dtype: bool = True):
    """Raise a ValueError/TypeError naming the problem instead of a kernel crash.
    ``same_dtype=False``: the caller has settled the dtypes (autocast, see resnext.modules).
    The checks read only shapes, dtypes, devices and the integers: ``_check_conv_meta`` runs
    them once per distinct combination (a failing one is not cached: it raises every time)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"expected a torch.Tensor input, got {type(x).__name__}")
    meta = (x.shape, x.dtype, x.device, weight.shape, weight.dtype, weight.device, stride, padding, groups, same_dtype)
    memo_call(_check_conv_meta, *meta)


@functools.lru_cache(maxsize=4096)
def _check_conv_meta(x_shape, x_dtype, x_device, w_shape, w_dtype, w_device, stride, padding, groups, same_dtype):
    if len(x_shape) != 4:
        raise ValueError(f"expected a 4-D input (N, C, H, W), got {len(x_shape)}-D of shape {list(x_shape)}")
    if not x_dtype.is_floating_point or x_dtype not in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        raise TypeError(f"expected a floating-point input (float32, float16 or bfloat16), got {x_dtype}")
    if w_device != x_device:
        raise ValueError(f"input is on {x_device} but the weight is on {w_device}")
    if same_dtype and w_dtype != x_dtype:
        raise TypeError(f"input dtype {x_dtype} does not match the weight dtype {w_dtype}")
    if len(w_shape) != 4 or w_shape[2] != w_shape[3]:
        raise ValueError(f"expected a square [Cout, Cin/groups, k, k] weight, got {list(w_shape)}")
    if groups < 1 or x_shape[1] % groups or w_shape[0] % groups:
        raise ValueError(f"groups={groups} must divide the input channels ({x_shape[1]}) "
                         f"and the output channels ({w_shape[0]})")
    if w_shape[1] * groups != x_shape[1]:
        raise ValueError(f"expected {w_shape[1] * groups} input channels, got {x_shape[1]}")
    if stride < 1 or padding < 0:
        raise ValueError(f"stride must be >= 1 and padding >= 0, got stride={stride}, padding={padding}")
    ksize = w_shape[2]
    if out_size(x_shape[2], ksize, stride, padding) < 1 or out_size(x_shape[3], ksize, stride, padding) < 1:
        raise ValueError(f"input of size {list(x_shape[2:])} is too small for a {ksize}x{ksize} "
                         f"convolution with padding {padding}")


def conv_bn_act(
    x: Tensor, weight: Tensor, stride: int = 1, padding: int = 0, groups: int = 1, *,
    in_scale: Optional[Tensor] = None, in_shift: Optional[Tensor] = None, in_relu: bool = False,
    out_scale: Optional[Tensor] = None, out_shift: Optional[Tensor] = None,
    residual: Optional[Tensor] = None, out_relu: bool = False, stats: bool = False,
) -> Tuple[Tensor, Tensor, Tensor]:
    """Fused ``act(conv(act_in(x*in_scale+in_shift), weight)*out_scale + out_shift + residual)``.

    x: [N, Cin, H, W] (NCHW or channels_last); weight: [Cout, Cin/groups, k, k].
    Returns ``(y, mean, var)``: y is channels_last in x's dtype; with ``stats=True`` mean
    and biased var are the fp32 batch statistics of the raw convolution output (then no
    epilogue is allowed: BN is applied by the consumer), otherwise empty tensors.
    """
    check_conv_inputs(x, weight, stride, padding, groups)
    cout = weight.shape[0]
    _check_vector("in_scale", in_scale, x.shape[1], x)
    _check_vector("in_shift", in_shift, x.shape[1], x)
    _check_vector("out_scale", out_scale, cout, x)
    _check_vector("out_shift", out_shift, cout, x)
    if (in_scale is None) != (in_shift is None) or (out_scale is None) != (out_shift is None):
        raise ValueError("scale and shift must be given together")
    if stats and (out_scale is not None or residual is not None or out_relu):
        raise ValueError("stats=True returns the raw convolution output: no epilogue allowed")
    if residual is not None:
        N, _, H, W = x.shape
        ks = weight.shape[2]
        expected = [N, cout, out_size(H, ks, stride, padding), out_size(W, ks, stride, padding)]
        if list(residual.shape) != expected:
            raise ValueError(f"residual must have shape {expected}, got {list(residual.shape)}")
        if residual.device != x.device:
            raise ValueError(f"residual is on {residual.device} but the input is on {x.device}")
    y, mean, var, _, _ = ConvBNActFn.apply(x, weight, None, stride, padding, groups, in_scale, in_shift, in_relu,
                                         out_scale, out_shift, residual, out_relu, stats,
                                         None, None, None, None, None, 0.1, 1e-5)
    return y, mean, var


def conv3x3_bn_act(x, weight, stride=1, groups=1, **kw):
    """Grouped 3x3 convolution (padding 1) + BN + ReLU; see ``conv_bn_act``."""
    return conv_bn_act(x, weight, stride, 1, groups, **kw)


def conv1x1_bn_act(x, weight, stride=1, **kw):
    """1x1 convolution (GEMM over NHWC rows) + BN [+ residual] [+ ReLU]; see ``conv_bn_act``."""
    return conv_bn_act(x, weight, stride, 0, 1, **kw)
