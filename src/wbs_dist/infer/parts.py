"""Scoring results in part files: the done-list and the results at once, crash-safe, sharded.

Every `--part-size` studies (or minute) the finished studies' records are written to a new part
file through wbs_dist.atomic, so a part is complete or absent whatever moment a kill comes; a study
is done exactly when it is in a part. A rerun skips done studies, and the merge takes each study
from the first part holding it, so no lesion is ever written twice. A manifest pins what the parts
were made with (archive, models' weights, input size, candidate parameters); another setup is
refused rather than mixed in. The parts carry Patient IDs and Study UIDs: they are private files in
a private folder (0600 / 0700 whatever the umask), and the merged CSVs are written formula-safe (a
Patient ID such as `=HYPERLINK(...)` lands as text, not as a live formula, in a spreadsheet).
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

from wbs_dist.atomic import PRIVATE, create_once, inside, private_dir, write_csv, write_text
from wbs_dist.errors import UsageError
from wbs_dist.lock import Lock
from wbs_dist.schema import PREDICTION_COLUMNS

log = logging.getLogger("wbs_dist.score")

PART_FORMAT = 2          # 2: records carry the out-of-fold rule's fold (infer/known.py)
SUMMARY_COLUMNS = ("study_uid", "patient_id", "source", "views", "lesions", "max_score", "max_lesion_id", "fold")


def parts_dir(out: Path) -> Path:
    return out.with_name(out.name + ".parts")


def summary_path(out: Path) -> Path:
    return out.with_name(out.stem + ".summary.csv")


def errors_path(out: Path, shard: tuple[int, int] | None) -> Path:
    if shard is None:
        return out.with_name(out.stem + ".errors.csv")
    return parts_dir(out) / f"errors.shard-{shard[0]}-of-{shard[1]}.csv"


class Parts:
    def __init__(self, out: Path, fingerprint: dict, tag: str):
        self.dir = parts_dir(out)
        self.fingerprint = json.loads(json.dumps(fingerprint))  # as the manifest reads back (tuples -> lists)
        self.tag = tag
        self.seq = 0

    def open(self) -> None:
        private_dir(self.dir)
        manifest = self.dir / "manifest.json"
        # First writer wins, atomically (shards start together). Private like the parts: it names the archive.
        text = json.dumps(self.fingerprint, indent=1, sort_keys=True).encode()
        if not create_once(manifest, text, mode=PRIVATE):
            have = json.loads(manifest.read_text())
            if have != self.fingerprint:
                keys = sorted(k for k in set(have) | set(self.fingerprint) if have.get(k) != self.fingerprint.get(k))
                raise UsageError(f"{self.dir} holds results scored with another setup (differs in: "
                                 f"{', '.join(keys)}); choose another --out or remove {self.dir}")
        for stale in self.dir.glob(f".part-{self.tag}-*.tmp"):
            stale.unlink(missing_ok=True)   # a killed run's unfinished part: never trusted

    def writer(self, what: str) -> Lock:
        """One writer per output and shard tag: two runs writing the same parts would score every
        study twice and race to merge."""
        return Lock(self.dir / f".{self.tag}.lock", what, subject=f"scoring output {self.dir} ({self.tag})")

    def records(self) -> dict[str, dict]:
        """study uid -> its record, from every complete part; the first part (by name) wins."""
        out: dict[str, dict] = {}
        for path in sorted(self.dir.glob("part-*.json")):
            try:
                doc = json.loads(path.read_text())
                studies = doc["studies"]
            except (OSError, ValueError, KeyError, TypeError) as exc:
                log.warning("ignoring unreadable part %s (%s); its studies are scored again", path, exc)
                continue
            for rec in studies:
                out.setdefault(rec["study_uid"], rec)
        return out

    def write(self, records: list[dict]) -> None:
        if not records:
            return
        self.seq += 1
        name = f"part-{self.tag}-{time.time_ns():020d}-{os.getpid()}-{self.seq:06d}.json"
        write_text(inside(self.dir, name), json.dumps({"studies": records}), mode=PRIVATE)


def merge(records: list[dict], out: Path) -> tuple[int, int]:
    """Write PRED.csv and PRED.summary.csv from study records; (studies, lesions)."""
    records = sorted(records, key=lambda r: (r["patient_id"], r["study_uid"]))
    rows, summary = [], []
    for rec in records:
        lesions = sorted(rec["lesions"], key=lambda les: les[0])
        fold = "" if rec["fold"] is None else rec["fold"]
        for lid, view, label, score in lesions:
            rows.append([rec["patient_id"], rec["study_uid"], lid, view, fold, label, f"{score:.6f}",
                         rec["tumor_type"], len(lesions)])
        top = max(lesions, key=lambda les: (les[3], -les[0]), default=None)
        summary.append([rec["study_uid"], rec["patient_id"], rec["source"], "|".join(rec["views"]), len(lesions),
                        "" if top is None else f"{top[3]:.6f}", "" if top is None else top[0], fold])
    # formula_safe: the site opens these in a spreadsheet; the scores, written here as positive
    # numbers, are unchanged, so `wbs-dist report` reads the file as before.
    write_csv(out, PREDICTION_COLUMNS, rows, mode=PRIVATE, formula_safe=True)
    write_csv(summary_path(out), SUMMARY_COLUMNS, summary, mode=PRIVATE, formula_safe=True)
    return len(records), len(rows)
