#!/usr/bin/env bash
# Expert-specialization ablation: train the same GPT-MoE on the same data, seeds and steps with
#   a) the aux loss only, b) + L_o, c) + L_v, d) + L_o + L_v, e) + L_o (pairwise form) + L_v,
#   and with the orthogonal expert optimizer (OMoE): f) + OMoE (weight subspace), g) + L_o + L_v
#   + OMoE, h) + OMoE (representation subspace); and i) + L_o + L_v with "auto" coefficients
#   calibrated after warm-up steps,
# run tools/analyze_specialization.py on each final checkpoint, and write one comparison
# (mean +- std over seeds) with tools/ablation_report.py: results.md, results.json and PNGs.
# Each variant's description and flags are defined once, in megatron_patch/analysis/variants.py.
#
#   examples/pretrain/specialization_ablation.sh [--quick | --smoke] [options] [-- pretrain flags]
#
# Settings (model, steps and seeds; a named setting only sets defaults, options override it):
#   (default)  setting "cpu": preset ablation_cpu (16 experts top-4, hidden 128, 4 layers, seq 128,
#              300 steps of 16 sequences), seeds 1 2 3, all five variants: ~1.5 h on 2 CPU cores
#   --quick    setting "quick": a tiny model (2 layers, hidden 64, 16 experts top-4, seq 64),
#              60 steps, seed 1, all five variants: a few minutes on 2 CPU cores
#   --smoke    setting "smoke": a toy model, 2 steps, variants a and h, seed 1 (the test)
# Options:
#   --setting NAME        name of the setting (output dirs are named after it)
#   --preset P            launcher preset name or YAML file (default ablation_cpu)
#   --seeds "1 2 3"       seeds (the same for every variant)
#   --variants "a b c d e"   (any of a-i; default a-e)
#   --beta X              L_o coefficient of variants b, d (span form; default 10)
#   --beta-pairwise X     L_o coefficient of variant e (pairwise form; default 10)
#   --gamma X             L_v coefficient of variants c, d, e (default 0.1)
#                         Fixed, from a pilot on ablation_cpu (docs/results/README.md): "auto"
#                         gives beta = 10 for both L_o forms (L_o ~ 6e-6 at step 1) but, from
#                         scratch, gamma = 10 (routing starts uniform, |L_v| ~ 2e-4), which
#                         collapses routing onto 4 experts (MaxVio 3.0 by step 30).
#   --omoe "FLAGS"        OMoE flags of variants f, g (default: "--moe-orthogonal-alpha 0.1";
#                         cycles of 4 plain steps and 1 projected step)
#   --omoe-repr "FLAGS"   OMoE flags of variant h (default: "--moe-orthogonal-subspace
#                         representations --moe-orthogonal-alpha 1")
#   --calibration-iters K warm-up steps of variant i before its "auto" coefficients are
#                         calibrated (default 50)
#   --runs-dir DIR        checkpoints and logs (default runs/ablation_<setting>); finished runs
#                         are skipped, interrupted ones resume from their last checkpoint
#   --output-dir DIR      the report (default docs/results/ablation_<setting>)
#   --analysis-args "..." extra flags for tools/analyze_specialization.py
#   --report-only         only (re)write the report from what is in --runs-dir
# Everything after "--" is passed to every training run (after the setting's flags, so it wins).
#
# Environment: as examples/pretrain/run_pretrain_moe.sh (GPUS_PER_NODE, NNODES, NODE_RANK,
# MASTER_ADDR, DATA_PATH, VALID_DATA_PATH, TOKENIZER_MODEL, PYTHON); MASTER_PORT is the base
# port, run i uses MASTER_PORT + i (default 6100). On GPUs pick a bigger preset and sizes, e.g.
#   GPUS_PER_NODE=8 examples/pretrain/specialization_ablation.sh --setting h100x8 \
#       --preset deepseek_moe_1b.h100x8 -- --train-iters 5000
# (the analysis runs as one process and reshards the checkpoint; with NNODES > 1 run the script
# on every node: only NODE_RANK 0 analyzes and reports).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
COMMAND_LINE="examples/pretrain/specialization_ablation.sh"
for word in "$@"; do   # the command that trains the runs (a --report-only rerun reports it)
    [[ "$word" == --report-only ]] || COMMAND_LINE+=" $(printf '%q' "$word")"
