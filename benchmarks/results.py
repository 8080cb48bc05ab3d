"""Results files: one JSON (every figure) and one Markdown summary per run.

Full runs on a CUDA GPU write to ``benchmarks/results/`` (the files the README quotes);
smoke runs write to ``benchmarks/results/smoke/`` (``"smoke": true``) and full runs without
a GPU to ``benchmarks/results/cpu/``, both git-ignored.  The format is
documented in benchmarks/README.md and checked by ``validate``.
"""
import json
import os
import platform
import re
import shlex
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Dict, List, Optional

import torch
import triton

from . import headline, tables
from .config import BASELINE, PROVIDER_LABELS, RunContext, describe_device, header_lines

SCHEMA = "resnext-benchmarks/1"
RESULTS_DIR = Path(__file__).resolve().parent / "results"
SMOKE_DIR = RESULTS_DIR / "smoke"  # git-ignored: smoke runs (without --benchmark)
CPU_DIR = RESULTS_DIR / "cpu"  # git-ignored: full runs without a GPU (PyTorch on the CPU, no Triton timings)

REQUIRED_TOP = {"schema": str, "smoke": bool, "complete": bool, "profile": str, "header": list, "environment": dict,
                "ceilings": (dict, type(None)), "records": list, "headline": dict, "summary": dict}
REQUIRED_ENV = {"date": str, "command": str, "argv": list, "device_type": str, "device_name": str,
                "driver": (str, type(None)), "cuda": (str, type(None)), "torch": str, "triton": str,
                "python": str, "triton_interpret": bool}
REQUIRED_RECORD = {"id": str, "group": str, "level": str, "name": str, "mode": str, "dtype": str, "batch": int,
                   "provider": str, "status": str, "speed": bool, "runs": str}
TIMED_RECORD = {"median_ms": (float, type(None)), "n_samples": int, "timing": str, "flops": (int, type(None)),
                "min_bytes": (int, type(None)), "gbps": (float, type(None)), "tflops": (float, type(None)),
                "roofline_fraction": (float, type(None)), "speedup_vs_eager": (float, type(None)),
                "peak_mem_bytes": (int, type(None))}


# ----------------------------------------------------------------------------------------
# Environment
# ----------------------------------------------------------------------------------------
def command_line(argv: Optional[List[str]] = None) -> str:
    """The command as typed: ``python -m pytest ...`` / ``python -m benchmarks ...`` when run that way."""
    argv = list(sys.argv if argv is None else argv)
    if not argv:
        return ""
    first = Path(argv[0].replace("\\", "/"))
    if first.name == "__main__.py":  # python -m <package>
        head = ["python", "-m", first.parent.name]
    elif first.suffix == ".py" and first.parent.name == "benchmarks":  # python -m benchmarks.<module>
        head = ["python", "-m", f"benchmarks.{first.stem}"]
    else:
        head = [first.name]
    return shlex.join(head + argv[1:])


def nvidia_driver() -> Optional[str]:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=10)
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.strip().splitlines()[0]
    except (OSError, subprocess.SubprocessError):
        pass
    try:
        text = Path("/proc/driver/nvidia/version").read_text()
        m = re.search(r"Kernel Module\s+([\d.]+)", text)
        return m.group(1) if m else None
    except OSError:
        return None


def git_commit() -> Optional[str]:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10,
                             cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def environment(device: torch.device, argv: Optional[List[str]] = None, interpret: bool = False) -> dict:
    env = dict(
        date=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        command=command_line(argv),
        argv=list(sys.argv if argv is None else argv),
        device_type=device.type,
        device_name=describe_device(device),
        driver=None,
        cuda=torch.version.cuda,
        cudnn=None,
        torch=torch.__version__,
        triton=triton.__version__,
        python=platform.python_version(),
        platform=platform.platform(),
        cpu_count=os.cpu_count(),
        triton_interpret=interpret,
        git_commit=git_commit(),
    )
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(
            driver=nvidia_driver(),
            cudnn=str(torch.backends.cudnn.version()),
            device_count=torch.cuda.device_count(),
            sm_count=props.multi_processor_count,
            memory_bytes=props.total_memory,
            l2_bytes=getattr(props, "L2_cache_size", None),
            capability=f"{props.major}.{props.minor}",
            cudnn_benchmark=torch.backends.cudnn.benchmark,
            allow_tf32_conv=torch.backends.cudnn.allow_tf32,
            allow_tf32_matmul=torch.backends.cuda.matmul.allow_tf32,
        )
    return env


# ----------------------------------------------------------------------------------------
# Collecting and writing
# ----------------------------------------------------------------------------------------
def add_speedups(records: List[dict]) -> None:
    """``speedup_vs_eager`` = eager channels_last's median / this median, both speeds, same group."""
    base: Dict[str, float] = {}
    for r in records:
        if r.get("provider") == BASELINE and r.get("status") == "ok" and r.get("speed") and r.get("median_ms"):
            base[r["group"]] = r["median_ms"]
    for r in records:
        b = base.get(r.get("group"))
        ok = r.get("status") == "ok" and r.get("speed") and r.get("median_ms")
        r["speedup_vs_eager"] = (b / r["median_ms"]) if (b and ok) else None


