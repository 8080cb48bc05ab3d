"""Squeeze-excite / ECA / drop-path fusion (issue 10, items 2 and 3): the kernels.

* the convolution epilogue's per-(image, channel) sums, with row blocks spanning images;
* the gated final pass ``relu(gate * bn(z) + residual)`` and its backward (the gate's
  per-image gradient, the un-gated residual sums);
* the squeeze gradient added inside conv3's backward pass (``image_grad``).
Each against float64 PyTorch on fresh random inputs, outputs NaN-poisoned (conftest).
The block-level tests (timm-style SE/ECA/drop-path Bottlenecks) are in test_se_blocks.py.
"""
import pytest
import torch

from helpers import assert_close_to_ref, require_bf16
from kernels import reference
from kernels.squeeze_excite import ConvSqueezeFn, gated_bn_act

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _conv_squeeze(x, w, stride, padding, stats, in_scale=None, in_shift=None, sq_scale=None, sq_shift=None):
    """(y, mean, var, scale, shift, m); without stats, (sq_scale, sq_shift) default to (1, 0): m = mean of y."""
    if not stats and sq_scale is None:
        sq_scale, sq_shift = torch.ones(w.shape[0], dtype=x.dtype), torch.zeros(w.shape[0], dtype=x.dtype)
    return ConvSqueezeFn.apply(x, w, None, stride, padding, 1, in_scale, in_shift, in_scale is not None,
                               None, None, None, False, stats, None, None, None, None, None, 0.1, 1e-5,
                               sq_scale, sq_shift)


@pytest.mark.parametrize("shape", [
    (3, 8, 3, 3),  # HW = 9 < BLOCK_M: a row block spans up to 3+ images
    (2, 16, 5, 7),  # HW = 35: blocks straddle the image boundary
    (2, 24, 9, 8),  # HW = 72 > BLOCK_M: an image spans several blocks, Cout not a power of 2
])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_squeeze_sums_in_conv_epilogue(shape, dtype):
    if dtype == torch.bfloat16:
        require_bf16()
    N, cout, H, W = shape
    x = torch.randn(N, 16, H, W, device=DEVICE).to(dtype).to(memory_format=torch.channels_last)
    w = (torch.randn(cout, 16, 1, 1, device=DEVICE) * 0.3).to(dtype)
    for stats in (False, True):
        y, mean, var, scale, shift, m = _conv_squeeze(x, w, 1, 0, stats)
        # the mean of bn(y) as stored: against float64 from the returned y (exact up to fp32 order)
        s, b = (scale.double(), shift.double()) if stats else (1.0, 0.0)
        ref = (y.double() * (s.view(1, -1, 1, 1) if stats else s) + (b.view(1, -1, 1, 1) if stats else b))
        torch.testing.assert_close(m.double(), ref.mean(dim=(2, 3)), atol=1e-5, rtol=1e-5)
        y_ref = torch.nn.functional.conv2d(x.double(), w.double())
        assert_close_to_ref(y, y_ref, dtype, torch.nn.functional.conv2d(x, w) if dtype != torch.float32 else None)


def test_squeeze_gradient_joins_conv_backward():
    """m's gradient is added to y's in conv3's backward pass (and to scale/shift's): compare with
    float64 autograd through the reference, train mode (statistics terms too) and with a given
    (sq_scale, sq_shift), the eval fold, whose gradients come back too."""
    N, cin, cout, H, W = 3, 16, 24, 5, 3
    x = torch.randn(N, cin, H, W, device=DEVICE).to(memory_format=torch.channels_last)
    w = torch.randn(cout, cin, 1, 1, device=DEVICE) * 0.3
    isc, ish = torch.rand(cin, device=DEVICE) + 0.5, torch.randn(cin, device=DEVICE) * 0.3
    dy = torch.randn(N, cout, H, W, device=DEVICE)
    dsum = torch.randn(N, cout, device=DEVICE)
    dsc, dsh = torch.randn(cout, device=DEVICE), torch.randn(cout, device=DEVICE)
    sqs, sqb = torch.rand(cout, device=DEVICE) + 0.5, torch.randn(cout, device=DEVICE)
    for stats in (False, True):
        outs = []
        for dt in (torch.float32, torch.float64):
            xx = x.to(dt).requires_grad_()
            ww = w.to(dt).requires_grad_()
            ss, bb = sqs.to(dt).requires_grad_(), sqb.to(dt).requires_grad_()
            y, mean, var, scale, shift, m = _conv_squeeze(xx, ww, 1, 0, stats, isc.to(dt), ish.to(dt),
                                                          None if stats else ss, None if stats else bb)
            if dt == torch.float64:  # the reference: m from y by PyTorch's own ops
                s_, b_ = (scale, shift) if stats else (ss, bb)
                m = (y * s_.view(1, -1, 1, 1) + b_.view(1, -1, 1, 1)).mean(dim=(2, 3))
            loss = (y * dy.to(dt)).sum() + (m * dsum.to(dt)).sum()
            if stats:
                loss = loss + (scale * dsc.to(dt)).sum() + (shift * dsh.to(dt)).sum()
            outs.append(torch.autograd.grad(loss, (xx, ww) if stats else (xx, ww, ss, bb)))
        for ours, ref in zip(*outs):
            torch.testing.assert_close(ours.double(), ref, atol=2e-3, rtol=2e-4)


