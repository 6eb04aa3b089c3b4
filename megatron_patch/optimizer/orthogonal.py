"""Orthogonal expert optimizer (OMoE, arXiv 2310.09762) around a megatron-core optimizer.

Training alternates an accumulating phase of N steps (the base optimizer as is) with an orthogonal
phase of M steps, in which the gradient of each routed expert's weight matrices is projected onto
the orthogonal complement of the subspace spanned by the *other* experts of the same layer, then
handed to the base optimizer:

    fc1 (rows in the input space R^H):   G1_i <- G1_i P_i^in,   P_i^in  from the other experts' fc1 rows
    fc2 (columns in the output space):  G2_i <- P_i^out G2_i,  P_i^out from the other experts' fc2 columns

with the OWM projector P_i = a (S_-i + a I)^{-1}, S_-i the second moment of the spanning vectors
of the other experts (``megatron_patch.optimizer.projection``). Choices that are ours (the paper's
abstract leaves them open), all options: the subspace is spanned by the other experts' current
weights ("weights"; the paper's OWM background also allows input representations, not built yet);
projectors are recomputed from the weights at every orthogonal step (exact, stateless, so a resumed
run is identical); the gradient, not the Adam update, is projected, as OWM does with SGD.

Process groups: the d x d second moments of an expert's (TP-sharded) weight are summed over the
expert-tensor-parallel group, and the per-layer totals over the expert-parallel group, so each
rank's projected gradients equal a single-process run's. Data-parallel replicas hold identical
weights and gradients (after DDP), so nothing runs over DP.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Iterator

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.optimizer import MegatronOptimizer
from megatron.core.transformer.moe.experts import SequentialMLP

from megatron_patch.optimizer.projection import project, second_moment

SUBSPACES = ("weights",)
PARAMS = ("fc1", "fc2", "both")


class OrthogonalOptimizerError(ValueError):
    """A setting the orthogonal optimizer cannot honour; the message names the flag and fix."""


@dataclass
class OrthogonalOptimizerConfig:
    """Flags ``--moe-orthogonal-*`` of the pretraining entry point."""

    accumulate_steps: int = 4
    orthogonal_steps: int = 1
    alpha: float = 1.0
    subspace: str = "weights"
    params: str = "both"

    def __post_init__(self) -> None:
        if self.accumulate_steps < 0 or self.orthogonal_steps < 0:
            raise OrthogonalOptimizerError(
                "--moe-orthogonal-accumulate-steps and --moe-orthogonal-steps must be >= 0"
            )
        if self.accumulate_steps + self.orthogonal_steps == 0:
            raise OrthogonalOptimizerError(
                "--moe-orthogonal-accumulate-steps + --moe-orthogonal-steps must be > 0"
            )
        if not self.alpha > 0:
            raise OrthogonalOptimizerError(f"--moe-orthogonal-alpha must be > 0, got {self.alpha}")
        if self.subspace not in SUBSPACES:
            raise OrthogonalOptimizerError(
                f"--moe-orthogonal-subspace must be one of {SUBSPACES}, got {self.subspace!r}"
            )
        if self.params not in PARAMS:
            raise OrthogonalOptimizerError(
                f"--moe-orthogonal-params must be one of {PARAMS}, got {self.params!r}"
            )

    def is_orthogonal_step(self, step: int) -> bool:
        """Step ``step`` (0-based) falls in an orthogonal phase."""
        return step % (self.accumulate_steps + self.orthogonal_steps) >= self.accumulate_steps


def expert_modules(model_chunks: Iterable[torch.nn.Module]) -> Iterator[SequentialMLP]:
    """Every MoE layer's routed experts; refuses expert implementations it cannot project."""
    for chunk in model_chunks:
        for name, module in chunk.named_modules():
            if isinstance(module, SequentialMLP):
                yield module
            elif name.endswith("mlp.experts"):
                raise OrthogonalOptimizerError(
                    f"--moe-orthogonal-optimizer supports SequentialMLP experts; {name} is "
                    f"{type(module).__name__}. Drop --moe-grouped-gemm for now."
                )


def project_expert_gradients(
    experts: SequentialMLP, config: OrthogonalOptimizerConfig
) -> None:
    """Project ``main_grad`` (or ``grad``) of every local expert of one MoE layer in place."""
    kinds = ("fc1", "fc2") if config.params == "both" else (config.params,)
    for kind in kinds:
        weights = [getattr(e, f"linear_{kind}").weight for e in experts.local_experts]
        # Spanning vectors in R^H: fc1 rows ([F, H]), fc2 columns ([H, F]).
        vectors = [w if kind == "fc1" else w.t() for w in weights]
        own = torch.stack([second_moment(v) for v in vectors])  # [E_local, H, H]
        dist.all_reduce(own, group=parallel_state.get_expert_tensor_parallel_group())
        total = own.sum(0)
        dist.all_reduce(total, group=parallel_state.get_expert_model_parallel_group())
        for weight, own_moment in zip(weights, own):
            grad = weight.main_grad if hasattr(weight, "main_grad") else weight.grad
            if grad is None:
                continue
            side = "right" if kind == "fc1" else "left"
            grad.copy_(project(grad, total - own_moment, config.alpha, side))


class OrthogonalExpertOptimizer:
    """A megatron optimizer whose ``step()`` projects expert gradients in orthogonal phases.

    Everything else (``zero_grad``, ``param_groups``, checkpoints, ...) is the base optimizer's:
    the phase is a function of the global step, which the training loop restores from the
    checkpoint's iteration, so resuming mid-phase continues identically.
    """

    def __init__(
        self,
        base: MegatronOptimizer,
        model_chunks: list[torch.nn.Module],
        config: OrthogonalOptimizerConfig,
        start_step: int = 0,
    ) -> None:
        ddp_config = getattr(model_chunks[0], "ddp_config", None)
        if (
            ddp_config is not None
            and ddp_config.use_distributed_optimizer
            and parallel_state.get_expert_data_parallel_world_size() > 1
        ):
            raise OrthogonalOptimizerError(
                "--moe-orthogonal-optimizer needs whole expert gradients on each rank; with "
                "--use-distributed-optimizer and expert data parallelism > 1 each rank holds a "
                "shard. Drop --use-distributed-optimizer or raise --expert-model-parallel-size."
            )
        self.base = base
        self.config = config
        self.step_index = start_step
        self.experts = list(expert_modules(model_chunks))
        if not self.experts:
            raise OrthogonalOptimizerError(
                "--moe-orthogonal-optimizer found no MoE experts: set --num-experts"
            )

    def __getattr__(self, name: str):
        return getattr(self.base, name)

    @torch.no_grad()
    def step(self):
        """Project (in an orthogonal phase), then the base optimizer's step; returns its result."""
        if self.config.is_orthogonal_step(self.step_index):
            for experts in self.experts:
                project_expert_gradients(experts, self.config)
        self.step_index += 1
        return self.base.step()
