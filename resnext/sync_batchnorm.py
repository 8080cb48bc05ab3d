"""``SyncBatchNorm2d``: what ``convert`` puts in place of an ``nn.SyncBatchNorm``.

An ``nn.BatchNorm2d`` subclass with ``nn.SyncBatchNorm``'s semantics and the same
parameters, buffers and ``state_dict`` keys, that is *not* an ``nn.SyncBatchNorm``:
``DistributedDataParallel`` refuses a CPU module holding an ``nn.SyncBatchNorm``, whose own
kernels need a GPU.  Inside a fused block its statistics are merged across the ranks of
``process_group`` by the fused kernels (``kernels.sync_bn``); on its own it runs the same
collectives in plain PyTorch (``kernels.sync_bn.CrossRankBNFn``), on any device and backend.
"""
from typing import Optional

import torch
from torch import nn

from kernels import sync_bn
from kernels.batchnorm import running_stats


class SyncBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm whose train-mode statistics are those of every rank of ``process_group``
    (None: the world), exactly as ``nn.SyncBatchNorm`` (inputs of 2 or more dimensions;
    no communication in eval mode, nor without an initialised group of 2+ ranks)."""

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: Optional[float] = 0.1,
                 affine: bool = True, track_running_stats: bool = True, process_group=None,
                 device=None, dtype=None):
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device=device, dtype=dtype)
        self.process_group = process_group

    @classmethod
    def from_sync_batchnorm(cls, bn: nn.SyncBatchNorm) -> "SyncBatchNorm2d":
        """The same parameter and buffer tensors (shared, not copied), settings and mode."""
        new = cls(bn.num_features, bn.eps, bn.momentum, bn.affine, bn.track_running_stats,
                  process_group=bn.process_group, device="meta")
        for name in ("weight", "bias"):
            setattr(new, name, getattr(bn, name))
        for name in ("running_mean", "running_var", "num_batches_tracked"):
            new.register_buffer(name, getattr(bn, name), persistent=name in bn._buffers
                                and name not in bn._non_persistent_buffers_set)
        new.train(bn.training)
        return new

    def _check_input_dim(self, input):
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        name = sync_bn.group_name(self)
        if name is None:
            return super().forward(x)
        self._check_input_dim(x)
        if x.shape[1] == 0:
            raise ValueError("SyncBatchNorm number of input channels should be non-zero")
        running_mean, running_var, nbt = running_stats(self)
        return sync_bn.cross_rank_batch_norm(x, self.weight, self.bias, running_mean, running_var, nbt,
                                             self.momentum, self.eps, name)
