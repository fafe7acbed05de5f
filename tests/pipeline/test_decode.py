"""Decode: frame counts and timing against the source clock, geometry, the shared real videos,
bad input, bit-exact segments, chunking. Videos come from tests/videos.py (ffmpeg-made)."""

from __future__ import annotations

import math
import shutil
import time
from fractions import Fraction

import cv2
import numpy as np
import pytest

from quovadis.pipeline.decode import (
    DecodeConfig,
    Segment,
    first_tick,
    iter_frames,
    output_size,
    plan_segments,
    seek_seconds,
    video_frames,
)
from quovadis.pipeline.errors import ConfigError, DecodeError
from quovadis.pipeline.probe import probe
from tests.conftest import shared_path
from tests.videos import (
    MARGIN,
    MARKER,
    make_audio_only,
    make_damaged,
    make_random_bytes,
    make_truncated,
    make_video,
    make_zero_frame_video,
    marker_box,
    marker_left,
    source_times,
)

KEEP = DecodeConfig(short_side=0)  # coded size: marker positions stay in source pixels


def decode_all(path, cfg=KEEP, **kw) -> np.ndarray:
    chunks = list(iter_frames(path, cfg, **kw))
    if not chunks:
        return np.zeros((0, 0, 0, 3), np.uint8)
    return np.concatenate([c.frames for c in chunks])


def expected_source_time(times: list[Fraction], k: int, fps: Fraction) -> Fraction:
    """The source frame ffmpeg's fps filter shows at output tick k: the latest one whose time,
    rounded to the nearest tick (halves up), is <= k; the first frame before it starts."""
    shown = times[0]
    for t in times:
        if math.floor(t * fps + Fraction(1, 2)) <= k:
            shown = t
    return shown


@pytest.mark.parametrize(
    "fps, vfr, ext",
    [(30, False, "mp4"), (29.97, False, "mp4"), (60, False, "mp4"), (12, False, "mkv"), (60, True, "mkv")],
    ids=["30", "29.97", "60", "12", "vfr"],
)
def test_frame_count_and_marker_follow_the_source_clock(tmp_path, fps, vfr, ext):
    duration, size = 2.0, (160, 120)
    path = make_video(tmp_path / f"v.{ext}", fps=fps, duration=duration, size=size, vfr=vfr)
    frames = decode_all(path)
    assert frames.dtype == np.uint8 and frames.shape[1:] == (120, 160, 3)
    assert abs(len(frames) - duration * 25) <= 1

    times = source_times(fps=fps, duration=duration, vfr=vfr)
    out_fps = Fraction(25)
    max_gap = max(b - a for a, b in zip(times, times[1:]))
    errors = []
    for k, frame in enumerate(frames):
        t_src = expected_source_time(times, k, out_fps)
        want = math.floor(marker_left(float(t_src), size=size, duration=duration))
        box = marker_box(frame)
        assert box is not None, f"no marker in output frame {k}"
        errors.append(abs(box[0] - want))
        # in sync with the clock: what is shown is at most one source frame old (the last frame
        # holds past the end) and at most half an output frame ahead
        lag = Fraction(k, 25) - t_src
        assert lag <= max_gap or t_src == times[-1]
        assert lag >= -Fraction(1, 50)
    assert max(errors) <= 1, f"marker off by {max(errors)} px at frame {int(np.argmax(errors))}"


def test_resize_short_side_bilinear_keeps_marker_in_place(tmp_path):
    path = make_video(tmp_path / "v.mp4", fps=25, duration=1.0, size=(160, 120))
    small = decode_all(path)
    big = decode_all(path, DecodeConfig(short_side=240))
    assert big.shape == (25, 240, 320, 3)
    for k in (0, 12, 24):
        a, b = marker_box(small[k]), marker_box(big[k])
        assert abs(b[0] - 2 * a[0]) <= 2 and abs(b[1] - 2 * a[1]) <= 2


def test_short_side_zero_keeps_size(tmp_path):
    path = make_video(tmp_path / "v.mp4", duration=0.4, size=(96, 64))
    assert output_size(probe(path), KEEP) == (64, 96)
    assert decode_all(path).shape == (10, 64, 96, 3)
    assert output_size(probe(path), DecodeConfig()) == (256, 384)


