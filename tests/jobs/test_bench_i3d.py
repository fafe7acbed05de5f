"""`quovadis bench i3d` on a tiny clip: it runs the baseline and a fast variant and reports both."""

from __future__ import annotations

import argparse

from quovadis.jobs import options
from quovadis.jobs.bench.i3d import BASELINE, run_bench


def test_bench_reports_speed_memory_and_feature_difference(capsys):
    parser = argparse.ArgumentParser()
    options.BENCH_OPTIONS["i3d"](parser)
    args = parser.parse_args(["--batch-sizes", "1", "--frames", "9", "--size", "32", "--device", "cpu",
                              "--variants", "bf16-cl-fold", "--iters", "1", "--warmup", "0"])
    assert run_bench(args) == 0
    rows = {line.split()[0]: line.split() for line in capsys.readouterr().out.splitlines()[2:]}
    assert set(rows) == {BASELINE, "bf16-cl-fold"}
    variant, batch, clips_s, ms, peak, speedup, scale, max_diff, min_cos = rows["bf16-cl-fold"]
    assert batch == "1" and float(clips_s) > 0 and float(peak) > 100  # MiB of a process holding torch
    assert float(rows[BASELINE][5]) == 1.0 and float(rows[BASELINE][7]) == 0.0
    assert 0 < float(max_diff) < 0.05 * float(scale) and 0.99 < float(min_cos) <= 1.0  # bf16: close, not equal
