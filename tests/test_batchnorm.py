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
