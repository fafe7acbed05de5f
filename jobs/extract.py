"""`quovadis extract`: videos (or preprocess shard directories) -> per-clip two-stream I3D features.

Data flow: one streaming Ray Data graph (jobs/graph.py), frames never written to disk:

    videos --probe, segments, decode (CPU tasks)--> clips --flow (actor pool)--> --I3D (actor pool)-->
    feature rows --the driver (_FeatureSink)--> OUT/features-N.h5 (or npy) + OUT/index.jsonl

Shard directories given as inputs enter the same graph at decode, their clips read from the shards.
`--keep-shards` decodes into OUT/shards first (the shards `quovadis preprocess` writes) and then
reads the clips from there. Clips of all videos are batched together (--batch-size); one I3D actor
per GPU (half a GPU when a flow actor shares it), or one CPU actor holding no CPU slot of its own.

Bounds: Ray Data's backpressure bounds the clips between stages; a segment holds at most
clip_len + chunk frames (pipeline/clips.py); the driver holds only the feature vectors of videos
in progress, and writes each video once its clips are all back.

Clips: `conventions.clip_starts` (every video with >= 1 frame has >= 1 clip; a last clip running
past the end loops its own frames, `conventions.clip_frame_indices`); flow fields follow
`conventions.clip_flow_indices`; a one-frame video has an all-zero flow clip. Output format:
pipeline/features.py.

Re-runs: videos in OUT/index.jsonl as `ok` are skipped, `failed` ones are retried only with
--retry-failed; finished feature files are never rewritten; one job per OUT (a lock); a re-run
must ask for the settings OUT/settings.json records (streams, clips, crop, weights, ...). Exit status
as preprocess: 0 all ok, 1 some failed (report.json lists why), 2 usage, 3 cannot run (e.g. missing
weights: the message names the paths tried and where to get the files).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.metadata
import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from quovadis.jobs import graph
from quovadis.jobs.inputs import expand_inputs
from quovadis.jobs.progress import Progress, probed_durations
from quovadis.jobs.preprocess import PreprocessConfig, parse_size, preprocess
from quovadis.jobs.report import FlowTally, JobReport, failure_reason
from quovadis.jobs.resources import extract_stages
from quovadis.jobs.runtime import check_shared_out, init_ray, out_dir_lock
from quovadis.models.predictor import PredictorConfig
from quovadis.models.weights import resolve_weights, sha256_of
from quovadis.pipeline import conventions, durable, features, manifest
from quovadis.pipeline.clips import CROPS, ClipSpec, SegmentEnd, clip_segment_frames
from quovadis.pipeline.decode import DecodeConfig, video_frames
from quovadis.pipeline.errors import ConfigError, DecodeError, QuovadisError
from quovadis.pipeline.flow import FlowConfig
from quovadis.pipeline.manifest import LedgerEntry
from quovadis.pipeline.shards import ShardConfig, video_key

log = logging.getLogger(__name__)

STREAMS = ("rgb", "flow")
SHARDS_DIR = "shards"
SETTINGS_NAME = "settings.json"
MODEL_NAME = "i3d-inception-v1"  # models.i3d.InceptionI3d, the kinetics-i3d network
_VIDEOS_PER_FILE = 32  # finished videos per features-N.h5 at most
_FLUSH_S = 5.0  # a finished video waits at most this long to be written: what a crash can lose


@dataclass(frozen=True)
class ExtractConfig:
    out: str
    streams: tuple[str, ...] = STREAMS
    clip_len: int = conventions.CLIP_LEN
    stride: int = conventions.CLIP_LEN
    crop: str = "center"  # center: crop_size x crop_size in the middle; full: the whole frame
    crop_size: int = conventions.CROP_SIZE
    batch_size: int = 8  # clips per predictor call, across videos
    format: str = "hdf5"
    feature_dtype: str = "float32"
    class_names: str | None = None  # file of class names, one per line (with predictor.logits)
    keep_shards: bool = False
    retry_failed: bool = False
    address: str | None = None
    decode: DecodeConfig = field(default_factory=DecodeConfig)
    shards: ShardConfig = field(default_factory=lambda: ShardConfig(shard_size_bytes=256 << 20))
    flow: FlowConfig = field(default_factory=FlowConfig)
    predictor: PredictorConfig = field(default_factory=PredictorConfig)

    def __post_init__(self) -> None:
        if not self.streams or set(self.streams) - set(STREAMS) or len(set(self.streams)) != len(self.streams):
            raise ConfigError(f"--streams must be rgb, flow or rgb,flow, got {','.join(self.streams)!r}")
        if self.clip_len < 1 or self.stride < 1:
            raise ConfigError(f"--clip-len and --stride must be >= 1, got {self.clip_len} and {self.stride}")
        if self.crop not in CROPS:
            raise ConfigError(f"--crop must be one of {', '.join(CROPS)}, got {self.crop!r}")
        if self.crop_size < 1:
            raise ConfigError(f"--crop-size must be >= 1, got {self.crop_size}")
        if self.batch_size < 1:
            raise ConfigError(f"--batch-size must be >= 1, got {self.batch_size}")
        if self.format not in features.FORMATS:
            raise ConfigError(f"--format must be one of {', '.join(features.FORMATS)}, got {self.format!r}")
        if self.feature_dtype not in features.FEATURE_DTYPES:
            raise ConfigError(f"--feature-dtype must be one of {', '.join(features.FEATURE_DTYPES)}, got {self.feature_dtype!r}")
        if self.class_names is not None and not self.predictor.logits:
            raise ConfigError("--class-names needs --logits (class names are for the stored class scores)")
        if tuple(self.predictor.streams) != tuple(self.streams):
            raise ConfigError(f"predictor streams {self.predictor.streams} differ from the job's {self.streams}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def config_from_args(args: argparse.Namespace) -> ExtractConfig:
    streams = tuple(s.strip() for s in args.streams.split(",") if s.strip())
    if args.segment_seconds <= 0:
        raise ConfigError(f"--segment-seconds must be > 0, got {args.segment_seconds}")
    decode = DecodeConfig(fps=args.fps, short_side=args.short_side, timeout_s=args.decode_timeout,
                          segment_frames=max(1, round(args.segment_seconds * args.fps)))  # fmt: skip
    shards = ShardConfig(shard_size_bytes=parse_size(args.shard_size))
    flow = dataclasses.replace(FlowConfig(), backend=args.flow_backend, device=args.flow_device)
    predictor = PredictorConfig(
        streams=streams,
        weights_rgb=args.weights_rgb or args.weights_dir,
        weights_flow=args.weights_flow or args.weights_dir,
        precision=args.precision,
        logits=args.logits,
    )
    return ExtractConfig(
        out=str(Path(args.out).resolve()), streams=streams, clip_len=args.clip_len,
        stride=args.stride if args.stride is not None else args.clip_len, crop=args.crop, crop_size=args.crop_size,
        batch_size=args.batch_size, format=args.format, feature_dtype=args.feature_dtype, class_names=args.class_names,
        keep_shards=args.keep_shards, retry_failed=args.retry_failed, address=args.address,
        decode=decode, shards=shards, flow=flow, predictor=predictor,
    )  # fmt: skip


def run(args: argparse.Namespace) -> JobReport:
    cfg = config_from_args(args)
    inputs = expand_inputs(args.inputs, keep_dir=is_shard_dir)
    report = extract(inputs.paths, cfg, ignored=inputs.ignored)
    log.info("%s", report.summary())
    return report


def is_shard_dir(path: str | os.PathLike[str]) -> bool:
    """A directory written by `quovadis preprocess` (it holds a manifest.jsonl)."""
    return os.path.isdir(path) and manifest.manifest_path(Path(path)).is_file()


def quovadis_version() -> str:
    try:
        return importlib.metadata.version("quovadis")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def read_class_names(path: str) -> list[str]:
    try:
        names = [line.strip() for line in Path(path).read_text(encoding="utf-8").splitlines()]
    except OSError as e:
        raise ConfigError(f"cannot read --class-names {path}: {e.strerror or e}") from e
    while names and not names[-1]:
        names.pop()
    if not names:
        raise ConfigError(f"--class-names {path} has no class names")
    return names


# -- the job ------------------------------------------------------------------------------------------


def extract(inputs: list[str], cfg: ExtractConfig, *, ignored: list[dict[str, str]] | None = None) -> JobReport:
    """Extract features of `inputs` (video paths, or shard directories) into cfg.out; returns the
    report (also written as report.json). Raises WeightsError before any work when weights are missing.
    `ignored`: what the directory scan passed over (jobs.inputs), for the report."""
    out = Path(cfg.out)
    weights = {s: resolve_weights(s, getattr(cfg.predictor, f"weights_{s}")) for s in cfg.streams}
    pcfg = dataclasses.replace(cfg.predictor, **{f"weights_{s}": str(p) for s, p in weights.items()})
    labels = read_class_names(cfg.class_names) if cfg.class_names else None
    report = JobReport("extract", config=cfg.to_dict(), ignored=list(ignored or []))
    with out_dir_lock(out):
        sha256 = {s: sha256_of(p) for s, p in weights.items()}
        features.remove_leftovers(out)
        features.record_unlisted(out)
        recorded = features.load_index(out)
        _check_settings(out, _settings(cfg, sha256), has_results=bool(recorded))
        shard_dirs = [p for p in inputs if is_shard_dir(p)]
        videos = [p for p in inputs if p not in shard_dirs]
        todo = [p for p in videos if not report.skip_if_done(p, recorded.get(p), cfg.retry_failed)]
        stored = _stored_inputs(shard_dirs, set(videos), recorded, report, cfg.retry_failed)
        if report.skipped:
            log.info("%d inputs already in %s (use --retry-failed to retry failed ones)", len(report.skipped), out)
        if todo or stored:
            init_ray(cfg.address)
            if cfg.address:  # a cluster: every node must write into the same OUT
                check_shared_out(out)
            attrs = _common_attrs(cfg, weights, sha256)
            if labels is not None and cfg.format == "npy":
                features.write_labels(out, labels)
            with Progress("extract") as progress:
                sink = _FeatureSink(cfg, out, report, attrs, labels, progress)
                rows = [graph.row(p, graph.STORED, **s) for p, s in stored]
                for p, s in stored:  # the stored frame count; its real duration replaces it when done
                    progress.expect(p, s["frames"] / cfg.decode.fps)
                if todo and cfg.keep_shards:  # decoded into OUT/shards first, then read as stored videos
                    rows += _preprocess_kept(cfg, out, todo, sink, progress)
                else:
                    rows += [graph.row(p, graph.VIDEO) for p in todo]
                try:
                    _run(cfg, pcfg, rows, sink)
                finally:
                    sink.flush()
                for path in [*todo, *(p for p, _ in stored)]:  # a safety net: every input ends ok or failed
                    if path not in report.ok and path not in report.failed:
                        sink.fail(path, f"{path}: no result came back from the pipeline")
            report.extra["weights"] = {s: {"path": attrs[f"weights_{s}"], "sha256": attrs[f"weights_sha256_{s}"]} for s in weights}
        report.finish()
        report.write(out)
    return report


def _settings(cfg: ExtractConfig, sha256: dict[str, str]) -> dict[str, Any]:
    """What stored features depend on: every run into one OUT must ask for the same."""
    return {
        "streams": list(cfg.streams), "clip_len": cfg.clip_len, "stride": cfg.stride, "crop": cfg.crop,
        "crop_size": cfg.crop_size if cfg.crop == "center" else 0, "fps": cfg.decode.fps,
        "short_side": cfg.decode.short_side, "format": cfg.format, "feature_dtype": cfg.feature_dtype,
        "logits": cfg.predictor.logits, "precision": cfg.predictor.precision, "weights_sha256": sha256,
    }  # fmt: skip


def _check_settings(out: Path, settings: dict[str, Any], has_results: bool) -> None:
    """Refuse a re-run whose settings differ from those OUT's results were made with (recorded in
    OUT/settings.json): resuming would silently mix two kinds of features. An OUT with no index
    line yet, or none recorded (made by an older quovadis), takes this run's settings."""
    path = out / SETTINGS_NAME
    if not has_results or not path.exists():
        try:
            durable.write_json_atomic(path, settings, sort_keys=True)
        except OSError as e:  # e.g. a full disk: a clear error, exit 3, not a traceback
            raise QuovadisError(f"cannot write {path}: {e.strerror or e}") from e
        return
    try:
        before = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise QuovadisError(f"cannot read {path}: {e}") from e
    changed = [f"{k} {before.get(k)!r} -> {v!r}" for k, v in settings.items() if before.get(k) != v]
    if changed:
        raise ConfigError(
            f"{out} holds features made with other settings ({'; '.join(changed)}); "
            "use another --out, or the settings of the run that made it"
        )


