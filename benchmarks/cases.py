"""Benchmark cases: what is run (the grid), how each provider runs it, and one record per case.

A ``Case`` is one (level, workload, mode, dtype, batch, provider).  ``build`` turns it
into a zero-argument callable doing one call on rotating random inputs; ``run_case``
times it and returns the record that goes into the results file.

Providers (``config.PROVIDERS``): ``ours`` (the Triton kernels / fused modules), ``eager``
(PyTorch, channels_last, cuDNN), ``eager_nchw``, ``compile`` (``torch.compile`` default),
``compile_max`` (``mode="max-autotune"``, inference only), and at the block and model
levels ``ours_graphed`` / ``eager_graphed`` (the same modules replayed as CUDA graphs by
``resnext.cuda_graphs``; CUDA only).

Level ``report`` (``benchmarks.report``): device operations, saved bytes and host time,
fused against eager in one case.  ``pytest benchmarks --benchmark`` without CUDA runs only
that level: the kernel, block and model timings need a CUDA GPU.
"""
import copy
import gc
import importlib
import time
from dataclasses import dataclass, field
from typing import Callable, List, Optional

import torch
import torch.nn.functional as F
from torch import nn

from . import counting, shapes
from .ceilings import roofline_fraction
from .config import Case, GRAPHED, INTERPRETER_MAX_OUTPUT, INTERPRETER_MAX_WEIGHTS, PROVIDERS, Profile, RunContext
from .report import report_cases, run_report_case
from .timing import Rotation, Timing, l2_cache_bytes, measure, rotation_count, synced_perf_counter

KERNEL_MODES = ("eval", "train", "backward")  # folded-BN forward, batch-stats forward, backward alone
BLOCK_MODES = ("eval", "train", "fwdbwd")  # inference forward, training forward, forward + backward
MODEL_TASKS = ("inference", "train")  # no_grad forward; forward + loss + backward + SGD step
BLOCK_ARCHS = ("resnet50", "resnext50_32x4d")  # blocks of the 50- and 101-layer models are the same
MINI = "mini"  # a 4-block ResNeXt of base width 8: small enough for the Triton interpreter


# ----------------------------------------------------------------------------------------
# The grid
# ----------------------------------------------------------------------------------------
def kernel_shapes(profile: Profile) -> List[shapes.ConvShape]:
    """Every conv shape of ResNeXt-50/101 32x4d (grouped 3x3 first), or a subset for smoke runs:
    the extremes of channels per group (4, stride 1; 32, stride 2) and two 1x1 epilogues
    (residual + ReLU; the strided downsample, BN only)."""
    archs = ("resnext50_32x4d", "resnext101_32x4d")
    conv3 = shapes.unique_convs(archs, profile.kernel_image, "conv3x3")
    conv1 = shapes.unique_convs(archs, profile.kernel_image, "conv1x1")
    if profile.kernel_shapes == "all":
        return conv3 + conv1
    pick3 = [c for c in conv3 if (c.cin_per_group, c.stride) in ((4, 1), (32, 2))]
    pick1 = [c for c in conv1 if (c.role, c.stage) in (("conv3", 1), ("downsample", 2))]
    return pick3 + pick1


def model_dtype(ctx: RunContext) -> str:
    """Models run in bf16 (autocast for training) on a GPU, fp32 on the CPU."""
    return "bf16" if ctx.cuda else "fp32"


def kernel_cases(ctx: RunContext, providers=PROVIDERS) -> List[Case]:
    """Graphed providers are block- and model-level only (one layer's launches are few)."""
    p = ctx.profile
    return [Case("kernel", s.label, mode, dt, b, prov, shape=s, image=p.kernel_image)
            for s in kernel_shapes(p) for mode in KERNEL_MODES for dt in p.dtypes
            for b in p.kernel_batches for prov in providers if prov not in GRAPHED + ("ours_tuned",)]


