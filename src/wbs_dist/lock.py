"""One writer at a time on the filesystems clusters share: a lock file that names its holder.

`flock`/`fcntl` locks are not to be trusted across nodes (NFS and parallel filesystems often keep
them node-local or have them switched off), so a lock is a file created with O_EXCL, which is atomic
there, holding who took it: host, pid, the process's start time, the SLURM job (if any) and the
command. While held, a thread refreshes the file's modification time (the heartbeat).

A lock is stale, and is taken over, when
- its holder ran on this host and is gone (no such pid, or the pid now belongs to a process that
  started at another time: pids are reused);
- its holder is the same SLURM job as the taker (a requeued job starts again under its own id, maybe
  on another node, after a kill that could not release the lock);
- its heartbeat is older than `stale_after_s` (a holder on another host that died with its node).
Otherwise the taker is refused with a message that names the holder and what to do.

Shared holders (`mode="shared"`) may hold a lock together, never with an exclusive holder: each
leaves a file in `<lock>.shared/`. Sharded ingest takes the store shared for writing disjoint
studies and exclusive for the one lesion-table rebuild; everything else takes it exclusive.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from pathlib import Path

from wbs_dist.errors import WbsError

HEARTBEAT_S = 30.0
STALE_AFTER_S = 300.0


class Locked(WbsError):
    """Another live process holds the lock (exit 1: try again when it is done)."""


def process_start_time(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (field 22 of /proc/PID/stat), or None."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


def _job() -> str | None:
    job = os.environ.get("SLURM_JOB_ID")
    if job and os.environ.get("SLURM_ARRAY_TASK_ID"):
        job = f"{os.environ.get('SLURM_ARRAY_JOB_ID', job)}_{os.environ['SLURM_ARRAY_TASK_ID']}"
    return job


def holder_info(what: str) -> dict:
    pid = os.getpid()
    return {"host": socket.gethostname(), "pid": pid, "start": process_start_time(pid), "job": _job(),
            "since": time.strftime("%Y-%m-%d %H:%M:%S"), "what": what}


def describe(info: dict) -> str:
    job = f", SLURM job {info['job']}" if info.get("job") else ""
    return f"pid {info.get('pid')} on {info.get('host')}{job} since {info.get('since')} ({info.get('what')})"


def _alive(info: dict, path: Path, stale_after_s: float) -> bool:
    """Whether the holder described by `info` (its file at `path`) may still be working."""
    mine = holder_info("")
    if info.get("job") and info.get("job") == mine["job"]:
        return info.get("pid") == mine["pid"] and info.get("host") == mine["host"]
    if info.get("host") == mine["host"]:
        start = process_start_time(int(info.get("pid", -1)))
        return start is not None and start == info.get("start")
    try:
        return time.time() - path.stat().st_mtime < stale_after_s
    except FileNotFoundError:
        return False


def _read(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text() or "{}")
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}                     # being written right now, or torn: judged by its age alone


class Lock:
    """`with Lock(path, "wbs-dist ingest", subject="store S"): ...` — raises Locked when a live holder has it.

    `what` says what the holder does (shown to whoever is refused), `subject` what is locked."""

    def __init__(self, path: Path, what: str, mode: str = "exclusive", subject: str = "",
                 stale_after_s: float = STALE_AFTER_S, heartbeat_s: float = HEARTBEAT_S):
        if mode not in ("exclusive", "shared"):
            raise ValueError(f"lock mode must be exclusive or shared, not {mode!r}")
        self.path, self.what, self.mode, self.subject = Path(path), what, mode, subject
        self.stale_after_s, self.heartbeat_s = stale_after_s, heartbeat_s
        self.shared_dir = self.path.with_name(self.path.name + ".shared")
        self.mine: Path | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- taking -------------------------------------------------------------------------------------------
    def acquire(self) -> "Lock":
        info = holder_info(self.what)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.mode == "exclusive":
            self._create(self.path, info)
            live = self._live_shared()
            if live:
                self._remove(self.path)
                raise Locked(f"{self._subject()} is in use by {describe(live[0])}"
                             + (f" and {len(live) - 1} more" if len(live) > 1 else "") + self._advice())
            self.mine = self.path
        else:
            self._check_exclusive()
            self.shared_dir.mkdir(exist_ok=True)
            mine = self.shared_dir / f"{info['host']}-{info['pid']}"
            self._write(mine, info)
            try:
                self._check_exclusive()     # an exclusive holder may have come between the two looks
            except Locked:
                self._remove(mine)
                raise
            self.mine = mine
        self._thread = threading.Thread(target=self._beat, name=f"lock-heartbeat {self.path.name}", daemon=True)
        self._thread.start()
        return self

    def _create(self, path: Path, info: dict) -> None:
        for _ in range(3):
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                holder = _read(path)
                if holder is None:
                    continue                  # released meanwhile: try again
                if _alive(holder, path, self.stale_after_s):
                    raise Locked(f"{self._subject()} is in use by {describe(holder)}{self._advice()}") from None
                self._break(path)
                continue
            with os.fdopen(fd, "w") as fh:
                fh.write(json.dumps(info))
                fh.flush()
                os.fsync(fh.fileno())
            return
        raise Locked(f"{self._subject()}: could not take {path} (others keep taking and releasing it)")

    def _break(self, path: Path) -> None:
        """Move a stale lock aside: of several takers, one rename wins; the others find it gone."""
        aside = path.with_name(f"{path.name}.stale.{os.getpid()}")
        try:
            os.rename(path, aside)
        except FileNotFoundError:
            return
        aside.unlink(missing_ok=True)

    def _write(self, path: Path, info: dict) -> None:
        path.write_text(json.dumps(info))

    def _live_shared(self) -> list[dict]:
        live = []
        for f in sorted(self.shared_dir.glob("*")) if self.shared_dir.is_dir() else []:
            info = _read(f)
            if info is None:
                continue
            if _alive(info, f, self.stale_after_s):
                live.append(info)
            else:
                f.unlink(missing_ok=True)
        return live

    def _check_exclusive(self) -> None:
        holder = _read(self.path)
        if holder is None:
            return
        if _alive(holder, self.path, self.stale_after_s):
            raise Locked(f"{self._subject()} is in use by {describe(holder)}{self._advice()}")
        self._break(self.path)

    def _subject(self) -> str:
        return self.subject or str(self.path)

    def _advice(self) -> str:
        return (f"; wait for it to finish. If that process is gone for good (a node lost), the lock expires "
                f"{self.stale_after_s:.0f} s after its last heartbeat, or remove {self.path} by hand")

    # -- holding and giving back -------------------------------------------------------------------------
    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            try:
                os.utime(self.mine)
            except OSError:
                return

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self.mine is not None:
            self._remove(self.mine)
            self.mine = None

    @staticmethod
    def _remove(path: Path) -> None:
        path.unlink(missing_ok=True)

    def wait(self, timeout_s: float, poll_s: float = 2.0) -> "Lock":
        """`acquire`, retried every `poll_s` for up to `timeout_s` while a live holder keeps it; then
        Locked as `acquire` raises it. For a job that runs after others (a finalize after its shards:
        one killed with its node keeps its lock until its heartbeat is `stale_after_s` old)."""
        deadline = time.monotonic() + max(0.0, timeout_s)
        while True:
            try:
                return self.acquire()
            except Locked:
                if time.monotonic() >= deadline:
                    raise
            time.sleep(min(poll_s, max(0.01, deadline - time.monotonic())))

    def __enter__(self) -> "Lock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
