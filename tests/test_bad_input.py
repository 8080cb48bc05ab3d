"""Wrong and extreme inputs to kernels.conv_bn_act, kernels.bn_act, resnext.ConvBNAct and a
converted model.

Each case either behaves as PyTorch does (same result, NaN/Inf in the same places, or the
same exception type and message) or raises a ValueError/TypeError whose message names the
problem, never a kernel crash, a KeyError from deep inside Triton or silent garbage.
A case that finds a bug is fixed, not marked: the grouped NaN/Inf cases below once were
strict xfails (the block-diagonal tile's NaN * 0 leak across groups).
"""
import copy
import re
from typing import Callable, NamedTuple, Optional

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import kernels
import resnext
from helpers import assert_same_specials
from kernels import reference
from resnext.models import Bottleneck

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
OTHER_DEVICE = "meta"  # a second device that exists on every machine
TOL = 1e-4 if DEVICE == "cpu" else 1e-2  # fp32: TF32 may be on for both PyTorch and the kernels on a GPU
NAN, INF = float("nan"), float("inf")


class Case(NamedTuple):
    ours: Callable  # the call under test
    exc: Optional[type] = None  # exception it must raise (None: it must return like ``torch``)
    match: Optional[str] = None  # regex the message must contain
    torch: Optional[Callable] = None  # what PyTorch does with the same input (must raise if exc is set)
    alt: Optional[tuple] = None  # (exception, regex): an accepted alternative to returning like ``torch``


# --------------------------------------------------------------------------------------
# inputs
# --------------------------------------------------------------------------------------
def t(*shape, dtype=torch.float32, device=DEVICE):
    return torch.randn(*shape, device=device).to(dtype)


def randomize_bn(bn: nn.BatchNorm2d) -> nn.BatchNorm2d:
    n = bn.num_features
    with torch.no_grad():
        bn.running_mean.copy_(torch.rand(n) - 0.5)
        bn.running_var.copy_(torch.rand(n) * 1.5 + 0.5)
        bn.weight.copy_(torch.rand(n) + 0.5)
        bn.bias.copy_(torch.rand(n) - 0.5)
    return bn


def module_pair(cin=4, cout=8, k=3, stride=1, groups=1, relu=True, eps=1e-5, train=False, edit_bn=None):
    """(ConvBNAct, the same modules as an eager Sequential), sharing nothing."""
    conv = nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False).to(DEVICE)
    bn = randomize_bn(nn.BatchNorm2d(cout, eps=eps)).to(DEVICE)
    if edit_bn is not None:
        with torch.no_grad():
            edit_bn(bn)
    eager = nn.Sequential(conv, bn, *([nn.ReLU()] if relu else [])).train(train)
    ours = resnext.ConvBNAct.from_modules(copy.deepcopy(conv), copy.deepcopy(bn), relu=relu).train(train)
    return ours, eager


def with_specials(x, *points, value=NAN):
    x = x.clone()
    for p in points:
        x[p] = value
    return x


def ours_vs_torch(ours_module, eager_module, x):
    return Case(ours=lambda: ours_module(x), torch=lambda: eager_module(x))


def tiny_bottleneck(train=False):
    """A converted ResNeXt bottleneck of ResNeXt-50's stage 1 input width (256 channels)."""
    block = Bottleneck(256, 64, groups=32, base_width=4)
    for m in block.modules():
        if isinstance(m, nn.BatchNorm2d):
            randomize_bn(m)
    block = block.to(DEVICE).train(train)
    return resnext.convert(copy.deepcopy(block)), block


def bottleneck_case(x, exc=None, match=None):
    """The converted bottleneck on x: raises exc (PyTorch raising too), or returns like the eager block."""
    ours, eager = tiny_bottleneck()
    return Case(lambda: ours(x), exc, match, lambda: eager(x))


def tiny_model(train=False):
    model = resnext.ResNet([1, 1, 1, 1], num_classes=10, groups=4, width_per_group=4, base_channels=16)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            randomize_bn(m)
    model = model.to(DEVICE).train(train)
    return resnext.convert(copy.deepcopy(model)), model


# --------------------------------------------------------------------------------------
# the table
# --------------------------------------------------------------------------------------
def conv(x, w, stride=1, padding=0, groups=1, **kw):
    return kernels.conv_bn_act(x, w, stride, padding, groups, **kw)