def block_cases(ctx: RunContext, providers=PROVIDERS) -> List[Case]:
    p = ctx.profile
    return [Case("block", f"{arch}.stage{st}", mode, dt, b, prov, arch=arch, stage=st, image=p.kernel_image)
            for arch in BLOCK_ARCHS for st in p.block_stages for mode in BLOCK_MODES for dt in p.dtypes
            for b in p.block_batches for prov in providers]


def model_cases(ctx: RunContext, providers=PROVIDERS, models=None, tasks=MODEL_TASKS, batches=None,
                image=None) -> List[Case]:
    """In smoke runs the four real models run only what the headline needs (eager; ours for
    ResNeXt); every provider runs on the mini model (Dynamo tracing a 101-layer model takes
    longer than the rest of the smoke run)."""
    p = ctx.profile

    def provs(m):
        if m == MINI or not p.single:
            return providers
        return [q for q in providers if q == "eager" or (q in ("ours", "ours_tuned") and m.startswith("resnext"))]
    return [Case("model", m, task, model_dtype(ctx), b, prov, arch=m, image=image or p.image)
            for m in (models or p.models) for task in tasks for b in (batches or p.model_batches)
            for prov in provs(m)]


def cpu_report_only(ctx: RunContext) -> bool:
    """``pytest benchmarks --benchmark`` without CUDA: only the report level runs (times need a
    CUDA GPU); the pytest plugin sets ``ctx.report_only``."""
    return ctx.report_only


def empty_level_reason(level: str, ctx: RunContext) -> str:
    if cpu_report_only(ctx):
        return (f"no CUDA GPU: the {level} level times Triton kernels, which needs a CUDA GPU; this run makes "
                f"the CPU report (benchmarks/test_report.py)")
    return f"no {level} case selected"


def cases_for(level: str, ctx: RunContext, providers=PROVIDERS) -> List[Case]:
    if level == "report":
        return report_cases(ctx, providers)
    if cpu_report_only(ctx):
        return []
    return {"kernel": kernel_cases, "block": block_cases, "model": model_cases}[level](ctx, providers)


def output_elements(case: Case) -> int:
    """Elements of the largest activation a case writes (what the interpreter's cost follows)."""
    if case.level == "kernel":
        s = case.shape
        return case.batch * s.cout * s.ho * s.wo
    if case.level == "block":
        return max(case.batch * c.cout * c.ho * c.wo for c in shapes.block_convs(case.arch, case.stage, 1, case.image))
    return 0


def weight_count(case: Case) -> int:
    """Convolution weights a kernel or block case touches."""
    convs = [case.shape] if case.level == "kernel" else (
        shapes.block_convs(case.arch, case.stage, 1, case.image) if case.level == "block" else [])
    return sum(c.cout * c.cin_per_group * c.ksize ** 2 for c in convs)


def skip_reason(case: Case, ctx: RunContext) -> Optional[str]:
    """Why ``case`` is not run in this context (None: it runs)."""
    if case.provider in GRAPHED:
        if not ctx.cuda:
            return "CUDA graphs need a CUDA GPU (resnext.cuda_graphs)"
        if case.level == "block" and case.mode == "train":
            return ("graphed providers replay an inference forward (eval) or a whole training step (fwdbwd); "
                    "a train-mode forward alone is not graphed")
    if case.provider == "ours_tuned" and tuned_tables()[0] == "none":
        return (f"no tuning for this device and these versions in {_tuning().cache_path()} (run resnext.tune "
                f"on this GPU first: README, Tuning)")
    if case.provider == "compile_max":
        if case.mode not in ("eval", "inference"):
            return "max-autotune is benchmarked for inference only (its compile time)"
        if not ctx.cuda and not ctx.smoke:
            return "max-autotune tunes GPU kernels: CUDA only"
    if case.dtype in ("bf16", "fp16") and not ctx.cuda:
        return f"{case.dtype} is benchmarked on CUDA only (and the interpreter's bf16 dot is wrong)"
    if case.provider in ("ours", "ours_tuned") and ctx.ours_runs == "interpreter":
        if case.level == "model" and case.arch != MINI:
            return "Triton interpreter: our kernels are checked on the mini model only"
        if output_elements(case) > INTERPRETER_MAX_OUTPUT or weight_count(case) > INTERPRETER_MAX_WEIGHTS:
            return "too large for the Triton interpreter (run without --benchmark for the interpreter check)"
    return None


