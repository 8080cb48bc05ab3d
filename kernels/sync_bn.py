"""The cross-rank step of train-mode BatchNorm (``nn.SyncBatchNorm`` semantics), one place.

Forward: each rank merges its convolution tiles' partials into one ``(count, mean, M2)``
row per channel ([3, C], ``bn_finalize_kernel`` with ``MERGED_OUT``); ONE all-gather over
the BN's process group gives every rank the [W, 3, C] rows; the same kernel merges them
with Chan's formula (``ROW_COUNTS``: uneven counts, an empty rank's zero row adds nothing),
then writes scale/shift and updates the running statistics with the group's count (unbiased
variance, as ``nn.SyncBatchNorm``).  The group's count stays on the device: no host sync.

Backward: the loss reaches the group's mean and variance from every rank, through each
rank's scale and shift.  ONE all-reduce of ``[dscale, dshift, count]`` ([2C + 1]: the
consumers' per-channel sums and the rank's count) gives the group's sums; the elementwise
pass (``bn_backward``) then applies the statistics terms with them and the group's count.
gamma and beta keep this rank's gradient, from its own sums (DDP averages it, as for
``nn.SyncBatchNorm``, whose backward all-reduces ``sum_dy, sum_dy_xmu``, [2C]).

Eval mode communicates nothing.  The process group travels through the custom operators as
its name (``group_name``: a string the operator schema accepts), resolved here.

``CrossRankBNFn`` is the plain-PyTorch version of the whole BatchNorm with the same
collectives: the forward of ``resnext.SyncBatchNorm2d`` when it is not fused (any device).
"""
import functools
from typing import List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist

from . import reference
from ._runtime import eager_or_op

Tensor = torch.Tensor
_DIST_AVAILABLE = dist.is_available()


def _has_process_group(bn: torch.nn.Module) -> bool:
    """``hasattr(bn, "process_group")`` without raising and catching an AttributeError for a
    plain BatchNorm (~3 us of host time per call): the places ``nn.Module`` looks it up."""
    d = bn.__dict__
    if "process_group" in d or _class_has_process_group(type(bn)):
        return True
    if type(bn).__getattr__ is not torch.nn.Module.__getattr__:  # a custom lookup: ask it
        return hasattr(bn, "process_group")
    return any("process_group" in d.get(k, ()) for k in ("_parameters", "_buffers", "_modules"))


@functools.lru_cache(maxsize=None)
def _class_has_process_group(cls: type) -> bool:
    return any("process_group" in c.__dict__ for c in cls.__mro__)


def group_name(bn: torch.nn.Module) -> Optional[str]:
    """The process group a BatchNorm merges its statistics over, by name, or None (no sync).

    nn.SyncBatchNorm's rule: a module with a ``process_group`` attribute (None: the world)
    syncs in training mode, when torch.distributed is initialised and the group has more
    than one rank; eval mode never syncs."""
    # (the cheap tests first: outside torch.distributed, the attribute search never runs)
    if not bn.training or not (_DIST_AVAILABLE and dist.is_initialized()) or not _has_process_group(bn):
        return None
    group = bn.process_group if bn.process_group is not None else dist.group.WORLD
    if dist.get_world_size(group) < 2:
        return None
    return group.group_name


def _group(name: str):
    from torch.distributed.distributed_c10d import _resolve_process_group
    return _resolve_process_group(name)


def gather_rank_stats(local: Tensor, group_name: str) -> Tensor:
    """This rank's [3, C] (count, mean, M2) -> [W, 3, C], every rank's row: one all-gather."""
    group = _group(group_name)
    out = local.new_empty((dist.get_world_size(group), *local.shape))
    # gloo (CPU tensors, whatever the default backend string says) has no all-gather into one
    # tensor: gather into views of it
    if local.device.type == "cpu" or dist.get_backend(group) == "gloo":
        dist.all_gather(list(out.unbind(0)), local, group=group)
    else:
        gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor  # renamed in 2.13
        gather(out.view(-1), local.view(-1), group=group)
    return out


def sum_stats_grads_impl(grads: List[Tensor], count: int, group_name: str) -> Tensor:
    """See ``sum_stats_grads``: [K, C] out, one tensor (outputs of an operator may not alias)."""
    buf = torch.cat([*grads, grads[0].new_full((1,), count)])
    dist.all_reduce(buf, group=_group(group_name))
    return buf[:-1].view(len(grads), -1) * (count / buf[-1:])


# An operator under torch.compile (an opaque node: the collective runs when the graph does), as
# the forward's all-gather, which sits inside resnext::conv_bn_act.
sum_stats_grads_op = torch.library.custom_op("resnext::sum_stats_grads", sum_stats_grads_impl, mutates_args=())


@sum_stats_grads_op.register_fake
def _(grads, count, group_name):
    return grads[0].new_empty((len(grads), grads[0].shape[0]))


