"""Errors users see as one line (the CLI prints `trajdata: error: <message>` and exits 1)."""


class TrajdataError(Exception):
    """Base class: a problem with the user's input or data, reported without a traceback."""


class DataError(TrajdataError):
    """A shard, index or dataset directory is missing, corrupt, truncated or of another version."""


class ConfigError(TrajdataError):
    """A flag, option or configuration value is invalid."""


class ExpertError(TrajdataError):
    """An expert is missing, not installed or failed to start."""