# ----------------------------------------------------------------------------------------
# Providers
# ----------------------------------------------------------------------------------------
def ours_conv_bn_act(x, conv: nn.Conv2d, bn: nn.BatchNorm2d, relu: bool, residual=None):
    """One layer on the kernels, as ``resnext.ConvBNAct`` runs it: folded BN in the epilogue
    (eval), or conv + statistics, then one ``bn_act`` pass (train; inside a block the next
    conv applies it on load)."""
    return _resnext().ConvBNAct.from_modules(conv, bn, relu)(x, residual)


def eager_conv_bn_act(x, conv: nn.Conv2d, bn: nn.BatchNorm2d, relu: bool, residual=None):
    y = bn(conv(x))
    if residual is not None:
        y = y + residual
    return F.relu(y) if relu else y


def compiled(fn, provider: str, ctx: RunContext):
    """``torch.compile`` for the compile providers (Dynamo caches reset: every case compiles
    afresh, so no case silently falls back to eager past the recompile limit)."""
    torch._dynamo.reset()
    kw = {}
    if ctx.compile_backend:
        kw["backend"] = ctx.compile_backend
    elif provider == "compile_max":
        kw["mode"] = "max-autotune"
    return torch.compile(fn, **kw)


def _cuda_graphs():
    """``resnext.cuda_graphs``, imported when a graphed case is built (collection never needs it)."""
    from resnext import cuda_graphs
    return cuda_graphs


def memory_format(provider: str):
    return torch.contiguous_format if provider == "eager_nchw" else torch.channels_last


def _randomize_bn(bn: nn.BatchNorm2d, gen: torch.Generator) -> None:
    """Random affine parameters and running statistics (never benchmark on zeros or ones)."""
    with torch.no_grad():
        c = bn.num_features
        bn.weight.copy_(torch.rand(c, generator=gen) + 0.5)
        bn.bias.copy_(torch.randn(c, generator=gen) * 0.1)
        bn.running_mean.copy_(torch.randn(c, generator=gen) * 0.1)
        bn.running_var.copy_(torch.rand(c, generator=gen) + 0.5)


@dataclass
class Bench:
    fn: Callable[[], object]
    flops: Optional[int]
    min_bytes: Optional[int]
    rotation: int = 1
    notes: List[str] = field(default_factory=list)


def _rotation_sets(make_set: Callable[[], dict], bytes_per_set: int, ctx: RunContext) -> Rotation:
    n = 1 if ctx.smoke else rotation_count(bytes_per_set, l2_cache_bytes(ctx.device))
    return Rotation([make_set() for _ in range(n)])


