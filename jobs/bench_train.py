"""`quovadis bench train`: training throughput of I3D (clips/s per device), fp32 vs mixed precision,
and whether the shard data loader keeps up with the model.

Model: forward + backward + SGD step on random clips of the chosen size (default the paper's RGB
64x224x224), after warm-up steps, for each precision (fp32, bf16 autocast; fp16 autocast with a
grad scaler on CUDA). Loader: with --data, the training dataset (random start, random crop, flip)
read through a DataLoader with each --loader-workers count, in clips/s, beside the fastest model
rate ("demand"): a ratio >= 1 means the loader does not starve the device.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import torch
import torch.nn.functional as F

from quovadis.models.fast import PRECISIONS, autocast
from quovadis.models.i3d import InceptionI3d
from quovadis.models.weights import IN_CHANNELS
from quovadis.pipeline import conventions
from quovadis.pipeline.dataset import ShardDataset
from quovadis.pipeline.errors import ConfigError


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--stream", choices=tuple(IN_CHANNELS), default="rgb")
    p.add_argument("--clip-len", type=int, default=conventions.CLIP_LEN, help="frames per clip (default 64)")
    p.add_argument("--crop-size", type=int, default=conventions.CROP_SIZE, help="square crop (default 224)")
    p.add_argument("--batch-size", type=int, default=4, help="clips per step (default 4)")
    p.add_argument("--steps", type=int, default=5, help="timed steps per precision (default 5)")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps first (default 1)")
    p.add_argument("--precisions", default="fp32,bf16", help="comma list of fp32, bf16, fp16 (default fp32,bf16)")
    p.add_argument("--device", default=None, help="cpu or cuda[:n] (default: cuda when present)")
    p.add_argument("--data", default=None, help="shard directory: also measure the data loader")
    p.add_argument("--loader-workers", default="0,2", help="comma list of DataLoader worker counts (default 0,2)")
    p.add_argument("--loader-clips", type=int, default=32, help="clips read per loader measurement (default 32)")


def model_throughput(*, stream: str, clip_len: int, crop_size: int, batch_size: int, steps: int, warmup: int,
                     precision: str, device: torch.device) -> float:  # fmt: skip
    """Training clips/s: forward, backward and an SGD step on random clips."""
    model = InceptionI3d(num_classes=400, in_channels=IN_CHANNELS[stream]).to(device).train()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    x = torch.rand(batch_size, IN_CHANNELS[stream], clip_len, crop_size, crop_size, device=device) * 2 - 1
    y = torch.randint(400, (batch_size,), device=device)
    started = 0.0
    for i in range(warmup + steps):
        if i == warmup:
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            started = time.perf_counter()
        with autocast(device, precision):
            loss = F.cross_entropy(model(x).float(), y)
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return steps * batch_size / (time.perf_counter() - started)


def loader_throughput(data: str, *, stream: str, clip_len: int, crop_size: int, batch_size: int, workers: int,
                      clips: int) -> float:  # fmt: skip
    """Training-clip reads per second from shards (random start, crop and flip), as train does."""
    ds = ShardDataset(data, clip_len=clip_len, streams=(stream,), crop="random", crop_size=crop_size, flip=True,
                      temporal="random", seed=0)  # fmt: skip
    if len(ds) == 0:
        raise ConfigError(f"{data} has no videos with {stream} stored")
    order = [i % len(ds) for i in range(clips)]
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(ds, order), batch_size=batch_size,
                                         num_workers=workers)  # fmt: skip
    started = time.perf_counter()
    n = sum(len(b["video"]) for b in loader)
    return n / (time.perf_counter() - started)


def run_bench(args: argparse.Namespace) -> dict[str, Any]:
    """Measure and print a table; returns {"model": {precision: clips/s}, "loader": {workers: clips/s}, ...}."""
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    precisions = [p.strip() for p in args.precisions.split(",") if p.strip()]
    unknown = set(precisions) - set(PRECISIONS)
    if unknown:
        raise ConfigError(f"--precisions takes {', '.join(PRECISIONS)}; got {sorted(unknown)}")
    shape = f"{args.batch_size}x{args.clip_len}x{args.crop_size}x{args.crop_size}"
    result: dict[str, Any] = {"device": str(device), "threads": torch.get_num_threads(), "shape": shape,
                              "stream": args.stream, "model": {}, "loader": {}}  # fmt: skip
    for precision in precisions:
        rate = model_throughput(stream=args.stream, clip_len=args.clip_len, crop_size=args.crop_size,
                                batch_size=args.batch_size, steps=args.steps, warmup=args.warmup,
                                precision=precision, device=device)  # fmt: skip
        result["model"][precision] = rate
    demand = max(result["model"].values())
    if args.data:
        for workers in (int(w) for w in args.loader_workers.split(",")):
            result["loader"][workers] = loader_throughput(args.data, stream=args.stream, clip_len=args.clip_len,
                                                          crop_size=args.crop_size, batch_size=args.batch_size,
                                                          workers=workers, clips=args.loader_clips)  # fmt: skip
    lines = [f"train bench: {args.stream} I3D, batch x T x H x W = {shape}, device {device} "
             f"({result['threads']} threads)"]  # fmt: skip
    base = result["model"].get("fp32")
    for precision, rate in result["model"].items():
        speedup = f"  x{rate / base:.2f} vs fp32" if base else ""
        lines.append(f"  model {precision:<5} {rate:8.2f} training clips/s{speedup}")
    for workers, rate in result["loader"].items():
        lines.append(f"  loader {workers} workers {rate:8.2f} clips/s = {rate / demand:.1f}x the model's demand")
    print("\n".join(lines))  # a benchmark's table is its output
    result["table"] = "\n".join(lines)
    return result
