"""Every write that a rerun trusts: a temp file beside the target, fsync, rename, fsync of the folder.

One durability policy for the whole toolkit. A reader, or a rerun after a crash or a power loss at any
moment, finds the old file or the complete new one, never a mix: the data reach the disk (fsync of the
file) before the name points at them (rename), and the rename itself is made durable (fsync of the
folder). Checkpoints, done.json, predictions, metrics, reports, score parts and overlays, the errors
lists and the pseudonym secret all go through here; so do the store's study batches (`publish_dir`).

`mode` is the new file's permission bits. The default follows the umask as `open()` would; pass
PRIVATE for outputs that identify patients (scores, part files, overlays) or hold a secret, and
create their folders with `private_dir`. `inside` keeps a file name that comes from data (a study
UID) from leaving its folder; `write_csv(..., formula_safe=True)` keeps a cell that comes from data
(a Patient ID) from being run as a spreadsheet formula.
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
PRIVATE_DIR = 0o700

# A cell starting with one of these is a formula (or starts one) when a spreadsheet opens the CSV:
# `=HYPERLINK(...)` in a Patient ID would be live. OWASP's list (CSV injection), plus the line feed.
FORMULA_START = ("=", "+", "-", "@", "\t", "\r", "\n")


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


def formula_safe_cell(value):
    """A text cell that a spreadsheet would read as a formula, prefixed with a single quote (the
    OWASP recommendation: shown as text, the quote hidden); anything else as it is."""
    if isinstance(value, str) and value.startswith(FORMULA_START):
        return "'" + value
    return value


def write_csv(path: Path, header, rows, mode: int | None = None, formula_safe: bool = False) -> None:
    """Replace `path` with a CSV of `header` and `rows`, all or nothing.

    `formula_safe`: for CSVs that carry strings from outside (Patient IDs, UIDs, archive member
    names, error messages quoting them) and that people open in a spreadsheet. Only `str` cells
    are touched; numbers passed as numbers are written as they are. Leave it off for files the
    pipeline writes and reads back itself (a quoted cell would read back as another value)."""
    text = io.StringIO(newline="")
    w = csv.writer(text)
    w.writerow(header)
    if formula_safe:
        rows = ([formula_safe_cell(v) for v in row] for row in rows)
    w.writerows(rows)
    write_text(path, text.getvalue(), mode)


def private_dir(folder: Path) -> bool:
    """Make sure `folder` exists (parents as the umask says); a folder this call creates is mode
    0700 whatever the umask (mkdir's mode passes through the umask, hence the chmod). An existing
    folder is left as its owner made it. True when this call created it."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    try:
        folder.mkdir(mode=PRIVATE_DIR)
    except FileExistsError:
        if not folder.is_dir():
            raise
        return False
    os.chmod(folder, PRIVATE_DIR)
    return True


class OutsideFolder(ValueError):
    """A file name that would put the file outside its folder."""


def inside(folder: Path, name: str) -> Path:
    """`folder / name`, checked to be a file directly in `folder`: a name with a separator, `..`,
    NUL or nothing left is refused (OutsideFolder), whatever the data it came from. Compared after
    resolving the folder, without following the file itself: writes replace a link, never write
    through it."""
    base = Path(folder).resolve()
    target = Path(os.path.normpath(base / name)) if name and "\0" not in name else base
    if target.parent != base or target.name in ("", ".", "..") or target.name != name:
        raise OutsideFolder(f"refusing to write {name!r}: not a file name inside {folder}")
    return Path(folder) / name


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
