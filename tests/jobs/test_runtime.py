"""Joining a Ray cluster fails fast and clearly when nothing listens at the address."""

import socket
import subprocess
import sys
from pathlib import Path

import pytest

from quovadis.jobs.runtime import _check_reachable, code_runtime_env
from quovadis.pipeline.errors import QuovadisError
from tests.conftest import REPO


def test_unreachable_cluster_address_is_a_clear_error():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound but not listening: connections are refused
        with pytest.raises(QuovadisError, match=f"cannot join the Ray cluster at 127.0.0.1:{port}"):
            _check_reachable(f"127.0.0.1:{port}", timeout_s=2)


def test_listening_address_passes_and_other_forms_are_left_to_ray():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        _check_reachable(f"127.0.0.1:{s.getsockname()[1]}")
    _check_reachable("auto")


# A driver that joins a fresh one-node cluster through init_ray(address) and asks a task where the
# quovadis it imports lives.
_CLUSTER_DRIVER = """
import ray
from ray.cluster_utils import Cluster
from quovadis.jobs.runtime import init_ray

cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
try:
    init_ray(cluster.address)

    @ray.remote
    def where() -> str:
        import quovadis.pipeline.conventions
        return quovadis.pipeline.conventions.__file__

    print(ray.get(where.remote()))
finally:
    ray.shutdown()
    cluster.shutdown()
"""


def test_cluster_workers_import_the_shipped_code_not_the_install(tmp_path):
    """With an address, init_ray ships quovadis as a py_modules runtime_env, so a worker on a node
    without it imports the uploaded copy (in Ray's runtime_resources), here even beside the install.
    The driver runs outside the repo: Ray puts the driver's directory on the workers' sys.path."""
    result = subprocess.run([sys.executable, "-c", _CLUSTER_DRIVER], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    path = Path(result.stdout.strip().splitlines()[-1])
    assert "runtime_resources" in path.parts and path.parts[-3:] == ("quovadis", "pipeline", "conventions.py")
    assert REPO not in path.parents


def test_code_runtime_env_is_a_quovadis_tree(tmp_path):
    """py_modules imports a directory under its own name: the tree is `quovadis/` with its subpackages."""
    env = code_runtime_env(tmp_path)
    (tree,) = map(Path, env["py_modules"])
    assert tree.name == "quovadis"
    for module in ("__init__.py", "pipeline/conventions.py", "models/i3d.py", "jobs/cli.py"):
        assert (tree / module).is_file(), module


def test_out_dir_problem_names_a_node_that_does_not_share_out(tmp_path):
    """The check each node runs for check_shared_out: it must find the driver's marker (same
    directory, a shared file system) and be able to write beside it."""
    from quovadis.jobs.runtime import out_dir_problem

    token = "0123abcd"
    assert "does not see the driver's" in out_dir_problem(str(tmp_path / "elsewhere"), token)
    assert "does not see the driver's" in out_dir_problem(str(tmp_path), token)  # no marker: another file system
    (tmp_path / f".quovadis-shared-{token}").write_text("ffff0000")
    assert "another" in out_dir_problem(str(tmp_path), token)
    (tmp_path / f".quovadis-shared-{token}").write_text(token)
    assert out_dir_problem(str(tmp_path), token) is None
    assert sorted(p.name for p in tmp_path.iterdir()) == [f".quovadis-shared-{token}"]  # its own probe file is gone


def test_check_shared_out_passes_on_one_node_and_leaves_nothing(ray_session, tmp_path):
    from quovadis.jobs.runtime import check_shared_out

    check_shared_out(tmp_path)
    assert list(tmp_path.iterdir()) == []
