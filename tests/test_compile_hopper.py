"""Every kernel, mode and dtype compiles for Hopper (sm_90) without a GPU, forward and backward.

The interpreter proves the math, not that the kernels compile: this runs the real
compiler (TTIR -> PTX -> cubin) for what the launchers pick for the ResNet-50 /
ResNeXt-50/101 shapes, in bf16, fp16 and fp32, specialised as Triton's JIT would
(``kernels._compile.jit_specialization``), in a process without TRITON_INTERPRET (the
interpreter patches triton.language and cannot compile).  CI compiles one variant per
kernel, mode, dtype and grouped-tile kind, the heaviest configuration of each
(``--sample representative``, 137 binaries); the variants left out differ only in the
divisibility of sizes.  Every variant is a command:
``python -m kernels._compile --target cuda:90 --backward --json FILE`` (docs/portability.md).
"""
import json
import os
import subprocess
import sys

import pytest
from helpers import once_per_run

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    # once per run: pytest-xdist workers that each get some of these tests share one compile run
    return once_per_run(tmp_path_factory, "compile_hopper", lambda: _compile(tmp_path_factory))


def _compile(tmp_path_factory):
    out = tmp_path_factory.mktemp("compile") / "kernels.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    proc = subprocess.run([sys.executable, "-m", "kernels._compile", "--target", "cuda:90", "--backward",
                           "--sample", "representative", "--quiet", "--json", str(out)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(out.read_text())


def test_every_variant_compiles(compiled):
    assert all(r["ok"] for r in compiled), [r for r in compiled if not r["ok"]]
    kinds = {(r["kernel"], r["mode"], r["dtype"]) for r in compiled}
    for dtype in ("bfloat16", "float16", "float32"):
        for mode in ("eval", "train", "train_sync", "squeeze_train", "squeeze_eval", "gated_train", "gated_eval"):
            assert ("conv_bn_act_fwd_kernel", mode, dtype) in kinds
        assert ("bn_act_kernel", "bn_act", dtype) in kinds
        assert ("bn_act_kernel", "bn_act_gated", dtype) in kinds
        assert ("squeeze_sum_kernel", "squeeze_sum", dtype) in kinds
        assert ("squeeze_backward_kernel", "squeeze_backward", dtype) in kinds
        assert ("squeeze_backward_kernel", "squeeze_backward_relu", dtype) in kinds  # RegNetY's SE after conv2
        assert ("relu_squeeze_kernel", "relu_squeeze", dtype) in kinds
        assert ("bn_finalize_kernel", "bn_finalize", dtype) in kinds
        for mode in ("bn_finalize_merged_out", "bn_finalize_row_counts"):  # SyncBatchNorm's cross-rank merge
            assert ("bn_finalize_kernel", mode, dtype) in kinds


def test_convolutions_use_hopper_tensor_cores(compiled):
    for r in compiled:
        if r["kernel"] == "conv_bn_act_fwd_kernel":
            assert r["tensor_cores"] == "wgmma", r  # (HGMMA in the SASS)


def test_convolution_loads_are_vectorised(compiled):
    """Compiled as the JIT specialises them (channel counts multiples of 16, aligned
    pointers), the convolutions load activations 16 bytes at a time (16-byte cp.async or ld.global.v4):
    the K chunks start on a multiple of 16 channels and masks are constant over 16."""
    for r in compiled:
        if r["kernel"] == "conv_bn_act_fwd_kernel":
            assert r["vector_loads"], r


def test_no_large_spills(compiled):
    """A few bytes of stack are tolerated; more means a config to fix (see _runtime.conv_config)."""
    for r in compiled:
        assert r["local_bytes"] <= 64, r


GRADIENT_KERNELS = ("conv_dgrad_kernel", "conv_wgrad_kernel", "conv_grads_kernel")


def test_every_gradient_variant_compiles(compiled):
    """The backward: data and weight gradients alone and merged, with the prologue recomputed,
    its backward in the data gradient's epilogue, the statistics terms on load, the shortcut's
    gradient added, the gate; and the one-pass BN backward."""
    modes = {(r["kernel"], r["mode"], r["dtype"]) for r in compiled}
    for dtype in ("bfloat16", "float16", "float32"):
        for mode in ("grads", "grads_gated", "grads_prologue", "grads_prologue_pro_bwd", "grads_prologue_pro_bwd_stats",
                     "grads_stats", "grads_stats_dx_add"):
            assert ("conv_grads_kernel", mode, dtype) in modes, (mode, dtype)
        assert ("conv_dgrad_kernel", "dgrad", dtype) in modes
        for mode in ("wgrad", "wgrad_prologue"):
            assert ("conv_wgrad_kernel", mode, dtype) in modes
        assert any(k == "bn_backward_kernel" and d == dtype for k, _, d in modes)


def test_gradient_kernels_use_tensor_cores_and_never_spill(compiled):
    """tl.dot becomes wgmma (but the exact fp32 path, by design: FMA), activations load 16 bytes
    at a time in the data gradient, and no gradient kernel spills on sm_90."""
    for r in compiled:
        if r["kernel"] in GRADIENT_KERNELS:
            exact_fp32 = r["mode"].endswith("_ieee")
            assert r["tensor_cores"] == ("none" if exact_fp32 else "wgmma"), r
            if r["kernel"] != "conv_wgrad_kernel":  # (wgrad's fp32 operands load as they are laid out)
                assert r["vector_loads"], r
            assert r["local_bytes"] == 0, r
