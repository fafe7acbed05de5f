"""Probe: metadata of real and made videos parsed from `ffmpeg -i`, the bad-input corpus, and the
ffmpeg binary choice (PATH first, imageio-ffmpeg when PATH has none)."""

from __future__ import annotations

import json
import os
import stat
import tempfile
from pathlib import Path

import imageio_ffmpeg
import pytest

from quovadis.pipeline.decode import DecodeConfig, iter_frames
from quovadis.pipeline.errors import DecodeError
from quovadis.pipeline.probe import ffmpeg_exe, probe
from tests.conftest import shared_path
from tests.videos import make_audio_only, make_random_bytes, make_truncated, make_video

# file: (codec, width, height, fps, duration, start_time, rotation, has_audio), as ffmpeg reports them
SHARED = {
    "bigbuckbunny_h264_720p25.mp4": ("h264", 1280, 720, 25.0, 5.31, 0.0, 0, True),
    "big_buck_bunny_0_30_vp8.webm": ("vp8", 1280, 720, 24.0, 30.0, 0.003, 0, True),
    "mmaction2_test_mpeg4.avi": ("mpeg4", 320, 240, 25.0, 6.56, 0.0, 0, True),
    "issue-236_h264_1080p23.976.mkv": ("h264", 1920, 1080, 24000 / 1001, 2.02, 0.0, 0, True),
    "decord_video_90_rot.mov": ("h264", 568, 320, 30.0, 0.1, 0.0, 90, False),
    "cars_320x240.h265": ("hevc", 320, 240, 25.0, None, 0.0, 0, False),
}
CONTAINERS = {"mp4": "mov,mp4,m4a,3gp,3g2,mj2", "mov": "mov,mp4,m4a,3gp,3g2,mj2", "webm": "matroska,webm",
              "mkv": "matroska,webm", "avi": "avi", "h265": "hevc"}


@pytest.mark.parametrize("name", sorted(SHARED))
def test_shared_videos_probe(name):
    path = shared_path("videos", name)
    info = probe(path)
    codec, w, h, fps, duration, start, rotation, audio = SHARED[name]
    assert (info.codec, info.width, info.height, info.rotation, info.has_audio) == (codec, w, h, rotation, audio)
    assert info.fps == pytest.approx(fps, abs=1e-9)
    assert info.duration == (None if duration is None else pytest.approx(duration))
    assert info.start_time == pytest.approx(start)
    assert info.sar == 1.0 and info.size_bytes == path.stat().st_size and info.path == str(path)
    assert info.display_size() == ((h, w) if rotation % 180 else (w, h))
    assert info.container == CONTAINERS[name.rsplit(".", 1)[1]]
    record = json.loads(json.dumps(info.to_dict()))  # JSON-able for shard attrs and the manifest
    assert record["codec"] == codec and record["rotation"] == rotation and record["width"] == w


def test_made_videos_probe(tmp_path):
    info = probe(make_video(tmp_path / "a.mp4", fps=29.97, duration=1.0, size=(96, 64), audio=True, sar="4/3"))
    assert info.fps == pytest.approx(30000 / 1001, abs=1e-9)
    assert (info.width, info.height, info.has_audio) == (96, 64, True)
    assert info.sar == pytest.approx(4 / 3) and info.display_size() == (128, 64)
    assert info.duration == pytest.approx(1.0, abs=0.05)
    rotated = probe(make_video(tmp_path / "r.mov", rotation=270, duration=0.5, size=(96, 64)))
    assert rotated.rotation == 270 and rotated.display_size() == (64, 96)


