#!/usr/bin/env bash
# CI leg for Triton 3.6, the oldest Triton we support and the one on our GPU machine: its own
# virtual environment (torch 2.13.0's CPU wheel does not pin Triton; Triton 3.6's interpreter
# needs numpy < 2.4), then
#   1. the offline compile sample for sm_90 and sm_100 (tests/test_compile_targets.py): on sm_100
#      Triton 3.6 cannot compile the grouped tiles' two-axis NaN check, the configs pick the flat one;
#   2. a sample of the interpreter tests (TRITON_INTERPRET=1, set by tests/conftest.py).
# Takes no arguments.  Budget: under 6 minutes on a 2-core CPU machine.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV="${VENV_T36:-$(mktemp -d)/venv-t36}"
python3 -m venv "$VENV"
"$VENV/bin/python" -m pip install -q torch==2.13.0 triton==3.6.0 'numpy<2.4' pytest pytest-xdist hypothesis \
    pytest-benchmark ml_dtypes
"$VENV/bin/python" -c "import torch, triton, numpy
print('torch', torch.__version__, 'triton', triton.__version__, 'numpy', numpy.__version__)
assert triton.__version__.startswith('3.6'), triton.__version__"

export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" TRITON_DEFAULT_FP_FUSION=1
# 1. offline compilation for sm_90 and sm_100 (two targets, one process each)
RESNEXT_COMPILE_TARGETS=cuda:90,cuda:100 "$VENV/bin/python" -m pytest -q -p no:cacheprovider \
    tests/test_compile_targets.py
# 2. the interpreter: the forward kernel in every mode (channels_last), the gradient kernels on a
#    grouped strided case, the fallback, and the bf16 patch of the interpreter (tests/interpreter_bf16.py)
"$VENV/bin/python" -m pytest -q -p no:cacheprovider -n 2 tests/test_conv_bn_act.py tests/test_fallback.py \
    tests/test_conv_grad.py tests/test_interpreter_bf16.py \
    -k "not compiles_for_hopper and not nchw and (test_conv_bn_act or fallback or falls_back or 4_per_group_s2 or interpreter_bf16)"
