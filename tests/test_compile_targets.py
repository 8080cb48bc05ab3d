"""Every GPU target our users have: what the launchers pick there compiles, fits the target's
shared memory and spills at most a few bytes (offline, no GPU needed).

CI compiles a sample per target (``python -m kernels._compile --sample ci --backward``: in
bf16 and fp32 the heaviest configuration of each convolution kernel, for grouped tiles that
span several groups and for the others, and each elementwise kernel once); the full matrix
(``--sample all``) and one variant per kernel mode (``--sample representative``) stay a
command (docs/portability.md).  The configuration rules themselves (the shared-memory estimate,
the per-(target, Triton) formulation) are checked here without compiling.
"""
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from helpers import once_per_run
from kernels import _runtime, _targets

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TARGETS = os.environ.get("RESNEXT_COMPILE_TARGETS", ",".join(_targets.TARGET_KEYS)).split(",")
MAX_SPILL_BYTES = 32  # sm_86-class HMMA backward with fused statistics spills 8-32 B (docs/portability.md)
CONV_KERNELS = ("conv_bn_act_fwd_kernel", "conv_dgrad_kernel", "conv_wgrad_kernel", "conv_grads_kernel")
TENSOR_CORES = {"cuda:80": "mma.sync", "cuda:86": "mma.sync", "cuda:89": "mma.sync", "cuda:90": "wgmma",
                "cuda:100": "tcgen05", "cuda:120": "mma.sync", "hip:gfx942": "MFMA"}


def _compile(target: str, out_dir) -> tuple:
    out = out_dir / f"{target.replace(':', '_')}.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    proc = subprocess.run([sys.executable, "-m", "kernels._compile", "--target", target, "--backward",
                           "--sample", "ci", "--jobs", "1", "--quiet", "--json", str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=1500)
    rows = json.loads(out.read_text()) if out.exists() else []
    return proc.returncode, rows, proc.stdout[-3000:] + proc.stderr[-3000:]


@pytest.fixture(scope="module")
def matrix(tmp_path_factory):
    """Every target's sample, compiled in fresh processes without the interpreter, two at a time."""
    def compile_all():
        out_dir = tmp_path_factory.mktemp("targets")
        with ThreadPoolExecutor(2) as pool:
            return dict(zip(TARGETS, pool.map(lambda t: _compile(t, out_dir), TARGETS)))
    # once per run: pytest-xdist workers that each get some of these tests share one compile run
    return once_per_run(tmp_path_factory, "compile_targets_" + "_".join(TARGETS).replace(":", ""), compile_all)


@pytest.mark.parametrize("target", TARGETS, ids=[t.replace(":", "_") for t in TARGETS])
def test_target_compiles_fits_and_barely_spills(matrix, target):
    returncode, rows, output = matrix[target]
    assert rows, output
    failed = [(r["kernel"], r["mode"], r["dtype"], r["config"], r["error"]) for r in rows if not r["ok"]]
    assert not failed, failed
    assert returncode == 0, output
    # the sample covers every convolution kernel in every dtype, both kinds of grouped tiles
    kinds = {(r["kernel"], r["dtype"]) for r in rows}
    for dtype in ("bfloat16", "float32"):  # (fp16 compiles as bf16: the full matrix has it)
        for kernel in CONV_KERNELS:
            assert (kernel, dtype) in kinds, (kernel, dtype)
    assert {bool(r["config"].get("MULTI_GROUP")) for r in rows if r["kernel"] == "conv_bn_act_fwd_kernel"} == \
        {False, True}
    limit = _targets.parse_target(target).shared_per_block
    for r in rows:
        assert r["shared_limit"] == limit and r["shared_bytes"] <= limit, r
        assert r["local_bytes"] <= MAX_SPILL_BYTES, r
        if r["kernel"] in CONV_KERNELS:
            assert r["tensor_cores"] == TENSOR_CORES[target], r
            assert r["vector_loads"] or r["kernel"] == "conv_wgrad_kernel", r


# --------------------------------------------------------------------------------------
# The configuration rules, without compiling
# --------------------------------------------------------------------------------------
SHAPES = [  # (M, cout, cin_g, cout_g, ksize): ResNeXt-50's grouped 3x3 and 1x1 layers at batch 256
    (256 * 56 * 56, 128, 4, 4, 3), (256 * 28 * 28, 256, 8, 8, 3), (256 * 14 * 14, 512, 16, 16, 3),
    (256 * 7 * 7, 1024, 32, 32, 3), (256 * 56 * 56, 256, 64, 256, 1), (256 * 7 * 7, 2048, 512, 2048, 1),
    (256 * 14 * 14, 1024, 2048, 1024, 1)]


