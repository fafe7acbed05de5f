"""Shard files: safe keys, bit-exact round trips, rollover, tmp-then-rename, the layout on disk."""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import textwrap

import h5py
import numpy as np
import pytest

from quovadis.pipeline import conventions, manifest
from quovadis.pipeline.errors import ConfigError, ShardError
from quovadis.pipeline.shards import (
    FORMAT,
    FORMAT_VERSION,
    ShardConfig,
    ShardReader,
    ShardWriter,
    list_shards,
    open_video,
    record_unlisted_shards,
    video_key,
)
from tests.conftest import REPO, shared_path

KEY_RE = re.compile(r"^[A-Za-z0-9_-][A-Za-z0-9._-]{0,47}-[0-9a-f]{16}$")
H, W = 12, 16


def frames_of(t: int, seed: int, h: int = H, w: int = W) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(t, h, w, 3), dtype=np.uint8)


def flow_of(t: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).uniform(-30, 30, size=(t, H, W, 2)).astype(np.float32)


def begin(writer: ShardWriter, path: str, t: int | None, streams=("rgb",), **attrs) -> str:
    return writer.begin_video(path, height=H, width=W, expected_frames=t, streams=streams, attrs=attrs)


# -- keys -----------------------------------------------------------------------------------------


def test_video_keys_are_safe_unique_and_deterministic(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    paths = [
        "/data/a/clip.mp4",
        "/data/b/clip.mp4",  # same file name, another folder
        "/data/vidéo 日本 (1).mp4",
        "/data/with space.mkv",
        "/data/x/../clip.mp4",  # normalises to /data/clip.mp4, a third clip.mp4
        "../outside/clip.mp4",
        "relative/clip.mp4",
        "/data/.hidden",
        "/data/" + "long" * 40 + ".mp4",
        "/data/" + os.fsdecode(b"\xff\xfebad.mp4"),  # not UTF-8
        "/data/слово/..mp4",
    ]
    keys = [video_key(p) for p in paths]
    assert len(set(keys)) == len(keys)
    assert all(KEY_RE.match(k) for k in keys), keys
    assert [video_key(p) for p in paths] == keys  # deterministic
    assert video_key("/data/x/../clip.mp4") == video_key("/data/clip.mp4")  # one file, one key
    assert video_key("relative/clip.mp4") == video_key(tmp_path / "relative" / "clip.mp4")
    assert keys[2].startswith("video_1_-")  # accents folded, the rest replaced: still readable
    with h5py.File(tmp_path / "k.h5", "w") as f:  # every key is a valid, top-level HDF5 name
        for k in keys:
            f.create_group(k)
        assert sorted(f.keys()) == sorted(keys)


# -- writing and reading ------------------------------------------------------------------------


def test_round_trip_out_of_order_interleaved_segments(tmp_path):
    cfg = ShardConfig(compression="lzf", chunk_frames=4)
    a, b = frames_of(23, 1), frames_of(9, 2)
    fa = flow_of(22, 3)
    with ShardWriter(tmp_path, cfg, {"fps": 25, "note": "ünïcode"}) as w:
        ka = begin(w, "/v/a dir/a.mp4", None, streams=("rgb", "flow"), fps=29.97, codec="h264",
                   width=640, height=480, size=[640, 480], duration=None)  # fmt: skip
        kb = begin(w, "/v/b.mp4", 9)
        w.write_rgb(ka, 10, a[10:21])  # segments arrive out of order, videos interleaved
        w.write_rgb(kb, 5, b[5:])
        w.write_flow(ka, 10, fa[10:22])
        w.write_rgb(ka, 0, a[:10])
        w.write_flow(ka, 0, fa[:10])
        w.write_rgb(kb, 0, b[:5])
        w.write_rgb(ka, 21, a[21:])
        assert w.end_video(kb, 9) == []  # shard not full: stays open
        assert w.end_video(ka, 23) == []
        assert list(tmp_path.glob("*.h5")) == []  # nothing final before close
    entries = manifest.load(tmp_path)
    assert {e.status for e in entries.values()} == {"ok"} and len(entries) == 2
    ea = entries["/v/a dir/a.mp4"]
    assert (ea.file, ea.key, ea.frames) == ("shard-00000.h5", ka, 23)
    assert ea.info["codec"] == "h264" and ea.info["height"] == H and ea.info["streams"] == ["rgb", "flow"]
    assert ea.info["source_width"] == 640 and ea.info["fps"] == conventions.FPS

    with open_video(tmp_path, "/v/a dir/a.mp4") as va:
        np.testing.assert_array_equal(va.rgb(), a)
        np.testing.assert_array_equal(va.rgb(5, 17), a[5:17])
        stored = va.flow()
        assert stored.dtype == np.uint8 and stored.shape == (22, H, W, 2)
        # q = round((clip(f, -20, 20) + 20) * 255 / 40), written out (not the writer's own conventions.quantize_flow)
        np.testing.assert_array_equal(stored, np.round((np.clip(fa, -20, 20) + 20) * np.float32(255 / 40)).astype(np.uint8))
        np.testing.assert_allclose(va.flow_pixels(), np.clip(fa, -20, 20), atol=20 / 255 + 1e-6)
        # probe names that clash with the stored frames' are kept as source_*
        assert (va.attrs["source_fps"], va.attrs["source_width"], va.attrs["source_height"]) == (29.97, 640, 480)
        assert json.loads(va.attrs["size"]) == [640, 480] and "duration" not in va.attrs
        assert (va.frames, va.fps, va.height, va.width) == (23, 25.0, H, W)
        assert va.config == {"fps": 25, "note": "ünïcode"} and va.source_path == "/v/a dir/a.mp4"
    with open_video(tmp_path, kb) as vb:  # by key as well as by input
        np.testing.assert_array_equal(vb.rgb(), b)
        assert vb.streams == ("rgb",)


def test_dataset_layout_chunks_compression_and_attrs(tmp_path):
    cfg = ShardConfig(compression="gzip4", chunk_frames=3, flow_dtype="float16")
    fl = flow_of(6, 5)
    with ShardWriter(tmp_path, cfg, {"job": "test"}) as w:
        k = w.begin_video("/v/a.mp4", height=H, width=W, expected_frames=7, streams=("rgb", "flow"), attrs={},
                          fps=12.5)  # fmt: skip  (a job run with --fps 12.5)
        w.write_rgb(k, 0, frames_of(7, 4))
        w.write_flow(k, 0, fl)
        w.end_video(k, 7)
    with h5py.File(tmp_path / "shard-00000.h5", "r") as f:  # read with h5py alone
        assert f.attrs["format"] == FORMAT and f.attrs["format_version"] == FORMAT_VERSION
        assert f.attrs["conventions_version"] == conventions.CONVENTIONS_VERSION
        g = f[k]
        rgb, flow = g["rgb"], g["flow"]
        assert rgb.shape == (7, H, W, 3) and rgb.dtype == np.uint8
        assert rgb.chunks == (3, H, W, 3) and rgb.maxshape == (None, H, W, 3)
        assert flow.chunks == (3, H, W, 2) and flow.dtype == np.float16 and flow.shape == (6, H, W, 2)
        assert rgb.compression == "gzip" and rgb.compression_opts == 4 and flow.compression == "gzip"
        np.testing.assert_array_equal(flow[:], fl.astype(np.float16))
        assert g.attrs["flow_dtype"] == "float16" and bool(g.attrs["complete"])
        assert g.attrs["fps"] == 12.5 and g.attrs["frames"] == 7 and g.attrs["conventions_version"] == conventions.CONVENTIONS_VERSION
        assert json.loads(g.attrs["config"]) == {"job": "test"} and g.attrs["source_path"] == "/v/a.mp4"


def test_lzf_and_uncompressed_are_set_as_asked(tmp_path):
    for name, expect in [("lzf", "lzf"), ("none", None)]:
        out = tmp_path / name
        with ShardWriter(out, ShardConfig(compression=name, chunk_frames=2), {}) as w:
            k = begin(w, "/v/a.mp4", 3)
            w.write_rgb(k, 0, frames_of(3, 0))
            w.end_video(k, 3)
        with ShardReader(out / "shard-00000.h5") as r:
            assert r.file[k]["rgb"].compression == expect


def test_end_video_refuses_gaps_and_trims_to_frames(tmp_path):
    with ShardWriter(tmp_path, ShardConfig(), {}) as w:
        k = begin(w, "/v/a.mp4", 20, streams=("rgb", "flow"))
        w.write_rgb(k, 0, frames_of(5, 0))
        w.write_rgb(k, 8, frames_of(4, 1))
        w.write_flow(k, 0, flow_of(11, 2))
        with pytest.raises(ShardError, match="rgb frames below 12"):
            w.end_video(k, 12)
        w.write_rgb(k, 5, frames_of(3, 3))
        w.end_video(k, 12)  # expected 20, got 12: trimmed
    with open_video(tmp_path, "/v/a.mp4") as v:
        assert v.rgb().shape[0] == 12 and v.flow().shape[0] == 11 and v.frames == 12


def test_bad_writes_are_refused(tmp_path):
    w = ShardWriter(tmp_path, ShardConfig(), {})
    k = begin(w, "/v/a.mp4", 3)
    with pytest.raises(ShardError, match="uint8"):
        w.write_rgb(k, 0, frames_of(3, 0).astype(np.float32))
    with pytest.raises(ShardError, match="flow was not declared"):
        w.write_flow(k, 0, flow_of(2, 0))
    with pytest.raises(ShardError, match="already being written"):
        begin(w, "/v/a.mp4", 3)
    with pytest.raises(ShardError, match="no video"):
        w.write_rgb("nope", 0, frames_of(1, 0))
    w.close()


def test_rollover_by_size_and_full_shard_waits_for_its_videos(tmp_path):
    big = frames_of(40, 0)  # 40 * 576 B = 23 KB uncompressed per video
    cfg = ShardConfig(shard_size_bytes=20_000, compression="none", chunk_frames=4)
    w = ShardWriter(tmp_path, cfg, {})
    k1 = begin(w, "/v/1.mp4", 40)
    k2 = begin(w, "/v/2.mp4", 40)  # same shard as 1
    w.write_rgb(k1, 0, big)  # shard 0 is now full
    assert w.end_video(k1, 40) == []  # video 2 still open in shard 0
    k3 = begin(w, "/v/3.mp4", 40)  # a full shard takes no new video: shard 1
    w.write_rgb(k3, 0, big)
    w.write_rgb(k2, 0, big[:10])
    done = w.end_video(k2, 10)
    assert [(e.input, e.file) for e in done] == [("/v/1.mp4", "shard-00000.h5"), ("/v/2.mp4", "shard-00000.h5")]
    assert [p.name for p in list_shards(tmp_path)] == ["shard-00000.h5"]
    assert set(manifest.load(tmp_path)) == {"/v/1.mp4", "/v/2.mp4"}  # appended right after the rename
    done = w.end_video(k3, 40)  # shard 1 is full too and has nothing open
    assert [(e.input, e.file) for e in done] == [("/v/3.mp4", "shard-00001.h5")]
    k4 = begin(w, "/v/4.mp4", 5)
    w.write_rgb(k4, 0, big[:5])
    w.end_video(k4, 5)
    assert [e.file for e in w.close()] == ["shard-00002.h5"]
    entries = manifest.load(tmp_path)
    assert {p: e.file for p, e in entries.items()} == {
        "/v/1.mp4": "shard-00000.h5", "/v/2.mp4": "shard-00000.h5",
        "/v/3.mp4": "shard-00001.h5", "/v/4.mp4": "shard-00002.h5",
    }  # fmt: skip
    for e in entries.values():
        with open_video(tmp_path, e) as v:
            np.testing.assert_array_equal(v.rgb(), big[: e.frames])


def test_abort_and_close_drop_unfinished_videos(tmp_path):
    w = ShardWriter(tmp_path, ShardConfig(), {})
    ka, kb, kc = (begin(w, f"/v/{n}.mp4", 3) for n in "abc")
    for k in (ka, kb, kc):
        w.write_rgb(k, 0, frames_of(3, 0))
    w.abort_video(ka)  # failed in decode
    w.end_video(kb, 3)
    entries = w.close()  # c never ended: dropped
    assert [e.input for e in entries] == ["/v/b.mp4"]
    with ShardReader(tmp_path / "shard-00000.h5") as r:
        assert r.keys() == [kb]
    assert set(manifest.load(tmp_path)) == {"/v/b.mp4"}

    full = tmp_path / "full"  # a full shard whose last open video fails is finalised at once
    w = ShardWriter(full, ShardConfig(shard_size_bytes=1000, compression="none"), {})
    ka, kb = begin(w, "/v/a.mp4", 3), begin(w, "/v/b.mp4", 3)
    w.write_rgb(ka, 0, frames_of(3, 0))
    assert w.end_video(ka, 3) == []
    assert [e.input for e in w.abort_video(kb)] == ["/v/a.mp4"]
    assert (full / "shard-00000.h5").exists() and w.close() == []

    empty = tmp_path / "empty"
    w = ShardWriter(empty, ShardConfig(), {})
    w.abort_video(begin(w, "/v/a.mp4", 3))
    assert w.close() == [] and list(empty.iterdir()) == []  # no shard of nothing


KILLED_WRITER = textwrap.dedent(
    """
    import os, signal, sys
    import numpy as np
    from quovadis.pipeline.shards import ShardConfig, ShardWriter
    w = ShardWriter(sys.argv[1], ShardConfig(), {})
    k = w.begin_video("/v/killed.mp4", height=12, width=16, expected_frames=4, streams=("rgb",), attrs={})
    w.write_rgb(k, 0, np.zeros((4, 12, 16, 3), np.uint8))
    w.end_video(k, 4)
    os.kill(os.getpid(), signal.SIGKILL)  # the actor dies before close
    """
)


def test_killed_writer_leaves_only_tmp_which_the_next_writer_removes(tmp_path):
    with ShardWriter(tmp_path, ShardConfig(), {}) as w:  # an earlier, finished run
        k = begin(w, "/v/old.mp4", 2)
        w.write_rgb(k, 0, frames_of(2, 0))
        w.end_video(k, 2)
    before = (tmp_path / "shard-00000.h5").read_bytes()
    proc = subprocess.run([sys.executable, "-c", KILLED_WRITER, str(tmp_path)], cwd=REPO, capture_output=True)
    assert proc.returncode == -9, proc.stderr.decode()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["manifest.jsonl", "shard-00000.h5", "shard-00001.h5.tmp"]
    assert set(manifest.load(tmp_path)) == {"/v/old.mp4"}  # no ok entry for the killed video

    w = ShardWriter(tmp_path, ShardConfig(), {})  # the re-run
    assert not list(tmp_path.glob("*.tmp"))
    k = begin(w, "/v/killed.mp4", 4)
    w.write_rgb(k, 0, frames_of(4, 1))
    w.end_video(k, 4)
    assert [e.file for e in w.close()] == ["shard-00001.h5"]
    assert (tmp_path / "shard-00000.h5").read_bytes() == before  # finished shards never rewritten
    assert manifest.load(tmp_path)["/v/killed.mp4"].file == "shard-00001.h5"


def test_a_committed_shard_without_manifest_lines_is_adopted(tmp_path):
    """A writer killed between a shard's commit and its manifest append: the next start records the
    shard's videos from the shard itself (manifest.adopt_unlisted), the rule features follow too."""
    with ShardWriter(tmp_path, ShardConfig(), {}) as w:
        k = begin(w, "/v/a.mp4", 3)
        w.write_rgb(k, 0, frames_of(3, 0))
        w.end_video(k, 3, warnings=["Error at MB 3 7"])
    path = tmp_path / manifest.MANIFEST_NAME
    written = manifest.load(tmp_path)
    path.write_text("")  # as if killed before the append
    assert record_unlisted_shards(tmp_path) == list(written.values())
    assert manifest.load(tmp_path) == written and written["/v/a.mp4"].warnings == ["Error at MB 3 7"]
    assert record_unlisted_shards(tmp_path) == []  # adopted once
    with ShardWriter(tmp_path, ShardConfig(), {}) as w:  # the re-run writes a new shard beside it
        k = begin(w, "/v/b.mp4", 2)
        w.write_rgb(k, 0, frames_of(2, 1))
        w.end_video(k, 2)
    assert [p.name for p in list_shards(tmp_path)] == ["shard-00000.h5", "shard-00001.h5"]


def test_a_deleted_shard_that_the_manifest_names_is_never_renamed_onto(tmp_path):
    """extract deletes intermediate shards once used; a later writer must not reuse their names,
    or the manifest's old entries would point at the new file."""
    with ShardWriter(tmp_path, ShardConfig(), {}) as w:
        k = begin(w, "/v/used.mp4", 2)
        w.write_rgb(k, 0, frames_of(2, 0))
        w.end_video(k, 2)
    (tmp_path / "shard-00000.h5").unlink()
    with ShardWriter(tmp_path, ShardConfig(), {}) as w:
        k = begin(w, "/v/new.mp4", 2)
        w.write_rgb(k, 0, frames_of(2, 1))
        w.end_video(k, 2)
    entries = manifest.load(tmp_path)
    assert entries["/v/used.mp4"].file == "shard-00000.h5" and entries["/v/new.mp4"].file == "shard-00001.h5"
    assert [p.name for p in list_shards(tmp_path)] == ["shard-00001.h5"]


def test_undecodable_source_path_is_stored_readably(tmp_path):
    odd = "/v/" + os.fsdecode(b"\xffname.mp4")
    with ShardWriter(tmp_path, ShardConfig(), {}) as w:
        k = begin(w, odd, 1)
        w.write_rgb(k, 0, frames_of(1, 0))
        w.end_video(k, 1)
    assert manifest.load(tmp_path)[odd].key == k  # exact in the manifest
    with open_video(tmp_path, odd) as v:
        assert v.source_path == "/v/\\xffname.mp4"  # escaped in the HDF5 attribute


def test_config_is_validated():
    for bad in [dict(compression="zstd"), dict(chunk_frames=0), dict(flow_dtype="int8"), dict(shard_size_bytes=0)]:
        with pytest.raises(ConfigError):
            ShardConfig(**bad)


def test_bench_measures_real_decoded_video(tmp_path):
    from quovadis.jobs import options
    from quovadis.jobs.bench import shards as bench_shards

    parser = argparse.ArgumentParser()
    options.BENCH_OPTIONS["shards"](parser)
    video = shared_path("videos", "mmaction2_test_mpeg4.avi")
    args = parser.parse_args([str(video), "--compressions", "none,lzf", "--chunk-frames", "4",
                              "--max-seconds", "3", "--clips", "3", "--clip-len", "16",
                              "--workdir", str(tmp_path)])  # fmt: skip
    report = bench_shards.run_bench(args)
    rows = {r["compression"]: r for r in report.extra["rows"]}
    assert report.extra["frames"] == 75  # 3 s at 25 fps
    assert report.extra["raw_bytes"] == 75 * 256 * 342 * 3  # 320x240 scaled to short side 256
    assert rows["none"]["size_ratio"] == pytest.approx(1.0, abs=0.05)
    assert rows["lzf"]["size_ratio"] < 0.9  # real frames compress
    assert all(r["read_clips_s"] > 0 and r["write_mb_s"] > 0 for r in rows.values())
