"""`quovadis train`: train one of the paper's architectures (`--arch`, default one I3D stream, rgb or
flow) on labelled videos, with Ray Train.

Architectures (`models.archs.ARCHS`, the paper's section 2): `i3d` (one stream, `--stream rgb|flow`),
`i3d-r50` (the inflated ResNet-50, RGB), `lstm` (ConvNet+LSTM, RGB; the loss is on every time step,
the prediction the last step's), `c3d` (RGB), `two-stream` and `fused-3d` (RGB and flow together).
Every architecture reads the same shards through `ShardDataset`, with its own sampling: `--clip-len`
RGB frames `--frame-step` apart (defaults from ARCHS: 25 frames 5 apart for lstm, 16 for c3d, 1 for
two-stream, 5 frames 10 apart for fused-3d, 64 for i3d) with their flow snippets, `--crop-size`
(112 for c3d, 224 otherwise). Validation follows the architecture's test protocol
(`jobs.evaluate.eval_dataset`).

`--init`: `scratch` (every architecture); for i3d an I3D weights file, a checkpoint or
`inflate:googlenet_bn.pt`; for i3d-r50 `inflate:FILE` written by `quovadis inflate --net resnet50`;
for lstm, two-stream and fused-3d `imagenet:googlenet_bn.pt` (the ImageNet GoogLeNet-BN file
`quovadis inflate` reads) for their 2D Inception-v1 trunks; for any architecture a checkpoint of
the same architecture (a checkpoint of another one is refused, naming both).

The run is a Ray Train `TorchTrainer` (DDP): one worker per GPU of the cluster, or ONE worker on a
CPU-only machine, with the same command line both ways (`--address` joins a cluster; `RUN_DIR`
must then be a path every node sees, e.g. a shared file system).

Training clips (the paper's recipe): one clip of `--clip-len` frames per video per epoch at a
random temporal start, a random `--crop-size` square crop and a random horizontal flip (for flow
the flip also negates the x component; `--no-flip` for classes that mirroring changes, such as
left/right motions). Validation/evaluation: the architecture's test protocol, centre crop, the
clips' logits averaged per video (jobs/evaluate.py; for i3d every clip of the video on a grid).

RUN_DIR after each epoch (written by rank 0, each file atomically)::

    checkpoints/epoch-NNNN.pt  model, optimiser, scheduler, epoch, RNG states, config, metrics
                               history (the last --keep-checkpoints are kept)
    model.pt                   the latest model + training config, arch included (models.archs.save_model):
                               what `quovadis evaluate` takes
    metrics.jsonl              one line per epoch (train loss/accuracy, whether precise BN ran, val
                               loss/top-1/top-5 and val_at_chance, lr, s)
    curves.png                 loss and accuracy curves
    config.json, report.json   the run's config; the final summary

Resume (`--resume`): the newest epoch checkpoint is loaded and training goes on from the next
epoch; metrics.jsonl is rewritten from the checkpoint's history. Every random draw is derived from
(--seed, epoch, rank or clip index) - data order, crops, flips and dropout - so a resumed run
ends where an uninterrupted one ends (bit for bit with --deterministic on one worker).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import random
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from quovadis.jobs.evaluate import eval_dataset, topk_accuracy, video_logits
from quovadis.jobs.labels import LabelledVideo, load_labels
from quovadis.jobs.report import JobReport
from quovadis.jobs.resources import train_workers
from quovadis.jobs.runtime import init_ray, out_dir_lock
from quovadis.models.archs import ARCHS, build, checkpoint_arch, load_model, model_inputs, save_model
from quovadis.models.fast import PRECISIONS, autocast
from quovadis.models.i3d import BN_MOMENTUM, InceptionI3d
from quovadis.models.inflate import i3d_resnet50
from quovadis.models.weights import IN_CHANNELS, load_checkpoint, load_weights, read_state_dict, save_atomic
from quovadis.pipeline.dataset import ShardDataset
from quovadis.pipeline.durable import write_atomic, write_json_atomic, write_text_atomic
from quovadis.pipeline.errors import ConfigError, QuovadisError, WeightsError
from quovadis.pipeline.manifest import load as manifest_load

log = logging.getLogger(__name__)

STREAMS = ("rgb", "flow")
# --stream of each architecture: i3d trains one stream; the others take what they were built for
ARCH_STREAMS: dict[str, tuple[str, ...]] = {
    "i3d": STREAMS, "i3d-r50": ("rgb",), "lstm": ("rgb",), "c3d": ("rgb",),
    "two-stream": ("rgb+flow",), "fused-3d": ("rgb+flow",),
}  # fmt: skip
INIT_PREFIXES = {"inflate:": ("i3d", "i3d-r50"), "imagenet:": ("lstm", "two-stream", "fused-3d")}
# Fields of runs saved before they existed, as those runs had them (--resume compares configs)
OLD_RUN_FIELDS = {"arch": "i3d", "frame_step": 1}
PRECISE_BN = ("auto", "on", "off")
# auto: precise BN while the running statistics still hold more than this share of what they held
# before training, (1 - BN_MOMENTUM) ** steps; at momentum 0.01 that is the first 298 steps.
STALE_BN_SHARE = 0.05
OPTIMIZERS = ("sgd", "adam")
CHECKPOINT_DIR = "checkpoints"
MODEL_NAME = "model.pt"
METRICS_NAME = "metrics.jsonl"
PLOT_NAME = "curves.png"
STATE_FORMAT = "quovadis-train-state"
# Fields that may differ between a run and its --resume (how it runs, not what it computes).
RUNTIME_FIELDS = frozenset({"address", "num_workers", "loader_workers", "keep_checkpoints", "cpus_per_worker"})


@dataclass(frozen=True)
class TrainConfig:
    """What one training run computes (and, in RUNTIME_FIELDS, how it runs)."""

    data: str  # shard directory
    labels: str  # labels.csv
    stream: str  # rgb | flow for i3d; rgb (lstm, c3d, i3d-r50) or rgb+flow (two-stream, fused-3d): ARCH_STREAMS
    out: str  # RUN_DIR
    init: str = "scratch"  # scratch | PATH (weights or checkpoint) | inflate:FILE | imagenet:FILE (module docstring)
    arch: str = "i3d"  # a key of models.archs.ARCHS
    epochs: int = 10
    batch_size: int = 8
    lr: float = 0.01
    weight_decay: float = 1e-7
    momentum: float = 0.9
    optimizer: str = "sgd"
    clip_len: int | None = None  # RGB frames per training clip (flow fields for an i3d flow run); None: ARCHS
    crop_size: int | None = None  # None: ARCHS (224, 112 for c3d)
    frame_step: int | None = None  # step between the RGB frames; None: ARCHS (5 lstm, 10 fused-3d, else 1)
    eval_stride: int | None = None  # validation clip stride (default clip_len)
    flip: bool = True
    dropout: float = 0.5
    precision: str = "fp32"  # fp32 | bf16 | fp16 (autocast)
    train_split: str = "train"
    val_split: str = "val"
    seed: int = 0
    deterministic: bool = False
    precise_bn: str = "auto"  # auto | on | off: recompute BN statistics before validating/saving (precise_bn_due)
    num_workers: int | None = None  # Ray Train workers; None: one per GPU of the cluster, 1 without
    cpus_per_worker: int | None = None  # None: all free CPUs on a CPU-only cluster, loader_workers + 1 with GPUs
    loader_workers: int = 2  # DataLoader processes per training worker
    keep_checkpoints: int = 2
    address: str | None = None

    def __post_init__(self) -> None:
        if self.arch not in ARCH_STREAMS:
            raise ConfigError(f"--arch must be one of {', '.join(ARCH_STREAMS)}, got {self.arch!r}")
        if self.stream not in ARCH_STREAMS[self.arch]:
            allowed = " or ".join(ARCH_STREAMS[self.arch])
            raise ConfigError(f"--arch {self.arch} takes --stream {allowed}, not {self.stream!r}"
                              + (" (it is RGB-only)" if allowed == "rgb" else ""))  # fmt: skip
        spec = ARCHS[self.arch]
        for name, default in (("clip_len", spec.train_rgb), ("crop_size", spec.crop), ("frame_step", spec.frame_step)):
            if getattr(self, name) is None:  # frozen: the architecture's default, resolved once
                object.__setattr__(self, name, default)
        if self.precision not in PRECISIONS:
            raise ConfigError(f"--precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if self.precise_bn not in PRECISE_BN:
            raise ConfigError(f"--precise-bn must be one of {', '.join(PRECISE_BN)}, got {self.precise_bn!r}")
        if self.optimizer not in OPTIMIZERS:
            raise ConfigError(f"--optimizer must be one of {', '.join(OPTIMIZERS)}, got {self.optimizer!r}")
        for name in ("epochs", "batch_size", "clip_len", "crop_size", "frame_step", "keep_checkpoints"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        for name in ("num_workers", "cpus_per_worker", "eval_stride"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ConfigError(f"--lr must be a positive number, got {self.lr}")
        if self.weight_decay < 0 or not 0 <= self.momentum < 1 or not 0 <= self.dropout < 1:
            raise ConfigError("--weight-decay must be >= 0, momentum and dropout in [0, 1)")
        if self.loader_workers < 0:
            raise ConfigError(f"--loader-workers must be >= 0, got {self.loader_workers}")
        prefix = next((p for p in INIT_PREFIXES if self.init.startswith(p)), "")
        if prefix and self.arch not in INIT_PREFIXES[prefix]:
            raise ConfigError(f"--init {prefix}FILE is for --arch {' or '.join(INIT_PREFIXES[prefix])}, not {self.arch}")
        init_file = self.init.removeprefix(prefix)
        if self.init != "scratch" and not os.path.isfile(init_file):
            raise ConfigError(f"--init must be scratch, a weights file, inflate:FILE or imagenet:FILE; {init_file!r} does not exist")

    @property
    def streams(self) -> tuple[str, ...]:
        """The ShardDataset streams this run reads, in the model's input order."""
        return tuple(self.stream.split("+"))

    @property
    def span(self) -> int:
        """Frames one training clip covers (ShardDataset.span)."""
        return (self.clip_len - 1) * self.frame_step + ARCHS[self.arch].flow_per_frame

    def arch_kwargs(self) -> dict[str, Any]:
        """What `models.archs.build` needs besides the class count to rebuild this run's model."""
        if self.arch == "c3d":
            return {"clip_frames": self.clip_len, "crop": self.crop_size, "dropout": self.dropout}
        if self.arch == "fused-3d":
            return {"dropout": self.dropout}
        return {}

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# -- model, data, RNG ---------------------------------------------------------------------------


