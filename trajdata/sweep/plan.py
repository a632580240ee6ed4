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
from dataclasses import dataclass, field, fields
from pathlib import Path

from trajdata.config import check_keys, choose, read_toml, require
from trajdata.errors import ConfigError
from trajdata.models.atari import AtariConfig
from trajdata.models.nethack import NetHackConfig
from trajdata.train.shape import RunShape, run_shape

FAMILIES = ("nethack", "atari")
TABLES = ("sweep", "data", "train", "eval", "fit", "report")
FIT_MIN_SNAPSHOTS = 8  # `scaling fit` refuses fewer runs
EVAL_SET_BY_SWEEP = ("all", "budget", "out", "update_runs", "record")  # [eval] may not set these


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
        _no_repeats(self.budgets, "budgets", lambda b: f"{b:g}")
        if self.family == "nethack":
            require(isinstance(self.sizes, list) and all(
                isinstance(s, (list, tuple)) and len(s) == 2 and all(_positive_int(x) for x in s) for s in self.sizes),
                "sizes", "of a NetHack sweep are [width, layers] pairs of positive integers")
            self.sizes = [tuple(s) for s in self.sizes]
        else:
            require(isinstance(self.sizes, list) and all(_positive_int(s) for s in self.sizes), "sizes",
                    "of an Atari sweep are CNN widths (positive integers)")
        _no_repeats(self.sizes, "sizes", lambda s: str(list(s)) if isinstance(s, tuple) else str(s))
        if self.samples_per_param is not None:
            spp = self.samples_per_param
            require(isinstance(spp, (list, tuple)) and len(spp) == 2 and all(
                isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in spp),
                "samples_per_param", f"must be [lo, hi], two numbers (got {spp!r})")
            lo, hi = spp
            require(0 <= lo < hi, "samples_per_param", f"must be [lo, hi] with 0 <= lo < hi (got {list(spp)})")
            self.samples_per_param = (float(lo), float(hi))
        require(bool(self.dataset) or bool(self.collect), "dataset", "is required ([data] dataset = PATH)")
        for k in ("dataset", "out", "width", "layers", "params", "preset", "budgets", "samples", "family", "run_id"):
            require(k not in self.train, "train", f"may not set {k!r}: the sweep sets it per run")


def _positive_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x > 0


def _no_repeats(items, field: str, show) -> None:
    seen = set()
    for x in items:
        require(x not in seen, field, f"lists {show(x)} twice (each would be trained again)")
        seen.add(x)


def load_spec(path: str | Path) -> Spec:
    """Read a sweep spec and check every table as the real sweep will use it (``check_tables``):
    unknown tables or keys, wrong types and values out of range are one-line errors naming them."""
    p = Path(path)
    data = read_toml(p, "sweep spec")
    bad = sorted(set(data) - set(TABLES))
    if bad:
        raise ConfigError(f"sweep spec {p}: unknown table [{bad[0]}] (tables: {', '.join(TABLES)})")
    tables = [(t, data.get(t)) for t in TABLES] + [("data.collect", (data.get("data") or {}).get("collect"))]
    for t, v in tables:
        if v is not None and not isinstance(v, dict):
            raise ConfigError(f"sweep spec {p}: [{t}] must be a table (got {v!r})")
    for t, k in (("data", "dataset"), ("report", "reference"), ("sweep", "name")):
        v = (data.get(t) or {}).get(k)
        if v is not None and not (isinstance(v, str) and v):
            raise ConfigError(f"sweep spec {p}: [{t}] {k} must be a non-empty text (got {v!r})")
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
    from trajdata.scaling.fits import FitConfig
    from trajdata.train.bc import BCConfig

    check_keys(BCConfig, data.get("train", {}), f"sweep spec {p}", "train")
    check_keys(FitConfig, data.get("fit", {}), f"sweep spec {p}", "fit")
    from trajdata.evaluate.config import EvalConfig

    check_keys(EvalConfig, data.get("eval", {}), f"sweep spec {p}", "eval")
    ev_bad = sorted(set(data.get("eval", {})) & set(EVAL_SET_BY_SWEEP))
    if ev_bad:
        raise ConfigError(f"sweep spec {p}: [eval] may not set {ev_bad[0]!r}: the sweep sets it")
    bad = sorted(set(data.get("report", {})) - {"reference"})
    if bad:
        raise ConfigError(f"sweep spec {p}: unknown key {bad[0]!r} in [report] (reference)")
    dataset = d.get("dataset", "")
    if dataset and not Path(dataset).is_absolute():
        dataset = str((p.parent / dataset).resolve())
    ref = dict(data.get("report", {}))
    if ref.get("reference") and not Path(ref["reference"]).is_absolute():
        ref["reference"] = str((p.parent / ref["reference"]).resolve())
    try:
        spec = Spec(name=str(sw.get("name", p.stem)), family=sw["family"], sizes=sw["sizes"], budgets=sw["budgets"],
                    samples_per_param=sw.get("samples_per_param"), dataset=dataset, collect=collect,
                    train=dict(data.get("train", {})), eval=dict(data.get("eval", {})), fit=dict(data.get("fit", {})),
                    report=ref, path=str(p))
    except ConfigError as e:
        table = {"train": "train", "dataset": "data"}.get(e.field, "sweep")
        msg = str(e).removeprefix("train ") if table == "train" else str(e)
        raise ConfigError(f"sweep spec {p}: [{table}] {msg}") from None
    check_tables(spec)
    return spec