def nan_grouped_conv():
    x = with_specials(t(1, 8, 5, 5), (0, 0, 2, 2))  # one NaN in channel 0 (group 0 of 4)
    w = t(8, 2, 3, 3)
    return Case(ours=lambda: conv(x, w, 1, 1, 4)[0], torch=lambda: F.conv2d(x, w, padding=1, groups=4))


def nan_conv_relu():
    x = with_specials(t(1, 4, 3, 3), (0, 0, 1, 1))
    w = t(4, 4, 1, 1)
    return Case(ours=lambda: conv(x, w, out_relu=True)[0], torch=lambda: F.relu(F.conv2d(x, w)))


def inf_conv():
    x = with_specials(t(1, 4, 4, 4), (0, 1, 0, 0), (0, 2, 3, 1), value=INF)
    w = t(4, 4, 3, 3)
    return Case(ours=lambda: conv(x, w, 1, 1)[0], torch=lambda: F.conv2d(x, w, padding=1))


def inf_grouped_conv():
    """+Inf and -Inf side by side in one channel of group 1 (of 4): overlapping 3x3 footprints
    give +Inf, -Inf or NaN (Inf - Inf) in group 1's outputs only, as in PyTorch."""
    x = with_specials(with_specials(t(2, 8, 5, 5), (1, 2, 2, 2), value=INF), (1, 2, 2, 3), value=-INF)
    w = t(8, 2, 3, 3)
    return Case(ours=lambda: conv(x, w, 1, 1, 4)[0], torch=lambda: F.conv2d(x, w, padding=1, groups=4))


def nan_weight_padded_conv():
    x, w = t(1, 4, 4, 4), with_specials(t(4, 2, 3, 3), (1, 0, 0, 0))  # a corner tap: meets the zero padding
    return Case(ours=lambda: conv(x, w, 1, 1, 2)[0], torch=lambda: F.conv2d(x, w, padding=1, groups=2))


def nan_in_prologue():
    """A NaN in the previous layer's BN shift (the prologue) reaches its channel's group only."""
    x, w = t(1, 8, 4, 4), t(8, 2, 3, 3)
    scale, shift = torch.rand(8, device=DEVICE) + 0.5, with_specials(t(8), (5,))
    return Case(ours=lambda: conv(x, w, 1, 1, 4, in_scale=scale, in_shift=shift)[0],
                torch=lambda: F.conv2d(x * scale.view(1, -1, 1, 1) + shift.view(1, -1, 1, 1), w, padding=1, groups=4))


def specials_uneven_groups_strided():
    """3 input / 5 output channels per group, stride 2: a tile spans groups unevenly.  NaN in
    group 0, +Inf in group 2, -Inf in the last group; the other groups stay finite."""
    x = with_specials(t(2, 12, 7, 7), (0, 1, 3, 3))
    x = with_specials(with_specials(x, (1, 7, 0, 6), value=INF), (0, 11, 6, 0), value=-INF)
    w = t(20, 3, 3, 3)
    return Case(ours=lambda: conv(x, w, 2, 1, 4)[0], torch=lambda: F.conv2d(x, w, stride=2, padding=1, groups=4))


def nan_two_chunk_groups_train():
    """16 channels per group (a tile holds two groups, each one K chunk), train mode: the raw
    output and the batch statistics of the other group stay finite."""
    x = with_specials(t(2, 32, 4, 4), (1, 20, 2, 1))  # group 1
    w = t(32, 16, 3, 3)

    def ours():
        y, mean, var = conv(x, w, 1, 1, 2, stats=True)
        return torch.cat([y.flatten(), mean, var])

    def theirs():
        y = F.conv2d(x, w, padding=1, groups=2)
        return torch.cat([y.flatten(), y.mean((0, 2, 3)), y.var((0, 2, 3), unbiased=False)])
    return Case(ours=ours, torch=theirs)


def nan_grad_grouped():
    """A NaN/Inf in the output gradient reaches the input gradient of its own group only (dgrad)."""
    x, w = t(2, 16, 5, 5), t(16, 2, 3, 3)
    dy = with_specials(with_specials(t(2, 16, 3, 3), (0, 3, 1, 1)), (1, 12, 2, 0), value=INF)

    def grad(fn):
        xr = x.clone().requires_grad_()
        fn(xr).backward(dy)
        return xr.grad
    return Case(ours=lambda: grad(lambda xr: conv(xr, w, 2, 1, 8)[0]),
                torch=lambda: grad(lambda xr: F.conv2d(xr, w, stride=2, padding=1, groups=8)))


