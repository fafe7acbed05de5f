"""What every job shares at run time: Ray start-up and the output-directory lock."""

from __future__ import annotations

import fcntl
import logging
import os
import re
import secrets
import shutil
import socket
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from quovadis.pipeline.errors import LockError, QuovadisError

log = logging.getLogger(__name__)

LOCK_NAME = ".quovadis.lock"
_MARKER = ".quovadis-shared-"  # check_shared_out's files, removed when it returns


# Ray's retries of work lost with a process (a worker, an actor, a node): tasks are resubmitted and
# actors restarted with their in-flight calls redone. An exception our own code raises (a bad file)
# is never retried: retry_exceptions stays False, so it fails its video once, with its reason.
TASK_RETRIES = 3
ACTOR_RESTARTS = 3


def init_ray(address: str | None = None, num_cpus: int | None = None) -> None:
    """Join the cluster at `address`, or start a quiet embedded local Ray (no dashboard).

    A Ray already initialised in this process (tests share one per session) is reused.
    """
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    kwargs: dict = {"logging_level": logging.ERROR, "log_to_driver": False, "include_dashboard": False}
    if address:
        _check_reachable(address)
        try:
            with tempfile.TemporaryDirectory(prefix="quovadis-code-") as tmp:  # uploaded by ray.init
                ray.init(address=address, runtime_env=code_runtime_env(Path(tmp)), **kwargs)
        except (ConnectionError, RuntimeError) as e:
            cause = str(e.__cause__ or e).strip().splitlines()[0]  # e.g. Ray's token-authentication hint
            raise QuovadisError(f"cannot join the Ray cluster at {address}: {cause}") from e
    else:
        # Ray Train's controller polls its workers this often (default 2 s); each poll can add its
        # wait to a run's start and end: 2-4 s less per one-epoch run here. Read by the Ray
        # processes that this embedded Ray starts; a cluster given by --address keeps its own.
        os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.25")
        ray.init(num_cpus=num_cpus, **kwargs)
    import ray.data

    ray.data.DataContext.get_current().enable_progress_bars = False  # the job shows its own bar
    logging.getLogger("ray.data").setLevel(logging.ERROR)  # not lines per dataset run; our report says what failed


def code_runtime_env(tmp: Path) -> dict:
    """A Ray runtime_env that ships this quovadis code to every worker of a cluster, so nodes where
    it is not installed can run our tasks (and nodes where it is run this very version).

    Ray's `py_modules` uploads directories and imports each under its own name, but the source
    folders are named `pipeline/`, `models/`, `jobs/` (pyproject package-dir), so a real
    `quovadis/` tree is assembled in `tmp` from the imported packages first.
    """
    import quovadis
    import quovadis.jobs
    import quovadis.models
    import quovadis.pipeline

    tree = tmp / "quovadis"
    skip = shutil.ignore_patterns("__pycache__", "*.pyc")
    shutil.copytree(Path(quovadis.__file__).parent, tree, ignore=skip)
    for package in (quovadis.pipeline, quovadis.models, quovadis.jobs):
        shutil.copytree(Path(package.__file__).parent, tree / package.__name__.split(".")[-1], ignore=skip, dirs_exist_ok=True)
    return {"py_modules": [str(tree)]}


def _check_reachable(address: str, timeout_s: float = 5.0) -> None:
    """Fail fast on a HOST:PORT nobody listens at (ray.init would retry for minutes)."""
    m = re.fullmatch(r"(?:ray://)?\[?([^\]]+?)\]?:(\d+)", address)
    if m is None:
        return  # "auto" and other forms are Ray's to resolve
    try:
        socket.create_connection((m[1], int(m[2])), timeout=timeout_s).close()
    except OSError as e:
        raise QuovadisError(f"cannot join the Ray cluster at {address}: {e.strerror or e}") from e


def check_shared_out(out_dir: Path) -> None:
    """Fail fast unless every node of the cluster sees `out_dir` and can write there: the workers
    write shards and features where their data is, so OUT must be one shared file system path.

    The driver leaves a marker with a random token in `out_dir`; a task on each node reads it back
    and writes a file of its own (a node with another directory of that name has no marker)."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    token = secrets.token_hex(8)
    marker = out_dir / f"{_MARKER}{token}"
    marker.write_text(token)
    try:
        probe = ray.remote(num_cpus=0, max_retries=TASK_RETRIES)(out_dir_problem)
        refs = {
            node["NodeID"]: probe.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node["NodeID"], soft=False)).remote(str(out_dir), token)
            for node in ray.nodes() if node["Alive"]
        }  # fmt: skip
        problems = [f"node {node[:12]} {problem}" for node, problem in zip(refs, ray.get(list(refs.values()))) if problem]
    finally:
        marker.unlink(missing_ok=True)
    if problems:
        raise QuovadisError(
            f"--out {out_dir} must be one directory that every node of the cluster sees and can write "
            f"(a shared file system): {'; '.join(problems)}"
        )


def out_dir_problem(out_dir: str, token: str) -> str | None:
    """Why this process's node cannot use `out_dir` as the job's output directory, or None."""
    try:
        seen = (Path(out_dir) / f"{_MARKER}{token}").read_text()
    except OSError as e:
        return f"does not see the driver's {out_dir} ({e.strerror or e})"
    if seen != token:
        return f"has another {out_dir} than the driver"
    probe = Path(out_dir) / f"{_MARKER}{token}-{socket.gethostname()}-{os.getpid()}"
    try:
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        return f"cannot write in {out_dir} ({e.strerror or e})"
    return None


@contextmanager
def out_dir_lock(out_dir: Path) -> Iterator[None]:
    """Hold an exclusive lock on `out_dir` for the whole job.

    flock is released by the kernel when the process dies (even by SIGKILL), so a crashed job
    never leaves a stale lock; a second live job on the same directory is refused.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / LOCK_NAME
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as e:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
            raise LockError(
                f"{out_dir} is in use by another quovadis job (pid {holder}); "
                "wait for it to finish or choose another --out"
            ) from e
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        yield
    finally:
        os.close(fd)
