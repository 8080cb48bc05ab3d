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
``conv_bn_act.squeeze_sum_kernel`` merges them in a fixed order, exactly.
"""
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from . import _runtime, reference
from ._runtime import arrival_counters, cdiv, eager_or_op, next_power_of_2, use_triton
from ._triton_helpers import last_arrival
from .batchnorm import run_bn_act
from .bn_backward import bn_backward
from .conv_bn_act import _backward, conv_bn_act_forward, conv_bn_act_op, fake_conv_outputs

Tensor = torch.Tensor


@triton.jit(do_not_specialize=["N"])
def squeeze_backward_kernel(
    dsums_ptr,  # [N, C] fp32 out: dm * scale / HW, the gradient of S (added per image in conv3's backward)
    dscale_ptr, dshift_ptr,  # [C] fp32 out: dscale_in + sum_n dm * S / HW, dshift_in + sum_n dm [* Q / HW]
    dm_ptr,  # [N, C] fp32: the gradient of the squeeze mean m = S * scale / HW + shift [* Q / HW]
    sums_ptr,  # [N, C] fp32: S
    scale_ptr,  # [C] fp32
    dscale_in_ptr, dshift_in_ptr,  # [C] fp32 (HAS_DSCALE / HAS_DSHIFT): what reached scale and shift otherwise
    N, C, inv_hw,
    HAS_DSCALE: tl.constexpr, HAS_DSHIFT: tl.constexpr, BLOCK_C: tl.constexpr,
    q_ptr=None,  # [N, C] fp32 (HAS_Q): the count of the ReLU mask (relu_squeeze_kernel), m = (s P + b Q) / HW
    HAS_Q: tl.constexpr = False,
):
    """The backward of m = S * scale / HW + shift (or of the after-ReLU squeeze m = (scale P +
    shift Q) / HW, HAS_Q, S = P) on [N, C] in one launch (a fixed-order sum over n)."""
    offs_c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = offs_c < C
    s = tl.load(scale_ptr + offs_c, mask=c_ok, other=0.0)
    acc_s = tl.zeros((BLOCK_C,), dtype=tl.float32)
    acc_b = tl.zeros((BLOCK_C,), dtype=tl.float32)
    for n in range(0, N):
        dm = tl.load(dm_ptr + n * C + offs_c, mask=c_ok, other=0.0)
        acc_s += dm * tl.load(sums_ptr + n * C + offs_c, mask=c_ok, other=0.0)
        if HAS_Q:
            acc_b += dm * tl.load(q_ptr + n * C + offs_c, mask=c_ok, other=0.0)
        else:
            acc_b += dm
        tl.store(dsums_ptr + n * C + offs_c, dm * s * inv_hw, mask=c_ok)
    d_scale = acc_s * inv_hw
    if HAS_Q:
        acc_b = acc_b * inv_hw
    if HAS_DSCALE:
        d_scale += tl.load(dscale_in_ptr + offs_c, mask=c_ok, other=0.0)
    if HAS_DSHIFT:
        acc_b += tl.load(dshift_in_ptr + offs_c, mask=c_ok, other=0.0)
    tl.store(dscale_ptr + offs_c, d_scale, mask=c_ok)
    tl.store(dshift_ptr + offs_c, acc_b, mask=c_ok)


def squeeze_backward_impl(dm: Tensor, sums: Tensor, scale: Tensor, hw: int, dscale: Optional[Tensor],
                          dshift: Optional[Tensor], q: Optional[Tensor] = None) -> Tuple[Tensor, Tensor, Tensor]:
    """(dS, dscale + the squeeze's share, dshift + the squeeze's share) for m = S * scale / HW + shift,
    or with ``q`` for m = (scale * S + shift * q) / HW (S = P, the after-ReLU squeeze)."""
    # PyTorch formulas (the reference) for float64, plain CPU, or a kernel that failed to compile or launch here
    if not use_triton(dm) or dm.dtype == torch.float64 or \
            (_runtime.FAILED and _runtime.failed("squeeze_backward", dm)):
        return reference.squeeze_backward_reference(dm, sums, scale, hw, dscale, dshift, q)
    N, C = dm.shape
    f32 = lambda t: t.detach().float().contiguous()  # noqa: E731
    dsums = torch.empty((N, C), device=dm.device, dtype=torch.float32)
    d_scale, d_shift = (torch.empty(C, device=dm.device, dtype=torch.float32) for _ in range(2))
    block_c = min(64, next_power_of_2(max(C, 1)))
    try:
        squeeze_backward_kernel[(cdiv(C, block_c),)](
            dsums, d_scale, d_shift, f32(dm), f32(sums), f32(scale),
            f32(dscale) if dscale is not None else d_scale, f32(dshift) if dshift is not None else d_shift,
            N, C, 1.0 / hw, HAS_DSCALE=dscale is not None, HAS_DSHIFT=dshift is not None, BLOCK_C=block_c,
            **(dict(q_ptr=f32(q), HAS_Q=True) if q is not None else {}))
    except Exception as err:  # a compile/launch failure raises before the kernel runs
        _runtime.record_failure(err, _runtime.failure_key("squeeze_backward", dm))
        return reference.squeeze_backward_reference(dm, sums, scale, hw, dscale, dshift, q)
    return dsums, d_scale, d_shift


squeeze_backward_op = torch.library.custom_op("resnext::squeeze_backward", squeeze_backward_impl, mutates_args=())


@squeeze_backward_op.register_fake
def _(dm, sums, scale, hw, dscale, dshift, q=None):
    acc = reference.acc_dtype(dm)
    return (torch.empty(dm.shape, device=dm.device, dtype=acc),
            *(torch.empty(dm.shape[1], device=dm.device, dtype=acc) for _ in range(2)))


def squeeze_backward(dm, sums, scale, hw, dscale, dshift, q=None):
    return eager_or_op(squeeze_backward_op, squeeze_backward_impl)(dm, sums, scale, hw, dscale, dshift, q)


# --------------------------------------------------------------------------------------
# conv3 with the squeeze sums: the operator and its autograd
# --------------------------------------------------------------------------------------
def conv_bn_squeeze_forward(
    x: Tensor, weight: Tensor, packed: Optional[Tensor], stride: int, padding: int, groups: int,
    in_scale: Optional[Tensor], in_shift: Optional[Tensor], in_relu: bool,
    out_scale: Optional[Tensor], out_shift: Optional[Tensor], residual: Optional[Tensor],
    out_relu: bool, stats: bool, bn_weight: Optional[Tensor], bn_bias: Optional[Tensor],
    running_mean: Optional[Tensor], running_var: Optional[Tensor], num_batches_tracked: Optional[Tensor],
    momentum: Optional[float], eps: float, sq_scale: Optional[Tensor], sq_shift: Optional[Tensor],
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``conv_bn_act_forward`` that also returns the squeeze mean m [N, Cout] = mean over H, W
    of y * s + b, with (s, b) = (sq_scale, sq_shift), or the BN's own scale/shift of this
    call (``stats``), and S [N, Cout], the sums of y over H, W (fp32; float64 for float64)."""
    N, Cout = x.shape[0], weight.shape[0]
    sums = torch.empty((N, Cout), device=x.device, dtype=reference.acc_dtype(x))
    y, mean, var, scale, shift = conv_bn_act_forward(
        x, weight, packed, stride, padding, groups, in_scale, in_shift, in_relu, out_scale, out_shift, residual,
        out_relu, stats, bn_weight, bn_bias, running_mean, running_var, num_batches_tracked, momentum, eps,
        squeeze_sums=sums)
    s, b = (scale, shift) if sq_scale is None else (sq_scale, sq_shift)
    m = torch.addcmul(b.to(sums.dtype), sums, s.to(sums.dtype), value=1.0 / (y.shape[2] * y.shape[3]))
    return y, mean, var, scale, shift, m, sums


