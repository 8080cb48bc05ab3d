"""Tests of kernels.conv_grad: the Triton data- and weight-gradient kernels of the (grouped) conv.

Without CUDA the kernels run in Triton's interpreter (set before triton is imported), so
shapes stay tiny.  Every result is compared with a float64 PyTorch reference computed
from the same (rounded) inputs; outputs and partial-sum buffers start as NaN so an
element the kernels forget to write fails the comparison.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from dataclasses import dataclass  # noqa: E402

import pytest  # noqa: E402

from helpers import require_bf16  # noqa: E402
from kernels import _runtime  # noqa: E402
from kernels import conv_grad as cg  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@dataclass(frozen=True)
class Case:
    N: int
    Cin: int
    Cout: int
    H: int
    W: int
    k: int
    stride: int
    padding: int
    groups: int

    @property
    def Ho(self):
        return (self.H + 2 * self.padding - self.k) // self.stride + 1

    @property
    def Wo(self):
        return (self.W + 2 * self.padding - self.k) // self.stride + 1


# id -> why the case exists.  H, W odd and unequal throughout; Cout != Cin where it can be.
CASES = {
    "dense_3x3_cout_ne_cin": Case(2, 8, 12, 7, 5, 3, 1, 1, 1),
    "dense_3x3_s2_odd": Case(1, 12, 20, 7, 9, 3, 2, 1, 1),
    "two_groups_s2_16_to_24": Case(1, 16, 24, 5, 7, 3, 2, 1, 2),
    "4_per_group_resnext_stage1": Case(1, 32, 32, 5, 7, 3, 1, 1, 8),
    "4_per_group_s2_several_blocks": Case(1, 64, 64, 5, 3, 3, 2, 1, 16),
    "8_per_group_s2_cout_16_per_group": Case(1, 32, 64, 7, 5, 3, 2, 1, 4),
    "16_per_group": Case(1, 32, 32, 5, 3, 3, 1, 1, 2),
    "32_per_group_one_group_per_block": Case(1, 64, 64, 3, 5, 3, 1, 1, 2),
    "72_per_group_k_loop_several_steps": Case(1, 72, 40, 3, 5, 3, 1, 1, 1),
    "depthwise_s1": Case(1, 24, 24, 5, 7, 3, 1, 1, 24),
    "depthwise_s2": Case(1, 20, 20, 7, 5, 3, 2, 1, 20),
    "depthwise_multiplier_2": Case(1, 8, 16, 5, 3, 3, 1, 1, 8),
    "3_in_6_out_per_group_blocks_start_mid_group": Case(1, 48, 96, 3, 5, 3, 2, 1, 16),
    "1x1_gemm_cout_ne_cin": Case(2, 24, 40, 5, 3, 1, 1, 0, 1),
    "1x1_s2_downsample_unreached_pixels": Case(1, 16, 32, 7, 5, 1, 2, 0, 1),
    "3x3_pad0_s2": Case(1, 16, 16, 7, 9, 3, 2, 0, 4),
    "tiny_image_smaller_than_stride_classes": Case(1, 16, 16, 1, 3, 3, 2, 1, 4),
}
FP16_CASES = ["dense_3x3_cout_ne_cin", "4_per_group_s2_several_blocks",
              "3_in_6_out_per_group_blocks_start_mid_group", "1x1_s2_downsample_unreached_pixels"]


@pytest.fixture(autouse=True)
def nan_buffers(monkeypatch):
    """Every buffer the launchers allocate starts as NaN: an unwritten element shows."""
    def poisoned(shape, **kw):
        return torch.empty(shape, **kw).fill_(float("nan"))
    monkeypatch.setattr(cg, "_empty", poisoned)


@pytest.fixture
def ieee_fp32(monkeypatch):
    """fp32 tests check the exact (ieee) product; on a GPU TF32 would need looser bounds."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)


def make_inputs(c: Case, dtype, seed=0):
    """Fresh random x, weight, dz (never zeros), rounded to dtype; dz is NCHW contiguous."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(c.N, c.Cin, c.H, c.W, generator=gen)
    fan_in = c.Cin // c.groups * c.k * c.k
    w = torch.randn(c.Cout, c.Cin // c.groups, c.k, c.k, generator=gen) / fan_in ** 0.5
    dz = torch.randn(c.N, c.Cout, c.Ho, c.Wo, generator=gen)
    return [t.to(dtype).to(DEVICE) for t in (x, w, dz)]


def reference(c: Case, x, w, dz, dtype=torch.float64):
    """(dx, dw) from PyTorch's own convolution backward, on the CPU, in dtype."""
    dx, dw, _ = torch.ops.aten.convolution_backward(
        dz.cpu().to(dtype), x.cpu().to(dtype), w.cpu().to(dtype), None, [c.stride] * 2, [c.padding] * 2,
        [1, 1], False, [0, 0], c.groups, [True, True, False])
    return dx, dw


