"""Test set-up: Triton's CPU interpreter when there is no GPU, NaN-poisoned outputs, seeds.

TRITON_INTERPRET must be set before triton (or any module defining kernels) is imported,
so it is set here, at collection time, when CUDA is unavailable.  Under the interpreter,
``interpreter_bf16.install()`` then gives bfloat16 the GPU's semantics (the stock interpreter
holds bf16 as raw uint16 bits: see tests/interpreter_bf16.py); its status is printed in the
report header, and the bf16 tests fail through ``interpreter_bf16.require()`` if it is off.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

if os.environ.get("TRITON_INTERPRET", "0") == "1":
    import sys  # noqa: E402

    if os.path.dirname(__file__) not in sys.path:
        sys.path.insert(0, os.path.dirname(__file__))
    import interpreter_bf16  # noqa: E402

    interpreter_bf16.install()  # before any kernel module is imported

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def pytest_report_header(config):
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        import interpreter_bf16
        ok, message = interpreter_bf16.status()
        return f"bf16 in Triton's interpreter: {'on' if ok else 'OFF'}: {message}"


def pytest_configure(config):
    config.addinivalue_line("markers", "no_poison: do not NaN-fill torch.empty in this test")


# Tests that take a minute or more of a worker under the interpreter (or in subprocesses), started
# first: one of them left for the end would keep one worker busy while the other idles.
LONG_TESTS = ("test_every_variant_compiles", "test_target_compiles_fits_and_barely_spills",  # (compile runs)
              "test_training_run_matches_eager", "test_example_runs_under_torchrun", "test_cpu_path_end_to_end",
              "test_python_m_benchmarks_tiny", "test_ddp_matches_unconverted_twin", "test_compile_inductor",
              "test_nan_inf_stay_in_their_group", "test_conv_bn_act_matches_float64_reference")


def pytest_collection_modifyitems(config, items):
    items.sort(key=lambda item: getattr(item, "originalname", item.name) not in LONG_TESTS)  # (a stable sort)


@pytest.fixture(autouse=True)
def poison_empty(monkeypatch, request):
    """Every torch.empty/empty_like (and launch scratch) in the code under test comes back filled
    with NaN, so an element a kernel forgets to write fails the comparison instead of passing by luck."""
    if request.node.get_closest_marker("no_poison"):
        yield
        return
    real_empty, real_empty_like = torch.empty, torch.empty_like

    def nan_fill(t):
        if t.is_floating_point() and t.numel():
            with torch.no_grad():  # a leaf made with requires_grad=True (Inductor's pattern set-up makes some)
                t.fill_(float("nan"))
        return t

    monkeypatch.setattr(torch, "empty", lambda *a, **k: nan_fill(real_empty(*a, **k)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: nan_fill(real_empty_like(*a, **k)))
    # a launch's kept scratch (partials) would hold the previous launch's values: fresh NaN instead
    from kernels import _runtime
    monkeypatch.setattr(_runtime, "scratch",
                        lambda device, n, slot=0: nan_fill(real_empty(n, device=device, dtype=torch.float32)))
    yield


@pytest.fixture
def fresh_dynamo():
    """torch.compile tests start and end with an empty Dynamo cache."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()
