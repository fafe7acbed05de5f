"""The streaming Ray Data graphs of `extract` and `preprocess`: videos in, per-clip I3D features
(extract) or shards (preprocess) out; the driver never holds a frame.

extract (`build`), frames never written to disk:

    input rows --plan (probe, segments; CPU tasks)--> segment rows
               --decode (pipeline.clips; CPU tasks)--> clip rows (a run of clips: uint8 RGB, grey frames) + end rows
               --flow (actor pool: one per GPU, or CPU actors over every core)--> clips with flow (once per run)
               --I3D (actor pool: one per GPU, or one CPU actor; model loaded once)--> feature rows

preprocess (`build_preprocess`):

    input rows --plan--> a planned row (probe, size, duration) + segment rows
               --decode (pipeline.pieces; CPU tasks)--> chunk rows (uint8 RGB, grey frames) + end rows
               --flow (the same actor pool)--> chunks with flow (quantised as stored)
               --write (tasks on the workers, _PIECE_CHUNKS chunks per piece file)--> written rows

Stored videos are read in the decode stage (`dataset.read_clip`, as training reads them) and skip
flow. Every row has the same four columns: `path` (the input), `kind`, `start` (clip start, or
segment index) and `payload`, the row's Python objects pickled (protocol 5: arrays are copied
once, never converted). Rows of other kinds pass through each stage unchanged, so one stream
carries clips (preprocess: chunks, and each video's probe), each segment's end (frames decoded,
ffmpeg's warnings, the node) and failures, each failure with its reason: a bad file fails its
video once and the graph goes on. The driver reads the small output rows and assembles each video's features
(jobs/extract.py) or adds each finished video to a shard (jobs/preprocess.py).

Ray Data schedules the stages, bounds what waits between them (backpressure), retries a task whose
worker died and restarts a lost actor with its batch redone (`runtime.TASK_RETRIES`,
`ACTOR_RESTARTS`); an exception of our code is never retried. How the stages share the cluster's
CPUs and GPUs is decided in jobs/resources.py.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import time
import warnings
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import numpy as np

from quovadis.jobs.report import failure_reason
from quovadis.jobs.resources import StageResources
from quovadis.jobs.runtime import ACTOR_RESTARTS, TASK_RETRIES
from quovadis.pipeline import conventions
from quovadis.pipeline.clips import Clip, ClipRun, ClipSpec, SegmentEnd, crop_flow, segment_clips, stored_runs
from quovadis.pipeline.decode import DecodeConfig, Segment, output_size, plan_segments
from quovadis.pipeline.errors import QuovadisError
from quovadis.pipeline.probe import probe
from quovadis.pipeline.shards import stored_flow

if TYPE_CHECKING:  # a CPU task's worker imports this module: torch is imported by the actors that use it
    from quovadis.pipeline.flow import FlowConfig

_FLOW_CLIPS_IN_FLIGHT = 1  # per flow actor: a run of clips costs seconds, so queue none at a busy actor while another idles
# per CPU I3D actor: its torch threads take every core, so a call queued at it cannot start
# sooner; `bench extract` of 4 x 16 s videos, RGB: 16.8 and 17.0 s of wall against 19.6 and
# 20.1 s with Ray Data's default of 4, the same I3D busy time. On a GPU the default stays: the
# next batch is ready when the GPU is done with one.
_CPU_I3D_CALLS_IN_FLIGHT = 1
_PLAN_CPUS = 0.25  # a probe task's CPU share
_MAX_INPUT_BLOCKS = 4096  # input rows are split into this many blocks at most: the plan tasks' parallelism

_PIECE_CHUNKS = 8  # decoded chunks per piece file (pipeline/pieces.py): ~150 MB of 32 frames at 256x455 with flow

# kinds of rows
VIDEO, STORED, PLANNED, SEGMENT, CLIP, END, FAILED, FEATURES = "video", "stored", "planned", "segment", "clip", "end", "failed", "features"
CHUNK, WRITTEN = "chunk", "written"  # preprocess: decoded frames (and their flow); a chunk stored in a piece


def row(path: str, kind: str, start: int = -1, **payload: Any) -> dict[str, Any]:
    return {"path": path, "kind": kind, "start": int(start), "payload": pickle.dumps(payload, protocol=5)}


def payload(r: dict[str, Any]) -> dict[str, Any]:
    return pickle.loads(r["payload"])


def _failed(path: str, reason: str) -> dict[str, Any]:
    return row(path, FAILED, reason=reason if reason.startswith(path) else f"{path}: {reason}")


def _node() -> str:
    import ray

    return ray.get_runtime_context().get_node_id()


# -- the stages (Ray-free apart from reading the node id) ---------------------------------------------


def plan_video(r: dict[str, Any], decode: DecodeConfig, spec: ClipSpec | None) -> Iterator[dict[str, Any]]:
    """A video row -> its segment rows, or one failed row; other rows pass. `spec`: extract's clips
    (their crop box is checked here), None for preprocess, whose segments follow a planned row
    (the probe and size, stored with the video)."""
    if r["kind"] != VIDEO:
        yield r
        return
    path = r["path"]
    try:
        info = probe(path)
        box = spec.crop_box(*output_size(info, decode)) if spec is not None else None
    except QuovadisError as e:
        yield _failed(path, str(e))
        return
    height, width = output_size(info, decode)
    attrs = {"short_side": decode.short_side, "height": height, "width": width, "fps": decode.fps,
             "duration": info.duration or 0.0}  # fmt: skip
    segments = plan_segments(info, decode)
    if spec is None:  # preprocess stores the probe with the video
        yield row(path, PLANNED, duration=attrs["duration"], info=info.to_dict(), height=height, width=width)
    for seg in segments:
        yield row(path, SEGMENT, seg.index, info=info, seg=seg, segments=len(segments), box=box, attrs=attrs)


def decode_clips(r: dict[str, Any], decode: DecodeConfig, spec: ClipSpec) -> Iterator[dict[str, Any]]:
    """A segment row -> its clip rows (a ClipRun each) and end row; a stored row -> its clips read
    from the shard and an end row; a failure -> one failed row (clips already sent are dropped by
    the driver)."""
    path = r["path"]
    if r["kind"] not in (SEGMENT, STORED):
        yield r
        return
    p = payload(r)
    try:
        if r["kind"] == SEGMENT:
            parts = segment_clips(path, p["info"], p["seg"], decode, spec, p["box"])
            attrs = p["attrs"]
        else:
            attrs = {}  # filled from the shard as it is opened
            parts = _stored_clips(p["shard"], p["key"], p["frames"], p["warnings"], spec, attrs)
        for part in parts:
            if isinstance(part, SegmentEnd):
                yield row(path, END, part.index, end=part, segments=p.get("segments", 1), attrs=attrs, node=_node())
            else:
                for clip in part.clips:
                    if "flow" in spec.streams and clip.fields is None and clip.flow is None:  # a one-frame video
                        clip.flow = np.zeros((spec.clip_len, clip.box[2], clip.box[3], 2), np.float32)
                yield row(path, CLIP, part.start, run=part)
    except (QuovadisError, OSError, KeyError, ValueError) as e:
        yield _failed(path, failure_reason(e, path))


def _stored_clips(shard: str, key: str, frames: int, warnings: list[str], spec: ClipSpec,
                  attrs: dict[str, Any]) -> Iterator[ClipRun | SegmentEnd]:  # fmt: skip
    """The clips of a video stored in a shard (as preprocess wrote it), then its end; `attrs` gets
    its decode settings and size on opening."""
    from pathlib import Path

    import h5py

    from quovadis.pipeline.dataset import read_clip
    from quovadis.pipeline.shards import StoredVideo

    with h5py.File(shard, "r") as f:
        video = StoredVideo(f[key], Path(shard))
        short_side = video.config.get("decode", {}).get("short_side", -1)
        attrs.update(short_side=short_side, height=video.height, width=video.width, fps=video.fps, duration=frames / video.fps)
        box = spec.crop_box(video.height, video.width)
        region = (slice(box[0], box[0] + box[2]), slice(box[1], box[1] + box[3]))
        streams = [s for s in spec.streams if s == "rgb" or frames >= 2]
        if "flow" in streams and "flow" not in video.streams:
            raise QuovadisError(f"{shard} has no flow for it; preprocess with --streams rgb,flow or extract --streams rgb")

        def clips() -> Iterator[Clip]:
            for start in conventions.clip_starts(frames, spec.clip_len, spec.stride):
                clip = read_clip(video.group, start, frames, spec.clip_len, streams, region)
                yield Clip(start, box, rgb=clip.get("rgb"), flow=clip.get("flow"))

        yield from stored_runs(clips(), spec)
    yield SegmentEnd(Segment(0, 0, None), frames, frames, warnings)


def decode_chunks(r: dict[str, Any], decode: DecodeConfig, flow: bool) -> Iterator[dict[str, Any]]:
    """preprocess: a segment row -> its chunk rows (with grey frames for flow) and end row, or a
    failed row (chunks already sent are dropped by the driver); other rows pass."""
    if r["kind"] != SEGMENT:
        yield r
        return
    from quovadis.pipeline.pieces import segment_chunks

    path, p = r["path"], payload(r)
    try:
        for part in segment_chunks(path, p["info"], p["seg"], decode, flow):
            if isinstance(part, SegmentEnd):
                yield row(path, END, part.index, end=part, segments=p["segments"], node=_node())
            else:
                yield row(path, CHUNK, part.start, chunk=part)
    except (QuovadisError, OSError, ValueError) as e:
        yield _failed(path, failure_reason(e, path))


def write_pieces(batch: dict[str, np.ndarray], shard_dir: str, compression: dict[str, Any], chunk_frames: int) -> dict[str, list]:
    """preprocess's sink, on the worker that runs it: the chunk rows of a batch (of any videos) into
    one new piece file -> a written row per chunk (its piece refs); a failed row per chunk when the
    piece cannot be written (e.g. a full disk); other rows pass."""
    from pathlib import Path

    from quovadis.pipeline.pieces import write_piece

    rows = list(_rows(batch))
    out = [r for r in rows if r["kind"] != CHUNK]
    chunks = [(r, payload(r)) for r in rows if r["kind"] == CHUNK]
    if chunks:
        try:
            refs = write_piece(Path(shard_dir), [p["chunk"] for _, p in chunks], compression, chunk_frames)
            node = _node()
            for (r, p), mine in zip(chunks, refs):
                chunk = p["chunk"]
                out.append(row(r["path"], WRITTEN, r["start"], refs=mine, frames=len(chunk.rgb), node=node, flow_work=p.get("flow_work")))
        except QuovadisError as e:
            out += [_failed(r["path"], failure_reason(e, r["path"])) for r, _ in chunks]
    return _columns(out)


class FlowStage:
    """Flow of each run of clips (extract) or chunk (preprocess) from its grey frames, stored as
    shards store it (quantised uint8 or float16), each clip's cropped; one TV-L1 device per actor.
    The row's `flow_work` says which actor, its how-manieth call, its pairs, and the seconds and
    the actor process's CPU seconds it took (report.FlowTally, report.json): CPU seconds are what
    `bench flow` reports, and unlike the wall they do not count what other processes on the same
    cores took."""

    def __init__(self, cfg: FlowConfig, flow_dtype: str) -> None:
        from quovadis.pipeline.flow import FlowPredictor

        self.predict = FlowPredictor(cfg)
        self.flow_dtype = flow_dtype
        self.actor = f"{_node()}:{os.getpid()}"
        self.calls = 0  # the first holds torch.compile's (or CUDA's) start

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list]:
        out: dict[str, list] = {"path": [], "kind": [], "start": [], "payload": []}
        for r in _rows(batch):
            name = {CLIP: "run", CHUNK: "chunk"}.get(r["kind"])
            if name and (p := payload(r))[name].gray is not None:
                item = p[name]
                try:
                    started, started_cpu = time.perf_counter(), time.process_time()
                    stored = stored_flow(self.predict(item.gray), self.flow_dtype)
                    if name == "run":
                        for clip in item.clips:
                            clip.flow = np.ascontiguousarray(crop_flow(stored, clip))
                    else:
                        item.flow = stored
                    item.gray = None
                    work = {"actor": self.actor, "call": self.calls, "pairs": len(stored),
                            "s": time.perf_counter() - started, "cpu_s": time.process_time() - started_cpu}  # fmt: skip
                    r = row(r["path"], r["kind"], item.start, **{name: item}, flow_work=work)
                    self.calls += 1
                except QuovadisError as e:
                    r = _failed(r["path"], str(e))
            for k in out:
                out[k].append(r[k])
        return out


class I3DStage:
    """I3D features of the clips of a batch of runs (across videos), at most `batch_size` clips per
    model call; one model per actor."""

    def __init__(self, cfg, all_cores: bool, batch_size: int) -> None:
        import torch

        from quovadis.models.predictor import I3DPredictor

        if all_cores:  # Ray sets OMP_NUM_THREADS=1 in workers; this actor is the CPU's main user
            torch.set_num_threads(max(1, len(os.sched_getaffinity(0))))
        self.predict = I3DPredictor(cfg)
        self.streams = tuple(cfg.streams)
        self.batch_size = batch_size

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list]:
        started = time.perf_counter()
        rows = list(_rows(batch))
        out = [r for r in rows if r["kind"] != CLIP]
        groups: dict[tuple, list[tuple[str, Clip, dict | None]]] = {}  # clips of one shape: (path, clip, its run's flow work)
        for r in rows:
            if r["kind"] == CLIP:
                p = payload(r)
                for clip in p["run"].clips:
                    kind = tuple((s, getattr(clip, s).shape, getattr(clip, s).dtype.str) for s in self.streams)
                    groups.setdefault(kind, []).append((r["path"], clip, p.get("flow_work")))
        for group in groups.values():
            for first in range(0, len(group), self.batch_size):
                members = group[first : first + self.batch_size]
                try:
                    inputs = {s: np.stack([getattr(clip, s) for _, clip, _ in members]) for s in self.streams}
                    result = self.predict({"clip_id": np.arange(len(members)), **inputs})
                except (QuovadisError, RuntimeError, ValueError) as e:
                    out.extend(_failed(path, failure_reason(e, path)) for path, _, _ in members)
                    continue
                names = [n for n in result if n != "clip_id"]
                for i, (path, clip, work) in enumerate(members):
                    out.append(row(path, FEATURES, clip.start, flow_work=work, **{n: np.asarray(result[n][i]) for n in names}))
        busy = (time.perf_counter() - started) / max(1, len(out))
        return {**_columns(out), "busy_s": [busy] * len(out)}


def _columns(rows: list[dict[str, Any]]) -> dict[str, list]:
    return {k: [r[k] for r in rows] for k in ("path", "kind", "start", "payload")}


def _rows(batch: dict[str, np.ndarray]) -> Iterator[dict[str, Any]]:
    for i in range(len(batch["path"])):
        yield {"path": str(batch["path"][i]), "kind": str(batch["kind"][i]), "start": int(batch["start"][i]), "payload": batch["payload"][i]}


class _InTurn:
    """Ray options for each new actor of a pool (Ray Data asks before starting one): the next of
    `options`, from the first again after the last, so a replacement actor takes a turn too."""

    def __init__(self, options: list[dict[str, Any]]) -> None:
        self.options, self.started = options, 0

    def __call__(self) -> dict[str, Any]:
        chosen = self.options[self.started % len(self.options)]
        self.started += 1
        return dict(chosen)


# bounded retries of work lost with its process (Ray Data's own default retries for ever, so a
# video that kills its worker every time would never fail); Ray 2.60 takes them only as
# ray_remote_args, which it calls deprecated
_TASKS = {"num_cpus": 1, "max_retries": TASK_RETRIES}
_ACTORS = {"max_restarts": ACTOR_RESTARTS, "max_task_retries": TASK_RETRIES}


@contextlib.contextmanager
def _remote_args_quiet() -> Iterator[None]:
    """Ray 2.60's warning that `_TASKS`' and `_ACTORS`' retries given as remote args are deprecated."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*ray_remote_args.*deprecated")
        yield