def _clean(record: dict) -> dict:
    """JSON-safe copy: private keys dropped, every timed-record field present."""
    out = {k: v for k, v in record.items() if not k.startswith("_")}
    if out.get("status") == "ok":
        for k in TIMED_RECORD:
            out.setdefault(k, None)
    return out


class Collector:
    """Gathers the records of one run and writes its JSON + Markdown.

    With ``checkpoint_s`` the files are rewritten (``"complete": false``) at most that often
    as records arrive, so a run killed by a time limit still leaves every figure measured
    so far; ``finish`` writes the final version (``"complete": true``) to the same paths.
    """

    def __init__(self, ctx: RunContext, argv: Optional[List[str]] = None, out_dir: Optional[Path] = None,
                 checkpoint_s: Optional[float] = None):
        self.ctx = ctx
        self.argv = list(sys.argv if argv is None else argv)
        self.out_dir = out_dir
        self.checkpoint_s = checkpoint_s
        self.records: List[dict] = []
        self._env: Optional[dict] = None
        self._last_write = time.monotonic()

    def add(self, record: dict) -> None:
        self.records.append(_clean(record))
        if self.checkpoint_s is not None and time.monotonic() - self._last_write >= self.checkpoint_s:
            try:
                self._write(complete=False)
            except Exception:  # noqa: BLE001  (a checkpoint must never stop the run; finish reports)
                pass

    def document(self, complete: bool = True) -> dict:
        if self._env is None:  # once per run: the date (and so the file name) stays fixed
            self._env = environment(self.ctx.device, self.argv, self.ctx.interpret)
        add_speedups(self.records)
        rows = headline.headline_rows(self.records)
        head = header_lines(self.ctx)
        counts: Dict[str, int] = {}
        for r in self.records:
            counts[r["status"]] = counts.get(r["status"], 0) + 1
        return dict(
            schema=SCHEMA,
            smoke=self.ctx.smoke,
            complete=complete,
            profile=self.ctx.profile.name,
            header=head,
            providers=PROVIDER_LABELS,
            environment=self._env,
            ceilings=self.ctx.ceilings,
            records=self.records,
            headline=dict(rows=rows, text=headline.format_headline(rows, head)),
            summary=dict(n_records=len(self.records), by_status=counts,
                         ours_runs=self.ctx.ours_runs, compile_backend=self.ctx.compile_backend or "inductor"),
        )

    def _write(self, complete: bool) -> Dict[str, Path]:
        paths = write(self.document(complete), self.out_dir)
        self._last_write = time.monotonic()
        return paths

    def finish(self, out_dir: Optional[Path] = None) -> Optional[Dict[str, Path]]:
        """Write ``<date>_<device>_<profile>.json`` and ``.md``; returns their paths (None if no records)."""
        if not self.records:
            return None
        if out_dir is not None:
            self.out_dir = out_dir
        return self._write(complete=True)


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-")[:48] or "device"


def result_paths(doc: dict, out_dir: Optional[Path] = None) -> Dict[str, Path]:
    if out_dir is None:
        out_dir = SMOKE_DIR if doc["smoke"] else (RESULTS_DIR if doc["environment"]["device_type"] == "cuda"
                                                  else CPU_DIR)
    date = doc["environment"]["date"].replace(":", "").replace("-", "")[:15]  # 20261123T120000
    stem = f"{date}_{slug(doc['environment']['device_name'])}_{doc['profile']}"
    out_dir = Path(out_dir)
    return {"json": out_dir / f"{stem}.json", "md": out_dir / f"{stem}.md"}


def write(doc: dict, out_dir: Optional[Path] = None) -> Dict[str, Path]:
    problems = validate(doc)
    if problems:
        raise ValueError("results document does not match the schema: " + "; ".join(problems))
    paths = result_paths(doc, out_dir)
    paths["json"].parent.mkdir(parents=True, exist_ok=True)
    paths["json"].write_text(json.dumps(doc, indent=1, default=_json_default) + "\n")
    paths["md"].write_text(markdown(doc))
    return paths


def _json_default(o):
    if isinstance(o, (torch.dtype, torch.device, Path)):
        return str(o)
    raise TypeError(f"not JSON-serialisable: {type(o).__name__}")


def _type_ok(value, types) -> bool:
    if isinstance(value, bool) and types in (int, float):  # bool is an int: do not let it pass
        return False
    if types is float or (isinstance(types, tuple) and float in types):
        if isinstance(value, int) and not isinstance(value, bool):
            return True
    return isinstance(value, types)


