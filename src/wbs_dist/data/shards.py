"""Which shard a study belongs to, for the stages that split an archive between jobs (ingest, score).

A study's shard is a hash of its Study Instance UID modulo the shard count: every job of an array
computes the same split on its own, whatever the archive's order or its other contents, so N jobs
that each read the whole archive's headers write disjoint sets of studies, and together all of them.
"""

from __future__ import annotations

import hashlib

from wbs_dist.errors import UsageError


def shard_of(key: str, n: int) -> int:
    """Deterministic, independent of order and of the archive's other contents."""
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") % n


def parse_shard(text: str) -> tuple[int, int]:
    """`--shard I/N` -> (I, N), 0 <= I < N."""
    try:
        i, n = (int(v) for v in text.split("/"))
    except ValueError:
        raise UsageError(f"--shard {text!r}: expected I/N, e.g. 0/4")
    if n < 1 or not 0 <= i < n:
        raise UsageError(f"--shard {text!r}: need 0 <= I < N")
    return i, n
