"""The bf16 interpreter patch (tests/interpreter_bf16.py) against PyTorch's own bf16 ops.

Bit for bit where the GPU is exact (casts, elementwise ops, max/min); within accumulation-order
error for ``tl.sum`` (bf16 additions, as on the GPU) and ``tl.dot`` (fp32 accumulation).  On a GPU
the same kernels run on the device: the expectations are the GPU's, not the patch's.
Two mutation tests show that the checks fail on truncating casts and on the stock ``tl.dot``.
"""
import numpy as np
import pytest
import torch
import triton
import triton.language as tl

import interpreter_bf16
from conftest import DEVICE

INTERPRET = DEVICE == "cpu"


@pytest.fixture(autouse=True)
def _bf16_patch_on():
    interpreter_bf16.require()


def _bits(t):
    return t.contiguous().view({2: torch.int16, 4: torch.int32}[t.element_size()])


def _f32_from_bits(bits):
    return torch.tensor(np.array(bits, dtype=np.uint32).view(np.float32))


# Rounding edge cases (fp32 bit patterns): halfway with an even / odd kept part, just above and
# below halfway, a carry into the exponent, overflow to Inf, the largest finite bf16, subnormals,
# signed zeros, Inf, NaN.
EDGE_BITS = [0x3F808000, 0x3F818000, 0x3F808001, 0x3F807FFF, 0xBF808000, 0xBF818000, 0x3F7FFFFF,
             0x3FFFFFFF, 0x7F7FFFFF, 0x7F7F7FFF, 0x7F7F8000, 0xFF7F8000, 0x00000001, 0x00008000,
             0x00018000, 0x807F8000, 0x00000000, 0x80000000, 0x7F800000, 0xFF800000, 0x7FC00000,
             0xFFC00001, 0x40808000, 0x40818000]


def _cast_inputs():
    edge = _f32_from_bits(EDGE_BITS)
    gen = torch.Generator().manual_seed(1)
    rand = torch.randn(232, generator=gen) * torch.logspace(-6, 6, 232)
    return torch.cat([edge, rand]).to(DEVICE)  # 256


@triton.jit
def _cast_to_bf16_kernel(x_ptr, rne_ptr, rtz_ptr, back_ptr, N: tl.constexpr):
    i = tl.arange(0, N)
    x = tl.load(x_ptr + i)                                     # fp32
    y = x.to(tl.bfloat16)                                      # default: round to nearest even
    tl.store(rne_ptr + i, y)
    tl.store(rtz_ptr + i, x.to(tl.bfloat16, fp_downcast_rounding="rtz"))
    tl.store(back_ptr + i, y.to(tl.float32))                   # exact


def _assert_same_bits(got, want, what):
    nan_got, nan_want = torch.isnan(got), torch.isnan(want)
    assert torch.equal(nan_got, nan_want), f"{what}: NaN in different places"
    diff = (_bits(got) != _bits(want)) & ~nan_want
    assert not diff.any(), (f"{what}: {int(diff.sum())} elements differ, e.g. input index "
                            f"{diff.nonzero()[0].item()}: got {got[diff][0].item()!r}, want {want[diff][0].item()!r}")


def check_fp32_to_bf16_casts():
    x = _cast_inputs()
    rne, rtz = (torch.empty(x.numel(), device=DEVICE, dtype=torch.bfloat16) for _ in range(2))
    back = torch.empty_like(x)
    _cast_to_bf16_kernel[(1,)](x, rne, rtz, back, N=x.numel())
    _assert_same_bits(rne, x.bfloat16(), "fp32 -> bf16 (round to nearest even)")
    # toward zero: the top 16 bits (cvt.rz.bf16.f32); NaN stays NaN
    u = x.cpu().view(torch.int32)
    want_rtz = (u >> 16).to(torch.int16).view(torch.bfloat16)
    _assert_same_bits(rtz.cpu(), want_rtz, "fp32 -> bf16 (toward zero)")
    _assert_same_bits(back, x.bfloat16().float(), "bf16 -> fp32")


def test_fp32_to_bf16_casts_round_as_the_gpu():
    check_fp32_to_bf16_casts()


