"""The fused convolution kernel against a float64 PyTorch reference (interpreter on CPU)."""
import pytest
import torch
from conftest import DEVICE
from helpers import assert_close_to_ref, require_bf16

import kernels
from kernels.reference import conv_bn_act_reference

# (N, Cin, H, W, Cout, groups, ksize, stride)  # why
SHAPES = [
    pytest.param(2, 32, 6, 6, 32, 8, 3, 1, id="4-per-group"),  # ResNeXt-50 stage 1 (scaled down)
    pytest.param(2, 32, 7, 7, 32, 4, 3, 2, id="8-per-group-stride2-odd"),  # first block of a stage
    pytest.param(1, 64, 5, 5, 64, 4, 3, 1, id="16-per-group"),
    pytest.param(1, 64, 4, 4, 64, 2, 3, 2, id="32-per-group-stride2"),
    pytest.param(2, 12, 5, 7, 20, 4, 3, 1, id="3in-5out-per-group-non-square"),  # groups not aligned to blocks
    pytest.param(2, 16, 5, 5, 16, 16, 3, 1, id="depthwise"),
    pytest.param(2, 8, 5, 4, 24, 1, 3, 2, id="dense-3x3-cout-neq-cin"),
    pytest.param(2, 24, 5, 5, 40, 1, 1, 1, id="1x1-gemm"),
    pytest.param(2, 16, 7, 5, 24, 1, 1, 2, id="1x1-downsample-stride2"),
]


