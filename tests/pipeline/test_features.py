"""The feature output format: HDF5 and npy writers, the index, FeatureDataset and collate_features."""

from __future__ import annotations

import json

import h5py
import numpy as np
import pytest
import torch

from quovadis.pipeline import conventions, durable
from quovadis.pipeline.errors import ConfigError
from quovadis.pipeline.features import (
    FeatureDataset,
    VideoFeatures,
    append_index,
    clip_times,
    collate_features,
    load_index,
    npy_paths,
    read_video,
    record_unlisted,
    remove_leftovers,
    write_hdf5,
    write_npy,
)
from quovadis.pipeline.manifest import LedgerEntry
from quovadis.pipeline.shards import video_key


def _video(path: str, frames: int, clip_len: int = 16, stride: int = 16, seed: int = 0, logits: bool = False) -> VideoFeatures:
    rng = np.random.default_rng(seed)
    starts = np.asarray(conventions.clip_starts(frames, clip_len, stride), np.int64)
    n = len(starts)
    feats = {"rgb": rng.standard_normal((n, 1024)).astype(np.float32), "flow": rng.standard_normal((n, 1024)).astype(np.float32)}
    lg = {"logits_rgb": rng.standard_normal((n, 5)).astype(np.float32)} if logits else {}
    return VideoFeatures(video_key(path), path, 25.0, frames, clip_len, starts, feats, lg, {"stride": stride, "crop": "center", "model": "i3d"})


def test_clip_times_cover_the_real_frames_of_each_clip():
    starts = conventions.clip_starts(40, 16, 16)  # 0, 16, then 32 runs past the end: looped, kept
    assert starts == [0, 16, 32]
    begin, end = clip_times(starts, 16, 40, 25.0)
    np.testing.assert_allclose(begin, [0.0, 0.64, 1.28])
    np.testing.assert_allclose(end, [0.64, 1.28, 1.6])  # the last clip ends with the video
    begin, end = clip_times(conventions.clip_starts(3, 16, 16), 16, 3, 25.0)  # a 3-frame video: 1 clip
    np.testing.assert_allclose(begin, [0.0])
    np.testing.assert_allclose(end, [0.12])  # 3 real frames / 25 fps, not 16 / 25


def test_hdf5_round_trip_index_and_attrs(tmp_path):
    videos = [_video("/data/a b/ü.mp4", 40, logits=True), _video("/data/../x/clip.avi", 3, seed=1, logits=True)]
    entries = write_hdf5(tmp_path, videos, labels=["c0", "c1", "c2", "c3", "c4"])
    assert [e.file for e in entries] == ["features-00000.h5"] * 2
    assert not list(tmp_path.glob("*.tmp"))
    index = load_index(tmp_path)
    assert set(index) == {"/data/a b/ü.mp4", "/data/../x/clip.avi"}
    assert index["/data/a b/ü.mp4"].clips == 3 and index["/data/../x/clip.avi"].clips == 1
    with h5py.File(tmp_path / "features-00000.h5", "r") as f:  # the documented layout, h5py only
        assert f.attrs["format"] == "quovadis-features" and json.loads(f.attrs["labels"])[4] == "c4"
        g = f[videos[0].key]
        assert g["rgb"].shape == (3, 1024) and g["rgb"].dtype == np.float32
        assert g["logits_rgb"].shape == (3, 5)
        assert g.attrs["source_path"] == "/data/a b/ü.mp4" and g.attrs["stride"] == 16
        np.testing.assert_allclose(g["clip_end_s"][()], [0.64, 1.28, 1.6])
    got = read_video(tmp_path, index["/data/a b/ü.mp4"])
    np.testing.assert_array_equal(got.features["flow"], videos[0].features["flow"])
    np.testing.assert_array_equal(got.clip_start_frame, [0, 16, 32])
    # a second file takes the next number and never touches the first
    more = write_hdf5(tmp_path, [_video("/data/c.mp4", 20, seed=2)], dtype="float16")
    assert more[0].file == "features-00001.h5"
    with h5py.File(tmp_path / "features-00001.h5", "r") as f:
        assert f[more[0].key]["rgb"].dtype == np.float16


def test_npy_files_are_named_by_the_safe_key(tmp_path):
    video = _video("/in/../evil/name with spaces;rm -rf.mp4", 50, logits=True)
    write_npy(tmp_path, video)
    paths = npy_paths(tmp_path, video.key)
    assert "/" not in video.key and " " not in video.key and not video.key.startswith(".")
    assert np.load(paths["rgb"]).shape == (4, 1024)
    stamps = np.load(paths["timestamps"])
    assert stamps.shape == (4, 2)
    np.testing.assert_allclose(stamps[:, 0], [0.0, 0.64, 1.28, 1.92])
    np.testing.assert_allclose(stamps[:, 1], [0.64, 1.28, 1.92, 2.0])
    assert np.load(paths["logits_rgb"]).shape == (4, 5)
    assert not list(tmp_path.glob("*.tmp")) and all(p.parent == tmp_path for p in tmp_path.iterdir())
    entry = load_index(tmp_path)[video.source_path]
    back = read_video(tmp_path, entry)
    np.testing.assert_array_equal(back.clip_start_frame, video.clip_start_frame)
    np.testing.assert_array_equal(back.features["rgb"], video.features["rgb"])


