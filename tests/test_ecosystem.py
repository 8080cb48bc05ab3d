"""The fused modules inside the PyTorch ecosystem: torch.compile, no host syncs, DDP,
half/bfloat16/autocast, memory layouts, SyncBatchNorm, timm-style blocks, state_dict and
optimizers.  Every check compares with the unconverted eager model (or a float64 copy).

On a machine without a GPU the Triton kernels run in the interpreter (tests/conftest.py
sets TRITON_INTERPRET=1); shapes are tiny so the file stays within a few minutes.
"""
import os

import torch

if not torch.cuda.is_available():  # as tests/conftest.py; repeated for spawned DDP workers
    os.environ.setdefault("TRITON_INTERPRET", "1")

import copy  # noqa: E402
import socket  # noqa: E402
import sys  # noqa: E402

import pytest  # noqa: E402
from torch import nn  # noqa: E402

import kernels  # noqa: E402
import kernels._runtime  # noqa: E402
import resnext  # noqa: E402
from resnext.models import Bottleneck as TorchvisionBottleneck  # noqa: E402
from helpers import TimmBottleneck, require_bf16  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
# fp32 on a GPU: both PyTorch (cuDNN) and the kernels may use TF32 (torch.backends.cudnn.allow_tf32)
FP32_TOL = 1e-4 if DEVICE == "cpu" else 1e-2


