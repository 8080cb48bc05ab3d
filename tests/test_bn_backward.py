"""The one-pass BN / ReLU backward kernel (kernels/bn_backward.py) and the backward formulas using it.

* the kernel against the PyTorch formulas in float64, mode by mode, NCHW and channels_last
  inputs, odd sizes, fp32 and fp16;
* end to end: gradients of ``kernels.conv_bn_act`` / ``kernels.bn_act`` against autograd
  through ``kernels/reference.py`` in float64;
* bit-identical results run to run (fixed-order partial sums, no atomics);
* the kernel compiles for sm_90 without spills (a subprocess without TRITON_INTERPRET).
"""
import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import DEVICE
from helpers import require_bf16

import kernels
import kernels.bn_backward as bnb
from kernels.bn_backward import StatsGrad, bn_backward
from kernels.reference import bn_act_reference, conv_bn_act_reference

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pc = lambda v: v.view(1, -1, 1, 1)  # noqa: E731


def _act(shape, dtype, channels_last, lo=None):
    """Random [N, C, H, W] data, never zero; ``lo`` shifts it (e.g. positive-only)."""
    t = torch.randn(shape, device=DEVICE)
    t = torch.where(t.abs() < 1e-3, 0.5, t)
    if lo is not None:
        t = t.abs() + lo
    t = t.to(dtype)
    return t.contiguous(memory_format=torch.channels_last) if channels_last else t.contiguous()


def _vec(C, lo=0.5):
    return torch.rand(C, device=DEVICE) + lo


def _r(*shape):
    return torch.randn(*shape, device=DEVICE)


def _reference(dy, *, relu_out=None, relu_in=None, relu_in_scale=None, relu_in_shift=None, scale=None,
               stats=None, res_scale=None, sum_gv=None, sum_gv_is_relu_in=False, sum_gr=None, shape=None):
    """The PyTorch formulas of conv_bn_act._backward / batchnorm._bn_act_backward, in float64."""
    d = lambda t: None if t is None else t.double()  # noqa: E731
    g = d(dy) if dy is not None else torch.zeros(shape, dtype=torch.float64, device=DEVICE)
    if relu_out is not None:
        g = g * (d(relu_out) > 0)
    if relu_in is not None:  # a = relu(x*s + b) recomputed, then da * (a > 0)
        a = torch.relu(d(relu_in) * pc(d(relu_in_scale)) + pc(d(relu_in_shift)))
        g = g * (a > 0)
    dz = g * pc(d(scale)) if scale is not None else g
    dgamma = dbeta = None
    if stats is not None:
        z, mean, var, dmean, dvar, dscale, dshift, gamma, eps = stats
        count = z.numel() // z.shape[1]
        dm = d(dmean) if dmean is not None else 0.0
        dv = d(dvar) if dvar is not None else 0.0
        if dscale is not None:  # scale = gamma * r, shift = beta - mean * scale, by autograd in float64
            m64, v64, g64 = (d(t).requires_grad_() for t in (mean, var, gamma))
            scale_ = g64 * torch.rsqrt(v64 + eps)
            shift_ = -m64 * scale_
            gm, gv, gg = torch.autograd.grad((scale_ * d(dscale)).sum() + (shift_ * d(dshift)).sum(), (m64, v64, g64))
            dm, dv, dgamma, dbeta = dm + gm, dv + gv, gg, d(dshift)
        dz = dz + pc(dm + torch.zeros(z.shape[1], dtype=torch.float64, device=DEVICE)) / count
        dz = dz + pc(dv + torch.zeros(z.shape[1], dtype=torch.float64, device=DEVICE)) * (2.0 / count) * (
            d(z) - pc(d(mean)))
    dres = g * pc(d(res_scale)) if res_scale is not None else g
    s = lambda t: t.sum(dim=(0, 2, 3))  # noqa: E731
    v = relu_in if sum_gv_is_relu_in else sum_gv
    return dict(dz=dz, dres=dres, sum_g=s(g), sum_gv=None if v is None else s(g * d(v)),
                sum_gr=None if sum_gr is None else s(g * d(sum_gr)), dgamma=dgamma, dbeta=dbeta)


