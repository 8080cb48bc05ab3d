"""Level 2, blocks: the repeated bottleneck of each stage (ResNet-50 and ResNeXt-50 32x4d;
the 101-layer models use the same blocks), inference forward, training forward, and
forward + backward.  Cases: ``benchmarks.cases.block_cases``."""
LEVEL = "block"


def test_block(case, run_bench):
    run_bench(case)
