"""BatchNorm pieces around the fused convolutions: statistics merge, scale/shift, apply.

Train-mode statistics flow (see README, "How it works"):

1. the convolution epilogue writes, per block of ``BLOCK_M`` rows, each channel's mean
   and M2 (sum of squared deviations from that block's mean), in fp32;
2. ``merge_stats_kernel`` merges the blocks with Chan's parallel formula into the batch
   mean and biased variance (no E[z^2] - E[z]^2 cancellation when |mean| >> std);
3. ``batch_norm_scale_shift`` turns them into ``scale = gamma / sqrt(var + eps)`` and
   ``shift = beta - mean * scale`` (differentiable PyTorch ops on [C] vectors) and updates
   the running statistics exactly as ``nn.BatchNorm2d`` does;
4. the consumer applies ``scale/shift (+ residual) + ReLU``: the next convolution's
   prologue, or ``bn_act`` (one read of z, one write of y) at the end of a block.
"""
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from . import reference
from ._runtime import rows_config, use_triton
from .bn_backward import bn_backward

Tensor = torch.Tensor


@triton.jit(do_not_specialize=["T", "M"])  # batch-dependent sizes: see _runtime
def merge_stats_kernel(
    mean_ptr,  # [C] fp32 out: batch mean
    var_ptr,  # [C] fp32 out: biased batch variance
    part_mean_ptr,  # [T, C] fp32: per row-block mean
    part_m2_ptr,  # [T, C] fp32: per row-block sum of squared deviations
    T, C, M,  # row blocks, channels, rows in all
    ROWS_PER_BLOCK,  # rows per block (the conv's BLOCK_M); the last block may hold fewer
    BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr,
):
    offs_c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = offs_c < C
    n_a = 0.0
    mean_a = tl.zeros((BLOCK_C,), dtype=tl.float32)
    m2_a = tl.zeros((BLOCK_C,), dtype=tl.float32)
    for t0 in range(0, T, BLOCK_T):
        offs_t = t0 + tl.arange(0, BLOCK_T)
        t_ok = offs_t < T
        rows = tl.where(t_ok, tl.minimum(M - offs_t * ROWS_PER_BLOCK, ROWS_PER_BLOCK), 0).to(tl.float32)
        ok = t_ok[:, None] & c_ok[None, :]
        off = offs_t[:, None] * C + offs_c[None, :]
        pm = tl.load(part_mean_ptr + off, mask=ok, other=0.0)
        pm2 = tl.load(part_m2_ptr + off, mask=ok, other=0.0)
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
    tl.store(mean_ptr + offs_c, mean_a, mask=c_ok)
    tl.store(var_ptr + offs_c, m2_a / M, mask=c_ok)


def merge_stats(part_mean: Tensor, part_m2: Tensor, M: int, rows_per_block: int) -> Tuple[Tensor, Tensor]:
    """Per-row-block (mean, M2) partials [T, C] -> batch mean and biased variance [C]."""
    T, C = part_mean.shape
    mean = torch.empty(C, device=part_mean.device, dtype=torch.float32)
    var = torch.empty_like(mean)
    block_c = min(64, triton.next_power_of_2(C))
    merge_stats_kernel[(triton.cdiv(C, block_c),)](
        mean, var, part_mean, part_m2, T, C, M, rows_per_block, BLOCK_T=32, BLOCK_C=block_c)
    return mean, var


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
):
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = offs_c < C
    ok = (offs_m < M)[:, None] & c_ok[None, :]
    off = offs_m.to(tl.int64)[:, None] * C + offs_c[None, :]
    s = tl.load(scale_ptr + offs_c, mask=c_ok, other=0.0)
    b = tl.load(shift_ptr + offs_c, mask=c_ok, other=0.0)
    y = tl.load(z_ptr + off, mask=ok, other=0.0).to(tl.float32) * s[None, :] + b[None, :]
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


def bn_act_forward(z, scale, shift, residual, res_scale, res_shift, relu) -> Tensor:
    if not use_triton(z) or z.dtype == torch.float64:
        y = reference.bn_act_reference(z, scale, shift, residual, res_scale, res_shift, relu)
        return _channels_last(y)
    N, C, H, W = z.shape
    M = N * H * W
    z = _channels_last(z)
    y = torch.empty_like(z, memory_format=torch.channels_last)
    f32 = lambda v: v.detach().float().contiguous() if v is not None else y  # noqa: E731
    cfg = rows_config(M, C)
    grid = (triton.cdiv(M, cfg["BLOCK_M"]), triton.cdiv(C, cfg["BLOCK_C"]))
    bn_act_kernel[grid](
        y, z, f32(scale), f32(shift),
        _channels_last(residual) if residual is not None else y, f32(res_scale), f32(res_shift),
        M, C, HAS_RESIDUAL=residual is not None, RES_AFFINE=res_scale is not None, RELU=relu, **cfg)
    return y