done

SETTING="" PRESET="" SEEDS="" VARIANTS="" RUNS_DIR="" OUT_DIR="" MODE=default REPORT_ONLY=0
BETA=10 BETA_PW=10 GAMMA=0.1 ANALYSIS_EXTRA="" EXTRA=()
OMOE="--moe-orthogonal-alpha 0.1" CALIBRATION_ITERS=50
OMOE_REPR="--moe-orthogonal-subspace representations --moe-orthogonal-alpha 1"
while [[ $# -gt 0 ]]; do
    case "$1" in
        --quick) MODE=quick ;;
        --smoke) MODE=smoke ;;
        --setting) SETTING=$2; shift ;;
        --preset) PRESET=$2; shift ;;
        --seeds) SEEDS=$2; shift ;;
        --variants) VARIANTS=$2; shift ;;
        --beta) BETA=$2; shift ;;
        --beta-pairwise) BETA_PW=$2; shift ;;
        --gamma) GAMMA=$2; shift ;;
        --omoe) OMOE=$2; shift ;;
        --omoe-repr) OMOE_REPR=$2; shift ;;
        --calibration-iters) CALIBRATION_ITERS=$2; shift ;;
        --runs-dir) RUNS_DIR=$2; shift ;;
        --output-dir) OUT_DIR=$2; shift ;;
        --analysis-args) ANALYSIS_EXTRA=$2; shift ;;
        --report-only) REPORT_ONLY=1 ;;
        --) shift; EXTRA=("$@"); break ;;
        -h|--help) sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        *) echo "error: unknown option $1 (see --help)" >&2; exit 2 ;;
    esac
    shift
done

# Per-setting model overrides, analysis sizes and defaults.
SETTING_FLAGS=()
ANALYSIS_FLAGS=()
case "$MODE" in
    default)
        SETTING=${SETTING:-cpu}; SEEDS=${SEEDS:-1 2 3}; VARIANTS=${VARIANTS:-a b c d e} ;;
    quick)
        SETTING=${SETTING:-quick}; SEEDS=${SEEDS:-1}; VARIANTS=${VARIANTS:-a b c d e}
        SETTING_FLAGS=(--num-layers 2 --hidden-size 64 --ffn-hidden-size 128
                       --moe-ffn-hidden-size 32 --seq-length 64 --train-iters 60
                       --lr-warmup-iters 5 --eval-interval 30 --eval-iters 4)
        ANALYSIS_FLAGS=(--num-samples 32 --sample-tokens 512 --silhouette-points 500) ;;
    smoke)
        SETTING=${SETTING:-smoke}; SEEDS=${SEEDS:-1}; VARIANTS=${VARIANTS:-a h}
        SETTING_FLAGS=(--num-layers 2 --hidden-size 32 --ffn-hidden-size 64
                       --moe-ffn-hidden-size 32 --num-experts 4 --moe-router-topk 2
                       --seq-length 32 --micro-batch-size 2 --global-batch-size 4
                       --train-iters 2 --lr-warmup-iters 1 --eval-interval 2 --eval-iters 1
                       --moe-orthogonal-accumulate-steps 1)
        ANALYSIS_FLAGS=(--num-samples 8 --sample-tokens 128 --silhouette-points 100 --no-plots) ;;
esac
PRESET=${PRESET:-ablation_cpu}
RUNS_DIR=${RUNS_DIR:-$ROOT/runs/ablation_$SETTING}
OUT_DIR=${OUT_DIR:-$ROOT/docs/results/ablation_$SETTING}
# shellcheck disable=SC2206
ANALYSIS_FLAGS+=($ANALYSIS_EXTRA)
if [[ -z "${PYTHON:-}" ]]; then
    if [[ -x "$ROOT/.venv/bin/python" ]]; then PYTHON=$ROOT/.venv/bin/python; else PYTHON=python3; fi