def _common_attrs(cfg: ExtractConfig, weights: dict[str, Path], sha256: dict[str, str]) -> dict[str, Any]:
    attrs: dict[str, Any] = {
        "stride": cfg.stride, "crop": cfg.crop, "crop_size": cfg.crop_size if cfg.crop == "center" else 0,
        "model": MODEL_NAME, "precision": cfg.predictor.precision, "quovadis_version": quovadis_version(),
        "conventions_version": conventions.CONVENTIONS_VERSION,
    }  # fmt: skip
    for s, p in weights.items():
        attrs[f"weights_{s}"] = str(p)
        attrs[f"weights_sha256_{s}"] = sha256[s]
    return attrs


def _stored_inputs(shard_dirs: list[str], seen: set[str], recorded: dict[str, LedgerEntry], report: JobReport,
                   retry_failed: bool) -> list[tuple[str, dict[str, Any]]]:  # fmt: skip
    """(input, stored-row payload) of the `ok` videos of the given shard directories still to do."""
    stored = []
    for d in shard_dirs:
        for entry in manifest.load(Path(d)).values():
            if entry.status != "ok" or entry.input in seen:
                continue
            seen.add(entry.input)
            if not report.skip_if_done(entry.input, recorded.get(entry.input), retry_failed):
                stored.append((entry.input, {"shard": str(Path(d) / entry.file), "key": entry.key,
                                             "frames": entry.frames, "warnings": entry.warnings}))  # fmt: skip
    return stored


