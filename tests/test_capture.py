"""A converted model through the tools that capture and ship models: FX, TorchScript (script
and trace), torch.export (static and dynamic shapes, save / load), torch.compile with Inductor
and AOTInductor, on both paths:

* "triton": the kernels (a GPU; here Triton's interpreter, set by tests/conftest.py);
* "pytorch": a plain CPU tensor without the interpreter (the fused modules run PyTorch's ops).

Every captured program runs on a NEW input (another batch size where shapes are dynamic) and is
compared with the unconverted model; where a capture keeps our kernels, their launches are
counted.  docs/capture.md has the table these tests stand behind.  ONNX and the real
torchvision / timm classes: tests/test_capture_models.py (the second CI environment).
"""
import copy
import io

import pytest
import torch
from conftest import DEVICE
from helpers import count_conv_launches, kernel_path
from torch import nn

import resnext
from resnext.models import Bottleneck


TOL = 1e-4 if DEVICE == "cpu" else 1e-2  # (fp32 on a GPU: TF32 in cuDNN and in the kernels)


class TinyNet(nn.Module):
    """What convert() fuses, small: a Conv-BN-ReLU run (FusedSequential), a strided bottleneck
    with a downsample and a plain one (FusedBottleneck), then a head left to PyTorch."""

    def __init__(self):
        super().__init__()
        down = nn.Sequential(nn.Conv2d(16, 32, 1, 2, bias=False), nn.BatchNorm2d(32))
        self.body = nn.Sequential(
            nn.Conv2d(3, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU(inplace=True),
            Bottleneck(16, 8, stride=2, downsample=down, groups=4, base_width=16),
            Bottleneck(32, 8, groups=4, base_width=16))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(32, 10)

    def forward(self, x):
        return self.fc(torch.flatten(self.pool(self.body(x)), 1))


def one_block() -> nn.Module:
    """A strided bottleneck with a downsample alone (input 16 channels): Inductor compiles it
    in a fraction of TinyNet's time."""
    down = nn.Sequential(nn.Conv2d(16, 32, 1, 2, bias=False), nn.BatchNorm2d(32))
    return nn.Sequential(Bottleneck(16, 8, stride=2, downsample=down, groups=4, base_width=16))


def randomize_bn(model: nn.Module) -> nn.Module:
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.rand(m.num_features, generator=g) - 0.5)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.copy_(torch.rand(m.num_features, generator=g) - 0.5)
    return model


@pytest.fixture(params=["pytorch", "triton"])
def path(request, monkeypatch):
    """(path name, device): the PyTorch path is a CPU tensor without the interpreter."""
    return kernel_path(request, monkeypatch, DEVICE)


def twins(device, mode, make=TinyNet):
    """(unconverted model, converted copy), same tensors, in ``mode``."""
    torch.manual_seed(0)
    ref = randomize_bn(make()).to(device).train(mode == "train")
    fused = resnext.convert(copy.deepcopy(ref))
    assert sum(isinstance(m, resnext.FUSED_MODULES) for m in fused.modules()) == (3 if make is TinyNet else 1)
    return ref, fused


def assert_same_run(ours, ref, x, what):
    """Outputs on ``x`` and, in train mode, the running statistics after the call, as the
    unconverted model's (``ours``: a captured program; ``ref``: a fresh copy of the model)."""
    y_ours, y_ref = ours(x), ref(x)
    torch.testing.assert_close(y_ours, y_ref, rtol=TOL, atol=TOL, msg=lambda m: f"{what}: {m}")
    return y_ours


def assert_same_buffers(ours: dict, ref: nn.Module, what):
    for name, b in ref.named_buffers():
        torch.testing.assert_close(ours[name], b, rtol=TOL, atol=TOL, msg=lambda m: f"{what} {name}: {m}")


