"""FLOPs and minimum bytes, counted by hand from shapes (no profiler involved).

Conventions (see benchmarks/README.md):

* FLOPs: 2 per multiply-add of the convolutions (and the classifier for a model);
  BatchNorm, ReLU and adds are left out (under 1 % of a bottleneck).  A backward pass is
  2x the forward (data gradient + weight gradient), a training step 3x.
* Minimum bytes: every input tensor read once and every output tensor written once, in
  the activation dtype (weights included; per-channel vectors in fp32).  It is a floor no
  implementation can beat, not a model of what one moves; ``bottleneck_traffic`` models
  what the eager and fused designs move (docs/performance.md, /work/shared/NOTES.md).
"""
import torch

from .shapes import ConvShape, block_convs, model_convs, stem_and_head_macs

_DTYPE_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4, "fp64": 8}
TORCH_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32, "fp64": torch.float64}


def dtype_bytes(dtype) -> int:
    """Bytes per element of a dtype given as a name ('bf16') or a torch.dtype."""
    if isinstance(dtype, torch.dtype):
        return torch.empty((), dtype=dtype).element_size()
    return _DTYPE_BYTES[dtype]


def conv_macs(c: ConvShape, batch: int = 1) -> int:
    return batch * c.ho * c.wo * c.cout * c.cin_per_group * c.ksize * c.ksize


def conv_flops(c: ConvShape, batch: int, mode: str = "eval") -> int:
    """``mode``: eval / train (forward), backward (dgrad + wgrad), fwdbwd."""
    fwd = 2 * conv_macs(c, batch)
    return {"eval": fwd, "train": fwd, "backward": 2 * fwd, "fwdbwd": 3 * fwd}[mode]


def conv_min_bytes(c: ConvShape, batch: int, dtype, mode: str = "eval") -> int:
    """Compulsory traffic of one fused conv + BN [+ residual] [+ ReLU] layer.

    eval/train forward: read x, w, [residual]; write y.
    backward: read dy, x, y (ReLU mask and BN's normalised output), w; write dx, dw,
    [d residual]; plus the per-channel statistics (fp32, negligible).
    """
    e = dtype_bytes(dtype)
    x = batch * c.cin * c.h * c.w * e
    y = batch * c.cout * c.ho * c.wo * e
    w = c.cout * c.cin_per_group * c.ksize * c.ksize * e
    vectors = 4 * c.cout * 4  # gamma, beta, mean, var (fp32)
    res = y if c.residual else 0
    if mode in ("eval", "train"):
        return x + w + res + y + vectors
    if mode == "backward":
        return (y + x + y + w) + (x + w + res) + vectors  # reads: dy, x, y, w; writes: dx, dw, dres
    raise ValueError(f"unknown mode {mode!r}")


def block_flops(arch: str, stage: int, index: int, batch: int, mode: str = "fwd", image: int = 224) -> int:
    """``mode``: fwd (eval or train forward) or fwdbwd."""
    factor = {"fwd": 1, "eval": 1, "train": 1, "fwdbwd": 3}[mode]
    return factor * sum(2 * conv_macs(c, batch) for c in block_convs(arch, stage, index, image))


def block_min_bytes(arch: str, stage: int, index: int, batch: int, dtype, mode: str = "fwd", image: int = 224) -> int:
    """Compulsory traffic of one bottleneck: read x and the weights, write y (fwd);
    fwdbwd adds reading dy and writing dx and the weight gradients (activations the
    backward needs are assumed recomputed: the true floor)."""
    e = dtype_bytes(dtype)
    convs = block_convs(arch, stage, index, image)
    first, last = convs[0], convs[2]
    x = batch * first.cin * first.h * first.w * e
    y = batch * last.cout * last.ho * last.wo * e
    w = sum(c.cout * c.cin_per_group * c.ksize ** 2 for c in convs) * e
    if mode in ("fwd", "eval", "train"):
        return x + w + y
    if mode == "fwdbwd":
        return 2 * (x + w + y)
    raise ValueError(f"unknown mode {mode!r}")


def bottleneck_traffic(cin: int, width: int, cout: int, design: str) -> int:
    """Elements moved per output pixel by one stride-1 bottleneck's training forward.

    Multiply by H*W and the element size for bytes.  ``design``:

    * ``eager``: conv, BN (a statistics read, then read + write to apply), ReLU, add and
      ReLU as separate kernels;
    * ``fused``: K1 conv1 writes z1 + statistics; K2 grouped conv applies bn1 + ReLU on
      load and writes z2; K3 conv3 applies bn2 + ReLU on load and writes z3; K4 applies
      bn3 + residual + ReLU.
    """
    if design == "eager":
        conv1, bn1, relu1 = cin + width, 3 * width, 2 * width
        conv2, bn2, relu2 = 2 * width, 3 * width, 2 * width
        conv3, bn3, add, relu = width + cout, 3 * cout, 3 * cout, 2 * cout
        return conv1 + bn1 + relu1 + conv2 + bn2 + relu2 + conv3 + bn3 + add + relu
    if design == "fused":
        return (cin + width) + (width + width) + (width + cout) + 3 * cout
    raise ValueError(f"unknown design {design!r}")


def model_flops(arch: str, batch: int, task: str = "inference", image: int = 224) -> int:
    """Convolutions + stem + classifier; ``task``: inference (1x) or train (3x)."""
    fwd = 2 * batch * (sum(conv_macs(c) for c in model_convs(arch, image)) + stem_and_head_macs(image))
    return fwd * (3 if task == "train" else 1)
