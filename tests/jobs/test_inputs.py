"""INPUT arguments: files, directories searched by extension, @list.txt."""

import os

import pytest

from quovadis.jobs.inputs import expand_inputs
from quovadis.pipeline.errors import ConfigError


def test_files_directories_and_lists(tmp_path):
    (tmp_path / "a" / "deep").mkdir(parents=True)
    for name in ["a/1.mp4", "a/deep/2.MKV", "a/notes.txt", "a/deep/3.webm", "b.avi"]:
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "a" / "dir.mp4").mkdir()  # a directory named like a video is searched, not taken
    listing = tmp_path / "list.txt"
    listing.write_text("# videos\nb.avi\n\n/abs/missing.mp4\n")
    got = expand_inputs([str(tmp_path / "a"), f"@{listing}", str(tmp_path / "b.avi"), str(tmp_path / "gone.mp4")])
    assert got == [
        str(tmp_path / "a/1.mp4"), str(tmp_path / "a/deep/2.MKV"), str(tmp_path / "a/deep/3.webm"),
        str(tmp_path / "b.avi"), "/abs/missing.mp4", str(tmp_path / "gone.mp4"),
    ]  # fmt: skip  (order kept, duplicates dropped, missing paths kept for the job to report)


def test_directories_in_a_list_are_searched_and_kept_directories_stay(tmp_path):
    (tmp_path / "v").mkdir()
    (tmp_path / "v" / "1.mp4").write_bytes(b"x")
    (tmp_path / "shards").mkdir()
    (tmp_path / "shards" / "manifest.jsonl").write_text("")
    listing = tmp_path / "list.txt"
    listing.write_text("v\nshards\n")
    keep = lambda p: os.path.isfile(os.path.join(p, "manifest.jsonl"))  # noqa: E731 (extract's shard dirs)
    assert expand_inputs([f"@{listing}"], keep_dir=keep) == [str(tmp_path / "v" / "1.mp4"), str(tmp_path / "shards")]
    assert expand_inputs([f"@{listing}"]) == [str(tmp_path / "v" / "1.mp4")]  # no keep_dir: searched (no videos)


def test_video_named_directory_given_explicitly_is_kept_as_input(tmp_path):
    (tmp_path / "dir.mp4").mkdir()
    assert expand_inputs([str(tmp_path / "dir.mp4")]) == [str(tmp_path / "dir.mp4")]


def test_unreadable_list_is_a_usage_error(tmp_path):
    with pytest.raises(ConfigError, match="cannot read input list"):
        expand_inputs([f"@{tmp_path / 'nope.txt'}"])