@pytest.mark.parametrize("rotation, ext", [(90, "mp4"), (270, "mov")])
def test_rotation_is_applied(tmp_path, rotation, ext):
    path = make_video(tmp_path / f"r.{ext}", rotation=rotation, duration=1.0, size=(160, 120))
    info = probe(path)
    assert info.rotation == rotation
    assert output_size(info, KEEP) == (160, 120)
    frames = decode_all(path, info=info)
    assert frames.shape == (25, 160, 120, 3)
    first, last = marker_box(frames[0]), marker_box(frames[-1])
    if rotation == 90:  # coded top-left goes top-right; moving right becomes moving down
        assert first[2] == 120 - 1 - MARGIN and first[1] == MARGIN
        assert last[1] > first[1] + 80 and last[2] == first[2]
    else:  # coded top-left goes bottom-left; moving right becomes moving up
        assert first[0] == MARGIN and first[3] == 160 - 1 - MARGIN
        assert last[3] < first[3] - 80 and last[0] == first[0]


def test_non_square_pixels_come_out_square(tmp_path):
    path = make_video(tmp_path / "s.mp4", sar="2/1", duration=1.0, size=(160, 120))
    info = probe(path)
    assert info.sar == 2.0 and info.display_size() == (320, 120)
    frames = decode_all(path, info=info)
    assert frames.shape[1:] == (120, 320, 3)
    left, top, right, bottom = marker_box(frames[0])
    width, height = right - left + 1, bottom - top + 1
    assert height == MARKER and abs(width - 2 * MARKER) <= 2  # a coded square is displayed 2:1
    assert output_size(info, DecodeConfig()) == (256, 682)  # 320 * 256 / 120 = 682.7, truncated


SHARED = {  # file: (frames at 25 fps, output (H, W)) -- counts are duration x 25, +-1
    "bigbuckbunny_h264_720p25.mp4": (133, (256, 455)),
    "big_buck_bunny_0_30_vp8.webm": (750, (256, 455)),
    "mmaction2_test_mpeg4.avi": (164, (256, 341)),
    "issue-236_h264_1080p23.976.mkv": (50, (256, 455)),
    "decord_video_90_rot.mov": (3, (454, 256)),  # 568x320 turned upright by its -90 display matrix
    "cars_320x240.h265": (30, (256, 341)),  # raw HEVC, no timestamps: 30 frames at the assumed 25 fps
}


WEBM_CFG = DecodeConfig(short_side=64)  # the 30 s webm is decoded small: 750 frames at 256 px are 260 MB


@pytest.fixture(scope="module")
def webm_frames():
    return decode_all(shared_path("videos", "big_buck_bunny_0_30_vp8.webm"), WEBM_CFG)