def ours(c: Case, x, w, dz):
    dx = cg.conv_dgrad(dz, w, (c.H, c.W), c.stride, c.padding, c.groups)
    dw = cg.conv_wgrad(dz, x, w.shape, c.stride, c.padding, c.groups)
    return dx, dw


def assert_close_fp32(got, ref, what):
    assert not torch.isnan(got).any(), f"{what}: NaN (an element was never written)"
    err = (got.cpu().double() - ref).abs().max().item()
    bound = 1e-5 * (1.0 + ref.abs().max().item())
    assert err <= bound, f"{what}: max error {err:.3g} > {bound:.3g}"


@pytest.mark.parametrize("case_id", list(CASES))
def test_fp32_matches_float64(case_id, ieee_fp32):
    c = CASES[case_id]
    x, w, dz = make_inputs(c, torch.float32)
    dx, dw = ours(c, x, w, dz)
    ref_dx, ref_dw = reference(c, x, w, dz)
    assert dx.shape == (c.N, c.Cin, c.H, c.W) and dx.dtype == torch.float32
    assert dx.is_contiguous(memory_format=torch.channels_last)
    assert dw.shape == w.shape and dw.dtype == torch.float32
    assert_close_fp32(dx, ref_dx, "dx")
    assert_close_fp32(dw, ref_dw, "dw")


def assert_within_torch_error(got, ref64, torch_low, what):
    """Our error is at most twice PyTorch's own in the same precision (max over the tensor)."""
    assert not torch.isnan(got).any(), f"{what}: NaN (an element was never written)"
    ours_err = (got.cpu().double() - ref64).abs().max().item()
    torch_err = (torch_low.cpu().double() - ref64).abs().max().item()
    atol = 1e-4 * ref64.abs().max().item()
    assert ours_err <= 2 * torch_err + atol, f"{what}: error {ours_err:.3g} vs PyTorch's {torch_err:.3g}"


# bf16 runs in the interpreter through tests/interpreter_bf16.py (GPU semantics)
LOW_PRECISION = [pytest.param(torch.float16, id="fp16"), pytest.param(torch.bfloat16, id="bf16")]


@pytest.mark.parametrize("relu", [True, False], ids=["bn-relu", "bn"])
@pytest.mark.parametrize("case_id", ["4_per_group_s2_several_blocks", "dense_3x3_cout_ne_cin"])
def test_wgrad_prologue_matches_float64(case_id, relu, ieee_fp32):
    """The weight gradient recomputes the forward's BN (+ ReLU) prologue from x on load:
    dw of conv(act(x*s + b)), with zero padding applied after the prologue."""
    from kernels.reference import input_prologue
    c = CASES[case_id]
    x, w, dz = make_inputs(c, torch.float32)
    s = torch.rand(c.Cin, device=DEVICE) + 0.5
    b = torch.randn(c.Cin, device=DEVICE) + 0.3  # padding zeros differ from act(0*s + b)
    dw = cg.conv_wgrad(dz, x, w.shape, c.stride, c.padding, c.groups, in_scale=s, in_shift=b, in_relu=relu)
    a64 = input_prologue(x.double(), s.double(), b.double(), relu)
    _, dw_ref = reference(c, a64, w, dz)
    assert_close_fp32(dw, dw_ref, "dw")


@pytest.mark.parametrize("dtype", LOW_PRECISION)
@pytest.mark.parametrize("case_id", FP16_CASES)
def test_low_precision_within_torch_error(case_id, dtype):
    if dtype == torch.bfloat16:
        require_bf16()
    c = CASES[case_id]
    x, w, dz = make_inputs(c, dtype)
    dx, dw = ours(c, x, w, dz)
    assert dx.dtype == dtype and dw.dtype == torch.float32  # dw: fp32 partial sums, caller casts
    ref_dx, ref_dw = reference(c, x, w, dz)  # float64 of the same rounded inputs
    torch_dx, torch_dw = reference(c, x, w, dz, dtype)
    assert_within_torch_error(dx, ref_dx, torch_dx, "dx")
    assert_within_torch_error(dw, ref_dw, torch_dw, "dw")


