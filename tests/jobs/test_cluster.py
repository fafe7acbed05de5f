"""`preprocess` and `extract` on a 3-node Ray cluster (`ray.cluster_utils.Cluster`: each node its
own raylet and resources, here on one machine): the work spreads over the nodes and the output is
a one-node run's."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from quovadis.jobs.cli import main
from quovadis.pipeline import features
from tests.conftest import shared_path
from tests.jobs.test_preprocess import _read_all
from tests.videos import make_video

# Starts a cluster of three 1-CPU nodes, joins it as `--address` does, runs the CLI command lines
# of argv[1] (JSON) with its --address (which checks that every node writes the same OUT) one
# after the other and prints their exit codes.
_DRIVER = """
import json, sys
import ray
from ray.cluster_utils import Cluster
from quovadis.jobs.cli import main
from quovadis.jobs.runtime import init_ray

cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
for _ in range(2):
    cluster.add_node(num_cpus=1)
cluster.wait_for_nodes()
try:
    init_ray(cluster.address)
    assert len([n for n in ray.nodes() if n["Alive"]]) == 3
    print(json.dumps([main([*argv, "--address", cluster.address]) for argv in json.loads(sys.argv[1])]))
finally:
    ray.shutdown()
    cluster.shutdown()
"""


def _features(out: Path) -> dict[str, features.VideoFeatures]:
    return {e.input: features.read_video(out, e) for e in features.load_index(out).values() if e.status == "ok"}


@pytest.mark.slow
def test_preprocess_and_extract_on_three_nodes_equal_one_node(ray_session, tmp_path):
    weights = shared_path("i3d")
    videos = [
        str(make_video(tmp_path / "a.mp4", fps=30, duration=0.6)),
        str(make_video(tmp_path / "b.mkv", fps=25, duration=0.7, size=(98, 70), audio=True)),
        str(make_video(tmp_path / "c.avi", fps=12, duration=0.6, size=(97, 71), codec="mpeg4")),
        str(make_video(tmp_path / "d.webm", fps=24, duration=0.5, codec="libvpx")),
    ]
    # OpenCV's TV-L1: no torch.compile in each of the six new flow actors (the torch path is the
    # same job code; its numbers are tested in tests/pipeline/test_flow.py)
    # segments of 5 frames: 3-4 decode tasks per video queued at once, so the work outgrows one node
    # (4 single-segment videos, each decoded in a blink, all went to one node's worker in one CI run:
    # Ray reuses a finished task's worker for the next)
    small = ["--streams", "rgb,flow", "--short-side", "48", "--flow-backend", "opencv", "--segment-seconds", "0.2"]
    pre = ["preprocess", *videos, *small]
    ext = ["extract", *videos, *small, "--clip-len", "8", "--crop-size", "40",
           "--weights-rgb", str(weights / "rgb_random_init.pt"), "--weights-flow", str(weights / "flow_random_init.pt")]  # fmt: skip
    runs = [[*pre, "--out", str(tmp_path / "cluster-pre")], [*ext, "--out", str(tmp_path / "cluster-ext")]]
    result = subprocess.run([sys.executable, "-c", _DRIVER, json.dumps(runs)], capture_output=True, text=True,
                            timeout=900, cwd=tmp_path)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads(result.stdout.strip().splitlines()[-1]) == [0, 0]
    assert main([*pre, "--out", str(tmp_path / "one-pre")]) == 0  # the session's one-node Ray
    assert main([*ext, "--out", str(tmp_path / "one-ext")]) == 0

    # decode tasks and flow work ran on more than one node: each job's flow pool places its actors
    # on every node, and counts the nodes of the actors that computed flow
    for job in ("pre", "ext"):
        nodes = json.loads((tmp_path / f"cluster-{job}" / "report.json").read_text())["extra"]["nodes"]
        assert len(nodes["decode_segments"]) >= 2 and len(nodes["flow_actors"]) in (2, 3), nodes
    got, want = _read_all(tmp_path / "cluster-pre"), _read_all(tmp_path / "one-pre")
    assert set(got) == set(want) == set(videos)
    # preprocess's frames were written by its sink tasks (on whichever nodes Ray ran them): one
    # chunk per segment (of 5 frames, the last up to 3 more: fewer than a chunk's 32), counted by
    # the decode tasks that ended them; several segments per video
    nodes = json.loads((tmp_path / "cluster-pre" / "report.json").read_text())["extra"]["nodes"]
    segments = sum(nodes["decode_segments"].values())
    assert sum(nodes["chunks_written"].values()) == segments > 2 * len(videos), nodes
    for v in videos:
        np.testing.assert_array_equal(got[v]["rgb"], want[v]["rgb"])
        np.testing.assert_array_equal(got[v]["flow"], want[v]["flow"])
    got_f, want_f = _features(tmp_path / "cluster-ext"), _features(tmp_path / "one-ext")
    assert set(got_f) == set(want_f) == set(videos)
    for v in videos:
        np.testing.assert_array_equal(got_f[v].clip_start_frame, want_f[v].clip_start_frame)
        for stream in ("rgb", "flow"):
            np.testing.assert_allclose(got_f[v].features[stream], want_f[v].features[stream], rtol=0, atol=1e-4)