@pytest.mark.parametrize("key", _targets.TARGET_KEYS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_every_config_fits_the_target_by_estimate(key, dtype):
    target = _targets.parse_target(key)
    elem = torch.empty((), dtype=dtype).element_size()
    for M, cout, cin_g, cout_g, ks in SHAPES:
        c = _runtime.conv_config(M, cout, cin_g, cout_g, dtype, target)
        assert _runtime.mma_shared_bytes(c["BLOCK_M"], c["BLOCK_N"], c["BLOCK_K"], c["num_stages"], elem) \
            <= target.shared_per_block, (key, c)
        from kernels import conv_grad as cg
        w = cg.wgrad_config(M, cout, cin_g, cout_g, ks, dtype, target)
        assert _runtime.mma_shared_bytes(w["BLOCK_CO"], w["BLOCK_CI"], w["BLOCK_M"], w["num_stages"], elem) \
            <= target.shared_per_block, (key, w)
    # the tiles themselves do not depend on the target (same partial sums, same bits everywhere)
    h100 = _runtime.conv_config(*SHAPES[0][:4], dtype, _targets.parse_target("cuda:90"))
    here = _runtime.conv_config(*SHAPES[0][:4], dtype, target)
    assert {k: v for k, v in here.items() if k.startswith("BLOCK")} == \
        {k: v for k, v in h100.items() if k.startswith("BLOCK")}


def test_small_shared_memory_gets_fewer_stages():
    """The fp32 1x1 weight gradient: 3 stages on sm_90 (227 KB), fewer on sm_86 (99 KB), where
    3 stages needed 112-128 KB and failed at launch with OutOfResources."""
    from kernels import conv_grad as cg
    args = (256 * 56 * 56, 256, 64, 256, 1, torch.float32)
    assert cg.wgrad_config(*args, _targets.parse_target("cuda:90"))["num_stages"] == 3
    assert cg.wgrad_config(*args, _targets.parse_target("cuda:86"))["num_stages"] == 2
    assert cg.wgrad_config(*args, _targets.parse_target("hip:gfx942"))["num_stages"] == 1


def test_flat_nan_check_only_on_sm100_before_triton_3_8():
    grouped = (256 * 56 * 56, 128, 4, 4)
    for version, key, expected in (("3.6.0", "cuda:100", 2), ("3.7.1", "cuda:100", 2), ("3.8.0", "cuda:100", 1),
                                   ("3.9.0", "cuda:100", 1), ("3.6.0", "cuda:90", 1), ("3.6.0", "cuda:120", 1)):
        target = _targets.parse_target(key, version)
        assert _runtime.conv_config(*grouped, torch.bfloat16, target)["MULTI_GROUP"] == expected, (key, version)
    assert _runtime.conv_config(256 * 7 * 7, 1024, 32, 32, torch.bfloat16,
                                _targets.parse_target("cuda:100", "3.6.0"))["MULTI_GROUP"] == 0  # group-aligned


def test_parse_target():
    t = _targets.parse_target("sm_86")
    assert t is _targets.parse_target("cuda:86")  # interned: memo keys hash one pointer
    assert (t.backend, t.arch, t.warp_size, t.shared_per_block) == ("cuda", 86, 32, 99 * 1024)
    amd = _targets.parse_target("hip:gfx942")
    assert (amd.warp_size, amd.shared_per_block, amd.gpu_target().arch) == (64, 64 * 1024, "gfx942")
    with pytest.raises(ValueError, match="unknown target"):
        _targets.parse_target("cuda:75")
    with pytest.raises(TypeError):
        _targets.parse_target(90)
    with pytest.raises(ValueError):
        _targets.interpreter_target().gpu_target()


def test_device_description_is_read_once(monkeypatch):
    """A live GPU's target comes from its properties, once per device (memoised)."""
    class Props:
        major, minor, warp_size, shared_memory_per_block_optin = 8, 9, 32, 101376
        gcnArchName = ""
    calls = []
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: calls.append(i) or Props())
    monkeypatch.setattr(torch.version, "hip", None)
    _targets.target_for_device.cache_clear()
    try:
        t = _targets.target_for_device(0)
        assert _targets.target_for_device(0) is t and calls == [0]
        assert (t.key, t.shared_per_block) == ("cuda:89", 101376)
    finally:
        _targets.target_for_device.cache_clear()
