"""Drop-in fused modules: ``Conv2d -> BatchNorm2d [-> ReLU]`` on the Triton kernels.

The modules hold the standard ``nn.Conv2d`` and ``nn.BatchNorm2d`` (so ``state_dict``,
``.train()/.eval()``, ``.to()``, ``.half()``, DDP and printing behave as usual) and only
replace the forward computation.  Per BatchNorm the mode decides the path:

* running statistics (``bn.eval()``): BN is folded into a per-channel scale and shift that
  the convolution applies in its epilogue, together with ReLU and the residual add;
* batch statistics (``bn.train()``): the convolution writes its raw output z and the
  statistics partials; z stays *pending* (z, scale, shift, relu) and is normalised by
  whoever consumes it: the next convolution's prologue or one ``bn_act`` pass.
"""
import functools
from typing import NamedTuple, Optional, Union

import torch
from torch import nn

from kernels import sync_bn, use_triton
from kernels._runtime import memo_call
from kernels.batchnorm import BNActFn, check_batch_stats, folded_scale_shift, run_bn_act
from kernels.conv_bn_act import ConvBNActFn, check_conv_inputs, conv_bn_act_eval, conv_bn_act_forward, out_size
from kernels.weights import packed_weight

from .norms import norm_act, norm_features, norm_view
from .routing import routed_to_pytorch

Tensor = torch.Tensor


class Pending(NamedTuple):
    """A raw convolution output whose BatchNorm (+ ReLU) has not been applied yet; ``gate``
    ([N, C, 1, 1], optional): then multiplied per (image, channel), after the ReLU (RegNetY's SE)."""
    z: Tensor
    scale: Tensor
    shift: Tensor
    relu: bool
    gate: Optional[Tensor] = None


def _records_autograd() -> bool:
    """Whether a call must go through its autograd.Function: grad mode on, or torch.compile
    tracing (the Function holds the custom operator).  Without it (inference under no_grad or
    inference_mode) the Function's forward body is called directly: an autograd.Function call
    costs ~25 us of host time even when it records nothing (measured here, torch 2.13)."""
    return torch.is_grad_enabled() or torch.compiler.is_compiling()


def _conv_bn_act(*args):
    """``ConvBNActFn.apply(*args)``; without autograd, its forward's operator body."""
    return ConvBNActFn.apply(*args) if _records_autograd() else conv_bn_act_forward(*args)


def _bn_act(*args):
    """``BNActFn.apply(*args)``; without autograd, its forward's body."""
    return BNActFn.apply(*args) if _records_autograd() else run_bn_act(*args)


def materialize(t: Union[Tensor, Pending]) -> Tensor:
    if isinstance(t, Pending):
        y = _bn_act(t.z, t.scale, t.shift, None, None, None, t.relu)
        return y if t.gate is None else y * t.gate.to(y.dtype)
    return t


def fusable(conv: nn.Module, bn: nn.Module) -> bool:
    """Whether ``conv -> bn`` maps onto the fused kernels (else it is left to PyTorch).

    ``bn``: a norm layer of ``resnext.norms`` (BatchNorm2d, FrozenBatchNorm2d, timm's
    BatchNormAct2d with ReLU or no activation, ``SyncBatchNorm2d``: convert replaces
    nn.SyncBatchNorm by it)."""
    return (
        type(conv) is nn.Conv2d and norm_act(bn) is not None
        and conv.kernel_size in ((1, 1), (3, 3))
        and conv.stride[0] == conv.stride[1]
        and isinstance(conv.padding, tuple) and conv.padding[0] == conv.padding[1]
        and conv.dilation == (1, 1)
        and conv.padding_mode == "zeros"
        and conv.bias is None
        and norm_features(bn) == conv.out_channels
    )


def runs_eager(x: Tensor, weight: Tensor) -> bool:
    """Whether a fused module runs PyTorch's own ops: where no Triton kernel runs for x's device
    (a plain CPU tensor without the interpreter; as fast as the unconverted modules there), and
    under the captures that record PyTorch ops and cannot hold a Triton launch: FX symbolic
    tracing (x is a ``Proxy``), ``torch.jit.trace`` (a launch would be baked into the trace as
    its output's constant) and ONNX export (no ONNX operator runs our kernels).
    ``torch.jit.script`` never gets here (the modules' ``forward``).  ``torch.export`` and
    ``torch.compile`` keep the kernels: they record our custom operators."""
    if not isinstance(x, torch.Tensor):
        if isinstance(x, torch.fx.Proxy):
            return True
        raise TypeError(f"expected a torch.Tensor input, got {type(x).__name__}")
    if x.device != weight.device:
        raise ValueError(f"input is on {x.device} but the weight is on {weight.device}")
    # (the capture checks only where Triton would run: ~0.4 us, is_in_onnx_export ~2.5 us only under export)
    return not use_triton(x) or torch.jit.is_tracing() or (
        torch.compiler.is_compiling() and torch.onnx.is_in_onnx_export())