def build_kernel(case: Case, ctx: RunContext) -> Bench:
    s, dev, dt = case.shape, ctx.device, counting.TORCH_DTYPES[case.dtype]
    gen = torch.Generator().manual_seed(0)
    conv = nn.Conv2d(s.cin, s.cout, s.ksize, s.stride, s.padding, groups=s.groups, bias=False)
    bn = nn.BatchNorm2d(s.cout)
    _randomize_bn(bn, gen)
    conv, bn = conv.to(dev, dt), bn.to(dev)  # BN parameters stay fp32 (as under autocast)
    bn.train(case.mode != "eval")
    fmt = memory_format(case.provider)
    backward = case.mode == "backward"

    if case.provider == "ours":
        def layer(x, r):
            return ours_conv_bn_act(x, conv, bn, s.relu, r)
    else:
        def layer(x, r):
            return eager_conv_bn_act(x, conv, bn, s.relu, r)
        if case.provider.startswith("compile"):
            layer = compiled(layer, case.provider, ctx)

    def make_set():
        x = torch.randn(case.batch, s.cin, s.h, s.w, device=dev, dtype=dt).to(memory_format=fmt)
        r = (torch.randn(case.batch, s.cout, s.ho, s.wo, device=dev, dtype=dt).to(memory_format=fmt)
             if s.residual else None)
        d = dict(x=x, r=r)
        if backward:
            x.requires_grad_(True)
            if r is not None:
                r.requires_grad_(True)
            d["y"] = layer(x, r)
            d["dy"] = torch.randn_like(d["y"])
            d["inputs"] = [t for t in (x, r, conv.weight, bn.weight, bn.bias) if t is not None]
        return d

    bytes_per_set = counting.conv_min_bytes(s, case.batch, case.dtype, "backward" if backward else "eval")
    sets = _rotation_sets(make_set, bytes_per_set, ctx)
    if case.mode == "eval":
        def fn():
            d = sets.next()
            with torch.no_grad():
                return layer(d["x"], d["r"])
    elif case.mode == "train":
        def fn():
            d = sets.next()
            return layer(d["x"], d["r"])
    else:
        def fn():
            d = sets.next()
            return torch.autograd.grad(d["y"], d["inputs"], d["dy"], retain_graph=True)
    return Bench(fn, counting.conv_flops(s, case.batch, case.mode),
                 counting.conv_min_bytes(s, case.batch, case.dtype, case.mode), len(sets))


def _resnext():
    import resnext  # noqa: F401  (imported late: the kernel level does not need it)
    return resnext


def make_block(arch: str, stage: int) -> nn.Module:
    """The repeated (stride 1, identity) bottleneck of ``stage``: the block most layers are."""
    _, groups, wpg = shapes.ARCHS[arch]
    planes = shapes.PLANES[stage - 1]
    return _resnext().Bottleneck(planes * 4, planes, 1, None, groups, wpg)


def make_model(arch: str) -> nn.Module:
    """The eager model (the fused one is ``resnext.convert`` of a copy: same weights); ``mini``
    is a 4-block ResNeXt of base width 8 (``workloads.make_eager``)."""
    from .workloads import make_eager
    return make_eager(arch)


def _set_bn_stats(module: nn.Module, seed: int = 0) -> None:
    gen = torch.Generator().manual_seed(seed)
    for m in module.modules():
        if isinstance(m, nn.BatchNorm2d):
            _randomize_bn(m, gen)


def _tuning():
    return importlib.import_module("resnext.tuning")


_TABLES = {}


def tuned_tables():
    """(source, configurations, routes) of this device's tuning cache entry, read once."""
    if "tuned" not in _TABLES:
        _TABLES["tuned"] = _tuning().read_tables()
    return _TABLES["tuned"]


def use_tables(provider: str) -> None:
    """Make the kernels and blocks use the tuned tables for ``ours_tuned`` and the design's
    (none) for every other provider: called as a case is built, so that ``ours`` stays the
    design's configurations even in a process with a tuning cache."""
    which = "tuned" if provider == "ours_tuned" else "design"
    if _TABLES.get("active") == which:
        return
    _, configs, routes = tuned_tables() if which == "tuned" else ("none", {}, {})
    tuning = _tuning()
    tuning._runtime.set_tuned(configs, replace=True)
    tuning.routing.set_routes(routes, replace=True)
    tuning.routing.mark_loaded(True)  # (not replaced by the cache at the first forward)
    _TABLES["active"] = which


def _provider_module(module: nn.Module, case: Case, ctx: RunContext) -> nn.Module:
    if case.provider in ("ours", "ours_graphed", "ours_tuned"):
        return _resnext().convert(module)
    if case.provider.startswith("compile"):
        return compiled(module, case.provider, ctx)
    return module


