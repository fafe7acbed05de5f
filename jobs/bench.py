"""`quovadis bench NAME`: the benchmarks behind BENCHMARKS.md. Each lives in jobs/bench_<name>.py with
add_arguments(parser) and run_bench(args), and prints a table with the device and the command."""

from __future__ import annotations

import argparse
import importlib

BENCHMARKS: dict[str, str] = {
    "decode": "decode+resample+write frames/s against plain ffmpeg (the ceiling), per core",
    "shards": "shard compression and chunking: size, write speed, random 64-frame clip reads",
    "flow": "TV-L1 pairs/s and EPE: ours (CPU, CUDA when present) against OpenCV DualTVL1, same frames",
    "i3d": "I3D clips/s and peak memory per batch size: eager fp32 (pytorch-i3d style) against our fast path",
    "extract": "end-to-end extraction: videos/s, video-seconds per wall-second, busy fraction of each stage",
    "train": "training clips/s per device, fp32 against mixed precision, shard loader throughput against demand; "
    "with --arch, clips/s and peak memory of each architecture at its training input",
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="benchmark", required=True, metavar="BENCHMARK")
    for name, help_text in BENCHMARKS.items():
        _module(name).add_arguments(sub.add_parser(name, help=help_text, description=help_text))


def run(args: argparse.Namespace) -> int:
    """A benchmark that ran to its end exits 0; its figures are what it printed."""
    _module(args.benchmark).run_bench(args)
    return 0


def _module(name: str):
    return importlib.import_module(f"quovadis.jobs.bench_{name}")
