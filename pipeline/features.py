"""Extracted I3D features on disk: the writer, the index, the reader and `FeatureDataset`.

Directory written by `quovadis extract` (readable with h5py/numpy and json alone)::

    OUT/features-00000.h5, ...   HDF5 (default): one file per input shard, written under
                                 `features-NNNNN.h5.tmp` and renamed when complete; never rewritten
    OUT/<key>_rgb.npy, ...       npy format instead: per video `<key>_rgb.npy`, `<key>_flow.npy`
                                 (N, 1024), `<key>_timestamps.npy` (N, 2) [start_s, end_s), and with
                                 --logits `<key>_logits_rgb.npy`, `<key>_logits_flow.npy`,
                                 `<key>_logits.npy`; each written durably (pipeline.durable)
    OUT/index.jsonl              one JSON line per input event, appended after the files exist:
      {"input": "/abs/video.mp4", "status": "ok" | "failed", "file": "features-00000.h5" (hdf5) or
       "<key>" (npy prefix), "key": "<key>", "clips": N, "frames": T, "reason": null | "one line",
       "info": {...}, "warnings": [...]}   ffmpeg errors of a decode that kept its frames (from the
                                 shard); the LAST line of an input wins; torn lines are skipped
    OUT/shards/                  the intermediate shards (deleted per shard unless --keep-shards)
    OUT/report.json              the job summary

Inside a features file::

    /        attrs: format="quovadis-features", format_version, conventions_version
    /<key>   one group per video (key = pipeline.shards.video_key(source path), safe ASCII)
        attrs: source_path, fps, frames, clips, clip_len, stride, crop, crop_size, short_side,
               model, streams (JSON list), weights_<stream>, weights_sha256_<stream>,
               quovadis_version, conventions_version
    /        attrs also: labels (JSON list of class names, with --logits --labels; npy: OUT/labels.txt)
        rgb, flow            (N, 1024) float32 (or float16): clip features, the I3D AvgPool output
                             averaged over time (models.i3d.InceptionI3d.features)
        clip_start_frame     (N,) int64, first frame of each clip (frames at `fps`)
        clip_start_s         (N,) float64, clip_start_frame / fps
        clip_end_s           (N,) float64, end of the clip's REAL frames: min(start + clip_len,
                             frames) / fps (a last clip running past the end is padded by looping
                             its own frames, conventions.clip_frame_indices; its end is the video's)
        logits_rgb, logits_flow, logits   (N, classes) float32 with --logits; `logits` is the
                             two-stream sum (the released joint model), or the one stream's

Clips: `conventions.clip_starts(frames, clip_len, stride)`, so a video with >= 1 frame always has
>= 1 clip. A one-frame video has no motion: its flow clip is all zeros (no flow field stored).
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch

from quovadis.pipeline import conventions, durable
from quovadis.pipeline.errors import ConfigError, ShardError
from quovadis.pipeline.manifest import LedgerEntry, adopt_unlisted, append_lines, load_lines
from quovadis.pipeline.shards import attr_value

log = logging.getLogger(__name__)

FORMAT = "quovadis-features"
FORMAT_VERSION = 1
INDEX_NAME = "index.jsonl"
FORMATS = ("hdf5", "npy")
FEATURE_DTYPES = ("float32", "float16")
FEATURE_PATTERN = re.compile(r"^features-(\d{5,})\.h5$")
META_SUFFIX = "_meta.json"  # npy: <key>_meta.json, committed after the video's arrays
STREAMS = ("rgb", "flow")
LOGIT_NAMES = ("logits_rgb", "logits_flow", "logits")


def clip_times(starts: np.ndarray, clip_len: int, frames: int, fps: float) -> tuple[np.ndarray, np.ndarray]:
    """(clip_start_s, clip_end_s) float64 of clips starting at `starts`: start / fps and the end of
    the clip's real frames, min(start + clip_len, frames) / fps (looped padding adds no time)."""
    starts = np.asarray(starts, dtype=np.int64)
    return starts / float(fps), np.minimum(starts + clip_len, frames) / float(fps)