@pytest.mark.skipif(not INTERPRET, reason="mutates the interpreter patch")
def test_mutation_truncating_cast_is_caught(monkeypatch):
    """The cast check fails when the patch truncates (the stock interpreter's fp32 -> bf16)."""
    truncate = lambda x32, rtz=False: (np.ascontiguousarray(x32, dtype=np.float32)  # noqa: E731
                                       .view(np.uint32) >> np.uint32(16)).astype(np.uint16)
    monkeypatch.setattr(interpreter_bf16, "bf16_bits_from_f32", truncate)
    with pytest.raises(AssertionError, match="round to nearest even"):
        check_fp32_to_bf16_casts()


@triton.jit
def _other_casts_kernel(h_ptr, d_ptr, i_ptr, b_ptr, h_out, d_out, i_out, bh_out, bi_out, N: tl.constexpr):
    i = tl.arange(0, N)
    tl.store(h_out + i, tl.load(h_ptr + i).to(tl.bfloat16))    # fp16 -> bf16
    tl.store(d_out + i, tl.load(d_ptr + i).to(tl.bfloat16))    # fp64 -> bf16
    tl.store(i_out + i, tl.load(i_ptr + i).to(tl.bfloat16))    # int32 -> bf16
    b = tl.load(b_ptr + i)
    tl.store(bh_out + i, b.to(tl.float16))                     # bf16 -> fp16
    tl.store(bi_out + i, b.to(tl.int32))                       # bf16 -> int32 (toward zero)


def test_other_casts():
    n = 64
    gen = torch.Generator().manual_seed(2)
    h = (torch.randn(n, generator=gen) * 100).half()
    d = torch.randn(n, generator=gen, dtype=torch.float64) * 10
    # fp64 -> bf16 rounds once: 1 + 2^-8 + 2^-40 is above halfway (PyTorch's CPU cast goes
    # through fp32 and rounds twice, to 1.0); an fp32-exact value rounds as from fp32
    d[:2] = torch.tensor([1 + 2 ** -8 + 2 ** -40, -(1 + 3 * 2 ** -8)], dtype=torch.float64)
    ints = torch.randint(-2 ** 20, 2 ** 20, (n,), generator=gen, dtype=torch.int32)  # below 2^24: fp32-exact
    b = (torch.randn(n, generator=gen) * 300).bfloat16()
    args = [t.to(DEVICE) for t in (h, d, ints, b)]
    outs = [torch.empty(n, device=DEVICE, dtype=dt) for dt in (torch.bfloat16,) * 3 + (torch.float16, torch.int32)]
    _other_casts_kernel[(1,)](*args, *outs, N=n)
    _assert_same_bits(outs[0].cpu(), h.float().bfloat16(), "fp16 -> bf16")
    want_d = d.float().bfloat16()
    want_d[:2] = torch.tensor([1 + 2 ** -7, -(1 + 4 * 2 ** -8)]).bfloat16()
    _assert_same_bits(outs[1].cpu(), want_d, "fp64 -> bf16")
    _assert_same_bits(outs[2].cpu(), ints.float().bfloat16(), "int32 -> bf16")
    _assert_same_bits(outs[3].cpu(), b.float().half(), "bf16 -> fp16")
    assert torch.equal(outs[4].cpu(), b.float().trunc().int()), "bf16 -> int32"


@triton.jit
def _elementwise_kernel(x_ptr, y_ptr, add_ptr, sub_ptr, mul_ptr, max_ptr, min_ptr, neg_ptr, abs_ptr,
                        sel_ptr, lt_ptr, eq_ptr, div_ptr, masked_ptr, N: tl.constexpr):
    i = tl.arange(0, N)
    x = tl.load(x_ptr + i)
    y = tl.load(y_ptr + i)
    # each result stored on its own: a bf16 a*b+c on the GPU may contract into one fma.rn.bf16
    tl.store(add_ptr + i, x + y)
    tl.store(sub_ptr + i, x - y)
    tl.store(mul_ptr + i, x * y)
    tl.store(max_ptr + i, tl.maximum(x, y))
    tl.store(min_ptr + i, tl.minimum(x, y))
    tl.store(neg_ptr + i, -x)
    tl.store(abs_ptr + i, tl.abs(x))
    tl.store(sel_ptr + i, tl.where(x > 0, x, y))
    tl.store(lt_ptr + i, (x < y).to(tl.int8))
    tl.store(eq_ptr + i, (x == y).to(tl.int8))
    tl.store(div_ptr + i, x / y)                               # bf16 / bf16 computes in fp32
    half = i < N // 2
    tl.store(masked_ptr + i, tl.load(x_ptr + i, mask=half, other=-1.5))


