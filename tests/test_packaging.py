"""What a wheel installs: setuptools takes only the packages pyproject.toml lists (the folders are
mapped under `quovadis.`), so a package folder missing from the list works in the editable
checkout and is absent from a user's `pip install .`."""

import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_every_package_folder_is_listed_in_pyproject():
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    found = set()
    for name, folder in setuptools["package-dir"].items():
        for init in (ROOT / folder).rglob("__init__.py"):
            parts = init.parent.relative_to(ROOT / folder).parts
            found.add(".".join((name, *parts)))
    assert "quovadis.jobs.bench" in found  # the folder the list once missed
    assert sorted(setuptools["packages"]) == sorted(found)
