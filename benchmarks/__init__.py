"""Benchmark harness for the fused ResNeXt kernels.

    pytest benchmarks                 # every benchmark once at tiny size (CI smoke test)
    pytest benchmarks --benchmark     # the full runs (pytest-benchmark underneath)
    python -m benchmarks              # the headline table, without pytest
    python -m benchmarks.profile      # per-kernel profile, Chrome trace, roofline plot

See benchmarks/README.md for what is measured and the results file format.
"""