def build_model(cfg: TrainConfig, num_classes: int) -> torch.nn.Module:
    """The model to train, with a fresh `num_classes` classifier unless the init already has it."""
    if cfg.arch != "i3d":
        return _build_arch(cfg, num_classes)
    channels = IN_CHANNELS[cfg.stream]
    if cfg.init == "scratch":
        return InceptionI3d(num_classes=num_classes, in_channels=channels, dropout=cfg.dropout)
    if cfg.init.startswith("inflate:"):
        from quovadis.models.googlenet import read_googlenet
        from quovadis.models.inflate import i3d_from_googlenet

        state = i3d_from_googlenet(read_googlenet(cfg.init[len("inflate:"):]), in_channels=channels)
        model = InceptionI3d(num_classes=state["logits.conv3d.weight"].shape[0], in_channels=channels, dropout=cfg.dropout)
        model.load_state_dict(state, strict=True)
    else:
        found = checkpoint_arch(cfg.init)
        if found is not None and found != "i3d":
            raise WeightsError(f"--init {cfg.init} is a {found} checkpoint; it cannot initialise --arch i3d")
        try:
            model, _ = load_checkpoint(cfg.init)  # a quovadis checkpoint (e.g. an earlier fine-tune)
        except WeightsError:
            state = read_state_dict(cfg.init)  # a pytorch-i3d layout state dict (rgb_imagenet.pt, ...)
            logits = state.get("logits.conv3d.weight")
            classes = logits.shape[0] if logits is not None and logits.ndim == 5 else 400
            model = load_weights(InceptionI3d(num_classes=classes, in_channels=channels, dropout=cfg.dropout), state)
        if not isinstance(model, InceptionI3d) or model.in_channels != channels:
            raise WeightsError(f"--init {cfg.init}: not a {cfg.stream} I3D ({channels} input channels)")
        loaded, model = model, InceptionI3d(num_classes=model.num_classes, in_channels=channels, dropout=cfg.dropout)
        model.load_state_dict(loaded.state_dict(), strict=True)
    if model.num_classes != num_classes:
        model.replace_logits(num_classes)
    return model


