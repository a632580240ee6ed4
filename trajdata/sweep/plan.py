"""A sweep spec (TOML) and its plan: one `train bc` run per model size, going to the largest FLOP
budget that size is given, with a snapshot at each of its budgets (constant LR: the paper's trick,
one run serves all its budgets).

Spec layout (every table optional except [sweep]; see specs/*.toml):

    [sweep]   name, family ("nethack" | "atari"), sizes ([[h, L], ...] or Atari widths [w, ...]),
              budgets ([C, ...]), samples_per_param ([lo, hi], optional: skip cells off the optimum)
    [data]    dataset (path, relative to the spec file), and optionally [data.collect] to make it
    [train]   BCConfig fields shared by every run (seq_len, batch_size, lr, ...)
    [eval]    EvalConfig fields (episodes, max_steps, seed, workers, ...); episodes = 0: no rollouts
    [fit]     FitConfig fields; [report] reference = a runs table fitted the same way beside ours
"""
from __future__ import annotations

import math
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path

from trajdata.config import choose, require
from trajdata.errors import ConfigError
from trajdata.models import flops as counting
from trajdata.models.atari import AtariConfig
from trajdata.models.nethack import NetHackConfig

FAMILIES = ("nethack", "atari")
TABLES = ("sweep", "data", "train", "eval", "fit", "report")
MODEL_KEYS = ("heads", "core", "use_glyphs", "use_inventory", "use_message")  # [train] keys that shape the model


@dataclass
class Spec:
    name: str
    family: str
    sizes: list
    budgets: list[float]
    samples_per_param: tuple[float, float] | None = None
    dataset: str = ""
    collect: dict = field(default_factory=dict)
    train: dict = field(default_factory=dict)
    eval: dict = field(default_factory=dict)
    fit: dict = field(default_factory=dict)
    report: dict = field(default_factory=dict)
    path: str = ""

    def __post_init__(self):
        choose(self.family, FAMILIES, "family")
        require(len(self.sizes) > 0, "sizes", "must list at least one model size")
        require(len(self.budgets) > 0, "budgets", "must list at least one FLOP budget")
        require(all(isinstance(b, (int, float)) and math.isfinite(b) and b > 0 for b in self.budgets), "budgets",
                "must be positive finite FLOP counts")
        self.budgets = sorted(float(b) for b in self.budgets)
        if self.family == "nethack":
            require(all(isinstance(s, (list, tuple)) and len(s) == 2 and all(isinstance(x, int) and x > 0 for x in s)
                        for s in self.sizes), "sizes", "of a NetHack sweep are [width, layers] pairs of positive integers")
            self.sizes = [tuple(s) for s in self.sizes]
        else:
            require(all(isinstance(s, int) and s > 0 for s in self.sizes), "sizes",
                    "of an Atari sweep are CNN widths (positive integers)")
        if self.samples_per_param is not None:
            lo, hi = self.samples_per_param
            require(0 <= lo < hi, "samples_per_param", f"must be [lo, hi] with 0 <= lo < hi (got {list(self.samples_per_param)})")
            self.samples_per_param = (float(lo), float(hi))
        require(bool(self.dataset) or bool(self.collect), "dataset", "is required ([data] dataset = PATH)")
        for k in ("dataset", "out", "width", "layers", "params", "preset", "budgets", "samples", "family", "run_id"):
            require(k not in self.train, "train", f"may not set {k!r}: the sweep sets it per run")


def load_spec(path: str | Path) -> Spec:
    """Read a sweep spec; unknown tables or keys are one-line errors naming them."""
    p = Path(path)
    try:
        data = tomllib.loads(p.read_text())
    except FileNotFoundError:
        raise ConfigError(f"sweep spec {p} does not exist") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"sweep spec {p} is not valid TOML ({e})") from None
    bad = sorted(set(data) - set(TABLES))
    if bad:
        raise ConfigError(f"sweep spec {p}: unknown table [{bad[0]}] (tables: {', '.join(TABLES)})")
    sw = dict(data.get("sweep", {}))
    known = {"name", "family", "sizes", "budgets", "samples_per_param"}
    bad = sorted(set(sw) - known)
    if bad:
        raise ConfigError(f"sweep spec {p}: unknown key {bad[0]!r} in [sweep] ({', '.join(sorted(known))})")
    for k in ("family", "sizes", "budgets"):
        if k not in sw:
            raise ConfigError(f"sweep spec {p}: [sweep] needs {k!r}")
    d = dict(data.get("data", {}))
    collect = d.pop("collect", {})
    bad = sorted(set(d) - {"dataset"})
    if bad:
        raise ConfigError(f"sweep spec {p}: unknown key {bad[0]!r} in [data] (dataset, [data.collect])")
    _check_keys(p, "train", data.get("train", {}), "trajdata.train.bc", "BCConfig")
    _check_keys(p, "fit", data.get("fit", {}), "trajdata.scaling.fits", "FitConfig")
    dataset = d.get("dataset", "")
    if dataset and not Path(dataset).is_absolute():
        dataset = str((p.parent / dataset).resolve())
    ref = dict(data.get("report", {}))
    if ref.get("reference") and not Path(ref["reference"]).is_absolute():
        ref["reference"] = str((p.parent / ref["reference"]).resolve())
    return Spec(name=sw.get("name", p.stem), family=sw["family"], sizes=sw["sizes"], budgets=sw["budgets"],
                samples_per_param=tuple(sw["samples_per_param"]) if "samples_per_param" in sw else None,
                dataset=dataset, collect=collect, train=dict(data.get("train", {})), eval=dict(data.get("eval", {})),
                fit=dict(data.get("fit", {})), report=ref, path=str(p))


