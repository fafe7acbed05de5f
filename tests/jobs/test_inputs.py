"""INPUT arguments: files, directories searched by extension, @list.txt."""

import os

import pytest

from quovadis.jobs.inputs import HIDDEN, LINKED_DIR, NOT_VIDEO, OUTPUT_DIR, VIDEO_EXTENSIONS, expand_inputs
from quovadis.pipeline.decode import DecodeConfig, iter_frames
from quovadis.pipeline.errors import ConfigError
from quovadis.pipeline.probe import probe
from tests.videos import make_video


def test_files_directories_and_lists(tmp_path):
    (tmp_path / "a" / "deep").mkdir(parents=True)
    for name in ["a/1.mp4", "a/deep/2.MKV", "a/notes.txt", "a/deep/3.webm", "b.avi"]:
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "a" / "dir.mp4").mkdir()  # a directory named like a video is searched, not taken
    listing = tmp_path / "list.txt"
    listing.write_text("# videos\nb.avi\n\n/abs/missing.mp4\n")
    got = expand_inputs([str(tmp_path / "a"), f"@{listing}", str(tmp_path / "b.avi"), str(tmp_path / "gone.mp4")]).paths
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
    assert expand_inputs([f"@{listing}"], keep_dir=keep).paths == [str(tmp_path / "v" / "1.mp4"), str(tmp_path / "shards")]
    assert expand_inputs([f"@{listing}"]).paths == [str(tmp_path / "v" / "1.mp4")]  # no keep_dir: searched (no videos)


def test_video_named_directory_given_explicitly_is_kept_as_input(tmp_path):
    (tmp_path / "dir.mp4").mkdir()
    assert expand_inputs([str(tmp_path / "dir.mp4")]).paths == [str(tmp_path / "dir.mp4")]


def test_unreadable_list_is_a_usage_error(tmp_path):
    with pytest.raises(ConfigError, match="cannot read input list"):
        expand_inputs([f"@{tmp_path / 'nope.txt'}"])


def test_a_scan_lists_every_path_it_passes_over(tmp_path):
    """Nothing a directory search skips goes unsaid: other extensions, hidden files and directories,
    a job's output directory inside the input directory (searched as a whole), links to directories."""
    d = tmp_path / "in"
    for name in ["a.mjpeg", "b.MJPG", "notes.txt", ".DS_Store", "._a.mp4", ".git/c.mp4", "out/shard-00000.h5",
                 "out/manifest.jsonl", "sub/d.dv", "sub/e.yuv"]:  # fmt: skip
        (d / name).parent.mkdir(parents=True, exist_ok=True)
        (d / name).write_bytes(b"x")
    (tmp_path / "elsewhere").mkdir()
    (d / "linked").symlink_to(tmp_path / "elsewhere")
    got = expand_inputs([str(d), str(d / "sub")])  # sub twice: its paths and skips once each
    assert got.paths == [str(d / "a.mjpeg"), str(d / "b.MJPG"), str(d / "sub/d.dv")]
    assert got.ignored == [
        {"path": str(d / ".git"), "reason": HIDDEN},
        {"path": str(d / "linked"), "reason": LINKED_DIR},
        {"path": str(d / ".DS_Store"), "reason": HIDDEN},
        {"path": str(d / "._a.mp4"), "reason": HIDDEN},
        {"path": str(d / "notes.txt"), "reason": NOT_VIDEO},
        {"path": str(d / "out"), "reason": OUTPUT_DIR},
        {"path": str(d / "sub/e.yuv"), "reason": NOT_VIDEO},
    ]


def test_an_unreadable_directory_is_listed(tmp_path, monkeypatch):
    (tmp_path / "locked").mkdir()
    (tmp_path / "locked" / "v.mp4").write_bytes(b"x")
    scandir = os.scandir

    def refuse(path):  # what a directory without read permission does (root reads anything)
        if os.fspath(path) == str(tmp_path / "locked"):
            raise PermissionError(13, "Permission denied", os.fspath(path))
        return scandir(path)

    monkeypatch.setattr(os, "scandir", refuse)
    got = expand_inputs([str(tmp_path)])
    assert got.paths == [] and got.ignored == [{"path": str(tmp_path / "locked"), "reason": "cannot read directory: Permission denied"}]


# extension -> (encoder, output options) ffmpeg writes it with
_ADDED = {
    ".mjpeg": ("mjpeg", ["-f", "mjpeg"]), ".mjpg": ("mjpeg", ["-f", "mjpeg"]),
    ".dv": ("dvvideo", ["-f", "dv", "-s", "720x576", "-pix_fmt", "yuv420p"]), ".divx": ("mpeg4", ["-f", "avi"]),
    ".f4v": ("libx264", ["-f", "f4v"]), ".qt": ("libx264", ["-f", "mov"]), ".3g2": ("libx264", ["-f", "3g2"]),
    ".mk3d": ("libx264", ["-f", "matroska"]), ".nut": ("mpeg4", ["-f", "nut"]), ".ogg": ("libtheora", ["-f", "ogg"]),
    ".ogm": ("libtheora", ["-f", "ogg"]), ".rm": ("rv20", ["-f", "rm"]), ".rmvb": ("rv20", ["-f", "rm"]),
    ".m1v": ("mpeg1video", ["-f", "mpeg1video"]), ".m2v": ("mpeg2video", ["-f", "mpeg2video"]),
    ".mpv": ("mpeg2video", ["-f", "mpeg2video"]), ".ivf": ("libvpx", ["-f", "ivf"]),
}  # fmt: skip


@pytest.mark.parametrize("ext", sorted(_ADDED))
def test_added_extensions_are_found_and_decoded(tmp_path, ext):
    """Each extension added for issue 14 is a container ffmpeg reads as video: found by a scan,
    probed and decoded to every frame."""
    codec, extra = _ADDED[ext]
    path = make_video(tmp_path / f"v{ext}", fps=25, duration=0.4, size=(64, 48), codec=codec, extra=extra)
    assert ext in VIDEO_EXTENSIONS and expand_inputs([str(tmp_path)]).paths == [str(path)]
    assert sum(len(c.frames) for c in iter_frames(path, DecodeConfig(short_side=0), probe(path))) == 10
