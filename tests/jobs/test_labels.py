"""labels.csv parsing and matching against a real manifest (written with pipeline.manifest)."""

from __future__ import annotations

import pytest

from quovadis.jobs.labels import load_labels
from quovadis.pipeline.errors import ConfigError
from quovadis.pipeline.manifest import LedgerEntry, append
from quovadis.pipeline.shards import video_key


@pytest.fixture
def shard_dir(tmp_path):
    """A manifest with four stored videos (two share a file name) and one failed input."""
    out = tmp_path / "shards"
    out.mkdir()
    paths = [tmp_path / "clips" / "walk_01.mp4", tmp_path / "clips" / "run_02.mp4",
             tmp_path / "a" / "same.mp4", tmp_path / "b" / "same.mp4"]  # fmt: skip
    entries = [
        LedgerEntry(input=str(p), status="ok", file="shard-00000.h5", key=video_key(p), frames=30 + i)
        for i, p in enumerate(paths)
    ]
    entries.append(LedgerEntry.failed(str(tmp_path / "clips" / "broken.mp4"), "not a video"))
    append(out, entries)
    return out, paths


def write(path, text):
    path.write_text(text)
    return path


def test_matches_by_path_key_and_unique_name(tmp_path, shard_dir):
    out, paths = shard_dir
    csv = write(tmp_path / "labels.csv",
                "video,label,split\n"
                "clips/walk_01.mp4,walk,train\n"  # relative to the CSV's folder
                f"{video_key(paths[1])},run,val\n"  # a shard key
                f"{paths[2]},walk,train\n"  # an absolute path
                "\n# a comment\n")  # fmt: skip
    labels = load_labels(csv, out)
    assert labels.classes == ("run", "walk")
    by_input = {v.input: v for v in labels.videos}
    assert by_input[str(paths[0])].label == 1 and by_input[str(paths[0])].split == "train"
    assert by_input[str(paths[1])].label == 0 and by_input[str(paths[1])].frames == 31
    assert by_input[str(paths[2])].key == video_key(paths[2])
    assert [v.input for v in labels.split("val")] == [str(paths[1])]
    assert labels.splits == ("train", "val")

    no_header = write(tmp_path / "plain.csv", "walk_01,walk\nrun_02.mp4,run\n")  # unique stem / file name
    labels = load_labels(no_header, out)
    assert {v.input for v in labels.videos} == {str(paths[0]), str(paths[1])}
    assert labels.splits == () and len(labels.split(None)) == 2


def test_unmatched_videos_are_all_listed(tmp_path, shard_dir):
    out, _ = shard_dir
    csv = write(tmp_path / "labels.csv", "video,label\nwalk_01.mp4,walk\nnope.mp4,run\nsame.mp4,x\nbroken.mp4,y\n")
    with pytest.raises(ConfigError) as err:
        load_labels(csv, out)
    msg = str(err.value)
    assert "3 of 4 labelled videos match no stored video" in msg
    assert "'nope.mp4'" in msg and "line 3" in msg
    assert "ambiguous" in msg and "line 4" in msg
    assert "preprocess failed: not a video" in msg


def test_bad_files_and_classes(tmp_path, shard_dir, monkeypatch):
    out, paths = shard_dir
    with pytest.raises(ConfigError, match="line 2: video .* is already labelled on line 1"):
        load_labels(write(tmp_path / "dup.csv", f"walk_01.mp4,walk\n{paths[0]},run\n"), out)
    with pytest.raises(ConfigError, match="expected 'video,label"):
        load_labels(write(tmp_path / "bad.csv", "walk_01.mp4\n"), out)
    with pytest.raises(ConfigError, match="has no rows"):
        load_labels(write(tmp_path / "empty.csv", "video,label\n"), out)
    with pytest.raises(ConfigError, match="cannot read labels file"):
        load_labels(tmp_path / "missing.csv", out)
    with pytest.raises(ConfigError, match="no manifest.jsonl entries"):
        load_labels(write(tmp_path / "ok.csv", "walk_01.mp4,walk\n"), tmp_path)
    # a checkpoint's classes fix the order; labels outside them are refused
    labels = load_labels(tmp_path / "ok.csv", out, classes=("zzz", "walk"))
    assert labels.videos[0].label == 1
    with pytest.raises(ConfigError, match=r"labels \['walk'\] are not classes of the model"):
        load_labels(tmp_path / "ok.csv", out, classes=("run",))
    # integer labels sort numerically
    csv = write(tmp_path / "num.csv", f"walk_01.mp4,10\nrun_02.mp4,2\n{paths[2]},1\n")
    assert load_labels(csv, out).classes == ("1", "2", "10")
    monkeypatch.chdir(tmp_path)  # paths relative to the working directory work too
    assert load_labels(write(tmp_path / "cwd.csv", "clips/run_02.mp4,run\n"), out).videos[0].input == str(paths[1])
