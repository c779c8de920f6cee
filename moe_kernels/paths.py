"""Where the project's own folders are: one definition of the repository root.

A leaf module (imports nothing of the package). Relative figure folders, the pypto cache
and the notebook build folder all resolve against `REPO_ROOT`, so a notebook or a CLI
run writes to the same place whatever its working directory.
"""
from __future__ import annotations

from pathlib import Path

#: The folder holding the `moe_kernels` package (the checkout, for an editable install).
REPO_ROOT: Path = Path(__file__).resolve().parents[1]
#: Project-owned cache folder (pypto interpreter build, SIM timing cache, scratch output).
CACHE_DIR: Path = REPO_ROOT / ".cache"