def _in_table(spec: Spec, table: str, make) -> object:
    """``make()``, its ConfigError prefixed with the spec and table (``sweep spec S: [eval] episodes ...``)."""
    try:
        return make()
    except ConfigError as e:
        raise ConfigError(f"sweep spec {spec.path}: [{table}] {e}") from None


def check_tables(spec: Spec) -> None:
    """Build every config the sweep will build from the spec's tables (each size's BCConfig, the
    CollectConfig, the EvalConfigs, the FitConfig), so a type or range error is one line now, not
    after the data is collected or every run trained."""
    from trajdata.evaluate.config import EvalConfig
    from trajdata.scaling.fits import FitConfig

    for size in spec.sizes:
        _in_table(spec, "train", lambda: run_config(spec, size, budgets=tuple(spec.budgets)))
    if spec.collect:
        _in_table(spec, "data.collect", lambda: collect_config(spec, Path("-")))
    rest = dict(spec.eval)
    expert = rest.pop("expert", None)
    episodes = rest.get("episodes", 0)
    if not isinstance(episodes, int) or isinstance(episodes, bool) or episodes < 0:
        raise ConfigError(f"sweep spec {spec.path}: [eval] episodes must be an integer, at least 0 (0: no rollouts; "
                          f"got {episodes!r})")
    if episodes:
        _in_table(spec, "eval", lambda: EvalConfig(all=True, **rest))
        if expert is not None:
            _in_table(spec, "eval", lambda: EvalConfig(expert=expert, out="-", update_runs=False, **rest))
    _in_table(spec, "fit", lambda: FitConfig(**spec.fit))


def collect_config(spec: Spec, path: Path):
    """The ``CollectConfig`` of the spec's [data.collect] table, writing to ``path``."""
    from trajdata.collectors.config import EXPERTS, CollectConfig, ExpertSpec

    c = dict(spec.collect)
    expert = c.pop("expert", "scripted")
    if expert not in EXPERTS:
        raise ConfigError(f"expert {expert!r}: choose one of {', '.join(EXPERTS)}")
    kwargs = {k: c.pop(k) for k in EXPERTS[expert][1] if k in c}
    if expert != "ppo":
        kwargs.setdefault("character", "@")
        kwargs.setdefault("fix_moon_phase", True)
    bad = sorted(set(c) - {f.name for f in fields(CollectConfig)} | ({"out"} & set(c)))
    if bad:
        raise ConfigError(f"unknown key {bad[0]!r} (not a collect setting, nor an option of expert {expert!r})"
                          if bad[0] != "out" else "may not set 'out': the sweep collects into OUT/data")
    return CollectConfig(out=str(path), expert=ExpertSpec.named(expert, **kwargs), **c)


