"""Walk a folder, .zip or .tar(.gz) safely and hand out its members' bytes.

Members whose names are absolute or climb out of the archive (`..`), links and device files are
refused and reported, never followed. Tar archives cannot be read at random, so their safe regular
members are extracted once into a private temporary folder (mode 0700) that is removed on close;
zip members are read in place. An `Archive` is picklable so worker processes reopen it cheaply.
"""

from __future__ import annotations

import os
import shutil
import stat
import tarfile
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from wbs_dist.errors import UsageError


@dataclass(frozen=True)
class Refusal:
    path: str
    reason: str


def _unsafe_reason(name: str) -> str | None:
    if name.startswith("/") or name.startswith("\\") or (len(name) > 1 and name[1] == ":"):
        return "refused: absolute path in archive"
    parts = PurePosixPath(name.replace("\\", "/")).parts
    if ".." in parts:
        return "refused: path escapes the archive folder ('..')"
    return None


def archive_kind(path: Path) -> str:
    name = path.name.lower()
    if path.is_dir():
        return "dir"
    if name.endswith(".zip"):
        return "zip"
    if name.endswith((".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tar.xz")):
        return "tar"
    if not path.exists():
        raise UsageError(f"archive not found: {path}")
    raise UsageError(f"{path}: not a folder, .zip or .tar(.gz) archive")


@dataclass
class Archive:
    """Members of a folder/zip/tar as POSIX relative names; `read(name)` gives bytes."""

    path: Path
    kind: str
    members: list[str] = field(default_factory=list)
    refused: list[Refusal] = field(default_factory=list)
    root: Path | None = None  # folder that member names are relative to (dir and extracted tar)
    _tmp: str | None = None
    _zip: zipfile.ZipFile | None = field(default=None, repr=False)

    @classmethod
    def open(cls, path: Path) -> "Archive":
        path = Path(path)
        kind = archive_kind(path)
        arc = cls(path=path, kind=kind)
        try:
            if kind == "dir":
                arc.root = path
                arc._scan_dir()
            elif kind == "zip":
                arc._scan_zip()
            else:
                arc._extract_tar()
        except (zipfile.BadZipFile, tarfile.TarError, EOFError, OSError) as exc:
            arc.close()
            raise UsageError(f"{path}: cannot read archive: {exc}")
        arc.members.sort()
        return arc

    # -- scanning -------------------------------------------------------------------------------
    def _scan_dir(self) -> None:
        for dirpath, dirnames, filenames in os.walk(self.path, followlinks=False):
            dirnames.sort()
            for name in sorted(filenames) + [d for d in dirnames if os.path.islink(os.path.join(dirpath, d))]:
                full = Path(dirpath, name)
                rel = full.relative_to(self.path).as_posix()
                st = full.lstat()
                if stat.S_ISLNK(st.st_mode):
                    self.refused.append(Refusal(rel, "refused: symbolic link, not followed"))
                elif stat.S_ISREG(st.st_mode):
                    self.members.append(rel)

    def _scan_zip(self) -> None:
        with zipfile.ZipFile(self.path) as zf:
            for info in zf.infolist():
                if info.is_dir():
                    continue
                reason = _unsafe_reason(info.filename)
                # Unix symlinks are stored with S_IFLNK in the high bits of external_attr.
                if reason is None and stat.S_ISLNK(info.external_attr >> 16):
                    reason = "refused: symbolic link, not followed"
                if reason:
                    self.refused.append(Refusal(info.filename, reason))
                else:
                    self.members.append(info.filename)

    def _extract_tar(self) -> None:
        self._tmp = tempfile.mkdtemp(prefix="wbs-dist-tar-")
        os.chmod(self._tmp, 0o700)
        self.root = Path(self._tmp)
        with tarfile.open(self.path, mode="r:*") as tf:
            for info in tf:
                reason = _unsafe_reason(info.name)
                if reason is None and (info.issym() or info.islnk()):
                    reason = "refused: link member, not followed"
                elif reason is None and not (info.isfile() or info.isdir()):
                    reason = "refused: not a regular file"
                if reason:
                    self.refused.append(Refusal(info.name, reason))
                    continue
                if info.isdir():
                    continue
                # The 'data' filter re-checks paths and strips dangerous modes (PEP 706).
                tf.extract(info, self._tmp, filter="data")
                self.members.append(str(PurePosixPath(info.name)))

    # -- access ---------------------------------------------------------------------------------
    def read(self, name: str) -> bytes:
        if self.kind == "zip":
            if self._zip is None:
                self._zip = zipfile.ZipFile(self.path)
            return self._zip.read(name)
        return (self.root / name).read_bytes()

    def open_member(self, name: str):
        """A seekable binary file object, so readers can stop early (DICOM headers)."""
        if self.kind == "zip":
            if self._zip is None:
                self._zip = zipfile.ZipFile(self.path)
            return self._zip.open(name)
        return open(self.root / name, "rb")

    def size(self, name: str) -> int:
        if self.kind == "zip":
            if self._zip is None:
                self._zip = zipfile.ZipFile(self.path)
            return self._zip.getinfo(name).file_size
        return (self.root / name).stat().st_size

    def has(self, name: str) -> bool:
        return name in self._member_set

    @property
    def _member_set(self) -> set[str]:
        cache = self.__dict__.get("_set")
        if cache is None:
            cache = self.__dict__["_set"] = set(self.members)
        return cache

    def close(self) -> None:
        if self._zip is not None:
            self._zip.close()
            self._zip = None
        if self._tmp:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None

    def __getstate__(self):
        # Workers need only where to read from; the owner keeps (and removes) the temp folder.
        return {"path": self.path, "kind": self.kind, "root": self.root}

    def __setstate__(self, state):
        self.__init__(path=state["path"], kind=state["kind"], root=state["root"])

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
