"""The config convention every stage follows.

- Each stage's settings are one dataclass. A field's help (its flag's help) and anything its flag
  does differently are declared with the field (``option``); the CLI generates one flag per field
  from them (``trajdata.cli.options``).
- Its ``__post_init__`` is the one place values are checked: first ``coerce_fields`` (types, so a
  TOML file, a flag and a Python caller meet the same one-line error), then ``require`` /
  ``choose`` / ``at_least``, whose errors name the field (``max_steps must be at least 1``); the
  CLI shows the field as its flag (``--max-steps must be at least 1``).
- A TOML file of a config's fields goes through ``read_toml`` and ``from_mapping`` (unknown keys
  are one line naming the key).
- A run directory holds the ``config.json`` of the run it belongs to: ``open_run_dir`` writes it for
  a new run, and for an existing one resumes only if every field outside ``resume_free`` is unchanged
  (otherwise one line names the first field that differs).
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import numbers
import os
import re
from pathlib import Path
from typing import Any, Iterable, Mapping

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


def option(default: Any = dataclasses.MISSING, help: str = "", *, default_factory: Any = dataclasses.MISSING,
           flag: str | None = None, choices: Iterable | None = None, count: bool = False, metavar: str | None = None,
           required: bool = False, cli: bool = True, finite: bool = True) -> Any:
    """A config field and its flag: ``help``; ``flag`` when the flag's name is not the field's
    (``--flag``, or ``--flag/--no-flag`` for a bool); ``choices`` shown in the help (``__post_init__``
    checks them); ``count`` accepts 10M / 250k / 1e6; ``required`` on the command line;
    ``cli=False`` keeps the field off the command line; ``finite=False`` lets a number be inf or nan."""
    meta = dict(help=help, flag=flag, choices=tuple(choices) if choices is not None else None, count=count,
                metavar=metavar, required=required, cli=cli, finite=finite)
    return dataclasses.field(default=default, default_factory=default_factory, metadata={"trajdata": meta})


def option_meta(fld: dataclasses.Field) -> dict:
    """What ``option`` declared for ``fld`` (defaults for a plain field)."""
    return fld.metadata.get("trajdata") or dict(help="", flag=None, choices=None, count=False, metavar=None,
                                                 required=False, cli=True, finite=True)


def copy_option(cls, name: str, **changes) -> Any:
    """Field ``name`` of dataclass ``cls`` (default and option metadata) for another config that
    passes it through (``BCConfig.heads = copy_option(NetHackConfig, "heads")``)."""
    fld = next(f for f in dataclasses.fields(cls) if f.name == name)
    meta = {**option_meta(fld), **changes}
    return option(fld.default, meta.pop("help"), default_factory=fld.default_factory, **meta)


_SCALARS = {"bool": bool, "int": int, "float": float, "str": str}
_WHAT = {"bool": "true or false", "int": "an integer", "float": "a number", "str": "text",
         "floats": "a comma-separated list of numbers", "count": "a count (like 10M, 250k, 1e6)"}


class NotFinite(ValueError):
    """A number that is inf or nan where the field needs a finite one."""


def field_kind(fld: dataclasses.Field) -> tuple[tuple[str, ...], bool]:
    """(kinds, optional) of a field from its annotation: kinds among bool, int, float, str, floats
    (``tuple[float, ...]``) and count (an int declared ``count``); () for anything else."""
    text = fld.type if isinstance(fld.type, str) else getattr(fld.type, "__name__", str(fld.type))
    parts = [p.strip() for p in text.split("|")]
    optional = "None" in parts
    kinds = tuple("floats" if p.replace(" ", "") == "tuple[float,...]" else p for p in parts if p != "None")
    if not all(k in _SCALARS or k == "floats" for k in kinds):
        return (), optional
    if kinds == ("int",) and option_meta(fld).get("count"):
        kinds = ("count",)
    return kinds, optional


def _coerce_one(kind: str, value, name: str, finite: bool = True):
    if kind == "bool":
        if isinstance(value, bool):
            return value
        if type(value).__name__ == "bool_":
            return bool(value)
        if isinstance(value, str) and value.strip().lower() in ("true", "false", "yes", "no", "1", "0", "on", "off"):
            return value.strip().lower() in ("true", "yes", "1", "on")
        raise ValueError
    if isinstance(value, bool) or type(value).__name__ == "bool_":
        raise ValueError
    if kind == "str":
        if isinstance(value, str):
            return value
        if isinstance(value, os.PathLike):
            return os.fspath(value)
        raise ValueError
    if kind == "count":
        return parse_count(value, name, signed=True)
    if kind == "int":
        if isinstance(value, numbers.Integral):
            return value if type(value) is int else int(value)
        if isinstance(value, numbers.Real) and float(value).is_integer():
            return int(value)
        if isinstance(value, str):
            return int(value.strip())
        raise ValueError
    if kind == "float":
        if isinstance(value, numbers.Real):
            out = value if type(value) is float else float(value)
        elif isinstance(value, str):
            out = float(value.strip())
        else:
            raise ValueError
        if finite and not math.isfinite(out):
            raise NotFinite(out)
        return out
    if kind == "floats":
        items = [x for x in value.split(",") if x.strip()] if isinstance(value, str) else value
        if not isinstance(items, (list, tuple)):
            raise ValueError
        return tuple(_coerce_one("float", x, name, finite) for x in items)
    raise ValueError


def coerce(cls, name: str, value):
    """``value`` as the type field ``name`` of ``cls`` declares (a flag's text, a TOML value, a
    Python value), or one ``ConfigError`` naming the field."""
    fld = next(f for f in dataclasses.fields(cls) if f.name == name)
    kinds, optional = field_kind(fld)
    if not kinds or (value is None and (optional or fld.default is None)):
        return value
    finite = option_meta(fld).get("finite", True)
    if len(kinds) > 1 and any(type(value) is _SCALARS.get(k) for k in kinds) and not (
            finite and isinstance(value, float) and not math.isfinite(value)):
        return value
    for kind in kinds:
        try:
            return _coerce_one(kind, value, name, finite)
        except NotFinite as e:
            raise ConfigError(f"{name} must be a finite number (got {e.args[0]})", field=name) from None
        except (ValueError, TypeError):
            continue
    raise ConfigError(f"{name} must be {' or '.join(_WHAT[k] for k in kinds)} (got {value!r})", field=name)


def coerce_fields(cfg) -> None:
    """Give every field of ``cfg`` its declared type (``coerce``): the first line of ``__post_init__``."""
    for fld in dataclasses.fields(cfg):
        value = getattr(cfg, fld.name)
        new = coerce(type(cfg), fld.name, value)
        if new is not value:
            object.__setattr__(cfg, fld.name, new)


_COUNT = re.compile(r"^\s*(-?)\s*([0-9][0-9_]*(?:\.[0-9]*)?|\.[0-9]+)(e[+-]?[0-9]+)?\s*([kmbgt]?)\s*$", re.IGNORECASE)
_SUFFIX = {"": 1, "k": 10**3, "m": 10**6, "b": 10**9, "g": 10**9, "t": 10**12}


def parse_count(text: str | int | float, field: str = "count", whole: bool = True, positive: bool = False,
                signed: bool = False) -> int:
    """``"10M"``, ``"250k"``, ``"1.5e6"``, ``"1_000"``, ``2e9`` -> int; ``whole``: a fraction is an
    error (else rounded); ``positive``: 0 is an error; ``signed``: a negative count is returned (for
    the caller's range check, which names the bound) instead of refused here."""
    if isinstance(text, bool) or not isinstance(text, (str, numbers.Real)):
        raise ConfigError(f"{field} {text!r} is not a count (like 10M, 250k, 1.5e6)", field=field)
    if isinstance(text, numbers.Integral):
        value = int(text)
    elif isinstance(text, numbers.Real):
        value = float(text)
    else:
        m = _COUNT.match(text)
        if m is None:
            raise ConfigError(f"{field} {text!r} is not a count (like 10M, 250k, 1.5e6)", field=field)
        value = float(m.group(1) + m.group(2).replace("_", "") + (m.group(3) or "")) * _SUFFIX[m.group(4).lower()]
    if not math.isfinite(value):
        raise ConfigError(f"{field} {text!r} is not a count (like 10M, 250k, 1.5e6)", field=field)
    if (value < 0 and not signed) or (positive and value == 0):
        raise ConfigError(f"{field} must be {'positive' if positive else 'at least 0'} (got {text!r})", field=field)
    if whole and value != int(value):
        raise ConfigError(f"{field} {text!r} is not a whole count", field=field)
    return value if isinstance(value, int) else int(round(value))


def read_toml(path: str | os.PathLike, what: str = "config file") -> dict:
    """A TOML file as a dict; a missing or malformed file is one line naming it."""
    import tomllib

    p = Path(path)
    try:
        return tomllib.loads(p.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{what} {p} does not exist", field="config") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError, IsADirectoryError) as e:
        raise ConfigError(f"{what} {p} is not valid TOML ({e})", field="config") from None


def check_keys(cls, data: Mapping, where: str, table: str | None = None) -> None:
    """Every key of ``data`` (TOML table ``table`` of file ``where``) is a field of ``cls``, else one
    line naming the first that is not."""
    bad = sorted(set(data) - {f.name for f in dataclasses.fields(cls)})
    if bad:
        in_table = f" in [{table}]" if table else ""
        raise ConfigError(f"{where}: unknown key {bad[0]!r}{in_table} (not a field of {cls.__name__})", field="config")


def from_mapping(cls, data: Mapping, where: str, **overrides):
    """``cls`` from a mapping of its fields (a TOML table), then ``overrides``; unknown keys and
    wrong types are one-line ``ConfigError``s."""
    check_keys(cls, data, where)
    return cls(**{**data, **overrides})


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


DEVICE = re.compile(r"^(cpu|cuda(:[0-9]+)?|mps)$")


PRECISIONS = ("auto", "bf16", "fp32")


def uses_bf16(precision: str, device_type: str) -> bool:
    """Whether a run of ``precision`` (auto: bf16 autocast on CUDA, fp32 elsewhere) computes under bf16 autocast."""
    return precision == "bf16" or (precision == "auto" and device_type == "cuda")


def precision_context(precision: str, device):
    """A reusable context for a run's forward: bf16 autocast on ``device`` where ``uses_bf16``, else a no-op."""
    import torch

    if uses_bf16(precision, device.type):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def check_device(device: str, field: str = "device") -> None:
    """One line for a torch device this machine does not have (``cuda`` without a usable GPU, a GPU
    index past the last): checked before any work starts."""
    import torch

    require(bool(DEVICE.match(device)), field, f"{device!r}: use cpu, cuda, cuda:N or mps")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"{field} {device!r} was asked for, but this machine has no usable CUDA GPU "
                          f"(use --{field} cpu)", field=field)
    if device.startswith("cuda:") and int(device[5:]) >= torch.cuda.device_count():
        raise ConfigError(f"{field} {device!r}: this machine has {torch.cuda.device_count()} CUDA GPU(s)", field=field)
    if device == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"{field} 'mps' was asked for, but this machine has no MPS device (use --{field} cpu)",
                          field=field)


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