@torch.library.custom_op("resnext::bn_act", mutates_args=())
def bn_act_op(z: Tensor, scale: Tensor, shift: Tensor, residual: Optional[Tensor],
              res_scale: Optional[Tensor], res_shift: Optional[Tensor], relu: bool) -> Tensor:
    return bn_act_forward(z, scale, shift, residual, res_scale, res_shift, relu)


@bn_act_op.register_fake
def _(z, scale, shift, residual, res_scale, res_shift, relu):
    return torch.empty_like(z, memory_format=torch.channels_last)


def _bn_act_setup_context(ctx, inputs, output):
    z, scale, shift, residual, res_scale, res_shift, relu = inputs
    ctx.save_for_backward(z, scale, residual, res_scale, output)
    ctx.relu = relu


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
            sum_gr=residual if res_affine and need[4] else None)
        dscale = o.sum_gv.to(scale.dtype) if need[1] else None
        dshift = o.sum_g.to(scale.dtype) if need[2] else None
        dres_scale = o.sum_gr.to(res_scale.dtype) if res_affine and need[4] else None
        # a copy: two parameters must not share one gradient tensor
        dres_shift = o.sum_g.to(res_scale.dtype, copy=True) if res_affine and need[5] else None
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


bn_act_op.register_autograd(_bn_act_backward, setup_context=_bn_act_setup_context)


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
    return bn_act_op(z, scale, shift, residual, res_scale, res_shift, relu)


# --------------------------------------------------------------------------------------
# nn.BatchNorm2d semantics on [C] vectors
# --------------------------------------------------------------------------------------
def uses_batch_stats(bn: torch.nn.BatchNorm2d) -> bool:
    """As ``nn.BatchNorm2d.forward``: batch statistics in training or without running stats."""
    return bn.training or (bn.running_mean is None and bn.running_var is None)


def folded_scale_shift(bn: torch.nn.BatchNorm2d) -> Tuple[Tensor, Tensor]:
    """Eval mode: y = z * scale + shift with the running statistics (differentiable in gamma, beta)."""
    if bn.eps < 0:
        raise ValueError(f"batch_norm eps must be non-negative, but got {bn.eps}")
    scale = torch.rsqrt(bn.running_var.float() + bn.eps)
    if bn.weight is not None:
        scale = bn.weight.float() * scale
    shift = -bn.running_mean.float() * scale
    if bn.bias is not None:
        shift = shift + bn.bias.float()
    return scale, shift


def batch_norm_scale_shift(bn: torch.nn.BatchNorm2d, mean: Tensor, var: Tensor, count: int) -> Tuple[Tensor, Tensor]:
    """Train mode: scale/shift from batch statistics, and the running-statistics update.

    Matches ``nn.BatchNorm2d``: normalises with the biased variance, stores the unbiased one
    in ``running_var``, ``momentum=None`` is a cumulative average, ``num_batches_tracked``
    counts batches.  No host synchronisation: the factor stays a tensor.
    """
    if bn.eps <= 0:
        raise ValueError(f"batch_norm eps must be positive during training, but got {bn.eps}")
    if count == 1:
        raise ValueError(f"Expected more than 1 value per channel when training, got input with {count} "
                         f"value(s) per channel")
    if bn.training and bn.track_running_stats and bn.num_batches_tracked is not None:
        with torch.no_grad():
            bn.num_batches_tracked.add_(1)
            if count > 0:  # an empty batch is counted but leaves the statistics alone (as PyTorch)
                if bn.momentum is None:
                    factor = 1.0 / bn.num_batches_tracked.to(bn.running_mean.dtype)
                else:
                    factor = bn.momentum
                bn.running_mean.lerp_(mean.detach().to(bn.running_mean.dtype), factor)
                unbiased = var.detach() * (count / (count - 1))
                bn.running_var.lerp_(unbiased.to(bn.running_var.dtype), factor)
    scale = torch.rsqrt(var + bn.eps)
    if bn.weight is not None:
        scale = bn.weight.float() * scale
    shift = -mean * scale
    if bn.bias is not None:
        shift = shift + bn.bias.float()
    return scale, shift
