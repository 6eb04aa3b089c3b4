"""Orthogonal expert optimizer (OMoE, arXiv 2310.09762) around a megatron-core optimizer.

Training alternates an accumulating phase of N steps (the base optimizer as is) with an orthogonal
phase of M steps, in which the gradient of each routed expert's weight matrices is projected onto
the orthogonal complement of the subspace spanned by the *other* experts of the same layer, then
handed to the base optimizer:

    fc1 (rows in the input space R^H):   G1_i <- G1_i P_i^in   (P_i^in: the others' fc1 side)
    fc2 (columns in the output space):  G2_i <- P_i^out G2_i  (P_i^out: the others' fc2 side)

with the OWM projector P_i = a (S_-i + a I)^{-1}, S_-i the second moment of the spanning vectors
of the other experts (``megatron_patch.optimizer.projection``). What spans the subspace
(``--moe-orthogonal-subspace``):

- ``weights`` (default): the other experts' current weights (fc1 rows, fc2 columns); projectors
  are recomputed at every orthogonal step (exact, stateless, so a resumed run is identical);
- ``representations``: OWM's own choice, the vectors the other experts recently processed (fc1:
  the hidden states routed to them; fc2: their outputs), recorded over the last ``window`` steps
  of each accumulating phase as averaged second moments (``representations``), which checkpoints
  carry, so a run resumed mid-window or mid-phase is identical.

The gradient, not the Adam update, is projected, as OWM does with SGD. Which choices follow the
paper and which are ours: README, "Orthogonal expert optimizer".

Process groups (``pg_collection``, megatron's global ones by default, as for the MoE layer): the
d x d second moments of an expert's (TP-sharded) weight are summed over the expert-tensor-parallel
group ``expt_tp`` (representation moments over the expert-data-parallel group ``expt_dp``, see
``representations``), and the per-layer totals over the expert-parallel group ``ep``, so each
rank's projected gradients equal a single-process run's. Data-parallel replicas hold identical weights
and gradients (after DDP), so nothing else runs over DP.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist
from megatron.core.optimizer import MegatronOptimizer
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer.moe.experts import SequentialMLP
from megatron.core.transformer.moe.moe_utils import get_default_pg_collection

from megatron_patch.flags import ConfigError, option
from megatron_patch.moe.experts import sequential_experts
from megatron_patch.optimizer.projection import project, second_moment
from megatron_patch.optimizer.representations import ExpertRepresentationMoments

SUBSPACES = ("weights", "representations")
PARAMS = ("fc1", "fc2", "both")
STATE_KEY = "orthogonal_optimizer"


class OrthogonalOptimizerError(ConfigError):
    """A setting the orthogonal optimizer cannot honour; the message names the flag and fix."""


@dataclass
class OrthogonalOptimizerConfig:
    """The orthogonal expert optimizer's section of the job (flags ``--moe-orthogonal-*``)."""

    enabled: bool = option(
        False, "alternate plain steps with steps whose expert gradients are projected "
        "orthogonally to the other experts' subspace", flag="--moe-orthogonal-optimizer")
    accumulate_steps: int = option(4, "N: plain steps of each cycle",
                                   flag="--moe-orthogonal-accumulate-steps")
    orthogonal_steps: int = option(
        1, "M: projected steps of each cycle (0: the base optimizer only)",
        flag="--moe-orthogonal-steps")
    alpha: float = option(1.0, "OWM regularizer a of P = a (S_others + a I)^-1",
                          flag="--moe-orthogonal-alpha")
    subspace: str = option(
        "weights", "what spans another expert's subspace: its current weight rows/columns "
        "(weights), or the hidden states it was routed and the outputs it produced in the last "
        "--moe-orthogonal-window accumulating steps (representations)",
        choices=SUBSPACES, flag="--moe-orthogonal-subspace")
    params: str = option("both", "which expert weight matrices are projected", choices=PARAMS,
                         flag="--moe-orthogonal-params")
    window: int = option(
        1, "representations: how many of the last accumulating steps of each cycle are recorded",
        flag="--moe-orthogonal-window")

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
        if self.subspace == "representations" and not (
            1 <= self.window <= self.accumulate_steps and self.orthogonal_steps >= 1
        ):
            raise OrthogonalOptimizerError(
                "--moe-orthogonal-subspace representations records the last "
                "--moe-orthogonal-window steps of each accumulating phase: it needs 1 <= window "
                f"({self.window}) <= --moe-orthogonal-accumulate-steps ({self.accumulate_steps}) "
                f"and --moe-orthogonal-steps >= 1 ({self.orthogonal_steps})"
            )

    @property
    def kinds(self) -> tuple[str, ...]:
        """The weight matrices that are projected."""
        return ("fc1", "fc2") if self.params == "both" else (self.params,)

    def is_orthogonal_step(self, step: int) -> bool:
        """Step ``step`` (0-based) falls in an orthogonal phase."""
        return step % (self.accumulate_steps + self.orthogonal_steps) >= self.accumulate_steps

    def is_recording_step(self, step: int) -> bool:
        """Step ``step`` records representations (one of the last ``window`` accumulating steps)."""
        position = step % (self.accumulate_steps + self.orthogonal_steps)
        return (self.subspace == "representations"
                and self.accumulate_steps - self.window <= position < self.accumulate_steps)


def _weight_moments(experts: SequentialMLP, kind: str,
                    pg_collection: ProcessGroupCollection) -> torch.Tensor:
    """Second moments of each local expert's fc1 rows / fc2 columns, [E_local, H, H] float64.

    Summed over the expert-tensor-parallel group (each rank holds a slice of the rows/columns).
    """
    weights = [getattr(e, f"linear_{kind}").weight for e in experts.local_experts]
    own = torch.stack([second_moment(w if kind == "fc1" else w.t()) for w in weights])
    dist.all_reduce(own, group=pg_collection.expt_tp)
    return own


