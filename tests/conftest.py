"""Session-wide fixtures: the shared test data beside the project, and one Ray for the whole run."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"


def shared_path(*parts: str) -> Path:
    """A path under ../shared, or skip the test saying what is missing."""
    path = SHARED.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"test data {path} is absent (../shared beside the project root holds it)")
    return path


@pytest.fixture(scope="session")
def ray_session():
    """One embedded Ray for the whole test session (ray.init costs ~2 s)."""
    import ray

    from quovadis.jobs.runtime import init_ray

    init_ray(num_cpus=2)
    yield ray
    ray.shutdown()


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA; torch.cuda.is_available() is false")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
