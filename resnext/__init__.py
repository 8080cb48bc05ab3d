"""Drop-in fused ResNet/ResNeXt modules on the Triton kernels in ``kernels``.

    import resnext
    model = resnext.convert(torchvision.models.resnext50_32x4d())   # same weights, same keys
    model = resnext.resnext50_32x4d()                               # or build one directly
"""
from .blocks import FusedBottleneck, is_fusable_bottleneck
from .convert import FUSED_MODULES, convert, register_fx_leaves
from .cuda_graphs import graph_inference, graph_train_step
from .models import Bottleneck, ResNet, resnet50, resnet101, resnext50_32x4d, resnext101_32x4d
from .modules import ConvBNAct, FusedSequential
from .regnet import FusedConvNormAct, FusedRegNetBottleneck
from .sync_batchnorm import SyncBatchNorm2d
from . import tuning
from .tuning import tune

__all__ = [
    "convert", "FUSED_MODULES", "register_fx_leaves",
    "graph_inference", "graph_train_step", "ConvBNAct", "FusedSequential", "FusedBottleneck", "is_fusable_bottleneck",
    "FusedRegNetBottleneck", "FusedConvNormAct", "SyncBatchNorm2d", "tune", "tuning",
    "Bottleneck", "ResNet", "resnet50", "resnet101", "resnext50_32x4d", "resnext101_32x4d",
]
