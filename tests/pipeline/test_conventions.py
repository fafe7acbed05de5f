"""pipeline/conventions.py against literal values worked out by hand from its docstrings: flow
quantisation q = round((clip(f, -20, 20) + 20) * 255 / 40) (= 6.375 * (f + 20), ties to even), its
inverse, the [-1, 1] maps, the clip and frame/flow index rules at the edges; the grey conversion
against OpenCV's."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch

from quovadis.pipeline import conventions


def test_the_constants():
    assert (conventions.FPS, conventions.FLOW_BOUND, conventions.CLIP_LEN) == (25.0, 20.0, 64)
    assert (conventions.SHORT_SIDE, conventions.CROP_SIZE) == (256, 224)


@pytest.mark.parametrize(
    "f, q",
    [
        (-20.0, 0),
        (20.0, 255),
        (0.0, 128),  # 127.5: a tie, to even (128)
        (-16.0, 26),  # 25.5 -> 26 (even)
        (-8.0, 76),  # 76.5 -> 76 (even; half-up would give 77)
        (8.0, 178),  # 178.5 -> 178 (even; half-up would give 179)
        (16.0, 230),  # 229.5 -> 230 (even)
        (10.0, 191),  # 191.25
        (-19.95, 0),  # 0.31875: just inside the bound
        (-19.9, 1),  # 0.6375
        (19.9, 254),  # 254.3625
        (19.95, 255),  # 254.68125
        (20.5, 255),  # just outside: clipped, not 258 wrapped to 2
        (-20.5, 0),
        (1e6, 255),
        (-1e6, 0),
        (np.inf, 255),
        (-np.inf, 0),
    ],
)
def test_quantize_flow_literals(f, q):
    got = conventions.quantize_flow(np.float32([f]))
    assert got.dtype == np.uint8 and got.tolist() == [q]


def test_quantize_flow_keeps_the_layout():
    flow = np.float32([[[[-20, 20], [0, 8]], [[-8, 10], [30, -30]]]])  # (1, 2, 2, 2)
    got = conventions.quantize_flow(flow)
    assert got.shape == (1, 2, 2, 2) and got.tolist() == [[[[0, 255], [128, 178]], [[76, 191], [255, 0]]]]
    assert conventions.quantize_flow(torch.tensor([-16.0])).tolist() == [26]  # torch input too


@pytest.mark.parametrize(
    "q, f",
    [
        (0, -20.0),
        (255, 20.0),
        (128, 20 / 255),  # 128 * 40 / 255 - 20 = 0.0784...
        (127, -20 / 255),
        (26, -4060 / 255),  # -15.9215...
        (1, -5060 / 255),  # -19.8431...
        (254, 5060 / 255),
    ],
)
def test_dequantize_flow_literals(q, f):
    got = conventions.dequantize_flow(np.uint8([q]))
    assert got.dtype == np.float32 and got.tolist() == pytest.approx([f], abs=1e-5)


def test_quantize_undoes_dequantize_for_every_uint8():
    q = np.arange(256, dtype=np.uint8)
    assert conventions.quantize_flow(conventions.dequantize_flow(q)).tolist() == list(range(256))


def test_rgb_to_model_literals_and_layout():
    frames = np.uint8([[[[0, 51, 102]]], [[[153, 204, 255]]]])  # (T=2, H=1, W=1, 3)
    x = conventions.rgb_to_model(frames)
    assert x.dtype == torch.float32 and x.shape == (3, 2, 1, 1)  # (C, T, H, W)
    # x / 127.5 - 1, rows = channels, columns = frames
    assert x[:, :, 0, 0].tolist() == [
        pytest.approx([-1.0, 0.2], abs=1e-6),
        pytest.approx([-0.6, 0.6], abs=1e-6),
        pytest.approx([-0.2, 1.0], abs=1e-6),
    ]
    mid = conventions.rgb_to_model(np.uint8([[[[127, 128, 0]]]]))[:, 0, 0, 0]
    assert mid.tolist() == pytest.approx([-1 / 255, 1 / 255, -1.0], abs=1e-6)  # 127.5 itself is no uint8
    batched = conventions.rgb_to_model(np.zeros((4, 5, 6, 7, 3), np.uint8))
    assert batched.shape == (4, 3, 5, 6, 7)  # (N, C, T, H, W)


def test_flow_to_model_reads_uint8_as_quantised_and_float_as_pixels():
    q = conventions.flow_to_model(np.uint8([[[[0, 255]]], [[[128, 127]]]]))  # (T=2, 1, 1, 2)
    assert q.dtype == torch.float32 and q.shape == (2, 2, 1, 1)  # (C, T, H, W), channel 0 = x
    assert q[:, :, 0, 0].tolist() == [pytest.approx([-1.0, 1 / 255], abs=1e-6), pytest.approx([1.0, -1 / 255], abs=1e-6)]
    px = conventions.flow_to_model(np.float32([[[[10, -40]]], [[[40, -5]]]]))  # pixels: clip(f, -20, 20) / 20
    assert px[:, :, 0, 0].tolist() == [[0.5, 1.0], [-1.0, -0.25]]
    assert conventions.flow_to_model(np.zeros((3, 4, 5, 6, 2), np.uint8)).shape == (3, 2, 4, 5, 6)


@pytest.mark.parametrize(
    "frames, clip_len, stride, starts",
    [
        (0, 16, 16, []),  # no frames, no clips
        (1, 64, 64, [0]),  # one frame: one (looped) clip
        (15, 16, 16, [0]),  # just below one clip: looped
        (16, 16, 16, [0]),  # exactly one clip, nothing past the end
        (17, 16, 16, [0, 16]),  # one frame over: a second, looped clip
        (40, 16, 16, [0, 16, 32]),
        (48, 16, 16, [0, 16, 32]),
        (40, 8, 16, [0, 16, 32]),  # stride > clip_len: gaps, and 32..39 fits
        (30, 8, 16, [0, 16]),  # stride > clip_len: 24..29 falls in a gap, no clip added
        (20, 8, 16, [0, 16]),  # 16..23 runs past the end: kept, looped
        (10, 4, 3, [0, 3, 6, 9]),
        (10, 4, 2, [0, 2, 4, 6, 8]),  # 8 runs past the end: kept although 6..9 already ends the video
        (50, 16, 20, [0, 20, 40]),
        (3, 16, 20, [0]),
    ],
)
def test_clip_starts_literals(frames, clip_len, stride, starts):
    assert conventions.clip_starts(frames, clip_len, stride) == starts


def test_clip_starts_refuses_empty_clips_and_strides():
    for clip_len, stride in ((0, 1), (1, 0), (-4, 4)):
        with pytest.raises(ValueError):
            conventions.clip_starts(10, clip_len, stride)


@pytest.mark.parametrize(
    "start, clip_len, frames, indices",
    [
        (0, 4, 1, [0, 0, 0, 0]),  # one frame, repeated
        (0, 4, 3, [0, 1, 2, 0]),  # shorter than a clip: looped from the start
        (0, 4, 4, [0, 1, 2, 3]),
        (8, 4, 10, [8, 9, 8, 9]),  # loops from `start`, not from frame 0
        (9, 4, 10, [9, 9, 9, 9]),
        (0, 5, 2, [0, 1, 0, 1, 0]),
        (16, 8, 20, [16, 17, 18, 19, 16, 17, 18, 19]),
        (0, 16, 15, [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 0]),
    ],
)
def test_clip_frame_indices_literals(start, clip_len, frames, indices):
    assert conventions.clip_frame_indices(start, clip_len, frames).tolist() == indices


def test_clip_frame_indices_refuse_a_start_outside_the_video():
    for start, frames in ((10, 10), (-1, 10), (0, 0)):
        with pytest.raises(ValueError):
            conventions.clip_frame_indices(start, 4, frames)


@pytest.mark.parametrize(
    "start, clip_len, frames, fields",
    [
        (0, 4, 2, [0, 0, 0, 0]),  # the one field 0->1 stands for both frames
        (0, 4, 3, [0, 1, 1, 0]),  # frames 0 1 2 0: frame 2 has no successor, field 1->2 stands in
        (0, 4, 5, [0, 1, 2, 3]),
        (0, 4, 10, [0, 1, 2, 3]),
        (6, 4, 10, [6, 7, 8, 8]),  # frames 6..9: the last field (8->9) repeats
        (8, 4, 10, [8, 8, 8, 8]),  # frames 8 9 8 9
    ],
)
def test_clip_flow_indices_literals(start, clip_len, frames, fields):
    assert conventions.clip_flow_indices(start, clip_len, frames).tolist() == fields


def test_clip_flow_indices_need_two_frames():
    with pytest.raises(ValueError, match="two frames"):
        conventions.clip_flow_indices(0, 4, 1)


def test_center_crop_box_rounds_offsets_down():
    assert conventions.center_crop_box(256, 455, 224) == (16, 115, 224, 224)
    assert conventions.center_crop_box(225, 226, 224) == (0, 1, 224, 224)
    assert conventions.center_crop_box(224, 224, 224) == (0, 0, 224, 224)


def test_rgb_to_gray_is_cvtcolor_on_every_colour():
    v = np.arange(256, dtype=np.uint8)
    cube = np.stack(np.meshgrid(v, v, v, indexing="ij"), axis=-1).reshape(4096, 4096, 3)
    np.testing.assert_array_equal(conventions.rgb_to_gray(cube), cv2.cvtColor(cube, cv2.COLOR_RGB2GRAY))
    assert conventions.rgb_to_gray(cube.reshape(4, 1024, 4096, 3)).shape == (4, 1024, 4096)
    with pytest.raises(ValueError, match="uint8"):
        conventions.rgb_to_gray(cube.astype(np.float32))
