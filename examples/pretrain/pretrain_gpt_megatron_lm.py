"""GPT MoE pretraining with Megatron-LM's own training loop and the specialization losses.

Megatron-LM's flags plus megatron_patch's loss flags; launch like any Megatron-LM script, e.g.

    python -m megatron_patch.launch --nproc-per-node 8 examples/pretrain/pretrain_gpt_megatron_lm.py \\
        --num-experts 64 --moe-router-topk 6 --moe-token-dispatcher-type alltoall \\
        --moe-ortho-loss-coeff auto --moe-var-loss-coeff auto ... (Megatron-LM flags)

The four lines marked "megatron_patch" are all a Megatron-LM GPT script needs to add.
"""

from megatron.core.enums import ModelType
from megatron.training import pretrain
from megatron.training.argument_utils import (
    gpt_config_from_args,
    pretrain_cfg_container_from_args,
)
from megatron.training.arguments import parse_and_validate_args

from megatron_patch import megatron_lm  # megatron_patch
from megatron_patch.megatron_lm.gpt import datasets_provider, forward_step


def main() -> None:
    args = parse_and_validate_args(extra_args_provider=megatron_lm.add_arguments)  # megatron_patch
    config = megatron_lm.transformer_config(args)  # megatron_patch
    model_config = gpt_config_from_args(args, config=config)
    megatron_lm.install(model_config)  # megatron_patch
    pretrain(pretrain_cfg_container_from_args(args, model_config), datasets_provider,
             ModelType.encoder_or_decoder, forward_step)


if __name__ == "__main__":
    main()
