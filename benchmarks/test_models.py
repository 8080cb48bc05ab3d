"""Level 3, models: ResNet-50/101 and ResNeXt-50/101 32x4d, inference and a full training
step (forward, cross-entropy, backward, SGD with momentum).  These records feed the
headline table.  Cases: ``benchmarks.cases.model_cases``."""
LEVEL = "model"


def test_model(case, run_bench):
    run_bench(case)