# --------------------------------------------------------------------------------------
# FX
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["eval", "train"])
def test_fx_symbolic_trace(path, mode, monkeypatch):
    """symbolic_trace traces through the fused modules into PyTorch's ops (a Proxy cannot go
    through a Triton launch); traced with them as leaves, the GraphModule calls them and they
    launch the kernels."""
    name, device = path
    ref, fused = twins(device, mode)
    gm = torch.fx.symbolic_trace(fused)
    assert not any(n.op == "call_module" and isinstance(gm.get_submodule(n.target), resnext.FUSED_MODULES)
                   for n in gm.graph.nodes)
    x = torch.randn(2, 3, 8, 8, device=device)
    assert_same_run(gm, copy.deepcopy(ref), x, "symbolic_trace")

    class LeafTracer(torch.fx.Tracer):  # what torchvision's leaf_modules / timm's register_notrace_module do
        def is_leaf_module(self, m, qualname):
            return isinstance(m, resnext.FUSED_MODULES) or super().is_leaf_module(m, qualname)

    leaf_gm = torch.fx.GraphModule(fused, LeafTracer().trace(fused))
    leaves = [n.target for n in leaf_gm.graph.nodes
              if n.op == "call_module" and isinstance(leaf_gm.get_submodule(n.target), resnext.FUSED_MODULES)]
    assert leaves == ["body"]  # (the FusedSequential holding both fused bottlenecks)
    calls = count_conv_launches(monkeypatch)
    assert_same_run(leaf_gm, copy.deepcopy(ref), torch.randn(3, 3, 8, 8, device=device), "leaf trace")
    assert (len(calls) > 0) == (name == "triton")


# --------------------------------------------------------------------------------------
# TorchScript
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["eval", "train"])
def test_jit_script(path, mode):
    """torch.jit.script compiles the fused modules' PyTorch forward (TorchScript cannot launch
    Triton); the scripted program survives save / load and computes the model's results,
    running statistics included."""
    _, device = path
    ref, fused = twins(device, mode)
    buf = io.BytesIO()
    torch.jit.save(torch.jit.script(fused), buf)
    buf.seek(0)
    scripted = torch.jit.load(buf, map_location=device)
    x = torch.randn(3, 3, 8, 8, device=device)
    assert_same_run(scripted, ref, x, "script")
    assert_same_buffers(dict(scripted.named_buffers()), ref, "script")


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_jit_trace(path, mode):
    """torch.jit.trace records the PyTorch ops (a launch would be baked in as a constant): the
    trace has the convolutions and gives the model's results on a new input."""
    _, device = path
    ref, fused = twins(device, mode)
    example = torch.randn(2, 3, 8, 8, device=device)
    traced = torch.jit.trace(fused, example, check_trace=False)
    graph = str(traced.inlined_graph)
    assert graph.count("aten::_convolution") == 8, graph  # every convolution is an op of the trace
    ref(example)  # (tracing ran the model once: in train mode, a step of the running statistics)
    x = torch.randn(2, 3, 8, 8, device=device)
    assert_same_run(traced, ref, x, "trace")
    assert_same_buffers(dict(traced.named_buffers()), ref, "trace")


# --------------------------------------------------------------------------------------
# torch.export
# --------------------------------------------------------------------------------------
def _exported(fused, device, shapes):
    """``fused`` exported at 2x3x8x8 with these sizes dynamic ("batch_hw": H = W even), saved, loaded."""
    batch, half = torch.export.Dim("batch", min=1, max=64), torch.export.Dim("half", min=2, max=32)
    dims = {"static": None, "batch": {0: batch}, "batch_hw": {0: batch, 2: 2 * half, 3: 2 * half}}[shapes]
    ep = torch.export.export(fused, (torch.randn(2, 3, 8, 8, device=device),), dynamic_shapes=(dims,))
    buf = io.BytesIO()
    torch.export.save(ep, buf)
    buf.seek(0)
    return torch.export.load(buf)


def _graph_ops(ep) -> str:
    return " ".join(str(n.target) for n in ep.graph.nodes if n.op == "call_function")