@dataclass
class VideoFeatures:
    """The features of one video, as written and as read back.

    features: stream -> (N, D) array; logits: name in LOGIT_NAMES -> (N, classes) array;
    attrs: the metadata stored with them (see the module docstring).
    """

    key: str
    source_path: str
    fps: float
    frames: int
    clip_len: int
    clip_start_frame: np.ndarray  # (N,) int64
    features: dict[str, np.ndarray]
    logits: dict[str, np.ndarray] = field(default_factory=dict)
    attrs: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)  # of its decode, for the index entry

    @property
    def clips(self) -> int:
        return len(self.clip_start_frame)

    @property
    def clip_start_s(self) -> np.ndarray:
        return clip_times(self.clip_start_frame, self.clip_len, self.frames, self.fps)[0]

    @property
    def clip_end_s(self) -> np.ndarray:
        return clip_times(self.clip_start_frame, self.clip_len, self.frames, self.fps)[1]

    def check(self) -> None:
        n = self.clips
        for name, arr in {**self.features, **self.logits}.items():
            if arr.ndim != 2 or arr.shape[0] != n:
                raise ShardError(f"{self.source_path}: {name} must be ({n}, D), got {arr.shape}")


# -- the index ------------------------------------------------------------------------------------


def index_path(out_dir: str | os.PathLike[str]) -> Path:
    return Path(out_dir) / INDEX_NAME


def append_index(out_dir: str | os.PathLike[str], entries: Iterable[LedgerEntry]) -> None:
    """Append entries as lines and fsync (pipeline.manifest.append_lines)."""
    append_lines(index_path(out_dir), [e.to_json() for e in entries])


def load_index(out_dir: str | os.PathLike[str]) -> dict[str, LedgerEntry]:
    """The latest entry per input; lines that do not parse (a torn tail) are skipped with a warning."""
    return load_lines(index_path(out_dir))


# -- writing ----------------------------------------------------------------------------------------


def remove_leftovers(out_dir: Path) -> None:
    """Delete the temporary files (pipeline.durable) of an interrupted run: never committed."""
    for leftover in Path(out_dir).glob(f"*{durable.TMP_SUFFIX}"):
        log.warning("removing %s left by an interrupted run", leftover)
        leftover.unlink()


def record_unlisted(out_dir: Path) -> list[LedgerEntry]:
    """Adopt committed features the index does not name (manifest.adopt_unlisted, the rule shards
    follow too): `features-NNNNN.h5` files, and npy videos whose `<key>_meta.json`, committed
    after all their arrays, exists. A re-run then neither redoes them nor writes them twice."""
    out_dir = Path(out_dir)
    files = {p.name: p for p in out_dir.iterdir() if FEATURE_PATTERN.match(p.name)}
    files.update({p.name[: -len(META_SUFFIX)]: p for p in out_dir.glob(f"*{META_SUFFIX}")})
    return adopt_unlisted(index_path(out_dir), files, _committed_entries)


def _committed_entries(path: Path) -> list[LedgerEntry]:
    """The `ok` entries of a committed features file (HDF5) or npy meta, read back from disk."""
    try:
        if path.suffix == ".h5":
            return [_entry(v, path.name) for v in _read_hdf5(path)]
        key = path.name[: -len(META_SUFFIX)]
        return [_entry(_read_npy(path.parent, key), key)]
    except (OSError, KeyError, ValueError) as e:
        raise ShardError(f"cannot read features from {path}: {e}") from e


def next_feature_index(out_dir: Path) -> int:
    found = [int(m.group(1)) for p in Path(out_dir).iterdir() if (m := FEATURE_PATTERN.match(p.name))]
    return max(found, default=-1) + 1


