"""The one-node training block (``kernels.bottleneck.BottleneckFn``, issue 13's host time):
the same launches as the per-stage path, so the same bits, in one autograd node.

Every case runs a converted bottleneck twice from the same state, once through
``BottleneckFn`` and once with it switched off (the per-stage Functions), for two training
steps, and compares outputs, input and parameter gradients, running statistics and the
output layout bit for bit.  test_training.py and test_real_models.py compare the training
path (now this one) against float64."""
import contextlib
import copy

import pytest
import torch
from torch import nn

import resnext
from kernels import bottleneck
from kernels.bottleneck import BottleneckFn
from resnext import blocks
from tests.conftest import DEVICE
from tests.helpers import TimmBottleneck, randomize_bn, require_bf16


def _block(downsample: bool, stride: int = 1, momentum=0.1):
    inplanes = 32 if not downsample else 16
    ds = nn.Sequential(nn.Conv2d(inplanes, 32, 1, stride, bias=False), nn.BatchNorm2d(32)) if downsample else None
    block = TimmBottleneck(inplanes, 8, stride=stride, downsample=ds, cardinality=4, base_width=16)
    for m in block.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = momentum
    return randomize_bn(block).to(DEVICE)


@contextlib.contextmanager
def _per_stage(monkeypatch):
    """The per-stage path: the one-node block switched off."""
    with monkeypatch.context() as m:
        m.setattr(blocks, "one_node_train_block", lambda *args: None)
        yield


def _counting(monkeypatch, owner, name):
    """A list that gets one entry per call of ``owner.name`` (``BottleneckFn.apply``; or
    ``bottleneck._backward_all_grads``: the backwards where every input wants its gradient)."""
    calls = []
    real = getattr(owner, name)

    def counted(*args):
        calls.append(1)
        return real(*args)
    monkeypatch.setattr(owner, name, counted)
    return calls


def _run(model, x, steps=2, autocast=None):
    """Two training steps (a fixed, non-uniform upstream gradient): the last output and the
    gradients, summed over the steps as a training loop without zero_grad would."""
    x = x.detach().clone().requires_grad_(x.requires_grad)
    for _ in range(steps):
        with torch.autocast(DEVICE, dtype=autocast) if autocast else contextlib.nullcontext():
            y = model(x)
        w = torch.linspace(-1, 1, y.numel(), device=y.device).view(y.shape)
        (y.float() * w).sum().backward()
    return dict(y=y.detach(), stride=y.stride(), dtype=y.dtype, x_grad=x.grad,
                grads={n: p.grad for n, p in model.named_parameters()},
                buffers={n: b.clone() for n, b in model.named_buffers()})


def _assert_same(a, b):
    assert a["stride"] == b["stride"] and a["dtype"] == b["dtype"]
    assert torch.equal(a["y"], b["y"])
    assert (a["x_grad"] is None) == (b["x_grad"] is None)
    if a["x_grad"] is not None:
        assert torch.equal(a["x_grad"], b["x_grad"])
    for n in a["grads"]:
        ga, gb = a["grads"][n], b["grads"][n]
        assert (ga is None) == (gb is None), n
        if ga is not None:
            assert not torch.isnan(ga).any(), n
            assert torch.equal(ga, gb), n
    for n in a["buffers"]:
        assert torch.equal(a["buffers"][n], b["buffers"][n]), n


@pytest.mark.parametrize("downsample,stride", [(False, 1), (True, 2), (True, 1)])
@pytest.mark.parametrize("channels_last", [True, False])
def test_one_node_block_matches_the_per_stage_path_bit_for_bit(monkeypatch, downsample, stride, channels_last):
    block = _block(downsample, stride)
    fused = resnext.convert(block)
    per_stage = copy.deepcopy(fused)
    x = torch.randn(2, block.conv1.in_channels, 6, 6, device=DEVICE)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    x.requires_grad_()
    calls = _counting(monkeypatch, BottleneckFn, "apply")
    fast = _counting(monkeypatch, bottleneck, "_backward_all_grads")
    ours = _run(fused, x)
    assert len(calls) == 2  # one node per step
    assert len(fast) == 2  # every gradient wanted: the direct backward
    with _per_stage(monkeypatch):
        ref = _run(per_stage, x)
    assert len(calls) == 2
    _assert_same(ours, ref)
    assert ours["buffers"]["bn1.num_batches_tracked"].item() == 2


