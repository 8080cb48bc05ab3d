"""``convert(model)``: swap fusable pieces of an existing model for the fused modules."""
from torch import nn

from .blocks import FusedBottleneck, is_fusable_bottleneck
from .modules import FusedSequential
from .regnet import FusedConvNormAct, FusedRegNetBottleneck, is_fusable_conv_norm_act, is_fusable_regnet_bottleneck

_FUSED = (FusedBottleneck, FusedRegNetBottleneck, FusedConvNormAct, FusedSequential)


def convert(model: nn.Module) -> nn.Module:
    """Fuse ``model`` in place and return it (use the return value: a root Sequential is replaced).

    * every torchvision/timm-style ``Bottleneck`` becomes a ``FusedBottleneck``, every timm
      RegNet ``Bottleneck`` a ``FusedRegNetBottleneck`` (norms: BatchNorm2d, FrozenBatchNorm2d,
      timm's BatchNormAct2d / FrozenBatchNormAct2d with ReLU or no activation);
    * every other timm ``ConvNormAct`` with a ReLU (a stem, a conv inside a block left to
      PyTorch) becomes a ``FusedConvNormAct``;
    * every ``Conv2d -> BatchNorm2d [-> ReLU]`` run inside an ``nn.Sequential`` is fused
      (the Sequential becomes a ``FusedSequential`` with the same children).

    Parameters, buffers and ``state_dict`` keys are unchanged (the same tensors: optimizers
    keep working).  Anything else (the 7x7 stem, dilated or biased convs, SyncBatchNorm,
    blocks with SE / drop-path / anti-aliasing) is left as it was.
    """
    if isinstance(model, _FUSED):
        return model
    if is_fusable_bottleneck(model):
        return FusedBottleneck(model)
    if is_fusable_regnet_bottleneck(model):
        return FusedRegNetBottleneck(model)
    if is_fusable_conv_norm_act(model):
        return FusedConvNormAct(model)
    for name, child in list(model.named_children()):
        new = convert(child)  # a plain Sequential child comes back fused (see below)
        if new is not child:
            setattr(model, name, new)
    if type(model) is nn.Sequential:  # a Sequential passed as the root
        return FusedSequential.from_sequential(model) or model
    return model
