"""Parallel layouts of an MoE GPT model, the one rule for valid ones, and the grammar that names
them ("tp2ep2sp", "pp2", ...).

Megatron lays ranks out as two grids over the same world (context parallel is not used here, cp=1):

    attention/dense part:  world = tp * pp * dp          (dp: attention data-parallel size)
    expert part:           world = etp * ep * edp * pp   (so etp * ep * edp = tp * dp)

so a layout is valid only if `etp * ep` divides `tp * dp`; the expert data-parallel size is
`edp = tp * dp / (etp * ep)`. Without expert parallelism (ep = 1) etp must equal tp: megatron-core
then treats expert weights as dense parameters (reduced over the attention data-parallel group).

Grammar: a concatenation of tokens, each at most once, in any order:
    tp<N>   tensor parallel size                      (default 1)
    pp<N>   pipeline parallel size                    (default 1)
    ep<N>   expert parallel size                      (default 1)
    etp<N>  expert tensor parallel size               (default: tp, as in megatron)
    dp<N>   attention data parallel size              (default: the smallest dp that fits the
                                                       expert grid, i.e. etp*ep / gcd(tp, etp*ep))
    sp      sequence parallel                         (required when tp > 1: MoE training with
                                                       TP in megatron needs SP)
Examples: "tp2sp" (2 ranks), "ep2" (2 ranks, dp=2), "pp2", "dp2", "tp2ep2sp" (etp=2, dp=2:
4 ranks), "ep2etp1tp2sp" (2 ranks), "ep2etp2" (4 ranks, dp=4).
"""

from __future__ import annotations

import dataclasses
import math
import re

_TOKEN = re.compile(r"(etp|tp|pp|ep|dp)(\d+)|(sp)")


@dataclasses.dataclass(frozen=True)
class Layout:
    """Sizes of one parallel layout; `dp` is the attention data-parallel size."""

    tp: int = 1
    pp: int = 1
    ep: int = 1
    etp: int = 1
    dp: int = 1
    sp: bool = False

    def __post_init__(self) -> None:
        for name in ("tp", "pp", "ep", "etp", "dp"):
            if getattr(self, name) < 1:
                raise ValueError(f"layout {self!r}: {name} must be >= 1")
        if self.sp and self.tp == 1:
            raise ValueError(
                f"layout {self!r}: sequence parallel needs tp > 1 (drop sp / --sequence-parallel)"
            )
        if self.tp > 1 and not self.sp:
            raise ValueError(
                f"layout {self!r}: MoE training with tp > 1 requires sequence parallel: add sp "
                "(--sequence-parallel)"
            )
        if self.ep == 1 and self.etp != self.tp:
            raise ValueError(
                f"layout {self!r}: expert tensor parallel size {self.etp} differs from the tensor "
                f"parallel size {self.tp} without expert parallelism: megatron-core reduces expert "
                "gradients over the expert-data-parallel group only when ep > 1, so they would "
                "miss (or double) the reduction across ranks (measured: 92% gradient error with "
                "tp2etp1). Use etp = tp, or ep > 1")
        if (self.tp * self.dp) % (self.etp * self.ep) != 0:
            raise ValueError(
                f"layout {self!r}: etp*ep = {self.etp * self.ep} (--expert-tensor-parallel-size x "
                f"--expert-model-parallel-size) must divide tp*dp = {self.tp * self.dp} (the expert "
                "grid etp*ep*edp spans the tp*dp ranks of a pipeline stage); raise dp (more "
                "processes) or lower ep/etp"
            )

    @classmethod
    def for_world(cls, world_size: int, *, tp: int = 1, pp: int = 1, ep: int = 1,
                  etp: int = 1, sp: bool = False) -> "Layout":
        """The layout of ``world_size`` processes with these model-parallel sizes; dp is what
        remains. Raises ValueError when the sizes do not fit."""
        for name, size in (("tp", tp), ("pp", pp)):
            if size < 1:
                raise ValueError(f"{name} must be >= 1, got {size}")
        if world_size % (tp * pp) != 0:
            raise ValueError(
                f"world size {world_size} is not a multiple of --tensor-model-parallel-size {tp} "
                f"x --pipeline-model-parallel-size {pp}; launch tp*pp*dp processes"
            )
        return cls(tp=tp, pp=pp, ep=ep, etp=etp, dp=world_size // (tp * pp), sp=sp)

    @property
    def world_size(self) -> int:
        """Number of processes: tp * pp * dp."""
        return self.tp * self.pp * self.dp

    @property
    def edp(self) -> int:
        """Expert data-parallel size: tp * dp / (etp * ep)."""
        return self.tp * self.dp // (self.etp * self.ep)

    def __str__(self) -> str:
        """Shortest name that `parse_layout` maps back to this layout (baseline: "dp1")."""
        name = "".join(f"{k}{v}" for k, v in (("tp", self.tp), ("pp", self.pp), ("ep", self.ep))
                       if v > 1)
        if self.etp != self.tp:
            name += f"etp{self.etp}"
        if self.dp > 1 or not name:
            name += f"dp{self.dp}"
        return name + ("sp" if self.sp else "")


BASELINE = Layout()


def parse_layout(spec: str) -> Layout:
    """Parse a layout name such as "tp2ep2sp" (grammar in the module docstring).

    Raises:
        ValueError: unknown or repeated tokens, or an impossible layout (message says why).
    """
    text = spec.strip().lower()
    values: dict[str, int] = {}
    sp = False
    pos = 0
    for match in _TOKEN.finditer(text):
        if match.start() != pos:
            break
        pos = match.end()
        if match.group(3):
            if sp:
                raise ValueError(f"layout {spec!r}: 'sp' given twice")
            sp = True
            continue
        name, size = match.group(1), int(match.group(2))
        if name in values:
            raise ValueError(f"layout {spec!r}: '{name}' given twice")
        if size < 1:
            raise ValueError(f"layout {spec!r}: {name} must be >= 1")
        values[name] = size
    if pos != len(text) or not text:
        raise ValueError(
            f"layout {spec!r}: cannot parse at {text[pos:]!r}; expected tokens tp<N>, pp<N>, "
            "ep<N>, etp<N>, dp<N>, sp (e.g. 'tp2ep2sp')"
        )
    tp = values.get("tp", 1)
    ep = values.get("ep", 1)
    etp = values.get("etp", tp)
    dp = values.get("dp", etp * ep // math.gcd(tp, etp * ep))
    return Layout(tp=tp, pp=values.get("pp", 1), ep=ep, etp=etp, dp=dp, sp=sp)
