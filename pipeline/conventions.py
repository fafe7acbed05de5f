"""Numeric conventions shared by every stage, written once.

On disk (shards):
    rgb   uint8 (T, H, W, 3), RGB order, 0..255.
    flow  uint8 (T-1, H, W, 2), (x, y) order, quantised q = round((clip(f, -B, B) + B) * 255 / (2B))
          with B = FLOW_BOUND px; or float16 pixels when stored raw.
In the model:
    float32 (N, C, T, H, W) in [-1, 1]: rgb x / 127.5 - 1, flow q / 127.5 - 1 (= clip(f, -B, B) / B).
Grey (the frames flow is computed on): uint8 (T, H, W), `rgb_to_gray`, as OpenCV's RGB2GRAY.
Time base: frames resampled to FPS; frame k shows the source at time k / FPS.
Clips: see `clip_starts` (which clips a video has), `clip_frame_indices` (looped padding) and
`clip_flow_indices`: a clip of L rgb frames starting at t pairs with the L flow fields
t->t+1 ... t+L-1->t+L; a video of T frames has T-1 fields and the missing last one repeats T-2->T-1.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # torch is imported where a tensor is made: the CLI and decode workers start without it
    import torch

CONVENTIONS_VERSION = 1

FPS = 25.0  # output frame rate of decode, frames per second
SHORT_SIDE = 256  # decode resizes the shorter side to this many pixels
CROP_SIZE = 224  # spatial crop fed to I3D
CLIP_LEN = 64  # frames per I3D clip (the paper's training length)
FLOW_BOUND = 20.0  # |flow| clip in pixels before quantisation (the paper's TV-L1 truncation)

_UINT8_HALF = 127.5  # maps uint8 0..255 onto [-1, 1]
# cv2.cvtColor RGB2GRAY for uint8 in OpenCV 5: 15-bit fixed point, round half up (checked on all 2^24 colours)
_GRAY_SHIFT = 15
_GRAY_COEFFS = (9798, 19235, 3735)  # R, G, B; sum 2^15


def rgb_to_model(frames: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 (..., T, H, W, 3) -> float32 (..., 3, T, H, W) in [-1, 1]."""
    import torch

    x = torch.as_tensor(frames)
    return _channels_first(x.to(torch.float32) / _UINT8_HALF - 1.0)


def rgb_to_gray(frames: np.ndarray) -> np.ndarray:
    """uint8 (..., H, W, 3) RGB -> uint8 (..., H, W), bit-exact to cv2.cvtColor(COLOR_RGB2GRAY):
    the one grayscale conversion of quovadis, the frames flow is computed on."""
    frames = np.asarray(frames)
    if frames.dtype != np.uint8 or frames.ndim < 3 or frames.shape[-1] != 3:
        raise ValueError(f"rgb_to_gray needs uint8 (..., H, W, 3) frames, got {frames.dtype} {frames.shape}")
    r, g, b = (frames[..., i].astype(np.int32) for i in range(3))
    cr, cg, cb = _GRAY_COEFFS
    y = (r * cr + g * cg + b * cb + (1 << (_GRAY_SHIFT - 1))) >> _GRAY_SHIFT
    return y.astype(np.uint8)


def quantize_flow(flow: np.ndarray | torch.Tensor) -> np.ndarray:
    """Flow in pixels (any layout) -> uint8 with the same layout (rounding half to even)."""
    f = np.clip(np.asarray(flow, dtype=np.float32), -FLOW_BOUND, FLOW_BOUND)
    return np.round((f + np.float32(FLOW_BOUND)) * np.float32(255.0 / (2 * FLOW_BOUND))).astype(np.uint8)


def dequantize_flow(q: np.ndarray | torch.Tensor) -> np.ndarray:
    """uint8 flow -> float32 pixels in [-FLOW_BOUND, FLOW_BOUND], same layout."""
    x = np.asarray(q).astype(np.float32)
    return x * np.float32(2 * FLOW_BOUND / 255.0) - np.float32(FLOW_BOUND)


def flow_to_model(flow: np.ndarray | torch.Tensor) -> torch.Tensor:
    """Stored flow (..., T, H, W, 2) -> float32 (..., 2, T, H, W) in [-1, 1].

    uint8 input is read as quantised (q / 127.5 - 1); float input as pixels (clip(f, -B, B) / B).
    Both give the same value for the same flow, up to quantisation.
    """
    import torch

    x = torch.as_tensor(flow)
    if x.dtype == torch.uint8:
        y = x.to(torch.float32) / _UINT8_HALF - 1.0
    else:
        y = x.to(torch.float32).clamp(-FLOW_BOUND, FLOW_BOUND) / FLOW_BOUND
    return _channels_first(y)


def center_crop_box(height: int, width: int, size: int) -> tuple[int, int, int, int]:
    """(top, left, size, size) of the centred crop, offsets rounded down: the crop of extract and
    of evaluation, so features and scores see the same pixels. The caller checks the frames fit."""
    return (height - size) // 2, (width - size) // 2, size, size


def clip_starts(num_frames: int, clip_len: int, stride: int) -> list[int]:
    """First frames of the clips of a video of `num_frames` frames.

    Clips start every `stride` frames. Every clip that fits is kept, and so is the first one that
    runs past the end (padded by `clip_frame_indices`), so the tail and videos shorter than one
    clip are covered: a video with >= 1 frame always has >= 1 clip.
    """
    if clip_len < 1 or stride < 1:
        raise ValueError(f"clip_len and stride must be >= 1, got {clip_len} and {stride}")
    if num_frames < 1:
        return []
    starts = list(range(0, num_frames - clip_len + 1, stride))
    following = len(starts) * stride
    if following < num_frames:
        starts.append(following)
    return starts


def clip_frame_indices(start: int, clip_len: int, num_frames: int) -> np.ndarray:
    """Frame indices of the clip [start, start + clip_len); past the end the frames from `start`
    on are looped (start, start+1, ..., T-1, start, ...), the one padding rule of quovadis."""
    if not 0 <= start < num_frames:
        raise ValueError(f"clip start {start} outside a video of {num_frames} frames")
    return start + np.arange(clip_len) % (num_frames - start)


def clip_flow_indices(start: int, clip_len: int, num_frames: int) -> np.ndarray:
    """Indices into a video's flow array (num_frames - 1 fields, field t is t -> t+1) for the clip
    of rgb frames `clip_frame_indices(start, clip_len, num_frames)`: the field leaving each frame,
    the last field standing in for the last frame, which has no successor."""
    if num_frames < 2:
        raise ValueError(f"flow needs at least two frames, the video has {num_frames}")
    return np.minimum(clip_frame_indices(start, clip_len, num_frames), num_frames - 2)


def _channels_first(x: torch.Tensor) -> torch.Tensor:
    """(..., T, H, W, C) -> (..., C, T, H, W)."""
    return x.movedim(-1, -4).contiguous()
