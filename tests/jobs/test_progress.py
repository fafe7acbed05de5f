"""The progress bar as a person watches it, in a terminal (a pseudo-terminal here): one bar per job
counting video-seconds against the probed total, log lines printed above it, never through it."""

from __future__ import annotations

import fcntl
import json
import os
import pty
import re
import struct
import subprocess
import sys
import termios
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from tests.conftest import shared_path
from tests.videos import make_video

LOG_LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} (INFO|WARNING|ERROR) ")


def _in_terminal(args: list[str], cwd: Path, command: tuple[str, ...] = ("-m", "quovadis")) -> list[str]:
    """Run `quovadis ARGS` (or python COMMAND ARGS) with stdout and stderr on a 120-column
    pseudo-terminal; the screen updates it wrote, split where the terminal would start over (\\r or \\n)."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
    proc = subprocess.Popen([sys.executable, *command, *args], stdout=slave, stderr=slave,
                            stdin=subprocess.DEVNULL, cwd=cwd)  # fmt: skip
    os.close(slave)
    out = b""
    while True:
        try:
            chunk = os.read(master, 65536)
        except OSError:  # the child closed the terminal
            break
        if not chunk:
            break
        out += chunk
    os.close(master)
    assert proc.wait(timeout=600) in (0, 1), out.decode(errors="replace")[-3000:]
    text = out.decode(errors="replace").replace("\x1b[0m", "").replace("\x1b[A", "")
    return [part.strip() for part in re.split(r"[\r\n]", text) if part.strip()]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("progress")
    make_video(d / "a.mp4", duration=2.0)
    make_video(d / "b.mkv", fps=30, duration=3.0, audio=True)
    (d / "bad.mp4").write_bytes(b"not a video")
    return d


def _bar(job: str) -> re.Pattern:
    return re.compile(rf"{job}: +\d+%\|[^|]*\| \d+/\d+ video-s \[[^\]]*\]")


def _check_bar(parts: list[str], job: str, seconds: float) -> None:
    bars = [p for p in parts if "video-s [" in p and not LOG_LINE.match(p)]
    assert bars and all(p.startswith(f"{job}:") for p in bars), bars  # one bar, the job's own
    assert all(_bar(job).fullmatch(p) for p in bars), bars  # nothing written into it
    ray_lines = [p for p in parts if "core_worker.cc" in p]  # Ray's C++ log, e.g. on pool actors with restarts
    assert all(p.startswith("[") for p in ray_lines), ray_lines  # above the bar, whole
    last = re.search(r"(\d+)/(\d+) video-s", bars[-1])
    assert last and int(last[1]) == int(last[2]) == round(seconds), bars[-1]  # done = the probed total
    assert "failed=1" in bars[-1]
    warnings = [p for p in parts if "WARNING" in p and "bad.mp4" in p]
    assert warnings and all(LOG_LINE.match(p) for p in warnings), warnings  # above the bar, whole


def test_preprocess_shows_one_bar_of_video_seconds(inputs, tmp_path):
    parts = _in_terminal(["preprocess", "a.mp4", "b.mkv", "bad.mp4", "--out", str(tmp_path / "out"),
                          "--streams", "rgb", "--short-side", "64"], inputs)  # fmt: skip
    _check_bar(parts, "preprocess", 5.0)
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["video_seconds"] == pytest.approx(5.0, abs=0.05)  # 50 + 75 frames at 25 fps
    assert report["video_seconds_per_second"] == pytest.approx(report["video_seconds"] / report["seconds"])


def test_extract_shows_one_bar_not_one_per_stage(inputs, tmp_path):
    weights = str(shared_path("i3d", "rgb_random_init.pt"))
    parts = _in_terminal(["extract", "a.mp4", "b.mkv", "bad.mp4", "--out", str(tmp_path / "out"), "--streams", "rgb",
                          "--clip-len", "8", "--short-side", "64", "--crop-size", "56", "--weights-rgb", weights], inputs)  # fmt: skip
    _check_bar(parts, "extract", 5.0)
    summary = next(p for p in parts if "extract: 2 ok" in p)
    assert "5.0 video-s" in summary and "video-s per s" in summary


_RAW_WRITER = """
import os, time
from quovadis.jobs.progress import Progress
with Progress("demo") as progress:
    progress.expect("a.mp4", 4.0)
    progress.advance("a.mp4", 1.0)
    os.write(2, b"written to descriptor 2 by C code\\n")  # as Ray's core worker logs, past Python
    time.sleep(2.2)  # nothing done meanwhile: the bar's clock still moves
    progress.advance("a.mp4", 1.0)
    progress.done("a.mp4")
