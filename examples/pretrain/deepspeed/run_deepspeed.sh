#!/usr/bin/env bash
# Launch pretrain_gpt_moe.py with the `deepspeed` launcher.
#
#   examples/pretrain/deepspeed/run_deepspeed.sh [pretrain_gpt_moe.py arguments]
#
# Environment:
#   NUM_PROCS   processes per node (default: 2 on CPU, every GPU otherwise)
#   HOSTFILE    multi-node: a DeepSpeed hostfile (see hostfile.example); every node needs the
#               same checkout, venv and data path, and passwordless ssh from this node (pdsh)
#   PYTHON      the interpreter whose `deepspeed` launcher to use (default: .venv/bin/python)
#   MASTER_PORT rendezvous port (default 29500)
# Without a GPU this sets DS_ACCELERATOR=cpu: DeepSpeed's CPU accelerator, gloo, float32.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/../../.." && pwd)"
PYTHON="${PYTHON:-$ROOT/.venv/bin/python}"

if ! "$PYTHON" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    export DS_ACCELERATOR="${DS_ACCELERATOR:-cpu}"
    NUM_PROCS="${NUM_PROCS:-2}"
    export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
fi
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"

LAUNCHER=(--master_port "${MASTER_PORT:-29500}")
if [[ -n "${HOSTFILE:-}" ]]; then
    LAUNCHER+=(--hostfile "$HOSTFILE")
fi
if [[ -n "${NUM_PROCS:-}" ]]; then
    LAUNCHER+=(--num_gpus "$NUM_PROCS")
fi

cd "$ROOT"
exec "$PYTHON" -m deepspeed.launcher.runner "${LAUNCHER[@]}" \
    "$HERE/pretrain_gpt_moe.py" --deepspeed-config "$HERE/ds_config.json" "$@"
