"""`quovadis preprocess` end to end: real videos, bad inputs, resume after SIGKILL, the lock, flow."""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

from quovadis.jobs.inputs import NOT_VIDEO, expand_inputs
from quovadis.jobs.cli import EXIT_CANNOT_RUN, EXIT_OK, EXIT_SOME_FAILED, main
from quovadis.jobs.preprocess import PreprocessConfig, preprocess
from quovadis.pipeline import manifest
from quovadis.pipeline.conventions import dequantize_flow
from quovadis.pipeline.decode import DecodeConfig
from quovadis.pipeline.flow import FlowConfig
from tests.conftest import REPO, shared_path
from tests.videos import make_audio_only, make_damaged, make_video, make_zero_frame_video

SMALL = DecodeConfig(short_side=64)


def _cfg(out: Path, **kw) -> PreprocessConfig:
    kw.setdefault("streams", ("rgb",))
    kw.setdefault("decode", SMALL)
    return PreprocessConfig(out=str(out), **kw)


def _read_all(out: Path) -> dict[str, dict]:
    """Every ok video of a shard directory, read with h5py and json only (the documented layout)."""
    videos = {}
    for entry in manifest.load(out).values():
        if entry.status != "ok":
            continue
        with h5py.File(out / entry.file, "r") as f:
            group = f[entry.key]
            videos[entry.input] = {
                "frames": entry.frames,
                "rgb": group["rgb"][()],
                "flow": group["flow"][()] if "flow" in group else None,
                "source_path": group.attrs["source_path"],
            }
    return videos


@pytest.fixture(scope="module")
def small_videos(tmp_path_factory) -> list[Path]:
    d = tmp_path_factory.mktemp("videos")
    return [
        make_video(d / "a.mp4", fps=30, duration=1.0),
        make_video(d / "b.mkv", fps=12, duration=1.5, audio=True),
        make_video(d / "c.avi", fps=60, duration=0.8, size=(97, 71), codec="mpeg4"),
    ]


def test_shared_real_videos_all_succeed(ray_session, tmp_path):
    videos = sorted(str(p) for p in shared_path("videos").iterdir())
    report = preprocess(videos, _cfg(tmp_path / "out"))
    assert report.failed == {} and report.warnings == {}  # clean files: no ffmpeg error, whole or in segments
    assert sorted(report.ok) == videos
    data = _read_all(tmp_path / "out")
    assert set(data) == set(videos)
    for path, video in data.items():
        assert video["rgb"].dtype == np.uint8 and video["rgb"].shape[0] == video["frames"] >= 3
        assert min(video["rgb"].shape[1:3]) == 64 and video["source_path"] == path
    by_name = {Path(p).name: v["frames"] for p, v in data.items()}
    assert abs(by_name["bigbuckbunny_h264_720p25.mp4"] - 133) <= 1
    assert abs(by_name["big_buck_bunny_0_30_vp8.webm"] - 750) <= 1
    assert by_name["cars_320x240.h265"] == 30
    saved = json.loads((tmp_path / "out" / "report.json").read_text())
    assert saved["frames"] == sum(by_name.values()) and len(saved["ok"]) == 6 and saved["seconds"] > 0
    assert not list((tmp_path / "out").glob("*.tmp"))


