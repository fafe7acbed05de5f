"""`quovadis evaluate`: per-stream and fused accuracy of checkpoints trained on the motion dataset."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from quovadis.jobs import evaluate as evaluate_job
from quovadis.jobs.evaluate import EvaluateConfig, evaluate, topk_accuracy
from quovadis.models.weights import load_checkpoint
from quovadis.pipeline.dataset import ShardDataset
from quovadis.pipeline.errors import ConfigError, WeightsError
from tests.synthetic import motion_shards, trained_run


@pytest.fixture(scope="session")
def work(tmp_path_factory, ray_session) -> Path:
    path = tmp_path_factory.getbasetemp() / "motion_work"  # shared with test_train.py
    path.mkdir(exist_ok=True)
    return path


def test_topk_accuracy():
    logits = np.array([[0.1, 0.9, 0.0], [0.8, 0.1, 0.05], [0.2, 0.3, 0.5]])
    labels = np.array([1, 1, 0])
    assert topk_accuracy(logits, labels, 1) == pytest.approx(1 / 3)
    assert topk_accuracy(logits, labels, 2) == pytest.approx(2 / 3)
    assert topk_accuracy(logits, labels, 5) == 1.0  # k beyond the class count: every class


def test_two_stream_fusion(work, tmp_path):
    labels, shards = motion_shards(work)
    flow_run = trained_run(work, "flow_run")
    rgb_run = trained_run(work, "rgb_run", stream="rgb", epochs=1)
    out_json = tmp_path / "acc.json"
    args = argparse.Namespace(data=str(shards), labels=str(labels), rgb=str(rgb_run / "model.pt"),
                              flow=str(flow_run / "model.pt"), split=None, batch_size=8, json=str(out_json))  # fmt: skip
    report = evaluate_job.run(args)
    scores = json.loads(out_json.read_text())
    assert set(scores) == {"rgb", "flow", "fused"}
    for s in scores.values():
        assert 0.0 <= s["top1"] <= s["top5"] <= 1.0 and s["videos"] == 24
    assert report.extra["split"] == "val"  # no test split in the CSV: val is evaluated

    result = evaluate(EvaluateConfig(data=str(shards), labels=str(labels), rgb=args.rgb, flow=args.flow))
    # the flow accuracy is the training run's own last validation (same protocol, same clips)
    final = json.loads((flow_run / "metrics.jsonl").read_text().splitlines()[-1])
    assert scores["flow"]["top1"] == pytest.approx(final["val_top1"])
    # fusion is the sum of the two streams' video logits
    videos = sorted(result["logits"]["flow"])
    rgb = np.array([result["logits"]["rgb"][v] for v in videos])
    flow = np.array([result["logits"]["flow"][v] for v in videos])
    classes = result["classes"]
    y = np.array([classes.index(Path(v).name.split("_")[1]) for v in videos])
    assert len(videos) == 24
    assert scores["fused"]["top1"] == pytest.approx(topk_accuracy(rgb + flow, y, 1))
    assert scores["rgb"]["top1"] == pytest.approx(topk_accuracy(rgb, y, 1))
    # a video's logits are the mean over all its grid clips (centre crop, no flip)
    model, config = load_checkpoint(flow_run / "model.pt")
    clips = ShardDataset(shards, clip_len=config["clip_len"], streams=("flow",), crop="center",
                         crop_size=config["crop_size"], flip=False, temporal="grid", videos=[videos[0]])  # fmt: skip
    assert len(clips) >= 2
    with torch.inference_mode():
        per_clip = model(torch.stack([clips[i]["flow"] for i in range(len(clips))]))  # (clips, classes)
    np.testing.assert_allclose(result["logits"]["flow"][videos[0]], per_clip.mean(0).numpy(), rtol=1e-5, atol=1e-5)

    # the same runs given as RUN_DIRs: the same rows, named by stream, and the fused row of the two
    by_run = evaluate(EvaluateConfig(data=str(shards), labels=str(labels), runs=(str(rgb_run), str(flow_run))))
    assert by_run["rows"] == ["rgb", "flow", "fused"] and by_run["fused"]["of"] == ["rgb", "flow"]
    assert all(by_run[k]["top1"] == result[k]["top1"] for k in by_run["rows"])
    assert by_run["flow"]["test"] == "grid: 16 frames 1 apart, 48 clips"  # 20-frame videos: clips at 0 and 16

    # either checkpoint alone works
    flow_only = evaluate(EvaluateConfig(data=str(shards), labels=str(labels), flow=args.flow))
    assert set(flow_only) & {"rgb", "flow", "fused"} == {"flow"}
    assert flow_only["flow"] == result["flow"]
    # a checkpoint given as the wrong stream, and no checkpoint at all, are refused
    with pytest.raises(ConfigError, match="is a flow checkpoint, given as --rgb"):
        evaluate(EvaluateConfig(data=str(shards), labels=str(labels), rgb=args.flow))
    with pytest.raises(ConfigError, match="at least one checkpoint"):
        EvaluateConfig(data=str(shards), labels=str(labels))
    with pytest.raises(WeightsError, match="does not exist"):
        evaluate(EvaluateConfig(data=str(shards), labels=str(labels), flow=str(tmp_path / "none.pt")))


def test_labels_not_matching_any_video(work):
    labels, shards = motion_shards(work)
    flow_run = trained_run(work, "flow_run")
    bad = labels.with_name("eval_bad_labels.csv")  # beside the videos: relative paths resolve
    bad.write_text("video,label,split\nvideos/val_up_00.mp4,up,val\nelsewhere/clip.mp4,up,val\n")
    with pytest.raises(ConfigError, match=r"1 of 2 labelled videos match no stored video.*'elsewhere/clip.mp4'"):
        evaluate(EvaluateConfig(data=str(shards), labels=str(bad), flow=str(flow_run / "model.pt")))
    unknown = labels.with_name("eval_unknown_labels.csv")
    unknown.write_text("videos/val_up_00.mp4,sideways\n")
    with pytest.raises(ConfigError, match=r"labels \['sideways'\] are not classes of the model"):
        evaluate(EvaluateConfig(data=str(shards), labels=str(unknown), flow=str(flow_run / "model.pt")))


def test_comparison_table_and_bar_chart(tmp_path):
    result = {"rows": ["lstm", "rgb", "fused"],
              "lstm": {"arch": "lstm", "stream": "rgb", "top1": 0.25, "top5": 1.0, "videos": 8},
              "rgb": {"arch": "i3d", "stream": "rgb", "top1": 1.0, "top5": 1.0, "videos": 8},
              "fused": {"arch": "i3d", "stream": "rgb+flow", "top1": 0.5, "top5": 1.0, "videos": 8}}  # fmt: skip
    lines = evaluate_job.format_table(result).splitlines()
    assert lines[1].split() == ["lstm", "lstm", "rgb", "25.00%", "100.00%", "8"] and lines[3].startswith("fused")
    img = cv2.imread(str(evaluate_job.plot_bars(result, tmp_path / "acc.png")))
    assert img.shape == (360, 420, 3)
    top1 = (img[..., 0] > 150) & (img[..., 1] < 120) & (img[..., 2] < 100)  # dark bars (BGR 200, 90, 30)
    heights = [int(top1[:, x0:x0 + 60].any(1).sum()) for x0 in (55 + 15, 55 + 15 + 117, 55 + 15 + 234)]
    assert heights[1] > 3 * heights[0] and heights[1] > heights[2] > heights[0] > 0  # 1.0 > 0.5 > 0.25
