"""BatchNorm pieces around the fused convolutions: statistics merge, scale/shift, apply.

Train-mode statistics flow (see README, "How it works"):

1. the convolution epilogue writes, per block of ``BLOCK_M`` rows, each channel's mean
   and M2 (sum of squared deviations from that block's mean), in fp32;
2. ``finalize_channels`` merges the blocks with Chan's parallel formula into the batch mean
   and biased variance (no E[z^2] - E[z]^2 cancellation when |mean| >> std), turns them into
   ``scale = gamma / sqrt(var + eps)`` and ``shift = beta - mean * scale``, and updates
   ``running_mean``, ``running_var`` and ``num_batches_tracked`` in place exactly as
   ``nn.BatchNorm2d`` does: run by the convolution's own launch (its last row block per
   channel block, ``conv_bn_act`` FINALIZE), or, for a process group's statistics, by
   ``bn_finalize_kernel`` after it.  Its backward (gradients of gamma, beta and the batch
   mean/var) is folded into the producing convolution's gradient launch (``conv_grad``
   STATS_DZ) or its ``bn_backward`` pass: no [C]-vector PyTorch ops in either direction;
4. the consumer applies ``scale/shift (+ residual) + ReLU``: the next convolution's
   prologue, or ``bn_act`` (one read of z, one write of y) at the end of a block.
"""
import functools
from typing import NamedTuple, Optional, Tuple

import torch
import triton
import triton.language as tl


from . import _runtime, reference, sync_bn
from ._runtime import cdiv, DerivedCache, eager_or_op, next_power_of_2, rows_config, use_triton
from .bn_backward import bn_backward

Tensor = torch.Tensor


@triton.jit(do_not_specialize=["T", "M"])  # batch-dependent sizes: see _runtime
def bn_finalize_kernel(
    mean_ptr, var_ptr,  # [C] fp32 out: batch mean and biased variance
    scale_ptr, shift_ptr,  # [C] fp32 out: gamma / sqrt(var + eps), beta - mean * scale
    part_mean_ptr,  # [T, C] fp32: per row-block mean
    part_m2_ptr,  # [T, C] fp32: per row-block sum of squared deviations
    gamma_ptr, beta_ptr,  # [C] (AFFINE), any float dtype
    run_mean_ptr, run_var_ptr,  # [C] (UPDATE), updated in place, their own dtype
    nbt_ptr,  # [] int64 (UPDATE and not CUMULATIVE): num_batches_tracked, incremented here
    T, C, M,  # row blocks, channels, rows in all
    ROWS_PER_BLOCK,  # rows per block (the conv's BLOCK_M); the last block may hold fewer
    momentum, eps,  # fp32; with CUMULATIVE the factor is 1 / (num_batches_tracked + 1)
    AFFINE: tl.constexpr, UPDATE: tl.constexpr, CUMULATIVE: tl.constexpr, COUNT: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr,
    # Cross-rank merge (kernels.sync_bn): each rank first merges its own blocks (MERGED_OUT),
    # then merges the gathered rank rows (ROW_COUNTS).
    ROW_COUNTS: tl.constexpr = False,  # part_mean_ptr is [T, 3, C] rows (count, mean, M2), any counts (0 too); M unused
    MERGED_OUT: tl.constexpr = False,  # write (count, mean, M2) as a [3, C] row to mean_ptr instead of mean, var
):
    """One launch per BatchNorm: merge the partials (Chan et al.), then scale/shift and the
    running-statistics update of nn.BatchNorm2d, on [C] vectors, in place."""
    finalize_channels(tl.program_id(0), mean_ptr, var_ptr, scale_ptr, shift_ptr, part_mean_ptr, part_m2_ptr,
                      gamma_ptr, beta_ptr, run_mean_ptr, run_var_ptr, nbt_ptr, T, C, M, ROWS_PER_BLOCK, momentum, eps,
                      AFFINE, UPDATE, CUMULATIVE, COUNT, BLOCK_T, BLOCK_C, ROW_COUNTS, MERGED_OUT)


