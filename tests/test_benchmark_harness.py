"""The benchmark harness on the CPU: counting, shapes, timing logic, results schema,
headline formatting, the profiler's bookkeeping, and the CPU path end to end.

Figures checked by hand (see /work/shared/NOTES.md): a stage-1 grouped 3x3 of ResNeXt-50
at batch 256 in bf16 is 7.4 GFLOP and moves 411 MB at least; the bottleneck byte budgets
are 4352 / 3456 / 1792 units of H*W elements (eager ResNeXt / eager ResNet / fused).
"""
import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks import cases, ceilings, config, counting, headline, results, shapes, timing
from benchmarks import profile as bprofile
from benchmarks.progress import Progress

ROOT = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------------------
# Shapes
# ----------------------------------------------------------------------------------------
def test_grouped_3x3_shapes_match_the_table():
    """NOTES.md's table: (channels, input side, stride, channels/group) -> count in 50 / 101."""
    expected = {
        (128, 56, 1, 4): (3, 3), (256, 56, 2, 8): (1, 1), (256, 28, 1, 8): (3, 3), (512, 28, 2, 16): (1, 1),
        (512, 14, 1, 16): (5, 22), (1024, 14, 2, 32): (1, 1), (1024, 7, 1, 32): (2, 2),
    }
    c50 = shapes.conv_counts("resnext50_32x4d")
    c101 = shapes.conv_counts("resnext101_32x4d")
    got = {}
    for c in shapes.unique_convs(kind="conv3x3"):
        assert c.groups == 32 and c.cin == c.cout
        got[(c.cin, c.h, c.stride, c.cin_per_group)] = (c50.get(c, 0), c101.get(c, 0))
    assert got == expected


def test_model_conv_counts():
    for arch, blocks in (("resnet50", 16), ("resnet101", 33), ("resnext50_32x4d", 16), ("resnext101_32x4d", 33)):
        convs = shapes.model_convs(arch)
        assert len(convs) == 3 * blocks + 4  # three per block + a downsample per stage
        assert sum(c.role == "conv2" for c in convs) == blocks
    assert len(shapes.unique_convs(kind="conv1x1")) == 16  # every 1x1 of ResNeXt-50/101: 4 roles x 4 stages


def test_stage_sizes_follow_the_image():
    assert [shapes.stage_input_size(s) for s in (1, 2, 3, 4)] == [56, 56, 28, 14]
    assert [shapes.block_convs("resnext50_32x4d", s, 1, 32)[0].h for s in (1, 2, 3, 4)] == [8, 4, 2, 1]


# ----------------------------------------------------------------------------------------
# Counting
# ----------------------------------------------------------------------------------------
def _conv(label_role, stage, cin, cout, k, stride, groups, h):
    return shapes.ConvShape(label_role, stage, cin, cout, k, stride, groups, h, h)


def test_grouped_3x3_flops_and_bytes_by_hand():
    c = _conv("conv2", 1, 128, 128, 3, 1, 32, 56)
    # 2 * N*Ho*Wo * Cout * Cin_g*3*3 = 2 * 256*3136 * 128 * 36
    assert counting.conv_flops(c, 256) == 7_398_752_256
    act = 256 * 128 * 56 * 56 * 2  # 205.5 MB in bf16
    weights = 128 * 4 * 9 * 2
    vectors = 4 * 128 * 4
    assert counting.conv_min_bytes(c, 256, "bf16", "eval") == 2 * act + weights + vectors  # ~411 MB
    assert abs(counting.conv_min_bytes(c, 256, "bf16") / 1e6 - 411) < 1
    assert counting.conv_flops(c, 256, "backward") == 2 * 7_398_752_256


def test_arithmetic_intensity_range_of_the_stages():
    """NOTES: 18 to 142 FLOP/byte at batch 256 in bf16 (the stride-1 layers; the strided
    first layers read 4x more than they write: 14 to 71): all under H100's ~295 ridge."""
    ai = {c: counting.conv_flops(c, 256) / counting.conv_min_bytes(c, 256, "bf16")
          for c in shapes.unique_convs(kind="conv3x3")}
    stride1 = [v for c, v in ai.items() if c.stride == 1]
    assert min(stride1) == pytest.approx(18.0, abs=0.1)
    assert max(stride1) == pytest.approx(142.0, abs=1.0)
    assert max(ai.values()) < 295 and min(ai.values()) > 14


def test_1x1_with_residual_and_strided_3x3_by_hand():
    c = _conv("conv3", 1, 128, 256, 1, 1, 1, 56)
    assert c.residual and c.relu and c.kind == "conv1x1"
    assert counting.conv_flops(c, 1) == 2 * 3136 * 256 * 128
    x, y, w = 128 * 3136 * 4, 256 * 3136 * 4, 256 * 128 * 4
    assert counting.conv_min_bytes(c, 1, "fp32") == x + w + y + y + 4 * 256 * 4  # residual read + y written
    s2 = _conv("conv2", 2, 256, 256, 3, 2, 32, 56)
    assert (s2.ho, s2.wo) == (28, 28)
    assert counting.conv_flops(s2, 1) == 2 * 28 * 28 * 256 * 8 * 9


