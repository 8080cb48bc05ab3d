"""Squeeze-excite / ECA gates and drop-path masks, fused into a bottleneck's last two passes.

timm's ResNet Bottleneck ends ``bn3 -> se -> drop_path -> += shortcut -> act3``.  With
z3 = conv3's raw output and (scale, shift) bn3's affine map (batch statistics or folded
running statistics), the fused block computes::

    S[n, c]  = sum_hw z3[n, c]                        conv3's epilogue (per-image partials)
    m[n, c]  = scale[c] * S[n, c] / HW + shift[c]     = mean_hw bn3(z3): BN is affine
    g[n, c]  = excite(m)                              the SE module's own layers (PyTorch, [N, C])
    g        = g * mask[n]                            drop_path in training (its own RNG calls)
    y        = relu(g[n, c] * (scale z3 + shift) + shortcut)    one bn_act pass

so the SE's pool (a read of the block's output), multiply (a read and a write) and the
separate add and ReLU passes disappear.  Backward, with v = g * u + shortcut, u = bn3(z3):
``dg[n, c] = sum_hw (dv * u)`` is a per-image reduction in the final pass's backward
(``bn_backward`` with ``gate_shift``: image-aligned programs); autograd through the excite
gives dm, hence ``dS = dm * scale / HW``, which conv3's backward adds to its incoming
gradient in its existing BN-backward pass (``image_grad`` of ``conv_bn_act._backward``).

Row blocks of the convolution may span several images (HW < BLOCK_M, or a block across an
image boundary): the epilogue writes one partial sum per image a block touches and
``squeeze_sum_kernel`` merges them in a fixed order, exactly.
"""
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from . import reference
from ._runtime import cdiv, eager_or_op, next_power_of_2, use_triton
from .batchnorm import run_bn_act
from .bn_backward import bn_backward
from .conv_bn_act import _backward, conv_bn_act_forward, out_size

Tensor = torch.Tensor


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
    block_c = min(64, next_power_of_2(max(C, 1)))
    squeeze_sum_kernel[(N, cdiv(C, block_c))](out, part, C, hw, rows_per_block, part.shape[1], BLOCK_C=block_c)


