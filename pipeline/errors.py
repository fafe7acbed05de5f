"""Exceptions of quovadis. Messages name the file and the cause; the CLI maps them to exit codes."""


class QuovadisError(Exception):
    """Base of every error quovadis raises on purpose."""


class ConfigError(QuovadisError, ValueError):
    """A bad option or argument (the CLI exits with status 2)."""


class DecodeError(QuovadisError):
    """A file that cannot be probed or decoded as video."""


class FlowError(QuovadisError):
    """Optical flow could not be computed."""


class ShardError(QuovadisError):
    """A shard or manifest that cannot be written or read."""


class LockError(QuovadisError):
    """Another job holds the output directory."""


class WeightsError(QuovadisError):
    """Model weights that are missing or do not fit the model."""