def build_block(case: Case, ctx: RunContext) -> Bench:
    dev, dt = ctx.device, counting.TORCH_DTYPES[case.dtype]
    block = make_block(case.arch, case.stage)
    _set_bn_stats(block)
    block = block.to(dev).to(memory_format=memory_format(case.provider))
    for m in block.modules():  # convolutions in the activation dtype, BN kept fp32 (as under autocast)
        if isinstance(m, nn.Conv2d):
            m.to(dt)
    block.train(case.mode != "eval")
    params = list(block.parameters())
    run = _provider_module(block, case, ctx)
    c0 = shapes.block_convs(case.arch, case.stage, 1, case.image)[0]
    fmt = memory_format(case.provider)

    graphed = case.provider in GRAPHED

    def make_set():
        x = torch.randn(case.batch, c0.cin, c0.h, c0.w, device=dev, dtype=dt).to(memory_format=fmt)
        if case.mode == "fwdbwd" and not graphed:
            x.requires_grad_(True)
        dy = torch.randn_like(x) if case.mode == "fwdbwd" else None
        return dict(x=x, dy=dy)

    bytes_per_set = counting.block_min_bytes(case.arch, case.stage, 1, case.batch, case.dtype, "fwd", case.image)
    sets = _rotation_sets(make_set, bytes_per_set, ctx)
    notes = []
    if graphed:
        cg, first = _cuda_graphs(), sets.sets[0]
        if case.mode == "eval":
            replay = cg.graph_inference(run, first["x"])

            def fn():
                with torch.no_grad():
                    return replay(sets.next()["x"])
        else:  # fwdbwd: the whole step in one graph (graph_train_step takes an optimizer)
            opt = torch.optim.SGD(params, lr=1e-3)
            step = cg.graph_train_step(run, lambda y, dy: (y.float() * dy.float()).sum(), opt, first["x"], first["dy"])
            notes.append("graphed fwdbwd: parameter gradients and an SGD step (graph_train_step), "
                         "no input gradient")

            def fn():
                d = sets.next()
                return step(d["x"], d["dy"])
    elif case.mode == "eval":
        def fn():
            with torch.no_grad():
                return run(sets.next()["x"])
    elif case.mode == "train":
        def fn():
            return run(sets.next()["x"])
    else:
        def fn():
            d = sets.next()
            for p in params:
                p.grad = None
            d["x"].grad = None
            run(d["x"]).backward(d["dy"])
    return Bench(fn, counting.block_flops(case.arch, case.stage, 1, case.batch, case.mode, case.image),
                 counting.block_min_bytes(case.arch, case.stage, 1, case.batch, case.dtype, case.mode, case.image),
                 len(sets), notes)


def _cached_model(arch: str, ctx: RunContext) -> nn.Module:
    """Build each eager model once per run (on the CPU, random BN statistics); cases copy it."""
    cache = ctx.extra.setdefault("models", {})
    if arch not in cache:
        m = make_model(arch)
        _set_bn_stats(m)
        cache[arch] = m
    return copy.deepcopy(cache[arch])


