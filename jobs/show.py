"""`quovadis show SHARD_DIR VIDEO`: a contact sheet PNG of a stored video, RGB frames beside their
flow in the Middlebury colour coding, so a person sees at once whether the flow is sane.

Rows are frames t spread over the video; each row is frame t | flow t -> t+1. All flow panels share
one colour scale (the longest vector shown, or --max-flow): white is still, hue is direction
(right red, down orange-yellow, left cyan-blue, up violet), saturation is speed. A legend wheel
and the scale are drawn in the header.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import numpy as np

from quovadis.pipeline.errors import ConfigError, QuovadisError
from quovadis.pipeline.flowviz import flow_to_color

log = logging.getLogger(__name__)

_GAP = 4  # pixels between panels
_HEADER = 40  # pixels of the header row
_BACKGROUND = 32  # grey level around the panels


def run(args: argparse.Namespace) -> int:
    if args.frames < 1:
        raise ConfigError(f"--frames must be >= 1, got {args.frames}")
    if args.max_flow is not None and args.max_flow <= 0:
        raise ConfigError(f"--max-flow must be > 0, got {args.max_flow}")
    sheet = contact_sheet(Path(args.shard_dir), args.video, frames=args.frames, max_flow=args.max_flow)
    write_png(Path(args.out), sheet)
    log.info("wrote %s (%dx%d)", args.out, sheet.shape[1], sheet.shape[0])
    return 0


def frame_indices(num_frames: int, rows: int, with_flow: bool) -> np.ndarray:
    """`rows` frame indices spread evenly from the first to the last frame that has a flow field
    (T-2) or, without flow, to the last frame; fewer when the video is shorter."""
    last = num_frames - 2 if with_flow else num_frames - 1
    if last < 0:
        return np.zeros(0, np.int64)
    return np.unique(np.round(np.linspace(0, last, rows)).astype(np.int64))


def contact_sheet(shard_dir: Path, video: str, *, frames: int = 6, max_flow: float | None = None) -> np.ndarray:
    """uint8 (H', W', 3) RGB sheet: per row, frame t and the colour-coded flow t -> t+1."""
    from quovadis.pipeline.shards import open_video  # h5py and torch: here, so `show --help` is fast

    with open_video(shard_dir, video) as v:
        with_flow = "flow" in v.streams
        if not with_flow:
            log.warning("%s: no flow stored for %s; the sheet shows RGB frames only", shard_dir, video)
        index = frame_indices(v.frames, frames, with_flow)
        if len(index) == 0:
            raise QuovadisError(f"{shard_dir}: {video} has {v.frames} frame(s), too few to show")
        rgb = np.stack([v.rgb(int(t), int(t) + 1)[0] for t in index])  # (N, H, W, 3)
        flow = np.stack([v.flow_pixels(int(t), int(t) + 1)[0] for t in index]) if with_flow else None
        title = f"{v.key}  {v.width}x{v.height}  {v.frames} frames at {v.fps:g} fps"
    if flow is not None:
        lengths = np.hypot(flow[..., 0], flow[..., 1])
        scale = max_flow if max_flow is not None else max(float(lengths.max()), 1e-6)
        panels = [flow_to_color(f, max_radius=scale) for f in flow]
        title += f"\nflow t -> t+1: full colour at {scale:.2f} px"
    else:
        panels = None
    return _layout(rgb, panels, index, title)


def _layout(rgb: np.ndarray, flow_panels: list[np.ndarray] | None, index: np.ndarray, title: str) -> np.ndarray:
    import cv2

    n, h, w, _ = rgb.shape
    cols = 2 if flow_panels is not None else 1
    width = cols * w + (cols + 1) * _GAP
    height = _HEADER + n * (h + _GAP) + _GAP
    sheet = np.full((height, width, 3), _BACKGROUND, np.uint8)
    for row in range(n):
        top = _HEADER + _GAP + row * (h + _GAP)
        sheet[top : top + h, _GAP : _GAP + w] = rgb[row]
        label = f"t={index[row]}"
        if flow_panels is not None:
            sheet[top : top + h, 2 * _GAP + w : 2 * _GAP + 2 * w] = flow_panels[row]
            label += f"  flow {index[row]}->{index[row] + 1}"
        _text(cv2, sheet, label, (_GAP + 4, top + 16))
    for i, line in enumerate(title.split("\n")):
        _text(cv2, sheet, line, (_GAP, 16 + 17 * i), scale=0.45)
    if flow_panels is not None:
        wheel = _legend_wheel(_HEADER - 8)
        sheet[4 : 4 + wheel.shape[0], width - _GAP - wheel.shape[1] : width - _GAP] = wheel
    return sheet


def _legend_wheel(size: int) -> np.ndarray:
    """The colour coding of every vector up to the full length: a disc (outside it: background)."""
    r = (size - 1) / 2
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) - r
    wheel = flow_to_color(np.stack([x, y], -1), max_radius=r)
    wheel[np.hypot(x, y) > r] = _BACKGROUND
    return wheel


def _text(cv2, img: np.ndarray, text: str, origin: tuple[int, int], scale: float = 0.45) -> None:
    """White text on a dark box, readable on frames and on the background."""
    (w, h), base = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, scale, 1)
    x, y = origin
    img[max(y - h - 3, 0) : y + base, max(x - 3, 0) : x + w + 3] = _BACKGROUND
    cv2.putText(img, text, origin, cv2.FONT_HERSHEY_SIMPLEX, scale, (255, 255, 255), 1, cv2.LINE_AA)


def write_png(path: Path, rgb: np.ndarray) -> None:
    import cv2

    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        ok = cv2.imwrite(str(path), np.ascontiguousarray(rgb[..., ::-1]))  # OpenCV writes BGR
    except cv2.error as e:
        raise QuovadisError(f"cannot write {path}: {e}") from e
    if not ok:
        raise QuovadisError(f"cannot write {path} (is the extension .png and the folder writable?)")
