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
    """Stands in for ``kernel``: ``kernel[grid](...)`` counts launches and raises ``make_error()``
    (only for the launches whose keyword arguments satisfy ``when``, if given: the others run);
    anything else (``arg_names``, ...) is the real kernel's."""

    def __init__(self, kernel, make_error, when=None):
        self.kernel, self.make_error, self.when, self.calls = kernel, make_error, when, 0

    def __getattr__(self, name):
        return getattr(self.kernel, name)

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            if self.when is not None and not self.when(kwargs):
                return self.kernel[grid](*args, **kwargs)
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


# --------------------------------------------------------------------------------------
# The elementwise / per-channel kernels, op by op
# --------------------------------------------------------------------------------------
bn = __import__("kernels.batchnorm", fromlist=["x"])
bb = __import__("kernels.bn_backward", fromlist=["x"])
se = __import__("kernels.squeeze_excite", fromlist=["x"])


def _fail(monkeypatch, module, name, failure="out_of_resources", when=None):
    """``module.name`` (a kernel) fails at launch with ``failure`` (only where ``when(kwargs)``, if given)."""
    kernel = FailingLaunch(getattr(module, name), FAILURES[failure][0], when)
    monkeypatch.setattr(module, name, kernel)
    return kernel


def _twice_one_warning(run, kernel, op, failure="out_of_resources"):
    """Run ``run()`` twice: exactly one fallback warning naming ``op``, the device, the Triton
    version and the error's first line; the failed kernel tried once.  Returns the two results."""
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        outs = [run(), run()]
    (w0,) = _fallback_warnings(record)
    message = str(w0.message)
    for part in (f"kernels.{op}:", f"on {torch.device(DEVICE)}", f"Triton {triton.__version__}", FAILURES[failure][1]):
        assert part in message, (part, message)
    assert kernel.calls == 1, "a later call tried the failed kernel again"
    return outs


def _cl(*shape):
    return torch.randn(*shape, device=DEVICE).contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("failure", sorted(FAILURES))
def test_bn_act_falls_back(failure, monkeypatch):
    import kernels
    kernel = _fail(monkeypatch, bn, "bn_act_kernel", failure)
    z, r = _cl(2, 12, 3, 5), _cl(2, 12, 3, 5)
    s, b, rs, rb = (torch.randn(12, device=DEVICE) for _ in range(4))
    ys = _twice_one_warning(lambda: kernels.bn_act(z, s, b, r, rs, rb, relu=True), kernel, "bn_act", failure)
    d = lambda t: t.double().view(1, -1, 1, 1)  # noqa: E731
    ref = torch.relu(z.double() * d(s) + d(b) + r.double() * d(rs) + d(rb))
    for y in ys:
        torch.testing.assert_close(y.double(), ref, atol=1e-5, rtol=1e-5)


def test_bn_backward_falls_back_in_every_mode(monkeypatch):
    """Every mode of tests/test_bn_backward.py against its float64 formulas, on the PyTorch path
    taken after the kernel failed (fp16 storage, channels_last: one shape, the first failure)."""
    from test_bn_backward import MODES, _check, _reference
    kernel = _fail(monkeypatch, bb, "bn_backward_kernel", "mlir_pass_failure")
    shape = (2, 20, 5, 7)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        for mode, make in MODES.items():
            for dtype in (torch.float32, torch.float16):
                kw = make(shape, dtype, True)
                ref = _reference(**{k: v for k, v in kw.items() if not k.endswith("_dtype") and k != "sum_g"},
                                 shape=shape)
                _check(bb.bn_backward(**kw), ref, kw)
    assert kernel.calls == 2, "one try per dtype (one shape)"
    assert len(_fallback_warnings(record)) == 2


