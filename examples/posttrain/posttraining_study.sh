#!/usr/bin/env bash
# The post-training study (arXiv 2505.22323's protocol in miniature): a base GPT-MoE pretrained
# with the aux loss only, exported to Hugging Face and post-trained from that export on the task
# suite with (a) the aux loss only, (b) + L_o + L_v with step-0 auto calibration, (c) + L_o + L_v
# with fixed coefficients, (d) + scale-free L_o + L_v; each with full fine-tuning and with LoRA,
# seeds 1 2 3; evaluation, specialization analysis and the report in docs/results/posttraining/.
#
#   examples/posttrain/posttraining_study.sh            # the study: ~2.5 h on 2 CPU cores
#   examples/posttrain/posttraining_study.sh --quick    # a tiny model, 1 seed: a few minutes
#   examples/posttrain/posttraining_study.sh --report-only
#
# Every option: python -m megatron_patch.analysis.posttraining --help. Finished steps are
# skipped, so an interrupted study resumes where it stopped.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
if [[ -z "${PYTHON:-}" ]]; then
    if [[ -x "$ROOT/.venv/bin/python" ]]; then PYTHON=$ROOT/.venv/bin/python; else PYTHON=python3; fi
fi
cd "$ROOT"
exec "$PYTHON" -m megatron_patch.analysis.posttraining "$@"