os.write(2, b"after the bar\\n")
"""


def test_writes_to_descriptor_2_print_above_the_bar_whole(tmp_path):
    parts = _in_terminal([_RAW_WRITER], tmp_path, command=("-c",))
    assert "written to descriptor 2 by C code" in parts and parts[-1] == "after the bar"
    bars = [p for p in parts if "video-s [" in p]
    assert bars and all(_bar("demo").fullmatch(p) for p in bars), bars
    assert re.search(r" 4/4 video-s", bars[-1])
    clock = {re.search(r"\[(\d\d:\d\d)<", p)[1] for p in bars if " 1/4 video-s" in p}
    assert {"00:01", "00:02"} <= clock, bars


def test_totals_from_a_thread_never_count_a_finished_input_again(caplog):
    from quovadis.jobs.progress import Progress

    def probed():
        yield "a.mp4", 2.0  # probed after it was done: ignored
        yield "b.mp4", 3.0
        raise RuntimeError("the cluster went away")

    with Progress("extract", disable=False) as progress:
        bar = progress._bar
        progress.expect("a.mp4", 2.0)
        progress.done("a.mp4", 2.5)
        progress.expect_from(probed())
        progress._expecting[0].join(10)
        assert (bar.n, bar.total) == (2.5, 5.5)
        progress.advance("b.mp4", 1.0)
        assert bar.n == 3.5
    assert any("the cluster went away" in r.getMessage() for r in caplog.records)


def test_parts_of_a_video_move_the_bar_up_to_what_was_expected():
    from quovadis.jobs.progress import Progress

    with Progress("extract", disable=False) as progress:
        bar = progress._bar
        progress.advance("a.mp4", 1.0)  # not expected yet: nothing to count it against
        assert (bar.n, bar.total) == (0, 0)
        progress.expect("a.mp4", 4.0)
        progress.expect("b.mp4", 2.0)
        progress.advance("a.mp4", 2.56)
        assert (bar.n, bar.total) == (2.56, 6.0)
        progress.advance("a.mp4", 2.56)  # the last clip runs past the end
        assert bar.n == 4.0
        progress.done("a.mp4", 3.8)  # the real length replaces the probed one
        assert (bar.n, bar.total) == (3.8, 5.8)
        progress.advance("b.mp4", 0.5)
        progress.done("b.mp4", failed=True)
        assert (bar.n, bar.total) == (5.8, 5.8)


def test_probed_durations_come_from_the_drivers_own_probes(tmp_path, monkeypatch):
    from quovadis.jobs import progress as progress_module

    videos = {  # name: (seconds, make_video arguments)
        "one.mp4": (1.0, {"fps": 25}),
        "two s.mkv": (2.0, {"fps": 30, "audio": True}),
        "three.avi": (3.0, {"fps": 12, "codec": "mpeg4", "size": (97, 71)}),
        "half.webm": (0.5, {"fps": 24, "codec": "libvpx"}),
    }
    for name, (seconds, kwargs) in videos.items():
        make_video(tmp_path / name, duration=seconds, **kwargs)
    (tmp_path / "noise.mp4").write_bytes(os.urandom(4000))
    paths = [str(tmp_path / n) for n in videos] + [str(tmp_path / "noise.mp4"), str(tmp_path / "missing.mp4")]
    probed_in, real_probe = set(), progress_module.probe

    def spy(path):
        probed_in.add(threading.current_thread().name)
        return real_probe(path)

    monkeypatch.setattr(progress_module, "probe", spy)
    got = dict(progress_module.probed_durations(paths, threads=2))
    assert set(got) == {str(tmp_path / n) for n in videos}  # the bad files yield nothing
    for name, (seconds, _) in videos.items():
        assert got[str(tmp_path / name)] == pytest.approx(seconds, abs=0.1), name
    assert probed_in == {"progress-probe"}  # this process's threads, not Ray tasks


def test_closing_probed_durations_stops_the_probing(monkeypatch):
    from quovadis.jobs import progress as progress_module

    calls = []

    def slow_probe(path):
        calls.append(path)
        time.sleep(0.05)
        return SimpleNamespace(duration=1.0)  # what probed_durations reads of a VideoInfo

    monkeypatch.setattr(progress_module, "probe", slow_probe)
    durations = progress_module.probed_durations([f"v{i}.mp4" for i in range(100)], threads=2)
    assert next(durations)[1] == 1.0
    durations.close()  # the job is over: the probes under way end, no other starts
    time.sleep(0.3)
    assert len(calls) <= 4, len(calls)
    assert not any(t.name == "progress-probe" for t in threading.enumerate())
