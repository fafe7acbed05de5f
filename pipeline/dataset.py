"""ShardDataset: I3D clips from a shard directory, as a torch Dataset.

Each item is one clip of `clip_len` frames of one video:
    rgb   float32 (3, T, h, w) in [-1, 1]   (conventions.rgb_to_model)
    flow  float32 (2, T * F, h, w) in [-1, 1]   (conventions.flow_to_model), (x, y) channels
    video str (the input path), key str, start int (first frame), frames int (of the video),
    crop_box int64 tensor (top, left, height, width), flipped bool.
Clips start at `conventions.clip_starts(T, span, stride)`; a clip running past the end loops
its frames (`conventions.clip_frame_indices`), so every video yields >= 1 clip; flow fields follow
`conventions.clip_flow_indices`. One crop box and one flip decision serve rgb and flow of a clip;
flipping flow horizontally also negates its x channel, as a mirrored motion moves the other way.

Sampling (the paper's architectures see different frames of the same shards, drawn by this one
loader): the T = `clip_len` RGB frames are `frame_step` apart (5 for the ConvNet+LSTM's 5 fps, 10
for 3D-Fused), and each RGB frame brings the F = `flow_per_frame` flow fields leaving it and the
frames after it (1 for I3D, a snippet of 10 for the 2D two-stream nets): flow time index i*F + j is
field j of RGB frame i. A clip spans `span` = (T-1) * frame_step + F frames from its start, looped
and paired with fields as above, so step 1 and F 1 give exactly the plain clip of T frames.

Crops: "center" / "random" take `crop_size` x `crop_size`; a video smaller than that in either
side is refused in __init__ (ConfigError naming it): padding would feed the model borders it
never saw, and preprocess makes frames >= 256 px anyway. "full" keeps the whole frame (batch only
videos of one size, or use batch_size 1).

Randomness (random crop, flip, temporal="random"): with `seed=None` it comes from torch's global
RNG, which DataLoader seeds per worker from its own generator (reproducible under
torch.manual_seed); with an int seed each item draws from (seed, epoch, index), independent of
workers and order, and `set_epoch` changes the draw per epoch.

HDF5 files are opened lazily, per process: a DataLoader worker forked after __init__ (or after the
parent read items) opens its own handles.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch

from quovadis.pipeline import conventions
from quovadis.pipeline.errors import ConfigError, ShardError
from quovadis.pipeline.manifest import LedgerEntry, load as manifest_load
from quovadis.pipeline.pieces import check_present
from quovadis.pipeline.shards import read_frames

log = logging.getLogger(__name__)

CROPS = ("center", "random", "full")
TEMPORAL = ("grid", "random", "spread")
_READ_CACHE_BYTES = 4 << 20
_MAX_OPEN_FILES = 64  # per worker; the oldest handle is closed beyond this


class ShardDataset(torch.utils.data.Dataset):
    """Clips of the `ok` videos of a shard directory (see the module docstring)."""

    def __init__(
        self,
        shard_dir: str | os.PathLike[str],
        *,
        clip_len: int = conventions.CLIP_LEN,
        stride: int | None = None,
        streams: Sequence[str] = ("rgb",),
        crop: str = "center",
        crop_size: int = conventions.CROP_SIZE,
        flip: bool = False,
        temporal: str = "grid",
        videos: Sequence[str] | None = None,
        seed: int | None = None,
        frame_step: int = 1,
        flow_per_frame: int = 1,
        clips: int = 1,
    ):
        """`stride` defaults to the clip's span; `temporal="random"` gives one clip per video at a
        random start instead of the grid of `clip_starts`, `temporal="spread"` `clips` clips per
        video with starts evenly spread from the first frame to the last start that keeps the
        clip inside the video (fewer on a video with fewer distinct starts; the paper's 25 test
        snapshots); `videos` restricts to these inputs (input paths as in the manifest, or keys;
        ConfigError for any not stored)."""
        self.shard_dir = Path(shard_dir)
        self.clip_len = int(clip_len)
        self.frame_step, self.flow_per_frame, self.clips = int(frame_step), int(flow_per_frame), int(clips)
        if min(self.frame_step, self.flow_per_frame, self.clips) < 1:
            raise ConfigError(f"frame_step, flow_per_frame and clips must be >= 1, got {frame_step}, "
                              f"{flow_per_frame} and {clips}")  # fmt: skip
        self.span = (self.clip_len - 1) * self.frame_step + self.flow_per_frame
        self.stride = int(stride) if stride is not None else self.span
        self.streams = tuple(streams)
        self.crop, self.crop_size, self.flip, self.temporal, self.seed = crop, int(crop_size), flip, temporal, seed
        self.epoch = 0
        if self.clip_len < 1 or self.stride < 1:
            raise ConfigError(f"clip_len and stride must be >= 1, got {clip_len} and {stride}")
        if not self.streams or set(self.streams) - {"rgb", "flow"}:
            raise ConfigError(f"streams must be among rgb, flow, got {streams}")
        if crop not in CROPS:
            raise ConfigError(f"crop must be one of {', '.join(CROPS)}, got {crop!r}")
        if temporal not in TEMPORAL:
            raise ConfigError(f"temporal must be one of {', '.join(TEMPORAL)}, got {temporal!r}")
        if crop != "full" and self.crop_size < 1:
            raise ConfigError(f"crop_size must be >= 1, got {crop_size}")

        entries = [e for e in manifest_load(self.shard_dir).values() if e.status == "ok"]
        if videos is not None:
            names = {str(v): {str(v), os.path.abspath(v)} for v in videos}  # as given, or relative paths
            wanted = set().union(*names.values())
            entries = [e for e in entries if e.input in wanted or e.key in wanted]
            found = {e.input for e in entries} | {e.key for e in entries}
            missing = {v for v, forms in names.items() if not forms & found}
            if missing:
                raise ConfigError(f"{self.shard_dir}: not stored (no ok manifest entry): {sorted(missing)[:5]}")
        self.entries: list[LedgerEntry] = []
        for e in sorted(entries, key=lambda e: e.input):  # independent of how preprocess packed shards
            if "flow" in self.streams and (e.frames < 2 or "flow" not in e.info.get("streams", ["flow"])):
                log.warning("%s: skipped, no flow stored (%d frames)", e.input, e.frames)
                continue
            h, w = e.info.get("height"), e.info.get("width")
            if crop != "full" and h is not None and w is not None and min(h, w) < self.crop_size:
                raise ConfigError(
                    f"{e.input}: frames {h}x{w} are smaller than crop_size {self.crop_size}; "
                    "use crop='full' or a smaller crop_size"
                )
            self.entries.append(e)
        if temporal == "grid":
            self.items = [
                (v, s)
                for v, e in enumerate(self.entries)
                for s in conventions.clip_starts(e.frames, self.span, self.stride)
            ]
        elif temporal == "spread":
            self.items = [(v, s) for v, e in enumerate(self.entries) for s in spread_starts(e.frames, self.span, self.clips)]
        else:
            self.items = [(v, -1) for v in range(len(self.entries))]
        self._files: dict[str, h5py.File] = {}
        self._pid = os.getpid()

    def __len__(self) -> int:
        return len(self.items)

    def set_epoch(self, epoch: int) -> None:
        """Change the random draws of an int `seed` from one epoch to the next."""
        self.epoch = int(epoch)

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_files"] = {}  # open HDF5 handles do not travel to spawned workers
        return state

    def __getitem__(self, index: int) -> dict[str, Any]:
        video_index, start = self.items[index]
        entry = self.entries[video_index]
        rand = self._random(index)
        frames = entry.frames
        if start < 0:  # temporal="random"
            start = int(rand(max(frames - self.span, 0) + 1))
        group = self._group(entry)
        height, width = group["rgb"].shape[1:3]
        top, left, ch, cw = self._crop_box(height, width, rand)
        flipped = bool(self.flip and rand(2) == 1)
        region = (slice(top, top + ch), slice(left, left + cw))

        item: dict[str, Any] = {"video": entry.input, "key": entry.key, "start": start, "frames": frames}
        clip = read_clip(group, start, frames, self.span, self.streams, region, self.frame_step, self.flow_per_frame)
        if "rgb" in clip:
            x = conventions.rgb_to_model(clip["rgb"])  # (3, T, h, w)
            item["rgb"] = torch.flip(x, dims=[-1]) if flipped else x
        if "flow" in clip:
            y = conventions.flow_to_model(clip["flow"])  # (2, T, h, w), channel 0 = x
            if flipped:
                y = torch.flip(y, dims=[-1])
                y[0].neg_()
            item["flow"] = y
        item["crop_box"] = torch.tensor([top, left, ch, cw])
        item["flipped"] = flipped
        return item

    # -- internals --------------------------------------------------------------------------

    def _random(self, index: int):
        """A function n -> random int in [0, n) for this item (see the module docstring)."""
        if self.seed is None:
            return lambda n: int(torch.randint(n, ()).item())
        rng = np.random.default_rng((self.seed, self.epoch, index))
        return lambda n: int(rng.integers(n))

    def _crop_box(self, height: int, width: int, rand) -> tuple[int, int, int, int]:
        if self.crop == "full":
            return 0, 0, height, width
        size = self.crop_size
        if height < size or width < size:
            raise ShardError(f"frames {height}x{width} are smaller than crop_size {size}")
        if self.crop == "center":
            return conventions.center_crop_box(height, width, size)
        return rand(height - size + 1), rand(width - size + 1), size, size

    def _group(self, entry: LedgerEntry) -> h5py.Group:
        if os.getpid() != self._pid:  # a forked worker: never share the parent's HDF5 handles
            self._files = {}
            self._pid = os.getpid()
        f = self._files.get(entry.file)
        if f is None:
            path = self.shard_dir / entry.file
            if len(self._files) >= _MAX_OPEN_FILES:
                self._files.pop(next(iter(self._files))).close()
            try:
                f = h5py.File(path, "r", rdcc_nbytes=_READ_CACHE_BYTES)
            except OSError as e:
                raise ShardError(f"cannot open shard {path}: {e}") from e
            check_present(f, path)
            self._files[entry.file] = f
        try:
            return f[entry.key]
        except KeyError:
            raise ShardError(f"{self.shard_dir / entry.file} has no video {entry.key} ({entry.input})") from None


def read_clip(group: h5py.Group, start: int, frames: int, span: int, streams: Sequence[str],
              region: tuple[slice, slice], frame_step: int = 1, flow_per_frame: int = 1) -> dict[str, np.ndarray]:  # fmt: skip
    """The clip at `start` of a stored video of `frames` frames, as stored: uint8 rgb (T, h, w, 3)
    and flow (T * F, h, w, 2) in the shard's dtype, cropped to `region` (see the module docstring
    for span, frame_step and flow_per_frame; T = (span - F) // frame_step + 1)."""
    positions = np.arange((span - flow_per_frame) // frame_step + 1) * frame_step  # RGB frames in the span
    clip: dict[str, np.ndarray] = {}
    if "rgb" in streams:
        clip["rgb"] = read_frames(group["rgb"], conventions.clip_frame_indices(start, span, frames)[positions], region)
    if "flow" in streams:
        fields = (positions[:, None] + np.arange(flow_per_frame)).ravel()  # field-major per RGB frame
        clip["flow"] = read_frames(group["flow"], conventions.clip_flow_indices(start, span, frames)[fields], region)
    return clip


def spread_starts(num_frames: int, span: int, clips: int) -> list[int]:
    """`clips` starts evenly spaced over [0, num_frames - span] (just 0 when the clip is longer
    than the video), rounded, duplicates dropped."""
    last = max(num_frames - span, 0)
    return sorted({int(round(s)) for s in np.linspace(0, last, clips)})