def nan_bn_act_relu():
    z = with_specials(t(2, 4, 3, 3), (0, 0, 0, 0), (1, 3, 2, 1))
    scale, shift = torch.rand(4, device=DEVICE) + 0.5, t(4)
    return Case(ours=lambda: kernels.bn_act(z, scale, shift, relu=True),
                torch=lambda: F.relu(z * scale.view(1, -1, 1, 1) + shift.view(1, -1, 1, 1)))


def nan_input_module(relu, train):
    ours, eager = module_pair(relu=relu, train=train)
    return ours_vs_torch(ours, eager, with_specials(t(2, 4, 5, 5), (0, 1, 2, 3)))


def bn_stats_module(edit_bn, relu, eps=1e-5, train=False):
    ours, eager = module_pair(relu=relu, eps=eps, edit_bn=edit_bn, train=train)
    return ours_vs_torch(ours, eager, t(2, 4, 5, 5))


def set_(name, index, value):
    def edit(bn):
        getattr(bn, name)[index] = value
    return edit


def _torch_eps_error(eps, train):
    """The ValueError F.batch_norm raises for this eps, or None (it depends on the torch version)."""
    try:
        F.batch_norm(torch.randn(2, 3, 2, 2), torch.zeros(3), torch.ones(3), training=train, eps=eps)
    except ValueError as e:
        return e
    return None


def eps_case(eps, train):
    """With the eps rejected by PyTorch: a ValueError naming eps; else the same (NaN-bearing) values.
    running_var[1] = 0 and, for eps < 0, var + eps < 0 in some channels."""
    def edit(bn):
        bn.running_var[1] = 0.0
    ours, eager = module_pair(relu=False, eps=eps, edit_bn=edit, train=train)
    x = t(2, 4, 5, 5)
    if _torch_eps_error(eps, train):
        return Case(lambda: ours(x), ValueError, r"eps.*" + str(eps), lambda: eager(x))
    case = ours_vs_torch(ours, eager, x)
    return case._replace(alt=(ValueError, r"eps"))  # rejecting eps <= 0 anyway is fine


def empty_batch_module(train):
    ours, eager = module_pair(train=train)
    return ours_vs_torch(ours, eager, t(0, 4, 5, 5))


def empty_batch_model(train):
    ours, eager = tiny_model(train)
    return ours_vs_torch(ours, eager, t(0, 3, 32, 32))


def one_value_per_channel_module():
    ours, eager = module_pair(k=1, train=True)
    x = t(1, 4, 1, 1)
    return Case(ours=lambda: ours(x), exc=ValueError, match="Expected more than 1 value per channel when training",
                torch=lambda: eager(x))


def one_value_per_channel_model():
    ours, eager = tiny_model(train=True)  # N=1 at 32x32: layer4's 3x3 (stride 2) gives 1x1 outputs
    x = t(1, 3, 32, 32)
    return Case(ours=lambda: ours(x), exc=ValueError, match="Expected more than 1 value per channel when training",
                torch=lambda: eager(x))


def module_raises(exc, match, x, torch_too=True, **pair_kw):
    ours, eager = module_pair(**pair_kw)
    return Case(ours=lambda: ours(x), exc=exc, match=match, torch=(lambda: eager(x)) if torch_too else None)


def module_on_meta_weight():
    ours, eager = module_pair()
    ours, eager = ours.to(OTHER_DEVICE), eager.to(OTHER_DEVICE)
    x = t(1, 4, 5, 5)
    return Case(ours=lambda: ours(x), exc=ValueError, match=f"{OTHER_DEVICE}")


def module_input_on_meta():
    ours, _ = module_pair()
    x = t(1, 4, 5, 5, device=OTHER_DEVICE)
    return Case(ours=lambda: ours(x), exc=ValueError, match=f"{OTHER_DEVICE}")


