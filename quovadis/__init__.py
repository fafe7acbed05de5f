"""quovadis: video archives to two-stream I3D inputs (RGB + TV-L1 flow) and features, on Ray.

The repository's top-level folders `pipeline/`, `models/` and `jobs/` install as
`quovadis.pipeline`, `quovadis.models` and `quovadis.jobs` (pyproject `package-dir`), so they
never collide with a user's own `models/` package.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("quovadis")
except PackageNotFoundError:  # run from a source tree that was never installed
    __version__ = "0+unknown"
