#!/usr/bin/env bash
# Pretrain a GPT-MoE with the specialization losses, with torchrun: one node or many.
#
#   examples/pretrain/run_pretrain_moe.sh PRESET [extra pretrain flags...]
#
# PRESET is a file in examples/pretrain/configs/ without .yaml (tiny_cpu, deepseek_moe_1b.h100x8,
# ...) or a path to any YAML file of flags; extra flags override it.
# Environment (Megatron/Pai-Megatron-Patch conventions; defaults for one machine):
#   GPUS_PER_NODE NNODES NODE_RANK MASTER_ADDR MASTER_PORT   the rendezvous (rendezvous.sh)
#   DATA_PATH       dataset prefix(es), megatron style "P" or "W1 P1 W2 P2" (default: the demo data)
#   VALID_DATA_PATH separate validation prefix(es) (default: the demo's, if DATA_PATH is the demo's)
#   TOKENIZER_MODEL sentencepiece model (default: the demo tokenizer)
#   OUTPUT_DIR      checkpoints, logs, TensorBoard (default: runs/PRESET); resumes from it if present
#   PYTHON          interpreter (default: .venv/bin/python if present, else python3)
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
PRESET=${1:?usage: run_pretrain_moe.sh PRESET [flags...]}
shift
if [[ -f "$PRESET" ]]; then
    CONFIG=$PRESET
    NAME=$(basename "$PRESET" .yaml)
else
    CONFIG=$ROOT/examples/pretrain/configs/$PRESET.yaml
    NAME=$PRESET
fi
[[ -f "$CONFIG" ]] || { echo "error: no preset $CONFIG (see examples/pretrain/configs/)" >&2; exit 2; }

if [[ -z "${PYTHON:-}" ]]; then
    if [[ -x "$ROOT/.venv/bin/python" ]]; then PYTHON=$ROOT/.venv/bin/python; else PYTHON=python3; fi
fi
# shellcheck source=examples/pretrain/rendezvous.sh
source "$ROOT/examples/pretrain/rendezvous.sh"
if [[ -z "${DATA_PATH:-}" ]]; then
    DATA_PATH=$ROOT/data/corpus_train
    VALID_DATA_PATH=${VALID_DATA_PATH:-$ROOT/data/corpus_valid}
fi
VALID_ARGS=()
if [[ -n "${VALID_DATA_PATH:-}" ]]; then
    # shellcheck disable=SC2206
    VALID_ARGS=(--valid-data-path $VALID_DATA_PATH)
fi
TOKENIZER_MODEL=${TOKENIZER_MODEL:-$ROOT/data/tokenizer.model}
OUTPUT_DIR=${OUTPUT_DIR:-$ROOT/runs/$NAME}

mkdir -p "$OUTPUT_DIR"
# torchrun through megatron_patch.launch: SIGTERM/SIGUSR1 to this process group make every worker
# save and exit 0, the workers exit when the launcher dies, bad input exits 2.
# Data-path words are passed unquoted on purpose: "W1 P1 W2 P2" is a list.
# shellcheck disable=SC2086
exec "$PYTHON" -m megatron_patch.launch "${RENDEZVOUS_ARGS[@]}" \
    -m megatron_patch.training.pretrain \
    --config "$CONFIG" \
    --data-path $DATA_PATH "${VALID_ARGS[@]}" \
    --tokenizer-model "$TOKENIZER_MODEL" \
    --save "$OUTPUT_DIR/checkpoints" --load "$OUTPUT_DIR/checkpoints" \
    --tensorboard-dir "$OUTPUT_DIR/tensorboard" \
    "$@"
