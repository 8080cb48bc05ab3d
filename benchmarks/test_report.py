"""The launch-economy report: device operations per step, saved-for-backward bytes and host
time, fused against eager, for one bottleneck and ResNet/ResNeXt-50/101 (``mini`` in smoke
runs); without CUDA also the converted/unconverted CPU time ratio.  This is all that
``pytest benchmarks --benchmark`` runs on a machine without CUDA.  Cases:
``benchmarks.report.report_cases``."""
LEVEL = "report"


def test_report(case, run_report):
    run_report(case)
