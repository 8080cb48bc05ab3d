"""Host time per step, fused against eager in the same run: ``python -m benchmarks.host_time``.

What the CPU spends issuing one training step (forward + ``.sum().backward()``) or one
inference forward, the device's work left out:

* on a CUDA GPU: ``time.perf_counter`` around the call without synchronising (the
  CPU-side enqueue time), synchronising after it, outside the timed region;
* on a CPU there is no device; device work is left out on both sides: inside
  ``device_work_left_out()`` every ``aten::convolution`` and ``aten::convolution_backward``
  on CPU tensors only allocates its outputs (a Python kernel registered over PyTorch's for
  the duration, ~10 us a call, about what cuDNN's host side costs), the fused modules take
  their Triton path on CPU tensors with every Triton launch a no-op, and the remaining
  small ops (BN, ReLU, adds, the classifier) run for real on tiny tensors (batch 2,
  32x32 images by default).  Without it, a 2-core CPU spends ~90 % of an eager ResNeXt-50
  step at 32x32 computing convolution gradients; the ``meta`` device is no way out (its
  Python shape functions take ~4 ms for a BatchNorm).  Not a speed: the figures rank host
  overheads, they are no GPU time.

Steps are steady-state (``workloads.Stepper``: a warm-up step first; between timed steps,
outside the timing, an SGD step and ``zero_grad``), eager and fused calls interleaved, the
median reported.  ``measure_cpu_ratio`` times the real CPU step of a converted model (the
pure-PyTorch path, without the interpreter) against its unconverted twin.
"""
import argparse
import copy
import dataclasses
import statistics
import sys
import time
import warnings
from contextlib import contextmanager, nullcontext
from typing import Dict, Optional, Sequence

import torch

from . import config, results, workloads
from .tables import format_host
from .device_ops import forced_triton_path, host_only

WORKLOADS = (workloads.BOTTLENECK, "resnet50", "resnext50_32x4d", "resnet101", "resnext101_32x4d")
MODES = ("train", "inference")


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def interleaved_samples(steppers: Dict[str, "workloads.Stepper"], contexts: Dict[str, object], device,
                        warmup: int = 1, min_reps: int = 5, max_reps: int = 50, budget_s: float = 2.0,
                        sync_inside: bool = False) -> Dict[str, list]:
    """Milliseconds per ``step()`` of each stepper, calls interleaved (one of each per round).

    ``contexts[name]()`` is entered around each of that stepper's calls (e.g. ``host_only``).
    ``sync_inside``: synchronise before stopping the clock (a device time, not an enqueue time).
    """
    samples = {k: [] for k in steppers}
    for name, s in steppers.items():
        with contexts.get(name, nullcontext)():
            s.warm(warmup)
    _sync(device)
    t_start = time.perf_counter()
    for rep in range(max_reps):
        for name, s in steppers.items():
            with contexts.get(name, nullcontext)():
                _sync(device)
                t0 = time.perf_counter()
                s.step()
                if sync_inside:
                    _sync(device)
                t1 = time.perf_counter()
                _sync(device)
                s.between()
            samples[name].append((t1 - t0) * 1e3)
        if rep + 1 >= min_reps and time.perf_counter() - t_start >= budget_s:
            break
    return samples


def summarize(samples: Sequence[float]) -> dict:
    q = statistics.quantiles(samples, n=4) if len(samples) >= 4 else (min(samples), 0, max(samples))
    return dict(median_ms=statistics.median(samples), iqr_ms=q[2] - q[0], n=len(samples))


