"""Conversion and model builders: same outputs, statistics, gradients and state_dict as eager."""
import copy

import pytest
import torch
from conftest import DEVICE
from helpers import assert_close_to_ref, randomize_bn
from torch import nn

import resnext
from resnext.blocks import FusedBottleneck
from resnext.modules import FusedSequential


def tiny_resnext(groups=4, width_per_group=4):
    """Two stages' worth of blocks (stride 1 and 2, with and without downsample), 16-wide stem."""
    model = resnext.ResNet([2, 1, 1, 1], num_classes=10, groups=groups, width_per_group=width_per_group,
                           base_channels=16).to(DEVICE)
    return randomize_bn(model)


def test_convert_replaces_blocks_and_keeps_state_dict():
    ref = tiny_resnext()
    fused = resnext.convert(copy.deepcopy(ref))
    blocks = [m for m in fused.modules() if isinstance(m, FusedBottleneck)]
    assert len(blocks) == 5
    assert isinstance(fused.conv1, nn.Conv2d)  # the 7x7 stem stays with PyTorch
    assert list(fused.state_dict()) == list(ref.state_dict())
    for k, v in ref.state_dict().items():
        assert torch.equal(fused.state_dict()[k], v), k
    # checkpoints load both ways
    fused.load_state_dict(ref.state_dict(), strict=True)
    ref.load_state_dict(fused.state_dict(), strict=True)


def test_convert_shares_parameters():
    model = tiny_resnext()
    before = [id(p) for p in model.parameters()]
    resnext.convert(model)
    assert [id(p) for p in model.parameters()] == before  # optimizers keep working


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_eval_matches_eager(channels_last):
    ref = tiny_resnext().eval()
    fused = resnext.convert(copy.deepcopy(ref)).eval()
    x = torch.randn(2, 3, 32, 32, device=DEVICE)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
        ref, fused = ref.to(memory_format=torch.channels_last), fused.to(memory_format=torch.channels_last)
    with torch.no_grad():
        assert_close_to_ref(fused(x), ref(x), torch.float32)


def test_block_output_memory_format_follows_input():
    block = FusedBottleneck(resnext.Bottleneck(16, 4, groups=4, base_width=16,
                                               downsample=nn.Sequential(nn.Conv2d(16, 16, 1, bias=False),
                                                                        nn.BatchNorm2d(16)))).eval()
    x = torch.randn(2, 16, 5, 5)
    assert block(x).is_contiguous()
    assert block(x.contiguous(memory_format=torch.channels_last)).is_contiguous(memory_format=torch.channels_last)


def test_training_run_matches_eager():
    """3 SGD steps with momentum on random data, fused fp32 vs eager fp32 vs eager float64.

    Three steps: the first from fresh buffers, the second with a momentum buffer and running
    statistics updated once, the third with both accumulated (later steps run the same code).
    24x24 images: 6x6 maps in layer1 (several row blocks), odd 3x3 maps with a stride-2 block
    after them, 1x1 maps in layer4 (the interpreter's cost is per program and element: 32x32
    images and 5 steps took 4x as long and covered nothing more).
    A tiny net with 1x1 maps in its last stage (BatchNorm over 4 values) turns chaotic at a
    large learning rate (at lr=0.01 eager fp32 itself drifts from float64 10x per step, and
    how far depends on the thread count), so lr=0.001 keeps it in the regime where rounding
    stays rounding.  The rule is the low-precision one: at every step the fused model's
    distance to the float64 run (losses, parameters, running statistics) is at most twice
    eager fp32's, plus a small atol.
    """
    ref32 = tiny_resnext().train()
    ref64 = copy.deepcopy(ref32).double()
    fused = resnext.convert(copy.deepcopy(ref32)).train()
    models = (fused, ref32, ref64)
    opts = [torch.optim.SGD(m.parameters(), lr=0.001, momentum=0.9) for m in models]
    g = torch.Generator().manual_seed(1)

    def dist(a, b):
        return (a.double() - b.double()).abs().max().item()

    for step in range(3):
        x = torch.randn(4, 3, 24, 24, generator=g).to(DEVICE)
        target = torch.randint(0, 10, (4,), generator=g).to(DEVICE)
        losses = []
        for model, opt in zip(models, opts):
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(x.to(next(model.parameters()).dtype)), target)
            loss.backward()
            opt.step()
            losses.append(loss.detach())
        # floor: 2e-5 of the loss (~5e-5 here); by step 5 (of an earlier 5-step run) a few fp32 roundings of the BN
        # finalize (in-kernel since the launch-economy change) move the loss by ~3e-5
        assert dist(losses[0], losses[2]) <= 2 * dist(losses[1], losses[2]) + 2e-5 * losses[2].abs().item(), \
            (step, losses)
        named = [dict(list(m.named_parameters()) + list(m.named_buffers())) for m in models]
        for name, t64 in named[2].items():
            ours, eager = dist(named[0][name], t64), dist(named[1][name], t64)
            assert ours <= 2 * eager + 1e-5 * max(1.0, t64.abs().max().item()), (step, name, ours, eager)


