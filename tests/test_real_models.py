"""Real torchvision / timm models through ``resnext.convert``: how many bottlenecks are fused, and
that a converted model computes what the original does.

CI runs this module in a second environment with torchvision 0.29 and timm 1.0 installed
(``.ci/run``); where they are missing it skips.

* Full-size models run in float64, which takes the reference path of every fused op
  (``kernels/reference.py``) through the fused modules' own logic (stage order, folding,
  pending BatchNorms, the residual join, running-statistic updates): converted vs
  unconverted, both float64, must agree to rounding.
* Width/depth-reduced instances of each family run in fp32 through the Triton interpreter
  (the kernels themselves), against eager fp32 and a float64 copy.
"""
import copy

import pytest
import torch
from conftest import DEVICE
from torch import nn

torchvision = pytest.importorskip("torchvision")
timm = pytest.importorskip("timm")

from timm.layers import freeze_batch_norm_2d  # noqa: E402
from timm.models import regnet as timm_regnet  # noqa: E402
from timm.models import resnest as timm_resnest  # noqa: E402
from timm.models import resnet as timm_resnet  # noqa: E402
from timm.models import sknet as timm_sknet  # noqa: E402
from torchvision.models import resnet as tv_resnet  # noqa: E402
from torchvision.models.detection.backbone_utils import resnet_fpn_backbone  # noqa: E402
from torchvision.ops import FrozenBatchNorm2d  # noqa: E402

import resnext  # noqa: E402

BLOCKS = (tv_resnet.Bottleneck, timm_resnet.Bottleneck, timm_regnet.Bottleneck,
          timm_sknet.SelectiveKernelBottleneck, timm_resnest.ResNestBottleneck)

# model -> (bottlenecks in it, bottlenecks convert() leaves to PyTorch, why).
EXPECTED = {
    "tv_resnext50_32x4d": (16, 0, "torchvision's own classification model"),
    "fpn_resnext101_32x8d": (33, 0, "torchvision detection backbone, FrozenBatchNorm2d"),
    "seresnext50_32x4d": (16, 0, "SE after bn3: squeeze in conv3's epilogue, gate in the final pass"),
    "ecaresnext26t_32x4d": (8, 0, "ECA after bn3: as SE"),
    "regnety_016": (27, 0, "SE after conv2: squeeze after bn2 + ReLU, gate in conv3's prologue"),
    "regnetx_016": (18, 0, "ConvNormAct + BatchNormAct2d"),
    "regnety_016_drop_path": (27, 0, "drop_path_rate=0.1: the mask joins the final pass (train), identity in eval"),
    "resnext50d_32x4d": (16, 0, "avg_down shortcut: the pool on PyTorch, conv + BN fused"),
    "skresnext50_32x4d": (16, 16, "selective kernel: out of scope (its 3x3 ConvNormActs are fused)"),
    "resnest14d": (4, 4, "split attention: out of scope"),
}

FULL_SIZE = {
    "fpn_resnext101_32x8d": lambda: resnet_fpn_backbone(backbone_name="resnext101_32x8d", weights=None),
    "tv_resnext50_32x4d": lambda: torchvision.models.resnext50_32x4d(),
    "regnety_016_drop_path": lambda: timm.create_model("regnety_016", drop_path_rate=0.1),
    **{name: (lambda name=name: timm.create_model(name)) for name in EXPECTED
       if not name.startswith(("fpn", "tv")) and not name.endswith("drop_path")},
}


