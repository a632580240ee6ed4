"""BC checkpoints: one file holds everything a resume or an evaluation needs.

A checkpoint is a ``torch.save`` dict:

    format, version        "trajdata-bc", 1
    family                 "nethack" | "atari"
    model_config           the model's config dataclass as a dict
    model                  the model's state_dict (the unwrapped module, never DDP/compiled)
    dataset                {"root", "env", "schema", "expert", "frame_stack", "fields"}: what it was trained on
    train                  the BCConfig as a dict
    step, samples, flops   optimizer steps, training samples and training FLOPs (paper counting) so far
    budget                 the FLOP budget this snapshot is for (None for the rolling resume checkpoint)
    params                 effective parameters N
    val                    the validation loss, its SE, accuracy, episodes and steps (budget snapshots)
    optimizer, loader, rng, ema, carried   resume state (only in the rolling checkpoint): AdamW, loader
                           position, RNG states, the averaged weights (--ema) and the model state
                           carried from one lanes batch to the next

A run directory ``RUN/`` holds ``config.json``, ``checkpoint.pt`` (rolling, for resume),
``snapshots/budget-<C>.pt`` (one per FLOP budget reached), ``runs.csv`` and ``metrics.jsonl``.
"""
from __future__ import annotations

import io
import json
import os
import re
from dataclasses import asdict
from pathlib import Path

import torch

from trajdata.config import atomic_write_bytes
from trajdata.errors import DataError
from trajdata.models.atari import AtariConfig, AtariModel
from trajdata.models.nethack import NetHackConfig, NetHackModel

FORMAT = "trajdata-bc"
VERSION = 1
FAMILIES = {"nethack": (NetHackConfig, NetHackModel), "atari": (AtariConfig, AtariModel)}
LATEST = "checkpoint.pt"
SNAPSHOTS = "snapshots"
RUNS_CSV = "runs.csv"
METRICS = "metrics.jsonl"
_SNAP = re.compile(r"^budget-(.+)\.pt$")


def family_of(cfg) -> str:
    return "atari" if isinstance(cfg, AtariConfig) else "nethack"


def build_model(family: str, model_config: dict):
    """The model of ``family`` with ``model_config`` (a dict of its config dataclass)."""
    if family not in FAMILIES:
        raise DataError(f"unknown model family {family!r} (expected one of {', '.join(FAMILIES)})")
    cfg_cls, model_cls = FAMILIES[family]
    return model_cls(cfg_cls(**model_config))


def budget_name(budget: float) -> str:
    """``2e+13`` -> ``budget-2e13.pt``: a file name that reads back as exactly the budget."""
    from decimal import Decimal

    mant, exp = format(Decimal(repr(float(budget))).normalize(), "E").split("E")
    return f"budget-{mant}e{int(exp)}.pt"


def snapshot_path(run: str | os.PathLike, budget: float) -> Path:
    return Path(run) / SNAPSHOTS / budget_name(budget)


def snapshots(run: str | os.PathLike) -> list[tuple[float, Path]]:
    """The run's budget snapshots as (budget, path), ascending by budget."""
    d = Path(run) / SNAPSHOTS
    found = []
    for p in d.glob("budget-*.pt") if d.is_dir() else ():
        m = _SNAP.match(p.name)
        if m:
            try:
                found.append((float(m.group(1)), p))
            except ValueError:
                continue
    return sorted(found)


def save(path: str | os.PathLike, ckpt: dict) -> None:
    """Write ``ckpt`` atomically (temp file + fsync + rename)."""
    buf = io.BytesIO()
    torch.save(dict(ckpt, format=FORMAT, version=VERSION), buf)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, buf.getvalue())


def load(path: str | os.PathLike, map_location="cpu") -> dict:
    """Read a checkpoint; a missing, truncated or foreign file is a one-line ``DataError``."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"checkpoint {path} does not exist")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as e:
        raise DataError(f"checkpoint {path} is corrupt or truncated ({type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''})") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise DataError(f"{path} is not a trajdata BC checkpoint")
    if ckpt.get("version") != VERSION:
        raise DataError(f"checkpoint {path} has version {ckpt.get('version')!r}; this trajdata reads {VERSION}")
    return ckpt


def resolve(target: str | os.PathLike, budget: float | None = None) -> list[Path]:
    """Checkpoint files named by ``target``: a ``.pt`` file, or a run directory (its snapshot for
    ``budget``; without one, its latest snapshot, else its rolling checkpoint)."""
    target = Path(target)
    if target.is_file():
        return [target]
    if not target.is_dir():
        raise DataError(f"{target} is neither a checkpoint file nor a run directory")
    snaps = snapshots(target)
    if budget is not None:
        hit = [p for b, p in snaps if abs(b - budget) <= 1e-9 * max(abs(b), 1.0)]
        if not hit:
            have = ", ".join(f"{b:g}" for b, _ in snaps) or "none"
            raise DataError(f"run {target} has no snapshot for budget {budget:g} (it has: {have})")
        return hit
    if snaps:
        return [snaps[-1][1]]
    if (target / LATEST).is_file():
        return [target / LATEST]
    raise DataError(f"run {target} has no checkpoint yet ({LATEST} or {SNAPSHOTS}/)")


def load_model(path: str | os.PathLike, device="cpu"):
    """(model in eval mode on ``device``, checkpoint dict without the resume state)."""
    ckpt = load(path)
    try:
        model = build_model(ckpt["family"], ckpt["model_config"])
        model.load_state_dict(ckpt["model"])
    except (KeyError, TypeError, RuntimeError) as e:
        raise DataError(f"checkpoint {path} does not hold a loadable model ({type(e).__name__}: {str(e).splitlines()[0][:120]})") from None
    for k in ("optimizer", "loader", "rng", "ema", "carried"):
        ckpt.pop(k, None)
    return model.to(device).eval(), ckpt


def model_record(model) -> dict:
    """The model part of a checkpoint for ``model`` (unwrapping DDP and torch.compile)."""
    inner = getattr(model, "module", model)
    inner = getattr(inner, "_orig_mod", inner)
    return dict(family=family_of(inner.cfg), model_config=asdict(inner.cfg), model=inner.state_dict())


# ---- RUN/runs.csv: one row per budget snapshot, in the columns `trajdata scaling fit` reads -------

# flops is the budget (runs at one budget share it, as isoFLOP fits need); flops_actual = samples x FLOPs/sample
RUN_COLUMNS = ("run", "budget", "params", "samples", "flops", "flops_actual", "loss", "loss_se", "val_episodes",
               "family", "width", "layers", "core", "checkpoint")
EVAL_COLUMNS = ("return", "return_se", "episodes")


def episode_losses_cell(per_episode) -> str:
    """The runs.csv ``val_episode_losses`` cell (written last in a row, as it is long) of
    [(episode, mean loss, steps), ...]: "EPISODE:LOSS:STEPS ...". The scaling bootstrap resamples these
    episodes; EPISODE is the episode's index in the validation split, the same for runs on one dataset."""
    return " ".join(f"{e}:{v:.7g}:{int(n)}" for e, v, n in per_episode)