conv_bn_squeeze_op = torch.library.custom_op(
    "resnext::conv_bn_squeeze", conv_bn_squeeze_forward,
    mutates_args=("running_mean", "running_var", "num_batches_tracked"))


@conv_bn_squeeze_op.register_fake
def _(x, weight, packed, stride, padding, groups, in_scale, in_shift, in_relu,
      out_scale, out_shift, residual, out_relu, stats, bn_weight, bn_bias, running_mean, running_var,
      num_batches_tracked, momentum, eps, sq_scale, sq_shift):
    return fake_conv_outputs(x, weight, stride, padding, stats, per_image=2)  # m, S


class _ConvCtx:
    """What ``conv_bn_act._backward`` reads of a ConvBNActFn context."""
    group_name = None  # the squeeze path merges no statistics across ranks

    def __init__(self, saved_tensors, conf, needs_input_grad):
        self.saved_tensors, self.conf, self.needs_input_grad = saved_tensors, conf, needs_input_grad


class ConvSqueezeFn(torch.autograd.Function):
    """``ConvBNActFn``'s arguments, then ``sq_scale, sq_shift`` (None: the BN's own scale/shift
    of this call, ``stats``); a sixth output, the squeeze mean m [N, Cout] = mean over H, W of
    y * s + b.  Backward: m's gradient becomes S's (one small launch, which also adds m's share
    to the gradients of s and b) and is added to y's inside conv3's usual backward pass."""

    @staticmethod
    def forward(ctx, x, weight, packed, stride, padding, groups, in_scale, in_shift, in_relu,
                out_scale, out_shift, residual, out_relu, stats, bn_weight, bn_bias,
                running_mean, running_var, num_batches_tracked, momentum, eps, sq_scale, sq_shift):
        if sq_scale is None and not stats:
            raise ValueError("the squeeze needs sq_scale/sq_shift or the batch statistics (stats=True)")
        y, mean, var, scale, shift, m, sums = eager_or_op(conv_bn_squeeze_op, conv_bn_squeeze_forward)(
            x, weight, packed, stride, padding, groups, in_scale, in_shift, in_relu,
            out_scale, out_shift, residual, out_relu, stats,
            bn_weight, bn_bias, running_mean, running_var, num_batches_tracked, momentum, eps, sq_scale, sq_shift)
        ctx.save_for_backward(x, weight, packed, in_scale, in_shift, out_scale, out_shift, y, mean, var,
                              bn_weight, sums, scale if sq_scale is None else sq_scale)
        ctx.conf = (stride, padding, groups, in_relu, residual is not None, out_relu, stats, eps)
        ctx.own_affine = sq_scale is None
        ctx.set_materialize_grads(False)
        if not stats:
            ctx.mark_non_differentiable(mean, var, scale, shift)
        return y, mean, var, scale, shift, m

    @staticmethod
    def backward(ctx, dy, dmean, dvar, dscale, dshift, dm):
        sums, sq_scale = ctx.saved_tensors[-2:]
        d_sq_scale = d_sq_shift = dsums = None
        if dm is not None:
            hw = ctx.saved_tensors[7].shape[2] * ctx.saved_tensors[7].shape[3]
            if ctx.own_affine:  # m's share joins what reached the BN's scale/shift
                dsums, dscale, dshift = squeeze_backward(dm, sums, sq_scale, hw, dscale, dshift)
            else:
                dsums, d_sq_scale, d_sq_shift = squeeze_backward(dm, sums, sq_scale, hw, None, None)
                d_sq_scale = d_sq_scale.to(sq_scale.dtype)
                d_sq_shift = d_sq_shift.to(sq_scale.dtype)
        conv_ctx = _ConvCtx(ctx.saved_tensors[:-2], ctx.conf, ctx.needs_input_grad)  # ConvBNActFn's
        grads = _backward(conv_ctx, dy, dmean, dvar, dscale, dshift, image_grad=dsums)
        return (*grads, d_sq_scale, d_sq_shift)


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


