"""Converted torchvision and timm models through the capture tools (the second CI environment:
torchvision, timm, onnx, onnxscript, onnxruntime): FX feature extraction with the fused modules
as leaves (torchvision's ``leaf_modules``, timm's no-trace registry), TorchScript, torch.export
with a dynamic batch through the SE / RegNetY operators, and ONNX (dynamo) + onnxruntime, on
both paths ("triton": the kernels, here in the interpreter; "pytorch": a plain CPU tensor
without it).  Each captured program runs on a new input against the unconverted model.
tests/test_capture.py covers the rest of the table on the project's own model.
"""
import copy

import pytest
import torch
from conftest import DEVICE
from helpers import count_conv_launches, kernel_path
from torch import nn

torchvision = pytest.importorskip("torchvision")
timm = pytest.importorskip("timm")

from timm.layers import create_feature_extractor as timm_feature_extractor  # noqa: E402
from timm.models import regnet as timm_regnet  # noqa: E402
from torchvision.models import resnet as tv_resnet  # noqa: E402
from torchvision.models.feature_extraction import create_feature_extractor  # noqa: E402

import resnext  # noqa: E402

TOL = 1e-4 if DEVICE == "cpu" else 1e-2


def randomize_norms(model: nn.Module) -> nn.Module:
    """Non-trivial BN statistics and affine parameters (timm zero-initialises the last BN of a block)."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                c = m.num_features
                m.running_mean.copy_(torch.randn(c, generator=g) * 0.5)
                m.running_var.copy_(torch.rand(c, generator=g) + 0.5)
                m.weight.copy_(torch.rand(c, generator=g) + 0.5)
                m.bias.copy_(torch.randn(c, generator=g) * 0.3)
    return model


class TorchvisionTiny(nn.Module):
    """torchvision's Bottleneck in a ResNeXt-shaped trunk: a Conv-BN-ReLU stem, a grouped block
    with a projection shortcut, a strided one (layer names as torchvision's ResNet)."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU(inplace=True))
        self.layer1 = nn.Sequential(tv_resnet.Bottleneck(
            16, 8, downsample=nn.Sequential(nn.Conv2d(16, 32, 1, bias=False), nn.BatchNorm2d(32)),
            groups=4, base_width=32))
        self.layer2 = nn.Sequential(tv_resnet.Bottleneck(
            32, 8, 2, nn.Sequential(nn.Conv2d(32, 32, 1, 2, bias=False), nn.BatchNorm2d(32)), groups=4, base_width=32))
        self.fc = nn.Linear(32, 5)

    def forward(self, x):
        return self.fc(self.layer2(self.layer1(self.stem(x))).mean((2, 3)))


def timm_seresnext():
    return timm.create_model("seresnext50_32x4d", layers=(1, 1, 1, 1), channels=(8, 8, 16, 16), cardinality=4,
                             base_width=32, stem_width=8, num_classes=5)


def timm_regnety():
    cfg = timm_regnet.RegNetCfg(depth=4, w0=8, wa=12.0, wm=1.5, group_size=4, stem_width=8, se_ratio=0.25)
    return timm_regnet.RegNet(cfg, num_classes=5)


MODELS = {"torchvision": TorchvisionTiny, "timm_seresnext": timm_seresnext, "timm_regnety": timm_regnety}


@pytest.fixture(params=["pytorch", "triton"])
def path(request, monkeypatch):
    """(path name, device): the PyTorch path is a CPU tensor without the interpreter."""
    return kernel_path(request, monkeypatch, DEVICE)


def twins(name, device, mode):
    torch.manual_seed(0)
    ref = randomize_norms(MODELS[name]()).to(device).train(mode == "train")
    fused = resnext.convert(copy.deepcopy(ref))
    assert any(isinstance(m, (resnext.FusedBottleneck, resnext.FusedRegNetBottleneck)) for m in fused.modules())
    return ref, fused


def close(ours, ref, what):
    torch.testing.assert_close(ours, ref, rtol=TOL, atol=TOL, msg=lambda m: f"{what}: {m}")


def fused_leaves(gm):
    return [n.target for n in gm.graph.nodes
            if n.op == "call_module" and isinstance(gm.get_submodule(n.target), resnext.FUSED_MODULES)]


# --------------------------------------------------------------------------------------
# FX feature extraction
# --------------------------------------------------------------------------------------
def test_torchvision_feature_extractor(path, monkeypatch):
    """torchvision's create_feature_extractor with the fused modules as leaf_modules: they stay
    whole (call_module nodes), the features equal the unconverted model's, and on the Triton
    path the extracted backbone launches the kernels."""
    name, device = path
    ref, fused = twins("torchvision", device, "eval")
    nodes = {"layer1": "c1", "layer2": "c2"}
    ours = create_feature_extractor(fused, nodes, tracer_kwargs={"leaf_modules": list(resnext.FUSED_MODULES)})
    theirs = create_feature_extractor(ref, nodes)
    assert fused_leaves(ours) == ["stem", "layer1.0", "layer2.0"]
    calls = count_conv_launches(monkeypatch)
    x = torch.randn(2, 3, 8, 8, device=device)
    got, want = ours(x), theirs(x)
    assert list(got) == ["c1", "c2"]
    for key in want:
        close(got[key], want[key], key)
    assert (len(calls) > 0) == (name == "triton")
    plain = create_feature_extractor(fused, nodes)  # without leaves: traced through, PyTorch's ops
    assert fused_leaves(plain) == []
    close(plain(x)["c2"], want["c2"], "traced through")


def test_timm_fx_features(path, monkeypatch):
    """timm's FX feature extraction: convert() registered the fused classes as no-trace modules,
    so timm keeps them whole; features as the unconverted model's; the kernels run."""
    name, device = path
    ref, fused = twins("timm_seresnext", device, "eval")
    nodes = ["layer1", "layer4"]
    ours, theirs = timm_feature_extractor(fused, nodes), timm_feature_extractor(ref, nodes)
    assert "layer1.0" in fused_leaves(ours) and "layer4.0" in fused_leaves(ours)
    calls = count_conv_launches(monkeypatch)
    x = torch.randn(2, 3, 32, 32, device=device)
    got, want = ours(x), theirs(x)
    for key in want:
        close(got[key], want[key], key)
    assert (len(calls) > 0) == (name == "triton")


# --------------------------------------------------------------------------------------
# TorchScript, torch.export
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("model", sorted(MODELS))
def test_jit_script_and_trace(model, path):
    """timm's own TorchScript checks on converted models: script and trace, train mode (running
    statistics too), on a new input."""
    _, device = path
    ref, fused = twins(model, device, "train")
    size = 8 if model == "torchvision" else 32
    example = torch.randn(2, 3, size, size, device=device)
    scripted = torch.jit.script(copy.deepcopy(fused))
    traced = torch.jit.trace(copy.deepcopy(fused), example, check_trace=False)
    trace_ref = copy.deepcopy(ref)
    trace_ref(example)  # (tracing ran the model once)
    x = torch.randn(3, 3, size, size, device=device)
    close(scripted(x), ref(x), "script")
    close(traced(x), trace_ref(x), "trace")
    for (key, a), (_, b) in zip(scripted.named_buffers(), ref.named_buffers()):
        close(a, b, f"script {key}")


@pytest.mark.parametrize("model", ["timm_seresnext", "timm_regnety"])
@pytest.mark.parametrize("mode", ["eval", "train"])
def test_export_dynamic_batch(model, mode, path, monkeypatch):
    """torch.export with a dynamic batch through the SE operators (squeeze in conv3's epilogue,
    RegNetY's gate in conv3's prologue): our operators in the graph on the Triton path; a new
    batch size gives the unconverted model's outputs and running statistics."""
    name, device = path
    ref, fused = twins(model, device, mode)
    batch = torch.export.Dim("batch", min=2, max=64)
    ep = torch.export.export(fused, (torch.randn(2, 3, 32, 32, device=device),), dynamic_shapes=({0: batch},))
    ops = " ".join(str(n.target) for n in ep.graph.nodes if n.op == "call_function")
    assert ("resnext." in ops) == (name == "triton"), ops
    calls = count_conv_launches(monkeypatch)
    module = ep.module()
    x = torch.randn(3, 3, 32, 32, device=device)
    close(module(x), ref(x), "export")
    assert (len(calls) > 0) == (name == "triton")
    if mode == "train":
        got = dict(module.named_buffers())
        for key, b in ref.named_buffers():
            close(got[key], b, key)


# --------------------------------------------------------------------------------------
# ONNX
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("model", ["torchvision", "timm_regnety"])
def test_onnx_dynamo_export(model, path, tmp_path):
    """torch.onnx.export(..., dynamo=True) records the fused modules' PyTorch ops (no ONNX
    operator runs our kernels): standard ONNX ops only, and onnxruntime gives the model's
    outputs on a new input of another batch size."""
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    _, device = path
    ref, fused = twins(model, device, "eval")
    size = 8 if model == "torchvision" else 32
    batch = torch.export.Dim("batch", min=1, max=64)
    program = torch.onnx.export(fused.cpu(), (torch.randn(2, 3, size, size),), dynamo=True,
                                dynamic_shapes=({0: batch},), verbose=False)
    file = str(tmp_path / "model.onnx")
    program.save(file)
    graph = onnx.load(file).graph
    domains = {node.domain for node in graph.node}
    assert domains <= {"", "ai.onnx"}, domains
    assert sum(node.op_type == "Conv" for node in graph.node) > 0
    session = ort.InferenceSession(file, providers=["CPUExecutionProvider"])
    x = torch.randn(3, 3, size, size)
    got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    close(torch.from_numpy(got), ref.cpu()(x), "onnxruntime")


def test_onnx_of_a_triton_exported_program_names_our_operator():
    """An ExportedProgram taken on the Triton path holds our operators: the ONNX exporter
    cannot translate them and says which (docs/capture.md: export the module instead)."""
    pytest.importorskip("onnxscript")
    _, fused = twins("torchvision", DEVICE, "eval")
    ep = torch.export.export(fused, (torch.randn(2, 3, 8, 8, device=DEVICE),))
    with pytest.raises(torch.onnx.errors.OnnxExporterError, match="resnext.conv_bn_act"):  # (a ConversionError)
        torch.onnx.export(ep, dynamo=True, verbose=False)
