"""``python -m benchmarks.profile``: where the time of a model, a block or one layer goes.

* runs the target under ``torch.profiler`` and prints a per-kernel table: our Triton
  kernels vs cuDNN/cuBLAS vs PyTorch's elementwise and BatchNorm kernels (calls, total and
  mean time, share of the profiled GPU time, achieved GB/s and TFLOP/s);
* writes a Chrome trace (open in chrome://tracing or https://ui.perfetto.dev);
* writes a roofline plot (PNG; needs matplotlib, skipped with a message otherwise) placing
  each kernel against ceilings measured in the same session;
* for every conv shape of the target, reports the launch configuration our kernel uses
  (``kernels._runtime.conv_config``), its registers, spills and shared memory (compiled
  offline for sm_90: no GPU needed) and the Nsight Compute command line to run on it.

Bytes and FLOPs per kernel come from the launching operator's input shapes (exact for
convolutions and our operators, "inputs + one output" for everything else), attributed
to the longest kernel the operator launched.  Without CUDA the table lists CPU operators
(self CPU time), clearly labelled: it checks the tool, it does not measure our kernels.
"""
import argparse
import dataclasses
import inspect
import json
import math
import os
import shlex
import subprocess
import sys
import tempfile
import time
from collections import OrderedDict
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Tuple

import torch

from . import cases, config, shapes
from .ceilings import compute_ceiling_tflops, measure_ceilings
from .results import RESULTS_DIR, environment, slug

PROFILE_DIR = RESULTS_DIR / "profile"  # git-ignored

_ESIZE = {"float": 4, "c10::BFloat16": 2, "c10::Half": 2, "double": 8, "long int": 8, "int": 4,
          "bool": 1, "unsigned char": 1, "signed char": 1, "short int": 2}


# ----------------------------------------------------------------------------------------
# Bytes and FLOPs of one operator call, from the profiler's recorded shapes
# ----------------------------------------------------------------------------------------
def _numel(shape) -> int:
    return math.prod(shape) if shape else 0


def _conv_out(x, w, stride, padding, dilation=(1, 1)) -> List[int]:
    n, _, h, wd = x
    cout, _, kh, kw = w
    s = list(stride) if isinstance(stride, (list, tuple)) else [stride, stride]
    p = list(padding) if isinstance(padding, (list, tuple)) else [padding, padding]
    d = list(dilation) if isinstance(dilation, (list, tuple)) else [dilation, dilation]
    ho = (h + 2 * p[0] - d[0] * (kh - 1) - 1) // s[0] + 1
    wo = (wd + 2 * p[1] - d[1] * (kw - 1) - 1) // s[1] + 1
    return [n, cout, ho, wo]


def op_traffic(name: str, input_shapes, input_dtypes=None, concrete=None, default_esize: int = 2
               ) -> Optional[Tuple[int, int, bool]]:
    """``(bytes, flops, exact)`` of one operator call, or None when it has no tensor inputs.

    Exact for convolutions (forward and backward) and our operators; otherwise every tensor
    input read once and one output the size of the largest input written, 1 FLOP per
    output element (right for elementwise ops and BatchNorm).
    """
    shapes_ = list(input_shapes or [])
    dts = list(input_dtypes or [None] * len(shapes_))
    conc = list(concrete or [None] * len(shapes_))
    conc += [None] * (len(shapes_) - len(conc))

    def es(i):
        return _ESIZE.get(dts[i], default_esize) if i < len(dts) else default_esize

    tensors = [(s, es(i)) for i, s in enumerate(shapes_) if s and (i >= len(dts) or dts[i] in _ESIZE or dts[i] is None)]
    try:
        if name in ("aten::convolution", "resnext::conv_bn_act") and len(shapes_) >= 2 and len(shapes_[0]) == 4:
            x, w = shapes_[0], shapes_[1]
            if name == "aten::convolution":
                if conc[6]:  # transposed
                    return None
                y = _conv_out(x, w, conc[3], conc[4], conc[5])
            else:
                y = _conv_out(x, w, conc[2], conc[3])
            macs = _numel(y) * _numel(w[1:])
            read = sum(_numel(s) * e for s, e in tensors)
            return read + _numel(y) * es(0), 2 * macs, True
        if name == "aten::convolution_backward" and len(shapes_) >= 3:
            dy, x, w = shapes_[0], shapes_[1], shapes_[2]
            mask = conc[10] if len(conc) > 10 and conc[10] else [True, True, False]
            macs = _numel(dy) * _numel(w[1:])
            nbytes = (_numel(dy) + _numel(x)) * es(0) + _numel(w) * es(2)
            nbytes += (_numel(x) * es(1) if mask[0] else 0) + (_numel(w) * es(2) if mask[1] else 0)
            return nbytes, 2 * macs * (int(bool(mask[0])) + int(bool(mask[1]))), True
    except (TypeError, IndexError, ValueError):
        pass
    if not tensors:
        return None
    biggest = max(tensors, key=lambda t: _numel(t[0]) * t[1])
    return sum(_numel(s) * e for s, e in tensors) + _numel(biggest[0]) * biggest[1], _numel(biggest[0]), \
        name.startswith("resnext::bn_act")


