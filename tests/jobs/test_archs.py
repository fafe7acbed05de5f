"""The paper's architectures (`quovadis train --arch`, section 2) trained on the same shards, and
`quovadis evaluate` comparing them (issue 13).

The task is left vs right (tests/synthetic.py `ramp_shards`): a textured scene whose colour drifts
from left to right pans one way or the other, so no single frame tells the class; only the order
of the frames (or the flow) does.
Every architecture trains from scratch at the smallest sizes that still learn it on 2 CPU cores
(32 px crops, a few frames, one torch thread: with two, other work on the cores made every
convolution ~20x slower, 2026-12-02). Expectations are computed here from the per-video logits and
the video names, not with the code under test.
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

import cv2
import h5py
import numpy as np
import pytest

from quovadis.jobs import evaluate as evaluate_job, options
from quovadis.jobs.evaluate import EvaluateConfig, evaluate
from quovadis.jobs.train import TrainConfig
from quovadis.pipeline.manifest import load as manifest_load
from quovadis.pipeline.shards import ShardConfig, ShardWriter
from tests.synthetic import ramp_shards, train_side_by_side

SETTINGS = dict(epochs=10, batch_size=4, lr=1e-3, optimizer="adam", weight_decay=0.0, crop_size=32, flip=False,
                loader_workers=0, deterministic=True, seed=0, cpus_per_worker=1)  # fmt: skip
# run name: TrainConfig overrides, the smallest sampling and fewest epochs each architecture
# learns the task from (validation top-1 in 10-epoch runs, 2026-12-02: 1.0 from epoch 2 for c3d
# and two-stream, from epoch 5 for fused-3d and i3d, from epoch 7 for lstm; all 1.0 as set here).
# On another CPU (AMD EPYC, 2026-12-02 evening) validation swung for the first epochs and two-stream
# at 5 epochs ended at 0.625, i3d at 6 at 0.625; both end at 1.0 with the full 10 (their 6-10 at
# 0.875-1.0), so they keep it
RUNS: dict[str, dict] = {
    "lstm": dict(arch="lstm", stream="rgb", clip_len=4, frame_step=3),
    "c3d": dict(arch="c3d", stream="rgb", clip_len=8, dropout=0.0, lr=1e-4, epochs=5),  # 1e-3: loss 14 after one epoch
    "two-stream": dict(arch="two-stream", stream="rgb+flow", clip_len=1),
    "fused-3d": dict(arch="fused-3d", stream="rgb+flow", clip_len=2, frame_step=5, lr=3e-4, epochs=6),
    "i3d": dict(arch="i3d", stream="rgb", clip_len=8),
    # from scratch it stayed at chance through 10 epochs at lr 1e-4..3e-3 (it is meant to start from
    # inflated ImageNet weights): trained here only to show it runs and is compared
    "i3d-r50": dict(arch="i3d-r50", stream="rgb", clip_len=8, epochs=1),
    "one-frame": dict(arch="i3d", stream="rgb", clip_len=1, epochs=2),  # order-blind: one frame, looped in time
}
LEARNERS = ("lstm", "c3d", "two-stream", "fused-3d", "i3d")  # the paper's five
RGB_RUNS = ("lstm", "c3d", "i3d", "i3d-r50", "one-frame")  # rows of RGB-only models
LEARNS = 0.75  # top-1 on 8 validation videos (6 of 8); chance is 0.5


@pytest.fixture(scope="session")
def work(tmp_path_factory, ray_session) -> Path:
    path = tmp_path_factory.getbasetemp() / "motion_work"  # shared with test_train.py: the same shards
    path.mkdir(exist_ok=True)
    return path


@pytest.fixture(scope="module")
def runs(work) -> dict[str, Path]:
    labels, shards = ramp_shards(work)
    out = {name: work / f"arch_{name}" for name in RUNS}
    train_side_by_side([TrainConfig(data=str(shards), labels=str(labels), out=str(out[name]), **{**SETTINGS, **overrides})
                        for name, overrides in RUNS.items()])  # fmt: skip
    return out


def label_of(video: str) -> str:
    """The class in a video's file name (videos/val_left_00.mp4, /reversed/val_left_00_rev.mp4)."""
    return Path(video).name.split("_")[1]


def accuracy(logits: dict[str, list[float]], classes: list[str], truth) -> float:
    """Top-1 from per-video logits, written out with numpy."""
    videos = sorted(logits)
    predicted = np.argmax(np.array([logits[v] for v in videos]), axis=1)
    return float(np.mean([classes[p] == truth(v) for v, p in zip(videos, predicted)]))


