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


def test_formula_safe_csv_quotes_text_cells_that_a_spreadsheet_would_run(tmp_path):
    import csv

    hostile = ['=HYPERLINK("http://x","y")', "+1+2", "-2+3", "@SUM(A1)", "\tx", "\rx", "\nx"]
    row = hostile + ["1.2.840.1", "", 7, -0.5]
    atomic.write_csv(tmp_path / "scores.csv", [f"c{i}" for i in range(len(row))], [row], formula_safe=True)
    with open(tmp_path / "scores.csv", newline="") as fh:
        (got,) = list(csv.reader(fh))[1:]
    assert got == ["'" + h for h in hostile] + ["1.2.840.1", "", "7", "-0.5"]  # numbers stay numbers
    # Off by default: files the pipeline reads back keep their values.
    atomic.write_csv(tmp_path / "plain.csv", ["a"], [["-0.5"]])
    assert (tmp_path / "plain.csv").read_text().splitlines()[1] == "-0.5"


@pytest.mark.parametrize("umask", [0o022, 0o000, 0o277])
def test_private_dir_is_0700_whatever_the_umask(tmp_path, umask):
    old = os.umask(umask)   # 0o277: mkdir's mode alone would give 0500
    try:
        assert atomic.private_dir(tmp_path / "parts")
        assert not atomic.private_dir(tmp_path / "parts")     # there already
        (tmp_path / "shared").mkdir()
        os.chmod(tmp_path / "shared", 0o750)
        assert not atomic.private_dir(tmp_path / "shared")
    finally:
        os.umask(old)
    assert (tmp_path / "parts").stat().st_mode & 0o777 == 0o700
    assert (tmp_path / "shared").stat().st_mode & 0o777 == 0o750  # a folder its owner made is left alone


@pytest.mark.parametrize("name", ["../x.png", "./../../escaped.png", "1.2.3/../../escaped.png", "a/b.png",
                                  "/etc/x.png", "..", ".", "", "x\0.png"])
def test_inside_refuses_a_name_that_leaves_its_folder(tmp_path, name):
    with pytest.raises(atomic.OutsideFolder):
        atomic.inside(tmp_path / "overlays", name)


def test_inside_keeps_a_plain_name(tmp_path):
    assert atomic.inside(tmp_path / "overlays", "1.2.840.10008.png") == tmp_path / "overlays" / "1.2.840.10008.png"
