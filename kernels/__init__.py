"""Triton kernels for ResNeXt: fused convolution + BatchNorm + residual + ReLU.

``conv_bn_act`` (grouped 3x3 and 1x1, NHWC inside) and ``bn_act`` are the fused ops;
``kernels.reference`` holds their plain-PyTorch definitions (also the CPU fallback).
"""
from ._runtime import INTERPRET, use_triton
from .batchnorm import bn_act, bn_finalize, folded_scale_shift, merge_stats, uses_batch_stats
from .conv_bn_act import conv1x1_bn_act, conv3x3_bn_act, conv_bn_act

__all__ = [
    "INTERPRET", "use_triton", "conv_bn_act", "conv3x3_bn_act", "conv1x1_bn_act", "bn_act",
    "merge_stats", "bn_finalize", "folded_scale_shift", "uses_batch_stats",
]
