"""What a run measures: sizes per profile, the device, and what our provider really runs.

Profiles:

* ``full``  (``--benchmark`` on a CUDA GPU): the issue's grid: 224x224, batches
  32-256, bf16 and fp32, every conv shape of ResNeXt-50/101 32x4d;
* ``cpu``   (``--benchmark`` without CUDA): ``pytest`` makes the CPU report only
  (``benchmarks.report``: device operations, saved bytes, host time, the converted /
  unconverted CPU time ratio); ``python -m benchmarks`` times PyTorch on the CPU at reduced
  size (batch 2, 112x112, fp32);
* ``smoke`` (no ``--benchmark``): every benchmark once at tiny size (CI), nothing timed
  meaningfully.
"""
import os
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Optional, Tuple

import torch

import kernels

from . import shapes

PROVIDERS = ("ours", "ours_tuned", "eager", "eager_nchw", "compile", "compile_max", "ours_graphed", "eager_graphed")
PROVIDER_LABELS = {
    "ours": "ours (Triton), the design's launch configurations, no routing",
    "ours_tuned": "ours (Triton) as resnext.tune chose on this device: measured configurations, blocks routed "
                  "to PyTorch where it was faster (block and model levels; skipped without a tuning cache)",
    "eager": "PyTorch eager, channels_last (cuDNN)",
    "eager_nchw": "PyTorch eager, NCHW (cuDNN)",
    "compile": "torch.compile (default)",
    "compile_max": "torch.compile (max-autotune)",
    "ours_graphed": "ours (Triton), replayed as a CUDA graph (block and model levels)",
    "eager_graphed": "PyTorch eager, channels_last, replayed as a CUDA graph (block and model levels)",
}
GRAPHED = ("ours_graphed", "eager_graphed")  # resnext.cuda_graphs; CUDA only
assert set(PROVIDER_LABELS) == set(PROVIDERS) and set(GRAPHED) <= set(PROVIDERS)
BASELINE = "eager"  # speedups are over eager channels_last (the faster eager layout for these convs)


@dataclass(frozen=True)
class Profile:
    name: str
    image: int  # model input side
    kernel_batches: Tuple[int, ...]
    kernel_image: int  # conv and block shapes are those of a model fed this image side
    dtypes: Tuple[str, ...]
    kernel_shapes: str  # "all" or "subset" (one per channels-per-group and 1x1 epilogue)
    block_batches: Tuple[int, ...]
    block_stages: Tuple[int, ...]
    model_batches: Tuple[int, ...]
    models: Tuple[str, ...]
    single: bool  # call once instead of timing
    warmup_ms: float = 25.0
    rep_ms: float = 100.0
    model_rep_ms: float = 1000.0


FULL = Profile("full", 224, (32, 64, 128, 256), 224, ("bf16", "fp32"), "all", (32, 128), (1, 2, 3, 4),
               (32, 128), ("resnet50", "resnet101", "resnext50_32x4d", "resnext101_32x4d"), False)
CPU = Profile("cpu", 112, (2,), 112, ("fp32",), "all", (2,), (1, 2, 3, 4), (2,),
              ("resnet50", "resnet101", "resnext50_32x4d", "resnext101_32x4d"), False,
              warmup_ms=50.0, rep_ms=300.0, model_rep_ms=2000.0)
SMOKE = Profile("smoke", 32, (2,), 32, ("fp32",), "subset", (2,), (1,), (2,),
                ("resnet50", "resnet101", "resnext50_32x4d", "resnext101_32x4d", "mini"), True)

# The interpreter runs one program after another: our kernels are only checked on cases
# producing at most this many output elements.
INTERPRETER_MAX_OUTPUT = 1 << 16
# ... and with at most this many weights (the interpreter's cost grows with the channels:
# a stage-4 bottleneck, 4.5M weights, takes minutes; a stage-4 grouped 3x3, 0.3M, ~25 s
# for its three modes; a stage-1 bottleneck has 0.07M).
INTERPRETER_MAX_WEIGHTS = 1 << 18


@dataclass
class RunContext:
    device: torch.device
    profile: Profile
    interpret: bool
    ceilings: Optional[dict] = None
    compile_backend: Optional[str] = None  # None: Inductor; "eager" in smoke runs (Dynamo only)
    report_only: bool = False  # pytest --benchmark without CUDA: only the report level runs (cases.cpu_report_only)
    extra: dict = field(default_factory=dict)

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    @property
    def ours_runs(self) -> str:
        """What the ``ours`` provider executes: triton | interpreter | reference."""
        if self.cuda:
            return "triton"
        return "interpreter" if self.interpret else "reference"

    @property
    def smoke(self) -> bool:
        return self.profile.single


