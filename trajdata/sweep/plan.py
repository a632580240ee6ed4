"""A sweep spec (TOML) and its plan: one training run per model size (`train bc`, or `train rl` for
family "nethack-rl"), going to the largest FLOP budget that size is given, with a snapshot at each
of its budgets (constant LR: the paper's trick, one run serves all its budgets).

Spec layout (every table optional except [sweep]; see specs/*.toml):

    [sweep]   name, family ("nethack" | "atari" | "nethack-rl"), sizes ([[h, L], ...] or Atari widths
              [w, ...]), budgets ([C, ...]), samples_per_param ([lo, hi], optional: skip cells off the optimum),
              seeds ([s, ...], optional: one run per size and training seed, named ...-sS; the fits take
              every seed's snapshot as a point, so repeated seeds average out training noise)
    [data]    dataset (path, relative to the spec file), and optionally [data.collect] to make it
              (an RL sweep needs data only for a [compare.bc] run)
    [train]   BCConfig fields shared by every run (seq_len, batch_size, lr, ...); RLConfig fields for RL
    [eval]    EvalConfig fields (episodes, max_steps, seed, workers, ...); episodes = 0: no rollouts
    [fit]     FitConfig fields; [report] reference = a runs table fitted the same way beside ours,
              reach = a return whose compute to forecast (RL's default: the average human score, 127k)
    [compare] RL only: from-scratch vs BC-initialised RL at equal total compute. init = a BC run or
              checkpoint of the LSTM-core family (relative to the spec file), or [compare.bc] = the
              BCConfig fields of a BC run the sweep trains first on [data] (core = "lstm");
              kickstart_coef, kickstart_decay as `train rl`'s
    extends = "other.toml" (a top-level key, before the tables): that spec, overridden key by key
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

from trajdata.config import check_keys, choose, read_toml, require
from trajdata.errors import ConfigError
from trajdata.models.atari import AtariConfig
from trajdata.models.nethack import NetHackConfig
from trajdata.train.shape import RunShape, run_shape

RL = "nethack-rl"
FAMILIES = ("nethack", "atari", RL)
TABLES = ("sweep", "data", "train", "eval", "fit", "report", "compare")
# [report]: reference = a runs table fitted beside ours; reach = a return whose compute the report forecasts
# (RL's default: the average human score, the paper's Table 6)
REPORT_KEYS = ("reference", "reach")
FIT_MIN_SNAPSHOTS = 8  # `scaling fit` refuses fewer runs
EVAL_SET_BY_SWEEP = ("all", "budget", "out", "update_runs", "record")  # [eval] may not set these
COMPARE_KEYS = ("init", "bc", "kickstart_coef", "kickstart_decay")
# keys each run's config gets from the sweep, not from [train] (or [compare.bc])
SET_PER_RUN = {"bc": ("dataset", "out", "width", "layers", "params", "preset", "budgets", "samples", "family", "run_id"),
               RL: ("out", "width", "layers", "params", "budgets", "steps", "run_id", "init", "kickstart_coef",
                    "kickstart_decay")}


@dataclass
class Spec:
    name: str
    family: str
    sizes: list
    budgets: list[float]
    samples_per_param: tuple[float, float] | None = None
    seeds: list[int] | None = None
    dataset: str = ""
    collect: dict = field(default_factory=dict)
    train: dict = field(default_factory=dict)
    eval: dict = field(default_factory=dict)
    fit: dict = field(default_factory=dict)
    report: dict = field(default_factory=dict)
    compare: dict = field(default_factory=dict)
    path: str = ""

    @property
    def rl(self) -> bool:
        return self.family == RL

    def __post_init__(self):
        choose(self.family, FAMILIES, "family")
        require(len(self.sizes) > 0, "sizes", "must list at least one model size")
        require(len(self.budgets) > 0, "budgets", "must list at least one FLOP budget")
        require(all(isinstance(b, (int, float)) and math.isfinite(b) and b > 0 for b in self.budgets), "budgets",
                "must be positive finite FLOP counts")
        self.budgets = sorted(float(b) for b in self.budgets)
        _no_repeats(self.budgets, "budgets", lambda b: f"{b:g}")
        if self.family in ("nethack", RL):
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
        if self.seeds is not None:
            require(isinstance(self.seeds, list) and len(self.seeds) > 0 and all(
                isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in self.seeds), "seeds",
                f"must be a list of training seeds, integers >= 0 (got {self.seeds!r})")
            _no_repeats(self.seeds, "seeds", str)
            require("seed" not in self.train, "train", "may not set 'seed' when [sweep] seeds lists them")
        if self.rl:
            require(not self.compare or ("init" in self.compare) != ("bc" in self.compare), "compare",
                    "needs one of init = BC_RUN_OR_CKPT and a [compare.bc] table")
            require(not self.compare.get("bc") or bool(self.dataset) or bool(self.collect), "dataset",
                    "is required for [compare.bc] ([data] dataset = PATH: the BC run trains on it)")
            require("expert" not in self.eval, "eval", "expert: an RL sweep's baseline is the random policy "
                    "(the experts play NetHackChallenge-v0)")
        else:
            require(bool(self.dataset) or bool(self.collect), "dataset", "is required ([data] dataset = PATH)")
            require(not self.compare, "compare", "is for RL sweeps (family = 'nethack-rl')")
        for k in SET_PER_RUN[RL if self.rl else "bc"]:
            require(k not in self.train, "train", f"may not set {k!r}: the sweep sets it per run")
        bc = self.compare.get("bc")
        if bc is not None:
            for k in SET_PER_RUN["bc"] + ("core",):
                require(k not in bc or k in ("width", "layers", "budgets"), "compare", f"bc may not set {k!r}: the "
                        "sweep sets it")
            require(bool(bc.get("budgets")), "compare", "bc needs budgets (RL starts from its largest-budget snapshot)")


def _positive_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x > 0


def _no_repeats(items, field: str, show) -> None:
    seen = set()
    for x in items:
        require(x not in seen, field, f"lists {show(x)} twice (each would be trained again)")
        seen.add(x)


PATH_KEYS = (("data", "dataset"), ("report", "reference"), ("compare", "init"))  # relative to the spec naming them


def _merged(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merged(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def read_spec(p: Path, seen: tuple = ()) -> dict:
    """A spec file's tables, its paths (``PATH_KEYS``) made absolute from its folder; with a top-level
    ``extends = "other.toml"`` (relative to it), that spec's tables overridden key by key by this
    file's (the base's [sweep] name not inherited)."""
    data = read_toml(p, "sweep spec")
    for t, k in PATH_KEYS:
        v = data[t].get(k) if isinstance(data.get(t), dict) else None
        if isinstance(v, str) and v and not Path(v).is_absolute():
            data[t] = dict(data[t], **{k: str((p.parent / v).resolve())})
    if "extends" not in data:
        return data
    base = data.pop("extends")
    if not (isinstance(base, str) and base):
        raise ConfigError(f"sweep spec {p}: extends must be the path of another spec (got {base!r})")
    bp = (p.parent / base).resolve()
    if bp in seen or bp == p.resolve():
        raise ConfigError(f"sweep spec {p}: extends {base!r} goes round in a circle")
    parent = read_spec(bp, (*seen, p.resolve()))
    if isinstance(parent.get("sweep"), dict):
        parent["sweep"] = {k: v for k, v in parent["sweep"].items() if k != "name"}
    return _merged(parent, data)


def load_spec(path: str | Path) -> Spec:
    """Read a sweep spec and check every table as the real sweep will use it (``check_tables``):
    unknown tables or keys, wrong types and values out of range are one-line errors naming them."""
    p = Path(path)
    data = read_spec(p)
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
    known = {"name", "family", "sizes", "budgets", "samples_per_param", "seeds"}
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
    from trajdata.rl.config import RLConfig
    from trajdata.scaling.fits import FitConfig
    from trajdata.train.bc import BCConfig

    check_keys(RLConfig if sw["family"] == RL else BCConfig, data.get("train", {}), f"sweep spec {p}", "train")
    check_keys(FitConfig, data.get("fit", {}), f"sweep spec {p}", "fit")
    from trajdata.evaluate.config import EvalConfig

    check_keys(EvalConfig, data.get("eval", {}), f"sweep spec {p}", "eval")
    ev_bad = sorted(set(data.get("eval", {})) & set(EVAL_SET_BY_SWEEP))
    if ev_bad:
        raise ConfigError(f"sweep spec {p}: [eval] may not set {ev_bad[0]!r}: the sweep sets it")
    bad = sorted(set(data.get("report", {})) - set(REPORT_KEYS))
    if bad:
        raise ConfigError(f"sweep spec {p}: unknown key {bad[0]!r} in [report] ({', '.join(REPORT_KEYS)})")
    reach = data.get("report", {}).get("reach")
    if reach is not None and not (isinstance(reach, (int, float)) and not isinstance(reach, bool)
                                  and math.isfinite(reach) and reach > 0):
        raise ConfigError(f"sweep spec {p}: [report] reach must be a positive number (got {reach!r})")
    compare = dict(data.get("compare", {}))
    bad = sorted(set(compare) - set(COMPARE_KEYS))
    if bad:
        raise ConfigError(f"sweep spec {p}: unknown key {bad[0]!r} in [compare] ({', '.join(COMPARE_KEYS)})")
    if compare.get("bc") is not None and not isinstance(compare["bc"], dict):
        raise ConfigError(f"sweep spec {p}: [compare.bc] must be a table (got {compare['bc']!r})")
    check_keys(BCConfig, compare.get("bc", {}), f"sweep spec {p}", "compare.bc")
    if compare.get("init") is not None and not (isinstance(compare["init"], str) and compare["init"]):
        raise ConfigError(f"sweep spec {p}: [compare] init must be a path (got {compare['init']!r})")

    dataset = d.get("dataset", "")
    ref = dict(data.get("report", {}))
    try:
        spec = Spec(name=str(sw.get("name", p.stem)), family=sw["family"], sizes=sw["sizes"], budgets=sw["budgets"],
                    samples_per_param=sw.get("samples_per_param"), seeds=sw.get("seeds"), dataset=dataset,
                    collect=collect, train=dict(data.get("train", {})), eval=dict(data.get("eval", {})),
                    fit=dict(data.get("fit", {})), report=ref, compare=compare, path=str(p))
    except ConfigError as e:
        table = {"train": "train", "dataset": "data", "compare": "compare", "eval": "eval"}.get(e.field, "sweep")
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
    ref = spec.report.get("reference")
    if ref and not Path(ref).is_file():
        raise ConfigError(f"sweep spec {spec.path}: [report] reference {ref} does not exist (leave it out for the "
                          f"paper authors' NetHack runs)")


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
    seed: int | None = None  # the training seed ([sweep] seeds); None: [train]'s

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
    compare: Comparison | None = None

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


def run_name(spec: Spec, size, seed: int | None = None) -> str:
    if spec.rl:
        name = f"rl-h{size[0]}-L{size[1]}"
    else:
        name = f"atari-w{size}" if spec.family == "atari" else f"nethack-h{size[0]}-L{size[1]}"
    return name if seed is None else f"{name}-s{seed}"


def run_config(spec: Spec, size, **fields):
    """The config of the spec's run at ``size`` (``BCConfig``; ``RLConfig`` for RL): its [train]
    table, the size, and ``fields``."""
    if spec.rl:
        from trajdata.rl.config import RLConfig

        sized = dict(width=size[0], layers=size[1]) if size is not None else {}
        return RLConfig(**sized, **spec.train, **{"out": "-", **fields})
    from trajdata.train.bc import BCConfig

    sized = dict(width=size) if spec.family == "atari" else dict(width=size[0], layers=size[1])
    return BCConfig(family=spec.family, **sized, **spec.train, **{"dataset": "-", "out": "-", **fields})


def cells(spec: Spec, shape: RunShape, budgets=None) -> list[Cell]:
    """Each budget's cell of a run of ``shape``: kept, or skipped (less than one step, or D/N off
    ``samples_per_param``)."""
    out = []
    n, step = shape.params, shape.samples_per_step
    for c in shape.budgets if budgets is None else budgets:
        d = shape.samples_for(c)
        if d < step:
            out.append(Cell(c, d, False, f"less than one optimizer step ({d:,} < {step:,} samples)"))
        elif spec.samples_per_param and not spec.samples_per_param[0] <= d / n <= spec.samples_per_param[1]:
            lo, hi = spec.samples_per_param
            side = "undertrained" if d / n < lo else "overtrained"
            out.append(Cell(c, d, False, f"{side}: D/N = {d / n:.3g} outside [{lo:g}, {hi:g}]"))
        else:
            out.append(Cell(c, d, True))
    return out


def make_plan(spec: Spec, n_actions: int | None = None, world_size: int = 1, out: Path | None = None) -> Plan:
    """Which runs, which snapshots, what compute: each size's run shape, the one `train bc` (or
    `train rl`) will have. ``n_actions``: the Atari game's action count (it changes the CNN's head
    and so its FLOPs; default 18). ``out``: the sweep directory (where an RL sweep's [compare.bc]
    run is, once trained)."""
    runs = []
    for size in spec.sizes:
        cfg = run_config(spec, size, budgets=tuple(spec.budgets))
        if spec.rl:
            from trajdata.rl.shape import run_shape as rl_shape

            shape = rl_shape(cfg)
        else:
            shape = run_shape(cfg, spec.family, n_actions, world_size)
        for seed in spec.seeds or [None]:
            runs.append(PlannedRun(run_name(spec, size, seed), size, shape, cells(spec, shape), seed))
    compare = plan_comparison(spec, out) if spec.compare else None
    return Plan(spec, runs, runs[0].shape.samples_per_step, compare)


# ---- an RL sweep's comparison: from scratch vs from a BC snapshot, at equal total compute --------------

BC_RUN = "bc"  # OUT/bc: the [compare.bc] run


@dataclass
class Comparison:
    """The BC-initialised RL run of an RL sweep: the BC snapshot it starts from (``init``: a given run or
    checkpoint, or ``bc``, the BC run the sweep trains first), that snapshot's training FLOPs, and
    the RL budgets at which its snapshots fall: each sweep budget C less the BC FLOPs and the
    teacher's (kickstarting), so that its total compute is C, as a from-scratch run's at C."""

    init: str
    bc: PlannedRun | None  # the [compare.bc] run; None: init is given
    bc_flops: float | None  # the snapshot's FLOPs (planned while the [compare.bc] run is not trained yet)
    run: PlannedRun | None  # None while the snapshot (its architecture) is not there
    totals: dict[float, float] = field(default_factory=dict)  # RL budget -> total compute
    note: str = ""

    @property
    def compute(self) -> float:
        return (self.bc.compute if self.bc else 0.0) + (self.run.compute if self.run else 0.0)


def plan_comparison(spec: Spec, out: Path | None) -> Comparison:
    """The comparison's runs: the [compare.bc] run (its planned FLOPs until it is trained), and the
    BC-initialised run once its snapshot's architecture is known (the [compare.bc] size, or the
    given snapshot's when it is there)."""
    from trajdata.train import checkpoint as ckpt_io

    cmp, bc_run, model, bc_flops = spec.compare, None, None, None
    if "bc" in cmp:
        from trajdata.train.bc import BCConfig
        from trajdata.train.shape import run_shape as bc_shape

        size = (cmp["bc"]["width"], cmp["bc"]["layers"]) if "width" in cmp["bc"] and "layers" in cmp["bc"] else None
        shape = bc_shape(BCConfig(**{**cmp["bc"], "dataset": "-", "out": "-", "core": "lstm", "family": "nethack"}),
                         "nethack")
        bc_run = PlannedRun(BC_RUN, size, shape, cells(replace(spec, samples_per_param=None), shape))
        init = str((out or Path("OUT")) / BC_RUN)
        model, bc_flops = shape.model, float(shape.flops(bc_run.samples))
        there = max(bc_run.budgets, default=None) in {b for b, _ in ckpt_io.snapshots(init)}
    else:
        init = cmp["init"]
        there = Path(init).exists()
    if there:
        from trajdata.rl.agent import bc_snapshot

        ck, model = bc_snapshot(init)
        bc_flops = float(ck["flops"])
    c = Comparison(init, bc_run, bc_flops, None)
    if model is None:
        c.note = f"BC snapshot {init} not found"
        return c
    return _comparison_run(spec, c, model)


