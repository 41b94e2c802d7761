"""Temporary folders that outlive nothing: per user, per process, and recognised as stale later.

A run killed by SIGKILL or the OOM killer cannot remove its temporary folders (the loader's study
cache in /dev/shm holds RAM on the node until someone deletes it; a tar's extracted DICOM files hold
names and MRNs). So every such folder is named after its owner: the kind, the user id, the pid and
the process's start time, and this host. Before making a new folder of a kind, a run removes the
folders of that kind that the same user left on this host from processes that no longer run.
Ray's session files get a private parent of their own (`private_ray_dir`).
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import socket
import stat
import tempfile
from pathlib import Path

from wbs_dist.errors import UsageError
from wbs_dist.lock import process_start_time

PREFIX = "wbs-dist"


def _host_tag() -> str:
    return hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]


def _stem(kind: str) -> str:
    return f"{PREFIX}-{kind}-{os.getuid()}-{_host_tag()}-"


def make(kind: str, base: str | Path | None = None) -> Path:
    """A new private (0700) folder for this process, after removing this user's stale ones."""
    remove_stale(kind, base)
    pid = os.getpid()
    folder = tempfile.mkdtemp(prefix=f"{_stem(kind)}{pid}-{process_start_time(pid)}-", dir=base)
    os.chmod(folder, 0o700)
    return Path(folder)


def remove_stale(kind: str, base: str | Path | None = None) -> list[Path]:
    """Remove this user's folders of `kind` on this host whose process is gone; the ones removed."""
    pattern = re.compile(re.escape(_stem(kind)) + r"(\d+)-(\d+|None)-")
    removed = []
    for folder in Path(base or tempfile.gettempdir()).glob(f"{_stem(kind)}*"):
        m = pattern.match(folder.name)
        if not m or not folder.is_dir():
            continue
        pid, start = int(m.group(1)), m.group(2)
        if process_start_time(pid) != start or start == "None":
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder)
    return removed


def private_ray_dir(path: str) -> str:
    """Where local Ray may put its session files: inside `path`, a folder of ours at mode 0700. Ray
    makes its own temp folder world-writable (0777, measured with Ray 2.60: it expects one /tmp/ray
    shared by a machine's users), and its logs name the sweep's paths and arguments; a private parent
    keeps them from other users. Refused: a `path` that is someone else's, or a link; an existing one
    that others can enter (never chmodded behind the user's back, but for the default folder, which
    earlier versions let Ray open); an `r/` in it that is not ours."""
    folder, default = Path(path), default_ray_dir()

    def refuse(why: str) -> UsageError:
        return UsageError(f"tune key 'ray_temp_dir': {why}; Ray's session files would be open to others: "
                          "choose another folder")

    try:
        made = not os.path.lexists(folder)
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        st = folder.lstat()
    except OSError as exc:
        raise UsageError(f"tune key 'ray_temp_dir': cannot make {folder} ({exc.strerror or exc})") from None
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid():
        raise refuse(f"{folder} is not a folder of yours (another user's, or a link)")
    if st.st_mode & 0o077 and not made:
        if folder != default:
            raise refuse(f"{folder} can be entered by others (mode {oct(st.st_mode & 0o777)}; chmod 700 it)")
        os.chmod(folder, 0o700)
    ray_own = folder / "r"
    if os.path.lexists(ray_own):
        st = ray_own.lstat()
        if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid():
            raise refuse(f"{ray_own} is not a folder of yours (another user's, or a link)")
    return str(ray_own)


def default_ray_dir() -> Path:
    return Path(f"/tmp/ray-wbs-{os.getuid()}")
