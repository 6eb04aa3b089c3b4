"""Check that a GPT-MoE training step gives the same results under several parallel layouts.

Runs one forward+backward step over the same global batch in the single-device layout (the
baseline) and in each requested layout, and compares the LM loss, the MoE tracker values and
every parameter gradient (reassembled to full tensors), and the calibrated L_o / L_v
coefficients of every rank. Exits 1 on any mismatch, 2 on a bad layout or setting.

    python tools/check_parallel_consistency.py --layouts tp2sp,ep2,pp2
Layout grammar: see megatron_patch/parallel_check/layouts.py (tokens tp<N> pp<N> ep<N> etp<N>
dp<N> sp). On CPU every layout runs as gloo processes on this machine.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

from megatron_patch.moe.gated_gram import triton_kernel_problem  # noqa: E402
from megatron_patch.parallel_check.compare import (  # noqa: E402
    Tolerance,
    compare,
    format_table,
    summarize,
)
from megatron_patch.parallel_check.layouts import BASELINE, parse_layout  # noqa: E402
from megatron_patch.parallel_check.model import make_config  # noqa: E402
from megatron_patch.parallel_check.runner import make_global_batch, run_layout  # noqa: E402

# TP with SP, EP, ETP, PP, DP and mixes; every world size <= 4.
DEFAULT_LAYOUTS = "tp2sp,ep2,pp2,dp2,ep2etp2,tp2ep2sp,pp2ep2"
# The MoE tracker name under which megatron's router logs each load-balancing loss type.
BALANCING_LOSS_TRACKER = {
    "aux_loss": "load_balancing_loss",
    "seq_aux_loss": "seq_load_balancing_loss",
    "global_aux_loss": "global_load_balancing_loss",
}


def _coefficient(text: str):
    try:
        return text if text == "auto" else float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or 'auto', got {text!r}") from None


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    model = parser.add_argument_group("model")
    model.add_argument("--num-layers", type=int, default=2)
    model.add_argument("--hidden-size", type=int, default=64)
    model.add_argument("--ffn-hidden-size", type=int, default=128)
    model.add_argument("--num-attention-heads", type=int, default=4)
    model.add_argument("--num-experts", type=int, default=4)
    model.add_argument("--moe-router-topk", type=int, default=2)
    model.add_argument("--moe-ffn-hidden-size", type=int, default=64)
    model.add_argument("--moe-aux-loss-coeff", type=float, default=1e-2)
    model.add_argument("--moe-router-load-balancing-type", default="aux_loss",
                       choices=["aux_loss", "seq_aux_loss", "global_aux_loss", "none"],
                       help="global_aux_loss differs with dp > 1 by design: it uses expert "
                       "counts accumulated over the micro-batches seen so far on all DP ranks")
    model.add_argument("--moe-ortho-loss-coeff", type=_coefficient, default="auto",
                       help="beta of L_o: a number or 'auto' (calibrated on the batch; the "
                       "check also requires every rank to calibrate the same value)")
    model.add_argument("--moe-ortho-loss-form", default="span", choices=["span", "pairwise"])
    model.add_argument("--moe-ortho-loss-normalize", action="store_true",
                       help="L_o of the unit-normalized expert outputs")
    model.add_argument("--moe-ortho-loss-kernel", default="torch", choices=["torch", "triton"],
                       help="triton: the fused kernel (CUDA, or TRITON_INTERPRET=1 on CPU)")
    model.add_argument("--moe-var-loss-coeff", type=_coefficient, default="auto", help="gamma of L_v: number or 'auto'")
    model.add_argument("--seq-length", type=int, default=16)
    model.add_argument("--vocab-size", type=int, default=128)
    run = parser.add_argument_group("run")
    run.add_argument("--micro-batch-size", type=int, default=2)
    run.add_argument("--global-batch-size", type=int, default=8)
    run.add_argument("--layouts", default=DEFAULT_LAYOUTS,
                     help=f"comma-separated layouts (default: {DEFAULT_LAYOUTS})")
    run.add_argument("--tracker-names",
                     help="comma-separated MoE tracker names to compare (default: the tracker "
                     "of the load-balancing loss type)")
    run.add_argument("--backend", default="auto", choices=["auto", "gloo", "nccl"])
    run.add_argument("--seed", type=int, default=1234)
    run.add_argument("--rtol", type=float, default=1e-5,
                     help="relative tolerance, against max|ref| of each quantity")
    run.add_argument("--atol", type=float, default=1e-8)
    run.add_argument("--verbose", action="store_true", help="one row per gradient tensor")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        layouts = [parse_layout(spec) for spec in args.layouts.split(",") if spec.strip()]
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    model_args = {
        "num_layers": args.num_layers,
        "hidden_size": args.hidden_size,
        "ffn_hidden_size": args.ffn_hidden_size,
        "num_attention_heads": args.num_attention_heads,
        "num_moe_experts": args.num_experts,
        "moe_router_topk": args.moe_router_topk,
        "moe_ffn_hidden_size": args.moe_ffn_hidden_size,
        "moe_aux_loss_coeff": args.moe_aux_loss_coeff,
        "moe_router_load_balancing_type": args.moe_router_load_balancing_type,
        "moe_ortho_loss_coeff": args.moe_ortho_loss_coeff,
        "moe_ortho_loss_form": args.moe_ortho_loss_form,
        "moe_ortho_loss_normalize": args.moe_ortho_loss_normalize,
        "moe_ortho_loss_kernel": args.moe_ortho_loss_kernel,
        "moe_var_loss_coeff": args.moe_var_loss_coeff,
        "seq_length": args.seq_length,
        "vocab_size": args.vocab_size,
    }
    try:
        # Catch bad model settings here, with their message, rather than in every process.
        make_config(model_args, BASELINE)
    except (ValueError, AssertionError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if args.moe_ortho_loss_kernel == "triton" and (problem := triton_kernel_problem()):
        print(f"error: {problem}", file=sys.stderr)
        return 2
    batch = make_global_batch(args.global_batch_size, args.seq_length, args.vocab_size, args.seed)
    tolerance = Tolerance(rtol=args.rtol, atol=args.atol)
    if args.tracker_names is not None:
        tracker_names = [name for name in args.tracker_names.split(",") if name]
    else:
        balancing = BALANCING_LOSS_TRACKER.get(args.moe_router_load_balancing_type)
        tracker_names = [balancing] if balancing else []
        tracker_names += [name for name, coeff in (("ortho_loss", args.moe_ortho_loss_coeff),
                                                   ("var_loss", args.moe_var_loss_coeff))
                          if coeff != 0]

    def run(layout):
        start = time.perf_counter()
        result = run_layout(layout, model_args, batch, args.micro_batch_size,
                            backend=args.backend,
                            tracker_names=tracker_names, seed=args.seed)
        print(f"ran {layout} ({layout.world_size} processes) in "
              f"{time.perf_counter() - start:.1f} s", flush=True)
        return result

    baseline = run(BASELINE)
    rows, ok = {}, True
    for layout in layouts:
        diffs = compare(run(layout), baseline, tolerance)
        ok &= all(d.passed for d in diffs)
        rows[str(layout)] = diffs if args.verbose else summarize(diffs)
    print(f"\nbaseline {BASELINE}: lm loss {baseline.lm_loss:.6f}; "
          f"pass if max abs diff <= {args.atol:g} + {args.rtol:g} * max|ref|\n")
    print(format_table(rows))
    print("\nall layouts consistent" if ok else "\nMISMATCH: see rows marked MISMATCH")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
