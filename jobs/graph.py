"""The streaming Ray Data graph of `extract`: videos (or stored videos of shard directories) in,
per-clip I3D features out, frames never written to disk.

    input rows --plan (probe, segments; CPU tasks)--> a planned row (probed duration) + segment rows
               --decode (pipeline.clips; CPU tasks)--> clip rows (uint8 RGB, grey frames) + end rows
               --flow (actor pool: one per GPU, or CPU actors over every core)--> clips with flow
               --I3D (actor pool: one per GPU, or one CPU actor; model loaded once)--> feature rows

Stored videos are read in the decode stage (`dataset.read_clip`, as training reads them) and skip
flow. Every row has the same four columns: `path` (the input), `kind`, `start` (clip start, or
segment index) and `payload`, the row's Python objects pickled (protocol 5: arrays are copied
once, never converted). Rows of other kinds pass through each stage unchanged, so one stream
carries clips, each video's probed duration, each segment's end (frames decoded, ffmpeg's
warnings, the node) and failures, each failure with its reason: a bad file fails its video once
and the graph goes on. The driver reads the small output rows and assembles each video's features
(jobs/extract.py).

Ray Data schedules the stages, bounds what waits between them (backpressure), retries a task whose
worker died and restarts a lost actor with its batch redone (`runtime.TASK_RETRIES`,
`ACTOR_RESTARTS`); an exception of our code is never retried. How the stages share the cluster's
CPUs and GPUs is decided in jobs/resources.py.
"""

from __future__ import annotations

import os
import pickle
import time
import warnings
from collections.abc import Iterator
from typing import Any

import numpy as np

from quovadis.jobs.report import failure_reason
from quovadis.jobs.resources import StageResources
from quovadis.jobs.runtime import ACTOR_RESTARTS, TASK_RETRIES
from quovadis.pipeline import conventions
from quovadis.pipeline.clips import Clip, ClipSpec, SegmentEnd, crop_flow, segment_clips
from quovadis.pipeline.decode import DecodeConfig, Segment, output_size, plan_segments
from quovadis.pipeline.errors import QuovadisError
from quovadis.pipeline.flow import FlowConfig
from quovadis.pipeline.shards import stored_flow

_FLOW_CLIPS_IN_FLIGHT = 1  # per flow actor: a clip costs seconds, so queue none at a busy actor while another idles
_PLAN_CPUS = 0.25  # a probe task's CPU share
_MAX_INPUT_BLOCKS = 4096  # input rows are split into this many blocks at most: the plan tasks' parallelism

# kinds of rows
VIDEO, STORED, PLANNED, SEGMENT, CLIP, END, FAILED, FEATURES = "video", "stored", "planned", "segment", "clip", "end", "failed", "features"


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


def plan_video(r: dict[str, Any], decode: DecodeConfig, spec: ClipSpec) -> Iterator[dict[str, Any]]:
    """A video row -> a planned row (its probed duration, for the driver's progress) and its
    segment rows, or one failed row; other rows pass."""
    if r["kind"] != VIDEO:
        yield r
        return
    from quovadis.pipeline.probe import probe

    path = r["path"]
    try:
        info = probe(path)
        box = spec.crop_box(*output_size(info, decode))
    except QuovadisError as e:
        yield _failed(path, str(e))
        return
    height, width = output_size(info, decode)
    attrs = {"short_side": decode.short_side, "height": height, "width": width, "fps": decode.fps,
             "duration": info.duration or 0.0}  # fmt: skip
    segments = plan_segments(info, decode)
    yield row(path, PLANNED, duration=attrs["duration"])
    for seg in segments:
        yield row(path, SEGMENT, seg.index, info=info, seg=seg, segments=len(segments), box=box, attrs=attrs)


def decode_clips(r: dict[str, Any], decode: DecodeConfig, spec: ClipSpec) -> Iterator[dict[str, Any]]:
    """A segment row -> its clip rows and end row; a stored row -> its clips read from the shard and
    an end row; a failure -> one failed row (clips already sent are dropped by the driver)."""
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
                if "flow" in spec.streams and part.gray is None and part.flow is None:  # a one-frame video
                    part.flow = np.zeros((spec.clip_len, part.box[2], part.box[3], 2), np.float32)
                yield row(path, CLIP, part.start, clip=part)
    except (QuovadisError, OSError, KeyError, ValueError) as e:
        yield _failed(path, failure_reason(e, path))


def _stored_clips(shard: str, key: str, frames: int, warnings: list[str], spec: ClipSpec,
                  attrs: dict[str, Any]) -> Iterator[Clip | SegmentEnd]:  # fmt: skip
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
        for start in conventions.clip_starts(frames, spec.clip_len, spec.stride):
            clip = read_clip(video.group, start, frames, spec.clip_len, streams, region)
            yield Clip(start, box, rgb=clip.get("rgb"), flow=clip.get("flow"))
    yield SegmentEnd(Segment(0, 0, None), frames, frames, warnings)


