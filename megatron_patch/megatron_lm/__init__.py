"""The specialization losses in Megatron-LM's own training loop (``megatron.training.pretrain``).

Four additions to a Megatron-LM GPT pretraining script (``examples/pretrain/
pretrain_gpt_megatron_lm.py`` is one)::

    from megatron_patch import megatron_lm

    args = parse_and_validate_args(extra_args_provider=megatron_lm.add_arguments)
    model_cfg = gpt_config_from_args(args, config=megatron_lm.transformer_config(args))
    megatron_lm.install(model_cfg)
    pretrain(pretrain_cfg_container_from_args(args, model_cfg), ...)

``add_arguments`` adds the loss flags (``--moe-ortho-loss-coeff``, ``--moe-var-loss-coeff``, ...);
``transformer_config`` builds the model's ``SpecializationConfig`` from all flags (validated:
unsupported combinations are refused before the model is built); ``install`` puts
``SpecializationRouter``/``SpecializationMoELayer`` into every MoE layer of Megatron-LM's default
GPT layer spec (local or Transformer Engine), installs a MoE metrics tracker that logs L_o and L_v
and calibrates ``"auto"`` coefficients (``tracker``), makes checkpoint loads follow this run's
coefficient flags (as ``megatron_patch``'s trainer does) and, without a GPU, applies the CPU/gloo
shims. Needs the Megatron-LM training API of megatron-core 0.19 (``GPTModelConfig`` with layer-spec
callables and post-wrap hooks, ``MoEMetricsTracker``); the orthogonal expert optimizer runs in
``megatron_patch``'s own trainer only.
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import os
from typing import Any, Callable, Optional

import torch

from megatron_patch.compat import MEGATRON_CORE, UnsupportedMegatronError
from megatron_patch.flags import add_flags
from megatron_patch.moe.calibration import reconcile_coefficients
from megatron_patch.moe.config import SpecializationConfig, SpecializationConfigError
from megatron_patch.moe.loss_config import LossConfig
from megatron_patch.moe.specs import specialize_layers

try:
    from megatron.training import initialize as _initialize
    from megatron.training import training as _training
    from megatron.training.argument_utils import core_transformer_config_from_args
    from megatron.training.global_vars import get_args
    from megatron.training.models.gpt import GPTModelConfig, default_layer_spec
    from megatron.training.utils import print_rank_last
    from megatron.core.transformer.moe.moe_logging import set_moe_metrics_tracker
except ImportError as error:
    raise UnsupportedMegatronError(
        f"megatron_patch.megatron_lm needs Megatron-LM's training API of megatron-core 0.19 "
        f"(megatron.training.models.gpt, MoEMetricsTracker); megatron-core {MEGATRON_CORE} "
        f"lacks it ({error}). Install megatron-core 0.19.x / a Megatron-LM core_r0.19 checkout, "
        "or train with megatron_patch's own trainer (python -m megatron_patch.pretrain)."
    ) from error

from megatron_patch.megatron_lm.tracker import SpecializationMetricsTracker

__all__ = ["add_arguments", "transformer_config", "layer_spec", "install"]

LOSS_FLAGS_TITLE = "megatron_patch specialization losses (arXiv 2505.22323)"


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """``extra_args_provider`` for Megatron-LM's argument parser: the loss flags, with their
    defaults (all losses off)."""
    add_flags(parser, LossConfig, LOSS_FLAGS_TITLE, with_defaults=True)
    return parser


def transformer_config(args: argparse.Namespace) -> SpecializationConfig:
    """The model's ``SpecializationConfig`` from Megatron-LM's parsed ``args`` (what
    ``core_transformer_config_from_args`` builds, plus the loss settings).

    Raises:
        SpecializationConfigError: the loss flags were not added (``add_arguments``), or the
            model uses multi-latent attention (its config class is not supported here yet).
    """
    if not hasattr(args, "moe_ortho_loss_coeff"):
        raise SpecializationConfigError(
            "the specialization loss flags are missing from Megatron-LM's arguments: pass "
            "extra_args_provider=megatron_patch.megatron_lm.add_arguments to "
            "parse_and_validate_args / initialize_megatron.")
    if args.multi_latent_attention:
        raise SpecializationConfigError(
            "--multi-latent-attention: megatron_patch.megatron_lm builds its SpecializationConfig "
            "from TransformerConfig, and Megatron-LM would replace it with MLATransformerConfig "
            "(dropping the loss settings). Train MLA models with megatron_patch's own trainer, or "
            "drop --multi-latent-attention.")
    config = core_transformer_config_from_args(args, config_class=SpecializationConfig)
    if not isinstance(config, SpecializationConfig):
        raise SpecializationConfigError(
            f"Megatron-LM built a {type(config).__name__} for these flags, not the requested "
            "SpecializationConfig (heterogeneous layer configs are not supported); drop "
            "--heterogeneous-layers-config-path.")
    return config


def layer_spec(model_config: GPTModelConfig, vp_stage: Optional[int] = None) -> Any:
    """Megatron-LM's default GPT layer spec for ``model_config`` (local or Transformer Engine,
    dense and MoE layers as ``--moe-layer-freq`` says), each MoE layer with this package's
    router and MoE layer. Usable as ``GPTModelConfig.transformer_layer_spec``."""
    return specialize_layers(default_layer_spec(model_config, vp_stage))


def install(model_config: GPTModelConfig) -> SpecializationMetricsTracker:
    """Make Megatron-LM's ``pretrain()`` build and train ``model_config`` with the losses.

    Sets the layer spec (``layer_spec``), installs and returns the metrics tracker (logging,
    ``"auto"`` calibration), registers it as a post-wrap hook (it needs the model chunks), and
    wraps Megatron-LM's checkpoint load so that coefficients follow this run's flags. Without a
    GPU it also applies ``megatron_patch.cpu_compat``'s shims. Call once, before ``pretrain``.
    """
    config = model_config.transformer
    if not isinstance(config, SpecializationConfig):
        raise SpecializationConfigError(
            "install() needs a GPTModelConfig whose transformer is a SpecializationConfig: build "
            "it with gpt_config_from_args(args, config=megatron_lm.transformer_config(args)).")
    if model_config.transformer_layer_spec is not None:
        raise SpecializationConfigError(
            "--spec / transformer_layer_spec is set; megatron_patch.megatron_lm builds the layer "
            "spec itself (megatron_lm.layer_spec). Drop --spec.")
    _cpu_and_wheel_setup()
    model_config.transformer_layer_spec = layer_spec
    tracker = SpecializationMetricsTracker(config)
    set_moe_metrics_tracker(tracker)
    model_config.post_wrap_hooks.append(tracker.attach)
    _training.load_checkpoint = _following_flags(_training.load_checkpoint, config)
    return tracker


def _following_flags(load: Callable[..., Any], config: SpecializationConfig) -> Callable[..., Any]:
    """Megatron-LM's ``load_checkpoint``, then ``reconcile_coefficients``: a fixed coefficient
    flag replaces the checkpoint's value, an ``"auto"`` one keeps a calibrated value unless
    ``--finetune`` (the checkpoint is taken to come from a run with this run's flags)."""

    @functools.wraps(load)
    def load_following_flags(model: list[torch.nn.Module], *args: Any, **kwargs: Any) -> Any:
        result = load(model, *args, **kwargs)
        for line in reconcile_coefficients(model, config, saved=config,
                                           fresh=bool(get_args().finetune)):
            print_rank_last(f"megatron_patch: {line}")
        return result

    return load_following_flags


def _cpu_and_wheel_setup() -> None:
    """CPU shims (no GPU), and, for the megatron-core wheel (no Makefile, prebuilt helpers), no
    attempt to compile the dataset helpers at start-up."""
    if not torch.cuda.is_available():
        from megatron_patch.cpu_compat import apply_cpu_gloo_patches, apply_megatron_training_patches

        apply_cpu_gloo_patches()
        apply_megatron_training_patches()
    datasets_dir = os.path.dirname(importlib.util.find_spec("megatron.core.datasets").origin)
    if not os.path.exists(os.path.join(datasets_dir, "Makefile")):
        _initialize._compile_dependencies = _import_prebuilt_helpers


def _import_prebuilt_helpers() -> None:
    """Check that the wheel's prebuilt dataset helpers load (what compiling them would give)."""
    importlib.import_module("megatron.core.datasets.helpers_cpp")

