"""`quovadis bench train`: training throughput of I3D (clips/s per device), fp32 vs mixed precision,
and whether the shard data loader keeps up with the model; with --arch, clips/s and peak memory of
each of the paper's architectures at its own training input.

Model: forward + backward + SGD step on random clips of the chosen size (default the paper's RGB
64x224x224), after warm-up steps, for each precision (fp32, bf16 autocast; fp16 autocast with a
grad scaler on CUDA). Loader: with --data, the training dataset (random start, random crop, flip)
read through a DataLoader with each --loader-workers count, in clips/s, beside the fastest model
rate ("demand"): a ratio >= 1 means the loader does not starve the device.

--arch (names of `models.archs.ARCHS`, or "all"): each architecture trains on random inputs of its
Table 1 training shape (`ARCHS`: frames, flow fields, crop) with 400 classes, in a fresh process per
architecture and precision, so that its peak memory is its own: on the CPU the process's peak RSS
(VmHWM; not ru_maxrss, which a spawned child inherits from its parent's peak), beside the growth
over the RSS before the model was built (weights, gradients, momentum and activations); on CUDA
torch.cuda.max_memory_allocated. "i3d" there is the two-stream I3D (RGB and flow nets, 64 frames
each); "i3d-r50" is `models.inflate.i3d_resnet50` on 64 RGB frames (not in Table 1). The LSTM's loss
is on every time step's logits, as the paper trains it (section 2.1).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import inspect
import multiprocessing
import os
import platform
import time
from collections.abc import Callable
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from quovadis.jobs.bench import repeat_command
from quovadis.models.archs import ARCHS, build, model_inputs
from quovadis.models.fast import PRECISIONS, autocast
from quovadis.models.i3d import InceptionI3d
from quovadis.models.weights import IN_CHANNELS
from quovadis.pipeline import conventions
from quovadis.pipeline.dataset import ShardDataset
from quovadis.pipeline.errors import ConfigError


NUM_CLASSES = 400


def model_throughput(*, stream: str, clip_len: int, crop_size: int, batch_size: int, steps: int, warmup: int,
                     precision: str, device: torch.device) -> float:  # fmt: skip
    """Training clips/s: forward, backward and an SGD step on random clips."""
    model = InceptionI3d(num_classes=NUM_CLASSES, in_channels=IN_CHANNELS[stream]).to(device)
    x = torch.rand(batch_size, IN_CHANNELS[stream], clip_len, crop_size, crop_size, device=device) * 2 - 1
    return _train_rate(model, (x,), model, steps=steps, warmup=warmup, precision=precision, device=device)


def _train_rate(model: nn.Module, inputs: tuple[torch.Tensor, ...], logits_of: Callable[..., torch.Tensor], *,
                steps: int, warmup: int, precision: str, device: torch.device) -> float:  # fmt: skip
    """Clips/s of forward (`logits_of(*inputs)`: (N, classes) or per step (N, T, classes)), cross
    entropy, backward and an SGD step, timing only the steps after `warmup`, as train does."""
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    batch_size = len(inputs[0])
    y = torch.randint(NUM_CLASSES, (batch_size,), device=device)
    started = 0.0
    for i in range(warmup + steps):
        if i == warmup:
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            started = time.perf_counter()
        with autocast(device, precision):
            logits = logits_of(*inputs).float()
        steps_y = y if logits.ndim == 2 else y[:, None].expand(logits.shape[:2])  # every step has the clip's label
        loss = F.cross_entropy(logits.flatten(0, -2), steps_y.flatten())
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
    """Measure and print a table: the single-stream I3D bench, or with --arch the per-arch one."""
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    precisions = [p.strip() for p in args.precisions.split(",") if p.strip()]
    unknown = set(precisions) - set(PRECISIONS)
    if unknown:
        raise ConfigError(f"--precisions takes {', '.join(PRECISIONS)}; got {sorted(unknown)}")
    if args.arch:
        return arch_bench(args, device, precisions)
    return _i3d_bench(args, device, precisions)


def _i3d_bench(args: argparse.Namespace, device: torch.device, precisions: list[str]) -> dict[str, Any]:
    """Returns {"model": {precision: clips/s}, "loader": {workers: clips/s}, ...}."""
    clip_len = args.clip_len or conventions.CLIP_LEN
    crop_size = args.crop_size or conventions.CROP_SIZE
    shape = f"{args.batch_size}x{clip_len}x{crop_size}x{crop_size}"
    result: dict[str, Any] = {"device": str(device), "threads": torch.get_num_threads(), "shape": shape,
                              "stream": args.stream, "model": {}, "loader": {}}  # fmt: skip
    for precision in precisions:
        rate = model_throughput(stream=args.stream, clip_len=clip_len, crop_size=crop_size,
                                batch_size=args.batch_size, steps=args.steps, warmup=args.warmup,
                                precision=precision, device=device)  # fmt: skip
        result["model"][precision] = rate
    demand = max(result["model"].values())
    if args.data:
        for workers in (int(w) for w in args.loader_workers.split(",")):
            result["loader"][workers] = loader_throughput(args.data, stream=args.stream, clip_len=clip_len,
                                                          crop_size=crop_size, batch_size=args.batch_size,
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


def arch_bench(args: argparse.Namespace, device: torch.device, precisions: list[str]) -> dict[str, Any]:
    """--arch: one fresh process per architecture and precision (see the module doc); returns
    {"rows": [measure_arch's dicts, or {"arch", "precision", "error"}], "table": ..., ...}."""
    archs = list(ARCHS) if args.arch == "all" else [a.strip() for a in args.arch.split(",") if a.strip()]
    unknown = [a for a in archs if a not in ARCHS]
    if unknown or not archs:
        raise ConfigError(f"--arch takes a comma list of {', '.join(ARCHS)}, or all; got {args.arch!r}")
    if args.data:
        raise ConfigError("--data measures the single-stream I3D loader: run it without --arch")
    job = dict(frames=args.clip_len, crop=args.crop_size, batch_size=args.batch_size, steps=args.steps,
               warmup=args.warmup, device=str(device))  # fmt: skip
    rows: list[dict[str, Any]] = []
    for arch in archs:
        for precision in precisions:
            ctx = multiprocessing.get_context("spawn")  # CUDA-safe, and nothing of this process's memory
            try:
                with concurrent.futures.ProcessPoolExecutor(1, mp_context=ctx) as pool:
                    rows.append(pool.submit(measure_arch, arch, precision=precision, **job).result())
            except (BrokenProcessPool, torch.OutOfMemoryError) as e:
                rows.append({"arch": arch, "precision": precision, "error": f"{type(e).__name__}: {e}"})
    mem = "peak alloc MiB" if device.type == "cuda" else "peak RSS MiB"
    lines = [
        f"# quovadis bench train — {time.strftime('%Y-%m-%d')}, {_device_name(device)}, torch {torch.__version__}",
        f"# command: {repeat_command('train', args)}",
        f"# {args.warmup} warm-up + {args.steps} timed steps (forward, backward, SGD) per row, {NUM_CLASSES} "
        "classes, random inputs, a fresh process per row",
        "",
        f"| arch | precision | input (per clip) | batch | clips/s | {mem} | over start MiB | params M |",
        "|---|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['arch']} | {r['precision']} | failed: {r['error']} | | | | | |")
        else:
            lines.append(f"| {r['arch']} | {r['precision']} | {r['input']} | {r['batch']} | {r['clips_per_s']:.3f} "
                         f"| {r['peak_mib']:.0f} | {r['growth_mib']:.0f} | {r['params_m']:.2f} |")  # fmt: skip
    print("\n".join(lines))  # a benchmark's table is its output
    return {"device": str(device), "rows": rows, "table": "\n".join(lines)}


def measure_arch(arch: str, *, precision: str, frames: int | None, crop: int | None, batch_size: int, steps: int,
                 warmup: int, device: str) -> dict[str, Any]:  # fmt: skip
    """One architecture's training clips/s and peak memory at its training input (or `frames` RGB
    frames and a `crop` side). Meant for a fresh process: the CPU peak is the process's."""
    spec = ARCHS[arch]
    dev = torch.device(device)
    frames, crop = frames or spec.train_rgb, crop or spec.crop
    start = _peak_mib(dev)
    sized = {"clip_frames", "crop"} <= set(inspect.signature(spec.build).parameters)  # C3D's fc6 follows the clip
    model = build(arch, num_classes=NUM_CLASSES, **({"clip_frames": frames, "crop": crop} if sized else {}))
    model = model.to(dev)
    inputs = synthetic_inputs(arch, batch_size=batch_size, frames=frames, crop=crop, device=dev)
    logits_of = model.per_time_logits if arch == "lstm" else model  # the LSTM is trained on every step
    rate = _train_rate(model, inputs, logits_of, steps=steps, warmup=warmup, precision=precision, device=dev)
    peak = _peak_mib(dev)
    shapes = " + ".join(f"{name} {'x'.join(map(str, x.shape[2:]))}" for name, x in zip(("rgb", "flow"), inputs))
    return {"arch": arch, "precision": precision, "input": shapes, "batch": batch_size, "clips_per_s": rate,
            "peak_mib": peak, "growth_mib": peak - start,
            "params_m": sum(p.numel() for p in model.parameters()) / 1e6}  # fmt: skip


def synthetic_inputs(arch: str, *, batch_size: int, frames: int, crop: int,
                     device: torch.device) -> tuple[torch.Tensor, ...]:  # fmt: skip
    """Random inputs in [-1, 1] for `arch`'s forward, made as a ShardDataset batch would be: rgb
    (N, 3, frames, H, W) and, for two-stream archs, flow (N, 2, frames x flow_per_frame, H, W)."""
    spec = ARCHS[arch]
    batch = {"rgb": torch.rand(batch_size, 3, frames, crop, crop, device=device) * 2 - 1}
    if spec.train_flow:
        batch["flow"] = torch.rand(batch_size, 2, frames * spec.flow_per_frame, crop, crop, device=device) * 2 - 1
    return model_inputs(arch, batch, tuple(batch))


def _peak_mib(device: torch.device) -> float:
    """Peak memory so far: CUDA tensors allocated, or this process's peak RSS (VmHWM, Linux)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024  # kB
    raise ConfigError("no VmHWM in /proc/self/status: the CPU peak memory needs Linux")


def _device_name(device: torch.device) -> str:
    """The CPU model and cores, or the GPU's name, for the table's header."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpu = platform.processor() or platform.machine()
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    gpu = "" if torch.cuda.is_available() else ", no GPU"
    return f"{cpu}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads{gpu}"
