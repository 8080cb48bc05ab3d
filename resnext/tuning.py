"""Tuning on the user's device: measured launch configurations and per-block dispatch.

    report = resnext.tune(model, x)      # times every fused block of model(x) on x's device
    print(report)                        # block, configs, our time, PyTorch's time, the choice

For every distinct fused block the model runs (``routing.signature``: structure, input
shape, dtype, memory format, autocast, train/eval), ``tune``:

1. records the convolution launches the block makes (``_runtime.recording_configs``: each
   forward, train-forward and data-gradient convolution is a ``conv_config`` key);
2. per convolution, times the block with each of ``_runtime.conv_candidates`` (only what fits
   the device's shared memory) in turn and keeps the fastest (``_runtime.TUNED``);
3. times the block with those configurations against its PyTorch ops (``_eager_forward``:
   cuDNN), forward in eval, forward + backward in training, and routes the block to PyTorch
   where PyTorch is faster (``routing.ROUTES``).

Every parameter, buffer (running statistics, ``num_batches_tracked``), ``.grad`` and the RNG
states are restored afterwards: tuning runs are not training steps.  The timer is CUDA events
around a run, after warm-up, with L2 flushed between runs, the median of several; tests inject
their own (``timer(fn, trial) -> seconds``).  Without CUDA and without a timer ``tune`` raises:
the CPU interpreter's times say nothing about a GPU.

The results go to a JSON cache (``cache_path()``: ``$RESNEXT_TUNE_CACHE``, else
``$XDG_CACHE_HOME/resnext-triton/tuning.json``, else ``~/.cache/resnext-triton/tuning.json``),
one entry per (device name, compute capability, Triton, torch, resnext-triton versions).  The
entry for this process is read once, at the first fused forward (``routing.LOADED``): a tuned
process times nothing at run time.  An entry of other versions is ignored (with a warning).
Where the user has no entry, a table shipped in ``resnext/tuned/`` for the device (name +
compute capability) is used; none is shipped yet (no GPU has produced one).

Under ``torch.distributed`` every rank runs the same trials (a SyncBatchNorm's collectives
stay matched) and then takes rank 0's choices (``broadcast_object_list``); the cache read at
the first forward is rank 0's too.  Tune-on-first-call (``enable()``, or ``RESNEXT_TUNE=1``):
a fused block meeting a signature with no decision tunes itself then, once.
"""
import functools
import json
import os
import statistics
import warnings
from typing import Callable, Dict, List, NamedTuple, Optional

import torch
from torch import nn

from kernels import _runtime, _targets

from . import routing
from .convert import FUSED_MODULES

CACHE_ENV = "RESNEXT_TUNE_CACHE"
AUTO_ENV = "RESNEXT_TUNE"
FORMAT = 1
SHIPPED_DIR = os.path.join(os.path.dirname(__file__), "tuned")


class Trial(NamedTuple):
    """What one timing is of (a timer may read it; an injected test timer does)."""
    block: str  # the block's name in the model ("layer1.0")
    provider: str  # "ours" (Triton) or "pytorch" (the block's PyTorch ops)
    mode: str  # "forward" (eval) or "forward+backward" (train)
    conv: Optional[tuple] = None  # the conv_config key being tuned (None: the block as chosen)
    config: Optional[dict] = None  # the candidate configuration of ``conv``


class BlockResult(NamedTuple):
    block: str
    signature: tuple
    mode: str
    configs: List[tuple]  # (conv_config key, the chosen configuration)
    ours_s: float
    pytorch_s: float
    choice: str  # "ours" | "pytorch"