# mode -> function(shape, dtype, channels_last) -> kwargs of bn_backward (and of _reference)
def _epilogue_relu_scale_res(shape, dt, cl):  # eval-mode conv: ReLU, folded BN, residual, frozen-BN gamma
    C = shape[1]
    return dict(dy=_act(shape, dt, cl), relu_out=_act(shape, dt, cl), scale=_vec(C), dz_dtype=dt, dres_dtype=dt,
                sum_g=True, sum_gv=_act(shape, dt, cl))


def _epilogue_stats(shape, dt, cl):  # train-mode conv: dmean, dvar flow back through the statistics
    C = shape[1]
    z = _act(shape, dt, cl) + 3.0  # a mean far from 0: (z - mean) must be taken before scaling
    return dict(dy=_act(shape, dt, cl), stats=StatsGrad(z, z.double().mean(dim=(0, 2, 3)).float(), _vec(C),
                                                        _r(C), _r(C)), dz_dtype=dt)


def _epilogue_stats_no_dy(shape, dt, cl):  # only var is used downstream; no dy, no dmean
    C = shape[1]
    z = _act(shape, dt, cl)
    return dict(dy=None, stats=StatsGrad(z, _r(C), _vec(C), None, _r(C)), dz_dtype=dt)


def _epilogue_stats_affine(shape, dt, cl):  # train-mode BN: gradients reach its scale/shift (the finalize)
    C = shape[1]
    z = _act(shape, dt, cl) + 3.0
    zd = z.double()
    return dict(dy=_act(shape, dt, cl), stats=StatsGrad(
        z, zd.mean(dim=(0, 2, 3)).float(), zd.var(dim=(0, 2, 3), unbiased=False).float(), None, None,
        _r(C), _r(C), _vec(C), 1e-3), dz_dtype=dt)


def _prologue_relu(shape, dt, cl):  # after dgrad: mask recomputed from x, in_scale, sums for gamma, beta
    C = shape[1]
    return dict(dy=_act(shape, dt, cl), relu_in=_act(shape, dt, cl), relu_in_scale=_vec(C),
                relu_in_shift=_r(C), scale=_vec(C), dz_dtype=dt, sum_g=True, sum_gv_is_relu_in=True)


def _prologue_no_relu(shape, dt, cl):
    C = shape[1]
    x = _act(shape, dt, cl)
    return dict(dy=_act(shape, dt, cl), scale=_vec(C), dz_dtype=dt, sum_g=True, sum_gv=x)


def _bn_act_res(shape, dt, cl):
    C = shape[1]
    return dict(dy=_act(shape, dt, cl), relu_out=_act(shape, dt, cl), scale=_vec(C), dz_dtype=dt,
                dres_dtype=dt, sum_g=True, sum_gv=_act(shape, dt, cl))


def _bn_act_res_affine(shape, dt, cl):  # downsample branch with its own BN
    C = shape[1]
    return dict(dy=_act(shape, dt, cl), relu_out=_act(shape, dt, cl), scale=_vec(C), dz_dtype=dt,
                dres_dtype=torch.float32, res_scale=_vec(C), sum_g=True, sum_gv=_act(shape, dt, cl),
                sum_gr=_act(shape, dt, cl))


MODES = {
    "epilogue-relu-scale-res": _epilogue_relu_scale_res,
    "epilogue-stats": _epilogue_stats,
    "epilogue-stats-no-dy": _epilogue_stats_no_dy,
    "epilogue-stats-affine": _epilogue_stats_affine,
    "prologue-relu": _prologue_relu,
    "prologue-no-relu": _prologue_no_relu,
    "bn_act-res": _bn_act_res,
    "bn_act-res-affine": _bn_act_res_affine,
}
SHAPES = [pytest.param((2, 20, 5, 7), id="C20-M70"), pytest.param((3, 70, 3, 5), id="C70-two-channel-blocks")]