def build_model(case: Case, ctx: RunContext) -> Bench:
    dev = ctx.device
    fmt = memory_format(case.provider)
    model = _cached_model(case.arch, ctx)
    num_classes = model.fc.out_features
    train = case.mode == "train"
    lowp = case.dtype == "bf16"
    # inference: bf16 weights; training: fp32 master weights under bf16 autocast
    model = model.to(dev, torch.bfloat16 if (lowp and not train) else torch.float32).to(memory_format=fmt)
    model.train(train)
    params = [p for p in model.parameters()]
    run = _provider_module(model, case, ctx)
    in_dtype = torch.bfloat16 if (lowp and not train) else torch.float32
    notes = []

    def make_set():
        x = torch.randn(case.batch, 3, case.image, case.image, device=dev, dtype=in_dtype).to(memory_format=fmt)
        y = torch.randint(0, num_classes, (case.batch,), device=dev)
        return dict(x=x, y=y)

    sets = _rotation_sets(make_set, case.batch * 3 * case.image ** 2 * 4, ctx)
    if case.provider in GRAPHED:
        cg, first = _cuda_graphs(), sets.sets[0]
        if not train:
            replay = cg.graph_inference(run, first["x"])

            def fn():
                with torch.no_grad():
                    return replay(sets.next()["x"])
        else:
            opt = torch.optim.SGD(params, lr=1e-3, momentum=0.9, weight_decay=1e-4)
            if lowp:
                notes.append("bf16 autocast in the captured forward and loss (autocast_dtype), fp32 weights")
            step = cg.graph_train_step(run, F.cross_entropy, opt, first["x"], first["y"],
                                       autocast_dtype=torch.bfloat16 if lowp else None)

            def fn():
                d = sets.next()
                return step(d["x"], d["y"])
    elif not train:
        def fn():
            with torch.no_grad():
                return run(sets.next()["x"])
    else:
        opt = torch.optim.SGD(params, lr=1e-3, momentum=0.9, weight_decay=1e-4)
        if lowp:
            notes.append("torch.autocast(bfloat16), fp32 weights")

        def fn():
            d = sets.next()
            opt.zero_grad(set_to_none=True)
            with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=lowp):
                loss = F.cross_entropy(run(d["x"]), d["y"])
            loss.backward()
            opt.step()
            return loss
    flops = None if case.arch == MINI else counting.model_flops(case.arch, case.batch, case.mode, case.image)
    return Bench(fn, flops, None, len(sets), notes)


def build(case: Case, ctx: RunContext) -> Bench:
    use_tables(case.provider)
    return {"kernel": build_kernel, "block": build_block, "model": build_model}[case.level](case, ctx)


# ----------------------------------------------------------------------------------------
# Running one case
# ----------------------------------------------------------------------------------------
def what_runs(case: Case, ctx: RunContext) -> str:
    """triton | interpreter | reference (our modules' PyTorch path) | pytorch | inductor | dynamo."""
    if case.provider in ("ours", "ours_tuned"):
        return ctx.ours_runs
    if case.provider.startswith("compile"):
        return "dynamo" if ctx.compile_backend else "inductor"
    if case.provider in GRAPHED:
        return "cuda_graph"
    return "pytorch"


def counts_as_speed(case: Case, ctx: RunContext) -> bool:
    """Whether a time measured for ``case`` may be shown as its speed.

    Never in smoke runs (one call), never for the interpreter, never for our provider
    off the GPU (it is then PyTorch's reference path, not our kernels).
    """
    if ctx.smoke:
        return False
    return what_runs(case, ctx) in ("triton", "pytorch", "inductor", "cuda_graph")


def _is_oom(err: BaseException) -> bool:
    oom = getattr(torch, "OutOfMemoryError", None) or getattr(torch.cuda, "OutOfMemoryError", RuntimeError)
    return isinstance(err, oom) or "out of memory" in str(err).lower()


def _free(ctx: RunContext) -> None:
    gc.collect()
    if ctx.cuda:
        torch.cuda.empty_cache()


def single_call_via_benchmark(benchmark, fn: Callable, case: Case, ctx: RunContext) -> Timing:
    """Smoke and interpreter cases: one call, made by pytest-benchmark (not twice)."""
    benchmark.group = case.group
    t0 = time.perf_counter()
    benchmark.pedantic(fn, rounds=1, iterations=1, warmup_rounds=0)
    if ctx.cuda:
        torch.cuda.synchronize(ctx.device)
    return Timing([(time.perf_counter() - t0) * 1e3], "single_call")


def drive_pytest_benchmark(benchmark, fn: Callable, case: Case, ctx: RunContext, timing: Timing) -> None:
    """Hand the same callable to pytest-benchmark (its JSON/save/compare options then work).

    On a GPU its timer synchronises first, and each round runs enough calls (~20 ms) for
    the synchronisation not to matter; the figure of record stays ``timing`` (CUDA events).
    """
    benchmark.group = case.group
    if ctx.cuda and getattr(benchmark, "_timer", None) is time.perf_counter:
        benchmark._timer = synced_perf_counter  # pytest-benchmark keeps its timer here (5.x)
    per_round_ms = 20.0 if case.level == "kernel" else 0.0
    iterations = max(1, int(per_round_ms / max(timing.median_ms, 1e-3)))
    benchmark.pedantic(fn, rounds=5 if case.level != "model" else 3, iterations=iterations, warmup_rounds=1)


