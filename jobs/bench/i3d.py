"""I3D inference benchmark: clips/s and peak memory per batch size, eager float32 the pytorch-i3d way
(F.pad before every layer, NCTHW, no autocast) beside the `models.fast` variants, in one run, with
each variant's max abs / min cosine difference of features to that baseline on the same clips.

Peak memory: torch.cuda.max_memory_allocated on CUDA (tensors only); on the CPU the peak resident
set size (getrusage ru_maxrss) of a fresh process per measurement, so it includes Python, torch
and the weights (~0.5 GiB), not only activations.
On CUDA the baseline keeps PyTorch's default torch.backends.cudnn.allow_tf32 = True (TF32 float32
convolutions), as pytorch-i3d gets when run today.
Weights are random (BatchNorm statistics included) unless --weights is given: speed does not
depend on them, and the feature differences are of the same kind.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import logging
import multiprocessing
import platform
import resource
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from quovadis.models.fast import EAGER_FP32, FastI3D, InferenceConfig
from quovadis.models.i3d import InceptionI3d, Unit3D
from quovadis.models.padding import MaxPoolSame
from quovadis.models.weights import IN_CHANNELS, load_i3d
from quovadis.pipeline.errors import ConfigError

log = logging.getLogger(__name__)

BASELINE = "fp32-pytorch-i3d"
VARIANTS: dict[str, InferenceConfig] = {
    BASELINE: EAGER_FP32,  # plus dynamic padding everywhere, see _pytorch_i3d_padding
    "fp32": EAGER_FP32,
    "fp32-cl-fold": InferenceConfig(dtype="float32"),
    "bf16-cl-fold": InferenceConfig(dtype="bfloat16"),
    "fp16-cl-fold": InferenceConfig(dtype="float16"),
    "bf16-cl-fold-compile": InferenceConfig(dtype="bfloat16", compile="default"),
    "bf16-cl-fold-graphs": InferenceConfig(dtype="bfloat16", compile="reduce-overhead"),
    "fp16-cl-fold-compile": InferenceConfig(dtype="float16", compile="default"),
}
DEFAULT_VARIANTS = {
    "cuda": list(VARIANTS),
    "cpu": [BASELINE, "fp32", "fp32-cl-fold", "bf16-cl-fold"],  # compile: add it by name, slow to build on few cores
}


@dataclass
class Measurement:
    variant: str
    batch: int
    seconds_per_batch: float
    peak_mib: float
    features: np.ndarray = field(repr=False)

    @property
    def clips_per_second(self) -> float:
        return self.batch / self.seconds_per_batch


def _int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError as e:
        raise ConfigError(f"--batch-sizes must be comma-separated integers, got {text!r}") from e
    if not values or min(values) < 1:
        raise ConfigError(f"--batch-sizes must be >= 1, got {text!r}")
    return values


def run_bench(args: argparse.Namespace) -> int:
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda: torch.cuda.is_available() is false")
    on_cuda = device.type == "cuda"
    batches = _int_list(args.batch_sizes or ("1,2,4,8,16,32" if on_cuda else "1,2"))
    variants = args.variants.split(",") if args.variants else DEFAULT_VARIANTS[device.type]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise ConfigError(f"unknown variants {unknown}; choose from {list(VARIANTS)}")
    if BASELINE not in variants:
        variants = [BASELINE, *variants]
    iters = args.iters or (20 if on_cuda else 2)
    warmup = args.warmup if args.warmup is not None else (5 if on_cuda else 1)
    job = dict(frames=args.frames, size=args.size, stream=args.stream, weights=args.weights,
               iters=iters, warmup=warmup, device=str(device))
    results: list[Measurement] = []
    for batch in batches:
        for variant in variants:
            try:
                if on_cuda:
                    m = _measure(variant, batch, **job)
                else:  # a fresh process each, so ru_maxrss is this measurement's peak
                    ctx = multiprocessing.get_context("spawn")
                    with concurrent.futures.ProcessPoolExecutor(1, mp_context=ctx) as pool:
                        m = pool.submit(_measure, variant, batch, **job).result()
            except torch.OutOfMemoryError:
                log.warning("%s at batch %d: out of memory", variant, batch)
                torch.cuda.empty_cache()
                continue
            if on_cuda:
                torch.cuda.empty_cache()
            results.append(m)
            log.info("%s batch %d: %.2f clips/s", variant, batch, m.clips_per_second)
    _print_table(results, args, device, iters, warmup)
    return 0


def _pytorch_i3d_padding(model: InceptionI3d) -> InceptionI3d:
    """Pad every layer with F.pad in forward, as pytorch-i3d does (same numbers, one more copy per
    layer), instead of the layer's own padding where it is static."""
    for module in model.modules():
        if isinstance(module, Unit3D):
            module.conv3d.padding = (0, 0, 0)
            module.dynamic_pad = True
        elif isinstance(module, MaxPoolSame):
            module.pool.padding = 0
            module.dynamic = True
    return model