def test_bad_inputs_fail_alone_with_reasons(ray_session, tmp_path, small_videos):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "empty.mp4").write_bytes(b"")
    real = small_videos[0].read_bytes()
    (bad / "truncated.mp4").write_bytes(real[: len(real) // 3])
    (bad / "random.mp4").write_bytes(np.random.default_rng(0).bytes(50_000))
    (bad / "notes.txt").write_text("not a video\n" * 100)
    (bad / "dir.mp4").mkdir()
    make_audio_only(bad / "audio.m4a")
    make_zero_frame_video(bad / "zero.mp4")
    cases = {
        "missing.mp4": "no such file",
        "empty.mp4": "empty",
        "truncated.mp4": "cannot open",
        "random.mp4": "cannot open",
        "notes.txt": "not a video",
        "dir.mp4": "directory",
        "audio.m4a": "audio-only",
        "zero.mp4": "no video frames",
    }
    inputs = [str(small_videos[0])] + [str(bad / name) for name in cases] + [str(small_videos[1])]
    report = preprocess(inputs, _cfg(tmp_path / "out"))
    assert sorted(report.ok) == sorted([str(small_videos[0]), str(small_videos[1])])
    assert set(report.failed) == {str(bad / name) for name in cases}
    for name, words in cases.items():
        reason = report.failed[str(bad / name)]
        assert "\n" not in reason and reason.startswith(str(bad / name)) and words in reason.lower(), (name, reason)
    recorded = manifest.load(tmp_path / "out")
    assert {p for p, e in recorded.items() if e.status == "failed"} == set(report.failed)
    assert set(_read_all(tmp_path / "out")) == set(report.ok)


def test_cli_exit_codes_rerun_and_retry(ray_session, tmp_path, small_videos):
    out = tmp_path / "out"
    good = [str(p) for p in small_videos]
    missing = str(tmp_path / "missing.mp4")
    args = ["preprocess", *good, missing, "--out", str(out), "--streams", "rgb", "--short-side", "64"]
    assert main(args) == EXIT_SOME_FAILED
    shards = {p.name: p.stat().st_mtime_ns for p in out.glob("shard-*.h5")}
    assert shards
    first = json.loads((out / "report.json").read_text())
    assert len(first["ok"]) == 3 and list(first["failed"]) == [missing]

    assert main(args) == EXIT_SOME_FAILED  # the failed input stays failed, nothing redone
    second = json.loads((out / "report.json").read_text())
    assert second["ok"] == [] and sorted(second["skipped"]) == sorted(good + [missing])
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("shard-*.h5")} == shards

    make_video(Path(missing), fps=25, duration=0.5)
    assert main(args + ["--retry-failed"]) == EXIT_OK
    third = json.loads((out / "report.json").read_text())
    assert third["ok"] == [missing] and third["failed"] == {}
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("shard-*.h5")}.items() >= shards.items()
    assert set(_read_all(out)) == set(good + [missing])


def test_cli_usage_error_exits_2(tmp_path):
    with pytest.raises(SystemExit) as e:
        main(["preprocess", "x.mp4", "--out", str(tmp_path), "--streams", "depth"])
    assert e.value.code == 2


def test_keys_are_safe_and_distinct(ray_session, tmp_path, small_videos):
    names = ["d1/same name.mp4", "d2/same name.mp4", "ünï cødé 🎬.mp4", "d1/../dots.mp4", "d3/..mp4"]
    for name in names:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(small_videos[0], tmp_path / name)
    inputs = expand_inputs([str(tmp_path / name) for name in names]).paths
    report = preprocess(inputs, _cfg(tmp_path / "out"))
    assert report.failed == {} and len(report.ok) == 5
    recorded = manifest.load(tmp_path / "out")
    keys = [recorded[p].key for p in inputs]
    assert len(set(keys)) == 5
    for key in keys:
        assert "/" not in key and not key.startswith(".") and key.isascii()
    assert {v["source_path"] for v in _read_all(tmp_path / "out").values()} == set(inputs)


def test_second_job_on_same_out_is_refused(tmp_path, small_videos):
    from quovadis.jobs.runtime import out_dir_lock
    from quovadis.pipeline.errors import LockError

    out = tmp_path / "out"
    with out_dir_lock(out):
        with pytest.raises(LockError, match="in use by another quovadis job"):
            preprocess([str(small_videos[0])], _cfg(out))
        code = subprocess.run(
            [sys.executable, "-m", "quovadis", "preprocess", str(small_videos[0]), "--out", str(out), "--streams", "rgb"],
            capture_output=True, text=True, cwd=REPO,
        )
    assert code.returncode == EXIT_CANNOT_RUN and "in use by another quovadis job" in code.stderr


