"""Preprocess benchmark: `quovadis preprocess` end to end on real videos, with each stage's busy time
and flow's cost per pair inside the job.

Figures: video-seconds per wall-second and frames/s (video time = frames at --fps), the bytes the
job left under OUT (shards and their pieces), and per stage (decode, flow, write) the seconds spent
inside its work, summed over its workers (jobs/bench/timeline.py), and flow's cost per pair as the
flow actors timed it (report.json's "flow"; `bench.flow_lines`).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from quovadis.jobs import options, preprocess as preprocess_job
from quovadis.jobs.bench import device_line, flow_lines, repeat_command
from quovadis.jobs.bench.timeline import events_since, stage_busy
from quovadis.jobs.inputs import expand_inputs
from quovadis.jobs.runtime import init_ray

def run_bench(args: argparse.Namespace) -> int:
    inputs = expand_inputs(args.inputs)
    with tempfile.TemporaryDirectory(prefix="bench-preprocess-") as tmp:
        parser = argparse.ArgumentParser()
        options.preprocess(parser)
        job_args = parser.parse_args([
            *inputs.paths, "--out", tmp, "--streams", args.streams, "--short-side", str(args.short_side),
            "--compression", args.compression, "--flow-backend", args.flow_backend,
            *(["--address", args.address] if args.address else []),
        ])  # fmt: skip
        cfg = preprocess_job.config_from_args(job_args)
        init_ray(args.address)  # started before the clock: a long-lived cluster is the normal case
        since = time.time()
        started = time.perf_counter()
        report = preprocess_job.preprocess(inputs.paths, cfg, ignored=inputs.ignored)
        wall = time.perf_counter() - started
        stored = sum(p.stat().st_size for p in Path(tmp).rglob("*") if p.is_file())
        events = events_since(since)
    print("\n".join(_lines(args, report, wall, stored, events, cfg.decode.fps)))
    return 0 if not report.failed else 1


def _lines(args: argparse.Namespace, report, wall: float, stored: int, events: list[dict], fps: float) -> list[str]:
    busy = stage_busy(events)
    video_s = report.frames / fps
    lines = [
        f"# quovadis bench preprocess — {time.strftime('%Y-%m-%d')}, {device_line()}",
        f"# command: {repeat_command('preprocess', args)}",
        f"videos ok {len(report.ok)}, failed {len(report.failed)}; {report.frames} frames = {video_s:.1f} video-s; wall {wall:.1f} s",
        f"video-s per wall-s {video_s / wall:.3f}   frames/s {report.frames / wall:.1f}   stored under OUT {stored / 1e6:.1f} MB",
        "",
        "| stage | busy s | busy / wall |",
        "|---|---:|---:|",
        *(f"| {name} | {seconds:.2f} | {seconds / wall:.2f} |" for name, seconds in busy.items() if name != "i3d"),
    ]
    if flow := report.extra.get("flow"):
        lines += ["", *flow_lines(flow)]
    return lines