def file_sha256(path: str | os.PathLike) -> str:
    """The hex SHA-256 of a file's bytes (read in 1 MiB blocks)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def read_run_config(out: str | os.PathLike) -> dict | None:
    """The config.json of the run in ``out`` (None: there is none); not JSON is a one-line ``DataError``."""
    path = Path(out) / CONFIG_JSON
    try:
        old = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (ValueError, UnicodeDecodeError):
        raise DataError(f"{path} is not valid JSON") from None
    return old if isinstance(old, dict) else None


def open_run_dir(out: str | os.PathLike, config: dict, resume_free: Iterable[str] = (), what: str = "run",
                 started: bool = True) -> bool:
    """Create run directory ``out`` for ``config`` (a JSON-able dict), or check that the run already
    there has the same config but for the ``resume_free`` fields (then its config.json is updated to
    the new values of those). The run is its directory: ``out`` as typed is always free, so a run
    resumes under another spelling of its path or after it was moved. ``started=False`` (the run
    there left nothing but its config: it failed before its first step) lets a corrected config
    replace the old one. Returns whether an existing run is being resumed."""
    out = Path(out)
    path = out / CONFIG_JSON
    free = set(resume_free) | {"out"}
    resumed = path.is_file() and started
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


class DirLock:
    """An exclusive ``flock`` on ``DIR/<name>`` naming its holder (pid and host) in the file. The
    kernel drops it when the holder dies, so a killed command never blocks a rerun. Use as a context
    manager or ``close()`` it."""

    def __init__(self, out: str | os.PathLike, name: str, what: str, doing: str):
        import fcntl
        import socket

        out = Path(out)
        try:
            out.mkdir(parents=True, exist_ok=True)
            self.file = open(out / name, "a+")
        except OSError as e:
            raise write_error(e, out / name) from None
        try:
            fcntl.flock(self.file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self.file.seek(0)
            holder = self.file.read().split()
            self.file.close()
            who = f"pid {holder[0]} on {holder[1]}" if len(holder) >= 2 else "another process"
            raise DataError(f"{out} is being {doing} by another {what} ({who}); "
                            f"wait for it to finish or use another --out") from None
        self.file.seek(0)
        self.file.truncate()
        self.file.write(f"{os.getpid()} {socket.gethostname()}\n")
        self.file.flush()

    def close(self) -> None:
        self.file.close()

    def __enter__(self) -> DirLock:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def lock_dir(out: str | os.PathLike, what: str, doing: str = "written", name: str | None = None) -> DirLock:
    """Hold directory ``out`` for one ``what`` command (``"train bc"``, ``"eval"``, ``"sweep"``,
    ``"collect"``) at a time: a second one into the same directory is one line naming the first's
    pid (``<out> is being <doing> by another <what> (pid 123 on host)``). The lock file is
    ``out/<name>`` [``<first word of what>.lock``]."""
    return DirLock(out, name or f"{what.split()[0]}.lock", what, doing)
