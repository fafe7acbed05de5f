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

from quovadis.pipeline import conventions

DECODE_TIMEOUT_S = 300.0  # pipeline.decode.DecodeConfig().timeout_s
COMPRESSIONS = ("none", "lzf", "gzip1", "gzip4", "gzip9")  # pipeline.shards.COMPRESSIONS; the first is the default
STREAMS = ("rgb", "flow")
FLOW_BACKENDS = ("torch", "opencv")  # pipeline.flow.BACKENDS
PRECISIONS = ("fp32", "bf16", "fp16")  # models.fast.PRECISIONS
FEATURE_FORMATS = ("hdf5", "npy")  # pipeline.features.FORMATS
FEATURE_DTYPES = ("float32", "float16")  # pipeline.features.FEATURE_DTYPES
CROPS = ("center", "full")  # jobs.extract.CROPS
INFLATE_MODES = ("mean", "center")  # models.inflate.INFLATE_MODES


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
    p.add_argument("--shard-size", default="256M", help="size of the intermediate shards (default 256M)")
    p.add_argument("--segment-seconds", type=float, default=60.0, help="long videos are decoded in segments of this length by different workers")
    _decode_timeout(p)
    p.add_argument("--flow-backend", choices=FLOW_BACKENDS, default="torch", help="TV-L1 implementation (default torch)")
    p.add_argument("--flow-device", default=None, help="force the flow device, e.g. cpu or cuda:0")
    p.add_argument("--keep-shards", action="store_true", help="keep the intermediate shards in OUT/shards")
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


def show(p: argparse.ArgumentParser) -> None:
    p.add_argument("shard_dir", metavar="SHARD_DIR", help="output directory of `quovadis preprocess`")
    p.add_argument("video", metavar="VIDEO", help="the input path as in manifest.jsonl, or the video key")
    p.add_argument("--out", default="preview.png", help="PNG to write (default preview.png)")
    p.add_argument("--frames", type=int, default=6, help="rows: frames spread over the video (default 6)")
    p.add_argument("--max-flow", type=float, default=None,
                   help="flow length in pixels drawn fully saturated (default: the longest vector shown)")
