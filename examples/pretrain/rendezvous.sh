# Sourced by the launchers in this folder: the torchrun rendezvous of megatron_patch.launch from
# the environment (Megatron/Pai-Megatron-Patch conventions; defaults for one machine).
#   GPUS_PER_NODE  processes per node (default: number of GPUs, or 2 on a CPU-only machine)
#   NNODES NODE_RANK MASTER_ADDR MASTER_PORT   default 1 / 0 / localhost / a free port on one
#                  node; MASTER_PORT is required on several nodes
# Needs PYTHON; sets RENDEZVOUS_ARGS (an array of launcher flags), or exits 2.
# shellcheck shell=bash
if [[ -z "${GPUS_PER_NODE:-}" ]]; then
    GPUS_PER_NODE=$("$PYTHON" -c "import torch; print(torch.cuda.device_count() or 2)")
fi
NNODES=${NNODES:-1}
RENDEZVOUS_ARGS=(--nproc-per-node "$GPUS_PER_NODE" --nnodes "$NNODES"
                 --node-rank "${NODE_RANK:-0}" --master-addr "${MASTER_ADDR:-localhost}")
if [[ -n "${MASTER_PORT:-}" ]]; then
    RENDEZVOUS_ARGS+=(--master-port "$MASTER_PORT")
elif [[ "$NNODES" != 1 ]]; then
    echo "error: set MASTER_PORT (the same free port on every node) for NNODES=$NNODES" >&2
    exit 2
fi
