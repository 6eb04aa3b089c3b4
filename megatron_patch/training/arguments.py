"""Megatron-style command-line flags of the training entry point, with an optional YAML file.

The flags are generated from the sections of ``JobConfig`` (``megatron_patch/training/config.py``).
A YAML file given with ``--config`` sets values by flag name (``num_layers: 4`` or
``num-layers: 4``); flags on the command line override it. YAML values are checked against each
flag's type and choices (a boolean must be true/false, a number a number), unknown keys are
refused with the closest flag names; every error names the key, the file and what is expected,
before any process group is created.
"""

from __future__ import annotations

import argparse
import difflib
from pathlib import Path
from typing import Any, Optional, Sequence

import yaml

from megatron_patch.flags import FlagError, add_flags, check_value, dest, flag_fields
from megatron_patch.training.config import SECTIONS, JobConfig


def build_parser() -> argparse.ArgumentParser:
    """The full parser of ``megatron_patch.training.pretrain`` (every flag defaults to None:
    absent flags take the YAML's value, else the section's default)."""
    parser = argparse.ArgumentParser(
        prog="pretrain_moe",
        description="Pretrain a GPT-MoE with megatron-core and the specialization losses.",
        allow_abbrev=False,
    )
    parser.add_argument("--config", default=None, help="YAML file of flag values")
    for _, section, title in SECTIONS:
        add_flags(parser, section, title)
    return parser


def _fields_by_key() -> dict[str, tuple[type, Any]]:
    return {dest(f): (section, f) for _, section, _ in SECTIONS for f in flag_fields(section)}


def yaml_values(path: str) -> dict[str, Any]:
    """The flag values of a YAML file, each checked against its flag's type and choices.

    Raises:
        FlagError: no such file, not a mapping, an unknown key (with the closest flags), or a
            value of the wrong type (naming the key, the file and the expected type).
    """
    file = Path(path)
    if not file.is_file():
        raise FlagError(f"--config {path}: no such file")
    try:
        loaded = yaml.safe_load(file.read_text()) or {}
    except yaml.YAMLError as error:
        raise FlagError(f"--config {path}: not valid YAML: {error}") from None
    if not isinstance(loaded, dict):
        raise FlagError(f"--config {path}: expected a mapping of flag names to values")
    fields = _fields_by_key()
    values = {}
    for key, value in loaded.items():
        name = str(key).lstrip("-").replace("-", "_")
        if name not in fields:
            close = difflib.get_close_matches(name, list(fields), n=3, cutoff=0.6)
            hint = (" did you mean " + " or ".join(close) + "?") if close else (
                " keys are flag names such as num_layers (see --help)")
            raise FlagError(f"--config {path}: unknown key {key!r};{hint}")
        section, field = fields[name]
        values[name] = check_value(section, field, value, f"--config {path}")
    return values


def parse_args(argv: Optional[Sequence[str]] = None) -> JobConfig:
    """Flags (and the YAML ``--config`` file) -> the job's configuration; with ``--hf-load``, its
    architecture flags follow the Hugging Face checkpoint (``megatron_patch.hf.job``).

    Raises:
        ConfigError: bad input, naming the flag or key and the fix.
    """
    namespace = build_parser().parse_args(argv)
    values = yaml_values(namespace.config) if namespace.config else {}
    values.update((key, value) for key, value in vars(namespace).items()
                  if value is not None and key != "config")
    if values.get("hf_load") is not None:
        from megatron_patch.hf.job import apply_hf_checkpoint

        values = apply_hf_checkpoint(values)
    return JobConfig.from_flat(values)