@pytest.fixture
def max_splits(monkeypatch):
    """16 rows per split: many partial sums and a ragged last split."""
    config = cg.wgrad_config

    def many(*args, **kw):
        cfg = config(*args, **kw)
        cfg["BLOCK_M"] = cfg["rows_per_split"] = 16
        return cfg
    monkeypatch.setattr(cg, "wgrad_config", many)


@pytest.mark.parametrize("case_id", ["dense_3x3_cout_ne_cin", "4_per_group_s2_several_blocks"])
def test_wgrad_many_splits_is_deterministic(case_id, max_splits, ieee_fp32):
    c = Case(**{**CASES[case_id].__dict__, "N": 6})  # M = 210 and 36: ragged last split
    x, w, dz = make_inputs(c, torch.float32, seed=1)
    grid, _, _ = cg.wgrad_launch(c.N, c.Cin, c.H, c.W, c.Cout, c.Ho, c.Wo, c.k, c.stride, c.padding,
                                 c.groups, torch.float32)
    assert grid[2] >= 3
    first = cg.conv_wgrad(dz, x, w.shape, c.stride, c.padding, c.groups)
    second = cg.conv_wgrad(dz, x, w.shape, c.stride, c.padding, c.groups)
    assert torch.equal(first, second), "two runs differ: the reduction is not deterministic"
    assert_close_fp32(first, reference(c, x, w, dz)[1], "dw")


def test_default_split_count_above_one_and_deterministic(ieee_fp32):
    """The launcher's own split choice (2 under the interpreter) is exercised and repeatable."""
    c = Case(2, 16, 16, 7, 5, 3, 1, 1, 2)
    x, w, dz = make_inputs(c, torch.float32, seed=2)
    grid, _, _ = cg.wgrad_launch(c.N, c.Cin, c.H, c.W, c.Cout, c.Ho, c.Wo, c.k, c.stride, c.padding,
                                 c.groups, torch.float32)
    assert grid[2] >= 2
    runs = [ours(c, x, w, dz) for _ in range(2)]
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])


def test_any_input_memory_format_gives_the_same_bits(ieee_fp32):
    c = CASES["8_per_group_s2_cout_16_per_group"]
    x, w, dz = make_inputs(c, torch.float32, seed=3)
    base = ours(c, x, w, dz)
    cl = ours(c, x.contiguous(memory_format=torch.channels_last), w,
              dz.contiguous(memory_format=torch.channels_last))
    # non-contiguous views: every other channel of a twice-as-wide tensor
    wide = lambda t: torch.stack([t, torch.randn_like(t)], dim=2).flatten(1, 2)[:, ::2]  # noqa: E731
    strided = ours(c, wide(x), w, wide(dz))
    for other in (cl, strided):
        assert torch.equal(base[0], other[0]) and torch.equal(base[1], other[1])