def test_model_gmacs_match_published_figures():
    # torchvision's model cards (GMACs at 224x224) and the paper's 8.0 GFLOPs for ResNeXt-101 32x4d
    for arch, gmacs in (("resnet50", 4.09), ("resnet101", 7.80), ("resnext50_32x4d", 4.23),
                        ("resnext101_32x4d", 7.97)):
        assert counting.model_flops(arch, 1) / 2e9 == pytest.approx(gmacs, abs=0.01)
    assert counting.model_flops("resnet50", 32, "train") == 3 * 32 * counting.model_flops("resnet50", 1)


def test_bottleneck_byte_budgets():
    assert counting.bottleneck_traffic(256, 128, 256, "eager") == 4352  # eager ResNeXt-50 stage 1
    assert counting.bottleneck_traffic(256, 64, 256, "eager") == 3456  # eager ResNet-50 stage 1
    assert counting.bottleneck_traffic(256, 128, 256, "fused") == 1792  # the fused design
    with pytest.raises(ValueError):
        counting.bottleneck_traffic(256, 128, 256, "magic")


def test_block_counts_sum_their_convs():
    convs = shapes.block_convs("resnext50_32x4d", 1, 1)
    assert counting.block_flops("resnext50_32x4d", 1, 1, 4) == sum(counting.conv_flops(c, 4) for c in convs)
    fwd = counting.block_min_bytes("resnext50_32x4d", 1, 1, 4, "bf16")
    assert fwd == 2 * (4 * 256 * 3136 * 2) + 2 * (256 * 128 + 128 * 4 * 9 + 128 * 256)
    assert counting.block_min_bytes("resnext50_32x4d", 1, 1, 4, "bf16", "fwdbwd") == 2 * fwd


# ----------------------------------------------------------------------------------------
# Ceilings and roofline
# ----------------------------------------------------------------------------------------
CEIL = {"copy_GBps": 3000.0, "matmul_bf16_TFLOPs": 800.0, "matmul_fp32_TFLOPs": 400.0}


def test_roofline_floor_and_fraction():
    # memory-bound: 3 GB at 3000 GB/s = 1 ms, 1 TFLOP at 800 TFLOP/s = 1.25 ms -> compute decides
    assert ceilings.roofline_floor_s(10 ** 12, 3 * 10 ** 9, CEIL, "bf16") == pytest.approx(1.25e-3)
    assert ceilings.roofline_floor_s(10 ** 9, 3 * 10 ** 9, CEIL, "bf16") == pytest.approx(1e-3)
    assert ceilings.roofline_fraction(2e-3, 10 ** 9, 3 * 10 ** 9, CEIL, "bf16") == pytest.approx(0.5)
    assert ceilings.ridge_point(CEIL, "bf16") == pytest.approx(800e12 / 3000e9)
    assert ceilings.ridge_point(CEIL, "fp32") == pytest.approx(400e12 / 3000e9)
    assert ceilings.roofline_fraction(1.0, None, None, CEIL, "bf16") is None


def test_ceilings_measure_on_cpu():
    c = ceilings.measure_ceilings(torch.device("cpu"), smoke=True)
    assert c["copy_GBps"] > 0 and c["matmul_bf16_TFLOPs"] > 0 and c["matmul_fp32_TFLOPs"] > 0 and c["smoke"]


# ----------------------------------------------------------------------------------------
# Timing
# ----------------------------------------------------------------------------------------
def test_rotation_count_spans_the_l2():
    l2 = 50 << 20
    assert timing.rotation_count(400 << 20, l2) == 1  # one big input already leaves the cache
    assert timing.rotation_count(10 << 20, l2) == 10  # 2 x 50 MiB / 10 MiB
    assert timing.rotation_count(1, l2) == 16  # capped
    assert timing.rotation_count(0, l2) == 1
    r = timing.Rotation(["a", "b", "c"])
    assert [r.next() for _ in range(5)] == ["a", "b", "c", "a", "b"]
    with pytest.raises(ValueError):
        timing.Rotation([])


def test_repetitions_and_stats():
    assert timing.repetitions(1.0, 100.0, 5, 1000) == 100
    assert timing.repetitions(1000.0, 100.0, 5, 1000) == 5
    t = timing.Timing([1.0, 2.0, 3.0, 4.0, 100.0], "cpu_perf_counter")
    assert t.median_ms == 3.0 and t.min_ms == 1.0
    assert t.as_dict()["n_samples"] == 5


def test_measure_on_cpu_runs_warmup_and_reps():
    calls = []
    t = timing.measure(lambda: calls.append(1), torch.device("cpu"), warmup_ms=0.0, rep_ms=0.0, min_reps=7)
    assert t.method == "cpu_perf_counter" and len(t.samples_ms) == 7
    assert len(calls) == 1 + 1 + 7  # estimate + one warm-up + timed
    s = timing.measure(lambda: calls.append(1), torch.device("cpu"), single=True)
    assert s.method == "single_call" and len(s.samples_ms) == 1 and s.peak_mem_bytes is None


