"""`quovadis bench NAME`: the benchmarks behind BENCHMARKS.md. Each lives in jobs/bench/<name>.py with
run_bench(args) (its options are in jobs/options.py) and prints a table with the device and the command."""

from __future__ import annotations

import argparse
import importlib
import shlex

BENCHMARKS: dict[str, str] = {
    "decode": "decode+resample+write frames/s against plain ffmpeg (the ceiling), per core",
    "shards": "shard compression and chunking: size, write speed, random 64-frame clip reads",
    "flow": "TV-L1 pairs/s and EPE: ours (CPU, CUDA when present) against OpenCV DualTVL1, same frames",
    "i3d": "I3D clips/s and peak memory per batch size: eager fp32 (pytorch-i3d style) against our fast path",
    "preprocess": "preprocessing end to end: video-seconds per wall-second, each stage's busy time, flow's cost per pair in the job",
    "extract": "end-to-end extraction: videos/s, video-seconds per wall-second, busy fraction of each stage",
    "train": "training clips/s per device, fp32 against mixed precision, shard loader throughput against demand; "
    "with --arch, clips/s and peak memory of each architecture at its training input",
}


def run(args: argparse.Namespace) -> int:
    """A benchmark that ran to its end exits 0; its figures are what it printed."""
    _module(args.benchmark).run_bench(args)
    return 0


def _module(name: str):
    return importlib.import_module(f"quovadis.jobs.bench.{name}")


def device_line() -> str:
    """This machine as a figure's heading gives it: CPU, cores, torch, GPUs."""
    import os
    import platform

    import torch

    text = f"{platform.processor() or platform.machine()}, {len(os.sched_getaffinity(0))} CPU cores, torch {torch.__version__}"
    if torch.cuda.is_available():
        return f"{text}, {torch.cuda.get_device_name(0)} x{torch.cuda.device_count()}"
    return f"{text}, no GPU"


def repeat_command(name: str, args: argparse.Namespace) -> str:
    """`quovadis bench NAME` with the arguments of this run that differ from the defaults: the
    command that repeats it, printed with its figures."""
    from quovadis.jobs import options  # which imports BENCHMARKS from here

    parser = argparse.ArgumentParser()
    options.BENCH_OPTIONS[name](parser)
    defaults = vars(parser.parse_args([]))
    positional = {a.dest for a in parser._actions if not a.option_strings}
    words = [f"quovadis bench {name}"]
    for key, value in vars(args).items():
        if key not in defaults or value == defaults[key]:
            continue
        if key in positional:
            words += [shlex.quote(str(v)) for v in value]
        else:
            words.append(f"--{key.replace('_', '-')} {shlex.quote(str(value))}")
    return " ".join(words)
