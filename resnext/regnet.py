"""The fused RegNet bottleneck (timm's ``timm.models.regnet.Bottleneck``) and timm's ``ConvNormAct``.

timm's RegNet block, with ``ConvNormAct`` children (``.conv``, ``.bn`` = ``BatchNormAct2d``)::

    x1 = conv1(x)            1x1, norm + ReLU
    x2 = conv2(x1)           grouped 3x3, norm + ReLU
    x2 = se(x2)              RegNetY: a squeeze-excite gate; RegNetX: Identity
    x3 = conv3(x2)           1x1, norm without activation
    y  = act3(drop_path(x3) + downsample(x))   (no shortcut at all when downsample is None;
                                                act3 is Identity with linear_out)

Fused like the ResNet bottleneck: conv1 -> conv2 -> conv3 with each norm applied on load by
the next convolution, the downsample's conv + norm pending until the final pass (or folded
in eval).

RegNetY's SE (timm ``SEModule``, recognised by ``gates.excite_of``) between conv2 and conv3,
in train and eval alike (``kernels.squeeze_excite``, "RegNetY"): conv2 writes its raw output
z2 and one more read of z2 after bn2's finalize gives the squeeze m = mean relu(bn2(z2))
(an output of conv2's autograd Function); the excite runs the SE's own layers on [N, C]; conv3
applies bn2 + ReLU and then the gate while loading z2 (its prologue), so neither the SE's input
nor its output is ever stored.  Left to PyTorch: a synchronised bn2 (the squeeze has no
cross-rank statistics).

drop_path (timm ``DropPath``, ``gates._is_drop_path``): the identity in eval, with
``drop_prob == 0``, or without a shortcut (timm applies it only when ``downsample`` is not None):
the plain fused path.  Active in training: conv3 writes z3 pending, the per-sample mask is drawn
as ``timm.layers.drop_path`` draws it (``gates.drop_path_mask``, after conv3 and before the
shortcut runs: timm's RNG order), and one pass computes ``act3(mask[n] * bn3(z3) + shortcut')``
(``kernels.squeeze_excite.GatedBNActFn``, a train-mode downsample's BN joined as res_scale /
res_shift as ``gates.gated_final`` does).  With bn3 folded (eval-mode or frozen norm in a
training block) conv3's output is already normalised and the mask multiply + add run on PyTorch.
"""
import sys
from typing import Optional

import torch
from torch import nn

from kernels import sync_bn
from kernels.squeeze_excite import GatedBNActFn

from .blocks import downsample_stage, split_downsample
from .gates import _is_drop_path, drop_path_active, drop_path_mask, excite_of
from .modules import Pending, conv_bn_stage, finish, fusable, like_input, materialize, runs_eager
from .norms import conv_norm_pair, is_noop, norm_act
from .routing import routed_to_pytorch

_CHILDREN = ("conv1", "conv2", "se", "conv3", "act3", "downsample", "drop_path")


def _regnet_bottleneck_forward():
    regnet = sys.modules.get("timm.models.regnet")
    return regnet.Bottleneck.forward if regnet is not None else None


def _stage(m: nn.Module, kernel_size, relu: Optional[bool]):
    """(conv, norm) of a ConvNormAct child we fuse with this kernel size, 1x1 stride 1 unless 3x3,
    and this trailing activation (None: either); else None."""
    pair = conv_norm_pair(m) if isinstance(m, nn.Module) else None
    if pair is None or not is_noop(getattr(m, "aa", None)) or not fusable(*pair):
        return None
    conv, bn = pair
    if conv.kernel_size != kernel_size or (kernel_size == (1, 1) and conv.stride != (1, 1)):
        return None
    return pair if relu is None or norm_act(bn) is relu else None


def is_fusable_regnet_bottleneck(block: nn.Module) -> bool:
    """timm's RegNet ``Bottleneck`` (its forward, not a subclass's) whose computation we reproduce."""
    if _regnet_bottleneck_forward() is None or type(block).forward is not _regnet_bottleneck_forward():
        return False
    if any(name not in _CHILDREN for name, _ in block.named_children()):
        return False
    get = lambda name: getattr(block, name, None)  # noqa: E731
    if (_stage(get("conv1"), (1, 1), True) is None or _stage(get("conv2"), (3, 3), True) is None
            or _stage(get("conv3"), (1, 1), False) is None):
        return False
    dp = get("drop_path")
    if type(get("act3")) not in (nn.ReLU, nn.Identity) or not (is_noop(dp) or _is_drop_path(dp)):
        return False
    if not is_noop(get("se")) and excite_of(get("se")) is None:  # RegNetY: timm's SEModule only
        return False
    ds = get("downsample")
    return ds is None or type(ds) is nn.Identity or split_downsample(ds) is not None


