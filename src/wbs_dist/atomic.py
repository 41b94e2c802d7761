"""Every write that a rerun trusts: a temp file beside the target, fsync, rename, fsync of the folder.

One durability policy for the whole toolkit. A reader, or a rerun after a crash or a power loss at any
moment, finds the old file or the complete new one, never a mix: the data reach the disk (fsync of the
file) before the name points at them (rename), and the rename itself is made durable (fsync of the
folder). Checkpoints, done.json, predictions, metrics, reports, score parts and overlays, the errors
lists and the pseudonym secret all go through here; so do the store's study folders (`publish_dir`).

`mode` is the new file's permission bits. The default follows the umask as `open()` would; pass
PRIVATE for outputs that identify patients (scores, part files, overlays) or hold a secret.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import tempfile
from pathlib import Path
from typing import IO, Iterator

PRIVATE = 0o600


def _umask_mode() -> int:
    # os.umask can only be read by setting it; done once, at import, before any thread starts.
    mask = os.umask(0o022)
    os.umask(mask)
    return 0o666 & ~mask


DEFAULT_MODE = _umask_mode()


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


def _open_temp(path: Path, mode: int | None) -> tuple[IO[bytes], Path]:
    """A new file beside `path` (same file system: the rename is atomic) with the mode asked for."""
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, DEFAULT_MODE if mode is None else mode)
        return os.fdopen(fd, "wb"), Path(name)
    except BaseException:
        os.close(fd)
        Path(name).unlink(missing_ok=True)
        raise


def _sync(fh: IO[bytes]) -> None:
    fh.flush()
    os.fsync(fh.fileno())


@contextlib.contextmanager
def replace(path: Path, mode: int | None = None, previous: Path | None = None) -> Iterator[IO[bytes]]:
    """`with replace(path) as fh: fh.write(...)`: `path` is replaced when the block ends without an
    exception, and left as it was otherwise. `previous`: keep the replaced file under that name
    (checkpoints keep one fallback)."""
    path = Path(path)
    fh, tmp = _open_temp(path, mode)
    try:
        with fh:
            yield fh
            _sync(fh)
        if previous is not None and path.exists():
            os.replace(path, previous)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def write_bytes(path: Path, data: bytes, mode: int | None = None) -> None:
    with replace(path, mode) as fh:
        fh.write(data)


def write_text(path: Path, text: str, mode: int | None = None) -> None:
    write_bytes(path, text.encode("utf-8"), mode)


def write_json(path: Path, obj, mode: int | None = None, indent: int | None = 1) -> None:
    write_text(path, json.dumps(obj, indent=indent, allow_nan=False) + "\n", mode)


def write_csv(path: Path, header, rows, mode: int | None = None) -> None:
    """Replace `path` with a CSV of `header` and `rows`, all or nothing."""
    text = io.StringIO(newline="")
    w = csv.writer(text)
    w.writerow(header)
    w.writerows(rows)
    write_text(path, text.getvalue(), mode)


def create_once(path: Path, data: bytes, mode: int | None = None) -> bool:
    """Create `path` holding `data` unless it exists: of several processes racing, exactly one wins
    (a hard link never replaces). True when this call created it."""
    path = Path(path)
    fh, tmp = _open_temp(path, mode)
    try:
        with fh:
            fh.write(data)
            _sync(fh)
        try:
            os.link(tmp, path)
        except FileExistsError:
            return False
        fsync_dir(path.parent)
        return True
    finally:
        tmp.unlink(missing_ok=True)


def sync_tree(folder: Path) -> None:
    """fsync every file and folder under `folder` (written by a library that does not, e.g. zarr)."""
    for dirpath, _, filenames in os.walk(folder):
        for name in filenames:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(Path(dirpath))


def publish_dir(tmp: Path, final: Path) -> bool:
    """Move a finished folder into place: every file and folder in it fsynced, then one rename.
    False when `final` exists already (another writer won); `tmp` is then left to the caller."""
    tmp, final = Path(tmp), Path(final)
    sync_tree(tmp)
    try:
        os.rename(tmp, final)
    except OSError:
        if final.exists():
            return False
        raise
    fsync_dir(final.parent)
    return True
