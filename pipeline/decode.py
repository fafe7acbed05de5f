"""Decoding a video into constant-rate, square-pixel, resized uint8 RGB frames, in bounded chunks.

Contract of `iter_frames`:
    yields FrameChunk(start, frames) with frames uint8 (t, H, W, 3), RGB, 0..255, t <= chunk_frames,
    (H, W) = output_size(info, cfg). frames[i] is output frame start+i.
Time base: output frame k is tick n0 + k of the grid `info.start_time + n / cfg.fps`, where tick
n0 = first_tick(info, cfg) is the one nearest the first decoded frame: frame 0 is the first decoded
frame, never a copy of it pushed back to the stream start (as MediaPipe's PacketResamplerCalculator
anchors the Kinetics 25 fps grid). ffmpeg's `fps` filter picks, for each tick n, the latest source
frame whose timestamp, rounded to the nearest tick, is <= n: the frame on screen at that time to
within half an output frame. So variable, NTSC and low/high frame-rate sources come out evenly
spaced and in sync with their clock; a video of duration D gives about D * fps frames.
Geometry and colour: ffmpeg's autorotate applies the display matrix and ffmpeg converts to rgb24
at the decoded size (the same swscale conversion cv2.VideoCapture makes); then cv2.resize
INTER_LINEAR goes straight to the size computed here (SAR made square, shorter side `short_side`,
the longer side truncated). Converting before resizing, as the Kinetics preprocessing (decode,
then resize bilinearly) does: ffmpeg scaling yuv420p and converting in one step comes out about
one grey level brighter, and swscale's `bilinear` is an area filter when downscaling.
Segments: for any 0 <= a < b, iter_frames(start=a, end=b) gives exactly frames[a:b] of the full
decode, bit for bit. Timestamps stay on the source clock (`-copyts`), the input seeks (to the
keyframe before) a margin ahead of a, `fps` resamples on that absolute clock and `trim` keeps
ticks a..b-1. Flow callers ask for [a, b+1) to overlap segments by one frame. A range past the end
of the video yields nothing (like slicing); a decode from frame 0 that yields nothing is an error.
Memory: stdout is read chunk_frames frames at a time, never the whole video.
Hangs: ffmpeg that writes nothing for cfg.timeout_s seconds (a stalled disk or network mount, a
decoder stuck in a loop) is killed with its process group and the decode raises DecodeError.
"""

from __future__ import annotations

import logging
import math
import os
import select
import signal
import subprocess
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import cv2
import ffmpeg
import numpy as np

from quovadis.pipeline import conventions
from quovadis.pipeline.errors import ConfigError, DecodeError
from quovadis.pipeline.probe import VideoInfo, ffmpeg_exe, ffmpeg_input, probe

log = logging.getLogger(__name__)

# Demuxers whose seek lands on a keyframe at or before the target (sample tables, cues, idx1).
# Others (mpegts, mpeg-ps, raw streams, ...) may land on any frame, so their videos are decoded
# from the start in one segment: slower for long files, but never a wrong picture.
EXACT_SEEK_CONTAINERS = frozenset({"mov,mp4,m4a,3gp,3g2,mj2", "matroska,webm", "avi"})
SEEK_MARGIN_S = 1.0  # seek this far before the first wanted frame: covers the look-back of `fps`
SEGMENT_SLACK_FRAMES = 3  # no segment border this close to the estimated end (durations are approximate)
_STDERR_TAIL_BYTES = 8192


@dataclass(frozen=True)
class DecodeConfig:
    """How frames come out of decode (the job copies --fps and --short-side into it)."""

    fps: float = conventions.FPS  # output frames per second, constant
    short_side: int = conventions.SHORT_SIDE  # shorter output side in px; 0 keeps the (square-pixel, rotated) size
    chunk_frames: int = 32  # frames per yielded chunk: bounds memory
    segment_frames: int = 1500  # output frames per segment of a long video (60 s at 25 fps)
    timeout_s: float = 300.0  # kill a decode whose ffmpeg writes nothing for this long; 0 = never

    def __post_init__(self) -> None:
        if not (math.isfinite(self.fps) and self.fps > 0):
            raise ConfigError(f"fps must be a positive number, got {self.fps}")
        if self.short_side < 0:
            raise ConfigError(f"short_side must be >= 0 (0 keeps the size), got {self.short_side}")
        if self.chunk_frames < 1:
            raise ConfigError(f"chunk_frames must be >= 1, got {self.chunk_frames}")
        if self.segment_frames < 1:
            raise ConfigError(f"segment_frames must be >= 1, got {self.segment_frames}")
        if not (math.isfinite(self.timeout_s) and self.timeout_s >= 0):
            raise ConfigError(f"decode timeout must be >= 0 seconds (0 = none), got {self.timeout_s}")

    @property
    def rate(self) -> Fraction:
        """The output rate as the fraction ffmpeg gets (29.97 -> 30000/1001)."""
        return Fraction(self.fps).limit_denominator(1001)


