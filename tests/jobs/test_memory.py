"""Memory is bounded by settings, not by the size of the archive: the driver of a job holds no
frames, so its peak RSS is the same for 20 and for 200 videos."""

from __future__ import annotations

import json
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.conftest import shared_path
from tests.videos import make_video

# Runs `quovadis ARGS` in this process (its own embedded Ray) and prints the exit code and this
# process's peak RSS (VmHWM; Ray's own processes are others).
_DRIVER = """
import json, sys
from quovadis.jobs.cli import main
code = main(sys.argv[1:])
peak = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM:"))
print(json.dumps({"code": code, "peak_kib": peak}))
"""


def _peak_mib(args: list[str], cwd: Path) -> float:
    result = subprocess.run([sys.executable, "-c", _DRIVER, *args], capture_output=True, text=True, timeout=900, cwd=cwd)
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["code"] == 0
    return out["peak_kib"] / 1024


def _peaks_mib(*jobs: list[str], cwd: Path) -> list[float]:
    """`_peak_mib` of each job, the jobs run at once (each driver's RSS is its own)."""
    with ThreadPoolExecutor(len(jobs)) as pool:
        return list(pool.map(lambda args: _peak_mib(args, cwd), jobs))


@pytest.mark.slow
def test_driver_peak_rss_is_flat_from_20_to_200_videos(tmp_path):
    one = make_video(tmp_path / "v.mp4", fps=25, duration=0.24, size=(64, 48))
    many = tmp_path / "videos"
    many.mkdir()
    for i in range(200):  # the same bytes under 200 names: 200 inputs to probe, decode and store
        (many / f"v{i:03d}.mp4").write_bytes(one.read_bytes())
    (tmp_path / "20.txt").write_text("".join(f"{many / f'v{i:03d}.mp4'}\n" for i in range(20)))
    (tmp_path / "200.txt").write_text("".join(f"{many / f'v{i:03d}.mp4'}\n" for i in range(200)))
    common = ["--streams", "rgb", "--short-side", "32"]
    small, large = _peaks_mib(["preprocess", "@20.txt", "--out", str(tmp_path / "out20"), *common],
                              ["preprocess", "@200.txt", "--out", str(tmp_path / "out200"), *common], cwd=tmp_path)  # fmt: skip
    report = json.loads((tmp_path / "out200" / "report.json").read_text())
    assert len(report["ok"]) == 200 and report["frames"] == 200 * 6
    assert large - small < 25, f"preprocess driver peak RSS {small:.0f} MiB for 20 videos, {large:.0f} MiB for 200"

    weights = str(shared_path("i3d", "rgb_random_init.pt"))
    extract = [*common, "--clip-len", "8", "--crop-size", "32", "--batch-size", "16", "--weights-rgb", weights]
    small, large = _peaks_mib(["extract", "@20.txt", "--out", str(tmp_path / "ext20"), *extract],
                              ["extract", "@200.txt", "--out", str(tmp_path / "ext200"), *extract], cwd=tmp_path)  # fmt: skip
    assert len(json.loads((tmp_path / "ext200" / "report.json").read_text())["ok"]) == 200
    assert large - small < 25, f"extract driver peak RSS {small:.0f} MiB for 20 videos, {large:.0f} MiB for 200"
