"""I3D clips straight from the decoder, segment by segment: what `extract` feeds the model when no
frames are kept on disk.

A segment of a video (decode.plan_segments) owns the clips that start inside it
(`conventions.clip_starts`). It decodes the frame before it, its own frames and the clip_len + 1 frames that follow its
last clip start (the clip's frames, and for flow the frame after its last one), so every clip,
also one across a segment border, is the clip an unsplit decode gives. Segment borders are put on
clip starts (`clip_segment_frames`), so each segment owns whole clips.

A clip carries uint8 RGB frames cropped to its box (`crop_box`) and, for flow, the index of each
of its flow fields among the full-size grey frames of its run (flow is computed on whole frames and
cropped afterwards, as preprocess stores it). The last clips of a video,
which run past its end, are made once the decoder reports the end: they loop their frames
(`conventions.clip_frame_indices` / `clip_flow_indices`), exactly as clips read from shards.

Clips come in runs (`ClipRun`): clips that overlap (stride < clip_len, with flow) share one window
of grey frames, so each flow field of a run is computed once, not once per clip holding it (4
times at a stride of clip_len / 4). A run spans at most RUN_CLIP_LENS clip lengths of fields:
longer runs would recompute less at their borders but make fewer, longer units of flow work
to share among the flow actors.

Memory: one segment holds at most RUN_CLIP_LENS * clip_len + 1 + chunk_frames frames, whatever its
length.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import numpy as np

from quovadis.pipeline import conventions
from quovadis.pipeline.decode import DecodeConfig, Segment, iter_frames
from quovadis.pipeline.errors import ConfigError
from quovadis.pipeline.probe import VideoInfo

CROPS = ("center", "full")
RUN_CLIP_LENS = 4  # the fields of a run of overlapping clips span at most this many clip lengths


@dataclass(frozen=True)
class ClipSpec:
    """Which clips of a video, and what of them: the settings `extract` records with its features."""

    clip_len: int = conventions.CLIP_LEN
    stride: int = conventions.CLIP_LEN
    crop: str = "center"  # center: crop_size x crop_size in the middle; full: the whole frame
    crop_size: int = conventions.CROP_SIZE
    streams: tuple[str, ...] = ("rgb", "flow")

    def crop_box(self, height: int, width: int) -> tuple[int, int, int, int]:
        """(top, left, height, width) of the clips of height x width frames; ConfigError when the
        frames are smaller than the crop (padding would feed the model borders it never saw)."""
        if self.crop == "full":
            return 0, 0, height, width
        size = self.crop_size
        if min(height, width) < size:
            raise ConfigError(f"frames {height}x{width} are smaller than --crop-size {size}; use --crop full or a smaller --crop-size")
        return conventions.center_crop_box(height, width, size)

    @property
    def run_clips(self) -> int:
        """Most clips in a run: as many consecutive clips as fit in RUN_CLIP_LENS clip lengths of
        fields when they overlap and carry flow, else 1 (clips that share no field share nothing)."""
        if "flow" not in self.streams or self.stride >= self.clip_len:
            return 1
        return (RUN_CLIP_LENS - 1) * self.clip_len // self.stride + 1


def clip_segment_frames(segment_frames: int, stride: int) -> int:
    """Segment length rounded up to whole strides, so that each segment starts on a clip start."""
    return max(1, -(-segment_frames // stride)) * stride


@dataclass
class Clip:
    """One clip of a video: `rgb` uint8 (T, h, w, 3) cropped; `fields` (T,) the index of each clip
    flow field among the n - 1 fields of its run's grey frames (field i is gray[i] -> gray[i+1]),
    None for a video of one frame (its flow clip is zeros); `flow` (T, h, w, 2) cropped, in a
    shard's flow dtype, once computed (or read from a shard)."""

    start: int
    box: tuple[int, int, int, int]
    rgb: np.ndarray | None = None
    fields: np.ndarray | None = None
    flow: np.ndarray | None = None


@dataclass
class ClipRun:
    """Consecutive clips of one segment (at most ClipSpec.run_clips) and `gray`, uint8 (n, H, W), the
    whole grey frames of all their flow fields, None once flow is computed or when there is none
    to compute: flow is computed once per run and each clip takes its fields (`crop_flow`)."""

    clips: list[Clip]
    gray: np.ndarray | None = None

    @property
    def start(self) -> int:
        return self.clips[0].start


@dataclass
class SegmentEnd:
    """What the decode of `segment` found: `frames` decoded inside [segment.start, segment.end),
    `total` the video's frame count when the decoder reached the end of the video, else None."""

    segment: Segment
    frames: int
    total: int | None
    warnings: list[str] = field(default_factory=list)

    @property
    def index(self) -> int:
        return self.segment.index