def _check(out, ref, kw):
    for name in ("dz", "dres"):
        ours = getattr(out, name)
        want = kw.get(f"{name}_dtype")
        if want is None:
            assert ours is None
            continue
        assert ours.dtype == want and ours.is_contiguous(memory_format=torch.channels_last)
        assert not torch.isnan(ours).any(), f"{name}: unwritten elements"
        r = ref[name]
        if ours.dtype in (torch.float16, torch.bfloat16):
            # one rounding of the fp32 result: half an ulp, 2^-11 (fp16) or 2^-8 (bf16: 8 significant
            # bits to fp16's 11, hence the looser bound) relative
            rtol = 2e-3 if ours.dtype == torch.float16 else 4e-3
            torch.testing.assert_close(ours.double(), r, rtol=rtol, atol=1e-6 * r.abs().max().item(), msg=name)
        else:
            torch.testing.assert_close(ours.double(), r, rtol=1e-5, atol=1e-6 * r.abs().max().item(), msg=name)
    asked = dict(sum_g=kw.get("sum_g", False), sum_gr=kw.get("sum_gr") is not None,
                 sum_gv=kw.get("sum_gv") is not None or kw.get("sum_gv_is_relu_in", False))
    for name in ("sum_g", "sum_gv", "sum_gr"):
        ours, r = getattr(out, name), ref[name]
        if not asked[name]:
            assert ours is None
            continue
        assert ours.dtype == torch.float32 and ours.shape == r.shape
        # fp32 accumulation of exact products of the stored inputs
        torch.testing.assert_close(ours.double(), r, rtol=1e-5, atol=1e-5 * max(1.0, r.abs().max().item()),
                                   msg=name)
    for name in ("dgamma", "dbeta"):  # the finalize's backward, on [C] vectors in fp32
        ours, r = getattr(out, name), ref[name]
        if r is None:
            assert ours is None
            continue
        torch.testing.assert_close(ours.double(), r, rtol=1e-5, atol=1e-5 * max(1.0, r.abs().max().item()),
                                   msg=name)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("mode", list(MODES))
def test_kernel_against_float64_formulas(mode, channels_last, dtype, shape):
    kw = MODES[mode](shape, dtype, channels_last)
    out = bn_backward(**kw)
    ref = _reference(**{k: v for k, v in kw.items() if not k.endswith("_dtype") and k != "sum_g"}, shape=shape)
    _check(out, ref, kw)


@pytest.mark.parametrize("mode", list(MODES))
def test_bf16_kernel_against_float64_formulas(mode):
    """bf16 storage (channels_last, one shape): dz and dres one rounding from float64, sums fp32."""
    require_bf16()
    shape = (2, 20, 5, 7)
    kw = MODES[mode](shape, torch.bfloat16, True)
    out = bn_backward(**kw)
    ref = _reference(**{k: v for k, v in kw.items() if not k.endswith("_dtype") and k != "sum_g"}, shape=shape)
    _check(out, ref, kw)


def test_many_row_runs_per_program(monkeypatch):
    """Few programs (as at full size on a GPU): each loops over many row blocks, the last run ragged."""
    monkeypatch.setattr(bnb, "TARGET_PROGRAMS", 3)
    shape = (3, 24, 11, 13)  # M = 429 rows: runs of 3 row blocks, the last run short
    cfg = bnb.launch_config(429, 24)
    assert cfg["grid"][0] >= 2 and cfg["rows_per_prog"] > cfg["BLOCK_M"]
    kw = _bn_act_res_affine(shape, torch.float32, True)
    out = bn_backward(**kw)
    _check(out, _reference(**{k: v for k, v in kw.items() if not k.endswith("_dtype") and k != "sum_g"}), kw)


