"""`quovadis bench preprocess`: the job as the command runs it, each stage's busy time from Ray's
timeline and flow's cost per pair from the actors."""

from __future__ import annotations

import argparse
import re

from quovadis.jobs import options
from quovadis.jobs.bench.preprocess import run_bench
from tests.videos import make_video


def test_bench_reports_stages_and_flow_per_pair(ray_session, tmp_path, capsys):
    video = make_video(tmp_path / "v.mp4", fps=25, duration=1.6, size=(96, 64))  # 40 frames: 39 flow pairs
    parser = argparse.ArgumentParser()
    options.BENCH_OPTIONS["preprocess"](parser)
    args = parser.parse_args([str(video), "--short-side", "64", "--flow-backend", "opencv"])
    assert run_bench(args) == 0
    out = capsys.readouterr().out
    assert "videos ok 1, failed 0; 40 frames = 1.6 video-s" in out
    assert f"# command: quovadis bench preprocess {video} --short-side 64 --flow-backend opencv" in out
    busy = {m[1]: float(m[2]) for m in re.finditer(r"^\| (\w+) \| ([\d.]+) \|", out, re.MULTILINE)}
    assert set(busy) == {"decode", "flow", "write"} and busy["decode"] > 0 and busy["flow"] > 0
    m = re.search(r"^flow: 39 pairs on (\d+) actors, ([\d.]+) s busy = ([\d.]+) s per pair", out, re.MULTILINE)
    assert m and int(m[1]) >= 1
    assert abs(float(m[3]) - float(m[2]) / 39) < 0.003  # both rounded as printed
    cpu = re.search(r"^flow CPU s \(.*\): ([\d.]+) = ([\d.]+) per pair; (the other calls [\d.]+ per pair|no other calls)$", out, re.MULTILINE)
    assert cpu and float(cpu[1]) > 0 and abs(float(cpu[2]) - float(cpu[1]) / 39) < 0.003
