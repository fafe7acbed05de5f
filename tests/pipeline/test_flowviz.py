"""Middlebury colour coding, .flo files and endpoint error."""

from __future__ import annotations

import numpy as np
import pytest

from quovadis.pipeline.errors import FlowError
from quovadis.pipeline.flowviz import color_wheel, endpoint_error, flow_to_color, read_flo, write_flo
from tests.conftest import shared_path


def test_color_wheel_is_baker_et_al():
    wheel = color_wheel()
    assert wheel.shape == (55, 3)  # RY 15, YG 6, GC 4, CB 11, BM 13, MR 6
    starts = {0: (255, 0, 0), 15: (255, 255, 0), 21: (0, 255, 0), 25: (0, 255, 255), 36: (0, 0, 255), 49: (255, 0, 255)}
    for index, rgb in starts.items():
        np.testing.assert_array_equal(wheel[index], rgb)
    np.testing.assert_array_equal(wheel[1], (255, np.floor(255 / 15), 0))  # red -> yellow in 15 steps


def test_flow_to_color_directions_and_lengths():
    flow = np.array([[[0, 0], [1, 0], [0.5, 0], [-1, 0], [0, -1], [2, 0]]], np.float32)  # (1, 6, 2)
    rgb = flow_to_color(flow, max_radius=1.0)
    assert rgb.dtype == np.uint8 and rgb.shape == (1, 6, 3)
    np.testing.assert_array_equal(rgb[0, 0], (255, 255, 255))  # no motion: white
    np.testing.assert_array_equal(rgb[0, 1], (255, 0, 0))  # right, full length: red
    np.testing.assert_array_equal(rgb[0, 2], (255, 127, 127))  # half length: halfway to white
    assert rgb[0, 3, 2] == 255 and rgb[0, 3, 0] == 0  # left: cyan-blue
    assert rgb[0, 4, 2] == 255 and rgb[0, 4, 1] == 0  # up: blue-magenta
    np.testing.assert_array_equal(rgb[0, 5], (191, 0, 0))  # beyond max_radius: darkened by 0.75
    # default normalisation: the longest vector is full length
    np.testing.assert_array_equal(flow_to_color(flow)[0, 5], (255, 0, 0))


def test_flow_to_color_unknown_pixels_are_black():
    flow = np.array([[[1e10, 0], [np.nan, 0], [1, 1]]], np.float32)
    rgb = flow_to_color(flow)
    np.testing.assert_array_equal(rgb[0, :2], 0)
    assert rgb[0, 2].max() == 255


def test_flo_round_trip_and_middlebury_file(tmp_path):
    flow = np.random.default_rng(0).normal(size=(7, 11, 2)).astype(np.float32)
    write_flo(tmp_path / "a.flo", flow)
    np.testing.assert_array_equal(read_flo(tmp_path / "a.flo"), flow)
    assert (tmp_path / "a.flo").stat().st_size == 12 + 7 * 11 * 2 * 4

    truth = read_flo(shared_path("flow", "RubberWhale", "flow10.flo"))
    assert truth.shape == (388, 584, 2)
    known = (np.abs(truth) <= 1e9).all(-1)
    assert 0.5 < known.mean() < 1.0  # RubberWhale has occluded (unknown) pixels
    assert np.abs(truth[known]).max() < 10


def test_bad_flo_files(tmp_path):
    (tmp_path / "bad.flo").write_bytes(b"PIEH" + bytes(8))
    with pytest.raises(FlowError, match="bad.flo"):
        read_flo(tmp_path / "bad.flo")
    write_flo(tmp_path / "short.flo", np.zeros((4, 4, 2), np.float32))
    (tmp_path / "short.flo").write_bytes((tmp_path / "short.flo").read_bytes()[:-4])
    with pytest.raises(FlowError, match="short.flo"):
        read_flo(tmp_path / "short.flo")
    with pytest.raises(FlowError, match="missing.flo"):
        read_flo(tmp_path / "missing.flo")


def test_endpoint_error_skips_unknown_pixels():
    ref = np.zeros((2, 2, 2), np.float32)
    ref[0, 0] = 1e10  # unknown
    flow = np.zeros((2, 2, 2), np.float32)
    flow[0, 0] = (100, 100)  # ignored
    flow[1, 1] = (3, 4)  # error 5 on one of 3 known pixels
    assert endpoint_error(flow, ref) == pytest.approx(5 / 3)
    mask = np.array([[True, True], [True, False]])
    assert endpoint_error(flow, ref, mask) == 0.0
    with pytest.raises(FlowError):
        endpoint_error(flow[:1], ref)
