"""`quovadis bench extract`: the job as the command runs it, with each stage's busy time from Ray's
timeline and the bytes written under OUT."""

from __future__ import annotations

import argparse
import re

from quovadis.jobs import options
from quovadis.jobs.bench.extract import run_bench
from tests.videos import make_video


def test_bench_reports_clips_stages_and_bytes(ray_session, tmp_path, capsys):
    video = make_video(tmp_path / "v.mp4", fps=25, duration=1.2, size=(96, 64))  # 30 frames
    parser = argparse.ArgumentParser()
    options.BENCH_OPTIONS["extract"](parser)
    args = parser.parse_args([str(video), "--clip-len", "16", "--stride", "4", "--short-side", "64", "--crop-size", "56",
                              "--flow-backend", "opencv"])  # fmt: skip
    assert run_bench(args) == 0
    out = capsys.readouterr().out
    assert f"# command: quovadis bench extract {video} --clip-len 16 --stride 4 --short-side 64 --crop-size 56 --flow-backend opencv" in out
    assert "streams rgb,flow, clip 16, stride 4, short side 64" in out
    assert "videos ok 1, failed 0; 30 frames = 1.2 video-s; 5 clips" in out  # starts 0, 4, 8, 12 and 16 looped
    busy = {m[1]: float(m[2]) for m in re.finditer(r"^\| (\w+) \| ([\d.]+) \|", out, re.MULTILINE)}
    assert set(busy) == {"decode", "flow", "i3d", "write"} and min(busy["decode"], busy["flow"], busy["i3d"]) > 0
    m = re.search(r"bytes written under OUT .*: ([\d.]+) MB; peak OUT size: ([\d.]+) MB; feature files at the end: ([\d.]+) MB", out)
    assert m and 0 < float(m[3]) <= float(m[1]) < 1  # features, index and report of one video: no frames
    # flow as the actors timed it: 30 frames have 29 pairs, each computed once for the 5 overlapping clips
    flow = re.search(r"^flow: (\d+) pairs on \d+ actors, ([\d.]+) s busy.*\nflow CPU s \(.*\): ([\d.]+) = ([\d.]+) per pair", out, re.MULTILINE)
    assert flow and int(flow[1]) == 29 and float(flow[2]) > 0 and float(flow[3]) > 0
    assert abs(float(flow[4]) - float(flow[3]) / 29) < 0.003  # both rounded as printed
