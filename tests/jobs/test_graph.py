"""The graph's CPU stages (jobs/graph.py) as a Ray worker runs them: a worker imports a task's module
and nothing else, so probe, decode and write tasks start without torch (a second's import and
180 MiB of RSS in every worker process; only the flow and I3D actors need it)."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.videos import make_video

# In a fresh Ray of its own (so no worker ran anything before), one task runs a video through every
# CPU stage of both graphs, with flow: plan, preprocess's decode and write, extract's decode. It
# returns what each stage emitted and the torch modules the worker then held.
_DRIVER = """
import json, sys
import ray

ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False)

@ray.remote
def stages(video, shard_dir):
    import sys
    from quovadis.jobs import graph
    from quovadis.pipeline.clips import ClipSpec
    from quovadis.pipeline.decode import DecodeConfig
    from quovadis.pipeline.shards import compression_options

    decode = DecodeConfig(short_side=48)
    planned = list(graph.plan_video(graph.row(video, graph.VIDEO), decode, None))
    segment = next(r for r in planned if r["kind"] == graph.SEGMENT)
    chunks = list(graph.decode_chunks(segment, decode, flow=True))
    written = graph.write_pieces(graph._columns(chunks), shard_dir, compression_options("none"), 4)
    spec = ClipSpec(clip_len=8, stride=8, crop_size=40, streams=("rgb", "flow"))
    segment = next(r for r in graph.plan_video(graph.row(video, graph.VIDEO), decode, spec) if r["kind"] == graph.SEGMENT)
    clips = list(graph.decode_clips(segment, decode, spec))
    kinds = [r["kind"] for r in planned + chunks] + list(written["kind"]) + [r["kind"] for r in clips]
    return kinds, sorted(m for m in sys.modules if m.split(".")[0] == "torch")

print(json.dumps(ray.get(stages.remote(sys.argv[1], sys.argv[2]))))
ray.shutdown()
"""


def test_cpu_stages_run_without_importing_torch(tmp_path):
    video = make_video(tmp_path / "v.mp4", fps=25, duration=0.6, size=(64, 48))
    (tmp_path / "out").mkdir()
    result = subprocess.run([sys.executable, "-c", _DRIVER, str(video), str(tmp_path / "out")], capture_output=True,
                            text=True, timeout=300, cwd=tmp_path)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    kinds, torch_modules = json.loads(result.stdout.strip().splitlines()[-1])
    # the stages did their work: 15 frames, one chunk (the write passes its end row on, then says
    # where the chunk went), two 8-frame clips
    assert kinds == ["planned", "segment", "chunk", "end", "end", "written", "clip", "clip", "end"], kinds
    assert torch_modules == []
