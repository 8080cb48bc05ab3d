"""Text and markdown tables of result records: formatting only (nothing is measured here), so
that the modules that measure (``host_time``, ``report``) and the one that writes results files
(``results``) share it without importing one another."""
from typing import List

REPORT_LEVEL = "report"  # the level of ``benchmarks.report``'s records


def format_host(records) -> str:
    lines = ["Host time per step in ms (median), fused ('ours') against eager; device work left out"]
    for r in records:
        if r.get("status") != "ok":
            lines.append(f"  {r['name']:<24} {r['mode']:<9} {r['status']}: {r.get('reason', '')}")
            continue
        h = r["host_ms"]
        lines.append(f"  {r['name']:<24} {r['mode']:<9} eager {h['eager']:8.2f}   ours {h['ours']:8.2f}   "
                     f"ours/eager {r['host_ratio']:5.2f}   (n={r['n_samples']})")
    if records:
        how = next((r["host_how"] for r in records if "host_how" in r), None)
        if how:
            lines.append(f"  eager: {how['eager']}; ours: {how['ours']}")
    return "\n".join(lines)


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
        if r.get("level") != REPORT_LEVEL:
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
    ok = [r for r in records if r.get("level") == REPORT_LEVEL and r.get("status") == "ok"]
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
    ok = [r for r in records if r.get("level") == REPORT_LEVEL and r.get("status") == "ok"]
    if ok:
        lines += ["", "ours' aten ops per step:", ""] + [f"- {r['name']} {r['mode']}: {_aten_top(r)}" for r in ok]
    return "\n".join(lines) + "\n"
