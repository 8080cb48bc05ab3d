"""The launch-economy report (issue 13): what a machine without a GPU can say about the
fused models against eager PyTorch, and what a GPU adds to it.

One record per (workload, mode), ``level: "report"``, ``provider: "ours_vs_eager"``, with
both sides measured in the same case:

* ``device_ops``: device operations of one steady-state step (``device_ops`` counter;
  ours on a CPU: the Triton path forced, launches counted as no-ops);
* ``saved_bytes`` (training): bytes autograd keeps for backward (inputs and parameters excluded);
* ``host_ms``: host time per step with device work left out (``host_time``);
* ``cpu_ms`` / ``cpu_ratio`` (CPU only): real CPU time of the converted model on its
  pure-PyTorch path against the unconverted one (one thread).

Training steps are forward + ``.sum().backward()``; inference is a ``no_grad`` forward;
models at 32x32 images, batch 2 (the counts do not depend on the size; bytes and host
times are for that size).  ``pytest benchmarks --benchmark`` on a machine without CUDA
runs only this report; on a GPU it runs with the full grid.
"""
import copy
from typing import List

import torch

from . import host_time, workloads
from .config import Case, RunContext
from .device_ops import host_only
from .tables import REPORT_LEVEL

LEVEL = REPORT_LEVEL
PROVIDER = "ours_vs_eager"
MODES = ("train", "inference")
FULL_WORKLOADS = (workloads.BOTTLENECK, "resnet101", "resnext101_32x4d", "resnet50", "resnext50_32x4d")
SMOKE_WORKLOADS = (workloads.BOTTLENECK, workloads.MINI)
IMAGE, BATCH = 32, 2
TOP_OPS = 15  # op names kept per side in the record


def report_cases(ctx: RunContext, providers=None) -> List[Case]:
    names = SMOKE_WORKLOADS if ctx.smoke else FULL_WORKLOADS
    return [Case(LEVEL, w, mode, "fp32", BATCH, PROVIDER, arch=w.split(".")[0], image=IMAGE)
            for w in names for mode in MODES]


def _eager(workload: str, ctx: RunContext) -> torch.nn.Module:
    """The eager module of a workload, built once per run (models take seconds to initialise)."""
    cache = ctx.extra.setdefault("report_models", {})
    if workload not in cache:
        cache[workload] = workloads.randomize_bn(workloads.make_eager(workload))
    return copy.deepcopy(cache[workload])


def measure(case: Case, ctx: RunContext) -> dict:
    """Every figure of one report case (see the module docstring)."""
    w, mode, train = case.name, case.mode, case.mode == "train"
    eager, fused = workloads.make_pair(w, _eager(w, ctx))
    out = {}
    single = dict(min_reps=1, max_reps=1, budget_s=0.0, warmup=1)
    if not ctx.cuda:  # first, while the fused copy still holds real values (no-op launches write nothing)
        out.update(host_time.measure_cpu_ratio(eager, fused, w, mode, case.batch, case.image,
                                               **(single if ctx.smoke else dict(min_reps=3, budget_s=2.0))))
    dev = ctx.device
    eager, fused = eager.to(dev), fused.to(dev)
    x = workloads.example_input(w, case.batch, case.image, dev, requires_grad=train)
    e_ops = workloads.steady_device_ops(eager, x, train)
    if ctx.cuda:
        f_ops = workloads.steady_device_ops(fused, x, train)
    else:
        with host_only():
            f_ops = workloads.steady_device_ops(fused, x, train, noop_launches=True)
    out["device_ops"] = {"eager": e_ops.as_dict(TOP_OPS), "ours": f_ops.as_dict(TOP_OPS)}
    if train:
        sb = {"eager": workloads.saved_bytes(eager, x)}
        if ctx.cuda:
            sb["ours"] = workloads.saved_bytes(fused, x)
        else:
            with host_only():
                sb["ours"] = workloads.saved_bytes(fused, x)
        out["saved_bytes"] = sb
    else:
        out["saved_bytes"] = None
    out.update(host_time.measure_host(eager, fused, w, mode, case.batch, case.image, dev,
                                      **(single if ctx.smoke else dict(budget_s=2.0))))
    return out


def run_report_case(case: Case, ctx: RunContext) -> dict:
    """The record of one report case (status ok | error)."""
    rec = host_time.base_record(LEVEL, case.name, case.mode, case.batch, case.image, ctx.device, ctx.smoke)
    rec.update(id=case.id, group=case.group, arch=case.arch)
    try:
        rec.update(measure(case, ctx))
        rec["status"] = "ok"
    except Exception as err:  # noqa: BLE001  (recorded, then re-raised by the pytest wrapper)
        rec.update(status="error", reason=f"{type(err).__name__}: {err}"[:500], _exception=err)
    return rec