@pytest.mark.no_poison  # the NaN fill of every torch.empty would be counted
def test_broadcast_dy_is_read_in_place_and_sums_reduced_in_one_launch(monkeypatch):
    """The gradient of ``.sum()`` (an expanded scalar) is read through zero strides, no copy;
    the sums over many row runs come out of the same launch (no aten op at all)."""
    from benchmarks.device_ops import count_device_ops
    monkeypatch.setattr(bnb, "TARGET_PROGRAMS", 5)
    shape = (3, 24, 11, 13)
    y = torch.randn(shape, device=DEVICE).contiguous(memory_format=torch.channels_last)
    dy = torch.full((), 0.75, device=DEVICE).expand(shape)
    assert bnb.launch_config(429, 24)["grid"][0] >= 2
    kw = dict(relu_out=y, scale=_vec(24), dz_dtype=torch.float32, sum_g=True, sum_gv=y)
    bn_backward(dy, **kw)  # the first call on a device allocates the (reused) arrival counters
    ops = count_device_ops(lambda: bn_backward(dy, **kw))
    assert (ops.triton, ops.aten) == (1, 0), ops
    ours, dense = bn_backward(dy, **kw), bn_backward(dy.contiguous(memory_format=torch.channels_last), **kw)
    assert torch.equal(ours.dz, dense.dz) and torch.equal(ours.sum_g, dense.sum_g)
    assert torch.equal(ours.sum_gv, dense.sum_gv)
    g = dy.double() * (y > 0)
    torch.testing.assert_close(ours.sum_g.double(), g.sum(dim=(0, 2, 3)), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours.sum_gv.double(), (g * y.double()).sum(dim=(0, 2, 3)), rtol=1e-5, atol=1e-4)


def test_relu_nan_semantics_match_pytorch():
    """ReLU backward as torch's threshold_backward: 0 where y <= 0 (even for a NaN gradient),
    the gradient where y > 0 or y is NaN."""
    y = torch.tensor([float("nan"), -1.0, 0.0, 2.0, float("nan"), -0.0, 3.0, -2.0], device=DEVICE)
    dy = torch.tensor([1.0, float("nan"), 5.0, 3.0, float("inf"), 7.0, float("nan"), 2.0], device=DEVICE)
    y4, dy4 = y.view(1, 8, 1, 1), dy.view(1, 8, 1, 1)
    out = bn_backward(dy4, relu_out=y4, dz_dtype=torch.float32)
    expected = torch.ops.aten.threshold_backward(dy4, y4, 0.0)
    torch.testing.assert_close(out.dz, expected, equal_nan=True)
    # the recomputed mask: x*1 + 0 has the same values as y
    ones, zeros = torch.ones(8, device=DEVICE), torch.zeros(8, device=DEVICE)
    out = bn_backward(dy4, relu_in=y4, relu_in_scale=ones, relu_in_shift=zeros, dz_dtype=torch.float32)
    torch.testing.assert_close(out.dz, expected, equal_nan=True)


def test_empty_batch():
    dy = torch.randn(0, 8, 3, 3, device=DEVICE)
    out = bn_backward(dy, relu_out=dy, scale=_vec(8), dz_dtype=torch.float32, sum_g=True, sum_gv=dy)
    assert out.dz.shape == dy.shape and torch.equal(out.sum_g, torch.zeros(8)) and torch.equal(out.sum_gv,
                                                                                                torch.zeros(8))


def test_deterministic(monkeypatch):
    monkeypatch.setattr(bnb, "TARGET_PROGRAMS", 4)
    kw = _bn_act_res_affine((2, 40, 9, 7), torch.float32, True)
    a, b = bn_backward(**kw), bn_backward(**kw)
    for x, y in zip(a, b):
        assert (x is None and y is None) or torch.equal(x, y)


# --------------------------------------------------------------------------------------
# End to end: the backward formulas of the ops, against autograd through the reference
# --------------------------------------------------------------------------------------
def _count_kernel_calls(monkeypatch):
    calls = []
    real = bnb.bn_backward_impl
    monkeypatch.setattr(bnb, "bn_backward_impl", lambda *a: calls.append(1) or real(*a))
    return calls


