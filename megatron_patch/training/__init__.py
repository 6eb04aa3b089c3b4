"""The training entry point and its parts (config, arguments, model, optimizer, step, trainer,
checkpoints, logger).

Importing this package quiets expected start-up and per-step noise of megatron-core 0.16.1 and
torch that says nothing about the run, each matched by its exact message:

- the notices that Transformer Engine / Apex are absent (always so on CPU; the NGC image has
  both);
- TransformerLayer's "Unknown MLP type" warning, which it logs for any MoE layer class other
  than MoELayer itself: SpecializationMoELayer then takes the process groups from megatron's
  global parallel state, exactly those GPTModel uses by default;
- TransformerConfig's "full scope is deprecated" (its own default of cuda_graph_scope);
- torch's deprecation notices for calls megatron-core makes (``all_gather_into_tensor``,
  ShardedTensor in dist_checkpointing), and megatron's "tp_group is None" deprecation notices.
"""

import logging
import warnings

for _message in (
    r".*(Transformer Engine|Apex).* not installed.*",
    r"full scope is deprecated.*",
    r".*torch\.distributed\.all_gather_into_tensor. is deprecated.*",
    r"Please use DTensor instead and we are deprecating ShardedTensor.*",
    r".*tp_group is None, using default tp group.*",
):
    warnings.filterwarnings("ignore", message=_message)


class _DropUnknownMlpNotice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Unknown MLP type")


logging.getLogger("megatron.core.transformer.transformer_layer").addFilter(_DropUnknownMlpNotice())
