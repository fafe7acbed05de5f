"""Joining a Ray cluster fails fast and clearly when nothing listens at the address."""

import socket

import pytest

from quovadis.jobs.runtime import _check_reachable
from quovadis.pipeline.errors import QuovadisError


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
