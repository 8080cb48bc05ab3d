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
from .cases import Case
from .config import RunContext
from .device_ops import host_only

LEVEL = "report"
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


# ----------------------------------------------------------------------------------------
# Formatting
# ----------------------------------------------------------------------------------------
def _ops(d) -> str:
    return f"{d['eager']['total']} -> {d['ours']['total']} ({d['ours']['triton']}+{d['ours']['aten']})"


def _mib(sb) -> str:
    if not sb:
        return "-"
    return f"{sb['eager'] / 2 ** 20:.2f} -> {sb['ours'] / 2 ** 20:.2f}"


def _host(r) -> str:
    h = r.get("host_ms")
    return f"{h['eager']:.2f} -> {h['ours']:.2f} ({r['host_ratio']:.2f}x)" if h else "-"


def _ratio(r) -> str:
    return f"{r['cpu_ratio']:.2f}" if r.get("cpu_ratio") is not None else "-"


def _aten_top(r, n=6) -> str:
    names = r["device_ops"]["ours"]["by_name"]
    aten = [(k[len("aten::"):], v) for k, v in names.items() if k.startswith("aten::")][:n]
    return ", ".join(f"{k} {v}" for k, v in aten) or "none"


COLUMNS = ("workload", "mode", "device ops eager -> ours (Triton+aten)", "saved MiB eager -> ours",
           "host ms eager -> ours (ours/eager)", "CPU time ours/eager")


def rows(records) -> List[list]:
    out = []
    for r in records:
        if r.get("level") != LEVEL:
            continue
        if r.get("status") != "ok":
            out.append([r["name"], r["mode"], f"{r['status']}: {r.get('reason', '')}"[:60], "", "", ""])
            continue
        out.append([r["name"], r["mode"], _ops(r["device_ops"]), _mib(r.get("saved_bytes")), _host(r), _ratio(r)])
    return out


def title(cuda: bool) -> str:
    if cuda:
        return "Launch economy: fused ('ours') against eager, batch 2, 32x32 images (host time: enqueue time)"
    return ("CPU report: fused ('ours') against eager, batch 2, 32x32 images. NO CUDA GPU: kernel times need "
            "a CUDA GPU; these are counts, bytes and host overheads")


def notes(cuda: bool) -> List[str]:
    lines = ["device ops: one steady-state step (training: forward + backward; inference: no_grad forward); "
             "Triton launches + aten ops that launch device work (views/allocations excluded)",
             "saved: bytes of the storages autograd keeps for backward: activations (the input, the parameters "
             "and the fused path's cached packed weights left out)"]
    if cuda:
        lines.append("host ms: CPU-side enqueue time per step (no synchronisation inside the timing), median")
    else:
        lines += ["host ms: per step, device work left out (PyTorch convolutions and our launches as no-ops; "
                  "ours' own aten ops, weight-sized copies included, still run), one thread, median",
                  "CPU time ours/eager: the converted model on its PyTorch path against the unconverted one, "
                  "real CPU time, one thread (target <= 1.05)"]
    return lines


def format_report(records, cuda: bool = False) -> str:
    table = rows(records)
    if not table:
        return ""
    widths = [max(len(c), *(len(t[i]) for t in table)) for i, c in enumerate(COLUMNS)]
    lines = [title(cuda)]
    lines.append("  ".join(c.ljust(w) for c, w in zip(COLUMNS, widths)))
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(c.ljust(w) for c, w in zip(t, widths)) for t in table]
    lines += [f"  {n}" for n in notes(cuda)]
    ok = [r for r in records if r.get("level") == LEVEL and r.get("status") == "ok"]
    if ok:
        lines.append("ours' aten ops per step (the launches beyond one per kernel):")
        lines += [f"  {r['name']} {r['mode']}: {_aten_top(r)}" for r in ok]
    return "\n".join(lines)


def report_markdown(records, cuda: bool = False) -> str:
    table = rows(records)
    if not table:
        return ""
    lines = [f"## {'Launch economy' if cuda else 'CPU report'}", "", title(cuda), "",
             "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(c.replace("|", "/") for c in t) + " |" for t in table]
    lines += [""] + [f"- {n}" for n in notes(cuda)]
    ok = [r for r in records if r.get("level") == LEVEL and r.get("status") == "ok"]
    if ok:
        lines += ["", "ours' aten ops per step:", ""] + [f"- {r['name']} {r['mode']}: {_aten_top(r)}" for r in ok]
    return "\n".join(lines) + "\n"
