"""resnext.cuda_graphs: inference and whole training steps of a converted model as CUDA graphs.

The argument checks, the shape/dtype/format checks of a call and the undoing of the warm-up
run on the CPU; capture and replay need a GPU (skipped without one).
"""
import contextlib
import copy
import warnings

import pytest
import torch
from helpers import randomize_bn
from torch import nn

import resnext
from resnext import cuda_graphs
from resnext.cuda_graphs import check_like, graph_inference, graph_train_step, memory_format_name

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA GPU")


def _cpu_block():
    return resnext.ConvBNAct(8, 8, 3)


def _spec(t):
    return tuple(t.shape), t.dtype, t.device, memory_format_name(t)


# --------------------------------------------------------------------------------------
# CPU: errors and argument checks
# --------------------------------------------------------------------------------------
def test_inference_on_cpu_raises_runtime_error():
    with pytest.raises(RuntimeError, match="CUDA graphs need a CUDA device"):
        graph_inference(_cpu_block().eval(), torch.randn(2, 8, 4, 4))


def test_train_step_on_cpu_raises_runtime_error():
    model = _cpu_block()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(RuntimeError, match="CUDA graphs need a CUDA device"):
        graph_train_step(model, lambda y, t: (y - t).square().mean(), opt,
                         torch.randn(2, 8, 4, 4), torch.randn(2, 8, 4, 4))


@pytest.mark.skipif(torch.cuda.is_available(), reason="the message without CUDA")
def test_without_cuda_the_message_says_so():
    with pytest.raises(RuntimeError, match=r"torch.cuda.is_available\(\) is False"):
        graph_inference(_cpu_block().eval(), torch.randn(2, 8, 4, 4))


def test_inference_needs_eval_mode():
    model = nn.Sequential(_cpu_block(), _cpu_block()).eval()
    model[1].train()
    with pytest.raises(ValueError, match=r"eval mode.*'1'.*model.eval\(\)"):
        graph_inference(model, torch.randn(2, 8, 4, 4))


@pytest.mark.parametrize("bad, error, match", [
    (dict(autocast_dtype=torch.float32), ValueError, "autocast_dtype"),
    (dict(autocast_dtype="bf16"), ValueError, "autocast_dtype"),
    (dict(warmup_iters=0), ValueError, "warmup_iters"),
    (dict(warmup_iters=1.5), ValueError, "warmup_iters"),
])
def test_inference_argument_checks(bad, error, match):
    with pytest.raises(error, match=match):
        graph_inference(_cpu_block().eval(), torch.randn(2, 8, 4, 4), **bad)


def test_inference_type_checks():
    with pytest.raises(TypeError, match="nn.Module"):
        graph_inference(lambda x: x, torch.randn(2, 8, 4, 4))
    with pytest.raises(TypeError, match="example_input"):
        graph_inference(_cpu_block().eval(), [1.0, 2.0])


def _train_args():
    model = _cpu_block()
    return dict(model=model, loss_fn=nn.MSELoss(), optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                example_input=torch.randn(2, 8, 4, 4), example_target=torch.randn(2, 8, 4, 4))


@pytest.mark.parametrize("change, error, match", [
    (dict(optimizer="sgd"), TypeError, "torch.optim.Optimizer"),
    (dict(loss_fn=3), TypeError, "loss_fn"),
    (dict(model=None), TypeError, "nn.Module"),
    (dict(example_target=1.0), TypeError, "example_target"),
    (dict(autocast_dtype=torch.float64), ValueError, "autocast_dtype"),
    (dict(warmup_iters=-1), ValueError, "warmup_iters"),
])
def test_train_step_argument_checks(change, error, match):
    args = {**_train_args(), **change}
    with pytest.raises(error, match=match):
        graph_train_step(**args)


@pytest.mark.parametrize("opt", [torch.optim.Adam, torch.optim.AdamW])
def test_train_step_needs_a_capturable_optimizer(opt):
    args = _train_args()
    args["optimizer"] = opt(args["model"].parameters(), lr=1e-3, capturable=False)
    with pytest.raises(ValueError, match="capturable=True"):
        graph_train_step(**args)