class FlowStage:
    """Flow of each clip from its grey frames, stored as preprocess stores it (quantised uint8 or
    float16) and cropped; one TV-L1 device per actor."""

    def __init__(self, cfg: FlowConfig, flow_dtype: str) -> None:
        from quovadis.pipeline.flow import FlowPredictor

        self.predict = FlowPredictor(cfg)
        self.flow_dtype = flow_dtype
        self.actor = f"{_node()}:{os.getpid()}"

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list]:
        out: dict[str, list] = {"path": [], "kind": [], "start": [], "payload": []}
        for r in _rows(batch):
            if r["kind"] == CLIP and (p := payload(r))["clip"].gray is not None:
                clip = p["clip"]
                try:
                    stored = stored_flow(self.predict(clip.gray), self.flow_dtype)
                    clip.flow, clip.gray = np.ascontiguousarray(crop_flow(stored, clip)), None
                    r = row(r["path"], CLIP, clip.start, clip=clip, flow_actor=self.actor)
                except QuovadisError as e:
                    r = _failed(r["path"], str(e))
            for k in out:
                out[k].append(r[k])
        return out


class I3DStage:
    """I3D features of the clips of a batch (across videos); one model per actor."""

    def __init__(self, cfg, all_cores: bool) -> None:
        import torch

        from quovadis.models.predictor import I3DPredictor

        if all_cores:  # Ray sets OMP_NUM_THREADS=1 in workers; this actor is the CPU's main user
            torch.set_num_threads(max(1, len(os.sched_getaffinity(0))))
        self.predict = I3DPredictor(cfg)
        self.streams = tuple(cfg.streams)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list]:
        started = time.perf_counter()
        rows = list(_rows(batch))
        out = [r for r in rows if r["kind"] != CLIP]
        groups: dict[tuple, list[tuple[dict, dict]]] = {}
        for r in rows:
            if r["kind"] == CLIP:
                p = payload(r)
                clip = p["clip"]
                kind = tuple((s, getattr(clip, s).shape, getattr(clip, s).dtype.str) for s in self.streams)
                groups.setdefault(kind, []).append((r, p))
        for members in groups.values():
            try:
                inputs = {s: np.stack([getattr(p["clip"], s) for _, p in members]) for s in self.streams}
                result = self.predict({"clip_id": np.arange(len(members)), **inputs})
            except (QuovadisError, RuntimeError, ValueError) as e:
                out.extend(_failed(r["path"], failure_reason(e, r["path"])) for r, _ in members)
                continue
            names = [n for n in result if n != "clip_id"]
            for i, (r, p) in enumerate(members):
                out.append(row(r["path"], FEATURES, r["start"], flow_actor=p.get("flow_actor"),
                               **{n: np.asarray(result[n][i]) for n in names}))  # fmt: skip
        busy = (time.perf_counter() - started) / max(1, len(out))
        return {**{k: [r[k] for r in out] for k in ("path", "kind", "start", "payload")}, "busy_s": [busy] * len(out)}


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


def build(inputs: list[dict[str, Any]], decode: DecodeConfig, spec: ClipSpec, flow_dtype: str, predictor_cfg,
          resources: StageResources, batch_size: int):  # fmt: skip
    """The Ray Data dataset of `inputs` (rows made by `row`: VIDEO or STORED) -> output rows
    (FEATURES, END, FAILED). Lazy: it runs as the caller iterates it."""
    import ray.data

    # bounded retries of work lost with its process (Ray Data's own default retries for ever, so a
    # video that kills its worker every time would never fail); Ray 2.60 takes them only as
    # ray_remote_args, which it calls deprecated
    tasks = {"num_cpus": 1, "max_retries": TASK_RETRIES}
    actors = {"max_restarts": ACTOR_RESTARTS, "max_task_retries": TASK_RETRIES}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*ray_remote_args.*deprecated")
        ds = ray.data.from_items(inputs, override_num_blocks=max(1, min(len(inputs), _MAX_INPUT_BLOCKS)))
        # one row per block: a block is what one task or actor call takes, and in blocks of Ray
        # Data's default 128 MiB all the clips of a segment would go to one flow actor
        ds.context.target_max_block_size = 1
        # a probe is light; its own resources also keep Ray Data from fusing it with decode into one
        # task, which would decode the segments of a video one after the other
        ds = ds.flat_map(plan_video, fn_kwargs={"decode": decode, "spec": spec}, **{**tasks, "num_cpus": _PLAN_CPUS})
        ds = ds.flat_map(decode_clips, fn_kwargs={"decode": decode, "spec": spec}, **tasks)
        if "flow" in spec.streams and resources.flow_actor_options:
            first = resources.flow_actor_options[0]
            ds = ds.map_batches(
                FlowStage, fn_constructor_kwargs={"cfg": resources.flow_cfg, "flow_dtype": flow_dtype}, batch_size=1,
                compute=ray.data.ActorPoolStrategy(size=len(resources.flow_actor_options), max_tasks_in_flight_per_actor=_FLOW_CLIPS_IN_FLIGHT),
                # the first actor's resources for Ray Data's budget; each actor's own (and its node) in turn
                num_cpus=first.get("num_cpus"), num_gpus=first.get("num_gpus"), ray_remote_args_fn=_InTurn(resources.flow_actor_options), **actors,
            )  # fmt: skip
        i3d_options = dict(resources.i3d_options)
        return ds.map_batches(
            I3DStage, fn_constructor_kwargs={"cfg": predictor_cfg, "all_cores": resources.i3d_all_cores},
            batch_size=batch_size, compute=ray.data.ActorPoolStrategy(size=resources.i3d_actors),
            num_cpus=i3d_options.pop("num_cpus", None), num_gpus=i3d_options.pop("num_gpus", None),
            **actors, **i3d_options,
        )  # fmt: skip