CASES = [
    # ---- kernels.conv_bn_act: shapes, dtypes, devices, arguments ----------------------------
    # (F.conv2d also takes an unbatched [C, H, W] input; a clear ValueError is the documented choice)
    pytest.param(lambda: Case(lambda: conv(t(4, 5, 5), t(4, 4, 1, 1)), ValueError, r"4-D input.*3-D"),
                 id="conv-rank3"),
    pytest.param(lambda: Case(lambda: conv(t(1, 4, 5, 5, 1), t(4, 4, 1, 1)), ValueError, r"4-D input.*5-D"),
                 id="conv-rank5"),
    pytest.param(lambda: Case(lambda: conv(t(1, 255, 2, 2), t(8, 256, 1, 1)), ValueError,
                              "expected 256 input channels, got 255",
                              lambda: F.conv2d(t(1, 255, 2, 2), t(8, 256, 1, 1))),
                 id="conv-wrong-channels"),
    pytest.param(lambda: Case(lambda: conv(t(1, 6, 4, 4), t(4, 2, 3, 3), 1, 1, 3), ValueError,
                              r"groups=3 must divide.*\(6\).*\(4\)",
                              lambda: F.conv2d(t(1, 6, 4, 4), t(4, 2, 3, 3), padding=1, groups=3)),
                 id="conv-groups-not-dividing"),
    pytest.param(lambda: Case(lambda: conv(t(1, 4, 4, 4), t(4, 4, 1, 1), groups=0), ValueError, "groups=0",
                              lambda: F.conv2d(t(1, 4, 4, 4), t(4, 4, 1, 1), groups=0)),
                 id="conv-groups-zero"),
    pytest.param(lambda: Case(lambda: conv(torch.ones(1, 4, 3, 3, dtype=torch.int32, device=DEVICE), t(4, 4, 1, 1)),
                              TypeError, "floating-point.*int32"),
                 id="conv-int-input"),
    pytest.param(lambda: Case(lambda: conv(t(1, 4, 3, 3, dtype=torch.complex64), t(4, 4, 1, 1)),
                              TypeError, "floating-point.*complex64"),
                 id="conv-complex-input"),
    pytest.param(lambda: Case(lambda: conv(t(1, 4, 3, 3), t(4, 4, 1, 1, device=OTHER_DEVICE)), ValueError,
                              f"weight is on {OTHER_DEVICE}"),
                 id="conv-weight-other-device"),
    pytest.param(lambda: Case(lambda: conv(t(1, 4, 3, 3), t(4, 4, 1, 1), out_scale=t(4, device=OTHER_DEVICE),
                                           out_shift=t(4)), ValueError, f"out_scale is on {OTHER_DEVICE}"),
                 id="conv-scale-other-device"),
    pytest.param(lambda: Case(lambda: conv(t(1, 4, 3, 3), t(4, 4, 1, 1, dtype=torch.float16)), TypeError,
                              r"float16|dtype", lambda: F.conv2d(t(1, 4, 3, 3), t(4, 4, 1, 1, dtype=torch.float16))),
                 id="conv-weight-dtype-mismatch"),
    pytest.param(lambda: Case(lambda: conv(t(1, 4, 3, 3), torch.ones(4, 4, 1, 1, dtype=torch.int64, device=DEVICE)),
                              TypeError, r"int64|dtype",
                              lambda: F.conv2d(t(1, 4, 3, 3),
                                               torch.ones(4, 4, 1, 1, dtype=torch.int64, device=DEVICE))),
                 id="conv-int-weight"),
    pytest.param(lambda: Case(lambda: conv(t(1, 4, 5, 5), t(4, 4, 3, 3), stride=0, padding=1), ValueError,
                              "stride must be >= 1.*stride=0",
                              lambda: F.conv2d(t(1, 4, 5, 5), t(4, 4, 3, 3), stride=0, padding=1)),
                 id="conv-stride-0"),
    pytest.param(lambda: Case(lambda: conv(t(1, 4, 5, 5), t(4, 4, 3, 3), padding=-1), ValueError, "padding=-1",
                              lambda: F.conv2d(t(1, 4, 5, 5), t(4, 4, 3, 3), padding=-1)),
                 id="conv-negative-padding"),
    pytest.param(lambda: Case(lambda: conv(t(1, 4, 2, 2), t(4, 4, 3, 3)), ValueError, "too small",
                              lambda: F.conv2d(t(1, 4, 2, 2), t(4, 4, 3, 3))),
                 id="conv-input-smaller-than-kernel"),
    pytest.param(lambda: Case(lambda: conv(t(1, 4, 3, 3), t(4, 4, 1, 3)), ValueError, "square"),
                 id="conv-non-square-kernel"),
    pytest.param(lambda: Case(lambda: conv([[1.0]], t(4, 4, 1, 1)), TypeError, "torch.Tensor.*list"),
                 id="conv-not-a-tensor"),
    pytest.param(lambda: Case(lambda: conv(t(2, 4, 5, 5), t(8, 4, 3, 3), 2, 1, residual=t(2, 8, 5, 5)), ValueError,
                              r"residual must have shape \[2, 8, 3, 3\], got \[2, 8, 5, 5\]",
                              lambda: F.conv2d(t(2, 4, 5, 5), t(8, 4, 3, 3), stride=2, padding=1) + t(2, 8, 5, 5)),
                 id="conv-residual-wrong-shape"),
    pytest.param(lambda: Case(lambda: conv(t(1, 4, 3, 3), t(4, 4, 1, 1), out_scale=t(4)), ValueError,
                              "scale and shift must be given together"),
                 id="conv-scale-without-shift"),
    pytest.param(lambda: Case(lambda: conv(t(1, 4, 3, 3), t(4, 4, 1, 1), in_shift=t(4)), ValueError,
                              "scale and shift must be given together"),
                 id="conv-shift-without-scale"),
    pytest.param(lambda: Case(lambda: conv(t(1, 4, 3, 3), t(4, 4, 1, 1), in_scale=t(5), in_shift=t(5)), ValueError,
                              r"in_scale must have shape \[4\], got \[5\]"),
                 id="conv-in-scale-wrong-length"),
    pytest.param(lambda: Case(lambda: conv(t(1, 4, 3, 3), t(4, 4, 1, 1),
                                           out_scale=torch.ones(4, dtype=torch.int64, device=DEVICE), out_shift=t(4)),
                              TypeError, "out_scale must be a floating-point tensor"),
                 id="conv-int-scale"),
    pytest.param(lambda: Case(lambda: conv(t(1, 4, 3, 3), t(4, 4, 1, 1), out_relu=True, stats=True), ValueError,
                              "no epilogue"),
                 id="conv-stats-with-epilogue"),
    # ---- kernels.conv_bn_act: NaN / Inf propagate as in PyTorch ------------------------------
    pytest.param(inf_conv, id="conv-inf-input"),
    pytest.param(nan_weight_padded_conv, id="conv-nan-weight-at-padding"),
    pytest.param(nan_grouped_conv, id="conv-nan-input-grouped"),
    pytest.param(inf_grouped_conv, id="conv-inf-input-grouped"),
    pytest.param(nan_in_prologue, id="conv-nan-prologue-shift-grouped"),
    pytest.param(specials_uneven_groups_strided, id="conv-nan-inf-uneven-groups-strided"),
    pytest.param(nan_two_chunk_groups_train, id="conv-nan-two-groups-per-tile-train-stats"),
    pytest.param(nan_grad_grouped, id="conv-nan-inf-output-grad-grouped"),
    pytest.param(nan_conv_relu, id="conv-nan-input-relu"),
    pytest.param(lambda: Case(lambda: conv(t(0, 4, 5, 5), t(8, 4, 3, 3), 2, 1)[0],
                              torch=lambda: F.conv2d(t(0, 4, 5, 5), t(8, 4, 3, 3), stride=2, padding=1)),
                 id="conv-empty-batch"),
    # ---- kernels.bn_act --------------------------------------------------------------------------
    pytest.param(lambda: Case(lambda: kernels.bn_act(t(4, 3, 3), t(4), t(4)), ValueError, "4-D input"),
                 id="bn_act-rank3"),
    pytest.param(lambda: Case(lambda: kernels.bn_act(t(1, 4, 3, 3), t(3), t(4)), ValueError,
                              r"scale must have shape \[4\], got \[3\]"),
                 id="bn_act-scale-wrong-length"),
    pytest.param(lambda: Case(lambda: kernels.bn_act(t(1, 4, 3, 3), t(4), t(4), residual=t(1, 4, 3, 2)), ValueError,
                              r"residual must have shape \[1, 4, 3, 3\], got \[1, 4, 3, 2\]"),
                 id="bn_act-residual-wrong-shape"),
    pytest.param(lambda: Case(lambda: kernels.bn_act(t(1, 4, 3, 3), t(4), t(4), residual=t(1, 4, 3, 3),
                                                     res_scale=t(4)), ValueError, "together"),
                 id="bn_act-res-scale-without-shift"),
    pytest.param(lambda: Case(lambda: kernels.bn_act(torch.ones(1, 4, 3, 3, dtype=torch.int32, device=DEVICE),
                                                     t(4), t(4)), TypeError, "int32"),
                 id="bn_act-int-input"),
    pytest.param(lambda: Case(lambda: kernels.bn_act(t(1, 4, 3, 3, dtype=torch.complex64), t(4), t(4)),
                              TypeError, "complex64"),
                 id="bn_act-complex-input"),
    pytest.param(lambda: Case(lambda: kernels.bn_act(t(1, 4, 3, 3), t(4, device=OTHER_DEVICE), t(4)),
                              ValueError, OTHER_DEVICE),
                 id="bn_act-scale-other-device"),
    # scale=None: the reference's meaning (identity), or a clear error
    pytest.param(lambda: (lambda z, r: Case(lambda: kernels.bn_act(z, None, None, residual=r, relu=True),
                                            torch=lambda: F.relu(z + r), alt=((TypeError, ValueError), "scale")))(
        t(1, 4, 3, 3), t(1, 4, 3, 3)),
                 id="bn_act-no-scale-shift"),
    pytest.param(nan_bn_act_relu, id="bn_act-nan-relu"),
    # ---- resnext.ConvBNAct -------------------------------------------------------------------
    pytest.param(lambda: module_raises(ValueError, "expected 256 input channels, got 255", t(1, 255, 3, 3),
                                       torch_too=True, cin=256), id="module-wrong-channels"),
    pytest.param(lambda: module_raises(ValueError, r"4-D input", t(4, 5, 5)), id="module-rank3-unbatched"),
    pytest.param(lambda: module_raises(TypeError, r"float16.*float32", t(1, 4, 5, 5, dtype=torch.float16)),
                 id="module-input-dtype-mismatch"),
    pytest.param(lambda: module_raises(TypeError, "floating-point.*int64",
                                       torch.ones(1, 4, 5, 5, dtype=torch.int64, device=DEVICE)),
                 id="module-int-input"),
    pytest.param(lambda: module_raises(ValueError, "stride must be >= 1", t(1, 4, 5, 5), stride=0),
                 id="module-stride-0"),
    pytest.param(module_on_meta_weight, id="module-weight-other-device"),
    pytest.param(module_input_on_meta, id="module-input-other-device"),
    pytest.param(lambda: (lambda m: Case(lambda: m(t(2, 4, 5, 5), residual=t(2, 8, 4, 5)), ValueError,
                                         r"residual must have shape"))(module_pair(train=True)[0]),
                 id="module-train-residual-wrong-shape"),
    pytest.param(lambda: (lambda m: Case(lambda: m(t(2, 4, 5, 5), residual=t(2, 8, 4, 5)), ValueError,
                                         r"residual must have shape"))(module_pair(train=False)[0]),
                 id="module-eval-residual-wrong-shape"),
    pytest.param(lambda: Case(lambda: resnext.ConvBNAct(4, 8, kernel_size=5), ValueError, "kernel_size must be 1 or 3"),
                 id="module-kernel-5"),
    pytest.param(lambda: Case(lambda: resnext.ConvBNAct.from_modules(nn.Conv2d(4, 8, 3, padding=2, dilation=2,
                                                                               bias=False), nn.BatchNorm2d(8)),
                              ValueError, "cannot fuse"),
                 id="module-from-dilated-conv"),
    pytest.param(one_value_per_channel_module, id="module-train-one-value-per-channel"),
    pytest.param(lambda: empty_batch_module(train=False), id="module-empty-batch-eval"),
    pytest.param(lambda: empty_batch_module(train=True), id="module-empty-batch-train"),
    # NaN / Inf / odd BN statistics: as PyTorch
    pytest.param(lambda: nan_input_module(relu=False, train=False), id="module-nan-input-eval"),
    pytest.param(lambda: nan_input_module(relu=False, train=True), id="module-nan-input-train"),
    pytest.param(lambda: nan_input_module(relu=True, train=True), id="module-nan-input-train-relu"),
    pytest.param(lambda: nan_input_module(relu=True, train=False), id="module-nan-input-eval-relu"),
    pytest.param(lambda: bn_stats_module(set_("running_mean", 3, NAN), relu=False), id="module-nan-running-mean"),
    pytest.param(lambda: bn_stats_module(set_("running_mean", 3, NAN), relu=True), id="module-nan-running-mean-relu"),
    pytest.param(lambda: bn_stats_module(set_("weight", 2, INF), relu=False), id="module-inf-bn-weight"),
    pytest.param(lambda: bn_stats_module(set_("running_var", 1, -1.0), relu=False), id="module-negative-running-var"),
    pytest.param(lambda: bn_stats_module(set_("running_var", 1, -1.0), relu=True),
                 id="module-negative-running-var-relu"),
    # eps <= 0: as F.batch_norm (torch 2.13 rejects eps <= 0 in training and eps < 0 in eval)
    pytest.param(lambda: eps_case(0.0, train=False), id="module-eps-0-eval"),
    pytest.param(lambda: eps_case(0.0, train=True), id="module-eps-0-train"),
    pytest.param(lambda: eps_case(-1.0, train=False), id="module-eps-negative-eval"),
    pytest.param(lambda: eps_case(-1.0, train=True), id="module-eps-negative-train"),
    # ---- a converted model -------------------------------------------------------------------
    pytest.param(lambda: bottleneck_case(t(1, 255, 4, 4), ValueError, "expected 256 input channels, got 255"),
                 id="model-wrong-channels"),
    pytest.param(lambda: bottleneck_case(torch.ones(2, 256, 4, 4, dtype=torch.int32, device=DEVICE), TypeError,
                                         "floating-point.*int32"),
                 id="model-int-input"),
    pytest.param(lambda: bottleneck_case(t(2, 256, 4, 4, dtype=torch.float16), TypeError, r"float16.*float32"),
                 id="model-half-input-float-model"),
    pytest.param(lambda: bottleneck_case(with_specials(t(2, 256, 3, 3), (1, 100, 1, 1))), id="model-nan-input-eval"),
    pytest.param(one_value_per_channel_model, id="model-train-one-value-per-channel"),
    pytest.param(lambda: empty_batch_model(train=False), id="model-empty-batch-eval"),
    pytest.param(lambda: empty_batch_model(train=True), id="model-empty-batch-train"),
]


