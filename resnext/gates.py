"""timm's optional Bottleneck pieces the fused block takes over: SE / ECA gates, drop_path, drop_block.

* ``se`` (timm ``SEModule`` or ``EcaModule``): the squeeze comes from conv3's epilogue
  (per-image sums of z3, ``kernels.squeeze_excite``), the excite runs the module's own
  layers on [N, C] in PyTorch, the multiply joins the final pass (with bn3, the residual and
  ReLU).  Which modules qualify is decided by ``excite_of``: timm's class names and the
  attributes their forward uses; anything else leaves the block to PyTorch.
* ``drop_path`` (timm ``DropPath``): identity in eval; in training its per-sample mask,
  drawn exactly as ``timm.layers.drop_path`` does (same RNG call, same point of the block's
  forward: after the SE, before the downsample), multiplies the gate of the final pass.
* ``drop_block`` (timm ``DropBlock2d``): identity in eval or with ``drop_prob == 0``; when it
  is active (a spatial mask on bn2's output) the whole block runs on PyTorch for that call.
"""
from typing import Callable, Optional, Union

import torch
from torch import nn

from kernels.squeeze_excite import GatedBNActFn

from .modules import Pending, conv_bn_stage, materialize
from .norms import is_noop as _is_noop, module_attr

Tensor = torch.Tensor


def excite_of(se: Optional[nn.Module]) -> Optional[Callable[[Tensor], Tensor]]:
    """For timm's SEModule / EcaModule: ``m [N, C, 1, 1] -> gate [N, C, 1, 1]`` through the
    module's own layers (the forward after its mean, and before its multiply); else None."""
    name = type(se).__name__
    if name == "SEModule" and not getattr(se, "add_maxpool", False) \
            and all(isinstance(getattr(se, a, None), nn.Module) for a in ("fc1", "bn", "act", "fc2", "gate")):
        return lambda m: se.gate(se.fc2(se.act(se.bn(se.fc1(m)))))
    if name == "EcaModule" and isinstance(getattr(se, "conv", None), nn.Conv1d) \
            and isinstance(getattr(se, "gate", None), nn.Module) and hasattr(se, "conv2"):
        def eca(m: Tensor) -> Tensor:
            y = se.conv(m.view(m.shape[0], 1, -1))
            if se.conv2 is not None:
                y = se.conv2(se.act(y))
            return se.gate(y).view(m.shape[0], -1, 1, 1)
        return eca
    return None


def _is_drop_path(m: nn.Module) -> bool:
    return type(m).__name__ == "DropPath" and isinstance(getattr(m, "drop_prob", None), (int, float)) \
        and isinstance(getattr(m, "scale_by_keep", None), bool)


def _is_drop_block(m: nn.Module) -> bool:
    return type(m).__name__ == "DropBlock2d" and isinstance(getattr(m, "drop_prob", None), (int, float))


def extra_is_fusable(name: str, m: Optional[nn.Module]) -> bool:
    """Whether the fused Bottleneck reproduces timm's optional child ``name`` (se, drop_path,
    drop_block, aa) exactly."""
    if _is_noop(m):
        return True
    if name == "se":
        return excite_of(m) is not None
    if name == "drop_path":
        return _is_drop_path(m)
    if name == "drop_block":
        return _is_drop_block(m)
    return False


def drop_block_active(block: nn.Module) -> bool:
    """A DropBlock2d that masks this call (training, drop_prob > 0): the block runs on PyTorch."""
    db = module_attr(block, "drop_block")
    return not _is_noop(db) and db.training and bool(db.drop_prob)


def drop_path_active(block: nn.Module) -> bool:
    dp = module_attr(block, "drop_path")
    return not _is_noop(dp) and dp.training and bool(dp.drop_prob)


def drop_path_mask(dp: nn.Module, like: Tensor) -> Tensor:
    """timm.layers.drop_path's mask [N, 1, 1, 1] in ``like``'s dtype and device: the same RNG call."""
    keep = 1 - dp.drop_prob
    mask = like.new_empty((like.shape[0], 1, 1, 1)).bernoulli_(keep)
    if keep > 0.0 and dp.scale_by_keep:
        mask.div_(keep)
    return mask


def has_gate(block: nn.Module) -> bool:
    """Whether this call's final pass carries a gate (an SE/ECA module, or drop_path in training)."""
    return not _is_noop(module_attr(block, "se")) or drop_path_active(block)


def gated_final(block: nn.Module, out: Union[Tensor, Pending], make_identity: Callable[[], object]) -> Tensor:
    """conv3 -> bn3 -> se -> drop_path -> += identity -> ReLU, with ``out`` conv3's (pending)
    input: conv3 writes z3 and the squeeze mean of bn3(z3), the excite runs on [N, C], and one pass
    computes ``relu(gate * bn3(z3) + identity)``.  ``make_identity()`` runs after the gate and
    the drop-path mask, where the unconverted block runs its downsample (RNG order)."""
    main, m = conv_bn_stage(out, block.conv3, block.bn3, relu=True, squeeze=True)
    gate = None
    se = getattr(block, "se", None)
    if not _is_noop(se):
        z = main.z
        gate = excite_of(se)(m.to(z.dtype).view(z.shape[0], z.shape[1], 1, 1))
    if drop_path_active(block):
        mask = drop_path_mask(block.drop_path, gate if gate is not None else main.z)
        gate = mask if gate is None else gate * mask
    residual = make_identity()
    res_scale = res_shift = None
    if isinstance(residual, Pending) and not residual.relu:  # a train-mode downsample: its BN joins this pass
        residual, res_scale, res_shift = residual.z, residual.scale, residual.shift
    else:
        residual = materialize(residual)
        if residual.dtype != main.z.dtype:
            residual = residual.to(main.z.dtype)
    assert gate is not None, "gated_final needs an SE module or an active drop_path (has_gate)"
    return GatedBNActFn.apply(main.z, main.scale, main.shift, residual, res_scale, res_shift, True, gate)
