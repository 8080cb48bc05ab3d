"""pytest glue for the benchmarks: ``pytest benchmarks [--benchmark]``.

* ``--benchmark`` turns on the full-size runs (on a CUDA GPU: the issue's grid, plus the
  launch-economy report; without CUDA: only the CPU report of ``benchmarks.report``, as
  kernel times need a GPU).  Without it every benchmark runs once at tiny size: a smoke test of the
  harness, which CI runs.  pytest-benchmark's own options (``--benchmark-json``,
  ``--benchmark-save``, ``--benchmark-compare``, ``--benchmark-disable`` ...) keep working:
  every case also goes through its ``benchmark`` fixture.
* The cases come from ``benchmarks.cases`` (each test module names its ``LEVEL``).
* One results JSON + Markdown per run, written at the end of the session; the headline
  table is printed in the terminal summary.
"""
import pytest
import torch

from benchmarks import cases, headline, results, tables
from benchmarks import config as bconfig
from benchmarks.ceilings import measure_ceilings


def pytest_addoption(parser):
    group = parser.getgroup("resnext benchmarks")
    group.addoption("--benchmark", action="store_true", default=False,
                    help="run the full-size benchmarks (default: every benchmark once at tiny size)")
    group.addoption("--bench-providers", default=None, metavar="LIST",
                    help=f"comma-separated providers to run (default: all of {','.join(bconfig.PROVIDERS)})")
    group.addoption("--bench-results-dir", default=None, metavar="DIR",
                    help="where the results JSON/Markdown go (default: benchmarks/results/, "
                         "benchmarks/results/smoke/ for runs without --benchmark)")


class _State:
    """What one pytest session shares: the context, the chosen providers, the collector."""

    def __init__(self, ctx, providers, out_dir):
        self.ctx, self.providers, self.out_dir = ctx, providers, out_dir
        self.collector = results.Collector(ctx, out_dir=out_dir, checkpoint_s=30.0)
        self.paths = None
        self.write_error = None
        self.threads = None  # smoke runs on the CPU use one thread (config.smoke_threads)


def _opt(config, name, default=None):
    try:
        return config.getoption(name)
    except ValueError:  # this conftest was not an initial one: its options were never added
        return default


def pytest_configure(config):
    if hasattr(config, "_resnext_bench"):
        return
    ctx = bconfig.make_context(full=bool(_opt(config, "--benchmark", False)))
    ctx.report_only = not ctx.cuda and not ctx.smoke  # --benchmark without CUDA: the CPU report
    if ctx.cuda:
        torch.backends.cudnn.benchmark = True  # eager gets its best cuDNN algorithms
    chosen = _opt(config, "--bench-providers")
    providers = tuple(p.strip() for p in chosen.split(",") if p.strip()) if chosen else bconfig.PROVIDERS
    unknown = sorted(set(providers) - set(bconfig.PROVIDERS))
    if unknown:
        raise pytest.UsageError(f"unknown provider(s) {unknown}; choose from {list(bconfig.PROVIDERS)}")
    config._resnext_bench = _State(ctx, providers, _opt(config, "--bench-results-dir"))
    config._resnext_bench.threads = bconfig.smoke_threads(ctx)
    config._resnext_bench.threads.__enter__()


def pytest_unconfigure(config):
    state = getattr(config, "_resnext_bench", None)
    if state is not None and getattr(state, "threads", None) is not None:
        state.threads.__exit__(None, None, None)
        state.threads = None


def pytest_generate_tests(metafunc):
    if "case" not in metafunc.fixturenames:
        return
    state = metafunc.config._resnext_bench
    level = metafunc.module.LEVEL
    level_cases = cases.cases_for(level, state.ctx, state.providers)
    if not level_cases:  # one visible skip with the reason, rather than pytest's "empty parameter set"
        reason = cases.empty_level_reason(level, state.ctx)
        metafunc.parametrize("case", [pytest.param(None, marks=pytest.mark.skip(reason=reason))], ids=[f"{level}/none"])
        return
    metafunc.parametrize("case", level_cases, ids=[c.id for c in level_cases])


@pytest.fixture(scope="session")
def bench_ctx(request):
    """The run's context, with the ceilings measured once (on first use)."""
    ctx = request.config._resnext_bench.ctx
    if ctx.ceilings is None:
        ctx.ceilings = measure_ceilings(ctx.device, smoke=ctx.smoke)
    return ctx


def _keep(state, record, benchmark=None):
    """Add ``record`` to the run's results; skip or fail the test as its status says."""
    err = record.pop("_exception", None)
    state.collector.add(record)
    if benchmark is not None:
        benchmark.extra_info.update({k: record.get(k) for k in (
            "median_ms", "runs", "speed", "flops", "min_bytes", "gbps", "tflops", "roofline_fraction",
            "peak_mem_bytes", "rotation", "timing") if k in record})
    if record["status"] == "skipped":
        pytest.skip(record["reason"])
    if record["status"] == "oom":
        pytest.skip(f"out of memory (recorded in the results): {record['reason']}")
    if err is not None:
        raise err
    return record


@pytest.fixture
def run_bench(request, benchmark, bench_ctx):
    """``run_bench(case)``: time ``case`` (also through pytest-benchmark) and record it."""
    state = request.config._resnext_bench

    def run(case):
        torch.manual_seed(0)
        return _keep(state, cases.run_case(case, bench_ctx, benchmark), benchmark)

    return run


@pytest.fixture
def run_report(request):
    """``run_report(case)``: measure a report case (counts, bytes, host time: not through
    pytest-benchmark, which times one callable) and record it."""
    state = request.config._resnext_bench

    def run(case):
        torch.manual_seed(0)
        return _keep(state, cases.run_case(case, state.ctx))

    return run


def pytest_sessionfinish(session, exitstatus):
    state = getattr(session.config, "_resnext_bench", None)
    if state is None or not state.collector.records:
        return
    try:
        state.paths = state.collector.finish()
    except Exception as err:  # noqa: BLE001  (reported in the summary; never hides test results)
        state.write_error = f"{type(err).__name__}: {err}"


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    state = getattr(config, "_resnext_bench", None)
    if state is None or not state.collector.records:
        return
    tr = terminalreporter
    tr.section("ResNeXt benchmarks")
    rows = headline.headline_rows(state.collector.records)
    if rows or not state.ctx.report_only:
        tr.write_line(headline.format_headline(rows, bconfig.header_lines(state.ctx)))
    else:
        tr.write_line("\n".join(bconfig.header_lines(state.ctx)))
        tr.write_line("Headline table (ResNeXt vs ResNet time per batch): needs a CUDA GPU.")
    text = tables.format_report(state.collector.records, state.ctx.cuda)
    if text:
        tr.write_line("")
        tr.write_line(text)
    if state.paths:
        tr.write_line(f"results: {state.paths['json']}")
        tr.write_line(f"summary: {state.paths['md']}")
    if state.write_error:
        tr.write_line(f"could not write the results file: {state.write_error}", red=True)
