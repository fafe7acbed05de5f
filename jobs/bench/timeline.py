"""Each job stage's busy time from Ray's task timeline (`ray.timeline()`), so a benchmarked job
runs exactly as the command does: "X" events (durations in us) matched by substring of their
"cat" and "name". Ray Data tasks read "task::FlatMap(decode_clips)" + "..._map_task", actor pool
calls "task::MapWorker(MapBatches(FlowStage)).submit" + "submit", the pre-graph jobs' plain tasks
and actor methods "task::_decode_segment" + "quovadis.jobs.preprocess._decode_segment" (their
names are kept, so one bench file times old code too). Actor constructors (__init__: start-up,
model loading) count for no stage.
"""

from __future__ import annotations

import time

_DELAY_S = 2.0  # task events reach the timeline with a delay

STAGES = {  # stage -> substrings of timeline event names
    "decode": ("plan_video", "decode_clips", "decode_chunks", "_decode_segment", "_probe"),
    "flow": ("FlowStage", "flow"),
    "i3d": (),  # measured inside extract (report.extra["stage_busy_s"])
    "write": ("write_pieces", "begin_video", "write_rgb", "write_flow", "end_video", "abort_video", "close"),
}
_MATCH_ORDER = ("write", "decode", "flow", "i3d")  # "write_flow" is write, not flow


def stage_busy(events: list[dict]) -> dict[str, float]:
    """Seconds inside each stage's Ray tasks / actor methods, summed over its workers; an event
    counts for the first stage, in _MATCH_ORDER, one of whose substrings it contains."""
    busy = {name: 0.0 for name in STAGES}
    for e in events:
        if e.get("ph") != "X" or e.get("name") == "__init__":
            continue
        text = f"{e.get('cat', '')} {e.get('name', '')}"
        for stage in _MATCH_ORDER:
            if any(part in text for part in STAGES[stage]):
                busy[stage] += float(e.get("dur", 0)) / 1e6
                break
    return busy


def events_since(started_s: float) -> list[dict]:
    """The timeline's events from `started_s` (time.time()) on: a long-lived cluster's timeline
    holds its earlier jobs' too."""
    import ray

    time.sleep(_DELAY_S)
    return [e for e in ray.timeline() if float(e.get("ts", 0)) >= started_s * 1e6]
