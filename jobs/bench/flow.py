"""Flow benchmark: pairs/s and accuracy of our TV-L1 (CPU eager, CPU compiled, CUDA when present)
against OpenCV-contrib's DualTVL1 on the same frames in the same run.

Frames: consecutive frames of a real video (its first --pairs + 1, or all: the pairs a job gives
flow for that video, to set a job's cost per pair against), scaled to the shorter side of each size and centre
cropped (224x224, 256x340 by default), converted with `rgb_to_gray`. Speed: pairs/s over all pairs
after a warm-up batch (compilation, CUDA graph capture), wall and CPU time (the CPU seconds show the
cost on a shared machine). Accuracy: the mean endpoint distance of each method's fields to OpenCV's
on those frames, and the average endpoint error (EPE) against ground truth on the Middlebury pairs.
torch and OpenCV get the same number of CPU threads (--threads).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import platform
import subprocess
import time
from pathlib import Path

import numpy as np
import torch

from quovadis.jobs.bench import repeat_command
from quovadis.pipeline.conventions import rgb_to_gray
from quovadis.pipeline.errors import ConfigError, DecodeError
from quovadis.pipeline.flow import FlowConfig, compute_flow, tvl1, tvl1_opencv
from quovadis.pipeline.flowviz import endpoint_error, read_flo

log = logging.getLogger(__name__)

MIDDLEBURY = ("RubberWhale", "Venus")


@dataclasses.dataclass(frozen=True)
class Method:
    name: str
    cfg: FlowConfig

    @property
    def device(self) -> str:
        return "cpu" if self.cfg.backend == "opencv" else str(self.cfg.device)


@dataclasses.dataclass
class Row:
    method: Method
    size: tuple[int, int]
    pairs: int
    wall_s: float
    cpu_s: float
    distance_to_opencv: float | None


def run_bench(args: argparse.Namespace) -> int:
    import cv2

    sizes = [_parse_size(s) for s in args.sizes.split(",") if s.strip()]
    torch.set_num_threads(args.threads)
    cv2.setNumThreads(args.threads)
    methods = _methods(args)
    cuda_skipped = [m for m in args.methods.split(",") if m.startswith("cuda")] if not torch.cuda.is_available() else []
    needed = None if args.pairs == 0 else max(args.pairs, 1) + 1  # 0: every frame of the video
    rows: list[Row] = []
    for height, width in sizes:
        gray = rgb_to_gray(_decode(args.video, needed, height, width))
        if len(gray) < 2:
            raise DecodeError(f"{args.video}: fewer than 2 frames decoded")
        reference: np.ndarray | None = None
        for method in methods:
            frames = gray
            if method.device.startswith("cuda"):
                frames = _repeat_pairs(gray, args.cuda_pairs)
            flow, wall, cpu = _timed(frames, method.cfg)
            distance = None
            if method.cfg.backend == "opencv":
                reference = flow
            elif reference is not None:
                n = min(len(reference), len(gray) - 1)
                distance = float(np.mean([endpoint_error(flow[i], reference[i]) for i in range(n)]))
            rows.append(Row(method, (height, width), len(frames) - 1, wall, cpu, distance))
            log.info("%s %dx%d: %.2f pairs/s", method.name, height, width, (len(frames) - 1) / wall)
    epe = {m.name: _middlebury_epe(Path(args.middlebury), m.cfg) for m in methods}
    _print_table(rows, epe, args, cuda_skipped)
    return 0


def _methods(args: argparse.Namespace) -> list[Method]:
    base = FlowConfig(batch_pairs=args.batch_pairs or 1)  # one pair at a time is fastest on the CPU
    cuda_batch = args.batch_pairs or 128
    table = {
        "opencv": Method("opencv DualTVL1", dataclasses.replace(base, backend="opencv")),
        "eager": Method("ours eager", dataclasses.replace(base, device="cpu", fast=False)),
        "fast": Method("ours compiled", dataclasses.replace(base, device="cpu", fast=True)),
        "cuda": Method("ours cuda graphs", dataclasses.replace(base, device="cuda", fast=True, batch_pairs=cuda_batch)),
        "cuda-eager": Method("ours cuda eager", dataclasses.replace(base, device="cuda", fast=False, batch_pairs=cuda_batch)),
    }
    names = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = set(names) - set(table)
    if unknown:
        raise ConfigError(f"unknown flow bench methods {sorted(unknown)}; choose from {', '.join(table)}")
    if "opencv" in names:  # the reference first: the others are compared with it
        names.remove("opencv")
        names.insert(0, "opencv")
    return [table[n] for n in names if not (n.startswith("cuda") and not torch.cuda.is_available())]


def _parse_size(text: str) -> tuple[int, int]:
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError as e:
        raise ConfigError(f"size {text!r} is not HxW, e.g. 256x340") from e
    return h, w


def _decode(path: str, count: int | None, height: int, width: int) -> np.ndarray:
    """The first `count` frames (None: all), scaled to cover height x width and centre cropped:
    uint8 (T, H, W, 3)."""
    from quovadis.pipeline.probe import ffmpeg_exe, ffmpeg_input

    vf = (f"scale=w='if(gt(a,{width}/{height}),-2,{width})':h='if(gt(a,{width}/{height}),{height},-2)'"
          f":flags=bilinear,crop={width}:{height}")
    cmd = [ffmpeg_exe(), "-v", "error", "-i", ffmpeg_input(path), "-an", "-sn", "-vf", vf,
           *(["-frames:v", str(count)] if count else []), "-f", "rawvideo", "-pix_fmt", "rgb24", "-"]  # fmt: skip
    try:
        raw = subprocess.run(cmd, check=True, capture_output=True).stdout
    except (OSError, subprocess.CalledProcessError) as e:
        cause = getattr(e, "stderr", b"") or b""
        raise DecodeError(f"{path}: ffmpeg failed: {cause.decode(errors='replace').strip() or e}") from e
    frame = height * width * 3
    return np.frombuffer(raw[: len(raw) // frame * frame], np.uint8).reshape(-1, height, width, 3)


def _repeat_pairs(gray: np.ndarray, pairs: int) -> np.ndarray:
    """Frames whose consecutive pairs cycle through those of `gray`, `pairs` in all (as a video: the
    pairs at the seams are frame T-1 -> frame 0, a cut, which TV-L1 handles like any other pair)."""
    reps = -(-(pairs + 1) // len(gray))
    return np.concatenate([gray] * reps)[: pairs + 1]


def _timed(frames: np.ndarray, cfg: FlowConfig) -> tuple[np.ndarray, float, float]:
    """compute_flow over all pairs after one warm-up batch: (flow, wall s, CPU s)."""
    warm = frames[: min(len(frames), (cfg.batch_pairs or 1) + 1)]
    compute_flow(warm, cfg)  # compilation, CUDA graph capture, OpenCV's allocations
    if cfg.backend == "torch" and str(cfg.device).startswith("cuda"):
        torch.cuda.synchronize()
    wall, cpu = time.perf_counter(), time.process_time()
    flow = compute_flow(frames, cfg)
    return flow, time.perf_counter() - wall, time.process_time() - cpu


def _middlebury_epe(root: Path, cfg: FlowConfig) -> dict[str, float]:
    import cv2

    out = {}
    for name in MIDDLEBURY:
        folder = root / name
        if not folder.is_dir():
            log.warning("no Middlebury pair at %s; its EPE is left out", folder)
            continue
        prev = cv2.imread(str(folder / "frame10_gray.png"), cv2.IMREAD_GRAYSCALE)
        nxt = cv2.imread(str(folder / "frame11_gray.png"), cv2.IMREAD_GRAYSCALE)
        if cfg.backend == "opencv":
            flow = tvl1_opencv(prev, nxt, cfg)[0]
        else:
            flow = tvl1(prev, nxt, cfg)[0].cpu().numpy()
        out[name] = endpoint_error(flow.transpose(1, 2, 0), read_flo(folder / "flow10.flo"))
    return out


def _print_table(rows: list[Row], epe: dict[str, dict[str, float]], args: argparse.Namespace, cuda_skipped: list[str]) -> None:
    cpu_name = _cpu_name()
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "none"
    lines = [
        f"{repeat_command('flow', args)}  "
        f"(CPU: {cpu_name}, {args.threads} thread(s) for torch and OpenCV; GPU: {gpu}; torch {torch.__version__})",
        f"{'method':18} {'device':7} {'size':>8} {'pairs':>6} {'pairs/s':>8} {'CPU s/pair':>10} {'x opencv':>8} {'x cv CPU':>9} "
        f"{'dist to cv':>10} " + " ".join(f"{'EPE ' + n:>15}" for n in MIDDLEBURY),
    ]
    opencv = {r.size: r for r in rows if r.method.cfg.backend == "opencv"}
    for r in rows:
        speed = r.pairs / r.wall_s
        ref = opencv.get(r.size)
        ratio = f"{speed * ref.wall_s / ref.pairs:8.2f}" if ref else f"{'-':>8}"
        cpu_ratio = f"{(ref.cpu_s / ref.pairs) / (r.cpu_s / r.pairs):9.2f}" if ref else f"{'-':>9}"
        dist = f"{r.distance_to_opencv:10.4f}" if r.distance_to_opencv is not None else f"{'-':>10}"
        scores = " ".join(f"{epe[r.method.name].get(n, float('nan')):15.4f}" for n in MIDDLEBURY)
        lines.append(f"{r.method.name:18} {r.method.device:7} {r.size[0]:>3}x{r.size[1]:<4} {r.pairs:>6} {speed:8.2f} "
                     f"{r.cpu_s / r.pairs:10.3f} {ratio} {cpu_ratio} {dist} {scores}")
    if cuda_skipped:
        lines.append(f"not measured: {', '.join(cuda_skipped)} (no CUDA device here)")
    print("\n".join(lines))  # a benchmark's table is its output


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
