"""Temporary folders that outlive nothing: per user, per process, and recognised as stale later.

A run killed by SIGKILL or the OOM killer cannot remove its temporary folders (the loader's study
cache in /dev/shm holds RAM on the node until someone deletes it; a tar's extracted DICOM files hold
names and MRNs). So every such folder is named after its owner: the kind, the user id, the pid and
the process's start time, and this host. Before making a new folder of a kind, a run removes the
folders of that kind that the same user left on this host from processes that no longer run.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import socket
import tempfile
from pathlib import Path

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