@pytest.mark.parametrize("case", ["frozen_conv1_bn1", "input_without_grad", "momentum_none", "autocast_fp16",
                                  "half_model", "autocast_bf16"])
def test_one_node_block_partial_grads_momentum_none_and_autocast(monkeypatch, case):
    """Inputs that need no gradient get none (autograd's rule per stage), cumulative running
    averages (momentum=None), fp16 autocast (fp32 weights: the packs, gradients cast back), and
    a model.half() block (the shortcut's dx added in conv1's gradient launch, in fp16); and bf16
    autocast (through the interpreter's bf16 on the CPU; model.bfloat16(): test_ecosystem)."""
    if case == "autocast_bf16":
        require_bf16()
    block = _block(True, 2, momentum=None if case == "momentum_none" else 0.1)
    fused = resnext.convert(block)
    low = {"half_model": torch.float16}.get(case)
    amp = {"autocast_fp16": torch.float16, "autocast_bf16": torch.bfloat16}.get(case)
    if low is not None:
        fused.to(low)
    if case == "frozen_conv1_bn1":
        for p in (fused.conv1.weight, fused.bn1.weight, fused.bn1.bias):
            p.requires_grad_(False)
    per_stage = copy.deepcopy(fused)
    x = torch.randn(2, 16, 6, 6, device=DEVICE).to(memory_format=torch.channels_last)
    if low is not None:
        x = x.to(low)
    x.requires_grad_(case != "input_without_grad")
    calls = _counting(monkeypatch, BottleneckFn, "apply")
    fast = _counting(monkeypatch, bottleneck, "_backward_all_grads")
    ours = _run(fused, x, autocast=amp)
    assert len(calls) == 2
    # the direct backward where every input wants its gradient and x needs no cast, else the general one
    assert len(fast) == (2 if case in ("momentum_none", "half_model") else 0)
    with _per_stage(monkeypatch):
        ref = _run(per_stage, x, autocast=amp)
    _assert_same(ours, ref)
    if case == "frozen_conv1_bn1":
        assert ours["grads"]["conv1.weight"] is None and ours["grads"]["bn1.weight"] is None
        assert ours["grads"]["conv2.weight"] is not None
    if case == "input_without_grad":
        assert ours["x_grad"] is None
    if amp is not None:
        assert ours["dtype"] == amp and ours["grads"]["conv1.weight"].dtype == torch.float32
    if low is not None:
        assert ours["dtype"] == ours["x_grad"].dtype == low


def test_per_stage_path_where_the_one_node_block_does_not_apply(monkeypatch):
    """Eval mode, a BN in eval inside a training block, no grad, float64: the per-stage path
    (or the eval one), never BottleneckFn."""
    fused = resnext.convert(_block(True, 2))
    x = torch.randn(2, 16, 6, 6, device=DEVICE, requires_grad=True)
    calls = _counting(monkeypatch, BottleneckFn, "apply")
    fused.train()
    fused.bn2.eval()
    fused(x).sum().backward()
    fused.eval()
    fused(x).sum().backward()
    fused.train()
    with torch.no_grad():
        fused(x)
    fused.double()(x.double()).sum().backward()
    assert calls == []


def test_one_node_block_raises_the_per_stage_errors():
    """Bad input still gets the per-stage path's clear errors (ValueError / TypeError)."""
    fused = resnext.convert(_block(False)).train()
    with pytest.raises(ValueError, match="channel"):
        fused(torch.randn(2, 16, 6, 6, device=DEVICE, requires_grad=True))
    with pytest.raises(TypeError, match="dtype"):
        fused(torch.randn(2, 32, 6, 6, device=DEVICE, dtype=torch.float16, requires_grad=True))
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        fused(torch.randn(1, 32, 1, 1, device=DEVICE, requires_grad=True))