def run_case(case: Case, ctx: RunContext, benchmark=None) -> dict:
    """Run ``case``; returns its record (status ok | skipped | oom | error)."""
    if case.level == "report":
        return run_report_case(case, ctx)
    record = case.describe()
    record.update(runs=what_runs(case, ctx), speed=counts_as_speed(case, ctx), device=ctx.device.type)
    reason = skip_reason(case, ctx)
    if reason:
        record.update(status="skipped", reason=reason)
        return record
    single = ctx.smoke or what_runs(case, ctx) == "interpreter"
    p = ctx.profile
    rep_ms = p.model_rep_ms if case.level == "model" else p.rep_ms
    bench = None
    try:
        bench = build(case, ctx)
        record.update(rotation=bench.rotation, notes=bench.notes)
        if single and benchmark is not None:
            timing = single_call_via_benchmark(benchmark, bench.fn, case, ctx)
        else:
            timing = measure(bench.fn, ctx.device, warmup_ms=p.warmup_ms, rep_ms=rep_ms,
                             min_reps=3 if case.level == "model" else 5, single=single)
            if benchmark is not None:
                drive_pytest_benchmark(benchmark, bench.fn, case, ctx, timing)
    except Exception as err:  # noqa: BLE001  (recorded, then re-raised by the pytest wrapper)
        oom = _is_oom(err)
        record.update(status="oom" if oom else "error", reason=f"{type(err).__name__}: {err}"[:500])
        if not oom:  # an OOM is a result; its traceback would keep the tensors alive
            record["_exception"] = err
        return record
    finally:
        del bench
        _free(ctx)
    record["status"] = "ok"
    record.update(timing.as_dict())
    record.update(flops=_flops_of(case), min_bytes=_bytes_of(case))
    if what_runs(case, ctx) == "interpreter":
        # a check, not a measurement: keep the wall time apart from the timing fields
        record["check_ms"] = record.pop("median_ms")
        for k in ("mean_ms", "min_ms", "iqr_ms"):
            record.pop(k)
        record["note"] = "ran once through the Triton interpreter to check the harness; not a speed"
    derive_metrics(record, ctx.ceilings)
    return record


def _flops_of(case: Case) -> Optional[int]:
    if case.level == "kernel":
        return counting.conv_flops(case.shape, case.batch, case.mode)
    if case.level == "block":
        return counting.block_flops(case.arch, case.stage, 1, case.batch, case.mode, case.image)
    return None if case.arch == MINI else counting.model_flops(case.arch, case.batch, case.mode, case.image)


def _bytes_of(case: Case) -> Optional[int]:
    if case.level == "kernel":
        return counting.conv_min_bytes(case.shape, case.batch, case.dtype, case.mode)
    if case.level == "block":
        return counting.block_min_bytes(case.arch, case.stage, 1, case.batch, case.dtype, case.mode, case.image)
    return None  # a model's compulsory traffic is not a useful floor: its roofline is FLOPs only


def derive_metrics(record: dict, ceilings: Optional[dict]) -> dict:
    """GB/s, TFLOP/s and fraction of the roofline, only for records that count as speed."""
    t = record.get("median_ms")
    ok = record.get("status") == "ok" and record.get("speed") and t
    t_s = t * 1e-3 if ok else None
    record["gbps"] = record["min_bytes"] / t_s / 1e9 if ok and record.get("min_bytes") else None
    record["tflops"] = record["flops"] / t_s / 1e12 if ok and record.get("flops") else None
    record["roofline_fraction"] = (roofline_fraction(t_s, record.get("flops"), record.get("min_bytes"),
                                                     ceilings, record["dtype"]) if ok and ceilings else None)
    return record
