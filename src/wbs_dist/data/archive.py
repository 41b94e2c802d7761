"""Walk a folder, .zip or .tar(.gz) safely and hand out its members' bytes.

Members whose names are absolute or climb out of the archive (`..`), links and device files are
refused and reported, never followed. Tar archives cannot be read at random, so their safe regular
members are extracted once into a private temporary folder (mode 0700) that is removed on close;
zip members are read in place. An `Archive` is picklable so worker processes reopen it cheaply.

Budgets, checked before any byte is expanded (a hostile archive costs a listed refusal, never the
machine's memory or disk):
* a member larger than `member_limit` (the object ceiling plus slack for headers) is refused, from
  the zip's declared size, the tar header or the file's size;
* a zip member over 1 MiB that expands more than 200:1 is refused (a zip bomb);
* a tar extracts at most 200 x the archive's own size (at least 64 MiB), and never leaves less than
  256 MiB free in the temporary folder; members beyond that are listed, not extracted. A compressed
  tar stream is read no further than 2000 x the archive's size (bz2/xz bombs expand far more).
A member that cannot be extracted (name too long, a file where a folder is needed, ...) is listed
and the rest of the tar is read.
"""

from __future__ import annotations

import os
import shutil
import stat
import tarfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from wbs_dist import scratch
from wbs_dist.errors import UsageError

MiB = 1 << 20
GiB = 1 << 30
DEFAULT_MAX_OBJECT_MB = 256          # whole-body NM objects are ~1 MiB (1024 x 256 x 2 frames, int16)
MEMBER_SLACK = 64 * MiB              # a member may exceed its pixels: header, overlays, compression overhead
# Expansion bounds. Whole-body NM DICOM (int16 counts, zero background) deflates about 5-30:1; only a
# crafted or degenerate member reaches 200:1 (the 16384 x 16384 RLE bomb of issue 13 deflates 880:1).
RATIO_LIMIT = 200
RATIO_MIN_BYTES = 1 * MiB            # smaller members cost nothing, whatever their ratio
TAR_MIN_BUDGET = 64 * MiB            # a tiny archive may still extract this much
TAR_SCAN_RATIO = 2000                # gzip cannot pass ~1030:1; bz2/xz streams of zeros go far beyond
FREE_RESERVE = 256 * MiB             # never fill the temporary folder's file system


def default_member_limit() -> int:
    return DEFAULT_MAX_OBJECT_MB * MiB + MEMBER_SLACK


def human(n: float) -> str:
    """Bytes as a short size: 512 MiB, 1.0 GiB, 9.5 KiB."""
    if n >= GiB:
        return f"{n / GiB:.1f} GiB"
    if n >= MiB:
        return f"{n / MiB:.1f} MiB".replace(".0 MiB", " MiB")
    return f"{n / 1024:.1f} KiB"


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


