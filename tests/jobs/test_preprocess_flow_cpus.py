"""Flow on a CPU-only machine uses every core: one single-threaded flow actor per core, less decode's share."""

from __future__ import annotations

import numpy as np
import pytest
import ray

from quovadis.jobs.preprocess import PreprocessConfig, preprocess
from quovadis.jobs import graph, resources
from quovadis.jobs.resources import cpu_flow_actors
from quovadis.pipeline.decode import DecodeConfig
from quovadis.pipeline.flow import FlowConfig
from tests.jobs.test_preprocess import _read_all
from tests.videos import make_video


@pytest.mark.parametrize(
    ("cpus", "actors", "share"),
    [(1, 1, 0.0), (2, 2, 0.5), (4, 4, 0.75), (16, 15, 1.0), (20, 18, 1.0), (64, 58, 1.0)],
)
def test_cpu_flow_actors_per_cpu_count(cpus, actors, share):
    assert cpu_flow_actors(cpus) == (actors, pytest.approx(share))


@pytest.mark.parametrize("cpus", range(1, 129))
def test_cpu_flow_actors_always_leave_a_cpu_for_decode(cpus):
    actors, share = cpu_flow_actors(cpus)
    assert actors * share <= cpus - 1 + 1e-9
    assert actors >= (2 if cpus >= 2 else 1)


def test_cpu_flow_actor_options_pin_each_nodes_actors_to_it(monkeypatch):
    """Actors per node from its own CPUs, each pinned hard to its node (a dead node and one with no
    CPU get none); extract's pool hands them out one per new actor, from the first again after the last."""
    a, b, c, d = ("%056x" % i for i in range(1, 5))  # node ids: 28 bytes in hex
    nodes = [{"NodeID": a, "Alive": True, "Resources": {"CPU": 1.0}},
             {"NodeID": b, "Alive": True, "Resources": {"CPU": 16.0, "GPU": 1.0}},
             {"NodeID": c, "Alive": False, "Resources": {"CPU": 4.0}},
             {"NodeID": d, "Alive": True, "Resources": {"GPU": 1.0}}]  # fmt: skip
    monkeypatch.setattr(ray, "nodes", lambda: nodes)
    options = resources.cpu_flow_actor_options()
    placed = [(o["scheduling_strategy"].node_id, o["scheduling_strategy"].soft, o["num_cpus"]) for o in options]
    assert placed == [(a, False, 0.0)] + [(b, False, 1.0)] * 15

    in_turn = graph._InTurn(options[:2])
    first, second, third = in_turn(), in_turn(), in_turn()
    assert (first["num_cpus"], second["num_cpus"], third["num_cpus"]) == (0.0, 1.0, 0.0)
    first["num_cpus"] = 5  # each actor gets its own copy
    assert in_turn()["num_cpus"] == 1.0 and options[0]["num_cpus"] == 0.0


def test_flow_spreads_over_actors_and_equals_one_actor(ray_session, tmp_path, monkeypatch):
    cpus = int(ray.cluster_resources()["CPU"])
    assert cpus >= 2  # the session Ray of tests/conftest.py
    videos = [
        str(make_video(tmp_path / "a.mp4", fps=25, duration=1.6)),  # 40 frames: two chunks of 32 and 8
        str(make_video(tmp_path / "b.mkv", fps=30, duration=1.0)),
    ]
    cfg = dict(streams=("rgb", "flow"), decode=DecodeConfig(short_side=64, chunk_frames=16),
               flow=FlowConfig(device="cpu"))  # fmt: skip
    many = preprocess(videos, PreprocessConfig(out=str(tmp_path / "many"), **cfg))
    # the flow actors (node:pid) that computed a chunk: all of them, with 5 chunks for 2 actors
    assert sum(many.extra["nodes"]["flow_actors"].values()) == cpu_flow_actors(cpus)[0] > 1
    # report.json's flow work: 39 + 24 pairs in chunks of 15, 16, 8 (a) and 15, 9 (b), timed in the actors
    flow = many.extra["flow"]
    assert flow["pairs"] == 63 and sum(a["pairs"] for a in flow["actors"].values()) == 63
    assert sum(a["calls"] for a in flow["actors"].values()) == 5
    for actor in flow["actors"].values():
        assert actor["first_call_pairs"] in (15, 16, 8, 9) and 0 < actor["first_call_s"] <= actor["busy_s"]
        assert 0 < actor["first_call_cpu_s"] <= actor["cpu_s"]
        # one torch thread per actor: its process's CPU seconds stay under the wall, bar Ray's own threads
        assert actor["cpu_s"] <= 1.2 * actor["busy_s"] + 0.2
    assert flow["busy_s"] == pytest.approx(sum(a["busy_s"] for a in flow["actors"].values()))
    assert flow["cpu_s"] == pytest.approx(sum(a["cpu_s"] for a in flow["actors"].values()))
    assert flow["cpu_s_per_pair"] == pytest.approx(flow["cpu_s"] / 63)

    monkeypatch.setattr(resources, "cpu_flow_actors", lambda cpus: (1, 0.5))  # the old single actor
    one = preprocess(videos, PreprocessConfig(out=str(tmp_path / "one"), **cfg))
    (actor,) = one.extra["flow"]["actors"].values()
    assert (actor["calls"], actor["pairs"]) == (5, 63)
    assert sorted(many.ok) == sorted(one.ok) == sorted(videos)
    got, want = _read_all(tmp_path / "many"), _read_all(tmp_path / "one")
    for v in videos:
        np.testing.assert_array_equal(got[v]["rgb"], want[v]["rgb"])
        np.testing.assert_array_equal(got[v]["flow"], want[v]["flow"])