def _planned(inputs: list[dict[str, Any]], decode: DecodeConfig, spec: ClipSpec | None):
    """The dataset of `inputs` through the plan stage, one row per block."""
    import ray.data

    ds = ray.data.from_items(inputs, override_num_blocks=max(1, min(len(inputs), _MAX_INPUT_BLOCKS)))
    # one row per block: a block is what one task or actor call takes, and in blocks of Ray
    # Data's default 128 MiB all the clips of a segment would go to one flow actor
    ds.context.target_max_block_size = 1
    # a probe is light; its own resources also keep Ray Data from fusing it with decode into one
    # task, which would decode the segments of a video one after the other
    return ds.flat_map(plan_video, fn_kwargs={"decode": decode, "spec": spec}, **{**_TASKS, "num_cpus": _PLAN_CPUS})


def _with_flow(ds, resources: StageResources, flow_dtype: str):
    import ray.data

    first = resources.flow_actor_options[0]
    return ds.map_batches(
        FlowStage, fn_constructor_kwargs={"cfg": resources.flow_cfg, "flow_dtype": flow_dtype}, batch_size=1,
        compute=ray.data.ActorPoolStrategy(size=len(resources.flow_actor_options), max_tasks_in_flight_per_actor=_FLOW_CLIPS_IN_FLIGHT),
        # the first actor's resources for Ray Data's budget; each actor's own (and its node) in turn
        num_cpus=first.get("num_cpus"), num_gpus=first.get("num_gpus"), ray_remote_args_fn=_InTurn(resources.flow_actor_options), **_ACTORS,
    )  # fmt: skip


