"""HDF5 shard files: the on-disk form of decoded frames (and flow), written once, read many times.

Directory (see also pipeline/manifest.py)::

    OUT/shard-00000.h5, shard-00001.h5, ...   complete shards, never rewritten
    OUT/shard-NNNNN.h5.tmp                    a shard being written; committed under its final
                                              name (pipeline.durable) only when closed and complete.
                                              A writer opening OUT deletes leftovers of a crashed run.
    OUT/pieces/                               frames of the shards' virtual datasets (pipeline/pieces.py)
    OUT/manifest.jsonl                        one line per input event, `ok` lines only after rename
    OUT/report.json                           the job summary

Inside a shard (h5py only is needed to read it)::

    /                        attrs: format="quovadis-shard", format_version, conventions_version
    /<key>                   one group per video, key = video_key(source path)
        attrs: source_path (str), frames, fps, height, width, conventions_version, config (JSON of
               the job config), complete=True, flow_dtype (when flow is stored), warnings (JSON
               list of ffmpeg's errors of a decode that kept its frames; [] if none), and the probe
               metadata of the source (source_fps, duration, codec, ... as scalars; other values
               as JSON strings)
        rgb   uint8 (T, H, W, 3), RGB, 0..255, frame k at time k / fps
        flow  (T-1, H, W, 2), (x, y) order, field t is frame t -> t+1; uint8 quantised with
              pipeline.conventions.quantize_flow (flow_dtype "uint8") or float16 pixels ("float16")

Both datasets are chunked along time, `chunk_frames` frames x the whole frame per chunk, so a clip
of L frames reads only the chunks it touches, and compressed with `compression`. A video written by
`begin_video` / `write_*` / `end_video` has real datasets; one added by `add_video` (preprocess)
has virtual datasets over the chunks of frames in piece files (pipeline/pieces.py), chunked and
compressed the same way, read the same way by h5py; the root's `pieces` attribute (JSON list of
paths relative to the shard) names the pieces a shard reads.

Defaults, from jobs/bench/shards.py and jobs/bench/decode.py on the shared videos (BENCHMARKS.md;
measured when one writer process served a whole job, before pieces were written by many): no
compression, because lzf capped that writer at ~180 MB/s (about 500 frames/s at 256x455),
decode+write reached only 0.45 of plain ffmpeg per core with lzf against 0.78 without, and
uncompressed clips read ~10x faster for training. `lzf` (64 % of raw size; against gzip level 1:
1.5x faster to read, 2.3x to write, at 1.2x the size) is the choice when disk matters more
(`--compression lzf`). One frame per chunk (255 KiB at 256x340, inside h5py's 10 KiB-1 MiB advice;
as fast as 2 or 4; reads no frame outside the clip).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import unicodedata
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from quovadis.pipeline import conventions, durable
from quovadis.pipeline.errors import ConfigError, ShardError
from quovadis.pipeline.pieces import PieceRef, check_present
from quovadis.pipeline.manifest import LedgerEntry, adopt_unlisted, append as manifest_append, load as manifest_load, manifest_path

log = logging.getLogger(__name__)

FORMAT = "quovadis-shard"
FORMAT_VERSION = 1
SHARD_PATTERN = re.compile(r"^shard-(\d{5,})\.h5$")
COMPRESSIONS = ("none", "lzf", "gzip1", "gzip4", "gzip9")
FLOW_DTYPES = ("uint8", "float16")
STREAMS = ("rgb", "flow")
_KEY_STEM_CHARS = 48
_RESERVED_ATTRS = frozenset(
    {"source_path", "frames", "fps", "height", "width", "conventions_version", "config", "complete", "flow_dtype", "warnings"}
)
_WRITE_CACHE_BYTES = 4 << 20  # per dataset: holds the partial chunks at segment borders
_READ_CACHE_BYTES = 4 << 20  # per dataset: a few chunks of one clip


def stored_flow(flow: np.ndarray, flow_dtype: str) -> np.ndarray:
    """Float flow in pixels as shards store it: quantised uint8 or float16 pixels (`FLOW_DTYPES`)."""
    return conventions.quantize_flow(flow) if flow_dtype == "uint8" else flow.astype(np.float16)


@dataclass(frozen=True)
class ShardConfig:
    """How shards are written. `compression`: none | lzf | gzip1 | gzip4 | gzip9 (gzip level)."""

    shard_size_bytes: int = 1 << 30  # a shard takes no new videos once its file reaches this size
    compression: str = "none"  # measured: jobs/bench/shards.py, jobs/bench/decode.py
    chunk_frames: int = 1  # frames per HDF5 chunk along time; measured: jobs/bench/shards.py
    flow_dtype: str = "uint8"  # "uint8" (quantised, conventions.quantize_flow) or "float16" pixels

    def __post_init__(self) -> None:
        if self.shard_size_bytes < 1:
            raise ConfigError(f"shard size must be >= 1 byte, got {self.shard_size_bytes}")
        if self.compression not in COMPRESSIONS:
            raise ConfigError(f"shard compression must be one of {', '.join(COMPRESSIONS)}, got {self.compression!r}")
        if self.chunk_frames < 1:
            raise ConfigError(f"chunk_frames must be >= 1, got {self.chunk_frames}")
        if self.flow_dtype not in FLOW_DTYPES:
            raise ConfigError(f"flow dtype must be one of {', '.join(FLOW_DTYPES)}, got {self.flow_dtype!r}")


def compression_options(name: str) -> dict[str, Any]:
    """h5py create_dataset keyword arguments for a compression name of ShardConfig."""
    if name == "none":
        return {}
    if name == "lzf":
        return {"compression": "lzf"}
    if name.startswith("gzip") and name[4:].isdigit():
        return {"compression": "gzip", "compression_opts": int(name[4:])}
    raise ConfigError(f"unknown shard compression {name!r}")


def video_key(source_path: str | os.PathLike[str]) -> str:
    """A safe, deterministic HDF5 group name for an input, unique per absolute path.

    A readable ASCII stem (letters, digits, `-_.`; accents folded, the rest `_`, at most 48
    characters) then `-` and the first 16 hex digits of sha256(absolute path, UTF-8 with
    surrogateescape). The hash keeps same-named files of different folders apart; the stem is only
    for people. The result never contains `/`, never starts with `.` and is never empty.
    """
    absolute = os.path.abspath(os.fspath(source_path))
    digest = hashlib.sha256(absolute.encode("utf-8", errors="surrogateescape")).hexdigest()[:16]
    stem = os.path.splitext(os.path.basename(absolute))[0]
    ascii_stem = unicodedata.normalize("NFKD", stem).encode("ascii", errors="ignore").decode("ascii")
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", ascii_stem).lstrip(".")[:_KEY_STEM_CHARS] or "video"
    return f"{safe}-{digest}"


def shard_name(index: int) -> str:
    return f"shard-{index:05d}.h5"


def list_shards(shard_dir: Path) -> list[Path]:
    """Complete shard files of a directory, in index order (temporary files excluded)."""
    found = [(int(m.group(1)), p) for p in Path(shard_dir).iterdir() if (m := SHARD_PATTERN.match(p.name))]
    return [p for _, p in sorted(found)]


def attr_value(value: Any) -> Any:
    """A metadata value as an HDF5 attribute: scalars and strings as they are, the rest as JSON."""
    if isinstance(value, str):
        return value.encode("utf-8", errors="surrogateescape").decode("utf-8", errors="backslashreplace")
    if isinstance(value, (bool, int, float, np.integer, np.floating, np.bool_)):
        return value
    return json.dumps(value, default=str)


def _json_safe(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))


class _Ranges:
    """Which [start, stop) frame ranges were written, to tell a complete video from a gap."""

    def __init__(self) -> None:
        self.spans: list[tuple[int, int]] = []

    def add(self, start: int, stop: int) -> None:
        self.spans.append((start, stop))

    def covers(self, stop: int) -> bool:
        reached = 0
        for a, b in sorted(self.spans):
            if a > reached:
                break
            reached = max(reached, b)
        return reached >= stop


@dataclass
class _Video:
    key: str
    source_path: str
    shard: _Shard
    height: int
    width: int
    streams: tuple[str, ...]
    info: dict[str, Any]
    written: dict[str, _Ranges] = field(default_factory=dict)
    frames: int | None = None  # set by end_video
    warnings: list[str] = field(default_factory=list)  # set by end_video


@dataclass
class _Shard:
    index: int
    file: h5py.File
    tmp_path: Path
    final_path: Path
    videos: dict[str, _Video] = field(default_factory=dict)
    full: bool = False
    pieces: set[str] = field(default_factory=set)  # the pieces its virtual datasets read
    referenced: int = 0  # bytes of its videos stored in pieces

    @property
    def name(self) -> str:
        return self.final_path.name

    def size(self) -> int:
        return self.file.id.get_filesize()


class ShardWriter:
    """Writes videos into shards of about `cfg.shard_size_bytes`, each under a temporary name until
    it is complete, then renames it and appends the `ok` manifest lines of its videos.

    Used from one process (preprocess's driver, adding videos written into pieces; benchmarks and
    tests write frames through it). Videos can arrive interleaved and in segments
    out of order; `end_video` checks that every frame was written. Several shards can be open at
    once: a full shard waits for its unfinished videos while new videos go to the next one.

    The writer appends `ok` entries to the manifest itself (only after the rename, so an entry
    always points at a complete file); the job appends `failed` entries.
    """

    def __init__(self, out_dir: Path, cfg: ShardConfig, job_config: Mapping[str, Any]):
        self.out_dir = Path(out_dir)
        self.cfg = cfg
        self.job_config_json = json.dumps(_json_safe(dict(job_config)), sort_keys=True)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        for leftover in self.out_dir.glob(f"shard-*.h5{durable.TMP_SUFFIX}"):
            log.warning("removing %s left by an interrupted run", leftover)
            leftover.unlink()
        # never reuse the name of a shard the manifest still points at, even one deleted since
        # (extract deletes its intermediate shards once their features are written)
        names = [p.name for p in list_shards(self.out_dir)] + [e.file for e in manifest_load(self.out_dir).values() if e.file]
        self._next_index = max((int(m[1]) for n in names if (m := SHARD_PATTERN.match(n))), default=-1) + 1
        self._shards: list[_Shard] = []
        self._current: _Shard | None = None
        self._videos: dict[str, _Video] = {}
        self._compression = compression_options(cfg.compression)

    # -- public API -------------------------------------------------------------------------

    def begin_video(
        self,
        source_path: str,
        *,
        height: int,
        width: int,
        expected_frames: int | None,
        streams: tuple[str, ...],
        attrs: Mapping[str, Any],
        fps: float = conventions.FPS,
    ) -> str:
        """Create the video's group in the current shard and return its key.

        `height`, `width`, `fps` describe the STORED frames. `attrs` is the source's probe metadata
        (JSON-able values); its names that clash with the stored ones (width, height, fps, ...)
        are kept with a `source_` prefix. `expected_frames` only pre-sizes the datasets.
        """
        key = self._new_key(source_path, streams, height, width)
        shard = self._shard_for_new_video()
        group, info = self._create_group(shard, key, source_path, height, width, streams, attrs, fps)
        n = max(int(expected_frames or 0), 0)
        k = self.cfg.chunk_frames
        try:
            group.create_dataset(
                "rgb", shape=(n, height, width, 3), maxshape=(None, height, width, 3),
                dtype=np.uint8, chunks=(k, height, width, 3), **self._compression,
            )  # fmt: skip
            if "flow" in streams:
                group.create_dataset(
                    "flow", shape=(max(n - 1, 0), height, width, 2), maxshape=(None, height, width, 2),
                    dtype=np.dtype(self.cfg.flow_dtype), chunks=(k, height, width, 2), **self._compression,
                )  # fmt: skip
        except (OSError, ValueError, TypeError) as e:
            raise ShardError(f"{shard.tmp_path}: cannot create group for {source_path}: {e}") from e
        video = _Video(key, str(source_path), shard, int(height), int(width), tuple(streams), info)
        video.written = {s: _Ranges() for s in streams}
        shard.videos[key] = video
        self._videos[key] = video
        return key

    def add_video(
        self,
        source_path: str,
        *,
        height: int,
        width: int,
        frames: int,
        streams: tuple[str, ...],
        attrs: Mapping[str, Any],
        refs: Sequence[PieceRef],
        warnings: Sequence[str] = (),
        fps: float = conventions.FPS,
    ) -> list[LedgerEntry]:
        """Add a complete video whose frames were written into pieces (pipeline/pieces.py): its
        `rgb` and `flow` become virtual datasets over the chunks `refs` name (a chunk named twice,
        by a redone write, is read from one of them). Arguments as begin_video and end_video.

        ShardError when the refs leave a frame (or flow field) below `frames` uncovered. Returns
        the manifest entries of the shards this completed and renamed."""
        key = self._new_key(source_path, streams, height, width)
        if frames < 1:
            raise ShardError(f"{source_path}: a stored video needs >= 1 frame, got {frames}")
        layouts = {s: _layout(source_path, s, [r for r in refs if r.stream == s], frames if s == "rgb" else frames - 1,
                              (int(height), int(width), 3 if s == "rgb" else 2),
                              np.dtype(np.uint8 if s == "rgb" else self.cfg.flow_dtype)) for s in streams}  # fmt: skip
        shard = self._shard_for_new_video()
        group, info = self._create_group(shard, key, source_path, height, width, streams, attrs, fps)
        try:
            for stream, (layout, used) in layouts.items():
                if layout.shape[0]:
                    group.create_virtual_dataset(stream, layout)
                else:  # a one-frame video's flow: no field, no piece
                    group.create_dataset(stream, shape=layout.shape, dtype=layout.dtype)
                shard.pieces.update(used)
                shard.referenced += int(np.prod(layout.shape)) * layout.dtype.itemsize
            group.attrs["frames"] = int(frames)
            group.attrs["warnings"] = json.dumps(list(warnings))
            group.attrs["complete"] = True
        except (OSError, ValueError, TypeError) as e:
            raise ShardError(f"{shard.tmp_path}: cannot add {source_path}: {e}") from e
        video = _Video(key, str(source_path), shard, int(height), int(width), tuple(streams), info, frames=int(frames),
                       warnings=list(warnings))  # fmt: skip
        shard.videos[key] = video
        self._videos[key] = video
        self._check_full(shard)
        return self._finish_ready()

    def write_rgb(self, key: str, start: int, frames: np.ndarray) -> None:
        """Store uint8 (t, H, W, 3) frames as frames[start : start + t] of the video."""
        video = self._video(key)
        if frames.dtype != np.uint8 or frames.shape[1:] != (video.height, video.width, 3):
            raise ShardError(
                f"{video.source_path}: rgb must be uint8 (t, {video.height}, {video.width}, 3), "
                f"got {frames.dtype} {frames.shape}"
            )
        self._write(video, "rgb", start, frames)

    def write_flow(self, key: str, start: int, flow: np.ndarray) -> None:
        """Store flow fields start .. start+t-1 (field i is frame i -> i+1), (t, H, W, 2) (x, y).

        float input is in pixels and is quantised (cfg.flow_dtype uint8) or cast to float16;
        uint8 input is taken as already quantised (only when cfg.flow_dtype is uint8).
        """
        video = self._video(key)
        if "flow" not in video.streams:
            raise ShardError(f"{video.source_path}: flow was not declared in begin_video streams")
        if flow.shape[1:] != (video.height, video.width, 2):
            raise ShardError(
                f"{video.source_path}: flow must be (t, {video.height}, {video.width}, 2), got {flow.shape}"
            )
        if flow.dtype == np.uint8:
            if self.cfg.flow_dtype != "uint8":
                raise ShardError(f"{video.source_path}: uint8 flow given but shards store {self.cfg.flow_dtype}")
            stored = flow
        elif np.issubdtype(flow.dtype, np.floating):
            stored = stored_flow(flow, self.cfg.flow_dtype)
        else:
            raise ShardError(f"{video.source_path}: flow must be float pixels or uint8, got {flow.dtype}")
        self._write(video, "flow", start, stored)

    def end_video(self, key: str, frames: int, warnings: Sequence[str] = ()) -> list[LedgerEntry]:
        """Mark the video complete with `frames` frames (datasets trimmed to it, flow to frames-1).
        `warnings` (ffmpeg errors of a decode that kept its frames) go to its attrs and manifest entry.

        Raises ShardError when a frame (or flow field) below that count was never written.
        Returns the manifest entries of the shards this completed and renamed.
        """
        video = self._video(key)
        group = video.shard.file[key]
        if frames < 1:
            raise ShardError(f"{video.source_path}: a stored video needs >= 1 frame, got {frames}")
        for stream in video.streams:
            need = frames if stream == "rgb" else frames - 1
            if not video.written[stream].covers(need):
                raise ShardError(f"{video.source_path}: {stream} frames below {need} were not all written")
            group[stream].resize(need, axis=0)
        group.attrs["frames"] = int(frames)
        group.attrs["warnings"] = json.dumps(list(warnings))
        group.attrs["complete"] = True
        video.frames = int(frames)
        video.warnings = list(warnings)
        try:
            video.shard.file.flush()  # the video's cached chunks reach the file, so its size is true
        except OSError as e:
            raise ShardError(f"{video.shard.tmp_path}: cannot flush: {e}") from e
        self._check_full(video.shard)
        return self._finish_ready()

    def abort_video(self, key: str) -> list[LedgerEntry]:
        """Forget a failed video: its group is deleted (the space is not reclaimed; fine).

        Returns the entries of a full shard that this video was the last one open in."""
        self._drop(key)
        return self._finish_ready()

    def finish_ready(self) -> list[LedgerEntry]:
        """Finalise full shards whose videos are all ended (end_video does this already)."""
        return self._finish_ready()

    def close(self) -> list[LedgerEntry]:
        """Finalise every open shard. Videos not ended are dropped (they have no manifest entry)."""
        entries: list[LedgerEntry] = []
        for shard in list(self._shards):
            for key in [k for k, v in shard.videos.items() if v.frames is None]:
                log.warning("%s: dropping unfinished video %s", shard.tmp_path, shard.videos[key].source_path)
                self._drop(key)
            entries += self._finalise(shard)
        self._current = None
        return entries

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- internals --------------------------------------------------------------------------

    def _new_key(self, source_path: str, streams: tuple[str, ...], height: int, width: int) -> str:
        key = video_key(source_path)
        if key in self._videos:
            raise ShardError(f"{source_path}: video already being written (key {key})")
        unknown = set(streams) - set(STREAMS)
        if not streams or unknown or "rgb" not in streams:
            raise ConfigError(f"{source_path}: streams must include rgb and be among {STREAMS}, got {streams}")
        if height < 1 or width < 1:
            raise ShardError(f"{source_path}: bad frame size {height}x{width}")
        return key

    def _create_group(self, shard: _Shard, key: str, source_path: str, height: int, width: int,
                      streams: tuple[str, ...], attrs: Mapping[str, Any], fps: float) -> tuple[h5py.Group, dict[str, Any]]:  # fmt: skip
        """The video's group with its attributes (not yet complete), and its manifest info."""
        fps = float(fps)
        metadata = {(f"source_{k}" if k in _RESERVED_ATTRS else k): v for k, v in attrs.items() if v is not None}
        try:
            group = shard.file.create_group(key)
            for name, value in metadata.items():
                if name not in _RESERVED_ATTRS:
                    group.attrs[name] = attr_value(value)
            group.attrs["source_path"] = attr_value(str(source_path))
            group.attrs["fps"] = fps
            group.attrs["height"] = int(height)
            group.attrs["width"] = int(width)
            group.attrs["conventions_version"] = conventions.CONVENTIONS_VERSION
            group.attrs["config"] = self.job_config_json
            group.attrs["complete"] = False
            if "flow" in streams:
                group.attrs["flow_dtype"] = self.cfg.flow_dtype
        except (OSError, ValueError, TypeError) as e:
            raise ShardError(f"{shard.tmp_path}: cannot create group for {source_path}: {e}") from e
        info = {
            **_json_safe({k: v for k, v in metadata.items() if k not in _RESERVED_ATTRS}),
            "fps": fps,
            "height": int(height),
            "width": int(width),
            "streams": list(streams),
        }
        if "flow" in streams:
            info["flow_dtype"] = self.cfg.flow_dtype
        return group, info

    def _video(self, key: str) -> _Video:
        try:
            return self._videos[key]
        except KeyError:
            raise ShardError(f"no video with key {key!r} is being written") from None

    def _drop(self, key: str) -> None:
        video = self._videos.pop(key, None)
        if video is None:
            return
        del video.shard.videos[key]
        try:
            del video.shard.file[key]
        except (KeyError, OSError) as e:
            raise ShardError(f"{video.shard.tmp_path}: cannot delete group {key}: {e}") from e

    def _shard_for_new_video(self) -> _Shard:
        if self._current is None or self._current.full:
            index = self._next_index
            self._next_index += 1
            final = self.out_dir / shard_name(index)
            tmp = durable.tmp_path(final)
            try:
                f = h5py.File(tmp, "w", rdcc_nbytes=_WRITE_CACHE_BYTES, rdcc_nslots=1021)
            except OSError as e:
                raise ShardError(f"cannot create shard {tmp}: {e}") from e
            f.attrs["format"] = FORMAT
            f.attrs["format_version"] = FORMAT_VERSION
            f.attrs["conventions_version"] = conventions.CONVENTIONS_VERSION
            self._current = _Shard(index, f, tmp, final)
            self._shards.append(self._current)
        return self._current

    def _write(self, video: _Video, stream: str, start: int, data: np.ndarray) -> None:
        self._check_space(video, data.nbytes)
        if start < 0:
            raise ShardError(f"{video.source_path}: negative {stream} start {start}")
        if video.frames is not None:
            raise ShardError(f"{video.source_path}: written after end_video")
        stop = start + data.shape[0]
        dset = video.shard.file[video.key][stream]
        try:
            if dset.shape[0] < stop:
                dset.resize(stop, axis=0)
            dset[start:stop] = data
        except (OSError, ValueError, TypeError) as e:
            raise ShardError(f"{video.shard.tmp_path}: cannot write {stream} of {video.source_path}: {e}") from e
        video.written[stream].add(start, stop)
        self._check_full(video.shard)

    def _check_space(self, video: _Video, nbytes: int) -> None:
        """Refuse a write the disk cannot take: HDF5 can abort the process on a full disk, losing
        the open shard. Each open dataset may hold _WRITE_CACHE_BYTES not yet on disk."""
        open_datasets = sum(len(v.streams) for v in self._videos.values())
        free = shutil.disk_usage(self.out_dir).free
        if free < nbytes + open_datasets * _WRITE_CACHE_BYTES:
            raise ShardError(
                f"{video.source_path}: No space left on device: {free / 2**20:.0f} MiB free in {self.out_dir}, "
                f"{nbytes / 2**20:.1f} MiB to write plus {open_datasets * _WRITE_CACHE_BYTES / 2**20:.0f} MiB of write cache"
            )

    def _check_full(self, shard: _Shard) -> None:
        """Full once the file reaches the target size. Between flushes (each end_video) the size
        lags by at most the chunk cache of the open datasets (_WRITE_CACHE_BYTES each)."""
        if not shard.full and shard.size() + shard.referenced >= self.cfg.shard_size_bytes:
            shard.full = True

    def _finish_ready(self) -> list[LedgerEntry]:
        entries: list[LedgerEntry] = []
        for shard in list(self._shards):
            if shard.full and all(v.frames is not None for v in shard.videos.values()):
                entries += self._finalise(shard)
        return entries

    def _finalise(self, shard: _Shard) -> list[LedgerEntry]:
        """Close, commit under the final name (pipeline.durable), then append the `ok` lines of its videos."""
        self._shards.remove(shard)
        if self._current is shard:
            self._current = None
        videos = list(shard.videos.values())
        for v in videos:
            self._videos.pop(v.key, None)
        try:
            shard.file.attrs["pieces"] = json.dumps(sorted(shard.pieces))
            shard.file.close()
            if not videos:
                shard.tmp_path.unlink()
                return []
            durable.commit(shard.tmp_path, shard.final_path)
        except OSError as e:
            raise ShardError(f"cannot finalise shard {shard.tmp_path}: {e}") from e
        entries = [
            LedgerEntry(
                input=v.source_path, status="ok", file=shard.name, key=v.key, frames=v.frames, info=v.info,
                warnings=v.warnings,
            )
            for v in videos
        ]
        manifest_append(self.out_dir, entries)
        log.info("wrote %s (%d videos)", shard.final_path, len(videos))
        return entries