@pytest.mark.parametrize("name", sorted(SHARED))
def test_shared_videos_decode(name, webm_frames):
    path = shared_path("videos", name)
    count, hw = SHARED[name]
    info = probe(path)
    assert output_size(info, DecodeConfig()) == hw
    if name.endswith(".webm"):
        frames, hw = webm_frames, (64, 113)  # 1280 * 64 / 720 = 113.8, truncated
    else:
        frames = decode_all(path, DecodeConfig(), info=info)
    assert frames.dtype == np.uint8 and frames.shape[1:] == (*hw, 3)
    assert abs(len(frames) - count) <= 1
    sample = frames[:: max(1, len(frames) // 10)].astype(np.float32)
    assert 10 < sample.mean() < 245 and sample.std() > 10  # real pictures, not a blank


def test_rotated_shared_video_is_upright():
    """decord's clip is a landscape phone recording stored sideways; upright it is portrait."""
    frames = decode_all(shared_path("videos", "decord_video_90_rot.mov"), DecodeConfig())
    assert frames.shape == (3, 454, 256, 3)


def test_bad_inputs_raise_decode_error_naming_the_file(tmp_path):
    real = shared_path("videos", "bigbuckbunny_h264_720p25.mp4")
    (tmp_path / "dir.mp4").mkdir()
    (tmp_path / "empty.mp4").write_bytes(b"")
    (tmp_path / "notes.mp4").write_text("not a video, just words\n" * 20)
    fast = make_video(tmp_path / "fast.mp4", duration=3.0, extra=["-movflags", "+faststart"])
    cases = {
        tmp_path / "missing.mp4": "no such file",
        tmp_path / "dir.mp4": "directory",
        tmp_path / "empty.mp4": "empty",
        tmp_path / "notes.mp4": "moov atom not found",
        make_random_bytes(tmp_path / "random.mp4"): "invalid data",
        make_audio_only(tmp_path / "audio.mp4"): "audio-only",
        make_truncated(real, tmp_path / "half.mp4"): "moov atom not found",  # index at the end: lost
        make_truncated(fast, tmp_path / "half_faststart.mp4"): "truncated",  # index first: data cut
        make_zero_frame_video(tmp_path / "zero.mp4"): "no video frames",
    }
    for path, cause in cases.items():
        with pytest.raises(DecodeError) as e:
            decode_all(path, DecodeConfig(short_side=32))
        msg = str(e.value)
        assert msg.startswith(f"{path}: ") and cause in msg.lower(), msg


def test_segments_are_bit_identical_to_a_full_decode(tmp_path):
    # 6 s, keyframes every 37 frames (not aligned with 40-frame segments), B-frames on
    path = make_video(tmp_path / "long.mp4", fps=30, duration=6.0, size=(96, 64), gop=37)
    cfg = DecodeConfig(short_side=0, segment_frames=40, chunk_frames=16)
    info = probe(path)
    full = decode_all(path, cfg, info=info)
    assert len(full) == 150
    segments = plan_segments(info, cfg)
    assert [(s.start, s.end) for s in segments] == [(0, 40), (40, 80), (80, 120), (120, None)]
    assert seek_seconds(info, cfg, 80) > 0 and seek_seconds(info, cfg, 120) > 0  # really seeks
    for seg in segments:
        end = None if seg.end is None else seg.end + 1  # one frame of overlap, as flow asks
        part = decode_all(path, cfg, info=info, start=seg.start, end=end)
        assert np.array_equal(part, full[seg.start : end]), f"segment {seg} differs"
    # ranges straddling keyframes, one frame long, and past the end (empty, like slicing)
    for a, b in [(73, 75), (111, 112), (148, 400)]:
        assert np.array_equal(decode_all(path, cfg, info=info, start=a, end=b), full[a:b])
    assert list(iter_frames(path, cfg, info=info, start=200, end=210)) == []


def test_containers_without_keyframe_seeking_decode_from_the_start(tmp_path):
    """mpegts seeks by timestamp to any frame (ffmpeg marks every dts as a keyframe), and its
    clock starts at 1.4 s: such files are one segment, and a range decodes from 0 and trims."""
    path = make_video(tmp_path / "v.ts", fps=30, duration=6.0, size=(96, 64), gop=37)
    cfg = DecodeConfig(short_side=0, segment_frames=40)
    info = probe(path)
    assert info.container == "mpegts" and info.start_time > 1.0
    assert plan_segments(info, cfg) == [Segment(0, 0, None)] and seek_seconds(info, cfg, 120) == 0
    full = decode_all(path, cfg, info=info)
    assert len(full) == 150 and marker_box(full[0])[0] == MARGIN
    assert np.array_equal(decode_all(path, cfg, info=info, start=120), full[120:])


def test_segments_of_shared_videos_with_odd_timestamps(webm_frames):
    """webm: video starts at 0.003 s; avi: the first decoded frame comes at 0.04 s."""
    webm = shared_path("videos", "big_buck_bunny_0_30_vp8.webm")
    for a, b in [(400, 431), (741, None)]:
        assert np.array_equal(decode_all(webm, WEBM_CFG, start=a, end=b), webm_frames[a:b])
    avi = shared_path("videos", "mmaction2_test_mpeg4.avi")
    cfg = DecodeConfig(short_side=64)
    full = decode_all(avi, cfg)
    for a, b in [(1, 5), (100, 131), (150, None)]:
        assert np.array_equal(decode_all(avi, cfg, start=a, end=b), full[a:b])


def test_chunks_bound_memory_and_are_contiguous(tmp_path):
    path = make_video(tmp_path / "v.mp4", duration=2.0, size=(64, 48))
    cfg = DecodeConfig(short_side=0, chunk_frames=7)
    chunks = list(iter_frames(path, cfg))
    assert all(1 <= len(c.frames) <= 7 for c in chunks)
    assert [c.start for c in chunks] == list(range(0, 50, 7))
    assert sum(len(c.frames) for c in chunks) == 50
    ranged = list(iter_frames(path, cfg, start=5, end=23))
    assert [(c.start, len(c.frames)) for c in ranged] == [(5, 7), (12, 7), (19, 4)]


def test_closing_early_kills_ffmpeg(tmp_path):
    path = make_video(tmp_path / "v.mp4", duration=3.0, size=(64, 48))
    gen = iter_frames(path, DecodeConfig(short_side=0, chunk_frames=2))
    first = next(gen)
    proc = gen.gi_frame.f_locals["proc"]
    assert first.frames.shape == (2, 48, 64, 3) and proc.poll() is None
    gen.close()
    assert proc.returncode is not None


def test_plan_segments():
    from quovadis.pipeline.probe import VideoInfo

    def info(duration):
        return VideoInfo("x.mp4", 1, "h264", 320, 240, 1.0, 0, 25.0, duration, 0.0, False, 0, "mov,mp4,m4a,3gp,3g2,mj2")

    cfg = DecodeConfig(segment_frames=300)
    assert plan_segments(info(None), cfg) == [Segment(0, 0, None)]
    assert plan_segments(info(5.0), cfg) == [Segment(0, 0, None)]
    assert plan_segments(info(30.0), cfg) == [Segment(0, 0, 300), Segment(1, 300, 600), Segment(2, 600, None)]
    # a border 1 frame before the estimated end would leave a segment that may well be empty
    assert plan_segments(info(24.04), cfg) == [Segment(0, 0, 300), Segment(1, 300, None)]


def test_config_validation():
    for bad in ({"fps": 0}, {"fps": float("nan")}, {"short_side": -1}, {"chunk_frames": 0}, {"segment_frames": 0}):
        with pytest.raises(ConfigError):
            DecodeConfig(**bad)
    assert DecodeConfig(fps=29.97).rate == Fraction(2997, 100)


# Frames as the released model saw them: decoded, converted to RGB at the decoded size, then resized
# bilinearly; size truncated; the 25 fps grid anchored at the first decoded frame.


def capture_frames(path, count: int | None = None) -> list[np.ndarray]:
    """Source frames as cv2.VideoCapture decodes them (its own ffmpeg), RGB, at the coded size."""
    cap = cv2.VideoCapture(str(path))
    frames = []
    while count is None or len(frames) < count:
        ok, bgr = cap.read()
        if not ok:
            break
        frames.append(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB))
    cap.release()
    return frames


@pytest.mark.parametrize(
    "name, hw",
    [("mmaction2_test_mpeg4.avi", (256, 341)), ("bigbuckbunny_h264_720p25.mp4", (256, 455))],
)
def test_frames_equal_native_rgb_resized_bilinearly(name, hw):
    """25 fps sources, so output frame k is source frame k: ours against cv2.VideoCapture frames
    resized by cv2.resize INTER_LINEAR to the literal size. One-step ffmpeg scaling was about +1
    grey level brighter (bias +1.0 on the avi, +1.2 on the mp4) and differed by 1.0 and 2.9 on average."""
    path = shared_path("videos", name)
    count = 30
    ours = decode_all(path, DecodeConfig(), end=count)
    height, width = hw
    ref = np.stack([cv2.resize(f, (width, height), interpolation=cv2.INTER_LINEAR) for f in capture_frames(path, count)])
    assert ours.shape == ref.shape == (count, height, width, 3)
    diff = ours.astype(np.float64) - ref
    mean_abs, bias = np.abs(diff).mean(), diff.mean()
    assert mean_abs < 0.5 and abs(bias) < 0.2, f"mean |diff| {mean_abs:.3f}, bias {bias:+.3f} grey levels"


def test_output_size_truncates_the_longer_side():
    from quovadis.pipeline.probe import VideoInfo

    def size(w, h, sar=1.0, rotation=0, short_side=256):
        info = VideoInfo("x.mp4", 1, "h264", w, h, sar, rotation, 25.0, 1.0, 0.0, False)
        return output_size(info, DecodeConfig(short_side=short_side))

    assert size(176, 144) == (256, 312)  # 312.9: rounding gave 313
    assert size(144, 176) == (312, 256)
    assert size(320, 240) == (256, 341)  # 341.3
    assert size(1280, 720) == (256, 455)  # 455.1
    assert size(1920, 1080) == (256, 455)
    assert size(568, 320, rotation=90) == (454, 256)  # 454.4, upright
    assert size(160, 120, sar=2.0) == (256, 682)  # displayed 320x120: 682.7
    assert size(96, 64) == (256, 384)  # exact
    assert size(176, 144, short_side=0) == (144, 176)


def test_first_decoded_frame_is_frame_zero(tmp_path):
    """An AVI with B-frames stores no pts: the stream starts at 0 but its first decoded frame has pts
    0.04 s (as the shared mmaction2 AVI). Frame 0 is that frame, not a copy of it at 0 s, so 25 fps
    in gives as many frames out as the source has, each equal to its source frame."""
    path = make_video(tmp_path / "bf.avi", fps=25, duration=4.0, size=(96, 64), codec="mpeg4", extra=["-bf", "2"])
    info = probe(path)
    assert info.start_time == 0.0 and info.first_frame_time == pytest.approx(0.04)
    assert first_tick(info, KEEP) == 1
    source = capture_frames(path)
    frames = decode_all(path, info=info)
    assert len(source) == 100 and len(frames) == 100
    assert np.array_equal(frames[0], source[0]) and np.array_equal(frames[-1], source[-1])
    assert seek_seconds(info, KEEP, 60) > 0  # a segment that seeks keeps the same numbering
    assert np.array_equal(decode_all(path, info=info, start=60, end=70), frames[60:70])


def test_shared_avi_first_frame_is_source_first_frame():
    path = shared_path("videos", "mmaction2_test_mpeg4.avi")
    source = capture_frames(path)
    frames = decode_all(path)
    assert len(frames) == len(source) == 164
    assert np.array_equal(frames[0], source[0]) and np.array_equal(frames[1], source[1])


@pytest.mark.parametrize("name", ["pipe:x.mp4", "concat:a|b.mp4"])
def test_file_names_like_ffmpeg_protocols_are_read_as_files(tmp_path, monkeypatch, name):
    """A relative name such as `pipe:x` or `concat:a|b` is the file of that name, not an ffmpeg
    protocol (stdin, a concatenation of `a` and `b.mp4`)."""
    original = make_video(tmp_path / "v.mp4", fps=25, duration=0.6, size=(64, 48), lossless=True)
    expected = decode_all(original)
    shutil.copyfile(original, tmp_path / name)
    monkeypatch.chdir(tmp_path)
    info = probe(name)
    assert (info.path, info.width, info.height, info.first_frame_time) == (name, 64, 48, 0.0)
    frames = decode_all(name, info=info)
    assert len(frames) == 15 and np.array_equal(frames, expected)


def test_decode_errors_that_keep_the_frames_are_returned_as_warnings(tmp_path):
    """A damaged stream that ffmpeg conceals gives all its frames, and its error messages come back
    in `warnings` (whole decode and a segment that stops before the end) instead of a worker's log."""
    clean = make_video(tmp_path / "v.avi", fps=25, duration=2.0, codec="mpeg4")
    damaged = make_damaged(clean, tmp_path / "damaged.avi")
    warnings: list[str] = []
    assert len(decode_all(damaged, warnings=warnings)) == 50
    assert len(warnings) == 1 and "frames [0, 50), kept: Error at MB" in warnings[0]
    segment: list[str] = []
    assert len(decode_all(damaged, start=0, end=40, warnings=segment)) == 40
    assert len(segment) == 1 and "frames [0, 40), kept: " in segment[0]
    none: list[str] = []
    assert len(decode_all(clean, warnings=none)) == 50 and none == []


def test_stalled_ffmpeg_is_killed_after_the_timeout(tmp_path, monkeypatch):
    """A stand-in for ffmpeg writes part of a frame, then hangs in a child process: the decode fails
    within the timeout, naming it, and neither the stand-in nor its child is left running."""
    from quovadis.pipeline import decode

    src = make_video(tmp_path / "a.mp4", fps=25, duration=0.5)
    info = probe(src)
    pid_file = tmp_path / "sleeper.pid"
    script = f"head -c 1000 /dev/zero; sleep 1000 & echo $! > {pid_file}; wait"
    monkeypatch.setattr(decode, "build_command", lambda *a, **k: ["sh", "-c", script])
    began = time.monotonic()
    with pytest.raises(DecodeError, match=r"no progress for 2 s; killed"):
        list(iter_frames(src, DecodeConfig(short_side=0, timeout_s=2), info))
    assert time.monotonic() - began < 10
    sleeper = int(pid_file.read_text())
    deadline = time.monotonic() + 5  # the orphaned child is reaped by init
    while time.monotonic() < deadline and _running(sleeper):
        time.sleep(0.05)
    assert not _running(sleeper)


def _running(pid: int) -> bool:
    """Whether `pid` is a live process (not gone, not a zombie)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_decode_timeout_must_not_be_negative():
    with pytest.raises(ConfigError, match="timeout"):
        DecodeConfig(timeout_s=-1)


def test_video_frames_adds_segments_and_refuses_one_that_stopped_short():
    segments = [Segment(0, 0, 50), Segment(1, 50, 100), Segment(2, 100, None)]
    assert video_frames("v.mp4", segments, [50, 50, 7]) == 107
    assert video_frames("v.mp4", segments[:1], [0]) == 0  # the caller decides whether 0 frames fail
    with pytest.raises(DecodeError, match=r"v\.mp4: stream ended at frame 80"):
        video_frames("v.mp4", segments, [50, 30, 0])