def dataset_path(spec: Spec, out: Path) -> Path:
    """Where the sweep's data is: the spec's dataset, or OUT/data when the spec collects it."""
    return Path(spec.dataset) if spec.dataset else out / "data"


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
    shape: RunShape
    cells: list[Cell]

    @property
    def model(self) -> NetHackConfig | AtariConfig:
        return self.shape.model

    @property
    def params(self) -> int:
        return self.shape.params

    @property
    def flops_per_sample(self) -> int:
        return self.shape.flops_per_sample

    @property
    def budgets(self) -> list[float]:
        return [c.budget for c in self.cells if c.kept]

    @property
    def samples(self) -> int:
        """Training samples of the run: to its largest kept budget (0 when every cell is skipped)."""
        return max((c.samples for c in self.cells if c.kept), default=0)

    @property
    def compute(self) -> float:
        return float(self.shape.flops(self.samples))


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


def run_name(spec: Spec, size) -> str:
    return f"atari-w{size}" if spec.family == "atari" else f"nethack-h{size[0]}-L{size[1]}"


def run_config(spec: Spec, size, **fields):
    """The ``BCConfig`` of the spec's run at ``size``: its [train] table, the size, and ``fields``."""
    from trajdata.train.bc import BCConfig

    sized = dict(width=size) if spec.family == "atari" else dict(width=size[0], layers=size[1])
    return BCConfig(family=spec.family, **sized, **spec.train, **{"dataset": "-", "out": "-", **fields})


def make_plan(spec: Spec, n_actions: int | None = None, world_size: int = 1) -> Plan:
    """Which runs, which snapshots, what compute: each size's ``run_shape``, the one `train bc` will
    have. ``n_actions``: the Atari game's action count (it changes the CNN's head and so its FLOPs;
    default 18)."""
    runs = []
    for size in spec.sizes:
        shape = run_shape(run_config(spec, size, budgets=tuple(spec.budgets)), spec.family, n_actions, world_size)
        n, step = shape.params, shape.samples_per_step
        cells = []
        for c, d in shape.budget_samples:
            if d < step:
                cells.append(Cell(c, d, False, f"less than one optimizer step ({d:,} < {step:,} samples)"))
            elif spec.samples_per_param and not spec.samples_per_param[0] <= d / n <= spec.samples_per_param[1]:
                lo, hi = spec.samples_per_param
                side = "undertrained" if d / n < lo else "overtrained"
                cells.append(Cell(c, d, False, f"{side}: D/N = {d / n:.3g} outside [{lo:g}, {hi:g}]"))
            else:
                cells.append(Cell(c, d, True))
        runs.append(PlannedRun(run_name(spec, size), size, shape, cells))
    return Plan(spec, runs, runs[0].shape.samples_per_step)


def data_problem(spec: Spec, dataset: Path) -> str | None:
    """Why the sweep could not start on ``dataset`` (None: it can): no dataset there and no
    [data.collect] to make it."""
    if spec.collect or (dataset / "dataset.json").is_file():
        return None
    return f"dataset {dataset} does not exist (and the spec has no [data.collect] to make it)"


def check_plan(plan: Plan, fit: bool = True) -> None:
    """What the real sweep would refuse once it got there: a plan that trains nothing, or too few
    snapshots for the scaling fit (``fit``: the sweep fits and reports)."""
    if not plan.active:
        raise ConfigError(f"sweep spec {plan.spec.path}: every cell of the plan is skipped; nothing to train")
    if fit and plan.snapshots < FIT_MIN_SNAPSHOTS:
        raise ConfigError(f"sweep spec {plan.spec.path}: the plan has {plan.snapshots} snapshots, and the scaling fit "
                          f"needs at least {FIT_MIN_SNAPSHOTS}: add sizes or budgets (or --skip-report: no fit)")


def describe(plan: Plan, flops_per_s: float | None = None, samples_per_s: float | None = None) -> str:
    """The plan as a table: runs, their snapshots and samples, skipped cells and why, total compute;
    with ``flops_per_s`` or ``samples_per_s`` (where the fixed encoders set the cost of a sample,
    as on CPU) its training time."""
    lines = [f"sweep {plan.spec.name}: {len(plan.active)} runs, {plan.snapshots} snapshots, "
             f"{plan.samples:,} training samples, {plan.compute:.3g} FLOPs"
             + (f", {plan.eval_episodes:,} eval episodes" if plan.eval_episodes else
                ", no rollouts ([eval] episodes = 0: the report fits the loss only)")]
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
