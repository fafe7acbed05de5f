"""A synthetic labelled action dataset for the train/evaluate tests, encoded by ffmpeg.

Each video pans over a random blocky, tinted texture so that the whole picture moves in one of four
directions (the class); texture, tint and speed vary per video. The class is visible only in the
motion, so a flow model learns it quickly while a single RGB frame says nothing about it. Mirroring swaps left and right, so train these with `--no-flip`.

Frames are drawn with numpy (exact, seeded) and piped to ffmpeg as raw RGB (argument list, no
shell), encoded as near-lossless H.264 at 25 fps.
"""

from __future__ import annotations

import csv
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING

import cv2
import numpy as np

from quovadis.pipeline.probe import ffmpeg_exe

if TYPE_CHECKING:
    from quovadis.jobs.report import JobReport
    from quovadis.jobs.train import TrainConfig

DIRECTIONS: dict[str, tuple[int, int]] = {"up": (0, -1), "down": (0, 1), "left": (-1, 0), "right": (1, 0)}
CLASSES = tuple(sorted(DIRECTIONS))


def motion_frames(direction: str, rng: np.random.Generator, *, size: int = 64, frames: int = 20,
                  speed: float = 1.5, texture: str = "blocks") -> np.ndarray:  # fmt: skip
    """uint8 (frames, size, size, 3): the view pans `speed` px/frame over a random textured scene,
    so the scene moves the other way on screen; `direction` is where the scene content moves.

    `texture="ramp"`: the texture is smooth and, under it, red rises and blue falls from left to
    right across the whole scene, so where the view is shows in every frame and its colour drifts
    one way or the other over time: order-sensitive RGB models from scratch (ConvNet+LSTM, C3D,
    I3D) learn the direction from a dozen videos, which they did not from the blocks."""
    dx, dy = DIRECTIONS[direction]
    travel = int(np.ceil(speed * (frames - 1))) + 2
    side = size + travel
    if texture == "ramp":
        smooth = rng.uniform(0, 255, (side // 4 + 2, side // 4 + 2, 3)).astype(np.float32)
        smooth = cv2.resize(smooth, None, fx=4, fy=4, interpolation=cv2.INTER_CUBIC)[:side, :side]
        ramp = np.linspace(0, 255, side, dtype=np.float32)
        ramp = ramp[None, :] if dx else ramp[:, None]  # along the motion
        smooth[..., 0] = 0.7 * ramp + 0.3 * smooth[..., 0]
        smooth[..., 2] = 0.7 * (255 - ramp) + 0.3 * smooth[..., 2]
        scene = np.clip(smooth, 0, 255)
    else:
        blocks = rng.integers(0, 2, (side // 4 + 1, side // 4 + 1, 1)) * rng.uniform(60, 255, (1, 1, 3))
        scene = cv2.resize(blocks.astype(np.float32), None, fx=4, fy=4, interpolation=cv2.INTER_NEAREST)[:side, :side]
        tint = cv2.resize(rng.uniform(0, 120, (4, 4, 3)).astype(np.float32), (side, side), interpolation=cv2.INTER_CUBIC)
        scene = np.clip(0.6 * scene + tint, 0, 255)
    out = np.empty((frames, size, size, 3), np.uint8)
    for t in range(frames):
        shift = speed * t  # content moves +shift along (dx, dy), so the window moves -shift
        x0 = (travel - 1) * (dx > 0) - dx * shift if dx else travel / 2  # window origin in the scene
        y0 = (travel - 1) * (dy > 0) - dy * shift if dy else travel / 2
        m = np.float32([[1, 0, -x0], [0, 1, -y0]])  # scene (x0, y0) -> frame (0, 0), sub-pixel
        out[t] = np.clip(cv2.warpAffine(scene, m, (size, size), flags=cv2.INTER_LINEAR), 0, 255).astype(np.uint8)
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


def make_motion_dataset(root: Path, *, train_per_class: int = 8, val_per_class: int = 6, seed: int = 0,
                        size: int = 64, frames: int = 20, classes: tuple[str, ...] = CLASSES,
                        texture: str = "blocks") -> Path:  # fmt: skip
    """Videos under root/videos and root/labels.csv (`video,label,split`, paths relative to root).

    Returns the labels.csv path.
    """
    rng = np.random.default_rng(seed)
    (root / "videos").mkdir(parents=True, exist_ok=True)
    rows = []
    for split, count in (("train", train_per_class), ("val", val_per_class)):
        for i in range(count):
            for label in classes:
                name = f"videos/{split}_{label}_{i:02d}.mp4"
                speed = rng.uniform(1.5, 2.5)
                encode(root / name, motion_frames(label, rng, size=size, frames=frames, speed=speed, texture=texture))
                rows.append((name, label, split))
    labels = root / "labels.csv"
    with open(labels, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(("video", "label", "split"))
        writer.writerows(rows)
    return labels


# -- shared, memoised test fixtures (used by tests/jobs/test_train.py and test_evaluate.py) -------

# Small enough for 2 CPU cores, big enough for I3D (T >= 9; 48 px -> 2x2 at Mixed_5c). Batches of 8:
# with 4, a batch of one direction has its motion normalised away by train-mode BatchNorm, and
# validation (population statistics) swung between 0.62 and 1.0 from epoch to epoch.
CLIP_LEN, CROP_SIZE = 16, 48
FAST_FLOW = dict(nscales=3, warps=1, inner_iterations=10, outer_iterations=2)  # flow quality is not under test here
TRAIN_SETTINGS = dict(
    stream="flow", epochs=8, batch_size=8, lr=1e-3, optimizer="adam", weight_decay=0.0, clip_len=CLIP_LEN,
    crop_size=CROP_SIZE, flip=False, precise_bn="on", loader_workers=0, deterministic=True, seed=0,
)
_MEMO: dict[str, object] = {}


def motion_shards(root: Path) -> tuple[Path, Path]:
    """(labels.csv, shard dir) of the motion dataset preprocessed with our pipeline (rgb + flow),
    made once per test session under `root`."""
    return _preprocessed_dataset(root, "motion")


def left_right_shards(root: Path) -> tuple[Path, Path]:
    """(labels.csv, shard dir) of a tiny two-class task (left vs right, 6 train and 4 val videos per
    class), made once per test session under `root`."""
    return _preprocessed_dataset(root, "left_right", train_per_class=6, val_per_class=4, seed=1,
                                 classes=("left", "right"))  # fmt: skip


def ramp_shards(root: Path) -> tuple[Path, Path]:
    """(labels.csv, shard dir) of left vs right over ramp scenes (`motion_frames(texture="ramp")`, 6
    train and 4 val videos per class), made once per test session under `root`."""
    return _preprocessed_dataset(root, "ramp", train_per_class=6, val_per_class=4, seed=2, classes=("left", "right"),
                                 texture="ramp")  # fmt: skip


def _preprocessed_dataset(root: Path, name: str, **dataset_kwargs) -> tuple[Path, Path]:
    """(labels.csv, shard dir) of make_motion_dataset(root / name, **dataset_kwargs) preprocessed
    (rgb + flow, native size), made once per test session."""
    key = f"shards:{name}"
    if key not in _MEMO:
        from quovadis.jobs.preprocess import PreprocessConfig, preprocess
        from quovadis.pipeline.decode import DecodeConfig
        from quovadis.pipeline.flow import FlowConfig

        labels = make_motion_dataset(root / name, **dataset_kwargs)
        videos = sorted(str(p) for p in (root / name / "videos").glob("*.mp4"))
        shards = root / f"{name}_shards"
        report = preprocess(videos, PreprocessConfig(
            out=str(shards), streams=("rgb", "flow"), decode=DecodeConfig(short_side=0), flow=FlowConfig(**FAST_FLOW),
        ))  # fmt: skip
        assert not report.failed and len(report.ok) == len(videos), report.summary()
        _MEMO[key] = (labels, shards)
    return _MEMO[key]  # type: ignore[return-value]


def train_side_by_side(configs: list[TrainConfig]) -> list[JobReport]:
    """Train runs (TrainConfigs, each holding one CPU with one torch thread) two at a time in this
    process's Ray, so that two runs share the test machine's 2 cores and Ray Train's start and end
    (~12 s a run here, 2026-12-02) overlap; returns their JobReports."""
    from quovadis.jobs.train import train

    assert all(cfg.cpus_per_worker == 1 for cfg in configs)
    with ThreadPoolExecutor(2) as pool:
        return list(pool.map(train, configs))


def trained_run(root: Path, name: str, **overrides) -> Path:
    """RUN_DIR of `quovadis train` on the motion dataset with TRAIN_SETTINGS + overrides, made once."""
    if name not in _MEMO:
        from quovadis.jobs.train import TrainConfig, train

        labels, shards = motion_shards(root)
        out = root / name
        train(TrainConfig(data=str(shards), labels=str(labels), out=str(out), **{**TRAIN_SETTINGS, **overrides}))
        _MEMO[name] = out
    return _MEMO[name]  # type: ignore[return-value]
