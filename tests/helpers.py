"""Shared test utilities: tolerance rules, NaN/Inf placement, non-trivial BatchNorm state."""
import torch
from torch import nn

TOL = {torch.float32: dict(atol=1e-4, rtol=1e-4), torch.float64: dict(atol=1e-9, rtol=1e-9)}


def assert_close_to_ref(ours, ref64, dtype, torch_lowp=None, atol=None):
    """fp32: absolute/relative tolerance.  fp16/bf16: ours may be off the float64 reference by
    at most twice PyTorch's own error in that dtype, plus a small atol (flash-attention's rule)."""
    ours, ref64 = ours.double(), ref64.double()
    assert not torch.isnan(ours).any(), "NaN in output (unwritten elements?)"
    if dtype in TOL:
        torch.testing.assert_close(ours, ref64, **TOL[dtype])
        return
    assert torch_lowp is not None
    err = (ours - ref64).abs().max().item()
    torch_err = (torch_lowp.double() - ref64).abs().max().item()
    atol = atol if atol is not None else 1e-2 * max(1.0, ref64.abs().max().item())
    assert err <= 2 * torch_err + atol, f"error {err:.3g} vs PyTorch's own {torch_err:.3g} (+{atol:.3g})"


def require_bf16():
    """Call first in a bf16 test: under the interpreter it fails (not skips) unless
    tests/interpreter_bf16.py gave bf16 the GPU's semantics; on a GPU it does nothing."""
    import interpreter_bf16
    interpreter_bf16.require()


def randomize_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every BatchNorm2d non-trivial running statistics and affine parameters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                if m.running_mean is not None:
                    m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.5)
                    m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                if m.weight is not None:
                    m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                    m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.5)
    return model


def assert_same_specials(ours, theirs, what="output"):
    """NaN, +Inf and -Inf in exactly the same places as PyTorch's result."""
    ours, theirs = ours.detach().double().cpu(), theirs.detach().double().cpu()
    for name, f in (("NaN", torch.isnan), ("+Inf", torch.isposinf), ("-Inf", torch.isneginf)):
        mine, ref = f(ours), f(theirs)
        assert torch.equal(mine, ref), (f"{what}: {name} in {int(mine.sum())} places, PyTorch {int(ref.sum())}; "
                                        f"first differing index {(mine != ref).nonzero()[0].tolist()}")


class TimmBottleneck(nn.Module):
    """timm.models.resnet.Bottleneck's attribute names and forward order, without timm.
    ``drop_block`` and ``aa`` may be None (older timm) or a module (``nn.Identity`` when unused)."""
    expansion = 4

    def __init__(self, inplanes, planes, stride=1, downsample=None, cardinality=4, base_width=16,
                 se=None, drop_path=None, drop_block=None, aa=None):
        super().__init__()
        width = int(planes * (base_width / 64)) * cardinality
        outplanes = planes * self.expansion
        self.conv1 = nn.Conv2d(inplanes, width, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.act1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(width, width, kernel_size=3, stride=stride, padding=1, groups=cardinality, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.drop_block = drop_block
        self.act2 = nn.ReLU(inplace=True)
        self.aa = aa
        self.conv3 = nn.Conv2d(width, outplanes, kernel_size=1, bias=False)
        self.bn3 = nn.BatchNorm2d(outplanes)
        self.se = se
        self.act3 = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.drop_path = drop_path

    def forward(self, x):
        shortcut = x
        x = self.act1(self.bn1(self.conv1(x)))
        x = self.bn2(self.conv2(x))
        if self.drop_block is not None:
            x = self.drop_block(x)
        x = self.act2(x)
        if self.aa is not None:
            x = self.aa(x)
        x = self.bn3(self.conv3(x))
        if self.se is not None:
            x = self.se(x)
        if self.drop_path is not None:
            x = self.drop_path(x)
        if self.downsample is not None:
            shortcut = self.downsample(shortcut)
        x += shortcut
        return self.act3(x)


def count_conv_launches(monkeypatch) -> list:
    """A list that gets one entry per launch of the fused convolution kernel (from now until the
    test ends)."""
    import importlib
    kernel, calls = importlib.import_module("kernels.conv_bn_act").conv_bn_act_fwd_kernel, []
    run = kernel.run
    monkeypatch.setattr(kernel, "run", lambda *a, **k: calls.append(1) or run(*a, **k))
    return calls


def kernel_path(request, monkeypatch, device):
    """The body of the ``path`` fixture of the capture tests: (path name, device) for
    ``request.param`` "pytorch" (a CPU tensor with the Triton path off) or "triton"."""
    if request.param == "pytorch":
        import kernels._runtime
        monkeypatch.setattr(kernels._runtime, "INTERPRET", False)  # use_triton() reads it per call
        return request.param, "cpu"
    return request.param, device



def once_per_run(tmp_path_factory, name: str, compute):
    """``compute()``'s result (JSON-serialisable) computed once per test run, however many
    pytest-xdist workers ask for it: the first computes it under a file lock and writes it where
    every worker's temporary directory lies, the others read it (pytest-xdist's recipe for a
    fixture that must run once).  For the offline compile runs, minutes of CPU each."""
    import json
    import os

    from filelock import FileLock
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # the run's directory, above each worker's own
    path = root / f"{name}.json"
    with FileLock(str(path) + ".lock"):
        if path.is_file():
            return json.loads(path.read_text())
        result = compute()
        path.write_text(json.dumps(result))
        return result
