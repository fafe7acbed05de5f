"""`quovadis preprocess`: videos -> 25 fps RGB (and TV-L1 flow) in sharded HDF5, on Ray.

Data flow: one streaming Ray Data graph (jobs/graph.py), the frames never in the driver:

    videos --probe, segments, decode in chunks (CPU tasks)--> chunks --flow (actor pool)-->
    --write (tasks, on the workers)--> OUT/pieces/piece-*.h5 + small "written" rows --the driver-->
    OUT/shard-N.h5 (each video's virtual datasets over its pieces) + OUT/manifest.jsonl

A video is added to a shard once all its segments are decoded and all its chunks written; a full
shard is renamed from its temporary name and its videos are recorded in the manifest
(pipeline/shards.py, pipeline/pieces.py). Ray Data bounds what waits between stages, retries a
task whose worker died and restarts a lost flow actor with its chunk redone; a chunk written twice
is read from one piece.

Re-runs: inputs recorded `ok` are skipped, `failed` ones are retried only with --retry-failed,
finished shards are never rewritten; one job at a time per output directory (a lock).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from quovadis.jobs import graph
from quovadis.jobs.inputs import expand_inputs
from quovadis.jobs.progress import Progress, probed_durations
from quovadis.jobs.report import FlowTally, JobReport, failure_reason
from quovadis.jobs.resources import preprocess_stages
from quovadis.jobs.runtime import check_shared_out, init_ray, out_dir_lock
from quovadis.pipeline import manifest, pieces
from quovadis.pipeline.clips import SegmentEnd
from quovadis.pipeline.decode import DecodeConfig, video_frames
from quovadis.pipeline.errors import ConfigError, DecodeError, QuovadisError
from quovadis.pipeline.flow import FlowConfig
from quovadis.pipeline.manifest import LedgerEntry
from quovadis.pipeline.pieces import PieceRef
from quovadis.pipeline.shards import ShardConfig, ShardWriter, list_shards, record_unlisted_shards

log = logging.getLogger(__name__)

STREAMS = ("rgb", "flow")


@dataclass(frozen=True)
class PreprocessConfig:
    out: str
    streams: tuple[str, ...] = STREAMS
    decode: DecodeConfig = field(default_factory=DecodeConfig)
    shards: ShardConfig = field(default_factory=ShardConfig)
    flow: FlowConfig = field(default_factory=FlowConfig)
    retry_failed: bool = False
    address: str | None = None

    def __post_init__(self) -> None:
        if not self.streams or "rgb" not in self.streams or set(self.streams) - set(STREAMS):
            raise ConfigError(f"--streams must be 'rgb' or 'rgb,flow', got {','.join(self.streams)!r}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def parse_size(text: str) -> int:
    """'512M', '2G', '1.5G', '1000000' -> bytes."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)i?B?\s*", text, re.IGNORECASE)
    if not m:
        raise ConfigError(f"cannot read size {text!r}; use e.g. 512M or 2G")
    return int(float(m[1]) * 1024 ** " KMGT".index(m[2].upper() or " "))


def config_from_args(args: argparse.Namespace) -> PreprocessConfig:
    streams = tuple(s.strip() for s in args.streams.split(",") if s.strip())
    decode = DecodeConfig(
        fps=args.fps, short_side=args.short_side, segment_frames=max(1, round(args.segment_seconds * args.fps)),
        timeout_s=args.decode_timeout,
    )
    shards = ShardConfig(shard_size_bytes=parse_size(args.shard_size), compression=args.compression, flow_dtype=args.flow_dtype)
    flow = dataclasses.replace(FlowConfig(), backend=args.flow_backend, device=args.flow_device)
    return PreprocessConfig(
        out=str(Path(args.out).resolve()), streams=streams, decode=decode, shards=shards, flow=flow,
        retry_failed=args.retry_failed, address=args.address,
    )


def run(args: argparse.Namespace) -> JobReport:
    cfg = config_from_args(args)
    inputs = expand_inputs(args.inputs)
    report = preprocess(inputs.paths, cfg, ignored=inputs.ignored)
    log.info("%s", report.summary())
    return report