def test_long_video_segments_equal_unsplit_run(ray_session, tmp_path):
    video = make_video(tmp_path / "long.mp4", fps=30, duration=2.0, size=(96, 64))
    flow = FlowConfig(fast=False)  # the compiled path is tested in tests/pipeline/test_flow.py
    whole = preprocess([str(video)], _cfg(tmp_path / "whole", streams=("rgb", "flow"), flow=flow,
                                         decode=DecodeConfig(short_side=48, segment_frames=10_000)))
    split = preprocess([str(video)], _cfg(tmp_path / "split", streams=("rgb", "flow"), flow=flow,
                                         decode=DecodeConfig(short_side=48, segment_frames=17)))
    assert whole.failed == split.failed == {}
    a, b = _read_all(tmp_path / "whole")[str(video)], _read_all(tmp_path / "split")[str(video)]
    assert a["frames"] == b["frames"] == 50
    np.testing.assert_array_equal(a["rgb"], b["rgb"])
    assert a["flow"].shape == (49, 48, 72, 2) and a["flow"].dtype == np.uint8
    moving = dequantize_flow(a["flow"])[:, 4:12, :, 0]  # the marker moves right along the top rows
    assert np.percentile(moving, 99) > 0.5
    np.testing.assert_array_equal(a["flow"], b["flow"])


def test_sigkill_mid_run_then_resume_matches_uninterrupted(tmp_path):
    (tmp_path / "v").mkdir()
    videos = [make_video(tmp_path / "v" / f"{i}.mp4", fps=24 + i, duration=2.0, size=(128, 96)) for i in range(6)]
    cmd = [sys.executable, "-m", "quovadis", "preprocess", str(tmp_path / "v"), "--streams", "rgb",
           "--short-side", "96", "--shard-size", "300K"]
    env = dict(os.environ, PYTHONPATH=str(REPO))
    reference = subprocess.run(cmd + ["--out", str(tmp_path / "ref")], env=env, cwd=REPO, capture_output=True, text=True)
    assert reference.returncode == EXIT_OK, reference.stderr

    out = tmp_path / "killed"
    job = subprocess.Popen(cmd + ["--out", str(out)], env=env, cwd=REPO, start_new_session=True,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not list(out.glob("shard-*.h5")) and time.monotonic() < deadline and job.poll() is None:
        time.sleep(0.05)
    os.killpg(job.pid, signal.SIGKILL)  # the driver and the local Ray it started
    job.wait()
    # done: every video of a committed shard, whether or not its manifest line was appended before
    # the kill (the kill comes as the first shard appears: the re-run adopts such a shard's lines)
    done_before = {e.input for e in manifest.load(out).values() if e.status == "ok"}
    for shard in out.glob("shard-*.h5"):
        with h5py.File(shard, "r") as f:
            done_before |= {f[k].attrs["source_path"] for k in f.keys()}
    assert len(done_before) < len(videos), "the job finished before it could be killed"

    resumed = subprocess.run(cmd + ["--out", str(out)], env=env, cwd=REPO, capture_output=True, text=True)
    assert resumed.returncode == EXIT_OK, resumed.stderr
    report = json.loads((out / "report.json").read_text())
    assert set(report["skipped"]) == done_before and set(report["ok"]) == {str(v) for v in videos} - done_before
    assert not list(out.glob("*.tmp"))
    ref, got = _read_all(tmp_path / "ref"), _read_all(out)
    assert set(ref) == set(got) == {str(v) for v in videos}
    for path in ref:
        assert ref[path]["frames"] == got[path]["frames"]
        np.testing.assert_array_equal(ref[path]["rgb"], got[path]["rgb"])
    # nothing duplicated: every group in every shard is one manifest entry
    groups = []
    for shard in out.glob("shard-*.h5"):
        with h5py.File(shard, "r") as f:
            groups += [(shard.name, k) for k in f.keys()]
    entries = {(e.file, e.key) for e in manifest.load(out).values() if e.status == "ok"}
    assert sorted(groups) == sorted(entries)


def test_shard_renamed_but_not_in_manifest_is_recorded_not_redone(ray_session, tmp_path, small_videos):
    out = tmp_path / "out"
    inputs = [str(p) for p in small_videos]
    for path in inputs:  # one shard per video
        preprocess([path], _cfg(out))
    lines = (out / "manifest.jsonl").read_text().splitlines()
    assert len(lines) == 3 and len(list(out.glob("shard-*.h5"))) == 3
    (out / "manifest.jsonl").write_text("\n".join(lines[:1]) + "\n")  # killed right after two renames
    shards = {p.name: p.stat().st_mtime_ns for p in out.glob("shard-*.h5")}
    report = preprocess(inputs, _cfg(out))
    assert report.ok == [] and sorted(report.skipped) == sorted(inputs)
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("shard-*.h5")} == shards
    assert set(_read_all(out)) == set(inputs)


