"""`quovadis preprocess`: videos -> 25 fps RGB (and TV-L1 flow) in sharded HDF5, on Ray.

Data flow: the driver probes inputs (Ray tasks), plans each video's segments and submits one Ray
task per segment. A segment task decodes its frames in chunks and hands each chunk to the writer
actor (and, for flow, to a flow actor whose output also goes straight to the writer), waiting for
each write before decoding on: the object store holds at most a few chunks per task, and the driver
only ever sees small results. Segments in flight are bounded by the cluster's CPUs (backpressure).
When all segments of a video are written the writer closes the video; a full shard is renamed
from its temporary name and its videos are recorded in the manifest.

Re-runs: inputs recorded `ok` are skipped, `failed` ones are retried only with --retry-failed,
finished shards are never rewritten; one job at a time per output directory (a lock).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import logging
import math
import re
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import ray

from quovadis.jobs.inputs import expand_inputs
from quovadis.jobs.progress import Progress
from quovadis.jobs.report import JobReport, failure_reason
from quovadis.jobs.resources import cpu_flow_actor_options, cpu_flow_config, flow_on_gpu
from quovadis.jobs.runtime import ACTOR_RESTARTS, TASK_RETRIES, check_shared_out, init_ray, out_dir_lock
from quovadis.pipeline.errors import ConfigError, DecodeError, QuovadisError
from quovadis.pipeline.flow import FlowConfig, rgb_to_gray
from quovadis.pipeline.decode import DecodeConfig, Segment, iter_frames, output_size, plan_segments, video_frames
from quovadis.pipeline import manifest
from quovadis.pipeline.manifest import LedgerEntry
from quovadis.pipeline.shards import ShardConfig, ShardWriter, record_unlisted_shards, stored_flow

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
        recorded = manifest.load(out)
        todo = [p for p in inputs if not report.skip_if_done(p, recorded.get(p), cfg.retry_failed)]
        if report.skipped:
            log.info("%d inputs already recorded in %s (use --retry-failed to retry failed ones)", len(report.skipped), out)
        if todo:
            init_ray(cfg.address)
            if cfg.address:  # a cluster: every node must write into the same OUT
                check_shared_out(out)
            with contextlib.nullcontext(progress) if progress else Progress("preprocess") as bar:
                scheduler = _Scheduler(cfg, out, report, bar, counts_done=progress is None)
                scheduler.run(todo)
            _settle(report, todo, manifest.load(out), scheduler.writer_error, cfg.decode.fps)
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
    info: Any = None
    key: str | None = None
    segments: list[Segment] = field(default_factory=list)
    frames: dict[int, int] = field(default_factory=dict)  # segment index -> frames decoded
    warnings: dict[int, list[str]] = field(default_factory=dict)  # segment index -> ffmpeg's errors kept
    error: str | None = None
    attempt: int = 0  # bumped when a lost writer took its data: results of earlier attempts are stale

    def restart(self) -> None:
        """Forget what was written of it, to do it again from its probe."""
        self.info, self.key, self.segments, self.frames, self.warnings = None, None, [], {}, {}
        self.attempt += 1


class _Scheduler:
    """Keeps a bounded number of probe and segment tasks in flight and reacts as each finishes."""

    def __init__(self, cfg: PreprocessConfig, out: Path, report: JobReport, progress: Progress, counts_done: bool) -> None:
        self.cfg, self.out, self.report = cfg, out, report
        self.progress, self.counts_done = progress, counts_done
        cpus = int(ray.cluster_resources().get("CPU", 1))
        gpus = int(ray.cluster_resources().get("GPU", 0))
        self.max_in_flight = max(2, cpus + 1)
        self.writer = self._new_writer()
        self.writers_lost = 0
        self.begun: list[_Video] = []  # begun on the current writer: lost with it unless in the manifest
        self.flow_actors = []
        if "flow" in cfg.streams:
            if flow_on_gpu(cfg.flow, gpus):
                placement = [{"num_gpus": 1, "num_cpus": 0}] * gpus  # decode tasks keep every CPU slot
                flow_cfg = cfg.flow
            else:
                placement = cpu_flow_actor_options()
                flow_cfg = cpu_flow_config(cfg.flow)
            # a lost actor is restarted and its in-flight chunk redone (flow is a pure function)
            actor = ray.remote(max_restarts=ACTOR_RESTARTS, max_task_retries=TASK_RETRIES)(_FlowActor)
            self.flow_actors = [actor.options(**res).remote(flow_cfg, cfg.shards.flow_dtype) for res in placement]
        self.decode_nodes: dict[str, int] = {}  # node id -> segments decoded there, for report.json
        self.in_flight: dict[Any, tuple[str, _Video, Segment | None, int]] = {}  # ..., the video's attempt
        self.probes: deque[_Video] = deque()
        self.segments: deque[tuple[_Video, Segment]] = deque()
        self.next_segment = 0
        self.writer_error: str | None = None

    def _new_writer(self):
        """The writer actor. Not restarted by Ray: a restarted one would not have the open shard of
        the dead one, so `_writer_lost` replaces it and redoes the videos that shard held."""
        return ray.remote(num_cpus=0, max_restarts=0)(_Writer).remote(str(self.out), self.cfg.shards, self.cfg.to_dict())

    def run(self, todo: list[str]) -> None:
        self.probes.extend(_Video(p) for p in todo)
        while True:
            self._run_queued()
            try:
                ray.get(self.writer.close.remote())  # the writer records its shards' videos in the manifest
                break
            except Exception as e:
                if not self._writer_lost():  # else its videos are queued again
                    self.writer_error = self.writer_error or failure_reason(e, self.cfg.out)
                    log.error("%s", self.writer_error)
                    break
        self.report.extra["nodes"] = {"decode_segments": self.decode_nodes, "flow_actors": self._flow_nodes()}
        for actor in [*self.flow_actors, self.writer]:  # their CPUs go back to the cluster now, not at GC
            ray.kill(actor)

    def _run_queued(self) -> None:
        while self.probes or self.segments or self.in_flight:
            while len(self.in_flight) < self.max_in_flight and (self.segments or self.probes):
                if self.segments:
                    video, seg = self.segments.popleft()
                    self._submit_segment(video, seg)
                else:
                    video = self.probes.popleft()
                    self.in_flight[_probe.remote(video.path)] = ("probe", video, None, video.attempt)
            [ref], _ = ray.wait(list(self.in_flight), num_returns=1)
            kind, video, seg, attempt = self.in_flight.pop(ref)
            if attempt != video.attempt:  # an attempt whose writer was lost; the video is being redone
                continue
            try:
                result = ray.get(ref)
                if kind == "probe":
                    self.segments.extend(self._begin(video, result))
                else:
                    video.frames[seg.index], video.warnings[seg.index], node = result
                    self.decode_nodes[node] = self.decode_nodes.get(node, 0) + 1
                    for warning in video.warnings[seg.index]:  # the worker's own log never reaches the driver
                        log.warning("%s: %s", video.path, warning)
                    if len(video.frames) == len(video.segments) and video.error is None:
                        self._end(video)
            except Exception as e:  # a video's failure is never the job's
                if not self._writer_lost():
                    self._fail(video, failure_reason(e, video.path))

    def _writer_lost(self) -> bool:
        """If the writer actor died (its process was killed, its node lost): start a new one and
        put back in the queue every video begun on the dead one that the manifest does not record
        (the dead one's open shard is gone; the new one removes its temporary file). False if the
        writer is alive, or after ACTOR_RESTARTS replacements (the videos then fail)."""
        try:
            ray.get(self.writer.ping.remote())
            return False
        except ray.exceptions.RayActorError as e:
            if self.writers_lost >= ACTOR_RESTARTS:
                self.writer_error = failure_reason(e, self.cfg.out)
                return False
        self.writers_lost += 1
        recorded = manifest.load(self.out)
        lost = [v for v in self.begun if v.error is None and getattr(recorded.get(v.path), "status", None) != "ok"]
        log.warning("the shard writer was lost; writing %d videos again", len(lost))
        self.writer, self.begun = self._new_writer(), []
        ids = {id(v) for v in lost}
        self.segments = deque((v, seg) for v, seg in self.segments if id(v) not in ids)
        for video in lost:
            video.restart()
            self.probes.appendleft(video)
        return True

    def _flow_nodes(self) -> dict[str, int]:
        """node id -> flow actors running there (where Ray placed or restarted them)."""
        nodes: dict[str, int] = {}
        for actor in self.flow_actors:
            try:
                node = ray.get(actor.node.remote())
            except ray.exceptions.RayActorError:  # gone for good: its videos failed and say why
                continue
            nodes[node] = nodes.get(node, 0) + 1
        return nodes

    def _begin(self, video: _Video, info) -> list[tuple[_Video, Segment]]:
        video.info = info
        self.progress.expect(video.path, info.duration)
        height, width = output_size(info, self.cfg.decode)
        expected = math.ceil(info.duration * self.cfg.decode.fps) if info.duration else None
        self.begun.append(video)  # before the call: a writer lost during it takes the video too
        video.key = ray.get(
            self.writer.begin_video.remote(
                video.path, height=height, width=width, expected_frames=expected, fps=self.cfg.decode.fps,
                streams=self.cfg.streams, attrs=info.to_dict(),
            )
        )
        video.segments = plan_segments(info, self.cfg.decode)
        return [(video, seg) for seg in video.segments]

    def _submit_segment(self, video: _Video, seg: Segment) -> None:
        if video.error is not None:
            return
        # each segment deals its chunks round-robin over the flow actors, starting one further on
        first_actor = self.next_segment % max(1, len(self.flow_actors))
        self.next_segment += 1
        ref = _decode_segment.remote(
            video.path, video.info, video.key, seg, self.cfg.decode, self.writer, self.flow_actors, first_actor
        )
        self.in_flight[ref] = ("segment", video, seg, video.attempt)

    def _end(self, video: _Video) -> None:
        try:
            frames = video_frames(video.path, video.segments, [video.frames[s.index] for s in video.segments])
        except DecodeError as e:
            self._fail(video, str(e))
            return
        warnings = [w for s in video.segments for w in video.warnings[s.index]]
        ray.get(self.writer.end_video.remote(video.key, frames, warnings))
        if self.counts_done:
            self.progress.done(video.path, frames / self.cfg.decode.fps)

    def _fail(self, video: _Video, reason: str) -> None:
        if video.error is not None:
            return
        video.error = reason
        log.warning("%s", reason)
        if video.key is not None:
            try:
                ray.get(self.writer.abort_video.remote(video.key))
            except Exception as e:
                log.warning("could not drop the partial data of %s", failure_reason(e, video.path))
        self.report.failed[video.path] = reason
        try:
            manifest.append(self.out, [LedgerEntry.failed(video.path, reason)])
        except QuovadisError as e:  # e.g. a full disk; the report still lists the failure
            log.error("%s", e)
        if self.counts_done:
            self.progress.done(video.path, failed=True)


class _Writer:
    """The one process that writes shards (h5py is single-writer): a thin actor over ShardWriter."""

    def __init__(self, out_dir: str, cfg: ShardConfig, job_config: dict) -> None:
        self.writer = ShardWriter(Path(out_dir), cfg, job_config)

    def ping(self) -> None:
        """Answers while the actor lives (the scheduler's check after a failure)."""

    def begin_video(self, *args, **kwargs) -> str:
        return self.writer.begin_video(*args, **kwargs)

    def write_rgb(self, key: str, start: int, frames: np.ndarray) -> None:
        self.writer.write_rgb(key, start, frames)

    def write_flow(self, key: str, start: int, flow: np.ndarray) -> None:
        self.writer.write_flow(key, start, flow)

    def end_video(self, key: str, frames: int, warnings: list[str]) -> None:
        self.writer.end_video(key, frames, warnings)

    def abort_video(self, key: str) -> None:
        self.writer.abort_video(key)

    def close(self) -> None:
        self.writer.close()


class _FlowActor:
    """Holds the flow device once; receives chunks of consecutive grey frames from segment tasks
    and returns the flow as the shards store it, so each crosses the object store at its smallest."""

    def __init__(self, cfg: FlowConfig, flow_dtype: str) -> None:
        from quovadis.pipeline.flow import FlowPredictor

        self.predict = FlowPredictor(cfg)
        self.flow_dtype = flow_dtype

    def node(self) -> str:
        return ray.get_runtime_context().get_node_id()

    def flow(self, gray: np.ndarray) -> np.ndarray:
        """uint8 (t, H, W) -> (t-1, H, W, 2) quantised uint8 (flow_dtype uint8) or float16 pixels."""
        return stored_flow(self.predict(gray), self.flow_dtype)


@ray.remote(num_cpus=1, max_retries=TASK_RETRIES)  # retried when its worker dies, never for a bad file
def _probe(path: str):
    from quovadis.pipeline.probe import probe

    return probe(path)


@ray.remote(num_cpus=1, max_retries=TASK_RETRIES)  # a retry rewrites the same frames at the same places
def _decode_segment(
    path: str, info, key: str, seg: Segment, cfg: DecodeConfig, writer, flow_actors: list, first_actor: int
) -> tuple[int, list[str], str]:
    """Decode one segment chunk by chunk into the writer; returns the number of frames of the segment,
    ffmpeg's errors of a decode that kept its frames (carried back: a worker's log is not shown) and
    the id of the node it ran on.

    With flow, chunk i goes to flow_actors[(first_actor + i) % n] and up to n chunks are in flight,
    so one decode keeps every flow actor busy (decode is ~10x cheaper than flow) while memory stays
    n chunks per segment. One frame past the segment's end is decoded so that the flow fields at the
    border (seg.end-1 -> seg.end) are the ones an unsplit run computes.
    """
    end = seg.end + 1 if (flow_actors and seg.end is not None) else seg.end
    window = max(1, len(flow_actors))
    count = 0
    previous = None  # last frame of the previous chunk: the first frame of the next flow pair
    pending: deque[list] = deque()  # the writes of each chunk in flight, oldest first
    warnings: list[str] = []
    for i, chunk in enumerate(iter_frames(path, cfg, info, start=seg.start, end=end, warnings=warnings)):
        own = chunk.frames if seg.end is None else chunk.frames[: seg.end - chunk.start]
        while len(pending) >= window:  # backpressure: at most `window` chunks in flight
            ray.get(pending.popleft())
        writes = []
        if len(own):
            writes.append(writer.write_rgb.remote(key, chunk.start, own))
            count += len(own)
        if flow_actors:
            frames = chunk.frames if previous is None else np.concatenate([previous[None], chunk.frames])
            first = chunk.start if previous is None else chunk.start - 1
            if len(frames) >= 2:
                actor = flow_actors[(first_actor + i) % len(flow_actors)]
                writes.append(writer.write_flow.remote(key, first, actor.flow.remote(rgb_to_gray(frames))))
            previous = chunk.frames[-1]
        pending.append(writes)
    ray.get([ref for writes in pending for ref in writes])
    return count, warnings, ray.get_runtime_context().get_node_id()