def test_check_like_names_the_difference():
    x = torch.randn(2, 8, 4, 4).contiguous(memory_format=torch.channels_last)
    spec = _spec(x)
    check_like("x", x.clone(), spec)  # same: passes
    cases = [(torch.randn(3, 8, 4, 4).contiguous(memory_format=torch.channels_last), "shape \\[3, 8, 4, 4\\]"),
             (x.double(), "dtype torch.float64"),
             (x.contiguous(), "memory format contiguous.*channels_last"),
             (x.to("meta"), "device meta")]
    for bad, match in cases:
        with pytest.raises(ValueError, match=match):
            check_like("x", bad, spec)
    with pytest.raises(TypeError, match="torch.Tensor"):
        check_like("target", [0, 1], spec)


def test_memory_format_names():
    x = torch.randn(2, 8, 4, 4)
    assert memory_format_name(x) == "contiguous"
    assert memory_format_name(x.contiguous(memory_format=torch.channels_last)) == "channels_last"
    assert memory_format_name(x[:, ::2]) == "strided"
    assert memory_format_name(torch.arange(5)) == "contiguous"


def test_sgd_with_dampening_warns():
    p = nn.Parameter(torch.randn(3))
    with pytest.warns(UserWarning, match="dampening"):
        cuda_graphs._warn_inexact_fresh_state(torch.optim.SGD([p], lr=0.1, momentum=0.9, dampening=0.5))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cuda_graphs._warn_inexact_fresh_state(torch.optim.SGD([p], lr=0.1, momentum=0.9))


def _bn_mlp():
    model = nn.Sequential(nn.Conv2d(3, 8, 1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 1),
                          nn.BatchNorm2d(4, momentum=None))
    return randomize_bn(model)


@pytest.mark.parametrize("make_opt", [
    lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-2),
    lambda ps: torch.optim.SGD(ps, lr=0.1),
    lambda ps: torch.optim.Adam(ps, lr=1e-2, amsgrad=True),
    lambda ps: torch.optim.AdamW(ps, lr=1e-2),
    lambda ps: torch.optim.RMSprop(ps, lr=1e-2, momentum=0.5),
], ids=["sgd-nesterov", "sgd", "adam-amsgrad", "adamw", "rmsprop"])
@pytest.mark.parametrize("stepped_before", [False, True])
def test_warm_up_is_undone_exactly(make_opt, stepped_before, monkeypatch):
    """The snapshot/restore around the warm-up (run here on the CPU): warm-up steps, then
    restore, then k steps == k steps of an untouched twin, optimizer state created by the
    warm-up included (reset to zero == a fresh state)."""
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device=None: torch.zeros(1))
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device=None: None)
    a = _bn_mlp()
    b = copy.deepcopy(a)
    opt_a, opt_b = make_opt(a.parameters()), make_opt(b.parameters())
    xs = [torch.randn(4, 3, 5, 5) for _ in range(4)]

    def step(model, opt, x):
        opt.zero_grad(set_to_none=True)
        model(x).square().mean().backward()
        opt.step()

    if stepped_before:
        step(a, opt_a, xs[0])
        step(b, opt_b, xs[0])
    snap = cuda_graphs._Snapshot(a, opt_a, torch.device("cpu"))
    for _ in range(3):
        step(a, opt_a, torch.randn(4, 3, 5, 5) * 3)
    snap.restore(a, opt_a)
    assert all(p.grad is None for p in a.parameters())
    for x in xs[1:]:
        step(a, opt_a, x)
        step(b, opt_b, x)
    for (name, ta), tb in zip(a.state_dict().items(), b.state_dict().values()):
        torch.testing.assert_close(ta, tb, rtol=1e-6, atol=1e-7, msg=name)
    for pa, pb in zip(a.parameters(), b.parameters()):
        for k, va in opt_a.state[pa].items():
            vb = opt_b.state[pb][k]
            torch.testing.assert_close(torch.as_tensor(va), torch.as_tensor(vb), rtol=1e-6, atol=1e-7, msg=k)