def _build_arch(cfg: TrainConfig, num_classes: int) -> torch.nn.Module:
    """A model of one of the baselines or I3D-ResNet-50, from scratch, from ImageNet/inflated
    weights (`--init imagenet:`/`inflate:`), or from a checkpoint of the same architecture."""
    kwargs = cfg.arch_kwargs()
    if cfg.init.startswith("imagenet:"):
        from quovadis.models.googlenet import read_googlenet

        model = build(cfg.arch, num_classes=num_classes, **kwargs)
        model.load_imagenet(read_googlenet(cfg.init.removeprefix("imagenet:")))
        return model
    if cfg.init.startswith("inflate:"):  # i3d-r50: `quovadis inflate --net resnet50` output
        path = cfg.init.removeprefix("inflate:")
        state = read_state_dict(path)
        fc = state.get("fc.weight")
        if fc is None or fc.ndim != 2:
            raise WeightsError(f"--init {cfg.init}: {path} has no 2D fc.weight; not written by quovadis inflate --net resnet50")
        model = load_weights(i3d_resnet50(num_classes=fc.shape[0]), state)
        if model.num_classes != num_classes:
            model.fc = torch.nn.Linear(model.fc.in_features, num_classes)
            model.num_classes = num_classes
        return model
    if cfg.init == "scratch":
        return build(cfg.arch, num_classes=num_classes, **kwargs)
    if checkpoint_arch(cfg.init) is None:
        raise WeightsError(f"--init {cfg.init}: not a quovadis checkpoint; --arch {cfg.arch} starts from scratch, "
                           "a checkpoint of its own, or the ImageNet/inflated file its module docstring names")  # fmt: skip
    loaded, _ = load_model(cfg.init, arch=cfg.arch)
    if loaded.num_classes != num_classes:
        raise ConfigError(f"--init {cfg.init} has {loaded.num_classes} classes, the labels {num_classes}")
    model = build(cfg.arch, num_classes=num_classes, **kwargs)  # this run's dropout and sizes
    model.load_state_dict(loaded.state_dict(), strict=True)
    return model


