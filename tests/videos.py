"""Test videos made with ffmpeg (argument lists, no shell), for every test that needs real video.

`make_video` draws a white MARKER x MARKER square on a dark grid. Its left edge is at
`marker_left(t)` = MARGIN + speed * t px (coded pixels), so it crosses the frame from left to right
over the duration, and its top edge at MARGIN: a video's content is a known function of its clock.
`marker_box`/`marker_x` measure it in decoded frames. Bad-input makers sit at the end.

Typical use in a test:  path = make_video(tmp_path / "v.mp4", fps=29.97, duration=2.0)
"""

from __future__ import annotations

import random
import subprocess
from fractions import Fraction
from pathlib import Path

import numpy as np

from quovadis.pipeline.probe import ffmpeg_exe

MARKER = 16  # marker side in coded pixels
MARGIN = 4  # marker's distance from the left edge at t=0 and from the top edge, in px
BACKGROUND = "0x202020"  # dark, with a lighter grid for texture; the marker is the only bright thing
GRID = "0x505050"
BRIGHT = 200  # a pixel is marker when all its channels exceed this

_CODEC_ARGS = {
    "libx264": ["-c:v", "libx264", "-preset", "veryfast", "-crf", "18", "-pix_fmt", "yuv420p"],
    "libx265": ["-c:v", "libx265", "-preset", "ultrafast", "-crf", "20", "-pix_fmt", "yuv420p", "-x265-params", "log-level=error"],
    "mpeg4": ["-c:v", "mpeg4", "-q:v", "3", "-pix_fmt", "yuv420p"],
    "libvpx": ["-c:v", "libvpx", "-b:v", "1M", "-pix_fmt", "yuv420p"],
    "libvpx-vp9": ["-c:v", "libvpx-vp9", "-b:v", "1M", "-pix_fmt", "yuv420p", "-deadline", "realtime"],
    "mjpeg": ["-c:v", "mjpeg", "-q:v", "3", "-pix_fmt", "yuvj420p"],
}


def marker_speed(size: tuple[int, int], duration: float) -> float:
    """Marker speed in coded px/s: it travels from MARGIN to the right margin over `duration`."""
    return (size[0] - MARKER - 2 * MARGIN) / duration


def marker_left(t: float, *, size: tuple[int, int], duration: float) -> float:
    """Coded x of the marker's left edge at source time t (ffmpeg truncates it to a whole pixel)."""
    return MARGIN + marker_speed(size, duration) * t


def make_video(
    path: str | Path,
    *,
    fps: float | str = 30,
    duration: float = 2.0,
    size: tuple[int, int] = (160, 120),
    codec: str = "libx264",
    vfr: bool = False,
    audio: bool = False,
    rotation: int = 0,
    sar: str | None = None,
    gop: int | None = None,
    lossless: bool = False,
    extra: list[str] | None = None,
) -> Path:
    """Write a moving-marker video and return its path.

    fps: source rate (29.97 becomes 30000/1001). vfr: frames of the first half at `fps`, then only
    every third frame, written with variable timestamps (the marker keeps its clock). rotation:
    degrees clockwise stored as display-matrix side data (mp4/mov/mkv), frames stay as coded.
    sar: sample aspect ratio such as "2/1" (coded size unchanged, displayed wider). gop: keyframe
    interval in frames. lossless: x264 qp 0 (exact colours). extra: more output arguments.
    """
    path = Path(path)
    w, h = size
    rate = _rate(fps)
    speed = marker_speed(size, duration)
    graph = (
        f"color=c={BACKGROUND}:s={w}x{h}:r={rate}:d={duration},"
        f"drawgrid=w=12:h=12:t=1:c={GRID}[bg];"
        f"color=c=white:s={MARKER}x{MARKER}:r={rate}[m];"
        f"[bg][m]overlay=x='{MARGIN}+{speed!r}*t':y={MARGIN}:format=rgb:shortest=1"
    )
    if vfr:
        graph += f",select='lt(t\\,{duration / 2!r})+not(mod(n\\,3))'"
    if sar:
        graph += f",setsar={sar}"
    graph += "[v]"
    args = [ffmpeg_exe(), "-nostdin", "-hide_banner", "-loglevel", "error", "-y", "-filter_complex", graph]
    if audio:
        args += ["-f", "lavfi", "-i", f"sine=f=440:d={duration}", "-map", "[v]", "-map", "0:a", "-c:a", "aac"]
    else:
        args += ["-map", "[v]"]
    codec_args = list(_CODEC_ARGS.get(codec, ["-c:v", codec]))
    if lossless:
        codec_args = ["-c:v", "libx264", "-preset", "veryfast", "-qp", "0", "-pix_fmt", "yuv444p"]
    args += codec_args
    if gop:
        args += ["-g", str(gop), "-keyint_min", str(gop)]
        if codec == "libx264" and not lossless:
            args += ["-sc_threshold", "0"]
    args += ["-fps_mode", "vfr" if vfr else "cfr", *(extra or [])]
    if not rotation:
        _run([*args, str(path)])
        return path
    plain = path.with_name(path.stem + ".norot" + path.suffix)
    _run([*args, str(plain)])
    # -display_rotation is counter-clockwise; ours is clockwise like the legacy `rotate` tag
    _run([ffmpeg_exe(), "-nostdin", "-hide_banner", "-loglevel", "error", "-y",
          "-display_rotation", str(-rotation), "-i", str(plain), "-c", "copy", str(path)])
    plain.unlink()
    return path