_SPECIFIC = ("aten::convolution", "aten::convolution_backward", "resnext::conv_bn_act", "resnext::bn_act")


# ----------------------------------------------------------------------------------------
# Classifying kernels
# ----------------------------------------------------------------------------------------
def our_kernel_names() -> set:
    """Names of every ``@triton.jit`` function in the ``kernels`` package."""
    import importlib
    import pkgutil

    import kernels
    names = set()
    for mod in pkgutil.iter_modules(kernels.__path__):
        m = importlib.import_module(f"kernels.{mod.name}")
        for attr, obj in vars(m).items():
            if type(obj).__name__ in ("JITFunction", "InterpretedFunction", "Autotuner", "Heuristics"):
                fn = obj
                while hasattr(fn, "fn"):  # Autotuner -> JITFunction -> python function
                    fn = fn.fn
                names.add(getattr(fn, "__name__", attr))
    return {n for n in names if n}


def classify(name: str, ours: set) -> str:
    low = name.lower()
    if name in ours or any(low.startswith(o.lower()) for o in ours) or "resnext" in low:
        return "ours"
    if low.startswith("triton_") or low.startswith("triton::"):
        return "inductor"
    if any(k in low for k in ("cudnn", "xmma", "implicit_convolve", "conv", "wgrad", "dgrad", "fprop", "cutlass",
                              "gemm", "sm90_", "sm80_", "nhwc", "mkldnn", "addmm", "aten::mm", "linear")):
        return "cudnn/cublas" if "aten::" not in low else "conv/gemm (aten)"
    if any(k in low for k in ("elementwise", "vectorized", "batch_norm", "batchnorm", "bn_", "reduce", "relu",
                              "threshold", "add", "mul", "copy", "fill", "memset", "memcpy", "cat", "sum")):
        return "elementwise/BN"
    return "other"


# ----------------------------------------------------------------------------------------
# The per-kernel table
# ----------------------------------------------------------------------------------------
@dataclass
class Launch:
    name: str
    us: float
    nbytes: Optional[int] = None
    flops: Optional[int] = None


@dataclass
class KernelRow:
    name: str
    kind: str
    calls: int = 0
    total_us: float = 0.0
    bytes_: int = 0
    flops: int = 0
    timed_us: float = 0.0  # time of the calls whose bytes are known
    share: float = 0.0

    @property
    def mean_us(self) -> float:
        return self.total_us / self.calls if self.calls else 0.0

    @property
    def gbps(self) -> Optional[float]:
        return self.bytes_ / (self.timed_us * 1e-6) / 1e9 if self.timed_us and self.bytes_ else None

    @property
    def tflops(self) -> Optional[float]:
        return self.flops / (self.timed_us * 1e-6) / 1e12 if self.timed_us and self.flops else None

    @property
    def intensity(self) -> Optional[float]:
        return self.flops / self.bytes_ if self.bytes_ and self.flops else None

    def as_dict(self) -> dict:
        d = asdict(self)
        d.update(mean_us=self.mean_us, gbps=self.gbps, tflops=self.tflops, intensity=self.intensity)
        return d


def _owner(evt):
    """The operator whose shapes describe ``evt``'s work: the nearest convolution / our op
    above it, else the event itself."""
    e = evt
    while e is not None:
        if e.name in _SPECIFIC:
            return e
        e = e.cpu_parent
    return evt