# --------------------------------------------------------------------------------------
# conv3 with the squeeze sums: the operator and its autograd
# --------------------------------------------------------------------------------------
def conv_bn_squeeze_forward(
    x: Tensor, weight: Tensor, packed: Optional[Tensor], stride: int, padding: int, groups: int,
    in_scale: Optional[Tensor], in_shift: Optional[Tensor], in_relu: bool,
    out_scale: Optional[Tensor], out_shift: Optional[Tensor], residual: Optional[Tensor],
    out_relu: bool, stats: bool, bn_weight: Optional[Tensor], bn_bias: Optional[Tensor],
    running_mean: Optional[Tensor], running_var: Optional[Tensor], num_batches_tracked: Optional[Tensor],
    momentum: Optional[float], eps: float,
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``conv_bn_act_forward`` that also returns S [N, Cout] (fp32; float64 for float64): the
    per-(image, channel) sums over H, W of its output y."""
    N, Cout = x.shape[0], weight.shape[0]
    sums = torch.empty((N, Cout), device=x.device, dtype=reference.acc_dtype(x))
    y, mean, var, scale, shift = conv_bn_act_forward(
        x, weight, packed, stride, padding, groups, in_scale, in_shift, in_relu, out_scale, out_shift, residual,
        out_relu, stats, bn_weight, bn_bias, running_mean, running_var, num_batches_tracked, momentum, eps,
        squeeze_sums=sums)
    return y, mean, var, scale, shift, sums


conv_bn_squeeze_op = torch.library.custom_op(
    "resnext::conv_bn_squeeze", conv_bn_squeeze_forward,
    mutates_args=("running_mean", "running_var", "num_batches_tracked"))


@conv_bn_squeeze_op.register_fake
def _(x, weight, packed, stride, padding, groups, in_scale, in_shift, in_relu,
      out_scale, out_shift, residual, out_relu, stats, bn_weight, bn_bias, running_mean, running_var,
      num_batches_tracked, momentum, eps):
    N, _, H, W = x.shape
    Cout, _, ksize, _ = weight.shape
    Ho, Wo = out_size(H, ksize, stride, padding), out_size(W, ksize, stride, padding)
    y = torch.empty((N, Cout, Ho, Wo), device=x.device, dtype=x.dtype, memory_format=torch.channels_last)
    n_stats, stat_dtype = (Cout if stats else 0), reference.acc_dtype(x)
    return (y, *(x.new_empty(n_stats, dtype=stat_dtype) for _ in range(4)), x.new_empty((N, Cout), dtype=stat_dtype))


class ConvSqueezeFn(torch.autograd.Function):
    """``ConvBNActFn`` (same arguments) with a sixth output, the squeeze sums S [N, Cout];
    the gradient reaching S is added to the output's gradient inside the usual backward pass."""

    @staticmethod
    def forward(ctx, x, weight, packed, stride, padding, groups, in_scale, in_shift, in_relu,
                out_scale, out_shift, residual, out_relu, stats, bn_weight, bn_bias,
                running_mean, running_var, num_batches_tracked, momentum, eps):
        y, mean, var, scale, shift, sums = eager_or_op(conv_bn_squeeze_op, conv_bn_squeeze_forward)(
            x, weight, packed, stride, padding, groups, in_scale, in_shift, in_relu,
            out_scale, out_shift, residual, out_relu, stats,
            bn_weight, bn_bias, running_mean, running_var, num_batches_tracked, momentum, eps)
        ctx.save_for_backward(x, weight, packed, in_scale, in_shift, out_scale, out_shift, y, mean, var,
                              bn_weight)
        ctx.conf = (stride, padding, groups, in_relu, residual is not None, out_relu, stats, eps)
        ctx.set_materialize_grads(False)
        if not stats:
            ctx.mark_non_differentiable(mean, var, scale, shift)
        return y, mean, var, scale, shift, sums

    @staticmethod
    def backward(ctx, dy, dmean, dvar, dscale, dshift, dsums):
        return _backward(ctx, dy, dmean, dvar, dscale, dshift, image_grad=dsums)


def squeeze_mean(sums: Tensor, scale: Tensor, shift: Tensor, hw: int) -> Tensor:
    """m[n, c] = mean over H, W of z*scale + shift, from S = sum_hw z (one op, differentiable)."""
    return torch.addcmul(shift.to(sums.dtype), sums, scale.to(sums.dtype), value=1.0 / hw)


# --------------------------------------------------------------------------------------
# The gated final pass: relu(gate * bn(z) + residual), and its autograd
# --------------------------------------------------------------------------------------
class GatedBNActFn(torch.autograd.Function):
    """``BNActFn`` with a per-(image, channel) ``gate`` ([N, C, 1, 1] or [N, 1, 1, 1], z's
    or any float dtype) multiplying bn(z) before the residual: ``act(gate * (z*scale + shift)
    + residual')``, residual' = residual [* res_scale + res_shift]."""

    @staticmethod
    def forward(ctx, z, scale, shift, residual, res_scale, res_shift, relu, gate):
        y = run_bn_act(z, scale, shift, residual, res_scale, res_shift, relu, gate)
        ctx.save_for_backward(z, scale, shift, residual, res_scale, y, gate)
        ctx.relu = relu
        return y

    @staticmethod
    def backward(ctx, dy):
        z, scale, shift, residual, res_scale, y, gate = ctx.saved_tensors
        need = ctx.needs_input_grad
        need_gate = need[7]
        res_affine = residual is not None and res_scale is not None
        if use_triton(z) and z.dtype != torch.float64:
            # One pass: ReLU mask, gate, scale; dres; the sums of scale/shift (gated) and of
            # the residual's BN (un-gated); the gate's per-image sums.
            o = bn_backward(
                dy, relu_out=y if ctx.relu else None, scale=scale,
                dz_dtype=z.dtype if need[0] else None,
                dres_dtype=residual.dtype if residual is not None and need[3] else None,
                res_scale=res_scale if res_affine else None,
                sum_g=need[2] or (res_affine and need[5]), sum_gv=z if need[1] or need_gate else None,
                sum_gr=residual if res_affine and need[4] else None,
                gate=gate, gate_shift=shift if need_gate else None)
            dres_shift = o.sum_g_ungated if res_affine and need[5] else None
            dgate = None
            if need_gate:  # [N, C] fp32; a per-image gate [N, 1] sums its channels
                dgate = o.dgate if gate.shape[1] > 1 else o.dgate.sum(dim=1, keepdim=True)
                dgate = dgate.view(gate.shape).to(gate.dtype)
            return (o.dz, o.sum_gv if need[1] else None, o.sum_g if need[2] else None, o.dres,
                    o.sum_gr if res_affine and need[4] else None, dres_shift, None, dgate)
        # PyTorch formulas: the reference (float64, plain CPU tensors)
        pc = reference._per_channel
        acc = reference.acc_dtype(z)
        dv = dy.to(acc)
        if ctx.relu:
            dv = dv * (y > 0)
        gt = gate.to(acc).reshape(gate.shape[0], -1, 1, 1)
        du = dv * gt
        sum_c = lambda t: t.sum(dim=(0, 2, 3))  # noqa: E731
        dz = (du * pc(scale.to(acc))).to(z.dtype) if need[0] else None
        dscale = sum_c(du * z.to(acc)).to(scale.dtype) if need[1] else None
        dshift = sum_c(du).to(scale.dtype) if need[2] else None
        dgate = None
        if need_gate:
            u = z.to(acc) * pc(scale.to(acc)) + pc(shift.to(acc))
            dgate = (dv * u).sum(dim=(2, 3), keepdim=True)
            dgate = dgate if gate.shape[1] > 1 else dgate.sum(dim=1, keepdim=True)
            dgate = dgate.reshape(gate.shape).to(gate.dtype)
        dres = dres_scale = dres_shift = None
        if residual is not None:
            if res_scale is not None:
                dres = (dv * pc(res_scale.to(acc))).to(residual.dtype) if need[3] else None
                dres_scale = sum_c(dv * residual.to(acc)).to(res_scale.dtype) if need[4] else None
                dres_shift = sum_c(dv).to(res_scale.dtype) if need[5] else None
            elif need[3]:
                dres = dv.to(residual.dtype)
        return dz, dscale, dshift, dres, dres_scale, dres_shift, None, dgate


def gated_bn_act(z: Tensor, scale: Tensor, shift: Tensor, gate: Tensor, residual: Optional[Tensor] = None,
                 res_scale: Optional[Tensor] = None, res_shift: Optional[Tensor] = None,
                 relu: bool = False) -> Tensor:
    """``act(gate * (z*scale + shift) + residual)``; gate [N, C, 1, 1] or [N, 1, 1, 1]; channels_last out."""
    if z.dim() != 4:
        raise ValueError(f"expected a 4-D input (N, C, H, W), got shape {list(z.shape)}")
    N, C = z.shape[:2]
    if gate.dim() != 4 or gate.shape[0] != N or gate.shape[1] not in (1, C) or gate.shape[2:] != (1, 1):
        raise ValueError(f"gate must have shape [{N}, {C} or 1, 1, 1], got {list(gate.shape)}")
    if not gate.is_floating_point():
        raise TypeError(f"gate must be a floating-point tensor, got {gate.dtype}")
    if gate.device != z.device:
        raise ValueError(f"gate is on {gate.device} but the input is on {z.device}")
    return GatedBNActFn.apply(z, scale, shift, residual, res_scale, res_shift, relu, gate)