def reversed_shards(work: Path, tmp_path: Path) -> tuple[Path, Path]:
    """(labels.csv, shard dir) of the left/right validation videos (RGB) and their time-reversed
    copies, labelled the other way: a pan to the right played backwards is a pan to the left, and
    the pair holds the same frames, in the other order."""
    labels, shards = ramp_shards(work)
    other = {"left": "right", "right": "left"}
    out, rows = tmp_path / "reversed_shards", []
    with ShardWriter(out, ShardConfig(), {}) as writer:
        for e in manifest_load(shards).values():
            if not Path(e.input).name.startswith("val_"):
                continue
            with h5py.File(shards / e.file, "r") as f:
                rgb = f[e.key]["rgb"][:]  # uint8 (T, H, W, 3)
            for suffix, frames, label in (("fwd", rgb, label_of(e.input)), ("rev", rgb[::-1], other[label_of(e.input)])):
                path = f"/reversed/{Path(e.input).stem}_{suffix}.mp4"
                key = writer.begin_video(path, height=rgb.shape[1], width=rgb.shape[2], expected_frames=len(rgb),
                                         streams=("rgb",), attrs={})  # fmt: skip
                writer.write_rgb(key, 0, np.ascontiguousarray(frames))
                writer.end_video(key, len(frames))
                rows.append((path, label, "val"))
    csv_path = tmp_path / "reversed.csv"
    with open(csv_path, "w", newline="") as f:
        csv.writer(f).writerows([("video", "label", "split"), *rows])
    return csv_path, out


@pytest.mark.slow
def test_every_architecture_learns_left_vs_right_and_evaluate_compares_them(runs, work, tmp_path):
    labels, shards = ramp_shards(work)
    acc_json = tmp_path / "acc.json"
    parser = argparse.ArgumentParser()
    options.evaluate(parser)
    report = evaluate_job.run(parser.parse_args([*map(str, runs.values()), "--data", str(shards), "--labels",
                                                 str(labels), "--json", str(acc_json)]))  # fmt: skip
    scores = json.loads(acc_json.read_text())
    assert list(scores) == list(report.extra["scores"]) and len(scores) == len(RUNS)
    img = cv2.imread(str(acc_json.with_suffix(".png")))  # the bar chart, beside the JSON
    assert img is not None and img.shape[1] >= 90 * len(RUNS)
    assert ((img[..., 0] > 150) & (img[..., 2] < 100)).sum() > 500  # top-1 bars (BGR 200, 90, 30)

    result = evaluate(EvaluateConfig(data=str(shards), labels=str(labels), runs=tuple(str(p) for p in runs.values())))
    names = {name: result["rows"][i] for i, name in enumerate(RUNS)}
    assert names["i3d"] == "rgb" and names["one-frame"] == "rgb:arch_one-frame" and names["lstm"] == "lstm"
    assert "fused" not in result  # no i3d flow run
    # each architecture's test sampling, cut to the 20-frame videos: the LSTM's 50 frames 3 apart
    # to 7, 3D-Fused's 25 frames 5 apart (10 fields each) to 3; Two-Stream's 25 snapshots to the
    # 11 distinct starts 0..10 that keep its 10 fields inside the video
    assert result["lstm"]["test"] == "whole: 7 frames 3 apart, 8 clips"
    assert result["fused-3d"]["test"] == "whole: 3 frames 5 apart, 8 clips"
    assert result["two-stream"]["test"] == "snapshots: 1 frames 1 apart, 88 clips"
    assert result["c3d"]["test"] == "grid: 8 frames 1 apart, 24 clips"  # starts 0, 8, 16 (looped)
    for name, row in names.items():
        measured = accuracy(result["logits"][row], result["classes"], label_of)
        assert result[row]["top1"] == pytest.approx(measured) and result[row]["videos"] == 8
        assert result[row]["arch"] == RUNS[name]["arch"]
        assert scores[row]["top1"] == result[row]["top1"]
        if name in LEARNERS:
            assert measured >= LEARNS, (name, result[row])
    print("\nleft vs right:", json.dumps({n: round(result[r]["top1"], 3) for n, r in names.items()}))  # README table


@pytest.mark.slow
def test_only_order_aware_models_tell_a_video_from_its_reversal(runs, work, tmp_path):
    """On videos and their reversals, labelled the other way, a model that sees no frame order
    gets exactly half right (each pair holds the same frames, so both get the same score); the
    ConvNet+LSTM, C3D and I3D, which learnt the direction, keep getting them right."""
    labels, shards = reversed_shards(work, tmp_path)
    result = evaluate(EvaluateConfig(data=str(shards), labels=str(labels), runs=tuple(str(runs[n]) for n in RGB_RUNS)))
    with open(labels, newline="") as f:
        truth = {row["video"]: row["label"] for row in csv.DictReader(f)}
    chance = max(list(truth.values()).count(c) for c in set(truth.values())) / len(truth)  # 0.5: 8 of each
    measured = {}
    for name, row in zip(RGB_RUNS, result["rows"]):
        measured[name] = accuracy(result["logits"][row], result["classes"], truth.get)
        assert result[row]["videos"] == 16 and result[row]["top1"] == pytest.approx(measured[name])
    print("\nvideo vs its reversal:", json.dumps({n: round(a, 3) for n, a in measured.items()}))  # README table
    assert chance == 0.5 and measured["one-frame"] == pytest.approx(chance, abs=1 / 16)
    for name in ("lstm", "c3d", "i3d"):
        assert measured[name] >= LEARNS, (name, measured)