@pytest.mark.parametrize("mode, shapes", [("eval", "batch_hw"), ("train", "batch"), ("train", "static")])
def test_export(path, mode, shapes, monkeypatch):
    """torch.export (static, a dynamic batch, dynamic H and W), save / load, then a call at another size:
    the Triton path's graph holds our operators (their fake implementations ran on symbolic
    sizes) and they launch the kernels; the PyTorch path's graph holds aten convolutions."""
    name, device = path
    ref, fused = twins(device, mode)
    ep = _exported(fused, device, shapes)
    ops = _graph_ops(ep)
    if name == "triton":
        assert "resnext.conv_bn_act" in ops and "aten.conv" not in ops, ops
    else:
        assert "resnext" not in ops and ops.count("aten.conv2d") == 8, ops
    module = ep.module()
    calls = count_conv_launches(monkeypatch)
    x = torch.randn(*{"static": (2, 3, 8, 8), "batch": (5, 3, 8, 8), "batch_hw": (3, 3, 12, 12)}[shapes], device=device)
    assert_same_run(module, ref, x, "export")
    assert (len(calls) > 0) == (name == "triton")
    if mode == "train":  # (the buffers a call updated, under their state_dict names)
        assert_same_buffers(dict(module.named_buffers()), ref, "export")


# --------------------------------------------------------------------------------------
# torch.compile with Inductor, AOTInductor
# --------------------------------------------------------------------------------------
def skip_without_cpp_compiler():
    """Inductor generates C++ for the CPU: without a compiler it cannot run here (an honest skip)."""
    from torch._inductor import cpp_builder
    try:
        cpp_builder.get_cpp_compiler()
    except Exception as err:  # (RuntimeError: no g++/clang++ found)
        pytest.skip(f"Inductor needs a C++ compiler on the CPU: {err}")


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_compile_inductor(path, mode, monkeypatch, fresh_dynamo):
    """The default backend, fullgraph: outputs (and in train mode input gradients and running
    statistics) as the unconverted model's, at three batch sizes with two compilations (the
    second size makes the batch dynamic, the third reuses it)."""
    from torch._dynamo.testing import CompileCounterWithBackend

    skip_without_cpp_compiler()
    name, device = path
    ref, fused = twins(device, mode, one_block)
    counter = CompileCounterWithBackend("inductor")
    compiled = torch.compile(fused, fullgraph=True, backend=counter)
    calls = count_conv_launches(monkeypatch)
    for n in (2, 4, 3):
        x = torch.randn(n, 16, 8, 8, device=device)
        xs = [x.clone().requires_grad_(mode == "train") for _ in range(2)]
        y = assert_same_run(compiled, ref, xs[0], f"inductor batch {n}") if mode == "eval" else compiled(xs[0])
        if mode == "train":
            y_ref = ref(xs[1])
            torch.testing.assert_close(y, y_ref, rtol=TOL, atol=TOL)
            w = torch.randn(y.shape, device=device)
            (y * w).sum().backward()
            (y_ref * w).sum().backward()
            torch.testing.assert_close(xs[0].grad, xs[1].grad, rtol=TOL, atol=TOL)
            assert_same_buffers(dict(fused.named_buffers()), ref, f"inductor batch {n}")
    assert counter.frame_count == 2
    assert (len(calls) > 0) == (name == "triton")


def test_aot_inductor(path, tmp_path, monkeypatch):
    """aoti_compile_and_package of an exported converted model (dynamic batch) loads and runs.
    On the Triton path the package calls our operators back through the dispatcher (their
    Python implementations: the process must have imported ``kernels``)."""
    skip_without_cpp_compiler()
    name, device = path
    ref, fused = twins(device, "eval", one_block)
    batch = torch.export.Dim("batch", min=1, max=64)
    ep = torch.export.export(fused, (torch.randn(2, 16, 8, 8, device=device),), dynamic_shapes=({0: batch},))
    package = torch._inductor.aoti_compile_and_package(ep, package_path=str(tmp_path / "model.pt2"))
    loaded = torch._inductor.aoti_load_package(package)
    calls = count_conv_launches(monkeypatch)
    assert_same_run(loaded, ref, torch.randn(3, 16, 8, 8, device=device), "aot_inductor")
    assert (len(calls) > 0) == (name == "triton")