def _entry(video: VideoFeatures, file: str) -> LedgerEntry:
    info = {"fps": video.fps, "clip_len": video.clip_len, "streams": sorted(video.features, key=STREAMS.index)}
    info.update({k: v for k, v in video.attrs.items() if k in ("stride", "crop", "crop_size", "short_side", "model")})
    return LedgerEntry(input=video.source_path, status="ok", file=file, key=video.key, clips=video.clips,
                      frames=video.frames, info=json.loads(json.dumps(info, default=str)),
                      warnings=list(video.warnings))  # fmt: skip


def write_hdf5(
    out_dir: Path, videos: Sequence[VideoFeatures], *, dtype: str = "float32", labels: Sequence[str] | None = None
) -> list[LedgerEntry]:
    """Write `videos` into the next `features-NNNNN.h5` (temporary name, fsync, rename), append their
    `ok` index lines, and return them. Nothing is written for an empty list. `labels`: class names
    of the logits, stored once in the file's attrs."""
    if dtype not in FEATURE_DTYPES:
        raise ConfigError(f"feature dtype must be one of {FEATURE_DTYPES}, got {dtype!r}")
    if not videos:
        return []
    out_dir = Path(out_dir)
    final = out_dir / f"features-{next_feature_index(out_dir):05d}.h5"
    try:
        with durable.atomic_path(final) as tmp, h5py.File(tmp, "w") as f:
            f.attrs["format"] = FORMAT
            f.attrs["format_version"] = FORMAT_VERSION
            f.attrs["conventions_version"] = conventions.CONVENTIONS_VERSION
            if labels is not None:
                f.attrs["labels"] = json.dumps(list(labels))
            for v in videos:
                v.check()
                g = f.create_group(v.key)
                for name, value in v.attrs.items():
                    g.attrs[name] = attr_value(value)
                g.attrs["source_path"] = attr_value(v.source_path)
                g.attrs["fps"] = float(v.fps)
                g.attrs["frames"] = int(v.frames)
                g.attrs["clips"] = int(v.clips)
                g.attrs["clip_len"] = int(v.clip_len)
                g.attrs["streams"] = json.dumps(sorted(v.features, key=STREAMS.index))
                for stream, arr in v.features.items():
                    g.create_dataset(stream, data=np.asarray(arr, dtype=dtype))
                for name, arr in v.logits.items():
                    g.create_dataset(name, data=np.asarray(arr, dtype=np.float32))
                g.create_dataset("clip_start_frame", data=np.asarray(v.clip_start_frame, dtype=np.int64))
                g.create_dataset("clip_start_s", data=v.clip_start_s)
                g.create_dataset("clip_end_s", data=v.clip_end_s)
    except (OSError, ValueError, TypeError) as e:
        raise ShardError(f"cannot write features {final}: {e}") from e
    entries = [_entry(v, final.name) for v in videos]
    append_index(out_dir, entries)
    log.info("wrote %s (%d videos)", final, len(videos))
    return entries


def write_labels(out_dir: Path, labels: Sequence[str]) -> Path:
    """OUT/labels.txt, the class names of the npy logits, one per line (pipeline.durable)."""
    path = Path(out_dir) / "labels.txt"
    try:
        durable.write_text_atomic(path, "".join(f"{name}\n" for name in labels))
    except OSError as e:
        raise ShardError(f"cannot write {path}: {e}") from e
    return path


def npy_paths(out_dir: Path, key: str) -> dict[str, Path]:
    """The npy files of a video key: rgb, flow, timestamps, logits_* (not all exist)."""
    names = (*STREAMS, "timestamps", *LOGIT_NAMES)
    return {n: Path(out_dir) / f"{key}_{n}.npy" for n in names}


