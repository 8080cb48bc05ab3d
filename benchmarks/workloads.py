"""Eager/fused twins and their steady-state steps, shared by the device-operation counts
(``device_ops``), the host-time benchmark (``host_time``), the CPU report (``report``) and
the tests.

A *pair* is an eager module and its converted twin (``resnext.convert`` of a deepcopy: the
same weights).  Steps:

* training: forward + ``.sum().backward()`` (a model: the logits' sum), preceded, outside
  the measured region, by one warm-up step, an SGD ``optimizer.step()`` and ``zero_grad()``
  (weight versions change as in real training, so caches keyed on them are exercised);
* inference: ``with torch.no_grad(): model(x)`` after one warm-up call.
"""
import copy
from dataclasses import dataclass
from typing import Callable, Optional, Tuple

import torch
from torch import nn

from . import shapes

BOTTLENECK = "resnext50_32x4d.stage1"  # the repeated (stride 1, identity) stage-1 block of ResNeXt-50
STAGES_1_2 = "resnext50_32x4d.stages1-2"  # 7 bottlenecks, 23 convolutions (/work/shared/NOTES.md)
MINI = "mini"


def _resnext():
    import resnext
    return resnext


def randomize_bn(module: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial BN running statistics and affine parameters (never measure on zeros and ones)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, nn.BatchNorm2d):
                c = m.num_features
                m.weight.copy_(torch.rand(c, generator=gen) + 0.5)
                m.bias.copy_(torch.randn(c, generator=gen) * 0.1)
                m.running_mean.copy_(torch.randn(c, generator=gen) * 0.1)
                m.running_var.copy_(torch.rand(c, generator=gen) + 0.5)
    return module


def make_eager(workload: str) -> nn.Module:
    """The unconverted module of a workload: a model name (``resnet50`` ... ``mini``),
    ``<arch>.stage<s>`` (the stage's repeated bottleneck) or ``<arch>.stages1-2``."""
    rx = _resnext()
    if workload == MINI:
        # one block per stage, base width 8, 2 groups: 4 to 32 channels per group, as ResNeXt's stages
        return rx.ResNet([1, 1, 1, 1], num_classes=10, groups=2, width_per_group=32, base_channels=8)
    if workload in shapes.ARCHS:
        return getattr(rx, workload)(fused=False)
    arch, _, part = workload.partition(".")
    if arch in shapes.ARCHS and part == "stages1-2":
        m = getattr(rx, arch)(fused=False)
        return nn.Sequential(m.layer1, m.layer2)
    if arch in shapes.ARCHS and part.startswith("stage"):
        _, groups, wpg = shapes.ARCHS[arch]
        planes = shapes.PLANES[int(part[len("stage"):]) - 1]
        return rx.Bottleneck(planes * 4, planes, 1, None, groups, wpg)
    raise ValueError(f"unknown workload {workload!r}")


def input_shape(workload: str, batch: int, image: int) -> Tuple[int, int, int, int]:
    """The input a workload sees when the model is fed ``image`` x ``image`` images."""
    if workload == MINI or workload in shapes.ARCHS:
        return (batch, 3, image, image)
    arch, _, part = workload.partition(".")
    if part == "stages1-2":
        side = shapes.stage_input_size(1, image)
        return (batch, 64, side, side)
    stage = int(part[len("stage"):])
    c0 = shapes.block_convs(arch, stage, 1, image)[0]
    return (batch, c0.cin, c0.h, c0.w)


def make_pair(workload: str, eager: Optional[nn.Module] = None) -> Tuple[nn.Module, nn.Module]:
    """(eager, fused), channels_last, BN randomised, same weights."""
    e = randomize_bn(eager if eager is not None else make_eager(workload))
    e = e.to(memory_format=torch.channels_last)
    f = _resnext().convert(copy.deepcopy(e))
    return e, f


def example_input(workload: str, batch: int, image: int, device="cpu", requires_grad: bool = False,
                  seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(*input_shape(workload, batch, image), generator=gen)
    x = x.to(device).to(memory_format=torch.channels_last)
    return x.requires_grad_(requires_grad)


# ----------------------------------------------------------------------------------------
# Steps
# ----------------------------------------------------------------------------------------
@dataclass
class Stepper:
    """The steady-state step of ``model`` on ``x``: ``step()`` is what is measured,
    ``between()`` what happens outside the measured region before each step."""
    model: nn.Module
    x: torch.Tensor
    train: bool
    optimizer: Optional[torch.optim.Optimizer] = None

    def __post_init__(self):
        self.model.train(self.train)
        if self.train:
            self.optimizer = torch.optim.SGD(self.model.parameters(), lr=1e-3, momentum=0.9)

    def step(self):
        if self.train:
            self.model(self.x).sum().backward()
            return None
        with torch.no_grad():
            return self.model(self.x)

    def between(self):
        if self.train:
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.x.grad = None

    def warm(self, calls: int = 1) -> "Stepper":
        for _ in range(calls):
            self.step()
            self.between()
        return self


def steady_device_ops(model: nn.Module, x: torch.Tensor, train: bool, noop_launches: bool = False):
    """Device operations of one steady-state step (one warm-up step, an SGD step and
    ``zero_grad`` outside the counted region, then the counted step)."""
    from .device_ops import count_device_ops, launches
    s = Stepper(model, x, train)
    if noop_launches:
        with launches("noop"):
            s.warm()
    else:
        s.warm()
    return count_device_ops(s.step, noop_launches=noop_launches)


def _tensors(value):
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, (tuple, list)):
        for v in value:
            yield from _tensors(v)
    elif isinstance(value, dict):
        for v in value.values():
            yield from _tensors(v)


def derived_cache_storages() -> set:
    """Storage pointers of every tensor held by a ``kernels._runtime.DerivedCache`` (packed
    weights, folded BN): weight memory, which lives with the model, not with one step."""
    from kernels._runtime import DerivedCache
    return {t.untyped_storage().data_ptr() for cache in DerivedCache.instances
            for value in cache.values() for t in _tensors(value)}


def saved_bytes(model: nn.Module, x: torch.Tensor, loss: Callable = None, exclude_caches: bool = True) -> int:
    """Bytes of distinct storages autograd keeps for backward in ``loss(model(x)).backward()``
    (default loss: the sum): activations.  Left out: the input's and the parameters'
    storages and, with ``exclude_caches``, the fused path's cached weight copies (one packed
    copy per weight, shared by the forward and the data gradient: weight memory)."""
    storages = {}
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    x_ptr = x.untyped_storage().data_ptr()

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in params and st.data_ptr() != x_ptr:
            storages[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = model(x)
        (loss(y) if loss is not None else y.sum()).backward()
    if exclude_caches:
        for ptr in derived_cache_storages():
            storages.pop(ptr, None)
    return sum(storages.values())