def preprocess(
    inputs: list[str], cfg: PreprocessConfig, *, ignored: list[dict[str, str]] | None = None,
    progress: Progress | None = None,
) -> JobReport:
    """Preprocess `inputs` into cfg.out; returns the report (also written as report.json).

    `ignored`: what the directory scan passed over (jobs.inputs), for the report. `progress`: the
    caller's bar (extract --keep-shards):
    preprocess then announces each probed video on it and leaves counting it done to the caller;
    without it preprocess shows its own."""
    out = Path(cfg.out)
    report = JobReport("preprocess", config=cfg.to_dict(), ignored=list(ignored or []))
    with out_dir_lock(out):
        record_unlisted_shards(out)
        pieces.remove_unused(out, list_shards(out))
        recorded = manifest.load(out)
        todo = [p for p in inputs if not report.skip_if_done(p, recorded.get(p), cfg.retry_failed)]
        if report.skipped:
            log.info("%d inputs already recorded in %s (use --retry-failed to retry failed ones)", len(report.skipped), out)
        if todo:
            init_ray(cfg.address)
            if cfg.address:  # a cluster: every node must write into the same OUT
                check_shared_out(out)
            with contextlib.nullcontext(progress) if progress else Progress("preprocess") as bar:
                sink = _ShardSink(cfg, out, report, bar, counts_done=progress is None)
                sink.run(todo)
            _settle(report, todo, manifest.load(out), sink.writer_error, cfg.decode.fps)
        report.finish()
        try:
            report.write(out)
        except OSError as e:  # a full disk must not hide the summary
            log.error("cannot write %s/report.json: %s", out, e)
    return report


def _settle(report: JobReport, todo: list[str], recorded: dict[str, LedgerEntry], writer_error: str | None, fps: float) -> None:
    """The manifest is the truth: a video is ok only once its shard is final and recorded, so a
    video whose shard could not be finalised (e.g. a full disk) is reported failed."""
    report.ok = [p for p in todo if (e := recorded.get(p)) is not None and e.status == "ok"]
    report.frames = sum(recorded[p].frames or 0 for p in report.ok)
    report.video_seconds = report.frames / fps
    report.warnings = {p: recorded[p].warnings for p in report.ok if recorded[p].warnings}
    for path in todo:
        if path not in report.ok and path not in report.failed:
            report.failed[path] = f"{path}: not stored, its shard could not be finished: {writer_error or 'unknown'}"


@dataclass
class _Video:
    path: str
    planned: dict[str, Any] | None = None  # its probe, stored size and duration
    segments: int | None = None
    ends: dict[int, SegmentEnd] = field(default_factory=dict)
    refs: dict[tuple[str, int], PieceRef] = field(default_factory=dict)  # (stream, start) -> where it is stored


