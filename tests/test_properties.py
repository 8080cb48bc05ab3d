"""Property tests (hypothesis): the fused ops and modules against float64 references.

Random batch (1-3), odd and even spatial sizes (1-9), groups and channels per group, 1x1 and
3x3 kernels, stride 1/2, padding, NCHW / channels_last, train (batch statistics) / eval
(folded BN, residual, ReLU), with and without the BN+ReLU prologue.  The reference is
``kernels.reference`` (or the eager modules) evaluated in float64 on the very same fp32
inputs; tolerances scale with the magnitude of the terms summed (fp32 rounding), or with
TF32's precision on a GPU.  A failure prints the falsifying example (shapes, flags, seed).
"""
import copy

import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from torch import nn

import kernels
import resnext
from helpers import assert_same_specials
from kernels import reference

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# relative precision of one fp32 convolution: exact products, fp32 sums (interpreter / CPU);
# TF32 products (10-bit mantissa) on a GPU when torch.backends.cudnn.allow_tf32 is on
REL = 2e-5 if DEVICE == "cpu" else 4e-3

# The autouse conftest fixtures (seed, NaN-poisoned torch.empty) are function-scoped: they
# stay in force across the examples of a test, which is what we want.
# Examples per test: half of what they were (CI time: each run draws new ones, so the runs
# together still explore the space; a failure prints its example to reproduce it).
SETTINGS = dict(deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _randn(g, *shape, scale=1.0, dtype=torch.float32):
    return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype).to(DEVICE)


def _layout(t, layout):
    return t.contiguous(memory_format=torch.channels_last) if layout == "channels_last" else t.contiguous()


def assert_within(ours, ref64, bound, what):
    """|ours - ref64| <= bound elementwise (bound broadcastable), with the worst offender reported."""
    ours = ours.detach().double().cpu()
    ref64 = ref64.detach().double().cpu()
    bound = torch.as_tensor(bound, dtype=torch.float64).cpu()
    assert ours.shape == ref64.shape, f"{what}: shape {list(ours.shape)} vs {list(ref64.shape)}"
    assert not ours.isnan().any(), f"{what}: NaN in the output (an element never written?)"
    err = (ours - ref64).abs()
    excess = err - bound.expand_as(err)
    worst = int(excess.argmax())
    worst_bound = bound.expand_as(err).flatten()[worst].item()
    assert excess.max() <= 0, (f"{what}: {int((excess > 0).sum())} of {err.numel()} elements off; worst at flat "
                               f"index {worst}: ours {ours.flatten()[worst].item():.6g}, float64 "
                               f"{ref64.flatten()[worst].item():.6g}, bound {worst_bound:.3g}")


# --------------------------------------------------------------------------------------
# kernels.conv_bn_act against kernels.reference.conv_bn_act_reference in float64
# --------------------------------------------------------------------------------------
@st.composite
def conv_problems(draw):
    groups = draw(st.sampled_from([1, 2, 3, 4, 8]))
    cin_g = draw(st.sampled_from([1, 2, 3, 4, 8]))
    cout_g = draw(st.sampled_from([1, 2, 4, 5, 8]))
    ksize = draw(st.sampled_from([1, 3]))
    p = dict(
        n=draw(st.integers(1, 3)), h=draw(st.integers(1, 9)), w=draw(st.integers(1, 9)),
        groups=groups, cin=groups * cin_g, cout=groups * cout_g, ksize=ksize,
        stride=draw(st.sampled_from([1, 2])),
        padding=draw(st.sampled_from([0, 1])) if ksize == 3 else 0,
        layout=draw(st.sampled_from(["nchw", "channels_last"])),
        mode=draw(st.sampled_from(["train", "eval"])),
        prologue=draw(st.booleans()), in_relu=draw(st.booleans()),
        seed=draw(st.integers(0, 2 ** 31 - 1)),
    )
    # train: the raw convolution and its statistics (no epilogue allowed); eval: BN folded,
    # optional residual and ReLU in the epilogue
    p["residual"] = p["mode"] == "eval" and draw(st.booleans())
    p["out_relu"] = p["mode"] == "eval" and draw(st.booleans())
    p["requires_grad"] = draw(st.booleans())
    return p