@triton.jit
def finalize_channels(
    block,  # which BLOCK_C channels: block * BLOCK_C + [0, BLOCK_C)
    mean_ptr, var_ptr, scale_ptr, shift_ptr, part_mean_ptr, part_m2_ptr, gamma_ptr, beta_ptr,
    run_mean_ptr, run_var_ptr, nbt_ptr, T, C, M, ROWS_PER_BLOCK, momentum, eps,
    AFFINE: tl.constexpr, UPDATE: tl.constexpr, CUMULATIVE: tl.constexpr, COUNT: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr, ROW_COUNTS: tl.constexpr, MERGED_OUT: tl.constexpr,
):
    """``bn_finalize_kernel``'s work for one block of channels (its arguments): also run by the
    last program of a convolution's channel block (``conv_bn_act``, FINALIZE), where the
    partials were written by other programs of the same launch: they are read from L2 (.cg)."""
    offs_c = block * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = offs_c < C
    if ROW_COUNTS:  # counts per row and channel: a vector (equal over channels)
        n_a = tl.zeros((BLOCK_C,), dtype=tl.float32)
    else:
        n_a = 0.0
    mean_a = tl.zeros((BLOCK_C,), dtype=tl.float32)
    m2_a = tl.zeros((BLOCK_C,), dtype=tl.float32)
    for t0 in range(0, T, BLOCK_T):
        offs_t = t0 + tl.arange(0, BLOCK_T)
        t_ok = offs_t < T
        ok = t_ok[:, None] & c_ok[None, :]
        if ROW_COUNTS:
            off = offs_t[:, None] * (3 * C) + offs_c[None, :]
            rows = tl.load(part_mean_ptr + off, mask=ok, other=0.0)
            pm = tl.load(part_mean_ptr + C + off, mask=ok, other=0.0)
            pm2 = tl.load(part_mean_ptr + 2 * C + off, mask=ok, other=0.0)
            # as below, but an empty rank (count 0) or an all-empty chunk adds nothing
            n_b = tl.sum(rows, axis=0)
            mean_b = tl.sum(rows * pm, axis=0) / tl.maximum(n_b, 1.0)
            d = tl.where(ok, pm - mean_b[None, :], 0.0)
            m2_b = tl.sum(pm2, axis=0) + tl.sum(rows * d * d, axis=0)
            n = n_a + n_b
            delta = mean_b - mean_a
            mean_a += delta * (n_b / tl.maximum(n, 1.0))
            m2_a += m2_b + delta * delta * (n_a * n_b / tl.maximum(n, 1.0))
            n_a = n
        else:
            rows = tl.where(t_ok, tl.minimum(M - offs_t * ROWS_PER_BLOCK, ROWS_PER_BLOCK), 0).to(tl.float32)
            off = offs_t[:, None] * C + offs_c[None, :]
            pm = tl.load(part_mean_ptr + off, mask=ok, other=0.0, cache_modifier=".cg")
            pm2 = tl.load(part_m2_ptr + off, mask=ok, other=0.0, cache_modifier=".cg")
            # merge this chunk of blocks exactly (two-pass about the chunk mean) ...
            n_b = tl.sum(rows, axis=0)
            mean_b = tl.sum(rows[:, None] * pm, axis=0) / n_b
            d = tl.where(ok, pm - mean_b[None, :], 0.0)
            m2_b = tl.sum(pm2, axis=0) + tl.sum(rows[:, None] * d * d, axis=0)
            # ... then into the running result (Chan et al.)
            n = n_a + n_b
            delta = mean_b - mean_a
            mean_a += delta * (n_b / n)
            m2_a += m2_b + delta * delta * (n_a * n_b / n)
            n_a = n
    if ROW_COUNTS:  # the group's count, known on the device only (no host sync)
        count = n_a
    else:
        count = M
    var = m2_a / count
    if MERGED_OUT:  # this rank's share of a cross-rank merge; scale/shift below go to scratch
        tl.store(mean_ptr + offs_c, n_a + tl.zeros((BLOCK_C,), dtype=tl.float32), mask=c_ok)
        tl.store(mean_ptr + C + offs_c, mean_a, mask=c_ok)
        tl.store(mean_ptr + 2 * C + offs_c, m2_a, mask=c_ok)
    else:
        tl.store(mean_ptr + offs_c, mean_a, mask=c_ok)
        tl.store(var_ptr + offs_c, var, mask=c_ok)

    scale = 1.0 / tl.sqrt(var + eps)
    if AFFINE:
        scale = scale * tl.load(gamma_ptr + offs_c, mask=c_ok, other=0.0).to(tl.float32)
        shift = tl.load(beta_ptr + offs_c, mask=c_ok, other=0.0).to(tl.float32) - mean_a * scale
    else:
        shift = -mean_a * scale
    tl.store(scale_ptr + offs_c, scale, mask=c_ok)
    tl.store(shift_ptr + offs_c, shift, mask=c_ok)

    if UPDATE:
        if CUMULATIVE:  # momentum=None: a cumulative average; the host increments the counter
            factor = 1.0 / (tl.load(nbt_ptr).to(tl.float32) + 1.0)
        else:
            factor = momentum
    if COUNT:
        if block == 0:  # no program reads the counter then: no race
            tl.store(nbt_ptr, tl.load(nbt_ptr) + 1)
    if UPDATE:
        if ROW_COUNTS:  # an all-empty group leaves the statistics alone, as an empty batch below
            _update_running(run_mean_ptr, run_var_ptr, offs_c, c_ok & (count > 0), mean_a, var, count, factor)
        elif M > 0:  # an empty batch is counted but leaves the statistics alone (as PyTorch)
            _update_running(run_mean_ptr, run_var_ptr, offs_c, c_ok, mean_a, var, M * 1.0, factor)


