"""Level 1, kernels: grouped 3x3 conv + BN + ReLU and 1x1 conv + BN (+ residual) (+ ReLU),
eval forward (folded BN), train forward (batch statistics) and backward, at every conv
shape of ResNeXt-50/101 32x4d.  Cases: ``benchmarks.cases.kernel_cases``."""
LEVEL = "kernel"


def test_kernel(case, run_bench):
    run_bench(case)
