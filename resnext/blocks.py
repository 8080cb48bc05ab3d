"""The fused ResNet/ResNeXt bottleneck.

Train mode (batch statistics), four convolutions and one elementwise pass::

    z1 = conv1(x)                              + stats1   (1x1 GEMM)
    z2 = conv2(relu(bn1(z1)))                  + stats2   (grouped 3x3; bn1+ReLU applied on load)
    z3 = conv3(relu(bn2(z2)))                  + stats3   (1x1 GEMM; bn2+ReLU applied on load)
    zd = conv_d(x)                             + stats_d  (strided 1x1, when there is a downsample)
    y  = relu(bn3(z3) + bn_d(zd) or x)                    (bn_act: one read of each, one write)

Eval mode folds each BN into its convolution's epilogue; conv3 adds the identity
(or the downsample output) and applies the final ReLU in its epilogue.

timm's SE / ECA module and drop_path (in training) join the final pass as a per-(image,
channel) gate, the squeeze coming from conv3's epilogue; an active drop_block runs the
block on PyTorch (see resnext/gates.py).
"""
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn


from kernels import sync_bn
from kernels.batchnorm import check_batch_stats
from kernels.bottleneck import BottleneckFn, StageConf
from kernels.conv_bn_act import check_conv_inputs, out_size
from kernels.weights import packed_weight

from . import gates
from .modules import FusedSequential, _compute_dtype, conv_bn_stage, finish, fusable, like_input, runs_eager
from .norms import conv_norm_pair, is_noop, module_attr, norm_act, norm_view
from .routing import routed_to_pytorch

# timm's optional pieces: each is fused when it is a no-op or one the fused path applies
# (gates.extra_is_fusable: an SE/ECA gate before the residual add, drop_path, an inactive drop_block).
_EXTRAS = ("se", "drop_path", "drop_block", "aa")
_ACTS = ("relu", "act1", "act2", "act3")
_PARTS = ("conv1", "bn1", "conv2", "bn2", "conv3", "bn3")


def split_downsample(ds: Optional[nn.Module]):
    """``(pre, conv, norm)`` of a downsample whose conv + norm we fuse, else None.

    torchvision's and timm's ``Sequential(conv, norm)``, timm's avg_down ``Sequential(pool, conv,
    norm)`` (``pre`` is the pool, left to PyTorch), and timm RegNet's ``ConvNormAct`` or
    ``Sequential(pool, ConvNormAct)``.  ``pre`` is None when there is nothing before the conv.
    """
    mods = list(ds) if type(ds) is nn.Sequential else [ds] if ds is not None else []
    pre = mods.pop(0) if len(mods) in (2, 3) and not isinstance(mods[0], nn.Conv2d) else None
    if len(mods) == 1:
        pair = conv_norm_pair(mods[0])
        if pair is None or not is_noop(getattr(mods[0], "aa", None)):
            return None
        mods = list(pair)
    if len(mods) == 2 and fusable(*mods):
        return pre, mods[0], mods[1]
    return None


def downsample_stage(x: torch.Tensor, ds: Optional[nn.Module]):
    """The shortcut of a block: ``x``, ``ds(x)`` on PyTorch, or its conv + norm fused (pending in
    train mode, so that its BatchNorm joins the block's final pass)."""
    if ds is None:
        return x
    split = split_downsample(ds)
    if split is None:
        return ds(x)
    pre, conv, norm = split
    return conv_bn_stage(pre(x) if pre is not None else x, conv, norm, relu=False)


def is_fusable_bottleneck(block: nn.Module) -> bool:
    """A torchvision/timm-style Bottleneck whose forward we reproduce exactly."""
    names = ("conv1", "bn1", "conv2", "bn2", "conv3", "bn3")
    if not all(isinstance(getattr(block, n, None), nn.Module) for n in names):
        return False
    if not all(fusable(getattr(block, c), getattr(block, b)) for c, b in zip(names[::2], names[1::2])):
        return False
    if block.conv1.kernel_size != (1, 1) or block.conv2.kernel_size != (3, 3) or block.conv3.kernel_size != (1, 1):
        return False
    if block.conv1.stride != (1, 1) or block.conv3.stride != (1, 1):
        return False
    if not all(gates.extra_is_fusable(n, getattr(block, n, None)) for n in _EXTRAS):
        return False
    if norm_act(block.bn3):  # bn3's own ReLU would precede the residual add
        return False
    acts = [getattr(block, n) for n in _ACTS if hasattr(block, n)]
    if not acts or not all(type(a) is nn.ReLU for a in acts):
        return False
    known = set(names) | set(_EXTRAS) | set(_ACTS) | {"downsample"}
    return all(name in known for name, _ in block.named_children())


