"""resnext.tuning on the CPU: an injected timer stands in for CUDA events (the interpreter's
times say nothing about a GPU), so each test decides what is "fastest" and checks that the
tuner picks it, routes blocks, keeps state, caches, and that every way of running the model
(eager, torch.compile, two processes) takes the tuned choice.  Shapes are tiny: the
interpreter runs every trial."""
import copy
import os
import socket

import pytest
import torch
from torch import nn

import resnext
from helpers import TimmBottleneck, count_conv_launches, randomize_bn
from kernels import _runtime, _targets
from resnext import routing, tuning

from conftest import DEVICE


@pytest.fixture(autouse=True)
def clean_tables(tmp_path, monkeypatch):
    """Each test starts with no tuned configuration, no route and its own cache file."""
    monkeypatch.setenv(tuning.CACHE_ENV, str(tmp_path / "tuning.json"))

    def reset():
        _runtime.set_tuned({}, replace=True)
        routing.set_routes({}, replace=True)
        routing.set_auto(False)
        routing.mark_loaded(True)  # the (empty) cache counts as read; tests call load() themselves
    reset()
    yield
    reset()
    routing.mark_loaded(False)


def stem(groups=4, cin=8, cout=32):
    """conv3x3 (grouped) -> BN -> ReLU: one FusedSequential run, one convolution."""
    torch.manual_seed(1)
    seq = nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, groups=groups, bias=False), nn.BatchNorm2d(cout), nn.ReLU())
    return randomize_bn(seq).to(DEVICE)


def bottleneck():
    """A ResNeXt bottleneck (cardinality 2) with a downsample: five convolutions."""
    torch.manual_seed(2)
    ds = nn.Sequential(nn.Conv2d(8, 16, 1, bias=False), nn.BatchNorm2d(16))
    return randomize_bn(TimmBottleneck(8, 4, downsample=ds, cardinality=2, base_width=16)).to(DEVICE)


def block_timer(times=None, conv_times=None, run=True):
    """A timer from tables: ``times[(block, provider)]`` for whole blocks (default 1.0),
    ``conv_times(config) -> seconds`` for a convolution's candidates (default 1.0).  ``run``:
    also run what is timed (as a real timer would), else only pretend.  ``calls``: the trials."""
    calls = []

    def timer(fn, trial):
        calls.append(trial)
        if run(trial) if callable(run) else run:
            fn()
        if trial.conv is not None:
            return conv_times(trial.config) if conv_times else 1.0
        return (times or {}).get((trial.block, trial.provider), 1.0)
    timer.calls = calls
    return timer


def x_of(shape=(2, 8, 5, 6), seed=3):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(DEVICE)


@pytest.mark.parametrize("favoured", [0, 1, 2])
def test_keeps_the_config_the_timer_says_is_fastest(favoured):
    """Each candidate in turn is "fastest": that one is kept, the next launch uses it (the
    memoised launch plans do not keep the old one) and the output is still right."""
    model = resnext.convert(stem()).eval()
    ref = copy.deepcopy(model).double()
    x = x_of()
    key = ("fwd", 2 * 5 * 6, 32, 2, 8, torch.float32, _runtime.target_of(x))
    cands = _runtime.conv_candidates(*key)
    assert len(cands) == 3 and cands[0] == _runtime._conv_config(*key[1:])
    want = cands[favoured]
    timer = block_timer(conv_times=lambda cfg: 1.0 if cfg == want else 2.0, run=False)
    report = resnext.tune(model, x, timer=timer, save=False)
    assert _runtime.TUNED == {key: want}
    assert [c for t in timer.calls if t.conv == key for c in [t.config]] == cands  # each candidate timed once
    assert report.rows[0].configs == [(key, want)]
    with _runtime.recording_configs() as asked:
        with torch.no_grad():
            y = model(x)
    assert asked == [key] and _runtime.conv_config(*key[1:], kind="fwd") == want
    with torch.no_grad():
        torch.testing.assert_close(y.double(), ref._eager_forward(x.double()), atol=1e-4, rtol=1e-4)


