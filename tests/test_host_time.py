"""The host-time benchmark and the launch-economy report run, at tiny size, and write
well-formed results (no time is asserted: on a shared CPU they mean nothing)."""
import json

import pytest
import torch
import torch.nn.functional as F

from benchmarks import cases, config, host_time, report, results, tables, workloads
from benchmarks.device_ops import forced_triton_path, launches

pytestmark = pytest.mark.no_poison  # counts and host times of the code as it is


def test_noop_convolutions_compute_nothing_and_restore():
    x = torch.randn(2, 8, 6, 6).to(memory_format=torch.channels_last).requires_grad_()
    w = torch.randn(16, 4, 3, 3, requires_grad=True)
    ref = F.conv2d(x, w, stride=2, padding=1, groups=2)
    with host_time.noop_convolutions():
        y = F.conv2d(x, w, stride=2, padding=1, groups=2)
        assert y.shape == ref.shape and y.is_contiguous(memory_format=torch.channels_last)
        y.sum().backward()
        assert x.grad.shape == x.shape and w.grad.shape == w.shape
    torch.testing.assert_close(F.conv2d(x, w, stride=2, padding=1, groups=2), ref)  # PyTorch's kernel is back


def test_forced_path_and_launch_patches_restore():
    from kernels import _runtime
    from triton.runtime.jit import JITFunction
    before, run = _runtime.INTERPRET, JITFunction.run
    with forced_triton_path(not before), launches("noop"):
        assert _runtime.INTERPRET is (not before) and JITFunction.run is not run
    assert _runtime.INTERPRET is before and JITFunction.run is run