def write_npy(out_dir: Path, video: VideoFeatures, *, dtype: str = "float32") -> LedgerEntry:
    """Write one video as video_features-style npy files and `<key>_meta.json` (each durably,
    pipeline.durable), then its index line. `<key>_timestamps.npy` is (N, 2) float64 [clip_start_s, clip_end_s)."""
    if dtype not in FEATURE_DTYPES:
        raise ConfigError(f"feature dtype must be one of {FEATURE_DTYPES}, got {dtype!r}")
    video.check()
    paths = npy_paths(out_dir, video.key)
    arrays = {s: np.asarray(a, dtype=dtype) for s, a in video.features.items()}
    arrays["timestamps"] = np.stack([video.clip_start_s, video.clip_end_s], axis=1)
    arrays.update({n: np.asarray(a, dtype=np.float32) for n, a in video.logits.items()})
    try:
        for name, arr in arrays.items():
            durable.write_atomic(paths[name], lambda f, arr=arr: np.save(f, arr))
        durable.write_json_atomic(Path(out_dir) / f"{video.key}{META_SUFFIX}",
                                  {"source_path": video.source_path, "fps": video.fps, "frames": video.frames,
                                   "clip_len": video.clip_len, **video.attrs})  # fmt: skip
    except OSError as e:
        raise ShardError(f"cannot write npy features of {video.source_path} in {out_dir}: {e}") from e
    entry = _entry(video, video.key)
    append_index(out_dir, [entry])
    return entry


# -- reading ------------------------------------------------------------------------------------------


def read_video(out_dir: str | os.PathLike[str], entry: LedgerEntry) -> VideoFeatures:
    """The features of one `ok` index entry (HDF5 or npy), as float32 arrays."""
    out_dir = Path(out_dir)
    if entry.status != "ok":
        raise ShardError(f"{out_dir}: {entry.input} failed: {entry.reason}")
    try:
        if entry.file.endswith(".h5"):
            return _read_hdf5(out_dir / entry.file, [entry.key])[0]
        return _read_npy(out_dir, entry.file)
    except (OSError, KeyError, ValueError) as e:
        raise ShardError(f"cannot read features of {entry.input} from {out_dir / entry.file}: {e}") from e


def _read_hdf5(path: Path, keys: Sequence[str] | None = None) -> list[VideoFeatures]:
    """The videos `keys` (default: all) of a features file."""
    with h5py.File(path, "r") as f:
        if f.attrs.get("format") != FORMAT:
            raise ShardError(f"{path} is not a quovadis features file")
        videos = []
        for key in f.keys() if keys is None else keys:
            g = f[key]
            attrs = {k: (v.item() if isinstance(v, np.generic) else v) for k, v in g.attrs.items()}
            feats = {s: g[s][()].astype(np.float32) for s in STREAMS if s in g}
            logits = {n: g[n][()] for n in LOGIT_NAMES if n in g}
            videos.append(VideoFeatures(key, attrs["source_path"], float(attrs["fps"]), int(attrs["frames"]),
                                        int(attrs["clip_len"]), g["clip_start_frame"][()], feats, logits, attrs))  # fmt: skip
        return videos


def _read_npy(out_dir: Path, key: str) -> VideoFeatures:
    """The npy video `key` of `out_dir`."""
    paths = npy_paths(out_dir, key)
    meta = json.loads((out_dir / f"{key}{META_SUFFIX}").read_text())
    feats = {s: np.load(paths[s]).astype(np.float32) for s in STREAMS if paths[s].exists()}
    logits = {n: np.load(paths[n]) for n in LOGIT_NAMES if paths[n].exists()}
    stamps = np.load(paths["timestamps"])
    starts = np.rint(stamps[:, 0] * float(meta["fps"])).astype(np.int64)
    return VideoFeatures(key, meta["source_path"], float(meta["fps"]), int(meta["frames"]),
                         int(meta["clip_len"]), starts, feats, logits, meta)  # fmt: skip