class FusedBottleneck(nn.Module):
    """Drop-in replacement of a torchvision/timm ``Bottleneck`` (same children, same state_dict)."""

    def __init__(self, block: nn.Module):
        super().__init__()
        if not is_fusable_bottleneck(block):
            raise ValueError(f"cannot fuse {type(block).__name__}: expected a Bottleneck with bias-free 1x1/3x3/1x1 "
                             f"convolutions, BatchNorm2d, ReLU, no dilation/anti-aliasing, and as SE / drop-path "
                             f"only timm's SEModule, EcaModule, DropPath, DropBlock2d")
        for name, m in block.named_children():
            self.add_module(name, m)
        self.stride = self.conv2.stride[0]
        self.train(block.training)

    def _eager_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The unconverted Bottleneck's computation on PyTorch's own ops (no Triton here).
        TorchScript compiles it: a ``hasattr`` test alone in an ``if`` is resolved when scripting."""
        out = F.relu(self.bn1(self.conv1(x)), inplace=True)
        out = self.bn2(self.conv2(out))
        if hasattr(self, "drop_block"):  # timm's order: drop_block, act2, ..., se, drop_path
            if self.drop_block is not None:
                out = self.drop_block(out)
        out = F.relu(out, inplace=True)
        out = self.bn3(self.conv3(out))
        if hasattr(self, "se"):
            if self.se is not None:
                out = self.se(out)
        if hasattr(self, "drop_path"):
            if self.drop_path is not None:
                out = self.drop_path(out)
        shortcut = x
        if hasattr(self, "downsample"):
            if self.downsample is not None:
                shortcut = self.downsample(x)
        out += shortcut
        return F.relu(out, inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.jit.is_scripting():  # TorchScript cannot launch Triton kernels
            return self._eager_forward(x)
        return self._fused_forward(x)

    @torch.jit.unused
    def _fused_forward(self, x: torch.Tensor) -> torch.Tensor:
        # (children read through module_attr: the same lookups as self.conv1 etc., ~1 us less each)
        conv1, bn1, conv2, bn2, conv3, bn3 = (module_attr(self, n) for n in _PARTS)
        if runs_eager(x, conv1.weight) or gates.drop_block_active(self) or routed_to_pytorch(self, x):
            # (drop_block: a spatial mask; routed: PyTorch measured faster for this block, resnext.tuning)
            return self._eager_forward(x)
        gated = gates.has_gate(self)
        if gated and sync_bn.group_name(bn3) is not None:
            return self._eager_forward(x)  # the squeeze path has no cross-rank statistics (yet)
        if not gated:
            out = one_node_train_block(self, x, conv1, bn1, conv2, bn2, conv3, bn3)
            if out is not None:
                return like_input(out, x, conv1.weight, conv2.weight, conv3.weight)
        out = conv_bn_stage(x, conv1, bn1, relu=True)
        out = conv_bn_stage(out, conv2, bn2, relu=True)

        def make_identity():  # pending in train mode when fused: its BN joins the final pass
            return downsample_stage(x, module_attr(self, "downsample"))

        if gated:  # SE / ECA, drop_path in training: the gate joins the final pass
            out = gates.gated_final(self, out, make_identity)
        else:
            out = conv_bn_stage(out, conv3, bn3, relu=True, residual=make_identity())
        return like_input(finish(out), x, conv1.weight, conv2.weight, conv3.weight)


def one_node_train_block(block: nn.Module, x: torch.Tensor, conv1, bn1, conv2, bn2, conv3, bn3):
    """An ungated block's output through ``kernels.bottleneck.BottleneckFn`` (one autograd node,
    the per-stage path's launches) when autograd records and every BN uses batch statistics on
    this rank alone, with the identity or a fused conv + BN as the shortcut; else None (the
    per-stage path decides, and raises what it raises).  Not while torch.compile traces: it
    sees the per-stage operators."""
    if not torch.is_grad_enabled() or torch.compiler.is_compiling():
        return None
    stages = [(conv1, bn1), (conv2, bn2), (conv3, bn3)]
    ds = module_attr(block, "downsample")
    if ds is not None:
        split = split_downsample(ds)
        if split is None or split[0] is not None:  # on PyTorch, or an avg_down pool before the conv
            return None
        stages.append(split[1:])
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        return None
    check_conv_inputs(x, conv1.weight, conv1.stride[0], conv1.padding[0], conv1.groups, same_dtype=False)
    dtype = _compute_dtype(x, conv1.weight)  # (the per-stage path's checks, in its order)
    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        return None
    N, _, h, w = x.shape
    confs, params = [], []
    for i, (conv, bn) in enumerate(stages):
        if i == 3:  # the downsample reads x
            h, w = x.shape[2], x.shape[3]
        weight = conv.weight
        norm = norm_view(bn)
        if (weight.dtype != conv1.weight.dtype or not norm.batch_stats or (i == 3 and norm.relu)
                or sync_bn.group_name(bn) is not None):
            return None
        k, stride, padding = conv.kernel_size[0], conv.stride[0], conv.padding[0]
        h, w = out_size(h, k, stride, padding), out_size(w, k, stride, padding)
        check_batch_stats(bn, N * h * w)
        confs.append(StageConf(packed_weight(weight, dtype), stride, padding, conv.groups, norm.running_mean,
                               norm.running_var, norm.num_batches_tracked, norm.momentum, norm.eps))
        params += [weight, norm.weight, norm.bias]
    if ds is None:
        confs.append(None)
        params += [None, None, None]
    return BottleneckFn.apply(x, *params, tuple(confs), dtype)


def fuse_sequential(seq: nn.Sequential) -> nn.Module:
    """Return a FusedSequential for ``seq`` when it has a fusable run, else ``seq`` itself."""
    return FusedSequential.from_sequential(seq) or seq
