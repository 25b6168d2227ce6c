"""Fail fast on an output dir that cannot take the results (unwritable, or a nearly full disk)."""

from __future__ import annotations

import logging
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

log = logging.getLogger(__name__)


def check_output_dir(path: str | Path, min_free_bytes: int = 200 << 20) -> Path:
    """Create `path`, prove it is writable and has `min_free_bytes` free; raise OSError naming it otherwise."""
    out = Path(path)
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write_probe"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise OSError(f"output dir {out} is not writable ({e}); set hydra.run.dir or paths.log_dir") from e
    free = shutil.disk_usage(out).free
    if free < min_free_bytes:
        raise OSError(f"only {free >> 20} MiB free at {out}; Dovetail needs at least {min_free_bytes >> 20} MiB")
    return out


@contextmanager
def file_lock(path: str | Path, what: str = "this cache") -> Iterator[None]:
    """An exclusive lock on `path` (created if missing) for as long as the block runs: a second process building
    the same cache waits for the first instead of both writing the same files. POSIX only; elsewhere a no-op."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        yield
        return
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.warning("%s is being built by another process (lock %s): waiting for it", what, path)
            fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def check_free_space(path: str | Path, need_bytes: int, what: str) -> None:
    """Raise OSError naming `path` when its disk has less than `need_bytes` free (checked before long work)."""
    free = shutil.disk_usage(path).free
    if free < need_bytes:
        raise OSError(
            f"{what} needs ~{need_bytes >> 20} MiB at {path} but only {free >> 20} MiB are free; free space or set "
            "DOVETAIL_CACHE to another disk"
        )


class RunLogHandler(logging.FileHandler):
    """The run's log file (Hydra's `job_logging` file handler). An unwritable run dir ends the run at once with a
    message naming the dir, instead of Hydra's bare "Unable to configure handler 'file'"."""

    def __init__(self, filename: str, mode: str = "a", encoding: str | None = None, delay: bool = False) -> None:
        try:
            Path(filename).parent.mkdir(parents=True, exist_ok=True)
            super().__init__(filename, mode, encoding, delay)
        except OSError as e:
            raise SystemExit(
                f"output dir {Path(filename).parent} is not writable ({e.strerror}); set hydra.run.dir (or "
                "hydra.sweep.dir, paths.log_dir) to a writable folder"
            ) from e
