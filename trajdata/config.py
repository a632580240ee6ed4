"""The config convention every stage follows.

- Each stage's settings are one dataclass; its ``__post_init__`` is the one place they are
  validated, with ``require`` / ``choose``, whose errors name the field (``max_steps must be at
  least 1``). The CLI takes its defaults from the dataclass and shows fields as flags
  (``--max-steps must be at least 1``).
- A run directory holds the ``config.json`` of the run it belongs to: ``open_run_dir`` writes it for
  a new run, and for an existing one resumes only if every field outside ``resume_free`` is unchanged
  (otherwise one line names the first field that differs).
"""
from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any, Iterable

from trajdata.errors import ConfigError, DataError, write_error

CONFIG_JSON = "config.json"


def require(ok: bool, field: str, message: str) -> None:
    """Raise ``ConfigError("<field> <message>")`` unless ``ok``."""
    if not ok:
        raise ConfigError(f"{field} {message}", field=field)


def at_least(cfg, low, *names: str, optional: bool = False) -> None:
    """Each named field of ``cfg`` is >= ``low`` (``None`` allowed if ``optional``)."""
    for name in names:
        v = getattr(cfg, name)
        if v is None and optional:
            continue
        require(v is not None and v >= low, name, f"must be at least {low} (got {v})")


def choose(value, choices: Iterable, field: str) -> None:
    choices = list(choices)
    require(value in choices, field, f"{value!r}: choose one of {', '.join(map(str, choices))}")


def default(cls, name: str) -> Any:
    """The default of dataclass field ``name`` (for CLI options)."""
    for f in dataclasses.fields(cls):
        if f.name == name:
            if f.default is not dataclasses.MISSING:
                return f.default
            if f.default_factory is not dataclasses.MISSING:
                return f.default_factory()
            raise KeyError(f"{cls.__name__}.{name} has no default")
    raise KeyError(f"{cls.__name__} has no field {name!r}")


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``path`` through ``path.tmp`` + fsync + rename (the temp file is removed on failure)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise write_error(e, path) from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def open_run_dir(out: str | os.PathLike, config: dict, resume_free: Iterable[str] = (), what: str = "run") -> bool:
    """Create run directory ``out`` for ``config`` (a JSON-able dict), or check that the run already
    there has the same config but for the ``resume_free`` fields (then its config.json is updated to
    the new values of those). Returns whether an existing run is being resumed."""
    out = Path(out)
    path = out / CONFIG_JSON
    free = set(resume_free)
    resumed = path.is_file()
    if resumed:
        try:
            old = json.loads(path.read_text())
        except ValueError:
            raise DataError(f"{path} is not valid JSON") from None
        if not isinstance(old, dict):
            raise DataError(f"{path} is not a {what} config (not a JSON object)")
        new = json.loads(json.dumps(config))
        for k in sorted(set(old) | set(new)):
            if k not in free and old.get(k) != new.get(k):
                raise ConfigError(f"{out} holds a {what} with {k}={old.get(k)!r}, not {new.get(k)!r}; "
                                  f"use another --out to start a new {what}", field=k)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(config, indent=2, sort_keys=True) + "\n")
    return resumed