def randomize_norms(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial affine parameters and running statistics in every norm layer, frozen ones
    (buffers only) included: timm zero-initialises each block's last BN weight, which would
    hide the whole main branch."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            rm = getattr(m, "running_mean", None)
            if not isinstance(rm, torch.Tensor) or not isinstance(getattr(m, "running_var", None), torch.Tensor):
                continue
            c = rm.shape[0]
            m.running_mean.copy_(torch.randn(c, generator=g) * 0.5)
            m.running_var.copy_(torch.rand(c, generator=g) + 0.5)
            if isinstance(getattr(m, "weight", None), torch.Tensor):
                m.weight.copy_(torch.rand(c, generator=g) + 0.5)
                m.bias.copy_(torch.randn(c, generator=g) * 0.3)
    return model


def count_blocks(model: nn.Module):
    """(original bottleneck instances left, fused bottlenecks)."""
    fused = (resnext.FusedBottleneck, resnext.FusedRegNetBottleneck)
    return (sum(type(m) in BLOCKS for m in model.modules()), sum(isinstance(m, fused) for m in model.modules()))


def flat(y) -> torch.Tensor:
    """A model's output (a tensor, or a dict of feature maps for a backbone) as one vector."""
    if isinstance(y, dict):
        return torch.cat([v.reshape(-1) for v in y.values()])
    return y.reshape(-1)


def max_err(a, b) -> float:
    return (a.detach().double() - b.detach().double()).abs().max().item()


# --------------------------------------------------------------------------------------
# full-size models, float64 (the reference path)
# --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def full_size_models():
    """Each model built once (fp32 init, then float64), with randomised norms."""
    cache = {}

    def get(name):
        if name not in cache:
            torch.manual_seed(0)
            cache.clear()  # one at a time: the detection backbone alone is 0.7 GB in float64
            cache[name] = randomize_norms(FULL_SIZE[name]()).double().to(DEVICE)
        return cache[name]
    return get


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_full_size_model_matches_unconverted(name, full_size_models):
    """Bottlenecks left as EXPECTED says, state_dict keys unchanged, and in float64 the
    converted model's eval output and one train step (output, input and parameter gradients,
    running statistics) equal the unconverted model's to rounding."""
    ref = full_size_models(name)
    total, left, why = EXPECTED[name]
    assert count_blocks(ref) == (total, 0)
    fused = resnext.convert(copy.deepcopy(ref))
    assert count_blocks(fused) == (left, total - left), why
    assert list(fused.state_dict()) == list(ref.state_dict())

    # Two 64x64 images: 8 values per channel for layer4's train-mode BN (at 1x1 the two values
    # a channel would have make the gradients ill-conditioned: 1e7 in float64).  The detection
    # backbone's norms are frozen: one 32x32 image.
    x = torch.randn(*((1, 3, 32, 32) if name.startswith("fpn") else (2, 3, 64, 64)), dtype=torch.float64,
                    device=DEVICE)
    with torch.no_grad():
        y_ref, y = flat(ref.eval()(x)), flat(fused.eval()(x))
    assert max_err(y, y_ref) <= 1e-9 * y_ref.abs().max().item(), "eval output"

    ref.train(), fused.train()
    ref_state = copy.deepcopy(ref.state_dict())  # the train step updates running statistics
    xs = [x.clone().requires_grad_(), x.clone().requires_grad_()]
    outs = []
    for m, xi in ((ref, xs[0]), (fused, xs[1])):
        torch.manual_seed(2)  # the same drop_path masks (RegNet with drop_path_rate)
        outs.append(flat(m(xi)))
    w = torch.randn(outs[0].shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64).to(DEVICE)
    for out in outs:
        (out * w).sum().backward()
    params = dict(ref.named_parameters())
    # Relative to each tensor's scale, with a floor at the largest gradient's: the gradient of a
    # bias feeding a train-mode BN (ResNeSt's fc1) is zero up to rounding.
    floor = 1e-8 * max(q.grad.abs().max().item() for q in params.values() if q.grad is not None)

    def close(a, b, what):
        assert max_err(a, b) <= 1e-8 * b.abs().max().item() + floor, what

    close(outs[1], outs[0], "train output")
    close(xs[1].grad, xs[0].grad, "input grad")
    for pname, p in fused.named_parameters():
        q = params[pname]
        assert (p.grad is None) == (q.grad is None), pname
        if q.grad is not None:
            close(p.grad, q.grad, f"grad of {pname}")
    buffers = dict(ref.named_buffers())
    for bname, b in fused.named_buffers():
        if b.is_floating_point():
            close(b, buffers[bname], bname)
        else:
            assert torch.equal(b, buffers[bname]), bname
    ref.load_state_dict(ref_state)  # the fixture's model for the next test is rebuilt anyway


def test_detector_backbone_convert():
    """README's detection use: ``convert(model.backbone)`` on a torchvision detector; the
    detections (float64, eval) are those of the unconverted detector."""
    from torchvision.models.detection import fasterrcnn_resnet50_fpn
    torch.manual_seed(0)
    det = fasterrcnn_resnet50_fpn(weights=None, weights_backbone=None, min_size=64, max_size=64,
                                  box_score_thresh=0.0).double().eval()
    randomize_norms(det.backbone)
    ref = copy.deepcopy(det)
    det.backbone = resnext.convert(det.backbone)
    assert count_blocks(det) == (0, 16)
    images = [torch.rand(3, 64, 64, dtype=torch.float64)]
    with torch.no_grad():
        ours, theirs = det(images)[0], ref(images)[0]
    assert ours["boxes"].shape[0] > 0 and ours["boxes"].shape == theirs["boxes"].shape
    for key in ("boxes", "scores"):
        assert max_err(ours[key], theirs[key]) <= 1e-9 * theirs[key].abs().max().item(), key
    assert torch.equal(ours["labels"], theirs["labels"])


# --------------------------------------------------------------------------------------
# width/depth-reduced instances, fp32 through the interpreter (the kernels)
# --------------------------------------------------------------------------------------
def tv_frozen_backbone():
    """torchvision's Bottleneck with FrozenBatchNorm2d, as in detection backbones: a stem
    run, a stride-1 block with a projection shortcut, a grouped stride-2 block; eps 0 in
    one norm (older detection checkpoints)."""
    def frozen(c, eps=1e-5):
        return FrozenBatchNorm2d(c, eps=eps)
    stem = nn.Sequential(nn.Conv2d(3, 16, 3, 2, 1, bias=False), frozen(16), nn.ReLU(inplace=True))
    b1 = tv_resnet.Bottleneck(16, 8, downsample=nn.Sequential(nn.Conv2d(16, 32, 1, bias=False), frozen(32)),
                              groups=2, base_width=32, norm_layer=frozen)
    b1.bn2.eps = 0.0
    b2 = tv_resnet.Bottleneck(32, 8, 2, nn.Sequential(nn.Conv2d(32, 32, 1, 2, bias=False), frozen(32)),
                              groups=4, base_width=32, norm_layer=frozen)
    return nn.Sequential(stem, b1, b2)


def small_timm_resnet(name):
    return timm.create_model(name, layers=(1, 1, 1, 1), channels=(8, 8, 16, 16), cardinality=4, base_width=32,
                             stem_width=8, num_classes=5)


def small_regnet(drop_path_rate=0.0, **cfg):
    cfg = {**dict(depth=4, w0=8, wa=12.0, wm=1.5, group_size=4, stem_width=8), **cfg}  # 4 stages of 1 block, 8-40 wide
    return timm_regnet.RegNet(timm_regnet.RegNetCfg(**cfg), num_classes=5, drop_path_rate=drop_path_rate)


# name -> (builder, bottlenecks, left to PyTorch)
SMALL = {
    "tv_frozen": (tv_frozen_backbone, 2, 0),
    "timm_resnext_d": (lambda: small_timm_resnet("resnext50d_32x4d"), 4, 0),  # avg_down, deep stem
    "timm_seresnext": (lambda: small_timm_resnet("seresnext50_32x4d"), 4, 0),
    "timm_ecaresnext": (lambda: small_timm_resnet("ecaresnext26t_32x4d"), 4, 0),
    "regnetx": (lambda: small_regnet(), 4, 0),
    "regnetx_avg_linear_frozen": (lambda: freeze_batch_norm_2d(small_regnet(downsample="avg", linear_out=True)), 4, 0),
    "regnety": (lambda: small_regnet(se_ratio=0.25), 4, 0),
    "skresnext": (lambda: timm.create_model("skresnext50_32x4d", layers=(1, 1, 1, 1), channels=(8, 8, 16, 16),
                                            cardinality=4, base_width=32, stem_width=8, num_classes=5), 4, 4),
}


def deep_bound(ours, eager, ref64, floor, what, atol=0.0):
    """|ours - ref64| <= 2 |eager - ref64| + floor * max|ref64| (max over the tensor) + atol: a deep
    train-mode network's fp32 error is measured against eager fp32's own."""
    scale = ref64.detach().abs().max().item()
    err, eager_err = max_err(ours, ref64), max_err(eager, ref64)
    assert err <= 2 * eager_err + floor * scale + atol, \
        f"{what}: error {err:.3g}, eager's {eager_err:.3g} (scale {scale:.3g}, atol {atol:.3g})"


def grad_atol(params64) -> float:
    """An absolute floor for parameter gradients: fp32 rounding (1e-5) of the model's largest
    float64 parameter gradient.  A gradient that is zero analytically (a BN shift whose output
    only feeds train-mode BNs, which remove per-channel constants) is pure rounding noise in
    both fp32 runs, with a float64 scale of ~1e-15: comparing it relatively is meaningless."""
    return 1e-5 * max(p.grad.abs().max().item() for p in params64 if p.grad is not None)


@pytest.mark.parametrize("name", sorted(SMALL))
def test_small_model_through_kernels(name):
    build, total, left = SMALL[name]
    torch.manual_seed(0)
    ref = randomize_norms(build()).to(DEVICE)
    fused = resnext.convert(copy.deepcopy(ref))
    assert count_blocks(fused) == (left, total - left)
    assert list(fused.state_dict()) == list(ref.state_dict())
    ref64 = copy.deepcopy(ref).double()
    x = torch.randn(2, 3, 16, 16, device=DEVICE)

    with torch.no_grad():
        for m in (ref, fused, ref64):
            m.eval()
        ys = [flat(m(x.to(dt))) for m, dt in ((fused, torch.float32), (ref, torch.float32), (ref64, torch.float64))]
    deep_bound(*ys, 1e-4, "eval output")

    for m in (ref, fused, ref64):
        m.train()
    xs = [x.clone().requires_grad_(), x.clone().requires_grad_(), x.double().requires_grad_()]
    ys = [flat(m(xi)) for m, xi in zip((fused, ref, ref64), xs)]
    w = torch.randn(ys[2].shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64).to(DEVICE)
    for y in ys:
        (y * w.to(y.dtype)).sum().backward()
    deep_bound(*ys, 1e-4, "train output")
    deep_bound(*(xi.grad for xi in xs), 2e-2, "input grad")
    named = [dict(m.named_parameters()) for m in (fused, ref, ref64)]
    atol = grad_atol(named[2].values())
    for pname, p64 in named[2].items():
        p, q = named[0][pname], named[1][pname]
        assert (p.grad is None) == (p64.grad is None), pname
        if p64.grad is not None:
            deep_bound(p.grad, q.grad, p64.grad, 2e-2, f"grad of {pname}", atol)
    bufs = [dict(m.named_buffers()) for m in (fused, ref, ref64)]
    for bname, b64 in bufs[2].items():
        if b64.is_floating_point():
            deep_bound(bufs[0][bname], bufs[1][bname], b64, 1e-4, bname)
        else:
            assert torch.equal(bufs[0][bname], b64), bname


# drop_path (stochastic depth) in RegNet blocks: depth 6, wa 8 -> stages of 1, 1, 2, 2 blocks, 8-40
# wide (two identity shortcuts), stagewise rates 0 (Identity), 0.12 ... 0.6: some images are dropped.
REGNET_DROP_PATH = {
    "regnetx": dict(),
    "regnety": dict(se_ratio=0.25),
    "regnety_avg_linear": dict(se_ratio=0.25, downsample="avg", linear_out=True),
    "regnetx_no_shortcut": dict(downsample=None),  # timm applies drop_path only with a shortcut
    "regnetx_frozen": dict(frozen=True),  # bn3 folded in a training block
}


@pytest.mark.parametrize("variant", sorted(REGNET_DROP_PATH))
def test_regnet_drop_path_same_seed(variant):
    """timm RegNet with drop_path_rate: every block fused; in training, with the same seed before
    both, the converted model's output, input and parameter gradients and running statistics are
    the unconverted model's (float64 on the reference path to rounding; fp32 through the
    interpreter against eager fp32 and float64); in eval drop_path is the identity."""
    cfg = dict(REGNET_DROP_PATH[variant])
    frozen = cfg.pop("frozen", False)
    torch.manual_seed(0)
    ref = small_regnet(drop_path_rate=0.6, depth=6, wa=8.0, **cfg)
    ref = randomize_norms(freeze_batch_norm_2d(ref) if frozen else ref).to(DEVICE)
    dps = [b.drop_path for b in ref.modules() if type(b) is timm_regnet.Bottleneck]
    assert len(dps) == 6 and sum(isinstance(d, DropPath) for d in dps) == 5
    fused = resnext.convert(copy.deepcopy(ref))
    assert count_blocks(fused) == (0, 6)
    ref64, fused64 = copy.deepcopy(ref).double(), copy.deepcopy(fused).double()
    x = torch.randn(6, 3, 16, 16, device=DEVICE)
    models = (fused, ref, ref64, fused64)
    dts = (torch.float32, torch.float32, torch.float64, torch.float64)

    with torch.no_grad():
        ys = [flat(m.eval()(x.to(dt))) for m, dt in zip(models, dts)]
    deep_bound(*ys[:3], 1e-4, "eval output")
    assert max_err(ys[3], ys[2]) <= 1e-10 * ys[2].abs().max().item(), "float64 eval output"

    xs = [x.to(dt).clone().requires_grad_() for dt in dts]
    ys = []
    for m, xi in zip(models, xs):
        torch.manual_seed(3)
        ys.append(flat(m.train()(xi)))
    w = torch.randn(ys[2].shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64).to(DEVICE)
    for y in ys:
        (y * w.to(y.dtype)).sum().backward()
    # the masks were active: without them the output differs
    with torch.no_grad():
        torch.manual_seed(3)
        ys_nodrop = flat(copy.deepcopy(ref64).train().apply(
            lambda m: setattr(m, "drop_path", nn.Identity()) if type(m) is timm_regnet.Bottleneck else None)(xs[2]))
    assert max_err(ys_nodrop, ys[2]) > 1e-3 * ys[2].abs().max().item()

    def close64(a, b, what):
        assert max_err(a, b) <= 1e-9 * b.abs().max().item() + 1e-12, what

    deep_bound(*ys[:3], 1e-4, "train output")
    close64(ys[3], ys[2], "float64 train output")
    deep_bound(*(xi.grad for xi in xs[:3]), 2e-2, "input grad")
    close64(xs[3].grad, xs[2].grad, "float64 input grad")
    named = [dict(m.named_parameters()) for m in models]
    atol = grad_atol(named[2].values())
    for pname, p64 in named[2].items():
        assert all((n[pname].grad is None) == (p64.grad is None) for n in named), pname
        if p64.grad is not None:
            deep_bound(named[0][pname].grad, named[1][pname].grad, p64.grad, 2e-2, f"grad of {pname}", atol)
            close64(named[3][pname].grad, p64.grad, f"float64 grad of {pname}")
    bufs = [dict(m.named_buffers()) for m in models]
    for bname, b64 in bufs[2].items():
        if b64.is_floating_point():
            deep_bound(bufs[0][bname], bufs[1][bname], b64, 1e-4, bname)
            close64(bufs[3][bname], b64, f"float64 {bname}")
        else:
            assert all(torch.equal(b[bname], b64) for b in bufs), bname


# --------------------------------------------------------------------------------------
# which norm layers and block pieces are accepted: by behaviour, not by name
# --------------------------------------------------------------------------------------
from timm.layers import BatchNormAct2d, DropBlock2d, DropPath, FrozenBatchNormAct2d  # noqa: E402

from resnext.modules import fusable  # noqa: E402


class DoubledFrozen(FrozenBatchNorm2d):
    def forward(self, x):  # a subclass with its own forward: not what we reproduce
        return 2 * super().forward(x)


class RenamedFrozen(FrozenBatchNorm2d):
    pass  # FrozenBatchNorm2d's forward: fused


class ShiftedBN(nn.BatchNorm2d):
    def forward(self, x):
        return super().forward(x) + 1


@pytest.mark.parametrize("norm, fused", [
    (lambda: nn.BatchNorm2d(8), True),
    (lambda: nn.SyncBatchNorm(8), False),
    (lambda: nn.BatchNorm1d(8), False),
    (lambda: ShiftedBN(8), False),
    (lambda: FrozenBatchNorm2d(8), True),
    (lambda: FrozenBatchNorm2d(8, eps=0.0), True),
    (lambda: RenamedFrozen(8), True),
    (lambda: DoubledFrozen(8), False),
    (lambda: BatchNormAct2d(8), True),
    (lambda: BatchNormAct2d(8, inplace=False), True),
    (lambda: BatchNormAct2d(8, apply_act=False), True),
    (lambda: BatchNormAct2d(8, act_layer=nn.GELU), False),
    (lambda: BatchNormAct2d(8, drop_layer=lambda: DropBlock2d(0.1)), False),
    (lambda: BatchNormAct2d(8, drop_layer=lambda: DropBlock2d(0.0)), True),
    (lambda: FrozenBatchNormAct2d(8), True),
    (lambda: FrozenBatchNormAct2d(8, act_layer=nn.SiLU), False),
], ids=["bn", "syncbn", "bn1d", "bn-own-forward", "frozen", "frozen-eps0", "frozen-subclass", "frozen-own-forward", "bnact-relu",
        "bnact-relu-not-inplace", "bnact-identity", "bnact-gelu", "bnact-dropblock", "bnact-dropblock-p0",
        "frozenact-relu", "frozenact-silu"])
def test_norm_layers_accepted(norm, fused):
    """fusable() accepts a norm when the fused path reproduces its forward; whatever it
    accepts computes, in a FusedSequential, what the original Sequential computes."""
    seq = randomize_norms(nn.Sequential(nn.Conv2d(4, 8, 3, 1, 1, bias=False), norm())).double()
    assert fusable(seq[0], seq[1]) is fused
    if not fused:
        return
    ours = resnext.convert(copy.deepcopy(seq))
    assert isinstance(ours, resnext.FusedSequential)
    x = torch.randn(2, 4, 5, 5, dtype=torch.float64)
    for mode in ("eval", "train"):
        seq.train(mode == "train"), ours.train(mode == "train")
        torch.testing.assert_close(ours(x), seq(x), rtol=1e-9, atol=1e-9)
        for (name, a), (_, b) in zip(ours.state_dict().items(), seq.state_dict().items()):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12, msg=name)