def test_host_time_cli_writes_valid_results(tmp_path, capsys):
    rc = host_time.main(["--tiny", "--workloads", workloads.BOTTLENECK, "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert rc == 0
    assert "Host time per step" in out
    if not torch.cuda.is_available():
        assert "NO CUDA GPU" in out
    (path,) = tmp_path.glob("*.json")
    doc = json.loads(path.read_text())
    assert results.validate(doc) == [] and path.name.endswith("_host-time.json")
    recs = doc["records"]
    assert [(r["level"], r["name"], r["mode"], r["status"]) for r in recs] == [
        ("host", workloads.BOTTLENECK, "train", "ok"), ("host", workloads.BOTTLENECK, "inference", "ok")]
    for r in recs:
        assert set(r["host_ms"]) == {"eager", "ours"} and all(v > 0 for v in r["host_ms"].values())
        assert r["median_ms"] is None and r["speed"] is False
    assert "## Host time" in path.with_suffix(".md").read_text()


def test_report_case_and_document(tmp_path):
    """One report case of the smoke grid end to end: counts, saved bytes, host and CPU times."""
    ctx = config.make_context(full=False, device="cpu")
    ctx.ceilings = None
    grid = cases.cases_for("report", ctx)
    assert {(c.name, c.mode) for c in grid} == {(w, m) for w in report.SMOKE_WORKLOADS for m in report.MODES}
    case = next(c for c in grid if c.name == workloads.BOTTLENECK and c.mode == "train")
    rec = cases.run_case(case, ctx)
    assert rec.pop("_exception", None) is None and rec["status"] == "ok", rec.get("reason")
    ops = rec["device_ops"]
    assert ops["eager"]["triton"] == 0 and ops["eager"]["by_name"]["aten::conv2d"] == 3
    assert ops["ours"]["triton"] >= 3  # at least one launch per convolution
    assert rec["saved_bytes"]["eager"] > 0 and rec["saved_bytes"]["ours"] > 0
    assert rec["host_ms"]["eager"] > 0 and rec["cpu_ratio"] > 0
    col = results.Collector(ctx, argv=["pytest"], out_dir=tmp_path)
    col.add(rec)
    doc = json.loads(col.finish()["json"].read_text())
    assert results.validate(doc) == []
    text = tables.format_report(doc["records"], cuda=False)
    assert "NO CUDA GPU" in text and workloads.BOTTLENECK in text and "-> " in text


def test_steady_step_reuses_memos_and_skips_autograd_functions_in_inference(monkeypatch):
    """Host-time guards (issue 13; counted, never timed): in a steady-state training step the
    conv-input checks, launch configurations and layout tests come from their memos (no miss),
    records one autograd node per block (``BottleneckFn``), and an inference forward under
    no_grad calls no autograd.Function (one costs ~10-30 us of host time even when it records
    nothing)."""
    import sys

    from benchmarks.device_ops import host_only
    from kernels import _runtime
    from kernels.batchnorm import BNActFn
    from kernels.bottleneck import BottleneckFn
    from kernels.conv_bn_act import ConvBNActFn
    from resnext import modules
    fwd = sys.modules["kernels.conv_bn_act"]  # (kernels.conv_bn_act is also a function's name)
    memos = (fwd._check_conv_meta, fwd._launch_consts, _runtime._rows_config, modules._channels_last_strides)
    _, fused = workloads.make_pair(workloads.BOTTLENECK)
    x = workloads.example_input(workloads.BOTTLENECK, 2, 8, torch.device("cpu"), requires_grad=True)
    none = {"ConvBNActFn": 0, "BNActFn": 0, "BottleneckFn": 0}
    calls = dict(none)

    def counting(name, apply):
        def counted(*args):
            calls[name] += 1
            return apply(*args)
        return staticmethod(counted)

    monkeypatch.setattr(ConvBNActFn, "apply", counting("ConvBNActFn", ConvBNActFn.apply))
    monkeypatch.setattr(BNActFn, "apply", counting("BNActFn", BNActFn.apply))
    monkeypatch.setattr(BottleneckFn, "apply", counting("BottleneckFn", BottleneckFn.apply))
    with host_only():
        stepper = workloads.Stepper(fused, x, True).warm()
        misses = [m.cache_info().misses for m in memos]
        hits = [m.cache_info().hits for m in memos]
        calls.update(none)
        stepper.step()
        assert [m.cache_info().misses for m in memos] == misses
        assert all(m.cache_info().hits > h for m, h in zip(memos, hits))
        assert calls == dict(none, BottleneckFn=1)  # training: one node for the block
        fused.eval()
        calls.update(none)
        with torch.no_grad():
            fused(x)
        assert calls == none
        fused(x)  # eval with grad enabled: through the Functions (gradients reach x and the weights)
        assert calls["ConvBNActFn"] == 3


@pytest.mark.parametrize("no_grad", [torch.no_grad, torch.inference_mode])
@pytest.mark.parametrize("channels_last", [False, True])  # weights and input: the output's layout follows
def test_inference_forward_skips_the_op_outputs_and_matches(monkeypatch, no_grad, channels_last):
    """An inference forward launches through ``conv_bn_act_eval`` (y alone: no call of the op's
    body and its four empty statistics outputs; the launch's constant arguments memoised, no
    miss once steady), with the values and layout of the eval forward through the Functions."""
    import sys

    fwd = sys.modules["kernels.conv_bn_act"]
    from resnext import modules
    torch.manual_seed(0)
    _, fused = workloads.make_pair(workloads.BOTTLENECK)
    fused.eval()
    x = workloads.example_input(workloads.BOTTLENECK, 2, 8, torch.device("cpu"))
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    fused, x = fused.to(memory_format=fmt), x.contiguous(memory_format=fmt)
    ref = fused(x).detach()  # grad enabled: ConvBNActFn -> conv_bn_act_forward
    calls = {"op body": 0}
    body = modules.conv_bn_act_forward

    def counted(*args):
        calls["op body"] += 1
        return body(*args)

    monkeypatch.setattr(modules, "conv_bn_act_forward", counted)
    with no_grad():
        fused(x)
        misses = fwd._launch_consts.cache_info().misses
        y = fused(x)
    assert calls == {"op body": 0}
    assert fwd._launch_consts.cache_info().misses == misses
    assert y.is_contiguous(memory_format=torch.channels_last) == channels_last and y.is_contiguous() != channels_last
    torch.testing.assert_close(y, ref, rtol=0, atol=0)  # the same launches
    with torch.no_grad():
        eager = workloads.make_pair(workloads.BOTTLENECK)[0]
        eager.load_state_dict(fused.state_dict())
        expect = eager.eval().double()(x.double())
    torch.testing.assert_close(y.double(), expect, rtol=1e-4, atol=1e-4)