def validate(doc: dict) -> List[str]:
    """Schema problems of a results document (empty when it is valid)."""
    problems = []

    def check(obj, spec, where):
        for key, types in spec.items():
            if key not in obj:
                problems.append(f"{where}: missing {key!r}")
            elif not _type_ok(obj[key], types):
                problems.append(f"{where}: {key!r} has type {type(obj[key]).__name__}")

    check(doc, REQUIRED_TOP, "document")
    if doc.get("schema") != SCHEMA:
        problems.append(f"document: schema is {doc.get('schema')!r}, expected {SCHEMA!r}")
    check(doc.get("environment", {}), REQUIRED_ENV, "environment")
    for i, r in enumerate(doc.get("records", [])):
        check(r, REQUIRED_RECORD, f"records[{i}]")
        if r.get("status") == "ok":
            check(r, TIMED_RECORD, f"records[{i}]")
            if not r.get("speed") and any(r.get(k) is not None for k in ("gbps", "tflops", "speedup_vs_eager")):
                problems.append(f"records[{i}]: derived speed figures on a record that is not a speed")
            if r.get("runs") == "interpreter" and r.get("median_ms") is not None:
                problems.append(f"records[{i}]: an interpreter run carries a median time")
        elif r.get("status") in ("skipped", "error", "oom") and "reason" not in r:
            problems.append(f"records[{i}]: status {r['status']} without a reason")
    if "rows" not in doc.get("headline", {}):
        problems.append("headline: missing 'rows'")
    return problems


# ----------------------------------------------------------------------------------------
# Markdown
# ----------------------------------------------------------------------------------------
def _num(x, fmt="{:.3g}") -> str:
    return "-" if x is None else fmt.format(x)


def markdown(doc: dict) -> str:
    env = doc["environment"]
    kind = doc["profile"] + (" run" if doc["profile"] == "smoke" else (", smoke" if doc["smoke"] else " profile"))
    lines = [f"# Benchmark results: {env['device_name']} ({kind})", ""]
    if not doc.get("complete", True):
        lines += ["**Partial: the run had not finished when this was written.**", ""]
    lines += [f"> {h}" for h in doc["header"]] + [""]
    lines += [
        f"- date: {env['date']}",
        f"- command: `{env['command']}`",
        f"- torch {env['torch']}, triton {env['triton']}, CUDA {env.get('cuda') or '-'}, "
        f"driver {env.get('driver') or '-'}, cuDNN {env.get('cudnn') or '-'}",
        f"- python {env['python']}, {env['platform']}, git {env.get('git_commit') or '-'}",
    ]
    c = doc.get("ceilings")
    if c:
        lines.append(f"- ceilings (measured in this run): copy {c['copy_GBps']:.0f} GB/s, "
                     f"bf16 matmul {c['matmul_bf16_TFLOPs']:.1f} TFLOP/s, fp32 matmul {c['matmul_fp32_TFLOPs']:.1f} "
                     f"TFLOP/s{' (smoke sizes: meaningless)' if c.get('smoke') else ''}")
    rows = doc["headline"]["rows"]
    lines += ["", "## Headline", "",
              headline.headline_markdown(rows) if rows else "(no ResNet/ResNeXt pair measured in this run)", ""]
    for level in ("kernel", "block", "model"):
        recs = [r for r in doc["records"] if r["level"] == level]
        if not recs:
            continue
        lines += [f"## {level.capitalize()} level", "",
                  "| case | mode | dtype | batch | provider | median ms | vs eager | GB/s | TFLOP/s | roofline "
                  "| peak MiB | status |",
                  "|---|---|---|---:|---|---:|---:|---:|---:|---:|---:|---|"]
        for r in recs:
            t = r.get("median_ms")
            t_txt = "-" if t is None else (f"{t:.3f}" + ("" if r.get("speed") else "\\*"))
            if t is None and r.get("check_ms") is not None:
                t_txt = "checked"
            mem = r.get("peak_mem_bytes")
            status = r["status"] if r["status"] == "ok" else f"{r['status']}: {r.get('reason', '')}"
            lines.append("| " + " | ".join([
                r["name"], r["mode"], r["dtype"], str(r["batch"]), r["provider"], t_txt,
                _num(r.get("speedup_vs_eager"), "{:.2f}x"), _num(r.get("gbps"), "{:.0f}"),
                _num(r.get("tflops"), "{:.1f}"), _num(r.get("roofline_fraction"), "{:.0%}"),
                _num(mem / 2 ** 20 if mem else None, "{:.0f}"), status.replace("|", "/"),
            ]) + " |")
        lines.append("")
    text = tables.report_markdown(doc["records"], doc["environment"]["device_type"] == "cuda")
    if text:
        lines += [text]
    host = [r for r in doc["records"] if r.get("level") == "host"]
    if host:
        lines += ["## Host time", "", "```", tables.format_host(host), "```", ""]
    lines.append("\\* not a speed (smoke run, or PyTorch's reference path standing in for our kernels off the GPU).")
    return "\n".join(lines) + "\n"