# --------------------------------------------------------------------------------------
# RegNetY: the SE between conv2 and conv3 (after bn2 + ReLU)
# --------------------------------------------------------------------------------------
# timm's RegNet Bottleneck: x2 = se(relu(bn2(z2))), x3 = conv3(x2).  With (s, b) bn2's
# scale/shift, mask = (s z + b > 0) and a0 = relu(s z + b):
#
#     P[n, c] = sum_hw mask * z,  Q[n, c] = sum_hw mask      relu_squeeze_kernel (one read of z)
#     m[n, c] = (s P + b Q) / HW = mean_hw a0                the squeeze, an output of conv2's Function
#     g       = excite(m)                                    the SE's own layers, PyTorch on [N, C]
#     a       = a0 * g[n, c]                                 conv3's prologue (IN_GATE), never stored
#
# Backward: conv3's prologue pass gives dz2 = mask s g da, the sums for s and b, and
# dg = sum_hw da * a0 (bn_backward GATE + DGATE); autograd through the excite gives dm;
# conv2's backward adds mask * s * dm / HW to dz2 inside its statistics pass (IMG_ADD with
# IMG_MASK) and sum_n dm P / HW, sum_n dm Q / HW to the gradients of s and b
# (squeeze_backward_kernel with Q).  P and Q are piecewise constant in s and b.
@triton.jit(do_not_specialize=["splits"])
def relu_squeeze_kernel(
    m_ptr,  # [N, C] fp32 out: mean over H, W of relu(z * scale + shift)
    p_ptr,  # [N, C] fp32 out: P, the sum over H, W of z where z * scale + shift > 0 (or NaN)
    q_ptr,  # [N, C] fp32 out: Q, the count of those pixels
    part_ptr,  # [2, N * splits, C] fp32 scratch (splits > 1): each program's P and Q
    counter_ptr,  # int32 [N * channel blocks], zero (_runtime.arrival_counters): splits arrived
    z_ptr,  # [N, H, W, C] NHWC: the raw convolution output
    scale_ptr, shift_ptr,  # [C] fp32
    C, HW,  # channels, pixels per image
    rows_per_split, splits,  # each image's rows in ``splits`` runs of rows_per_split (a multiple of BLOCK_HW)
    BLOCK_HW: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """One program per (image, run of rows, channel block); the last run of an (image, channel
    block) to finish sums the runs' partials in run order (``last_arrival``): fixed-order sums,
    no float atomics, the same bits whichever run arrives last.  The mask is that of the
    activation as rounded to z's dtype (as bn_backward's RELU_MODE 2); a NaN pre-activation
    counts as on, so a NaN in z reaches m as in the eager mean."""
    pid = tl.program_id(0)
    n = (pid // splits).to(tl.int64)
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = offs_c < C
    s = tl.load(scale_ptr + offs_c, mask=c_ok, other=0.0)
    b = tl.load(shift_ptr + offs_c, mask=c_ok, other=0.0)
    acc_p = tl.zeros((BLOCK_HW, BLOCK_C), dtype=tl.float32)
    acc_q = tl.zeros((BLOCK_HW, BLOCK_C), dtype=tl.float32)
    base = z_ptr + n * HW * C
    row_start = (pid % splits) * rows_per_split
    row_end = tl.minimum(row_start + rows_per_split, HW)
    for r0 in range(row_start, row_end, BLOCK_HW):
        offs_r = r0 + tl.arange(0, BLOCK_HW)
        ok = (offs_r < row_end)[:, None] & c_ok[None, :]
        z = tl.load(base + offs_r[:, None] * C + offs_c[None, :], mask=ok, other=0.0).to(tl.float32)
        pre = (z * s[None, :] + b[None, :]).to(z_ptr.dtype.element_ty)
        on = ok & ((pre > 0.0) | (pre != pre))
        acc_p += tl.where(on, z, 0.0)
        acc_q += tl.where(on, 1.0, 0.0)
    p = tl.sum(acc_p, axis=0)
    q = tl.sum(acc_q, axis=0)
    if splits > 1:
        T = tl.num_programs(0)
        tl.store(part_ptr + pid.to(tl.int64) * C + offs_c, p, mask=c_ok)
        tl.store(part_ptr + (T + pid).to(tl.int64) * C + offs_c, q, mask=c_ok)
        if last_arrival(counter_ptr + n * tl.num_programs(1) + tl.program_id(1), splits):
            p = tl.zeros((BLOCK_C,), dtype=tl.float32)
            q = tl.zeros((BLOCK_C,), dtype=tl.float32)
            for k in range(0, splits):
                row = n * splits + k
                p += tl.load(part_ptr + row * C + offs_c, mask=c_ok, other=0.0, cache_modifier=".cg")
                q += tl.load(part_ptr + (T + row) * C + offs_c, mask=c_ok, other=0.0, cache_modifier=".cg")
            tl.store(p_ptr + n * C + offs_c, p, mask=c_ok)
            tl.store(q_ptr + n * C + offs_c, q, mask=c_ok)
            tl.store(m_ptr + n * C + offs_c, (s * p + b * q) / HW, mask=c_ok)
    else:
        tl.store(p_ptr + n * C + offs_c, p, mask=c_ok)
        tl.store(q_ptr + n * C + offs_c, q, mask=c_ok)
        tl.store(m_ptr + n * C + offs_c, (s * p + b * q) / HW, mask=c_ok)


RELU_SQUEEZE_MAX_SPLITS = 8  # runs of rows per image: enough programs at small batches


def relu_squeeze_config(HW: int, C: int) -> dict:
    """Blocks and row runs of ``relu_squeeze_kernel``: a function of (HW, C) only, so an image's
    m has the same bits at any batch size and on any device."""
    block_c = min(64, next_power_of_2(max(C, 1)))
    block_hw = max(16, min(next_power_of_2(max(HW, 1)), 2048 // block_c))  # ~32 fp32 registers a thread
    blocks = cdiv(max(HW, 1), block_hw)
    rows_per_split = cdiv(blocks, RELU_SQUEEZE_MAX_SPLITS) * block_hw
    return dict(BLOCK_HW=block_hw, BLOCK_C=block_c, num_warps=4, rows_per_split=rows_per_split,
                splits=cdiv(max(HW, 1), rows_per_split))


def relu_squeeze(z: Tensor, scale: Tensor, shift: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    """(m, P, Q) [N, C] fp32 (float64 for float64) of z [N, C, H, W] under relu(z * scale + shift)."""
    N, C, H, W = z.shape
    # PyTorch formulas (the reference) for float64, plain CPU, or a kernel that failed to compile or launch here
    if not use_triton(z) or z.dtype == torch.float64 or (_runtime.FAILED and _runtime.failed("relu_squeeze", z)):
        return reference.relu_squeeze_reference(z, scale, shift)
    zc = z.contiguous(memory_format=torch.channels_last)
    m, p, q = (torch.empty((N, C), device=z.device, dtype=torch.float32) for _ in range(3))
    cfg = relu_squeeze_config(H * W, C)
    splits = cfg["splits"]
    c_blocks = cdiv(C, cfg["BLOCK_C"])
    part = torch.empty((2, N * splits, C) if splits > 1 else (0,), device=z.device, dtype=torch.float32)
    if N > 0:
        try:
            relu_squeeze_kernel[(N * splits, c_blocks)](
                m, p, q, part if splits > 1 else m, arrival_counters(z.device, N * c_blocks), zc,
                scale.detach().float().contiguous(), shift.detach().float().contiguous(), C, H * W,
                cfg["rows_per_split"], splits, BLOCK_HW=cfg["BLOCK_HW"], BLOCK_C=cfg["BLOCK_C"],
                num_warps=cfg["num_warps"])
        except Exception as err:  # a compile/launch failure raises before the kernel runs
            _runtime.record_failure(err, _runtime.failure_key("relu_squeeze", z))
            return reference.relu_squeeze_reference(z, scale, shift)
    return m, p, q


def conv_bn_relu_squeeze_forward(
    x: Tensor, weight: Tensor, packed: Optional[Tensor], stride: int, padding: int, groups: int,
    in_scale: Optional[Tensor], in_shift: Optional[Tensor], in_relu: bool,
    stats: bool, bn_weight: Optional[Tensor], bn_bias: Optional[Tensor],
    running_mean: Optional[Tensor], running_var: Optional[Tensor], num_batches_tracked: Optional[Tensor],
    momentum: Optional[float], eps: float, sq_scale: Optional[Tensor], sq_shift: Optional[Tensor],
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The raw convolution z (``conv_bn_act_forward``, no epilogue), then one read of z after
    the finalize: (z, mean, var, scale, shift, m, P, Q) with m [N, Cout] the mean over H, W of
    relu(z * s + b), (s, b) = (sq_scale, sq_shift) or the BN's own scale/shift (``stats``)."""
    z, mean, var, scale, shift = conv_bn_act_forward(
        x, weight, packed, stride, padding, groups, in_scale, in_shift, in_relu, None, None, None,
        False, stats, bn_weight, bn_bias, running_mean, running_var, num_batches_tracked, momentum, eps)
    s, b = (scale, shift) if sq_scale is None else (sq_scale, sq_shift)
    m, p, q = relu_squeeze(z, s, b)
    return z, mean, var, scale, shift, m, p, q


conv_bn_relu_squeeze_op = torch.library.custom_op(
    "resnext::conv_bn_relu_squeeze", conv_bn_relu_squeeze_forward,
    mutates_args=("running_mean", "running_var", "num_batches_tracked"))


@conv_bn_relu_squeeze_op.register_fake
def _(x, weight, packed, stride, padding, groups, in_scale, in_shift, in_relu, stats, bn_weight, bn_bias,
      running_mean, running_var, num_batches_tracked, momentum, eps, sq_scale, sq_shift):
    return fake_conv_outputs(x, weight, stride, padding, stats, per_image=3)  # m, P, Q


class ConvReluSqueezeFn(torch.autograd.Function):
    """conv2 of a RegNetY block: ``ConvBNActFn``'s arguments up to ``in_relu``, then ``stats``,
    the BN's, and ``sq_scale, sq_shift`` (None: the BN's own scale/shift of this call, ``stats``).
    Returns (z, mean, var, scale, shift, m), m [N, Cout] = mean over H, W of relu(z * s + b)
    (fp32).  Backward: m's gradient joins z's inside conv2's usual BN-backward pass (masked
    by the ReLU) and the gradients of s and b (one small launch)."""

    @staticmethod
    def forward(ctx, x, weight, packed, stride, padding, groups, in_scale, in_shift, in_relu, stats, bn_weight,
                bn_bias, running_mean, running_var, num_batches_tracked, momentum, eps, sq_scale, sq_shift):
        if sq_scale is None and not stats:
            raise ValueError("the squeeze needs sq_scale/sq_shift or the batch statistics (stats=True)")
        z, mean, var, scale, shift, m, p, q = eager_or_op(conv_bn_relu_squeeze_op, conv_bn_relu_squeeze_forward)(
            x, weight, packed, stride, padding, groups, in_scale, in_shift, in_relu, stats, bn_weight, bn_bias,
            running_mean, running_var, num_batches_tracked, momentum, eps, sq_scale, sq_shift)
        s, b = (scale, shift) if sq_scale is None else (sq_scale, sq_shift)
        ctx.save_for_backward(x, weight, packed, in_scale, in_shift, None, None, z, mean, var, bn_weight, p, q, s, b)
        ctx.conf = (stride, padding, groups, in_relu, False, False, stats, eps)
        ctx.own_affine = sq_scale is None
        ctx.set_materialize_grads(False)
        if not stats:
            ctx.mark_non_differentiable(mean, var, scale, shift)
        ctx.mark_non_differentiable(p, q)
        return z, mean, var, scale, shift, m

    @staticmethod
    def backward(ctx, dz, dmean, dvar, dscale, dshift, dm):
        p, q, s, b = ctx.saved_tensors[-4:]
        d_sq_scale = d_sq_shift = dsums = None
        if dm is not None:
            z = ctx.saved_tensors[7]
            hw = z.shape[2] * z.shape[3]
            if ctx.own_affine:
                dsums, dscale, dshift = squeeze_backward(dm, p, s, hw, dscale, dshift, q)
            else:
                dsums, d_sq_scale, d_sq_shift = squeeze_backward(dm, p, s, hw, None, None, q)
                d_sq_scale, d_sq_shift = d_sq_scale.to(s.dtype), d_sq_shift.to(s.dtype)
        # ConvBNActFn's argument positions: no epilogue (out_scale, out_shift, residual, out_relu)
        need = ctx.needs_input_grad
        conv_need = (*need[:9], False, False, False, False, need[9], *need[10:17])
        conv_ctx = _ConvCtx(ctx.saved_tensors[:-4], ctx.conf, conv_need)
        grads = _backward(conv_ctx, dz, dmean, dvar, dscale, dshift, image_grad=dsums,
                          image_mask=(s, b) if dsums is not None else None)
        return (*grads[:9], grads[13], *grads[14:21], d_sq_scale, d_sq_shift)


class GatedConvFn(torch.autograd.Function):
    """conv3 of a RegNetY block: ``ConvBNActFn``'s 22 arguments, then ``in_gate`` ([N, Cin, 1, 1]
    or [N, Cin], any float dtype): the prologue computes ``act(x * in_scale + in_shift) * gate``
    (the gate after the ReLU, as timm's SE), never stored.  Backward: the prologue's one
    BN-backward pass also returns the gate's gradient (per-image sums of da * act(...)), and the
    weight gradient applies the same gated prologue on load."""

    @staticmethod
    def forward(ctx, x, weight, packed, stride, padding, groups, in_scale, in_shift, in_relu,
                out_scale, out_shift, residual, out_relu, stats, bn_weight, bn_bias,
                running_mean, running_var, num_batches_tracked, momentum, eps, group_name, in_gate):
        if in_scale is None:
            raise ValueError("the gate multiplies the prologue's output: in_scale/in_shift needed")
        y, mean, var, scale, shift = eager_or_op(conv_bn_act_op, conv_bn_act_forward)(
            x, weight, packed, stride, padding, groups, in_scale, in_shift, in_relu,
            out_scale, out_shift, residual, out_relu, stats,
            bn_weight, bn_bias, running_mean, running_var, num_batches_tracked, momentum, eps, group_name,
            None, in_gate)
        ctx.save_for_backward(x, weight, packed, in_scale, in_shift, out_scale, out_shift, y, mean, var,
                              bn_weight, in_gate)
        ctx.conf = (stride, padding, groups, in_relu, residual is not None, out_relu, stats, eps)
        ctx.group_name = group_name
        ctx.set_materialize_grads(False)
        if not stats:
            ctx.mark_non_differentiable(mean, var, scale, shift)
        return y, mean, var, scale, shift

    @staticmethod
    def backward(ctx, dy, dmean, dvar, dscale, dshift):
        gate = ctx.saved_tensors[-1]
        conv_ctx = _ConvCtx(ctx.saved_tensors[:-1], ctx.conf, ctx.needs_input_grad)
        conv_ctx.group_name = ctx.group_name
        g2 = gate.detach().reshape(gate.shape[0], -1)
        *grads, dgate = _backward(conv_ctx, dy, dmean, dvar, dscale, dshift, in_gate=g2)
        dgate = dgate.reshape(gate.shape).to(gate.dtype) if ctx.needs_input_grad[22] else None
        return (*grads, None, dgate)
