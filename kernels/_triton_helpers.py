"""Small ``@triton.jit`` functions shared by the convolution kernels."""
import triton
import triton.language as tl


@triton.jit
def mma(a, b, acc, ALLOW_TF32: tl.constexpr):
    """acc + a @ b in fp32: TF32 when allowed (fp32 inputs), else exact products."""
    if ALLOW_TF32:
        return tl.dot(a, b, acc)
    else:
        return tl.dot(a, b, acc, input_precision="ieee")


@triton.jit
def has_nonfinite(acc):
    """Whether a 2-D tile holds a NaN or an Inf (one block-wide reduction)."""
    bad = (acc != acc) | (tl.abs(acc) == float("inf"))
    return tl.max(tl.max(bad.to(tl.int32), axis=1), axis=0) > 0
