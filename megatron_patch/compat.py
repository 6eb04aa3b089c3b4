"""Every difference between the supported megatron-core releases (0.16.1 to 0.19.x), in one place.

Each difference is a feature check on the installed megatron-core (what its classes accept or do),
computed once at import; the rest of the package calls the helpers below and never tests a
version. Measured differences (file and line: docs/megatron_versions.md):

===========================================  ========  ========  =====================
difference                                   0.16.1    0.17      0.18, 0.19
===========================================  ========  ========  =====================
MoE entry of a layer spec                    ModuleSpec ModuleSpec functools.partial
MoELayer / TopKRouter take is_mtp_layer      no        yes       yes (+ name)
token_dispatch runs the shared expert fc1    no        no        yes
MoE loss tracker                             dict      dict      MoEMetricsTracker
legacy GroupedMLP (local spec, grouped GEMM) yes       no        no
GPTDataset sample query returns              2 values  2         3 (0.19)
checkpoint common state                      common.pt common.pt in the shards (0.19)
===========================================  ========  ========  =====================
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import inspect
from typing import Any, Optional

import torch
from megatron.core import package_info
from megatron.core.dist_checkpointing import serialization as _serialization
from megatron.core.tensor_parallel import all_to_all
from megatron.core.transformer.moe import experts as _experts
from megatron.core.transformer.moe import moe_utils
from megatron.core.transformer.moe.moe_layer import MoELayer
from megatron.core.transformer.moe.router import TopKRouter
from megatron.core.transformer.moe.token_dispatcher import MoEAlltoAllTokenDispatcher
from megatron.core.transformer.spec_utils import ModuleSpec, build_module
from packaging.version import Version

SUPPORTED = ("0.16.1", "0.20")  # [lowest, first unsupported)
MEGATRON_CORE = Version(Version(package_info.__version__).base_version)


class UnsupportedMegatronError(RuntimeError):
    """The installed megatron-core is outside the supported range; the message says which."""


if not Version(SUPPORTED[0]) <= MEGATRON_CORE < Version(SUPPORTED[1]):
    raise UnsupportedMegatronError(
        f"megatron_patch supports megatron-core >= {SUPPORTED[0]} and < {SUPPORTED[1]}; "
        f"{package_info.__version__} is installed. Install a supported release, e.g. "
        "pip install 'megatron-core==0.19.2' (Python >= 3.12) or 'megatron-core==0.16.1'.")


def _parameters(function: Any) -> set[str]:
    return set(inspect.signature(function).parameters)


# --- layer construction -------------------------------------------------------------------------

MOE_LAYER_PARAMETERS = _parameters(MoELayer.__init__) - {"self"}
ROUTER_PARAMETERS = _parameters(TopKRouter.__init__) - {"self"}


def accepted(parameters: set[str], **optional: Any) -> dict[str, Any]:
    """The keyword arguments of ``optional`` that a constructor with ``parameters`` takes
    (``is_mtp_layer``, ``name``: added in 0.17 and 0.18)."""
    return {key: value for key, value in optional.items() if key in parameters}


def is_moe_entry(mlp: Any) -> bool:
    """Whether the ``mlp`` entry of a TransformerLayer spec builds megatron-core's MoELayer (a
    ``ModuleSpec`` up to 0.17, a ``functools.partial`` from 0.18)."""
    return (isinstance(mlp, ModuleSpec) and mlp.module is MoELayer) or (
        isinstance(mlp, functools.partial) and mlp.func is MoELayer)


def specialize_moe_entry(mlp: Any, layer_class: type, router_class: type) -> Any:
    """The MoE entry of a TransformerLayer spec, with ``layer_class`` for megatron's MoELayer and
    ``router_class`` for its router: a ``ModuleSpec`` (<= 0.17) or ``functools.partial(MoELayer,
    submodules=...)`` (0.18+), returned in the same form.

    Raises:
        ValueError: ``mlp`` is not megatron-core's MoELayer entry.
    """
    if not is_moe_entry(mlp):
        raise ValueError(
            "with_specialization needs a layer spec whose mlp is megatron-core's MoELayer; build "
            "it with num_experts set (e.g. get_gpt_layer_local_spec(num_experts=8)).")
    if isinstance(mlp, ModuleSpec):
        spec = dataclasses.replace(mlp, module=layer_class)
        spec.submodules = dataclasses.replace(mlp.submodules, router=router_class)
        return spec
    submodules = dataclasses.replace(mlp.keywords["submodules"], router=router_class)
    return functools.partial(layer_class, *mlp.args, **{**mlp.keywords, "submodules": submodules})


def build_moe_layer(mlp: Any, config: Any, **kwargs: Any) -> torch.nn.Module:
    """Instantiate the MoE entry of a layer spec (a ``ModuleSpec`` or a ``partial``)."""
    if isinstance(mlp, ModuleSpec):
        return build_module(mlp, config=config, **kwargs)
    return mlp(config=config, **kwargs)


# Legacy GroupedMLP (grouped GEMM without Transformer Engine) exists up to 0.16; from 0.17 the local
# spec silently builds SequentialMLP for --moe-grouped-gemm.
HAS_LOCAL_GROUPED_GEMM = hasattr(_experts, "GroupedMLP")

# --- token dispatcher -----------------------------------------------------------------------------

# 0.18+: the alltoall dispatcher's token_dispatch starts the overlapped shared expert (its fc1);
# before, dispatch_postprocess did.
TOKEN_DISPATCH_RUNS_SHARED_EXPERT = (
    "linear_fc1_forward_and_act" in inspect.getsource(MoEAlltoAllTokenDispatcher.token_dispatch))
_ALL_TO_ALL_TAKES_NCCL_STREAM = "use_nccl_stream" in _parameters(all_to_all)


def expert_all_to_all(dispatcher: MoEAlltoAllTokenDispatcher,
                      tokens: torch.Tensor) -> torch.Tensor:
    """The tokens' expert-parallel all-to-all of ``dispatcher``'s current split sizes."""
    extra = ({"use_nccl_stream": dispatcher.use_nccl_stream}
             if _ALL_TO_ALL_TAKES_NCCL_STREAM else {})
    return all_to_all(dispatcher.ep_group, tokens, dispatcher.output_splits,
                      dispatcher.input_splits, **extra)


# --- MoE loss tracker -----------------------------------------------------------------------------

# 0.18+: megatron's MoEMetricsTracker; the legacy getter returns a copy there.
try:
    from megatron.core.transformer.moe import moe_logging as _metrics_tracker
except ImportError:
    _metrics_tracker = None
HAS_METRICS_TRACKER = _metrics_tracker is not None


def record_moe_metric(name: str, value: torch.Tensor, layer_number: Optional[int],
                      num_layers: int, reduce_group: Optional[torch.distributed.ProcessGroup]
                      ) -> None:
    """Add ``value`` to layer ``layer_number`` of tracked loss ``name`` (summed over
    ``reduce_group``, averaged over DP when reduced), as megatron's routers do."""
    if HAS_METRICS_TRACKER:
        if layer_number is not None:
            _metrics_tracker.get_moe_metrics_tracker().record(
                name, value, layer_number, num_layers, reduce_group=reduce_group)
        return
    moe_utils.save_to_aux_losses_tracker(name, value, layer_number, num_layers,
                                         reduce_group=reduce_group)