@triton.jit
def _update_running(run_mean_ptr, run_var_ptr, offs_c, ok, mean, var, count, factor):
    """As torch.lerp_(running, batch statistic rounded to the buffer's dtype, factor), the
    variance unbiased with ``count`` (a scalar, or a per-channel vector across ranks)."""
    rm = tl.load(run_mean_ptr + offs_c, mask=ok, other=0.0)
    rv = tl.load(run_var_ptr + offs_c, mask=ok, other=0.0)
    new_mean = _lerp(rm.to(tl.float32), mean.to(rm.dtype).to(tl.float32), factor)
    unbiased = (var * (count / (count - 1.0))).to(rv.dtype).to(tl.float32)
    new_var = _lerp(rv.to(tl.float32), unbiased, factor)
    tl.store(run_mean_ptr + offs_c, new_mean.to(rm.dtype), mask=ok)
    tl.store(run_var_ptr + offs_c, new_var.to(rv.dtype), mask=ok)


@triton.jit
def _lerp(start, end, weight):
    """torch.lerp's formula (exact at both ends)."""
    if weight < 0.5:
        out = start + weight * (end - start)
    else:
        out = end - (end - start) * (1.0 - weight)
    return out


class BNStats(NamedTuple):
    """Batch statistics of one train-mode BatchNorm and the affine map they give."""
    mean: Tensor  # [C] fp32
    var: Tensor  # [C] fp32, biased
    scale: Tensor  # [C] fp32: gamma / sqrt(var + eps)
    shift: Tensor  # [C] fp32: beta - mean * scale