# --------------------------------------------------------------------------------------
# GPU: capture and replay
# --------------------------------------------------------------------------------------
def _tiny_model(momentum_none=False):
    model = randomize_bn(resnext.ResNet([1, 1, 1, 1], num_classes=10, groups=4, width_per_group=4,
                                        base_channels=16))
    if momentum_none:  # layer1's BatchNorms as cumulative averages (factor from num_batches_tracked)
        for m in model.layer1.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.momentum = None
    return resnext.convert(model).cuda().to(memory_format=torch.channels_last)


def _autocast(dtype):
    return contextlib.nullcontext() if dtype is None else torch.autocast("cuda", dtype)


def _images(n=8, size=64):
    return torch.randn(n, 3, size, size, device="cuda").contiguous(memory_format=torch.channels_last)


@pytest.fixture
def deterministic_cudnn(monkeypatch):
    """The stem (cuDNN) is the only part whose backward may use atomics."""
    monkeypatch.setattr(torch.backends.cudnn, "deterministic", True)
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)


@needs_cuda
@pytest.mark.parametrize("autocast_dtype", [None, torch.bfloat16])
def test_graphed_inference_equals_eager(autocast_dtype):
    model = _tiny_model().eval()
    infer = graph_inference(model, _images(), autocast_dtype=autocast_dtype)
    for _ in range(3):
        x = _images()
        y = infer(x)
        with torch.no_grad(), _autocast(autocast_dtype):
            ref = model(x)
        assert y.dtype == ref.dtype
        if autocast_dtype is None:
            torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
        else:
            torch.testing.assert_close(y.float(), ref.float(), rtol=2e-2, atol=2e-2)


@needs_cuda
def test_graphed_inference_static_output_and_clone():
    model = _tiny_model().eval()
    x1, x2 = _images(), _images()
    infer = graph_inference(model, x1)
    y1 = infer(x1)
    y1_copy = y1.clone()
    y2 = infer(x2)
    assert y2 is y1, "the static output is returned (and overwritten) by every call"
    assert not torch.equal(y1_copy, y2)
    infer_c = graph_inference(model, x1, clone=True)
    a, b = infer_c(x1), infer_c(x2)
    assert a is not b and a.data_ptr() != b.data_ptr()
    torch.testing.assert_close(a, y1_copy, rtol=1e-5, atol=1e-5)


@needs_cuda
def test_graphed_inference_sees_in_place_weight_updates():
    model = _tiny_model().eval()
    infer = graph_inference(model, _images())
    other = randomize_bn(_tiny_model(), seed=1).eval()
    model.load_state_dict(other.state_dict())  # copies into the same tensors
    x = _images()
    with torch.no_grad():
        ref = other(x)
    torch.testing.assert_close(infer(x), ref, rtol=1e-5, atol=1e-5)


@needs_cuda
def test_graphed_inference_rejects_a_different_input():
    infer = graph_inference(_tiny_model().eval(), _images())
    with pytest.raises(ValueError, match="shape"):
        infer(_images(n=4))
    with pytest.raises(ValueError, match="memory format contiguous"):
        infer(_images().contiguous())
    with pytest.raises(ValueError, match="dtype"):
        infer(_images().half())
    with pytest.raises(ValueError, match="device cpu"):
        infer(_images().cpu())


@needs_cuda
def test_capture_inside_autocast_is_refused():
    with torch.autocast("cuda", torch.bfloat16), pytest.raises(ValueError, match="autocast_dtype="):
        graph_inference(_tiny_model().eval(), _images())


def _make_opt(kind, params):
    if kind == "sgd":
        return torch.optim.SGD(params, lr=0.05, momentum=0.9, weight_decay=1e-4)
    return torch.optim.Adam(params, lr=1e-3, capturable=True)


