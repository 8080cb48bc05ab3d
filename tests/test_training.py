"""Training-specific guarantees: saved activations and determinism of the backward pass."""
import importlib
import copy

import torch
from helpers import randomize_bn
from torch import nn

import resnext

kconv = importlib.import_module("kernels.conv_bn_act")  # the package's name is the function
kbn = importlib.import_module("kernels.batchnorm")
from resnext.blocks import FusedBottleneck


def _block(stride=2):
    ds = nn.Sequential(nn.Conv2d(32, 64, 1, stride, bias=False), nn.BatchNorm2d(64))
    return randomize_bn(resnext.Bottleneck(32, 16, stride, ds, groups=4, base_width=16)).train()


def _saved_bytes(model, x):
    """Bytes of distinct storages autograd keeps for backward (inputs and parameters excluded)."""
    storages = {}
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in params and st.data_ptr() != x.untyped_storage().data_ptr():
            storages[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(x).sum().backward()
    # The fused path keeps one packed copy of each weight (its cache, shared by the forward
    # and the data gradient): weight memory, not activations.
    for entry in kconv._PACKED._entries.values():
        storages.pop(entry[2].untyped_storage().data_ptr(), None)
    return sum(storages.values())


def test_saved_activations_no_more_than_eager():
    eager = _block()
    fused = FusedBottleneck(copy.deepcopy(eager))
    x = torch.randn(2, 32, 8, 8).contiguous(memory_format=torch.channels_last).requires_grad_()
    ours, theirs = _saved_bytes(fused, x), _saved_bytes(eager, x)
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
