"""`quovadis extract`: videos (or preprocess shard directories) -> per-clip two-stream I3D features.

Data flow (one pipeline, streaming at shard granularity):

    videos --preprocess (Ray: probe/decode tasks, flow actors, writer actor)--> OUT/shards/shard-N.h5
    each finalised shard --clip loader tasks--> I3DPredictor actors --> the driver writes
    OUT/features-N.h5 (or npy) + OUT/index.jsonl --> the shard is deleted (unless --keep-shards)

`preprocess` runs in a driver thread into OUT/shards with small shards (--shard-size, 256M); the
driver watches that directory for shards renamed to their final name (a final shard is complete:
pipeline/shards.py) and queues their clips. Shard directories given as inputs skip decoding.
Clips of all queued videos are batched together (--batch-size) per frame size; each batch is read
by a loader task (uint8 from the shard, cropped) and run by a predictor actor, one per GPU
(num_gpus=1, or 0.5 when preprocess puts a flow actor on the same GPU), or one CPU actor holding
no CPU slot of its own when there is no GPU, so the decode tasks and flow actor of preprocess
always get theirs.

Bounds: at most two batches per actor are in flight; preprocess starts no new video while two
final shards per actor wait for I3D, so the intermediate shards on disk stay within a few
--shard-size whatever the archive's size; shard directories given as inputs enter as many shards
at a time; a shard's features leave the driver's memory once written. A video is stored whole in one shard, so one very long video is the exception: its
shard, its clip list and its features grow with its length.

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
import threading
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import ray

from quovadis.jobs.inputs import expand_inputs
from quovadis.jobs.progress import Progress
from quovadis.jobs.preprocess import PreprocessConfig, cpu_flow_placement, flow_on_gpu, parse_size, preprocess
from quovadis.jobs.report import JobReport, failure_reason
from quovadis.jobs.runtime import ACTOR_RESTARTS, TASK_RETRIES, check_shared_out, init_ray, out_dir_lock
from quovadis.models.predictor import I3DPredictor, PredictorConfig
from quovadis.models.weights import resolve_weights, sha256_of
from quovadis.pipeline import conventions, durable, features, manifest
from quovadis.pipeline.decode import DecodeConfig
from quovadis.pipeline.errors import ConfigError, QuovadisError
from quovadis.pipeline.flow import FlowConfig
from quovadis.pipeline.manifest import LedgerEntry
from quovadis.pipeline.shards import ShardConfig, ShardReader, list_shards, read_frames, video_key

log = logging.getLogger(__name__)

STREAMS = ("rgb", "flow")
CROPS = ("center", "full")
SHARDS_DIR = "shards"
SETTINGS_NAME = "settings.json"
MODEL_NAME = "i3d-inception-v1"  # models.i3d.InceptionI3d, the kinetics-i3d network
_POLL_S = 0.2  # how often the driver looks for new shards while waiting
_BATCHES_PER_ACTOR = 2  # in flight per CPU predictor actor: one running, one loaded and waiting (x2 on a GPU)
_GPU_SHARE_BESIDE_FLOW = 0.5  # each GPU holds an I3D actor and a flow actor when this job computes flow
_WAITING_SHARDS_PER_ACTOR = 2  # final intermediate shards waiting for I3D before preprocess pauses


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
        stored: list[tuple[str, LedgerEntry]] = []  # (shard dir, entry) of shard-directory inputs
        seen = set(videos)
        for d in shard_dirs:
            for entry in manifest.load(Path(d)).values():
                if entry.status != "ok" or entry.input in seen:
                    continue
                seen.add(entry.input)
                if not report.skip_if_done(entry.input, recorded.get(entry.input), cfg.retry_failed):
                    stored.append((d, entry))
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
                stage = _FeatureStage(cfg, pcfg, out, report, attrs, labels, progress, decoding=bool(todo), recorded=recorded)
                try:
                    _run(cfg, out, todo, stored, stage, report)
                finally:
                    stage.close()
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


def _run(cfg: ExtractConfig, out: Path, todo: list[str], stored, stage: _FeatureStage, report: JobReport) -> None:
    given = deque((Path(shard_dir) / shard, [(e.input, e.key) for e in group])
                  for shard_dir, entries in _group_by_shard(stored).items() for shard, group in entries.items())  # fmt: skip

    def feed() -> None:  # the given shards' clips enter the queue a few shards at a time: bounded memory
        while given and stage.waiting_shards() < stage.max_waiting_shards:
            stage.add_shard(*given.popleft(), owned=False)

    if not todo:
        while given:
            feed()
            stage.pump(timeout=_POLL_S)
        stage.drain()
        return
    shards_dir = out / SHARDS_DIR
    _forget_missing_shards(shards_dir, todo)
    wanted = {video_key(p): p for p in todo}
    pre_cfg = PreprocessConfig(
        out=str(shards_dir), streams=("rgb", "flow") if "flow" in cfg.streams else ("rgb",), decode=cfg.decode,
        shards=cfg.shards, flow=cfg.flow, retry_failed=cfg.retry_failed, address=cfg.address,
        flow_gpu_share=_gpu_share(cfg, decoding=True),
    )  # fmt: skip
    result: dict[str, Any] = {}
    stopped = threading.Event()

    def wait_for_room() -> None:  # in the preprocess thread, before it starts a video
        while not stopped.is_set() and stage.waiting_shards() >= stage.max_waiting_shards:
            time.sleep(_POLL_S)

    def decode() -> None:
        try:
            result["report"] = preprocess(todo, pre_cfg, before_video=wait_for_room, progress=stage.progress)
        except BaseException as e:  # re-raised in the driver's thread below
            result["error"] = e

    thread = threading.Thread(target=decode, name="quovadis-preprocess", daemon=True)
    thread.start()
    seen: set[str] = set()
    try:
        while True:
            finished = not thread.is_alive()
            new = [p for p in list_shards(shards_dir) if p.name not in seen] if shards_dir.is_dir() else []
            for path in new:
                seen.add(path.name)
                stage.add_shard(path, _wanted_videos(path, wanted), owned=True)
            feed()
            if finished and not new and not given:
                break
            stage.pump(timeout=_POLL_S)
    finally:
        stopped.set()  # a failing driver must not leave preprocess waiting for room
    if "error" in result:
        raise result["error"]
    stage.drain()
    report.extra["nodes"] = result["report"].extra.get("nodes", {})  # where decode and flow ran
    todo_set = set(todo)
    for path, reason in result["report"].failed.items():
        if path in todo_set:
            stage.fail_input(path, reason)
    for path in todo:  # a safety net: every input ends ok or failed
        if path not in report.ok and path not in report.failed:
            stage.fail_input(path, f"{path}: decoded but no frames reached a shard (see {shards_dir}/report.json)")


def _gpu_share(cfg: ExtractConfig, decoding: bool) -> float:
    """GPUs per I3D actor (and per flow actor): a whole one, or half of one when preprocess puts a
    flow actor on each GPU too (two actors of one GPU each would leave the flow actors unplaced)."""
    gpus = int(ray.cluster_resources().get("GPU", 0))
    shared = decoding and "flow" in cfg.streams and flow_on_gpu(cfg.flow, gpus)
    return _GPU_SHARE_BESIDE_FLOW if shared else 1.0


def _group_by_shard(stored) -> dict[str, dict[str, list[LedgerEntry]]]:
    grouped: dict[str, dict[str, list[LedgerEntry]]] = {}
    for shard_dir, entry in stored:
        grouped.setdefault(shard_dir, {}).setdefault(entry.file, []).append(entry)
    return grouped


def _forget_missing_shards(shards_dir: Path, todo: list[str]) -> None:
    """Inputs the intermediate manifest records `ok` in a shard that is gone (deleted after a feature
    run that then failed, or by hand) are dropped from it, so preprocess decodes them again. The
    intermediate manifest (OUT/shards/manifest.jsonl) belongs to this job alone; it is rewritten
    atomically."""
    if not shards_dir.is_dir():
        return
    entries = manifest.load(shards_dir)
    gone = {p for p in todo if (e := entries.get(p)) is not None and e.status == "ok" and not (shards_dir / e.file).is_file()}
    if not gone:
        return
    path = manifest.manifest_path(shards_dir)
    keep = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            if json.loads(line).get("input") in gone:
                continue
        except ValueError:
            continue
        keep.append(line + "\n")
    durable.write_text_atomic(path, "".join(keep))
    for p in sorted(gone):
        log.info("%s: its shard is gone, decoding it again", p)


def _wanted_videos(path: Path, wanted: dict[str, str]) -> list[tuple[str, str]]:
    """(input, key) of the videos of a shard that this run wants."""
    try:
        with h5py.File(path, "r") as f:
            keys = list(f.keys())
    except OSError as e:
        log.warning("cannot open shard %s: %s", path, e)
        return []
    return [(wanted[k], k) for k in keys if k in wanted]


# -- the feature stage ---------------------------------------------------------------------------------


@dataclass
class _VideoJob:
    input: str
    key: str
    shard: _ShardJob
    frames: int = 0
    fps: float = conventions.FPS
    starts: list[int] = field(default_factory=list)
    outputs: dict[str, np.ndarray] = field(default_factory=dict)  # name -> (N, D)
    done: int = 0
    error: str | None = None
    attrs: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)  # of its decode, recorded in its shard
    planned: bool = False  # its clips are queued (until then it has none and is not finished)

    @property
    def finished(self) -> bool:
        return self.error is not None or (self.planned and self.done == len(self.starts))


@dataclass
class _ShardJob:
    path: Path
    owned: bool
    videos: list[_VideoJob] = field(default_factory=list)
    written: bool = False


@dataclass(frozen=True)
class _ClipRequest:
    clip_id: int
    shard: str
    key: str
    start: int
    frames: int
    zero_flow: bool  # a one-frame video: no flow field exists; its flow clip is zeros


class _PredictorActor:
    """The Ray actor around I3DPredictor: passes loader failures through and times its own work."""

    def __init__(self, cfg: PredictorConfig, use_all_cores: bool) -> None:
        import torch

        if use_all_cores:  # Ray sets OMP_NUM_THREADS=1 in workers; this actor is the CPU's main user
            torch.set_num_threads(max(1, len(os.sched_getaffinity(0))))
        self.predict_batch = I3DPredictor(cfg)

    def predict(self, batch: dict[str, Any]) -> dict[str, Any]:
        started = time.perf_counter()
        errors = batch.pop("errors", {})
        load_s = batch.pop("load_s", 0.0)
        result = self.predict_batch(batch) if len(batch["clip_id"]) else {"clip_id": batch["clip_id"]}
        result["errors"] = errors
        result["busy_s"] = time.perf_counter() - started
        result["load_s"] = load_s
        return result

    def ready(self) -> bool:
        return True


class _FeatureStage:
    """Clips of queued shards -> loader tasks -> predictor actors -> feature files (in the driver)."""

    def __init__(self, cfg: ExtractConfig, pcfg: PredictorConfig, out: Path, report: JobReport,
                 attrs: dict[str, Any], labels: list[str] | None, progress: Progress, decoding: bool,
                 recorded: dict[str, LedgerEntry]) -> None:  # fmt: skip
        self.cfg, self.out, self.report, self.attrs, self.labels = cfg, out, report, attrs, labels
        self.progress = progress
        self.indexed = {video_key(p) for p in recorded}  # keys with an index line: their shards may go
        cpus = float(ray.cluster_resources().get("CPU", 1))
        gpus = int(ray.cluster_resources().get("GPU", 0))
        if gpus > 0:
            # no CPU slot: its CPU work is small, and slots held by GPU actors could starve decoding
            n, options, all_cores = gpus, {"num_gpus": _gpu_share(cfg, decoding), "num_cpus": 0}, False
        else:  # leave the decode task and the flow actors their CPU slots: never stall preprocess
            placement = cpu_flow_placement() if decoding else []  # a CPU per node for decode, and the flow actors'
            flow = sum(n * share for _, n, share in placement) if "flow" in cfg.streams else 0.0
            reserved = len(placement) + flow
            n, options, all_cores = 1, {"num_cpus": max(0.0, min(1.0, cpus - reserved))}, True
        actor = ray.remote(max_restarts=ACTOR_RESTARTS, max_task_retries=TASK_RETRIES, **options)(_PredictorActor)
        self.actors = [actor.remote(pcfg, all_cores) for _ in range(n)]
        try:  # the model loads once per actor; a load failure stops the job here, not per batch
            ray.get([a.ready.remote() for a in self.actors])
        except Exception as e:
            for a in self.actors:
                ray.kill(a)
            raise QuovadisError(f"the I3D predictor could not start: {failure_reason(e)}") from e
        self.in_flight: dict[Any, tuple[int, list[_ClipRequest]]] = {}
        self.per_actor = [0] * n
        self.max_per_actor = _BATCHES_PER_ACTOR * (2 if gpus > 0 else 1)  # a GPU drains faster than loaders fill
        self.queues: OrderedDict[tuple, deque[_ClipRequest]] = OrderedDict()  # batch kind -> clips
        self.clips: dict[int, _VideoJob] = {}
        self.clip_index: dict[int, int] = {}
        self.next_clip = 0
        self.shards: list[_ShardJob] = []  # added and not yet written
        self.max_waiting_shards = _WAITING_SHARDS_PER_ACTOR * n
        self.busy = {"load_s": 0.0, "i3d_s": 0.0, "write_s": 0.0}

    # -- input ---------------------------------------------------------------------------------------

    def add_shard(self, path: Path, videos: list[tuple[str, str]], owned: bool) -> None:
        """Queue the clips of `videos` ((input, key) pairs) of the shard at `path`."""
        shard = _ShardJob(Path(path), owned)
        self.shards.append(shard)
        shard.videos = [_VideoJob(inp, key, shard) for inp, key in videos]  # all first: see finished
        try:
            reader = ShardReader(shard.path)
        except QuovadisError as e:
            for video in shard.videos:
                self._fail(video, str(e))
            return
        with reader:
            for video in shard.videos:
                try:
                    self._plan(video, reader[video.key])
                except (QuovadisError, OSError, KeyError, ValueError) as e:
                    self._fail(video, f"{video.input}: {e}")
        self._check_shard(shard)

    def _plan(self, video: _VideoJob, stored) -> None:
        video.frames, video.fps, video.warnings = stored.frames, stored.fps, stored.warnings
        self.progress.expect(video.input, stored.frames / stored.fps)  # known already when decoded by this job
        zero_flow = "flow" in self.cfg.streams and stored.frames < 2
        if "flow" in self.cfg.streams and not zero_flow and "flow" not in stored.streams:
            raise QuovadisError(f"{stored.shard_path} has no flow for it; preprocess with --streams rgb,flow or extract --streams rgb")
        if self.cfg.crop == "center" and min(stored.height, stored.width) < self.cfg.crop_size:
            raise QuovadisError(f"frames {stored.height}x{stored.width} are smaller than --crop-size {self.cfg.crop_size}; use --crop full or a smaller --crop-size")
        video.starts = conventions.clip_starts(stored.frames, self.cfg.clip_len, self.cfg.stride)
        decode_cfg = json.loads(stored.attrs.get("config", "{}")).get("decode", {})
        video.attrs = {"short_side": decode_cfg.get("short_side", -1), "height": stored.height, "width": stored.width}
        size = (stored.height, stored.width) if self.cfg.crop == "full" else (self.cfg.crop_size,) * 2
        flow_kind = "none" if "flow" not in self.cfg.streams else "zeros" if zero_flow else str(stored.group["flow"].dtype)
        kind = (size, flow_kind)
        queue = self.queues.setdefault(kind, deque())
        for i, start in enumerate(video.starts):
            cid = self.next_clip
            self.next_clip += 1
            self.clips[cid], self.clip_index[cid] = video, i
            queue.append(_ClipRequest(cid, str(video.shard.path), video.key, start, stored.frames, zero_flow))
        video.planned = True

    def fail_input(self, path: str, reason: str) -> None:
        """An input that never reached a shard (decode failed): its index line and report entry."""
        if path in self.report.failed:
            return
        self._record_failed([_VideoJob(path, video_key(path), _ShardJob(Path(), False), error=reason)])

    # -- running -------------------------------------------------------------------------------------

    def pump(self, timeout: float) -> None:
        """Submit what the actors can take, then collect what finished within `timeout` seconds."""
        self._submit()
        if not self.in_flight:
            time.sleep(timeout)
            return
        ready, rest = ray.wait(list(self.in_flight), num_returns=1, timeout=timeout)
        if ready and rest:
            ready += ray.wait(rest, num_returns=len(rest), timeout=0)[0]
        for ref in ready:
            self._collect(ref)

    def drain(self) -> None:
        while self.in_flight or any(self.queues.values()):
            self.pump(timeout=1.0)
        for shard in list(self.shards):
            self._check_shard(shard)

    def waiting_shards(self) -> int:
        """Shards added and not yet written (also read from the preprocess thread)."""
        return len(self.shards)

    def _submit(self) -> None:
        for a in sorted(range(len(self.actors)), key=lambda i: self.per_actor[i]):
            while self.per_actor[a] < self.max_per_actor:
                batch = self._next_batch(full_only=self.per_actor[a] > 0)
                if not batch:
                    break
                load = _load_clips.remote(batch, self.cfg.streams, self.cfg.clip_len, self.cfg.crop, self.cfg.crop_size)
                ref = self.actors[a].predict.remote(load)
                self.in_flight[ref] = (a, batch)
                self.per_actor[a] += 1

    def _next_batch(self, full_only: bool) -> list[_ClipRequest]:
        """Up to batch_size clips of one kind (size, flow dtype), oldest kind first, across videos.
        A partial batch only goes to an idle actor."""
        for kind, queue in list(self.queues.items()):
            while queue and self.clips[queue[0].clip_id].error is not None:
                queue.popleft()
            if not queue:
                del self.queues[kind]
                continue
            if full_only and len(queue) < self.cfg.batch_size:
                continue
            batch = []
            while queue and len(batch) < self.cfg.batch_size:
                clip = queue.popleft()
                if self.clips[clip.clip_id].error is None:
                    batch.append(clip)
            if batch:
                return batch
        return []

    def _collect(self, ref) -> None:
        actor, batch = self.in_flight.pop(ref)
        self.per_actor[actor] -= 1
        try:
            result = ray.get(ref)
        except Exception as e:  # a batch's failure fails its videos, never the job
            for clip in batch:
                video = self.clips[clip.clip_id]
                self._fail(video, failure_reason(e, video.input))
            return
        self.busy["i3d_s"] += result.get("busy_s", 0.0)
        self.busy["load_s"] += result.get("load_s", 0.0)
        for cid, reason in result["errors"].items():
            video = self.clips[cid]
            self._fail(video, f"{video.input}: {reason}")
        names = [n for n in (*STREAMS, *features.LOGIT_NAMES) if n in result]
        for row, cid in enumerate(result["clip_id"].tolist()):
            video = self.clips.pop(cid)
            i = self.clip_index.pop(cid)
            if video.error is not None:
                continue
            for name in names:
                arr = video.outputs.get(name)
                if arr is None:
                    arr = video.outputs[name] = np.zeros((len(video.starts), result[name].shape[1]), np.float32)
                arr[i] = result[name][row]
            video.done += 1
            if video.finished:
                self._check_shard(video.shard)

    # -- output --------------------------------------------------------------------------------------

    def _fail(self, video: _VideoJob, reason: str) -> None:
        """Mark a video failed; its index line is written with its shard's features."""
        if video.error is not None:
            return
        video.error = reason if reason.startswith(video.input) else f"{video.input}: {reason}"
        log.warning("%s", video.error)
        self._check_shard(video.shard)

    def _record_failed(self, videos: list[_VideoJob]) -> None:
        features.append_index(self.out, [LedgerEntry.failed(v.input, v.error) for v in videos])
        self.indexed.update(v.key for v in videos)
        for v in videos:
            self.report.failed[v.input] = v.error
            self.progress.done(v.input, failed=True)

    def _check_shard(self, shard: _ShardJob) -> None:
        """Write the shard's features once all its videos are finished, then drop the shard."""
        if shard.written or not all(v.finished for v in shard.videos):
            return
        shard.written = True
        started = time.perf_counter()
        ok = [v for v in shard.videos if v.error is None]
        results = [self._features_of(v) for v in ok]
        try:
            if self.cfg.format == "hdf5":
                features.write_hdf5(self.out, results, dtype=self.cfg.feature_dtype, labels=self.labels)
            else:
                for r in results:
                    features.write_npy(self.out, r, dtype=self.cfg.feature_dtype)
        except QuovadisError as e:
            for v in ok:
                v.error = f"{v.input}: {e}"
            ok = []
        self._record_failed([v for v in shard.videos if v.error is not None])
        self.indexed.update(v.key for v in ok)
        for v, r in zip(ok, results):
            self.report.ok.append(v.input)
            self.report.frames += v.frames
            self.report.video_seconds += v.frames / v.fps
            self.report.clips += len(v.starts)
            if v.warnings:
                self.report.warnings[v.input] = v.warnings
            self.progress.done(v.input, v.frames / v.fps)
            if "logits" in r.logits:
                self._log_top5(v, r.logits["logits"])
        self.busy["write_s"] += time.perf_counter() - started
        for v in shard.videos:
            v.outputs = {}
        self.shards.remove(shard)
        if shard.owned and not self.cfg.keep_shards:
            self._delete_shard(shard)

    def _delete_shard(self, shard: _ShardJob) -> None:
        """Delete an intermediate shard whose every video now has an index line (this run's or an
        earlier one's); a shard holding anything else is kept."""
        try:
            with h5py.File(shard.path, "r") as f:
                keys = set(f.keys())
        except OSError:
            return
        if keys <= self.indexed:
            shard.path.unlink(missing_ok=True)
            log.debug("deleted %s", shard.path)

    def _features_of(self, v: _VideoJob) -> features.VideoFeatures:
        feats = {s: v.outputs[s] for s in STREAMS if s in v.outputs}
        logits = {n: v.outputs[n] for n in features.LOGIT_NAMES if n in v.outputs}
        attrs = {**self.attrs, **v.attrs, "streams": list(self.cfg.streams)}
        return features.VideoFeatures(v.key, v.input, v.fps, v.frames, self.cfg.clip_len,
                                      np.asarray(v.starts, np.int64), feats, logits, attrs, v.warnings)  # fmt: skip

    def _log_top5(self, v: _VideoJob, logits: np.ndarray) -> None:
        scores = logits.mean(0)
        top = np.argsort(-scores)[:5]
        names = self.labels or []
        text = ", ".join(f"{names[i] if i < len(names) else i} ({scores[i]:.2f})" for i in top)
        log.info("%s top-5: %s", v.input, text)

    def close(self) -> None:
        self.report.extra["stage_busy_s"] = dict(self.busy)
        for a in self.actors:
            ray.kill(a)