class EveryStep(torch.nn.Module):
    """The ConvNet+LSTM returning every time step's logits (N, T, classes), so the training loss is
    on all of them (the paper's section 2.1) and DDP still wraps one forward."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.per_time_logits(x)


def _seed(*parts: int) -> int:
    """A 63-bit seed from integers (seed, epoch, rank, ...), stable across runs and processes."""
    return int(np.random.SeedSequence([p & 0xFFFFFFFF for p in parts]).generate_state(2, np.uint64)[0] >> 1)


def rng_state() -> dict[str, Any]:
    """The process's RNG states, in types torch.load(weights_only=True) reads back."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)],
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def epoch_order(n: int, *, seed: int, epoch: int, rank: int, world: int) -> list[int]:
    """This rank's item indices for `epoch`: a seeded permutation, padded to a multiple of `world`
    (repeating its head) and dealt round-robin, so every rank takes the same number of steps."""
    order = np.random.default_rng(_seed(seed, epoch)).permutation(n).tolist()
    order += order[: (-len(order)) % world]
    return order[rank::world]


def train_dataset(cfg: TrainConfig, videos: list[LabelledVideo]) -> ShardDataset:
    """One clip per video: random start, random crop, random flip (flow x negated when flipped),
    in the architecture's sampling."""
    return ShardDataset(
        cfg.data, clip_len=cfg.clip_len, streams=cfg.streams, crop="random", crop_size=cfg.crop_size,
        flip=cfg.flip, temporal="random", videos=[v.input for v in videos], seed=cfg.seed,
        frame_step=cfg.frame_step, flow_per_frame=ARCHS[cfg.arch].flow_per_frame,
    )  # fmt: skip


# -- checkpoints, metrics, plot -----------------------------------------------------------------


def checkpoint_path(run_dir: Path, epoch: int) -> Path:
    return run_dir / CHECKPOINT_DIR / f"epoch-{epoch:04d}.pt"


def latest_checkpoint(run_dir: Path) -> Path | None:
    found = sorted((run_dir / CHECKPOINT_DIR).glob("epoch-*.pt"))
    return found[-1] if found else None


def load_state(path: Path) -> dict[str, Any]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise WeightsError(f"cannot read training checkpoint {path}: {type(e).__name__}: {e}") from e
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise WeightsError(f"{path} is not a quovadis training checkpoint")
    return state


def write_metrics(run_dir: Path, history: list[dict[str, Any]]) -> None:
    write_text_atomic(run_dir / METRICS_NAME, "".join(json.dumps(m, sort_keys=True) + "\n" for m in history))