def _out_size(size, k, s, pad):
    return (size + 2 * pad - k) // s + 1


def _conv_inputs(p):
    g = _gen(p["seed"])
    x = _layout(_randn(g, p["n"], p["cin"], p["h"], p["w"]), p["layout"])
    wt = _randn(g, p["cout"], p["cin"] // p["groups"], p["ksize"], p["ksize"])
    kw = dict(in_scale=None, in_shift=None, in_relu=False, out_scale=None, out_shift=None, residual=None,
              out_relu=p["out_relu"], stats=p["mode"] == "train")
    if p["prologue"]:
        kw.update(in_scale=_randn(g, p["cin"]), in_shift=_randn(g, p["cin"], scale=0.5), in_relu=p["in_relu"])
    if p["mode"] == "eval":
        kw.update(out_scale=_randn(g, p["cout"]), out_shift=_randn(g, p["cout"], scale=0.5))
        if p["residual"]:
            ho, wo = (_out_size(s, p["ksize"], p["stride"], p["padding"]) for s in (p["h"], p["w"]))
            kw["residual"] = _layout(_randn(g, p["n"], p["cout"], ho, wo), p["layout"])
    return x, wt, kw


def _conv_bounds(p, x, wt, kw):
    """Per-element error bounds of y, mean, var from the magnitudes of what is summed."""
    a = reference.input_prologue(x.double(), *(None if v is None else v.double()
                                               for v in (kw["in_scale"], kw["in_shift"])), kw["in_relu"])
    abs_z = torch.nn.functional.conv2d(a.abs(), wt.double().abs(), stride=p["stride"], padding=p["padding"],
                                       groups=p["groups"])
    # the prologue's result is rounded to fp32 before the product: one more relative rounding
    bound_z = REL * (abs_z + 1e-3)
    bound_y = bound_z
    if kw["out_scale"] is not None:
        pc = reference._per_channel
        bound_y = bound_z * pc(kw["out_scale"].double().abs()) + REL * (pc(kw["out_shift"].double().abs()) + 1)
    if kw["residual"] is not None:
        bound_y = bound_y + REL * kw["residual"].double().abs()
    mean_abs = abs_z.mean(dim=(0, 2, 3))
    bound_mean = REL * (mean_abs + 1e-3)
    bound_var = 4 * REL * (mean_abs ** 2 + (abs_z ** 2).mean(dim=(0, 2, 3)) + 1e-3)
    return bound_y, bound_mean, bound_var


@settings(max_examples=40, **SETTINGS)
@given(p=conv_problems())
def test_conv_bn_act_matches_float64_reference(p):
    ho, wo = (_out_size(s, p["ksize"], p["stride"], p["padding"]) for s in (p["h"], p["w"]))
    assume(ho >= 1 and wo >= 1)
    x, wt, kw = _conv_inputs(p)
    args = (p["stride"], p["padding"], p["groups"])
    y, mean, var = kernels.conv_bn_act(x, wt, *args, **kw)

    to64 = lambda v: v.double() if isinstance(v, torch.Tensor) else v  # noqa: E731
    kw64 = {k: to64(v) for k, v in kw.items()}
    y64, mean64, var64 = reference.conv_bn_act_reference(x.double(), wt.double(), *args, **kw64)
    bound_y, bound_mean, bound_var = _conv_bounds(p, x, wt, kw)

    assert y.dtype == x.dtype and list(y.shape) == [p["n"], p["cout"], ho, wo]
    assert_within(y, y64, bound_y, "y")
    if kw["stats"]:
        assert mean.dtype == var.dtype == torch.float32 and list(mean.shape) == list(var.shape) == [p["cout"]]
        assert_within(mean, mean64, bound_mean, "batch mean")
        assert_within(var, var64, bound_var, "batch variance (biased)")
    else:
        assert mean.numel() == 0 and var.numel() == 0


@settings(max_examples=12, **SETTINGS)
@given(p=conv_problems())
def test_conv_bn_act_gradients_match_float64_reference(p):
    """Gradients of every differentiable input (x, weight, scales/shifts, residual), through
    y and, in train mode, through the batch statistics too."""
    ho, wo = (_out_size(s, p["ksize"], p["stride"], p["padding"]) for s in (p["h"], p["w"]))
    assume(ho >= 1 and wo >= 1)
    x, wt, kw = _conv_inputs(p)
    args = (p["stride"], p["padding"], p["groups"])
    names = ["x", "weight"] + [k for k in ("in_scale", "in_shift", "out_scale", "out_shift", "residual")
                               if kw[k] is not None]

    def run(dtype, fn):
        leaves = {"x": x.detach().to(dtype), "weight": wt.detach().to(dtype)}
        leaves.update({k: kw[k].detach().to(dtype) for k in names[2:]})
        for v in leaves.values():
            v.requires_grad_()
        kwargs = dict(kw, **{k: leaves[k] for k in names[2:]})
        y, mean, var = fn(leaves["x"], leaves["weight"], *args, **kwargs)
        g = _gen(p["seed"] + 1)
        loss = (y.double() * _randn(g, *y.shape, dtype=torch.float64)).sum()
        if kw["stats"]:
            loss = loss + (mean.double() * _randn(g, *mean.shape, dtype=torch.float64)).sum() \
                + (var.double() * _randn(g, *var.shape, dtype=torch.float64)).sum()
        loss.backward()
        return {k: leaves[k].grad for k in names}

    ours = run(torch.float32, kernels.conv_bn_act)
    ref = run(torch.float64, reference.conv_bn_act_reference)
    for k in names:
        scale = ref[k].abs().max().item()
        assert ours[k] is not None, f"no gradient for {k}"
        assert_within(ours[k], ref[k], 50 * REL * (scale + 1e-3), f"d{k}")


# --------------------------------------------------------------------------------------
# NaN / Inf: exactly where PyTorch puts them, in the grouped forward and the data gradient
# --------------------------------------------------------------------------------------
@settings(max_examples=10, **SETTINGS)
@given(n=st.integers(1, 2), h=st.integers(3, 7), w=st.integers(3, 7), groups=st.sampled_from([2, 3, 4, 8, 16]),
       cin_g=st.sampled_from([1, 2, 4, 5, 16]), cout_g=st.sampled_from([1, 3, 4, 8]),
       stride=st.sampled_from([1, 2]), n_specials=st.integers(1, 3), to_grad=st.booleans(),
       seed=st.integers(0, 2 ** 31 - 1))
def test_nan_inf_stay_in_their_group(n, h, w, groups, cin_g, cout_g, stride, n_specials, to_grad, seed):
    """A few NaN/+Inf/-Inf in the input (or in the output gradient) of a grouped 3x3: NaN,
    +Inf and -Inf land in exactly the places where F.conv2d (or its input and weight
    gradients) puts them."""
    g = _gen(seed)
    x = _randn(g, n, groups * cin_g, h, w)
    wt = _randn(g, groups * cout_g, cin_g, 3, 3)
    conv = lambda t: kernels.conv_bn_act(t, wt, stride, 1, groups)[0]  # noqa: E731
    conv_ref = lambda t: nn.functional.conv2d(t, wt, stride=stride, padding=1, groups=groups)  # noqa: E731
    target = torch.empty_like(conv_ref(x), memory_format=torch.contiguous_format) if to_grad else x
    target = _randn(g, *target.shape)
    picks = torch.randint(0, target.numel(), (n_specials,), generator=g).tolist()
    kinds = torch.randint(0, 3, (n_specials,), generator=g).tolist()
    flat = target.view(-1)
    for i, k in zip(picks, kinds):
        flat[i] = (float("nan"), float("inf"), -float("inf"))[k]
    if not to_grad:
        assert_same_specials(conv(target), conv_ref(target), "forward")
        return
    grads = []
    for use_ours in (True, False):
        xr, wr = x.clone().requires_grad_(), wt.clone().requires_grad_()
        y = kernels.conv_bn_act(xr, wr, stride, 1, groups)[0] if use_ours else \
            nn.functional.conv2d(xr, wr, stride=stride, padding=1, groups=groups)
        y.backward(target)
        grads.append((xr.grad, wr.grad))
    assert_same_specials(grads[0][0], grads[1][0], "input gradient")
    # The centre tap only: the others also meet the zero padding, where Inf * 0 = NaN is
    # computed by some implementations (ours, PyTorch's CPU) and skipped by others.
    assert_same_specials(grads[0][1][:, :, 1, 1], grads[1][1][:, :, 1, 1], "weight gradient (centre tap)")


# --------------------------------------------------------------------------------------
# kernels.bn_act against kernels.reference.bn_act_reference in float64
# --------------------------------------------------------------------------------------
@settings(max_examples=40, **SETTINGS)
@given(n=st.integers(1, 3), c=st.sampled_from([1, 3, 4, 16, 24, 70]), h=st.integers(1, 9), w=st.integers(1, 9),
       residual=st.sampled_from(["none", "plain", "affine"]), relu=st.booleans(),
       layout=st.sampled_from(["nchw", "channels_last"]), res_layout=st.sampled_from(["nchw", "channels_last"]),
       seed=st.integers(0, 2 ** 31 - 1))
def test_bn_act_matches_float64_reference(n, c, h, w, residual, relu, layout, res_layout, seed):
    g = _gen(seed)
    z = _layout(_randn(g, n, c, h, w, scale=3.0), layout)
    scale, shift = _randn(g, c), _randn(g, c)
    r = rs = rb = None
    if residual != "none":
        r = _layout(_randn(g, n, c, h, w), res_layout)
    if residual == "affine":
        rs, rb = _randn(g, c), _randn(g, c)
    y = kernels.bn_act(z, scale, shift, r, rs, rb, relu=relu)
    d = lambda v: None if v is None else v.double()  # noqa: E731
    y64 = reference.bn_act_reference(z.double(), scale.double(), shift.double(), d(r), d(rs), d(rb), relu)
    pc = reference._per_channel
    bound = 4e-7 * (z.double().abs() * pc(scale.double().abs()) + pc(shift.double().abs()) + 1)
    if r is not None:
        bound = bound + 4e-7 * r.double().abs() * (pc(rs.double().abs()) if rs is not None else 1) \
            + (4e-7 * pc(rb.double().abs()) if rb is not None else 0)
    assert y.dtype == z.dtype
    assert_within(y, y64, bound, "bn_act")


# --------------------------------------------------------------------------------------
# modules: ConvBNAct and the fused bottleneck against float64 copies of the eager modules
# --------------------------------------------------------------------------------------
def _randomize_bn(bn, g):
    c = bn.num_features
    with torch.no_grad():
        bn.running_mean.copy_(torch.rand(c, generator=g) - 0.5)
        bn.running_var.copy_(torch.rand(c, generator=g) * 1.5 + 0.5)
        bn.weight.copy_(torch.rand(c, generator=g) + 0.5)
        bn.bias.copy_(torch.rand(c, generator=g) - 0.5)


def _check_module_against_float64(ours, eager, x, train, what):
    """Forward (and, in train mode, the running statistics) against a float64 copy of the
    eager module: |ours - ref64| <= 2 |eager fp32 - ref64| + atol (BN on a tiny batch
    divides by a small standard deviation, so eager fp32 is the yardstick, not a fixed rtol)."""
    ref64 = copy.deepcopy(eager).double().train(train)
    ours.train(train)
    eager.train(train)
    y, y_eager, y64 = ours(x), eager(x), ref64(x.double())
    atol = 50 * REL * (y64.abs().max().item() + 1)
    err_eager = (y_eager.double() - y64).abs()
    assert_within(y, y64, 2 * err_eager + atol, f"{what} output")
    if train:
        for (name, b), (_, b64), (_, be) in zip(ours.named_buffers(), ref64.named_buffers(), eager.named_buffers()):
            if b.is_floating_point():
                assert_within(b, b64, 2 * (be.double() - b64).abs() + 50 * REL * (b64.abs().max().item() + 1),
                              f"{what} {name}")
            else:
                assert torch.equal(b.cpu(), b64.cpu()), name


@settings(max_examples=20, **SETTINGS)
@given(p=conv_problems(), relu=st.booleans(), momentum=st.sampled_from([0.1, None]))
def test_conv_bn_act_module_matches_float64(p, relu, momentum):
    ho, wo = (_out_size(s, p["ksize"], p["stride"], p["padding"]) for s in (p["h"], p["w"]))
    assume(ho >= 1 and wo >= 1)
    train = p["mode"] == "train"
    assume(not train or p["n"] * ho * wo > 1)  # BN needs more than 1 value per channel in training
    g = _gen(p["seed"])
    conv = nn.Conv2d(p["cin"], p["cout"], p["ksize"], p["stride"], p["padding"], groups=p["groups"], bias=False)
    with torch.no_grad():
        conv.weight.copy_(torch.randn(conv.weight.shape, generator=g))
    bn = nn.BatchNorm2d(p["cout"], momentum=momentum)
    _randomize_bn(bn, g)
    eager = nn.Sequential(conv, bn, *([nn.ReLU()] if relu else [])).to(DEVICE)
    ours = resnext.ConvBNAct.from_modules(copy.deepcopy(conv), copy.deepcopy(bn), relu=relu).to(DEVICE)
    x = _layout(_randn(g, p["n"], p["cin"], p["h"], p["w"]), p["layout"])
    _check_module_against_float64(ours, eager, x, train, "ConvBNAct")


@settings(max_examples=6, **SETTINGS)
@given(n=st.integers(1, 3), h=st.integers(2, 9), w=st.integers(2, 9), groups=st.sampled_from([1, 2, 4]),
       width_per_group=st.sampled_from([2, 4]), stride=st.sampled_from([1, 2]), downsample=st.booleans(),
       layout=st.sampled_from(["nchw", "channels_last"]), train=st.booleans(), seed=st.integers(0, 2 ** 31 - 1))
def test_fused_bottleneck_matches_float64(n, h, w, groups, width_per_group, stride, downsample, layout, train, seed):
    """The whole train-mode chain (stats -> BN on load in the next conv -> bn_act with the
    downsample's BN) and the eval-mode epilogues of a converted bottleneck."""
    ho, wo = _out_size(h, 3, stride, 1), _out_size(w, 3, stride, 1)
    assume(not train or n * ho * wo > 1)
    downsample = downsample or stride != 1
    planes = 4
    inplanes = planes * 4 if not downsample else 8
    g = _gen(seed)
    torch.manual_seed(seed)
    ds = nn.Sequential(nn.Conv2d(inplanes, planes * 4, 1, stride, bias=False), nn.BatchNorm2d(planes * 4)) \
        if downsample else None
    block = resnext.Bottleneck(inplanes, planes, stride, ds, groups=groups, base_width=width_per_group * 64 // planes)
    for m in block.modules():
        if isinstance(m, nn.BatchNorm2d):
            _randomize_bn(m, g)
    eager = block.to(DEVICE)
    ours = resnext.convert(copy.deepcopy(eager))
    assert isinstance(ours, resnext.FusedBottleneck)
    x = _layout(_randn(g, n, inplanes, h, w), layout)
    _check_module_against_float64(ours, eager, x, train, "FusedBottleneck")
