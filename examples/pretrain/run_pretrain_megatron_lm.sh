#!/usr/bin/env bash
# Megatron-LM's own pretrain() with the specialization losses (examples/pretrain/
# pretrain_gpt_megatron_lm.py), with torchrun: one node or many. Needs megatron-core 0.19
# (make install-latest, or the Docker image).
#
#   examples/pretrain/run_pretrain_megatron_lm.sh [Megatron-LM flags] [--moe-ortho-loss-coeff ...]
#
# Every flag is Megatron-LM's or a loss flag (README, "Megatron-LM's own training loop"). Without
# a GPU the script adds the flags Megatron-LM needs on CPU (local transformer implementation, gloo,
# no fused kernels). Environment (as run_pretrain_moe.sh):
#   GPUS_PER_NODE  processes per node (default: number of GPUs, or 2 on a CPU-only machine)
#   NNODES NODE_RANK MASTER_ADDR MASTER_PORT   the rendezvous (default 1 / 0 / localhost / a free
#                   port on one node; set MASTER_PORT on several nodes)
#   OUTPUT_DIR      checkpoints and TensorBoard (default: runs/megatron_lm); resumes from it
#   PYTHON          interpreter (default: .venv-latest/bin/python if present, else python3)
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
if [[ -z "${PYTHON:-}" ]]; then
    if [[ -x "$ROOT/.venv-latest/bin/python" ]]; then PYTHON=$ROOT/.venv-latest/bin/python
    else PYTHON=python3; fi
fi
GPUS=$("$PYTHON" -c "import torch; print(torch.cuda.device_count())")
GPUS_PER_NODE=${GPUS_PER_NODE:-$( [[ "$GPUS" != 0 ]] && echo "$GPUS" || echo 2 )}
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
MASTER_ADDR=${MASTER_ADDR:-localhost}
PORT_ARGS=()
if [[ -n "${MASTER_PORT:-}" ]]; then
    PORT_ARGS=(--master-port "$MASTER_PORT")
elif [[ "$NNODES" != 1 ]]; then
    echo "error: set MASTER_PORT (the same free port on every node) for NNODES=$NNODES" >&2
    exit 2
fi
CPU_ARGS=()
if [[ "$GPUS" == 0 ]]; then
    CPU_ARGS=(--transformer-impl local --distributed-backend gloo --use-cpu-initialization
              --no-gradient-accumulation-fusion --no-masked-softmax-fusion --no-bias-gelu-fusion
              --no-bias-dropout-fusion --no-rope-fusion --no-persist-layer-norm)
fi
OUTPUT_DIR=${OUTPUT_DIR:-$ROOT/runs/megatron_lm}

mkdir -p "$OUTPUT_DIR"
exec "$PYTHON" -m megatron_patch.launch \
    --nproc-per-node "$GPUS_PER_NODE" --nnodes "$NNODES" --node-rank "$NODE_RANK" \
    --master-addr "$MASTER_ADDR" "${PORT_ARGS[@]}" \
    "$ROOT/examples/pretrain/pretrain_gpt_megatron_lm.py" \
    "${CPU_ARGS[@]}" \
    --save "$OUTPUT_DIR/checkpoints" --load "$OUTPUT_DIR/checkpoints" \
    --tensorboard-dir "$OUTPUT_DIR/tensorboard" \
    "$@"