def _preprocess_kept(cfg: ExtractConfig, out: Path, todo: list[str], sink: _FeatureSink, progress: Progress) -> list[dict]:
    """--keep-shards: preprocess `todo` into OUT/shards (the shards `quovadis preprocess` writes),
    then return the stored rows of its videos; its failures are this job's."""
    shards_dir = out / SHARDS_DIR
    pre_cfg = PreprocessConfig(
        out=str(shards_dir), streams=("rgb", "flow") if "flow" in cfg.streams else ("rgb",), decode=cfg.decode,
        shards=cfg.shards, flow=cfg.flow, retry_failed=cfg.retry_failed, address=cfg.address,
    )  # fmt: skip
    pre = preprocess(todo, pre_cfg, progress=progress)
    sink.report.extra["nodes"] = pre.extra.get("nodes", {})
    for path, reason in pre.failed.items():
        sink.fail(path, reason)
    entries = manifest.load(shards_dir)
    return [
        graph.row(p, graph.STORED, shard=str(shards_dir / e.file), key=e.key, frames=e.frames, warnings=e.warnings)
        for p in todo if (e := entries.get(p)) is not None and e.status == "ok" and p not in sink.report.failed
    ]  # fmt: skip


def _run(cfg: ExtractConfig, pcfg: PredictorConfig, rows: list[dict], sink: _FeatureSink) -> None:
    """Stream `rows` through the graph, each output row into the sink."""
    if not rows:
        return
    spec = ClipSpec(cfg.clip_len, cfg.stride, cfg.crop, cfg.crop_size, cfg.streams)
    decode = dataclasses.replace(cfg.decode, segment_frames=clip_segment_frames(cfg.decode.segment_frames, cfg.stride))
    resources = extract_stages(cfg.streams, cfg.flow)
    ds = graph.build(rows, decode, spec, cfg.shards.flow_dtype, pcfg, resources, cfg.batch_size)
    sink.progress.expect_from(probed_durations([r["path"] for r in rows if r["kind"] == graph.VIDEO]))
    try:
        for r in ds.iter_rows():
            sink.take(r)
    except Exception as e:  # the engine gave up (e.g. the model cannot load): exit 3, with its cause
        raise QuovadisError(f"the extract pipeline stopped: {failure_reason(e)}") from e