def _build_model(stream: str, weights: str | None) -> InceptionI3d:
    if weights:
        return load_i3d(stream, weights)
    torch.manual_seed(0)
    model = InceptionI3d(in_channels=IN_CHANNELS[stream])
    for m in model.modules():  # He init keeps activations at a realistic scale through 60 layers
        if isinstance(m, torch.nn.Conv3d):
            torch.nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
        if isinstance(m, torch.nn.BatchNorm3d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    return model.eval()


def _measure(variant: str, batch: int, *, frames: int, size: int, stream: str, weights: str | None,
             iters: int, warmup: int, device: str) -> Measurement:
    dev = torch.device(device)
    if VARIANTS[variant].compile != "none":
        torch._dynamo.reset()  # a fresh compile per batch size, as an extractor with one size has
    model = _build_model(stream, weights)
    if variant == BASELINE:
        model = _pytorch_i3d_padding(model)
    fast = FastI3D(model, dev, VARIANTS[variant])
    generator = torch.Generator().manual_seed(batch)
    clips = torch.rand(batch, IN_CHANNELS[stream], frames, size, size, generator=generator) * 2 - 1
    clips = clips.to(dev)
    if dev.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    features = None
    for _ in range(warmup):
        features, _ = fast(clips)
    _sync(dev)
    started = time.perf_counter()
    for _ in range(iters):
        features, _ = fast(clips)
    _sync(dev)
    seconds = (time.perf_counter() - started) / iters
    if dev.type == "cuda":
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    return Measurement(variant, batch, seconds, peak, features.cpu().numpy())


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize()


def _print_table(results: list[Measurement], args: argparse.Namespace, device: torch.device,
                 iters: int, warmup: int) -> None:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else (
        f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads")
    base = {m.batch: m for m in results if m.variant == BASELINE}
    mem = "peak alloc MiB" if device.type == "cuda" else "peak RSS MiB"
    lines = [
        f"quovadis bench i3d --frames {args.frames} --size {args.size} --stream {args.stream} "
        f"(torch {torch.__version__}, {name}; {warmup} warm-up + {iters} timed batches; "
        f"weights {args.weights or 'random'})",
        f"{'variant':22} {'batch':>5} {'clips/s':>9} {'ms/clip':>9} {mem:>14} {'speedup':>8} {'max|f|':>9} "
        f"{'max|df|':>9} {'min cos':>9}",
    ]
    for m in results:
        b = base.get(m.batch)
        speedup = m.clips_per_second / b.clips_per_second if b else float("nan")
        diff, cos = _difference(m.features, b.features) if b else (float("nan"), float("nan"))
        scale = float(np.abs(b.features).max()) if b else float("nan")
        lines.append(f"{m.variant:22} {m.batch:>5} {m.clips_per_second:9.3f} {1000 / m.clips_per_second:9.1f} "
                     f"{m.peak_mib:14.0f} {speedup:8.2f} {scale:9.2e} {diff:9.2e} {cos:9.6f}")
    print("\n".join(lines))  # a benchmark's table is its output


def _difference(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """Max abs difference and the smallest per-clip cosine similarity of two (N, 1024) arrays."""
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    cos = (a64 * b64).sum(1) / np.maximum(np.linalg.norm(a64, axis=1) * np.linalg.norm(b64, axis=1), 1e-30)
    return float(np.abs(a64 - b64).max()), float(cos.min())