def plot_curves(history: list[dict[str, Any]], path: Path, *, size: tuple[int, int] = (900, 360)) -> Path:
    """A PNG with two panels, loss and accuracy per epoch (train and val), drawn with OpenCV."""
    width, height = size
    img = np.full((height, width, 3), 255, np.uint8)
    panels = [
        ("loss", [("train_loss", (200, 90, 30)), ("val_loss", (40, 40, 220))]),
        ("accuracy", [("train_acc", (200, 90, 30)), ("val_top1", (40, 40, 220))]),
    ]
    epochs = [m["epoch"] for m in history]
    pw = width // len(panels)
    for i, (title, series) in enumerate(panels):
        x0, y0, x1, y1 = i * pw + 55, 30, (i + 1) * pw - 15, height - 40
        values = [m[k] for k, _ in series for m in history if isinstance(m.get(k), float) and math.isfinite(m[k])]
        lo, hi = (0.0, 1.0) if title == "accuracy" else (0.0, max(values, default=1.0) * 1.05 or 1.0)
        cv2.rectangle(img, (x0, y0), (x1, y1), (0, 0, 0), 1)
        cv2.putText(img, title, (x0, y0 - 10), cv2.FONT_HERSHEY_SIMPLEX, 0.5, (0, 0, 0), 1, cv2.LINE_AA)
        for frac in (0.0, 0.5, 1.0):
            y = int(y1 - frac * (y1 - y0))
            cv2.putText(img, f"{lo + frac * (hi - lo):.2f}", (x0 - 50, y + 4), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (0, 0, 0), 1, cv2.LINE_AA)
        first, last = (epochs[0], epochs[-1]) if epochs else (1, 1)
        span = max(last - first, 1)
        for e in (first, last):
            x = int(x0 + (e - first) / span * (x1 - x0))
            cv2.putText(img, str(e), (x - 4, y1 + 15), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (0, 0, 0), 1, cv2.LINE_AA)
        cv2.putText(img, "epoch", ((x0 + x1) // 2 - 20, y1 + 32), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (0, 0, 0), 1, cv2.LINE_AA)
        for j, (key, colour) in enumerate(series):
            pts = [
                (int(x0 + (m["epoch"] - first) / span * (x1 - x0)), int(y1 - (m[key] - lo) / (hi - lo) * (y1 - y0)))
                for m in history
                if isinstance(m.get(key), float) and math.isfinite(m[key])
            ]
            if len(pts) > 1:
                cv2.polylines(img, [np.array(pts, np.int32)], False, colour, 2, cv2.LINE_AA)
            for p in pts:
                cv2.circle(img, p, 3, colour, -1, cv2.LINE_AA)
            cv2.putText(img, key, (x1 - 90, y0 + 18 + 16 * j), cv2.FONT_HERSHEY_SIMPLEX, 0.4, colour, 1, cv2.LINE_AA)
    ok, png = cv2.imencode(".png", img)
    if not ok:
        raise QuovadisError(f"cannot encode plot {path}")
    return write_atomic(path, lambda f: f.write(png.tobytes()))


def model_config(cfg: TrainConfig, classes: tuple[str, ...], epoch: int, metrics: dict[str, Any]) -> dict[str, Any]:
    """What a checkpoint carries so `evaluate` needs no repeated flags."""
    return {
        "arch": cfg.arch,
        "stream": cfg.stream,
        "clip_len": cfg.clip_len,
        "crop_size": cfg.crop_size,
        "frame_step": cfg.frame_step,
        "eval_stride": cfg.eval_stride or cfg.span,
        "classes": list(classes),
        "epoch": epoch,
        "metrics": metrics,
        "train_config": cfg.to_dict(),
    }


@torch.no_grad()
def recalibrate_bn(model: torch.nn.Module, loader, *, arch: str, streams: tuple[str, ...], device: torch.device,
                   precision: str, world: int = 1) -> None:  # fmt: skip
    """"Precise BN": replace BatchNorm running statistics by their plain average over `loader`'s
    clips under the final weights of the epoch (averaged over ranks).

    I3D's BN momentum (0.01, pytorch-i3d's) suits fine-tuning pretrained weights; a short run
    from scratch moves the weights faster than the running statistics follow, so eval-mode outputs
    would be wrong without this. Costs one forward pass over the epoch's clips.
    """
    bns = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    momenta = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the batches below
    was_training = model.training
    model.train()
    for batch in loader:
        inputs = model_inputs(arch, {s: batch[s].to(device, non_blocking=True) for s in streams}, streams)
        with autocast(device, precision):
            model(*inputs)
    model.train(was_training)
    for m, momentum in zip(bns, momenta):
        m.momentum = momentum
        if world > 1:
            import torch.distributed as dist

            for buf in (m.running_mean, m.running_var):
                dist.all_reduce(buf)
                buf /= world


def precise_bn_due(mode: str, steps: int, momentum: float = BN_MOMENTUM) -> bool:
    """Whether to recalibrate BN after `steps` optimizer steps. `auto`: while the running
    statistics still weigh what they held before training by more than STALE_BN_SHARE.

    Issue 13: from scratch, 16 steps at momentum 0.01 (0.99 ** 16 = 0.85 of the reset mean 0 and
    variance 1) fit the training clips, yet eval-mode validation sat at chance (val loss ln 2).
    """
    if mode != "auto":
        return mode == "on"
    return (1 - momentum) ** steps > STALE_BN_SHARE


def at_chance(train_acc: float, val_top1: float, val_loss: float, num_classes: int) -> bool:
    """Training fits (accuracy >= 0.9) while validation is no better than guessing: top-1 within
    min(0.1, 0.5/K) of 1/K, or the loss within 2% of ln K (uniform logits) - typically eval-mode
    BatchNorm statistics that do not match the data."""
    chance = 1 / num_classes
    near = abs(val_top1 - chance) <= min(0.1, 0.5 * chance) or math.isclose(val_loss, math.log(num_classes), rel_tol=0.02)
    return train_acc >= 0.9 and near


# -- the per-worker loop ------------------------------------------------------------------------


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Runs in each Ray Train worker (rank 0 writes RUN_DIR). Plain function, no Ray objects in."""
    import ray.train
    import ray.train.torch

    cfg = TrainConfig(**config["cfg"])
    classes: tuple[str, ...] = tuple(config["classes"])
    train_videos = [LabelledVideo(**v) for v in config["train"]]
    val_videos = [LabelledVideo(**v) for v in config["val"]]
    run_dir = Path(cfg.out)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    torch.set_num_threads(int(config["threads"] or len(os.sched_getaffinity(0))))
    if cfg.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
    # results are bit-exact only for the same thread count (a resume on another machine may differ)
    log.info("rank %d of %d on %s, %d torch threads", rank, world, device, torch.get_num_threads())
    torch.manual_seed(_seed(cfg.seed, -1, rank))  # model initialisation: same on every rank

    label_of = {v.input: v.label for v in train_videos}
    model = build_model(cfg, len(classes)).to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.optimizer == "sgd":
        optimizer = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    else:
        optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=cfg.epochs)
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.precision == "fp16")

    history: list[dict[str, Any]] = []
    start_epoch = 0
    resume_from = config.get("resume_from")
    if resume_from:
        state = load_state(Path(resume_from))
        model.load_state_dict(state["model"], strict=True)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        history = list(state["history"])
        start_epoch = int(state["epoch"])
        if rank == 0:
            set_rng_state(state["rng"])
            # a kill between an epoch's checkpoint and its outputs left them one epoch behind; after
            # the last epoch no later epoch would rewrite them
            _write_outputs(run_dir, cfg, classes, model, start_epoch, history)
        log.info("resumed from %s after epoch %d", resume_from, start_epoch)
    # DDP when world > 1, else the model itself; the LSTM's forward gives every step's logits
    ddp_model = ray.train.torch.prepare_model(EveryStep(model) if cfg.arch == "lstm" else model)
    streams = cfg.streams

    train_ds = train_dataset(cfg, train_videos)
    val_ds = eval_dataset(cfg.data, val_videos, model_config(cfg, classes, 0, {})) if val_videos and rank == 0 else None
    val_truth = {v.input: v.label for v in val_videos}

    for epoch in range(start_epoch + 1, cfg.epochs + 1):
        started = time.monotonic()
        torch.manual_seed(_seed(cfg.seed, epoch, rank))  # dropout of this epoch
        train_ds.set_epoch(epoch)
        order = epoch_order(len(train_ds), seed=cfg.seed, epoch=epoch, rank=rank, world=world)
        loader = torch.utils.data.DataLoader(
            torch.utils.data.Subset(train_ds, order), batch_size=cfg.batch_size, shuffle=False,
            num_workers=cfg.loader_workers, pin_memory=device.type == "cuda", drop_last=False,
        )  # fmt: skip
        model.train()
        loss_sum, correct, seen = torch.zeros((), dtype=torch.float64), 0, 0
        lr = optimizer.param_groups[0]["lr"]
        for batch in loader:
            x = {s: batch[s].to(device, non_blocking=True) for s in streams}  # (N, C, T, h, w) each
            y = torch.tensor([label_of[v] for v in batch["video"]], device=device)
            with autocast(device, cfg.precision):
                out = ddp_model(*model_inputs(cfg.arch, x, streams))  # (N, classes); lstm (N, T, classes)
            if out.ndim == 3:  # the loss on every time step, the prediction the last one's
                loss = F.cross_entropy(out.flatten(0, 1).float(), y.repeat_interleave(out.shape[1]))
                logits = out[:, -1]
            else:
                loss, logits = F.cross_entropy(out.float(), y), out
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            loss_sum += loss.detach().double().cpu() * len(y)
            correct += int((logits.detach().argmax(1) == y).sum())
            seen += len(y)
        scheduler.step()
        recalibrated = precise_bn_due(cfg.precise_bn, epoch * len(loader))  # every epoch takes len(loader) steps
        if recalibrated:
            recalibrate_bn(model, loader, arch=cfg.arch, streams=streams, device=device, precision=cfg.precision,
                           world=world)  # fmt: skip
        totals = torch.tensor([float(loss_sum), correct, seen], dtype=torch.float64)
        if world > 1:
            import torch.distributed as dist

            dist.all_reduce(totals)
        metrics: dict[str, Any] = {
            "epoch": epoch,
            "lr": lr,
            "train_loss": float(totals[0] / totals[2]),
            "train_acc": float(totals[1] / totals[2]),
            "train_clips": int(totals[2]),
            "precise_bn": recalibrated,
        }
        if rank == 0:
            if val_ds is not None:
                logits_of = video_logits(model, val_ds, arch=cfg.arch, streams=streams, batch_size=cfg.batch_size,
                                         device=device, precision=cfg.precision)  # fmt: skip
                names = sorted(logits_of)
                vl = torch.from_numpy(np.stack([logits_of[v] for v in names]))
                vy = torch.tensor([val_truth[v] for v in names])
                metrics["val_loss"] = float(F.cross_entropy(vl, vy))
                metrics["val_top1"] = topk_accuracy(vl.numpy(), vy.numpy(), 1)
                metrics["val_top5"] = topk_accuracy(vl.numpy(), vy.numpy(), 5)
                metrics["val_videos"] = len(names)
                metrics["val_at_chance"] = at_chance(metrics["train_acc"], metrics["val_top1"], metrics["val_loss"], len(classes))
                if metrics["val_at_chance"]:
                    log.warning("epoch %d: validation at chance (top-1 %.3f, loss %.3f) while train accuracy is %.3f",
                                epoch, metrics["val_top1"], metrics["val_loss"], metrics["train_acc"])  # fmt: skip
            metrics["seconds"] = time.monotonic() - started
            history.append(metrics)
            _save_epoch(run_dir, cfg, classes, model, optimizer, scheduler, scaler, epoch, history)
            log.info("epoch %d/%d %s", epoch, cfg.epochs, json.dumps(metrics, sort_keys=True))
        if world > 1:
            import torch.distributed as dist

            dist.barrier()
        ray.train.report({k: v for k, v in metrics.items() if isinstance(v, int | float)})


def _save_epoch(run_dir: Path, cfg: TrainConfig, classes: tuple[str, ...], model: torch.nn.Module, optimizer,
                scheduler, scaler, epoch: int, history: list[dict[str, Any]]) -> None:  # fmt: skip
    """Checkpoint first (the resume point), then model.pt, metrics.jsonl and the plot."""
    ckpt_dir = run_dir / CHECKPOINT_DIR
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    state = {
        "format": STATE_FORMAT,
        "epoch": epoch,
        "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict(),
        "rng": rng_state(),
        "history": history,
        "config": model_config(cfg, classes, epoch, history[-1]),
    }
    save_atomic(state, checkpoint_path(run_dir, epoch))
    for old in sorted(ckpt_dir.glob("epoch-*.pt"))[: -cfg.keep_checkpoints]:
        old.unlink()
    _write_outputs(run_dir, cfg, classes, model, epoch, history)


def _write_outputs(run_dir: Path, cfg: TrainConfig, classes: tuple[str, ...], model: torch.nn.Module, epoch: int,
                   history: list[dict[str, Any]]) -> None:  # fmt: skip
    """model.pt, metrics.jsonl and the plot, all derived from the epoch's checkpoint."""
    save_model(run_dir / MODEL_NAME, model, arch=cfg.arch, arch_kwargs=cfg.arch_kwargs(),
               config=model_config(cfg, classes, epoch, history[-1]))  # fmt: skip
    write_metrics(run_dir, history)
    plot_curves(history, run_dir / PLOT_NAME)


# -- the driver ---------------------------------------------------------------------------------


def _check_streams(cfg: TrainConfig, videos: list[LabelledVideo]) -> None:
    entries = manifest_load(Path(cfg.data))
    for stream in cfg.streams:
        lacking = [v.input for v in videos if stream not in entries[v.input].info.get("streams", ["rgb"])]
        if lacking:
            raise ConfigError(
                f"{len(lacking)} labelled videos have no {stream} stored in {cfg.data} "
                f"(preprocess with --streams rgb,flow): {lacking[:5]}"
            )


def _resume_point(cfg: TrainConfig, resume: bool) -> Path | None:
    run_dir = Path(cfg.out)
    latest = latest_checkpoint(run_dir)
    if latest is None:
        if resume:
            log.info("%s has no checkpoint yet; starting from epoch 1", run_dir)
        return None
    if not resume:
        raise ConfigError(f"{run_dir} already holds a training run ({latest.name}); pass --resume or another --out")
    saved = _as_saved_today(load_state(latest)["config"]["train_config"])
    if saved["arch"] != cfg.arch:
        raise ConfigError(f"{latest} is a {saved['arch']} run; it cannot be resumed as --arch {cfg.arch}")
    differ = {
        k: (saved.get(k), v) for k, v in cfg.to_dict().items() if k not in RUNTIME_FIELDS and saved.get(k) != v
    }
    if differ:
        raise ConfigError(f"--resume with settings that differ from the run in {run_dir} (was, now): {differ}")
    return latest


def _as_saved_today(saved: dict[str, Any]) -> dict[str, Any]:
    """A saved run's train config in today's terms: fields it predates as it had them
    (OLD_RUN_FIELDS), and --precise-bn as a mode (runs before the modes saved True/False)."""
    saved = {**OLD_RUN_FIELDS, **saved}
    if isinstance(saved.get("precise_bn"), bool):
        saved["precise_bn"] = "on" if saved["precise_bn"] else "off"
    return saved


def train(cfg: TrainConfig, *, resume: bool = False) -> JobReport:
    """Run (or resume) a training run; returns the report also written to RUN_DIR/report.json."""
    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
    report = JobReport(job="train", config=cfg.to_dict())
    run_dir = Path(cfg.out).resolve()
    cfg = dataclasses.replace(cfg, out=str(run_dir), data=str(Path(cfg.data).resolve()))
    labels = load_labels(cfg.labels, cfg.data)
    if labels.splits:
        train_videos, val_videos = labels.split(cfg.train_split), labels.split(cfg.val_split)
    else:
        train_videos, val_videos = list(labels.videos), []
        log.warning("%s has no split column: training on every video, no validation", cfg.labels)
    if not train_videos:
        raise ConfigError(f"{cfg.labels} has no videos in split {cfg.train_split!r} (splits: {list(labels.splits)})")
    _check_streams(cfg, train_videos + val_videos)

    with out_dir_lock(run_dir):
        resume_from = _resume_point(cfg, resume)
        write_json_atomic(run_dir / "config.json", {**cfg.to_dict(), "classes": list(labels.classes)}, indent=2)
        init_ray(cfg.address)
        import ray.train
        from ray.train.torch import TorchTrainer

        workers, use_gpu, resources, threads = train_workers(cfg.num_workers, cfg.cpus_per_worker, cfg.loader_workers)
        log.info("training %s %s on %d videos (%d val, %d classes) with %d Ray Train worker(s)%s",
                 cfg.arch, cfg.stream, len(train_videos), len(val_videos), len(labels.classes), workers,
                 " on GPUs" if use_gpu else " on CPU")  # fmt: skip
        trainer = TorchTrainer(
            train_loop_per_worker,
            train_loop_config={
                "cfg": cfg.to_dict(),
                "classes": list(labels.classes),
                "train": [dataclasses.asdict(v) for v in train_videos],
                "val": [dataclasses.asdict(v) for v in val_videos],
                "resume_from": str(resume_from) if resume_from else None,
                "threads": threads,
            },
            scaling_config=ray.train.ScalingConfig(num_workers=workers, use_gpu=use_gpu, resources_per_worker=resources),
            run_config=ray.train.RunConfig(
                name=f"train-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:8]}",  # distinct for runs started at once
                storage_path=str(run_dir / "ray"),
                failure_config=ray.train.FailureConfig(max_failures=0),
            ),
        )
        try:
            trainer.fit()
        except Exception as e:  # Ray wraps the worker's exception; keep its message
            raise QuovadisError(f"training in {run_dir} failed: {e}") from e
        history = [json.loads(line) for line in (run_dir / METRICS_NAME).read_text().splitlines() if line]
        report.ok = [v.input for v in train_videos]
        report.clips = sum(int(m["train_clips"]) for m in history)
        report.extra = {"final": history[-1] if history else None, "run_dir": str(run_dir), "workers": workers}
        report.finish()
        report.write(run_dir)
    log.info("trained %d epochs; final %s", len(history), json.dumps(report.extra["final"], sort_keys=True))
    if history and history[-1].get("val_at_chance"):
        log.warning("validation is at chance while training accuracy is high (%s): eval-mode BatchNorm statistics "
                    "may not match the data; try --precise-bn on", run_dir)  # fmt: skip
    return report


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    values = {k: v for k, v in vars(args).items() if k in fields}
    if values["stream"] is None:
        if args.arch == "i3d":
            raise ConfigError("--arch i3d trains one stream: give --stream rgb or --stream flow")
        values["stream"] = ARCH_STREAMS[args.arch][0]
    return TrainConfig(**values)


def run(args: argparse.Namespace) -> JobReport:
    return train(config_from_args(args), resume=args.resume)
