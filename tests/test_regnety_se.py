"""RegNetY's squeeze-excite between conv2 and conv3 (issue 10, last row): the kernels.

timm's RegNet Bottleneck runs ``conv3(se(relu(bn2(z2))))``; the fused path (kernels/squeeze_excite.py,
"RegNetY") computes

* the squeeze m = mean relu(s z + b) from one read of z: P = sum mask*z, Q = sum mask
  (``relu_squeeze_kernel``), m = (s P + b Q) / HW, an output of conv2's Function;
* the gate in conv3's prologue: a = relu(s z + b) * g (``IN_GATE``), never stored;
* the backward: the prologue pass (dz, the sums of s and b, dg), the masked image add of dm in
  conv2's statistics pass, the squeeze's share of ds, db (``squeeze_backward_kernel`` with Q).

Each against float64 PyTorch on fresh random inputs, outputs NaN-poisoned (conftest).  The
block-level tests (timm's own RegNetY blocks, train and eval, every gradient and running
statistic) are in test_real_models.py (the ``regnety`` family and ``regnety_016``).
"""
import pytest
import torch
import torch.nn.functional as F

from helpers import assert_close_to_ref, assert_same_specials, require_bf16
from kernels.squeeze_excite import ConvReluSqueezeFn, GatedConvFn, relu_squeeze, relu_squeeze_config

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
EPS = 1e-5


def _cl(t):
    return t.contiguous(memory_format=torch.channels_last)


def _bn_affine(C):
    """scale with both signs (a negative scale flips the mask), shift around 0."""
    return torch.randn(C, device=DEVICE) * 0.8, torch.randn(C, device=DEVICE) * 0.5


@pytest.mark.parametrize("shape, splits, rows_per_split", [
    ((3, 24, 3, 3), 1, 16),  # HW = 9 < BLOCK_HW: one partial row block per image; C not a power of 2
    ((2, 64, 9, 8), 3, 32),  # HW = 72: three runs of one row block each, the last one partial
    ((2, 64, 20, 15), 5, 64),  # HW = 300: five runs of two row blocks (the last partial), merged in-launch
    ((2, 80, 5, 7), 2, 32),  # two channel blocks, the second partial
])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_relu_squeeze_pass(shape, splits, rows_per_split, dtype):
    N, C, H, W = shape
    cfg = relu_squeeze_config(H * W, C)
    assert (cfg["splits"], cfg["rows_per_split"]) == (splits, rows_per_split), cfg
    z = _cl(torch.randn(N, C, H, W, device=DEVICE).to(dtype))
    s, b = _bn_affine(C)
    m, p, q = relu_squeeze(z, s, b)
    # the mask as defined: the activation rounded to z's dtype is > 0
    mask = (z.float() * s.view(1, -1, 1, 1) + b.view(1, -1, 1, 1)).to(dtype) > 0
    torch.testing.assert_close(p.double(), (z.double() * mask).sum(dim=(2, 3)), atol=1e-5, rtol=1e-5)
    assert torch.equal(q.double(), mask.double().sum(dim=(2, 3)))
    m_ref = torch.relu(z.double() * s.double().view(1, -1, 1, 1) + b.double().view(1, -1, 1, 1)).mean(dim=(2, 3))
    torch.testing.assert_close(m.double(), m_ref, atol=1e-5, rtol=1e-5)


def test_relu_squeeze_nan_propagates():
    """A NaN in z makes that (image, channel)'s m NaN, as the eager mean of relu(bn(z)) does; no other."""
    N, C, H, W = 2, 24, 4, 5
    z = torch.randn(N, C, H, W, device=DEVICE)
    z[1, 5, 2, 3] = float("nan")
    z[0, 7, 0, 0] = float("inf")
    s, b = torch.rand(C, device=DEVICE) + 0.5, torch.randn(C, device=DEVICE) * 0.5
    m, _, _ = relu_squeeze(_cl(z), s, b)
    assert_same_specials(m, torch.relu(z * s.view(1, -1, 1, 1) + b.view(1, -1, 1, 1)).mean(dim=(2, 3)), "m")