def assert_match(err, regex):
    assert re.search(regex, str(err)), f"{type(err).__name__}({str(err)!r}) does not match {regex!r}"


def assert_same_values_and_specials(ours, theirs):
    """Same shape, NaN and +-Inf in the same places, finite values close."""
    assert isinstance(ours, torch.Tensor), f"expected a tensor, got {type(ours).__name__}"
    assert ours.shape == theirs.shape, f"shape {list(ours.shape)}, PyTorch {list(theirs.shape)}"
    assert ours.dtype == theirs.dtype
    assert_same_specials(ours, theirs)
    ours, theirs = ours.detach().double().cpu(), theirs.detach().double().cpu()
    finite = torch.isfinite(theirs)
    if finite.any():
        scale = theirs[finite].abs().max().item()
        assert torch.allclose(ours[finite], theirs[finite], rtol=TOL, atol=TOL * (scale + 1)), \
            f"max error {(ours[finite] - theirs[finite]).abs().max().item():.3g}"


@pytest.mark.parametrize("make_case", CASES)
def test_bad_input(make_case):
    case = make_case()
    if case.exc is None:
        theirs = case.torch()
        if case.alt is not None:
            try:
                ours = case.ours()
            except case.alt[0] as e:
                assert_match(e, case.alt[1])
                return
        else:
            ours = case.ours()
        assert_same_values_and_specials(ours, theirs)
        return
    torch_err = None
    if case.torch is not None:  # the input is an error for PyTorch too
        with pytest.raises(Exception) as torch_err:
            case.torch()
    with pytest.raises(case.exc, match=case.match) as err:
        case.ours()
    if torch_err is not None and torch_err.type in (ValueError, TypeError):
        assert err.type is torch_err.type, f"PyTorch raises {torch_err.type.__name__}, we {err.type.__name__}"


def test_bad_input_table_is_large_enough():
    assert len(CASES) >= 15


def test_reference_defines_scale_none_as_identity():
    """The documented meaning of bn_act's scale=None case (used by bn_act-no-scale-shift)."""
    z, r = torch.randn(1, 4, 3, 3), torch.randn(1, 4, 3, 3)
    assert torch.equal(reference.bn_act_reference(z, None, None, r, relu=True), torch.relu(z + r))
