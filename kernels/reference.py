"""Plain-PyTorch references for every fused operation.

They define what the kernels compute, serve as the CPU fallback (a CPU tensor without
``TRITON_INTERPRET=1``), and are what the tests compare against in float64.
Shapes are PyTorch's logical NCHW; any memory format is accepted.
"""
from typing import Optional

import torch
import torch.nn.functional as F


def _per_channel(v: torch.Tensor) -> torch.Tensor:
    return v.view(1, -1, 1, 1)


def acc_dtype(t: torch.Tensor) -> torch.dtype:
    """Accumulation dtype: float64 stays float64 (gradcheck), everything else computes in fp32."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def input_prologue(x, in_scale, in_shift, in_relu: bool, gate=None):
    """a = act(x * in_scale + in_shift) [* gate]: the previous layer's BatchNorm (+ReLU) applied on
    load, then a per-(image, channel) gate [N, C] or [N, C, 1, 1] (RegNetY's SE after conv2)."""
    if in_scale is None:
        return x
    acc = acc_dtype(x)
    a = x.to(acc) * _per_channel(in_scale.to(acc)) + _per_channel(in_shift.to(acc))
    if in_relu:
        a = torch.relu(a)
    if gate is not None:
        a = a * gate.to(acc).reshape(gate.shape[0], -1, 1, 1)
    return a.to(x.dtype)


def conv_bn_act_reference(
    x: torch.Tensor,
    weight: torch.Tensor,
    stride: int = 1,
    padding: int = 0,
    groups: int = 1,
    in_scale: Optional[torch.Tensor] = None,
    in_shift: Optional[torch.Tensor] = None,
    in_relu: bool = False,
    out_scale: Optional[torch.Tensor] = None,
    out_shift: Optional[torch.Tensor] = None,
    residual: Optional[torch.Tensor] = None,
    out_relu: bool = False,
    stats: bool = False,
):
    """Reference of ``kernels.conv_bn_act``; returns ``(y, mean, var)``.

    y = act(conv(act_in(x * in_scale + in_shift), weight) * out_scale + out_shift + residual)
    With ``stats``: mean and biased variance (fp32, per output channel) of the raw
    convolution output, over N, H and W; otherwise empty tensors.
    """
    a = input_prologue(x, in_scale, in_shift, in_relu)
    z = F.conv2d(a, weight.to(a.dtype), stride=stride, padding=padding, groups=groups)
    if stats:
        zf = z.to(acc_dtype(z))
        mean = zf.mean(dim=(0, 2, 3))
        var = zf.var(dim=(0, 2, 3), unbiased=False)
    else:
        mean, var = z.new_empty(0, dtype=torch.float32), z.new_empty(0, dtype=torch.float32)
    y = bn_act_reference(z, out_scale, out_shift, residual, None, None, out_relu)
    return y, mean, var


def bn_act_reference(
    z: torch.Tensor,
    scale: Optional[torch.Tensor],
    shift: Optional[torch.Tensor],
    residual: Optional[torch.Tensor] = None,
    res_scale: Optional[torch.Tensor] = None,
    res_shift: Optional[torch.Tensor] = None,
    relu: bool = False,
    gate: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Reference of ``kernels.bn_act``: act(gate * (z * scale + shift) + (residual * res_scale + res_shift)),
    gate [N, C] or [N, 1] (per image and channel: a squeeze-excite gate, a drop-path mask)."""
    acc = acc_dtype(z)
    u = z.to(acc)
    if scale is not None:
        u = u * _per_channel(scale.to(acc)) + _per_channel(shift.to(acc))
    if gate is not None:
        u = u * gate.to(acc).reshape(gate.shape[0], -1, 1, 1)
    if residual is not None:
        r = residual.to(acc)
        if res_scale is not None:
            r = r * _per_channel(res_scale.to(acc)) + _per_channel(res_shift.to(acc))
        u = u + r
    if relu:
        u = torch.relu(u)
    return u.to(z.dtype)


def conv_bn_relu_module_reference(x, conv, bn, relu: bool = True, residual=None):
    """What an eager ``Conv2d -> BatchNorm2d [-> add] [-> ReLU]`` computes (used by tests)."""
    y = bn(conv(x))
    if residual is not None:
        y = y + residual
    return torch.relu(y) if relu else y


def bn_finalize_reference(mean, var, count: int, gamma=None, beta=None, running_mean=None, running_var=None,
                          num_batches_tracked=None, momentum=0.1, eps: float = 1e-5):
    """Reference of the finalize (``batchnorm.bn_finalize``): BN's scale and shift from the
    batch statistics, and nn.BatchNorm2d's running-statistics update in place: unbiased
    ``running_var``, ``momentum=None`` a cumulative average, an empty batch counted but
    leaving the statistics alone."""
    with torch.no_grad():
        if num_batches_tracked is not None:
            num_batches_tracked.add_(1)
        if running_mean is not None and count > 0:
            factor = 1.0 / num_batches_tracked.to(running_mean.dtype) if momentum is None else momentum  # no sync
            running_mean.lerp_(mean.to(running_mean.dtype), factor)
            running_var.lerp_((var * (count / (count - 1))).to(running_var.dtype), factor)
    scale = torch.rsqrt(var + eps)
    if gamma is not None:
        scale = gamma.to(scale.dtype) * scale
    shift = -mean * scale
    if beta is not None:
        shift = shift + beta.to(scale.dtype)
    return scale, shift


def stat_rows_reference(part_mean, part_m2, M: int, rows_per_block: int):
    """Reference of a finalize's first merge: per-row-block (mean, M2) partials [T, C] of M rows
    in blocks of ``rows_per_block`` (the last may hold fewer) -> the [3, C] row (count, mean, M2)
    of all of them (fp32), the format ``merge_stat_rows`` and ``kernels.sync_bn`` exchange."""
    T = part_mean.shape[0]
    counts = (M - torch.arange(T, device=part_mean.device) * rows_per_block).clamp(max=rows_per_block)
    counts = counts.to(part_mean.dtype).view(-1, 1)
    mean = (counts * part_mean).sum(0) / max(M, 1)
    m2 = part_m2.sum(0) + (counts * (part_mean - mean) ** 2).sum(0)  # Chan et al.: exact
    return torch.stack([torch.full_like(mean, M), mean, m2])


def merge_stat_rows(rows):
    """[W, 3, C] rows (count, mean, M2) (ranks of a process group, or one) -> (mean, biased
    variance, count as a 0-dim tensor) of their union; a row of count 0 adds nothing."""
    counts, means, m2s = rows.unbind(1)
    total = counts.sum(0)
    g_mean = (counts * means).sum(0) / total.clamp(min=1)
    g_m2 = m2s.sum(0) + (counts * (means - g_mean) ** 2).sum(0)  # exact: no E[x^2] - E[x]^2
    return g_mean, g_m2 / total, total[0]


def bn_stats_backward(mean, var, count, gamma, eps, dmean, dvar, dscale, dshift, acc):
    """PyTorch formulas of the finalize's backward: the gradients reaching the batch mean
    and variance (directly and through scale/shift), and those of gamma and beta."""
    dgamma = dbeta = None
    mean, var = mean.to(acc), var.to(acc)
    dmean = dmean.to(acc) if dmean is not None else torch.zeros_like(mean)
    dvar = dvar.to(acc) if dvar is not None else torch.zeros_like(var)
    if dscale is not None or dshift is not None:
        dscale = dscale.to(acc) if dscale is not None else torch.zeros_like(mean)
        dshift = dshift.to(acc) if dshift is not None else torch.zeros_like(mean)
        r = torch.rsqrt(var + eps)
        g = gamma.to(acc) if gamma is not None else torch.ones_like(mean)
        d_gr = dscale - dshift * mean
        dmean = dmean - dshift * g * r
        dvar = dvar - 0.5 * d_gr * g * r ** 3
        dgamma, dbeta = d_gr * r, dshift
    return dmean, dvar, dgamma, dbeta


def bn_stats_terms(g, stats, acc):
    """``g`` (in ``acc``) plus the batch-statistics terms of a BN backward, dmean/M +
    dvar*2/M*(z - mean), from ``stats`` (a ``bn_backward.StatsGrad``: z, its statistics and
    the gradients reaching them); returns (that sum, d gamma, d beta)."""
    count = stats.z.numel() // max(stats.z.shape[1], 1)
    dm, dv, dgamma, dbeta = bn_stats_backward(stats.mean, stats.var, count, stats.gamma, stats.eps, stats.dmean,
                                              stats.dvar, stats.dscale, stats.dshift, acc)
    pc = _per_channel
    return g + pc(dm) / count + pc(dv) * (2.0 / count) * (stats.z.to(acc) - pc(stats.mean.to(acc))), dgamma, dbeta


def relu_squeeze_reference(z, scale, shift):
    """Reference of ``squeeze_excite.relu_squeeze``: (m, P, Q) [N, C] in fp32 (float64 for
    float64) of z [N, C, H, W] under a = relu(z * scale + shift) rounded to z's dtype:
    P = sum_hw z where a > 0 (or NaN), Q = the count of those, m = (scale P + shift Q) / HW,
    the mean of a."""
    N, C, H, W = z.shape
    acc = acc_dtype(z)
    zf = z.to(acc)
    pre = zf * _per_channel(scale.to(acc)) + _per_channel(shift.to(acc))
    if acc != z.dtype:
        pre = pre.to(z.dtype).to(acc)
    on = ~(pre <= 0)
    p = torch.where(on, zf, 0.0).sum(dim=(2, 3))
    q = on.to(acc).sum(dim=(2, 3))
    m = (scale.to(acc) * p + shift.to(acc) * q) / (H * W)
    return m, p, q


def squeeze_backward_reference(dm, sums, scale, hw: int, dscale=None, dshift=None, q=None):
    """Reference of ``squeeze_excite.squeeze_backward``: the backward of m = S * scale / HW + shift
    (or with ``q``, m = (scale * S + shift * q) / HW) on [N, C]: (dS, dscale + the squeeze's share,
    dshift + the squeeze's share), fp32 (float64 for float64)."""
    acc = acc_dtype(dm)
    dm, sums, scale = dm.to(acc), sums.to(acc), scale.to(acc)
    d_scale = (dm * sums).sum(dim=0) / hw
    d_shift = dm.sum(dim=0) if q is None else (dm * q.to(acc)).sum(dim=0) / hw
    d_scale = d_scale + dscale.to(acc) if dscale is not None else d_scale
    d_shift = d_shift + dshift.to(acc) if dshift is not None else d_shift
    return dm * (scale / hw), d_scale, d_shift


def bn_backward_reference(dy, relu_src, relu_scale, relu_shift, scale, z, mean, var, dmean, dvar, dscale, dshift,
                          gamma, eps: float, res_scale, v, v_is_relu_src: bool, r, sum_g: bool, dz_dtype, dres_dtype,
                          gate=None, gate_shift=None, image_add=None, image_mask_src=None, image_mask_scale=None,
                          image_mask_shift=None, sum_g_twice: bool = False):
    """Reference of ``bn_backward.bn_backward_impl`` (its arguments and outputs: dz or empty,
    dres or empty, sums [3 or 4, C], [d gamma, d beta] or empty, d gate [N, C] or empty), in
    fp32 (float64 for float64); the formulas are in ``bn_backward.bn_backward``'s docstring."""
    src = next(t for t in (dy, relu_src, z, v, r) if t is not None and t.dim() == 4)
    N, C = src.shape[0], src.shape[1]
    acc = acc_dtype(src)
    pc = lambda t: _per_channel(t.to(acc))  # noqa: E731
    per_image = lambda t: t.to(acc).reshape(N, -1, 1, 1)  # noqa: E731
    total = lambda t: t.sum(dim=(0, 2, 3))  # noqa: E731

    def masked(g, x, s, b, dtype):  # 0 where x*s + b, rounded to dtype, is <= 0 (NaN passes): threshold_backward
        return torch.where((x.to(acc) * pc(s) + pc(b)).to(dtype) <= 0, 0.0, g)

    g = dy.to(acc).expand(src.shape) if dy is not None else torch.zeros(src.shape, device=src.device, dtype=acc)
    if image_add is not None:
        add = per_image(image_add).expand(src.shape)
        if image_mask_src is not None:  # (with the statistics terms the kernel reads their z: the same tensor)
            add = masked(add, z if z is not None else image_mask_src, image_mask_scale, image_mask_shift,
                         image_mask_src.dtype)
        g = g + add
    if relu_src is not None:
        g = torch.where(relu_src <= 0, 0.0, g) if relu_scale is None else masked(g, relu_src, relu_scale, relu_shift, relu_src.dtype)
    gb = g * per_image(gate) if gate is not None else g  # the BN branch's gradient
    zeros = torch.zeros(C, device=src.device, dtype=acc)
    sum_v = relu_src if v_is_relu_src else v
    sums = [total(gb) if sum_g else zeros, total(gb * sum_v.to(acc)) if sum_v is not None else zeros,
            total(g * r.to(acc)) if r is not None else zeros]
    if sum_g and (gate is not None or sum_g_twice):
        sums.append(total(g))
    empty = zeros.new_empty(0)
    dz = dres = dparam = dgate = empty
    if z is not None:  # the batch-statistics terms
        count = z.numel() // max(C, 1)
        dm, dv, dgamma, dbeta = bn_stats_backward(mean, var, count, gamma, eps, dmean, dvar, dscale, dshift, acc)
        stats_terms = pc(dm) / count + pc(dv) * (2.0 / count) * (z.to(acc) - pc(mean))
        if dgamma is not None:
            dparam = torch.stack([dgamma, dbeta])
    if dz_dtype is not None:
        dz = gb * pc(scale) if scale is not None else gb
        if z is not None:
            dz = dz + stats_terms
        dz = dz.to(dz_dtype).contiguous(memory_format=torch.channels_last)
    if dres_dtype is not None:
        dres = (g * pc(res_scale) if res_scale is not None else g).to(dres_dtype).contiguous(
            memory_format=torch.channels_last)
    if gate_shift is not None:  # sum over H, W of g * u, u = the BN output the gate multiplied
        u = (relu_src if relu_scale is not None else v).to(acc) * pc(scale) + pc(gate_shift)
        dgate = (g * u).sum(dim=(2, 3))
    return dz, dres, torch.stack(sums), dparam, dgate