class TuningReport:
    """What ``tune`` measured and chose: one row per distinct block (``rows``)."""

    def __init__(self, environment: dict, timer_name: str, rows: List[BlockResult], cache: Optional[str]):
        self.environment, self.timer_name, self.rows, self.cache = environment, timer_name, rows, cache

    def lines(self) -> List[str]:
        env = self.environment
        out = [f"Tuning report: {env['device']} (cc {env['capability']}), Triton {env['triton']}, "
               f"torch {env['torch']}, resnext-triton {env['package']}; timer: {self.timer_name}",
               f"{'block':<24} {'mode':<17} {'ours (ms)':>10} {'PyTorch (ms)':>13}  choice",
               "    its convolutions (kind, M rows, Cout, Cin/group -> Cout/group): the kept configuration"]
        for r in self.rows:
            out.append(f"{r.block:<24} {r.mode:<17} {r.ours_s * 1e3:>10.4f} {r.pytorch_s * 1e3:>13.4f}  {r.choice}")
            out += [f"    {k[0]:<9} M={k[1]:<6} Cout={k[2]:<5} {k[3]}->{k[4]}: {describe(c)}" for k, c in r.configs]
        routed = sum(r.choice == "pytorch" for r in self.rows)
        out.append(f"{len(self.rows)} distinct blocks, {routed} routed to PyTorch; "
                   f"cache: {self.cache or 'not saved'}")
        return out

    def __str__(self):
        return "\n".join(self.lines())

    def to_json(self) -> list:
        return [dict(block=r.block, mode=r.mode, ours_s=r.ours_s, pytorch_s=r.pytorch_s, choice=r.choice,
                     configs=[[_key_to_json(k), c] for k, c in r.configs]) for r in self.rows]


def describe(cfg: dict) -> str:
    """"64x32x16 w4 s3" (BLOCK_M x BLOCK_N x BLOCK_K, warps, stages)."""
    return f"{cfg['BLOCK_M']}x{cfg['BLOCK_N']}x{cfg['BLOCK_K']} w{cfg['num_warps']} s{cfg['num_stages']}"


# --------------------------------------------------------------------------------------
# The environment a measurement holds for, and the cache file
# --------------------------------------------------------------------------------------

def package_version() -> str:
    try:
        from importlib.metadata import version
        return version("resnext-triton")
    except Exception:  # not installed (a source checkout on sys.path)
        return "0+unknown"


def environment(device: Optional[torch.device] = None) -> dict:
    """Device name, compute capability, Triton, torch and package versions of ``device``
    (None: the current CUDA device, else the CPU interpreter)."""
    import triton
    if device is None:
        device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() \
            else torch.device("cpu")
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        major, minor = torch.cuda.get_device_capability(device)
        cap = f"{major}.{minor}"
    else:
        name, cap = "cpu (Triton interpreter)", "none"
    return dict(device=name, capability=cap, triton=triton.__version__, torch=torch.__version__,
                package=package_version())


def environment_key(env: dict) -> str:
    return " | ".join(f"{k} {env[k]}" for k in ("device", "capability", "triton", "torch", "package"))


def cache_path() -> str:
    """``$RESNEXT_TUNE_CACHE``, else the user cache folder's ``resnext-triton/tuning.json``."""
    path = os.environ.get(CACHE_ENV)
    if path:
        return path
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "resnext-triton", "tuning.json")


def _dtype(name: str) -> torch.dtype:
    dtype = getattr(torch, name.replace("torch.", ""), None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"not a dtype: {name!r}")
    return dtype


def _key_to_json(key: tuple) -> list:
    kind, M, cout, cin_g, cout_g, dtype, target = key
    return [kind, M, cout, cin_g, cout_g, str(dtype), target.key]


def _key_from_json(item: list, target: _targets.Target) -> Optional[tuple]:
    """The ``conv_config`` key, for ``target`` (None when the entry was for another target)."""
    kind, M, cout, cin_g, cout_g, dtype, target_key = item
    if target_key != target.key:
        return None
    return (kind, int(M), int(cout), int(cin_g), int(cout_g), _dtype(dtype), target)


def _tuplify(v):
    return tuple(_tuplify(x) for x in v) if isinstance(v, list) else v


def _signature_to_json(sig: tuple) -> list:
    (cls, convs), dev, shape, dtype, fmt, compute, training = sig
    return [[cls, [[list(c[0]), *c[1:]] for c in convs]], dev, list(shape), str(dtype), fmt, str(compute), training]


