#!/usr/bin/env bash
# One GPU session's work for issue 6, in two calls of under 10 minutes each (the device
# tool's limit per command; a warm machine keeps Triton's cache between them):
#   bash benchmarks/device_run.sh 1 [OUT_DIR]    # GPU tests, headline, grouped 3x3 kernels (~7 min)
#   bash benchmarks/device_run.sh 2 [OUT_DIR]    # blocks, launch economy, NaN-path cost, profile (~7 min)
#   bash benchmarks/device_run.sh all [OUT_DIR]  # both, where no such limit applies
# 1. correctness on the GPU, no interpreter, bf16 included (tests skip nothing GPU-only);
# 2. the benchmarks that fit: headline table (batch 32), grouped 3x3 kernels, one block per stage;
# 3. the cost of the exact NaN/Inf path (docs/performance.md, choice 5); a profile of one ResNeXt-50 training step.
# Every stage has its own time limit so a slow one cannot eat the others; logs and result
# files land in OUT_DIR (default: $OUT, else benchmarks/results/).
set -uo pipefail
cd "$(dirname "$0")/.."
PART="${1:-all}"
OUT_DIR="${2:-${OUT:-benchmarks/results}}"
mkdir -p "$OUT_DIR"
unset TRITON_INTERPRET
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

{
  date -u +%FT%TZ
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
  python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
} 2>&1 | tee "$OUT_DIR/device.txt"

if [[ "$PART" == 1 || "$PART" == all ]]; then
timeout 150 python -m pytest tests -q -x -p no:cacheprovider \
  --deselect tests/test_compile_hopper.py 2>&1 | tail -40 | tee "$OUT_DIR/tests_gpu.log"

# The whole grid takes hours (every torch.compile case compiles afresh): select what fits.
# Results files are checkpointed every 30 s, so a stage cut by its timeout keeps its figures.
timeout 150 python -m benchmarks --batch 32 --out "$OUT_DIR" 2>&1 | tail -30 | tee "$OUT_DIR/headline.log"
timeout 150 python -m pytest benchmarks --benchmark -q -p no:cacheprovider --bench-results-dir "$OUT_DIR" \
  -k "conv3x3 and bf16 and (b128 or b256)" --bench-providers ours,eager,eager_nchw 2>&1 | tail -40 \
  | tee "$OUT_DIR/kernels.log"
fi

if [[ "$PART" == 2 || "$PART" == all ]]; then
timeout 120 python -m pytest benchmarks --benchmark -q -p no:cacheprovider --bench-results-dir "$OUT_DIR" \
  -k "block and bf16 and b128 and not compile" 2>&1 | tail -40 | tee "$OUT_DIR/blocks.log"

# launch economy (issue 13): device ops, saved bytes and enqueue time, fused vs eager; graphed blocks
timeout 100 python -m pytest benchmarks/test_report.py --benchmark -q -p no:cacheprovider --bench-results-dir "$OUT_DIR" \
  -k "stage1 or resnext50" 2>&1 | tail -40 | tee "$OUT_DIR/report.log"
timeout 60 python -m pytest benchmarks/test_blocks.py --benchmark -q -p no:cacheprovider --bench-results-dir "$OUT_DIR" \
  -k "resnext50_32x4d and stage1 and bf16 and b128 and eval" --bench-providers ours,eager,ours_graphed,eager_graphed \
  2>&1 | tail -20 | tee "$OUT_DIR/graphed.log"

timeout 45 python -m benchmarks.nan_path_cost --batch 128 --out "$OUT_DIR" 2>&1 | tail -20 \
  | tee "$OUT_DIR/nan_path_cost.log"
timeout 90 python -m benchmarks.profile --out "$OUT_DIR/profile" 2>&1 | tail -60 | tee "$OUT_DIR/profile.log"
fi
exit 0
