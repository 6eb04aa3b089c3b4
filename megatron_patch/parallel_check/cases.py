"""What the layout checker runs: a parallel layout plus optional features of the step, named
``<layout>[+feature...]``, e.g. ``tp2ep2sp+padding`` or ``pp2ep2+recompute+padding``.

Features (applied to the single-device baseline and the layout alike):

    padding    every other sample ends in padding: ``padding_mask`` leaves those tokens out of
               L_aux, L_o, L_v and the routing statistics, ``loss_mask`` out of the LM loss
    capacity   expert capacity factor 1: tokens beyond an expert's capacity are dropped
    recompute  selective activation recomputation of the MoE layers (with PP, the recomputation
               of a micro-batch runs after later micro-batches' forwards)
"""

from __future__ import annotations

from dataclasses import dataclass

from megatron_patch.distributed.layout import Layout, parse_layout
from megatron_patch.training.config import JobConfig

FEATURES = ("padding", "capacity", "recompute")


@dataclass(frozen=True)
class Case:
    """A layout and the sorted features of its step."""

    layout: Layout
    features: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        unknown = sorted(set(self.features) - set(FEATURES))
        if unknown:
            raise ValueError(f"unknown feature(s) {unknown}; features are {', '.join(FEATURES)}")
        if "capacity" in self.features and self.layout.sp:
            raise ValueError(
                f"{self}: megatron-core drops tokens per sequence-parallel slice (capacity = "
                "factor x the rank's tokens x topk / experts), so capacity dropping under TP with "
                "SP differs from one process by design; check it with ep/pp/dp layouts")

    def __str__(self) -> str:
        return "+".join((str(self.layout), *self.features))

    @property
    def baseline(self) -> "Case":
        """The single-device case with the same features."""
        return Case(Layout(), self.features)

    def job(self, job: JobConfig) -> JobConfig:
        """``job`` with this case's features."""
        changes: dict = {}
        if "capacity" in self.features:
            changes["moe"] = {"moe_expert_capacity_factor": 1.0}
        if "recompute" in self.features:
            changes["training"] = {"recompute_granularity": "selective",
                                   "recompute_modules": ["moe"]}
        return job.replace(**changes)


def parse_case(spec: str) -> Case:
    """``"pp2ep2+recompute+padding"`` -> Case (layout grammar: ``distributed.layout``).

    Raises:
        ValueError: a bad layout, an unknown or repeated feature, or an unsupported combination.
    """
    layout, *features = spec.strip().split("+")
    if len(set(features)) != len(features):
        raise ValueError(f"{spec!r}: a feature is given twice")
    return Case(parse_layout(layout), tuple(sorted(features)))
