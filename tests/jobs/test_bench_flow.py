"""`quovadis bench flow`: the pairs it times (a video's first, or all of them) and its table."""

from __future__ import annotations

import argparse
import re

from quovadis.jobs import options
from quovadis.jobs.bench.flow import run_bench
from tests.videos import make_video


def _table(capsys, *argv: str) -> tuple[str, dict[str, list[str]]]:
    parser = argparse.ArgumentParser()
    options.BENCH_OPTIONS["flow"](parser)
    assert run_bench(parser.parse_args(list(argv))) == 0
    out = capsys.readouterr().out
    return out, {m[1]: m[2].split() for m in re.finditer(r"^(opencv DualTVL1|ours eager)\s+(.*)$", out, re.MULTILINE)}


def test_bench_flow_times_the_first_pairs_or_every_pair(tmp_path, capsys):
    video = make_video(tmp_path / "v.mp4", fps=25, duration=1.0, size=(96, 64))  # 25 frames
    out, rows = _table(capsys, "--video", str(video), "--sizes", "48x64", "--pairs", "3", "--methods", "opencv,eager")
    assert out.startswith(f"quovadis bench flow --video {video} --sizes 48x64 --pairs 3 --methods opencv,eager ")
    assert rows["opencv DualTVL1"][:3] == ["cpu", "48x64", "3"] and rows["ours eager"][:3] == ["cpu", "48x64", "3"]
    assert 0 <= float(rows["ours eager"][7]) < 0.5  # mean distance to OpenCV's fields, pixels
    _, rows = _table(capsys, "--video", str(video), "--sizes", "48x64", "--pairs", "0", "--methods", "opencv")
    assert rows["opencv DualTVL1"][:3] == ["cpu", "48x64", "24"]