# -- the feature sink ----------------------------------------------------------------------------------


@dataclass
class _Video:
    input: str
    segments: int | None = None
    ends: dict[int, SegmentEnd] = field(default_factory=dict)
    clips: dict[int, dict[str, np.ndarray]] = field(default_factory=dict)  # start -> output name -> vector
    attrs: dict[str, Any] = field(default_factory=dict)
    frames: int | None = None
    starts: list[int] = field(default_factory=list)


class _FeatureSink:
    """Assembles each video's features from the graph's output rows and writes them: a video is
    finished once all its segments have ended and every clip of it has come back. An hdf5 file is
    written at most every _FLUSH_S seconds (or at _VIDEOS_PER_FILE finished videos) with the
    videos finished since the last; npy files are written as each video finishes."""

    def __init__(self, cfg: ExtractConfig, out: Path, report: JobReport, attrs: dict[str, Any],
                 labels: list[str] | None, progress: Progress) -> None:  # fmt: skip
        self.cfg, self.out, self.report, self.attrs, self.labels, self.progress = cfg, out, report, attrs, labels, progress
        self.videos: dict[str, _Video] = {}
        self.finished: set[str] = set()
        self.pending: list[tuple[_Video, features.VideoFeatures]] = []
        self.last_write = -float("inf")
        self.decode_nodes: dict[str, int] = {}
        self.flow = FlowTally()  # the flow actors' work, for report.json
        self.busy = {"i3d_s": 0.0, "write_s": 0.0}

    def take(self, r: dict[str, Any]) -> None:
        path, kind = r["path"], r["kind"]
        self.busy["i3d_s"] += float(r.get("busy_s", 0.0))
        if path in self.finished:
            return  # a late row of a failed video, or a redone one of a finished video
        p = graph.payload(r)
        if kind == graph.FAILED:
            self.fail(path, p["reason"])
            return
        video = self.videos.setdefault(path, _Video(path))
        if kind == graph.END:
            end: SegmentEnd = p["end"]
            if end.index not in video.ends:
                video.ends[end.index] = end
                self.decode_nodes[p["node"]] = self.decode_nodes.get(p["node"], 0) + 1
                for warning in end.warnings:  # the worker's own log never reaches the driver
                    log.warning("%s: %s", path, warning)
            if video.segments is None:
                video.segments, video.attrs = p["segments"], p["attrs"]
                self.progress.expect(path, p["attrs"]["duration"])  # if its probed duration has not come yet
            if len(video.ends) == video.segments and not self._settle(video):
                return
        elif kind == graph.FEATURES:
            self.flow.add(p.get("flow_work"))
            video.clips[r["start"]] = {n: v for n, v in p.items() if n != "flow_work"}
            self.progress.advance(path, self.cfg.stride / self.cfg.decode.fps)
        if video.frames is not None and all(s in video.clips for s in video.starts):
            self._done(video)
        elif self.pending and time.monotonic() - self.last_write >= _FLUSH_S:
            self.flush()

    def _settle(self, video: _Video) -> bool:
        """All segments ended: the video's frame count and clip starts, or its failure (False)."""
        ends = [video.ends[i] for i in sorted(video.ends)]
        try:
            frames = video_frames(video.input, [e.segment for e in ends], [e.frames for e in ends])
        except DecodeError as e:
            self.fail(video.input, str(e))
            return False
        if any(e.total is not None and e.total != frames for e in ends) or frames < 1:
            self.fail(video.input, f"{video.input}: stream ended at frame {frames}, before its container's duration")
            return False
        video.frames = frames
        video.starts = conventions.clip_starts(frames, self.cfg.clip_len, self.cfg.stride)
        return True

    def _done(self, video: _Video) -> None:
        self.finished.add(video.input)
        del self.videos[video.input]
        names = list(video.clips[video.starts[0]])
        outputs = {n: np.stack([video.clips[s][n] for s in video.starts]).astype(np.float32) for n in names}
        fps = video.attrs["fps"]
        attrs = {**self.attrs, **{k: video.attrs[k] for k in ("short_side", "height", "width")}, "streams": list(self.cfg.streams)}
        warnings = [w for i in sorted(video.ends) for w in video.ends[i].warnings]
        result = features.VideoFeatures(
            video_key(video.input), video.input, fps, video.frames, self.cfg.clip_len, np.asarray(video.starts, np.int64),
            {s: outputs[s] for s in STREAMS if s in outputs}, {n: outputs[n] for n in features.LOGIT_NAMES if n in outputs},
            attrs, warnings,
        )  # fmt: skip
        self.pending.append((video, result))
        if self.cfg.format == "npy" or len(self.pending) >= _VIDEOS_PER_FILE or time.monotonic() - self.last_write >= _FLUSH_S:
            self.flush()

    def flush(self) -> None:
        """Write the finished videos not yet written (one hdf5 file, or npy files), with index lines."""
        if not self.pending:
            return
        started = time.perf_counter()
        self.last_write = time.monotonic()
        batch, self.pending = self.pending, []
        try:
            if self.cfg.format == "hdf5":
                features.write_hdf5(self.out, [r for _, r in batch], dtype=self.cfg.feature_dtype, labels=self.labels)
            else:
                for _, r in batch:
                    features.write_npy(self.out, r, dtype=self.cfg.feature_dtype)
        except QuovadisError as e:
            for video, _ in batch:
                self._record_failure(video.input, f"{video.input}: {e}")
            return
        finally:
            self.busy["write_s"] += time.perf_counter() - started
        for video, r in batch:
            self.report.ok.append(video.input)
            self.report.frames += r.frames
            self.report.video_seconds += r.frames / r.fps
            self.report.clips += r.clips
            if r.warnings:
                self.report.warnings[video.input] = r.warnings
            self.progress.done(video.input, r.frames / r.fps)
            if "logits" in r.logits:
                self._log_top5(video.input, r.logits["logits"])
        self._note_nodes()

    def fail(self, path: str, reason: str) -> None:
        """Fail an input: its index line and report entry; rows of it still to come are dropped."""
        if path in self.finished:
            return
        self.finished.add(path)
        self.videos.pop(path, None)
        self._record_failure(path, reason if reason.startswith(path) else f"{path}: {reason}")

    def _record_failure(self, path: str, reason: str) -> None:
        log.warning("%s", reason)
        try:
            features.append_index(self.out, [LedgerEntry.failed(path, reason)])
        except QuovadisError as e:  # e.g. a full disk; the report still lists the failure
            log.error("%s", e)
        self.report.failed[path] = reason
        self.progress.done(path, failed=True)

    def _note_nodes(self) -> None:
        nodes = self.report.extra.setdefault("nodes", {})
        if self.decode_nodes:  # (with --keep-shards preprocess's own count stays)
            nodes.update(decode_segments=dict(self.decode_nodes), flow_actors=self.flow.nodes())
        if self.flow.actors:
            self.report.extra["flow"] = self.flow.summary()
        self.report.extra["stage_busy_s"] = dict(self.busy)

    def _log_top5(self, path: str, logits: np.ndarray) -> None:
        scores = logits.mean(0)
        top = np.argsort(-scores)[:5]
        names = self.labels or []
        text = ", ".join(f"{names[i] if i < len(names) else i} ({scores[i]:.2f})" for i in top)
        log.info("%s top-5: %s", path, text)
