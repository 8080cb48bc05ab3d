"""Checks that need a CUDA GPU (skipped honestly elsewhere): large tensors, memory, CUDA graphs."""
import copy

import pytest
import torch
from helpers import randomize_bn
from torch import nn

import kernels
import resnext

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _tiny_model():
    return randomize_bn(resnext.ResNet([1, 1, 1, 1], num_classes=10, groups=4, width_per_group=4,
                                       base_channels=16)).cuda().to(memory_format=torch.channels_last)


def _train_step(model, opt, x, target):
    opt.zero_grad(set_to_none=False)
    loss = nn.functional.cross_entropy(model(x), target)
    loss.backward()
    opt.step()
    return loss


def test_index_arithmetic_past_2_31_elements():
    """bn_act and a 1x1 conv on a channels_last tensor of more than 2**31 elements (int64 offsets)."""
    N, C, H, W = 33, 256, 512, 512  # 2.2e9 elements, 4.4 GB in bf16
    z = torch.empty(N, C, H, W, device="cuda", dtype=torch.bfloat16,
                    memory_format=torch.channels_last).uniform_(-1, 1)
    scale, shift = torch.rand(C, device="cuda") + 0.5, torch.randn(C, device="cuda")
    y = kernels.bn_act(z, scale, shift, relu=True)
    for n in (0, N - 1):  # the first and the last image, beyond the 2**31-th element
        ref = torch.relu(z[n].float() * scale.view(-1, 1, 1) + shift.view(-1, 1, 1))
        torch.testing.assert_close(y[n].float(), ref, atol=2e-2, rtol=2e-2)
    del y
    w = torch.randn(16, C, 1, 1, device="cuda", dtype=torch.bfloat16) / C ** 0.5
    out, _, _ = kernels.conv1x1_bn_act(z, w)
    ref = nn.functional.conv2d(z[N - 1:].float(), w.float())
    torch.testing.assert_close(out[N - 1:].float(), ref, atol=5e-2, rtol=5e-2)


def test_grouped_conv_and_backward_past_2_31_elements():
    """The grouped 3x3 forward, its data and weight gradients and the BN/ReLU backward on
    tensors of more than 2**31 elements: the last image (past the 2**31-th element) is right."""
    from kernels.conv_grad import conv_dgrad, conv_wgrad
    N, C, H, W, G = 33, 256, 512, 512, 32  # 2.2e9 elements, 4.4 GB in bf16
    big = dict(device="cuda", dtype=torch.bfloat16, memory_format=torch.channels_last)
    x = torch.empty(N, C, H, W, **big).uniform_(-1, 1)
    w = (torch.randn(C, C // G, 3, 3, device="cuda") / 3).to(torch.bfloat16)
    last = slice(N - 1, N)
    y, _, _ = kernels.conv3x3_bn_act(x, w, 1, G)
    ref = nn.functional.conv2d(x[last].float(), w.float(), padding=1, groups=G)
    torch.testing.assert_close(y[last].float(), ref, atol=5e-2, rtol=5e-2)
    del y
    dz = torch.empty(N, C, H, W, **big).uniform_(-1, 1)
    dx = conv_dgrad(dz, w, (H, W), 1, 1, G)
    ref = torch.nn.grad.conv2d_input((1, C, H, W), w.float(), dz[last].float(), padding=1, groups=G)
    torch.testing.assert_close(dx[last].float(), ref, atol=5e-2, rtol=5e-2)
    del dx
    dw = conv_wgrad(dz, x, w.shape, 1, 1, G)
    ref = torch.nn.grad.conv2d_weight(x.float(), w.shape, dz.float(), padding=1, groups=G)
    torch.testing.assert_close(dw, ref, atol=1e-2 * ref.abs().max().item(), rtol=1e-2)
    del dw, ref
    scale, shift = torch.rand(C, device="cuda") + 0.5, torch.randn(C, device="cuda")
    z = x.requires_grad_()
    kernels.bn_act(z, scale, shift, relu=True).backward(dz)
    pre = x[last].float() * scale.view(-1, 1, 1) + shift.view(-1, 1, 1)
    ref = dz[last].float() * (pre > 0) * scale.view(-1, 1, 1)
    torch.testing.assert_close(z.grad[last].float(), ref, atol=2e-2, rtol=2e-2)


def test_no_memory_growth_over_100_steps_and_peak_not_above_eager():
    eager = _tiny_model().train()
    fused = resnext.convert(copy.deepcopy(eager)).train()
    x = torch.randn(16, 3, 64, 64, device="cuda").contiguous(memory_format=torch.channels_last)
    target = torch.randint(0, 10, (16,), device="cuda")
    peaks = []
    for model in (eager, fused):
        opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
        with torch.autocast("cuda", torch.bfloat16):
            for _ in range(3):
                _train_step(model, opt, x, target)
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            start = torch.cuda.memory_allocated()
            for _ in range(100):
                _train_step(model, opt, x, target)
            torch.cuda.synchronize()
        assert torch.cuda.memory_allocated() <= start, "memory grew over 100 training steps"
        peaks.append(torch.cuda.max_memory_allocated() - start)
    assert peaks[1] <= peaks[0], f"peak of a training step: fused {peaks[1]} B, eager {peaks[0]} B"


def test_training_step_captures_in_a_cuda_graph():
    model = resnext.convert(_tiny_model()).train()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    x = torch.randn(8, 3, 64, 64, device="cuda").contiguous(memory_format=torch.channels_last)
    target = torch.randint(0, 10, (8,), device="cuda")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up (compiles the kernels) outside the capture
        for _ in range(3):
            _train_step(model, opt, x, target)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        loss = _train_step(model, opt, x, target)
    before = model.fc.weight.detach().clone()
    graph.replay()
    torch.cuda.synchronize()
    assert torch.isfinite(loss).item()
    assert not torch.equal(before, model.fc.weight), "the replayed step did not update the parameters"