def test_candidates_fit_the_target():
    """Every candidate fits the target's shared memory; sm_100 with Triton < 3.8 keeps the flat
    NaN/Inf check of multi-group tiles; the GPU list is small (a tuning run is minutes, not hours)."""
    for key in ("cuda:86", "cuda:90", "hip:gfx942"):
        target = _targets.parse_target(key)
        cands = _runtime.conv_candidates("fwd", 256 * 56 * 56, 128, 4, 4, torch.bfloat16, target)
        assert 2 <= len(cands) <= 24
        for c in cands:
            assert _runtime.mma_shared_bytes(c["BLOCK_M"], c["BLOCK_N"], c["BLOCK_K"], c["num_stages"], 2) \
                <= target.shared_per_block
    old = _targets.parse_target("cuda:100", version="3.6.0")
    assert {c["MULTI_GROUP"] for c in _runtime.conv_candidates("fwd", 4096, 128, 4, 4, torch.bfloat16, old)} \
        == {_runtime.MULTI_GROUP_FLAT_CHECK}


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_routes_a_block_to_pytorch_when_pytorch_wins(train, monkeypatch):
    """PyTorch "wins" on the bottleneck: it then runs the unconverted block's ops (no Triton
    launch), bitwise equal to the unconverted model in eval and to it in training (outputs,
    gradients, running statistics)."""
    plain = bottleneck()
    model = resnext.convert(copy.deepcopy(plain))
    plain.train(train), model.train(train)
    x = x_of((2, 8, 4, 4))
    timer = block_timer({("(FusedBottleneck)", "pytorch"): 0.5}, run=False)
    report = resnext.tune(model, x, timer=timer, save=False)
    assert [r.choice for r in report.rows] == ["pytorch"]
    launches = count_conv_launches(monkeypatch)
    xa, xb = x.clone().requires_grad_(train), x.clone().requires_grad_(train)
    with torch.set_grad_enabled(train):
        ya, yb = model(xa), plain(xb)
    assert not launches
    assert torch.equal(ya, yb)
    if train:
        ya.sum().backward(), yb.sum().backward()
        assert torch.equal(xa.grad, xb.grad)
        for (name, a), b in zip(model.state_dict().items(), plain.state_dict().values()):
            assert torch.equal(a, b), name
        for a, b in zip(model.parameters(), plain.parameters()):
            assert torch.equal(a.grad, b.grad)
    # another input shape is another signature: not routed (nothing was measured for it)
    with torch.no_grad():
        model(x_of((1, 8, 4, 4)))
    assert launches


def test_tuning_leaves_state_untouched():
    """Parameters, running statistics, num_batches_tracked, .grad and the RNG are as before."""
    model = resnext.convert(bottleneck()).train()
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.num_batches_tracked.fill_(7)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    grads = [p.grad.clone() for p in model.parameters()]
    grad_objects = [p.grad for p in model.parameters()]
    rng = torch.get_rng_state()
    x = x_of((2, 8, 4, 4))
    # runs the block trials (forward + backward, ours and PyTorch's), not every candidate (time)
    timer = block_timer(conv_times=lambda cfg: cfg["BLOCK_M"], run=lambda trial: trial.conv is None)
    report = resnext.tune(model, x, timer=timer, save=False)
    assert report.rows[0].mode == "forward+backward" and len(timer.calls) > 4
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    for p, g, g0 in zip(model.parameters(), grads, grad_objects):
        assert p.grad is g0 and torch.equal(p.grad, g)
    assert torch.equal(torch.get_rng_state(), rng)
    assert model.training


def test_cache_round_trips_and_is_ignored_after_a_version_change(tmp_path, monkeypatch):
    model = resnext.convert(bottleneck()).eval()
    x = x_of((2, 8, 4, 4))
    timer = block_timer({("(FusedBottleneck)", "pytorch"): 0.5}, conv_times=lambda cfg: cfg["BLOCK_M"], run=False)
    report = resnext.tune(model, x, timer=timer)
    assert report.cache == str(tmp_path / "tuning.json") and os.path.exists(report.cache)
    assert "routed to PyTorch" in str(report)
    tuned, routes = dict(_runtime.TUNED), dict(routing.ROUTES)
    assert tuned and routes
    _runtime.set_tuned({}, replace=True)
    routing.set_routes({}, replace=True)
    assert tuning.load() == "cache"
    assert _runtime.TUNED == tuned and routing.ROUTES == routes
    # another version of the package (or torch, Triton, the device): the entry is not used
    monkeypatch.setattr(tuning, "package_version", lambda: "99.0")
    with pytest.warns(RuntimeWarning, match="other versions"):
        assert tuning.load() == "none"
    assert not _runtime.TUNED and not routing.ROUTES


