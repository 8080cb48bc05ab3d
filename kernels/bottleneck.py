"""A train-mode bottleneck as one autograd node (host time, issue 13).

The launches are those of the per-stage path (``resnext.modules.conv_bn_stage`` + ``finish``):
conv1, conv2 and conv3 (and the downsample's conv), each finalizing its BN's statistics in its
own launch, then one ``bn_act`` pass (bn3 + the shortcut, with its own BN + ReLU); in the
backward their passes, in reverse, except that conv1's gradient launch also adds the
shortcut's gradient of x (autograd's add in the per-stage path; the same bits).  Otherwise
only the host side changes: one ``autograd.Function`` call and one backward node for the
whole block instead of one per
convolution and one for the final pass (a Function call with ~20 arguments costs ~10-30 us of
host time, each node's backward ~10 us), and the stages' pending outputs (z, scale, shift)
never leave it.

The backward applies the per-stage formulas (``conv_bn_act._backward`` and
``batchnorm._bn_act_backward``) to stand-ins for their autograd contexts, wired as autograd
wires the per-stage Functions: each stage receives the gradients of its z and of its BN's
(scale, shift) from the stage that consumed them, and the needs of each input follow
autograd's rule (an output requires grad when any input of its Function does).

Only for the plain case: every BN on batch statistics on one rank, no gate, the shortcut the
identity or a fused conv + BN.  ``resnext.blocks.FusedBottleneck`` takes the per-stage path
otherwise, and while torch.compile traces (it sees the per-stage custom operators).
"""
import functools
from typing import NamedTuple, Optional, Tuple

import torch

from .batchnorm import _bn_act_backward, bn_act_forward
from .conv_bn_act import _BETA, _GAMMA, _IN_SCALE, _IN_SHIFT, _W, _X, check_conv_inputs, conv_bn_act_forward
from .conv_bn_act import _backward as conv_backward
from ._runtime import use_triton
from .bn_backward import StatsGrad
from .conv_grad import conv_grads

Tensor = torch.Tensor


class StageConf(NamedTuple):
    """The non-differentiable part of one convolution + batch-statistics BN of the block."""
    packed: Optional[Tensor]  # the packed (and cast) weight, or None: the kernels read the weight
    stride: int
    padding: int
    groups: int
    running_mean: Optional[Tensor]  # updated in place by the finalize launch (None: not tracked)
    running_var: Optional[Tensor]
    num_batches_tracked: Optional[Tensor]
    momentum: Optional[float]
    eps: float


class _Ctx:
    """What ``conv_bn_act._backward`` and ``batchnorm._bn_act_backward`` read of an autograd ctx."""
    __slots__ = ("saved_tensors", "conf", "needs_input_grad", "group_name", "relu")

    def __init__(self, saved, conf, needs, relu=False):
        self.saved_tensors, self.conf, self.needs_input_grad = saved, conf, needs
        self.group_name, self.relu = None, relu


@functools.lru_cache(maxsize=64)
def _conv_needs(x: bool, w: bool, affine_in: bool, gamma: bool, beta: bool) -> Tuple[bool, ...]:
    """``needs_input_grad`` of a ConvBNActFn call (its 21 arguments) from the five that matter here."""
    need = [False] * 21
    need[_X], need[_W], need[_GAMMA], need[_BETA] = x, w, gamma, beta
    need[_IN_SCALE] = need[_IN_SHIFT] = affine_in
    return tuple(need)


def _stage_forward(x, weight, gamma, beta, c: StageConf, in_scale, in_shift):
    check_conv_inputs(x, weight, c.stride, c.padding, c.groups, same_dtype=False)
    return conv_bn_act_forward(x, weight, c.packed, c.stride, c.padding, c.groups, in_scale, in_shift,
                               in_scale is not None, None, None, None, False, True, gamma, beta, c.running_mean,
                               c.running_var, c.num_batches_tracked, c.momentum, c.eps)