class _FakeEvent:
    """Stands in for torch.cuda.Event: records host time (the GPU path's logic, on the CPU)."""

    def __init__(self, enable_timing=True):
        self.t = None

    def record(self):
        import time
        self.t = time.perf_counter()

    def elapsed_time(self, other):
        return (other.t - self.t) * 1e3


def test_cuda_timing_path_logic(monkeypatch):
    monkeypatch.setattr(torch.cuda, "Event", _FakeEvent)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a, **k: None)
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda *a, **k: None)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda *a, **k: 123)
    calls = []
    t = timing.measure(lambda: calls.append(1), torch.device("cuda"), warmup_ms=0.0, rep_ms=0.0, min_reps=6)
    assert t.method == "cuda_events" and len(t.samples_ms) == 6 and t.peak_mem_bytes == 123
    assert len(calls) == 1 + 3 + 1 + 6  # first call, estimate, warm-up, timed
    assert t.warmup_calls == 1 + 4


def test_pytest_benchmark_driver_on_gpu():
    """On a GPU: pytest-benchmark gets a synchronising timer and ~20 ms rounds of kernel calls."""
    import time

    class FakeBenchmark:
        _timer = time.perf_counter
        group = None

        def pedantic(self, fn, **kw):
            self.kw = kw

    ctx = config.RunContext(torch.device("cuda"), config.FULL, interpret=False)
    case = cases.Case("kernel", "k", "eval", "bf16", 32, "ours", shape=_conv("conv2", 1, 32, 32, 3, 1, 8, 4))
    b = FakeBenchmark()
    cases.drive_pytest_benchmark(b, lambda: None, case, ctx, timing.Timing([0.5, 0.5, 0.5], "cuda_events"))
    assert b._timer is timing.synced_perf_counter and b.group == case.group
    assert b.kw == dict(rounds=5, iterations=40, warmup_rounds=1)
    model = cases.Case("model", "resnet50", "train", "bf16", 32, "eager", arch="resnet50")
    cases.drive_pytest_benchmark(b, lambda: None, model, ctx, timing.Timing([300.0], "cuda_events"))
    assert b.kw == dict(rounds=3, iterations=1, warmup_rounds=1)


# ----------------------------------------------------------------------------------------
# Cases: grid and skip rules
# ----------------------------------------------------------------------------------------
def test_full_grid_covers_the_issue():
    ctx = config.RunContext(torch.device("cuda"), config.FULL, interpret=False)
    kc = cases.kernel_cases(ctx)
    assert len({c.shape for c in kc}) == 7 + 16
    assert {c.batch for c in kc} == {32, 64, 128, 256} and {c.dtype for c in kc} == {"bf16", "fp32"}
    assert {c.shape.cin_per_group for c in kc if c.shape.kind == "conv3x3"} == {4, 8, 16, 32}
    assert {c.mode for c in kc} == {"eval", "train", "backward"}
    mc = cases.model_cases(ctx)
    assert {c.arch for c in mc} == set(shapes.MODELS) and {c.dtype for c in mc} == {"bf16"}
    assert 32 in {c.batch for c in mc} and max(c.batch for c in mc) > 32
    ids = [c.id for c in kc + cases.block_cases(ctx) + mc]
    assert len(ids) == len(set(ids))
    cm = cases.Case("model", "resnet50", "train", "bf16", 32, "compile_max", arch="resnet50")
    assert "inference only" in cases.skip_reason(cm, ctx)
    assert cases.skip_reason(cases.Case("model", "resnet50", "train", "bf16", 32, "ours", arch="resnet50"), ctx) is None


def test_cpu_skip_rules():
    smoke = config.RunContext(torch.device("cpu"), config.SMOKE, interpret=True)
    big = cases.Case("model", "resnet50", "train", "fp32", 2, "ours", arch="resnet50", image=32)
    assert "mini model" in cases.skip_reason(big, smoke)
    assert cases.skip_reason(cases.Case("model", "mini", "train", "fp32", 2, "ours", arch="mini", image=32), smoke) is None
    bf16 = cases.Case("kernel", "x", "eval", "bf16", 2, "eager", shape=_conv("conv2", 1, 32, 32, 3, 1, 8, 4))
    assert "CUDA only" in cases.skip_reason(bf16, smoke)
    stage4 = cases.Case("block", "resnext50_32x4d.stage4", "eval", "fp32", 2, "ours", arch="resnext50_32x4d",
                        stage=4, image=32)
    assert "interpreter" in cases.skip_reason(stage4, smoke)
    plain = config.RunContext(torch.device("cpu"), config.SMOKE, interpret=False)
    assert cases.skip_reason(stage4, plain) is None  # the reference path handles any size
    assert not cases.counts_as_speed(stage4, plain)
    cpu_full = config.RunContext(torch.device("cpu"), config.CPU, interpret=False)
    eager = cases.Case("block", "resnext50_32x4d.stage1", "eval", "fp32", 2, "eager", arch="resnext50_32x4d", stage=1)
    assert cases.counts_as_speed(eager, cpu_full)
    assert not cases.counts_as_speed(dataclasses.replace(eager, provider="ours"), cpu_full)


