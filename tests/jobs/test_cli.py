"""The `quovadis` command as users run it: in a fresh interpreter, from a directory of their own."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from quovadis import __version__
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


@pytest.mark.parametrize("args", [["--help"], ["--version"], ["show", "--help"]])
def test_help_imports_no_heavy_module(args):
    """--help and --version need none of torch, Ray, OpenCV, h5py (they take seconds to import):
    the parser imports only the chosen subcommand's job module, which imports them where it runs."""
    result = subprocess.run([sys.executable, "-c", IMPORTS_AFTER_CLI, *args], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    usage, modules = result.stdout.strip().rsplit("\n", 1)
    assert usage.startswith(("usage: quovadis", "quovadis "))
    imported = {m.split(".")[0] for m in json.loads(modules)}
    assert not imported & set(HEAVY), f"{' '.join(args)} imports {sorted(imported & set(HEAVY))}"


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
