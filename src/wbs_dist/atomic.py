"""Writes that a crash cannot leave half done: temp file in the same folder, then rename."""

from __future__ import annotations

import csv
import os
from pathlib import Path


def fsync_dir(directory: Path) -> None:
    """Make renames in `directory` durable; some file systems cannot open or fsync a directory."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_csv(path: Path, header, rows) -> None:
    """Replace `path` with a CSV of `header` and `rows`, all or nothing."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(header)
        w.writerows(rows)
    os.replace(tmp, path)
