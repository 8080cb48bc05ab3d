"""Launch economy (issue 13): the device-operation counter, and the counts of a fused
bottleneck against its eager twin in the steady state.

The counter (benchmarks/device_ops.py) walks the torch.profiler event tree of one call:
a Triton launch counts 1 (its subtree, the interpreter's host copies, is skipped), an aten
op that launches device work counts 1 (not descended), views/allocations count 0,
composites (``to``, ``contiguous``, ``reshape``...) count their children, and anything
else (custom ops, autograd nodes) is descended into.

Every test here is ``no_poison``: the NaN-filling ``torch.empty`` of conftest.py would add
a ``fill_`` to every allocation made from Python.
"""
import copy

import pytest
import torch
import triton
import triton.language as tl
from helpers import randomize_bn
from torch import nn

import resnext
from benchmarks import workloads
from benchmarks.device_ops import COMPOSITE, NO_DEVICE_WORK, count_device_ops, host_only, launches

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.no_poison


@triton.jit
def _add_one_kernel(x_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    tl.store(x_ptr + offs, tl.load(x_ptr + offs, mask=mask) + 1, mask=mask)


@torch.library.custom_op("devops_test::two_adds", mutates_args=())
def _two_adds(x: torch.Tensor) -> torch.Tensor:
    return (x + 1) + 2


@_two_adds.register_fake
def _(x):
    return torch.empty_like(x)


# ----------------------------------------------------------------------------------------
# The counter itself
# ----------------------------------------------------------------------------------------
def test_counts_aten_ops_views_and_composites():
    x = torch.randn(4, 8, device=DEVICE)
    one = count_device_ops(lambda: x + 1)
    assert (one.total, one.aten, one.triton) == (1, 1, 0) and one.by_name == {"aten::add": 1}
    assert count_device_ops(lambda: x.contiguous()).total == 0  # already contiguous: no child
    assert count_device_ops(lambda: x.view(-1)).total == 0
    assert count_device_ops(lambda: x.t().unsqueeze(0).expand(2, 8, 4)).total == 0
    assert count_device_ops(lambda: x.to(x.dtype)).total == 0
    assert count_device_ops(lambda: torch.empty(3, device=DEVICE)).total == 0
    # composites count their children: a transposed tensor's contiguous() is a copy
    assert count_device_ops(lambda: x.t().contiguous()).total == 1
    assert count_device_ops(lambda: x.t().reshape(-1)).total == 1
    assert count_device_ops(lambda: x.to(torch.float64)).by_name == {"aten::_to_copy": 1}
    assert count_device_ops(lambda: x.clone()).total == 1
    assert count_device_ops(lambda: torch.zeros(3, device=DEVICE)).total == 1
    assert not NO_DEVICE_WORK & COMPOSITE and {"_to_copy", "clone"}.isdisjoint(NO_DEVICE_WORK | COMPOSITE)


def test_counts_ops_inside_custom_ops_and_backward():
    """A custom op's body is descended into (a TorchDispatchMode would miss these two)."""
    x = torch.randn(8, device=DEVICE)
    ops = count_device_ops(lambda: torch.ops.devops_test.two_adds(x))
    assert ops.total == 2 and ops.by_name == {"aten::add": 2}
    w = torch.randn(8, device=DEVICE, requires_grad=True)
    back = count_device_ops(lambda: (w * 3).sum().backward())
    # forward mul + sum, the gradient seed (ones_like), MulBackward's mul; SumBackward only expands
    assert back.by_name == {"aten::mul": 2, "aten::sum": 1, "aten::ones_like": 1}, back


def test_a_triton_launch_counts_once():
    """One launch is one operation, whatever the interpreter does on the host inside it."""
    x = torch.zeros(100, device=DEVICE)
    ops = count_device_ops(lambda: _add_one_kernel[(4,)](x, 100, BLOCK=32))
    assert (ops.total, ops.triton, ops.aten) == (1, 1, 0) and ops.by_name == {"triton::_add_one_kernel": 1}
    assert torch.equal(x, torch.ones(100, device=DEVICE))
    # the patches are class-level and only while counting
    from triton.runtime.jit import JITFunction
    before = JITFunction.run
    with launches("count"):
        assert JITFunction.run is not before
    assert JITFunction.run is before
    # no-op launches are counted and run nothing
    ops = count_device_ops(lambda: _add_one_kernel[(4,)](x, 100, BLOCK=32), noop_launches=True)
    assert ops.triton == 1 and torch.equal(x, torch.ones(100, device=DEVICE))
    text = str(ops)
    assert "1 Triton launches" in text and "triton::_add_one_kernel" in text


@pytest.mark.skipif(DEVICE == "cuda", reason="the interpreter's host copies exist only under TRITON_INTERPRET")
def test_interpreter_host_copies_are_not_counted():
    from torch.profiler import ProfilerActivity, profile
    x = torch.zeros(100)
    with launches("count"), profile(activities=[ProfilerActivity.CPU]) as prof:
        _add_one_kernel[(4,)](x, 100, BLOCK=32)
    (launch,) = [e for e in prof.events() if e.name == "triton::_add_one_kernel"]
    inside = [e.name for e in prof.events() if e.cpu_parent is not None and e.cpu_parent.id == launch.id]
    assert "aten::copy_" in inside  # what the interpreter does on the host, left out of the count


# ----------------------------------------------------------------------------------------
# The counts of a fused bottleneck (limits of issue 13)
#
# Eval meets the limit exactly: one launch per convolution, nothing per BatchNorm.
# Training is under the aim of 0.7x: 10 vs 25 ops for a bottleneck (0.40x), 12 vs 30 with a
# downsample (0.40x), 62 vs 173 for stages 1-2 of ResNeXt-50 (0.36x); it was 4.2x, then 1.35x,
# 0.80x, 0.70x.  No weight pack in fp32, dgrad + wgrad in one launch, the wgrad split and
# BN-backward sums reduced inside their launches, the prologue's BN backward in the data
# gradient's epilogue, the final pass writing both shift gradients (no clone), each BN's
# statistics finalized in its convolution's launch and its statistics terms applied as the
# gradient launch loads dy, the shortcut's gradient added as conv1's dx is stored.  The limit
# is just above the worst (0.40x), so any added op fails here.  What is left: see
# docs/performance.md, "Launch economy".
TRAIN_LIMIT = 0.41
# Blocks on the per-stage Functions (timm's RegNet bottleneck: tests/test_real_models.py) keep
# autograd's add of the shortcut's gradient (13 vs 30 for a RegNetX block with a downsample).
PER_STAGE_TRAIN_LIMIT = 0.45
# Blocks with a squeeze-excite gate (tests/test_se_blocks.py, RegNetY in tests/test_real_models.py):
# the SE's excite ops and its squeeze launches on top, 25 vs 45 (SE after bn3), 25 vs 45 (RegNetY).
GATED_TRAIN_LIMIT = 0.60
# ----------------------------------------------------------------------------------------
def _block(downsample: bool) -> nn.Module:
    if downsample:  # stride 2, 1x1 conv + BN downsample
        ds = nn.Sequential(nn.Conv2d(32, 64, 1, 2, bias=False), nn.BatchNorm2d(64))
        return resnext.Bottleneck(32, 16, 2, ds, groups=4, base_width=16)
    return resnext.Bottleneck(64, 16, 1, None, groups=4, base_width=16)  # stride 1, identity


def _counts(downsample: bool, train: bool):
    eager = randomize_bn(_block(downsample)).to(DEVICE).to(memory_format=torch.channels_last)
    fused = resnext.FusedBottleneck(copy.deepcopy(eager))
    x = torch.randn(2, eager.conv1.in_channels, 8, 8, device=DEVICE).to(memory_format=torch.channels_last)
    x.requires_grad_(train)  # a block inside a network: its input needs a gradient
    e = workloads.steady_device_ops(eager, x, train)
    f = workloads.steady_device_ops(fused, x, train)
    print(f"\neager ({'train' if train else 'eval'}, {'downsample' if downsample else 'identity'}): {e}")
    print(f"fused: {f}")
    return e, f, 4 if downsample else 3


@pytest.mark.parametrize("downsample", [False, True], ids=["identity", "downsample"])
def test_training_step_device_ops_within_limit_of_eager(downsample):
    e, f, convs = _counts(downsample, train=True)
    # eager, by eye: per conv+BN a conv2d, batch_norm, add_ (num_batches_tracked) and
    # convolution_backward + native_batch_norm_backward; per ReLU relu_ + threshold_backward
    assert e.by_name["aten::conv2d"] == e.by_name["aten::convolution_backward"] == convs
    assert e.by_name["aten::batch_norm"] == e.by_name["aten::native_batch_norm_backward"] == convs
    assert e.by_name["aten::relu_"] == e.by_name["aten::threshold_backward"] == 3
    assert f.total <= TRAIN_LIMIT * e.total, f"fused training step: {f.total} device ops, eager {e.total}\n{f}\n{e}"


@pytest.mark.parametrize("downsample", [False, True], ids=["identity", "downsample"])
def test_eval_forward_is_one_launch_per_convolution(downsample):
    e, f, convs = _counts(downsample, train=False)
    assert e.by_name["aten::conv2d"] == e.by_name["aten::batch_norm"] == convs
    assert (f.triton, f.aten) == (convs, 0), f"fused eval forward: want {convs} Triton launches and no aten op\n{f}"


def test_stages_1_2_of_resnext50_counts():
    """Model level, with no-op launches (the counts do not depend on values): 7 bottlenecks,
    23 convolutions of ResNeXt-50's stages 1-2 at a 32x32 image size, batch 2."""
    eager, fused = workloads.make_pair(workloads.STAGES_1_2)
    convs = sum(isinstance(m, nn.Conv2d) for m in eager.modules())
    assert convs == 23
    results = {}
    for train in (True, False):
        x = workloads.example_input(workloads.STAGES_1_2, 2, 32, requires_grad=train)
        e = workloads.steady_device_ops(eager, x, train)
        with host_only():
            f = workloads.steady_device_ops(fused, x, train, noop_launches=True)
        print(f"\nstages 1-2 {'train' if train else 'eval'}: eager {e}\nfused {f}")
        results[train] = (e, f)
    (et, ft), (_, fe) = results[True], results[False]
    assert et.by_name["aten::convolution_backward"] == convs
    assert (fe.triton, fe.aten) == (convs, 0), f"fused eval forward: want {convs} launches, no aten op\n{fe}"
    assert ft.total <= TRAIN_LIMIT * et.total, f"fused training step: {ft.total} device ops, eager {et.total}\n{ft}\n{et}"