def test_index_last_line_wins_and_torn_lines_are_skipped(tmp_path):
    append_index(tmp_path, [LedgerEntry.failed("/v.mp4", "boom\nsecond line")])
    with open(tmp_path / "index.jsonl", "a") as f:
        f.write('{"input": "/w.mp4", "stat')  # a crash mid-line
    append_index(tmp_path, [LedgerEntry("/v.mp4", "ok", file="features-00000.h5", key="v-1", clips=2, frames=30)])
    index = load_index(tmp_path)
    assert set(index) == {"/v.mp4"} and index["/v.mp4"].status == "ok"
    (tmp_path / "features-00003.h5.tmp").write_bytes(b"partial")
    (tmp_path / "k_rgb.npy.tmp").write_bytes(b"partial")
    remove_leftovers(tmp_path)
    assert not list(tmp_path.glob("*.tmp"))


@pytest.mark.parametrize("fmt", ["hdf5", "npy"])
def test_feature_dataset_and_collate(tmp_path, fmt):
    videos = [_video("/a.mp4", 40), _video("/b.mp4", 3, seed=1), _video("/c.mp4", 70, seed=2)]
    if fmt == "hdf5":
        write_hdf5(tmp_path, videos[:2])
        write_hdf5(tmp_path, videos[2:])
    else:
        for v in videos:
            write_npy(tmp_path, v)
    ds = FeatureDataset(tmp_path, streams=("rgb", "flow"), labels={"/a.mp4": 0, videos[2].key: 1})
    assert len(ds) == 2  # /b.mp4 has no label: left out
    item = ds[0]
    assert item["video"] == "/a.mp4" and item["label"] == 0
    assert item["features"].shape == (3, 2048)
    np.testing.assert_array_equal(item["features"][:, 1024:].numpy(), videos[0].features["flow"])
    batch = collate_features([ds[0], ds[1]])
    assert batch["features"].shape == (2, 5, 2048) and batch["lengths"].tolist() == [3, 5]
    assert batch["mask"].tolist() == [[True] * 3 + [False] * 2, [True] * 5]
    assert torch.all(batch["features"][0, 3:] == 0) and batch["label"].tolist() == [0, 1]
    only_rgb = FeatureDataset(tmp_path, streams=("rgb",))
    assert len(only_rgb) == 3 and only_rgb[1]["features"].shape == (1, 1024)
    with pytest.raises(ConfigError):
        FeatureDataset(tmp_path, streams=("depth",))


@pytest.mark.parametrize("fmt", ["hdf5", "npy"])
def test_committed_features_without_index_lines_are_adopted(tmp_path, fmt):
    """A crash between the commit and the index append leaves complete files no line names: the
    next run records them from the files (manifest.adopt_unlisted), as it does for shards."""
    write = (lambda v: write_hdf5(tmp_path, [v])) if fmt == "hdf5" else (lambda v: [write_npy(tmp_path, v)])
    write(_video("/a.mp4", 20))
    lines = (tmp_path / "index.jsonl").read_text()
    expected = write(_video("/b.mp4", 40, seed=1))
    (tmp_path / "index.jsonl").write_text(lines)  # as if killed before the second append
    assert set(load_index(tmp_path)) == {"/a.mp4"}
    assert record_unlisted(tmp_path) == expected
    index = load_index(tmp_path)
    assert set(index) == {"/a.mp4", "/b.mp4"} and index["/b.mp4"] == expected[0]
    np.testing.assert_array_equal(read_video(tmp_path, index["/b.mp4"]).features["rgb"], _video("/b.mp4", 40, seed=1).features["rgb"])
    assert record_unlisted(tmp_path) == []  # adopted once


def test_a_crash_while_writing_npy_meta_keeps_the_previous_meta(tmp_path, monkeypatch):
    """`<key>_meta.json` goes through pipeline.durable (it was written in place)."""
    write_npy(tmp_path, _video("/a.mp4", 20))
    meta = tmp_path / f"{video_key('/a.mp4')}_meta.json"
    before = meta.read_bytes()

    def crash(path, data, **kwargs):
        def write(f):
            f.write(b'{"source_path": "/a.mp4", "fps"')
            raise OSError("disk unplugged")

        durable.write_atomic(path, write)

    monkeypatch.setattr(durable, "write_json_atomic", crash)
    with pytest.raises(Exception, match="disk unplugged"):
        write_npy(tmp_path, _video("/a.mp4", 40, seed=1))
    assert meta.read_bytes() == before and not list(tmp_path.glob("*.tmp"))
