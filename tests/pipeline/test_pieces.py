"""Pieces: chunks of decoded frames written by many processes, read through a shard's virtual
datasets; what a job leaves behind is removed, a missing piece is an error, never zeros."""

from __future__ import annotations

import h5py
import numpy as np
import pytest

from quovadis.pipeline import manifest
from quovadis.pipeline.conventions import quantize_flow, rgb_to_gray
from quovadis.pipeline.dataset import ShardDataset
from quovadis.pipeline.decode import DecodeConfig, iter_frames, plan_segments
from quovadis.pipeline.errors import ShardError
from quovadis.pipeline.pieces import PIECES_DIR, Chunk, remove_unused, segment_chunks, write_piece
from quovadis.pipeline.probe import probe
from quovadis.pipeline.shards import ShardConfig, ShardWriter, list_shards, open_video
from tests.videos import make_video

H, W = 12, 16


def _frames(t: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(t, H, W, 3), dtype=np.uint8)


def _flow(t: int, seed: int) -> np.ndarray:
    return quantize_flow(np.random.default_rng(seed).uniform(-20, 20, size=(t, H, W, 2)).astype(np.float32))


def _add(writer: ShardWriter, path: str, frames: int, refs, streams=("rgb", "flow")):
    return writer.add_video(path, height=H, width=W, frames=frames, streams=streams, attrs={"codec": "test"}, refs=refs)