def _comparison_run(spec: Spec, c: Comparison, model) -> Comparison:
    """The BC-initialised run of ``c``, its RL budgets at the sweep's total budgets."""
    from trajdata.models.flops import effective_params
    from trajdata.rl.shape import run_shape as rl_shape

    kick = float(spec.compare.get("kickstart_coef", 0.0))
    cfg = run_config(spec, None, init=c.init, kickstart_coef=kick,
                     **{k: spec.compare[k] for k in ("kickstart_decay",) if k in spec.compare})
    shape = rl_shape(cfg, bc_cfg=model)
    per_step = shape.flops_per_sample + (2 * effective_params(model) if kick > 0 else 0)
    budgets, skipped = [], []
    for total in spec.budgets:
        rl = float(f"{(total - c.bc_flops) * shape.flops_per_sample / per_step:.6g}")
        if rl <= 0:
            skipped.append(Cell(total, 0, False, f"total {total:.3g} <= the BC snapshot's {c.bc_flops:.3g} FLOPs"))
            continue
        budgets.append(rl)
        c.totals[rl] = total
    shape = replace(shape, budgets=tuple(budgets))
    c.run = PlannedRun(f"rl-bc-h{model.width}-L{model.layers}", (model.width, model.layers), shape,
                       skipped + cells(replace(spec, samples_per_param=None), shape))
    return c


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
    rl = plan.spec.rl
    lines = [f"sweep {plan.spec.name}: {len(plan.active)} runs, {plan.snapshots} snapshots, "
             f"{plan.samples:,} {'env steps' if rl else 'training samples'}, {plan.compute:.3g} FLOPs"
             + (f", {plan.eval_episodes:,} eval episodes" if plan.eval_episodes else
                ", no rollouts ([eval] episodes = 0: the report fits the loss only)")]
    if flops_per_s:
        secs = plan.compute / flops_per_s
        lines[0] += f" (~{secs / 3600:.3g} h at {flops_per_s:.3g} FLOP/s of training)"
    if samples_per_s:
        lines[0] += f" (~{plan.samples / samples_per_s / 60:.3g} min of training at {samples_per_s:.4g} samples/s)"
    lines.append(f"{'run':20s} {'params':>12s} {'FLOPs/' + ('step' if rl else 'sample'):>13s} {'samples':>14s} "
                 f"{'compute':>10s}  budgets")
    lines += _run_lines(plan.runs)
    c = plan.compare
    if c is not None:
        kick = plan.spec.compare.get("kickstart_coef", 0)
        lines.append(f"compare from scratch vs from the BC snapshot {c.init}"
                     + (f" ({c.bc_flops:.3g} FLOPs)" if c.bc_flops else "")
                     + (f", kickstarted (coef {kick:g})" if kick else "")
                     + f", at equal total compute: {c.compute:.3g} FLOPs more" + (f" ({c.note})" if c.note else ""))
        lines += _run_lines([r for r in (c.bc, c.run) if r is not None])
    return "\n".join(lines)


def _run_lines(runs: list[PlannedRun]) -> list[str]:
    lines = []
    for r in runs:
        kept = ",".join(f"{b:.3g}" for b in r.budgets) or "-"
        lines.append(f"{r.name:20s} {r.params:12,d} {r.flops_per_sample:13,d} {r.samples:14,d} {r.compute:10.3g}  {kept}")
        for cell in r.cells:
            if not cell.kept:
                lines.append(f"{'':20s}   skip {cell.budget:.3g}: {cell.reason}")
    return lines