@pytest.mark.parametrize("piece, fused", [
    (dict(drop_path=None), True),
    (dict(drop_path=DropPath(0.0)), True),
    (dict(drop_path=DropPath(0.2)), True),  # its mask joins the final pass
    (dict(drop_block=DropBlock2d(0.0)), True),
    (dict(drop_block=DropBlock2d(0.1)), True),  # fused; a call with an active mask runs on PyTorch
], ids=["no-drop-path", "drop-path-p0", "drop-path", "drop-block-p0", "drop-block"])
def test_timm_bottleneck_extras(piece, fused):
    """timm's optional pieces: a block with drop_path or drop_block (any probability) is fused."""
    block = timm_resnet.Bottleneck(32, 8, cardinality=4, base_width=32)
    for name, m in piece.items():
        setattr(block, name, m)
    assert isinstance(resnext.convert(nn.Sequential(block))[0], resnext.FusedBottleneck) is fused


@pytest.mark.parametrize("block", ["tv_frozen", "regnetx", "regnety", "regnety_drop_path"])
def test_compile_fullgraph(block, fresh_dynamo):
    """The new blocks and norm views trace with torch.compile(fullgraph=True): a frozen-BN
    torchvision block and a RegNet block (RegNetY: with its SE after conv2; with an active
    drop_path: rate 0.9, seed 3 keeps one of the two images), train mode, output and input
    gradient as eager."""
    torch.manual_seed(0)
    build = {"tv_frozen": lambda: tv_frozen_backbone()[1], "regnetx": lambda: small_regnet().s2.b1,
             "regnety": lambda: small_regnet(se_ratio=0.25).s2.b1,
             "regnety_drop_path": lambda: small_regnet(se_ratio=0.25, drop_path_rate=0.9).s4.b1}[block]
    ref = randomize_norms(build()).to(DEVICE).train()
    fused = resnext.convert(nn.Sequential(copy.deepcopy(ref)))[0]
    assert type(fused) in (resnext.FusedBottleneck, resnext.FusedRegNetBottleneck)
    compiled = torch.compile(fused, fullgraph=True, backend="aot_eager")
    x = torch.randn(2, ref.conv1.in_channels if block == "tv_frozen" else ref.conv1.conv.in_channels, 6, 6,
                    device=DEVICE)
    xs = [x.clone().requires_grad_(), x.clone().requires_grad_()]
    ys = []
    for m, xi in ((compiled, xs[0]), (ref, xs[1])):
        torch.manual_seed(3)  # the same drop_path mask
        ys.append(m(xi))
    for y in ys:
        (y * torch.arange(y.numel(), device=DEVICE).reshape(y.shape).sin()).sum().backward()
    torch.testing.assert_close(ys[0], ys[1], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(xs[0].grad, xs[1].grad, rtol=1e-4, atol=1e-4)


@pytest.mark.no_poison  # the NaN fill would add a fill_ per allocation to the count
@pytest.mark.parametrize("block", ["tv_frozen", "regnetx"])
@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_device_ops_not_above_eager(block, train):
    """Eval: one launch per convolution, nothing per norm (the FrozenBatchNorm2d / BatchNormAct2d
    fold is cached).  Training step: within tests/test_device_ops.py's limit of eager."""
    from benchmarks import workloads
    from test_device_ops import PER_STAGE_TRAIN_LIMIT, TRAIN_LIMIT
    limit = TRAIN_LIMIT if block == "tv_frozen" else PER_STAGE_TRAIN_LIMIT  # (the RegNet block: per stage)
    torch.manual_seed(0)
    eager = randomize_norms(tv_frozen_backbone()[1] if block == "tv_frozen" else small_regnet().s2.b1).to(DEVICE)
    eager = eager.to(memory_format=torch.channels_last)
    fused = resnext.convert(nn.Sequential(copy.deepcopy(eager)))[0]
    cin = eager.conv1.in_channels if block == "tv_frozen" else eager.conv1.conv.in_channels
    x = torch.randn(2, cin, 8, 8, device=DEVICE).to(memory_format=torch.channels_last).requires_grad_(train)
    e = workloads.steady_device_ops(eager, x, train)
    f = workloads.steady_device_ops(fused, x, train)
    convs = sum(isinstance(m, nn.Conv2d) for m in eager.modules())
    print(f"\n{block} {'train' if train else 'eval'}: eager {e.total}, fused {f.total} ({f.triton} Triton)")
    if train:
        assert f.total <= limit * e.total, f"fused training step: {f.total} device ops, eager {e.total}\n{f}\n{e}"
    else:
        assert (f.triton, f.aten) == (convs, 0), f"fused eval forward: want {convs} launches, no aten op\n{f}"


@pytest.mark.no_poison  # the NaN fill would add a fill_ per allocation to the count
@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_regnety_block_device_ops(train):
    """RegNetY's SE after conv2, fused vs eager (as tests/test_se_blocks.py does for the SE ResNet
    block): fewer device ops than eager in eval (eager SE: mean, 2 convs, act, sigmoid, mul; fused:
    one squeeze launch, the multiply in conv3's prologue) and in a training step, and the SE's own
    share (vs the same block without SE) no larger than eager's."""
    from benchmarks import workloads
    from test_device_ops import GATED_TRAIN_LIMIT
    counts = {}
    for se in (0.25, 0.0):
        torch.manual_seed(0)
        eager = randomize_norms(small_regnet(se_ratio=se).s2.b1).to(DEVICE).to(memory_format=torch.channels_last)
        fused = resnext.convert(nn.Sequential(copy.deepcopy(eager)))[0]
        assert type(fused) is resnext.FusedRegNetBottleneck
        x = torch.randn(2, eager.conv1.conv.in_channels, 8, 8, device=DEVICE)
        x = x.to(memory_format=torch.channels_last).requires_grad_(train)
        counts[se] = (workloads.steady_device_ops(eager, x, train), workloads.steady_device_ops(fused, x, train))
        print(f"\nse_ratio {se} ({'train' if train else 'eval'}): eager {counts[se][0]}\nfused {counts[se][1]}")
    (e_se, f_se), (e_plain, f_plain) = counts[0.25], counts[0.0]
    print(f"the SE adds {f_se.total - f_plain.total} device ops fused, {e_se.total - e_plain.total} eager")
    if train:
        assert f_se.total <= GATED_TRAIN_LIMIT * e_se.total, f"fused RegNetY training step: {f_se.total}, eager {e_se.total}"
    else:
        assert f_se.total < e_se.total, f"fused RegNetY eval: {f_se.total} device ops, eager {e_se.total}"
        assert f_se.triton == f_plain.triton + 1  # + the squeeze pass; the gate rides in conv3's prologue
    assert f_se.total - f_plain.total <= e_se.total - e_plain.total, (
        f"the fused SE adds {f_se.total - f_plain.total} device ops, eager's {e_se.total - e_plain.total}")