def _exc_text(exc: BaseException) -> str:
    """'Type: message', one line. An OSError gives its strerror alone: its file name would be a path
    in the private temporary folder, which means nothing to the user (the member is named already)."""
    msg = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
    msg = msg.splitlines()[0][:200] if msg else ""
    return f"{type(exc).__name__}: {msg}" if msg else type(exc).__name__


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
    member_limit: int = field(default_factory=default_member_limit)
    _tmp: str | None = None
    _zip: zipfile.ZipFile | None = field(default=None, repr=False)

    @classmethod
    def open(cls, path: Path, member_limit: int | None = None) -> "Archive":
        path = Path(path)
        kind = archive_kind(path)
        arc = cls(path=path, kind=kind)
        if member_limit is not None:
            arc.member_limit = int(member_limit)
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
        except BaseException:
            arc.close()                    # an interrupt must not leave extracted files behind
            raise
        arc.members.sort()
        return arc

    def _too_big(self, size: int) -> str:
        return (f"{human(size)}, over the member limit of {human(self.member_limit)} "
                f"(--max-object-mb plus {human(MEMBER_SLACK)} for headers)")

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
                    if st.st_size > self.member_limit:
                        self.refused.append(Refusal(rel, f"refused: file of {self._too_big(st.st_size)}"))
                    else:
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
                if reason is None:
                    reason = self._zip_budget_reason(info)
                if reason:
                    self.refused.append(Refusal(info.filename, reason))
                else:
                    self.members.append(info.filename)

    def _zip_budget_reason(self, info: zipfile.ZipInfo) -> str | None:
        # zipfile never yields more than the declared file_size (then checks the CRC), so the declared
        # size bounds what reading the member can cost.
        if info.flag_bits & 0x1:
            return "refused: encrypted member"
        if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED, zipfile.ZIP_BZIP2,
                                      zipfile.ZIP_LZMA):
            return f"refused: unsupported zip compression method {info.compress_type}"
        if info.file_size > self.member_limit:
            return f"refused: declares {self._too_big(info.file_size)}"
        if info.file_size > RATIO_MIN_BYTES and info.file_size > RATIO_LIMIT * info.compress_size:
            ratio = info.file_size / max(info.compress_size, 1)
            return (f"refused: expands {ratio:.0f}:1 ({human(info.compress_size)} to {human(info.file_size)}), "
                    f"over the {RATIO_LIMIT}:1 bound for members over {human(RATIO_MIN_BYTES)} (a zip bomb)")
        return None

    def _extract_tar(self) -> None:
        # Extracted members carry names and MRNs: a private folder, and one a later run removes if this
        # process is killed before it can (scratch).
        self._tmp = str(scratch.make("tar"))
        self.root = Path(self._tmp)
        own_size = max(self.path.stat().st_size, 1)
        budget = max(TAR_MIN_BUDGET, RATIO_LIMIT * own_size)
        scan_limit = max(4 * TAR_MIN_BUDGET, TAR_SCAN_RATIO * own_size)
        extracted = 0
        seen: set[str] = set()
        with tarfile.open(self.path, mode="r:*") as tf:
            last = None
            while True:
                # tf.offset is where the next header starts in the expanded stream; reaching it means
                # decompressing everything before it, so a bomb is stopped here, before the seek.
                if tf.offset > scan_limit:
                    self.refused.append(Refusal(str(self.path), (
                        f"rest of the archive not read (after member {last!r}): its stream expands past "
                        f"{human(scan_limit)}, {TAR_SCAN_RATIO}x the archive's {human(own_size)}")))
                    break
                try:
                    info = tf.next()
                except Exception as exc:  # ReadError, EOFError, zlib/lzma errors: the stream breaks here
                    if last is None:        # not even one header: the archive as a whole is unreadable
                        raise UsageError(f"{self.path}: cannot read archive: {_exc_text(exc)}") from None
                    self.refused.append(Refusal(str(self.path), (
                        f"rest of the archive unreadable after member {last!r} ({_exc_text(exc)}); "
                        "the members before it are read")))
                    break
                if info is None:
                    break
                last = info.name
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
                name = str(PurePosixPath(info.name))
                reason = self._tar_budget_reason(info, name, seen, extracted, budget, own_size)
                if reason:
                    self.refused.append(Refusal(info.name, reason))
                    continue
                seen.add(name)
                try:
                    # The 'data' filter re-checks paths and strips dangerous modes (PEP 706).
                    tf.extract(info, self._tmp, filter="data")
                except Exception as exc:  # name too long, a file where a folder is needed, a corrupt stream
                    self._remove_partial(name)
                    broken = not isinstance(exc, (OSError, tarfile.ExtractError, tarfile.FilterError)) \
                        or isinstance(exc, EOFError)
                    self.refused.append(Refusal(info.name, f"not extracted ({_exc_text(exc)})"))
                    if broken:                     # the stream itself ends or is corrupt here
                        self.refused.append(Refusal(str(self.path), (
                            f"rest of the archive unreadable after member {info.name!r}; "
                            "the members before it are read")))
                        break
                    continue
                extracted += info.size
                self.members.append(name)

    def _tar_budget_reason(self, info: tarfile.TarInfo, name: str, seen: set[str], extracted: int,
                           budget: int, own_size: int) -> str | None:
        if name in seen:
            return "refused: a second member of the same name (the first one is read)"
        if info.size > self.member_limit:
            return f"not extracted: {self._too_big(info.size)}"
        if extracted + info.size > budget:
            return (f"not extracted: {human(info.size)} would take the extraction past its budget of "
                    f"{human(budget)} ({RATIO_LIMIT}x the archive's {human(own_size)}; "
                    f"{human(extracted)} extracted so far)")
        free = shutil.disk_usage(self._tmp).free
        if info.size > free - FREE_RESERVE:
            return (f"not extracted: {human(info.size)} would leave less than {human(FREE_RESERVE)} free in "
                    f"the temporary folder ({human(free)} free; set TMPDIR to a larger file system)")
        return None

    def _remove_partial(self, name: str) -> None:
        """A member whose extraction failed half-way leaves nothing behind."""
        try:
            target = Path(self._tmp, name)
            if target.is_file() and not target.is_symlink():
                target.unlink()
        except OSError:
            pass

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
        return {"path": self.path, "kind": self.kind, "root": self.root, "member_limit": self.member_limit}

    def __setstate__(self, state):
        self.__init__(path=state["path"], kind=state["kind"], root=state["root"],
                      member_limit=state.get("member_limit", default_member_limit()))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
