"""BatchNorm semantics: statistics merge, bn_act, and nn.BatchNorm2d's running-stat rules."""
import copy

import pytest
import torch
from conftest import DEVICE
from helpers import assert_close_to_ref, randomize_bn
from torch import nn

import kernels
import resnext
from kernels.reference import bn_act_reference


@pytest.mark.parametrize("M, C, rows_per_block", [(100, 24, 16), (64, 16, 64), (1000, 3, 32), (37, 70, 8)],
                         ids=["ragged-last-block", "one-block", "many-blocks", "channels-over-one-block"])
def test_merge_stats(M, C, rows_per_block):
    """Per-block (mean, M2) partials merge into the exact mean and biased variance."""
    z = torch.randn(M, C, dtype=torch.float64, device=DEVICE) * 3 + 50
    T = -(-M // rows_per_block)
    part_mean = torch.empty(T, C, dtype=torch.float64, device=DEVICE)
    part_m2 = torch.empty_like(part_mean)
    for t in range(T):
        blk = z[t * rows_per_block:(t + 1) * rows_per_block]
        part_mean[t] = blk.mean(0)
        part_m2[t] = ((blk - blk.mean(0)) ** 2).sum(0)
    mean, var = kernels.merge_stats(part_mean.float(), part_m2.float(), M, rows_per_block)
    torch.testing.assert_close(mean.double(), z.mean(0), rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(var.double(), z.var(0, unbiased=False), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("residual, res_affine, relu", [(False, False, True), (True, False, True),
                                                       (True, True, True), (True, True, False)],
                         ids=["bn-relu", "bn-add-relu", "bn-add-bn-relu", "bn-add-bn"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_bn_act(residual, res_affine, relu, channels_last):
    z = torch.randn(2, 20, 5, 7, device=DEVICE)
    if channels_last:
        z = z.contiguous(memory_format=torch.channels_last)
    s, b = torch.rand(20, device=DEVICE) + 0.5, torch.randn(20, device=DEVICE)
    r = torch.randn_like(z) if residual else None
    rs, rb = (torch.rand(20, device=DEVICE) + 0.5, torch.randn(20, device=DEVICE)) if res_affine else (None, None)
    y = kernels.bn_act(z, s, b, r, rs, rb, relu=relu)
    d = lambda t: None if t is None else t.double()  # noqa: E731
    ref = bn_act_reference(z.double(), s.double(), b.double(), d(r), d(rs), d(rb), relu)
    assert_close_to_ref(y, ref, torch.float32)


BN_VARIANTS = [
    pytest.param(dict(), id="default"),
    pytest.param(dict(momentum=None), id="momentum-None-cumulative"),
    pytest.param(dict(momentum=0.3, eps=1e-3), id="momentum-eps"),
    pytest.param(dict(track_running_stats=False), id="no-running-stats"),
    pytest.param(dict(affine=False), id="no-affine"),
]


@pytest.mark.parametrize("bn_kwargs", BN_VARIANTS)
@pytest.mark.parametrize("ksize, groups", [(3, 4), (1, 1)], ids=["grouped3x3", "1x1"])
def test_conv_bn_relu_module_train_then_eval(bn_kwargs, ksize, groups):
    """ConvBNAct matches Conv2d -> BatchNorm2d -> ReLU over 3 train steps and in eval:
    outputs, gradients, running_mean/var (unbiased), num_batches_tracked."""
    conv = nn.Conv2d(16, 16, ksize, padding=ksize // 2, groups=groups, bias=False).to(DEVICE)
    bn = nn.BatchNorm2d(16, **bn_kwargs).to(DEVICE)
    randomize_bn(bn)
    ref = nn.Sequential(conv, bn, nn.ReLU())
    fused = resnext.ConvBNAct.from_modules(copy.deepcopy(conv), copy.deepcopy(bn), relu=True)
    for step in range(3):
        x = torch.randn(2, 16, 5, 6, device=DEVICE) + step
        y, yr = fused(x), ref(x)
        assert_close_to_ref(y, yr.detach(), torch.float32)
        (y * torch.arange(16.0).view(1, -1, 1, 1)).sum().backward()
        (yr * torch.arange(16.0).view(1, -1, 1, 1)).sum().backward()
    for (name, p), (_, pr) in zip(fused.named_parameters(), ref.named_parameters()):
        # BN's backward cancels large terms: fp32 error scales with the largest gradient
        torch.testing.assert_close(p.grad, pr.grad, atol=2e-5 * pr.grad.abs().max().item(), rtol=1e-4)
    for (name, b), (_, br) in zip(fused.named_buffers(), ref.named_buffers()):
        torch.testing.assert_close(b, br, atol=1e-5, rtol=1e-5, msg=name)
    fused.eval(), ref.eval()
    x = torch.randn(2, 16, 5, 6, device=DEVICE)
    assert_close_to_ref(fused(x), ref(x).detach(), torch.float32)


def test_frozen_bn_gradients():
    """model.train() with BN in eval (fine-tuning): folded path, correct conv and gamma/beta grads."""
    conv = nn.Conv2d(8, 8, 3, padding=1, groups=2, bias=False)
    bn = randomize_bn(nn.BatchNorm2d(8)).eval()
    ref = nn.Sequential(conv, bn, nn.ReLU())
    fused = resnext.ConvBNAct.from_modules(copy.deepcopy(conv), copy.deepcopy(bn))
    x = torch.randn(2, 8, 5, 5)
    fused(x).square().sum().backward()
    ref(x).square().sum().backward()
    for (name, p), (_, pr) in zip(fused.named_parameters(), ref.named_parameters()):
        torch.testing.assert_close(p.grad, pr.grad, atol=1e-4, rtol=1e-4)
    assert torch.equal(fused.bn.running_mean, ref[1].running_mean)  # untouched in eval


def test_one_value_per_channel_raises_like_pytorch():
    m = resnext.ConvBNAct(4, 4, 1).train()
    with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
        m(torch.randn(1, 4, 1, 1))


@pytest.mark.parametrize("bn_kwargs", [dict(momentum=0.1), dict(momentum=None), dict(affine=False),
                                       dict(track_running_stats=False)],
                         ids=["momentum", "momentum-None", "no-affine", "no-running-stats"])
def test_finalize_in_the_convolution_launch(bn_kwargs, monkeypatch):
    """One rank: the convolution's last row block of each channel block merges the statistics
    partials (FINALIZE) and writes what a bn_finalize launch writes: mean, var, scale, shift and
    the running statistics (as nn.BatchNorm2d, to float64), in the same launch.  Small row blocks
    and channel blocks: many partial rows per channel block, merged in several chunks."""
    from benchmarks.device_ops import count_device_ops
    import sys
    from kernels import _runtime
    cba = sys.modules["kernels.conv_bn_act"]  # (the package's conv_bn_act is the function)
    config = cba.conv_config

    def small(*args, **kw):
        cfg = config(*args, **kw)
        cfg.update(BLOCK_M=16, BLOCK_N=16)
        return cfg
    monkeypatch.setattr(cba, "conv_config", small)
    monkeypatch.setattr(cba, "finalize_block_t", lambda block_n: 8)  # 3 x 7 x 9 rows / 16: 12 partial rows, 2 chunks
    gen = torch.Generator().manual_seed(5)
    x = (torch.randn(3, 8, 7, 9, generator=gen) + 2.0).to(DEVICE).contiguous(memory_format=torch.channels_last)
    w = (torch.randn(40, 2, 3, 3, generator=gen) / 4).to(DEVICE)
    bn = nn.BatchNorm2d(40, **bn_kwargs).to(DEVICE)
    randomize_bn(bn)
    bn.train()
    if bn.running_mean is not None:
        bn.num_batches_tracked.fill_(3)
    ref_bn = copy.deepcopy(bn).double()
    before = None if bn.running_mean is None else [t.clone() for t in (bn.running_mean, bn.running_var)]

    def run(b):
        return cba.conv_bn_act_forward(x, w, None, 1, 1, 4, None, None, False, None, None, None, False, True,
                                       b.weight, b.bias, b.running_mean, b.running_var,
                                       b.num_batches_tracked if b.running_mean is not None else None, b.momentum,
                                       b.eps)
    y, mean, var, scale, shift = run(bn)
    z64 = torch.nn.functional.conv2d(x.double(), w.double(), padding=1, groups=4)
    assert_close_to_ref(y, z64, torch.float32)
    zq = y.double()  # the statistics are those of z as stored
    torch.testing.assert_close(mean.double(), zq.mean(dim=(0, 2, 3)), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(var.double(), zq.var(dim=(0, 2, 3), unbiased=False), rtol=1e-5, atol=1e-6)
    ref_y = ref_bn(zq)  # nn.BatchNorm2d in float64: the running statistics' update
    inv = (var.double() + bn.eps).rsqrt()
    g = bn.weight.double() if bn.weight is not None else 1.0
    torch.testing.assert_close(scale.double(), g * inv, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close((zq * scale.double().view(1, -1, 1, 1) + shift.double().view(1, -1, 1, 1)), ref_y,
                               rtol=1e-5, atol=1e-5)
    if bn.running_mean is not None:
        torch.testing.assert_close(bn.running_mean.double(), ref_bn.running_mean, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(bn.running_var.double(), ref_bn.running_var, rtol=1e-6, atol=1e-6)
        assert int(bn.num_batches_tracked) == int(ref_bn.num_batches_tracked) == 4
        assert not torch.equal(bn.running_mean, before[0])
    assert all(int(buf.abs().sum()) == 0 for key, buf in _runtime._PER_STREAM.items() if key[0][0] == "counters")  # left zero
    # one launch: the convolution's (momentum=None also counts num_batches_tracked on the host, as before)
    ops = count_device_ops(lambda: run(copy.deepcopy(bn)))
    assert ops.triton == 1 and set(ops.by_name) - {"aten::fill_", "aten::add_", "aten::copy_", "aten::clone"} \
        == {"triton::conv_bn_act_fwd_kernel"}, ops
