"""Read a runs table: one row per evaluated checkpoint (params, samples, FLOPs, loss, return)."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from trajdata.errors import ConfigError, DataError

# role -> accepted column names, first match wins (the first name is the canonical one)
COLUMN_ALIASES: dict[str, tuple[str, ...]] = {
    "flops": ("flops", "compute", "flop_budget"),
    "params": ("params", "parameters", "n_params"),
    "samples": ("samples", "tokens", "n_samples"),
    "loss": ("loss", "eval_loss", "dev_loss", "val_loss"),
    "loss_se": ("loss_se", "eval_loss_se", "dev_loss_se"),
    "return": ("return", "mean_return", "mean_returns", "return_seed_main"),
    "return_se": ("return_se", "se_returns", "se_return"),
    "episodes": ("episodes", "n_returns", "n_episodes"),
    "loss_episodes": ("val_episode_losses", "loss_episodes"),
}
# a runs table's per-episode validation losses, one cell per run: "EPISODE:LOSS:STEPS EPISODE:LOSS:STEPS ..."
# (EPISODE an id shared by runs validated on the same episodes, LOSS the episode's mean per-step loss)
TEXT_ROLES = ("loss_episodes",)
REQUIRED = ("flops", "params", "samples")
TARGETS = ("loss", "return")  # a table needs one; RL runs have a return and no loss


@dataclass
class Runs:
    """Runs as float arrays; `budgets` are the distinct FLOP budgets, ascending. `loss` is NaN
    throughout for a table of returns only (RL runs; `has_loss` False).

    `dropped` counts, per column, the rows of the source table left out for a NaN/inf there;
    `n_dropped` is how many rows that was in all."""

    flops: np.ndarray
    params: np.ndarray
    samples: np.ndarray
    loss: np.ndarray
    loss_se: np.ndarray | None = None
    ret: np.ndarray | None = None
    ret_se: np.ndarray | None = None
    episodes: np.ndarray | None = None
    loss_episodes: np.ndarray | None = None  # object array: per run None or (ids, losses, steps) arrays
    source: str = ""
    dropped: dict[str, int] = field(default_factory=dict)
    n_dropped: int = 0
    n_duplicates: int = 0

    def __len__(self) -> int:
        return len(self.flops)

    @property
    def budgets(self) -> np.ndarray:
        return np.unique(self.flops)

    @property
    def has_loss(self) -> bool:
        return bool(np.isfinite(self.loss).any())

    def subset(self, mask: np.ndarray) -> "Runs":
        pick = lambda a: None if a is None else a[mask]  # noqa: E731
        return Runs(self.flops[mask], self.params[mask], self.samples[mask], self.loss[mask],
                    pick(self.loss_se), pick(self.ret), pick(self.ret_se), pick(self.episodes),
                    pick(self.loss_episodes), self.source, self.dropped, self.n_dropped, self.n_duplicates)

    def with_budgets(self, budgets) -> "Runs":
        budgets = np.asarray(list(budgets), dtype=float)
        keep = np.zeros(len(self), bool)
        for c in budgets:
            hit = np.isclose(self.flops, c, rtol=1e-9)
            if not hit.any():
                raise ConfigError(f"budget {c:g} not in {self.source or 'runs'} "
                                  f"(have {', '.join(f'{b:g}' for b in self.budgets)})")
            keep |= hit
        return self.subset(keep)


def read_table(path: str | Path) -> pd.DataFrame:
    path = Path(path)
    if not path.exists():
        raise DataError(f"runs file not found: {path}")
    try:
        if path.suffix.lower() in (".parquet", ".pq"):
            return pd.read_parquet(path)
        return pd.read_csv(path)
    except Exception as e:  # pandas/pyarrow raise many types for unreadable files
        raise DataError(f"cannot read runs file {path}: {type(e).__name__}: {str(e).splitlines()[0]}")


def resolve_columns(df: pd.DataFrame, columns: dict[str, str] | None = None) -> dict[str, str]:
    """Map each role to a column of `df`: explicit `columns` first, then known aliases."""
    columns = dict(columns or {})
    unknown = set(columns) - set(COLUMN_ALIASES)
    if unknown:
        raise ConfigError(f"unknown column role(s) {', '.join(sorted(unknown))} "
                          f"(roles: {', '.join(COLUMN_ALIASES)})")
    out = {}
    for role, aliases in COLUMN_ALIASES.items():
        if role in columns:
            name = columns[role]
            if name not in df.columns:
                raise DataError(f"column {name!r} (for {role}) not in runs table "
                                f"(columns: {', '.join(map(str, df.columns))})")
            out[role] = name
            continue
        hit = next((a for a in aliases if a in df.columns), None)
        if hit is not None:
            out[role] = hit
        elif role in REQUIRED:
            raise DataError(f"runs table has no {role} column (looked for {', '.join(aliases)}; "
                            f"pick one with --col {role}=NAME)")
    if not any(t in out for t in TARGETS):
        raise DataError("runs table has neither a loss nor a return column (looked for "
                        f"{', '.join(COLUMN_ALIASES['loss'] + COLUMN_ALIASES['return'])}; pick one with --col loss=NAME "
                        "or --col return=NAME)")
    return out


def load_runs(path: str | Path, columns: dict[str, str] | None = None,
              where: dict[str, str] | None = None) -> Runs:
    """Load a CSV/Parquet runs table; `where` keeps rows whose column equals the given value."""
    df = read_table(path)
    for col, val in (where or {}).items():
        if col not in df.columns:
            raise DataError(f"--where column {col!r} not in runs table {path}")
        df = df[df[col].astype(str) == str(val)]
        if df.empty:
            raise DataError(f"no runs in {path} with {col}={val}")
    return runs_from_frame(df, columns, source=str(path))


def parse_episode_losses(cell) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """One run's "EPISODE:LOSS:STEPS ..." cell -> (ids, losses, steps); None for an empty cell."""
    if cell is None or (isinstance(cell, float) and not np.isfinite(cell)) or not str(cell).strip():
        return None
    try:
        parts = [t.split(":") for t in str(cell).split()]
        ids = np.array([p[0] for p in parts])
        loss = np.array([float(p[1]) for p in parts])
        steps = np.array([float(p[2]) for p in parts])
    except (IndexError, ValueError):
        raise DataError(f"per-episode losses {str(cell)[:40]!r}... are not 'EPISODE:LOSS:STEPS ...'") from None
    if not (np.isfinite(loss).all() and (steps > 0).all()):
        raise DataError("per-episode losses must be finite with positive step counts")
    return ids, loss, steps


