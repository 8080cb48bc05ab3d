"""The safe fallback: a kernel that cannot compile or launch on the device (Triton's
CompilationError, OutOfResources, an MLIR pass failure) makes its op take the PyTorch path
for that shape, dtype and device from then on: results stay right, one warning names the op,
the device, the Triton version and the error's first line, and no later call tries again.

Failures are injected on the CPU interpreter path by replacing a kernel's launch."""
import sys
import warnings

import pytest
import torch
import triton
from torch import nn
from triton.compiler.errors import CompilationError
from triton.runtime.errors import OutOfResources

from conftest import DEVICE
from kernels import _runtime

cba = sys.modules.get("kernels.conv_bn_act") or __import__("kernels.conv_bn_act", fromlist=["x"])
cg = __import__("kernels.conv_grad", fromlist=["x"])

pytestmark = pytest.mark.skipif(not _runtime.use_triton(torch.empty(0, device=DEVICE)),
                                reason="needs the Triton path: a GPU or TRITON_INTERPRET=1")

FAILURES = {
    "compilation_error": (lambda: CompilationError("def k():\n    pass", None, "unsupported layout on this target"),
                          "CompilationError: unsupported layout on this target"),
    "out_of_resources": (lambda: OutOfResources(118784, 101376, "shared memory"),
                         "OutOfResources: out of resource: shared memory, Required: 118784"),
    "mlir_pass_failure": (lambda: RuntimeError("PassManager::run failed"), "RuntimeError: PassManager::run failed"),
}


class FailingLaunch:
    """Stands in for ``kernel``: ``kernel[grid](...)`` counts launches and raises ``make_error()``;
    anything else (``arg_names``, ...) is the real kernel's."""

    def __init__(self, kernel, make_error):
        self.kernel, self.make_error, self.calls = kernel, make_error, 0

    def __getattr__(self, name):
        return getattr(self.kernel, name)

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.calls += 1
            raise self.make_error()
        return launch


@pytest.fixture(autouse=True)
def no_failures(monkeypatch):
    """Each test starts with no recorded failure (and leaves none behind)."""
    monkeypatch.setattr(_runtime, "FAILED", {})


def _fallback_warnings(record):
    return [w for w in record
            if issubclass(w.category, RuntimeWarning) and "cannot compile or launch" in str(w.message)]