def test_smoke_threads_restores_the_thread_count():
    before = torch.get_num_threads()
    with config.smoke_threads(config.RunContext(torch.device("cpu"), config.SMOKE, interpret=False)):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
    with config.smoke_threads(config.RunContext(torch.device("cpu"), config.CPU, interpret=False)):
        assert torch.get_num_threads() == before  # full runs keep every thread


def test_header_says_triton_needs_a_gpu():
    for interp in (True, False):
        lines = config.header_lines(config.RunContext(torch.device("cpu"), config.CPU, interpret=interp))
        text = "\n".join(lines)
        assert "Triton timings need a CUDA GPU" in text
        assert ("interpreter" in text) and ("never reported as speed" in text or "reference path" in text)


# ----------------------------------------------------------------------------------------
# Headline
# ----------------------------------------------------------------------------------------
def _model_rec(arch, task, batch, provider, ms, speed=True, status="ok", **kw):
    r = dict(level="model", arch=arch, name=arch, mode=task, batch=batch, provider=provider, status=status,
             median_ms=ms, speed=speed, group=f"model/{arch}/{task}/bf16/b{batch}", dtype="bf16")
    r.update(kw)
    return r


def test_headline_rows_and_formatting():
    recs = [
        _model_rec("resnet101", "train", 32, "eager", 700.0),
        _model_rec("resnext101_32x4d", "train", 32, "eager", 950.0),
        _model_rec("resnext101_32x4d", "train", 32, "ours", 560.0),
        _model_rec("resnet50", "inference", 32, "eager", 10.0),
        _model_rec("resnext50_32x4d", "inference", 32, "eager", 13.0),
        _model_rec("resnext50_32x4d", "inference", 32, "ours", 9.0, speed=False),
    ]
    rows = headline.headline_rows(recs)
    assert [(r["task"], r["resnet"], r["batch"]) for r in rows] == [("train", "resnet101", 32),
                                                                  ("inference", "resnet50", 32)]
    train, infer = rows
    assert train["ratio_eager"] == pytest.approx(950 / 700) and train["ratio_ours"] == pytest.approx(0.8)
    assert train["paper_ratio"] == pytest.approx(0.95 / 0.70) and infer["paper_ratio"] is None
    text = headline.format_headline(rows, ["header line"])
    lines = text.splitlines()
    assert "0.95 s / 0.70 s = 1.36" in lines[0] and lines[1].strip() == "header line"
    train_line = next(ln for ln in lines if ln.startswith("train"))
    assert train_line.split()[-5:] == ["950.0", "560.0", "1.36", "0.80", "1.36"]
    infer_line = next(ln for ln in lines if ln.startswith("inference"))
    assert "9.00*" in infer_line and "0.90*" in infer_line and infer_line.rstrip().endswith("-")
    assert any(ln.startswith("* not a speed") for ln in lines)
    md = headline.headline_markdown(rows)
    assert md.count("\n") == 3 and "9.00\\*" in md


def test_headline_marks_missing_and_checked():
    recs = [_model_rec("resnet50", "train", 2, "eager", 5.0, speed=False),
            _model_rec("resnext50_32x4d", "train", 2, "ours", None, check_ms=10.0)]
    rows = headline.headline_rows(recs)
    text = headline.format_headline(rows)
    assert "checked" in text
    assert headline.format_headline([]).endswith("(no ResNet/ResNeXt pair measured in this run)")


# ----------------------------------------------------------------------------------------
# Results files
# ----------------------------------------------------------------------------------------
def test_command_line_reconstruction():
    assert results.command_line(["/x/site-packages/pytest/__main__.py", "benchmarks", "--benchmark"]) == \
        "python -m pytest benchmarks --benchmark"
    assert results.command_line(["/repo/benchmarks/__main__.py", "--tiny"]) == "python -m benchmarks --tiny"
    assert results.command_line(["/repo/benchmarks/profile.py", "--model", "a b"]) == \
        "python -m benchmarks.profile --model 'a b'"
    assert results.command_line(["/usr/bin/pytest", "benchmarks"]) == "pytest benchmarks"


def test_speedups_only_between_speeds():
    recs = [dict(group="g", provider="eager", status="ok", speed=True, median_ms=2.0),
            dict(group="g", provider="ours", status="ok", speed=True, median_ms=1.0),
            dict(group="g", provider="compile", status="ok", speed=False, median_ms=0.5),
            dict(group="h", provider="ours", status="ok", speed=True, median_ms=1.0)]
    results.add_speedups(recs)
    assert [r["speedup_vs_eager"] for r in recs] == [1.0, 2.0, None, None]