def read_runs(path: str | os.PathLike) -> list[dict]:
    """Rows of a runs.csv as dicts of strings ([] when it does not exist); a file that is not such a
    table is one line naming it."""
    import csv

    path = Path(path)
    if not path.is_file():
        return []
    try:
        with open(path, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
    except (UnicodeDecodeError, csv.Error) as e:
        raise DataError(f"{path} is not a runs table ({type(e).__name__}: {str(e)[:80]})") from None
    if rows and not {"run", "budget"} <= set(rows[0]):
        raise DataError(f"{path} is not a runs table (no run and budget columns)")
    return rows


def write_runs(path: str | os.PathLike, rows: list[dict]) -> None:
    """Write rows atomically; columns: RUN_COLUMNS, then EVAL_COLUMNS, then any others, in order seen."""
    import csv

    cols = list(RUN_COLUMNS)
    if any(any(r.get(c) not in (None, "") for c in EVAL_COLUMNS) for r in rows):
        cols += list(EVAL_COLUMNS)
    for r in rows:
        cols += [c for c in r if c not in cols]
    buf = io.StringIO()
    w = csv.DictWriter(buf, cols, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({c: "" if r.get(c) is None else r.get(c) for c in cols})
    atomic_write_bytes(Path(path), buf.getvalue().encode())


def snapshot_row(record: dict, path: str | os.PathLike, run: str | os.PathLike) -> dict:
    """The runs.csv row of a budget snapshot: ``record`` is what its checkpoint file ``path`` holds."""
    mcfg, val, budget = record["model_config"], record.get("val") or {}, float(record["budget"])
    return dict(run=record["train"]["run_id"], budget=repr(budget), params=record["params"], samples=record["samples"],
                flops=repr(budget), flops_actual=f"{record['flops']:.6g}",
                loss=f"{val['loss']:.6f}" if val else "", loss_se=f"{val['loss_se']:.6f}" if val else "",
                val_episodes=val.get("episodes", ""), family=record["family"], width=mcfg["width"],
                layers=mcfg.get("layers", ""), core=mcfg.get("core", "cnn"),
                checkpoint=os.path.relpath(path, run),
                val_episode_losses=episode_losses_cell(val.get("per_episode", ())) if val else "")


def upsert_run(path: str | os.PathLike, row: dict, key=("run", "budget")) -> None:
    """Add ``row`` to runs.csv, replacing (merging into) the row with the same ``key`` values (under a
    lock: `train bc` and `eval` may update one run's table at once)."""
    import fcntl

    path = Path(path)
    with open(path.with_name(path.name + ".lock"), "a") as lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
        _upsert(path, row, key)


def _upsert(path: Path, row: dict, key) -> None:
    rows = read_runs(path)
    ident = tuple(str(row[k]) for k in key)
    for r in rows:
        if tuple(str(r.get(k)) for k in key) == ident:
            r.update({k: v for k, v in row.items()})
            break
    else:
        rows.append(dict(row))
    write_runs(path, rows)


def tensorboard(run: Path, enabled: bool):
    """A TensorBoard writer into ``run/tb`` (None when off or tensorboard is not installed)."""
    if not enabled:
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except Exception:
        return None
    return SummaryWriter(str(run / "tb"))


def read_metrics(path: Path, up_to_step: int) -> list[str]:
    """The rows of metrics.jsonl up to ``up_to_step`` (a torn last line of a killed run is dropped)."""
    if not path.is_file():
        return []
    keep = []
    for ln in path.read_text(errors="replace").splitlines():
        try:
            row = json.loads(ln)
        except ValueError:
            continue
        if isinstance(row, dict) and isinstance(row.get("step"), int) and row["step"] <= up_to_step:
            keep.append(ln)
    return keep
