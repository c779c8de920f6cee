"""pypto's side files, kept inside the project's cache folder and bounded.

pypto 0.2.0 writes, per process, two ~/.pypto/run/rundata_<ts>/rundata.json folders and
~/ascend/log/debug/{plog,device-0}/*.log files, and never removes them. PYPTO_HOME
replaces ~/.pypto and ASCEND_PROCESS_LOG_PATH replaces ~/ascend/log (both read by
pypto's shared libraries); we point them into the cache folder before pypto is imported
and prune all but the newest files there. A caller's own setting of either wins.
"""
from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

from ..config import ConfigError

#: Environment variable -> sub-folder of the cache folder.
SIDE_FILE_ENV = {"PYPTO_HOME": "pypto-home", "ASCEND_PROCESS_LOG_PATH": "ascend-log"}
#: Newest side files (rundata folders, log files) kept per folder; older ones are pruned.
KEEP_SIDE_FILES = 32
#: Side files younger than this many seconds are never pruned (a live process's own).
SIDE_FILE_MIN_AGE_S = 120.0


def check_cache_folder(cache: Path, env_name: str) -> Path:
    """`cache`, created; ConfigError naming `env_name` when it is a file or unwritable."""
    try:
        cache.mkdir(parents=True, exist_ok=True)
        probe = cache / f".probe{os.getpid()}"
        probe.touch()
        probe.unlink()
    except OSError as exc:
        raise ConfigError(f"{env_name}={os.environ.get(env_name, '')!r}: the pypto cache "
                          f"folder {cache} is not a writable folder "
                          f"({exc.strerror or type(exc).__name__})") from exc
    return cache


def side_file_folders(cache: Path) -> list[Path]:
    """The folders whose entries are pruned: rundata folders and each log folder."""
    folders = [cache / SIDE_FILE_ENV["PYPTO_HOME"] / "run"]
    logs = cache / SIDE_FILE_ENV["ASCEND_PROCESS_LOG_PATH"] / "debug"
    if logs.is_dir():
        folders += sorted(p for p in logs.iterdir() if p.is_dir())
    return [f for f in folders if f.is_dir()]


def prune_side_files(cache: Path, keep: int = KEEP_SIDE_FILES,
                     min_age_s: float = SIDE_FILE_MIN_AGE_S) -> int:
    """Delete all but the newest `keep` entries of every side-file folder (entries
    younger than `min_age_s` stay); returns how many were deleted."""
    now, gone = time.time(), 0
    for folder in side_file_folders(cache):
        entries = sorted(folder.iterdir(), key=lambda p: p.stat().st_mtime, reverse=True)
        for p in entries[keep:]:
            if now - p.stat().st_mtime < min_age_s:
                continue
            if p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)
            gone += 1
    return gone


def redirect_side_files(cache: Path) -> None:
    """Point pypto's side files into `cache` (unless the caller set them) and prune."""
    for var, sub in SIDE_FILE_ENV.items():
        os.environ.setdefault(var, str(cache / sub))
    prune_side_files(cache)
