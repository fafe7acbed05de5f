"""The end-of-job summary: what was done, what failed and why, how fast. Also written as report.json."""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import ray.exceptions

from quovadis.pipeline.durable import write_json_atomic
from quovadis.pipeline.errors import QuovadisError

REPORT_NAME = "report.json"


class _Recorded(Protocol):
    """What an earlier run recorded for an input (a manifest or feature-index entry)."""

    status: str
    reason: str | None


@dataclass
class JobReport:
    job: str
    config: dict[str, Any] = field(default_factory=dict)
    ok: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # done by an earlier run
    failed: dict[str, str] = field(default_factory=dict)  # input -> one-line reason
    warnings: dict[str, list[str]] = field(default_factory=dict)  # ok input -> ffmpeg errors its decode kept
    ignored: list[dict[str, str]] = field(default_factory=list)  # {"path", "reason"}: passed over by a directory scan
    frames: int = 0
    video_seconds: float = 0.0  # of the ok videos, at their stored frame rate
    clips: int = 0
    seconds: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)
    _started: float = field(default_factory=time.monotonic, repr=False)

    def skip_if_done(self, path: str, recorded: _Recorded | None, retry_failed: bool) -> bool:
        """True, and `path` noted as skipped, when an earlier run did it: recorded ok, or recorded
        failed and not to be retried (--retry-failed); its reason then stays in `failed`."""
        if recorded is None or (recorded.status == "failed" and retry_failed):
            return False
        self.skipped.append(path)
        if recorded.status == "failed":
            self.failed[path] = recorded.reason or "failed in an earlier run"
        return True

    def finish(self) -> None:
        self.seconds = time.monotonic() - self._started

    @property
    def frames_per_second(self) -> float:
        return self.frames / self.seconds if self.seconds > 0 else 0.0

    @property
    def realtime_factor(self) -> float:
        """Video-seconds done per wall-second."""
        return self.video_seconds / self.seconds if self.seconds > 0 else 0.0

    def summary(self) -> str:
        lines = [
            f"{self.job}: {len(self.ok)} ok ({len(self.warnings)} with decode warnings), {len(self.skipped)} already done, "
            f"{len(self.failed)} failed, {len(self.ignored)} ignored in input directories; "
            f"{self.frames} frames ({self.video_seconds:.1f} video-s), {self.clips} clips in {self.seconds:.1f} s "
            f"({self.frames_per_second:.1f} frames/s, {self.realtime_factor:.2f} video-s per s)"
        ]
        lines += [f"  failed: {reason if reason.startswith(path) else f'{path}: {reason}'}" for path, reason in sorted(self.failed.items())]
        if self.warnings or self.ignored:
            lines.append(f"  report.json lists the {len(self.warnings)} videos with warnings and the {len(self.ignored)} ignored paths")
        return "\n".join(lines)

    def to_json(self) -> dict[str, Any]:
        data = {k: v for k, v in asdict(self).items() if not k.startswith("_")}
        data["frames_per_second"] = self.frames_per_second
        data["video_seconds_per_second"] = self.realtime_factor
        return data

    def write(self, out_dir: Path) -> Path:
        """Write report.json durably (pipeline.durable)."""
        return write_json_atomic(out_dir / REPORT_NAME, self.to_json(), indent=2)


class FlowTally:
    """The flow actors' work as their rows report it (graph.FlowStage's `flow_work`): per actor its
    calls, pairs, wall and CPU seconds, and its first call's apart (it holds the actor's start:
    torch.compile, CUDA). Each call counts once, however many rows carry it (a run's clips, a
    write or I3D call redone downstream); a call redone by a restarted actor counts again, as that
    actor's: it was computed twice."""

    def __init__(self) -> None:
        self.actors: dict[str, dict[str, Any]] = {}  # "node:pid" -> its work
        self._calls: set[tuple[str, int]] = set()

    def add(self, work: dict[str, Any] | None) -> None:
        if work is None or (work["actor"], work["call"]) in self._calls:
            return
        self._calls.add((work["actor"], work["call"]))
        actor = self.actors.setdefault(work["actor"], {"calls": 0, "pairs": 0, "busy_s": 0.0, "cpu_s": 0.0, "first_call_s": None,
                                                        "first_call_cpu_s": None, "first_call_pairs": 0})  # fmt: skip
        actor["calls"] += 1
        actor["pairs"] += work["pairs"]
        actor["busy_s"] += work["s"]
        actor["cpu_s"] += work["cpu_s"]
        if work["call"] == 0:
            actor["first_call_s"], actor["first_call_cpu_s"], actor["first_call_pairs"] = work["s"], work["cpu_s"], work["pairs"]

    def nodes(self) -> dict[str, int]:
        """Flow actors per node id."""
        return dict(Counter(actor.rsplit(":", 1)[0] for actor in self.actors))

    def summary(self) -> dict[str, Any]:
        """report.json's "flow": totals, per pair (wall and CPU seconds; `bench flow` reports CPU), per actor."""
        pairs = sum(a["pairs"] for a in self.actors.values())
        busy = sum(a["busy_s"] for a in self.actors.values())
        cpu = sum(a["cpu_s"] for a in self.actors.values())
        return {"pairs": pairs, "busy_s": busy, "s_per_pair": busy / max(1, pairs), "cpu_s": cpu,
                "cpu_s_per_pair": cpu / max(1, pairs), "actors": self.actors}  # fmt: skip


def failure_reason(e: BaseException, path: str | None = None) -> str:
    """One line naming the cause of a per-input failure (a Ray task error is unwrapped), starting
    with `path` when given."""
    if isinstance(e, ray.exceptions.ActorDiedError):
        text = "a worker process of the job died (out of memory or disk?); its data was not kept"
    else:
        cause = getattr(e, "cause", None) or e
        lines = str(cause).strip().splitlines()
        if isinstance(cause, QuovadisError) and lines:
            text = lines[0]
        else:
            text = f"{type(cause).__name__}: {lines[-1] if lines else ''}"
    return text if path is None or text.startswith(path) else f"{path}: {text}"
