"""Errors users see as one line (the CLI prints `trajdata: error: <message>` and exits 1)."""
from __future__ import annotations

import errno


class TrajdataError(Exception):
    """Base class: a problem with the user's input or data, reported without a traceback."""


class DataError(TrajdataError):
    """A shard, index or dataset directory is missing, corrupt, truncated or of another version."""


class ConfigError(TrajdataError):
    """A flag, option or configuration value is invalid.

    ``field`` names the config field the message is about (and which the message names): the CLI
    shows it as the command's flag (``max_steps`` -> ``--max-steps``)."""

    def __init__(self, message: str, field: str | None = None):
        super().__init__(message)
        self.field = field


class ExpertError(TrajdataError):
    """An expert is missing, not installed or failed to start."""


class WorkerError(TrajdataError):
    """A worker process died (a signal, a crash inside a native library): what it finished is kept."""


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread so that it cleans up like Ctrl-C (the CLI says "terminated")."""


class ExtraError(TrajdataError):
    """An optional dependency (a `trajdata[extra]`) is not installed."""


# extra -> the top-level modules it installs (pyproject.toml's optional dependencies).
EXTRAS = {
    "nethack": ("nle", "gymnasium"),
    "atari": ("ale_py", "stable_baselines3", "gymnasium", "cv2"),
    "train": ("torch", "tensorboard"),
    "ray": ("ray",),
    "rl": ("torchrl", "tensordict"),
    "scaling": ("scipy", "pandas", "matplotlib", "threadpoolctl"),
    "minari": ("minari", "PIL"),
    "autoascend": ("scipy", "cv2", "nltk", "toolz", "matplotlib", "seaborn"),
}


def missing_extra(err: ModuleNotFoundError, what: str, extras: tuple[str, ...] = ()) -> ExtraError:
    """One-line error for ``what`` failing to import an optional dependency, naming the extra that
    installs it (one of ``extras``, what needs it, if that extra has it)."""
    module = (err.name or "").split(".")[0]
    extra = next((e for e in extras if module in EXTRAS.get(e, ())), None)
    extra = extra or next((e for e, mods in EXTRAS.items() if module in mods), None)
    if extra is None:
        return ExtraError(f"{what} cannot import {module or err} (is trajdata installed completely?)")
    return ExtraError(f"{what} needs the {extra} extra (no module {module!r}): pip install 'trajdata[{extra}]'")


# errno values that mean "no room to write": a full disk, a file size limit (RLIMIT_FSIZE) or a quota.
DISK_FULL = frozenset({errno.ENOSPC, errno.EFBIG, getattr(errno, "EDQUOT", errno.ENOSPC)})


def write_error(err: OSError, path) -> DataError:
    """One-line error for failing to write ``path`` (no space, file too large, quota, I/O error ...)."""
    why = err.strerror or str(err)
    hint = "; free some space and rerun" if err.errno in DISK_FULL else ""
    return DataError(f"cannot write {path}: {why}{hint}")
