#!/usr/bin/env bash
# The prepared single-GPU check: unit tests (the fused Triton L_o kernel compiled on CUDA), a bf16
# training smoke run with the fused kernel, the loss benchmark (torch and triton L_o kernels side
# by side) and the fused kernel's launch-setting table (benchmarks/tune_gated_gram.py).
# BENCH=0 skips the benchmark, TUNE=0 the table. Run from the repository root on a GPU machine;
# if its Python lacks megatron-core, WHEELS points at a folder of wheels to install first
# (megatron-core 0.16.1 for that Python). Results go to OUT (default ./gpu_results).
set -uo pipefail
OUT=${OUT:-gpu_results}
mkdir -p "$OUT"
if [[ -n "${WHEELS:-}" ]]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site "$WHEELS"/*.whl || exit 1
    export PYTHONPATH=/tmp/site:$PWD
else
    export PYTHONPATH=$PWD
fi
export PYTHONUNBUFFERED=1
{
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    python3 -c "import sys, torch, megatron.core as m; print(sys.version.split()[0], torch.__version__, m.__version__)"
} 2>&1 | tee "$OUT/device.txt"

# Worst case 120 + 120 + 180 + 120 s: one device call (at most 600 s).
timeout 120 python3 -m pytest -q -rf -p no:warnings tests/test_losses.py tests/test_grouping.py \
    tests/test_gated_gram.py tests/test_moe_layer.py > "$OUT/pytest_full.txt" 2>&1
tail -12 "$OUT/pytest_full.txt" | tee "$OUT/pytest.txt"
KERNEL=triton
if grep -q "FAILED tests/test_gated_gram" "$OUT/pytest_full.txt"; then
    echo "the fused kernel failed its tests: the rest runs with the torch kernel only" | tee -a "$OUT/pytest.txt"
    KERNEL=torch
fi

timeout 120 python3 -m megatron_patch.training.pretrain \
    --config examples/pretrain/configs/tiny_cpu.yaml --expert-model-parallel-size 1 \
    --bf16 --use-distributed-optimizer --moe-ortho-loss-kernel "$KERNEL" \
    --train-iters 40 --eval-interval 40 \
    --data-path data/corpus_train --valid-data-path data/corpus_valid \
    --tokenizer-model data/tokenizer.model --save /tmp/gpu_run --no-progress-bar 2>&1 \
    | grep -v -i "warn" | tail -25 | tee "$OUT/train.txt"
cp /tmp/gpu_run/metrics.jsonl "$OUT/train_metrics.jsonl" 2>/dev/null

if [[ "${BENCH:-1}" == 1 ]]; then
    KERNELS=torch
    [[ "$KERNEL" == triton ]] && KERNELS=torch,triton
    timeout 180 python3 benchmarks/bench_moe_losses.py --device cuda --kernels "$KERNELS" \
        --output "$OUT/benchmarks.md" 2>&1 | tail -80 | tee "$OUT/bench.txt"
fi

if [[ "${TUNE:-1}" == 1 && "$KERNEL" == triton ]]; then
    timeout 120 python3 benchmarks/tune_gated_gram.py --output "$OUT/tune_gated_gram.md" \
        2>&1 | tail -60 | tee "$OUT/tune.txt"
fi