def project_expert_gradients(
    experts: SequentialMLP,
    config: OrthogonalOptimizerConfig,
    own_moments: Optional[Callable[[str], torch.Tensor]] = None,
    pg_collection: Optional[ProcessGroupCollection] = None,
) -> None:
    """Project ``main_grad`` (or ``grad``) of every local expert of one MoE layer in place.

    Args:
        experts: the layer's routed experts (this rank's local ones).
        config: which weight matrices, and the regularizer.
        own_moments: kind -> [E_local, H, H] float64 second moments of the local experts'
            spanning vectors, identical on all ranks holding the same experts; default: of their
            weights (``_weight_moments``). The per-layer total is summed over the expert-parallel
            group.
        pg_collection: ``ep`` and ``expt_tp`` (default: megatron's global groups).
    """
    pg_collection = pg_collection or get_default_pg_collection()
    own_moments = own_moments or (lambda kind: _weight_moments(experts, kind, pg_collection))
    for kind in config.kinds:
        own = own_moments(kind)
        total = own.sum(0)
        dist.all_reduce(total, group=pg_collection.ep)
        for expert, own_moment in zip(experts.local_experts, own):
            weight = getattr(expert, f"linear_{kind}").weight
            grad = weight.main_grad if hasattr(weight, "main_grad") else weight.grad
            if grad is None:
                continue
            side = "right" if kind == "fc1" else "left"
            grad.copy_(project(grad, total - own_moment, config.alpha, side))


class OrthogonalExpertOptimizer:
    """A megatron optimizer whose ``step()`` projects expert gradients in orthogonal phases.

    Everything else (``zero_grad``, ``param_groups``, ...) is the base optimizer's. The phase is a
    function of the global step (``start_at`` after a checkpoint load), and recorded representation
    moments travel in the optimizer's checkpoint state (under ``STATE_KEY``), so resuming mid-phase
    continues identically.
    """

    def __init__(
        self,
        base: MegatronOptimizer,
        model_chunks: list[torch.nn.Module],
        config: OrthogonalOptimizerConfig,
        pg_collection: Optional[ProcessGroupCollection] = None,
    ) -> None:
        pg_collection = pg_collection or get_default_pg_collection()
        ddp_config = getattr(model_chunks[0], "ddp_config", None)
        if (
            ddp_config is not None
            and ddp_config.use_distributed_optimizer
            and pg_collection.expt_dp.size() > 1
        ):
            raise OrthogonalOptimizerError(
                "--moe-orthogonal-optimizer needs whole expert gradients on each rank; with "
                "--use-distributed-optimizer and expert data parallelism > 1 each rank holds a "
                "shard. Drop --use-distributed-optimizer or raise --expert-model-parallel-size."
            )
        if (
            config.subspace == "representations"
            and "fc2" in config.kinds
            and pg_collection.expt_tp.size() > 1
        ):
            raise OrthogonalOptimizerError(
                "--moe-orthogonal-subspace representations with fc2 needs whole expert outputs; "
                "with --expert-tensor-parallel-size > 1 each rank holds a partial sum. Pass "
                "--moe-orthogonal-params fc1, or --moe-orthogonal-subspace weights."
            )
        self.base = base
        self.config = config
        self.pg_collection = pg_collection
        self.experts = list(
            sequential_experts(model_chunks, "--moe-orthogonal-optimizer", OrthogonalOptimizerError)
        )
        if not self.experts:
            raise OrthogonalOptimizerError(
                "--moe-orthogonal-optimizer found no MoE experts: set --num-experts"
            )
        self.representations = {
            number: ExpertRepresentationMoments(experts, number, config.kinds, pg_collection)
            for number, experts in self.experts
        } if config.subspace == "representations" else {}
        self.start_at(0)

    def __getattr__(self, name: str):
        return getattr(self.base, name)

    def start_at(self, step: int) -> None:
        """Continue from global step ``step`` (0-based index of the next step)."""
        self.step_index = step
        for moments in self.representations.values():
            moments.recording = self.config.is_recording_step(step)

    @torch.no_grad()
    def step(self):
        """Project (in an orthogonal phase), then the base optimizer's step; returns its result."""
        step, config = self.step_index, self.config
        if config.is_recording_step(step):
            for moments in self.representations.values():
                moments.flush()
        if config.is_orthogonal_step(step):
            for number, experts in self.experts:
                moments = self.representations.get(number)
                project_expert_gradients(experts, config, moments and moments.averages,
                                         self.pg_collection)
        self.start_at(step + 1)
        if config.is_recording_step(step + 1) and not config.is_recording_step(step):
            for moments in self.representations.values():  # a new recording window
                moments.reset()
        return self.base.step()

    def sharded_state_dict(
        self, model_sharded_state_dict: dict, is_loading: bool = False, **kwargs: Any
    ) -> dict:
        """The base optimizer's state, plus the representation moments (EP-sharded)."""
        state = self.base.sharded_state_dict(model_sharded_state_dict, is_loading, **kwargs)
        if self.representations:
            state[STATE_KEY] = {
                f"layer_{number}": moments.sharded_state_dict(f"{STATE_KEY}.layer_{number}.")
                for number, moments in self.representations.items()
            }
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        saved = state_dict.pop(STATE_KEY, None)
        if saved is not None:  # None: a checkpoint from before the recording (moments stay zero)
            for number, moments in self.representations.items():
                moments.load_state_dict(saved[f"layer_{number}"])
        self.base.load_state_dict(state_dict)
