"""The one place that splits a Ray cluster's CPUs and GPUs between the stages of every job:
the graph stages of preprocess and extract (jobs/graph.py) and train's workers.

Rules, the same everywhere: a decode (or probe) task takes a whole CPU; on GPUs each GPU holds the
job's model actors (flow, I3D: half a GPU each when both run) and they take no CPU slot, so decode
always keeps every CPU; on CPUs flow runs single-threaded actors over the cores a node does not keep
for decode, and the one I3D actor holds no CPU slot (it is the main CPU user, but must never stall
decode); a CPU-only train worker reserves at most the CPUs that are free.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the graph's CPU tasks import this module; torch (with flow) only where flow runs
    from quovadis.pipeline.flow import FlowConfig


def flow_on_gpu(cfg: FlowConfig, gpus: int) -> bool:
    """Whether flow actors run on the cluster's GPUs (one per GPU)."""
    return gpus > 0 and cfg.backend == "torch" and (cfg.device is None or cfg.device.startswith("cuda"))


def cpu_flow_actors(cpus: int) -> tuple[int, float]:
    """(actors, Ray CPUs each) for flow on a node of `cpus` CPUs.

    Flow costs ~10x decode per frame, so each core runs one single-threaded flow actor, except a
    tenth of the cores (at least one) left to the probe and decode tasks (1 CPU each). The actors
    share what is left in fractions, so a whole CPU always stays free for decode and a 1- or
    2-CPU machine never stalls (1 CPU: one actor holding none; 2: two actors of 0.5).
    """
    decode = max(1, cpus // 10)
    actors = max(1, cpus - cpus // 10)
    return actors, max(0, cpus - decode) / actors


def cpu_flow_actor_options() -> list[dict[str, Any]]:
    """Ray options of each CPU flow actor: `cpu_flow_actors` of each alive node with a CPU, each
    pinned to its node, so that every node keeps a whole CPU for decode tasks (actors of a fraction
    of a CPU packed across nodes could leave no node a whole one, and decode would never be
    scheduled). Pinned hard: Ray 2.60 honours neither SPREAD nor a soft affinity for an actor that
    holds no CPU (a 1-CPU node's), and placed them all on one node; an actor of a lost node is not
    restarted."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    placement = [
        (node["NodeID"], *cpu_flow_actors(int(node["Resources"]["CPU"])))
        for node in ray.nodes() if node["Alive"] and node["Resources"].get("CPU", 0) >= 1
    ]  # fmt: skip
    return [
        {"num_cpus": share, "scheduling_strategy": NodeAffinitySchedulingStrategy(node, soft=False)}
        for node, actors, share in placement for _ in range(actors)
    ]  # fmt: skip


def cpu_flow_config(flow: FlowConfig) -> FlowConfig:
    """A CPU flow actor's config: Ray sets OMP_NUM_THREADS from num_cpus, so say how many threads
    torch uses (one per actor, unless asked)."""
    return dataclasses.replace(flow, cpu_threads=flow.cpu_threads or 1)


@dataclass(frozen=True)
class StageResources:
    """A job's graph: the Ray options of each flow actor (Ray Data map_batches arguments; none:
    no flow stage); `i3d_actors` of `i3d_options` each (extract; preprocess has none);
    `i3d_all_cores`: the CPU predictor runs torch on every core of its node."""

    flow_actor_options: list[dict[str, Any]]
    flow_cfg: FlowConfig
    i3d_actors: int
    i3d_options: dict[str, Any]
    i3d_all_cores: bool


def preprocess_stages(streams: tuple[str, ...], flow: FlowConfig) -> StageResources:
    """The flow actor pool of preprocess on the connected cluster: a whole GPU each, or CPU actors."""
    import ray

    gpus = int(ray.cluster_resources().get("GPU", 0))
    if "flow" not in streams:
        return StageResources([], flow, 0, {}, False)
    if flow_on_gpu(flow, gpus):
        return StageResources([{"num_gpus": 1, "num_cpus": 0}] * gpus, flow, 0, {}, False)
    return StageResources(cpu_flow_actor_options(), cpu_flow_config(flow), 0, {}, False)


def extract_stages(streams: tuple[str, ...], flow: FlowConfig) -> StageResources:
    """The flow and I3D actor pools of extract on the connected cluster (see the module docstring)."""
    import ray

    gpus = int(ray.cluster_resources().get("GPU", 0))
    flow_options: list[dict[str, Any]] = []
    flow_cfg, i3d_gpus = flow, 1.0
    if "flow" in streams and flow_on_gpu(flow, gpus):
        flow_options, i3d_gpus = [{"num_gpus": 0.5, "num_cpus": 0}] * gpus, 0.5
    elif "flow" in streams:
        flow_options, flow_cfg = cpu_flow_actor_options(), cpu_flow_config(flow)
    if gpus > 0:
        return StageResources(flow_options, flow_cfg, gpus, {"num_gpus": i3d_gpus, "num_cpus": 0}, False)
    return StageResources(flow_options, flow_cfg, 1, {"num_cpus": 0}, True)


def train_workers(num_workers: int | None, cpus_per_worker: int | None, loader_workers: int) -> tuple[int, bool, dict[str, float], int | None]:
    """(workers, use_gpu, resources per worker, torch threads per worker or None for the worker's
    own CPU count) of a Ray Train run on the connected cluster: one worker per GPU, each with its
    loader processes' CPUs; without GPUs one worker by default, whose torch threads use the node's
    cores, reserving at most the CPUs that are free, so a small machine never waits on its own
    reservation."""
    import ray

    gpus = int(ray.cluster_resources().get("GPU", 0))
    if gpus:
        workers = num_workers or gpus
        cpus = cpus_per_worker or loader_workers + 1
        return workers, True, {"CPU": cpus, "GPU": 1}, cpus
    workers = num_workers or 1
    free = max(1, int(ray.available_resources().get("CPU", 1)) // workers)
    return workers, False, {"CPU": min(cpus_per_worker or free, free)}, cpus_per_worker