@contextmanager
def one_thread():
    """One intra-op thread while timing: a host issues its work from one thread, and OpenMP's
    spin-waiting on a shared 2-core machine made single steps up to 100x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def host_how(device) -> Dict[str, str]:
    if torch.device(device).type == "cuda":
        return {"eager": "CUDA, enqueue time (no sync inside the timing)",
                "ours": "CUDA, Triton kernels, enqueue time (no sync inside the timing)"}
    return {"eager": "CPU, tiny tensors, convolutions (fwd and bwd) as no-ops",
            "ours": "CPU, tiny tensors, Triton path forced, launches and PyTorch convolutions as no-ops"}


def _conv_out_shape(x, w, stride, padding, dilation, transposed, output_padding):
    spatial = []
    for i, size in enumerate(x.shape[2:]):
        k = w.shape[2 + i]
        if transposed:
            spatial.append((size - 1) * stride[i] - 2 * padding[i] + dilation[i] * (k - 1) + output_padding[i] + 1)
        else:
            spatial.append((size + 2 * padding[i] - dilation[i] * (k - 1) - 1) // stride[i] + 1)
    return spatial


def _channels_last(t) -> bool:
    return t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous()


def _noop_convolution(x, w, bias, stride, padding, dilation, transposed, output_padding, groups):
    cout = w.shape[1] * groups if transposed else w.shape[0]
    shape = [x.shape[0], cout] + _conv_out_shape(x, w, stride, padding, dilation, transposed, output_padding)
    fmt = torch.channels_last if x.dim() == 4 and (_channels_last(x) or _channels_last(w)) else torch.contiguous_format
    return torch.empty(shape, dtype=x.dtype, device=x.device, memory_format=fmt)


def _noop_convolution_backward(grad_out, x, w, bias_sizes, stride, padding, dilation, transposed, output_padding,
                               groups, output_mask):
    return (torch.empty_like(x) if output_mask[0] else None,
            torch.empty_like(w) if output_mask[1] else None,
            grad_out.new_empty(bias_sizes) if output_mask[2] and bias_sizes is not None else None)


@contextmanager
def noop_convolutions():
    """``aten::convolution`` and ``aten::convolution_backward`` on CPU tensors allocate their
    outputs and compute nothing, while inside (PyTorch's kernels come back on exit)."""
    lib = torch.library.Library("aten", "IMPL")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "overriding a previously registered kernel": on purpose
            lib.impl("convolution", _noop_convolution, "CPU")
            lib.impl("convolution_backward", _noop_convolution_backward, "CPU")
        yield
    finally:
        lib._destroy()


@contextmanager
def device_work_left_out():
    """On a CPU: PyTorch's convolutions and our Triton launches are no-ops, the Triton path forced."""
    with noop_convolutions(), host_only():
        yield


def measure_host(eager: torch.nn.Module, fused: torch.nn.Module, workload: str, mode: str, batch: int, image: int,
                 device="cpu", **kw) -> dict:
    """Host ms of one step, eager against fused (``eager`` and ``fused`` are used, not copied)."""
    train = mode == "train"
    dev = torch.device(device)
    eager, fused = eager.to(dev), fused.to(dev)
    xe = workloads.example_input(workload, batch, image, dev, requires_grad=train)
    xf = xe.detach().clone().requires_grad_(train)
    steppers = {"eager": workloads.Stepper(eager, xe, train), "ours": workloads.Stepper(fused, xf, train)}
    with one_thread(), (nullcontext() if dev.type == "cuda" else device_work_left_out()):
        samples = interleaved_samples(steppers, {}, dev, **kw)
    stats = {k: summarize(v) for k, v in samples.items()}
    return dict(host_ms={k: s["median_ms"] for k, s in stats.items()},
                host_iqr_ms={k: s["iqr_ms"] for k, s in stats.items()},
                host_ratio=stats["ours"]["median_ms"] / stats["eager"]["median_ms"],
                n_samples=min(s["n"] for s in stats.values()), host_how=host_how(dev))


def measure_cpu_ratio(eager: torch.nn.Module, fused: torch.nn.Module, workload: str, mode: str, batch: int,
                      image: int, **kw) -> dict:
    """Real CPU time of one step (one thread): the converted model on its pure-PyTorch path
    (the Triton path switched off, also under TRITON_INTERPRET=1) against the unconverted one."""
    train = mode == "train"
    xe = workloads.example_input(workload, batch, image, requires_grad=train)
    xf = xe.detach().clone().requires_grad_(train)
    steppers = {"eager": workloads.Stepper(eager, xe, train), "ours": workloads.Stepper(fused, xf, train)}
    with one_thread():
        samples = interleaved_samples(steppers, {"ours": lambda: forced_triton_path(False)}, "cpu", **kw)
    stats = {k: summarize(v) for k, v in samples.items()}
    return dict(cpu_ms={k: s["median_ms"] for k, s in stats.items()},
                cpu_ratio=stats["ours"]["median_ms"] / stats["eager"]["median_ms"],
                cpu_n_samples=min(s["n"] for s in stats.values()))


# ----------------------------------------------------------------------------------------
# Records and the command line
# ----------------------------------------------------------------------------------------
def base_record(level: str, workload: str, mode: str, batch: int, image: int, device, smoke: bool) -> dict:
    dev = torch.device(device)
    group = f"{level}/{workload}/{mode}/fp32/b{batch}"
    return dict(id=f"{group}/ours_vs_eager", group=group, level=level, name=workload, mode=mode, dtype="fp32",
                batch=batch, provider="ours_vs_eager", arch=workload.split(".")[0], image=image,
                runs="triton" if dev.type == "cuda" else "host_only", device=dev.type,
                speed=False, timing="host_perf_counter", n_samples=0)


def host_record(workload: str, mode: str, batch: int, image: int, device="cpu", smoke: bool = False,
                eager: Optional[torch.nn.Module] = None, **kw) -> dict:
    """One ``host``-level record: host ms of eager and ours for ``workload`` in ``mode``."""
    rec = base_record("host", workload, mode, batch, image, device, smoke)
    try:
        e, f = workloads.make_pair(workload, copy.deepcopy(eager) if eager is not None else None)
        rec.update(measure_host(e, f, workload, mode, batch, image, device, **kw))
        rec["status"] = "ok"
    except Exception as err:  # noqa: BLE001  (recorded; the caller decides)
        rec.update(status="error", reason=f"{type(err).__name__}: {err}"[:500], _exception=err)
    return rec


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.host_time", description=__doc__.split("\n\n")[0])
    ap.add_argument("--workloads", default=",".join(WORKLOADS),
                    help=f"comma-separated (default: {','.join(WORKLOADS)}; also 'mini', '<arch>.stage<s>', "
                         f"'<arch>.stages1-2')")
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--batch", type=int, default=2, help="default 2 (train-mode BN needs 2 values per channel)")
    ap.add_argument("--image", type=int, default=32, help="model input side (default 32)")
    ap.add_argument("--budget", type=float, default=2.0, help="seconds of timed calls per case (default 2)")
    ap.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    ap.add_argument("--tiny", action="store_true", help="a check of the tool: a few calls each")
    ap.add_argument("--out", default=None, help="directory for the results files")
    ap.add_argument("--no-save", action="store_true")
    args = ap.parse_args(argv)
    ctx = config.make_context(full=not args.tiny, device=args.device)
    ctx.profile = dataclasses.replace(ctx.profile, name="host-time")  # names the results files
    kw = dict(min_reps=2, max_reps=2, budget_s=0.0) if args.tiny else dict(budget_s=args.budget)
    if ctx.cuda:
        print(f"device: {config.describe_device(ctx.device)}: host time = CPU-side enqueue time")
    else:
        print("NO CUDA GPU: host time with device work left out (PyTorch convolutions and our Triton launches "
              "as no-ops, tiny tensors). Kernel times need a CUDA GPU; these rank host overheads only.")
    collector = results.Collector(ctx, argv=[sys.argv[0]] + list(sys.argv[1:] if argv is None else argv),
                                  out_dir=args.out)
    failures = 0
    for w in [s for s in args.workloads.split(",") if s]:
        for mode in [s for s in args.modes.split(",") if s]:
            rec = host_record(w, mode, args.batch, args.image, ctx.device, ctx.smoke, **kw)
            err = rec.pop("_exception", None)
            failures += err is not None
            collector.add(rec)
            print(format_host([rec]).splitlines()[1], flush=True)
    print(format_host(collector.records))
    if not args.no_save:
        paths = collector.finish()
        print(f"\nresults: {paths['json']}\nsummary: {paths['md']}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
