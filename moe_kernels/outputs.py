"""Output paths checked before any work: a run that would fail to write its dump, JSON
or figures fails in its first second with one line, not after the work with a traceback."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

from .config import ConfigError


def _probe_dir(folder: Path, param: str, value: object) -> None:
    """Create the folder if needed and prove a file can be created in it."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as exc:
        raise ConfigError(f"{param} {value}: cannot write into {folder} "
                          f"({exc.strerror or type(exc).__name__})") from exc


def _first_existing(path: Path) -> Path:
    p = path
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def check_output_file(path: str | Path, param: str) -> Path:
    """`path` as an absolute Path if a file can be written there, else ConfigError naming
    `param` (e.g. "--dump"). Missing parent folders are created."""
    p = Path(path).expanduser().absolute()
    if p.is_dir():
        raise ConfigError(f"{param} {path}: is a directory; give a file path")
    anc = _first_existing(p.parent)
    if not anc.is_dir():
        raise ConfigError(f"{param} {path}: {anc} is a file, not a folder")
    if p.exists() and not os.access(p, os.W_OK):
        raise ConfigError(f"{param} {path}: the file exists and is not writable")
    _probe_dir(p.parent, param, path)
    return p


def check_output_dir(path: str | Path, param: str) -> Path:
    """`path` as an absolute Path if it is (or can become) a writable folder, else
    ConfigError naming `param` (e.g. "figures_dir"). The folder is created."""
    p = Path(path).expanduser().absolute()
    anc = _first_existing(p)
    if not anc.is_dir():
        raise ConfigError(f"{param} {path}: {anc} is a file, not a folder")
    _probe_dir(p, param, path)
    return p