def test_bn_backward_reference_matches_the_kernel_with_gates_and_image_terms():
    """The options the float64 formulas of test_bn_backward do not cover (a gate and its gradient,
    the per-image add and its ReLU mask, sum_g_twice, a broadcast or NCHW dy): the fallback's
    PyTorch formulas against the kernel itself."""
    from kernels import reference
    N, C = 2, 20
    sh = (N, C, 3, 5)
    vec, pos = (lambda: torch.randn(C, device=DEVICE)), (lambda: torch.rand(C, device=DEVICE) + 0.5)
    z = _cl(*sh) + 2
    cases = [
        dict(dy=_cl(*sh), relu_out=_cl(*sh), scale=pos(), dz_dtype=torch.float32, dres_dtype=torch.float32,
             res_scale=pos(), sum_g=True, sum_gv=_cl(*sh), sum_gr=_cl(*sh), gate=torch.rand(N, C, device=DEVICE),
             gate_shift=vec()),
        dict(dy=_cl(*sh), relu_in=_cl(*sh), relu_in_scale=pos(), relu_in_shift=vec(), scale=pos(),
             dz_dtype=torch.float16, sum_g=True, sum_gv_is_relu_in=True, gate=torch.rand(N, C, device=DEVICE),
             gate_shift=vec()),
        dict(dy=_cl(*sh), scale=pos(), dz_dtype=torch.float32, sum_g=True, sum_gv=_cl(*sh),
             gate=torch.rand(N, 1, device=DEVICE)),
        dict(dy=_cl(*sh), relu_out=_cl(*sh), scale=pos(), dz_dtype=torch.float32, sum_g=True,
             stats=bb.StatsGrad(z, vec(), pos(), vec(), vec(), vec(), vec(), pos(), 1e-3),
             image_add=torch.randn(N, C, device=DEVICE), image_mask=(z, pos(), vec())),
        dict(dy=None, relu_out=_cl(*sh), scale=pos(), dz_dtype=torch.float32, dres_dtype=torch.float16, sum_g=True,
             sum_gv=_cl(*sh), image_add=torch.randn(N, C, device=DEVICE), image_mask=(_cl(*sh), pos(), vec()),
             sum_g_twice=True),
        dict(dy=torch.ones((), device=DEVICE).expand(sh), relu_out=_cl(*sh), scale=pos(), dz_dtype=torch.float32,
             sum_g=True),
        dict(dy=torch.randn(sh, device=DEVICE), scale=pos(), dz_dtype=torch.float32, sum_g=True,
             sum_gv=torch.randn(sh, device=DEVICE)),
    ]
    real = bb.bn_backward_impl
    for i, kw in enumerate(cases):
        seen = []
        bb.bn_backward_impl = lambda *args: seen.append(args) or real(*args)
        try:
            bb.bn_backward(**kw)
        finally:
            bb.bn_backward_impl = real
        ours, ref = real(*seen[0]), reference.bn_backward_reference(*seen[0])
        for name, o, r in zip(("dz", "dres", "sums", "dparam", "dgate"), ours, ref):
            assert o.shape == r.shape and o.dtype == r.dtype, (i, name)
            if o.numel() == 0:  # not asked for
                continue
            assert o.dim() != 4 or r.is_contiguous(memory_format=torch.channels_last), (i, name)
            tol = 2e-3 if o.dtype == torch.float16 else 1e-5
            torch.testing.assert_close(r.double(), o.double(), rtol=tol, atol=tol * max(1.0, o.abs().max().item()),
                                       msg=f"case {i}: {name}")


def _block_partials(z, rows):
    """(part_mean, part_m2) [T, C] fp32 of z [M, C] in blocks of ``rows`` rows, as the conv epilogue."""
    blocks = z.split(rows)
    mean = torch.stack([b.mean(0) for b in blocks])
    m2 = torch.stack([((b - b.mean(0)) ** 2).sum(0) for b in blocks])
    return mean.float(), m2.float()


