"""timm's RegNet Bottleneck with drop_path (stochastic depth), without timm (issue 10, item 3).

Stand-ins of timm's classes with their forwards (timm/models/regnet.py Bottleneck, timm/layers
conv_bn_act.py ConvNormAct, norm_act.py BatchNormAct2d, drop.py DropPath, squeeze_excite.py
SEModule), installed under timm's module names for the test: the fused block recognises timm's
classes by their forward functions.  In training, with the same seed before both, the fused block's
output, gradients and running statistics are the unconverted block's (the drop_path mask drawn at
timm's point: after conv3, before the shortcut).  Real timm: tests/test_real_models.py.
"""
import copy
import sys
import types

import pytest
import torch
from torch import nn

import resnext
from test_ecosystem import DEVICE, randomize_bn
from test_se_blocks import DropPath


class BatchNormAct2d(nn.BatchNorm2d):
    """timm's BatchNormAct2d: batch norm, then drop (Identity), then act."""

    def __init__(self, c, apply_act=True):
        super().__init__(c)
        self.drop = nn.Identity()
        self.act = nn.ReLU(inplace=True) if apply_act else nn.Identity()

    def forward(self, x):
        return self.act(self.drop(super().forward(x)))


class FrozenBatchNormAct2d(nn.Module):  # named by resnext.norms; not used here
    pass


class ConvNormAct(nn.Module):
    def __init__(self, cin, cout, k, stride=1, groups=1, apply_act=True):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False)
        self.bn = BatchNormAct2d(cout, apply_act)

    def forward(self, x):
        x = self.conv(x)
        x = self.bn(x)
        aa = getattr(self, "aa", None)
        return aa(x) if aa is not None else x


class SEModule(nn.Module):
    def __init__(self, c, rd):
        super().__init__()
        self.add_maxpool = False
        self.fc1, self.bn, self.act = nn.Conv2d(c, rd, 1), nn.Identity(), nn.ReLU(inplace=True)
        self.fc2, self.gate = nn.Conv2d(rd, c, 1), nn.Sigmoid()

    def forward(self, x):
        s = x.mean((2, 3), keepdim=True)
        return x * self.gate(self.fc2(self.act(self.bn(self.fc1(s)))))


class Bottleneck(nn.Module):
    """timm.models.regnet.Bottleneck's children and forward."""

    def __init__(self, cin, cout, stride=1, group_size=4, se=False, shortcut="conv", linear_out=False, dp=0.5):
        super().__init__()
        self.conv1 = ConvNormAct(cin, cout, 1)
        self.conv2 = ConvNormAct(cout, cout, 3, stride, groups=cout // group_size)
        self.se = SEModule(cout, cin // 4) if se else nn.Identity()
        self.conv3 = ConvNormAct(cout, cout, 1, apply_act=False)
        self.act3 = nn.Identity() if linear_out else nn.ReLU()
        self.downsample = {"conv": lambda: ConvNormAct(cin, cout, 1, stride, apply_act=False),
                           "identity": nn.Identity, "none": lambda: None}[shortcut]()
        self.drop_path = DropPath(dp) if dp > 0 else nn.Identity()

    def forward(self, x):
        shortcut = x
        x = self.conv1(x)
        x = self.conv2(x)
        x = self.se(x)
        x = self.conv3(x)
        if self.downsample is not None:
            x = self.drop_path(x) + self.downsample(shortcut)
        x = self.act3(x)
        return x


@pytest.fixture
def fake_timm(monkeypatch):
    """timm's module names mapped to the stand-ins (only for this test)."""
    for name, attrs in {"timm.models.regnet": dict(Bottleneck=Bottleneck),
                        "timm.layers.conv_bn_act": dict(ConvNormAct=ConvNormAct),
                        "timm.layers.norm_act": dict(BatchNormAct2d=BatchNormAct2d,
                                                     FrozenBatchNormAct2d=FrozenBatchNormAct2d)}.items():
        if name in sys.modules:
            pytest.skip("real timm is imported: tests/test_real_models.py covers it")
        monkeypatch.setitem(sys.modules, name, types.SimpleNamespace(**attrs))


def max_err(a, b) -> float:
    return (a.detach().double() - b.detach().double()).abs().max().item()


# (in, out, stride, se, shortcut, linear_out): shortcut conv with its train-mode BN joining the
# final pass, identity, none (drop_path not applied at all); RegNetY's SE after conv2.
CASES = {
    "x_conv": (8, 16, 2, False, "conv", False),
    "y_conv": (8, 16, 2, True, "conv", False),
    "y_identity_linear": (16, 16, 1, True, "identity", True),
    "x_none": (8, 16, 2, False, "none", False),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_regnet_drop_path_block(case, fake_timm):
    cin, cout, stride, se, shortcut, linear = CASES[case]
    torch.manual_seed(0)
    ref = randomize_bn(Bottleneck(cin, cout, stride, se=se, shortcut=shortcut, linear_out=linear)).to(DEVICE)
    ours = resnext.convert(nn.Sequential(copy.deepcopy(ref)))[0]
    assert type(ours) is resnext.FusedRegNetBottleneck
    ref64, ours64 = copy.deepcopy(ref).double(), copy.deepcopy(ours).double()
    x = torch.randn(8, cin, 6, 6, device=DEVICE)
    models, dts = (ours, ref, ours64, ref64), (torch.float32, torch.float32, torch.float64, torch.float64)

    with torch.no_grad():  # eval: drop_path is the identity
        ys = [m.eval()(x.to(dt)) for m, dt in zip(models, dts)]
    assert max_err(ys[0], ys[3]) <= 1e-4 * ys[3].abs().max().item()
    assert max_err(ys[2], ys[3]) <= 1e-10 * ys[3].abs().max().item()

    xs = [x.to(dt).clone().requires_grad_() for dt in dts]
    ys = []
    for m, xi in zip(models, xs):
        torch.manual_seed(7)  # the same mask (8 images, keep 0.5: some dropped)
        ys.append(m.train()(xi))
    w = torch.randn(ys[3].shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64).to(DEVICE)
    for y in ys:
        (y * w.to(y.dtype)).sum().backward()
    if shortcut != "none":  # the mask was drawn and dropped some images: not the eval-like output
        torch.manual_seed(7)
        mask = torch.empty(8, 1, 1, 1, dtype=torch.float64).bernoulli_(0.5)
        assert 0 < mask.sum() < 8

    def close(a, b64, tol, what):
        assert max_err(a, b64) <= tol * b64.abs().max().item() + 1e-12, what

    for i, tol in ((0, 1e-4), (2, 1e-10)):  # fp32 through the interpreter; float64 on the reference path
        close(ys[i], ys[3], tol, "train output")
        close(xs[i].grad, xs[3].grad, 20 * tol, "input grad")
        p64 = dict(models[3].named_parameters())
        for name, p in models[i].named_parameters():
            assert (p.grad is None) == (p64[name].grad is None), name
            if p.grad is not None:
                close(p.grad, p64[name].grad, 20 * tol, f"grad of {name}")
        b64 = dict(models[3].named_buffers())
        for name, b in models[i].named_buffers():
            if b.is_floating_point():
                close(b, b64[name], tol, name)
            else:
                assert torch.equal(b, b64[name]), name