def test_bad_inputs(tmp_path):
    real = shared_path("videos", "bigbuckbunny_h264_720p25.mp4")
    (tmp_path / "clip.mkv").mkdir()
    (tmp_path / "empty.mp4").write_bytes(b"")
    (tmp_path / "readme.txt").write_text("a text file\n" * 50)
    (tmp_path / "words.mp4").write_text("a text file named like a video\n" * 50)
    cases = {
        tmp_path / "missing.mp4": "no such file",
        tmp_path / "clip.mkv": "is a directory",
        tmp_path / "empty.mp4": "empty file",
        tmp_path / "readme.txt": "not a video",  # ffmpeg's tty demuxer takes .txt as ANSI art
        tmp_path / "words.mp4": "moov atom not found",
        make_random_bytes(tmp_path / "random.mp4"): "invalid data",
        make_random_bytes(tmp_path / "random.mkv", seed=1): "invalid data",
        make_audio_only(tmp_path / "audio.m4a"): "audio-only",
        make_truncated(real, tmp_path / "half.mp4"): "moov atom not found",
    }
    for path, cause in cases.items():
        with pytest.raises(DecodeError) as e:
            probe(path)
        msg = str(e.value)
        assert msg.startswith(f"{path}: ") and cause in msg.lower(), msg
        assert "\n" not in msg


def test_unreadable_file(tmp_path):
    """A file without read permission. Root reads anything, so as root the probe runs in a forked
    child that has dropped to the `nobody` user; the file sits in a world-searchable folder."""
    folder = Path(tempfile.mkdtemp(prefix="quovadis-perm-"))
    try:
        folder.chmod(0o755)
        path = make_video(folder / "secret.mp4", duration=0.2, size=(32, 32))
        path.chmod(0)
        if os.geteuid() != 0:
            with pytest.raises(DecodeError, match="permission denied"):
                probe(path)
            return
        msg = _probe_as_nobody(path)
        assert msg.startswith(f"{path}: ") and "permission denied" in msg, msg
    finally:
        for p in folder.iterdir():
            p.chmod(stat.S_IRUSR | stat.S_IWUSR)
            p.unlink()
        folder.rmdir()


def _probe_as_nobody(path: Path) -> str:
    """Run probe(path) in a child process with uid/gid 65534; return its error message."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: never return into pytest
        try:
            os.close(read_end)
            os.setgid(65534)
            os.setuid(65534)
            try:
                probe(path)
                out = "no error"
            except DecodeError as e:
                out = str(e)
            os.write(write_end, out.encode())
        finally:
            os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as f:
        msg = f.read().decode()
    os.waitpid(pid, 0)
    return msg


def test_without_ffmpeg_on_path_the_pip_binary_is_used(tmp_path, monkeypatch):
    empty = tmp_path / "bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    assert ffmpeg_exe() == imageio_ffmpeg.get_ffmpeg_exe()
    path = shared_path("videos", "mmaction2_test_mpeg4.avi")  # probe and decode need no PATH at all
    assert probe(path).codec == "mpeg4"
    first = next(iter_frames(path, DecodeConfig(short_side=32, chunk_frames=4)))
    assert first.frames.shape == (4, 32, 42, 3)  # 320x240 -> 42.67, truncated to 42


def test_ffmpeg_on_path_is_preferred(tmp_path, monkeypatch):
    bindir = tmp_path / "bin"
    bindir.mkdir()
    log = tmp_path / "calls.log"
    wrapper = bindir / "ffmpeg"  # records each call, then runs the real binary
    wrapper.write_text(f'#!/bin/sh\necho "$@" >> "{log}"\nexec "{imageio_ffmpeg.get_ffmpeg_exe()}" "$@"\n')
    wrapper.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bindir}{os.pathsep}{os.environ.get('PATH', '')}")
    assert ffmpeg_exe() == str(wrapper)
    path = shared_path("videos", "decord_video_90_rot.mov")
    assert probe(path).rotation == 90
    assert len(next(iter_frames(path, DecodeConfig(short_side=32))).frames) == 3
    calls = log.read_text().splitlines()
    # our probe, iter_frames' own probe, the decode: all through the wrapper
    assert len(calls) == 3 and all(str(path) in c for c in calls) and "rawvideo" in calls[2]


def test_fifo_fails_at_once_without_opening_it(tmp_path):
    fifo = tmp_path / "stream.mp4"
    os.mkfifo(fifo)  # no writer: open(fifo, "rb") would block forever
    with pytest.raises(DecodeError, match="not a regular file"):
        probe(fifo)