@pytest.fixture
def tiny_disk(tmp_path):
    """A 48 MiB tmpfs (needs root and mount rights; skipped otherwise)."""
    mount_point = tmp_path / "disk"
    mount_point.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=48m", "tmpfs", str(mount_point)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs to fill (needs root): {done.stderr.decode().strip()}")
    yield mount_point
    subprocess.run(["umount", "-l", str(mount_point)], check=False)


def test_full_disk_fails_the_videos_keeps_what_was_written(ray_session, tmp_path, tiny_disk):
    out = tiny_disk / "out"
    first = make_video(tmp_path / "first.mp4", fps=25, duration=0.4, size=(128, 96))
    assert preprocess([str(first)], _cfg(out, decode=DecodeConfig(short_side=96))).failed == {}
    before = _read_all(out)[str(first)]["rgb"]

    big = [str(make_video(tmp_path / f"big{i}.mp4", fps=25, duration=3.0, size=(320, 240))) for i in range(4)]
    report = preprocess([str(first)] + big, _cfg(out, decode=DecodeConfig(short_side=240)))  # 4 x 17 MB
    assert report.skipped == [str(first)] and set(report.ok) | set(report.failed) == set(big)
    assert report.failed and all("No space left on device" in r for r in report.failed.values()), report.failed
    stored = _read_all(out)
    assert set(stored) == {str(first), *report.ok}
    np.testing.assert_array_equal(stored[str(first)]["rgb"], before)  # nothing written is lost


def test_directory_scan_takes_mjpeg_and_reports_what_it_ignores(ray_session, tmp_path, caplog):
    """A raw MJPEG file in an input directory is preprocessed; a notes.txt beside it is counted in
    the summary and listed in report.json instead of vanishing."""
    d = tmp_path / "in"
    d.mkdir()
    clip = make_video(d / "clip.mjpeg", fps=25, duration=0.8, size=(96, 64), codec="mjpeg", extra=["-f", "mjpeg"])
    (d / "notes.txt").write_text("not a video\n")
    out = tmp_path / "out"
    with caplog.at_level(logging.INFO, logger="quovadis.jobs.preprocess"):
        rc = main(["preprocess", str(d), "--out", str(out), "--streams", "rgb", "--short-side", "64"])
    assert rc == EXIT_OK
    entry = manifest.load(out)[str(clip)]
    assert entry.status == "ok" and entry.frames == 20
    saved = json.loads((out / "report.json").read_text())
    assert saved["ok"] == [str(clip)] and saved["ignored"] == [{"path": str(d / "notes.txt"), "reason": NOT_VIDEO}]
    summary = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("preprocess: "))
    assert "1 ok (0 with decode warnings)" in summary and "1 ignored in input directories" in summary