@ray.remote(num_cpus=0, max_retries=TASK_RETRIES)
def _load_clips(batch: list[_ClipRequest], streams: tuple[str, ...], clip_len: int, crop: str, crop_size: int) -> dict[str, Any]:
    """Read a batch of clips from their shards: uint8 rgb (N, T, h, w, 3), stored flow (N, T, h, w, 2)
    (zeros float32 for one-frame videos) and clip ids; a clip that cannot be read goes to `errors`."""
    started = time.perf_counter()
    rows: dict[str, list[np.ndarray]] = {s: [] for s in streams}
    ids: list[int] = []
    errors: dict[int, str] = {}
    files: dict[str, h5py.File] = {}
    try:
        for clip in batch:
            try:
                f = files.get(clip.shard) or files.setdefault(clip.shard, h5py.File(clip.shard, "r"))
                group = f[clip.key]
                height, width = group["rgb"].shape[1:3]
                if crop == "full":
                    region = (slice(None), slice(None))
                else:
                    top, left = (height - crop_size) // 2, (width - crop_size) // 2
                    region = (slice(top, top + crop_size), slice(left, left + crop_size))
                got = {}
                if "rgb" in streams:
                    got["rgb"] = read_frames(group["rgb"], conventions.clip_frame_indices(clip.start, clip_len, clip.frames), region)
                if "flow" in streams:
                    if clip.zero_flow:
                        h = crop_size if crop == "center" else height
                        w = crop_size if crop == "center" else width
                        got["flow"] = np.zeros((clip_len, h, w, 2), np.float32)
                    else:
                        indices = conventions.clip_flow_indices(clip.start, clip_len, clip.frames)
                        got["flow"] = read_frames(group["flow"], indices, region)
            except (OSError, KeyError, ValueError) as e:
                errors[clip.clip_id] = f"cannot read clip at frame {clip.start} from {clip.shard}: {e}"
                continue
            for s in streams:
                rows[s].append(got[s])
            ids.append(clip.clip_id)
    finally:
        for f in files.values():
            f.close()
    out: dict[str, Any] = {"clip_id": np.asarray(ids, np.int64), "errors": errors}
    for s in streams:
        if rows[s]:
            out[s] = np.stack(rows[s])
    out["load_s"] = time.perf_counter() - started
    return out