def test_validate_rejects_bad_documents():
    assert "document: missing 'records'" in results.validate({"schema": results.SCHEMA})
    doc = {"schema": results.SCHEMA, "smoke": True, "complete": True, "profile": "smoke", "header": [], "ceilings": None,
           "headline": {"rows": []}, "summary": {}, "records": [
               dict(id="a", group="g", level="kernel", name="n", mode="eval", dtype="fp32", batch=1, provider="ours",
                    status="ok", speed=False, runs="interpreter", median_ms=1.0, n_samples=1, timing="single_call",
                    flops=1, min_bytes=1, gbps=5.0, tflops=None, roofline_fraction=None, speedup_vs_eager=None,
                    peak_mem_bytes=None),
               dict(id="b", group="g", level="kernel", name="n", mode="eval", dtype="fp32", batch=True,
                    provider="eager", status="skipped", speed=False, runs="pytorch")],
           "environment": results.environment(torch.device("cpu"), ["pytest"])}
    problems = "\n".join(results.validate(doc))
    assert "not a speed" in problems and "interpreter run carries a median" in problems
    assert "'batch' has type bool" in problems and "without a reason" in problems


def test_checkpoints_leave_partial_results(tmp_path):
    """A run killed by a time limit keeps what it measured: the file is rewritten as records come."""
    ctx = config.RunContext(torch.device("cpu"), config.SMOKE, interpret=False)
    col = results.Collector(ctx, argv=["pytest"], out_dir=tmp_path, checkpoint_s=0.0)
    rec = dict(id="x", group="g", level="model", name="mini", mode="train", dtype="fp32", batch=2,
               provider="eager", status="skipped", speed=False, runs="pytorch", reason="test")
    col.add(rec)
    (path,) = tmp_path.glob("*.json")
    first = json.loads(path.read_text())
    assert first["complete"] is False and len(first["records"]) == 1
    assert "Partial" in path.with_suffix(".md").read_text()
    col.add(dict(rec, id="y"))
    paths = col.finish()
    assert paths["json"] == path and sorted(p.name for p in tmp_path.iterdir()) == sorted([path.name, path.with_suffix(".md").name])
    final = json.loads(path.read_text())
    assert final["complete"] is True and len(final["records"]) == 2 and results.validate(final) == []


def test_cpu_path_end_to_end(tmp_path):
    """A few tiny cases of every level through run_case, then the results files."""
    ctx = config.make_context(full=False, device="cpu")
    assert ctx.smoke and ctx.profile is config.SMOKE
    ctx.ceilings = ceilings.measure_ceilings(ctx.device, smoke=True)
    tiny3 = _conv("conv2", 1, 32, 32, 3, 1, 8, 4)
    tiny1 = _conv("conv3", 1, 16, 32, 1, 1, 1, 4)
    todo = [cases.Case("kernel", s.label, mode, "fp32", 2, prov, shape=s, image=32)
            for s in (tiny3, tiny1) for mode in ("eval", "train", "backward") for prov in ("ours", "eager")]
    todo += [cases.Case("kernel", tiny3.label, "eval", "fp32", 2, "compile", shape=tiny3, image=32),
             cases.Case("kernel", tiny3.label, "eval", "fp32", 2, "compile_max", shape=tiny3, image=32)]
    todo += [cases.Case("block", "resnext50_32x4d.stage4", "fwdbwd", "fp32", 2, "eager_nchw", arch="resnext50_32x4d",
                        stage=4, image=32)]
    todo += [cases.Case("model", "mini", task, "fp32", 2, prov, arch="mini", image=32)
             for task in ("inference", "train") for prov in ("ours", "eager")]
    collector = results.Collector(ctx, argv=["pytest", "tests/test_benchmark_harness.py"])
    for case in todo:
        rec = cases.run_case(case, ctx)
        assert rec.pop("_exception", None) is None, rec.get("reason")
        assert rec["status"] == "ok", (case.id, rec.get("reason"))
        assert rec["speed"] is False  # smoke: never a speed
        if rec["runs"] == "interpreter":
            assert rec.get("median_ms") is None and rec["check_ms"] > 0
        else:
            assert rec["median_ms"] > 0 and rec["gbps"] is None
        collector.add(rec)
    paths = collector.finish(tmp_path)
    doc = json.loads(paths["json"].read_text())
    assert results.validate(doc) == []
    assert doc["smoke"] is True and doc["environment"]["device_type"] == "cpu"
    assert doc["environment"]["command"] == "pytest tests/test_benchmark_harness.py"
    assert {r["level"] for r in doc["records"]} == {"kernel", "block", "model"}
    assert "Triton timings need a CUDA GPU" in paths["md"].read_text()
    assert paths["json"].name.endswith("_smoke.json") and paths["json"].parent == tmp_path


def test_kernel_case_values_match_eager():
    """ours and eager compute the same layer (so the benchmark compares like with like)."""
    x = torch.randn(2, 16, 4, 4).to(memory_format=torch.channels_last)
    r = torch.randn(2, 32, 4, 4)
    conv = torch.nn.Conv2d(16, 32, 1, bias=False)
    bn = torch.nn.BatchNorm2d(32).eval()
    cases._randomize_bn(bn, torch.Generator().manual_seed(0))
    with torch.no_grad():
        a = cases.ours_conv_bn_act(x, conv, bn, True, r)
        b = cases.eager_conv_bn_act(x, conv, bn, True, r)
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


