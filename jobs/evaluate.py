"""`quovadis evaluate`: top-1/top-5 of fine-tuned RGB and flow I3D checkpoints, and of their fusion.

Each video is scored by the mean of its clips' logits (every clip of `clip_starts(T, clip_len,
stride)`, centre crop), as in the paper's test protocol; the two-stream score is the sum of the
two streams' video logits (the released joint model). Checkpoints (`RUN_DIR/model.pt`, or a
per-epoch one) carry their training config (stream, clip length, crop size, class names), so no
flag is repeated here. Output: a table (logged at INFO), and with --json the JSON
`{"rgb": {"top1": .., "top5": .., "videos": n}, "flow": {...}, "fused": {...}}`, fractions in [0, 1].
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

import numpy as np
import torch

from quovadis.jobs.labels import LabelledVideo, load_labels
from quovadis.jobs.report import JobReport
from quovadis.models.fast import autocast
from quovadis.models.i3d import InceptionI3d
from quovadis.models.weights import load_checkpoint
from quovadis.pipeline.dataset import ShardDataset
from quovadis.pipeline.errors import ConfigError, WeightsError

log = logging.getLogger(__name__)

def topk_accuracy(logits: np.ndarray, labels: np.ndarray, k: int) -> float:
    """Fraction of rows whose label is among the k largest logits (k capped at the class count)."""
    if len(labels) == 0:
        return float("nan")
    k = min(k, logits.shape[1])
    top = np.argsort(-logits, axis=1, kind="stable")[:, :k]
    return float((top == labels[:, None]).any(axis=1).mean())


def eval_dataset(shard_dir: str | os.PathLike, videos: Sequence[LabelledVideo], *, stream: str, clip_len: int,
                 crop_size: int, stride: int | None = None) -> ShardDataset:  # fmt: skip
    """Every clip (grid of starts, centre crop, no flip) of `videos`: the evaluation protocol."""
    return ShardDataset(
        shard_dir, clip_len=clip_len, stride=stride or clip_len, streams=(stream,), crop="center",
        crop_size=crop_size, flip=False, temporal="grid", videos=[v.input for v in videos],
    )  # fmt: skip


@torch.inference_mode()
def video_logits(model: torch.nn.Module, dataset: ShardDataset, *, stream: str, batch_size: int = 8,
                 device: torch.device | str = "cpu", precision: str = "fp32") -> dict[str, np.ndarray]:  # fmt: skip
    """{video input path: float32 (classes,) mean of its clips' logits}, model in eval mode."""
    device = torch.device(device)
    was_training = model.training
    model.eval()
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=0)
    sums: dict[str, np.ndarray] = {}
    counts: dict[str, int] = {}
    try:
        for batch in loader:
            x = batch[stream].to(device, non_blocking=True)  # (N, C, T, h, w)
            with autocast(device, precision):
                logits = model(x)  # (N, classes)
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

    def __post_init__(self) -> None:
        if not self.rgb and not self.flow:
            raise ConfigError("give at least one checkpoint: --rgb CKPT and/or --flow CKPT")
        if self.batch_size < 1:
            raise ConfigError(f"--batch-size must be >= 1, got {self.batch_size}")


def load_trained(path: str | os.PathLike, stream: str) -> tuple[InceptionI3d, dict[str, Any]]:
    """A fine-tuned single-stream model and its training config; errors name the file and cause."""
    model, config = load_checkpoint(path)
    if not isinstance(model, InceptionI3d):
        raise WeightsError(f"{path} holds a {type(model).__name__}; evaluate takes one stream per checkpoint")
    missing = [k for k in ("stream", "clip_len", "crop_size", "classes") if k not in config]
    if missing:
        raise WeightsError(f"{path} has no training config ({', '.join(missing)} missing): not a `quovadis train` checkpoint")
    if config["stream"] != stream:
        raise ConfigError(f"{path} is a {config['stream']} checkpoint, given as --{stream}")
    return model, config