def test_float64_and_plain_cpu_fall_back_to_aten(monkeypatch):
    c = CASES["two_groups_s2_16_to_24"]
    x, w, dz = make_inputs(c, torch.float64)
    ref_dx, ref_dw = reference(c, x, w, dz)
    dx, dw = ours(c, x, w, dz)
    assert dx.dtype == dw.dtype == torch.float64
    assert dx.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(dx.cpu(), ref_dx, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(dw.cpu(), ref_dw, rtol=1e-12, atol=1e-12)

    monkeypatch.setattr(cg, "use_triton", lambda t: False)  # a CPU tensor without the interpreter
    x, w, dz = (t.float().cpu() for t in (x, w, dz))
    dx, dw = ours(c, x, w, dz)
    assert dx.dtype == dw.dtype == torch.float32
    assert dx.is_contiguous(memory_format=torch.channels_last)
    assert_close_fp32(dx, ref_dx, "dx")
    assert_close_fp32(dw, ref_dw, "dw")


def test_empty_batch_and_shape_mismatch():
    c = CASES["4_per_group_resnext_stage1"]
    x, w, dz = make_inputs(c, torch.float32)
    dx = cg.conv_dgrad(dz[:0], w, (c.H, c.W), c.stride, c.padding, c.groups)
    assert dx.shape == (0, c.Cin, c.H, c.W)
    dw = cg.conv_wgrad(dz[:0], x[:0], w.shape, c.stride, c.padding, c.groups)
    assert torch.equal(dw, torch.zeros_like(w))
    with pytest.raises(ValueError, match="does not match"):
        cg.conv_dgrad(dz, w, (c.H + 2, c.W), c.stride, c.padding, c.groups)
    with pytest.raises(ValueError, match="does not match"):
        cg.conv_wgrad(dz, x, w.shape, c.stride, c.padding, c.groups * 2)


def test_weight_layouts_give_the_same_bits(ieee_fp32):
    """fp32 kernels read the weight as stored (no pack): contiguous, channels_last and a
    layout whose (kh, kw) axes do not flatten (then packed) give the same forward and dx."""
    from kernels.conv_bn_act import conv_bn_act
    from kernels.weights import packed_weight, readable_in_place
    c = CASES["4_per_group_s2_several_blocks"]
    x, w, dz = make_inputs(c, torch.float32, seed=4)
    swapped = w.transpose(2, 3).contiguous().transpose(2, 3)  # kw outer, kh inner: no tap axis
    layouts = [w.contiguous(), w.contiguous(memory_format=torch.channels_last), swapped]
    assert [readable_in_place(t, torch.float32) for t in layouts] == [True, True, False]
    assert packed_weight(layouts[1], torch.float32) is None and packed_weight(swapped, torch.float32) is not None
    outs = [(conv_bn_act(x, t, c.stride, c.padding, c.groups)[0],
             cg.conv_dgrad(dz, t, (c.H, c.W), c.stride, c.padding, c.groups)) for t in layouts]
    for y, dx in outs[1:]:
        assert torch.equal(y, outs[0][0]) and torch.equal(dx, outs[0][1])
    assert_close_fp32(outs[0][1], reference(c, x, w, dz)[0], "dx")


@pytest.mark.parametrize("case_id", ["dense_3x3_cout_ne_cin", "4_per_group_s2_several_blocks"])
def test_wgrad_in_kernel_reduction_and_weight_layout(case_id, max_splits, ieee_fp32):
    """The splits are summed inside the launch (the counters left zero for the next one),
    and dw comes back in the weight's memory layout with the same bits."""
    c = Case(**{**CASES[case_id].__dict__, "N": 6})
    x, w, dz = make_inputs(c, torch.float32, seed=5)
    w_cl = w.contiguous(memory_format=torch.channels_last)
    plain = cg.conv_wgrad(dz, x, w.shape, c.stride, c.padding, c.groups)
    cl = cg.conv_wgrad(dz, x, w.shape, c.stride, c.padding, c.groups, layout_like=w_cl)
    assert cl.stride() == w_cl.stride() and plain.is_contiguous()
    assert torch.equal(plain, cl)
    assert_close_fp32(plain, reference(c, x, w, dz)[1], "dw")
    assert all(int(buf.abs().sum()) == 0 for key, buf in _runtime._PER_STREAM.items() if key[0][0] == "counters")


@pytest.mark.parametrize("case_id", ["dense_3x3_cout_ne_cin", "4_per_group_s2_several_blocks",
                                     "two_groups_s2_16_to_24"])
@pytest.mark.parametrize("prologue", [False, True], ids=["plain", "prologue"])
def test_both_gradients_in_one_launch_match_the_separate_kernels(case_id, prologue, max_splits, ieee_fp32):
    """conv_grads: dgrad's programs then wgrad's in one grid; the same bits as the two
    launches, the weight gradient in the weight's layout, one launch."""
    from benchmarks.device_ops import count_device_ops
    c = Case(**{**CASES[case_id].__dict__, "N": 3})
    x, w, dz = make_inputs(c, torch.float32, seed=6)
    w = w.contiguous(memory_format=torch.channels_last)
    aff = dict(in_scale=torch.rand(c.Cin) + 0.5, in_shift=torch.randn(c.Cin) * 0.1, in_relu=True) if prologue else {}
    dx, dw = cg.conv_grads(dz, x, w, c.stride, c.padding, c.groups, **aff)
    assert torch.equal(dx, cg.conv_dgrad(dz, w, (c.H, c.W), c.stride, c.padding, c.groups))
    assert torch.equal(dw, cg.conv_wgrad(dz, x, w.shape, c.stride, c.padding, c.groups, layout_like=w, **aff))
    assert dw.stride() == w.stride() and dx.is_contiguous(memory_format=torch.channels_last)
    ref_dx, ref_dw = reference(c, x, w, dz)
    assert_close_fp32(dx, ref_dx, "dx")
    if not prologue:
        assert_close_fp32(dw, ref_dw, "dw")
    xl, dzl = (t.contiguous(memory_format=torch.channels_last) for t in (x, dz))  # NCHW inputs are copied
    ops = count_device_ops(lambda: cg.conv_grads(dzl, xl, w, c.stride, c.padding, c.groups, **aff))
    # (fill_: the test suite's NaN poisoning of every torch.empty)
    assert ops.triton == 1 and set(ops.by_name) - {"aten::fill_"} == {"triton::conv_grads_kernel"}, ops


def _prologue_reference(c: Case, x, w, dz, s, b, relu):
    """(dx, sum g, sum g*x) in float64: the prologue a = relu(x*s + b)'s backward after dgrad."""
    da = reference(c, x, w, dz)[0]
    x64 = x.cpu().double()
    g = da
    if relu:  # the mask as the kernel's: pre-activation rounded to x's dtype, NaN passes
        pre = (x64 * s.double().view(1, -1, 1, 1) + b.double().view(1, -1, 1, 1)).to(x.dtype).double()
        g = torch.where(pre <= 0, 0.0, da)
    return g * s.double().view(1, -1, 1, 1), g.sum(dim=(0, 2, 3)), (g * x64).sum(dim=(0, 2, 3))


@pytest.mark.parametrize("relu", [True, False], ids=["bn-relu", "bn"])
@pytest.mark.parametrize("case_id", ["dense_3x3_cout_ne_cin", "4_per_group_s2_several_blocks", "two_groups_s2_16_to_24",
                                     "3_in_6_out_per_group_blocks_start_mid_group", "1x1_gemm_cout_ne_cin",
                                     "1x1_s2_downsample_unreached_pixels", "tiny_image_smaller_than_stride_classes"])
def test_prologue_backward_in_the_dgrad_epilogue_matches_float64(case_id, relu, max_splits, ieee_fp32):
    """conv_grads(prologue_backward=True): dx = da*mask*s and the sums of g, g*x from the
    data gradient's epilogue (one launch), vs float64; twice: the same bits (idempotent)."""
    from benchmarks.device_ops import count_device_ops
    c = Case(**{**CASES[case_id].__dict__, "N": 3})  # N*H*W rows: not a multiple of the row block
    x, w, dz = make_inputs(c, torch.float32, seed=9)
    s, b = torch.rand(c.Cin) + 0.5, torch.randn(c.Cin) * 0.3
    aff = dict(in_scale=s, in_shift=b, in_relu=relu)
    dx, dw, sums = cg.conv_grads(dz, x, w, c.stride, c.padding, c.groups, prologue_backward=True, **aff)
    ref_dx, ref_sg, ref_sgx = _prologue_reference(c, x, w, dz, s, b, relu)
    assert_close_fp32(dx, ref_dx, "dx")
    assert_close_fp32(sums[0], ref_sg, "sum g")
    assert_close_fp32(sums[1], ref_sgx, "sum g*x")
    assert torch.equal(dw, cg.conv_wgrad(dz, x, w.shape, c.stride, c.padding, c.groups, layout_like=w, **aff))
    assert all(int(buf.abs().sum()) == 0 for key, buf in _runtime._PER_STREAM.items() if key[0][0] == "counters")
    # the second run (the counted one, on channels_last copies) gives the same bits
    xl, dzl = (t.contiguous(memory_format=torch.channels_last) for t in (x, dz))
    again = []
    ops = count_device_ops(lambda: again.extend(cg.conv_grads(dzl, xl, w, c.stride, c.padding, c.groups,
                                                              prologue_backward=True, **aff)))
    assert ops.triton == 1 and set(ops.by_name) - {"aten::fill_"} == {"triton::conv_grads_kernel"}, ops
    assert all(torch.equal(p, q) for p, q in zip((dx, dw, sums), again))


# The statistics test's cases: every case in fp32; in fp16 one case per kernel variant (KSIZE,
# MULTI_GROUP): the mid-group case runs 4_per_group_s2's fp16 kernel (its index arithmetic is
# checked in fp32), 1x1_gemm 1x1_s2's (interpreter time)
_STATS_CASE_IDS = {
    torch.float32: ["dense_3x3_cout_ne_cin", "4_per_group_s2_several_blocks",
                    "3_in_6_out_per_group_blocks_start_mid_group", "1x1_gemm_cout_ne_cin",
                    "1x1_s2_downsample_unreached_pixels"],
    torch.float16: ["dense_3x3_cout_ne_cin", "4_per_group_s2_several_blocks", "1x1_s2_downsample_unreached_pixels"],
}
STATS_CASES = [pytest.param(case_id, dtype, id=f"{case_id}-{str(dtype).replace('torch.float', 'fp')}")
               for dtype, ids in _STATS_CASE_IDS.items() for case_id in ids]


def _stats_inputs(c: Case, dtype, seed, gamma=True):
    """z (the conv's raw output), its batch statistics and the gradients of its BN's scale and shift."""
    from kernels.bn_backward import StatsGrad
    gen = torch.Generator().manual_seed(seed + 100)
    z = (torch.randn(c.N, c.Cout, c.Ho, c.Wo, generator=gen) * 1.5 + 0.3).to(dtype)
    z64 = z.double()
    mean, var = z64.mean(dim=(0, 2, 3)).float(), z64.var(dim=(0, 2, 3), unbiased=False).float()
    vec = lambda: torch.randn(c.Cout, generator=gen)  # noqa: E731
    st = StatsGrad(z.to(DEVICE).contiguous(memory_format=torch.channels_last), mean.to(DEVICE), var.to(DEVICE),
                   None, None, vec().to(DEVICE), vec().to(DEVICE),
                   (torch.rand(c.Cout, generator=gen) + 0.5).to(DEVICE) if gamma else None, 1e-3)
    return st


@pytest.mark.parametrize("mode", ["plain", "prologue", "prologue_backward", "no_gamma"])
@pytest.mark.parametrize("case_id, dtype", STATS_CASES)
def test_statistics_terms_on_load_match_the_separate_pass(case_id, dtype, mode, max_splits, ieee_fp32):
    """conv_grads(stats=...): dz = dy + the batch-statistics terms applied as dgrad and wgrad
    load dy (one launch, no dz tensor): the same bits as bn_backward's pass then conv_grads,
    gamma's and beta's gradients included, and float64 to 1e-5 (fp32); idempotent."""
    from benchmarks.device_ops import count_device_ops
    from kernels.bn_backward import bn_backward
    c = Case(**{**CASES[case_id].__dict__, "N": 3})  # N*H*W rows: not a multiple of the row block
    x, w, dy = make_inputs(c, dtype, seed=12)
    x, dy = (t.contiguous(memory_format=torch.channels_last) for t in (x, dy))
    st = _stats_inputs(c, dtype, seed=12, gamma=mode != "no_gamma")
    kw = {}
    if mode.startswith("prologue"):
        kw = dict(in_scale=torch.rand(c.Cin) + 0.5, in_shift=torch.randn(c.Cin) * 0.3, in_relu=True,
                  prologue_backward=mode == "prologue_backward")
    out = cg.conv_grads(dy, x, w, c.stride, c.padding, c.groups, stats=st, **kw)
    ep = bn_backward(dy, stats=st, dz_dtype=dtype)
    two_pass = cg.conv_grads(ep.dz, x, w, c.stride, c.padding, c.groups, **kw)
    assert len(out) == len(two_pass) + 1
    for got, want, what in zip(out, two_pass, ("dx", "dw", "sums")):
        assert torch.equal(got, want), what
    dparam = out[-1]
    assert torch.equal(dparam[0], ep.dgamma) and torch.equal(dparam[1], ep.dbeta)
    if dtype == torch.float32:  # against float64: the statistics terms, then PyTorch's convolution backward
        st64 = st._replace(z=st.z.double(), mean=st.mean.double(), var=st.var.double())
        dz64, dparam64 = cg.stats_terms_reference(dy.double(), st64)
        if not mode.startswith("prologue"):
            ref_dx, ref_dw = reference(c, x, w, dz64)
            assert_close_fp32(out[0], ref_dx, "dx")
            assert_close_fp32(out[1], ref_dw, "dw")
        assert_close_fp32(dparam, dparam64, "d gamma, d beta")
    again = []  # the counted second run gives the same bits
    ops = count_device_ops(lambda: again.extend(cg.conv_grads(dy, x, w, c.stride, c.padding, c.groups, stats=st, **kw)))
    assert ops.triton == 1 and set(ops.by_name) - {"aten::fill_"} == {"triton::conv_grads_kernel"}, ops
    assert all(torch.equal(p, q) for p, q in zip(out, again))


@pytest.mark.parametrize("mode", ["plain", "prologue_backward"])
def test_bf16_statistics_terms_on_load(mode):
    """bf16 conv_grads(stats=...): one launch equal to bn_backward then conv_grads (bits), and
    dx, dw, d gamma, d beta within twice PyTorch's own bf16 error of float64."""
    require_bf16()
    from kernels.bn_backward import bn_backward
    dtype = torch.bfloat16
    c = Case(**{**CASES["4_per_group_s2_several_blocks"].__dict__, "N": 3})
    x, w, dy = make_inputs(c, dtype, seed=12)
    x, dy = (t.contiguous(memory_format=torch.channels_last) for t in (x, dy))
    st = _stats_inputs(c, dtype, seed=12)
    kw = {}
    if mode == "prologue_backward":
        kw = dict(in_scale=torch.rand(c.Cin) + 0.5, in_shift=torch.randn(c.Cin) * 0.3, in_relu=True,
                  prologue_backward=True)
    out = cg.conv_grads(dy, x, w, c.stride, c.padding, c.groups, stats=st, **kw)
    ep = bn_backward(dy, stats=st, dz_dtype=dtype)
    two_pass = cg.conv_grads(ep.dz, x, w, c.stride, c.padding, c.groups, **kw)
    for got, want, what in zip(out, two_pass, ("dx", "dw", "sums")):
        assert torch.equal(got, want), what
    assert out[0].dtype == dtype
    st64 = st._replace(z=st.z.double(), mean=st.mean.double(), var=st.var.double())
    dz64, dparam64 = cg.stats_terms_reference(dy.double(), st64)
    dzl, dparaml = cg.stats_terms_reference(dy, st)  # PyTorch's formulas on the bf16 tensors
    assert_within_torch_error(out[-1], dparam64, dparaml, "d gamma, d beta")
    if mode == "plain":
        ref_dx, ref_dw = reference(c, x, w, dz64)
        torch_dx, torch_dw = reference(c, x, w, dzl.to(dtype), dtype)
        assert_within_torch_error(out[0], ref_dx, torch_dx, "dx")
        assert_within_torch_error(out[1], ref_dw, torch_dw, "dw")


def test_statistics_terms_on_load_nan_fallbacks_and_errors(ieee_fp32):
    """A NaN in z or dy reaches the gradients as in the two-pass path; float64 runs the PyTorch
    formulas (stats_terms_reference); a malformed stats is refused."""
    from kernels.bn_backward import bn_backward
    c = Case(**{**CASES["4_per_group_s2_several_blocks"].__dict__, "N": 2})
    x, w, dy = make_inputs(c, torch.float32, seed=4)
    x, dy = (t.contiguous(memory_format=torch.channels_last) for t in (x, dy))
    st = _stats_inputs(c, torch.float32, seed=4)
    st.z[1, 3, 0, 1] = float("nan")
    dy[0, 9, 1, 0] = float("nan")
    dx, dw, dparam = cg.conv_grads(dy, x, w, c.stride, c.padding, c.groups, stats=st)
    want_dx, want_dw = cg.conv_grads(bn_backward(dy, stats=st, dz_dtype=torch.float32).dz, x, w, c.stride,
                                     c.padding, c.groups)
    assert torch.isnan(dx).any() and (~torch.isnan(dx)).any()
    assert torch.equal(torch.isnan(dx), torch.isnan(want_dx)) and torch.equal(torch.isnan(dw), torch.isnan(want_dw))
    assert torch.equal(torch.nan_to_num(dx), torch.nan_to_num(want_dx))
    x64, w64, dy64 = (t.double() for t in make_inputs(c, torch.float32, seed=4))
    st64 = _stats_inputs(c, torch.float64, seed=4)
    dx64, dw64, dparam64 = cg.conv_grads(dy64, x64, w64, c.stride, c.padding, c.groups, stats=st64)
    dz64, want_dparam = cg.stats_terms_reference(dy64, st64)
    r_dx, r_dw = reference(c, x64, w64, dz64)
    assert torch.allclose(dx64.cpu(), r_dx) and torch.allclose(dw64.cpu(), r_dw) and torch.equal(dparam64, want_dparam)
    for bad in (st._replace(dshift=None), st._replace(dmean=st.mean), st._replace(z=st.z[:, :, :1])):
        with pytest.raises(ValueError, match="stats"):
            cg.conv_grads(dy, x, w, c.stride, c.padding, c.groups, stats=bad)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("case_id", ["dense_3x3_cout_ne_cin", "1x1_s2_downsample_unreached_pixels"])
def test_dx_add_in_the_gradient_launch(case_id, dtype, ieee_fp32):
    """conv_grads(dx_add=r): dx + r as PyTorch's add rounds it, from the same launch (a block's
    shortcut gradient joining conv1's), with the statistics terms too; refused with a prologue
    backward or another shape."""
    c = Case(**{**CASES[case_id].__dict__, "N": 2})
    x, w, dy = make_inputs(c, dtype, seed=21)
    x, dy = (t.contiguous(memory_format=torch.channels_last) for t in (x, dy))
    r = torch.randn(x.shape, generator=torch.Generator().manual_seed(22)).to(dtype).to(DEVICE)
    r = r.contiguous(memory_format=torch.channels_last)
    st = _stats_inputs(c, dtype, seed=21)
    for stats in (None, st):
        want = cg.conv_grads(dy, x, w, c.stride, c.padding, c.groups, stats=stats)
        got = cg.conv_grads(dy, x, w, c.stride, c.padding, c.groups, stats=stats, dx_add=r)
        assert torch.equal(got[0], want[0] + r) and got[0].is_contiguous(memory_format=torch.channels_last)
        assert all(torch.equal(p, q) for p, q in zip(got[1:], want[1:]))
    with pytest.raises(ValueError, match="dx_add"):
        cg.conv_grads(dy, x, w, c.stride, c.padding, c.groups, dx_add=r[:, :, :1])
    with pytest.raises(ValueError, match="dx_add"):
        cg.conv_grads(dy, x, w, c.stride, c.padding, c.groups, in_scale=torch.ones(c.Cin), in_shift=torch.zeros(c.Cin),
                      prologue_backward=True, dx_add=r)


def test_prologue_backward_nan_and_fallbacks(ieee_fp32):
    """A NaN in dz reaches dx where the mask passes (and the sums); a NaN x passes g (as
    threshold_backward).  float64 runs the PyTorch formulas; a gate is refused."""
    c = Case(**{**CASES["4_per_group_s2_several_blocks"].__dict__, "N": 2})
    x, w, dz = make_inputs(c, torch.float32, seed=3)
    s, b = torch.rand(c.Cin) + 0.5, torch.randn(c.Cin) * 0.3
    x[1, 5, 2, 1] = float("nan")
    dz[0, 7, 1, 1] = float("nan")
    dx, _, sums = cg.conv_grads(dz, x, w, c.stride, c.padding, c.groups, in_scale=s, in_shift=b, in_relu=True,
                                prologue_backward=True)
    ref_dx, ref_sg, _ = _prologue_reference(c, x, w, dz, s, b, True)
    assert torch.equal(torch.isnan(dx.cpu()), torch.isnan(ref_dx))
    assert torch.isnan(ref_dx).any() and (~torch.isnan(ref_dx)).any()
    ok = ~torch.isnan(ref_dx)
    assert (dx.cpu().double()[ok] - ref_dx[ok]).abs().max() <= 1e-5 * (1 + ref_dx[ok].abs().max())
    assert torch.equal(torch.isnan(sums[0].cpu()), torch.isnan(ref_sg))
    x64, w64, dz64 = (t.double() for t in make_inputs(c, torch.float32, seed=3))
    dx64, _, sums64 = cg.conv_grads(dz64, x64, w64, c.stride, c.padding, c.groups, in_scale=s, in_shift=b,
                                    in_relu=True, prologue_backward=True)
    r_dx, r_sg, r_sgx = _prologue_reference(c, x64, w64, dz64, s, b, True)
    assert torch.allclose(dx64.cpu(), r_dx) and torch.allclose(sums64[0].cpu(), r_sg) \
        and torch.allclose(sums64[1].cpu(), r_sgx)
    with pytest.raises(ValueError):
        cg.conv_grads(dz, x, w, c.stride, c.padding, c.groups, in_scale=s, in_shift=b, in_relu=True,
                      in_gate=torch.ones(c.N, c.Cin), prologue_backward=True)