def bn_finalize(part_mean: Tensor, part_m2: Tensor, M: int, rows_per_block: int,
                gamma: Optional[Tensor] = None, beta: Optional[Tensor] = None,
                running_mean: Optional[Tensor] = None, running_var: Optional[Tensor] = None,
                num_batches_tracked: Optional[Tensor] = None, momentum: Optional[float] = 0.1,
                eps: float = 1e-5, group_name: Optional[str] = None) -> BNStats:
    """Per-row-block (mean, M2) partials [T, C] -> batch statistics and BN's scale/shift,
    updating the running statistics in place when they are given (one launch).

    ``group_name``: the statistics are those of every rank of that process group (see
    ``kernels.sync_bn``): a launch merges this rank's blocks, one all-gather, then the launch
    above merges the ranks' rows."""
    T, C = part_mean.shape
    # a kernel that failed to compile or launch here: the PyTorch merges (after a failed
    # launch too: it wrote nothing), with the same all-gather between them
    failed = bool(_runtime.FAILED) and _runtime.failed("bn_finalize", part_mean)
    out = finalize_outputs(C, part_mean.device)
    kinds = finalize_kinds(gamma, running_mean, num_batches_tracked, momentum)
    update = kinds[1]
    grid, flags = _finalize_consts(C, *kinds, group_name is not None)
    block_c = flags["BLOCK_C"]
    dummy = out[0]
    rows = None  # [W, 3, C] (count, mean, M2) rows to merge, once the partials are merged
    if group_name is not None:
        local = torch.empty((3, C), device=part_mean.device, dtype=torch.float32)
        if not failed:
            try:
                bn_finalize_kernel[grid](
                    local, dummy, out[2], out[3], part_mean, part_m2, dummy, dummy, dummy, dummy, dummy,
                    T, C, M, rows_per_block, 0.0, float(eps), AFFINE=False, UPDATE=False, CUMULATIVE=False,
                    COUNT=False, BLOCK_T=32, BLOCK_C=block_c, MERGED_OUT=True)
            except Exception as err:
                _runtime.record_failure(err, _runtime.failure_key("bn_finalize", part_mean))
                failed = True
        if failed:
            local = reference.stat_rows_reference(part_mean, part_m2, M, rows_per_block)
        rows = sync_bn.gather_rank_stats(local, group_name)  # [W, 3, C]
    if not failed:
        try:
            bn_finalize_kernel[grid](
                *out, part_mean if rows is None else rows, part_m2 if rows is None else rows,
                gamma if gamma is not None else dummy, beta if beta is not None else dummy,
                running_mean if update else dummy, running_var if update else dummy,
                num_batches_tracked if num_batches_tracked is not None else dummy,
                T if rows is None else rows.shape[0], C, M, rows_per_block, float(momentum or 0.0), float(eps),
                **flags)
            finalize_done(running_mean, running_var, num_batches_tracked, momentum)
            return BNStats(*out)
        except Exception as err:
            _runtime.record_failure(err, _runtime.failure_key("bn_finalize", part_mean))
    if rows is None:
        rows = reference.stat_rows_reference(part_mean, part_m2, M, rows_per_block)[None]
    mean, var, count = reference.merge_stat_rows(rows)
    scale, shift = reference.bn_finalize_reference(mean, var, count, gamma, beta, running_mean, running_var,
                                                   num_batches_tracked, momentum, eps)
    return BNStats(mean, var, scale.float(), shift.float())


def finalize_outputs(C: int, device) -> list:
    """mean, var, scale, shift of a finalize: four buffers, not views of one (outputs of a
    custom op may not alias)."""
    return [torch.empty(C, device=device, dtype=torch.float32) for _ in range(4)]


def finalize_kinds(gamma: Optional[Tensor], running_mean: Optional[Tensor],
                   num_batches_tracked: Optional[Tensor], momentum: Optional[float]) -> Tuple[bool, bool, bool, bool]:
    """(affine, update, cumulative, count) of a BN's finalize: gamma given, running statistics
    given, momentum None with them, num_batches_tracked given (``finalize_flags``' arguments)."""
    update = running_mean is not None
    return gamma is not None, update, update and momentum is None, num_batches_tracked is not None


def finalize_flags(affine: bool, update: bool, cumulative: bool, count: bool) -> dict:
    """The constexprs of ``finalize_channels`` for a BN (``finalize_kinds``)."""
    return dict(AFFINE=affine, UPDATE=update, CUMULATIVE=cumulative, COUNT=count and not cumulative)


