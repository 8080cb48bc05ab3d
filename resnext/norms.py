"""What the fused path needs from a normalisation module, decided in one place.

The fused modules accept a norm layer when they reproduce its forward exactly, matched by
behaviour (the class's ``forward`` function), not by name, so a subclass that overrides
``forward`` is left to PyTorch:

* ``nn.BatchNorm2d`` (and subclasses keeping its forward): batch statistics in training,
  the running ones folded into the convolution's epilogue otherwise; ``SyncBatchNorm2d``
  (what convert makes of ``nn.SyncBatchNorm``) the same, its statistics merged across ranks;
* torchvision's ``FrozenBatchNorm2d`` (buffers only, ``scale = w * rsqrt(rv + eps)``): always
  the running statistics, so always the folded path, in train mode too (gradients reach the
  input only; there is nothing to update);
* timm's ``BatchNormAct2d`` / ``FrozenBatchNormAct2d``: the same, followed by the layer's own
  ``drop`` (must be a no-op) and ``act`` (ReLU, fused into the epilogue, or Identity).

torchvision and timm are not dependencies: their classes are looked up in ``sys.modules``
(a model holding one of their layers has imported the module that defines it).
"""
import sys
from typing import NamedTuple, Optional

import torch
from torch import nn

from kernels.batchnorm import running_stats, uses_batch_stats

Tensor = torch.Tensor


class NormKind(NamedTuple):
    """What a norm class computes (fixed per class)."""
    frozen: bool  # always the running statistics, never updated (FrozenBatchNorm2d)
    has_act: bool  # followed by its own ``drop`` and ``act`` children (timm's *Act2d)


class NormView(NamedTuple):
    """What one forward of a fusable norm needs (``norm_view``, computed per call)."""
    batch_stats: bool  # normalise with this batch's statistics (else the running ones, folded)
    weight: Optional[Tensor]  # [C] gamma, or None (affine=False)
    bias: Optional[Tensor]  # [C] beta, or None
    running_mean: Optional[Tensor]  # [C] to update in this forward (batch_stats only), else None
    running_var: Optional[Tensor]
    num_batches_tracked: Optional[Tensor]
    momentum: Optional[float]
    eps: float
    relu: bool  # the norm's own trailing ReLU (timm's BatchNormAct2d with act=ReLU)


_BATCHNORM = NormKind(frozen=False, has_act=False)


def _known_forwards() -> dict:
    """Each accepted norm class's forward function -> its NormKind."""
    from .sync_batchnorm import SyncBatchNorm2d  # BatchNorm2d's semantics, statistics over its group
    known = {nn.BatchNorm2d.forward: _BATCHNORM, SyncBatchNorm2d.forward: _BATCHNORM}
    tv = sys.modules.get("torchvision.ops.misc")
    if tv is not None:
        known[tv.FrozenBatchNorm2d.forward] = NormKind(frozen=True, has_act=False)
    timm_norm_act = sys.modules.get("timm.layers.norm_act")
    if timm_norm_act is not None:
        known[timm_norm_act.BatchNormAct2d.forward] = NormKind(frozen=False, has_act=True)
        known[timm_norm_act.FrozenBatchNormAct2d.forward] = NormKind(frozen=True, has_act=True)
    return known


_KIND_BY_TYPE = {}  # type -> NormKind or None, filled on first sight of each type


def norm_kind(bn: nn.Module) -> Optional[NormKind]:
    """The NormKind of ``bn``'s class, None when its forward is not one we reproduce."""
    cls = type(bn)
    if cls not in _KIND_BY_TYPE:
        kind = _known_forwards().get(getattr(cls, "forward", None))
        if kind is _BATCHNORM and not isinstance(bn, nn.BatchNorm2d):
            kind = None  # BatchNorm1d/3d share the forward but check a different input rank
        _KIND_BY_TYPE[cls] = kind
    return _KIND_BY_TYPE[cls]


_MISSING = object()
_PLAIN_ATTR = {}  # (class, name) -> whether ``name`` resolves through Module.__getattr__ alone


def module_attr(m: nn.Module, name: str, default=None):
    """``getattr(m, name, default)``, read from the module's own dicts when its class defines
    neither ``name`` nor an attribute hook of its own (what Python and ``Module.__getattr__``
    do: the instance dict, then ``_parameters``, ``_buffers``, ``_modules``): host time, a
    name found costs ~0.8 us through ``Module.__getattr__``, one missing ~3 us (a raised and
    caught AttributeError), per forward of every fused block."""
    cls = type(m)
    plain = _PLAIN_ATTR.get((cls, name))
    if plain is None:
        plain = _PLAIN_ATTR[(cls, name)] = (
            isinstance(m, nn.Module) and cls.__getattr__ is nn.Module.__getattr__
            and cls.__getattribute__ is nn.Module.__getattribute__ and not hasattr(cls, name))
    if not plain:
        return getattr(m, name, default)
    d = m.__dict__
    value = d.get(name, _MISSING)
    if value is _MISSING:
        value = d["_parameters"].get(name, _MISSING)
        if value is _MISSING:
            value = d["_buffers"].get(name, _MISSING)
            if value is _MISSING:
                value = d["_modules"].get(name, default)
    return value