def build(inputs: list[dict[str, Any]], decode: DecodeConfig, spec: ClipSpec, flow_dtype: str, predictor_cfg,
          resources: StageResources, batch_size: int):  # fmt: skip
    """extract's Ray Data dataset of `inputs` (rows made by `row`: VIDEO or STORED) -> output rows
    (FEATURES, END, FAILED). Lazy: it runs as the caller iterates it."""
    import ray.data

    with _remote_args_quiet():
        ds = _planned(inputs, decode, spec)
        ds = ds.flat_map(decode_clips, fn_kwargs={"decode": decode, "spec": spec}, **_TASKS)
        if "flow" in spec.streams and resources.flow_actor_options:
            ds = _with_flow(ds, resources, flow_dtype)
        i3d_options = dict(resources.i3d_options)
        return ds.map_batches(
            I3DStage, fn_constructor_kwargs={"cfg": predictor_cfg, "all_cores": resources.i3d_all_cores, "batch_size": batch_size},
            # runs of clips per call: batch_size clips when runs are full
            batch_size=max(1, batch_size // spec.run_clips),
            compute=ray.data.ActorPoolStrategy(size=resources.i3d_actors, max_tasks_in_flight_per_actor=_CPU_I3D_CALLS_IN_FLIGHT if resources.i3d_all_cores else None),
            num_cpus=i3d_options.pop("num_cpus", None), num_gpus=i3d_options.pop("num_gpus", None),
            **_ACTORS, **i3d_options,
        )  # fmt: skip


def build_preprocess(inputs: list[dict[str, Any]], decode: DecodeConfig, shard_dir: str, shards, resources: StageResources):
    """preprocess's Ray Data dataset of VIDEO rows -> output rows (PLANNED, END, WRITTEN, FAILED);
    the frames stay on the workers and in the pieces they write. `shards`: a ShardConfig; flow
    runs when `resources` has flow actors. Lazy: it runs as the caller iterates it."""
    from quovadis.pipeline.shards import compression_options

    flow = bool(resources.flow_actor_options)
    with _remote_args_quiet():
        ds = _planned(inputs, decode, None)
        ds = ds.flat_map(decode_chunks, fn_kwargs={"decode": decode, "flow": flow}, **_TASKS)
        if flow:
            ds = _with_flow(ds, resources, shards.flow_dtype)
        # no CPU slot: a write waits on the disk, and a decode paused by backpressure must never
        # hold the CPU the write of its output needs
        return ds.map_batches(
            write_pieces, batch_size=_PIECE_CHUNKS, num_cpus=0, max_retries=TASK_RETRIES,
            fn_kwargs={"shard_dir": shard_dir, "compression": compression_options(shards.compression),
                       "chunk_frames": shards.chunk_frames},
        )  # fmt: skip
