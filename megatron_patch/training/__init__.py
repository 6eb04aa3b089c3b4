"""The training entry point and its parts (config, arguments, model, optimizer, step, trainer,
checkpoints, logger).

Importing this package quiets two kinds of expected start-up noise of megatron-core 0.16.1:
the notices that Transformer Engine / Apex are absent (always so on CPU; the NGC image has
both), and TransformerLayer's "Unknown MLP type" warning, which it logs for any MoE layer class
other than MoELayer itself: SpecializationMoELayer then takes the process groups from megatron's
global parallel state, exactly those GPTModel uses by default.
"""

import logging
import warnings

warnings.filterwarnings("ignore", message=r".*(Transformer Engine|Apex).* not installed.*")


class _DropUnknownMlpNotice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Unknown MLP type")


logging.getLogger("megatron.core.transformer.transformer_layer").addFilter(_DropUnknownMlpNotice())