def sum_stats_grads(grads: Sequence[Optional[Tensor]], count: int, group_name: str) -> List[Optional[Tensor]]:
    """This rank's gradients w.r.t. the group's statistics ([C] each, None: no such gradient;
    e.g. dscale, dshift, the consumers' sums) -> the group's sums, times count / (the group's
    count): one all-reduce of [K*C + 1] (the counts ride along).

    The backward formulas are linear in these gradients and divide by the count, so with the
    scaling they keep dividing by this rank's count: ``g' / count == sum of g / group count``."""
    given = [g for g in grads if g is not None]
    summed = iter(eager_or_op(sum_stats_grads_op, sum_stats_grads_impl)(given, count, group_name).unbind(0))
    return [None if g is None else next(summed) for g in grads]


def local_affine_grads(mean: Tensor, var: Tensor, eps: float, dscale: Optional[Tensor], dshift: Optional[Tensor]):
    """This rank's gradients of gamma and beta from its consumers' sums (scale = gamma * r,
    shift = beta - mean * scale, r = (var + eps)^-1/2): what nn.SyncBatchNorm returns, and DDP
    then averages as any parameter's."""
    if dscale is None and dshift is None:
        return None, None
    d_gr = dscale if dshift is None else -(dshift * mean) if dscale is None else dscale - dshift * mean
    return d_gr * torch.rsqrt(var + eps), dshift


def merge_rank_stats_reference(mean: Tensor, var: Tensor, count: int, group_name: str
                               ) -> Tuple[Tensor, Tensor, Tensor]:
    """Plain PyTorch: this rank's batch mean and biased variance over ``count`` values ->
    the group's (mean, biased var, count as a 0-dim tensor), one all-gather, Chan's merge."""
    acc = mean.dtype
    m2 = var * count if count > 0 else torch.zeros_like(var)
    mean = mean if count > 0 else torch.zeros_like(mean)
    local = torch.stack([torch.full_like(mean, count), mean, m2])
    g_mean, g_var, total = reference.merge_stat_rows(gather_rank_stats(local, group_name))  # [W, 3, C]
    return g_mean.to(acc), g_var.to(acc), total


@torch.compiler.disable  # its collectives are plain torch.distributed calls: a graph break under compile
def cross_rank_batch_norm(x, weight, bias, running_mean, running_var, num_batches_tracked, momentum, eps,
                          group_name):
    """``CrossRankBNFn.apply``."""
    return CrossRankBNFn.apply(x, weight, bias, running_mean, running_var, num_batches_tracked, momentum, eps,
                               group_name)


class CrossRankBNFn(torch.autograd.Function):
    """``nn.SyncBatchNorm``'s train-mode forward and backward in plain PyTorch, on any device
    and backend (its own kernels need a GPU): x [N, C, *], statistics over all but dim 1."""

    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, num_batches_tracked, momentum, eps, group_name):
        acc = reference.acc_dtype(x)
        C = x.shape[1]
        count = x.numel() // C
        dims = [0, *range(2, x.dim())]
        shape = [1, C] + [1] * (x.dim() - 2)
        xf = x.to(acc)
        if count > 0:
            mean, var = xf.mean(dims), xf.var(dims, unbiased=False)
        else:
            mean = var = xf.new_zeros(C)
        mean, var, total = merge_rank_stats_reference(mean, var, count, group_name)
        scale, shift = reference.bn_finalize_reference(mean, var, total, weight, bias, running_mean, running_var,
                                                       num_batches_tracked, momentum, eps)
        ctx.save_for_backward(x, weight, mean, var, scale)
        ctx.conf = (eps, group_name, weight is not None)
        return (xf * scale.view(shape) + shift.view(shape)).to(x.dtype)

    @staticmethod
    def backward(ctx, dy):
        x, weight, mean, var, scale = ctx.saved_tensors
        eps, name, affine = ctx.conf
        acc = reference.acc_dtype(x)
        C = x.shape[1]
        count = x.numel() // C
        dims = [0, *range(2, x.dim())]
        shape = [1, C] + [1] * (x.dim() - 2)
        du, xf = dy.to(acc), x.to(acc)
        dscale, dshift = (du * xf).sum(dims), du.sum(dims)
        dgamma, dbeta = local_affine_grads(mean, var, eps, dscale, dshift)
        dscale, dshift = sum_stats_grads([dscale, dshift], count, name)
        dm, dv, _, _ = reference.bn_stats_backward(mean, var, count, weight, eps, None, None, dscale, dshift, acc)
        dx = du * scale.view(shape) + (dm.view(shape) + dv.view(shape) * 2.0 * (xf - mean.view(shape))) / max(count, 1)
        need = ctx.needs_input_grad
        return (dx.to(x.dtype) if need[0] else None,
                dgamma.to(weight.dtype) if affine and need[1] else None,
                dbeta.to(weight.dtype) if affine and need[2] else None,
                None, None, None, None, None, None)
