"""The on-disk workspace: where datasets, adapters, training runs and outputs live."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


def safe_name(name: str) -> str:
    """`name` if it is a plain file-name stem (letters, digits, _ . -); raise a ValueError otherwise."""
    name = (name or "").strip()
    if not SAFE_NAME.fullmatch(name) or name.endswith(".") or ".." in name:
        raise ValueError(
            f"name {name!r} is not allowed: use 1-64 letters, digits, '_', '.' or '-' (CivitAI's LoRA name rule)"
        )
    return name


@dataclass(frozen=True)
class Workspace:
    """A folder holding everything the studio makes: adapters/, runs/, exports/ and outputs/."""

    root: Path

    def __post_init__(self):
        object.__setattr__(self, "root", Path(self.root).expanduser().resolve())
        for folder in (self.adapters_dir, self.runs_dir, self.exports_dir, self.outputs_dir):
            folder.mkdir(parents=True, exist_ok=True)

    @property
    def adapters_dir(self) -> Path:
        """Trained and imported adapters, one .safetensors each."""
        return self.root / "adapters"

    @property
    def runs_dir(self) -> Path:
        """Training runs: checkpoints, samples and class images."""
        return self.root / "runs"

    @property
    def exports_dir(self) -> Path:
        """CivitAI-ready copies made for download."""
        return self.root / "exports"

    @property
    def outputs_dir(self) -> Path:
        """Generated images."""
        return self.root / "outputs"

    def adapter_path(self, name: str) -> Path:
        """The file of the adapter called `name` (which need not exist yet)."""
        return self.adapters_dir / f"{safe_name(name)}.safetensors"

    def run_dir(self, name: str) -> Path:
        """The run folder of the adapter called `name`."""
        return self.runs_dir / safe_name(name)

    def list_adapters(self) -> list[str]:
        """Names of the adapters in the workspace, sorted."""
        return sorted(p.stem for p in self.adapters_dir.glob("*.safetensors"))
