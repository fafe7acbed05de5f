"""`quovadis bench train` on a tiny clip: model clips/s per precision and the shard loader's rate; with
--arch, clips/s, peak memory and parameters per architecture."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
import torch

from quovadis.jobs import options
from quovadis.jobs.bench.train import run_bench, synthetic_inputs
from quovadis.models.archs import build
from quovadis.pipeline.errors import ConfigError
from tests.synthetic import motion_shards


@pytest.fixture(scope="session")
def work(tmp_path_factory, ray_session) -> Path:
    path = tmp_path_factory.getbasetemp() / "motion_work"  # shared with test_train.py and test_evaluate.py
    path.mkdir(exist_ok=True)
    return path


def test_bench_reports_model_and_loader_throughput(work, capsys):
    _, shards = motion_shards(work)
    parser = argparse.ArgumentParser()
    options.BENCH_OPTIONS["train"](parser)
    args = parser.parse_args(["--stream", "flow", "--clip-len", "8", "--crop-size", "32", "--batch-size", "2",
                              "--steps", "1", "--warmup", "0", "--precisions", "fp32,bf16", "--device", "cpu",
                              "--data", str(shards), "--loader-workers", "0", "--loader-clips", "4"])  # fmt: skip
    result = run_bench(args)
    assert set(result["model"]) == {"fp32", "bf16"} and min(result["model"].values()) > 0
    assert set(result["loader"]) == {0} and result["loader"][0] > 0
    table = capsys.readouterr().out
    assert "model fp32" in table and "model bf16" in table and "loader 0 workers" in table


def _args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    options.BENCH_OPTIONS["train"](parser)
    return parser.parse_args(list(argv))


def test_arch_bench_reports_rate_memory_and_params_per_arch(capsys):
    args = _args("--arch", "c3d,lstm", "--clip-len", "8", "--crop-size", "32", "--batch-size", "2", "--steps", "1",
                 "--warmup", "0", "--precisions", "fp32", "--device", "cpu")  # fmt: skip
    result = run_bench(args)
    rows = result["rows"]
    assert [(r["arch"], r["precision"]) for r in rows] == [("c3d", "fp32"), ("lstm", "fp32")]
    params = {"c3d": build("c3d", num_classes=400, clip_frames=8, crop=32), "lstm": build("lstm", num_classes=400)}
    for r in rows:
        assert "error" not in r, r
        assert r["clips_per_s"] > 0
        assert r["input"] == "rgb 8x32x32" and r["batch"] == 2
        assert r["params_m"] == sum(p.numel() for p in params[r["arch"]].parameters()) / 1e6  # the arch's model
        # weights, gradients and SGD momentum (3 x 4 bytes a parameter) are all resident at the peak
        assert r["peak_mib"] > r["growth_mib"] > 3 * 4 * r["params_m"] * 1e6 / 2**20
    table = capsys.readouterr().out
    assert "| c3d | fp32 | rgb 8x32x32 | 2 |" in table and "| lstm | fp32 | rgb 8x32x32 | 2 |" in table
    assert "# command: quovadis bench train --arch c3d,lstm --clip-len 8 --crop-size 32" in table


def test_arch_bench_input_shapes_follow_each_arch():
    cpu = torch.device("cpu")
    frames = {"two-stream": 1, "fused-3d": 5, "i3d": 64, "i3d-r50": 64}
    shapes = {a: [tuple(x.shape) for x in synthetic_inputs(a, batch_size=1, frames=n, crop=8, device=cpu)]
              for a, n in frames.items()}  # fmt: skip
    assert shapes == {"two-stream": [(1, 3, 8, 8), (1, 2, 10, 8, 8)], "fused-3d": [(1, 3, 5, 8, 8), (1, 2, 50, 8, 8)],
                      "i3d": [(1, 3, 64, 8, 8), (1, 2, 64, 8, 8)], "i3d-r50": [(1, 3, 64, 8, 8)]}  # fmt: skip


def test_arch_bench_rejects_unknown_arch():
    with pytest.raises(ConfigError, match="--arch"):
        run_bench(_args("--arch", "c3d,resnet", "--device", "cpu"))
