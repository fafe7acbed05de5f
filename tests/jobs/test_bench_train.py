"""`quovadis bench train` on a tiny clip: model clips/s per precision and the shard loader's rate."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from quovadis.jobs.bench_train import add_arguments, run_bench
from tests.synthetic import motion_shards


@pytest.fixture(scope="session")
def work(tmp_path_factory, ray_session) -> Path:
    path = tmp_path_factory.getbasetemp() / "motion_work"  # shared with test_train.py and test_evaluate.py
    path.mkdir(exist_ok=True)
    return path


def test_bench_reports_model_and_loader_throughput(work, capsys):
    _, shards = motion_shards(work)
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--stream", "flow", "--clip-len", "8", "--crop-size", "32", "--batch-size", "2",
                              "--steps", "1", "--warmup", "0", "--precisions", "fp32,bf16", "--device", "cpu",
                              "--data", str(shards), "--loader-workers", "0", "--loader-clips", "4"])  # fmt: skip
    result = run_bench(args)
    assert set(result["model"]) == {"fp32", "bf16"} and min(result["model"].values()) > 0
    assert set(result["loader"]) == {0} and result["loader"][0] > 0
    table = capsys.readouterr().out
    assert "model fp32" in table and "model bf16" in table and "loader 0 workers" in table
