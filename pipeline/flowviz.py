"""Looking at and scoring optical flow: Middlebury colour coding, .flo files, endpoint error.

Flow here is float (H, W, 2) in pixels, (x, y) order, as stored by the pipeline.
The colour coding is the one of Baker et al., "A Database and Evaluation Methodology for Optical
Flow" (IJCV 2011): hue = direction on a 55-colour wheel (red, yellow, green, cyan, blue, magenta),
saturation = length relative to the largest length shown; zero flow is white.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from quovadis.pipeline.errors import FlowError

FLO_MAGIC = 202021.25  # first float of a Middlebury .flo file
FLO_UNKNOWN = 1e9  # components above this mark pixels without ground truth

# segments of the Baker et al. colour wheel: (number of colours, start RGB, end RGB)
_WHEEL_SEGMENTS = (
    (15, (255, 0, 0), (255, 255, 0)),  # red -> yellow
    (6, (255, 255, 0), (0, 255, 0)),  # yellow -> green
    (4, (0, 255, 0), (0, 255, 255)),  # green -> cyan
    (11, (0, 255, 255), (0, 0, 255)),  # cyan -> blue
    (13, (0, 0, 255), (255, 0, 255)),  # blue -> magenta
    (6, (255, 0, 255), (255, 0, 0)),  # magenta -> red
)


def color_wheel() -> np.ndarray:
    """The 55 wheel colours, float (55, 3) RGB in 0..255, each segment from its start colour on."""
    rows = []
    for n, start, end in _WHEEL_SEGMENTS:
        t = np.arange(n, dtype=np.float64)[:, None] / n
        rows.append(np.asarray(start, np.float64) + t * (np.asarray(end, np.float64) - np.asarray(start, np.float64)))
    return np.floor(np.concatenate(rows))


def flow_to_color(flow: np.ndarray, max_radius: float | None = None) -> np.ndarray:
    """Flow float (H, W, 2) pixels -> uint8 (H, W, 3) RGB in the Middlebury colour coding.

    Lengths are divided by `max_radius` (default: the largest finite length in `flow`); longer
    vectors are drawn darker. Unknown pixels (non-finite or > 1e9) are black.
    """
    flow = np.asarray(flow, dtype=np.float64)
    if flow.ndim != 3 or flow.shape[-1] != 2:
        raise FlowError(f"flow_to_color needs flow (H, W, 2), got shape {flow.shape}")
    unknown = ~np.isfinite(flow).all(-1) | (np.abs(flow) > FLO_UNKNOWN).any(-1)
    fx = np.where(unknown, 0.0, flow[..., 0])
    fy = np.where(unknown, 0.0, flow[..., 1])
    radius = np.hypot(fx, fy)
    if max_radius is None:
        max_radius = float(radius.max()) if radius.size else 0.0
    scale = max(max_radius, np.finfo(np.float32).eps)
    fx, fy, radius = fx / scale, fy / scale, radius / scale

    wheel = color_wheel() / 255.0
    n = len(wheel)
    angle = np.arctan2(-fy, -fx) / np.pi  # in [-1, 1]
    position = (angle + 1) / 2 * (n - 1)
    k0 = np.floor(position).astype(np.int64)
    k1 = (k0 + 1) % n
    frac = (position - k0)[..., None]
    colour = (1 - frac) * wheel[k0] + frac * wheel[k1]
    inside = (radius <= 1)[..., None]
    colour = np.where(inside, 1 - radius[..., None] * (1 - colour), colour * 0.75)
    rgb = np.floor(255 * colour).astype(np.uint8)
    rgb[unknown] = 0
    return rgb


def read_flo(path: str | Path) -> np.ndarray:
    """Middlebury .flo -> float32 (H, W, 2); unknown pixels keep their > 1e9 values."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise FlowError(f"cannot read flow file {path}: {e}") from e
    if len(data) < 12 or not np.isclose(np.frombuffer(data[:4], "<f4")[0], FLO_MAGIC):
        raise FlowError(f"{path} is not a Middlebury .flo file (bad magic number)")
    width, height = (int(v) for v in np.frombuffer(data[4:12], "<i4"))
    expected = 12 + width * height * 2 * 4
    if width <= 0 or height <= 0 or len(data) != expected:
        raise FlowError(f"{path}: header says {width}x{height}, so {expected} bytes, but the file has {len(data)}")
    return np.frombuffer(data[12:], "<f4").reshape(height, width, 2).copy()


def write_flo(path: str | Path, flow: np.ndarray) -> None:
    """float (H, W, 2) -> Middlebury .flo."""
    flow = np.asarray(flow, dtype="<f4")
    if flow.ndim != 3 or flow.shape[-1] != 2:
        raise FlowError(f"write_flo needs flow (H, W, 2), got shape {flow.shape}")
    header = np.array([FLO_MAGIC], "<f4").tobytes() + np.array([flow.shape[1], flow.shape[0]], "<i4").tobytes()
    Path(path).write_bytes(header + flow.tobytes())


def endpoint_error(flow: np.ndarray, reference: np.ndarray, mask: np.ndarray | None = None) -> float:
    """Mean Euclidean distance between two (H, W, 2) fields over the pixels where the reference is
    known (|component| <= 1e9) and `mask` (if given) is true: the average endpoint error (EPE)."""
    flow, reference = np.asarray(flow, np.float64), np.asarray(reference, np.float64)
    if flow.shape != reference.shape or flow.shape[-1] != 2:
        raise FlowError(f"endpoint_error needs two (H, W, 2) fields of one shape, got {flow.shape} and {reference.shape}")
    known = (np.abs(reference) <= FLO_UNKNOWN).all(-1)
    if mask is not None:
        known &= mask
    if not known.any():
        raise FlowError("endpoint_error: no pixel with a known reference")
    return float(np.hypot(*(flow - reference)[known].T).mean())
