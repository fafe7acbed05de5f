"""Pieces: the files preprocess's frames are written into, by many writer processes at once.

A shard (pipeline/shards.py) holds each video's `rgb` and `flow` as HDF5 virtual datasets over
chunks of frames stored in piece files: readers see one dataset per stream (h5py reads across the
pieces), while the frames are written where they were decoded, by the job's sink tasks on every
node, never through one process. A segment decode (`segment_chunks`) yields its frames in chunks;
a sink call writes the chunks it is given (of any videos) into one new piece file and returns a
`PieceRef` per stream of each chunk; once a video's segments are all decoded and their chunks
written, the job adds the video to a shard from its refs (`ShardWriter.add_video`).

Directory::

    OUT/pieces/piece-<32 hex>.h5        complete pieces, never rewritten
    OUT/pieces/piece-<32 hex>.h5.tmp    a piece being written; renamed when complete
    /<i>/rgb, /<i>/flow                 chunk i of the piece: uint8 (t, H, W, 3) frames, stored flow

A shard names the pieces it reads in its `pieces` attribute, so a run can delete the pieces no
shard uses (`remove_unused`: those of videos that failed or were never added to a shard before a
crash) without opening every video.
"""

from __future__ import annotations

import json
import logging
import shutil
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from quovadis.pipeline import conventions, durable
from quovadis.pipeline.clips import SegmentEnd
from quovadis.pipeline.decode import DecodeConfig, Segment, iter_frames
from quovadis.pipeline.errors import ShardError
from quovadis.pipeline.probe import VideoInfo

log = logging.getLogger(__name__)

PIECES_DIR = "pieces"
_SPACE_MARGIN_BYTES = 16 << 20  # HDF5 metadata and the chunk cache of a piece being written


@dataclass
class Chunk:
    """Consecutive frames of one video: `rgb` uint8 (t, H, W, 3) are frames [start, start + t);
    `gray` uint8 (n, H, W) the frames of its flow fields [flow_start, flow_start + n - 1) (None:
    no flow), replaced by `flow` (n - 1, H, W, 2) in the shards' flow dtype once computed."""

    start: int
    rgb: np.ndarray
    flow_start: int = 0
    gray: np.ndarray | None = None
    flow: np.ndarray | None = None


@dataclass(frozen=True)
class PieceRef:
    """Frames [start, stop) of a stream of a video, stored as dataset `dataset` of piece `file`
    (a path relative to the shard directory)."""

    stream: str
    start: int
    stop: int
    file: str
    dataset: str


def segment_chunks(path: str, info: VideoInfo, seg: Segment, cfg: DecodeConfig, flow: bool) -> Iterator[Chunk | SegmentEnd]:
    """Decode segment `seg` of `path` into chunks, then its SegmentEnd. With flow, each chunk's grey
    frames start at the frame before it (the previous chunk's last) and the segment's last chunk
    runs one frame past its end, so the flow fields at the border (seg.end-1 -> seg.end) are those
    of an unsplit decode and every field belongs to exactly one segment. DecodeError as
    iter_frames: partial output is then to be discarded."""
    end = seg.end + 1 if (flow and seg.end is not None) else seg.end
    count = 0
    previous = None  # last frame of the previous chunk: the first frame of the next flow pair
    warnings: list[str] = []
    for chunk in iter_frames(path, cfg, info, start=seg.start, end=end, warnings=warnings):
        own = chunk.frames if seg.end is None else chunk.frames[: seg.end - chunk.start]
        out = Chunk(chunk.start, own)
        if flow:
            frames = chunk.frames if previous is None else np.concatenate([previous[None], chunk.frames])
            if len(frames) >= 2:
                out.flow_start, out.gray = chunk.start - (previous is not None), conventions.rgb_to_gray(frames)
            previous = chunk.frames[-1]
        count += len(own)
        if len(own) or out.gray is not None:
            yield out
    yield SegmentEnd(seg, count, None, warnings)


def write_piece(shard_dir: Path, chunks: Sequence[Chunk], compression: dict, chunk_frames: int) -> list[list[PieceRef]]:
    """Write `chunks` into one new piece of `shard_dir` (temporary name, then renamed) and return
    each chunk's refs. ShardError naming the piece when the disk cannot take it (checked first:
    HDF5 can abort the process on a full disk)."""
    directory = Path(shard_dir) / PIECES_DIR
    directory.mkdir(parents=True, exist_ok=True)
    final = directory / f"piece-{uuid.uuid4().hex}.h5"
    nbytes = sum(c.rgb.nbytes + (0 if c.flow is None else c.flow.nbytes) for c in chunks)
    free = shutil.disk_usage(directory).free
    if free < nbytes + _SPACE_MARGIN_BYTES:
        raise ShardError(f"{final}: No space left on device: {free / 2**20:.0f} MiB free in {directory}, "
                         f"{nbytes / 2**20:.1f} MiB to write")  # fmt: skip
    tmp = durable.tmp_path(final)
    relative = f"{PIECES_DIR}/{final.name}"
    refs: list[list[PieceRef]] = []
    try:
        with h5py.File(tmp, "w") as f:
            for i, chunk in enumerate(chunks):
                mine = []
                for stream, start, data in (("rgb", chunk.start, chunk.rgb), ("flow", chunk.flow_start, chunk.flow)):
                    if data is None or not len(data):
                        continue
                    name = f"{i}/{stream}"
                    f.create_dataset(name, data=data, chunks=(min(chunk_frames, len(data)), *data.shape[1:]), **compression)
                    mine.append(PieceRef(stream, start, start + len(data), relative, name))
                refs.append(mine)
        durable.commit(tmp, final)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise ShardError(f"{final}: cannot write: {e}") from e
    return refs


def used_by(shard: h5py.File) -> list[str]:
    """The pieces a shard reads (its `pieces` attribute; none for a shard of real datasets)."""
    return json.loads(shard.attrs.get("pieces", "[]"))


def remove_unused(shard_dir: Path, shards: Sequence[Path]) -> int:
    """Delete the pieces of `shard_dir` that none of `shards` (its complete shards) uses, and
    temporary pieces; returns how many were deleted. Only under the job's lock: a running job's
    pieces are used by no complete shard yet."""
    directory = Path(shard_dir) / PIECES_DIR
    if not directory.is_dir():
        return 0
    used: set[str] = set()
    for path in shards:
        try:
            with h5py.File(path, "r") as f:
                used.update(used_by(f))
        except OSError as e:  # an unreadable shard: keep every piece, it may be one of its
            log.warning("cannot read %s (%s); keeping every piece", path, e)
            return 0
    removed = 0
    for piece in directory.iterdir():
        if f"{PIECES_DIR}/{piece.name}" not in used:
            piece.unlink()
            removed += 1
    if removed:
        log.info("removed %d pieces of %s that no shard uses (left by failed videos or an interrupted run)", removed, directory)
    return removed


def check_present(shard: h5py.File, shard_path: Path) -> None:
    """ShardError naming the missing pieces of a shard: HDF5 would read them as zeros, silently."""
    missing = [name for name in used_by(shard) if not (Path(shard_path).parent / name).is_file()]
    if missing:
        raise ShardError(f"{shard_path}: {len(missing)} of its pieces are missing (first: {missing[0]}); "
                         "a shard directory must be copied whole, pieces/ included")  # fmt: skip