def _grads_vs_reference(fn, ref_fn, inputs, dtype=torch.float32, channels_last=False, tol=2e-4):
    """Gradients of sum(out * w) through fn (inputs in ``dtype``) against ref_fn in float64."""
    # float64 leaves hold the same (rounded) values: a ReLU mask must not flip on input rounding
    leaves64 = [None if t is None else t.to(dtype).double().requires_grad_() for t in inputs]
    ours = []
    for t in inputs:
        if t is None:
            ours.append(None)
            continue
        t = t.to(dtype)
        if channels_last and t.dim() == 4:
            t = t.contiguous(memory_format=torch.channels_last)
        ours.append(t.detach().requires_grad_())
    outs64, outs = ref_fn(*leaves64), fn(*ours)
    weights = [torch.randn(o.shape, dtype=torch.float64, device=DEVICE) for o in outs64]
    sum(((o * w).sum() for o, w in zip(outs64, weights))).backward()
    sum(((o.double() * w).sum() for o, w in zip(outs, weights))).backward()
    for i, (a, b) in enumerate(zip(ours, leaves64)):
        if a is None:
            continue
        assert a.grad is not None and a.grad.dtype == a.dtype, i
        scale = b.grad.abs().max().item()
        torch.testing.assert_close(a.grad.double(), b.grad, atol=tol * max(1.0, scale), rtol=tol,
                                   msg=lambda m, i=i: f"gradient of input {i}: {m}")


CONV_CASES = [  # (N, Cin, H, W, Cout, groups, ksize, stride)
    pytest.param((2, 8, 5, 7, 8, 2, 3, 2), id="grouped3x3-stride2-odd"),
    pytest.param((2, 12, 5, 5, 20, 1, 1, 1), id="1x1"),
]