@pytest.mark.parametrize("failing", ["both", "rank_merge_only"])
def test_sync_bn_finalize_falls_back_around_its_all_gather(failing, monkeypatch):
    """SyncBN's finalize is two launches around one all-gather (here a stand-in for a group of two
    ranks): whichever launch fails, the gather runs once and the statistics are the group's."""
    calls = []
    torch.manual_seed(1)
    z0, z1 = torch.randn(37, 10, device=DEVICE) * 2 + 3, torch.randn(21, 10, device=DEVICE) - 1
    other = torch.stack([torch.full((10,), 21.0, device=DEVICE), z1.mean(0), ((z1 - z1.mean(0)) ** 2).sum(0)])

    def gather(local, group_name):
        calls.append(group_name)
        return torch.stack([local, other])

    monkeypatch.setattr(bn.sync_bn, "gather_rank_stats", gather)
    launches = []  # ROW_COUNTS of each launch: False, this rank's merge; True, the group's
    only_group = lambda kw: launches.append(kw.get("ROW_COUNTS", False)) or kw.get("ROW_COUNTS", False)  # noqa
    kernel = _fail(monkeypatch, bn, "bn_finalize_kernel", when=None if failing == "both" else only_group)
    gamma, beta = torch.rand(10, device=DEVICE) + 0.5, torch.randn(10, device=DEVICE)
    running = nn.BatchNorm2d(10).to(DEVICE)
    rm, rv, nbt = running.running_mean, running.running_var, running.num_batches_tracked
    with pytest.warns(RuntimeWarning, match="kernels.bn_finalize"):
        st = bn.bn_finalize(*_block_partials(z0, 16), 37, 16, gamma, beta, rm, rv, nbt, 0.1, 1e-5, "group")
    assert calls == ["group"] and kernel.calls == 1
    # this rank's merge ran on Triton, the group's failed (after the gather: no second gather)
    assert launches == ([] if failing == "both" else [False, True])
    both = torch.cat([z0, z1]).double()
    mean, var = both.mean(0), both.var(0, unbiased=False)
    torch.testing.assert_close(st.mean.double(), mean, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(st.var.double(), var, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(st.scale.double(), gamma.double() / (var + 1e-5).sqrt(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(st.shift.double(), beta.double() - mean * st.scale.double(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(rm.double(), 0.1 * mean, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(rv.double(), 0.9 + 0.1 * both.var(0, unbiased=True), atol=1e-6, rtol=1e-5)
    assert nbt.item() == 1


def test_bn_finalize_falls_back(monkeypatch):
    kernel = _fail(monkeypatch, bn, "bn_finalize_kernel", "compilation_error")
    z = torch.randn(45, 12, device=DEVICE) * 3 + 5
    sts = _twice_one_warning(lambda: bn.bn_finalize(*_block_partials(z, 16), 45, 16), kernel, "bn_finalize",
                             "compilation_error")
    for st in sts:
        torch.testing.assert_close(st.mean.double(), z.double().mean(0), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(st.var.double(), z.double().var(0, unbiased=False), atol=1e-4, rtol=1e-5)


def test_squeeze_sums_fall_back(monkeypatch):
    """The conv launch succeeds, the launch merging its per-image sums fails: the sums are merged
    in PyTorch from the same partials."""
    kernel = _fail(monkeypatch, cba, "squeeze_sum_kernel")
    x, w = _cl(3, 8, 3, 5), torch.randn(16, 4, 3, 3, device=DEVICE) / 6

    def run():
        sums = torch.full((3, 16), float("nan"), device=DEVICE)
        y = cba.conv_bn_act_forward(x, w, None, 1, 1, 2, None, None, False, None, None, None, False, False,
                                    None, None, None, None, None, None, 1e-5, squeeze_sums=sums)[0]
        return y, sums

    for y, sums in _twice_one_warning(run, kernel, "squeeze_sum"):
        torch.testing.assert_close(y.double(), nn.functional.conv2d(x.double(), w.double(), padding=1, groups=2),
                                   atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(sums.double(), y.double().sum(dim=(2, 3)), atol=1e-4, rtol=1e-5)


def test_squeeze_excite_kernels_fall_back(monkeypatch):
    from kernels import reference
    k1 = _fail(monkeypatch, se, "relu_squeeze_kernel", "compilation_error")
    z, s, b = _cl(2, 12, 3, 5), torch.rand(12, device=DEVICE) + 0.5, torch.randn(12, device=DEVICE)
    for out in _twice_one_warning(lambda: se.relu_squeeze(z, s, b), k1, "relu_squeeze", "compilation_error"):
        for o, r in zip(out, reference.relu_squeeze_reference(z.double(), s.double(), b.double())):
            torch.testing.assert_close(o.double(), r, atol=1e-5, rtol=1e-5)
    k2 = _fail(monkeypatch, se, "squeeze_backward_kernel", "mlir_pass_failure")
    dm, sums, q = (torch.randn(2, 12, device=DEVICE) for _ in range(3))
    ds, dh = torch.randn(12, device=DEVICE), torch.randn(12, device=DEVICE)
    run = lambda: se.squeeze_backward(dm, sums, s, 15, ds, dh, q)  # noqa: E731
    for out in _twice_one_warning(run, k2, "squeeze_backward", "mlir_pass_failure"):
        for o, r in zip(out, reference.squeeze_backward_reference(*(t.double() for t in (dm, sums, s)), 15,
                                                                  ds.double(), dh.double(), q.double())):
            torch.testing.assert_close(o.double(), r, atol=1e-5, rtol=1e-5)


def test_elementwise_bugs_are_not_swallowed(monkeypatch):
    import kernels
    monkeypatch.setattr(bn, "bn_act_kernel", FailingLaunch(bn.bn_act_kernel, lambda: ValueError("bad block size")))
    z = _cl(1, 8, 2, 2)
    with pytest.raises(ValueError, match="bad block size"):
        kernels.bn_act(z, torch.ones(8, device=DEVICE), torch.zeros(8, device=DEVICE))
    assert not _runtime.FAILED


# --------------------------------------------------------------------------------------
# Through a converted model: the warning names the module, train and eval
# --------------------------------------------------------------------------------------
class _Net(nn.Module):
    """A converted model's block sits at ``layer1.0``."""

    def __init__(self, se: bool):
        super().__init__()
        from helpers import TimmBottleneck
        from test_se_blocks import SEModule
        self.layer1 = nn.Sequential(TimmBottleneck(16, 4, cardinality=2, base_width=64,
                                                   se=SEModule(16, rd_channels=4) if se else None))

    def forward(self, x):
        return self.layer1(x)


MODULE_CASES = [  # (op, kernel module, kernel, mode, squeeze-excite block)
    ("bn_act", "batchnorm", "bn_act_kernel", "train", False),  # the block's one autograd node (BottleneckFn)
    ("bn_act", "batchnorm", "bn_act_kernel", "eval", True),  # the gated final pass
    ("bn_backward", "bn_backward", "bn_backward_kernel", "train", False),  # in the backward
    ("bn_backward", "bn_backward", "bn_backward_kernel", "train", True),
    ("squeeze_sum", "conv_bn_act", "squeeze_sum_kernel", "train", True),  # after conv3's launch
    ("squeeze_sum", "conv_bn_act", "squeeze_sum_kernel", "eval", True),
    ("squeeze_backward", "squeeze_excite", "squeeze_backward_kernel", "train", True),
    ("conv_bn_act", "conv_bn_act", "conv_bn_act_fwd_kernel", "eval", False),
]


@pytest.mark.parametrize("case", MODULE_CASES, ids=lambda c: f"{c[0]}-{c[3]}{'-se' if c[4] else ''}")
def test_converted_block_falls_back_and_names_itself(case, monkeypatch):
    """A kernel of a converted block fails at launch: output, gradients and running statistics
    stay those of the unconverted block over two steps, one warning names the block
    (``layer1.0 (FusedBottleneck)``), the op, the device, the Triton version and the error, and
    the kernel is not tried again."""
    import copy

    import resnext
    from helpers import randomize_bn
    op, module, name, mode, se_block = case
    failure = sorted(FAILURES)[MODULE_CASES.index(case) % len(FAILURES)]
    torch.manual_seed(0)
    ref = randomize_bn(_Net(se_block).to(DEVICE))
    fused = resnext.convert(copy.deepcopy(ref))
    assert type(fused.layer1[0]).__name__ == "FusedBottleneck"
    train = mode == "train"
    ref.train(train)
    fused.train(train)
    kernel = _fail(monkeypatch, sys.modules[f"kernels.{module}"], name, failure)
    x = _cl(2, 16, 4, 4)
    dy = _cl(2, 16, 4, 4)
    calls = []
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        for _ in range(2):
            calls.append(kernel.calls)
            xs = [x.clone().requires_grad_(train) for _ in range(2)]
            ys = [fused(xs[0]), ref(xs[1])]
            torch.testing.assert_close(ys[0], ys[1], atol=1e-4, rtol=1e-4)
            if train:
                for y in ys:
                    (y * dy).sum().backward()
                torch.testing.assert_close(xs[0].grad, xs[1].grad, atol=1e-4, rtol=1e-4)
    # one try per key (the three convolutions differ in shape: three keys), none in the second step
    assert calls[1] == kernel.calls == len(_runtime.FAILED) == (3 if op == "conv_bn_act" else 1)
    if train:
        for (n, p), q in zip(fused.named_parameters(), ref.parameters()):
            torch.testing.assert_close(p.grad, q.grad, atol=2e-4, rtol=1e-4, msg=n)
        for (n, b), c in zip(fused.named_buffers(), ref.buffers()):
            torch.testing.assert_close(b, c, atol=1e-5, rtol=1e-5, msg=n)
    messages = [str(w.message) for w in _fallback_warnings(record)]
    assert len(messages) == kernel.calls  # one warning per key
    for message in messages:
        for part in ("layer1.0 (FusedBottleneck): ", f"kernels.{op}:", f"on {torch.device(DEVICE)}",
                     f"Triton {triton.__version__}", FAILURES[failure][1]):
            assert part in message, (part, message)
