#!/usr/bin/env bash
# Sweep the L_o coefficient beta: variant (a) of the specialization ablation (aux loss only, the
# beta = 0 point) and variant (b) (+ L_o, span form) at each beta, same model, data, seeds and
# steps; then one table and plot of validation loss and specialization against beta
# (tools/sweep_report.py).
#
#   examples/pretrain/ortho_coeff_sweep.sh [--betas "0.01 0.1 1 10"] [--seeds "1 2 3"]
#                                          [--runs-dir DIR] [--output-dir DIR]
#                                          [--report-only (rewrite the reports from the runs)]
#                                          [other specialization_ablation.sh options] [-- pretrain flags]
#
# Each point is one specialization_ablation.sh call with its own runs directory
# (DIR/beta_<beta>), so finished runs are skipped and interrupted ones resume. Defaults: the
# ablation's "cpu" setting (preset ablation_cpu, 300 steps), runs/ortho_sweep,
# docs/results/ortho_coeff_sweep.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
COMMAND_LINE="examples/pretrain/ortho_coeff_sweep.sh"
for word in "$@"; do
    [[ "$word" == --report-only ]] || COMMAND_LINE+=" $(printf '%q' "$word")"
done

BETAS="0.01 0.1 1 10" SEEDS="1 2 3" RUNS_DIR=$ROOT/runs/ortho_sweep
OUT_DIR=$ROOT/docs/results/ortho_coeff_sweep REPORT_ONLY=0 PASS=()
while [[ $# -gt 0 ]]; do
    case "$1" in
        --betas) BETAS=$2; shift ;;
        --seeds) SEEDS=$2; shift ;;
        --runs-dir) RUNS_DIR=$2; shift ;;
        --output-dir) OUT_DIR=$2; shift ;;
        --report-only) REPORT_ONLY=1 ;;
        --variants|--beta|--setting) echo "error: $1 is set by the sweep" >&2; exit 2 ;;
        -h|--help) sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        *) PASS+=("$@"); break ;;
    esac
    shift
done
for beta in $BETAS; do
    if ! awk "BEGIN {exit !($beta > 0)}" 2> /dev/null; then
        echo "error: --betas takes positive numbers, got '$beta'" >&2; exit 2
    fi
done
PYTHON=${PYTHON:-$ROOT/.venv/bin/python}
[[ -x "$PYTHON" ]] || PYTHON=python3

point() {   # beta, variant, [--report-only]
    "$ROOT/examples/pretrain/specialization_ablation.sh" --setting "beta_$1" --variants "$2" \
        --beta "$1" --seeds "$SEEDS" --runs-dir "$RUNS_DIR/beta_$1" --output-dir "$OUT_DIR/beta_$1" \
        "${@:3}" "${PASS[@]}"
}

ONLY=()
[[ "$REPORT_ONLY" == 1 ]] && ONLY=(--report-only)
point 0 a "${ONLY[@]}"
for beta in $BETAS; do point "$beta" b "${ONLY[@]}"; done
POINTS=("$OUT_DIR/beta_0")
for beta in $BETAS; do POINTS+=("$OUT_DIR/beta_$beta"); done
"$PYTHON" "$ROOT/tools/sweep_report.py" --output-dir "$OUT_DIR" --command "$COMMAND_LINE" "${POINTS[@]}"