def _compute_dtype(x: Tensor, weight: Tensor) -> torch.dtype:
    """Autocast's dtype when it is on (as F.conv2d would use), else the input's."""
    if x.device != weight.device:
        raise ValueError(f"input is on {x.device} but the weight is on {weight.device}")
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    if x.dtype != weight.dtype:
        raise TypeError(f"input dtype {x.dtype} does not match the weight dtype {weight.dtype} "
                        f"(use torch.autocast or convert the model)")
    return x.dtype


def conv_bn_stage(inp: Union[Tensor, Pending], conv: nn.Conv2d, bn: nn.Module, relu: bool,
                  residual: Union[Tensor, Pending, None] = None, squeeze: bool = False):
    """``act(bn(conv(inp)) [+ residual])``; returns a ``Pending`` when BN uses batch statistics.

    ``bn`` is any norm that ``fusable`` accepts; its own trailing ReLU (timm's BatchNormAct2d)
    counts as ``relu`` and comes before a residual in its forward, so it cannot take one.

    ``inp`` may itself be pending: its scale/shift/ReLU is then applied in the prologue.
    A pending result carries no residual: pass it to ``finish``.  Inputs are checked here,
    once; the autograd Function below is called directly (``kernels.conv_bn_act`` would
    check them again).
    ``squeeze=True`` (no residual): returns ``(Pending, m)`` in either BN mode, m [N, Cout] fp32
    the mean over H, W of the BN's output (a squeeze-excite's squeeze, resnext.gates);
    ``squeeze="relu"``: of the ReLU's output (RegNetY's SE after conv2, resnext.regnet).
    A pending ``inp`` with a gate goes through ``squeeze_excite.GatedConvFn``.
    """
    x, in_scale, in_shift, in_relu = (inp.z, inp.scale, inp.shift, inp.relu) if isinstance(inp, Pending) \
        else (inp, None, None, False)
    gate = inp.gate if isinstance(inp, Pending) else None
    weight = conv.weight
    stride, padding, groups = conv.stride[0], conv.padding[0], conv.groups
    check_conv_inputs(x, weight, stride, padding, groups, same_dtype=False)
    dtype = _compute_dtype(x, weight)
    if x.dtype != dtype:
        x = x.to(dtype)
    # The packed (and cast) weight, cached until the weight changes; the op's autograd
    # returns the gradient in the weight's own dtype (the fp32 master weight under autocast).
    packed = packed_weight(weight, dtype) if use_triton(x) and dtype != torch.float64 else None
    if packed is None and weight.dtype != dtype:
        weight = weight.to(dtype)  # the reference path computes in x's dtype
    norm = norm_view(bn)
    if norm.relu and residual is not None:
        raise ValueError("a norm with its own ReLU applies it before the residual add: finish the stage first")
    relu = relu or norm.relu
    k = conv.kernel_size[0]
    out_shape = [x.shape[0], conv.out_channels, out_size(x.shape[2], k, stride, padding),
                 out_size(x.shape[3], k, stride, padding)]
    if isinstance(residual, torch.Tensor) and list(residual.shape) != out_shape:
        raise ValueError(f"residual must have shape {out_shape}, got {list(residual.shape)}")
    if gate is not None:
        from kernels.squeeze_excite import GatedConvFn
        conv_fn = lambda *args: GatedConvFn.apply(*args, *((None,) * (22 - len(args))), gate)  # noqa: E731
    else:
        conv_fn = _conv_bn_act
    if squeeze == "relu":  # raw z + the mean of relu(bn(z)); BN + ReLU applied by the consumer
        from kernels.squeeze_excite import ConvReluSqueezeFn
        assert gate is None and relu, "the after-ReLU squeeze is of a stage with a ReLU and an ungated input"
        if norm.batch_stats:
            check_batch_stats(bn, out_shape[0] * out_shape[2] * out_shape[3])
        folded = (None, None) if norm.batch_stats else folded_scale_shift(bn)
        z, _, _, scale, shift, m = ConvReluSqueezeFn.apply(
            x, weight, packed, stride, padding, groups, in_scale, in_shift, in_relu, norm.batch_stats,
            norm.weight, norm.bias, norm.running_mean, norm.running_var, norm.num_batches_tracked,
            norm.momentum, norm.eps, *folded)
        if not norm.batch_stats:
            scale, shift = folded
        return Pending(z, scale, shift, relu), m
    if squeeze:  # raw z + the squeeze mean; BN (batch or folded) is applied by the consumer
        from kernels.squeeze_excite import ConvSqueezeFn
        assert gate is None, "the squeeze path takes no gated input"
        if norm.batch_stats:
            check_batch_stats(bn, out_shape[0] * out_shape[2] * out_shape[3])
        folded = (None, None) if norm.batch_stats else folded_scale_shift(bn)
        z, _, _, scale, shift, m = ConvSqueezeFn.apply(
            x, weight, packed, stride, padding, groups, in_scale, in_shift, in_relu, None, None, None, False,
            norm.batch_stats, norm.weight, norm.bias, norm.running_mean, norm.running_var, norm.num_batches_tracked,
            norm.momentum, norm.eps, *folded)
        if not norm.batch_stats:
            scale, shift = folded
        return Pending(z, scale, shift, relu), m
    if norm.batch_stats:
        group_name = sync_bn.group_name(bn)  # SyncBatchNorm: the statistics of the group's ranks
        # (across ranks only nn.SyncBatchNorm's eps check applies: a rank may hold one value or none)
        check_batch_stats(bn, out_shape[0] * out_shape[2] * out_shape[3] if group_name is None else None)
        z, _, _, scale, shift = conv_fn(
            x, weight, packed, stride, padding, groups, in_scale, in_shift, in_relu, None, None, None, False, True,
            norm.weight, norm.bias, norm.running_mean, norm.running_var, norm.num_batches_tracked, norm.momentum,
            norm.eps, group_name)
        out = Pending(z, scale, shift, relu)
        return out if residual is None else finish(out, residual)
    scale, shift = folded_scale_shift(bn)  # FrozenBatchNorm2d too: its buffers carry the same names
    residual = materialize(residual) if residual is not None else None
    if residual is not None and residual.dtype != dtype:
        residual = residual.to(dtype)
    if gate is None and not _records_autograd():  # inference: y alone, no op outputs to fill
        return conv_bn_act_eval(x, weight, packed, stride, padding, groups, in_scale, in_shift, in_relu, scale,
                                shift, residual, relu)
    return conv_fn(x, weight, packed, stride, padding, groups, in_scale, in_shift, in_relu, scale, shift,
                   residual, relu, False, None, None, None, None, None, None, norm.eps)[0]