def _check_keys(path: Path, table: str, values: dict, module: str, cls: str) -> None:
    import importlib

    names = {f.name for f in fields(getattr(importlib.import_module(module), cls))}
    bad = sorted(set(values) - names)
    if bad:
        raise ConfigError(f"sweep spec {path}: unknown key {bad[0]!r} in [{table}] (not a {cls} field)")


# ---- the plan -------------------------------------------------------------------------------------

@dataclass
class Cell:
    budget: float
    samples: int  # ceil(C / FLOPs per sample): the snapshot is the first optimizer step at or past it
    kept: bool
    reason: str = ""


@dataclass
class PlannedRun:
    name: str
    size: tuple | int
    model: NetHackConfig | AtariConfig
    params: int
    flops_per_sample: int
    cells: list[Cell]

    @property
    def budgets(self) -> list[float]:
        return [c.budget for c in self.cells if c.kept]

    @property
    def samples(self) -> int:
        """Training samples of the run: to its largest kept budget (0 when every cell is skipped)."""
        return max((c.samples for c in self.cells if c.kept), default=0)

    @property
    def compute(self) -> float:
        return float(self.samples * self.flops_per_sample)


@dataclass
class Plan:
    spec: Spec
    runs: list[PlannedRun]
    step_samples: int

    @property
    def active(self) -> list[PlannedRun]:
        return [r for r in self.runs if r.budgets]

    @property
    def compute(self) -> float:
        return sum(r.compute for r in self.runs)

    @property
    def samples(self) -> int:
        return sum(r.samples for r in self.runs)

    @property
    def snapshots(self) -> int:
        return sum(len(r.budgets) for r in self.runs)

    @property
    def eval_episodes(self) -> int:
        return self.snapshots * int(self.spec.eval.get("episodes", 0))


def model_for(spec: Spec, size, n_actions: int | None = None) -> NetHackConfig | AtariConfig:
    if spec.family == "atari":
        return AtariConfig(width=size, n_actions=n_actions or 18)
    h, L = size
    return NetHackConfig(width=h, layers=L, **{k: spec.train[k] for k in MODEL_KEYS if k in spec.train})


def run_name(spec: Spec, size) -> str:
    return f"atari-w{size}" if spec.family == "atari" else f"nethack-h{size[0]}-L{size[1]}"


def make_plan(spec: Spec, n_actions: int | None = None, world_size: int = 1) -> Plan:
    """Which runs, which snapshots, what compute. ``n_actions``: the Atari game's action count (it
    changes the CNN's head and so its FLOPs; default 18)."""
    from trajdata.train.bc import BCConfig

    base = BCConfig(dataset="-", out="-", **spec.train)
    step = base.samples_per_step or base.batch_size * base.seq_len * base.grad_accum * world_size
    runs = []
    for size in spec.sizes:
        mcfg = model_for(spec, size, n_actions)
        n = counting.effective_params(mcfg)
        fps = counting.flops_per_sample(mcfg)
        cells = []
        for c in spec.budgets:
            d = math.ceil(c / fps)
            if d < step:
                cells.append(Cell(c, d, False, f"less than one optimizer step ({d:,} < {step:,} samples)"))
            elif spec.samples_per_param and not spec.samples_per_param[0] <= d / n <= spec.samples_per_param[1]:
                lo, hi = spec.samples_per_param
                side = "undertrained" if d / n < lo else "overtrained"
                cells.append(Cell(c, d, False, f"{side}: D/N = {d / n:.3g} outside [{lo:g}, {hi:g}]"))
            else:
                cells.append(Cell(c, d, True))
        runs.append(PlannedRun(run_name(spec, size), size, mcfg, n, fps, cells))
    return Plan(spec, runs, step)


def describe(plan: Plan, flops_per_s: float | None = None, samples_per_s: float | None = None) -> str:
    """The plan as a table: runs, their snapshots and samples, skipped cells and why, total compute;
    with ``flops_per_s`` or ``samples_per_s`` (where the fixed encoders set the cost of a sample,
    as on CPU) its training time."""
    lines = [f"sweep {plan.spec.name}: {len(plan.active)} runs, {plan.snapshots} snapshots, "
             f"{plan.samples:,} training samples, {plan.compute:.3g} FLOPs"
             + (f", {plan.eval_episodes:,} eval episodes" if plan.eval_episodes else "")]
    if flops_per_s:
        secs = plan.compute / flops_per_s
        lines[0] += f" (~{secs / 3600:.3g} h at {flops_per_s:.3g} FLOP/s of training)"
    if samples_per_s:
        lines[0] += f" (~{plan.samples / samples_per_s / 60:.3g} min of training at {samples_per_s:.4g} samples/s)"
    lines.append(f"{'run':20s} {'params':>12s} {'FLOPs/sample':>13s} {'samples':>14s} {'compute':>10s}  budgets")
    for r in plan.runs:
        kept = ",".join(f"{b:.3g}" for b in r.budgets) or "-"
        lines.append(f"{r.name:20s} {r.params:12,d} {r.flops_per_sample:13,d} {r.samples:14,d} {r.compute:10.3g}  {kept}")
        for c in r.cells:
            if not c.kept:
                lines.append(f"{'':20s}   skip {c.budget:.3g}: {c.reason}")
    return "\n".join(lines)