def _signature_from_json(item: list) -> tuple:
    (cls, convs), dev, shape, dtype, fmt, compute, training = item
    convs = tuple((tuple(c[0]), *c[1:]) for c in convs)
    return ((cls, convs), dev, tuple(shape), _dtype(dtype), fmt, _dtype(compute), bool(training))


def _read(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        return {"format": FORMAT, "entries": {}}
    except (OSError, ValueError) as err:
        warnings.warn(f"resnext.tuning: cannot read the tuning cache {path} ({err}); ignoring it",
                      RuntimeWarning, stacklevel=3)
        return {"format": FORMAT, "entries": {}}
    if not isinstance(data, dict) or data.get("format") != FORMAT or not isinstance(data.get("entries"), dict):
        warnings.warn(f"resnext.tuning: {path} is not a tuning cache of format {FORMAT}; ignoring it",
                      RuntimeWarning, stacklevel=3)
        return {"format": FORMAT, "entries": {}}
    return data


def _write(path: str, data: dict) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=1)
    os.replace(tmp, path)  # atomic: a reader sees the old file or the new one


def _entry_json(configs: Dict[tuple, dict], routes: Dict[tuple, str], env: dict, report=None) -> dict:
    return dict(environment=env, configs=[[_key_to_json(k), c] for k, c in configs.items()],
                routes=[[_signature_to_json(s), c] for s, c in routes.items()], report=report or [])


def _entry_tables(entry: dict, target: _targets.Target):
    configs, routes = {}, {}
    for item, cfg in entry.get("configs", []):
        key = _key_from_json(item, target)
        if key is not None:
            configs[key] = dict(cfg)
    for item, choice in entry.get("routes", []):
        routes[_signature_from_json(item)] = choice
    return configs, routes


def _current_target() -> Optional[_targets.Target]:
    if torch.cuda.is_available():
        return _targets.target_for_device(torch.cuda.current_device())
    return _targets.interpreter_target() if _runtime.INTERPRET else None


def shipped_table_path(env: dict) -> str:
    """Where a table shipped with the package for this device would be: ``resnext/tuned/<device
    name>-cc<major.minor>.json`` (spaces as underscores); an entry in the cache's format."""
    name = "".join(ch if ch.isalnum() or ch in "-." else "_" for ch in env["device"])
    return os.path.join(SHIPPED_DIR, f"{name}-cc{env['capability']}.json")


def load(path: Optional[str] = None, broadcast: bool = True) -> str:
    """Read this process's entry of the tuning cache (``path``: ``cache_path()``) into the
    tables the kernels and blocks consult, replacing them; returns where it came from ("cache",
    "shipped", "none").  Under ``torch.distributed`` (``broadcast``) rank 0's tables are
    broadcast: every rank calls it after ``init_process_group``.  The first fused forward reads
    the file without a collective (``broadcast=False``: no collective or host sync on the hot
    path; torch.compile traces nothing of it)."""
    routing.mark_loaded()
    source, configs, routes = read_tables(path)
    if broadcast:
        configs, routes = _from_rank0(configs, routes)
    _runtime.set_tuned(configs, replace=True)
    routing.set_routes(routes, replace=True)
    return source


def read_tables(path: Optional[str] = None):
    """(source, configurations, routes) of this process's entry, without applying them
    (``load`` applies them; the benchmarks switch between them and the design's)."""
    target = _current_target()
    if target is None:  # the reference path: no kernel, nothing to route
        return "none", {}, {}
    env = environment()
    key = environment_key(env)
    path = path or cache_path()
    entries = _read(path)["entries"]
    source, entry = "none", entries.get(key)
    if entry is not None:
        source = "cache"
    else:
        others = [k for k, e in entries.items() if e.get("environment", {}).get("device") == env["device"]]
        if others:
            warnings.warn(f"resnext.tuning: {path} has tuning for {env['device']} from other versions "
                          f"({others[0]}); it is ignored here ({key}): run resnext.tune again",
                          RuntimeWarning, stacklevel=2)
        shipped = shipped_table_path(env)
        if os.path.exists(shipped):
            with open(shipped, encoding="utf-8") as f:
                entry, source = json.load(f), "shipped"
    configs, routes = _entry_tables(entry, target) if entry is not None else ({}, {})
    return source, configs, routes


