"""report.FlowTally: the flow actors' work as their rows report it, each call once."""

from __future__ import annotations

import pytest

from quovadis.jobs.report import FlowTally


def _work(actor: str, call: int, pairs: int, s: float, cpu_s: float) -> dict:
    return {"actor": actor, "call": call, "pairs": pairs, "s": s, "cpu_s": cpu_s}


def test_each_call_counts_once_and_first_calls_apart():
    tally = FlowTally()
    tally.add(None)  # a row flow did not touch
    tally.add(_work("n1:10", 0, 31, 20.0, 18.0))
    tally.add(_work("n1:10", 1, 32, 10.0, 9.0))
    tally.add(_work("n1:10", 1, 32, 10.0, 9.0))  # the same call again: another clip of its run, or a redone write
    tally.add(_work("n2:20", 0, 15, 6.0, 5.0))
    tally.add(_work("n2:21", 0, 15, 7.0, 5.5))  # a restarted actor computed it again: its own work
    assert tally.nodes() == {"n1": 1, "n2": 2}
    assert tally.actors["n1:10"] == {"calls": 2, "pairs": 63, "busy_s": 30.0, "cpu_s": 27.0, "first_call_s": 20.0,
                                     "first_call_cpu_s": 18.0, "first_call_pairs": 31}  # fmt: skip
    summary = tally.summary()
    assert (summary["pairs"], summary["busy_s"], summary["cpu_s"]) == (93, 43.0, 37.5)
    assert summary["s_per_pair"] == pytest.approx(43.0 / 93) and summary["cpu_s_per_pair"] == pytest.approx(37.5 / 93)
    assert set(summary["actors"]) == {"n1:10", "n2:20", "n2:21"}


def test_an_actor_seen_only_after_its_first_call_has_none():
    tally = FlowTally()
    tally.add(_work("n1:10", 3, 8, 1.0, 0.9))  # its first call's rows belonged to a failed video, dropped
    assert tally.actors["n1:10"]["first_call_s"] is None and tally.summary()["pairs"] == 8