class BottleneckFn(torch.autograd.Function):
    """``relu(bn3(conv3(relu(bn2(conv2(relu(bn1(conv1(x)))))))) + shortcut(x))``, every BN on
    batch statistics; shortcut: x, or bn_d(conv_d(x)) when ``wd`` is given."""

    @staticmethod
    def forward(ctx, x, w1, g1, b1, w2, g2, b2, w3, g3, b3, wd, gd, bd, conf, dtype):
        c1, c2, c3, cd = conf
        xc = x if x.dtype == dtype else x.to(dtype)  # (as the per-stage path: autocast's dtype)
        z1, m1, v1, s1, h1 = _stage_forward(xc, w1, g1, b1, c1, None, None)
        z2, m2, v2, s2, h2 = _stage_forward(z1, w2, g2, b2, c2, s1, h1)
        z3, m3, v3, s3, h3 = _stage_forward(z2, w3, g3, b3, c3, s2, h2)
        zd = md = vd = sd = hd = None
        if wd is not None:
            zd, md, vd, sd, hd = _stage_forward(xc, wd, gd, bd, cd, None, None)
        y = bn_act_forward(z3, s3, h3, xc if zd is None else zd, sd, hd, True)
        ctx.save_for_backward(xc, w1, g1, z1, m1, v1, s1, h1, w2, g2, z2, m2, v2, s2, h2, w3, g3, z3, m3, v3,
                              s3, h3, wd, gd, zd, md, vd, sd, hd, y)
        ctx.conf, ctx.x_dtype = conf, x.dtype
        return y

    @staticmethod
    def backward(ctx, dy):
        (xc, w1, g1, z1, m1, v1, s1, h1, w2, g2, z2, m2, v2, s2, h2, w3, g3, z3, m3, v3, s3, h3, wd, gd, zd, md, vd,
         sd, hd, y) = ctx.saved_tensors
        c1, c2, c3, cd = ctx.conf
        needs = ctx.needs_input_grad
        nx, nw1, ng1, nb1, nw2, ng2, nb2, nw3, ng3, nb3, nwd, ngd, nbd = needs[:13]
        if nx and nw1 and ng1 and nb1 and nw2 and ng2 and nb2 and nw3 and ng3 and nb3 and \
                (zd is None or (nwd and ngd and nbd)) and _on_triton(xc, ctx.x_dtype, g1, g2, g3, gd, zd):
            return _backward_all_grads(ctx.saved_tensors, ctx.conf, dy)
        # autograd's rule for the per-stage Functions: a stage's outputs require grad when any input does
        r1 = nx or nw1 or ng1 or nb1
        r2 = r1 or nw2 or ng2 or nb2
        r3 = r2 or nw3 or ng3 or nb3
        rd = (nx or nwd or ngd or nbd) if zd is not None else nx

        def stage(saved_x, w, c, in_scale, in_shift, z, mean, var, gamma, needs):
            return _Ctx((saved_x, w, c.packed, in_scale, in_shift, None, None, z, mean, var, gamma),
                        (c.stride, c.padding, c.groups, in_scale is not None, False, False, True, c.eps), needs)

        res = xc if zd is None else zd
        dz3, ds3, dh3, dres, dsd, dhd, _ = _bn_act_backward(
            _Ctx((z3, s3, res, sd, y), None, (r3, r3, r3, rd, rd and zd is not None, rd and zd is not None, False),
                 relu=True), dy)
        g = conv_backward(stage(z2, w3, c3, s2, h2, z3, m3, v3, g3, _conv_needs(r2, nw3, r2, ng3, nb3)),
                           dz3, None, None, ds3, dh3)
        dw3, dg3, db3 = g[_W], g[_GAMMA], g[_BETA]
        g = conv_backward(stage(z1, w2, c2, s1, h1, z2, m2, v2, g2, _conv_needs(r1, nw2, r1, ng2, nb2)),
                           g[_X], None, None, g[_IN_SCALE], g[_IN_SHIFT])
        dw2, dg2, db2 = g[_W], g[_GAMMA], g[_BETA]
        dwd = dgd = dbd = None
        if zd is not None:  # the shortcut first: its dx joins conv1's as that is stored
            gs = conv_backward(stage(xc, wd, cd, None, None, zd, md, vd, gd, _conv_needs(nx, nwd, False, ngd, nbd)),
                                dres, None, None, dsd, dhd)
            dres, dwd, dgd, dbd = gs[_X], gs[_W], gs[_GAMMA], gs[_BETA]
        # x feeds conv1 and the shortcut: summed as autograd would, after each one's cast to x's dtype
        same = nx and dres.dtype == ctx.x_dtype == xc.dtype
        g = conv_backward(stage(xc, w1, c1, None, None, z1, m1, v1, g1, _conv_needs(nx, nw1, False, ng1, nb1)),
                          g[_X], None, None, g[_IN_SCALE], g[_IN_SHIFT], dx_add=dres if same else None)
        dx, dw1, dg1, db1 = g[_X], g[_W], g[_GAMMA], g[_BETA]
        if nx and not same:
            cast = lambda t: t if t.dtype == ctx.x_dtype else t.to(ctx.x_dtype)  # noqa: E731
            dx = cast(dx) + cast(dres)
        return (dx, dw1, dg1, db1, dw2, dg2, db2, dw3, dg3, db3, dwd, dgd, dbd, None, None)