def _load_once(broadcast: bool = True) -> None:
    if not routing.LOADED:
        load(broadcast=broadcast)


def _save(path: str, configs: dict, routes: dict, env: dict, report=None) -> None:
    """Merge this run's tables into the file's entry for ``env`` (rank 0 alone writes)."""
    if _rank() > 0:
        return
    data = _read(path)
    key = environment_key(env)
    old = data["entries"].get(key)
    target = _current_target()
    if old is not None and target is not None:
        old_configs, old_routes = _entry_tables(old, target)
        configs, routes = {**old_configs, **configs}, {**old_routes, **routes}
        report = list(old.get("report", [])) + list(report or [])
    data["entries"][key] = _entry_json(configs, routes, env, report)
    _write(path, data)


# --------------------------------------------------------------------------------------
# torch.distributed: rank 0's choices everywhere
# --------------------------------------------------------------------------------------

def _distributed() -> bool:
    import torch.distributed as dist
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _rank() -> int:
    import torch.distributed as dist
    return dist.get_rank() if _distributed() else 0


def _from_rank0(configs: dict, routes: dict):
    """Rank 0's tables on every rank (a routing difference between ranks would change the
    collectives a SyncBatchNorm issues); the tables as they are without a process group."""
    if not _distributed():
        return configs, routes
    import torch.distributed as dist
    obj = [_entry_json(configs, routes, {})]  # (keys as text: a Target is interned, compared by identity)
    dist.broadcast_object_list(obj, src=0)
    return _entry_tables(obj[0], _current_target())


# --------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------