def _gated_inputs(N, C, H, W, dtype, per_image, residual_kind):
    z = torch.randn(N, C, H, W, device=DEVICE).to(dtype).to(memory_format=torch.channels_last)
    scale, shift = torch.rand(C, device=DEVICE) + 0.5, torch.randn(C, device=DEVICE) * 0.5
    gate = torch.rand(N, 1 if per_image else C, 1, 1, device=DEVICE).to(dtype)
    res = rs = rb = None
    if residual_kind != "none":
        res = torch.randn(N, C, H, W, device=DEVICE).to(dtype).to(memory_format=torch.channels_last)
    if residual_kind == "affine":
        rs, rb = torch.rand(C, device=DEVICE) + 0.5, torch.randn(C, device=DEVICE) * 0.5
    return z, scale, shift, gate, res, rs, rb


@pytest.mark.parametrize("residual_kind", ["none", "plain", "affine"])
@pytest.mark.parametrize("per_image", [False, True], ids=["se_gate", "drop_path_mask"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_gated_bn_act_forward_backward(dtype, per_image, residual_kind):
    if dtype == torch.bfloat16:
        require_bf16()
    N, C, H, W = 3, 24, 5, 7  # HW = 35: image-aligned programs of the gate gradient cross no boundary
    inputs = _gated_inputs(N, C, H, W, dtype, per_image, residual_kind)
    dy = torch.randn(N, C, H, W, device=DEVICE)

    def run(fn, cast):
        ts = [t if t is None else cast(t).detach().requires_grad_() for t in inputs]
        z, scale, shift, gate, res, rs, rb = ts
        y = fn(z, scale, shift, gate, res, rs, rb)
        wanted = [t for t in ts if t is not None]
        return y, torch.autograd.grad(y, wanted, dy.to(y.dtype))

    ours, ours_g = run(lambda z, s, b, g, r, rs, rb: gated_bn_act(z, s, b, g, r, rs, rb, relu=True), lambda t: t)
    ref, ref_g = run(lambda z, s, b, g, r, rs, rb: reference.bn_act_reference(z, s, b, r, rs, rb, True, g),
                     lambda t: t.double())
    lowp = None
    if dtype != torch.float32:
        lowp = reference.bn_act_reference(*[t if t is None else t for t in
                                            (inputs[0], inputs[1], inputs[2], inputs[4], inputs[5], inputs[6])],
                                          True, inputs[3])
    assert ours.is_contiguous(memory_format=torch.channels_last)
    assert_close_to_ref(ours, ref, dtype, lowp)
    for a, b in zip(ours_g, ref_g):
        scale = max(1.0, b.abs().max().item())
        tol = 1e-4 if dtype == torch.float32 else 2e-2
        torch.testing.assert_close(a.double(), b, atol=tol * scale, rtol=tol)


def test_gate_shape_is_checked():
    z = torch.randn(2, 8, 3, 3, device=DEVICE)
    s, b = torch.ones(8, device=DEVICE), torch.zeros(8, device=DEVICE)
    with pytest.raises(ValueError, match="gate must have shape"):
        gated_bn_act(z, s, b, torch.ones(2, 4, 1, 1, device=DEVICE))
    with pytest.raises(TypeError, match="floating-point"):
        gated_bn_act(z, s, b, torch.ones(2, 8, 1, 1, dtype=torch.int64, device=DEVICE))
