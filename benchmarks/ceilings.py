"""Ceilings measured in the same session, and the roofline they define.

* memory: a large device-to-device copy (bytes read + bytes written per second);
* compute: a large bf16 matmul, and an fp32 one (TF32 when PyTorch allows it), TFLOP/s.

A case's roofline floor is ``max(bytes / bandwidth, flops / compute)``; the fraction of
the roofline it reaches is ``floor / measured time`` (1.0 = at the ceiling).
"""
from typing import Optional

import torch

from .timing import measure

# (copy bytes, matmul size) per device type: large enough to leave the caches on a GPU,
# small enough to be quick on a laptop CPU.
SIZES = {"cuda": (1 << 30, 8192), "cpu": (64 << 20, 1024)}
SMOKE_SIZES = (1 << 20, 128)


def measure_ceilings(device: torch.device, smoke: bool = False) -> dict:
    """Copy bandwidth (GB/s) and matmul throughput (TFLOP/s) on ``device``."""
    nbytes, n = SMOKE_SIZES if smoke else SIZES[device.type]
    kw = dict(warmup_ms=50, rep_ms=200, min_reps=5) if not smoke else dict(single=True)
    src = torch.randn(nbytes // 4, device=device)
    dst = torch.empty_like(src)
    t_copy = measure(lambda: dst.copy_(src), device, **kw).median_ms
    del src, dst
    out = {"copy_GBps": 2 * nbytes / (t_copy * 1e-3) / 1e9, "copy_bytes": nbytes, "matmul_n": n}
    for name, dtype in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
        a = torch.randn(n, n, device=device, dtype=dtype)
        b = torch.randn(n, n, device=device, dtype=dtype)
        t = measure(lambda: a @ b, device, **kw).median_ms
        out[f"matmul_{name}_TFLOPs"] = 2 * n ** 3 / (t * 1e-3) / 1e12
    out["fp32_matmul_tf32"] = bool(device.type == "cuda" and torch.backends.cuda.matmul.allow_tf32)
    out["device_type"] = device.type
    out["smoke"] = smoke
    return out


def compute_ceiling_tflops(ceilings: dict, dtype: str) -> Optional[float]:
    key = "matmul_fp32_TFLOPs" if dtype == "fp32" else "matmul_bf16_TFLOPs"
    return ceilings.get(key)


def ridge_point(ceilings: dict, dtype: str) -> float:
    """Arithmetic intensity (FLOP/byte) where the roofline turns from memory- to compute-bound."""
    return compute_ceiling_tflops(ceilings, dtype) * 1e12 / (ceilings["copy_GBps"] * 1e9)


def roofline_floor_s(flops: Optional[int], nbytes: Optional[int], ceilings: dict, dtype: str) -> Optional[float]:
    """The fastest a case could run under the measured ceilings (seconds)."""
    if not ceilings or (not flops and not nbytes):
        return None
    t_mem = (nbytes or 0) / (ceilings["copy_GBps"] * 1e9)
    t_math = (flops or 0) / (compute_ceiling_tflops(ceilings, dtype) * 1e12)
    return max(t_mem, t_math)


def roofline_fraction(time_s: float, flops: Optional[int], nbytes: Optional[int], ceilings: dict,
                      dtype: str) -> Optional[float]:
    floor = roofline_floor_s(flops, nbytes, ceilings, dtype)
    if floor is None or not time_s:
        return None
    return floor / time_s