def cuda_event_timer(warmup: int = 3, repeats: int = 10) -> Callable:
    """A timer: ``fn`` run ``warmup`` times, then ``repeats`` times between CUDA events with
    L2 flushed before each (a write of twice the L2 size); the median, in seconds."""
    def timer(fn, trial: Trial) -> float:
        device = torch.cuda.current_device()
        l2 = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 64 << 20) or (64 << 20)
        flush = torch.empty(2 * l2 // 4, dtype=torch.float32, device="cuda")
        for _ in range(warmup):
            fn()
        times = []
        for _ in range(repeats):
            flush.zero_()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        return statistics.median(times)
    timer.__name__ = f"CUDA events, {warmup} warm-up, L2 flushed, median of {repeats}"
    return timer


def _default_timer(device: torch.device) -> Callable:
    if device.type != "cuda":
        raise RuntimeError(f"resnext.tune times on a GPU (CUDA events); the input is on {device}. "
                           f"On the CPU the Triton interpreter's times say nothing about a GPU: pass "
                           f"timer=(fn, trial) -> seconds to tune with your own timer")
    return cuda_event_timer()


# --------------------------------------------------------------------------------------
# State that tuning runs must not change
# --------------------------------------------------------------------------------------

class _Snapshot:
    """Every parameter, buffer and ``.grad`` of a module, and the RNG states; ``restore`` puts
    them back in place (the same tensor objects: optimizers and caches keep theirs)."""

    def __init__(self, model: nn.Module, device: torch.device):
        with torch.no_grad():
            self.tensors = [(t, t.detach().clone()) for t in _distinct(model)]
            self.grads = [(p, p.grad, None if p.grad is None else p.grad.detach().clone()) for p in model.parameters()]
        self.cpu_rng = torch.get_rng_state()
        self.cuda_rng = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
        self.device = device
        self.failed = dict(_runtime.FAILED)

    def restore(self):
        with torch.no_grad():
            for t, saved in self.tensors:
                t.copy_(saved)
            for p, grad, saved in self.grads:  # the same .grad tensor (an optimizer may hold it), its values
                p.grad = grad
                if grad is not None:
                    grad.copy_(saved)
        torch.set_rng_state(self.cpu_rng)
        if self.cuda_rng is not None:
            torch.cuda.set_rng_state(self.cuda_rng, self.device)


def _distinct(model: nn.Module) -> List[torch.Tensor]:
    seen, out = set(), []
    for t in list(model.parameters()) + list(model.buffers()):
        if id(t) not in seen:
            seen.add(id(t))
            out.append(t)
    return out


# --------------------------------------------------------------------------------------
# tune
# --------------------------------------------------------------------------------------

class _Call(NamedTuple):
    name: str
    module: nn.Module
    x: torch.Tensor
    autocast: Optional[torch.dtype]


def _fused_calls(model: nn.Module, inputs: tuple) -> List[_Call]:
    """The fused blocks ``model(*inputs)`` runs, with a copy of each one's input.  (A fused
    block inside another, a FusedBottleneck in a FusedSequential, is one too: each decides
    for its own launches.)"""
    calls, handles = [], []
    names = {id(m): name for name, m in model.named_modules() if isinstance(m, FUSED_MODULES)}

    def hook(module, args):
        x = args[0]
        dev = x.device.type
        ac = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else None
        calls.append(_Call(names[id(module)] or f"({type(module).__name__})", module, x.detach().clone(), ac))

    for m in model.modules():
        if id(m) in names:
            handles.append(m.register_forward_pre_hook(hook))
    try:
        with torch.no_grad():
            model(*inputs)
    finally:
        for h in handles:
            h.remove()
    return calls


def _runner(module: nn.Module, forward: Callable, x: torch.Tensor, autocast: Optional[torch.dtype]):
    """A function that runs ``forward`` on a copy of ``x`` as the model would: forward +
    backward (a fixed random output gradient) in training, a no-grad forward in eval."""
    train = module.training
    gen = torch.Generator(device="cpu").manual_seed(0)

    def ctx():
        return torch.autocast(x.device.type, dtype=autocast) if autocast is not None else _null()

    grad_out = []

    def run():
        if not train:
            with torch.no_grad(), ctx():
                forward(x)
            return
        xi = x.detach().requires_grad_(True)
        with ctx():
            y = forward(xi)
        if not grad_out:
            grad_out.append(torch.randn(y.shape, generator=gen).to(y.device, y.dtype))
        y.backward(grad_out[0])
    return run


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def tune(model: nn.Module, *example_inputs, timer: Optional[Callable] = None, save: bool = True,
         path: Optional[str] = None) -> TuningReport:
    """Measure and choose, for every distinct fused block ``model(*example_inputs)`` runs (in
    the model's current train/eval mode and the caller's autocast), the fastest launch
    configuration of each convolution and the faster of our kernels and PyTorch; apply the
    choices in this process, save them to the cache (``save``; ``path``: ``cache_path()``) and
    return the report.  ``timer(fn, trial) -> seconds`` (default ``cuda_event_timer()``, which
    needs CUDA).  Parameters, buffers, gradients and RNG states are left as they were."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"tune expects an nn.Module, got {type(model).__name__}")
    if not example_inputs or not isinstance(example_inputs[0], torch.Tensor):
        raise TypeError("tune expects example inputs, the first a torch.Tensor (what the model is called with)")
    device = example_inputs[0].device
    timer = timer or _default_timer(device)
    _load_once()  # the cache's entry first: this run's results are merged into it
    env = environment(device if device.type == "cuda" else None)
    target = _runtime.target_of(example_inputs[0])
    auto, routes_before = routing.AUTO, dict(routing.ROUTES)
    routing.set_auto(False)
    routing.set_routes({}, replace=True)  # "ours" times our kernels even where a route said PyTorch
    snap = _Snapshot(model, device)
    configs, routes, rows = {}, {}, []
    try:
        calls = _fused_calls(model, example_inputs)
        snap.restore()
        seen = set()
        for call in calls:
            with _autocast_of(call):
                sig = routing.signature(call.module, call.x)
            if sig in seen:
                continue
            seen.add(sig)
            rows.append(_tune_block(call, sig, timer, configs, target))
            routes[sig] = rows[-1].choice
            snap.restore()
    finally:
        snap.restore()
        _runtime.FAILED.clear()
        _runtime.FAILED.update(snap.failed)
        routing.set_auto(auto)
    configs, routes = _from_rank0(configs, routes)
    _runtime.set_tuned(configs)
    routing.set_routes({**routes_before, **routes}, replace=True)
    report = TuningReport(env, getattr(timer, "__name__", type(timer).__name__), rows, None)
    if save:
        report.cache = path or cache_path()
        _save(report.cache, configs, routes, env, report.to_json())
    return report


def _autocast_of(call: _Call):
    return torch.autocast(call.x.device.type, dtype=call.autocast) if call.autocast is not None else _null()


def _tune_block(call: _Call, sig: tuple, timer: Callable, configs: dict, target) -> BlockResult:
    module, x = call.module, call.x
    mode = "forward+backward" if module.training else "forward"
    ours = _runner(module, module._fused_forward, x, call.autocast)
    with _runtime.recording_configs() as asked:
        ours()
    keys = list(dict.fromkeys(k for k in asked if k[-1] is target))
    for key in keys:
        if key in configs:  # another block already tuned this convolution
            continue
        candidates = _runtime.conv_candidates(*key)
        best, best_t = candidates[0], None
        for cand in candidates if len(candidates) > 1 else ():
            _runtime.set_tuned({key: cand})
            failed = dict(_runtime.FAILED)
            try:
                t = timer(ours, Trial(call.name, "ours", mode, key, dict(cand)))
            except Exception as err:
                if not _runtime.is_launch_failure(err):
                    raise
                t = None
            if len(_runtime.FAILED) != len(failed):  # the candidate fell back to PyTorch: not a candidate
                _runtime.FAILED.clear()
                _runtime.FAILED.update(failed)
                t = None
            if t is not None and (best_t is None or t < best_t):
                best, best_t = cand, t
        configs[key] = dict(best)
        _runtime.set_tuned({key: best})
    ours_s = timer(ours, Trial(call.name, "ours", mode))
    pytorch_s = timer(_runner(module, module._eager_forward, x, call.autocast), Trial(call.name, "pytorch", mode))
    choice = "pytorch" if pytorch_s < ours_s else "ours"
    return BlockResult(call.name, sig, mode, [(k, configs[k]) for k in keys], ours_s, pytorch_s, choice)


# --------------------------------------------------------------------------------------
# Tune on first call (like torch.backends.cudnn.benchmark)
# --------------------------------------------------------------------------------------

def enable(on: bool = True, timer: Optional[Callable] = None) -> None:
    """Tune-on-first-call: a fused block meeting an input signature with no decision (none in
    the cache either) measures itself then, once, and saves the result; a process whose cache
    has the decision times nothing.  ``timer``: as ``tune``'s."""
    _AUTO_TIMER[0] = timer
    routing.set_auto(on)


_AUTO_TIMER = [None]


def _auto_tune(module: nn.Module, x: torch.Tensor, sig: tuple) -> str:
    timer = _AUTO_TIMER[0] or _default_timer(x.device)
    target = _runtime.target_of(x)
    dev = x.device.type
    call = _Call(type(module).__name__, module, x.detach().clone(),
                 torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else None)
    snap = _Snapshot(module, x.device)
    routing.set_auto(False)  # the trials run the block's forward: no recursion
    configs = {}
    try:
        with torch.enable_grad() if module.training else _null():
            row = _tune_block(call, sig, timer, configs, target)
    finally:
        snap.restore()
        _runtime.FAILED.clear()
        _runtime.FAILED.update(snap.failed)
        routing.set_auto(True)
    configs, routes = _from_rank0(configs, {sig: row.choice})
    _runtime.set_tuned(configs)
    routing.set_routes(routes)
    _save(cache_path(), configs, routes, environment(x.device if x.device.type == "cuda" else None),
          TuningReport({}, "", [row], None).to_json())
    return routes[sig]


routing._LOADER = functools.partial(_load_once, broadcast=False)  # (routing skips it while compiling)
routing._AUTO_TUNER = _auto_tune
if os.environ.get(AUTO_ENV, "0") == "1":
    routing.set_auto(True)