def test_chunks_of_two_videos_in_pieces_read_back_as_whole_videos(tmp_path):
    rgb_a, flow_a = _frames(7, 1), _flow(6, 2)
    rgb_b, flow_b = _frames(3, 3), _flow(2, 4)
    # video a in three chunks over two pieces (written out of order), b in one; one chunk of a is
    # written twice (a redone write) and its second copy holds other values
    first = write_piece(tmp_path, [Chunk(4, rgb_a[4:], 4, flow=flow_a[4:]), Chunk(0, rgb_b, 0, flow=flow_b)], {}, 1)
    second = write_piece(tmp_path, [Chunk(0, rgb_a[:2], 0, flow=flow_a[:2]), Chunk(2, rgb_a[2:4], 2, flow=flow_a[2:4])], {}, 2)
    redone = write_piece(tmp_path, [Chunk(2, rgb_a[2:4] // 2, 2, flow=flow_a[2:4] // 2)], {}, 1)
    assert len(list((tmp_path / PIECES_DIR).glob("piece-*.h5"))) == 3
    assert not list((tmp_path / PIECES_DIR).glob("*.tmp"))
    with ShardWriter(tmp_path, ShardConfig(), {"job": "test"}) as writer:
        _add(writer, "/v/a.mp4", 7, first[0] + second[0] + second[1] + redone[0])
        _add(writer, "/v/b.mp4", 3, first[1])
    for path, rgb, flow in (("/v/a.mp4", rgb_a, flow_a), ("/v/b.mp4", rgb_b, flow_b)):
        with open_video(tmp_path, path) as video:
            assert video.frames == len(rgb) and video.attrs["codec"] == "test"
            np.testing.assert_array_equal(video.rgb(), rgb)
            np.testing.assert_array_equal(video.flow(), flow)
            np.testing.assert_array_equal(video.rgb(3, 6), rgb[3:6])  # a read across pieces
    with h5py.File(list_shards(tmp_path)[0], "r") as f:  # read with h5py alone, as documented
        np.testing.assert_array_equal(f[manifest.load(tmp_path)["/v/a.mp4"].key]["rgb"][()], rgb_a)


def test_a_gap_in_the_chunks_is_an_error_naming_the_video(tmp_path):
    refs = write_piece(tmp_path, [Chunk(0, _frames(2, 1)), Chunk(3, _frames(2, 2))], {}, 1)
    with ShardWriter(tmp_path, ShardConfig(), {}) as writer:
        with pytest.raises(ShardError, match=r"/v/gap.mp4: rgb frames 2\.\.4 were not all written"):
            _add(writer, "/v/gap.mp4", 5, refs[0] + refs[1], streams=("rgb",))


def test_a_one_frame_video_has_an_empty_flow(tmp_path):
    refs = write_piece(tmp_path, [Chunk(0, _frames(1, 1))], {}, 1)
    with ShardWriter(tmp_path, ShardConfig(), {}) as writer:
        _add(writer, "/v/one.mp4", 1, refs[0])
    with open_video(tmp_path, "/v/one.mp4") as video:
        assert video.rgb().shape == (1, H, W, 3) and video.flow().shape == (0, H, W, 2)


def test_shard_size_counts_the_frames_in_pieces(tmp_path):
    # 100 frames (56 KiB) each: two videos (and a few KiB of the shard's own metadata) fill a shard
    with ShardWriter(tmp_path, ShardConfig(shard_size_bytes=2 * 100 * H * W * 3), {}) as writer:
        for i in range(5):
            _add(writer, f"/v/{i}.mp4", 100, write_piece(tmp_path, [Chunk(0, _frames(100, i))], {}, 1)[0], streams=("rgb",))
    assert [p.name for p in list_shards(tmp_path)] == ["shard-00000.h5", "shard-00001.h5", "shard-00002.h5"]


def test_unused_and_temporary_pieces_are_removed_used_ones_kept(tmp_path):
    used = write_piece(tmp_path, [Chunk(0, _frames(2, 1))], {}, 1)
    unused = write_piece(tmp_path, [Chunk(0, _frames(2, 2))], {}, 1)  # a failed video's, or a crash's
    (tmp_path / PIECES_DIR / "piece-0.h5.tmp").write_bytes(b"half")
    with ShardWriter(tmp_path, ShardConfig(), {}) as writer:
        _add(writer, "/v/a.mp4", 2, used[0], streams=("rgb",))
    assert remove_unused(tmp_path, list_shards(tmp_path)) == 2
    assert [p.name for p in (tmp_path / PIECES_DIR).iterdir()] == [used[0][0].file.split("/")[1]]
    assert unused[0][0].file != used[0][0].file
    with open_video(tmp_path, "/v/a.mp4") as video:
        np.testing.assert_array_equal(video.rgb(), _frames(2, 1))


def test_a_missing_piece_is_an_error_not_zeros(tmp_path):
    refs = write_piece(tmp_path, [Chunk(0, _frames(4, 1))], {}, 1)
    with ShardWriter(tmp_path, ShardConfig(), {}) as writer:
        _add(writer, "/v/a.mp4", 4, refs[0], streams=("rgb",))
    (tmp_path / refs[0][0].file).unlink()
    with pytest.raises(ShardError, match="pieces are missing"):
        open_video(tmp_path, "/v/a.mp4")
    with pytest.raises(ShardError, match="pieces are missing"):
        ShardDataset(tmp_path, clip_len=2, streams=("rgb",), crop_size=8)[0]


def test_segment_chunks_flow_frames_cross_segment_borders_once(tmp_path):
    """Every flow pair of the video is in exactly one chunk of one segment, and its grey frames
    are those of an unsplit decode."""
    path = str(make_video(tmp_path / "v.mp4", fps=25, duration=1.6, size=(64, 48)))
    cfg = DecodeConfig(short_side=48, segment_frames=15, chunk_frames=4)
    info = probe(path)
    whole = np.concatenate([c.frames for c in iter_frames(path, cfg, info)])
    pairs, rgb = [], []
    for seg in plan_segments(info, cfg):
        for part in segment_chunks(path, info, seg, cfg, flow=True):
            if isinstance(part, Chunk):
                rgb.append((part.start, part.rgb))
                if part.gray is not None:
                    np.testing.assert_array_equal(part.gray, rgb_to_gray(whole[part.flow_start : part.flow_start + len(part.gray)]))
                    pairs += range(part.flow_start, part.flow_start + len(part.gray) - 1)
            else:
                assert part.frames == min(seg.end or len(whole), len(whole)) - seg.start
    assert len(plan_segments(info, cfg)) == 3 and sorted(pairs) == list(range(len(whole) - 1))
    np.testing.assert_array_equal(np.concatenate([f for _, f in sorted(rgb, key=lambda x: x[0])]), whole)