class FeatureDataset(torch.utils.data.Dataset):
    """One item per extracted video of `out_dir` (HDF5 or npy output of `quovadis extract`):

        features      float32 (N, D): the asked `streams` concatenated in that order (D = 1024 each)
        clip_start_s, clip_end_s  float64 (N,)
        video str (source path), key str, fps float, frames int, attrs dict, and `label` (int) when
        `labels` maps the video's source path or key to a class index.

    `videos` restricts to these inputs (source paths or keys); `labels` without an entry for a
    video leaves that video out (with a warning) so training sets can be a subset.
    Use `collate_features` in a DataLoader: videos have different N.
    """

    def __init__(
        self,
        out_dir: str | os.PathLike[str],
        *,
        streams: Sequence[str] = STREAMS,
        videos: Sequence[str] | None = None,
        labels: Mapping[str, int] | None = None,
    ):
        self.out_dir = Path(out_dir)
        self.streams = tuple(streams)
        if not self.streams or set(self.streams) - set(STREAMS):
            raise ConfigError(f"streams must be among {STREAMS}, got {streams}")
        entries = sorted((e for e in load_index(self.out_dir).values() if e.status == "ok"), key=lambda e: e.input)
        if videos is not None:
            wanted = {str(v) for v in videos} | {os.path.abspath(v) for v in videos}
            entries = [e for e in entries if e.input in wanted or e.key in wanted]
        for e in entries:
            missing = set(self.streams) - set(e.info.get("streams", STREAMS))
            if missing:
                raise ConfigError(f"{e.input}: no {', '.join(sorted(missing))} features in {self.out_dir}")
        self.labels = dict(labels) if labels is not None else None
        if self.labels is not None:
            kept = [e for e in entries if e.input in self.labels or e.key in self.labels]
            if len(kept) < len(entries):
                log.warning("%d of %d videos have no label and are left out", len(entries) - len(kept), len(entries))
            entries = kept
        self.entries: list[LedgerEntry] = entries

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, index: int) -> dict[str, Any]:
        entry = self.entries[index]
        v = read_video(self.out_dir, entry)
        item: dict[str, Any] = {
            "features": torch.from_numpy(np.concatenate([v.features[s] for s in self.streams], axis=1)),
            "clip_start_s": torch.from_numpy(v.clip_start_s),
            "clip_end_s": torch.from_numpy(v.clip_end_s),
            "video": v.source_path,
            "key": v.key,
            "fps": v.fps,
            "frames": v.frames,
            "attrs": v.attrs,
        }
        if self.labels is not None:
            item["label"] = int(self.labels.get(entry.input, self.labels.get(entry.key)))
        return item


def collate_features(items: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Batch FeatureDataset items of different clip counts: `features` (B, N_max, D) zero-padded,
    `mask` (B, N_max) bool (True = a real clip), `lengths` (B,), `clip_start_s`/`clip_end_s`
    (B, N_max) padded with 0, `label` (B,) when items have it, the rest as lists."""
    if not items:
        raise ValueError("collate_features needs at least one item")
    lengths = torch.tensor([it["features"].shape[0] for it in items])
    n, d = int(lengths.max()), items[0]["features"].shape[1]
    features = torch.zeros(len(items), n, d, dtype=items[0]["features"].dtype)
    mask = torch.zeros(len(items), n, dtype=torch.bool)
    starts = torch.zeros(len(items), n, dtype=torch.float64)
    ends = torch.zeros(len(items), n, dtype=torch.float64)
    for i, it in enumerate(items):
        k = int(lengths[i])
        features[i, :k] = it["features"]
        mask[i, :k] = True
        starts[i, :k] = it["clip_start_s"]
        ends[i, :k] = it["clip_end_s"]
    batch: dict[str, Any] = {"features": features, "mask": mask, "lengths": lengths, "clip_start_s": starts, "clip_end_s": ends}
    if "label" in items[0]:
        batch["label"] = torch.tensor([int(it["label"]) for it in items])
    for name in ("video", "key", "fps", "frames", "attrs"):
        batch[name] = [it[name] for it in items]
    return batch