def _make(N, Cin, H, W, Cout, groups, ksize, dtype=torch.float32, channels_last=False):
    x = torch.randn(N, Cin, H, W, device=DEVICE)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    w = torch.randn(Cout, Cin // groups, ksize, ksize, device=DEVICE) / (Cin // groups * ksize * ksize) ** 0.5
    return x.to(dtype), w.to(dtype)


def _vec(n, lo=0.5):
    return torch.rand(n, device=DEVICE) + lo, torch.randn(n, device=DEVICE)


@pytest.mark.parametrize("N, Cin, H, W, Cout, groups, ksize, stride", SHAPES)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_eval_epilogue(N, Cin, H, W, Cout, groups, ksize, stride, channels_last):
    """Folded BN + residual + ReLU in the epilogue (eval mode)."""
    x, w = _make(N, Cin, H, W, Cout, groups, ksize, channels_last=channels_last)
    scale, shift = _vec(Cout)
    pad = ksize // 2
    Ho, Wo = (H + 2 * pad - ksize) // stride + 1, (W + 2 * pad - ksize) // stride + 1
    res = torch.randn(N, Cout, Ho, Wo, device=DEVICE)
    y, mean, var = kernels.conv_bn_act(x, w, stride, pad, groups, out_scale=scale, out_shift=shift,
                                       residual=res, out_relu=True)
    ref, _, _ = conv_bn_act_reference(x.double(), w.double(), stride, pad, groups, out_scale=scale.double(),
                                      out_shift=shift.double(), residual=res.double(), out_relu=True)
    assert y.is_contiguous(memory_format=torch.channels_last) and mean.numel() == 0
    assert_close_to_ref(y, ref, torch.float32)


@pytest.mark.parametrize("N, Cin, H, W, Cout, groups, ksize, stride", SHAPES)
def test_train_stats_and_prologue(N, Cin, H, W, Cout, groups, ksize, stride):
    """Raw output + batch statistics, with the previous layer's BN + ReLU applied on load."""
    x, w = _make(N, Cin, H, W, Cout, groups, ksize)
    in_scale, in_shift = _vec(Cin)
    pad = ksize // 2
    z, mean, var = kernels.conv_bn_act(x, w, stride, pad, groups, in_scale=in_scale, in_shift=in_shift,
                                       in_relu=True, stats=True)
    zr, mr, vr = conv_bn_act_reference(x.double(), w.double(), stride, pad, groups, in_scale=in_scale.double(),
                                       in_shift=in_shift.double(), in_relu=True, stats=True)
    assert_close_to_ref(z, zr, torch.float32)
    torch.testing.assert_close(mean.double(), mr, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(var.double(), vr, atol=1e-5, rtol=1e-4)


def test_stats_large_mean_no_cancellation():
    """|mean| >> std: a naive E[z^2] - E[z]^2 in fp32 would lose most digits of the variance."""
    x = torch.randn(4, 16, 9, 9, device=DEVICE) + 1000.0
    w = torch.full((16, 16, 1, 1), 1.0 / 16, device=DEVICE) + torch.randn(16, 16, 1, 1, device=DEVICE) * 1e-2
    z, mean, var = kernels.conv_bn_act(x, w, stats=True)
    z64 = z.double()  # the statistics are those of z as stored
    exact = z64.var(dim=(0, 2, 3), unbiased=False)
    zf = z.float()
    naive = (zf.square().mean(dim=(0, 2, 3)) - zf.mean(dim=(0, 2, 3)).square()).double()
    ours_err = ((var.double() - exact).abs() / exact).max().item()
    naive_err = ((naive - exact).abs() / exact).max().item()
    assert ours_err < 1e-4, ours_err
    assert naive_err > 100 * ours_err  # the input really is ill-conditioned
    torch.testing.assert_close(mean.double(), z64.mean(dim=(0, 2, 3)), rtol=1e-6, atol=1e-4)


@pytest.mark.parametrize("stride", [1, 2])
def test_fp16(stride):
    """fp16 storage, fp32 accumulation: error within twice PyTorch's own fp16 error."""
    x, w = _make(2, 32, 7, 6, 32, 8, 3, dtype=torch.float16)
    scale, shift = _vec(32)
    y, _, _ = kernels.conv_bn_act(x, w, stride, 1, 8, out_scale=scale, out_shift=shift, out_relu=True)
    ref, _, _ = conv_bn_act_reference(x.double(), w.double(), stride, 1, 8, out_scale=scale.double(),
                                      out_shift=shift.double(), out_relu=True)
    lowp, _, _ = conv_bn_act_reference(x, w, stride, 1, 8, out_scale=scale.half(), out_shift=shift.half(),
                                       out_relu=True)
    assert y.dtype == torch.float16
    assert_close_to_ref(y, ref, torch.float16, torch_lowp=lowp, atol=2e-3)


# bf16 (tests/interpreter_bf16.py gives the interpreter the GPU's bf16): one small shape per
# channels-per-group of ResNeXt's grouped 3x3 (4, 8, 16, 32) and the 1x1 with a residual.
# atol 1e-2 where fp16 uses 2e-3: bf16 keeps 8 significant bits to fp16's 11 (ulp 8x larger).
BF16_SHAPES = [p for p in SHAPES if p.id in ("4-per-group", "8-per-group-stride2-odd", "16-per-group",
                                             "32-per-group-stride2", "1x1-gemm")]
if torch.cuda.is_available():  # the ResNeXt stage-4 shape on a GPU
    BF16_SHAPES.append(pytest.param(4, 128, 14, 14, 128, 32, 3, 1, id="gpu-stage4"))


@pytest.mark.parametrize("N, Cin, H, W, Cout, groups, ksize, stride", BF16_SHAPES)
def test_bf16_eval_epilogue(N, Cin, H, W, Cout, groups, ksize, stride):
    """bf16 storage, fp32 accumulation: folded BN + residual + ReLU within twice PyTorch's bf16 error."""
    require_bf16()
    x, w = _make(N, Cin, H, W, Cout, groups, ksize, dtype=torch.bfloat16, channels_last=True)
    scale, shift = _vec(Cout)
    pad = ksize // 2
    Ho, Wo = (H + 2 * pad - ksize) // stride + 1, (W + 2 * pad - ksize) // stride + 1
    res = torch.randn(N, Cout, Ho, Wo, device=DEVICE).bfloat16()
    y, _, _ = kernels.conv_bn_act(x, w, stride, pad, groups, out_scale=scale, out_shift=shift, residual=res,
                                  out_relu=True)
    ref, _, _ = conv_bn_act_reference(x.double(), w.double(), stride, pad, groups, out_scale=scale.double(),
                                      out_shift=shift.double(), residual=res.double(), out_relu=True)
    lowp, _, _ = conv_bn_act_reference(x, w, stride, pad, groups, out_scale=scale.bfloat16(),
                                       out_shift=shift.bfloat16(), residual=res, out_relu=True)
    assert y.dtype == torch.bfloat16
    assert_close_to_ref(y, ref, torch.bfloat16, torch_lowp=lowp, atol=1e-2)


@pytest.mark.parametrize("N, Cin, H, W, Cout, groups, ksize, stride",
                         [p for p in SHAPES if p.id in ("4-per-group", "32-per-group-stride2", "1x1-gemm")])
def test_bf16_train_stats_and_prologue(N, Cin, H, W, Cout, groups, ksize, stride):
    """bf16 training forward: raw output and fp32 batch statistics, the previous BN + ReLU on load."""
    require_bf16()
    x, w = _make(N, Cin, H, W, Cout, groups, ksize, dtype=torch.bfloat16)
    in_scale, in_shift = _vec(Cin)
    pad = ksize // 2
    kw = dict(in_relu=True, stats=True)
    z, mean, var = kernels.conv_bn_act(x, w, stride, pad, groups, in_scale=in_scale, in_shift=in_shift, **kw)
    zr, mr, vr = conv_bn_act_reference(x.double(), w.double(), stride, pad, groups, in_scale=in_scale.double(),
                                       in_shift=in_shift.double(), **kw)
    zl, ml, vl = conv_bn_act_reference(x, w, stride, pad, groups, in_scale=in_scale, in_shift=in_shift, **kw)
    assert z.dtype == torch.bfloat16 and mean.dtype == var.dtype == torch.float32
    assert_close_to_ref(z, zr, torch.bfloat16, torch_lowp=zl, atol=1e-2)
    for ours, ref, lowp in ((mean, mr, ml), (var, vr, vl)):
        assert_close_to_ref(ours, ref, torch.bfloat16, torch_lowp=lowp, atol=1e-3)


def test_weight_gradients_through_op():
    """The op's autograd formula (train mode: dmean, dvar flow back through the statistics)."""
    x, w = _make(2, 8, 5, 5, 8, 2, 3)
    s_in, b_in = _vec(8)
    leaves = [t.double().requires_grad_() for t in (x, w, s_in, b_in)]
    ours = [t.clone().float().detach().requires_grad_() for t in leaves]

    def loss(fn, x, w, s, b):
        z, mean, var = fn(x, w, 1, 1, 2, in_scale=s, in_shift=b, in_relu=True, stats=True)
        return (z.square().sum() * 1e-2 + (mean * torch.arange(8.0, dtype=mean.dtype)).sum()
                + var.sin().sum())

    loss(conv_bn_act_reference, *leaves).backward()
    loss(kernels.conv_bn_act, *ours).backward()
    for a, b in zip(ours, leaves):
        torch.testing.assert_close(a.grad.double(), b.grad, atol=1e-4, rtol=1e-4)


def test_gradcheck_float64():
    """float64 takes the reference forward; the hand-written backward formula is checked exactly."""
    x = torch.randn(2, 4, 4, 3, dtype=torch.float64, requires_grad=True)
    w = torch.randn(4, 2, 3, 3, dtype=torch.float64, requires_grad=True)
    s_in = (torch.rand(4, dtype=torch.float64) + 0.5).requires_grad_()
    b_in = torch.randn(4, dtype=torch.float64, requires_grad=True)
    s_out = (torch.rand(4, dtype=torch.float64) + 0.5).requires_grad_()
    b_out = torch.randn(4, dtype=torch.float64, requires_grad=True)
    res = torch.randn(2, 4, 2, 2, dtype=torch.float64, requires_grad=True)

    def eval_fn(x, w, s_in, b_in, s_out, b_out, res):
        return kernels.conv_bn_act(x, w, 2, 1, 2, in_scale=s_in, in_shift=b_in, in_relu=True, out_scale=s_out,
                                   out_shift=b_out, residual=res, out_relu=True)[0]

    def train_fn(x, w):
        z, mean, var = kernels.conv_bn_act(x, w, 1, 1, 2, stats=True)
        return z, mean, var

    assert torch.autograd.gradcheck(eval_fn, (x, w, s_in, b_in, s_out, b_out, res))
    assert torch.autograd.gradcheck(train_fn, (x, w))


@pytest.mark.parametrize("relu", [True, False], ids=["bn-relu", "bn"])
@pytest.mark.parametrize("N, Cin, H, W, Cout, groups, ksize, stride", [
    pytest.param(3, 32, 7, 5, 32, 8, 3, 1, id="4-per-group"),  # 105 rows: not a multiple of the row block
    pytest.param(2, 32, 7, 7, 32, 4, 3, 2, id="8-per-group-stride2-odd"),
    pytest.param(2, 12, 5, 7, 20, 4, 3, 1, id="3in-5out-per-group-non-square"),
    pytest.param(2, 24, 5, 5, 40, 1, 1, 1, id="1x1-gemm"),
    pytest.param(2, 16, 7, 5, 24, 1, 1, 2, id="1x1-downsample-stride2"),
])
def test_prologue_backward_in_the_gradient_launch(N, Cin, H, W, Cout, groups, ksize, stride, relu):
    """Gradients of x, in_scale, in_shift and the weight through the op vs float64, with the
    prologue's backward done in the data gradient's epilogue: the whole backward is one launch."""
    from benchmarks.device_ops import count_device_ops
    x, w = _make(N, Cin, H, W, Cout, groups, ksize)
    s_in, b_in = _vec(Cin)
    b_in = b_in * 0.5
    leaves = [t.double().requires_grad_() for t in (x, w, s_in, b_in)]
    ours = [t.clone().detach().requires_grad_() for t in (x, w, s_in, b_in)]
    pad = ksize // 2

    def fwd(fn, x, w, s, b):
        return fn(x, w, stride, pad, groups, in_scale=s, in_shift=b, in_relu=relu)[0]

    z_ref = fwd(conv_bn_act_reference, *leaves)
    dy = torch.randn(z_ref.shape, device=DEVICE, dtype=torch.float64)
    z_ref.backward(dy)
    z = fwd(kernels.conv_bn_act, *ours)
    ops = count_device_ops(lambda: z.backward(dy.float(), retain_graph=True))
    assert ops.triton == 1 and set(ops.by_name) - {"aten::fill_"} >= {"triton::conv_grads_kernel"}, ops
    assert not any("bn_backward" in k for k in ops.by_name), ops
    for t in ours:
        t.grad = None
    z.backward(dy.float())
    for name, a, b in zip(("x", "w", "in_scale", "in_shift"), ours, leaves):
        assert not torch.isnan(a.grad).any(), name
        torch.testing.assert_close(a.grad.double(), b.grad, atol=1e-4, rtol=1e-4, msg=name)
