"""Manifest: append-only JSON lines, last entry per input wins, torn tails ignored."""

from __future__ import annotations

import json
import os

import pytest

from quovadis.pipeline import manifest
from quovadis.pipeline.errors import ShardError
from quovadis.pipeline.manifest import ManifestEntry


def ok(input: str, shard: str = "shard-00000.h5", frames: int = 10) -> ManifestEntry:
    return ManifestEntry(input=input, status="ok", shard=shard, key=f"k-{frames}", frames=frames, info={"fps": 25.0})


def test_round_trip_and_last_entry_wins(tmp_path):
    manifest.append(tmp_path, [ManifestEntry.failed("/v/a.mp4", "cannot decode"), ok("/v/b.mp4")])
    manifest.append(tmp_path, [ok("/v/a.mp4", shard="shard-00001.h5", frames=7)])
    entries = manifest.load(tmp_path)
    assert set(entries) == {"/v/a.mp4", "/v/b.mp4"}
    assert entries["/v/a.mp4"] == ok("/v/a.mp4", shard="shard-00001.h5", frames=7)
    assert entries["/v/b.mp4"].info == {"fps": 25.0}
    assert manifest.done_inputs(tmp_path) == {"/v/a.mp4", "/v/b.mp4"}
    assert len((tmp_path / manifest.MANIFEST_NAME).read_text().splitlines()) == 3  # appended, not rewritten

    manifest.append(tmp_path, [ManifestEntry.failed("/v/b.mp4", "gone\non two lines")])
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
        ManifestEntry(input="/v/a.mp4", status="ok", shard=None, key="k", frames=3)
    with pytest.raises(ShardError):
        ManifestEntry(input="/v/a.mp4", status="failed")
    with pytest.raises(ShardError):
        ManifestEntry(input="/v/a.mp4", status="maybe", reason="x")