def _layout(source_path: str, stream: str, refs: list[PieceRef], frames: int, frame_shape: tuple[int, ...],
            dtype: np.dtype) -> tuple[h5py.VirtualLayout, set[str]]:  # fmt: skip
    """The virtual layout of `frames` frames of a stream from its refs, and the pieces it reads."""
    layout = h5py.VirtualLayout(shape=(frames, *frame_shape), dtype=dtype)
    used: set[str] = set()
    reached = 0
    for ref in sorted(refs, key=lambda r: (r.start, -r.stop)):
        if reached >= frames:
            break
        if ref.start > reached:
            break
        if ref.stop <= reached:  # a duplicate
            continue
        stop = min(ref.stop, frames)
        source = h5py.VirtualSource(ref.file, ref.dataset, shape=(ref.stop - ref.start, *frame_shape), dtype=dtype)
        layout[reached:stop] = source[reached - ref.start : stop - ref.start]
        used.add(ref.file)
        reached = stop
    if reached < frames:
        raise ShardError(f"{source_path}: {stream} frames {reached}..{frames - 1} were not all written")
    return layout, used


# -- reading ------------------------------------------------------------------------------------


def read_frames(dset: h5py.Dataset, indices: np.ndarray, region: tuple[slice, slice] = (slice(None), slice(None))):
    """dset[indices] for sorted-or-not frame indices, read as ONE contiguous range then indexed
    (one pass over the chunks instead of a fancy per-frame read), optionally cropped to `region`."""
    indices = np.asarray(indices)
    lo, hi = int(indices.min()), int(indices.max()) + 1
    block = dset[lo:hi, region[0], region[1]]
    return block[indices - lo]