def test_shipped_table_when_the_user_has_none(tmp_path, monkeypatch):
    """A table in resnext/tuned/ for the device is used where the user's cache has no entry."""
    model = resnext.convert(stem()).eval()
    x = x_of()
    resnext.tune(model, x, timer=block_timer({("(FusedSequential)", "pytorch"): 0.5}, run=False),
                 path=str(tmp_path / "measured.json"))
    entry = next(iter(tuning._read(str(tmp_path / "measured.json"))["entries"].values()))
    monkeypatch.setattr(tuning, "SHIPPED_DIR", str(tmp_path / "tuned"))
    os.makedirs(tmp_path / "tuned")
    with open(tuning.shipped_table_path(tuning.environment()), "w") as f:
        import json
        json.dump(entry, f)
    assert tuning.load() == "shipped" and "pytorch" in routing.ROUTES.values()


def test_torch_compile_uses_the_tuned_choice(monkeypatch, fresh_dynamo):
    """A compiled model takes the route measured before compiling (no launch, PyTorch's
    result) and the tuned configuration where our kernels run."""
    model = resnext.convert(stem()).eval()
    x = x_of()
    resnext.tune(model, x, timer=block_timer({("(FusedSequential)", "pytorch"): 0.5}, run=False), save=False)
    launches = count_conv_launches(monkeypatch)
    compiled = torch.compile(model, backend="aot_eager")
    with torch.no_grad():
        y = compiled(x)
        assert not launches
        assert torch.equal(y, model._eager_forward(x))
    torch._dynamo.reset()
    routing.set_routes({k: "ours" for k in routing.ROUTES}, replace=True)
    with _runtime.recording_configs() as asked, torch.no_grad():
        torch.compile(model, backend="aot_eager")(x)
    assert launches and asked and all(k in _runtime.TUNED for k in asked)


def test_tune_on_first_call_measures_once_and_not_with_a_cache():
    model = resnext.convert(stem()).eval()
    x = x_of()
    timer = block_timer({("FusedSequential", "pytorch"): 0.5}, run=False)
    tuning.enable(timer=timer)
    try:
        with torch.no_grad():
            y = model(x)
            n = len(timer.calls)
            assert n >= 2 and torch.equal(y, model._eager_forward(x))  # measured, then routed
            model(x)
            assert len(timer.calls) == n  # decided: nothing timed again
            # a new process with the cache: reads it, times nothing
            routing.set_routes({}, replace=True)
            _runtime.set_tuned({}, replace=True)
            routing.mark_loaded(False)
            model(x)
            assert len(timer.calls) == n and "pytorch" in routing.ROUTES.values()
    finally:
        tuning.enable(False)


