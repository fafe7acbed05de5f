"""Extract benchmark: `quovadis extract` end to end on real videos, with each stage's busy time.

Figures: videos/s and video-seconds per wall-second (video time = frames at --fps), and per stage
the seconds spent inside its work, summed over its workers, and that sum over the wall time
("busy": 1.0 = one worker busy the whole run; decode tasks run in parallel, so theirs can exceed 1):

    decode   preprocess probe + segment tasks (includes their waits on the writer and flow actor:
             that is the backpressure that bounds memory)
    flow     the flow actor's TV-L1 calls
    load     clip loader tasks (HDF5 read + crop), timed inside the tasks
    i3d      the I3D predictor actor's calls (conversion, model, copy back)
    write    the shard writer actor's calls + the driver's feature-file writes

Stage times come from Ray's task timeline (ray.timeline), so the job runs exactly as `extract`.
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import tempfile
import time

import torch

from quovadis.jobs import extract as extract_job, options
from quovadis.jobs.bench import repeat_command
from quovadis.jobs.inputs import expand_inputs
from quovadis.jobs.runtime import init_ray

log = logging.getLogger(__name__)

STAGES = {
    "decode": ("quovadis.jobs.preprocess._decode_segment", "quovadis.jobs.preprocess._probe"),
    "flow": ("flow",),
    "load": (),  # measured inside the job (report.extra["stage_busy_s"]): the predictor actor is
    "i3d": (),  # killed at the end of the job, before its task events would reach the timeline
    "write": ("begin_video", "write_rgb", "write_flow", "end_video", "abort_video", "close"),
}


def run_bench(args: argparse.Namespace) -> int:
    videos = expand_inputs(args.inputs).paths
    with tempfile.TemporaryDirectory(prefix="bench-extract-") as tmp:
        parser = argparse.ArgumentParser()
        options.extract(parser)
        job_args = parser.parse_args([
            *videos, "--out", tmp, "--streams", args.streams, "--clip-len", str(args.clip_len),
            "--short-side", str(args.short_side), "--crop-size", str(args.crop_size), "--batch-size", str(args.batch_size),
            "--precision", args.precision, "--flow-backend", args.flow_backend,
            "--weights-rgb", args.weights_rgb, "--weights-flow", args.weights_flow,
            *(["--address", args.address] if args.address else []),
        ])  # fmt: skip
        cfg = extract_job.config_from_args(job_args)
        init_ray(args.address)  # started before the clock: a long-lived cluster is the normal case
        import ray

        started = time.perf_counter()
        report = extract_job.extract(videos, cfg)
        wall = time.perf_counter() - started
        time.sleep(2.0)  # task events reach the timeline with a delay
        busy = _stage_busy(ray.timeline())
    inside = report.extra.get("stage_busy_s", {})
    busy["load"] += inside.get("load_s", 0.0)
    busy["i3d"] += inside.get("i3d_s", 0.0)
    busy["write"] += inside.get("write_s", 0.0)
    video_s = report.frames / cfg.decode.fps
    lines = [
        f"# quovadis bench extract — {time.strftime('%Y-%m-%d')}, {_device()}",
        f"# command: {repeat_command('extract', args)}",
        f"# settings: streams {args.streams}, clip {args.clip_len}, short side {args.short_side}, crop {args.crop_size}, "
        f"batch {args.batch_size}, precision {args.precision}, flow {args.flow_backend}",
        f"videos ok {len(report.ok)}, failed {len(report.failed)}; {report.frames} frames = {video_s:.1f} video-s; "
        f"{report.clips} clips; wall {wall:.1f} s",
        f"videos/s {len(report.ok) / wall:.3f}   video-s per wall-s {video_s / wall:.3f}   clips/s {report.clips / wall:.3f}",
        "",
        "| stage | busy s | busy / wall |",
        "|---|---:|---:|",
    ]
    lines += [f"| {name} | {seconds:.1f} | {seconds / wall:.2f} |" for name, seconds in busy.items()]
    print("\n".join(lines))
    return 0 if not report.failed else 1


def _stage_busy(events: list[dict]) -> dict[str, float]:
    """Seconds inside each stage's Ray tasks / actor methods ("X" events: name, dur in us)."""
    busy = {name: 0.0 for name in STAGES}
    for e in events:
        if e.get("ph") != "X":
            continue
        for stage, names in STAGES.items():
            if e.get("name") in names:
                busy[stage] += float(e.get("dur", 0)) / 1e6
    return busy


def _device() -> str:
    cpus = len(os.sched_getaffinity(0))
    text = f"{platform.processor() or platform.machine()}, {cpus} CPU cores, torch {torch.__version__}"
    if torch.cuda.is_available():
        text += f", {torch.cuda.get_device_name(0)} x{torch.cuda.device_count()}"
    else:
        text += ", no GPU"
    return text