def _on_triton(xc: Tensor, x_dtype: torch.dtype, g1, g2, g3, gd, zd) -> bool:
    """Whether the block's backward is ``_backward_all_grads``' case: the Triton path, x in the
    compute dtype (no cast of its gradient), every BN affine."""
    return use_triton(xc) and xc.dtype != torch.float64 and x_dtype == xc.dtype and g1 is not None and \
        g2 is not None and g3 is not None and (zd is None or gd is not None)


def _stage_grads(dz, x, w, c: StageConf, in_scale, in_shift, z, mean, var, gamma, dscale, dshift, dx_add=None):
    """One stage's gradients, every one wanted: ``conv_backward``'s launch for this case (its
    statistics terms on the gradients' load, the prologue's backward in the data gradient's
    epilogue, ``dx_add`` summed as dx is stored), called directly (host time: the generic
    formula's choices cost ~15 us a convolution).  Returns (dx, dw, d_in_scale, d_in_shift,
    d gamma, d beta) in the dtypes ``conv_backward`` gives them (None without a prologue)."""
    packed = c.packed if c.packed is not None and c.packed.dtype == x.dtype else None
    out = conv_grads(dz, x, w, c.stride, c.padding, c.groups, packed=packed, in_scale=in_scale, in_shift=in_shift,
                     in_relu=in_scale is not None, prologue_backward=in_scale is not None,
                     stats=StatsGrad(z, mean, var, None, None, dscale, dshift, gamma, c.eps), dx_add=dx_add)
    dw = out[1] if out[1].dtype == w.dtype else out[1].to(w.dtype)
    dgamma, dbeta = out[-1].unbind(0)  # [2, Cout] fp32
    if gamma.dtype != torch.float32:
        dgamma, dbeta = dgamma.to(gamma.dtype), dbeta.to(gamma.dtype)
    if in_scale is None:
        return out[0], dw, None, None, dgamma, dbeta
    return out[0], dw, out[2][1], out[2][0], dgamma, dbeta


def _backward_all_grads(saved, conf, dy):
    """The block's backward when every input wants its gradient (training): the launches of
    ``backward``'s general case, the same bits (``tests/test_bottleneck_fn.py``)."""
    (xc, w1, g1, z1, m1, v1, s1, h1, w2, g2, z2, m2, v2, s2, h2, w3, g3, z3, m3, v3, s3, h3, wd, gd, zd, md, vd,
     sd, hd, y) = saved
    c1, c2, c3, cd = conf
    res = xc if zd is None else zd
    dz3, ds3, dh3, dres, dsd, dhd, _ = _bn_act_backward(
        _Ctx((z3, s3, res, sd, y), None, _FINAL_NEEDS[zd is not None], relu=True), dy)
    dz2, dw3, ds2, dh2, dg3, db3 = _stage_grads(dz3, z2, w3, c3, s2, h2, z3, m3, v3, g3, ds3, dh3)
    dz1, dw2, ds1, dh1, dg2, db2 = _stage_grads(dz2, z1, w2, c2, s1, h1, z2, m2, v2, g2, ds2, dh2)
    dwd = dgd = dbd = None
    if zd is not None:  # the shortcut first: its dx joins conv1's as that is stored
        dres, dwd, _, _, dgd, dbd = _stage_grads(dres, xc, wd, cd, None, None, zd, md, vd, gd, dsd, dhd)
    dx, dw1, _, _, dg1, db1 = _stage_grads(dz1, xc, w1, c1, None, None, z1, m1, v1, g1, ds1, dh1, dx_add=dres)
    return (dx, dw1, dg1, db1, dw2, dg2, db2, dw3, dg3, db3, dwd, dgd, dbd, None, None)


# needs_input_grad of the final bn_act pass (z, scale, shift, residual, res_scale, res_shift, relu):
# every gradient, the residual's scale and shift only for a downsample's BN
_FINAL_NEEDS = {False: (True, True, True, True, False, False, False), True: (True,) * 6 + (False,)}
