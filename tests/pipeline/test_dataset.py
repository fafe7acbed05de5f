"""ShardDataset: clip boundaries and looped padding, value range and layout, crops, flips (flow x
negated), video selection, DataLoader workers."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from quovadis.pipeline import conventions
from quovadis.pipeline.dataset import ShardDataset
from quovadis.pipeline.errors import ConfigError
from quovadis.pipeline.shards import ShardConfig, ShardWriter

H, W = 12, 16


def coded_frames(t: int, seed: int) -> np.ndarray:
    """Frames whose pixel (0, 0, 0) is the frame index, so a clip tells which frames it holds."""
    frames = np.random.default_rng(seed).integers(0, 256, size=(t, H, W, 3), dtype=np.uint8)
    frames[:, 0, 0, 0] = np.arange(t)
    return frames


def coded_flow(t: int, seed: int) -> np.ndarray:
    flow = np.random.default_rng(seed).uniform(-25, 25, size=(t, H, W, 2)).astype(np.float32)
    flow[:, 0, 0, 1] = np.arange(t) - 10.0  # y at (0, 0) tells the field index
    return flow


def quantized(flow: np.ndarray) -> np.ndarray:
    """The documented q = round((clip(f, -20, 20) + 20) * 255 / 40), written out in numpy (ties to even)."""
    return np.round((np.clip(flow, -20, 20) + 20) * np.float32(255 / 40)).astype(np.uint8)


def to_model(x: np.ndarray) -> np.ndarray:
    """uint8 (T, H, W, C) -> float32 (C, T, H, W), x / 127.5 - 1, written out in numpy."""
    return (x.astype(np.float32) / 127.5 - 1).transpose(3, 0, 1, 2)


VIDEOS = {"/v/ten.mp4": 10, "/v/three.mp4": 3, "/v/one.mp4": 1}
# (video, start) -> rgb frame indices and flow field indices of its clip of 4 frames, by hand from the
# conventions docstring: frames past the end loop from `start`; the missing last field repeats T-2 -> T-1
CLIP_INDICES = {
    ("/v/ten.mp4", 0): ([0, 1, 2, 3], [0, 1, 2, 3]),
    ("/v/ten.mp4", 4): ([4, 5, 6, 7], [4, 5, 6, 7]),
    ("/v/ten.mp4", 8): ([8, 9, 8, 9], [8, 8, 8, 8]),
    ("/v/three.mp4", 0): ([0, 1, 2, 0], [0, 1, 1, 0]),
    ("/v/one.mp4", 0): ([0, 0, 0, 0], None),  # one frame: no flow
}


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("shards")
    data = {}
    with ShardWriter(out, ShardConfig(chunk_frames=2, shard_size_bytes=3000), {}) as w:
        for i, (path, t) in enumerate(VIDEOS.items()):
            rgb, flow = coded_frames(t, i), coded_flow(t - 1, i)
            key = w.begin_video(path, height=H, width=W, expected_frames=t, streams=("rgb", "flow"), attrs={})
            w.write_rgb(key, 0, rgb)
            w.write_flow(key, 0, flow)
            w.end_video(key, t)
            data[path] = (rgb, quantized(flow))
    assert len(list(out.glob("shard-*.h5"))) > 1  # the dataset reads across shards
    return out, data


def frame_ids(rgb: torch.Tensor) -> list[int]:
    """Frame indices read back from pixel (0, 0) of the red channel of a (3, T, h, w) clip."""
    return [round((v + 1) * 127.5) for v in rgb[0, :, 0, 0].tolist()]


def test_clip_starts_count_and_looped_last_clip(shard_dir):
    out, _ = shard_dir
    ds = ShardDataset(out, clip_len=4, crop="full")
    by_video = {}
    for i in range(len(ds)):
        item = ds[i]
        by_video.setdefault(item["video"], []).append((item["start"], frame_ids(item["rgb"])))
    assert by_video["/v/ten.mp4"] == [(0, [0, 1, 2, 3]), (4, [4, 5, 6, 7]), (8, [8, 9, 8, 9])]
    assert by_video["/v/three.mp4"] == [(0, [0, 1, 2, 0])]  # shorter than a clip: looped
    assert by_video["/v/one.mp4"] == [(0, [0, 0, 0, 0])]
    assert len(ds) == 5

    overlapping = ShardDataset(out, clip_len=4, stride=3, crop="full", videos=["/v/ten.mp4"])
    assert [overlapping[i]["start"] for i in range(len(overlapping))] == [0, 3, 6, 9]
    sparse = ShardDataset(out, clip_len=2, stride=5, crop="full", videos=["/v/ten.mp4"])
    assert [frame_ids(sparse[i]["rgb"]) for i in range(len(sparse))] == [[0, 1], [5, 6]]


def test_value_range_layout_and_exact_values(shard_dir):
    out, data = shard_dir
    ds = ShardDataset(out, clip_len=4, crop="full", streams=("rgb", "flow"), videos=["/v/ten.mp4"])
    item = ds[2]  # start 8: frames 8, 9, 8, 9; flow fields 8, 8, 8, 8 (last field repeats)
    rgb, flow = item["rgb"], item["flow"]
    assert rgb.dtype == torch.float32 and rgb.shape == (3, 4, H, W)
    assert flow.dtype == torch.float32 and flow.shape == (2, 4, H, W)
    raw_rgb, raw_flow = data["/v/ten.mp4"]
    expected = raw_rgb[[8, 9, 8, 9]].astype(np.float32) / 127.5 - 1  # (T, H, W, 3)
    np.testing.assert_allclose(rgb.numpy(), expected.transpose(3, 0, 1, 2), atol=1e-6)
    expected_flow = raw_flow[[8, 8, 8, 8]].astype(np.float32) / 127.5 - 1
    np.testing.assert_allclose(flow.numpy(), expected_flow.transpose(3, 0, 1, 2), atol=1e-6)
    assert flow[1, 0, 0, 0] == pytest.approx(-0.1, abs=0.01)  # y at (0, 0) of field 8 is 8 - 10 = -2 px: -2 / 20
    assert rgb.min() >= -1 and rgb.max() <= 1

    # the ends of the range: uint8 0 -> -1 and 255 -> +1
    assert conventions.rgb_to_model(np.uint8([[[[0, 255, 0]]]]))[:, 0, 0, 0].tolist() == [-1.0, 1.0, -1.0]
    all_rgb = torch.stack([ShardDataset(out, clip_len=4, crop="full")[i]["rgb"] for i in range(5)])
    assert all_rgb.min() == -1.0 and all_rgb.max() == 1.0  # random frames hold both 0 and 255


def test_center_and_random_crops_cut_the_same_box_from_rgb_and_flow(shard_dir):
    out, data = shard_dir
    center = ShardDataset(out, clip_len=4, crop_size=8, streams=("rgb", "flow"), videos=["/v/ten.mp4"])
    item = center[0]
    assert item["crop_box"].tolist() == [2, 4, 8, 8]  # (12 - 8) // 2, (16 - 8) // 2
    raw_rgb, raw_flow = data["/v/ten.mp4"]
    np.testing.assert_allclose(item["rgb"].numpy(), to_model(raw_rgb[0:4, 2:10, 4:12]), atol=1e-6)
    np.testing.assert_allclose(item["flow"].numpy(), to_model(raw_flow[0:4, 2:10, 4:12]), atol=1e-6)

    ds = ShardDataset(out, clip_len=4, crop="random", crop_size=8, streams=("rgb", "flow"), seed=3)
    boxes, clips = set(), set()
    for i in range(len(ds)):
        item = ds[i]
        top, left, h, w = item["crop_box"].tolist()
        assert (h, w) == (8, 8) and 0 <= top <= H - 8 and 0 <= left <= W - 8
        boxes.add((top, left))
        clips.add((item["video"], item["start"]))
        rgb, flow = data[item["video"]]
        idx, fidx = CLIP_INDICES[item["video"], item["start"]]
        np.testing.assert_allclose(item["rgb"].numpy(), to_model(rgb[idx, top:top + 8, left:left + 8]), atol=1e-6)
        np.testing.assert_allclose(item["flow"].numpy(), to_model(flow[fidx, top:top + 8, left:left + 8]), atol=1e-6)
    assert clips == set(CLIP_INDICES) - {("/v/one.mp4", 0)}  # every clip with flow was checked
    assert len(boxes) > 1  # the box moves
    again = ShardDataset(out, clip_len=4, crop="random", crop_size=8, streams=("rgb", "flow"), seed=3)
    assert all(torch.equal(again[i]["rgb"], ds[i]["rgb"]) for i in range(len(ds)))  # seeded: repeatable
    again.set_epoch(1)
    assert any(not torch.equal(again[i]["crop_box"], ds[i]["crop_box"]) for i in range(len(ds)))


def test_flip_mirrors_rgb_and_flow_and_negates_flow_x(shard_dir):
    out, data = shard_dir
    plain = ShardDataset(out, clip_len=4, crop_size=8, streams=("rgb", "flow"))
    flipping = ShardDataset(out, clip_len=4, crop_size=8, streams=("rgb", "flow"), flip=True, seed=0)
    flips = [flipping[i]["flipped"] for i in range(len(flipping))]
    assert True in flips and False in flips
    for i, flipped in enumerate(flips):
        a, b = plain[i], flipping[i]
        if not flipped:
            assert torch.equal(a["rgb"], b["rgb"]) and torch.equal(a["flow"], b["flow"])
            continue
        assert torch.equal(b["rgb"], a["rgb"].flip(-1))
        assert torch.equal(b["flow"][0], -a["flow"][0].flip(-1))  # x: mirrored and reversed
        assert torch.equal(b["flow"][1], a["flow"][1].flip(-1))  # y: mirrored only
    # a rightward motion becomes a leftward one: q for +5 px reads back as -5 px after the flip
    # (+5 px -> q 159 = round(159.375), -5 px -> q 96 = round(95.625); 159 / 127.5 - 1 = -(96 / 127.5 - 1))
    assert conventions.quantize_flow(np.float32([5.0, -5.0])).tolist() == [159, 96]
    x = conventions.flow_to_model(np.uint8([[[[159, 96]]]]))[:, 0, 0, 0].tolist()
    assert x == pytest.approx([31.5 / 127.5, -31.5 / 127.5], abs=1e-6)


def test_random_temporal_start_and_flow_needs_two_frames(shard_dir):
    out, _ = shard_dir
    ds = ShardDataset(out, clip_len=4, crop="full", temporal="random", seed=1, streams=("rgb", "flow"))
    assert len(ds) == 2  # one clip per video; the 1-frame video has no flow and is left out
    starts = set()
    for epoch in range(12):
        ds.set_epoch(epoch)
        starts.add(ds[0]["start"])
    assert starts <= set(range(0, 7)) and len(starts) > 1  # ten frames: starts 0..6 keep a whole clip


def test_video_selection_and_refusals(shard_dir):
    out, _ = shard_dir
    ds = ShardDataset(out, clip_len=4, crop="full", videos=["/v/three.mp4"])
    assert len(ds) == 1 and ds[0]["video"] == "/v/three.mp4"
    assert len(ShardDataset(out, clip_len=4, crop="full", videos=[ds[0]["key"]])) == 1  # by key too
    with pytest.raises(ConfigError, match="not stored"):
        ShardDataset(out, videos=["/v/missing.mp4"])
    with pytest.raises(ConfigError, match="smaller than crop_size"):
        ShardDataset(out, clip_len=4)  # 12x16 frames, default crop 224
    with pytest.raises(ConfigError):
        ShardDataset(out, crop="corner")


def test_dataloader_workers_open_their_own_files(shard_dir):
    out, _ = shard_dir
    ds = ShardDataset(out, clip_len=4, crop_size=8, streams=("rgb", "flow"))
    _ = ds[0]  # the parent holds an open handle before the workers fork
    loader = torch.utils.data.DataLoader(ds, batch_size=2, num_workers=2, multiprocessing_context="fork")
    batches = list(loader)
    assert sum(len(b["video"]) for b in batches) == len(ds)
    rgb = torch.cat([b["rgb"] for b in batches])
    assert rgb.shape == (len(ds), 3, 4, 8, 8)
    assert torch.equal(rgb, torch.stack([ds[i]["rgb"] for i in range(len(ds))]))


def test_sampling_steps_and_flow_snippets_follow_the_looping_rule(shard_dir):
    """2 RGB frames 3 apart with a snippet of 4 fields each (span 7), by hand from the module
    docstring: frames start, start+3; fields start..start+3 and start+3..start+6, looped past the end."""
    out, data = shard_dir
    ds = ShardDataset(out, clip_len=2, frame_step=3, flow_per_frame=4, crop="full", streams=("rgb", "flow"),
                      videos=["/v/ten.mp4"])  # fmt: skip
    assert ds.span == 7 and [ds[i]["start"] for i in range(len(ds))] == [0, 7]
    raw_rgb, raw_flow = data["/v/ten.mp4"]
    first, last = ds[0], ds[1]
    assert frame_ids(first["rgb"]) == [0, 3] and first["flow"].shape == (2, 8, H, W)
    np.testing.assert_allclose(first["flow"].numpy(), to_model(raw_flow[[0, 1, 2, 3, 3, 4, 5, 6]]), atol=1e-6)
    # start 7 in ten frames: the span 7..13 loops as 7, 8, 9, 7, 8, 9, 7; fields stop at 8 (T - 2)
    assert frame_ids(last["rgb"]) == [7, 7]
    np.testing.assert_allclose(last["flow"].numpy(), to_model(raw_flow[[7, 8, 8, 7, 7, 8, 8, 7]]), atol=1e-6)
    plain = ShardDataset(out, clip_len=4, crop="full", streams=("rgb", "flow"), videos=["/v/ten.mp4"])
    stepped = ShardDataset(out, clip_len=4, frame_step=1, flow_per_frame=1, crop="full", streams=("rgb", "flow"),
                           videos=["/v/ten.mp4"])  # fmt: skip
    assert len(plain) == len(stepped) and all(torch.equal(plain[i]["flow"], stepped[i]["flow"]) for i in range(len(plain)))


def test_spread_starts_cover_the_video_without_duplicates(shard_dir):
    out, _ = shard_dir
    ds = ShardDataset(out, clip_len=1, flow_per_frame=2, temporal="spread", clips=4, crop="full",
                      streams=("rgb", "flow"), videos=["/v/ten.mp4", "/v/three.mp4"])  # fmt: skip
    starts = {}
    for i in range(len(ds)):
        starts.setdefault(ds[i]["video"], []).append(ds[i]["start"])
    assert starts == {"/v/ten.mp4": [0, 3, 5, 8], "/v/three.mp4": [0, 1]}  # linspace(0, 8, 4) rounded; 0..1
    with pytest.raises(ConfigError, match="frame_step"):
        ShardDataset(out, crop="full", frame_step=0)