def _eager_step(model, opt, x, target, autocast_dtype):
    opt.zero_grad(set_to_none=True)
    with _autocast(autocast_dtype):
        loss = nn.functional.cross_entropy(model(x), target)
    loss.backward()
    opt.step()
    return loss.detach()


@needs_cuda
@pytest.mark.parametrize("kind", ["sgd", "adam"])
@pytest.mark.parametrize("autocast_dtype", [None, torch.bfloat16], ids=["fp32", "bf16"])
def test_graphed_train_steps_equal_eager_steps(kind, autocast_dtype, deterministic_cudnn):
    graphed = _tiny_model(momentum_none=True).train()
    eager = copy.deepcopy(graphed)
    opt_g, opt_e = _make_opt(kind, graphed.parameters()), _make_opt(kind, eager.parameters())
    xs = [_images() for _ in range(4)]
    ts = [torch.randint(0, 10, (8,), device="cuda") for _ in range(4)]
    before = copy.deepcopy(graphed.state_dict())
    step = graph_train_step(graphed, nn.CrossEntropyLoss(), opt_g, xs[0], ts[0], autocast_dtype=autocast_dtype)
    for k, v in graphed.state_dict().items():  # the warm-up left no trace
        assert torch.equal(v, before[k]), f"{k} changed by the warm-up/capture"
    tol = dict(rtol=1e-4, atol=1e-5) if autocast_dtype is None else dict(rtol=1e-3, atol=1e-3)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*capturable=True.*")
        for x, t in zip(xs[1:], ts[1:]):
            loss_g = step(x, t).clone()
            loss_e = _eager_step(eager, opt_e, x, t, autocast_dtype)
            torch.testing.assert_close(loss_g, loss_e, **tol)
    torch.cuda.synchronize()
    for (name, pg), pe in zip(graphed.named_parameters(), eager.parameters()):
        torch.testing.assert_close(pg, pe, **tol, msg=name)
        torch.testing.assert_close(pg.grad, pe.grad, rtol=tol["rtol"] * 10, atol=tol["atol"] * 10, msg=name)
    stats = 0
    for (name, mg), me in zip(graphed.named_modules(), eager.modules()):
        if isinstance(mg, nn.BatchNorm2d):
            stats += 1
            assert mg.num_batches_tracked.item() == me.num_batches_tracked.item() == 3, name
            bn_tol = tol if autocast_dtype is None else dict(rtol=1e-2, atol=1e-3)
            torch.testing.assert_close(mg.running_mean, me.running_mean, **bn_tol, msg=name)
            torch.testing.assert_close(mg.running_var, me.running_var, **bn_tol, msg=name)
    assert stats > 0


@needs_cuda
def test_graphed_train_step_rejects_a_different_target():
    model = _tiny_model().train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    step = graph_train_step(model, nn.CrossEntropyLoss(), opt, _images(), torch.randint(0, 10, (8,), device="cuda"))
    with pytest.raises(ValueError, match="target has shape"):
        step(_images(), torch.randint(0, 10, (4,), device="cuda"))
    with pytest.raises(ValueError, match="target has dtype"):
        step(_images(), torch.randint(0, 10, (8,), device="cuda", dtype=torch.int32))


@needs_cuda
def test_replays_do_not_allocate():
    model = _tiny_model()
    x, t = _images(), torch.randint(0, 10, (8,), device="cuda")
    infer = graph_inference(copy.deepcopy(model).eval(), x)
    step = graph_train_step(model.train(), nn.CrossEntropyLoss(), torch.optim.SGD(model.parameters(), lr=0.01,
                                                                                   momentum=0.9), x, t)
    for run in (lambda: infer(x), lambda: step(x, t)):
        run()
        torch.cuda.synchronize()
        start = torch.cuda.memory_allocated()
        for _ in range(10):
            run()
            assert torch.cuda.memory_allocated() == start, "a replay allocated memory"
        torch.cuda.synchronize()
        assert torch.cuda.memory_allocated() == start