def finish(main: Union[Tensor, Pending], residual: Union[Tensor, Pending, None] = None,
           relu: Optional[bool] = None) -> Tensor:
    """Apply what is pending of ``main`` and add ``residual`` (itself possibly pending) in one pass."""
    if not isinstance(main, Pending):
        assert residual is None, "an eval-mode stage adds its residual in the epilogue"
        return main
    relu = main.relu if relu is None else relu
    assert main.gate is None, "a gated pending output is consumed by the next convolution's prologue"
    if isinstance(residual, Pending) and not residual.relu and residual.gate is None:
        return _bn_act(main.z, main.scale, main.shift, residual.z, residual.scale, residual.shift, relu)
    residual = materialize(residual) if residual is not None else None
    if residual is not None and residual.dtype != main.z.dtype:
        residual = residual.to(main.z.dtype)
    return _bn_act(main.z, main.scale, main.shift, residual, None, None, relu)


def _is_channels_last(t: Tensor) -> bool:
    """``t.suggest_memory_format() == torch.channels_last`` (c10's is_channels_last_strides_2d,
    not exposed in Python): strides ordered C < W < H < N, so sliced NHWC views and 1x1
    weights converted with .to(memory_format=torch.channels_last) count, as in F.conv2d."""
    return memo_call(_channels_last_strides, t.shape, t.stride())


@functools.lru_cache(maxsize=4096)
def _channels_last_strides(shape, stride) -> bool:
    """``_is_channels_last`` on (shape, strides), memoised (every fused module call asks it)."""
    if len(shape) != 4 or stride[1] == 0:
        return False
    smallest = 0
    for d in (1, 3, 2, 0):
        if shape[d] == 0 or stride[d] < smallest or (d == 0 and smallest == stride[1]):
            return False
        smallest = stride[d] * (shape[d] if shape[d] > 1 else 1)
    return True


def like_input(y: Tensor, x: Tensor, *weights: Tensor) -> Tensor:
    """PyTorch's convolution rule: channels_last out when the input or a weight is
    channels_last, else NCHW."""
    if _is_channels_last(x) or any(_is_channels_last(w) for w in weights):
        return y.contiguous(memory_format=torch.channels_last)
    return y.contiguous()


