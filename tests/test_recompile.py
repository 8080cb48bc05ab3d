"""New batch sizes and new processes must not mean new compilations.

* Triton: each kernel marks its batch-dependent sizes ``do_not_specialize`` (see
  ``kernels/_runtime.py``).  A child process without the interpreter runs a converted
  bottleneck forward and backward on CPU tensors with every kernel launch replaced by a
  recorder that computes the key Triton's JIT would cache the binary under (Triton's own
  binder, for an sm_90 target): batch sizes that stay in one ``conv_config`` BLOCK_M
  bucket must need exactly the binaries of the first one, and crossing the bucket at
  most doubles them.  On a GPU the same is checked on the real JIT cache.
* Triton's on-disk cache: a second process compiling the same kernels adds nothing to it.
* torch.compile: new batch sizes cost at most one recompilation (to a dynamic batch).
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _child_env(**extra):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.update(extra)
    return env


def _run_child(code: str, *args: str, **env) -> str:
    proc = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, cwd=ROOT,
                          env=_child_env(**env), timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout.strip().splitlines()[-1]


# Runs without TRITON_INTERPRET: the kernels are real JITFunctions, the configurations the
# GPU's.  Launches are recorded, not run, so the outputs are garbage: only keys count.
_LAUNCH_KEYS = r'''
import copy, importlib, json, sys
import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import make_backend
from triton.runtime.jit import create_function_from_signature
import kernels, resnext
from resnext.models import Bottleneck

backend = make_backend(GPUTarget("cuda", 90, 32))
launches = []

def recorder(kernel):
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    def run(*args, grid, warmup, **kwargs):
        _, specialization, options = binder(*args, **kwargs)
        runtime = {p.name: repr(s) for p, s in zip(kernel.params, specialization) if not p.is_constexpr}
        config = {p.name: repr(s) for p, s in zip(kernel.params, specialization) if p.is_constexpr}
        launches.append([kernel.fn.__name__, runtime, json.dumps([config, sorted(options.items())])])
    return run

for name in ("batchnorm", "bn_backward", "conv_bn_act", "conv_grad"):
    module = importlib.import_module("kernels." + name)  # (kernels.conv_bn_act is also a function)
    module.use_triton = lambda t: True  # CPU tensors take the Triton path (recorded)
    resnext.modules.use_triton = module.use_triton
    for name in dir(module):
        obj = getattr(module, name)
        if isinstance(obj, triton.runtime.JITFunction) and name.endswith("_kernel"):
            obj.run = recorder(obj)

torch.manual_seed(0)
block = Bottleneck(64, 16, groups=4, base_width=4)  # 16 channels, 4 per group, + identity
down = Bottleneck(64, 32, stride=2, groups=8, base_width=4,
                  downsample=torch.nn.Sequential(torch.nn.Conv2d(64, 128, 1, 2, bias=False),
                                                 torch.nn.BatchNorm2d(128)))
models = [resnext.convert(copy.deepcopy(m)) for m in (block, down)]
out = {}
for batch in json.loads(sys.argv[1]):
    launches.clear()
    x = torch.randn(batch, 64, 16, 16).to(memory_format=torch.channels_last)
    for m in models:
        m.train()
        xr = x.clone().requires_grad_()
        m(xr).float().sum().backward()
        m.eval()
        with torch.no_grad():
            m(x)
    out[batch] = list(launches)
print(json.dumps(out))
'''


def _launches(batches):
    """{batch: [(kernel, {runtime argument: Triton's specialization}, configuration), ...]}, in launch order."""
    return {int(b): v for b, v in json.loads(_run_child(_LAUNCH_KEYS, json.dumps(list(batches)))).items()}


def test_new_batch_sizes_reuse_triton_binaries():
    """A binary is keyed by the constexprs (our configuration: block sizes, bucketed on
    purpose) and by how Triton specialises each runtime argument (== 1, multiple of 16,
    alignment).  The second part must not depend on the batch size, or every new batch
    size of the 1 / multiple-of-16 / other kind compiles a fresh binary of every kernel."""
    batches = (2, 1, 3, 16, 17, 33, 64, 100)
    runs = _launches(batches)
    first = runs[2]
    kinds = {k for k, _, _ in first}
    # (the statistics are finalized in the convolution's launch: no bn_finalize_kernel on one rank)
    assert {"conv_bn_act_fwd_kernel", "conv_grads_kernel", "bn_act_kernel", "bn_backward_kernel"} <= kinds, kinds
    for batch in batches[1:]:
        assert [k for k, _, _ in runs[batch]] == [k for k, _, _ in first], "launch sequence changed"
        for i, ((kernel, spec, _), (_, spec2, _)) in enumerate(zip(first, runs[batch])):
            changed = {a: (spec[a], spec2[a]) for a in spec if spec[a] != spec2[a]}
            assert not changed, f"launch {i} ({kernel}): batch 2 -> {batch} re-specialises {changed}"
    # What is left is the configuration: conv_config's two BLOCK_M buckets and the row tiles
    # of the elementwise kernels, which only change for tiny M.
    per_batch = {b: {(k, json.dumps(s), c) for k, s, c in r} for b, r in runs.items()}
    total = set().union(*per_batch.values())
    assert len(total) <= 2 * len(per_batch[2]), f"{len(total)} binaries over {len(batches)} batch sizes"


_COMPILE_ONE = r'''
import warnings; warnings.filterwarnings("ignore")
from kernels import _compile
launches = _compile.conv_launches([(4, 64, 16, 16, 64, 16, 3, 1)], "bfloat16")
for l in launches:
    _compile.compile_for_hopper(l["kernel"], l["signature"], l["constexprs"], l["num_warps"], l["num_stages"],
                                l["attrs"])
print(len(launches))
'''


def _cache_files(d: Path):
    return {p.relative_to(d): p.stat().st_mtime_ns for p in d.rglob("*") if p.is_file()}


def test_second_process_hits_triton_cache(tmp_path):
    """The kernels hash the same in every process (no source built at run time, no
    per-process constants), so a restart compiles nothing: Triton's disk cache serves it."""
    cache = tmp_path / "triton-cache"
    assert int(_run_child(_COMPILE_ONE, TRITON_CACHE_DIR=str(cache))) == 3  # eval, train, train_sync variants
    first = _cache_files(cache)
    assert any(str(p).endswith(".cubin") for p in first), sorted(map(str, first))[:5]
    _run_child(_COMPILE_ONE, TRITON_CACHE_DIR=str(cache))
    assert _cache_files(cache) == first, "the second process compiled again instead of using the cache"


def test_torch_compile_new_batch_sizes_recompile_once(fresh_dynamo):
    """Dynamo compiles the converted block once per static shape, then once with a dynamic
    batch (automatic_dynamic_shapes); later batch sizes reuse that graph.  The custom ops'
    fake implementations must accept a symbolic batch for this to hold."""
    import resnext
    from resnext.models import Bottleneck
    compiles = []

    def counting_backend(gm, example_inputs):
        compiles.append(len(example_inputs))
        return gm.forward

    block = resnext.convert(Bottleneck(32, 8, groups=4, base_width=8)).to(DEVICE).train()
    step = torch.compile(block, backend=counting_backend, fullgraph=True)
    for batch in (2, 3, 4, 5, 7, 9):
        x = torch.randn(batch, 32, 6, 6, device=DEVICE).to(memory_format=torch.channels_last)
        ref = block(x)
        y = step(x)
        assert y.shape == ref.shape
    assert len(compiles) <= 2, f"{len(compiles)} compilations for 6 batch sizes"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the JIT cache exists on a GPU only")
def test_gpu_jit_cache_bounded_over_batch_sizes():
    import kernels
    from kernels.conv_bn_act import conv_bn_act_fwd_kernel
    w = torch.randn(64, 4, 3, 3, device="cuda", dtype=torch.bfloat16)
    counts = []
    for batch in (2, 1, 3, 16, 17, 33, 64):
        x = torch.randn(batch, 64, 16, 16, device="cuda", dtype=torch.bfloat16)
        kernels.conv_bn_act(x, w, 1, 1, 16, out_relu=True)
        cache = conv_bn_act_fwd_kernel.device_caches[torch.cuda.current_device()][0]
        counts.append(len(cache))
    assert counts[-1] == counts[0], f"binaries after each batch size: {counts}"


_LAUNCH_ON_GPU = r'''
import torch, kernels
x = torch.randn(2, 64, 16, 16, device="cuda", dtype=torch.bfloat16)
w = torch.randn(64, 4, 3, 3, device="cuda", dtype=torch.bfloat16)
y = kernels.conv_bn_act(x, w, 1, 1, 16, out_relu=True)[0]
torch.cuda.synchronize()
print(float(y.float().abs().sum()))
'''


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the JIT launches on a GPU only")
def test_gpu_second_process_hits_triton_cache(tmp_path):
    cache = tmp_path / "triton-cache"
    _run_child(_LAUNCH_ON_GPU, TRITON_CACHE_DIR=str(cache))
    first = _cache_files(cache)
    assert first, "nothing was cached"
    _run_child(_LAUNCH_ON_GPU, TRITON_CACHE_DIR=str(cache))
    assert _cache_files(cache) == first, "the second process compiled again instead of using the cache"


# ----------------------------------------------------------------------------------------
# Re-running a launch (what an autotuner or a replayed CUDA graph does) changes nothing
# ----------------------------------------------------------------------------------------
def _bits(t: torch.Tensor) -> torch.Tensor:
    flat = t.detach().reshape(-1).clone()  # a copy: the kernel runs again on t
    return flat.view(torch.uint8) if flat.numel() else flat


# The finalize updates running_mean, running_var and num_batches_tracked in place, as
# nn.BatchNorm2d's own kernel does: a replayed CUDA graph must advance them once per replay.
# Those three arguments are the only state any launch changes on a second run: the finalize
# kernel's (a process group's statistics), or the convolution's that finalizes in its launch.
_RUNNING = {"run_mean_ptr", "run_var_ptr", "nbt_ptr"}
STATEFUL = {"bn_finalize_kernel": _RUNNING, "conv_bn_act_fwd_kernel": _RUNNING}


def test_every_launch_is_idempotent(monkeypatch):
    """No kernel accumulates into its outputs or reads what it writes: running any launch
    a second time on the same buffers gives the same bits, except the running statistics
    that the BN finalize advances (``STATEFUL``; nothing re-runs it: there is no autotuning).
    That is why no kernel needs ``restore_value``/``reset_to_zero``, and why tuning
    configurations by re-running is safe for every other kernel."""
    import importlib

    import triton

    import resnext
    from resnext.models import Bottleneck
    if not kernels_run_here():
        pytest.skip("no Triton path on this machine")
    seen = set()

    def twice(kernel, real_run):
        def run(*args, grid, warmup, **kwargs):
            real_run(*args, grid=grid, warmup=warmup, **kwargs)
            skip = STATEFUL.get(kernel.__name__, set())
            tensors = [(name, a) for name, a in [*zip(kernel.arg_names, args), *kwargs.items()]
                       if isinstance(a, torch.Tensor) and name not in skip]
            first = [_bits(t) for _, t in tensors]
            real_run(*args, grid=grid, warmup=warmup, **kwargs)
            for (name, t), before in zip(tensors, first):
                assert torch.equal(_bits(t), before), f"{kernel.__name__}: {name} changed on a second run"
            seen.add(kernel.__name__)
        return run

    for name in ("batchnorm", "bn_backward", "conv_bn_act", "conv_grad"):
        module = importlib.import_module("kernels." + name)
        for attr in dir(module):
            obj = getattr(module, attr)
            if attr.endswith("_kernel") and hasattr(obj, "run") and isinstance(
                    obj, (triton.runtime.JITFunction, getattr(triton.runtime.interpreter, "InterpretedFunction", ()))):
                monkeypatch.setattr(obj, "run", twice(obj, obj.run))

    down = torch.nn.Sequential(torch.nn.Conv2d(16, 32, 1, 2, bias=False), torch.nn.BatchNorm2d(32))
    block = resnext.convert(Bottleneck(16, 8, stride=2, downsample=down, groups=4, base_width=16)).to(DEVICE)
    x = torch.randn(2, 16, 6, 6, device=DEVICE).to(memory_format=torch.channels_last).requires_grad_()
    block.train()
    block(x).sum().backward()
    block.eval()
    with torch.no_grad():
        block(x)
    assert {"conv_bn_act_fwd_kernel", "bn_act_kernel", "bn_backward_kernel",
            "conv_grads_kernel"} <= seen, seen  # dgrad + wgrad: one launch in training


def kernels_run_here() -> bool:
    import kernels
    return kernels.use_triton(torch.empty(0, device=DEVICE))


@pytest.mark.no_poison  # the kept buffers themselves, not conftest.py's fresh NaN scratch
def test_kept_scratch_is_reused_and_written_before_read(monkeypatch):
    """A launch's scratch and arrival counters are kept per (kind, slot), device and stream
    (``kernels._runtime``): the next launch gets the same buffer, or a larger one that is then
    kept.  A training step whose kept scratch holds NaN (stale partials) gives the same bits as
    one on fresh NaN-filled buffers: every launch writes its partials before it reads them."""
    import copy

    import resnext
    from kernels import _runtime
    from resnext.models import Bottleneck
    if not kernels_run_here():
        pytest.skip("no Triton path on this machine")
    dev = torch.device(DEVICE)
    a = _runtime.scratch(dev, 10)
    assert _runtime.scratch(dev, 5) is a and a.dtype == torch.float32
    assert _runtime.scratch(dev, 5, slot=1) is not a
    big = _runtime.scratch(dev, a.numel() + 1)
    assert big.numel() > a.numel() and _runtime.scratch(dev, 5) is big
    counters = _runtime.arrival_counters(dev, 3)
    assert counters.dtype == torch.int32 and counters.data_ptr() not in (a.data_ptr(), big.data_ptr())

    down = torch.nn.Sequential(torch.nn.Conv2d(16, 32, 1, 2, bias=False), torch.nn.BatchNorm2d(32))
    block = resnext.convert(Bottleneck(16, 8, stride=2, downsample=down, groups=4, base_width=16)).to(dev).train()
    x = torch.randn(2, 16, 6, 6, device=dev).to(memory_format=torch.channels_last).requires_grad_()

    def step(model):
        x.grad = None
        y = model(x)
        y.backward(torch.randn(y.shape, generator=torch.Generator().manual_seed(0)).to(dev))
        return [_bits(t) for t in (y, x.grad, *(p.grad for p in model.parameters()))]

    step(copy.deepcopy(block))  # fills the kept buffers
    for key, buf in _runtime._PER_STREAM.items():
        if key[0][0] == "scratch":
            buf.fill_(float("nan"))
    kept = step(copy.deepcopy(block))
    with monkeypatch.context() as m:
        m.setattr(_runtime, "scratch", lambda device, n, slot=0: torch.full((n,), float("nan"), device=device))
        fresh = step(copy.deepcopy(block))
    assert all(torch.equal(k, f) for k, f in zip(kept, fresh))
    assert all(int(buf.abs().sum()) == 0 for key, buf in _runtime._PER_STREAM.items() if key[0][0] == "counters")