fi
export PYTHON
BASE_PORT=${MASTER_PORT:-6100}
NODE_RANK=${NODE_RANK:-0}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} PYTHONUNBUFFERED=1

variant_flags() {   # the pretraining flags of one variant, one a line, from its definition in
    # megatron_patch/analysis/variants.py (exit status 2 for an unknown variant)
    "$PYTHON" -m megatron_patch.analysis.variants "$1" --beta "$BETA" --beta-pairwise "$BETA_PW" \
        --gamma "$GAMMA" --omoe="$OMOE" --omoe-repr="$OMOE_REPR" \
        --calibration-iters "$CALIBRATION_ITERS"
}
for v in $VARIANTS; do variant_flags "$v" > /dev/null; done

report() {
    [[ "$NODE_RANK" == 0 ]] || return 0
    "$PYTHON" "$ROOT/tools/ablation_report.py" --runs-dir "$RUNS_DIR" --output-dir "$OUT_DIR" \
        --setting "$SETTING" --variants "$VARIANTS" --seeds "$SEEDS" \
        --coefficients "beta=$BETA beta_pairwise=$BETA_PW gamma=$GAMMA" --omoe="$OMOE" --omoe-repr="$OMOE_REPR" \
        --command "$COMMAND_LINE" --preset "$PRESET"
}

mkdir -p "$RUNS_DIR"
if [[ "$REPORT_ONLY" == 1 ]]; then report; exit 0; fi

echo "ablation '$SETTING': variants [$VARIANTS], seeds [$SEEDS], preset $PRESET"
echo "runs: $RUNS_DIR    report: $OUT_DIR"
START=$(date +%s)
index=0
for seed in $SEEDS; do
    for v in $VARIANTS; do
        index=$((index + 1))
        RUN=$RUNS_DIR/${v}_seed$seed
        mkdir -p "$RUN"
        if [[ -f "$RUN/done" ]]; then
            echo "[$v seed $seed] done already, skipped"
            continue
        fi
        mapfile -t FLAGS < <(variant_flags "$v")
        FLAGS+=(--seed "$seed" --no-progress-bar)
        CMD=(env MASTER_PORT=$((BASE_PORT + index)) OUTPUT_DIR="$RUN"
             "$ROOT/examples/pretrain/run_pretrain_moe.sh" "$PRESET"
             "${SETTING_FLAGS[@]}" "${FLAGS[@]}" "${EXTRA[@]}")
        printf '%q ' "${CMD[@]}" > "$RUN/command.txt"
        echo >> "$RUN/command.txt"
        printf '[%s seed %s] train ... ' "$v" "$seed"
        t0=$(date +%s.%N)
        if ! "${CMD[@]}" > "$RUN/train.log" 2>&1; then
            echo "FAILED (see $RUN/train.log):"; tail -n 20 "$RUN/train.log"; exit 1
        fi
        t1=$(date +%s.%N)
        if [[ "$NODE_RANK" == 0 ]]; then
            printf 'analyze ... '
            if ! "$PYTHON" "$ROOT/tools/analyze_specialization.py" --load "$RUN/checkpoints" \
                    --output-dir "$RUN/analysis" --no-progress-bar "${ANALYSIS_FLAGS[@]}" \
                    > "$RUN/analysis.log" 2>&1; then
                echo "FAILED (see $RUN/analysis.log):"; tail -n 20 "$RUN/analysis.log"; exit 1
            fi
        fi
        t2=$(date +%s.%N)
        printf '{"train_s": %s, "analysis_s": %s}\n' \
            "$(awk "BEGIN {print $t1 - $t0}")" "$(awk "BEGIN {print $t2 - $t1}")" > "$RUN/timing.json"
        touch "$RUN/done"
        echo "$(grep -m1 'final valid loss' "$RUN/train.log" || true) ($(cut -c2- "$RUN/timing.json" | tr -d '}\n'))"
    done
    report > /dev/null   # refreshed after every seed, so an interrupted ablation has a report
done
report
echo "ablation finished in $(( $(date +%s) - START )) s"
