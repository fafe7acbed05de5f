"""Injected faults: a process of a job's Ray Data graph is SIGKILLed mid-run (preprocess: a decode
task, a flow actor, a task writing pieces; extract: a decode task, a flow actor and an I3D actor);
Ray's retries and restarts redo the lost work, so every video ends `ok` and the output equals an
uninterrupted run's. (The driver, which writes the shards' metadata, is killed in
test_preprocess.py's resume test.)"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from quovadis.jobs.extract import ExtractConfig, extract
from quovadis.jobs.preprocess import PreprocessConfig, preprocess
from quovadis.models.predictor import PredictorConfig
from quovadis.pipeline import features
from quovadis.pipeline.decode import DecodeConfig
from quovadis.pipeline.flow import FlowConfig
from tests.conftest import shared_path
from tests.jobs.test_preprocess import _read_all
from tests.videos import make_video

SMALL = DecodeConfig(short_side=64)
FLOW = FlowConfig(fast=False, nscales=2, warps=2, outer_iterations=3, inner_iterations=10)  # cheap: faults are the point


def _preprocess_cfg(out: Path) -> PreprocessConfig:
    return PreprocessConfig(out=str(out), decode=SMALL, flow=FLOW)


class KillOnce(threading.Thread):
    """Kills (SIGKILL) the first process whose title starts with `title` - Ray names a worker
    `ray::<task or Actor.method>` while it runs one (its /proc cmdline) - and remembers its pid."""

    def __init__(self, title: str, ready: Callable[[], bool] = lambda: True, timeout: float = 120.0) -> None:
        super().__init__(daemon=True)
        self.title, self.ready, self.deadline = title, ready, time.monotonic() + timeout
        self.killed: int | None = None
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set() and time.monotonic() < self.deadline:
            if not self.ready():
                time.sleep(0.02)
                continue
            for proc in Path("/proc").glob("[0-9]*"):
                try:
                    title = (proc / "cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")
                except OSError:  # the process is gone
                    continue
                if title.startswith(self.title):
                    os.kill(int(proc.name), signal.SIGKILL)
                    self.killed = int(proc.name)
                    return
            time.sleep(0.02)


def _with_kill(title: str, job, ready: Callable[[], bool] = lambda: True):
    killer = KillOnce(title, ready)
    killer.start()
    try:
        report = job()
    finally:
        killer.stop.set()
        killer.join()
    assert killer.killed is not None, f"no process titled {title!r} ran, nothing was killed"
    return report


@pytest.fixture(scope="module")
def videos(tmp_path_factory) -> list[str]:
    d = tmp_path_factory.mktemp("fault-videos")
    return [
        str(make_video(d / "a.mp4", fps=30, duration=1.2)),
        str(make_video(d / "b.mkv", fps=25, duration=1.4, size=(98, 70), audio=True)),
        str(make_video(d / "c.avi", fps=12, duration=1.5, size=(97, 71), codec="mpeg4")),
    ]


@pytest.fixture(scope="module")
def uninterrupted(ray_session, videos, tmp_path_factory) -> dict[str, dict]:
    out = tmp_path_factory.mktemp("uninterrupted")
    report = preprocess(videos, _preprocess_cfg(out))
    assert sorted(report.ok) == sorted(videos)
    return _read_all(out)


def _assert_same(out: Path, expected: dict[str, dict]) -> None:
    got = _read_all(out)
    assert set(got) == set(expected)
    for path, video in expected.items():
        assert got[path]["frames"] == video["frames"], path
        np.testing.assert_array_equal(got[path]["rgb"], video["rgb"], err_msg=path)
        np.testing.assert_array_equal(got[path]["flow"], video["flow"], err_msg=path)


@pytest.mark.parametrize("title", ["ray::MapWorker(MapBatches(FlowStage)).submit", "ray::FlatMap(decode_chunks)",
                                   "ray::MapBatches(write_pieces)"])  # fmt: skip
def test_preprocess_survives_a_killed_worker(ray_session, videos, uninterrupted, tmp_path, title):
    out = tmp_path / "out"
    report = _with_kill(title, lambda: preprocess(videos, _preprocess_cfg(out)))
    assert report.failed == {} and sorted(report.ok) == sorted(videos)
    _assert_same(out, uninterrupted)


def _features(out: Path) -> dict[str, features.VideoFeatures]:
    return {e.input: features.read_video(out, e) for e in features.load_index(out).values() if e.status == "ok"}


def _extract_cfg(out: Path) -> ExtractConfig:
    weights = {s: str(shared_path("i3d", f"{s}_random_init.pt")) for s in ("rgb", "flow")}
    predictor = PredictorConfig(streams=("rgb", "flow"), weights_rgb=weights["rgb"], weights_flow=weights["flow"])
    # segments of 16 frames: several decode tasks per video, clips across their borders
    decode = DecodeConfig(short_side=64, segment_frames=16)
    return ExtractConfig(out=str(out), clip_len=8, crop_size=56, batch_size=2, decode=decode, flow=FLOW, predictor=predictor)


@pytest.fixture(scope="module")
def extracted(ray_session, videos, tmp_path_factory) -> dict[str, features.VideoFeatures]:
    out = tmp_path_factory.mktemp("extracted")
    report = extract(videos, _extract_cfg(out))
    assert report.failed == {} and sorted(report.ok) == sorted(videos)
    return _features(out)


@pytest.mark.parametrize("title", ["ray::MapWorker(MapBatches(I3DStage)).submit",
                                   "ray::MapWorker(MapBatches(FlowStage)).submit", "ray::FlatMap(decode_clips)"])  # fmt: skip
def test_extract_survives_a_killed_worker(ray_session, videos, extracted, tmp_path, title):
    killed = _with_kill(title, lambda: extract(videos, _extract_cfg(tmp_path / "killed")))
    assert killed.failed == {} and sorted(killed.ok) == sorted(videos)
    got = _features(tmp_path / "killed")
    assert set(got) == set(extracted) == set(videos)
    for path, video in extracted.items():
        np.testing.assert_array_equal(got[path].clip_start_frame, video.clip_start_frame)
        for stream in ("rgb", "flow"):
            np.testing.assert_allclose(got[path].features[stream], video.features[stream], rtol=0, atol=1e-4)
