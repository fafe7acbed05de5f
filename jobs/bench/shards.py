"""`quovadis bench shards`: shard compression and chunking measured on real decoded frames.

For each compression (none, lzf, gzip1, gzip4) and chunk length (frames per chunk) it writes the
decoded videos through ShardWriter (in 32-frame segments, as the job does), then reads random
64-frame clips through ShardReader, and reports write MB/s, read clips/s and MB/s, and the size
against raw uint8. The speeds are also given per CPU-second of this process, which hold on a busy
shared machine where wall time does not. Reads come from the page cache (the files were just
written), so they measure decompression and HDF5 overhead, the part the format decides, not disk.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np

from quovadis.jobs.report import JobReport
from quovadis.pipeline import conventions
from quovadis.pipeline.errors import ConfigError, DecodeError
from quovadis.pipeline.probe import ffmpeg_exe, ffmpeg_input
from quovadis.pipeline.shards import ShardConfig, ShardReader, ShardWriter, list_shards

log = logging.getLogger(__name__)

VIDEO_EXTENSIONS = {".mp4", ".webm", ".avi", ".mkv", ".mov", ".h265", ".m4v"}
SEGMENT = 32  # frames per write call, like one decode chunk of the job


def _decode(path: Path, short_side: int, max_seconds: float) -> np.ndarray:
    """uint8 (T, H, W, 3) frames at conventions.FPS with the short side scaled to `short_side`."""
    cmd = [ffmpeg_exe(), "-hide_banner", "-nostats", "-i", ffmpeg_input(path), "-t", str(max_seconds),
           "-an", "-vf", f"fps={conventions.FPS:g},scale=-2:{short_side}", "-f", "rawvideo", "-pix_fmt", "rgb24",
           "-"]  # fmt: skip
    out = subprocess.run(cmd, capture_output=True)
    log_text = out.stderr.decode(errors="replace")
    # the output stream line of ffmpeg's log gives the scaled size: "Output #0 ... Video: rawvideo ..., 456x256"
    output_log = log_text[log_text.find("Output #0") :]
    sizes = re.findall(r"Video: rawvideo.*?, (\d+)x(\d+)", output_log)
    if out.returncode != 0 or not out.stdout or not sizes:
        raise DecodeError(f"{path}: ffmpeg failed: {log_text.strip().splitlines()[-1:]}")
    w, h = map(int, sizes[0])
    return np.frombuffer(out.stdout, np.uint8).reshape(-1, h, w, 3)


def _video_paths(items: list[Path]) -> list[Path]:
    paths: list[Path] = []
    for item in items:
        if item.is_dir():
            paths += sorted(p for p in item.rglob("*") if p.suffix.lower() in VIDEO_EXTENSIONS)
        elif item.exists():
            paths.append(item)
        else:
            raise ConfigError(f"{item}: no such file or folder")
    return paths


def _measure(videos: dict[str, np.ndarray], compression: str, chunk: int, args, work: Path) -> dict:
    """Write all videos and read random clips `args.repeat` times; the best time of each counts
    (the machine is shared, so the fastest run is the one least disturbed)."""
    cfg = ShardConfig(compression=compression, chunk_frames=chunk)
    raw = sum(v.nbytes for v in videos.values())
    write_s, read_s, write_cpu, read_cpu, size = [], [], [], [], 0
    for attempt in range(args.repeat):
        out = work / f"{compression}-{chunk}-{attempt}"
        t0, c0 = time.perf_counter(), time.process_time()
        writer = ShardWriter(out, cfg, {"bench": True})
        for name, frames in videos.items():
            t, h, w, _ = frames.shape
            key = writer.begin_video(name, height=h, width=w, expected_frames=t, streams=("rgb",), attrs={})
            for s in range(0, t, SEGMENT):
                writer.write_rgb(key, s, frames[s : s + SEGMENT])
            writer.end_video(key, t)
        entries = writer.close()
        write_s.append(time.perf_counter() - t0)
        write_cpu.append(time.process_time() - c0)
        size = sum(p.stat().st_size for p in list_shards(out))

        rng = np.random.default_rng(attempt)
        long_enough = [e for e in entries if e.frames >= args.clip_len]
        read_bytes = 0
        with ShardReader(out / entries[0].file) as reader:
            t0, c0 = time.perf_counter(), time.process_time()
            for _ in range(args.clips):
                e = long_enough[rng.integers(len(long_enough))]
                start = int(rng.integers(0, e.frames - args.clip_len + 1))
                read_bytes += reader[e.key].rgb(start, start + args.clip_len).nbytes
            read_s.append((time.perf_counter() - t0, read_bytes))
            read_cpu.append(time.process_time() - c0)
        shutil.rmtree(out, ignore_errors=True)
    frame_bytes = max(v[0].nbytes for v in videos.values())
    return {
        "compression": compression,
        "chunk_frames": chunk,
        "chunk_kib": round(chunk * frame_bytes / 1024),
        "size_ratio": size / raw,
        "write_mb_s": raw / min(write_s) / 1e6,
        "read_clips_s": args.clips / min(read_s)[0],
        "read_mb_s": min(read_s)[1] / min(read_s)[0] / 1e6,
        # per CPU-second of this process: what one core does, whatever else the machine runs
        "write_mb_cpu_s": raw / min(write_cpu) / 1e6,
        "read_clips_cpu_s": args.clips / min(read_cpu),
    }


def run_bench(args: argparse.Namespace) -> JobReport:
    report = JobReport(job="bench shards", config={k: str(v) for k, v in vars(args).items() if k != "func"})
    compressions = [c.strip() for c in args.compressions.split(",") if c.strip()]
    chunks = [int(c) for c in args.chunk_frames.split(",") if c.strip()]
    for c in compressions:
        ShardConfig(compression=c)  # validates the names before any decoding
    videos: dict[str, np.ndarray] = {}
    for path in _video_paths(list(args.videos)):
        try:
            videos[str(path)] = _decode(path, args.short_side, args.max_seconds)
            report.ok.append(str(path))
        except DecodeError as e:
            report.failed[str(path)] = str(e)
    if not any(len(v) >= args.clip_len for v in videos.values()):
        raise ConfigError(f"no decoded video has {args.clip_len} frames to read clips from")
    report.extra["frames"] = sum(len(v) for v in videos.values())
    log.info("decoded %d frames (%.0f MB raw) from %d videos", report.extra["frames"],
             sum(v.nbytes for v in videos.values()) / 1e6, len(videos))  # fmt: skip
    rows = []
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        _measure(videos, compressions[0], chunks[0], args, Path(tmp))  # warm-up (allocator, page cache), discarded
        for compression in compressions:
            for chunk in chunks:
                rows.append(_measure(videos, compression, chunk, args, Path(tmp)))
                log.info("%s", rows[-1])
    header = (
        f"{'compression':<11} {'chunk':>5} {'KiB':>6} {'size/raw':>8} {'write MB/s':>10} {'clips/s':>8} "
        f"{'read MB/s':>9} {'write MB/cpu-s':>14} {'clips/cpu-s':>11}"
    )
    lines = [header] + [
        f"{r['compression']:<11} {r['chunk_frames']:>5} {r['chunk_kib']:>6} {r['size_ratio']:>8.3f} "
        f"{r['write_mb_s']:>10.0f} {r['read_clips_s']:>8.1f} {r['read_mb_s']:>9.0f} "
        f"{r['write_mb_cpu_s']:>14.0f} {r['read_clips_cpu_s']:>11.1f}"
        for r in rows
    ]
    print("\n".join(lines))  # the table is this command's output
    report.extra.update(rows=rows, raw_bytes=sum(v.nbytes for v in videos.values()))
    report.finish()
    if args.json:
        args.json.write_text(json.dumps(report.to_json(), indent=2) + "\n")
    return report


run = run_bench