def test_bad_input():
    model = resnext.convert(stem()).eval()
    with pytest.raises(TypeError, match="nn.Module"):
        resnext.tune(lambda x: x, x_of())
    with pytest.raises(TypeError, match="example inputs"):
        resnext.tune(model)
    if DEVICE == "cpu":
        with pytest.raises(RuntimeError, match="timer"):
            resnext.tune(model, x_of())
    with pytest.raises(ValueError, match="route"):
        routing.set_routes({("sig",): "fast"})


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_worker(rank, world, port, cache, out):
    os.environ["RESNEXT_TUNE_CACHE"] = cache
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        routing.mark_loaded(True)
        model = resnext.convert(stem()).eval()
        # the ranks' timers disagree: rank 0 finds PyTorch faster, rank 1 ours
        timer = block_timer({("(FusedSequential)", "pytorch"): 0.5 if rank == 0 else 2.0},
                            conv_times=lambda cfg: cfg["BLOCK_M"] * (1 if rank == 0 else -1), run=False)
        resnext.tune(model, x_of(), timer=timer)
        tuned = sorted((str(k), sorted(v.items())) for k, v in _runtime.TUNED.items())
        routes = sorted(map(str, routing.ROUTES.items()))
        # a later process: every rank loads the cache after init_process_group (rank 0's entry,
        # broadcast); a rank reading another file still ends with rank 0's tables
        _runtime.set_tuned({}, replace=True)
        routing.set_routes({}, replace=True)
        routing.mark_loaded(False)
        tuning.load(cache if rank == 0 else os.path.join(out, "missing.json"))
        with torch.no_grad():
            model(x_of())
        loaded = (sorted((str(k), sorted(v.items())) for k, v in _runtime.TUNED.items()),
                  sorted(map(str, routing.ROUTES.items())))
        torch.save(dict(tuned=tuned, routes=routes, loaded=loaded), os.path.join(out, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_ranks_take_rank0s_choices(tmp_path):
    """Two gloo ranks whose timers disagree end with the same (rank 0's) configurations and
    routes, in the tuning process and when a later process reads the cache."""
    env = {k: os.environ.pop(k) for k in list(os.environ) if k.startswith("PYTEST_XDIST")}
    try:
        torch.multiprocessing.spawn(_rank_worker, args=(2, _free_port(), str(tmp_path / "tuning.json"), str(tmp_path)),
                                    nprocs=2, join=True)
    finally:
        os.environ.update(env)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in range(2))
    assert r0 == r1
    assert "pytorch" in " ".join(r0["routes"]) and r0["loaded"] == (r0["tuned"], r0["routes"])


def test_benchmarks_ours_tuned_skips_without_a_cache_and_headline_says_tuned():
    from benchmarks import cases, headline
    cases._TABLES.clear()
    case = cases.Case("model", "resnext50_32x4d", "train", "fp32", 2, "ours_tuned", arch="resnext50_32x4d")
    ctx = type("Ctx", (), dict(cuda=True, smoke=False, ours_runs="triton"))()
    assert "no tuning" in cases.skip_reason(case, ctx)
    cases.use_tables("ours")
    assert not _runtime.TUNED and not routing.ROUTES
    rec = dict(level="model", mode="train", batch=2, status="ok", median_ms=1.0, speed=True)
    recs = [dict(rec, arch="resnet50", provider="eager"), dict(rec, arch="resnext50_32x4d", provider="eager"),
            dict(rec, arch="resnext50_32x4d", provider="ours", median_ms=3.0),
            dict(rec, arch="resnext50_32x4d", provider="ours_tuned", median_ms=2.0)]
    rows = headline.headline_rows(recs)
    assert rows[0]["resnext_ours_ms"] == 2.0 and rows[0]["resnext_ours_status"] == "tuned"
    assert "resnext.tune chose" in headline.format_headline(rows)
    cases._TABLES.clear()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (CUDA graphs, CUDA events)")
def test_cuda_graph_capture_uses_the_tuned_choice(monkeypatch):
    """On a GPU: the default timer (CUDA events) measures a real block, and a captured graph
    (``resnext.graph_inference``) takes the measured route: routed to PyTorch, its capture
    launches none of our kernels and replays PyTorch's result; on our kernels, the capture asks
    only for tuned configurations."""
    model = resnext.convert(stem()).cuda().eval().to(memory_format=torch.channels_last)
    x = x_of((8, 8, 16, 16)).cuda().to(memory_format=torch.channels_last)
    report = resnext.tune(model, x, save=False)  # CUDA events: real times
    assert report.rows and all(r.ours_s > 0 and r.pytorch_s > 0 for r in report.rows), str(report)
    launches = count_conv_launches(monkeypatch)
    routing.set_routes({k: "ours" for k in routing.ROUTES}, replace=True)
    with _runtime.recording_configs() as asked:
        graphed = resnext.graph_inference(model, x)
    assert launches and asked and all(k in _runtime.TUNED for k in asked)
    routing.set_routes({k: "pytorch" for k in routing.ROUTES}, replace=True)
    launches.clear()
    graphed = resnext.graph_inference(model, x)
    assert not launches
    with torch.no_grad():
        torch.testing.assert_close(graphed(x), model._eager_forward(x))