def _gated_conv(z, w, s, b, gate, stats, out_scale=None, out_shift=None, residual=None, out_relu=False):
    return GatedConvFn.apply(z, w, None, 1, 0, 1, s, b, True, out_scale, out_shift, residual, out_relu, stats,
                             None, None, None, None, None, 0.1, EPS, None, gate)


@pytest.mark.parametrize("stats", [False, True], ids=["eval_epilogue", "train_stats"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_gated_prologue_forward(dtype, stats):
    if dtype == torch.bfloat16:
        require_bf16()
    N, cin, cout, H, W = 3, 24, 40, 5, 3  # HW = 15: row blocks span images
    z = _cl(torch.randn(N, cin, H, W, device=DEVICE).to(dtype))
    w = (torch.randn(cout, cin, 1, 1, device=DEVICE) * 0.3).to(dtype)
    s, b = _bn_affine(cin)
    gate = torch.rand(N, cin, 1, 1, device=DEVICE).to(dtype)
    os_, ob, res = None, None, None
    if not stats:
        os_, ob = torch.rand(cout, device=DEVICE) + 0.5, torch.randn(cout, device=DEVICE) * 0.3
        res = _cl(torch.randn(N, cout, H, W, device=DEVICE).to(dtype))
    y, mean, var, _, _ = _gated_conv(z, w, s, b, gate, stats, os_, ob, res, out_relu=not stats)

    def model(z, w, s, b, gate, os_, ob, res):  # timm's order: x * gate after the ReLU
        a = torch.relu(z * s.view(1, -1, 1, 1) + b.view(1, -1, 1, 1)) * gate
        y = F.conv2d(a.to(w.dtype), w)
        if os_ is None:
            return y
        return torch.relu(y * os_.view(1, -1, 1, 1) + ob.view(1, -1, 1, 1) + res)

    d = lambda t: None if t is None else t.double()  # noqa: E731
    ref = model(*(d(t) for t in (z, w, s, b, gate, os_, ob, res)))
    lowp = model(z, w, s.to(dtype), b.to(dtype), gate, d(os_).to(dtype) if os_ is not None else None,
                 d(ob).to(dtype) if ob is not None else None, res) if dtype != torch.float32 else None
    assert y.is_contiguous(memory_format=torch.channels_last)
    assert_close_to_ref(y, ref, dtype, lowp)
    if stats:
        torch.testing.assert_close(mean.double(), ref.mean(dim=(0, 2, 3)), atol=2e-3, rtol=2e-3)
        torch.testing.assert_close(var.double(), ref.var(dim=(0, 2, 3), unbiased=False), atol=2e-3, rtol=2e-3)


def test_gated_prologue_nan_propagates():
    """NaN in z: that pixel's conv3 output NaN (all channels: a 1x1 conv sums them); a NaN gate
    entry: its whole image, as x * gate followed by the convolution in PyTorch."""
    N, cin, cout, H, W = 3, 16, 24, 4, 4
    z = torch.randn(N, cin, H, W, device=DEVICE)
    z[0, 3, 1, 2] = float("nan")
    w = torch.randn(cout, cin, 1, 1, device=DEVICE) * 0.3
    s, b = torch.rand(cin, device=DEVICE) + 0.5, torch.randn(cin, device=DEVICE) * 0.5
    gate = torch.rand(N, cin, 1, 1, device=DEVICE)
    gate[2, 5] = float("nan")
    y = _gated_conv(_cl(z), w, s, b, gate, False, torch.ones(cout, device=DEVICE), torch.zeros(cout, device=DEVICE))[0]
    ref = F.conv2d(torch.relu(z * s.view(1, -1, 1, 1) + b.view(1, -1, 1, 1)) * gate, w)
    assert_same_specials(y, ref)
    ok = torch.isfinite(ref)
    torch.testing.assert_close(y[ok], ref[ok], atol=1e-4, rtol=1e-4)


# --------------------------------------------------------------------------------------
# the whole chain: conv2 -> bn2 -> ReLU -> SE -> conv3 -> bn3 -> ReLU, forward and backward
# --------------------------------------------------------------------------------------
N_, C1, C2, C3, RD, G, H_, W_ = 3, 24, 24, 32, 8, 6, 5, 3  # HW = 15, 4 channels per group


def _params(dtype):
    g = torch.Generator().manual_seed(1)
    r = lambda *shape, scale=1.0, shift=0.0: (torch.randn(*shape, generator=g) * scale + shift).to(DEVICE)  # noqa: E731
    p = dict(x=r(N_, C1, H_, W_), w2=r(C2, C1 // G, 3, 3, scale=0.3), g2=r(C2, scale=0.3, shift=1.0),
             b2=r(C2, scale=0.5), w3=r(C3, C2, 1, 1, scale=0.3), g3=r(C3, scale=0.3, shift=1.0), b3=r(C3, scale=0.5),
             f1w=r(RD, C2, scale=0.5), f1b=r(RD, scale=0.3), f2w=r(C2, RD, scale=0.5), f2b=r(C2, scale=0.3))
    stats = dict(rm2=r(C2, scale=0.5), rv2=r(C2).abs() + 0.5, rm3=r(C3, scale=0.5), rv3=r(C3).abs() + 0.5)
    p = {k: (_cl(v.to(dtype)) if v.dim() == 4 else v.to(dtype)).requires_grad_() for k, v in p.items()}
    return p, {k: v.to(dtype) for k, v in stats.items()}


def _excite(m, p):
    """timm's SEModule after its mean: fc1 -> ReLU -> fc2 -> sigmoid, on [N, C]."""
    return torch.sigmoid(F.linear(torch.relu(F.linear(m, p["f1w"], p["f1b"])), p["f2w"], p["f2b"]))


def _fold(g, b, rm, rv):
    s = g * torch.rsqrt(rv + EPS)
    return s, b - rm * s


def _ours(p, st, train):
    x = p["x"]
    if train:
        z, _, _, s, sh, m = ConvReluSqueezeFn.apply(x, p["w2"], None, 1, 1, G, None, None, False, True, p["g2"], p["b2"],
                                                    st["rm2"], st["rv2"], None, 0.1, EPS, None, None)
    else:
        s, sh = _fold(p["g2"], p["b2"], st["rm2"], st["rv2"])
        z, _, _, _, _, m = ConvReluSqueezeFn.apply(x, p["w2"], None, 1, 1, G, None, None, False, False, None, None,
                                                   None, None, None, None, EPS, s, sh)
    gate = _excite(m.to(z.dtype), p).view(N_, C2, 1, 1)
    if train:
        y, _, _, s3, sh3 = _gated_conv_train(z, p, s, sh, gate, st)
        return torch.relu(y * s3.view(1, -1, 1, 1).to(y.dtype) + sh3.view(1, -1, 1, 1).to(y.dtype))
    s3, sh3 = _fold(p["g3"], p["b3"], st["rm3"], st["rv3"])
    return _gated_conv(z, p["w3"], s, sh, gate, False, s3, sh3, None, True)[0]


def _gated_conv_train(z, p, s, sh, gate, st):
    return GatedConvFn.apply(z, p["w3"], None, 1, 0, 1, s, sh, True, None, None, None, False, True, p["g3"], p["b3"],
                             st["rm3"], st["rv3"], None, 0.1, EPS, None, gate)


def _eager(p, st, train):
    """timm's block in PyTorch ops: conv2 -> BN+ReLU -> x * se(x) -> conv3 -> BN -> ReLU."""
    z = F.conv2d(p["x"], p["w2"], padding=1, groups=G)
    a0 = torch.relu(F.batch_norm(z, st["rm2"], st["rv2"], p["g2"], p["b2"], train, 0.1, EPS))
    a = a0 * _excite(a0.mean(dim=(2, 3)), p).view(N_, C2, 1, 1)
    y = F.conv2d(a, p["w3"])
    return torch.relu(F.batch_norm(y, st["rm3"], st["rv3"], p["g3"], p["b3"], train, 0.1, EPS))


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32_kernels", "float64_reference"])
def test_chain_forward_backward(dtype, train):
    """Output, running statistics and the gradient of every input and parameter against float64
    autograd through PyTorch's own ops; fp32 runs the kernels, float64 our reference formulas."""
    p, st = _params(dtype)
    p64, st64 = _params(torch.float64)
    y = _ours(p, st, train)
    y64 = _eager(p64, st64, train)
    dy = torch.randn(y64.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64).to(DEVICE)
    names = list(p)
    grads = torch.autograd.grad((y * dy.to(dtype)).sum(), [p[k] for k in names])
    grads64 = torch.autograd.grad((y64 * dy).sum(), [p64[k] for k in names])
    tol = 1e-9 if dtype == torch.float64 else 1e-4
    torch.testing.assert_close(y.double(), y64, atol=tol, rtol=tol)
    for k, a, b in zip(names, grads, grads64):
        scale = max(1.0, b.abs().max().item())
        gtol = 1e-9 if dtype == torch.float64 else 1e-3
        torch.testing.assert_close(a.double(), b, atol=gtol * scale, rtol=gtol, msg=lambda msg, k=k: f"{k}: {msg}")
    for k in st:
        torch.testing.assert_close(st[k].double(), st64[k], atol=tol, rtol=tol, msg=lambda msg, k=k: f"{k}: {msg}")


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_chain_fp16(train):
    """fp16: the output within twice PyTorch's own fp16 error of float64 (+atol); gradients loosely."""
    p, st = _params(torch.float16)
    p64, st64 = _params(torch.float64)
    plp, stlp = _params(torch.float16)
    y = _ours(p, st, train)
    y64 = _eager(p64, st64, train)
    try:
        ylp = _eager(plp, stlp, train)
    except RuntimeError:  # an fp16 op PyTorch lacks on this device: its fp32 result rounded
        p32, st32 = _params(torch.float32)
        ylp = _eager(p32, st32, train).half()
    assert_close_to_ref(y, y64, torch.float16, ylp)
    dy = torch.randn(y64.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64).to(DEVICE)
    names = list(p)
    grads = torch.autograd.grad((y.float() * dy.float()).sum(), [p[k] for k in names])
    grads64 = torch.autograd.grad((y64 * dy).sum(), [p64[k] for k in names])
    for k, a, b in zip(names, grads, grads64):
        scale = max(1.0, b.abs().max().item())
        torch.testing.assert_close(a.double(), b, atol=5e-2 * scale, rtol=5e-2, msg=lambda msg, k=k: f"{k}: {msg}")


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_chain_bf16(train):
    """bf16 (the interpreter's, tests/interpreter_bf16.py): the output within twice PyTorch's own
    bf16 error of float64 (+atol); gradients within twice eager bf16's, by relative norm."""
    from test_se_blocks import assert_lowp_close_norm
    require_bf16()
    p, st = _params(torch.bfloat16)
    p64, st64 = _params(torch.float64)
    plp, stlp = _params(torch.bfloat16)
    y = _ours(p, st, train)
    y64 = _eager(p64, st64, train)
    ylp = _eager(plp, stlp, train)
    assert_close_to_ref(y, y64, torch.bfloat16, ylp)
    dy = torch.randn(y64.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64).to(DEVICE)
    names = list(p)
    grads = torch.autograd.grad((y.float() * dy.float()).sum(), [p[k] for k in names])
    grads_lp = torch.autograd.grad((ylp.float() * dy.float()).sum(), [plp[k] for k in names])
    grads64 = torch.autograd.grad((y64 * dy).sum(), [p64[k] for k in names])
    for k, a, b, c in zip(names, grads, grads_lp, grads64):
        assert_lowp_close_norm(a, b, c, what=k)


def test_chain_nan_propagates():
    """Eval: a NaN in conv2's input reaches m, then the gate of its whole image, then every
    output of that image, exactly where PyTorch puts NaN; the other images stay finite."""
    p, st = _params(torch.float32)
    with torch.no_grad():
        p["x"][1, 2, 2, 1] = float("nan")
        y = _ours(p, st, False)
        ref = _eager(p, st, False)
    assert_same_specials(y, ref)
    assert torch.isnan(y[1]).all() and torch.isfinite(y[[0, 2]]).all()
    torch.testing.assert_close(y[[0, 2]], ref[[0, 2]], atol=1e-4, rtol=1e-4)
