"""Decode benchmark: our decode + 25 fps resample + resize + shard write, against plain
`ffmpeg -i X -vf fps=25,scale=W:H -f rawvideo -` to /dev/null on the same files in the same run.

Both run pinned to one CPU core (os.sched_setaffinity, inherited by ffmpeg), so the ratio is per core.
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import subprocess
import tempfile
import time
from pathlib import Path

from quovadis.jobs.inputs import expand_inputs
from quovadis.pipeline.decode import DecodeConfig, iter_frames, output_size
from quovadis.pipeline.probe import ffmpeg_exe, ffmpeg_input, probe
from quovadis.pipeline.shards import ShardConfig, ShardWriter

log = logging.getLogger(__name__)


def run_bench(args: argparse.Namespace) -> int:
    os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
    cfg = DecodeConfig(short_side=args.short_side)
    rows = []
    for path in expand_inputs(args.inputs).paths:
        info = probe(path)
        height, width = output_size(info, cfg)
        ceiling_s, ceiling_frames = min(_ffmpeg_ceiling(path, cfg, height, width) for _ in range(args.repeat))
        ours_s, ours_frames = min(_ours(path, cfg, args.compression) for _ in range(args.repeat))
        rows.append((Path(path).name, f"{width}x{height}", ours_frames, ceiling_frames,
                     ours_frames / ours_s, ceiling_frames / ceiling_s))
    _print_table(rows, args)
    return 0


def _ffmpeg_ceiling(path: str, cfg: DecodeConfig, height: int, width: int) -> tuple[float, int]:
    cmd = [ffmpeg_exe(), "-v", "error", "-i", ffmpeg_input(path), "-an", "-sn",
           "-vf", f"fps={cfg.fps},scale={width}:{height}:flags=bilinear", "-f", "rawvideo", "-pix_fmt", "rgb24", "-"]
    frame_bytes = height * width * 3
    started = time.perf_counter()
    total = 0
    with subprocess.Popen(cmd, stdout=subprocess.PIPE) as proc:
        while block := proc.stdout.read(1 << 20):
            total += len(block)
    return time.perf_counter() - started, total // frame_bytes


def _ours(path: str, cfg: DecodeConfig, compression: str) -> tuple[float, int]:
    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        info = probe(path)
        height, width = output_size(info, cfg)
        writer = ShardWriter(Path(tmp), ShardConfig(compression=compression), {})
        key = writer.begin_video(path, height=height, width=width, expected_frames=None, streams=("rgb",),
                                 attrs=info.to_dict())
        frames = 0
        for chunk in iter_frames(path, cfg, info):
            writer.write_rgb(key, chunk.start, chunk.frames)
            frames += len(chunk.frames)
        writer.end_video(key, frames)
        writer.close()
        return time.perf_counter() - started, frames


def _print_table(rows: list[tuple], args: argparse.Namespace) -> None:
    lines = [
        f"quovadis bench decode --short-side {args.short_side}  (1 core of {platform.processor() or platform.machine()}, "
        f"compression {args.compression})",
        f"{'file':34} {'size':>9} {'frames':>7} {'ours f/s':>9} {'ffmpeg f/s':>10} {'ratio':>6}",
    ]
    for name, size, frames, ceiling_frames, ours, ceiling in rows:
        lines.append(f"{name:34} {size:>9} {frames:>7} {ours:9.1f} {ceiling:10.1f} {ours / ceiling:6.2f}")
    total_ours = sum(r[2] for r in rows) / sum(r[2] / r[4] for r in rows)
    total_ceiling = sum(r[3] for r in rows) / sum(r[3] / r[5] for r in rows)
    lines.append(f"{'all':34} {'':>9} {sum(r[2] for r in rows):>7} {total_ours:9.1f} {total_ceiling:10.1f} "
                 f"{total_ours / total_ceiling:6.2f}")
    print("\n".join(lines))  # a benchmark's table is its output
