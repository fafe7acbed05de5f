"""`quovadis inflate 2D.pt --out i3d_rgb.pt`: ImageNet GoogLeNet-BN weights (torchvision layout, e.g.
torchvision's googlenet-1378be20.pth) inflated into an I3D state dict in the pytorch-i3d layout.

The output loads like the released weights: `models.weights.load_i3d("rgb", "i3d_rgb.pt")` (its
class count, 1000 for ImageNet, is read from the file), then `replace_logits(k)` to fine-tune.

`--net resnet50`: an ImageNet ResNet-50 (torchvision layout, `models.resnet`) inflated into an
I3D-ResNet-50 state dict (the same keys; `models.inflate.i3d_resnet50` builds and loads it).
`--inflate-init` is another name for `--mode`.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from quovadis.jobs.report import JobReport
from quovadis.models.googlenet import read_googlenet
from quovadis.models.inflate import i3d_from_googlenet, i3d_resnet50
from quovadis.models.resnet import read_resnet50
from quovadis.models.weights import save_atomic, sha256_of
from quovadis.pipeline.errors import ConfigError

log = logging.getLogger(__name__)


def run(args: argparse.Namespace) -> JobReport:
    out: Path = args.out
    if args.in_channels < 1:
        raise ConfigError(f"--in-channels must be >= 1, got {args.in_channels}")
    if args.net == "resnet50" and args.in_channels != 3:
        raise ConfigError(f"--in-channels {args.in_channels}: only GoogLeNet inflation adapts the input channels")
    if out.exists() and not args.force:
        raise ConfigError(f"{out} exists; pass --force to overwrite it")
    if not out.parent.is_dir():
        raise ConfigError(f"the directory of --out, {out.parent}, does not exist")
    report = JobReport(job="inflate", config={
        "source": str(args.source), "out": str(out), "net": args.net, "mode": args.mode,
        "in_channels": args.in_channels,
    })
    if args.net == "resnet50":
        state_dict = i3d_resnet50(read_resnet50(args.source), mode=args.mode).state_dict()
    else:
        state_dict = i3d_from_googlenet(read_googlenet(args.source), mode=args.mode, in_channels=args.in_channels)
    save_atomic(state_dict, out)
    report.ok.append(str(args.source))
    report.extra = {
        "num_classes": int(state_dict["fc.weight" if args.net == "resnet50" else "logits.conv3d.weight"].shape[0]),
        "source_sha256": sha256_of(args.source),
        "out_sha256": sha256_of(out),
    }
    report.finish()
    log.info("inflated %s (%s) into %s: %d tensors, %d classes", args.source, args.mode, out,
             len(state_dict), report.extra["num_classes"])
    return report
