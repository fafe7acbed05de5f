"""`quovadis show`: a contact sheet from a shard written by the shards module, flow from our TV-L1."""

from __future__ import annotations

import argparse
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from quovadis.jobs import options, show
from quovadis.pipeline.errors import QuovadisError, ShardError
from quovadis.pipeline.conventions import rgb_to_gray
from quovadis.pipeline.flow import FlowConfig, compute_flow
from quovadis.pipeline.flowviz import flow_to_color
from quovadis.pipeline.shards import ShardConfig, ShardWriter

H, W, T = 48, 64, 6
SOURCE = "/videos/moving pattern.mp4"


def moving_frames() -> np.ndarray:
    """uint8 (T, H, W, 3): a smooth colour pattern moving 1.5 px to the right per frame."""
    y, x = np.mgrid[0:H, 0:W].astype(np.float64)
    frames = []
    for t in range(T):
        xs = x - 1.5 * t
        base = np.sin(xs / 5.0) + np.cos(y / 7.0 + xs / 11.0) + 0.5 * np.sin((xs + y) / 4.0)
        level = (base - base.min()) / (base.max() - base.min())
        frames.append(np.stack([200 * level + 30, 120 * level + 60, 255 - 200 * level], -1))
    return np.round(np.stack(frames)).astype(np.uint8)


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory) -> tuple[Path, np.ndarray, np.ndarray]:
    """A shard with one video: its rgb and its TV-L1 flow (quantised, as preprocess stores it)."""
    out = tmp_path_factory.mktemp("shards")
    rgb = moving_frames()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        flow = compute_flow(rgb_to_gray(rgb), FlowConfig(fast=False, device="cpu"))
    finally:
        torch.set_num_threads(threads)
    with ShardWriter(out, ShardConfig(), {"test": "show"}) as writer:
        key = writer.begin_video(SOURCE, height=H, width=W, expected_frames=T, streams=("rgb", "flow"), attrs={})
        writer.write_rgb(key, 0, rgb)
        writer.write_flow(key, 0, flow)
        writer.end_video(key, T)
    # what the sheet should show: the flow as stored, q = round((clip(f, -20, 20) + 20) * 255 / 40), read
    # back as q * 40 / 255 - 20 px; written out here rather than through conventions, which show reads with
    q = np.round((np.clip(flow, -20, 20) + 20) * np.float32(255 / 40))
    return out, rgb, q * np.float32(40 / 255) - 20


def run_show(*argv: str) -> int:
    parser = argparse.ArgumentParser()
    options.show(parser)
    return show.run(parser.parse_args(list(argv)))


def test_contact_sheet_shows_frames_beside_their_flow(shard_dir, tmp_path):
    out_dir, rgb, flow = shard_dir
    png = tmp_path / "sheet" / "preview.png"
    assert run_show(str(out_dir), SOURCE, "--out", str(png), "--frames", "3") == 0
    sheet = cv2.imread(str(png), cv2.IMREAD_COLOR)[..., ::-1]  # back to RGB
    rows = show.frame_indices(T, 3, with_flow=True)
    np.testing.assert_array_equal(rows, [0, 2, 4])  # spread up to T-2, the last frame with a field
    assert sheet.shape == (show._HEADER + 3 * (H + show._GAP) + show._GAP, 2 * W + 3 * show._GAP, 3)
    scale = float(np.hypot(flow[rows, ..., 0], flow[rows, ..., 1]).max())
    for row, t in enumerate(rows):
        top = show._HEADER + show._GAP + row * (H + show._GAP)
        left = sheet[top : top + H, show._GAP : show._GAP + W]
        right = sheet[top : top + H, 2 * show._GAP + W : 2 * show._GAP + 2 * W]
        below_label = np.s_[24:, :]  # the label is drawn over the top rows of each row
        np.testing.assert_array_equal(left[below_label], rgb[t][below_label])
        np.testing.assert_array_equal(right[below_label], flow_to_color(flow[t], max_radius=scale)[below_label])
        # motion to the right: red dominates the flow panel away from the borders
        core = right[24:-8, 8:-8].astype(int)
        assert (core[..., 0] > core[..., 2] + 40).mean() > 0.9


def test_video_by_key_and_without_flow_scale(shard_dir, tmp_path):
    out_dir, _, _ = shard_dir
    from quovadis.pipeline.manifest import load

    key = load(out_dir)[SOURCE].key
    png = tmp_path / "by_key.png"
    assert run_show(str(out_dir), key, "--out", str(png), "--max-flow", "20") == 0
    assert cv2.imread(str(png)).shape[0] == show._HEADER + 5 * (H + show._GAP) + show._GAP  # 5 fields, 6 rows asked


def test_unknown_video_and_unwritable_output(shard_dir, tmp_path):
    out_dir, _, _ = shard_dir
    with pytest.raises(ShardError, match="nope.mp4"):
        run_show(str(out_dir), "/videos/nope.mp4", "--out", str(tmp_path / "x.png"))
    with pytest.raises(QuovadisError, match="x.notanimage"):
        run_show(str(out_dir), SOURCE, "--out", str(tmp_path / "x.notanimage"))
