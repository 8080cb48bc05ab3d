"""Training-specific guarantees: saved activations and determinism of the backward pass."""
import copy

import torch
from helpers import randomize_bn
from torch import nn

import resnext
from benchmarks.workloads import saved_bytes
from resnext.blocks import FusedBottleneck


def _block(stride=2):
    ds = nn.Sequential(nn.Conv2d(32, 64, 1, stride, bias=False), nn.BatchNorm2d(64))
    return randomize_bn(resnext.Bottleneck(32, 16, stride, ds, groups=4, base_width=16)).train()


def test_saved_activations_no_more_than_eager():
    eager = _block()
    fused = FusedBottleneck(copy.deepcopy(eager))
    x = torch.randn(2, 32, 8, 8).contiguous(memory_format=torch.channels_last).requires_grad_()
    ours, theirs = saved_bytes(fused, x), saved_bytes(eager, x)  # activations (cached weight copies left out)
    print(f"saved for backward: fused {ours} B, eager {theirs} B")
    assert ours <= theirs, (ours, theirs)


def test_backward_is_deterministic():
    """Weight and BN-parameter gradients are bit-identical across runs (no float atomics)."""
    torch.use_deterministic_algorithms(True)
    try:
        grads = []
        for _ in range(2):
            torch.manual_seed(0)  # the same weights both times
            block = FusedBottleneck(_block())
            x = torch.randn(2, 32, 8, 8, generator=torch.Generator().manual_seed(3))
            block(x).square().sum().backward()
            grads.append([p.grad.clone() for p in block.parameters()])
        assert all(torch.equal(a, b) for a, b in zip(*grads))
    finally:
        torch.use_deterministic_algorithms(False)
