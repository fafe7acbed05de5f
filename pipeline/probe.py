"""Probing a video file with ffmpeg alone (no ffprobe needed).

`probe(path)` runs `ffmpeg -hide_banner -i FILE` and parses the stream dump ffmpeg writes to
stderr: container duration and start, and for the first video stream that is not cover art its
codec, coded size, sample aspect ratio, frame rate, start time and display-matrix rotation. The
same run decodes that stream's first frame through `showinfo` for its pts: the first *decoded*
frame can come after the stream start (an AVI with B-frames starts at 0.04 s), and decode anchors
its 25 fps grid there, as the Kinetics preprocessing does (see decode.first_tick). One
code path for every machine: imageio-ffmpeg ships `ffmpeg` but no `ffprobe`, so we never need it.
The dump format was checked against ffmpeg 9.0.2 (imageio-ffmpeg 0.6 binary); it has been stable
since ffmpeg 4 ("Display Matrix: rotation of ..." since 5.0).

`ffmpeg_exe()` picks `ffmpeg` from PATH when there is one, else the imageio-ffmpeg binary.
`ffmpeg_input(path)` is the form every input path is given to ffmpeg in (`file:` prefixed).
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import stat
import subprocess
from dataclasses import asdict, dataclass
from fractions import Fraction
from pathlib import Path

from quovadis.pipeline.errors import DecodeError

log = logging.getLogger(__name__)

PROBE_TIMEOUT_S = 120.0  # ffmpeg -i reads only the header and a few packets; a hang is a bad file
_HEADER_BYTES = 16  # read this much ourselves first, so OS errors get a plain message

# "Video" streams that are really something else: text rendered as video by the tty demuxer,
# still images, subtitles-as-bitmaps. A file whose only video stream is one of these is no video.
_NOT_VIDEO_CODECS = frozenset({"ansi", "bintext", "xbin", "idf", "tty"})
# NTSC-style rates that ffmpeg prints rounded to two decimals ("23.98 fps", "29.97 fps").
_NTSC_RATES = tuple(Fraction(n * 1000, 1001) for n in (24, 30, 48, 60, 120))


def ffmpeg_exe() -> str:
    """The ffmpeg binary: `ffmpeg` on PATH when present (the user's choice), else the one pip
    installed with imageio-ffmpeg (a fresh machine has no system ffmpeg)."""
    found = shutil.which("ffmpeg")
    if found:
        return found
    import imageio_ffmpeg

    return imageio_ffmpeg.get_ffmpeg_exe()


def ffmpeg_input(path: str | Path) -> str:
    """`path` as ffmpeg reads an input: with `file:` in front, so that a file named `pipe:x`,
    `concat:a|b` or `http:...` (given relative) is that file, never an ffmpeg protocol."""
    return f"file:{path}"


@dataclass(frozen=True)
class VideoInfo:
    """What decode needs to know about a source video, and what the job records about it.

    Sizes are the coded size; `display_size()` applies the sample aspect ratio and rotation.
    `rotation` is in degrees clockwise that the coded picture is turned for display (the legacy
    `rotate` tag convention; ffmpeg prints the display matrix counter-clockwise, so its "rotation
    of -90.00 degrees" is our 90). Times are in seconds on the source clock; `start_time` is the
    first pts of the video stream; `first_frame_time` that of its first decoded frame (None when
    probing could not decode one), where decode's frame 0 is.
    """

    path: str
    size_bytes: int
    codec: str
    width: int
    height: int
    sar: float
    rotation: int
    fps: float | None
    duration: float | None
    start_time: float
    has_audio: bool
    stream_index: int = 0  # index of the chosen video stream in the file (ffmpeg `-map 0:N`)
    container: str = ""  # ffmpeg's demuxer name, e.g. "mov,mp4,m4a,3gp,3g2,mj2", "matroska,webm", "hevc"
    first_frame_time: float | None = None  # pts of the first decoded frame, seconds on the source clock

    def display_size(self) -> tuple[int, int]:
        """(width, height) as displayed: width stretched by the SAR, then swapped when rotated by
        90 or 270 degrees (what ffmpeg's autorotate emits)."""
        w = max(1, int(self.width * self.sar + 0.5))
        h = self.height
        return (h, w) if self.rotation % 180 == 90 else (w, h)

    def to_dict(self) -> dict:
        """JSON-able record for shard attributes and the manifest."""
        return asdict(self)


def probe(path: str | Path) -> VideoInfo:
    """Read a video's metadata with `ffmpeg -i`.

    Raises DecodeError("<path>: <cause>") for a missing path, a directory, a file that cannot be
    opened (permissions), an empty file, and anything ffmpeg cannot open or that has no video
    stream with a frame size (text, random bytes, audio-only, truncated containers).
    """
    path = str(path)
    size = _check_readable(path)
    # -copyts: showinfo prints the source pts; 0:V:0 is the first video stream that is not cover art
    cmd = [ffmpeg_exe(), "-nostdin", "-hide_banner", "-copyts", "-i", ffmpeg_input(path),
           "-map", "0:V:0?", "-frames:v", "1", "-vf", "showinfo", "-f", "null", "-"]
    try:
        done = subprocess.run(cmd, capture_output=True, timeout=PROBE_TIMEOUT_S, check=False)
    except subprocess.TimeoutExpired as e:
        raise DecodeError(f"{path}: ffmpeg did not finish probing within {PROBE_TIMEOUT_S:.0f} s") from e
    except OSError as e:
        raise DecodeError(f"{path}: cannot run ffmpeg ({cmd[0]}): {e.strerror or e}") from e
    text = done.stderr.decode("utf-8", errors="replace")
    return parse_probe_output(text, path=path, size_bytes=size)


def _check_readable(path: str) -> int:
    """Byte size of `path`, or DecodeError saying why it cannot be read as a file."""
    if not os.path.lexists(path):
        raise DecodeError(f"{path}: no such file")
    if os.path.isdir(path):
        raise DecodeError(f"{path}: is a directory, not a video file")
    try:
        mode = os.stat(path).st_mode
    except OSError as e:  # e.g. a dangling symlink
        raise DecodeError(f"{path}: cannot open for reading: {e.strerror or e}") from e
    if not stat.S_ISREG(mode):  # opening a FIFO for reading blocks until a writer comes
        raise DecodeError(f"{path}: not a regular file (a FIFO, socket or device); give a video file")
    try:
        with open(path, "rb") as f:
            f.read(_HEADER_BYTES)
            size = os.fstat(f.fileno()).st_size
    except PermissionError as e:
        raise DecodeError(f"{path}: permission denied (cannot open for reading)") from e
    except OSError as e:
        raise DecodeError(f"{path}: cannot open for reading: {e.strerror or e}") from e
    if size == 0:
        raise DecodeError(f"{path}: empty file (0 bytes)")
    return size


_DURATION_RE = re.compile(r"^\s*Duration: (?P<dur>N/A|\d+:\d+:\d+(?:\.\d+)?)(?:, start: (?P<start>-?\d+(?:\.\d+)?))?")
_STREAM_RE = re.compile(r"^\s*Stream #\d+:(?P<index>\d+)\S*: (?P<kind>\w+): (?P<rest>.*)$")
_SIZE_RE = re.compile(r"^(\d+)x(\d+)(?:\s|$)")
_SAR_RE = re.compile(r"\bSAR (\d+):(\d+)")
_RATE_RE = re.compile(r"^(\d+(?:\.\d+)?)(k?) (fps|tbr)$")
_START_RE = re.compile(r"\bstart (-?\d+(?:\.\d+)?)")
_ROTATION_RE = re.compile(r"Display Matrix: rotation of (-?\d+(?:\.\d+)?) degrees")
_SHOWINFO_TB_RE = re.compile(r"\[Parsed_showinfo_\d+ @ [^\]]*\] config in time_base: (\d+)/(\d+)")
_SHOWINFO_FRAME_RE = re.compile(r"\[Parsed_showinfo_\d+ @ [^\]]*\] n: *0 pts: *(-?\d+) ")


def parse_probe_output(text: str, *, path: str, size_bytes: int) -> VideoInfo:
    """Parse the stderr of `ffmpeg -i FILE` into a VideoInfo (DecodeError when there is no video)."""
    all_lines = text.splitlines()
    # the input's dump ends where the output's begins; its "Stream #0:0: Video: wrapped_avframe" is not ours
    end = next((i for i, line in enumerate(all_lines) if line.startswith(("Stream mapping:", "Output #"))), None)
    lines = all_lines[:end]
    if not any(line.startswith("Input #") for line in lines):
        raise DecodeError(f"{path}: ffmpeg cannot open it: {_ffmpeg_cause(lines)}")

    container = next((m[1] for line in lines if (m := re.match(r"Input #0, (.+), from '", line))), "")
    duration: float | None = None
    container_start = 0.0
    for line in lines:
        m = _DURATION_RE.match(line)
        if m:
            duration = None if m["dur"] == "N/A" else _hms_to_seconds(m["dur"])
            container_start = float(m["start"]) if m["start"] else 0.0
            break

    has_audio = False
    video: tuple[int, str, list[str]] | None = None  # (stream index, stream line, its side-data lines)
    first_plain_video: int | None = None  # the stream `-map 0:V:0` decodes: first video not cover art
    skipped: list[str] = []
    current: list[str] | None = None
    for line in lines:
        m = _STREAM_RE.match(line)
        if m:
            current = None
            has_audio |= m["kind"] == "Audio"
            if m["kind"] == "Video":
                codec = m["rest"].split(",")[0].split()[0]
                if first_plain_video is None and "(attached pic)" not in m["rest"]:
                    first_plain_video = int(m["index"])
                if "(attached pic)" in m["rest"] or codec in _NOT_VIDEO_CODECS:
                    skipped.append(codec)
                elif video is None:
                    current = []
                    video = (int(m["index"]), m["rest"], current)
        elif current is not None and line.startswith("    "):
            current.append(line)
        else:
            current = None

    if video is None:
        text = [c for c in skipped if c in _NOT_VIDEO_CODECS]
        if text:
            raise DecodeError(f"{path}: not a video (ffmpeg reads it as text for the {text[0]} decoder)")
        kind = "audio-only file" if has_audio else "no video stream"
        raise DecodeError(f"{path}: {kind}{' (only cover art)' if skipped else ''}")

    index, rest, side = video
    fields = _split_top_level(rest)
    codec = fields[0].split()[0]
    size = next((m for f in fields if (m := _SIZE_RE.match(f))), None)
    if size is None:
        raise DecodeError(f"{path}: video stream #{index} ({codec}) has no frame size; no decodable frames")
    width, height = int(size[1]), int(size[2])
    if width <= 0 or height <= 0:
        raise DecodeError(f"{path}: video stream #{index} has frame size {width}x{height}")

    sar = 1.0
    m = _SAR_RE.search(rest)
    if m and int(m[1]) > 0 and int(m[2]) > 0:
        sar = int(m[1]) / int(m[2])

    rates = {}
    for f in fields:
        m = _RATE_RE.match(f.strip())
        if m:
            rates[m[3]] = float(m[1]) * (1000 if m[2] else 1)
    fps = _exact_rate(rates.get("fps") or rates.get("tbr"))

    stream_start = container_start
    m = _START_RE.search(rest)
    if m:
        stream_start = float(m[1])

    rotation = 0
    for line in side:
        m = _ROTATION_RE.search(line)
        if m:
            rotation = int(round(-float(m[1]) / 90.0)) * 90 % 360
            break

    first_frame_time = _first_frame_time(all_lines) if index == first_plain_video else None

    return VideoInfo(
        path=path,
        size_bytes=size_bytes,
        codec=codec,
        width=width,
        height=height,
        sar=sar,
        rotation=rotation,
        fps=fps,
        duration=duration,
        start_time=stream_start,
        has_audio=has_audio,
        stream_index=index,
        container=container,
        first_frame_time=first_frame_time,
    )


def _first_frame_time(lines: list[str]) -> float | None:
    """pts in seconds of the first frame showinfo saw (its integer pts over the filter's time base)."""
    tb = next((m for line in lines if (m := _SHOWINFO_TB_RE.search(line))), None)
    frame = next((m for line in lines if (m := _SHOWINFO_FRAME_RE.search(line))), None)
    if tb is None or frame is None or int(tb[2]) == 0:
        return None
    return float(Fraction(int(frame[1]) * int(tb[1]), int(tb[2])))


def _ffmpeg_cause(lines: list[str]) -> str:
    """Why `ffmpeg -i` failed, in one line: the demuxer's own reason ("moov atom not found") and
    ffmpeg's summary ("Invalid data found when processing input"), without `[tag @ 0x..]` prefixes."""
    useful = [re.sub(r"^\[[^\]]*\]\s*", "", line).strip() for line in lines]
    useful = [u for u in useful if u and not u.startswith(("Error opening input file", "At least one output", "Format "))]
    summary = next((u.split(": ", 1)[1] for u in useful if u.startswith("Error opening input")), "")
    specific = next((u for u in useful if not u.startswith("Error opening input")), "")
    if specific and summary and summary not in specific:
        return f"{specific} ({summary})"
    return specific or summary or (useful[-1] if useful else "no output from ffmpeg")


def _split_top_level(s: str) -> list[str]:
    """Split ffmpeg's stream description on commas outside (), [] so "yuv420p(tv, bt709)" stays whole."""
    parts, depth, cur = [], 0, []
    for ch in s:
        if ch in "([":
            depth += 1
        elif ch in ")]":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append("".join(cur).strip())
            cur = []
        else:
            cur.append(ch)
    parts.append("".join(cur).strip())
    return parts


def _hms_to_seconds(hms: str) -> float:
    h, m, s = hms.split(":")
    return int(h) * 3600 + int(m) * 60 + float(s)


def _exact_rate(rate: float | None) -> float | None:
    """ffmpeg prints 24000/1001 as "23.98": give back the exact NTSC rate when it is one."""
    if rate is None or rate <= 0:
        return None
    for ntsc in _NTSC_RATES:
        if abs(rate - float(ntsc)) < 0.006:
            return float(ntsc)
    return rate