@pytest.mark.parametrize("failure", sorted(FAILURES))
def test_forward_falls_back_once_per_shape(failure, monkeypatch):
    make_error, first_line = FAILURES[failure]
    kernel = FailingLaunch(cba.conv_bn_act_fwd_kernel, make_error)
    monkeypatch.setattr(cba, "conv_bn_act_fwd_kernel", kernel)
    x = torch.randn(2, 16, 5, 6, device=DEVICE).contiguous(memory_format=torch.channels_last)
    w = torch.randn(16, 4, 3, 3, device=DEVICE) / 6
    ref = nn.functional.conv2d(x, w, padding=1, groups=4)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        y1, _, _ = cba.conv3x3_bn_act(x, w, 1, 4)
        y2, _, _ = cba.conv3x3_bn_act(x, w, 1, 4)
    torch.testing.assert_close(y1, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(y2, ref, atol=1e-5, rtol=1e-5)
    assert kernel.calls == 1, "a later call tried the failed kernel again"
    (w0,) = _fallback_warnings(record)
    message = str(w0.message)
    assert "kernels.conv_bn_act" in message and str(x.device) in message
    assert f"Triton {triton.__version__}" in message and first_line in message, message
    # another shape is another key: it tries (and here fails, and warns) once more
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        cba.conv3x3_bn_act(x[:1], w, 1, 4)
    assert kernel.calls == 2 and len(_fallback_warnings(record)) == 1


def test_training_fallback_updates_running_statistics_once(monkeypatch):
    """The failed launch wrote nothing (a compile or launch failure comes before the kernel
    runs): the PyTorch path updates BatchNorm's running statistics exactly once."""
    from resnext.modules import ConvBNAct
    kernel = FailingLaunch(cba.conv_bn_act_fwd_kernel, FAILURES["out_of_resources"][0])
    monkeypatch.setattr(cba, "conv_bn_act_fwd_kernel", kernel)
    torch.manual_seed(3)
    fused = ConvBNAct(8, 16, 3, groups=2).to(DEVICE).train()
    eager = nn.Sequential(nn.Conv2d(8, 16, 3, padding=1, groups=2, bias=False), nn.BatchNorm2d(16), nn.ReLU())
    eager = eager.to(DEVICE).train()
    eager[0].load_state_dict(fused.conv.state_dict())
    eager[1].load_state_dict(fused.bn.state_dict())
    x = torch.randn(2, 8, 5, 5, device=DEVICE).contiguous(memory_format=torch.channels_last)
    with pytest.warns(RuntimeWarning, match="cannot compile or launch"):
        y = fused(x)
    torch.testing.assert_close(y, eager(x), atol=1e-4, rtol=1e-4)
    assert kernel.calls == 1
    torch.testing.assert_close(fused.bn.running_mean, eager[1].running_mean, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(fused.bn.running_var, eager[1].running_var, atol=1e-6, rtol=1e-5)
    assert fused.bn.num_batches_tracked.item() == eager[1].num_batches_tracked.item() == 1


@pytest.mark.parametrize("failure", sorted(FAILURES))
def test_backward_falls_back(failure, monkeypatch):
    """The merged gradient kernel fails: conv_grads takes its separate paths (each its own
    kernel, or its own fallback); the gradients stay right, one warning, no second try."""
    kernel = FailingLaunch(cg.conv_grads_kernel, FAILURES[failure][0])
    monkeypatch.setattr(cg, "conv_grads_kernel", kernel)
    x = torch.randn(2, 16, 5, 6, device=DEVICE).contiguous(memory_format=torch.channels_last)
    w = torch.randn(16, 4, 3, 3, device=DEVICE) / 6
    dz = torch.randn(2, 16, 5, 6, device=DEVICE).contiguous(memory_format=torch.channels_last)
    dx_ref = torch.nn.grad.conv2d_input(x.shape, w, dz, padding=1, groups=4)
    dw_ref = torch.nn.grad.conv2d_weight(x, w.shape, dz, padding=1, groups=4)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        for _ in range(2):
            dx, dw = cg.conv_grads(dz, x, w, 1, 1, 4)
            torch.testing.assert_close(dx, dx_ref, atol=1e-4, rtol=1e-4)
            torch.testing.assert_close(dw, dw_ref, atol=1e-4, rtol=1e-4)
    assert kernel.calls == 1
    assert len(_fallback_warnings(record)) == 1 and "kernels.conv_grads" in str(record[0].message)


def test_separate_gradient_kernels_fall_back_too(monkeypatch):
    failing = {name: FailingLaunch(getattr(cg, name), FAILURES["compilation_error"][0])
               for name in ("conv_dgrad_kernel", "conv_wgrad_kernel")}
    for name, kernel in failing.items():
        monkeypatch.setattr(cg, name, kernel)
    x = torch.randn(2, 8, 4, 4, device=DEVICE)
    w = torch.randn(8, 2, 3, 3, device=DEVICE) / 4
    dz = torch.randn(2, 8, 2, 2, device=DEVICE)
    with pytest.warns(RuntimeWarning) as record:
        dx = cg.conv_dgrad(dz, w, (4, 4), 2, 1, 4)
        dw = cg.conv_wgrad(dz, x, w.shape, 2, 1, 4)
    torch.testing.assert_close(dx, torch.nn.grad.conv2d_input(x.shape, w, dz, stride=2, padding=1, groups=4),
                               atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(dw, torch.nn.grad.conv2d_weight(x, w.shape, dz, stride=2, padding=1, groups=4),
                               atol=1e-4, rtol=1e-4)
    assert [k.calls for k in failing.values()] == [1, 1]
    assert len(_fallback_warnings(record)) == 2


def test_other_errors_are_not_swallowed(monkeypatch):
    """A bug (here a TypeError from the launch) is raised, not hidden behind the fallback."""
    monkeypatch.setattr(cba, "conv_bn_act_fwd_kernel",
                        FailingLaunch(cba.conv_bn_act_fwd_kernel, lambda: TypeError("bad argument")))
    x = torch.randn(1, 8, 4, 4, device=DEVICE)
    with pytest.raises(TypeError, match="bad argument"):
        cba.conv3x3_bn_act(x, torch.randn(8, 2, 3, 3, device=DEVICE), 1, 4)
    assert not _runtime.FAILED


@pytest.mark.parametrize("failure", sorted(FAILURES))
def test_is_launch_failure(failure):
    assert _runtime.is_launch_failure(FAILURES[failure][0]())
    assert not _runtime.is_launch_failure(RuntimeError("CUDA error: an illegal memory access was encountered"))
    assert not _runtime.is_launch_failure(ValueError("x"))