def format_episode_losses(ids, losses, steps) -> str:
    """The runs-table cell of one run's per-episode validation losses (see ``parse_episode_losses``)."""
    return " ".join(f"{i}:{v:.7g}:{int(n)}" for i, v, n in zip(ids, losses, steps))


def runs_from_frame(df: pd.DataFrame, columns: dict[str, str] | None = None, source: str = "") -> Runs:
    cols = resolve_columns(df, columns)
    roles = [r for r in cols if r not in TEXT_ROLES]
    # a row repeated verbatim is one run listed twice, not two runs
    dup = df.duplicated(subset=[cols[r] for r in cols]).to_numpy()
    if dup.any():
        df = df[~dup]
    arrays = {}
    for role in roles:
        name = cols[role]
        try:
            a = pd.to_numeric(df[name], errors="raise").to_numpy(dtype=float)
        except (ValueError, TypeError):
            raise DataError(f"column {name!r} ({role}) in {source or 'runs table'} is not numeric")
        arrays[role] = a
    # the target every row needs: the loss, or for a table without one (RL runs) the return
    target = "loss" if "loss" in arrays and np.isfinite(arrays["loss"]).any() else "return"
    if target == "return" and "return" not in arrays:
        raise DataError(f"column {cols['loss']!r} (loss) in {source or 'runs table'} is empty and there is no return "
                        "column to fit instead")
    if target == "return":
        arrays["loss"] = np.full(len(df), np.nan)
    needed = REQUIRED + (target,)
    ok = np.ones(len(df), bool)
    for role in needed:
        ok &= np.isfinite(arrays[role])
    for role in ("flops", "params", "samples") + (("loss",) if target == "loss" else ()):
        if (arrays[role][ok] <= 0).any():
            raise DataError(f"column {cols[role]!r} ({role}) has non-positive values")
    dropped = {cols[r]: int((~np.isfinite(arrays[r])).sum()) for r in needed}
    if ok.sum() == 0:
        raise DataError(f"no usable runs in {source or 'runs table'} (every row lacks one of "
                        f"{', '.join(cols[r] for r in needed)})")
    per_ep = None
    if "loss_episodes" in cols:
        per_ep = np.empty(len(df), object)
        per_ep[:] = [parse_episode_losses(c) for c in df[cols["loss_episodes"]]]
        if all(p is None for p in per_ep):
            per_ep = None
    return Runs(
        flops=arrays["flops"], params=arrays["params"], samples=arrays["samples"],
        loss=arrays["loss"], loss_se=arrays.get("loss_se") if target == "loss" else None, ret=arrays.get("return"),
        ret_se=arrays.get("return_se"), episodes=arrays.get("episodes"), loss_episodes=per_ep, source=source,
        dropped={c: n for c, n in dropped.items() if n}, n_dropped=int((~ok).sum()), n_duplicates=int(dup.sum()),
    ).subset(ok)


def parse_budgets(text: str | None) -> list[float] | None:
    """'1e15,2e15' -> [1e15, 2e15]."""
    if not text:
        return None
    try:
        return [float(t) for t in text.replace(" ", "").split(",") if t]
    except ValueError:
        raise ConfigError(f"--budgets: expected comma-separated numbers, got {text!r}")