def evaluate(cfg: EvaluateConfig) -> dict[str, Any]:
    """The per-stream and fused accuracies (see the module docstring), plus per-video logits under
    "logits" ({stream: {video: list}}) and the class names."""
    models: dict[str, tuple[InceptionI3d, dict[str, Any]]] = {}
    for stream, path in (("rgb", cfg.rgb), ("flow", cfg.flow)):
        if path:
            models[stream] = load_trained(path, stream)
    class_lists = {s: tuple(c["classes"]) for s, (_, c) in models.items()}
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
    per_stream: dict[str, dict[str, np.ndarray]] = {}
    for stream, (model, config) in models.items():
        ds = eval_dataset(cfg.data, videos, stream=stream, clip_len=int(config["clip_len"]),
                          crop_size=int(config["crop_size"]), stride=config.get("eval_stride"))  # fmt: skip
        per_stream[stream] = video_logits(model.to(device), ds, stream=stream, batch_size=cfg.batch_size, device=device)
    order = sorted(truth)
    y = np.array([truth[v] for v in order])
    result: dict[str, Any] = {}
    for stream, logits in per_stream.items():
        lost = sorted(set(order) - set(logits))
        if lost:
            raise ConfigError(f"{len(lost)} videos have no {stream} clips (no {stream} stored?): {lost[:5]}")
        result[stream] = _scores(np.stack([logits[v] for v in order]), y)
    if len(per_stream) == 2:
        fused = np.stack([per_stream["rgb"][v] + per_stream["flow"][v] for v in order])
        result["fused"] = _scores(fused, y)
    result["classes"] = list(classes)
    result["split"] = split
    result["logits"] = {s: {v: per_stream[s][v].tolist() for v in order} for s in per_stream}
    return result


def _scores(logits: np.ndarray, y: np.ndarray) -> dict[str, float | int]:
    return {"top1": topk_accuracy(logits, y, 1), "top5": topk_accuracy(logits, y, 5), "videos": int(len(y))}


def format_table(result: dict[str, Any]) -> str:
    rows = [f"{'stream':<8} {'top-1':>7} {'top-5':>7} {'videos':>7}"]
    for name in ("rgb", "flow", "fused"):
        if name in result:
            r = result[name]
            rows.append(f"{name:<8} {100 * r['top1']:6.2f}% {100 * r['top5']:6.2f}% {r['videos']:>7d}")
    return "\n".join(rows)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", required=True, help="shard directory (quovadis preprocess --out)")
    p.add_argument("--labels", required=True, help="labels.csv: video,label[,split]")
    p.add_argument("--rgb", default=None, metavar="CKPT", help="RGB checkpoint from quovadis train (RUN_DIR/model.pt)")
    p.add_argument("--flow", default=None, metavar="CKPT", help="flow checkpoint from quovadis train")
    p.add_argument("--split", default=None, help="split to evaluate (default: test if present, else val, else all)")
    p.add_argument("--batch-size", type=int, default=8, help="clips per forward pass (default 8)")
    p.add_argument("--json", default=None, metavar="PATH", help="also write the accuracies as JSON here")


def run(args: argparse.Namespace) -> JobReport:
    cfg = EvaluateConfig(data=args.data, labels=args.labels, rgb=args.rgb, flow=args.flow, split=args.split,
                         batch_size=args.batch_size, json=args.json)  # fmt: skip
    report = JobReport(job="evaluate", config=asdict(cfg))
    result = evaluate(cfg)
    scores = {k: result[k] for k in ("rgb", "flow", "fused") if k in result}
    log.info("accuracy on %s:\n%s", result["split"] or "all videos", format_table(result))
    if cfg.json:
        Path(cfg.json).write_text(json.dumps(scores, indent=2) + "\n")
    report.extra = {"scores": scores, "split": result["split"]}
    report.ok = sorted(next(iter(result["logits"].values())))
    report.finish()
    return report