def make_context(full: bool, device: Optional[str] = None) -> RunContext:
    """The run's context: ``full`` is ``--benchmark``; the device defaults to CUDA when present."""
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if not full:
        profile = SMOKE
    else:
        profile = FULL if dev.type == "cuda" else CPU
    backend = "eager" if profile.single and dev.type != "cuda" else None
    return RunContext(dev, profile, kernels.INTERPRET, compile_backend=backend)


def header_lines(ctx: RunContext) -> list:
    """What the run's header says about the meaning of its numbers."""
    p = ctx.profile
    lines = [f"device: {describe_device(ctx.device)}; profile: {p.name}"
             + (" (every case once at tiny size: a harness check, not a measurement)" if ctx.smoke else "")]
    if ctx.report_only:
        lines.append("report sizes: models at 32x32 images, batch 2, fp32 (counts do not depend on the size)")
    else:
        lines.append(f"profile sizes: models {p.image}x{p.image} at batch {'/'.join(map(str, p.model_batches))}; kernels and blocks "
                     f"from {p.kernel_image}x{p.kernel_image} inputs at batch {'/'.join(map(str, p.kernel_batches))} "
                     f"(kernels), {'/'.join(map(str, p.block_batches))} (blocks); {', '.join(p.dtypes)}")
    if not ctx.cuda:
        lines.append("NO CUDA GPU: Triton timings need a CUDA GPU. CPU times below are PyTorch on the CPU, "
                     "not kernel speed.")
        if ctx.report_only:
            lines.append("pytest benchmarks --benchmark without CUDA makes the CPU report only: device operations "
                         "per step, saved-for-backward bytes, host time with device work left out, and the "
                         "converted/unconverted CPU time ratio, fused against eager; kernel, block and model "
                         "timings are skipped.")
            lines.append("ours: in the CPU time ratio, the fused modules' PyTorch reference path (the Triton path "
                         "off, also under the interpreter); in counts and host times, the Triton path with every "
                         "launch a no-op.")
        elif ctx.ours_runs == "interpreter":
            lines.append("ours: runs through the Triton interpreter (TRITON_INTERPRET=1) on tiny cases to "
                         "check the harness end to end; its times are never reported as speed.")
        else:
            lines.append("ours: runs the PyTorch reference path of the fused modules (no Triton); "
                         "set TRITON_INTERPRET=1 to check the kernels through the interpreter.")
    if ctx.compile_backend:
        lines.append(f"torch.compile runs with backend={ctx.compile_backend!r} (Dynamo only) in this smoke run.")
    return lines


def describe_device(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import platform
    return f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def run_cli(args, run, argv) -> int:
    """A command-line tool's body ``run(args, ctx, argv)`` in the context its flags ask for
    (``--tiny``: the smoke profile, on one thread; ``--device``)."""
    ctx = make_context(full=not args.tiny, device=args.device)
    with smoke_threads(ctx):
        return run(args, ctx, argv)


@contextmanager
def smoke_threads(ctx: RunContext):
    """One CPU thread during a smoke run on the CPU, restored afterwards.

    Nothing a smoke run times is a speed, and OpenMP's spin-waiting makes two threads on
    a shared 2-core machine up to 5x slower than one (measured: 91 s vs 17 s for
    ``python -m benchmarks --tiny`` under load).
    """
    before = torch.get_num_threads()
    if ctx.smoke and not ctx.cuda:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@dataclass(frozen=True)
class Case:
    level: str  # kernel | block | model
    name: str  # conv label | "<arch>.stage<s>" | model name
    mode: str
    dtype: str
    batch: int
    provider: str
    shape: Optional[shapes.ConvShape] = None  # kernel level
    arch: Optional[str] = None  # block and model levels
    stage: Optional[int] = None  # block level
    image: int = 224  # the model input side the shapes derive from

    @property
    def group(self) -> str:
        """The case without its provider: providers of one group are compared."""
        return f"{self.level}/{self.name}/{self.mode}/{self.dtype}/b{self.batch}"

    @property
    def id(self) -> str:
        return f"{self.group}/{self.provider}"

    def describe(self) -> dict:
        d = dict(id=self.id, group=self.group, level=self.level, name=self.name, mode=self.mode,
                 dtype=self.dtype, batch=self.batch, provider=self.provider, arch=self.arch,
                 stage=self.stage, image=self.image)
        if self.shape is not None:
            d["shape"] = self.shape.as_dict()
        return d