def output_size(info: VideoInfo, cfg: DecodeConfig) -> tuple[int, int]:
    """(height, width) of the output frames: display size (square pixels, rotated), then the shorter
    side scaled to cfg.short_side with the aspect kept, the longer side truncated to whole pixels
    (176x144 -> 312x256) as MediaPipe's ScaleImageCalculator and torchvision/PIL resizes do."""
    w, h = info.display_size()
    s = cfg.short_side
    if s == 0:
        return h, w
    if w <= h:
        return max(1, h * s // w), s
    return s, max(1, w * s // h)


def decoded_size(info: VideoInfo) -> tuple[int, int]:
    """(height, width) of the rgb24 frames ffmpeg writes: the coded size, turned by autorotate."""
    if info.rotation % 180 == 90:
        return info.width, info.height
    return info.height, info.width


def first_tick(info: VideoInfo, cfg: DecodeConfig) -> int:
    """The tick of the grid start_time + n/fps nearest the first decoded frame: output frame 0."""
    if info.first_frame_time is None:
        return 0
    return max(0, math.floor((info.first_frame_time - info.start_time) * cfg.fps + 0.5))


@dataclass(frozen=True)
class Segment:
    """Output frames [start, end) of one video, decoded by one worker; end None = to the end."""

    index: int
    start: int
    end: int | None


def plan_segments(info: VideoInfo, cfg: DecodeConfig) -> list[Segment]:
    """Split a video into segments of cfg.segment_frames output frames, the last one open-ended.

    The frame count is estimated from the container duration, which may be off (it is the longest
    stream's), so no border is placed within SEGMENT_SLACK_FRAMES of the estimated end; the last
    segment may thus be a little longer. One segment when the duration is unknown (raw streams)
    or the container cannot seek to keyframes (see EXACT_SEEK_CONTAINERS).
    """
    if info.duration is None or not seeks_exactly(info):
        return [Segment(0, 0, None)]
    estimate = int(info.duration * cfg.fps + 0.5)
    borders = list(range(cfg.segment_frames, estimate - SEGMENT_SLACK_FRAMES, cfg.segment_frames))
    starts = [0, *borders]
    ends: list[int | None] = [*borders, None]
    return [Segment(i, a, b) for i, (a, b) in enumerate(zip(starts, ends))]


def video_frames(path: str, segments: Sequence[Segment], counts: Sequence[int]) -> int:
    """A video's frame count from the frames each of its segments decoded (`counts`, in order);
    DecodeError when a segment before the last stopped short: the stream ended before the
    container's duration, so the frames after that point are missing."""
    for seg, count in zip(segments[:-1], counts[:-1]):
        if seg.end is not None and count != seg.end - seg.start:
            raise DecodeError(f"{path}: stream ended at frame {seg.start + count}, before its container's duration")
    return segments[-1].start + counts[-1]


@dataclass
class FrameChunk:
    """frames[i] (uint8 (t, H, W, 3) RGB) is output frame start+i, at time (start+i)/fps."""

    start: int
    frames: np.ndarray


def seeks_exactly(info: VideoInfo) -> bool:
    """Whether an input seek in this file lands on a keyframe at or before the target."""
    return info.container in EXACT_SEEK_CONTAINERS


def seek_seconds(info: VideoInfo, cfg: DecodeConfig, start: int) -> float:
    """Input seek position (seconds from the file's start) for a decode from output frame `start`,
    0 for none: raw streams and containers that do not seek to keyframes decode from 0 and trim."""
    if start <= 0 or info.duration is None or not seeks_exactly(info):
        return 0.0
    tick = start + first_tick(info, cfg)
    return max(0.0, tick / cfg.fps - max(SEEK_MARGIN_S, 2.0 / (info.fps or cfg.fps)))


def build_command(info: VideoInfo, cfg: DecodeConfig, start: int = 0, end: int | None = None) -> list[str]:
    """The ffmpeg argument list (via ffmpeg-python) that writes output frames [start, end) as raw
    rgb24 at decoded_size(info) to stdout (iter_frames resizes them)."""
    if start < 0 or (end is not None and end <= start):
        raise ConfigError(f"bad frame range [{start}, {end}) for {info.path}")
    n0 = first_tick(info, cfg)
    ss = seek_seconds(info, cfg, start)
    in_kwargs: dict = {"copyts": None}  # keep source timestamps: frame numbers stay absolute when seeking
    if ss > 0:
        in_kwargs.update(ss=f"{ss:.6f}", noaccurate_seek=None)
    stream = ffmpeg.input(ffmpeg_input(info.path), **in_kwargs)[str(info.stream_index)]
    if info.start_time:  # put the video's first pts at 0 (in input time-base ticks, rounded)
        stream = stream.filter("setpts", f"PTS-round({info.start_time!r}/TB)")
    rate = cfg.rate
    # start_time pins tick 0 to the stream start even when the first decoded frame comes later
    # (it is repeated back to 0, and trim drops the ticks before n0). After a seek it is the whole
    # second before the seek point: the offset is then exact in every time base, so ticks round
    # exactly as in a decode from 0.
    stream = stream.filter("fps", fps=f"{rate.numerator}/{rate.denominator}", start_time=int(ss))
    if start + n0 > 0 or end is not None:  # after `fps` the time base is 1/fps: pts == tick number
        trim = {"start_pts": start + n0} if start + n0 > 0 else {}
        if end is not None:
            trim["end_pts"] = end + n0
        stream = stream.filter("trim", **trim)
    stream = stream.filter("format", "rgb24")
    out_kwargs: dict = {"format": "rawvideo", "pix_fmt": "rgb24", "fps_mode": "passthrough"}
    if end is not None:
        out_kwargs["frames:v"] = end - start
    out = ffmpeg.output(stream, "pipe:", **out_kwargs)
    # global options go first: ffmpeg ignores options after the last output file
    return out.compile(cmd=[ffmpeg_exe(), "-nostdin", "-hide_banner", "-loglevel", "error"])


def iter_frames(
    path: str | Path,
    cfg: DecodeConfig,
    info: VideoInfo | None = None,
    start: int = 0,
    end: int | None = None,
    warnings: list[str] | None = None,
) -> Iterator[FrameChunk]:
    """Decode output frames [start, end) of `path` (see the module docstring for the contract).

    ffmpeg runs in a subprocess (argument list, no shell) so a crashing decoder cannot take the
    worker down; it is killed (with its process group) when the generator is closed early. Raises
    DecodeError naming the file: ffmpeg failing (with its last stderr line), a decode from frame 0
    giving no frames, a truncated file, no bytes from ffmpeg for cfg.timeout_s seconds. An error can come after some chunks were yielded: callers discard partial output.
    ffmpeg errors of a decode that still gave its frames (a damaged stream, concealed) are logged
    and appended to `warnings`: the job runs this in a worker whose log the user never sees, so it
    carries them back and records them with the video.
    """
    path = str(path)
    if info is None:
        info = probe(path)
    cmd = build_command(info, cfg, start, end)
    height, width = output_size(info, cfg)
    decoded = decoded_size(info)
    native = None if decoded == (height, width) else np.empty((*decoded, 3), np.uint8)  # one frame
    wanted = None if end is None else end - start
    log.debug("decoding %s frames [%d, %s): %s", path, start, end, cmd)

    with tempfile.TemporaryFile() as errf:  # a file, not a pipe: ffmpeg can never block on stderr
        try:
            # its own session: a kill reaches any child it started, and never our process group
            proc = subprocess.Popen(
                cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=errf, bufsize=0, start_new_session=True
            )
        except OSError as e:
            raise DecodeError(f"{path}: cannot run ffmpeg ({cmd[0]}): {e.strerror or e}") from e
        done = 0
        try:
            while wanted is None or done < wanted:
                n = cfg.chunk_frames if wanted is None else min(cfg.chunk_frames, wanted - done)
                buf = np.empty((n, height, width, 3), np.uint8)
                try:
                    k, partial = _read_frames(proc.stdout, buf, native, cfg.timeout_s or None)
                except TimeoutError as e:
                    raise DecodeError(f"{path}: ffmpeg made no progress for {cfg.timeout_s:g} s; killed") from e
                if partial:
                    proc.wait()
                    raise DecodeError(f"{path}: ffmpeg output ended inside a frame ({_stderr_tail(errf)})")
                if k:
                    yield FrameChunk(start + done, buf[:k])
                    done += k
                if k < n:
                    break
            if wanted is not None and done >= wanted:
                _note_errors(path, start, done, _stderr_tail(errf), warnings)
                return  # all we asked for: the finally clause stops ffmpeg
            rc = proc.wait()
            errors = _stderr_tail(errf)
            if rc != 0:
                raise DecodeError(f"{path}: ffmpeg failed (exit status {rc}): {errors or 'no message'}")
            if done == 0 and start == 0:
                raise DecodeError(f"{path}: no video frames could be decoded ({errors or 'stream is empty'})")
            if "partial file" in errors:
                raise DecodeError(f"{path}: truncated file, decoding stopped after {done} frames ({errors})")
            _note_errors(path, start, done, errors, warnings)
        finally:
            if proc.poll() is None:
                _kill_group(proc)
            proc.stdout.close()


def _kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL ffmpeg and everything in its session (start_new_session made it the group leader)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:  # exited in the meantime
        pass
    proc.wait()


def _note_errors(path: str, start: int, done: int, errors: str, warnings: list[str] | None) -> None:
    """Log ffmpeg's last error line of a decode that kept its frames, and append it to `warnings`."""
    if not errors:
        return
    message = f"ffmpeg reported errors decoding frames [{start}, {start + done}), kept: {errors}"
    log.warning("%s: %s", path, message)
    if warnings is not None:
        warnings.append(message)


def _read_frames(stream, out: np.ndarray, native: np.ndarray | None, timeout: float | None) -> tuple[int, bool]:
    """Fill `out` (t, H, W, 3) with up to t frames; returns (frames read, whether the stream ended
    inside a frame). With `native` (one decoded-size frame), frames are read into it one at a time
    and resized bilinearly (cv2 INTER_LINEAR, half-pixel centres) into `out`: memory stays one
    decoded frame plus the chunk. TimeoutError when no byte comes for `timeout` seconds."""
    if native is None:
        got = _read_into(stream, memoryview(out).cast("B"), timeout)
        return got // out[0].nbytes, got % out[0].nbytes != 0
    size = (out.shape[2], out.shape[1])  # cv2 takes (width, height)
    for i in range(len(out)):
        got = _read_into(stream, memoryview(native).cast("B"), timeout)
        if got < native.nbytes:
            return i, got > 0
        cv2.resize(native, size, dst=out[i], interpolation=cv2.INTER_LINEAR)  # in place: no copy per frame
    return len(out), False


def _read_into(stream, view: memoryview, timeout: float | None) -> int:
    """Fill `view` from an unbuffered pipe; fewer bytes only at end of stream. TimeoutError when
    the pipe stays silent for `timeout` seconds (None waits forever)."""
    got = 0
    while got < len(view):
        if timeout is not None and not select.select([stream], [], [], timeout)[0]:
            raise TimeoutError(f"no bytes for {timeout} s")
        n = stream.readinto(view[got:])
        if not n:
            break
        got += n
    return got


def _stderr_tail(errf) -> str:
    """The last non-empty line of ffmpeg's stderr, without its `[tag @ 0x..]` prefixes."""
    errf.flush()
    size = os.fstat(errf.fileno()).st_size
    errf.seek(max(0, size - _STDERR_TAIL_BYTES))
    lines = [ln.strip() for ln in errf.read().decode("utf-8", errors="replace").splitlines() if ln.strip()]
    if not lines:
        return ""
    partial = next((ln for ln in lines if "partial file" in ln), None)
    last = lines[-1]
    while last.startswith("[") and "] " in last:
        last = last.split("] ", 1)[1]
    return f"{last}; {partial}" if partial and partial != lines[-1] else last