def finalize_done(running_mean: Optional[Tensor], running_var: Optional[Tensor],
                  num_batches_tracked: Optional[Tensor], momentum: Optional[float]) -> None:
    """The host's share of a finalize, after its launch (``bn_finalize``, or a convolution's FINALIZE)."""
    if running_mean is None:
        return
    cumulative = momentum is None
    if cumulative:  # momentum=None reads the counter in the kernel, so it is counted here
        num_batches_tracked.add_(1)
    # A kernel's writes do not bump version counters: bump them (host only), so that caches
    # keyed on them (the eval-mode fold) and autograd's checks see the update.
    # (one call for the list: each call costs ~0.5 us of host time)
    torch.autograd.graph.increment_version(
        [t for t in (running_mean, running_var, None if cumulative else num_batches_tracked) if t is not None])


@functools.lru_cache(maxsize=4096)
def _finalize_consts(C: int, affine: bool, update: bool, cumulative: bool, count: bool, row_counts: bool):
    """The grid and constexprs of a finalize launch (host time: built once per combination)."""
    block_c = min(64, next_power_of_2(max(C, 1)))
    return (cdiv(C, block_c),), dict(finalize_flags(affine, update, cumulative, count), BLOCK_T=32, BLOCK_C=block_c,
                                      ROW_COUNTS=row_counts)


def merge_stats(part_mean: Tensor, part_m2: Tensor, M: int, rows_per_block: int) -> Tuple[Tensor, Tensor]:
    """Per-row-block (mean, M2) partials [T, C] -> batch mean and biased variance [C]."""
    st = bn_finalize(part_mean, part_m2, M, rows_per_block)
    return st.mean, st.var