def test_sequential_runs_are_fused():
    seq = nn.Sequential(nn.Conv2d(8, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
                        nn.MaxPool2d(2),
                        nn.Conv2d(16, 16, 1, bias=False), nn.BatchNorm2d(16),  # no ReLU
                        nn.Conv2d(16, 16, 3, padding=2, dilation=2, bias=False), nn.BatchNorm2d(16))  # dilated
    randomize_bn(seq)
    model = nn.Module()
    model.features = copy.deepcopy(seq)
    resnext.convert(model)
    assert isinstance(model.features, FusedSequential)
    assert model.features.runs == {0: (3, True), 4: (2, False)}
    assert list(model.features.state_dict()) == list(seq.state_dict())
    x = torch.randn(2, 8, 8, 8)
    for mode in ("eval", "train"):
        getattr(seq, mode)(), getattr(model.features, mode)()
        assert_close_to_ref(model.features(x), seq(x).detach(), torch.float32)


def test_unfusable_blocks_are_left_alone():
    dilated = resnext.Bottleneck(16, 4, groups=4, base_width=16)
    dilated.conv2 = nn.Conv2d(16, 16, 3, padding=2, dilation=2, groups=4, bias=False)
    model = nn.Sequential(dilated)
    resnext.convert(model)
    assert type(model[0]) is resnext.Bottleneck


# ResNet-50, ResNeXt-50 32x4d and ResNet-101 as published by torchvision.
PARAM_COUNTS = {"resnet50": 25_557_032, "resnext50_32x4d": 25_028_904, "resnet101": 44_549_160}


@pytest.mark.parametrize("name", sorted(PARAM_COUNTS))
def test_model_builders_match_torchvision_sizes(name):
    model = getattr(resnext, name)(fused=True)
    assert sum(p.numel() for p in model.parameters()) == PARAM_COUNTS[name]
    assert all(isinstance(b, FusedBottleneck) for layer in (model.layer1, model.layer4) for b in layer)


def test_resnext101_32x4d_structure():
    model = resnext.resnext101_32x4d(fused=False)
    assert [len(getattr(model, f"layer{i}")) for i in range(1, 5)] == [3, 4, 23, 3]
    assert [getattr(model, f"layer{i}")[0].conv2.groups for i in range(1, 5)] == [32] * 4
    assert [getattr(model, f"layer{i}")[0].conv2.in_channels for i in range(1, 5)] == [128, 256, 512, 1024]


@pytest.mark.parametrize("name", ["resnet50", "resnext50_32x4d", "resnet101"])
def test_state_dict_keys_match_torchvision(name):
    tv = pytest.importorskip("torchvision")
    ours = getattr(resnext, name)(fused=True).state_dict()
    theirs = getattr(tv.models, name)().state_dict()
    assert list(ours) == list(theirs)
    assert all(ours[k].shape == theirs[k].shape for k in ours)