class ConvBNAct(nn.Module):
    """``relu(bn(conv(x)))`` (or without ReLU) on the fused kernels.

    Build it like a ``Conv2d`` or from existing modules with ``ConvBNAct.from_modules(conv, bn)``;
    its ``state_dict`` keys are ``conv.*`` and ``bn.*``.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, stride: int = 1,
                 padding: Optional[int] = None, groups: int = 1, relu: bool = True, eps: float = 1e-5,
                 momentum: Optional[float] = 0.1, device=None, dtype=None):
        super().__init__()
        if padding is None:
            padding = kernel_size // 2
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding, groups=groups,
                              bias=False, device=device, dtype=dtype)
        self.bn = nn.BatchNorm2d(out_channels, eps=eps, momentum=momentum, device=device, dtype=dtype)
        self.relu = relu
        if not fusable(self.conv, self.bn):
            raise ValueError(f"kernel_size must be 1 or 3, got {kernel_size}")

    @classmethod
    def from_modules(cls, conv: nn.Conv2d, bn: nn.BatchNorm2d, relu: bool = True) -> "ConvBNAct":
        """Wrap existing modules (their tensors are shared, not copied)."""
        if not fusable(conv, bn):
            raise ValueError(f"cannot fuse {conv} -> {bn}: needs a bias-free 1x1 or 3x3 Conv2d with equal "
                             f"strides and paddings, dilation 1, zero padding, and a BatchNorm2d (or "
                             f"FrozenBatchNorm2d, timm's BatchNormAct2d with ReLU or no activation) of "
                             f"{conv.out_channels} features")
        self = cls.__new__(cls)
        nn.Module.__init__(self)
        self.conv, self.bn, self.relu = conv, bn, relu
        return self

    def forward(self, x: Tensor, residual: Optional[Tensor] = None) -> Tensor:
        """x: [N, Cin, H, W]; residual (optional, added before the ReLU): [N, Cout, Ho, Wo]."""
        if torch.jit.is_scripting():  # TorchScript cannot launch Triton kernels
            return self._eager_forward(x, residual)
        return self._fused_forward(x, residual)

    def _eager_forward(self, x: Tensor, residual: Optional[Tensor] = None) -> Tensor:
        """PyTorch's own ops, as the unconverted modules (TorchScript compiles it)."""
        y = self.bn(self.conv(x))
        if residual is not None:
            y = y + residual
        return torch.relu(y) if self.relu else y

    @torch.jit.unused
    def _fused_forward(self, x: Tensor, residual: Optional[Tensor] = None) -> Tensor:
        if runs_eager(x, self.conv.weight) or routed_to_pytorch(self, x):
            return self._eager_forward(x, residual)
        if residual is not None and norm_act(self.bn):  # the norm's ReLU comes before the add
            y = like_input(finish(conv_bn_stage(x, self.conv, self.bn, relu=False)), x, self.conv.weight) + residual
            return torch.relu(y) if self.relu else y
        out = conv_bn_stage(x, self.conv, self.bn, self.relu, residual)
        return like_input(finish(out), x, self.conv.weight)

    def extra_repr(self) -> str:
        return f"relu={self.relu}"


class FusedSequential(nn.Sequential):
    """An ``nn.Sequential`` whose ``Conv2d -> BatchNorm2d [-> ReLU]`` runs are fused.

    The children (and so the ``state_dict`` keys) are those of the original Sequential.
    """

    def __init__(self, *args, runs: Optional[dict] = None):
        super().__init__(*args)
        self.runs = dict(runs or {})  # index of the conv -> (modules in the run, relu)

    @classmethod
    def from_sequential(cls, seq: nn.Sequential) -> Optional["FusedSequential"]:
        """Fuse the runs of ``seq``; None when there is none."""
        mods = list(seq)
        runs, i = {}, 0
        while i + 1 < len(mods):
            if fusable(mods[i], mods[i + 1]):
                relu = i + 2 < len(mods) and type(mods[i + 2]) is nn.ReLU
                runs[i] = (3 if relu else 2, relu)
                i += runs[i][0]
            else:
                i += 1
        if not runs:
            return None
        fused = cls(runs=runs)
        for name, m in seq.named_children():
            fused.add_module(name, m)
        fused.train(seq.training)
        return fused

    def forward(self, x: Tensor) -> Tensor:
        if torch.jit.is_scripting():  # TorchScript cannot launch Triton kernels
            return self._eager_forward(x)
        return self._fused_forward(x)

    def _eager_forward(self, x: Tensor) -> Tensor:
        """The plain Sequential (TorchScript compiles it)."""
        for module in self:
            x = module(x)
        return x

    @torch.jit.unused
    def _fused_forward(self, x: Tensor) -> Tensor:
        if runs_eager(x, self[next(iter(self.runs))].weight) or routed_to_pytorch(self, x):
            return self._eager_forward(x)
        mods, i = list(self), 0
        while i < len(mods):
            if i in self.runs:
                length, relu = self.runs[i]
                inp = x
                x = like_input(finish(conv_bn_stage(x, mods[i], mods[i + 1], relu)), inp, mods[i].weight)
                i += length
            else:
                x = mods[i](x)
                i += 1
        return x

    def extra_repr(self) -> str:
        return "fused runs at " + ", ".join(str(i) for i in sorted(self.runs))