def launches_from_events(events, device_type: str, default_esize: int) -> List[Launch]:
    """Every kernel launch (GPU) or operator self time (CPU), with the owner's bytes/FLOPs
    given to the owner's longest launch."""
    groups: Dict[int, List[Launch]] = OrderedDict()
    owners = {}
    for e in events:
        if e.device_type != torch.autograd.DeviceType.CPU:
            continue
        if device_type == "cuda":
            items = [Launch(k.name, float(k.duration)) for k in getattr(e, "kernels", [])]
        else:
            items = [Launch(e.name, float(e.self_cpu_time_total))] if e.self_cpu_time_total > 0 else []
        if not items:
            continue
        o = _owner(e)
        groups.setdefault(id(o), []).extend(items)
        owners[id(o)] = o
    out = []
    for key, items in groups.items():
        o = owners[key]
        t = op_traffic(o.name, o.input_shapes, getattr(o, "input_dtypes", None), getattr(o, "concrete_inputs", None),
                       default_esize)
        if t is not None:
            longest = max(items, key=lambda launch: launch.us)
            longest.nbytes, longest.flops = t[0], t[1]
        out.extend(items)
    return out


def kernel_table(launches: Iterable[Launch], ours: set) -> List[KernelRow]:
    rows: Dict[str, KernelRow] = {}
    for launch in launches:
        r = rows.setdefault(launch.name, KernelRow(launch.name, classify(launch.name, ours)))
        r.calls += 1
        r.total_us += launch.us
        if launch.nbytes:
            r.bytes_ += launch.nbytes
            r.flops += launch.flops or 0
            r.timed_us += launch.us
    total = sum(r.total_us for r in rows.values()) or 1.0
    for r in rows.values():
        r.share = r.total_us / total
    return sorted(rows.values(), key=lambda r: -r.total_us)