def test_elementwise_ops_match_pytorch_bit_for_bit():
    n = 128
    gen = torch.Generator().manual_seed(3)
    x = (torch.randn(n, generator=gen) * torch.logspace(-3, 3, n)).bfloat16()
    y = (torch.randn(n, generator=gen) * torch.logspace(3, -3, n)).bfloat16()
    y[:8] = x[:8]  # equal operands
    x[8], y[9] = float("nan"), float("inf")
    xd, yd = x.to(DEVICE), y.to(DEVICE)
    bf = lambda: torch.empty(n, device=DEVICE, dtype=torch.bfloat16)  # noqa: E731
    outs = [bf() for _ in range(8)] + [torch.empty(n, device=DEVICE, dtype=torch.int8) for _ in range(2)]
    outs += [torch.empty(n, device=DEVICE), bf()]
    _elementwise_kernel[(1,)](xd, yd, *outs, N=n)
    outs = [o.cpu() for o in outs]
    # tl.maximum/minimum default to propagate_nan=NONE (max.bf16 / maxnumf): NaN loses, as in fmax
    want = [x + y, x - y, x * y, torch.fmax(x, y), torch.fmin(x, y), -x, x.abs(), torch.where(x > 0, x, y)]
    names = ["add", "sub", "mul", "maximum", "minimum", "neg", "abs", "where"]
    # Triton 3.6's interpreter lowers maxnumf/minnumf to np.maximum/np.minimum in every dtype
    # (fp32 too; fixed in 3.8): NaN propagates there, unlike the GPU.  Not a bf16 matter: the
    # NaN lane is left out of max/min on 3.6 only.
    nan_differs = INTERPRET and tuple(int(v) for v in triton.__version__.split(".")[:2]) < (3, 8)
    for got, w, name in zip(outs, want, names):
        if nan_differs and name in ("maximum", "minimum"):
            keep = ~torch.isnan(x) & ~torch.isnan(y)
            got, w = got[keep], w[keep]
        _assert_same_bits(got, w, name)
    assert torch.equal(outs[8], (x < y).to(torch.int8)) and torch.equal(outs[9], (x == y).to(torch.int8))
    _assert_same_bits(outs[10], x.float() / y.float(), "div (fp32)")
    masked = torch.where(torch.arange(n) < n // 2, x, torch.tensor(-1.5).bfloat16())
    _assert_same_bits(outs[11], masked, "masked load")


@triton.jit
def _reduce_kernel(x_ptr, sum_ptr, max_ptr, min_ptr, R: tl.constexpr, C: tl.constexpr):
    r = tl.arange(0, R)
    c = tl.arange(0, C)
    x = tl.load(x_ptr + r[:, None] * C + c[None, :])           # bf16 [R, C]
    tl.store(sum_ptr + c, tl.sum(x, axis=0))                   # bf16 accumulation (as on the GPU)
    tl.store(max_ptr + c, tl.max(x, axis=0))
    tl.store(min_ptr + c, tl.min(x, axis=0))


def test_reductions():
    R, C = 64, 16
    gen = torch.Generator().manual_seed(4)
    x = (torch.randn(R, C, generator=gen) + 0.5).bfloat16()
    outs = [torch.empty(C, device=DEVICE, dtype=torch.bfloat16) for _ in range(3)]
    _reduce_kernel[(1,)](x.to(DEVICE), *outs, R=R, C=C)
    s, mx, mn = (o.cpu() for o in outs)
    _assert_same_bits(mx, x.max(dim=0).values, "tl.max")
    _assert_same_bits(mn, x.min(dim=0).values, "tl.min")
    # a sum of R bf16 values with bf16 partial sums, in any order: at most (R - 1) roundings of
    # at most half an ulp (2^-8 relative) of a partial sum no larger than sum|x|
    ref = x.double().sum(dim=0)
    bound = (R - 1) * 2.0 ** -8 * x.double().abs().sum(dim=0)
    err = (s.double() - ref).abs()
    assert (err <= bound).all(), f"tl.sum error {err.max():.3g} above the bound {bound.min():.3g}"
    # and it is a bf16 sum: not the fp32 sum rounded once (the GPU's add.bf16 tree)
    assert not torch.equal(s, x.float().sum(dim=0).bfloat16()) or not INTERPRET


@triton.jit
def _dot_kernel(a_ptr, b_ptr, c_ptr, out_ptr, M: tl.constexpr, N: tl.constexpr, K: tl.constexpr):
    m = tl.arange(0, M)
    n = tl.arange(0, N)
    k = tl.arange(0, K)
    a = tl.load(a_ptr + m[:, None] * K + k[None, :])           # bf16 [M, K]
    b = tl.load(b_ptr + k[:, None] * N + n[None, :])           # bf16 [K, N]
    acc = tl.load(c_ptr + m[:, None] * N + n[None, :])         # fp32 [M, N]
    acc = tl.dot(a, b, acc)                                    # fp32 accumulation
    tl.store(out_ptr + m[:, None] * N + n[None, :], acc.to(tl.bfloat16))
    tl.store(out_ptr + M * N + m[:, None] * N + n[None, :], tl.dot(a, b).to(tl.bfloat16))


def check_dot():
    M, N, K = 32, 16, 64
    gen = torch.Generator().manual_seed(5)
    a, b = (torch.randn(s, generator=gen).bfloat16() for s in ((M, K), (K, N)))
    c = torch.randn(M, N, generator=gen)
    out = torch.empty(2, M, N, device=DEVICE, dtype=torch.bfloat16)
    _dot_kernel[(1,)](a.to(DEVICE), b.to(DEVICE), c.to(DEVICE), out, M=M, N=N, K=K)
    out = out.cpu()
    for got, ref64, what in ((out[0], a.double() @ b.double() + c.double(), "tl.dot(a, b, acc)"),
                             (out[1], a.double() @ b.double(), "tl.dot(a, b)")):
        # fp32 accumulation then one bf16 rounding: PyTorch's own bf16 matmul is the yardstick
        lowp = (a.float() @ b.float() + (c if "acc" in what else 0)).bfloat16()
        err = (got.double() - ref64).abs().max().item()
        torch_err = (lowp.double() - ref64).abs().max().item()
        assert err <= 2 * torch_err + 1e-3, f"{what}: error {err:.3g} vs PyTorch's {torch_err:.3g}"


def test_dot_accumulates_in_fp32():
    check_dot()


@pytest.mark.skipif(not INTERPRET, reason="mutates the interpreter")
def test_mutation_stock_dot_is_caught(monkeypatch):
    """The dot check fails on the stock interpreter's tl.dot (np.matmul of the raw bits)."""
    from triton.runtime import interpreter as interp
    stock = interpreter_bf16._state["stock"]["create_dot"]

    def raw_bits_dot(self, a, b, d, *rest):
        if a.data.dtype == interpreter_bf16._BF16:
            a = interp.TensorHandle(a.data.view(np.uint16), a.dtype)
            b = interp.TensorHandle(b.data.view(np.uint16), b.dtype)
        return stock(self, a, b, d, *rest)
    monkeypatch.setattr(interp.InterpreterBuilder, "create_dot", raw_bits_dot)
    with pytest.raises(AssertionError, match="tl.dot"):
        check_dot()


def test_status_reports_the_version():
    ok, message = interpreter_bf16.status()
    if INTERPRET:
        assert ok and triton.__version__ in message, message


@pytest.mark.skipif(not INTERPRET, reason="the interpreter patch's own checks")
def test_unknown_version_self_check_and_loud_failure(monkeypatch):
    """On a Triton outside VERIFIED, install() runs _self_check(): None with the patch as it is,
    a message once the cast truncates; and require() then fails the bf16 tests (not skips)."""
    assert interpreter_bf16._self_check() is None
    truncate = lambda x32, rtz=False: (np.ascontiguousarray(x32, dtype=np.float32)  # noqa: E731
                                       .view(np.uint32) >> np.uint32(16)).astype(np.uint16)
    monkeypatch.setattr(interpreter_bf16, "bf16_bits_from_f32", truncate)
    assert "round to nearest even" in interpreter_bf16._self_check()
    monkeypatch.setitem(interpreter_bf16._state, "installed", False)
    monkeypatch.setitem(interpreter_bf16._state, "message", "Triton 9.9: self-check failed")
    with pytest.raises(pytest.fail.Exception, match="self-check failed"):
        interpreter_bf16.require()


_PTX_PROBE = r'''
import json, re, sys
import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget


@triton.jit
def cast_k(x_ptr, rne_ptr, rtz_ptr, N: tl.constexpr):
    i = tl.arange(0, N)
    x = tl.load(x_ptr + i)
    tl.store(rne_ptr + i, x.to(tl.bfloat16))
    tl.store(rtz_ptr + i, x.to(tl.bfloat16, fp_downcast_rounding="rtz"))


@triton.jit
def arith_k(x_ptr, y_ptr, a_ptr, m_ptr, x_ptr2, s_ptr, N: tl.constexpr):
    i = tl.arange(0, N)
    x = tl.load(x_ptr + i)
    y = tl.load(y_ptr + i)
    tl.store(a_ptr + i, x + y)
    tl.store(m_ptr + i, tl.maximum(x, y))
    tl.store(s_ptr, tl.sum(x, axis=0))


@triton.jit
def dot_k(a_ptr, b_ptr, o_ptr, N: tl.constexpr):
    i = tl.arange(0, N)
    a = tl.load(a_ptr + i[:, None] * N + i[None, :])
    b = tl.load(b_ptr + i[:, None] * N + i[None, :])
    tl.store(o_ptr + i[:, None] * N + i[None, :], tl.dot(a, b))


bf = "*bf16"
out = {}
for name, fn, sig in (("cast", cast_k, dict(x_ptr="*fp32", rne_ptr=bf, rtz_ptr=bf)),
                      ("arith", arith_k, dict(x_ptr=bf, y_ptr=bf, a_ptr=bf, m_ptr=bf, x_ptr2=bf, s_ptr=bf)),
                      ("dot", dot_k, dict(a_ptr=bf, b_ptr=bf, o_ptr="*fp32"))):
    src = triton.compiler.ASTSource(fn=fn, signature={**sig, "N": "constexpr"}, constexprs={"N": 64})
    ptx = triton.compile(src, target=GPUTarget("cuda", 90, 32)).asm["ptx"]
    out[name] = sorted(set(re.findall(r"\b(?:cvt|add|max|wgmma\.mma_async)\.[a-z0-9._]*", ptx)))
json.dump(out, open(sys.argv[1], "w"))
'''


def test_the_gpu_semantics_the_patch_emulates_are_in_the_ptx(tmp_path):
    """What the patch claims of the GPU, read in the sm_90 PTX of this Triton (compiled offline,
    a process without TRITON_INTERPRET): fp32 -> bf16 rounds to nearest even (cvt.rn) or toward
    zero (cvt.rz); bf16 add and max stay in bf16; tl.sum of bf16 adds in bf16; tl.dot of bf16
    accumulates in fp32 (wgmma ... f32.bf16.bf16)."""
    import json
    import os
    import subprocess
    import sys
    script = tmp_path / "probe.py"
    script.write_text(_PTX_PROBE)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, str(script), str(tmp_path / "ops.json")], env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    ops = json.loads((tmp_path / "ops.json").read_text())
    assert "cvt.rn.bf16.f32" in ops["cast"] and "cvt.rz.bf16.f32" in ops["cast"], ops["cast"]
    assert "add.bf16" in ops["arith"] or "add.rn.bf16" in ops["arith"], ops["arith"]
    assert "max.bf16" in ops["arith"], ops["arith"]
    assert not any(op.startswith("cvt.f32.bf16") for op in ops["arith"]), ops["arith"]  # no fp32 detour
    assert any(op.endswith(".f32.bf16.bf16") for op in ops["dot"]), ops["dot"]
