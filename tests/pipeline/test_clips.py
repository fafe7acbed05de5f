"""Clips straight from the decoder, segment by segment, against clips indexed out of one unsplit
decode with the loop-padding rule written out here (not conventions' helpers); overlapping clips
in runs that share their grey frames."""

from __future__ import annotations

import numpy as np
import pytest

from quovadis.pipeline.clips import Clip, ClipRun, ClipSpec, SegmentEnd, clip_segment_frames, crop_flow, segment_clips, stored_runs
from quovadis.pipeline.conventions import rgb_to_gray
from quovadis.pipeline.decode import DecodeConfig, Segment, iter_frames, output_size
from quovadis.pipeline.errors import ConfigError
from quovadis.pipeline.probe import probe
from tests.videos import make_video


def _expected_starts(frames: int, clip_len: int, stride: int) -> list[int]:
    """Every start whose clip fits, and the first one past them when frames are left."""
    starts, s = [], 0
    while s + clip_len <= frames:
        starts.append(s)
        s += stride
    if s < frames:
        starts.append(s)
    return starts


def _looped(start: int, clip_len: int, frames: int) -> list[int]:
    own = list(range(start, frames))
    return [own[i % len(own)] for i in range(clip_len)]


@pytest.fixture(scope="module")
def video(tmp_path_factory):
    path = make_video(tmp_path_factory.mktemp("clips") / "v.mp4", fps=25, duration=1.48, size=(96, 72))
    info = probe(str(path))
    cfg = DecodeConfig(short_side=64, chunk_frames=5)
    full = np.concatenate([c.frames for c in iter_frames(str(path), cfg, info)])
    return str(path), info, cfg, full


# run sizes by hand: overlapping clips (stride < clip_len) are grouped within their segment, at most
# 3 * clip_len // stride + 1 of them (4 clip lengths of fields); others one per run
@pytest.mark.parametrize("clip_len, stride, segment, runs", [
    (8, 8, 16, [1] * 5), (8, 5, 10, [2, 2, 2, 1]), (8, 20, 20, [1, 1]), (16, 16, 16, [1] * 3), (64, 64, 64, [1]),
    (5, 3, 6, [2] * 6), (8, 2, 40, [13, 3]),
])  # fmt: skip
def test_segments_give_the_unsplit_clips(video, clip_len, stride, segment, runs):
    path, info, cfg, full = video
    frames = len(full)
    assert frames == 37
    spec = ClipSpec(clip_len, stride, "center", 40, ("rgb", "flow"))
    box = spec.crop_box(*output_size(info, cfg))
    seg_len = clip_segment_frames(segment, stride)
    borders = list(range(0, frames - 3, seg_len))
    segments = [Segment(i, a, b) for i, (a, b) in enumerate(zip(borders, [*borders[1:], None]))]
    made: list[ClipRun] = []
    ends: list[SegmentEnd] = []
    for seg in segments:
        for part in segment_clips(path, info, seg, cfg, spec, box):
            (ends if isinstance(part, SegmentEnd) else made).append(part)
    assert [len(run.clips) for run in made] == runs
    clips = [(run, clip) for run in made for clip in run.clips]
    assert [c.start for _, c in clips] == _expected_starts(frames, clip_len, stride)
    assert [e.index for e in ends] == [s.index for s in segments]
    assert sum(e.frames for e in ends) == frames and ends[-1].total == frames
    top, left, h, w = box
    assert (h, w) == (40, 40) and top == (full.shape[1] - 40) // 2 and left == (full.shape[2] - 40) // 2
    def pairs(clip: Clip) -> list[int]:  # the field leaving each frame of the clip (the last frame's: the one before)
        return [min(f, frames - 2) for f in _looped(clip.start, clip_len, frames)]

    for run in made:
        # the run's grey frames are those of its clips' fields, each field once, none unused
        first = min(min(pairs(c)) for c in run.clips)
        last = max(max(pairs(c)) for c in run.clips)
        np.testing.assert_array_equal(run.gray, rgb_to_gray(full[first : last + 2]))
        assert set().union(*(pairs(c) for c in run.clips)) == set(range(first, last + 1))
    for run, clip in clips:
        np.testing.assert_array_equal(clip.rgb, full[_looped(clip.start, clip_len, frames), top : top + h, left : left + w])
        first = min(min(pairs(c)) for c in run.clips)
        np.testing.assert_array_equal(clip.fields, np.asarray(pairs(clip)) - first)


def test_crop_flow_takes_the_clip_fields_in_its_box():
    clip = Clip(0, (1, 2, 3, 4), fields=np.array([2, 0, 1]))
    flow = np.arange(3 * 6 * 8 * 2).reshape(3, 6, 8, 2)
    np.testing.assert_array_equal(crop_flow(flow, clip), flow[[2, 0, 1], 1:4, 2:6])


def test_one_frame_video_has_one_clip_without_flow_frames(tmp_path):
    path = make_video(tmp_path / "one.mp4", fps=25, duration=0.04, size=(80, 64))
    info = probe(str(path))
    cfg = DecodeConfig(short_side=64)
    spec = ClipSpec(8, 8, "full", 0, ("rgb", "flow"))
    parts = list(segment_clips(str(path), info, Segment(0, 0, None), cfg, spec, spec.crop_box(*output_size(info, cfg))))
    run, end = parts
    (clip,) = run.clips
    assert clip.rgb.shape == (8, 64, 80, 3) and (clip.rgb == clip.rgb[0]).all()
    assert run.gray is None and clip.fields is None and end.total == 1 and end.frames == 1


def test_frames_smaller_than_the_crop_are_refused():
    with pytest.raises(ConfigError, match="--crop-size 224"):
        ClipSpec(crop_size=224).crop_box(200, 300)
    assert ClipSpec(crop="full").crop_box(200, 300) == (0, 0, 200, 300)


def test_runs_group_only_overlapping_clips_with_flow():
    assert ClipSpec(64, 16).run_clips == 13  # fields 0..255: four clip lengths
    assert ClipSpec(64, 32).run_clips == 7
    assert ClipSpec(64, 64).run_clips == 1 and ClipSpec(64, 80).run_clips == 1
    assert ClipSpec(64, 16, streams=("rgb",)).run_clips == 1  # RGB clips share nothing to compute


def test_stored_clips_come_in_runs_as_decoded_ones_do():
    clips = [Clip(start, (0, 0, 4, 4)) for start in range(0, 32, 2)]
    runs = list(stored_runs(clips, ClipSpec(8, 2)))
    assert [len(r.clips) for r in runs] == [13, 3] and [c for r in runs for c in r.clips] == clips
    assert all(r.gray is None for r in runs)
    assert [len(r.clips) for r in stored_runs(clips, ClipSpec(8, 8))] == [1] * 16