class _ShardSink:
    """Streams the videos through the graph and adds each finished video to a shard (its data is
    already in pieces): the driver writes only the shards' metadata."""

    def __init__(self, cfg: PreprocessConfig, out: Path, report: JobReport, progress: Progress, counts_done: bool) -> None:
        self.cfg, self.out, self.report = cfg, out, report
        self.progress, self.counts_done = progress, counts_done
        self.writer = ShardWriter(out, cfg.shards, cfg.to_dict())
        self.videos: dict[str, _Video] = {}
        self.finished: set[str] = set()
        self.decode_nodes: dict[str, int] = {}  # node id -> segments decoded there, for report.json
        self.flow = FlowTally()  # the flow actors' work, for report.json
        self.write_nodes: dict[str, int] = {}  # node id -> chunks written into pieces there
        self.writer_error: str | None = None

    def run(self, todo: list[str]) -> None:
        resources = preprocess_stages(self.cfg.streams, self.cfg.flow)
        rows = [graph.row(p, graph.VIDEO) for p in todo]
        ds = graph.build_preprocess(rows, self.cfg.decode, str(self.out), self.cfg.shards, resources)
        self.progress.expect_from(probed_durations(todo))
        try:
            for r in ds.iter_rows():
                self.take(r)
        except Exception as e:  # the engine gave up: exit 3, with its cause; what is finished stays
            raise QuovadisError(f"the preprocess pipeline stopped: {failure_reason(e)}") from e
        finally:
            try:
                self.writer.close()
            except QuovadisError as e:
                self.writer_error = str(e)
                log.error("%s", e)
        for path in todo:  # a safety net: every input ends ok or failed
            if path not in self.finished:
                self._fail(path, f"{path}: not all of its frames came back from the pipeline")
        self.report.extra["nodes"] = {"decode_segments": self.decode_nodes, "flow_actors": self.flow.nodes(),
                                      "chunks_written": self.write_nodes}  # fmt: skip
        if self.flow.actors:
            self.report.extra["flow"] = self.flow.summary()

    def take(self, r: dict[str, Any]) -> None:
        path, kind = r["path"], r["kind"]
        if path in self.finished:
            return  # a late row of a failed video, or a redone one of a finished video
        p = graph.payload(r)
        if kind == graph.FAILED:
            self._fail(path, p["reason"])
            return
        video = self.videos.setdefault(path, _Video(path))
        if kind == graph.PLANNED:
            video.planned = p
            self.progress.expect(path, p["duration"])
        elif kind == graph.END:
            end: SegmentEnd = p["end"]
            video.segments = p["segments"]
            if end.index not in video.ends:
                video.ends[end.index] = end
                self.decode_nodes[p["node"]] = self.decode_nodes.get(p["node"], 0) + 1
                for warning in end.warnings:  # the worker's own log never reaches the driver
                    log.warning("%s: %s", path, warning)
        elif kind == graph.WRITTEN:
            self.flow.add(p.get("flow_work"))
            fresh = [ref for ref in p["refs"] if (ref.stream, ref.start) not in video.refs]
            for ref in fresh:
                video.refs[ref.stream, ref.start] = ref
            if any(ref.stream == "rgb" for ref in fresh):
                self.progress.advance(path, p["frames"] / self.cfg.decode.fps)
                self.write_nodes[p["node"]] = self.write_nodes.get(p["node"], 0) + 1
        if video.planned is not None and video.segments is not None and len(video.ends) == video.segments:
            self._maybe_add(video)

    def _maybe_add(self, video: _Video) -> None:
        """Add the video to a shard once every frame (and flow field) of it is written."""
        ends = [video.ends[i] for i in sorted(video.ends)]
        try:
            frames = video_frames(video.path, [e.segment for e in ends], [e.frames for e in ends])
        except DecodeError as e:
            self._fail(video.path, str(e))
            return
        need = {"rgb": frames, "flow": frames - 1}
        if not all(_covered(video.refs.values(), s) >= need[s] for s in self.cfg.streams):
            return  # chunks still on their way
        planned = video.planned
        try:
            self.writer.add_video(
                video.path, height=planned["height"], width=planned["width"], frames=frames, streams=self.cfg.streams,
                attrs=planned["info"], refs=list(video.refs.values()), warnings=[w for e in ends for w in e.warnings],
                fps=self.cfg.decode.fps,
            )  # fmt: skip
        except QuovadisError as e:  # the video's own failure, or its full shard's (then of its videos too)
            self.writer_error = self.writer_error or str(e)
            self._fail(video.path, str(e) if str(e).startswith(video.path) else f"{video.path}: {e}")
            return
        self.finished.add(video.path)
        del self.videos[video.path]
        if self.counts_done:
            self.progress.done(video.path, frames / self.cfg.decode.fps)

    def _fail(self, path: str, reason: str) -> None:
        self.finished.add(path)
        self.videos.pop(path, None)
        log.warning("%s", reason)
        self.report.failed[path] = reason
        try:
            manifest.append(self.out, [LedgerEntry.failed(path, reason)])
        except QuovadisError as e:  # e.g. a full disk; the report still lists the failure
            log.error("%s", e)
        if self.counts_done:
            self.progress.done(path, failed=True)


def _covered(refs, stream: str) -> int:
    """How many frames of `stream` the refs store without a gap from frame 0."""
    reached = 0
    for ref in sorted((r for r in refs if r.stream == stream), key=lambda r: r.start):
        if ref.start > reached:
            break
        reached = max(reached, ref.stop)
    return reached