class FusedRegNetBottleneck(nn.Module):
    """Drop-in replacement of timm's RegNet ``Bottleneck`` (same children, same state_dict)."""

    def __init__(self, block: nn.Module):
        super().__init__()
        if not is_fusable_regnet_bottleneck(block):
            raise ValueError(f"cannot fuse {type(block).__name__}: expected timm's RegNet Bottleneck with bias-free "
                             f"1x1/3x3/1x1 ConvNormAct (BatchNorm + ReLU), no dilation or anti-aliasing, "
                             f"no SE or timm's SEModule, no drop-path or timm's DropPath, and a 1x1 conv + norm "
                             f"(or no) shortcut")
        for name, m in block.named_children():
            self.add_module(name, m)
        for name in _CHILDREN:  # timm stores an absent shortcut as downsample = None
            if name not in self._modules:
                setattr(self, name, getattr(block, name, None))
        self.train(block.training)

    def _eager_forward(self, x: torch.Tensor) -> torch.Tensor:
        """timm's forward on PyTorch's own ops (no Triton here)."""
        shortcut = x
        x = self.conv3(self.se(self.conv2(self.conv1(x))))
        if self.downsample is not None:
            x = self.drop_path(x) + self.downsample(shortcut)
        return self.act3(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.jit.is_scripting():  # TorchScript cannot launch Triton kernels
            return self._eager_forward(x)
        return self._fused_forward(x)

    @torch.jit.unused
    def _fused_forward(self, x: torch.Tensor) -> torch.Tensor:
        if runs_eager(x, self.conv1.conv.weight) or routed_to_pytorch(self, x):
            return self._eager_forward(x)
        se = None if is_noop(self.se) else self.se
        if se is not None and sync_bn.group_name(self.conv2.bn) is not None:
            return self._eager_forward(x)  # the squeeze has no cross-rank statistics
        out = conv_bn_stage(x, self.conv1.conv, self.conv1.bn, relu=True)
        if se is None:
            out = conv_bn_stage(out, self.conv2.conv, self.conv2.bn, relu=True)
        else:  # RegNetY: conv2 returns z2 pending (either BN mode) and the squeeze of relu(bn2(z2))
            out, m = conv_bn_stage(out, self.conv2.conv, self.conv2.bn, relu=True, squeeze="relu")
            z = out.z
            gate = excite_of(se)(m.to(z.dtype).view(z.shape[0], z.shape[1], 1, 1))
            out = out._replace(gate=gate)  # applied after bn2 + ReLU in conv3's prologue
        relu = type(self.act3) is nn.ReLU
        if self.downsample is not None and drop_path_active(self):
            y = self._drop_path_final(out, x, relu)
        else:
            residual = downsample_stage(x, self.downsample) if self.downsample is not None else None
            y = finish(conv_bn_stage(out, self.conv3.conv, self.conv3.bn, relu=relu, residual=residual))
        return like_input(y, x, self.conv1.conv.weight, self.conv2.conv.weight, self.conv3.conv.weight)

    def _drop_path_final(self, out, x: torch.Tensor, relu: bool) -> torch.Tensor:
        """``act3(mask * bn3(conv3(out)) + downsample(x))`` with timm's drop_path mask, drawn after
        conv3 and before the shortcut runs (timm's RNG order)."""
        main = conv_bn_stage(out, self.conv3.conv, self.conv3.bn, relu=False)
        like = main.z if isinstance(main, Pending) else main
        mask = drop_path_mask(self.drop_path, like)
        residual = downsample_stage(x, self.downsample)
        if not isinstance(main, Pending):  # bn3 folded (conv3's output is final): multiply and add on PyTorch
            y = torch.addcmul(materialize(residual).to(main.dtype), main, mask)
            return torch.relu(y) if relu else y
        res_scale = res_shift = None
        if isinstance(residual, Pending) and not residual.relu and residual.gate is None:
            residual, res_scale, res_shift = residual.z, residual.scale, residual.shift  # its BN joins the pass
        else:
            residual = materialize(residual)
            if residual.dtype != like.dtype:
                residual = residual.to(like.dtype)
        return GatedBNActFn.apply(main.z, main.scale, main.shift, residual, res_scale, res_shift, relu, mask)


class FusedConvNormAct(nn.Module):
    """timm's ``ConvNormAct`` (conv -> norm [-> act] [-> aa]) with conv + norm (+ ReLU) fused;
    ``aa`` (anti-aliasing), when present, runs on PyTorch after it.  Same children."""

    def __init__(self, m: nn.Module):
        super().__init__()
        pair = conv_norm_pair(m)
        if pair is None or not fusable(*pair):
            raise ValueError(f"cannot fuse {type(m).__name__}: expected timm's ConvNormAct with a bias-free 1x1 "
                             f"or 3x3 Conv2d (no dilation) and a BatchNorm with ReLU or no activation")
        for name, child in m.named_children():
            self.add_module(name, child)
        self.train(m.training)

    @property
    def in_channels(self) -> int:
        return self.conv.in_channels

    @property
    def out_channels(self) -> int:
        return self.conv.out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.jit.is_scripting():  # TorchScript cannot launch Triton kernels
            return self._eager_forward(x)
        return self._fused_forward(x)

    def _eager_forward(self, x: torch.Tensor) -> torch.Tensor:
        """timm's forward on PyTorch's own ops (TorchScript compiles it)."""
        return self._anti_alias(self.bn(self.conv(x)))

    @torch.jit.unused
    def _fused_forward(self, x: torch.Tensor) -> torch.Tensor:
        if runs_eager(x, self.conv.weight) or routed_to_pytorch(self, x):
            return self._eager_forward(x)
        return self._anti_alias(like_input(finish(conv_bn_stage(x, self.conv, self.bn, relu=False)), x,
                                           self.conv.weight))

    def _anti_alias(self, y: torch.Tensor) -> torch.Tensor:
        if hasattr(self, "aa"):  # (alone in its ``if``: resolved when scripting)
            if self.aa is not None:
                y = self.aa(y)
        return y


def is_fusable_conv_norm_act(m: nn.Module) -> bool:
    """A timm ConvNormAct that ``convert`` fuses on its own: with a ReLU.  Without one its output
    may be modified in place by the caller (timm's SK block: ``x += shortcut``), which eager BN
    allows but the fused ops' saved output does not."""
    pair = conv_norm_pair(m)
    return pair is not None and fusable(*pair) and norm_act(pair[1]) is True
