"""Fail fast on an output dir that cannot take the results (unwritable, or a nearly full disk)."""

from __future__ import annotations

import shutil
from pathlib import Path


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
