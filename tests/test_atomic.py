"""atomic.py: every write a rerun trusts is all or nothing, durable, and has the mode it is given."""

import os
from pathlib import Path

import pytest

from wbs_dist import atomic


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


def test_a_write_that_fails_leaves_the_old_file_and_no_temp(tmp_path):
    target = tmp_path / "metrics.json"
    atomic.write_text(target, "old\n")
    with pytest.raises(RuntimeError):
        with atomic.replace(target) as fh:
            fh.write(b"half of the new")
            raise RuntimeError("killed mid-write")
    assert target.read_text() == "old\n" and _leftovers(tmp_path) == []


def test_modes_private_or_as_the_umask_says(tmp_path):
    atomic.write_csv(tmp_path / "scores.csv", ["a"], [[1]], mode=atomic.PRIVATE)
    assert (tmp_path / "scores.csv").stat().st_mode & 0o777 == 0o600
    atomic.write_json(tmp_path / "done.json", {"epochs": 3})
    mask = os.umask(0)
    os.umask(mask)
    assert (tmp_path / "done.json").stat().st_mode & 0o777 == 0o666 & ~mask


def test_replace_keeps_the_previous_file_when_asked(tmp_path):
    target, prev = tmp_path / "last.pt", tmp_path / "last.pt.prev"
    atomic.write_bytes(target, b"1")
    with atomic.replace(target, previous=prev) as fh:
        fh.write(b"2")
    assert (target.read_bytes(), prev.read_bytes()) == (b"2", b"1")


def test_create_once_first_writer_wins(tmp_path):
    target = tmp_path / "secret"
    assert atomic.create_once(target, b"first", mode=atomic.PRIVATE)
    assert not atomic.create_once(target, b"second", mode=atomic.PRIVATE)
    assert target.read_bytes() == b"first" and target.stat().st_mode & 0o777 == 0o600
    assert _leftovers(tmp_path) == []


def test_publish_dir_moves_a_whole_folder_or_reports_the_winner(tmp_path):
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "zarr.json").write_text(name)
    assert atomic.publish_dir(tmp_path / "a", tmp_path / "final")
    assert not atomic.publish_dir(tmp_path / "b", tmp_path / "final")    # another writer won
    assert (tmp_path / "final" / "zarr.json").read_text() == "a" and (tmp_path / "b").exists()