class StoredVideo:
    """One video of a shard: its attributes and lazy reads of `rgb` / `flow` ranges."""

    def __init__(self, group: h5py.Group, shard_path: Path):
        self.group = group
        self.shard_path = shard_path
        self.key = group.name.lstrip("/")
        attrs = dict(group.attrs)
        self.attrs: dict[str, Any] = {k: (v.item() if isinstance(v, np.generic) else v) for k, v in attrs.items()}
        if not self.attrs.get("complete", False):
            raise ShardError(f"{shard_path}: video {self.key} is not complete")
        check_present(group.file, shard_path)
        self.source_path: str = self.attrs["source_path"]
        self.frames: int = int(self.attrs["frames"])
        self.fps: float = float(self.attrs["fps"])
        self.height: int = int(self.attrs["height"])
        self.width: int = int(self.attrs["width"])
        self.config: dict[str, Any] = json.loads(self.attrs.get("config", "{}"))
        self.warnings: list[str] = json.loads(self.attrs.get("warnings", "[]"))  # none in older shards

    @property
    def streams(self) -> tuple[str, ...]:
        return tuple(s for s in STREAMS if s in self.group)

    def rgb(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        """uint8 (t, H, W, 3) frames [start, stop)."""
        return self.group["rgb"][start:stop]

    def flow(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Stored flow fields [start, stop) (uint8 quantised or float16 pixels, see flow_dtype)."""
        if "flow" not in self.group:
            raise ShardError(f"{self.shard_path}: video {self.key} has no flow stored")
        return self.group["flow"][start:stop]

    def flow_pixels(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        """float32 (t, H, W, 2) flow in pixels, whatever the stored dtype."""
        flow = self.flow(start, stop)
        return conventions.dequantize_flow(flow) if flow.dtype == np.uint8 else flow.astype(np.float32)


class ShardReader:
    """A read-only shard file. `reader[key]` gives a StoredVideo; close it (or use `with`)."""

    def __init__(self, path: Path, *, cache_bytes: int = _READ_CACHE_BYTES):
        self.path = Path(path)
        try:
            self.file = h5py.File(self.path, "r", rdcc_nbytes=cache_bytes)
        except OSError as e:
            raise ShardError(f"cannot open shard {self.path}: {e}") from e
        if self.file.attrs.get("format") != FORMAT:
            self.file.close()
            raise ShardError(f"{self.path} is not a quovadis shard (format attribute missing)")

    def keys(self) -> list[str]:
        return list(self.file.keys())

    def __contains__(self, key: str) -> bool:
        return key in self.file

    def __getitem__(self, key: str) -> StoredVideo:
        if key not in self.file:
            raise ShardError(f"{self.path} has no video {key!r}")
        return StoredVideo(self.file[key], self.path)

    def close(self) -> None:
        self.file.close()

    def __enter__(self) -> ShardReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def record_unlisted_shards(out_dir: Path) -> list[LedgerEntry]:
    """Adopt complete shards that the manifest does not name (manifest.adopt_unlisted): a re-run
    neither redoes their videos nor stores them twice."""
    return adopt_unlisted(manifest_path(out_dir), {p.name: p for p in list_shards(out_dir)}, _shard_entries)


def _shard_entries(path: Path) -> list[LedgerEntry]:
    """The `ok` entries of a shard's videos, read back from the shard (all of them are complete)."""
    entries = []
    with ShardReader(path) as reader:
        for key in reader.keys():
            video = reader[key]
            info = {k: v for k, v in video.attrs.items() if k not in _RESERVED_ATTRS}
            info.update(fps=video.fps, height=video.height, width=video.width, streams=list(video.streams))
            entries.append(
                LedgerEntry(input=video.source_path, status="ok", file=path.name, key=key,
                            frames=video.frames, info=_json_safe(info), warnings=video.warnings)
            )  # fmt: skip
    return entries


def find_entry(shard_dir: Path, entry_or_key: LedgerEntry | str) -> LedgerEntry:
    """The `ok` manifest entry for a LedgerEntry, a video key, or an input path."""
    if isinstance(entry_or_key, LedgerEntry):
        return entry_or_key
    entries = manifest_load(shard_dir)
    entry = entries.get(entry_or_key) or entries.get(os.path.abspath(entry_or_key))
    if entry is None:
        entry = next((e for e in entries.values() if e.key == entry_or_key), None)
    if entry is None:
        raise ShardError(f"{shard_dir}: no input or key {entry_or_key!r} in {shard_dir}/manifest.jsonl")
    if entry.status != "ok":
        raise ShardError(f"{shard_dir}: {entry.input} failed: {entry.reason}")
    return entry


class OpenVideo(StoredVideo):
    """A StoredVideo that owns its shard file (close it, or use `with`)."""

    def __init__(self, reader: ShardReader, key: str):
        if key not in reader:
            raise ShardError(f"{reader.path} has no video {key!r}")
        super().__init__(reader.file[key], reader.path)
        self._reader = reader

    def close(self) -> None:
        self._reader.close()

    def __enter__(self) -> OpenVideo:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_video(shard_dir: Path, entry_or_key: LedgerEntry | str) -> OpenVideo:
    """Open one stored video by manifest entry, key or input path: `with open_video(d, p) as v:`."""
    entry = find_entry(Path(shard_dir), entry_or_key)
    reader = ShardReader(Path(shard_dir) / entry.file)
    try:
        return OpenVideo(reader, entry.key)
    except Exception:
        reader.close()
        raise
