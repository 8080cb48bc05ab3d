"""The weight operand of the convolution kernels: packed once per weight change, or read as stored.

The forward and data-gradient kernels read a weight tile whose rows are contiguous in Cout:
``[k*k, Cin_g, Cout]``.  A cast or a layout the kernels cannot read as stored takes one copy
kernel (``pack_weight``), cached until the weight changes; otherwise the kernels read the
weight itself through ``weight_strides``.  Used by ``conv_bn_act`` and ``conv_grad`` alike.
"""
from typing import Optional, Tuple

import torch

from ._runtime import DerivedCache

Tensor = torch.Tensor


_PACKED = DerivedCache()


def pack_weight(weight: Tensor, dtype: torch.dtype) -> Tensor:
    """[Cout, Cin_g, KH, KW] -> [KH*KW, Cin_g, Cout] in ``dtype``, so a weight-tile row is
    contiguous in Cout: one copy kernel (cast and permute together).  The data-gradient
    kernel reads the same layout."""
    cout, cin_g, kh, kw = weight.shape
    # (``.to(dtype, memory_format=...)`` would return the permuted view itself when the dtype matches)
    packed = weight.new_empty((kh * kw, cin_g, cout), dtype=dtype)
    packed.view(kh, kw, cin_g, cout).copy_(weight.detach().permute(2, 3, 1, 0))
    return packed


def readable_in_place(weight: Tensor, dtype: torch.dtype) -> bool:
    """Whether the kernels can read ``weight`` [Cout, Cin_g, k, k] as stored: no cast needed
    and its two spatial axes flatten into one tap axis (contiguous or channels_last do)."""
    return weight.dtype == dtype and (weight.shape[3] == 1 or weight.stride(2) == weight.shape[3] * weight.stride(3))


def packed_weight(weight: Tensor, dtype: torch.dtype) -> Optional[Tensor]:
    """``pack_weight``, cached until the weight changes (an optimizer step, ``load_state_dict``,
    ``.to()``); None when no pack is needed (``readable_in_place``: the kernels then read the
    weight itself, no copy at all; e.g. fp32 training), else in eval no launch, in training
    one per weight per step."""
    if readable_in_place(weight, dtype):
        return None
    return _PACKED.get(weight, (weight,), dtype, lambda: pack_weight(weight, dtype))


def weight_operand(weight: Tensor, packed: Optional[Tensor], dtype: torch.dtype) -> Tensor:
    """What the forward and data-gradient kernels read: the pack if given, else the weight
    itself when ``readable_in_place``, else a fresh pack."""
    if packed is not None:
        return packed
    if readable_in_place(weight, dtype):
        return weight  # (a kernel operand: no detach needed, Triton reads the data pointer)
    return pack_weight(weight, dtype)


def weight_strides(w: Tensor) -> Tuple[int, int, int]:
    """Element strides of a weight operand along (tap, ci, co): a pack [k*k, Cin_g, Cout], or
    a weight [Cout, Cin_g, k, k] whose (kh, kw) axes flatten (``readable_in_place``)."""
    if w.dim() == 3:
        return w.stride(0), w.stride(1), w.stride(2)
    return w.stride(3), w.stride(1), w.stride(0)
