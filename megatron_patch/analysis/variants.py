"""The variants of the specialization ablation, defined once: description and pretraining flags.

examples/pretrain/specialization_ablation.sh trains each variant with the flags printed by

    python -m megatron_patch.analysis.variants b --beta 10 --beta-pairwise 10 --gamma 0.1 \
        --omoe="--moe-orthogonal-alpha 0.1" \
        --omoe-repr="--moe-orthogonal-subspace representations --moe-orthogonal-alpha 1" \
        --calibration-iters 50

(one word a line), and the ablation report labels each variant with its description, so what a
report says and what was trained cannot drift apart. Exit status 2 on an unknown variant.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field, fields
from typing import Callable, Optional, Sequence

from megatron_patch.moe.names import COEFFICIENT_FLAGS, ORTHO_LOSS, VAR_LOSS


@dataclass(frozen=True)
class VariantValues:
    """The ablation's tunable values, as given on its command line (passed on verbatim)."""

    beta: str = field(metadata={"help": "L_o coefficient of b, d, g (span form)"})
    beta_pairwise: str = field(metadata={"help": "L_o coefficient of e (pairwise form)"})
    gamma: str = field(metadata={"help": "L_v coefficient of c, d, e, g"})
    omoe: str = field(metadata={"help": 'OMoE flags of f, g: --omoe="FLAGS"'})
    omoe_repr: str = field(metadata={"help": 'OMoE flags of h: --omoe-repr="FLAGS"'})
    calibration_iters: str = field(metadata={
        "help": 'warm-up steps of i before its "auto" coefficients are calibrated'})


@dataclass(frozen=True)
class Variant:
    """One variant: what the report calls it and how its pretraining flags are made."""

    description: str
    make_flags: Callable[[VariantValues], list[str]]


def _losses(ortho: str, var: str, form: Optional[str] = None) -> list[str]:
    form_flags = ["--moe-ortho-loss-form", form] if form else []
    return [COEFFICIENT_FLAGS[ORTHO_LOSS], ortho, *form_flags, COEFFICIENT_FLAGS[VAR_LOSS], var]


def _omoe(flags: str) -> list[str]:
    return ["--moe-orthogonal-optimizer", *flags.split()]


VARIANTS: dict[str, Variant] = {
    "a": Variant("aux loss only", lambda p: _losses("0", "0")),
    "b": Variant("+ L_o", lambda p: _losses(p.beta, "0")),
    "c": Variant("+ L_v", lambda p: _losses("0", p.gamma)),
    "d": Variant("+ L_o + L_v", lambda p: _losses(p.beta, p.gamma)),
    "e": Variant("+ L_o (pairwise) + L_v", lambda p: _losses(p.beta_pairwise, p.gamma, "pairwise")),
    "f": Variant("+ OMoE (weights)", lambda p: _losses("0", "0") + _omoe(p.omoe)),
    "g": Variant("+ L_o + L_v + OMoE (weights)",
                 lambda p: _losses(p.beta, p.gamma) + _omoe(p.omoe)),
    "h": Variant("+ OMoE (representations)", lambda p: _losses("0", "0") + _omoe(p.omoe_repr)),
    "i": Variant("+ L_o + L_v, auto after warm-up",
                 lambda p: _losses("auto", "auto")
                 + ["--moe-loss-calibration-iters", p.calibration_iters]),
}


class UnknownVariantError(ValueError):
    """A variant letter that is not in ``VARIANTS``."""


def check_variants(letters: Sequence[str]) -> None:
    """Raise UnknownVariantError, naming the letters there are, for a letter that is not one."""
    for letter in letters:
        if letter not in VARIANTS:
            raise UnknownVariantError(f"unknown variant {letter} (choose from "
                                      f"{', '.join(VARIANTS)})")


def named(letter: str) -> str:
    """"<letter>: <description>", how plots and tables name a variant."""
    return f"{letter}: {VARIANTS[letter].description}"


def variant_flags(letter: str, values: VariantValues) -> list[str]:
    """The pretraining flags that make variant ``letter`` with ``values``."""
    check_variants([letter])
    return VARIANTS[letter].make_flags(values)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Print the flags of one variant, one word a line."""
    p = argparse.ArgumentParser(prog="python -m megatron_patch.analysis.variants",
                                description=__doc__.split("\n")[0], allow_abbrev=False)
    p.add_argument("variant", help=f"one of {', '.join(VARIANTS)}")
    for value in fields(VariantValues):
        p.add_argument("--" + value.name.replace("_", "-"), required=True, **value.metadata)
    args = p.parse_args(argv)
    values = VariantValues(**{value.name: getattr(args, value.name)
                              for value in fields(VariantValues)})
    try:
        flags = variant_flags(args.variant, values)
    except UnknownVariantError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print("\n".join(flags))
    return 0


if __name__ == "__main__":
    sys.exit(main())
