"""The headline table: ResNeXt's time per batch against ResNet's, eager and on our kernels.

The paper (Xie et al., 2017, section 5.1): ResNeXt-101 32x4d takes 0.95 s per mini-batch
against 0.70 s for ResNet-101 at similar FLOPs (8 GPUs, 32 images each), a ratio of 1.36.
It gives no such figure for the 50-layer pair or for inference: those rows show "-".
"""
from typing import Iterable, List, Optional

PAPER_SECONDS = {"resnet101": 0.70, "resnext101_32x4d": 0.95}
PAPER_RATIO = PAPER_SECONDS["resnext101_32x4d"] / PAPER_SECONDS["resnet101"]
PAIRS = (("resnet101", "resnext101_32x4d"), ("resnet50", "resnext50_32x4d"))
TASKS = ("train", "inference")
PRETTY = {"resnet50": "ResNet-50", "resnet101": "ResNet-101",
          "resnext50_32x4d": "ResNeXt-50 32x4d", "resnext101_32x4d": "ResNeXt-101 32x4d"}


def _cell(records: Iterable[dict], arch: str, task: str, batch: int, provider: str) -> Optional[dict]:
    for r in records:
        if (r.get("level"), r.get("arch"), r.get("mode"), r.get("batch"), r.get("provider")) == \
                ("model", arch, task, batch, provider):
            return r
    return None


def _time(rec: Optional[dict]):
    """(milliseconds or None, is a speed, what happened)."""
    if rec is None:
        return None, False, "not run"
    if rec.get("status") != "ok":
        return None, False, rec.get("status", "?")
    if rec.get("median_ms") is None:
        return None, False, "checked" if rec.get("check_ms") is not None else "?"
    return rec["median_ms"], bool(rec.get("speed")), "ok"


def headline_rows(records: List[dict]) -> List[dict]:
    """One row per (task, pair, batch) found among the model records."""
    models = [r for r in records if r.get("level") == "model"]
    rows = []
    for task in TASKS:
        for resnet, resnext in PAIRS:
            batches = sorted({r["batch"] for r in models if r.get("mode") == task and r.get("arch") in (resnet, resnext)})
            for b in batches:
                rn, rn_speed, rn_what = _time(_cell(models, resnet, task, b, "eager"))
                rx, rx_speed, rx_what = _time(_cell(models, resnext, task, b, "eager"))
                # the tuned choice where a tuning cache gave one (said in the status), else the design's
                tuned = _cell(models, resnext, task, b, "ours_tuned")
                ours, ours_speed, ours_what = _time(tuned)
                if ours is None:
                    ours, ours_speed, ours_what = _time(_cell(models, resnext, task, b, "ours"))
                else:
                    ours_what = "tuned"
                rows.append(dict(
                    task=task, resnet=resnet, resnext=resnext, batch=b,
                    resnet_eager_ms=rn, resnext_eager_ms=rx, resnext_ours_ms=ours,
                    resnet_eager_speed=rn_speed, resnext_eager_speed=rx_speed, resnext_ours_speed=ours_speed,
                    resnext_ours_status=ours_what,
                    ratio_eager=(rx / rn) if rx and rn else None,
                    ratio_ours=(ours / rn) if ours and rn else None,
                    paper_ratio=PAPER_RATIO if (task == "train" and resnet == "resnet101") else None,
                ))
    return rows


def _fmt_ms(ms: Optional[float], speed: bool, what: str = "") -> str:
    if ms is None:
        return what or "-"
    text = f"{ms:.1f}" if ms >= 10 else f"{ms:.2f}"
    return text if speed else text + "*"


def _fmt_ratio(x: Optional[float], speed: bool = True) -> str:
    if x is None:
        return "-"
    return f"{x:.2f}" + ("" if speed else "*")


def _row_cells(r: dict) -> List[str]:
    """One headline row as text cells (shared by the terminal table and the Markdown one)."""
    return [
        r["task"], f"{PRETTY[r['resnext']]} vs {PRETTY[r['resnet']]}", str(r["batch"]),
        _fmt_ms(r["resnet_eager_ms"], r["resnet_eager_speed"]),
        _fmt_ms(r["resnext_eager_ms"], r["resnext_eager_speed"]),
        _fmt_ms(r["resnext_ours_ms"], r["resnext_ours_speed"], r.get("resnext_ours_status", "")),
        _fmt_ratio(r["ratio_eager"], r["resnet_eager_speed"] and r["resnext_eager_speed"]),
        _fmt_ratio(r["ratio_ours"], r["resnet_eager_speed"] and r["resnext_ours_speed"]),
        _fmt_ratio(r["paper_ratio"]),
    ]

def format_headline(rows: List[dict], header: Iterable[str] = ()) -> str:
    """The table as text; ``*`` marks figures that are not speeds (CPU reference path, smoke)."""
    cols = ["task", "models", "batch", "ResNet eager", "ResNeXt eager", "ResNeXt ours",
            "ResNeXt/ResNet eager", "ours/ResNet eager", "paper"]
    table = []
    any_star = False
    for r in rows:
        cells = _row_cells(r)
        any_star |= any(c.endswith("*") for c in cells)
        table.append(cells)
    widths = [max(len(c), *(len(t[i]) for t in table)) if table else len(c) for i, c in enumerate(cols)]
    lines = [f"Headline: time per batch in ms (median), and the ResNeXt / ResNet ratio "
             f"(paper: 0.95 s / 0.70 s = {PAPER_RATIO:.2f}, ResNeXt-101 32x4d vs ResNet-101 training)"]
    lines += [f"  {h}" for h in header]
    sep = "  "
    lines.append(sep.join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(cols, widths))))
    lines.append(sep.join("-" * w for w in widths))
    for t in table:
        lines.append(sep.join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(t, widths))))
    if not table:
        lines.append("(no ResNet/ResNeXt pair measured in this run)")
    if any_star:
        lines.append("* not a speed: a smoke run's single call, or PyTorch's reference path standing in for our "
                     "kernels off the GPU.")
    if any(r.get("resnext_ours_status") == "tuned" for r in rows):
        lines.append("ResNeXt ours: as resnext.tune chose on this device (its tuning cache: measured launch "
                     "configurations, blocks routed to PyTorch where it was faster).")
    elif rows:
        lines.append("ResNeXt ours: the design's launch configurations (no tuning cache for this device).")
    if any(r.get("resnext_ours_status") == "checked" for r in rows):
        lines.append("'checked': ran once through the Triton interpreter (correctness of the harness only).")
    return "\n".join(lines)


def headline_markdown(rows: List[dict]) -> str:
    head = ("| task | models | batch | ResNet eager (ms) | ResNeXt eager (ms) | ResNeXt ours (ms) "
            "| ResNeXt/ResNet eager | ours/ResNet eager | paper |\n|---|---|---:|---:|---:|---:|---:|---:|---:|")
    body = []
    for r in rows:
        body.append("| " + " | ".join(_row_cells(r)).replace("*", "\\*") + " |")
    return "\n".join([head] + body)