def format_table(rows: List[KernelRow], unit_label: str, limit: int = 40) -> str:
    head = f"{'kind':<16} {'calls':>6} {'total ms':>10} {'mean us':>10} {'share':>7} {'GB/s':>8} {'TFLOP/s':>8}  {unit_label}"
    lines = [head, "-" * len(head)]
    for r in rows[:limit]:
        gb = f"{r.gbps:8.0f}" if r.gbps else f"{'-':>8}"
        tf = f"{r.tflops:8.2f}" if r.tflops else f"{'-':>8}"
        name = r.name if len(r.name) <= 90 else r.name[:87] + "..."
        lines.append(f"{r.kind:<16} {r.calls:>6} {r.total_us / 1e3:>10.3f} {r.mean_us:>10.1f} {r.share:>6.1%} {gb} {tf}  {name}")
    if len(rows) > limit:
        rest = rows[limit:]
        lines.append(f"... {len(rest)} more ({sum(r.total_us for r in rest) / 1e3:.3f} ms)")
    by_kind: Dict[str, float] = {}
    for r in rows:
        by_kind[r.kind] = by_kind.get(r.kind, 0.0) + r.share
    lines.append("by kind: " + ", ".join(f"{k} {v:.1%}" for k, v in sorted(by_kind.items(), key=lambda kv: -kv[1])))
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------
# Roofline plot
# ----------------------------------------------------------------------------------------
def roofline_plot(rows: List[KernelRow], ceilings: dict, dtype: str, path: Path, title: str) -> Optional[str]:
    """Write the plot; returns a message instead when matplotlib is missing or nothing is placeable."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed: roofline plot skipped (pip install matplotlib)"
    pts = [r for r in rows if r.intensity and r.tflops]
    if not pts:
        return "no kernel with known bytes and FLOPs: roofline plot skipped"
    bw = ceilings["copy_GBps"] * 1e9
    peak = compute_ceiling_tflops(ceilings, dtype) * 1e12
    xs = [r.intensity for r in pts]
    lo, hi = min(xs + [1.0]) / 2, max(xs + [peak / bw]) * 4
    grid = [lo * (hi / lo) ** (i / 200) for i in range(201)]
    fig, ax = plt.subplots(figsize=(8, 5.5))
    ax.loglog(grid, [min(x * bw, peak) / 1e12 for x in grid], "k-", lw=1.5,
              label=f"roofline: copy {bw / 1e9:.0f} GB/s, {dtype} matmul {peak / 1e12:.0f} TFLOP/s")
    colors = {"ours": "tab:red", "cudnn/cublas": "tab:blue", "elementwise/BN": "tab:green", "inductor": "tab:purple"}
    for kind in sorted({r.kind for r in pts}):
        sel = [r for r in pts if r.kind == kind]
        ax.scatter([r.intensity for r in sel], [r.tflops for r in sel], s=[20 + 400 * r.share for r in sel],
                   alpha=0.7, color=colors.get(kind, "tab:gray"), label=kind)
    ax.set_xlabel("arithmetic intensity (FLOP/byte, counted minimum bytes)")
    ax.set_ylabel("achieved TFLOP/s")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return None


# ----------------------------------------------------------------------------------------
# Our kernels' launch configurations, registers, spills, shared memory (offline, sm_90)
# ----------------------------------------------------------------------------------------
def conv_kernel_flags(c: shapes.ConvShape, mode: str, dtype: str) -> dict:
    """The constexpr flags ``kernels.conv_bn_act`` launches for this layer inside the fused
    bottleneck (eval: BN folded in the epilogue; train: statistics, the previous BN on load)."""
    train = mode != "eval"
    return dict(
        KSIZE=c.ksize,
        IN_AFFINE=train and c.role in ("conv2", "conv3"), IN_RELU=train and c.role in ("conv2", "conv3"),
        OUT_AFFINE=not train, HAS_RESIDUAL=(not train) and c.residual, OUT_RELU=(not train) and c.relu,
        STATS=train, ALLOW_TF32=dtype == "fp32" and torch.backends.cudnn.allow_tf32,
        SQUEEZE=False,  # the squeeze-excite variant (conv3 of an SE block) is in kernels/_compile.py
        IN_GATE=False,  # so is the gated prologue (conv3 of a RegNetY block)
    )


def _tool(name: str) -> Optional[str]:
    try:
        import triton
        p = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name
        return str(p) if p.exists() else None
    except Exception:  # noqa: BLE001
        return None


def _ptxas() -> Optional[str]:
    try:
        from triton.backends.nvidia.compiler import get_ptxas
        try:
            return get_ptxas(90).path
        except TypeError:
            return get_ptxas().path
    except Exception:  # noqa: BLE001
        return _tool("ptxas-blackwell") or _tool("ptxas")


def parse_res_usage(text: str) -> dict:
    """``cuobjdump -res-usage`` -> {registers, stack, shared_static, local}."""
    import re
    m = re.search(r"REG:(\d+)\s+STACK:(\d+)\s+SHARED:(\d+)\s+LOCAL:(\d+)", text)
    if not m:
        return {}
    return dict(registers=int(m.group(1)), stack_bytes=int(m.group(2)), shared_static_bytes=int(m.group(3)),
                local_bytes=int(m.group(4)))


def parse_ptxas_verbose(text: str) -> dict:
    """``ptxas -v`` -> {spill_store_bytes, spill_load_bytes, registers}."""
    import re
    out = {}
    m = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", text)
    if m:
        out.update(spill_store_bytes=int(m.group(1)), spill_load_bytes=int(m.group(2)))
    m = re.search(r"Used (\d+) registers", text)
    if m:
        out["registers_ptxas"] = int(m.group(1))
    return out


_COMPILED: Dict[str, dict] = {}


def compile_conv_kernel(constexprs: dict, num_warps: int, num_stages: int, dtype: str, int_args: dict,
                        capability: int = 90) -> dict:
    """Compile ``conv_bn_act_fwd_kernel`` for ``sm_<capability>`` without a GPU; its resource usage.

    Returns registers, stack/local bytes (cuobjdump -res-usage), spill stores/loads (ptxas -v
    on the same PTX), dynamic shared memory, whether the SASS uses wgmma (HGMMA), or
    ``error``.  The interpreter patches ``triton.language``, so under ``TRITON_INTERPRET=1``
    the compilation runs in a child process without it.
    """
    return compile_requests([dict(constexprs=constexprs, num_warps=num_warps, num_stages=num_stages,
                                  dtype=dtype, int_args=int_args, capability=capability)])[0]


def compile_requests(requests: List[dict]) -> List[dict]:
    keys = [json.dumps(r, sort_keys=True) for r in requests]
    todo = [r for k, r in zip(keys, requests) if k not in _COMPILED]
    if todo:
        interpreted = os.environ.get("TRITON_INTERPRET", "0") == "1"
        infos = _compile_in_child(todo) if interpreted else [_compile_one(r) for r in todo]
        for r, info in zip(todo, infos):
            _COMPILED[json.dumps(r, sort_keys=True)] = info
    return [_COMPILED[k] for k in keys]


def _json_in_child(code: str, payload) -> object:
    """Run ``code`` (reads JSON on stdin, prints JSON last) in a child process without
    TRITON_INTERPRET: the interpreter patches triton.language and cannot compile."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, "-c", code], input=json.dumps(payload), capture_output=True,
                          text=True, env=env, cwd=root, timeout=1800)
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "child failed")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _compile_in_child(requests: List[dict]) -> List[dict]:
    code = ("import json, sys; from benchmarks.profile import _compile_one; "
            "print(json.dumps([_compile_one(r) for r in json.load(sys.stdin)]))")
    try:
        return _json_in_child(code, requests)
    except Exception as err:  # noqa: BLE001
        return [dict(error=f"{type(err).__name__}: {err}"[:300]) for _ in requests]


