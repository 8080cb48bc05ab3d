"""What is cached between calls (packed weights, eval-mode BN folded into scale/shift) and
that every change to the source tensors reaches the result: optimizer steps, load_state_dict,
in-place edits, .to()/.half()."""
import contextlib
import copy
import importlib

import pytest
import torch
from conftest import DEVICE
from helpers import assert_close_to_ref, randomize_bn
from torch import nn

import resnext

kweights = importlib.import_module("kernels.weights")
kbn = importlib.import_module("kernels.batchnorm")


def _pair():
    ds = nn.Sequential(nn.Conv2d(16, 32, 1, 2, bias=False), nn.BatchNorm2d(32))
    eager = randomize_bn(resnext.Bottleneck(16, 8, 2, ds, groups=4, base_width=16)).to(DEVICE).eval()
    return eager, resnext.convert(copy.deepcopy(eager))


def _x(dtype=torch.float32):
    return torch.randn(2, 16, 6, 6, device=DEVICE, dtype=dtype).contiguous(memory_format=torch.channels_last)


def _same(fused, eager, x, dtype=torch.float32, cast=False):
    """``cast``: under fp16 autocast (fp32 weights cast for the kernels: the packs)."""
    with torch.no_grad():
        if not cast:
            assert_close_to_ref(fused(x), eager(x), dtype)
            return
        with _autocast(True):
            ours, lowp = fused(x), eager(x)
        ref = copy.deepcopy(eager).double()(x.double())
        assert_close_to_ref(ours, ref, torch.float16, torch_lowp=lowp)


def _autocast(on):
    """fp16 autocast: the weights (fp32) need a cast, so the kernels read a cached pack; in
    plain fp32 they read the weights as stored and nothing is packed."""
    return torch.autocast(DEVICE, dtype=torch.float16) if on else contextlib.nullcontext()


def _counting(monkeypatch):
    calls = {"pack": 0, "fold": 0}
    real_pack = kweights.pack_weight

    def pack(*a, **k):
        calls["pack"] += 1
        return real_pack(*a, **k)

    monkeypatch.setattr(kweights, "pack_weight", pack)
    real_fold = kbn._fold

    def fold(*a, **k):
        calls["fold"] += 1
        return real_fold(*a, **k)

    monkeypatch.setattr(kbn, "_fold", fold)
    return calls


@pytest.mark.parametrize("cast", [False, True], ids=["fp32", "autocast_fp16"])
def test_eval_caches_hit_and_follow_every_change(monkeypatch, cast):
    eager, fused = _pair()
    x = _x()
    kweights._PACKED.clear(), kbn._FOLDED.clear()
    calls = _counting(monkeypatch)
    packs = 4 if cast else 0  # fp32: the kernels read the weights as stored
    _same(fused, eager, x, cast=cast)
    assert calls == {"pack": packs, "fold": 4}, calls  # 4 convolutions, 4 BatchNorms
    _same(fused, eager, x, cast=cast)
    assert calls == {"pack": packs, "fold": 4}, f"a second call recomputed: {calls}"

    # an optimizer step on the weights (and BN affine parameters)
    for m in (eager, fused):
        opt = torch.optim.SGD(m.parameters(), lr=0.5)
        with _autocast(cast):
            m(x).square().sum().backward()
        opt.step()
    _same(fused, eager, x, cast=cast)
    # packs: once more after the step; folds: 4 uncached in the grad-mode forward (gamma and
    # beta need their gradient), then 4 after the step
    assert calls["pack"] == 2 * packs and calls["fold"] == 12, calls

    # in-place edits of the running statistics (an EMA model, a calibration pass)
    with torch.no_grad():
        for m in (eager, fused):
            m.bn2.running_var.mul_(3.0)
            m.bn1.running_mean.add_(0.5)
    _same(fused, eager, x, cast=cast)

    # load_state_dict from a third model
    other = randomize_bn(_pair()[0])
    eager.load_state_dict(other.state_dict()), fused.load_state_dict(other.state_dict())
    _same(fused, eager, x, cast=cast)

    # a training step of BN (running statistics move), then eval again
    eager.train(), fused.train()
    for m in (eager, fused):
        with _autocast(cast):
            m(x)
    eager.eval(), fused.eval()
    _same(fused, eager, x, cast=cast)


def test_cache_follows_dtype_and_device_changes():
    eager, fused = _pair()
    x = _x()
    _same(fused, eager, x)
    eager64 = copy.deepcopy(eager).double()
    eager.half(), fused.half()
    with torch.no_grad():
        ours, lowp, ref = fused(x.half()), eager(x.half()), eager64(x.double())
    assert ours.dtype == torch.float16
    assert_close_to_ref(ours, ref, torch.float16, torch_lowp=lowp)
    eager.float()
    fused.float()
    _same(fused, eager, x)
    fused.to(torch.float64), eager.to(torch.float64)
    _same(fused, eager, x.double(), torch.float64)


@pytest.mark.parametrize("cast", [False, True], ids=["fp32", "autocast_fp16"])
def test_training_packs_each_weight_once_per_step(monkeypatch, cast):
    """Training under autocast: one pack (cast + layout, one copy) per weight per step,
    shared by the forward and the data gradient; none when the weight did not change.
    fp32: none at all (the weights are read as stored)."""
    eager, fused = _pair()
    fused.train()
    x = _x().requires_grad_()
    calls = _counting(monkeypatch)
    opt = torch.optim.SGD(fused.parameters(), lr=0.1)
    packs = 4 if cast else 0

    def step():
        with _autocast(cast):
            y = fused(x)
        y.float().sum().backward()
    step()
    assert calls["pack"] == packs, calls
    opt.step()
    step()
    assert calls["pack"] == 2 * packs, calls
    step()  # no step in between: the weights did not change
    assert calls["pack"] == 2 * packs, calls
    assert calls["fold"] == 0, "train mode folds nothing on the host"


def test_cache_is_not_used_when_gamma_needs_a_gradient():
    """Frozen BN (eval) with trainable gamma/beta in grad mode: the fold must be recomputed so
    its gradient reaches gamma and beta on every step."""
    eager, fused = _pair()
    x = _x()
    for _ in range(2):
        for m in (eager, fused):
            m.zero_grad()
            m(x).square().sum().backward()
        torch.testing.assert_close(fused.bn2.weight.grad, eager.bn2.weight.grad, rtol=1e-4, atol=1e-4)


def test_entries_go_with_their_tensors():
    """The cache holds its sources weakly: dropping a model drops its entries."""
    import gc
    _, fused = _pair()
    with torch.no_grad():
        fused(_x())
    before = len(kweights._PACKED._entries) + len(kbn._FOLDED._entries)
    del fused
    gc.collect()
    assert len(kweights._PACKED._entries) + len(kbn._FOLDED._entries) <= before - 4


def test_a_replaced_weight_is_packed_again_even_at_a_reused_address(monkeypatch):
    """.half() then .float() gives each weight new storage at version 0; had the old storage
    been freed, the allocator could hand its address back and the stale pack would match.
    The cache holds its sources' storages, so a round trip always packs again."""
    eager, fused = _pair()
    x = _x()
    _same(fused, eager, x, cast=True)  # autocast: packs are made and cached
    calls = _counting(monkeypatch)
    fused.half(), eager.half()
    fused.float(), eager.float()
    _same(fused, eager, x, cast=True)
    assert calls["pack"] == 4, calls
