"""pipeline.durable: the one way quovadis writes a whole file (temp, fsync, rename, fsync dir)."""

from __future__ import annotations

import json
import os

import pytest

from quovadis.jobs.report import JobReport
from quovadis.pipeline import durable


def test_a_writer_crash_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "report.json"
    path.write_bytes(b"old")

    def write(f):
        f.write(b"half of the new")
        raise RuntimeError("killed mid-write")

    with pytest.raises(RuntimeError, match="killed mid-write"):
        durable.write_atomic(path, write)
    assert path.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.json"]


def test_atomic_path_removes_the_temporary_when_the_block_raises(tmp_path):
    path = tmp_path / "features-00000.h5"
    with pytest.raises(ValueError):
        with durable.atomic_path(path) as tmp:
            tmp.write_bytes(b"partial")
            raise ValueError("bad array")
    assert list(tmp_path.iterdir()) == []


def test_the_file_and_its_directory_are_fsynced_before_and_after_the_rename(tmp_path, monkeypatch):
    synced: list[tuple[str, bool]] = []  # (name of the fd's target, whether the final name existed)
    path = tmp_path / "settings.json"
    real_fsync = os.fsync

    def fsync(fd):
        synced.append((os.path.basename(os.readlink(f"/proc/self/fd/{fd}")), path.exists()))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    durable.write_json_atomic(path, {"a": 1})
    assert synced == [("settings.json.tmp", False), (tmp_path.name, True)]
    assert json.loads(path.read_text()) == {"a": 1}


def test_report_json_goes_through_it(tmp_path, monkeypatch):
    JobReport("extract").write(tmp_path)
    before = (tmp_path / "report.json").read_bytes()

    def crash(fd):
        raise OSError("disk unplugged")

    monkeypatch.setattr(os, "fsync", crash)
    report = JobReport("extract")
    report.ok.append("/v/a.mp4")
    with pytest.raises(OSError, match="disk unplugged"):
        report.write(tmp_path)
    assert (tmp_path / "report.json").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.json"]