def _compile_one(req: dict) -> dict:
    constexprs, dtype, int_args = req["constexprs"], req["dtype"], req["int_args"]
    capability = req.get("capability", 90)
    info: dict = {}
    import warnings
    warnings.filterwarnings("ignore", message=".*TRITON_DEFAULT_FP_FUSION.*")  # Triton 3.9's notice
    try:
        import triton
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource

        from kernels.conv_bn_act import conv_bn_act_fwd_kernel as kern
        if not isinstance(kern, triton.runtime.JITFunction):
            kern = triton.runtime.JITFunction(kern.fn)
        from kernels._compile import jit_specialization
        act = {"bf16": "*bf16", "fp16": "*fp16", "fp32": "*fp32"}[dtype]
        # (a constexpr the launcher leaves out takes its default, in jit_specialization too)
        defaults = inspect.signature(kern.fn).parameters
        missing = [p.name for p in kern.params if p.is_constexpr and p.name not in constexprs
                   and defaults[p.name].default is inspect.Parameter.empty]
        if missing:
            raise KeyError(f"no value for constexpr(s) {missing}")
        pointers = {n: ("*i32" if n == "counter_ptr" else "*i64" if n == "nbt_ptr" else
                        "*fp32" if any(t in n for t in ("part_", "scale", "shift", "mean", "var", "m2", "gamma", "beta"))
                        else act)
                    for n in kern.arg_names if n.endswith("_ptr")}
        # as the JIT specialises the launch: aligned pointers, ints == 1 constant, multiples of 16
        sig, constexprs, attrs = jit_specialization(kern, int_args, pointers, constexprs)
        target = GPUTarget("cuda", capability, 32)
        options = dict(num_warps=req["num_warps"], num_stages=req["num_stages"])
        try:
            k = triton.compile(ASTSource(fn=kern, signature=sig, constexprs=constexprs, attrs=attrs),
                               target=target, options=options)
        except Exception:  # noqa: BLE001  (the attrs format differs across Triton versions: retry plain)
            k = triton.compile(ASTSource(fn=kern, signature=sig, constexprs=constexprs), target=target,
                               options=options)
        info["shared_bytes"] = int(getattr(k.metadata, "shared", 0))
        info["uses_wgmma"] = None
        with tempfile.TemporaryDirectory() as d:
            cubin = Path(d) / "k.cubin"
            cubin.write_bytes(k.asm["cubin"])
            cuobjdump = _tool("cuobjdump")
            if cuobjdump:
                r = subprocess.run([cuobjdump, "-res-usage", str(cubin)], capture_output=True, text=True, timeout=120)
                info.update(parse_res_usage(r.stdout))
                r = subprocess.run([cuobjdump, "-sass", str(cubin)], capture_output=True, text=True, timeout=120)
                info["uses_wgmma"] = "HGMMA" in r.stdout
            ptxas = _ptxas()
            if ptxas:
                ptx = Path(d) / "k.ptx"
                ptx.write_text(k.asm["ptx"])
                r = subprocess.run([ptxas, "-v", f"--gpu-name=sm_{capability}a", str(ptx), "-o", str(Path(d) / "o.cubin")],
                                   capture_output=True, text=True, timeout=300)
                info.update(parse_ptxas_verbose(r.stdout + r.stderr))
    except Exception as err:  # noqa: BLE001  (reported in the table, never fatal)
        info["error"] = f"{type(err).__name__}: {err}"[:300]
    return info


def ncu_command(target_args: List[str], kernel: str = "conv_bn_act_fwd_kernel", skip: int = 0, count: int = 1,
                report: str = "ncu_report") -> str:
    """Nsight Compute on our kernel, clocks left as the GPU sets them (as in the benchmarks)."""
    cmd = ["ncu", "--clock-control", "none", "--set", "full", "--kernel-name", f"regex:{kernel}",
           "--launch-skip", str(skip), "--launch-count", str(count), "-o", report,
           "python", "-m", "benchmarks.profile", *target_args, "--bare"]
    return shlex.join(cmd)


