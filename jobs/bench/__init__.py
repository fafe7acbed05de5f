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


def flow_lines(flow: dict) -> list[str]:
    """The flow actors' cost per pair (report.json's "flow", report.FlowTally), in wall and in CPU
    seconds, all calls and without each actor's first (its torch.compile or CUDA start): the figures
    to set against `bench flow --pairs 0` on the same video, which reports CPU seconds."""
    actors = flow["actors"].values()
    firsts = [a["first_call_s"] for a in actors if a["first_call_s"] is not None]
    later_pairs = flow["pairs"] - sum(a["first_call_pairs"] for a in actors)

    def later(total: float, first: str) -> str:
        rest = total - sum(a[first] for a in actors if a[first] is not None)
        return f"the other calls {rest / later_pairs:.3f} per pair" if later_pairs else "no other calls"

    return [
        f"flow: {flow['pairs']} pairs on {len(actors)} actors, {flow['busy_s']:.1f} s busy = {flow['s_per_pair']:.3f} s per pair; "
        f"each actor's first call {', '.join(f'{s:.1f}' for s in firsts)} s; {later(flow['busy_s'], 'first_call_s')}",
        f"flow CPU s (the actors' processes, as `bench flow` counts): {flow['cpu_s']:.1f} = {flow['cpu_s_per_pair']:.3f} per pair; "
        f"{later(flow['cpu_s'], 'first_call_cpu_s')}",
    ]  # fmt: skip
