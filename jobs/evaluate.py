"""`quovadis evaluate`: top-1/top-5 of trained runs of any architecture side by side, and the fusion
of an I3D RGB and an I3D flow run.

Runs are given as RUN_DIRs or model.pt files (`quovadis evaluate RUN...`), or as `--rgb/--flow`
I3D checkpoints. Checkpoints carry their training config (architecture, stream, clip length, frame
step, crop size, class names), so no flag is repeated here. Each video is scored by the mean of
its test clips' logits (centre crop), in its architecture's test protocol (the paper's section 2,
`TEST_PROTOCOL`):

    i3d, i3d-r50, c3d  every clip of the training length on a grid (`clip_starts(T, span, stride)`)
    lstm, fused-3d     one clip of ARCHS' test_rgb frames (50; 25 with 250 flow fields) from frame 0
    two-stream         25 snapshots (1 RGB frame + 10 flow fields) spread evenly over the video

A test clip longer than the shortest evaluated video is cut to the frames that fit it (logged),
and a video with fewer distinct snapshot starts than 25 gets fewer snapshots. The fused row is the
sum of the I3D rgb and flow rows' video logits (the released joint model).

Output: one table (logged at INFO) and, with --json, `{ROW: {"arch", "stream", "top1", "top5",
"videos", "checkpoint", "test"}, "fused": {..., "of": [rgb row, flow row]}}` (fractions in [0, 1];
I3D rows are named by their stream, `rgb` / `flow`, others by their architecture), drawn as a bar
chart PNG (`--plot`, default the JSON path with .png).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch

from quovadis.jobs.labels import LabelledVideo, load_labels
from quovadis.jobs.report import JobReport
from quovadis.models.archs import ARCHS, load_model, model_inputs
from quovadis.models.fast import autocast
from quovadis.pipeline.dataset import ShardDataset
from quovadis.pipeline.durable import write_atomic
from quovadis.pipeline.errors import ConfigError, QuovadisError, WeightsError
from quovadis.pipeline.manifest import load as manifest_load

log = logging.getLogger(__name__)

TEST_PROTOCOL = {"i3d": "grid", "i3d-r50": "grid", "c3d": "grid", "lstm": "whole", "fused-3d": "whole",
                 "two-stream": "snapshots"}  # fmt: skip
MODEL_NAME = "model.pt"  # jobs.train.MODEL_NAME: what a RUN_DIR holds

def topk_accuracy(logits: np.ndarray, labels: np.ndarray, k: int) -> float:
    """Fraction of rows whose label is among the k largest logits (k capped at the class count)."""
    if len(labels) == 0:
        return float("nan")
    k = min(k, logits.shape[1])
    top = np.argsort(-logits, axis=1, kind="stable")[:, :k]
    return float((top == labels[:, None]).any(axis=1).mean())


def eval_dataset(shard_dir: str | os.PathLike, videos: Sequence[LabelledVideo], config: dict[str, Any]) -> ShardDataset:
    """The test clips (centre crop, no flip) of `videos` for a model trained with `config` (a
    checkpoint's training config), in its architecture's TEST_PROTOCOL (module docstring)."""
    arch = config.get("arch", "i3d")
    spec, step = ARCHS[arch], int(config.get("frame_step", 1))
    common = dict(streams=tuple(config["stream"].split("+")), crop="center", crop_size=int(config["crop_size"]),
                  flip=False, videos=[v.input for v in videos], frame_step=step, flow_per_frame=spec.flow_per_frame)  # fmt: skip
    protocol = TEST_PROTOCOL[arch]
    if protocol == "grid":
        return ShardDataset(shard_dir, clip_len=int(config["clip_len"]), stride=config.get("eval_stride"),
                            temporal="grid", **common)  # fmt: skip
    if protocol == "snapshots":
        return ShardDataset(shard_dir, clip_len=int(config["clip_len"]), temporal="spread", clips=spec.test_rgb, **common)
    entries = manifest_load(Path(shard_dir))
    shortest = min(entries[v.input].frames for v in videos)
    fit = max((shortest - spec.flow_per_frame) // step + 1, 1)  # RGB frames whose span fits that video
    frames = min(spec.test_rgb, fit)
    if frames < spec.test_rgb:
        log.info("%s: test clips of %d RGB frames %d apart instead of %d: the shortest video has %d frames",
                 arch, frames, step, spec.test_rgb, shortest)  # fmt: skip
    return ShardDataset(shard_dir, clip_len=frames, temporal="spread", clips=1, **common)


@torch.inference_mode()
def video_logits(model: torch.nn.Module, dataset: ShardDataset, *, arch: str = "i3d", streams: Sequence[str],
                 batch_size: int = 8, device: torch.device | str = "cpu",
                 precision: str = "fp32") -> dict[str, np.ndarray]:  # fmt: skip
    """{video input path: float32 (classes,) mean of its clips' logits}, model in eval mode."""
    device = torch.device(device)
    was_training = model.training
    model.eval()
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=0)
    sums: dict[str, np.ndarray] = {}
    counts: dict[str, int] = {}
    try:
        for batch in loader:
            x = {s: batch[s].to(device, non_blocking=True) for s in streams}  # (N, C, T, h, w) each
            with autocast(device, precision):
                logits = model(*model_inputs(arch, x, streams))  # (N, classes)
            for video, row in zip(batch["video"], logits.float().cpu().numpy()):
                sums[video] = sums.get(video, 0.0) + row
                counts[video] = counts.get(video, 0) + 1
    finally:
        model.train(was_training)
    return {v: (sums[v] / counts[v]).astype(np.float32) for v in sums}


@dataclass(frozen=True)
class EvaluateConfig:
    data: str
    labels: str
    rgb: str | None = None
    flow: str | None = None
    split: str | None = None  # None: "test" if the CSV has it, else "val", else every video
    batch_size: int = 8
    json: str | None = None
    runs: tuple[str, ...] = ()  # RUN_DIRs or model.pt files of any architecture
    plot: str | None = None  # bar chart PNG; None: beside --json (same name, .png), or none without it

    def __post_init__(self) -> None:
        if not self.rgb and not self.flow and not self.runs:
            raise ConfigError("give at least one checkpoint: RUN_DIR / model.pt arguments, --rgb CKPT and/or --flow CKPT")
        if self.batch_size < 1:
            raise ConfigError(f"--batch-size must be >= 1, got {self.batch_size}")

    @property
    def plot_path(self) -> str | None:
        return self.plot or (str(Path(self.json).with_suffix(".png")) if self.json else None)


def load_trained(path: str | os.PathLike, stream: str | None = None) -> tuple[torch.nn.Module, dict[str, Any]]:
    """A trained model of any architecture and its training config; with `stream` (--rgb/--flow)
    it must be an I3D of that stream. Errors name the file and cause."""
    model, config = load_model(path, arch="i3d" if stream else None)
    missing = [k for k in ("stream", "clip_len", "crop_size", "classes") if k not in config]
    if missing:
        raise WeightsError(f"{path} has no training config ({', '.join(missing)} missing): not a `quovadis train` checkpoint")
    config = {**config, "arch": config.get("arch", "i3d")}
    if config["arch"] == "i3d" and not hasattr(model, "in_channels"):
        raise WeightsError(f"{path} holds a {type(model).__name__}; evaluate takes one I3D stream per checkpoint")
    if stream and config["stream"] != stream:
        raise ConfigError(f"{path} is a {config['stream']} checkpoint, given as --{stream}")
    return model, config


def _checkpoint_file(run: str) -> Path:
    """A RUN argument as a checkpoint path: RUN_DIR/model.pt, or the file itself."""
    path = Path(run)
    return path / MODEL_NAME if path.is_dir() else path


def _row_name(config: dict[str, Any], taken: dict[str, Any], path: Path) -> str:
    """I3D rows by stream (rgb, flow), others by architecture; a repeated name gets its run's name."""
    name = config["stream"] if config["arch"] == "i3d" else config["arch"]
    return name if name not in taken else f"{name}:{path.parent.name if path.name == MODEL_NAME else path.stem}"


def evaluate(cfg: EvaluateConfig) -> dict[str, Any]:
    """The accuracies of every run (rows as in the module docstring), plus per-video logits under
    "logits" ({row: {video: list}}), the class names and the split."""
    models: dict[str, tuple[torch.nn.Module, dict[str, Any], Path]] = {}
    for stream, path in (("rgb", cfg.rgb), ("flow", cfg.flow)):
        if path:
            models[stream] = (*load_trained(path, stream), Path(path))
    for run in cfg.runs:
        path = _checkpoint_file(run)
        model, config = load_trained(path)
        models[_row_name(config, models, path)] = (model, config, path)
    class_lists = {s: tuple(c["classes"]) for s, (_, c, _) in models.items()}
    if len(set(class_lists.values())) > 1:
        raise ConfigError(f"the checkpoints were trained on different classes: {class_lists}")
    classes = next(iter(class_lists.values()))
    labels = load_labels(cfg.labels, cfg.data, classes=classes)
    split = cfg.split
    if split is None:
        split = next((s for s in ("test", "val") if s in labels.splits), None)
    videos = labels.split(split)
    if not videos:
        raise ConfigError(f"{cfg.labels} has no videos in split {split!r} (splits: {list(labels.splits)})")
    log.info("evaluating %d videos of split %s", len(videos), split or "(all)")
    truth = {v.input: v.label for v in videos}

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    per_row: dict[str, dict[str, np.ndarray]] = {}
    order = sorted(truth)
    y = np.array([truth[v] for v in order])
    result: dict[str, Any] = {"rows": []}
    for name, (model, config, path) in models.items():
        ds = eval_dataset(cfg.data, videos, config)
        logits = video_logits(model.to(device), ds, arch=config["arch"], streams=ds.streams, batch_size=cfg.batch_size,
                              device=device)  # fmt: skip
        lost = sorted(set(order) - set(logits))
        if lost:
            raise ConfigError(f"{len(lost)} videos have no {config['stream']} clips for {path} (no {config['stream']} "
                              f"stored?): {lost[:5]}")  # fmt: skip
        per_row[name] = logits
        test = f"{TEST_PROTOCOL[config['arch']]}: {ds.clip_len} frames {ds.frame_step} apart, {len(ds)} clips"
        result[name] = {"arch": config["arch"], "stream": config["stream"], **_scores(np.stack([logits[v] for v in order]), y),
                        "checkpoint": str(path), "test": test}  # fmt: skip
        result["rows"].append(name)
    pair = [next((n for n in per_row if result[n]["arch"] == "i3d" and result[n]["stream"] == s), None) for s in ("rgb", "flow")]
    if None not in pair:
        fused = np.stack([per_row[pair[0]][v] + per_row[pair[1]][v] for v in order])
        result["fused"] = {"arch": "i3d", "stream": "rgb+flow", **_scores(fused, y), "of": pair}
        result["rows"].append("fused")
    result["classes"] = list(classes)
    result["split"] = split
    result["logits"] = {n: {v: per_row[n][v].tolist() for v in order} for n in per_row}
    return result


def _scores(logits: np.ndarray, y: np.ndarray) -> dict[str, float | int]:
    return {"top1": topk_accuracy(logits, y, 1), "top5": topk_accuracy(logits, y, 5), "videos": int(len(y))}


def format_table(result: dict[str, Any]) -> str:
    """One line per row of `evaluate`'s result: name, architecture, stream, top-1, top-5, videos."""
    lines = [f"{'row':<12} {'arch':<10} {'stream':<9} {'top-1':>7} {'top-5':>7} {'videos':>7}"]
    for name in result["rows"]:
        r = result[name]
        lines.append(f"{name:<12} {r['arch']:<10} {r['stream']:<9} {100 * r['top1']:6.2f}% {100 * r['top5']:6.2f}% "
                     f"{r['videos']:>7d}")  # fmt: skip
    return "\n".join(lines)


def plot_bars(result: dict[str, Any], path: str | os.PathLike, *, height: int = 360) -> Path:
    """A PNG bar chart of `evaluate`'s rows, top-1 (dark) and top-5 (light) side by side, drawn
    with OpenCV as `jobs.train.plot_curves` draws its curves."""
    rows = result["rows"]
    width = max(420, 70 + 90 * len(rows))
    img = np.full((height, width, 3), 255, np.uint8)
    x0, y0, x1, y1 = 55, 30, width - 15, height - 50
    font, black = cv2.FONT_HERSHEY_SIMPLEX, (0, 0, 0)
    cv2.rectangle(img, (x0, y0), (x1, y1), black, 1)
    cv2.putText(img, "accuracy per run", (x0, y0 - 10), font, 0.5, black, 1, cv2.LINE_AA)
    for frac in (0.0, 0.25, 0.5, 0.75, 1.0):
        y = int(y1 - frac * (y1 - y0))
        cv2.line(img, (x0, y), (x1, y), (220, 220, 220), 1)
        cv2.putText(img, f"{frac:.2f}", (x0 - 45, y + 4), font, 0.4, black, 1, cv2.LINE_AA)
    slot = (x1 - x0) / max(len(rows), 1)
    for i, name in enumerate(rows):
        left = int(x0 + i * slot + slot * 0.15)
        bar = int(slot * 0.35)
        for j, (key, colour) in enumerate((("top1", (200, 90, 30)), ("top5", (235, 190, 150)))):
            top = int(y1 - result[name][key] * (y1 - y0))
            cv2.rectangle(img, (left + j * bar, top), (left + (j + 1) * bar - 2, y1), colour, -1)
        cv2.putText(img, name[:12], (left, y1 + 16), font, 0.4, black, 1, cv2.LINE_AA)
        cv2.putText(img, f"{100 * result[name]['top1']:.0f}%", (left, y1 + 32), font, 0.4, (200, 90, 30), 1, cv2.LINE_AA)
    cv2.putText(img, "top-1", (x1 - 110, y0 + 18), font, 0.4, (200, 90, 30), 1, cv2.LINE_AA)
    cv2.putText(img, "top-5", (x1 - 55, y0 + 18), font, 0.4, (235, 190, 150), 1, cv2.LINE_AA)
    ok, png = cv2.imencode(".png", img)
    if not ok:
        raise QuovadisError(f"cannot encode plot {path}")
    return write_atomic(path, lambda f: f.write(png.tobytes()))


def run(args: argparse.Namespace) -> JobReport:
    cfg = EvaluateConfig(data=args.data, labels=args.labels, rgb=args.rgb, flow=args.flow, split=args.split,
                         batch_size=args.batch_size, json=args.json, runs=tuple(getattr(args, "runs", ())),
                         plot=getattr(args, "plot", None))  # fmt: skip
    report = JobReport(job="evaluate", config=asdict(cfg))
    result = evaluate(cfg)
    scores = {k: result[k] for k in result["rows"]}
    log.info("accuracy on %s:\n%s", result["split"] or "all videos", format_table(result))
    if cfg.json:
        Path(cfg.json).write_text(json.dumps(scores, indent=2) + "\n")
    if cfg.plot_path:
        plot_bars(result, cfg.plot_path)
    report.extra = {"scores": scores, "split": result["split"]}
    report.ok = sorted(next(iter(result["logits"].values())))
    report.finish()
    return report