def triton_kernel_report(conv_list: List[shapes.ConvShape], batch: int, dtype: str, mode: str,
                         compile_offline: bool = True, image: int = 224) -> List[dict]:
    """One row per distinct conv shape: our launch config, resources, and an ncu command.

    Under ``TRITON_INTERPRET=1`` the report is made in a child process without it: the
    interpreter changes the launch configurations (``conv_config``) and cannot compile.
    """
    if os.environ.get("TRITON_INTERPRET", "0") != "1":
        return _triton_kernel_report_here(conv_list, batch, dtype, mode, compile_offline, image)
    code = ("import json, sys; from benchmarks.profile import _report_from_json; "
            "print(json.dumps(_report_from_json(json.load(sys.stdin))))")
    request = dict(convs=[dataclasses.asdict(c) for c in OrderedDict.fromkeys(conv_list)], batch=batch,
                   dtype=dtype, mode=mode, compile_offline=compile_offline, image=image)
    try:
        return _json_in_child(code, request)
    except Exception as err:  # noqa: BLE001
        return [dict(error=f"kernel report failed: {type(err).__name__}: {err}"[:300])]


def _report_from_json(req: dict) -> List[dict]:
    convs = [shapes.ConvShape(**c) for c in req["convs"]]
    return _triton_kernel_report_here(convs, req["batch"], req["dtype"], req["mode"], req["compile_offline"],
                                      req["image"])


