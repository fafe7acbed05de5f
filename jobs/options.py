"""The command line of every job: argument definitions only.

Kept apart from the jobs so that `quovadis COMMAND --help` imports no torch, Ray, OpenCV or h5py
(it answers in a fraction of a second); a job's module is imported only when it runs. The choices
and defaults that the engine also defines (flow backends, precisions, compressions, ...) are
written here as literals, and tests/jobs/test_cli.py checks that they equal the engine's.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from quovadis.jobs.bench import BENCHMARKS
from quovadis.pipeline import conventions

SHARED = Path(__file__).resolve().parents[2] / "shared"  # ../shared beside a checkout: the benchmarks' inputs

DECODE_TIMEOUT_S = 300.0  # pipeline.decode.DecodeConfig().timeout_s
COMPRESSIONS = ("none", "lzf", "gzip1", "gzip4", "gzip9")  # pipeline.shards.COMPRESSIONS; the first is the default
STREAMS = ("rgb", "flow")
IN_CHANNELS = {"rgb": 3, "flow": 2}  # models.weights.IN_CHANNELS
FLOW_BACKENDS = ("torch", "opencv")  # pipeline.flow.BACKENDS
PRECISIONS = ("fp32", "bf16", "fp16")  # models.fast.PRECISIONS
FEATURE_FORMATS = ("hdf5", "npy")  # pipeline.features.FORMATS
FEATURE_DTYPES = ("float32", "float16")  # pipeline.features.FEATURE_DTYPES
CROPS = ("center", "full")  # jobs.extract.CROPS
INFLATE_MODES = ("mean", "center")  # models.inflate.INFLATE_MODES
ARCH_NAMES = ("i3d", "i3d-r50", "lstm", "c3d", "two-stream", "fused-3d")  # jobs.train.ARCH_STREAMS
OPTIMIZERS = ("sgd", "adam")  # jobs.train.OPTIMIZERS
PRECISE_BN = ("auto", "on", "off")  # jobs.train.PRECISE_BN


class RenamedOption(argparse.Action):
    """An option that now has another name: using it is a usage error (exit 2) naming the new one,
    so an old command line fails loudly instead of meaning something else."""

    def __init__(self, option_strings: list[str], dest: str, *, new: str, **kwargs: Any) -> None:
        super().__init__(option_strings, dest, nargs="?", help=argparse.SUPPRESS, **kwargs)
        self.new = new

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:  # fmt: skip
        parser.error(f"{option_string} is now {self.new} (train and evaluate's --labels is labels.csv)")


def _decode_timeout(p: argparse.ArgumentParser) -> None:
    p.add_argument("--decode-timeout", type=float, default=DECODE_TIMEOUT_S, metavar="SECONDS",
                   help="kill a decode whose ffmpeg writes nothing for this many seconds and fail its video; 0 = never (default 300)")  # fmt: skip


def _run_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--retry-failed", action="store_true", help="retry inputs a previous run recorded as failed")
    p.add_argument("--address", default=None, help="address of an existing Ray cluster (default: embedded local Ray)")


def preprocess(p: argparse.ArgumentParser) -> None:
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="video files, directories (recursive) or @list.txt")
    p.add_argument("--out", required=True, help="output directory for shards, manifest.jsonl and report.json")
    p.add_argument("--streams", default="rgb,flow", help="rgb or rgb,flow (default rgb,flow)")
    p.add_argument("--fps", type=float, default=conventions.FPS, help="output frame rate (default 25)")
    p.add_argument("--short-side", type=int, default=conventions.SHORT_SIDE, help="resize shorter side to this; 0 keeps the size")
    p.add_argument("--shard-size", default="1G", help="target shard file size, e.g. 512M, 2G (default 1G)")
    p.add_argument("--compression", choices=COMPRESSIONS, default=COMPRESSIONS[0],
                   help="shard compression (default none: fastest to write and read; lzf saves ~1/3 of the disk)")
    p.add_argument("--segment-seconds", type=float, default=60.0, help="long videos are split into segments of this length, decoded by different workers")
    _decode_timeout(p)
    p.add_argument("--flow-backend", choices=FLOW_BACKENDS, default="torch", help="TV-L1 implementation (default torch)")
    p.add_argument("--flow-device", default=None, help="force the flow device, e.g. cpu or cuda:0 (default: a GPU when present)")
    p.add_argument("--flow-dtype", choices=("uint8", "float16"), default="uint8", help="store flow quantised (default) or as float16 pixels")
    _run_options(p)


def extract(p: argparse.ArgumentParser) -> None:
    p.add_argument("inputs", nargs="+", metavar="INPUT",
                   help="video files, directories (recursive), @list.txt, or shard directories written by preprocess")  # fmt: skip
    p.add_argument("--out", required=True, help="output directory: features, index.jsonl, report.json, shards/")
    p.add_argument("--streams", default="rgb,flow", help="rgb, flow or rgb,flow (default rgb,flow); without flow, no flow is computed or loaded")
    p.add_argument("--clip-len", type=int, default=conventions.CLIP_LEN, help="frames per clip (default 64)")
    p.add_argument("--stride", type=int, default=None, help="frames between clip starts, any value (default: --clip-len)")
    p.add_argument("--fps", type=float, default=conventions.FPS, help="frame rate clips are cut at (default 25)")
    p.add_argument("--short-side", type=int, default=conventions.SHORT_SIDE, help="resize the shorter side to this before cropping (default 256)")
    p.add_argument("--crop", choices=CROPS, default="center", help="center crop of --crop-size, or the full frame spatially pooled")
    p.add_argument("--crop-size", type=int, default=conventions.CROP_SIZE, help="side of the center crop (default 224)")
    p.add_argument("--weights-rgb", default=None, help="rgb I3D weights file (pytorch-i3d layout, e.g. rgb_imagenet.pt)")
    p.add_argument("--weights-flow", default=None, help="flow I3D weights file (e.g. flow_imagenet.pt)")
    p.add_argument("--weights-dir", default=None, help="directory holding rgb_imagenet.pt / flow_imagenet.pt")
    p.add_argument("--precision", choices=PRECISIONS, default="fp32", help="autocast precision of I3D (default fp32)")
    p.add_argument("--batch-size", type=int, default=8, help="clips per I3D call, across videos (default 8)")
    p.add_argument("--format", choices=FEATURE_FORMATS, default="hdf5", help="hdf5 (default) or npy (video_features style)")
    p.add_argument("--feature-dtype", choices=FEATURE_DTYPES, default="float32", help="stored feature dtype")
    p.add_argument("--logits", action="store_true", help="also store per-clip class scores (logits)")
    p.add_argument("--class-names", default=None, help="class names, one per line (e.g. label_map.txt); logs each video's top-5")
    p.add_argument("--labels", action=RenamedOption, new="--class-names")
    p.add_argument("--shard-size", default="256M", help="shard file size with --keep-shards (default 256M)")
    p.add_argument("--segment-seconds", type=float, default=60.0, help="long videos are decoded in segments of this length by different workers")
    _decode_timeout(p)
    p.add_argument("--flow-backend", choices=FLOW_BACKENDS, default="torch", help="TV-L1 implementation (default torch)")
    p.add_argument("--flow-device", default=None, help="force the flow device, e.g. cpu or cuda:0")
    p.add_argument("--keep-shards", action="store_true", help="also store the decoded frames (and flow) as shards in OUT/shards, as preprocess does; without it no frame is written to disk")
    _run_options(p)


def inflate(p: argparse.ArgumentParser) -> None:
    p.add_argument("source", type=Path, help="2D GoogLeNet-BN or ResNet-50 state dict (torchvision layout, .pt/.pth)")
    p.add_argument("--net", choices=("googlenet", "resnet50"), default="googlenet",
                   help="googlenet -> I3D (pytorch-i3d layout); resnet50 -> I3D-ResNet-50")
    p.add_argument("--out", type=Path, required=True, help="where to write the I3D state dict")
    p.add_argument("--mode", "--inflate-init", dest="mode", choices=INFLATE_MODES, default="mean",
                   help="mean: filter repeated over time and divided by t (the paper); center: all in the middle slice")
    p.add_argument("--in-channels", type=int, default=3,
                   help="3 for RGB; 2 for flow (first layer averaged over RGB, TSN-style); googlenet only")
    p.add_argument("--force", action="store_true", help="overwrite --out if it exists")


def train(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", required=True, help="shard directory (quovadis preprocess --out)")
    p.add_argument("--labels", required=True, help="labels.csv: video,label[,split]")
    p.add_argument("--arch", default="i3d", choices=ARCH_NAMES,
                   help="the paper's architecture to train (default i3d); i3d-r50 is the inflated ResNet-50")
    p.add_argument("--stream", default=None, choices=("rgb", "flow", "rgb+flow"),
                   help="i3d: which stream to train (required); lstm, c3d, i3d-r50: rgb; two-stream, fused-3d: rgb+flow "
                        "(the default for those)")  # fmt: skip
    p.add_argument("--init", default="scratch",
                   help="scratch | PATH (I3D weights, or a checkpoint of the same --arch) | inflate:FILE (i3d: a GoogLeNet-BN; "
                        "i3d-r50: quovadis inflate --net resnet50 output) | imagenet:FILE (lstm, two-stream, fused-3d: "
                        "ImageNet GoogLeNet-BN for the 2D trunks) (default scratch)")  # fmt: skip
    p.add_argument("--out", required=True, metavar="RUN_DIR", help="run directory: checkpoints, model.pt, metrics.jsonl, curves.png")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=8, help="clips per step per worker (default 8)")
    p.add_argument("--lr", type=float, default=0.01, help="peak learning rate, cosine-annealed per epoch (default 0.01)")
    p.add_argument("--weight-decay", type=float, default=1e-7)
    p.add_argument("--momentum", type=float, default=0.9, help="SGD momentum (default 0.9)")
    p.add_argument("--optimizer", choices=OPTIMIZERS, default="sgd")
    p.add_argument("--clip-len", type=int, default=None,
                   help="RGB frames per training clip (default per --arch: i3d 64, lstm 25, c3d 16, two-stream 1, fused-3d 5)")
    p.add_argument("--frame-step", type=int, default=None,
                   help="frames between the RGB frames of a clip, at 25 fps (default per --arch: lstm 5, fused-3d 10, else 1)")
    p.add_argument("--crop-size", type=int, default=None, help="square crop in px (default per --arch: 224, c3d 112)")
    p.add_argument("--eval-stride", type=int, default=None, help="validation clip stride (default: clip length)")
    p.add_argument("--no-flip", dest="flip", action="store_false", help="no horizontal flips (classes that mirroring changes)")
    p.add_argument("--dropout", type=float, default=0.5)
    p.add_argument("--precision", choices=PRECISIONS, default="fp32", help="fp32, or bf16/fp16 autocast")
    p.add_argument("--train-split", default="train")
    p.add_argument("--val-split", default="val")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--deterministic", action="store_true", help="deterministic kernels (bit-exact resume, slower)")
    p.add_argument("--precise-bn", nargs="?", const="on", default="auto", choices=PRECISE_BN,
                   help="recompute BatchNorm statistics on each epoch's clips before validation: on (also bare --precise-bn), "
                        "off, or auto (default: while the running statistics cannot have converged, the first ~300 steps)")  # fmt: skip
    p.add_argument("--num-workers", type=int, default=None, help="Ray Train workers (default: one per GPU, 1 on CPU)")
    p.add_argument("--cpus-per-worker", type=int, default=None, help="CPUs (torch threads) per worker")
    p.add_argument("--loader-workers", type=int, default=2, help="DataLoader processes per worker (default 2)")
    p.add_argument("--keep-checkpoints", type=int, default=2, help="epoch checkpoints kept (default 2)")
    p.add_argument("--address", default=None, help="address of an existing Ray cluster (default: embedded local Ray)")
    p.add_argument("--resume", action="store_true", help="continue the run in RUN_DIR from its last checkpoint")


def evaluate(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", required=True, help="shard directory (quovadis preprocess --out)")
    p.add_argument("--labels", required=True, help="labels.csv: video,label[,split]")
    p.add_argument("runs", nargs="*", metavar="RUN", help="runs of any --arch to compare: RUN_DIRs or their model.pt files")
    p.add_argument("--rgb", default=None, metavar="CKPT", help="I3D RGB checkpoint from quovadis train (RUN_DIR/model.pt)")
    p.add_argument("--flow", default=None, metavar="CKPT", help="I3D flow checkpoint from quovadis train")
    p.add_argument("--split", default=None, help="split to evaluate (default: test if present, else val, else all)")
    p.add_argument("--batch-size", type=int, default=8, help="clips per forward pass (default 8)")
    p.add_argument("--json", default=None, metavar="PATH", help="also write the accuracies as JSON here")
    p.add_argument("--plot", default=None, metavar="PATH", help="bar chart PNG of the table (default: the --json path with .png)")


def show(p: argparse.ArgumentParser) -> None:
    p.add_argument("shard_dir", metavar="SHARD_DIR", help="output directory of `quovadis preprocess`")
    p.add_argument("video", metavar="VIDEO", help="the input path as in manifest.jsonl, or the video key")
    p.add_argument("--out", default="preview.png", help="PNG to write (default preview.png)")
    p.add_argument("--frames", type=int, default=6, help="rows: frames spread over the video (default 6)")
    p.add_argument("--max-flow", type=float, default=None,
                   help="flow length in pixels drawn fully saturated (default: the longest vector shown)")


def bench(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="benchmark", required=True, metavar="BENCHMARK")
    for name, help_text in BENCHMARKS.items():
        BENCH_OPTIONS[name](sub.add_parser(name, help=help_text, description=help_text))


def _bench_decode(p: argparse.ArgumentParser) -> None:
    p.add_argument("inputs", nargs="*", default=[str(SHARED / "videos")], help="videos or directories (default ../shared/videos)")
    p.add_argument("--short-side", type=int, default=conventions.SHORT_SIDE)
    p.add_argument("--repeat", type=int, default=2, help="runs per file and method; the best is kept")
    p.add_argument("--compression", default=COMPRESSIONS[0])


def _bench_shards(p: argparse.ArgumentParser) -> None:
    p.add_argument("videos", nargs="*", type=Path, default=[SHARED / "videos"], help="video files or folders (default ../shared/videos)")
    p.add_argument("--compressions", default="none,lzf,gzip1,gzip4", help="comma-separated list")
    p.add_argument("--chunk-frames", default="1,2,4,8", help="comma-separated frames per chunk")
    p.add_argument("--max-seconds", type=float, default=12.0, help="decode at most this much of each video")
    p.add_argument("--short-side", type=int, default=conventions.SHORT_SIDE)
    p.add_argument("--clips", type=int, default=100, help="random clips read per setting and repeat")
    p.add_argument("--repeat", type=int, default=2, help="measure each setting this often, keep the best")
    p.add_argument("--clip-len", type=int, default=conventions.CLIP_LEN)
    p.add_argument("--workdir", type=Path, default=None, help="where to write shards (default a temp dir)")
    p.add_argument("--json", type=Path, default=None, help="also write the results here")


def _bench_flow(p: argparse.ArgumentParser) -> None:
    p.add_argument("--video", default=str(SHARED / "videos" / "bigbuckbunny_h264_720p25.mp4"),
                   help="video whose consecutive frames are the pairs (default ../shared/videos/bigbuckbunny_h264_720p25.mp4)")
    p.add_argument("--sizes", default="224x224,256x340", help="HxW sizes, comma separated (default 224x224,256x340)")
    p.add_argument("--pairs", type=int, default=16,
                   help="frame pairs per size on the CPU, the video's first (default 16; 0: every pair of the video, all in memory)")
    p.add_argument("--cuda-pairs", type=int, default=512,
                   help="pairs per size on CUDA; the decoded pairs are repeated to reach it (default 512)")
    p.add_argument("--batch-pairs", type=int, default=None,
                   help="pairs per tvl1 call (default: 1 on the CPU, where batching only costs; 128 on CUDA)")
    p.add_argument("--threads", type=int, default=1, help="CPU threads for torch and OpenCV (default 1: per core)")
    p.add_argument("--methods", default="opencv,eager,fast,cuda",
                   help="any of opencv, eager (torch CPU), fast (torch CPU compiled), cuda (torch CUDA fast), "
                   "cuda-eager (default opencv,eager,fast,cuda; cuda ones are skipped without a GPU)")
    p.add_argument("--middlebury", default=str(SHARED / "flow"), help="directory with RubberWhale/ and Venus/ (default ../shared/flow)")


def _bench_i3d(p: argparse.ArgumentParser) -> None:
    p.add_argument("--batch-sizes", default=None, help="comma-separated (default 1,2,4,8,16,32 on CUDA, 1,2 on CPU)")
    p.add_argument("--frames", type=int, default=conventions.CLIP_LEN)
    p.add_argument("--size", type=int, default=conventions.CROP_SIZE, help="height and width")
    p.add_argument("--stream", choices=tuple(IN_CHANNELS), default="rgb")
    p.add_argument("--weights", default=None, help="weights file (default: random)")
    p.add_argument("--variants", default=None, help="comma-separated variant names (default: those of the device; a wrong name lists them all)")
    p.add_argument("--device", default=None, help="cuda or cpu (default cuda when available)")
    p.add_argument("--iters", type=int, default=None, help="timed batches per measurement (default 20 CUDA, 2 CPU)")
    p.add_argument("--warmup", type=int, default=None, help="untimed batches first (default 5 CUDA, 1 CPU)")


def _bench_preprocess(p: argparse.ArgumentParser) -> None:
    p.add_argument("inputs", nargs="*", default=[str(SHARED / "videos")], help="videos or directories (default ../shared/videos)")
    p.add_argument("--streams", default="rgb,flow")
    p.add_argument("--short-side", type=int, default=conventions.SHORT_SIDE)
    p.add_argument("--compression", choices=COMPRESSIONS, default=COMPRESSIONS[0])
    p.add_argument("--flow-backend", choices=FLOW_BACKENDS, default="torch")
    p.add_argument("--address", default=None)


def _bench_extract(p: argparse.ArgumentParser) -> None:
    p.add_argument("inputs", nargs="*", default=[str(SHARED / "videos")], help="videos or directories (default ../shared/videos)")
    p.add_argument("--streams", default="rgb,flow")
    p.add_argument("--clip-len", type=int, default=conventions.CLIP_LEN)
    p.add_argument("--stride", type=int, default=None, help="frames between clip starts (default: --clip-len)")
    p.add_argument("--short-side", type=int, default=conventions.SHORT_SIDE)
    p.add_argument("--crop-size", type=int, default=conventions.CROP_SIZE)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--precision", default="fp32")
    p.add_argument("--flow-backend", default="torch")
    p.add_argument("--weights-rgb", default=str(SHARED / "i3d" / "rgb_random_init.pt"), help="(random weights time the same as real ones)")
    p.add_argument("--weights-flow", default=str(SHARED / "i3d" / "flow_random_init.pt"))
    p.add_argument("--address", default=None)


def _bench_train(p: argparse.ArgumentParser) -> None:
    p.add_argument("--arch", default=None,
                   help="comma list of train --arch names, or all: clips/s and peak memory of each "
                        "at its training input (default: the single-stream I3D bench below)")  # fmt: skip
    p.add_argument("--stream", choices=tuple(IN_CHANNELS), default="rgb")
    p.add_argument("--clip-len", type=int, default=None,
                   help="RGB frames per clip (default 64; with --arch the arch's own, flow fields in proportion; "
                        "two-stream takes only 1)")  # fmt: skip
    p.add_argument("--crop-size", type=int, default=None,
                   help="square crop (default 224; with --arch the arch's own)")
    p.add_argument("--batch-size", type=int, default=4, help="clips per step (default 4)")
    p.add_argument("--steps", type=int, default=5, help="timed steps per precision (default 5)")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps first (default 1)")
    p.add_argument("--precisions", default="fp32,bf16", help="comma list of fp32, bf16, fp16 (default fp32,bf16)")
    p.add_argument("--device", default=None, help="cpu or cuda[:n] (default: cuda when present)")
    p.add_argument("--data", default=None, help="shard directory: also measure the data loader")
    p.add_argument("--loader-workers", default="0,2", help="comma list of DataLoader worker counts (default 0,2)")
    p.add_argument("--loader-clips", type=int, default=32, help="clips read per loader measurement (default 32)")


BENCH_OPTIONS = {"decode": _bench_decode, "shards": _bench_shards, "flow": _bench_flow, "i3d": _bench_i3d,
               "preprocess": _bench_preprocess, "extract": _bench_extract, "train": _bench_train}  # fmt: skip