# --------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------
def randomize_bn(model: nn.Module, seed: int = 1) -> nn.Module:
    """Non-trivial BN running statistics and affine parameters (not 0/1)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                n = m.num_features
                m.running_mean.copy_(torch.rand(n, generator=g) - 0.5)
                m.running_var.copy_(torch.rand(n, generator=g) * 1.5 + 0.5)
                m.weight.copy_(torch.rand(n, generator=g) + 0.5)
                m.bias.copy_(torch.rand(n, generator=g) - 0.5)
    return model


def tiny_resnext() -> nn.Module:
    """A 4-stage ResNeXt (groups=4, 4 channels per group); ~2 s per forward in the interpreter."""
    return randomize_bn(resnext.ResNet([1, 1, 1, 1], num_classes=10, groups=4, width_per_group=4,
                                       base_channels=16))


class TinyNet(nn.Module):
    """Every BatchNorm here is fused by convert() (unlike ResNet's stem, which is not in a
    Sequential): a Conv-BN-ReLU run, a strided bottleneck with a downsample, a plain one,
    then a classifier head.  On 8x8 inputs the last BN sees 2x4x4 values per channel, so
    train-mode gradients are well conditioned (ResNet's layer4 sees 2 values at 32x32)."""

    def __init__(self, num_classes=10):
        super().__init__()
        down = nn.Sequential(nn.Conv2d(16, 32, 1, 2, bias=False), nn.BatchNorm2d(32))
        self.body = nn.Sequential(
            nn.Conv2d(3, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU(inplace=True),
            TorchvisionBottleneck(16, 8, stride=2, downsample=down, groups=4, base_width=16),
            TorchvisionBottleneck(32, 8, groups=4, base_width=16),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(32, num_classes)

    def forward(self, x):
        return self.fc(torch.flatten(self.pool(self.body(x)), 1))


def tiny_net() -> nn.Module:
    return randomize_bn(TinyNet())


def twins(make, device=DEVICE):
    """(eager reference, converted copy) with identical parameters and buffers."""
    ref = make().to(device)
    fused = resnext.convert(copy.deepcopy(ref))
    return ref, fused


def assert_close(ours, ref, tol=FP32_TOL, what=""):
    """|ours - ref| <= tol * (|ref| + max|ref|): relative to the tensor's scale."""
    ours, ref = ours.detach().double().cpu(), ref.detach().double().cpu()
    assert ours.shape == ref.shape, f"{what}: shape {tuple(ours.shape)} vs {tuple(ref.shape)}"
    scale = ref.abs().max().item() if ref.numel() else 0.0
    err = (ours - ref).abs()
    bound = tol * (ref.abs() + scale + 1e-6)
    bad = ~(err <= bound)
    assert not bad.any(), (f"{what}: {int(bad.sum())} of {bad.numel()} elements off, max error "
                           f"{err.max().item():.3g} (scale {scale:.3g})")


def assert_lowp_close(ours, torch_lowp, ref64, atol, what=""):
    """flash-attention's rule: |ours - ref64| <= 2 |torch_lowp - ref64| + atol, elementwise."""
    ours, torch_lowp, ref64 = (t.detach().double().cpu() for t in (ours, torch_lowp, ref64))
    err = (ours - ref64).abs()
    bound = 2 * (torch_lowp - ref64).abs() + atol
    bad = ~(err <= bound)
    assert not bad.any(), (f"{what}: {int(bad.sum())} of {bad.numel()} elements off; max error "
                           f"{err.max().item():.3g}, PyTorch's own max error "
                           f"{(torch_lowp - ref64).abs().max().item():.3g}")


def assert_same_buffers(fused, ref, tol=FP32_TOL):
    for (name, b), (_, c) in zip(fused.named_buffers(), ref.named_buffers()):
        if b.is_floating_point():
            assert_close(b, c, tol, what=name)
        else:
            assert torch.equal(b, c), name


def train_step_matches_eager(ours, ref, x, call=None, tol=FP32_TOL, seed=5, view=None):
    """One forward + backward of ``ours`` (through ``call``, e.g. its compiled version) and of
    the eager ``ref`` on ``x``.  Outputs, the input's and the parameters' gradients and the
    running statistics must be as close to a float64 copy of ``ref`` as eager fp32 is:
    ``|ours - ref64| <= 2 |eager - ref64| + tol * max|ref64|`` (train-mode BN on a tiny
    batch amplifies rounding, so a fixed tolerance against eager fp32 would be arbitrary).
    ``view`` (optional) maps the leaf tensors to the actual inputs (a strided view of them)."""
    view = view or (lambda t: t)
    ref64 = copy.deepcopy(ref).double()
    x_ours, x_ref, x64 = x.clone().requires_grad_(), x.clone().requires_grad_(), x.double().requires_grad_()
    y, y_ref, y64 = (ours if call is None else call)(view(x_ours)), ref(view(x_ref)), ref64(view(x64))
    w = torch.randn(y64.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(x.device)
    (y * w.to(y.dtype)).sum().backward()
    (y_ref * w.to(y_ref.dtype)).sum().backward()
    (y64 * w).sum().backward()

    def check(a, b, c, what):
        assert_lowp_close(a, b, c, tol * c.abs().max().item() + 1e-12, what=what)

    check(y, y_ref, y64, "output")
    check(x_ours.grad, x_ref.grad, x64.grad, "input grad")
    for (name, p), (_, q), (_, r) in zip(ours.named_parameters(), ref.named_parameters(), ref64.named_parameters()):
        assert (p.grad is None) == (q.grad is None), name
        if q.grad is not None:
            check(p.grad, q.grad, r.grad, f"grad of {name}")
    for (name, a), (_, b), (_, c) in zip(ours.named_buffers(), ref.named_buffers(), ref64.named_buffers()):
        if a.is_floating_point():
            check(a, b, c, name)
        else:
            assert torch.equal(a, b), name
    return y


def count_fused(model):
    return sum(isinstance(m, (resnext.FusedBottleneck, resnext.FusedSequential, resnext.ConvBNAct))
               for m in model.modules())


# --------------------------------------------------------------------------------------
# torch.compile
# --------------------------------------------------------------------------------------
MODELS = {"resnext": (tiny_resnext, (2, 3, 32, 32)), "tiny_net": (tiny_net, (2, 3, 8, 8))}


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_compile_converted_model_matches_eager(mode, fresh_dynamo):
    make, shape = MODELS["tiny_net"]  # a Conv-BN-ReLU run and two bottlenecks, all fused
    ref, fused = twins(make)
    assert count_fused(fused) > 0
    ref.train(mode == "train")
    fused.train(mode == "train")
    compiled = torch.compile(fused, fullgraph=True, backend="aot_eager")
    x = torch.randn(shape, device=DEVICE)
    if mode == "eval":
        assert_close(compiled(x), ref(x), what="output")
    else:
        train_step_matches_eager(fused, ref, x, call=compiled)


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_compile_conv_bn_act_matches_eager(mode, fresh_dynamo):
    conv = nn.Conv2d(16, 16, 3, 2, 1, groups=4, bias=False)
    bn = nn.BatchNorm2d(16)
    ref = randomize_bn(nn.Sequential(conv, bn, nn.ReLU())).to(DEVICE).train(mode == "train")
    ours = resnext.ConvBNAct.from_modules(copy.deepcopy(conv), copy.deepcopy(bn)).to(DEVICE)
    ours.train(mode == "train")
    compiled = torch.compile(ours, fullgraph=True, backend="aot_eager")
    x = torch.randn(2, 16, 9, 7, device=DEVICE)  # odd sizes: partial tiles, stride 2
    train_step_matches_eager(ours, ref, x, call=compiled)


@needs_cuda
@pytest.mark.no_poison
@pytest.mark.parametrize("mode", ["eval", "train"])
def test_compile_inductor_cuda(mode, fresh_dynamo):
    ref, fused = twins(tiny_net, device="cuda")
    ref.train(mode == "train")
    fused.train(mode == "train")
    compiled = torch.compile(fused, fullgraph=True)  # default backend: inductor
    x = torch.randn(4, 3, 8, 8, device="cuda")
    if mode == "eval":
        assert_close(compiled(x), ref(x), tol=1e-2, what="output")
    else:
        train_step_matches_eager(fused, ref, x, call=compiled, tol=1e-2)


# --------------------------------------------------------------------------------------
# no host synchronisation on the hot path
# --------------------------------------------------------------------------------------
class HostSync(AssertionError):
    pass


_SYNC_METHODS = ("item", "cpu", "tolist", "numpy", "__bool__", "__int__", "__float__", "__index__")


def _forbid_host_sync(monkeypatch):
    """Make every Tensor -> Python/host conversion raise, except inside Triton's interpreter
    (which runs the kernels on the host by design; on a GPU it is not in the call chain)."""
    for name in _SYNC_METHODS:
        real = getattr(torch.Tensor, name)

        def guarded(self, *args, _name=name, _real=real, **kwargs):
            if "triton" not in sys._getframe(1).f_code.co_filename:
                raise HostSync(f"Tensor.{_name}() called on the hot path")
            return _real(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, guarded)
    if torch.cuda.is_available():
        def no_sync(*args, **kwargs):
            raise HostSync("torch.cuda.synchronize() called on the hot path")
        monkeypatch.setattr(torch.cuda, "synchronize", no_sync)


@pytest.mark.parametrize("mode,momentum", [("train", 0.1), ("train", None), ("eval", 0.1)],
                         ids=["train-momentum0.1", "train-momentumNone", "eval"])
def test_no_host_sync(mode, momentum, monkeypatch):
    model = tiny_net().to(DEVICE)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = momentum
    model = resnext.convert(model).train(mode == "train")
    assert not _unfused_bns(model), "test set-up: every BN should be fused"
    x = torch.randn(2, 3, 8, 8, device=DEVICE)
    with monkeypatch.context() as mp:
        _forbid_host_sync(mp)
        with pytest.raises(HostSync):  # the guard itself works
            torch.ones(1).item()
        steps = 2 if momentum is None else 1  # the second step: num_batches_tracked > 1
        if torch.cuda.is_available():  # also catches syncs inside C++ ops (nonzero, masked indexing)
            torch.cuda.set_sync_debug_mode("error")
        try:
            for _ in range(steps):
                y = model(x)
                if mode == "train":
                    y.float().mean().backward()
        finally:
            if torch.cuda.is_available():
                torch.cuda.set_sync_debug_mode("default")
    if mode == "train":
        assert all(p.grad is not None for p in model.parameters())
        bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
        assert all(int(m.num_batches_tracked) == steps for m in bns)


def _unfused_bns(model):
    """BatchNorms that would run through PyTorch's own forward after convert()."""
    fused_bns = set()
    for m in model.modules():
        if isinstance(m, resnext.FusedBottleneck):
            fused_bns |= {id(m.bn1), id(m.bn2), id(m.bn3)}
            ds = getattr(m, "downsample", None)
            if isinstance(ds, nn.Sequential) and len(ds) == 2:
                fused_bns.add(id(ds[1]))
        if isinstance(m, resnext.FusedSequential):
            fused_bns |= {id(m[i + 1]) for i in m.runs}
    return [m for m in model.modules() if isinstance(m, nn.BatchNorm2d) and id(m) not in fused_bns]


# --------------------------------------------------------------------------------------
# DistributedDataParallel (2 processes, gloo)
# --------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# Two steps: the second runs on the first's update from all-reduced gradients, its momentum
# buffers and the running statistics DDP broadcasts from rank 0 before each forward (a third
# step ran the same code: CI time)
DDP_STEPS = 2


def _ddp_worker(rank: int, world: int, port: int, out_dir: str):
    # Spawned children inherit TRITON_INTERPRET=1 from the parent's environment, and this
    # module sets it again before importing kernels: they run the kernels in the interpreter.
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)  # same initial model on every rank
        ref = tiny_net().train()
        fused = resnext.convert(copy.deepcopy(ref))
        ddp_ref, ddp_fused = DDP(ref), DDP(fused)
        opt_ref = torch.optim.SGD(ref.parameters(), lr=0.05, momentum=0.9)
        opt_fused = torch.optim.SGD(fused.parameters(), lr=0.05, momentum=0.9)
        g = torch.Generator().manual_seed(100 + rank)  # different data on each rank
        record = {"interpret": kernels._runtime.INTERPRET, "steps": []}
        for _ in range(DDP_STEPS):
            x = torch.randn(2, 3, 8, 8, generator=g)
            target = torch.randint(0, 10, (2,), generator=g)
            step = {}
            for name, model, opt in (("ref", ddp_ref, opt_ref), ("fused", ddp_fused, opt_fused)):
                opt.zero_grad()
                loss = nn.functional.cross_entropy(model(x), target)
                loss.backward()
                step[name + "_grads"] = {n: p.grad.clone() for n, p in model.module.named_parameters()}
                opt.step()
                step[name + "_loss"] = loss.detach()
            record["steps"].append(step)
        record["ref_state"] = ref.state_dict()
        record["fused_state"] = fused.state_dict()
        torch.save(record, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_ddp_matches_unconverted_twin(tmp_path):
    # CPU tensors and gloo on every machine: on a GPU machine the workers take the CPU reference
    # path (one GPU cannot host two NCCL ranks); here they run the kernels in the interpreter.
    world = 2
    torch.multiprocessing.spawn(_ddp_worker, args=(world, _free_port(), str(tmp_path)), nprocs=world, join=True)
    records = [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]
    assert all(r["interpret"] == (DEVICE == "cpu") for r in records), "workers should use the interpreter"
    for rank, rec in enumerate(records):
        for i, step in enumerate(rec["steps"]):
            assert_close(step["fused_loss"], step["ref_loss"], what=f"rank {rank} step {i} loss")
            for name, gref in step["ref_grads"].items():
                assert_close(step["fused_grads"][name], gref, tol=1e-3, what=f"rank {rank} step {i} grad {name}")
        for name, v in rec["ref_state"].items():
            ours = rec["fused_state"][name]
            if v.is_floating_point():
                assert_close(ours, v, tol=1e-3, what=f"rank {rank} {name} after {DDP_STEPS} steps")
            else:
                assert torch.equal(ours, v), name
    # gradients were all-reduced: the ranks saw different data but hold the same gradients
    for i in range(DDP_STEPS):
        for name, g0 in records[0]["steps"][i]["fused_grads"].items():
            assert torch.allclose(records[1]["steps"][i]["fused_grads"][name], g0, rtol=1e-5, atol=1e-7), name
    assert not torch.equal(records[0]["steps"][0]["fused_loss"], records[1]["steps"][0]["fused_loss"])


# --------------------------------------------------------------------------------------
# half, bfloat16, autocast
# --------------------------------------------------------------------------------------
def _lowp_atol(ref64):
    return 1e-2 * ref64.abs().max().item() + 1e-3


@pytest.mark.parametrize("model", list(MODELS))
def test_half_model_eval(model):
    make, shape = MODELS[model]
    ref16 = make().eval().half().to(DEVICE)
    ref64 = copy.deepcopy(ref16).double()  # the same fp16-rounded weights, in float64
    ours = resnext.convert(copy.deepcopy(ref16))
    x = torch.randn(shape, device=DEVICE).half()
    y64 = ref64(x.double())
    y16 = ref16(x)
    y = ours(x)
    assert y.dtype == torch.float16
    assert_lowp_close(y, y16, y64, _lowp_atol(y64), what="fp16 eval")


def test_half_model_train():
    ref16 = tiny_net().train().half().to(DEVICE)
    ref64 = copy.deepcopy(ref16).double()
    ours = resnext.convert(copy.deepcopy(ref16))
    x = torch.randn(2, 3, 8, 8, device=DEVICE).half()
    y64, y16, y = ref64(x.double()), ref16(x), ours(x)
    assert y.dtype == torch.float16
    assert_lowp_close(y, y16, y64, _lowp_atol(y64), what="fp16 train output")
    for (name, b16), (_, b64), (_, b) in zip(ref16.named_buffers(), ref64.named_buffers(), ours.named_buffers()):
        if b.is_floating_point():
            assert_lowp_close(b, b16, b64, 1e-2 * b64.abs().max().item(), what=name)


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_bfloat16_model(mode):
    """model.bfloat16(): on the CPU through the interpreter's bf16 (tests/interpreter_bf16.py)."""
    require_bf16()
    refbf = tiny_net().train(mode == "train").bfloat16().to(DEVICE)
    ref64 = copy.deepcopy(refbf).double()
    ours = resnext.convert(copy.deepcopy(refbf))
    x = torch.randn(2, 3, 8, 8, device=DEVICE).bfloat16()
    y64, ybf, y = ref64(x.double()), refbf(x), ours(x)
    assert y.dtype == torch.bfloat16
    assert_lowp_close(y, ybf, y64, _lowp_atol(y64), what=f"bf16 {mode}")


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_cpu_autocast_float16(mode):
    ref = tiny_net().train(mode == "train")
    ref64 = copy.deepcopy(ref).double()
    ours = resnext.convert(copy.deepcopy(ref))
    x = torch.randn(2, 3, 8, 8)
    y64 = ref64(x.double())
    with torch.autocast("cpu", dtype=torch.float16):
        y_amp = ref(x)
        y = ours(x)
    assert y.dtype == y_amp.dtype
    assert_lowp_close(y, y_amp, y64, _lowp_atol(y64), what=f"cpu autocast fp16 {mode}")


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_cpu_autocast_bfloat16(mode):
    """torch.autocast("cpu", torch.bfloat16), the reduced converted model (TinyNet: a stem
    Conv-BN-ReLU, a strided bottleneck with a downsample, a plain one): output, and in train mode
    every parameter's gradient and the running statistics, within twice eager autocast's error
    of float64.  Gradients by relative norm: a ReLU input within bf16 rounding of 0 flips in one
    run and not the other (see test_se_blocks.compare); a wrong formula is off everywhere."""
    from test_se_blocks import assert_lowp_close_norm
    require_bf16()
    ref = tiny_net().train(mode == "train")
    ref64 = copy.deepcopy(ref).double()
    ours = resnext.convert(copy.deepcopy(ref))
    x = torch.randn(2, 3, 8, 8)
    y64 = ref64(x.double())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y_amp = ref(x)
        y = ours(x)
    assert y.dtype == y_amp.dtype == torch.bfloat16
    assert_lowp_close(y, y_amp, y64, _lowp_atol(y64), what=f"cpu autocast bf16 {mode}")
    if mode == "train":
        for out in (y_amp, y, y64):
            out.double().square().sum().backward()
        for (name, p), (_, q), (_, r) in zip(ours.named_parameters(), ref.named_parameters(),
                                             ref64.named_parameters()):
            assert p.grad.dtype == q.grad.dtype == torch.float32, name
            assert_lowp_close_norm(p.grad, q.grad, r.grad, what=f"grad of {name}")
        for (name, a), (_, b), (_, c) in zip(ours.named_buffers(), ref.named_buffers(), ref64.named_buffers()):
            if a.is_floating_point():
                assert_lowp_close(a, b, c, 1e-2 * c.abs().max().item(), what=name)


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("mode", ["eval", "train"])
def test_cuda_autocast(dtype, mode):
    ref = tiny_net().cuda().train(mode == "train")
    ref64 = copy.deepcopy(ref).double()
    ours = resnext.convert(copy.deepcopy(ref))
    x = torch.randn(4, 3, 8, 8, device="cuda")
    y64 = ref64(x.double())
    with torch.autocast("cuda", dtype=dtype):
        y_amp = ref(x)
        y = ours(x)
    assert y.dtype == y_amp.dtype
    assert_lowp_close(y, y_amp, y64, _lowp_atol(y64), what=f"cuda autocast {dtype} {mode}")
    if mode == "train":
        for out in (y_amp, y, y64):
            out.double().square().sum().backward()
        for (name, p), (_, q), (_, r) in zip(ours.named_parameters(), ref.named_parameters(),
                                             ref64.named_parameters()):
            assert p.grad.dtype == q.grad.dtype == torch.float32, name
            assert_lowp_close(p.grad, q.grad, r.grad, _lowp_atol(r.grad), what=f"grad of {name}")


# --------------------------------------------------------------------------------------
# memory layouts
# --------------------------------------------------------------------------------------
def _layout_view(layout: str, shape):
    """(base, view): a contiguous leaf tensor and the function that turns it into an input of
    logical shape ``shape`` (N, C, H, W) with the given memory layout."""
    n, c, h, w = shape
    cl = torch.channels_last
    table = {
        "nchw": ((n, c, h, w), lambda t: t),
        "channels_last": ((n, c, h, w), lambda t: t.contiguous(memory_format=cl)),
        # x[:, :, ::2]: NCHW-like strides, not contiguous
        "nchw_strided": ((n, c, 2 * h, w), lambda t: t[:, :, ::2]),
        # an NHWC buffer viewed as NCHW, then sliced in W: channels_last-like, not contiguous
        "nhwc_permuted_sliced": ((n, h, w + 3, c), lambda t: t.permute(0, 3, 1, 2)[:, :, :, 1:w + 1]),
        # channels 2..c+2 of a wider NCHW tensor: a storage offset, not contiguous
        "channel_slice": ((n, c + 4, h, w), lambda t: t[:, 2:c + 2]),
        # contiguous, but starting 7 elements into its storage
        "storage_offset": ((n * c * h * w + 7,), lambda t: t[7:].view(n, c, h, w)),
    }
    base_shape, view = table[layout]
    return torch.randn(base_shape, device=DEVICE), view


LAYOUTS = ["nchw", "channels_last", "nchw_strided", "nhwc_permuted_sliced", "channel_slice", "storage_offset"]


def _conv_bn_act_pair():
    conv = nn.Conv2d(8, 16, 3, 2, 1, groups=4, bias=False)
    bn = nn.BatchNorm2d(16)
    ref = randomize_bn(nn.Sequential(conv, bn, nn.ReLU())).to(DEVICE)
    return ref, resnext.ConvBNAct.from_modules(copy.deepcopy(ref[0]), copy.deepcopy(ref[1]))


def _bottleneck_pair():
    down = nn.Sequential(nn.Conv2d(8, 16, 1, 2, bias=False), nn.BatchNorm2d(16))
    ref, ours = twins(lambda: randomize_bn(TorchvisionBottleneck(8, 4, 2, down, groups=4, base_width=16)))
    assert isinstance(ours, resnext.FusedBottleneck)
    return ref, ours


def _sequential_pair():
    ref = randomize_bn(nn.Sequential(
        nn.Conv2d(8, 8, 1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 12, 3, 1, 1, groups=4, bias=False), nn.BatchNorm2d(12))).to(DEVICE)
    ours = resnext.FusedSequential.from_sequential(copy.deepcopy(ref))
    assert ours is not None and sorted(ours.runs) == [0, 3]
    return ref, ours


MODULE_PAIRS = {"conv_bn_act": _conv_bn_act_pair, "bottleneck": _bottleneck_pair, "sequential": _sequential_pair}


def _memory_format(t):
    return {"contiguous": t.is_contiguous(), "channels_last": t.is_contiguous(memory_format=torch.channels_last)}


@pytest.mark.parametrize("module,mode", [("conv_bn_act", "eval"), ("conv_bn_act", "train"), ("bottleneck", "eval"),
                                         ("bottleneck", "train"), ("sequential", "eval")])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_layouts_same_values(layout, module, mode):
    ref, ours = MODULE_PAIRS[module]()
    ref.train(mode == "train")
    ours.train(mode == "train")
    base, view = _layout_view(layout, (2, 8, 5, 6))
    if mode == "eval":
        x = view(base)
        x_before = x.clone()
        y = ours(x)
        assert torch.equal(x, x_before), "the input was modified"
        assert_close(y, ref(x), what=f"{layout} {module} eval")
    else:
        train_step_matches_eager(ours, ref, base, view=view)


@pytest.mark.parametrize("mode", ["eval", "train"])
@pytest.mark.parametrize("module", list(MODULE_PAIRS))
@pytest.mark.parametrize("layout", [
    "nchw", "channels_last", "nchw_strided", "channel_slice", "storage_offset",
    "nhwc_permuted_sliced",
])
def test_layouts_output_memory_format_follows_pytorch(layout, module, mode):
    ref, ours = MODULE_PAIRS[module]()
    ref.train(mode == "train")
    ours.train(mode == "train")
    base, view = _layout_view(layout, (2, 8, 5, 6))
    x = view(base)
    y_ref, y = ref(x), ours(x)
    if layout == "channels_last":  # the rule itself, as PyTorch states it
        assert _memory_format(y_ref) == {"contiguous": False, "channels_last": True}
    if layout == "nchw":
        assert _memory_format(y_ref) == {"contiguous": True, "channels_last": False}
    assert _memory_format(y) == _memory_format(y_ref), f"{layout} -> {y.stride()}, PyTorch {y_ref.stride()}"


@pytest.mark.parametrize("module", [
    "conv_bn_act", "sequential",
    "bottleneck",
])
def test_channels_last_weights_nchw_input_memory_format(module):
    """model.to(memory_format=torch.channels_last) with an NCHW input: PyTorch gives channels_last."""
    ref, ours = MODULE_PAIRS[module]()
    ref = ref.to(memory_format=torch.channels_last).eval()
    ours = ours.to(memory_format=torch.channels_last).eval()
    x = torch.randn(2, 8, 5, 6, device=DEVICE)
    y_ref, y = ref(x), ours(x)
    assert_close(y, y_ref)
    assert _memory_format(y) == _memory_format(y_ref), f"{y.stride()}, PyTorch {y_ref.stride()}"


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_channels_last_model_and_input(mode):
    """The usual channels_last recipe: model.to(memory_format=...) and a channels_last input."""
    ref, ours = twins(tiny_net)
    ref = ref.to(memory_format=torch.channels_last).train(mode == "train")
    ours = ours.to(memory_format=torch.channels_last).train(mode == "train")
    x = torch.randn(2, 3, 8, 8, device=DEVICE)
    to_cl = lambda t: t.contiguous(memory_format=torch.channels_last)  # noqa: E731
    if mode == "eval":
        assert_close(ours(to_cl(x)), ref(to_cl(x)))
    else:
        train_step_matches_eager(ours, ref, x, view=to_cl)


# --------------------------------------------------------------------------------------
# SyncBatchNorm (fused), timm-style blocks: what convert() leaves alone
# --------------------------------------------------------------------------------------
class Wrapper(nn.Module):
    def __init__(self, body):
        super().__init__()
        self.body = body

    def forward(self, x):
        return self.body(x)


@pytest.mark.parametrize("norm", ["BatchNorm2d", "SyncBatchNorm"])
def test_sync_batchnorm_fused_as_batchnorm(norm):
    """SyncBatchNorm becomes resnext.SyncBatchNorm2d and is fused like BatchNorm2d (across
    processes: tests/test_sync_batchnorm.py); without a process group it is plain BN."""
    seq = nn.Sequential(nn.Conv2d(4, 8, 3, 1, 1, bias=False), getattr(nn, norm)(8), nn.ReLU())
    model = resnext.convert(Wrapper(seq))
    assert type(model.body) is resnext.FusedSequential
    if norm == "BatchNorm2d":
        return
    assert type(model.body[1]) is resnext.SyncBatchNorm2d

    model = nn.SyncBatchNorm.convert_sync_batchnorm(tiny_resnext()).eval()
    ref = copy.deepcopy(model)
    model = resnext.convert(model)
    assert count_fused(model) > 0 and not any(isinstance(m, nn.SyncBatchNorm) for m in model.modules())
    x = torch.randn(2, 3, 32, 32, device=DEVICE)
    assert_close(model(x), ref(x), what="eval output")


def test_convert_fuses_a_root_sequential():
    seq = randomize_bn(nn.Sequential(nn.Conv2d(4, 8, 3, 1, 1, bias=False), nn.BatchNorm2d(8), nn.ReLU()))
    assert isinstance(resnext.convert(seq), resnext.FusedSequential)


class SqueezeExcite(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.fc1, self.fc2 = nn.Conv2d(c, c // 4, 1), nn.Conv2d(c // 4, c, 1)

    def forward(self, x):
        return x * torch.sigmoid(self.fc2(torch.relu(self.fc1(x.mean((2, 3), keepdim=True)))))


class DropPath(nn.Module):
    def forward(self, x):
        return x if not self.training else x * 0.5


def _timm_block(variant):
    noop = dict(drop_block=nn.Identity(), aa=nn.Identity()) if variant.endswith("identity") else {}
    if variant.startswith("downsample_conv"):  # timm's downsample_conv: Sequential(conv, norm)
        down = nn.Sequential(nn.Conv2d(16, 32, 1, 2, bias=False), nn.BatchNorm2d(32))
        return TimmBottleneck(16, 8, 2, down, cardinality=4, base_width=16, **noop)
    if variant == "downsample_avg":  # timm's "d" variant: Sequential(AvgPool2d, conv, norm)
        down = nn.Sequential(nn.AvgPool2d(2, 2, ceil_mode=True, count_include_pad=False),
                             nn.Conv2d(16, 32, 1, bias=False), nn.BatchNorm2d(32))
        return TimmBottleneck(16, 8, 2, down, cardinality=4, base_width=16)
    if variant.startswith("identity"):
        return TimmBottleneck(32, 8, 1, None, cardinality=4, base_width=16, **noop)
    if variant == "se":
        return TimmBottleneck(32, 8, 1, None, cardinality=4, base_width=16, se=SqueezeExcite(32))
    if variant == "drop_path":
        return TimmBottleneck(32, 8, 1, None, cardinality=4, base_width=16, drop_path=DropPath())
    raise ValueError(variant)


@pytest.mark.parametrize("mode", ["eval", "train"])
@pytest.mark.parametrize("variant", ["downsample_conv_none", "downsample_conv_identity", "downsample_avg",
                                     "identity_none", "identity_identity", "se", "drop_path"])
def test_timm_style_bottleneck(variant, mode):
    ref, ours = twins(lambda: randomize_bn(_timm_block(variant)))
    if variant in ("se", "drop_path"):
        assert type(ours) is TimmBottleneck, f"a block with {variant} must be left to PyTorch"
    else:
        assert isinstance(ours, resnext.FusedBottleneck)
        assert [n for n, _ in ours.named_children()] == [n for n, _ in ref.named_children()]
    ref.train(mode == "train")
    ours.train(mode == "train")
    x = torch.randn(2, ref.conv1.in_channels, 5, 6, device=DEVICE)
    if mode == "eval":
        assert_close(ours(x), ref(x))
    else:
        train_step_matches_eager(ours, ref, x)


# --------------------------------------------------------------------------------------
# state_dict and optimizers
# --------------------------------------------------------------------------------------
def test_state_dict_round_trip():
    ref, fused = twins(tiny_resnext)  # torchvision's ResNet layout and keys
    assert list(fused.state_dict()) == list(ref.state_dict())
    for (k, v), (_, w) in zip(fused.state_dict().items(), ref.state_dict().items()):
        assert torch.equal(v, w), k
    x = torch.randn(2, 3, 32, 32, device=DEVICE)

    # unconverted -> converted: new random weights and statistics, loaded strictly
    other = randomize_bn(tiny_resnext().to(DEVICE), seed=7)
    fused.load_state_dict(other.state_dict(), strict=True)
    assert_close(fused.eval()(x), other.eval()(x), what="converted after loading an eager state_dict")

    # converted -> unconverted
    fused2 = resnext.convert(randomize_bn(tiny_resnext().to(DEVICE), seed=9))
    ref.load_state_dict(fused2.state_dict(), strict=True)
    for (k, v), (_, w) in zip(fused2.state_dict().items(), ref.state_dict().items()):
        assert torch.equal(v, w), k


def test_optimizer_survives_convert():
    ref = tiny_net().to(DEVICE)
    model = copy.deepcopy(ref)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
    opt_ref = torch.optim.SGD(ref.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
    g = torch.Generator().manual_seed(3)

    def step(m, o, x, t):
        o.zero_grad()
        nn.functional.cross_entropy(m(x), t).backward()
        o.step()

    x, t = torch.randn(2, 3, 8, 8, generator=g).to(DEVICE), torch.randint(0, 10, (2,), generator=g).to(DEVICE)
    step(model, opt, x, t)  # momentum buffers exist before the conversion
    step(ref, opt_ref, x, t)
    ids = [id(p) for p in model.parameters()]
    buffers = [b.data_ptr() for b in model.buffers()]
    model = resnext.convert(model)
    assert count_fused(model) > 0
    assert [id(p) for p in model.parameters()] == ids, "convert() must keep the parameter objects"
    assert [b.data_ptr() for b in model.buffers()] == buffers, "convert() must keep the buffers"
    for _ in range(1):  # the momentum buffers made before convert() keep being used
        x, t = torch.randn(2, 3, 8, 8, generator=g).to(DEVICE), torch.randint(0, 10, (2,), generator=g).to(DEVICE)
        step(model, opt, x, t)
        step(ref, opt_ref, x, t)
    for (name, p), (_, q) in zip(model.named_parameters(), ref.named_parameters()):
        assert_close(p, q, tol=1e-3, what=name)
        assert_close(opt.state[p]["momentum_buffer"], opt_ref.state[q]["momentum_buffer"], tol=1e-3,
                     what=f"momentum of {name}")
    assert_same_buffers(model, ref, tol=1e-3)
    # the optimizer state moves between the two models too
    opt_ref.load_state_dict(opt.state_dict())