def is_noop(m: Optional[nn.Module]) -> bool:
    """Whether ``m`` (an optional piece of a block or norm) leaves its input as it is, always:
    absent, ``nn.Identity``, or timm's DropPath / DropBlock2d with probability 0."""
    if m is None or type(m) is nn.Identity:
        return True
    drop = sys.modules.get("timm.layers.drop")
    if drop is not None and type(m) in (drop.DropPath, drop.DropBlock2d):
        return not m.drop_prob
    return False


def norm_act(bn: nn.Module) -> Optional[bool]:
    """The trailing activation of a fusable norm: True ReLU, False none; None when ``bn`` is not
    a norm we fuse (unknown class, an activation other than ReLU, an active drop, missing buffers)."""
    kind = norm_kind(bn)
    if kind is None:
        return None
    if kind.frozen and not all(isinstance(getattr(bn, n, None), torch.Tensor)
                               for n in ("weight", "bias", "running_mean", "running_var")):
        return None
    if not kind.has_act:
        return False
    act = getattr(bn, "act", None)
    if not is_noop(getattr(bn, "drop", None)) or type(act) not in (nn.ReLU, nn.Identity):
        return None
    return type(act) is nn.ReLU


def norm_features(bn: nn.Module) -> int:
    """The channel count of a fusable norm (FrozenBatchNorm2d has no ``num_features``)."""
    n = getattr(bn, "num_features", None)
    return n if n is not None else bn.running_mean.shape[0]


def _plain_batchnorms() -> frozenset:
    """Classes whose parameters and buffers live in ``_parameters`` / ``_buffers`` under
    BatchNorm2d's names, with no property or ``__getattr__`` of their own."""
    from .sync_batchnorm import SyncBatchNorm2d
    return frozenset(c for c in (nn.BatchNorm2d, SyncBatchNorm2d) if c.__getattr__ is nn.Module.__getattr__ and not any(
        n in vars(k) for k in c.__mro__ if k is not nn.Module for n in ("weight", "bias", "running_mean",
                                                                         "running_var", "num_batches_tracked")))


_PLAIN_BATCHNORMS = frozenset()  # filled at the first norm_view call (resnext.sync_batchnorm imports this module)


def norm_view(bn: nn.Module) -> NormView:
    """The per-forward view of a norm accepted by ``norm_act`` (its mode is read now)."""
    global _PLAIN_BATCHNORMS
    if not _PLAIN_BATCHNORMS:
        _PLAIN_BATCHNORMS = _plain_batchnorms()
    kind = norm_kind(bn)
    relu = kind.has_act and type(bn.act) is nn.ReLU
    if kind.frozen:
        return NormView(False, bn.weight, bn.bias, None, None, None, None, bn.eps, relu)
    if type(bn) in _PLAIN_BATCHNORMS:
        # Read from the module's dicts (what Module.__getattr__ does; ~0.8 us a name through it):
        # the same values as uses_batch_stats / running_stats below.
        p, b = bn._parameters, bn._buffers
        try:
            weight, bias, rm, rv, nbt = p["weight"], p["bias"], b["running_mean"], b["running_var"], \
                b["num_batches_tracked"]
        except KeyError:  # a deleted or renamed entry: the attribute lookups below decide
            pass
        else:
            batch = bn.training or (rm is None and rv is None)
            update = bn.training and bn.track_running_stats and rm is not None
            return NormView(batch, weight, bias, rm if update else None, rv if update else None,
                            nbt if update else None, bn.momentum, bn.eps, relu)
    batch = uses_batch_stats(bn)
    rm, rv, nbt = running_stats(bn) if batch else (None, None, None)
    return NormView(batch, bn.weight, bn.bias, rm, rv, nbt, bn.momentum, bn.eps, relu)


def conv_norm_pair(m: nn.Module):
    """``(conv, norm)`` of timm's ``ConvNormAct`` (forward: conv, bn, then ``aa`` when present), or
    None for any other module.  ``m.aa`` is not part of the pair: run it after the fused stage."""
    timm_cba = sys.modules.get("timm.layers.conv_bn_act")
    if timm_cba is None or type(m).forward is not timm_cba.ConvNormAct.forward:
        return None
    conv, bn = getattr(m, "conv", None), getattr(m, "bn", None)
    if not (isinstance(conv, nn.Module) and isinstance(bn, nn.Module)):
        return None
    known = {"conv", "bn", "aa"}
    return (conv, bn) if all(name in known for name, _ in m.named_children()) else None