# ----------------------------------------------------------------------------------------
# Progress bar and command lines
# ----------------------------------------------------------------------------------------
def test_progress_bar_counts(capsys):
    import io
    buf = io.StringIO()
    p = Progress(4, width=8, stream=buf)
    p.start("a")
    p.advance("a")
    p.advance("b")
    p.close()
    out = buf.getvalue().splitlines()
    assert out[0].startswith("[--------] 0/4") and out[-1].startswith("[####----] 2/4")


def test_python_m_benchmarks_tiny(tmp_path, capsys):
    from benchmarks.__main__ import main, parse_args
    assert parse_args(["--providers", "all"]).providers == config.PROVIDERS
    with pytest.raises(SystemExit):
        parse_args(["--providers", "nope"])
    rc = main(["--tiny", "--models", "mini", "--providers", "eager,ours", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert rc == 0
    assert "Triton timings need a CUDA GPU" in out and "Headline" in out
    files = sorted(tmp_path.glob("*.json"))
    assert len(files) == 1 and results.validate(json.loads(files[0].read_text())) == []


# ----------------------------------------------------------------------------------------
# Profiling tool
# ----------------------------------------------------------------------------------------
def test_op_traffic_of_convolutions():
    # aten::convolution(input, weight, bias, stride, padding, dilation, transposed, output_padding, groups)
    shapes_ = [[2, 128, 56, 56], [128, 4, 3, 3], [], [], [], [], [], [], []]
    dts = ["c10::BFloat16", "c10::BFloat16", "", "ScalarList", "ScalarList", "ScalarList", "Scalar", "ScalarList", "Scalar"]
    conc = [None, None, None, [1, 1], [1, 1], [1, 1], False, [0, 0], 32]
    nbytes, flops, exact = bprofile.op_traffic("aten::convolution", shapes_, dts, conc)
    assert exact and flops == 2 * 2 * 56 * 56 * 128 * 36
    assert nbytes == 2 * (2 * 128 * 3136) * 2 + 128 * 36 * 2
    # strided: output 28x28
    conc[3] = [2, 2]
    nbytes2, flops2, _ = bprofile.op_traffic("aten::convolution", shapes_, dts, conc)
    assert flops2 == flops // 4 and nbytes2 == 2 * 128 * 3136 * 2 + 2 * 128 * 784 * 2 + 128 * 36 * 2
    # elementwise: inputs + one output the size of the largest
    nb, fl, exact = bprofile.op_traffic("aten::add_", [[4, 8], [4, 8], []], ["float", "float", "Scalar"])
    assert (nb, fl, exact) == (3 * 32 * 4, 32, False)
    assert bprofile.op_traffic("aten::empty", [[], []], ["ScalarList", ""]) is None


def test_kernel_table_aggregates_and_classifies():
    ours = {"conv_bn_act_fwd_kernel"}
    launches = [bprofile.Launch("conv_bn_act_fwd_kernel", 100.0, 3 * 10 ** 8, 10 ** 9),
                bprofile.Launch("conv_bn_act_fwd_kernel", 100.0, 3 * 10 ** 8, 10 ** 9),
                bprofile.Launch("sm90_xmma_fprop_implicit_gemm_bf16", 300.0, 3 * 10 ** 8, 10 ** 9),
                bprofile.Launch("void at::native::vectorized_elementwise_kernel<4>", 100.0)]
    rows = bprofile.kernel_table(launches, ours)
    by = {r.name: r for r in rows}
    k = by["conv_bn_act_fwd_kernel"]
    assert k.kind == "ours" and k.calls == 2 and k.mean_us == 100.0 and k.share == pytest.approx(200 / 600)
    assert k.gbps == pytest.approx(6e8 / 200e-6 / 1e9) and k.intensity == pytest.approx(10 / 3)
    assert by["sm90_xmma_fprop_implicit_gemm_bf16"].kind == "cudnn/cublas"
    assert by["void at::native::vectorized_elementwise_kernel<4>"].kind == "elementwise/BN"
    assert by["void at::native::vectorized_elementwise_kernel<4>"].gbps is None
    text = bprofile.format_table(rows, "kernel")
    assert "by kind: cudnn/cublas 50.0%, ours 33.3%" in text
    assert bprofile.classify("triton_poi_fused_add_relu_0", ours) == "inductor"
    assert bprofile.classify("GeneratedBackwardFor_resnext_conv_bn_act_default", ours) == "ours"
    assert "conv_bn_act_fwd_kernel" in bprofile.our_kernel_names()


def test_resource_usage_parsers():
    res = bprofile.parse_res_usage(" Function k:\n  REG:168 STACK:0 SHARED:1024 LOCAL:0 CONSTANT[0]:672 TEXTURE:0")
    assert res == dict(registers=168, stack_bytes=0, shared_static_bytes=1024, local_bytes=0)
    v = bprofile.parse_ptxas_verbose("    8 bytes stack frame, 12 bytes spill stores, 16 bytes spill loads\n"
                                     "ptxas info    : Used 255 registers, used 1 barriers")
    assert v == dict(spill_store_bytes=12, spill_load_bytes=16, registers_ptxas=255)
    cmd = bprofile.ncu_command(["--layer", "L"], skip=3, report="r")
    assert cmd.startswith("ncu --clock-control none") and cmd.endswith("--layer L --bare") and "--launch-skip 3" in cmd


def test_kernel_report_compiles_offline_for_sm90():
    """Our conv kernel compiled for Hopper without a GPU: registers, spills, shared memory."""
    c = shapes.unique_convs(kind="conv3x3")[0]
    rows = bprofile.triton_kernel_report([c], 32, "bf16", "eval")
    (row,) = rows
    hw = row["sm90"]
    assert "error" not in hw, hw.get("error")
    assert 0 < hw["registers"] <= 255 and hw["shared_bytes"] > 0
    assert "spill_store_bytes" in hw
    assert row["flags"]["OUT_AFFINE"] and row["flags"]["OUT_RELU"] and "STATS" not in row["flags"]
    assert row["ncu"].startswith("ncu --clock-control none")
    assert "conv3x3_st1_s1_128to128_g32_56" in bprofile.format_kernel_report(rows)


def test_profile_cli_on_cpu(tmp_path, capsys):
    rc = bprofile.main(["--tiny", "--model", "mini", "--mode", "inference", "--steps", "1", "--warmup", "1",
                        "--no-kernel-info", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert rc == 0
    assert "not kernel speed" in out.lower() or "NOT kernel speed" in out
    assert (tmp_path / "trace.json").exists() and (tmp_path / "kernels.txt").exists()
    report = json.loads((tmp_path / "profile.json").read_text())
    assert report["rows"] and {"name", "kind", "calls", "total_us", "share", "gbps"} <= set(report["rows"][0])
    try:
        import matplotlib  # noqa: F401
        assert (tmp_path / "roofline.png").exists()
    except ImportError:
        assert "matplotlib is not installed" in out


# ----------------------------------------------------------------------------------------
# The pytest plugin, as CI runs it
# ----------------------------------------------------------------------------------------
def test_pytest_benchmarks_plugin(tmp_path):
    """``pytest benchmarks`` with a selection: our flag, pytest-benchmark's JSON, one results file."""
    bench_json = tmp_path / "pb.json"
    out_dir = tmp_path / "results"
    cmd = [sys.executable, "-m", "pytest", "benchmarks/test_models.py", "-q", "-p", "no:cacheprovider",
           "-k", "mini and inference and (eager or ours) and not tuned and not nchw and not graphed", f"--benchmark-json={bench_json}",
           f"--bench-results-dir={out_dir}"]
    # as a user runs it: not as a pytest-xdist worker (pytest-benchmark turns itself off in one)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_XDIST")}
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "Triton timings need a CUDA GPU" in proc.stdout and "Headline" in proc.stdout
    pb = json.loads(bench_json.read_text())
    assert {b["group"] for b in pb["benchmarks"]} == {"model/mini/inference/fp32/b2"}
    assert all("runs" in b["extra_info"] for b in pb["benchmarks"])
    (doc_path,) = out_dir.glob("*.json")
    doc = json.loads(doc_path.read_text())
    assert results.validate(doc) == [] and len(doc["records"]) == 2
    assert "-k" in doc["environment"]["argv"]
    help_text = subprocess.run([sys.executable, "-m", "pytest", "benchmarks", "--help"], cwd=ROOT,
                               capture_output=True, text=True, timeout=300).stdout
    assert "--benchmark " in help_text and "--benchmark-json" in help_text


# ----------------------------------------------------------------------------------------
# The NaN/Inf-path A/B (benchmarks/nan_path_cost.py)
# ----------------------------------------------------------------------------------------
def test_nan_path_ab_switches_the_path():
    """The 'off' arm really is the leaking kernel (else the A/B would time the same thing
    twice), and the shipped one keeps a NaN inside its group."""
    import kernels
    from benchmarks.nan_path_cost import multi_group_off
    x = torch.randn(1, 8, 5, 5)
    x[0, 0, 2, 2] = float("nan")  # group 0 of 4
    w = torch.randn(8, 2, 3, 3)
    nan_groups = lambda y: sorted({c // 2 for c in torch.isnan(y).any(dim=(0, 2, 3)).nonzero().flatten().tolist()})
    assert nan_groups(kernels.conv_bn_act(x, w, 1, 1, 4)[0]) == [0]
    if kernels.use_triton(x):  # the reference path has no tiles to leak across
        with multi_group_off():
            assert nan_groups(kernels.conv_bn_act(x, w, 1, 1, 4)[0]) == [0, 1, 2, 3]
    assert nan_groups(kernels.conv_bn_act(x, w, 1, 1, 4)[0]) == [0]  # restored


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU refusal")
def test_nan_path_cost_refuses_without_gpu():
    proc = subprocess.run([sys.executable, "-m", "benchmarks.nan_path_cost"], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 2 and "CUDA" in proc.stderr


# ----------------------------------------------------------------------------------------
# Launch economy: the CPU report grid, graphed providers (issue 13)
# ----------------------------------------------------------------------------------------
def test_provider_list_and_labels_agree():
    assert set(config.PROVIDER_LABELS) == set(config.PROVIDERS)
    assert {"ours_graphed", "eager_graphed"} == set(config.GRAPHED) <= set(config.PROVIDERS)


def test_cpu_benchmark_grid_is_the_report_only():
    """``pytest benchmarks --benchmark`` without CUDA: no kernel/block/model timing, the report
    for both ResNet/ResNeXt pairs and one bottleneck, train and inference."""
    ctx = config.RunContext(torch.device("cpu"), config.CPU, interpret=False, report_only=True)
    for level in ("kernel", "block", "model"):
        assert cases.cases_for(level, ctx) == []
        assert "CUDA GPU" in cases.empty_level_reason(level, ctx)
    grid = cases.cases_for("report", ctx)
    assert {c.name for c in grid} >= {"resnet50", "resnext50_32x4d", "resnet101", "resnext101_32x4d"}
    assert {c.mode for c in grid} == {"train", "inference"} and len({c.id for c in grid}) == len(grid)
    text = "\n".join(config.header_lines(ctx))
    assert "Triton timings need a CUDA GPU" in text and "CPU report" in text
    # on a GPU the full grid stays, with the report next to it
    gpu = config.RunContext(torch.device("cuda"), config.FULL, interpret=False)
    assert cases.cases_for("block", gpu) and cases.cases_for("report", gpu)


def test_graphed_providers_skip_without_cuda():
    ctx = config.RunContext(torch.device("cpu"), config.SMOKE, interpret=False)
    block = cases.Case("block", "resnext50_32x4d.stage1", "eval", "fp32", 2, "ours_graphed", arch="resnext50_32x4d",
                       stage=1, image=32)
    rec = cases.run_case(block, ctx)
    assert rec["status"] == "skipped" and "CUDA" in rec["reason"] and rec["runs"] == "cuda_graph"
    model = cases.Case("model", "mini", "train", "fp32", 2, "eager_graphed", arch="mini", image=32)
    assert "CUDA" in cases.skip_reason(model, ctx)
    gpu = config.RunContext(torch.device("cuda"), config.FULL, interpret=False)
    assert "not graphed" in cases.skip_reason(dataclasses.replace(block, mode="train", dtype="bf16"), gpu)
    assert cases.skip_reason(dataclasses.replace(block, mode="fwdbwd", dtype="bf16"), gpu) is None
    assert not any(c.provider in config.GRAPHED for c in cases.kernel_cases(gpu))  # block and model levels only
    assert {c.provider for c in cases.block_cases(gpu)} >= set(config.GRAPHED)
    assert {c.provider for c in cases.model_cases(gpu)} >= set(config.GRAPHED)


def test_graphed_providers_wiring(monkeypatch):
    """The graphed builds call resnext.cuda_graphs as documented (a CPU stand-in for it here)."""
    import types
    calls = []

    def graph_inference(model, example_input, **kw):
        calls.append(("inference", type(model).__name__, tuple(example_input.shape)))
        return lambda x: model(x)

    def graph_train_step(model, loss_fn, optimizer, example_input, example_target, **kw):
        calls.append(("train", type(model).__name__, tuple(example_input.shape)))

        def step(x, target):
            optimizer.zero_grad(set_to_none=True)
            loss = loss_fn(model(x), target)
            loss.backward()
            optimizer.step()
            return loss
        return step

    fake = types.SimpleNamespace(graph_inference=graph_inference, graph_train_step=graph_train_step)
    monkeypatch.setattr(cases, "_cuda_graphs", lambda: fake)
    ctx = config.RunContext(torch.device("cpu"), config.SMOKE, interpret=False)
    todo = [cases.Case("block", "resnext50_32x4d.stage1", mode, "fp32", 2, prov, arch="resnext50_32x4d", stage=1,
                       image=32) for mode in ("eval", "fwdbwd") for prov in config.GRAPHED]
    todo += [cases.Case("model", "mini", task, "fp32", 2, prov, arch="mini", image=32)
             for task in ("inference", "train") for prov in config.GRAPHED]
    from benchmarks.device_ops import forced_triton_path
    with forced_triton_path(False):  # the wiring, not the kernels: the fast PyTorch path
        for case in todo:
            cases.build(case, ctx).fn()
    kinds = [(k, name) for k, name, _ in calls]
    assert kinds.count(("inference", "FusedBottleneck")) == 1 and kinds.count(("train", "Bottleneck")) == 1
    assert ("train", "ResNet") in kinds and ("inference", "ResNet") in kinds and len(calls) == len(todo)
