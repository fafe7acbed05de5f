"""Extract benchmark: `quovadis extract` end to end on real videos, with each stage's busy time
and the bytes written under OUT.

Figures: videos/s and video-seconds per wall-second (video time = frames at --fps), and per stage
the seconds spent inside its work, summed over its workers, and that sum over the wall time
("busy": 1.0 = one worker busy the whole run; decode tasks run in parallel, so theirs can exceed 1):

    decode   the Ray Data tasks plan_video + decode_clips (timeline names "FlatMap(plan_video)",
             "FlatMap(decode_clips)"; with the pre-graph extract: preprocess's _probe/_decode_segment)
    flow     the FlowStage actor pool's batches (before the graph: the flow actor's calls)
    i3d      the I3D stage's calls (conversion, model, copy back), timed inside the job
             (report.extra["stage_busy_s"]["i3d_s"])
    write    the driver's feature-file writes, timed inside the job ("write_s"), and with
             --keep-shards preprocess's write_pieces tasks (before the graph: the shard writer
             actor's calls)

and flow's cost per pair as the flow actors timed it (report.json's "flow"; `bench.flow_lines`).

Stage times come from Ray's task timeline (jobs/bench/timeline.py), so the job runs exactly as
`extract`.

Bytes under OUT: a thread polls OUT every 20 ms during the job and records each file's largest size
and OUT's peak total size. The sum of the largest sizes is a lower bound of the bytes written (a
file rewritten, or created and deleted between two polls, counts once or not at all); the feature
files (features-*.h5, *.npy, index.jsonl) are measured at the end.
"""

from __future__ import annotations

import argparse
import logging
import os
import tempfile
import threading
import time
from pathlib import Path


from quovadis.jobs import extract as extract_job, options
from quovadis.jobs.bench import device_line, flow_lines, repeat_command
from quovadis.jobs.bench.timeline import events_since, stage_busy
from quovadis.jobs.inputs import expand_inputs
from quovadis.jobs.runtime import init_ray

log = logging.getLogger(__name__)

_POLL_S = 0.02  # how often the byte watcher looks at OUT


def run_bench(args: argparse.Namespace) -> int:
    videos = expand_inputs(args.inputs).paths
    with tempfile.TemporaryDirectory(prefix="bench-extract-") as tmp:
        parser = argparse.ArgumentParser()
        options.extract(parser)
        job_args = parser.parse_args([
            *videos, "--out", tmp, "--streams", args.streams, "--clip-len", str(args.clip_len),
            *(["--stride", str(args.stride)] if args.stride else []),
            "--short-side", str(args.short_side), "--crop-size", str(args.crop_size), "--batch-size", str(args.batch_size),
            "--precision", args.precision, "--flow-backend", args.flow_backend,
            "--weights-rgb", args.weights_rgb, "--weights-flow", args.weights_flow,
            *(["--address", args.address] if args.address else []),
        ])  # fmt: skip
        cfg = extract_job.config_from_args(job_args)
        init_ray(args.address)  # started before the clock: a long-lived cluster is the normal case
        watcher = _ByteWatcher(Path(tmp))
        watcher.start()
        since = time.time()
        started = time.perf_counter()
        try:
            report = extract_job.extract(videos, cfg)
        finally:
            wall = time.perf_counter() - started
            watcher.stop()
        feature_bytes = _feature_bytes(Path(tmp))
        busy = stage_busy(events_since(since))
    inside = report.extra.get("stage_busy_s") or {}
    busy["i3d"] += inside.get("i3d_s", 0.0)
    busy["write"] += inside.get("write_s", 0.0)
    video_s = report.frames / cfg.decode.fps
    lines = [
        f"# quovadis bench extract — {time.strftime('%Y-%m-%d')}, {device_line()}",
        f"# command: {repeat_command('extract', args)}",
        f"# settings: streams {args.streams}, clip {args.clip_len}, stride {cfg.stride}, short side {args.short_side}, crop {args.crop_size}, "
        f"batch {args.batch_size}, precision {args.precision}, flow {args.flow_backend}",
        f"videos ok {len(report.ok)}, failed {len(report.failed)}; {report.frames} frames = {video_s:.1f} video-s; "
        f"{report.clips} clips; wall {wall:.1f} s",
        f"videos/s {len(report.ok) / wall:.3f}   video-s per wall-s {video_s / wall:.3f}   clips/s {report.clips / wall:.3f}",
        f"bytes written under OUT (files seen, largest size each): {watcher.seen_bytes() / 1e6:.2f} MB; "
        f"peak OUT size: {watcher.peak / 1e6:.2f} MB; feature files at the end: {feature_bytes / 1e6:.2f} MB",
        f"stage_busy_s (inside the job): {report.extra.get('stage_busy_s')}",
        "",
        "| stage | busy s | busy / wall |",
        "|---|---:|---:|",
    ]
    lines += [f"| {name} | {seconds:.1f} | {seconds / wall:.2f} |" for name, seconds in busy.items()]
    if flow := report.extra.get("flow"):
        lines += ["", *flow_lines(flow)]
    print("\n".join(lines))
    return 0 if not report.failed else 1


class _ByteWatcher:
    """Polls a directory every _POLL_S in a thread: each file's largest size seen and the peak total."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.largest: dict[str, int] = {}
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bench-bytes", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
        self._poll()  # the files as the job left them

    def seen_bytes(self) -> int:
        return sum(self.largest.values())

    def _run(self) -> None:
        while not self._stop.wait(_POLL_S):
            self._poll()

    def _poll(self) -> None:
        total = 0
        for folder, _, files in os.walk(self.root):
            for name in files:
                path = os.path.join(folder, name)
                try:
                    size = os.stat(path).st_size
                except OSError:  # deleted between the listing and the stat
                    continue
                total += size
                if size > self.largest.get(path, -1):
                    self.largest[path] = size
        self.peak = max(self.peak, total)


def _feature_bytes(out: Path) -> int:
    files = {*out.glob("features-*.h5"), *out.rglob("*.npy"), out / "index.jsonl"}
    return sum(p.stat().st_size for p in files if p.is_file())
