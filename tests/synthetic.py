"""A synthetic labelled action dataset for the train/evaluate tests, encoded by ffmpeg.

Each video shows a textured square moving in one of four directions (the class) over a random,
static, smooth background; texture, background, start position and speed vary per video. The
class is visible only in the motion, so a flow model learns it quickly while a single RGB frame
says nothing about it. Mirroring swaps left and right, so train these with `--no-flip`.

Frames are drawn with numpy (exact, seeded) and piped to ffmpeg as raw RGB (argument list, no
shell), encoded as near-lossless H.264 at 25 fps.
"""

from __future__ import annotations

import csv
import subprocess
from pathlib import Path

import cv2
import numpy as np

from pipeline.probe import ffmpeg_exe

DIRECTIONS: dict[str, tuple[int, int]] = {"up": (0, -1), "down": (0, 1), "left": (-1, 0), "right": (1, 0)}
CLASSES = tuple(sorted(DIRECTIONS))


def motion_frames(direction: str, rng: np.random.Generator, *, size: int = 64, frames: int = 24,
                  obj: int = 20, speed: float = 1.5) -> np.ndarray:  # fmt: skip
    """uint8 (frames, size, size, 3): a textured `obj` px square moving `speed` px/frame."""
    dx, dy = DIRECTIONS[direction]
    background = cv2.resize(rng.uniform(0, 255, (6, 6, 3)).astype(np.float32), (size, size),
                            interpolation=cv2.INTER_CUBIC)  # fmt: skip
    texture = rng.integers(0, 2, (5, 5, 1)) * rng.uniform(120, 255, (1, 1, 3))
    texture = cv2.resize(texture.astype(np.float32), (obj, obj), interpolation=cv2.INTER_NEAREST)
    travel = speed * (frames - 1)
    margin = 2
    lo, hi = margin, size - obj - margin - travel  # start range along the motion axis
    along = rng.uniform(lo, max(lo, hi))
    across = rng.uniform(margin, size - obj - margin)
    out = np.empty((frames, size, size, 3), np.uint8)
    for t in range(frames):
        pos = along + speed * t
        if dx + dy < 0:  # up / left: run the other way along the axis
            pos = size - obj - pos
        x, y = (pos, across) if dx else (across, pos)
        # sub-pixel placement: warp the texture, then paste with its mask
        m = np.float32([[1, 0, x], [0, 1, y]])
        layer = cv2.warpAffine(texture, m, (size, size), flags=cv2.INTER_LINEAR)
        mask = cv2.warpAffine(np.ones((obj, obj), np.float32), m, (size, size), flags=cv2.INTER_LINEAR)[..., None]
        out[t] = np.clip(background * (1 - mask) + layer, 0, 255).astype(np.uint8)
    return out


def encode(path: Path, frames: np.ndarray, fps: int = 25) -> Path:
    """Encode uint8 (T, H, W, 3) RGB frames to `path` with ffmpeg (near-lossless H.264)."""
    t, h, w, _ = frames.shape
    cmd = [
        ffmpeg_exe(), "-v", "error", "-y", "-f", "rawvideo", "-pix_fmt", "rgb24", "-s", f"{w}x{h}",
        "-r", str(fps), "-i", "-", "-c:v", "libx264", "-preset", "veryfast", "-crf", "4",
        "-pix_fmt", "yuv444p", str(path),
    ]  # fmt: skip
    subprocess.run(cmd, input=frames.tobytes(), check=True, capture_output=True)
    return path


def make_motion_dataset(root: Path, *, train_per_class: int = 4, val_per_class: int = 2, seed: int = 0,
                        size: int = 64, frames: int = 24) -> Path:  # fmt: skip
    """Videos under root/videos and root/labels.csv (`video,label,split`, paths relative to root).

    Returns the labels.csv path.
    """
    rng = np.random.default_rng(seed)
    (root / "videos").mkdir(parents=True, exist_ok=True)
    rows = []
    for split, count in (("train", train_per_class), ("val", val_per_class)):
        for i in range(count):
            for label in CLASSES:
                name = f"videos/{split}_{label}_{i:02d}.mp4"
                speed = rng.uniform(1.0, 2.0)
                encode(root / name, motion_frames(label, rng, size=size, frames=frames, speed=speed))
                rows.append((name, label, split))
    labels = root / "labels.csv"
    with open(labels, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(("video", "label", "split"))
        writer.writerows(rows)
    return labels