def source_times(*, fps: float | str = 30, duration: float = 2.0, vfr: bool = False) -> list[Fraction]:
    """Exact presentation times (s) of the frames `make_video` writes with these arguments."""
    rate = Fraction(_rate(fps))
    n = int(duration * rate + Fraction(1, 2))  # the color source stops at `duration`
    times = [i / rate for i in range(n) if i / rate < Fraction(duration)]
    if vfr:
        times = [t for i, t in enumerate(times) if t < Fraction(duration) / 2 or i % 3 == 0]
    return times


def marker_box(frame: np.ndarray) -> tuple[int, int, int, int] | None:
    """(left, top, right, bottom) pixel bounds (inclusive) of the bright marker in an (H, W, 3)
    uint8 frame, None when there is none."""
    mask = (frame > BRIGHT).all(axis=-1)
    ys, xs = np.nonzero(mask)
    if xs.size == 0:
        return None
    return int(xs.min()), int(ys.min()), int(xs.max()), int(ys.max())


def marker_x(frame: np.ndarray) -> float | None:
    """x of the marker's centroid in an (H, W, 3) uint8 frame, in that frame's pixels."""
    mask = (frame > BRIGHT).all(axis=-1)
    xs = np.nonzero(mask)[1]
    return float(xs.mean()) if xs.size else None


def make_audio_only(path: str | Path, *, duration: float = 1.0) -> Path:
    """An AAC-only file (no video stream), e.g. named .mp4 or .m4a."""
    path = Path(path)
    _run([ffmpeg_exe(), "-nostdin", "-hide_banner", "-loglevel", "error", "-y",
          "-f", "lavfi", "-i", f"sine=f=440:d={duration}", "-c:a", "aac", str(path)])
    return path


def make_zero_frame_video(path: str | Path) -> Path:
    """An mp4 whose video stream exists (codec, size) but holds no frames: 1 s of video and 3 s of
    audio, stream-copied from t=2 s on."""
    path = Path(path)
    src = path.with_name(path.stem + ".src.mp4")
    make_video(src, fps=25, duration=1.0, size=(64, 64))
    with_audio = path.with_name(path.stem + ".av.mp4")
    _run([ffmpeg_exe(), "-nostdin", "-hide_banner", "-loglevel", "error", "-y", "-i", str(src),
          "-f", "lavfi", "-i", "sine=d=3", "-map", "0:v", "-map", "1:a", "-c:v", "copy", "-c:a", "aac",
          str(with_audio)])
    _run([ffmpeg_exe(), "-nostdin", "-hide_banner", "-loglevel", "error", "-y", "-ss", "2",
          "-i", str(with_audio), "-c", "copy", str(path)])
    src.unlink()
    with_audio.unlink()
    return path


def make_truncated(src: str | Path, path: str | Path, fraction: float = 0.5) -> Path:
    """The first `fraction` of the bytes of `src`, as a cut-off download would leave it."""
    data = Path(src).read_bytes()
    Path(path).write_bytes(data[: int(len(data) * fraction)])
    return Path(path)


def make_damaged(src: str | Path, path: str | Path, at: tuple[float, ...] = (0.4, 0.6)) -> Path:
    """`src` with 64 bytes overwritten at each fraction `at` of its size: ffmpeg reports decode
    errors there (mpeg4 in AVI: "ac-tex damaged", "Error at MB") but still gives every frame."""
    data = bytearray(Path(src).read_bytes())
    for fraction in at:
        i = int(len(data) * fraction)
        data[i : i + 64] = bytes(range(64))
    Path(path).write_bytes(data)
    return Path(path)


def make_random_bytes(path: str | Path, n: int = 50_000, seed: int = 0) -> Path:
    """`n` random bytes (seeded), e.g. named .mp4."""
    Path(path).write_bytes(random.Random(seed).randbytes(n))
    return Path(path)


def _rate(fps: float | str) -> str:
    if isinstance(fps, str):
        return fps
    r = Fraction(fps).limit_denominator(1001)
    return f"{r.numerator}/{r.denominator}"


def _run(args: list[str]) -> None:
    done = subprocess.run(args, capture_output=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"ffmpeg failed making a test video: {args}\n{done.stderr.decode(errors='replace')}")