@pytest.mark.parametrize("case", CONV_CASES)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_conv_bn_act_eval_epilogue_gradients(case, channels_last, monkeypatch):
    """Prologue (BN + ReLU on load) and epilogue (folded BN with trainable gamma/beta, residual,
    ReLU): every input's gradient, through both bn_backward passes."""
    N, Cin, H, W, Cout, groups, ks, stride = case
    pad = ks // 2
    Ho, Wo = (H + 2 * pad - ks) // stride + 1, (W + 2 * pad - ks) // stride + 1
    inputs = [_r(N, Cin, H, W), _r(Cout, Cin // groups, ks, ks) / (Cin // groups * ks * ks) ** .5,
              _vec(Cin), _r(Cin), _vec(Cout), _r(Cout), _r(N, Cout, Ho, Wo)]

    def run(fn):
        return lambda x, w, si, bi, so, bo, r: fn(x, w, stride, pad, groups, in_scale=si, in_shift=bi, in_relu=True,
                                                  out_scale=so, out_shift=bo, residual=r, out_relu=True)[:1]

    calls = _count_kernel_calls(monkeypatch)
    _grads_vs_reference(run(kernels.conv_bn_act), run(conv_bn_act_reference), inputs, channels_last=channels_last)
    assert len(calls) == 2  # epilogue pass and prologue pass


@pytest.mark.parametrize("case", CONV_CASES)
@pytest.mark.parametrize("in_relu", [True, False], ids=["prologue-relu", "prologue-affine-only"])
def test_conv_bn_act_train_stats_gradients(case, in_relu, monkeypatch):
    """Train mode: z, mean and var all feed the loss (dmean/dvar terms in the epilogue pass)."""
    N, Cin, H, W, Cout, groups, ks, stride = case
    pad = ks // 2
    inputs = [_r(N, Cin, H, W), _r(Cout, Cin // groups, ks, ks) / (Cin // groups * ks * ks) ** .5,
              _vec(Cin), _r(Cin)]

    def run(fn):
        return lambda x, w, si, bi: fn(x, w, stride, pad, groups, in_scale=si, in_shift=bi, in_relu=in_relu,
                                       stats=True)

    calls = _count_kernel_calls(monkeypatch)
    _grads_vs_reference(run(kernels.conv_bn_act), run(conv_bn_act_reference), inputs, channels_last=True)
    assert len(calls) == 1  # the statistics pass; the prologue's backward runs in the data gradient's epilogue


def test_conv_bn_act_fp16_gradients():
    """fp16 storage: gradients within a few fp16 roundings of float64 (fp32 inside the kernel)."""
    inputs = [_r(2, 8, 6, 5), _r(8, 2, 3, 3) / 18 ** .5, _vec(8), _r(8)]

    def run(fn):
        return lambda x, w, si, bi: fn(x, w, 1, 1, 4, in_scale=si, in_shift=bi, in_relu=True, stats=True)

    _grads_vs_reference(run(kernels.conv_bn_act), run(conv_bn_act_reference), inputs, dtype=torch.float16,
                        tol=2e-2)


@pytest.mark.parametrize("residual, res_affine, relu", [(False, False, True), (True, False, True),
                                                       (True, True, True), (True, True, False)],
                         ids=["bn-relu", "bn-add-relu", "bn-add-bn-relu", "bn-add-bn"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_bn_act_gradients(residual, res_affine, relu, channels_last, monkeypatch):
    C = 20
    inputs = [_r(2, C, 5, 7), _vec(C), _r(C), _r(2, C, 5, 7) if residual else None,
              _vec(C) if res_affine else None, _r(C) if res_affine else None]

    def run(fn):
        return lambda z, s, b, r, rs, rb: (fn(z, s, b, r, rs, rb, relu=relu),)

    calls = _count_kernel_calls(monkeypatch)
    _grads_vs_reference(run(kernels.bn_act), run(bn_act_reference), inputs, channels_last=channels_last)
    assert len(calls) == 1


def test_bn_act_fp16_gradients():
    C = 24
    inputs = [_r(2, C, 5, 7), _vec(C), _r(C), _r(2, C, 5, 7), _vec(C), _r(C)]

    def run(fn):
        return lambda z, s, b, r, rs, rb: (fn(z, s, b, r, rs, rb, relu=True),)

    _grads_vs_reference(run(kernels.bn_act), run(bn_act_reference), inputs, dtype=torch.float16, tol=5e-3)


def _grads_vs_torch_bf16(fn, ref_fn, inputs, atol=1e-2):
    """bf16 gradients of sum(out * w) through fn: each within twice the error of PyTorch's own
    bf16 autograd through ref_fn (same bf16 inputs), against ref_fn in float64, plus atol x scale."""
    require_bf16()
    bf = [None if t is None else t.bfloat16().contiguous(memory_format=torch.channels_last) if t.dim() == 4
          else t.bfloat16() for t in inputs]
    runs = {}
    for name, f, leaves in (("ours", fn, [None if t is None else t.detach().requires_grad_() for t in bf]),
                            ("torch", ref_fn, [None if t is None else t.detach().requires_grad_() for t in bf]),
                            ("f64", ref_fn, [None if t is None else t.double().requires_grad_() for t in bf])):
        outs = f(*leaves)
        if name == "ours":
            weights = [torch.randn(o.shape, dtype=torch.float64, device=DEVICE) for o in outs]
        sum(((o.double() * w).sum() for o, w in zip(outs, weights))).backward()
        runs[name] = leaves
    for i, (a, t, r) in enumerate(zip(runs["ours"], runs["torch"], runs["f64"])):
        if a is None:
            continue
        assert a.grad is not None and a.grad.dtype == torch.bfloat16, i
        assert not torch.isnan(a.grad).any(), i
        err = (a.grad.double() - r.grad).abs().max().item()
        torch_err = (t.grad.double() - r.grad).abs().max().item()
        scale = r.grad.abs().max().item()
        assert err <= 2 * torch_err + atol * scale, f"gradient of input {i}: {err:.3g} vs PyTorch's {torch_err:.3g}"


def test_conv_bn_act_bf16_gradients():
    """bf16 storage, train mode (statistics) with the BN + ReLU prologue: every input's gradient."""
    inputs = [_r(2, 8, 6, 5), _r(8, 2, 3, 3) / 18 ** .5, _vec(8), _r(8)]

    def run(fn):
        return lambda x, w, si, bi: fn(x, w, 1, 1, 4, in_scale=si, in_shift=bi, in_relu=True, stats=True)

    _grads_vs_torch_bf16(run(kernels.conv_bn_act), run(conv_bn_act_reference), inputs)


def test_bn_act_bf16_gradients():
    C = 24
    inputs = [_r(2, C, 5, 7), _vec(C), _r(C), _r(2, C, 5, 7), _vec(C), _r(C)]

    def run(fn):
        return lambda z, s, b, r, rs, rb: (fn(z, s, b, r, rs, rb, relu=True),)

    _grads_vs_torch_bf16(run(kernels.bn_act), run(bn_act_reference), inputs)


def test_backward_bit_identical_twice():
    x = _r(2, 8, 7, 5)
    w = _r(8, 2, 3, 3) / 18 ** .5
    s, b = _vec(8), _r(8)
    grads = []
    for _ in range(2):
        leaves = [t.clone().requires_grad_() for t in (x, w, s, b)]
        z, mean, var = kernels.conv_bn_act(leaves[0], leaves[1], 1, 1, 4, in_scale=leaves[2], in_shift=leaves[3],
                                           in_relu=True, stats=True)
        y = kernels.bn_act(z, torch.rsqrt(var + 1e-5), -mean * torch.rsqrt(var + 1e-5), relu=True)
        (y.square().sum() + mean.sum()).backward()
        grads.append([t.grad for t in leaves])
    for a, b in zip(*grads):
        assert torch.equal(a, b)


# --------------------------------------------------------------------------------------
# Compiles for Hopper (sm_90), no spills
# --------------------------------------------------------------------------------------
_COMPILE_SCRIPT = r"""
import json, sys
from kernels._compile import bn_backward_launches, compile_for_hopper, resource_usage
rows = []
for dtype in ("float32", "float16", "bfloat16"):
    for l in bn_backward_launches(dtype):  # every variant the backward formulas launch, as configured
        k = compile_for_hopper(l["kernel"], l["signature"], l["constexprs"], num_warps=l["num_warps"])
        rows.append(dict(mode=l["mode"], dtype=dtype, BLOCK_M=l["constexprs"]["BLOCK_M"],
                         BLOCK_C=l["constexprs"]["BLOCK_C"], num_warps=l["num_warps"], **resource_usage(k)))
json.dump(rows, open(sys.argv[1], "w"))
"""


def test_compiles_for_hopper_without_spills(tmp_path):
    out = tmp_path / "bn_backward.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    proc = subprocess.run([sys.executable, "-c", _COMPILE_SCRIPT, str(out)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = json.loads(out.read_text())
    assert {r["dtype"] for r in rows} == {"float32", "float16", "bfloat16"}
    for r in rows:
        assert r["local_bytes"] == 0, r  # no spills
        assert r["registers"] <= 128, r  # room for several blocks per SM (a memory-bound kernel)


def test_bn_act_backward_traces_under_torch_compile():
    """The kernel sits behind the resnext::bn_backward custom op: torch.compile traces the backward
    formula with fake tensors (a raw Triton launch there would fail)."""
    import torch._dynamo
    torch._dynamo.reset()
    C = 8
    inputs = [_r(2, C, 3, 5), _vec(C), _r(C), _r(2, C, 3, 5), _vec(C), _r(C)]
    compiled = torch.compile(lambda *a: (kernels.bn_act(*a, relu=True),), backend="aot_eager", fullgraph=True)
    try:
        _grads_vs_reference(compiled, lambda *a: (bn_act_reference(*a, relu=True),), inputs)
    finally:
        torch._dynamo.reset()
