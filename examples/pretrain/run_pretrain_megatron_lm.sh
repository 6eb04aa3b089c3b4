#!/usr/bin/env bash
# Megatron-LM's own pretrain() with the specialization losses (examples/pretrain/
# pretrain_gpt_megatron_lm.py), with torchrun: one node or many. Needs megatron-core 0.19
# (make install-latest, or the Docker image).
#
#   examples/pretrain/run_pretrain_megatron_lm.sh [Megatron-LM flags] [--moe-ortho-loss-coeff ...]
#
# Every flag is Megatron-LM's or a loss flag (README, "Megatron-LM's own training loop"). Without
# a GPU the script adds the flags Megatron-LM needs on CPU (local transformer implementation, gloo,
# no fused kernels). Environment:
#   GPUS_PER_NODE NNODES NODE_RANK MASTER_ADDR MASTER_PORT   the rendezvous (rendezvous.sh)
#   OUTPUT_DIR      checkpoints and TensorBoard (default: runs/megatron_lm); resumes from it
#   PYTHON          interpreter (default: .venv-latest/bin/python if present, else python3)
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
if [[ -z "${PYTHON:-}" ]]; then
    if [[ -x "$ROOT/.venv-latest/bin/python" ]]; then PYTHON=$ROOT/.venv-latest/bin/python
    else PYTHON=python3; fi
fi
# shellcheck source=examples/pretrain/rendezvous.sh
source "$ROOT/examples/pretrain/rendezvous.sh"
CPU_ARGS=()
if [[ $("$PYTHON" -c "import torch; print(torch.cuda.is_available())") == False ]]; then
    CPU_ARGS=(--transformer-impl local --distributed-backend gloo --use-cpu-initialization
              --no-gradient-accumulation-fusion --no-masked-softmax-fusion --no-bias-gelu-fusion
              --no-bias-dropout-fusion --no-rope-fusion --no-persist-layer-norm)
fi
OUTPUT_DIR=${OUTPUT_DIR:-$ROOT/runs/megatron_lm}

mkdir -p "$OUTPUT_DIR"
exec "$PYTHON" -m megatron_patch.launch "${RENDEZVOUS_ARGS[@]}" \
    "$ROOT/examples/pretrain/pretrain_gpt_megatron_lm.py" \
    "${CPU_ARGS[@]}" \
    --save "$OUTPUT_DIR/checkpoints" --load "$OUTPUT_DIR/checkpoints" \
    --tensorboard-dir "$OUTPUT_DIR/tensorboard" \
    "$@"