def segment_clips(path: str, info: VideoInfo, seg: Segment, cfg: DecodeConfig, spec: ClipSpec,
                  box: tuple[int, int, int, int]) -> Iterator[ClipRun | SegmentEnd]:  # fmt: skip
    """Decode segment `seg` of `path` and yield its clips in order, in runs, then its SegmentEnd
    (see the module docstring). DecodeError as iter_frames: partial output is then to be discarded."""
    T, stride = spec.clip_len, spec.stride
    if seg.start % stride:
        raise ValueError(f"segment {seg} does not start on a clip start (stride {stride})")
    last_owned = None if seg.end is None else seg.start + (seg.end - 1 - seg.start) // stride * stride
    # all its own frames (the job checks their count against the container's), and its last clip's
    end = None if last_owned is None else max(seg.end, last_owned + T + 1)
    # from one frame before the segment: the flow of a last clip of one frame needs that frame
    base = max(0, seg.start - 1)
    frames: deque[np.ndarray] = deque()  # frames [base, base + len(frames)) of the video
    following = seg.start  # the next clip start to make
    run: list[Clip] = []  # clips made, not yet yielded; their fields are still frame indices
    warnings: list[str] = []
    decoded = base

    def made(clip: Clip) -> Iterator[ClipRun]:
        run.append(clip)
        if len(run) == spec.run_clips:
            yield _run(frames, base, run[:])
            run.clear()

    for chunk in iter_frames(path, cfg, info, start=base, end=end, warnings=warnings):
        frames.extend(chunk.frames)
        decoded = chunk.start + len(chunk.frames)
        while (last_owned is None or following <= last_owned) and following + T < decoded:
            yield from made(_clip(frames, base, following, None, spec, box))
            following += stride
        # keep frames from one before the next start (a last clip of one frame takes the field
        # before it) and every frame of the run's fields
        keep = min([following - 1, *(int(c.fields.min()) for c in run if c.fields is not None)])
        while frames and base < keep:
            frames.popleft()
            base += 1
    total = decoded if end is None or decoded < end else None
    if total is not None:
        for start in conventions.clip_starts(total, T, stride):
            if start >= following and (last_owned is None or start <= last_owned):
                yield from made(_clip(frames, base, start, total, spec, box))
    if run:
        yield _run(frames, base, run)
    own_end = decoded if seg.end is None else min(decoded, seg.end)
    yield SegmentEnd(seg, max(0, own_end - seg.start), total, warnings)


def _clip(frames: deque[np.ndarray], base: int, start: int, total: int | None, spec: ClipSpec,
          box: tuple[int, int, int, int]) -> Clip:  # fmt: skip
    """The clip at `start`, its fields as frame indices; `total` None: the video goes on past the
    clip's T + 1 frames."""
    T = spec.clip_len
    top, left, h, w = box
    clip = Clip(start, box)
    indices = start + np.arange(T) if total is None else conventions.clip_frame_indices(start, T, total)
    if "rgb" in spec.streams:
        clip.rgb = np.stack([frames[i - base][top : top + h, left : left + w] for i in indices])
    if "flow" in spec.streams and (total is None or total >= 2):
        clip.fields = start + np.arange(T) if total is None else conventions.clip_flow_indices(start, T, total)
    return clip


def _run(frames: deque[np.ndarray], base: int, clips: list[Clip]) -> ClipRun:
    """The run of `clips` with the grey frames of all their fields; each clip's fields become
    indices among the run's."""
    run = ClipRun(clips)
    with_flow = [c for c in clips if c.fields is not None]
    if with_flow:
        lo = min(int(c.fields.min()) for c in with_flow)
        hi = max(int(c.fields.max()) for c in with_flow) + 2
        run.gray = conventions.rgb_to_gray(np.stack([frames[i - base] for i in range(lo, hi)]))
        for c in with_flow:
            c.fields = c.fields - lo
    return run


def stored_runs(clips: Iterable[Clip], spec: ClipSpec) -> Iterator[ClipRun]:
    """Clips that already have their flow (read from a shard) in runs of spec.run_clips, the size of
    decoded runs, so that I3D's calls (spec.run_clips runs' worth of clips) are as full."""
    run: list[Clip] = []
    for clip in clips:
        run.append(clip)
        if len(run) == spec.run_clips:
            yield ClipRun(run)
            run = []
    if run:
        yield ClipRun(run)


def crop_flow(flow: np.ndarray, clip: Clip) -> np.ndarray:
    """The clip's flow fields, cropped to its box, from `flow` (n - 1, H, W, 2) of its run's grey frames."""
    top, left, h, w = clip.box
    return flow[clip.fields, top : top + h, left : left + w]


def check_spec(spec: ClipSpec) -> None:
    if spec.clip_len < 1 or spec.stride < 1:
        raise ConfigError(f"--clip-len and --stride must be >= 1, got {spec.clip_len} and {spec.stride}")
    if spec.crop not in CROPS:
        raise ConfigError(f"--crop must be one of {', '.join(CROPS)}, got {spec.crop!r}")
