"""``convert(model)``: swap fusable pieces of an existing model for the fused modules."""
import sys

from torch import nn

from kernels import _runtime

from .blocks import FusedBottleneck, is_fusable_bottleneck
from .modules import ConvBNAct, FusedSequential
from .sync_batchnorm import SyncBatchNorm2d
from .regnet import FusedConvNormAct, FusedRegNetBottleneck, is_fusable_conv_norm_act, is_fusable_regnet_bottleneck

_FUSED = (FusedBottleneck, FusedRegNetBottleneck, FusedConvNormAct, FusedSequential)
# Every module class that launches the kernels: the leaves to give an FX tracer that should keep
# them whole (torchvision's create_feature_extractor(..., tracer_kwargs={"leaf_modules": [...]})).
FUSED_MODULES = (*_FUSED, ConvBNAct)


def register_fx_leaves():
    """Register the fused modules with timm's FX feature extraction as no-trace (leaf) modules,
    when timm is imported (``convert`` calls it): a model's fused blocks stay whole, and the
    extracted backbone still runs the kernels.  (An FX trace that goes through them records
    PyTorch's ops: a Proxy cannot go through a Triton launch.)"""
    fx = sys.modules.get("timm.layers._fx")
    if fx is not None:
        for cls in FUSED_MODULES:
            fx.register_notrace_module(cls)


def convert(model: nn.Module) -> nn.Module:
    """Fuse ``model`` in place and return it (use the return value: a root Sequential is replaced).

    * every torchvision/timm-style ``Bottleneck`` becomes a ``FusedBottleneck``, every timm
      RegNet ``Bottleneck`` a ``FusedRegNetBottleneck`` (norms: BatchNorm2d, FrozenBatchNorm2d,
      timm's BatchNormAct2d / FrozenBatchNormAct2d with ReLU or no activation);
    * every other timm ``ConvNormAct`` with a ReLU (a stem, a conv inside a block left to
      PyTorch) becomes a ``FusedConvNormAct``;
    * every ``Conv2d -> BatchNorm2d [-> ReLU]`` run inside an ``nn.Sequential`` is fused
      (the Sequential becomes a ``FusedSequential`` with the same children).

    * every ``nn.SyncBatchNorm`` (fused or not) becomes a ``SyncBatchNorm2d``: the same
      tensors and semantics in a module that is not an ``nn.SyncBatchNorm`` (which DDP
      refuses on the CPU); fused blocks merge its statistics across the ranks.

    Parameters, buffers and ``state_dict`` keys are unchanged (the same tensors: optimizers
    keep working).  Anything else (the 7x7 stem, dilated or biased convs, timm's
    SyncBatchNormAct, blocks with anti-aliasing or attention other than timm's SE/ECA) is left
    as it was.

    Each fused module gets its qualified name in the returned model as ``fused_name``: the
    warning of a kernel that cannot compile or launch names it (``kernels._runtime``).
    """
    register_fx_leaves()
    fused = _convert(model)
    for name, m in fused.named_modules():
        if isinstance(m, FUSED_MODULES):
            m.fused_name = name
            _runtime.NAMED_MODULES.add(m)
    return fused


def _convert(model: nn.Module) -> nn.Module:
    if type(model) is nn.SyncBatchNorm:
        return SyncBatchNorm2d.from_sync_batchnorm(model)
    _replace_sync_batchnorm(model)  # first, so that the blocks holding them can be fused
    if isinstance(model, _FUSED):
        return model
    if is_fusable_bottleneck(model):
        return FusedBottleneck(model)
    if is_fusable_regnet_bottleneck(model):
        return FusedRegNetBottleneck(model)
    if is_fusable_conv_norm_act(model):
        return FusedConvNormAct(model)
    for name, child in list(model.named_children()):
        new = _convert(child)  # a plain Sequential child comes back fused (see below)
        if new is not child:
            setattr(model, name, new)
    if type(model) is nn.Sequential:  # a Sequential passed as the root
        return FusedSequential.from_sequential(model) or model
    return model


def _replace_sync_batchnorm(model: nn.Module):
    for name, child in list(model.named_children()):
        if type(child) is nn.SyncBatchNorm:
            setattr(model, name, SyncBatchNorm2d.from_sync_batchnorm(child))
        else:
            _replace_sync_batchnorm(child)