def test_decode_errors_are_recorded_as_warnings(ray_session, tmp_path, caplog):
    """A damaged file that ffmpeg still decodes whole is stored ok, with ffmpeg's message in its
    manifest entry and shard, counted in the summary, listed in report.json and logged by the
    driver (the worker's own log never reaches it)."""
    clean = make_video(tmp_path / "clean.avi", fps=25, duration=2.0, codec="mpeg4")
    damaged = make_damaged(clean, tmp_path / "damaged.avi")
    out = tmp_path / "out"
    with caplog.at_level(logging.WARNING, logger="quovadis.jobs.preprocess"):
        report = preprocess([str(clean), str(damaged)], _cfg(out))
    assert report.failed == {} and sorted(report.ok) == [str(clean), str(damaged)]
    entries = manifest.load(out)
    assert entries[str(clean)].warnings == [] and entries[str(damaged)].frames == 50
    (warning,) = entries[str(damaged)].warnings
    assert "Error at MB" in warning
    with h5py.File(out / entries[str(damaged)].file, "r") as f:
        assert json.loads(f[entries[str(damaged)].key].attrs["warnings"]) == [warning]
    assert report.warnings == {str(damaged): [warning]} and "2 ok (1 with decode warnings)" in report.summary()
    assert json.loads((out / "report.json").read_text())["warnings"] == {str(damaged): [warning]}
    driver = [r.getMessage() for r in caplog.records if r.name == "quovadis.jobs.preprocess"]
    assert f"{damaged}: {warning}" in driver


def test_fifo_input_fails_at_once_beside_a_good_video(ray_session, tmp_path, small_videos):
    """Opening a FIFO for reading blocks until a writer comes: it must fail, not hang the job."""
    fifo = tmp_path / "stream.mp4"
    os.mkfifo(fifo)
    out = tmp_path / "out"
    began = time.monotonic()
    code = main(["preprocess", str(fifo), str(small_videos[0]), "--out", str(out), "--streams", "rgb", "--short-side", "64"])
    assert code == EXIT_SOME_FAILED
    assert time.monotonic() - began < 60
    report = json.loads((out / "report.json").read_text())
    assert report["ok"] == [str(small_videos[0])]
    assert list(report["failed"]) == [str(fifo)] and "not a regular file" in report["failed"][str(fifo)]


def test_hung_decoder_fails_its_video_after_the_timeout_others_complete(tmp_path, small_videos):
    """An `ffmpeg` first on PATH (the one quovadis then uses, in every Ray worker) that hangs after
    part of a frame when decoding one of the videos: that video fails naming the timeout, the
    others are stored, and the job ends (exit 1) instead of hanging."""
    import imageio_ffmpeg

    hung = tmp_path / "hung.mp4"
    shutil.copy(small_videos[0], hung)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    stand_in = bin_dir / "ffmpeg"
    stand_in.write_text(
        "#!/bin/sh\n"
        'case "$*" in *hung.mp4*rawvideo*) head -c 1000 /dev/zero; exec sleep 1000;; esac\n'
        f'exec {imageio_ffmpeg.get_ffmpeg_exe()} "$@"\n'
    )
    stand_in.chmod(0o755)
    out = tmp_path / "out"
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    began = time.monotonic()
    result = subprocess.run([sys.executable, "-m", "quovadis", "preprocess", str(hung), str(small_videos[1]), "--out", str(out),
                             "--streams", "rgb", "--short-side", "64", "--decode-timeout", "3"],
                            capture_output=True, text=True, timeout=300, env=env)  # fmt: skip
    assert result.returncode == EXIT_SOME_FAILED, result.stderr[-3000:]
    assert time.monotonic() - began < 120
    report = json.loads((out / "report.json").read_text())
    assert report["ok"] == [str(small_videos[1])]
    assert list(report["failed"]) == [str(hung)] and "no progress for 3 s; killed" in report["failed"][str(hung)]
