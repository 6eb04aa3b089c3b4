"""Check cases against their single-device baselines: the library behind
``tools/check_parallel_consistency.py``."""

from __future__ import annotations

import time
from typing import Callable, Sequence

from megatron_patch.parallel_check.cases import Case
from megatron_patch.parallel_check.compare import Diff, Tolerance, compare
from megatron_patch.parallel_check.runner import Result, make_global_batch, run_layout
from megatron_patch.training.config import JobConfig

# TP with SP, EP, ETP, PP, DP and mixes; padding masks, capacity dropping, recompute with PP;
# every world size <= 4.
DEFAULT_CASES = ("tp2sp,ep2,pp2,dp2,ep2etp2,tp2ep2sp,pp2ep2,"
                 "tp2ep2sp+padding,ep2+capacity,pp2ep2+padding+recompute")

# The small model the check builds unless flags say otherwise (flag destination -> value).
CHECK_MODEL = {
    "num_layers": 2, "hidden_size": 64, "ffn_hidden_size": 128, "num_attention_heads": 4,
    "num_experts": 4, "moe_router_topk": 2, "moe_ffn_hidden_size": 64, "seq_length": 16,
    "moe_ortho_loss_coeff": "auto", "moe_var_loss_coeff": "auto", "micro_batch_size": 2,
}


def check_cases(
    cases: Sequence[Case],
    job: JobConfig,
    global_batch_size: int,
    vocab_size: int,
    *,
    seed: int = 0,
    backend: str = "auto",
    tolerance: Tolerance = Tolerance(rtol=1e-5, atol=1e-8),
    report: Callable[[str], None] = print,
) -> tuple[dict[str, list[Diff]], dict[tuple[str, ...], Result]]:
    """Run every case and its baseline (once per feature set); returns the diffs by case and the
    baselines by features. ``report`` gets a line per run."""
    baselines: dict[tuple[str, ...], Result] = {}

    def run(case: Case) -> Result:
        start = time.perf_counter()
        samples = make_global_batch(global_batch_size, job.model.seq_length, vocab_size, seed,
                                    padding="padding" in case.features)
        result = run_layout(case.layout, case.job(job), samples, vocab_size, backend=backend)
        report(f"ran {case} ({case.layout.world_size} processes) in "
               f"{time.perf_counter() - start:.1f} s")
        return result

    diffs = {}
    for case in cases:
        if case.features not in baselines:
            baselines[case.features] = run(case.baseline)
        diffs[str(case)] = compare(run(case), baselines[case.features], tolerance)
    return diffs, baselines