@triton.jit(do_not_specialize=["M"])  # batch-dependent sizes: see _runtime
def bn_act_kernel(
    out_ptr,  # [M, C] NHWC rows, activation dtype
    z_ptr,  # [M, C] NHWC rows
    scale_ptr, shift_ptr,  # [C] fp32
    res_ptr,  # [M, C] NHWC rows (HAS_RESIDUAL)
    res_scale_ptr, res_shift_ptr,  # [C] fp32 (RES_AFFINE): the downsample branch's BN
    M, C,
    HAS_RESIDUAL: tl.constexpr, RES_AFFINE: tl.constexpr, RELU: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
    gate_ptr=None,  # [N, C] any float dtype, strides gate_sn, gate_sc (GATE): squeeze-excite gate, drop-path mask
    gate_sn=0, gate_sc=0,
    HW=1,  # rows per image (GATE)
    GATE: tl.constexpr = False,
):
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = offs_c < C
    ok = (offs_m < M)[:, None] & c_ok[None, :]
    off = offs_m.to(tl.int64)[:, None] * C + offs_c[None, :]
    s = tl.load(scale_ptr + offs_c, mask=c_ok, other=0.0)
    b = tl.load(shift_ptr + offs_c, mask=c_ok, other=0.0)
    y = tl.load(z_ptr + off, mask=ok, other=0.0).to(tl.float32) * s[None, :] + b[None, :]
    if GATE:  # y = gate[n, c] * bn(z) (+ residual): the SE multiply / drop-path in this pass
        img = offs_m // HW
        y = y * tl.load(gate_ptr + img[:, None] * gate_sn + offs_c[None, :] * gate_sc, mask=ok,
                        other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        r = tl.load(res_ptr + off, mask=ok, other=0.0).to(tl.float32)
        if RES_AFFINE:
            rs = tl.load(res_scale_ptr + offs_c, mask=c_ok, other=0.0)
            rb = tl.load(res_shift_ptr + offs_c, mask=c_ok, other=0.0)
            r = r * rs[None, :] + rb[None, :]
        y += r
    if RELU:
        y = tl.where(y < 0.0, 0.0, y)  # keeps NaN, like torch.relu
    tl.store(out_ptr + off, y.to(out_ptr.dtype.element_ty), mask=ok)


def _channels_last(t: Tensor) -> Tensor:
    return t.contiguous(memory_format=torch.channels_last)


def bn_act_forward(z: Tensor, scale: Tensor, shift: Tensor, residual: Optional[Tensor],
                   res_scale: Optional[Tensor], res_shift: Optional[Tensor], relu: bool,
                   gate: Optional[Tensor] = None) -> Tensor:
    """``gate`` ([N, C] or [N, 1], any float dtype, optional) multiplies bn(z) before the residual."""
    # float64: reference (for gradcheck); a kernel that failed to compile or launch here: reference
    if not use_triton(z) or z.dtype == torch.float64 or (_runtime.FAILED and _runtime.failed("bn_act", z)):
        y = reference.bn_act_reference(z, scale, shift, residual, res_scale, res_shift, relu, gate)
        return _channels_last(y)
    N, C, H, W = z.shape
    M = N * H * W
    zc = _channels_last(z)
    y = torch.empty_like(zc, memory_format=torch.channels_last)
    f32 = lambda v: v.detach().float().contiguous() if v is not None else y  # noqa: E731
    cfg = rows_config(M, C)
    grid = (cdiv(M, cfg["BLOCK_M"]), cdiv(C, cfg["BLOCK_C"]))
    try:
        bn_act_kernel[grid](
            y, zc, f32(scale), f32(shift),
            _channels_last(residual) if residual is not None else y, f32(res_scale), f32(res_shift),
            M, C, HAS_RESIDUAL=residual is not None, RES_AFFINE=res_scale is not None, RELU=relu, **cfg,
            **(_gate_args(gate, H * W) if gate is not None else {}))
    except Exception as err:  # a compile/launch failure raises before the kernel runs
        _runtime.record_failure(err, _runtime.failure_key("bn_act", z))
        return bn_act_forward(z, scale, shift, residual, res_scale, res_shift, relu, gate)
    return y


def _gate_args(gate: Tensor, hw: int) -> dict:
    """The gate operands of bn_act_kernel: [N, C] or [N, 1] (a broadcast channel stride of 0)."""
    g = gate.reshape(gate.shape[0], -1)
    return dict(gate_ptr=g, gate_sn=g.stride(0), gate_sc=g.stride(1) if g.shape[1] > 1 else 0, HW=hw, GATE=True)


bn_act_op = torch.library.custom_op("resnext::bn_act", bn_act_forward, mutates_args=())


@bn_act_op.register_fake
def _(z, scale, shift, residual, res_scale, res_shift, relu, gate=None):
    return torch.empty_like(z, memory_format=torch.channels_last)


def run_bn_act(z, scale, shift, residual, res_scale, res_shift, relu, gate=None) -> Tensor:
    """The forward without autograd (backward formulas use it): operator or plain call."""
    if gate is None:
        return eager_or_op(bn_act_op, bn_act_forward)(z, scale, shift, residual, res_scale, res_shift, relu)
    return eager_or_op(bn_act_op, bn_act_forward)(z, scale, shift, residual, res_scale, res_shift, relu, gate)


class BNActFn(torch.autograd.Function):
    """Autograd of ``bn_act``: an ``autograd.Function`` around the operator (the operator
    only while ``torch.compile`` traces; see ``_runtime.eager_or_op``)."""

    @staticmethod
    def forward(ctx, z, scale, shift, residual, res_scale, res_shift, relu):
        y = run_bn_act(z, scale, shift, residual, res_scale, res_shift, relu)
        ctx.save_for_backward(z, scale, residual, res_scale, y)
        ctx.relu = relu
        return y

    @staticmethod
    def backward(ctx, dy):
        return _bn_act_backward(ctx, dy)


def _bn_act_backward(ctx, dy):
    z, scale, residual, res_scale, y = ctx.saved_tensors
    need = ctx.needs_input_grad
    if use_triton(z) and z.dtype != torch.float64:
        # One pass of bn_backward_kernel: reads dy, y (ReLU mask), z and the residual only
        # for the sums asked for; writes dz and dres.  (PyTorch formulas below: the reference.)
        res_affine = residual is not None and res_scale is not None
        o = bn_backward(
            dy, relu_out=y if ctx.relu else None, scale=scale,
            dz_dtype=z.dtype if need[0] else None,
            dres_dtype=residual.dtype if residual is not None and need[3] else None,
            res_scale=res_scale if res_affine else None,
            sum_g=need[2] or (res_affine and need[5]), sum_gv=z if need[1] else None,
            sum_gr=residual if res_affine and need[4] else None,
            sum_g_twice=res_affine and need[5] and need[2])  # two inputs must not share one gradient tensor
        dscale = o.sum_gv if need[1] else None
        dshift = o.sum_g if need[2] else None
        dres_scale = o.sum_gr if res_affine and need[4] else None
        dres_shift = (o.sum_g_ungated if need[2] else o.sum_g) if res_affine and need[5] else None
        return o.dz, dscale, dshift, o.dres, dres_scale, dres_shift, None

    pc = reference._per_channel
    acc = reference.acc_dtype(z)
    du = dy.to(acc)
    if ctx.relu:
        du = du * (y > 0)
    sum_c = lambda t: t.sum(dim=(0, 2, 3))  # noqa: E731
    dz = (du * pc(scale.to(acc))).to(z.dtype) if need[0] else None
    dscale = sum_c(du * z.to(acc)).to(scale.dtype) if need[1] else None
    dshift = sum_c(du).to(scale.dtype) if need[2] else None
    dres = dres_scale = dres_shift = None
    if residual is not None:
        if res_scale is not None:
            dres = (du * pc(res_scale.to(acc))).to(residual.dtype) if need[3] else None
            dres_scale = sum_c(du * residual.to(acc)).to(res_scale.dtype) if need[4] else None
            dres_shift = sum_c(du).to(res_scale.dtype) if need[5] else None
        elif need[3]:
            dres = du.to(residual.dtype)
    return dz, dscale, dshift, dres, dres_scale, dres_shift, None


def bn_act(z: Tensor, scale: Tensor, shift: Tensor, residual: Optional[Tensor] = None,
           res_scale: Optional[Tensor] = None, res_shift: Optional[Tensor] = None,
           relu: bool = False) -> Tensor:
    """``act(z*scale + shift + (residual*res_scale + res_shift))`` per channel; channels_last out.

    z, residual: [N, C, H, W]; scale, shift, res_scale, res_shift: [C].
    """
    if z.dim() != 4:
        raise ValueError(f"expected a 4-D input (N, C, H, W), got shape {list(z.shape)}")
    if not z.is_floating_point():
        raise TypeError(f"expected a floating-point input, got {z.dtype}")
    if scale is None or shift is None:
        raise TypeError("bn_act needs a scale and a shift tensor (use ones/zeros for the identity)")
    C = z.shape[1]
    for name, v in (("scale", scale), ("shift", shift), ("res_scale", res_scale), ("res_shift", res_shift)):
        if v is None:
            continue
        if v.dim() != 1 or v.shape[0] != C:
            raise ValueError(f"{name} must have shape [{C}], got {list(v.shape)}")
        if v.device != z.device:
            raise ValueError(f"{name} is on {v.device} but the input is on {z.device}")
        if not v.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got {v.dtype}")
    if residual is not None:
        if residual.shape != z.shape:
            raise ValueError(f"residual must have shape {list(z.shape)}, got {list(residual.shape)}")
        if residual.device != z.device:
            raise ValueError(f"residual is on {residual.device} but the input is on {z.device}")
    if (res_scale is None) != (res_shift is None):
        raise ValueError("res_scale and res_shift must be given together")
    return BNActFn.apply(z, scale, shift, residual, res_scale, res_shift, relu)


# --------------------------------------------------------------------------------------
# nn.BatchNorm2d semantics on [C] vectors
# --------------------------------------------------------------------------------------
def uses_batch_stats(bn: torch.nn.BatchNorm2d) -> bool:
    """As ``nn.BatchNorm2d.forward``: batch statistics in training or without running stats."""
    return bn.training or (bn.running_mean is None and bn.running_var is None)


_FOLDED = DerivedCache()


def folded_scale_shift(bn: torch.nn.BatchNorm2d) -> Tuple[Tensor, Tensor]:
    """Eval mode: y = z * scale + shift with the running statistics (differentiable in gamma, beta).

    Cached until a running statistic, gamma or beta changes (version counters, see
    ``DerivedCache``), unless the result must carry a gradient to gamma or beta."""
    if bn.eps < 0:
        raise ValueError(f"batch_norm eps must be non-negative, but got {bn.eps}")
    sources = _fold_sources(bn)
    if not torch.is_grad_enabled():  # (inference: no need for a no_grad context, ~2 us)
        return _FOLDED.get(sources[1], sources, bn.eps, lambda: _fold(bn))
    if any(t is not None and t.requires_grad for t in sources[2:]):
        return _fold(bn)
    with torch.no_grad():
        return _FOLDED.get(sources[1], sources, bn.eps, lambda: _fold(bn))


_FOLD_NAMES = ("running_mean", "running_var", "weight", "bias")
_PLAIN_FOLD_TYPES = {}  # class -> whether its four names resolve through Module.__getattr__ alone


def _fold_sources(bn: torch.nn.Module) -> tuple:
    """(running_mean, running_var, weight, bias), read from the module's ``_buffers`` /
    ``_parameters`` for classes that define none of these names themselves (what
    ``Module.__getattr__`` does, without its ~0.8 us a name); else by attribute."""
    cls = type(bn)
    plain = _PLAIN_FOLD_TYPES.get(cls)
    if plain is None:
        plain = _PLAIN_FOLD_TYPES[cls] = cls.__getattr__ is torch.nn.Module.__getattr__ and not any(
            n in vars(k) for k in cls.__mro__ if k is not torch.nn.Module for n in _FOLD_NAMES)
    if plain:
        p, b, d = bn._parameters, bn._buffers, bn.__dict__
        out = []
        for n in _FOLD_NAMES:
            if n in d:
                break
            if n in p:
                out.append(p[n])
            elif n in b:
                out.append(b[n])
            else:
                break
        else:
            return tuple(out)
    return bn.running_mean, bn.running_var, bn.weight, bn.bias


def _fold(bn: torch.nn.BatchNorm2d) -> Tuple[Tensor, Tensor]:
    acc = torch.float64 if bn.running_var.dtype == torch.float64 else torch.float32
    scale = torch.rsqrt(bn.running_var.to(acc) + bn.eps)
    if bn.weight is not None:
        scale = bn.weight.to(acc) * scale
    shift = -bn.running_mean.to(acc) * scale
    if bn.bias is not None:
        shift = shift + bn.bias.to(acc)
    return scale, shift


def check_batch_stats(bn: torch.nn.BatchNorm2d, count: int):
    """nn.BatchNorm2d's errors for a batch-statistics forward over ``count`` values per channel."""
    if bn.eps <= 0:
        raise ValueError(f"batch_norm eps must be positive during training, but got {bn.eps}")
    if count == 1:
        raise ValueError(f"Expected more than 1 value per channel when training, got input with {count} "
                         f"value(s) per channel")


def running_stats(bn: torch.nn.BatchNorm2d):
    """(running_mean, running_var, num_batches_tracked) to update in this forward, or Nones:
    as nn.BatchNorm2d, only in training with running statistics tracked."""
    if bn.training and bn.track_running_stats and bn.running_mean is not None:
        return bn.running_mean, bn.running_var, bn.num_batches_tracked
    return None, None, None
