"""Pretrain a small GPT-MoE with DeepSpeed (ZeRO 1/2) plus the expert-specialization losses.

Every MLP is a ``megatron_patch.deepspeed.SpecializationMoE``; the training loss is
``lm_loss + moe_loss_coeff * sum_layers(l_aux + beta * L_o + gamma * L_v)``, the way
Megatron-DeepSpeed adds ``l_aux`` (so the effective coefficients of L_o and L_v are
``moe_loss_coeff * beta`` and ``moe_loss_coeff * gamma``). The loss flags are those of the
megatron-core trainer (``--moe-ortho-loss-coeff`` = beta, ``--moe-var-loss-coeff`` = gamma, ...),
generated from the same ``LossConfig``.

Launch with the ``deepspeed`` launcher (see run_deepspeed.sh and README.md in this folder); run
without a launcher it trains as a single process. On a machine without GPUs set
``DS_ACCELERATOR=cpu``: DeepSpeed's CPU accelerator with gloo, float32 (bf16 is turned off).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

from megatron_patch.distributed import free_port
from megatron_patch.flags import add_flags, from_namespace
from megatron_patch.moe.loss_config import LossConfig

HERE = Path(__file__).resolve().parent
REPO_ROOT = HERE.parents[2]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--deepspeed-config", default=str(HERE / "ds_config.json"))
    parser.add_argument("--data-prefix", default=str(REPO_ROOT / "data" / "corpus_train"),
                        help="megatron-core indexed dataset (.bin/.idx), built by `make data`")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--micro-batch-size", type=int, help="overrides train_micro_batch_size_per_gpu")
    parser.add_argument("--zero-stage", type=int, choices=(1, 2), help="overrides zero_optimization.stage")
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--vocab-size", type=int, help="default: largest token id + 1, rounded up to 64")
    parser.add_argument("--seq-length", type=int, default=128)
    parser.add_argument("--hidden-size", type=int, default=128)
    parser.add_argument("--ffn-hidden-size", type=int, default=256)
    parser.add_argument("--num-layers", type=int, default=2)
    parser.add_argument("--num-heads", type=int, default=4)
    parser.add_argument("--num-experts", type=int, default=8)
    parser.add_argument("--ep-size", type=int, default=1, help="expert-parallel size (divides the world size)")
    parser.add_argument("--topk", type=int, default=2)
    parser.add_argument("--capacity-factor", type=float, default=1.25)
    parser.add_argument("--moe-loss-coeff", type=float, default=0.01, help="multiplies the layers' l_aux")
    add_flags(parser, LossConfig, "specialization losses (defaults here: beta = gamma = 1; fixed "
              "coefficients and the torch kernel only)")
    parser.set_defaults(moe_ortho_loss_coeff=1.0, moe_var_loss_coeff=1.0)
    parser.add_argument("--log-interval", type=int, default=10)
    parser.add_argument("--metrics-file", help="append one JSON line per logged step (rank 0)")
    parser.add_argument("--local_rank", type=int, default=0, help="set by the deepspeed launcher")
    return parser.parse_args()


def default_single_process_env() -> None:
    """Without a launcher: the torch.distributed variables of a one-process job."""
    if "RANK" in os.environ:
        return
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(free_port()))


def deepspeed_config(args: argparse.Namespace, device_name: str) -> dict:
    """ds_config.json with the command-line overrides; bf16 off on the CPU accelerator."""
    config = json.loads(Path(args.deepspeed_config).read_text())
    if args.micro_batch_size is not None:
        config["train_micro_batch_size_per_gpu"] = args.micro_batch_size
    if args.zero_stage is not None:
        config.setdefault("zero_optimization", {})["stage"] = args.zero_stage
    if device_name == "cpu":
        config.setdefault("bf16", {})["enabled"] = False
    return config


def main() -> None:
    args = parse_args()
    default_single_process_env()
    import deepspeed
    from deepspeed import comm as dist
    from deepspeed.accelerator import get_accelerator
    from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer

    from gpt_moe import GPTMoE, GPTMoEConfig
    from megatron_patch.cpu_compat import use_gloo_for_deepspeed_comm
    from megatron_patch.deepspeed import specialization_loss_values
    from token_windows import TokenWindows, load_token_stream

    accelerator = get_accelerator()
    use_gloo_for_deepspeed_comm()
    deepspeed.init_distributed(dist_backend=accelerator.communication_backend_name())
    rank, world_size = dist.get_rank(), dist.get_world_size()
    stream = load_token_stream(args.data_prefix)
    vocab_size = args.vocab_size or -(-(int(stream.max()) + 1) // 64) * 64

    # A seed per rank gives every expert its own initialization; deepspeed.initialize then
    # broadcasts the non-expert parameters (and expert replicas) from their source ranks.
    torch.manual_seed(args.seed + rank)
    model = GPTMoE(GPTMoEConfig(
        vocab_size=vocab_size, seq_length=args.seq_length, hidden_size=args.hidden_size,
        num_layers=args.num_layers, num_heads=args.num_heads, ffn_hidden_size=args.ffn_hidden_size,
        num_experts=args.num_experts, ep_size=args.ep_size, topk=args.topk,
        capacity_factor=args.capacity_factor, losses=from_namespace(LossConfig, args)))
    # ZeRO needs expert and non-expert parameters in separate optimizer groups.
    param_groups = split_params_into_different_moe_groups_for_optimizer(
        {"params": list(model.parameters()), "name": "parameters"})
    optimizer = torch.optim.AdamW(param_groups, lr=args.lr, betas=(0.9, 0.95), weight_decay=0.0)
    config = deepspeed_config(args, accelerator.device_name())
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    windows = TokenWindows(stream, args.seq_length, args.seed, rank)
    micro_batch = engine.train_micro_batch_size_per_gpu()
    if rank == 0:
        print(f"world size {world_size}, EP {args.ep_size}, ZeRO stage {engine.zero_optimization_stage()}, "
              f"{accelerator.device_name()} / {accelerator.communication_backend_name()}, "
              f"bf16 {engine.bfloat16_enabled()}, vocab {vocab_size}, {stream.size} tokens", flush=True)

    start = time.perf_counter()
    for step in range(1, args.steps + 1):
        tokens, labels = (t.to(engine.device) for t in windows.batch(micro_batch))
        lm_loss, moe_loss = engine(tokens, labels)
        engine.backward(lm_loss + args.moe_loss_coeff * moe_loss)
        engine.step()
        if step % args.log_interval == 0 or step == args.steps:
            mean_lm = lm_loss.detach().float().clone()
            dist.all_reduce(mean_lm)
            record = {"step": step, "lm_loss": mean_lm.item() / world_size, **specialization_loss_values(model),
                      "tokens_per_s": step * micro_batch * args.seq_length * world_size / (time.perf_counter() - start)}
            if rank == 0:
                print(" | ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in record.items()),
                      flush=True)
                if args.metrics_file:
                    with open(args.metrics_file, "a") as handle:
                        handle.write(json.dumps(record) + "\n")
    if rank == 0:
        print(f"done: {args.steps} steps in {time.perf_counter() - start:.1f} s", flush=True)


if __name__ == "__main__":
    main()
