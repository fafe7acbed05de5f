"""Manifest: append-only JSON lines, last entry per input wins, torn tails ignored."""

from __future__ import annotations

import json
import os

import pytest

from quovadis.pipeline import features, manifest
from quovadis.pipeline.errors import ShardError
from quovadis.pipeline.manifest import LedgerEntry


def ok(input: str, shard: str = "shard-00000.h5", frames: int = 10) -> LedgerEntry:
    return LedgerEntry(input=input, status="ok", file=shard, key=f"k-{frames}", frames=frames, info={"fps": 25.0})


def test_round_trip_and_last_entry_wins(tmp_path):
    manifest.append(tmp_path, [LedgerEntry.failed("/v/a.mp4", "cannot decode"), ok("/v/b.mp4")])
    manifest.append(tmp_path, [ok("/v/a.mp4", shard="shard-00001.h5", frames=7)])
    entries = manifest.load(tmp_path)
    assert set(entries) == {"/v/a.mp4", "/v/b.mp4"}
    assert entries["/v/a.mp4"] == ok("/v/a.mp4", shard="shard-00001.h5", frames=7)
    assert entries["/v/b.mp4"].info == {"fps": 25.0}
    assert manifest.done_inputs(tmp_path) == {"/v/a.mp4", "/v/b.mp4"}
    assert len((tmp_path / manifest.MANIFEST_NAME).read_text().splitlines()) == 3  # appended, not rewritten

    manifest.append(tmp_path, [LedgerEntry.failed("/v/b.mp4", "gone\non two lines")])
    assert manifest.failed_inputs(tmp_path) == {"/v/b.mp4": "gone on two lines"}
    assert manifest.done_inputs(tmp_path) == {"/v/a.mp4"}


def test_torn_last_line_is_ignored_and_next_append_still_parses(tmp_path):
    manifest.append(tmp_path, [ok("/v/a.mp4"), ok("/v/b.mp4")])
    path = tmp_path / manifest.MANIFEST_NAME
    whole = ok("/v/c.mp4").to_json()
    with open(path, "a") as f:
        f.write(whole[: len(whole) // 2])  # a crash in the middle of writing c's line
    entries = manifest.load(tmp_path)
    assert set(entries) == {"/v/a.mp4", "/v/b.mp4"}

    manifest.append(tmp_path, [ok("/v/d.mp4")])  # must not be glued onto the torn line
    assert set(manifest.load(tmp_path)) == {"/v/a.mp4", "/v/b.mp4", "/v/d.mp4"}


def test_missing_manifest_is_empty(tmp_path):
    assert manifest.load(tmp_path) == {}
    assert manifest.done_inputs(tmp_path) == set()


def test_unicode_and_undecodable_paths_round_trip(tmp_path):
    odd = os.fsdecode(b"/v/\xff\xfe bad.mp4")  # not UTF-8: surrogateescape
    names = ["/v/vidéo 日本.mp4", odd, '/v/quote" and \\ backslash.mp4']
    manifest.append(tmp_path, [ok(n) for n in names])
    assert set(manifest.load(tmp_path)) == set(names)
    for line in (tmp_path / manifest.MANIFEST_NAME).read_bytes().splitlines():
        json.loads(line.decode("ascii"))  # plain ASCII JSON, readable by any tool


def test_entries_are_validated():
    with pytest.raises(ShardError):
        LedgerEntry(input="/v/a.mp4", status="ok", file=None, key="k", frames=3)
    with pytest.raises(ShardError):
        LedgerEntry(input="/v/a.mp4", status="failed")
    with pytest.raises(ShardError):
        LedgerEntry(input="/v/a.mp4", status="maybe", reason="x")


def test_ledgers_of_the_previous_version_load(tmp_path):
    """Lines written before the one LedgerEntry: manifests named the file "shard" and had no
    clips or warnings; index lines had no warnings."""
    (tmp_path / manifest.MANIFEST_NAME).write_text(
        '{"frames": 133, "info": {"fps": 25.0}, "input": "/v/a.mp4", "key": "a-1", "reason": null, "shard": "shard-00000.h5", "status": "ok"}\n'
        '{"frames": null, "info": {}, "input": "/v/b.mp4", "key": null, "reason": "/v/b.mp4: broken", "shard": null, "status": "failed"}\n'
    )
    (tmp_path / features.INDEX_NAME).write_text(
        '{"clips": 3, "file": "features-00000.h5", "frames": 40, "info": {"streams": ["rgb"]}, "input": "/v/a.mp4", '
        '"key": "a-1", "reason": null, "status": "ok"}\n'
    )
    shards = manifest.load(tmp_path)
    assert shards["/v/a.mp4"] == LedgerEntry("/v/a.mp4", "ok", file="shard-00000.h5", key="a-1", frames=133, info={"fps": 25.0})
    assert shards["/v/b.mp4"] == LedgerEntry.failed("/v/b.mp4", "/v/b.mp4: broken")
    index = features.load_index(tmp_path)
    assert index["/v/a.mp4"] == LedgerEntry("/v/a.mp4", "ok", file="features-00000.h5", key="a-1", frames=40, clips=3,
                                            info={"streams": ["rgb"]})  # fmt: skip
    assert index["/v/a.mp4"].warnings == []


def test_warnings_round_trip(tmp_path):
    entry = LedgerEntry("/v/a.mp4", "ok", file="shard-00000.h5", key="a-1", frames=3, warnings=["Error at MB 3 7"])
    manifest.append(tmp_path, [entry])
    assert manifest.load(tmp_path)["/v/a.mp4"] == entry
