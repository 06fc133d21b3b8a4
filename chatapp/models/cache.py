"""The conversion cache: folders built once per machine, never half-written.

Contract: `cached_build(name, build, progress)` returns cache_dir()/models/NAME
(chatapp.paths), calling `build(tmp_folder)` only when that folder is not
complete yet. The build runs in a temporary sibling folder that is renamed
into place after a completion marker is written, all under an exclusive file
lock, so an interrupted or concurrent build never leaves a half-written
folder and concurrent callers build once. A failed build leaves nothing
behind but the lock file, and its exception propagates unchanged. What is
built (a GGUF conversion, the embedded model) is the caller's business.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from ..paths import cache_dir

Progress = Callable[[str], None]

MARKER = ".specchat-complete"


def is_complete(folder: Path) -> bool:
    """Whether `folder` is a finished build (its completion marker is there)."""
    return (folder / MARKER).is_file()


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """An exclusive lock between processes (fcntl; a no-op where fcntl is missing)."""
    try:
        import fcntl  # POSIX only: imported here so that other systems merely go without the lock
    except ImportError:
        yield
        return
    with open(path, "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def cached_build(name: str, build: Callable[[Path], None], progress: Progress) -> Path:
    """cache_dir()/models/NAME, built once by `build(tmp_folder)` and renamed into place."""
    final = cache_dir() / "models" / name
    if is_complete(final):
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    with file_lock(final.parent / f".{name}.lock"):
        if is_complete(final):  # another process finished it while we waited
            return final
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=final.parent))
        tmp.chmod(0o777 & ~_umask())  # mkdtemp makes it private; the cache is not
        try:
            build(tmp)
            (tmp / MARKER).write_text(json.dumps({"built": time.strftime("%Y-%m-%dT%H:%M:%S")}) + "\n")
            if final.exists():  # a stale, incomplete folder from an older run
                shutil.rmtree(final)
            os.replace(tmp, final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    progress(f"cached {final}")
    return final