def _triton_kernel_report_here(conv_list, batch, dtype, mode, compile_offline, image) -> List[dict]:
    try:
        from kernels._compile import weight_operand_strides
        from kernels._runtime import conv_config
        from kernels.conv_bn_act import finalize_constexprs
    except ImportError as err:
        return [dict(error=f"kernels._runtime.conv_config unavailable: {err}")]
    rows, requests = [], []
    tdtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype]
    for c in OrderedDict.fromkeys(conv_list):
        M = batch * c.ho * c.wo
        try:
            cfg = conv_config(M, c.cout, c.cin_per_group, c.cout_per_group, tdtype)
        except TypeError:  # older signature without the dtype
            cfg = conv_config(M, c.cout, c.cin_per_group, c.cout_per_group)
        blocks = {k: v for k, v in cfg.items() if k.isupper()}
        flags = conv_kernel_flags(c, mode, dtype)
        if flags["STATS"]:  # train: the BN's statistics finalized in the launch (running statistics, momentum)
            flags.update(finalize_constexprs((True, True, False, True), cfg["BLOCK_N"]))
        row = dict(layer=c.label, role=c.role, M=M, cout=c.cout, cin_g=c.cin_per_group, cout_g=c.cout_per_group,
                   config=cfg, flags={k: v for k, v in flags.items() if v not in (False,)},
                   grid=[-(-M // cfg["BLOCK_M"]), -(-c.cout // cfg["BLOCK_N"])])
        ints = dict(N=batch, H=c.h, W=c.w, Cin=c.cin, Ho=c.ho, Wo=c.wo, Cout=c.cout, CIN_G=c.cin_per_group,
                    COUT_G=c.cout_per_group, stride=c.stride, padding=c.padding, sq_slots=1)
        long_dtype = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}[dtype]
        ints.update(zip(("w_stride_tap", "w_stride_ci", "w_stride_co"),
                        weight_operand_strides(c.cout, c.cin_per_group, c.ksize, long_dtype)))
        requests.append(dict(constexprs={**flags, **blocks}, num_warps=cfg.get("num_warps", 4),
                             num_stages=cfg.get("num_stages", 3), dtype=dtype, int_args=ints, capability=90))
        kmode = "eval" if mode == "eval" else "train"
        target = ["--layer", c.label, "--mode", kmode, "--batch", str(batch), "--dtype", dtype]
        if image != 224:
            target += ["--image", str(image)]
        row["ncu"] = ncu_command(target + ["--warmup", "3", "--steps", "1"], skip=3,
                                 report=f"ncu_{c.label}_{kmode}_b{batch}")
        rows.append(row)
    if compile_offline:
        for row, info in zip(rows, compile_requests(requests)):
            row["sm90"] = info
    return rows


def format_kernel_report(rows: List[dict], all_ncu: bool = True) -> str:
    lines = [f"{'layer':<44} {'M':>8} {'BM':>4} {'BN':>4} {'BK':>4} {'warps':>5} {'regs':>5} {'spill st/ld B':>14} "
             f"{'smem KiB':>8} {'wgmma':>5}"]
    lines.append("-" * len(lines[0]))
    for r in rows:
        if "config" not in r:
            lines.append(str(r))
            continue
        cfg, hw = r["config"], r.get("sm90", {})
        spill = (f"{hw['spill_store_bytes']}/{hw['spill_load_bytes']}" if "spill_store_bytes" in hw else "-")
        smem = f"{hw['shared_bytes'] / 1024:.1f}" if "shared_bytes" in hw else "-"
        wg = {True: "yes", False: "no"}.get(hw.get("uses_wgmma"), "-")
        lines.append(f"{r['layer']:<44} {r['M']:>8} {cfg['BLOCK_M']:>4} {cfg['BLOCK_N']:>4} {cfg['BLOCK_K']:>4} "
                     f"{cfg.get('num_warps', '-'):>5} {hw.get('registers', '-'):>5} {spill:>14} {smem:>8} {wg:>5}"
                     + (f"  error: {hw['error']}" if "error" in hw else ""))
    cmds = [r["ncu"] for r in rows if "ncu" in r]
    if cmds and all_ncu:
        lines.append("Nsight Compute, one line per layer (on the GPU machine):")
        lines += [f"  {c}" for c in cmds]
    elif cmds:
        lines.append(f"Nsight Compute on one layer (on the GPU machine; every layer's line is in triton_kernels.txt):\n  {cmds[0]}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------
# Targets and the command line
# ----------------------------------------------------------------------------------------
def make_case(args, ctx) -> cases.Case:
    dt = args.dtype or cases.model_dtype(ctx)
    if args.layer:
        image = args.image or ctx.profile.kernel_image
        found = {c.label: c for c in shapes.unique_convs(("resnext50_32x4d", "resnext101_32x4d", "resnet50",
                                                          "resnet101"), image)}
        if args.layer not in found:
            raise SystemExit(f"unknown layer {args.layer!r} at image {image}; e.g. {next(iter(found))}")
        mode = args.mode or "eval"
        return cases.Case("kernel", args.layer, mode, dt, args.batch or ctx.profile.kernel_batches[0], args.provider,
                          shape=found[args.layer], image=image)
    if args.block:
        arch, _, stage = args.block.partition(".stage")
        return cases.Case("block", args.block, args.mode or "train", dt, args.batch or ctx.profile.block_batches[0],
                          args.provider, arch=arch, stage=int(stage), image=args.image or ctx.profile.kernel_image)
    arch = args.model or (cases.MINI if ctx.ours_runs == "interpreter" and args.provider == "ours"
                          else "resnext50_32x4d")
    if arch not in shapes.ARCHS and arch != cases.MINI:
        raise SystemExit(f"unknown model {arch!r}; choose from {', '.join(list(shapes.ARCHS) + [cases.MINI])}")
    return cases.Case("model", arch, args.mode or "train", dt, args.batch or ctx.profile.model_batches[0],
                      args.provider, arch=arch, image=args.image or ctx.profile.image)


def target_convs(case: cases.Case) -> List[shapes.ConvShape]:
    if case.level == "kernel":
        return [case.shape]
    if case.level == "block":
        return shapes.block_convs(case.arch, case.stage, 1, case.image)
    if case.arch in shapes.ARCHS:
        return shapes.model_convs(case.arch, case.image)
    return []


def parse_args(argv=None):
    ap = argparse.ArgumentParser(prog="python -m benchmarks.profile", description=__doc__.split("\n\n")[0])
    tgt = ap.add_mutually_exclusive_group()
    tgt.add_argument("--model", default=None,
                     help=f"one of {', '.join(list(shapes.ARCHS) + [cases.MINI])} (default: resnext50_32x4d; "
                          f"{cases.MINI} under the Triton interpreter)")
    tgt.add_argument("--block", default=None, help="one bottleneck, e.g. resnext50_32x4d.stage1")
    tgt.add_argument("--layer", default=None, help="one conv layer by label, e.g. conv3x3_st1_s1_128to128_g32_56")
    ap.add_argument("--mode", default=None,
                    help="model: train|inference (default train); block: eval|train|fwdbwd; layer: eval|train|backward")
    ap.add_argument("--provider", default="ours", choices=config.PROVIDERS)
    ap.add_argument("--batch", type=int, default=None)
    ap.add_argument("--image", type=int, default=None)
    ap.add_argument("--dtype", default=None, choices=("bf16", "fp32"))
    ap.add_argument("--steps", type=int, default=3, help="profiled steps")
    ap.add_argument("--warmup", type=int, default=2, help="steps before profiling")
    ap.add_argument("--out", default=None, help="output directory (default: benchmarks/results/profile/<run>)")
    ap.add_argument("--tiny", action="store_true", help="tiny sizes (checks the tool; what CI runs)")
    ap.add_argument("--device", default=None)
    ap.add_argument("--no-plot", action="store_true")
    ap.add_argument("--no-trace", action="store_true")
    ap.add_argument("--no-kernel-info", action="store_true", help="skip the offline sm_90 compilation report")
    ap.add_argument("--bare", action="store_true",
                    help="run warm-up + steps without torch.profiler (for ncu / nsys)")
    ap.add_argument("--limit", type=int, default=40, help="rows of the kernel table")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    return config.run_cli(parse_args(argv), _run, argv)


def _run(args, ctx, argv) -> int:
    if ctx.cuda:
        torch.backends.cudnn.benchmark = True
    case = make_case(args, ctx)
    if case.mode not in {"kernel": cases.KERNEL_MODES, "block": cases.BLOCK_MODES,
                         "model": cases.MODEL_TASKS}[case.level]:
        raise SystemExit(f"mode {case.mode!r} does not apply to a {case.level}")
    reason = cases.skip_reason(case, ctx)
    if reason:
        raise SystemExit(f"cannot profile {case.id}: {reason}")
    bench = cases.build(case, ctx)
    sync = (lambda: torch.cuda.synchronize(ctx.device)) if ctx.cuda else (lambda: None)
    for _ in range(args.warmup):
        bench.fn()
    sync()
    if args.bare:
        for _ in range(args.steps):
            bench.fn()
        sync()
        print(f"ran {case.id}: {args.warmup} warm-up + {args.steps} steps (no profiler)")
        return 0

    for line in config.header_lines(ctx):
        print(line)
    stamp = time.strftime("%Y%m%dT%H%M%S")
    out = Path(args.out) if args.out else PROFILE_DIR / f"{stamp}_{slug(config.describe_device(ctx.device))}_{slug(case.id)}"
    out.mkdir(parents=True, exist_ok=True)
    ceilings = measure_ceilings(ctx.device, smoke=ctx.smoke)

    from torch.profiler import ProfilerActivity, profile
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if ctx.cuda else [])
    t0 = time.perf_counter()
    with profile(activities=activities, record_shapes=True) as prof:
        for _ in range(args.steps):
            bench.fn()
        sync()
    step_ms = (time.perf_counter() - t0) * 1e3 / max(1, args.steps)
    esize = 2 if case.dtype == "bf16" else 4
    launches = launches_from_events(prof.events(), ctx.device.type, esize)
    rows = kernel_table(launches, our_kernel_names())
    unit = "kernel" if ctx.cuda else "CPU operator (self time; NOT kernel speed: no GPU)"
    print(f"\n{case.id}: {args.steps} profiled steps, {step_ms:.1f} ms per step (wall, under the profiler)")
    if not ctx.cuda:
        print("No CUDA GPU: the table lists CPU operators, not GPU kernels; it checks the tool, not our kernels.")
    table = format_table(rows, unit, args.limit)
    print(table)
    report = dict(case=case.describe(), steps=args.steps, step_ms_profiled=step_ms, ceilings=ceilings,
                  environment=environment(ctx.device, [sys.argv[0]] + list(sys.argv[1:] if argv is None else argv),
                                          ctx.interpret),
                  rows=[r.as_dict() for r in rows], files={})
    (out / "kernels.txt").write_text(table + "\n")
    if not args.no_trace:
        trace = out / "trace.json"
        prof.export_chrome_trace(str(trace))
        report["files"]["trace"] = str(trace)
        print(f"Chrome trace: {trace}")
    if not args.no_plot:
        png = out / "roofline.png"
        msg = roofline_plot(rows, ceilings, case.dtype, png, f"{case.id} on {config.describe_device(ctx.device)}")
        if msg:
            print(msg)
        else:
            report["files"]["roofline"] = str(png)
            print(f"roofline plot: {png}")
    if not args.no_kernel_info:
        convs = target_convs(case)
        if convs:
            kmode = "eval" if case.mode in ("eval", "inference") else "train"
            info = triton_kernel_report(convs, case.batch, case.dtype, kmode, image=case.image)
            print(f"\nOur conv kernel per shape ({kmode}; compiled offline for sm_90, registers/spills/shared "
                  f"from cuobjdump and ptxas):\n{format_kernel_report(info, all_ncu=False)}")
            (out / "triton_kernels.txt").write_text(format_kernel_report(info) + "\n")
            report["triton_kernels"] = info
    (out / "profile.json").write_text(json.dumps(report, indent=1, default=str) + "\n")
    print(f"report: {out / 'profile.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