def moe_metric_values(name: str) -> torch.Tensor:
    """The live per-layer values [num_layers] of tracked loss ``name`` (KeyError if absent)."""
    if HAS_METRICS_TRACKER:
        return _metrics_tracker.get_moe_metrics_tracker().metrics[name].values
    return moe_utils.get_moe_layer_wise_logging_tracker()[name]["values"]


def ensure_moe_metrics(names: list[str], num_layers: int,
                       reduce_group: Optional[torch.distributed.ProcessGroup],
                       device: Optional[torch.device]) -> None:
    """Give every name a (zero) entry summed over ``reduce_group``, so that reducing the tracker
    runs the same collectives on every rank, also on a pipeline stage without MoE layers."""
    for name in names:
        if HAS_METRICS_TRACKER:
            metrics = _metrics_tracker.get_moe_metrics_tracker().metrics
            if name not in metrics:
                metrics[name] = _metrics_tracker.MetricEntry(
                    values=torch.zeros(num_layers, device=device), reduce_group=reduce_group)
            continue
        tracker = moe_utils.get_moe_layer_wise_logging_tracker()
        if name not in tracker:
            tracker[name] = {"values": torch.zeros(num_layers, device=device),
                             "reduce_group": reduce_group, "avg_group": None,
                             "reduce_group_has_dp": False}


# --- checkpoints -------------------------------------------------------------------------------

# 0.19+: dist_checkpointing keeps the common state inside the shard files, not in common.pt.
COMMON_STATE_IN_SHARDS = "common_state" in inspect.getsource(_serialization.save)


# --- multi-latent attention -------------------------------------------------------------------

# 0.19+: MLA resolves its q/kv norms (mla_qk_norm_config); with qk_layernorm and uncompressed
# queries (q_lora_rank None) it requires a norm fused into linear_q_proj, a norm DeepSeek-V2-Lite
# does not have.
MLA_REQUIRES_Q_NORM = importlib.util.find_spec(
    "megatron.core.transformer.mla_qk_norm_config") is not None


# --- data ------------------------------------------------------------------------------------------

def query_sample(dataset: Any, index: int) -> tuple[Any, Any]:
    """(tokens, document ids) of ``GPTDataset`` sample ``index`` (0.19 also returns the
    documents' lengths)."""
    return tuple(dataset._query_document_sample_shuffle_indices(index)[:2])
