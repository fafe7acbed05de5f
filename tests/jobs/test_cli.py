"""The `quovadis` command as users run it: in a fresh interpreter, from a directory of their own."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from quovadis import __version__
from quovadis.jobs import options
from quovadis.jobs.cli import COMMANDS
from tests.conftest import shared_path
from tests.videos import make_video

HEAVY = ("torch", "ray", "cv2", "h5py")

# Runs the CLI like `python -m quovadis`, then prints the names of the imported modules as JSON.
IMPORTS_AFTER_CLI = """
import json, sys
from quovadis.jobs.cli import main
try:
    code = main(sys.argv[1:])
except SystemExit as e:
    code = e.code
print(json.dumps(sorted(sys.modules)))
sys.exit(code)
"""


def _quovadis(*args: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "quovadis", *args], capture_output=True, text=True, timeout=600, **kwargs)


def test_version():
    result = _quovadis("--version")
    assert result.returncode == 0 and result.stdout.strip() == f"quovadis {__version__}"


@pytest.mark.parametrize("args", [["--help"], ["--version"], ["bench", "flow", "--help"], *([name, "--help"] for name in COMMANDS)])
def test_help_imports_no_heavy_module(args):
    """--help of the CLI and of every subcommand needs none of torch, Ray, OpenCV, h5py (together
    seconds to import): the arguments live in jobs/options.py, a job's module is imported to run."""
    result = subprocess.run([sys.executable, "-c", IMPORTS_AFTER_CLI, *args], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    usage, modules = result.stdout.strip().rsplit("\n", 1)
    assert usage.startswith(("usage: quovadis", "quovadis "))
    imported = {m.split(".")[0] for m in json.loads(modules)}
    assert not imported & set(HEAVY), f"{' '.join(args)} imports {sorted(imported & set(HEAVY))}"


def test_options_choices_and_defaults_are_the_engines():
    """jobs/options.py writes the engine's names and defaults as literals (to stay light); they
    must not drift from the engine's own."""
    from quovadis.jobs import extract, train
    from quovadis.models import fast, inflate, weights
    from quovadis.pipeline import decode, features, flow, shards

    assert options.FLOW_BACKENDS == flow.BACKENDS
    assert options.PRECISIONS == tuple(fast.PRECISIONS)
    assert options.FEATURE_FORMATS == features.FORMATS
    assert options.FEATURE_DTYPES == features.FEATURE_DTYPES
    assert options.CROPS == extract.CROPS
    assert options.INFLATE_MODES == inflate.INFLATE_MODES
    assert options.COMPRESSIONS == shards.COMPRESSIONS
    assert options.COMPRESSIONS[0] == shards.ShardConfig().compression
    assert options.DECODE_TIMEOUT_S == decode.DecodeConfig().timeout_s
    assert options.IN_CHANNELS == weights.IN_CHANNELS
    assert options.ARCH_NAMES == tuple(train.ARCH_STREAMS)
    assert options.OPTIMIZERS == train.OPTIMIZERS
    assert options.PRECISE_BN == train.PRECISE_BN


def test_extract_from_a_directory_with_its_own_models_package(tmp_path):
    """A user's project with its own `models/`, `pipeline/`, `jobs/` packages first on PYTHONPATH
    and as the working directory (as Ray workers see it too): quovadis imports only its own."""
    project = tmp_path / "project"
    for name in ("models", "pipeline", "jobs"):
        (project / name).mkdir(parents=True)
        (project / name / "__init__.py").write_text(f"raise ImportError('the user\\'s own {name} package was imported')\n")
    video = make_video(tmp_path / "v.mp4", duration=0.8)
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(project)}
    result = _quovadis("extract", str(video), "--out", str(out), "--streams", "rgb", "--clip-len", "8",
                       "--short-side", "64", "--crop-size", "56", "--batch-size", "4",
                       "--weights-rgb", str(shared_path("i3d", "rgb_random_init.pt")), cwd=project, env=env)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    entries = [json.loads(line) for line in (out / "index.jsonl").read_text().splitlines()]
    assert [e["status"] for e in entries] == ["ok"] and (out / entries[0]["file"]).is_file()
