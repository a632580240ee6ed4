"""`trajdata sweep` with family = "nethack-rl": plans of `train rl` runs (the run shape `train rl` has),
the BC-initialised run at equal total compute, printed commands, bad specs, and the whole pipeline
on real games at tiny sizes."""
from __future__ import annotations

import json
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torchrl", reason="needs torchrl (the rl extra)")
pytest.importorskip("nle", reason="needs nle (the nethack extra)")

from trajdata.models.flops import effective_params  # noqa: E402
from trajdata.rl.shape import run_shape  # noqa: E402
from trajdata.sweep.plan import describe, load_spec, make_plan  # noqa: E402
from trajdata.train import checkpoint as ckpt_io  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TRAJDATA = [sys.executable, "-m", "trajdata.cli"]
BUDGETS = (2.2e7, 4.4e7, 8.8e7)
TRAIN = "envs = 2\nunroll = 16\nactors = 0\nlog_every = 1\ncheckpoint_every = 4\n"
BC = "width = 16\nlayers = 1\nbudgets = [1e7]\nseq_len = 32\nbatch_size = 1\nval_fraction = 0.3\n"


def write_spec(tmp_path: Path, compare: str = "", extra: str = "", name="spec.toml") -> Path:
    p = tmp_path / name
    p.write_text(f"""[sweep]
name = "tiny-rl"
family = "nethack-rl"
sizes = [[8, 1], [16, 1], [32, 1]]
budgets = {list(BUDGETS)}
[train]
{TRAIN}
[eval]
episodes = 2
max_steps = 40
workers = 1
envs = 2
[fit]
bootstrap = 20
cv_folds = 0
window = 0
{compare}
{extra}""")
    return p


@pytest.fixture(scope="module")
def bc_lstm(scripted_data, tmp_path_factory) -> Path:
    """A BC run of the LSTM-core family with one snapshot (budget 1e7). Read-only."""
    from trajdata.train.bc import BCConfig, train

    out = tmp_path_factory.mktemp("bc") / "lstm"
    train(BCConfig(dataset=str(scripted_data), out=str(out), core="lstm", width=16, layers=1, seq_len=32, batch_size=1,
                   lr=3e-3, budgets=(1e7,), val_fraction=0.3, progress=False))
    return out


def test_rl_plan_is_train_rls_run_shape(tmp_path):
    from trajdata.rl.config import RLConfig

    plan = make_plan(load_spec(write_spec(tmp_path)))
    assert [r.name for r in plan.runs] == ["rl-h8-L1", "rl-h16-L1", "rl-h32-L1"] and plan.step_samples == 32
    for r in plan.runs:
        shape = run_shape(RLConfig(out="-", width=r.size[0], layers=r.size[1], envs=2, unroll=16, budgets=BUDGETS))
        assert r.shape == shape and r.flops_per_sample == 8 * r.params
        assert [c.samples for c in r.cells] == [-(-int(b) // (8 * r.params)) for b in BUDGETS]
    assert plan.runs[1].params == 29_032
    text = describe(plan)
    assert text.startswith("sweep tiny-rl: 3 runs, 9 snapshots") and "env steps" in text and "FLOPs/step" in text


def test_bc_initialised_run_meets_the_sweep_budgets_in_total_compute(bc_lstm, tmp_path):
    """Its RL budgets are the sweep's less the BC snapshot's FLOPs and the teacher's 2·N_BC per env step."""
    spec = load_spec(write_spec(tmp_path, f'[compare]\ninit = "{bc_lstm}"\nkickstart_coef = 0.5\n'))
    c = make_plan(spec).compare
    bc_ck = ckpt_io.load(ckpt_io.resolve(bc_lstm)[0])
    assert c.bc is None and c.bc_flops == bc_ck["flops"] > 0 and c.run.name == "rl-bc-h16-L1"
    n, n_bc = c.run.params, effective_params(c.run.model.__class__(**bc_ck["model_config"]))
    assert n == 29_032 and n_bc == bc_ck["params"]
    for rl, total in c.totals.items():
        assert rl + c.bc_flops + rl / (8 * n) * 2 * n_bc == pytest.approx(total, rel=1e-5)
    assert sorted(c.totals.values()) == [b for b in BUDGETS if b > c.bc_flops] and c.run.budgets == sorted(c.totals)
    line = next(x for x in describe(make_plan(spec)).splitlines() if x.startswith("compare"))
    assert f"{c.bc_flops:.3g} FLOPs" in line and "kickstarted (coef 0.5)" in line
    missing = load_spec(write_spec(tmp_path, f'[compare]\ninit = "{tmp_path / "nope"}"\n', name="m.toml"))
    assert make_plan(missing).compare.run is None  # a plan (--dry-run) says so; running it is refused
    r = subprocess.run([*TRAJDATA, "sweep", str(tmp_path / "m.toml"), "--out", str(tmp_path / "o")],
                       capture_output=True, text=True)
    assert r.returncode == 1 and "the comparison cannot start: BC snapshot" in r.stderr, r.stderr


def test_bad_rl_specs_are_one_line(tmp_path):
    from trajdata.errors import ConfigError

    rl = "[sweep]\nfamily = 'nethack-rl'\nsizes = [[8, 1]]\nbudgets = [1e9]\n"
    cases = {
        "[train]\nwidth = 3\n": "may not set 'width'",
        "[train]\nkickstart_coef = 1.0\n": "may not set 'kickstart_coef'",
        "[compare]\ninit = 'x'\n[compare.bc]\nwidth = 8\nlayers = 1\nbudgets = [1e9]\n": "needs one of init",
        "[compare]\nkickstart = 1\n": "unknown key 'kickstart' in [compare]",
        f"[compare.bc]\n{BC}": "dataset is required for [compare.bc]",
        "[compare.bc]\nwidth = 8\nlayers = 1\n[data]\ndataset = 'd'\n": "bc needs budgets",
        "[compare.bc]\ncore = 'transformer'\nbudgets = [1e9]\n[data]\ndataset = 'd'\n": "bc may not set 'core'",
        "[compare.bc]\nwidht = 8\nbudgets = [1e9]\n[data]\ndataset = 'd'\n": "unknown key 'widht' in [compare.bc]",
        "[eval]\nexpert = 'scripted'\n": "random policy",
        "[report]\nreach = -1\n": "reach must be a positive number",
        "[report]\nreac = 1\n": "unknown key 'reac' in [report]",
    }
    for i, (body, want) in enumerate(cases.items()):
        p = tmp_path / f"s{i}.toml"
        p.write_text(rl + body)
        with pytest.raises(ConfigError, match=want.replace("[", r"\[")):
            make_plan(load_spec(p))
    p = tmp_path / "bc.toml"
    p.write_text("[sweep]\nfamily = 'nethack'\nsizes = [[8, 1]]\nbudgets = [1e9]\n[data]\ndataset = 'd'\n"
                 "[compare]\ninit = 'x'\n")
    r = subprocess.run([*TRAJDATA, "sweep", str(p), "--dry-run"], capture_output=True, text=True)
    assert r.returncode == 1 and "is for RL sweeps" in r.stderr and r.stderr.count("\n") == 1, r.stderr


def test_print_backend_rl_commands_parse_back(tmp_path):
    """`--backend print`: the [compare.bc] run's torchrun command, then one `trajdata train rl` per run
    whose flags rebuild its RLConfig, the BC-initialised run last (starting from OUT/bc)."""
    from trajdata.cli.train import train_rl
    from trajdata.sweep.run import SweepOptions, jobs

    spec_path = write_spec(tmp_path, f'[compare]\nkickstart_coef = 0.5\n[compare.bc]\n{BC}\n[data]\ndataset = "d"\n')
    out = tmp_path / "o"
    r = subprocess.run([*TRAJDATA, "sweep", str(spec_path), "--out", str(out), "--backend", "print"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.strip().splitlines()
    assert len(lines) == 5 and lines[0].startswith("torchrun ") and "train bc" in lines[0] and "--core lstm" in lines[0]
    plan = make_plan(load_spec(spec_path), out=out)
    want = jobs(plan, Path("d"), out, SweepOptions(out=str(out), backend="print"))
    assert [j.name for j in want] == ["rl-h8-L1", "rl-h16-L1", "rl-h32-L1", "rl-bc-h16-L1"]
    for line, job in zip(lines[1:], want):
        argv = shlex.split(line)
        assert argv[:3] == ["trajdata", "train", "rl"]
        params = train_rl.make_context("rl", argv[3:]).params
        for k, v in params.items():
            if k not in ("progress", "config_file"):
                assert v == getattr(job.cfg, k), (k, v, getattr(job.cfg, k))
    assert params["init"] == str(out / "bc") and params["kickstart_coef"] == 0.5
    assert not (out / "runs").exists() and not (out / "bc").exists()


def test_shipped_rl_specs_plan():
    r = subprocess.run([*TRAJDATA, "sweep", str(ROOT / "specs/paper-rl.toml"), "--dry-run", "--flops-per-s", "1e14"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("sweep paper-rl: 9 runs") and "h at 1e+14 FLOP/s" in r.stdout
    plan = make_plan(load_spec(ROOT / "specs/paper-rl.toml"))
    assert min(r.params for r in plan.runs) == pytest.approx(1e5, rel=0.1)
    assert max(r.params for r in plan.runs) == pytest.approx(5e7, rel=0.1)
    cpu = make_plan(load_spec(ROOT / "specs/cpu-rl.toml"))
    kept_per_budget = {b: sum(b in r.budgets for r in cpu.runs) for b in cpu.spec.budgets}
    assert len(cpu.spec.budgets) >= 3 and min(kept_per_budget.values()) >= 3
    assert cpu.compare is not None and cpu.compare.run is not None
    assert cpu.spec.train["encoders"] == cpu.spec.compare["bc"]["encoders"] == "cpu"  # the BC teacher matches the agent
    assert cpu.compare.run.shape.model.encoders == "cpu" and cpu.spec.compare["kickstart_coef"] > 0
    assert cpu.spec.seeds == [0, 1] and len(cpu.runs) == 2 * len(cpu.spec.sizes)  # two training seeds per size
    assert sorted({r.seed for r in cpu.runs}) == [0, 1] and all(r.name.endswith(f"-s{r.seed}") for r in cpu.runs)
    assert "encoders" not in make_plan(load_spec(ROOT / "specs/paper-rl.toml")).spec.train
    wide = make_plan(load_spec(ROOT / "specs/cpu-rl-wide.toml"))  # cpu-rl plus h = 2, to 2.15e10
    assert wide.spec.name == "cpu-rl-wide" and wide.spec.sizes == [(2, 1), *cpu.spec.sizes]
    assert [r.name for r in wide.runs[2:]] == [r.name for r in cpu.runs]  # resumes a cpu-rl sweep's directory
    assert wide.runs[0].budgets == cpu.spec.budgets[:3] and wide.spec.eval == cpu.spec.eval
    seeds = make_plan(load_spec(ROOT / "specs/cpu-rl-seeds.toml"))  # cpu-rl-wide at 4 seeds
    assert seeds.spec.sizes == wide.spec.sizes and seeds.spec.seeds == [0, 1, 2, 3]
    assert {r.name for r in wide.runs} < {r.name for r in seeds.runs} and len(seeds.runs) == 2 * len(wide.runs)
    more = make_plan(load_spec(ROOT / "specs/cpu-rl-1e11.toml"))  # cpu-rl to 1e11: resumes a cpu-rl sweep's runs
    assert more.spec.budgets == [*cpu.spec.budgets, 1e11] and [r.name for r in more.runs] == [r.name for r in cpu.runs]
    assert more.spec.train == cpu.spec.train and more.spec.eval == cpu.spec.eval
    wide11 = make_plan(load_spec(ROOT / "specs/cpu-rl-wide-1e11.toml"))  # cpu-rl-1e11 plus h = 2 at every budget
    assert wide11.spec.sizes == wide.spec.sizes and wide11.spec.budgets == more.spec.budgets
    assert [r.name for r in wide11.runs] == [r.name for r in wide.runs] and wide11.runs[0].budgets == more.spec.budgets
    seeds11 = make_plan(load_spec(ROOT / "specs/cpu-rl-seeds-1e11.toml"))  # both: 4 seeds of every size to 1e11
    assert seeds11.spec.budgets == more.spec.budgets and seeds11.spec.sizes == wide.spec.sizes
    assert {r.name for r in seeds11.runs} == {r.name for r in seeds.runs} | {r.name for r in wide11.runs}
    assert all(r.budgets == more.spec.budgets for r in seeds11.runs) and seeds11.spec.train == more.spec.train
    aa = make_plan(load_spec(ROOT / "specs/cpu-rl-aa.toml"))  # cpu-rl with AutoAscend as the BC teacher
    from trajdata.rl.config import ENVS

    assert aa.spec.collect["expert"] == "autoascend" and aa.spec.collect["character"] == ENVS[aa.spec.train.get(
        "env", "NetHackScore-v0")]  # the teacher plays the RL env's character
    assert [r.name for r in aa.runs] == [r.name for r in cpu.runs] and aa.spec.compare == cpu.spec.compare
    assert {k: v for k, v in aa.spec.collect.items() if k != "character"} == dict(cpu.spec.collect, expert="autoascend")


@pytest.mark.slow
def test_rl_sweep_end_to_end_and_resume(tmp_path):
    """Collect scripted games, train the [compare.bc] run, three from-scratch sizes and the
    BC-initialised run, evaluate every snapshot, gather, fit, report; a rerun redoes nothing."""
    spec_path = write_spec(tmp_path, f'[compare]\nkickstart_coef = 0.5\n[compare.bc]\n{BC}',
                           '[data.collect]\nexpert = "scripted"\nshards = 2\nepisodes_per_shard = 2\nmax_steps = 300\n'
                           'workers = 1\n')
    out = tmp_path / "o"
    cmd = [*TRAJDATA, "sweep", str(spec_path), "--out", str(out), "--no-progress"]
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    rows = ckpt_io.read_runs(out / "runs.csv")
    assert len(rows) == 9 and {x["family"] for x in rows} == {"nethack-rl"}
    assert all(x["return"] != "" and int(x["episodes"]) == 2 and x["loss"] == "" for x in rows)
    cmp = ckpt_io.read_runs(out / "compare.csv")
    bc_flops = ckpt_io.load(ckpt_io.resolve(out / "bc")[0])["flops"]
    assert [float(x["total_budget"]) for x in cmp] == [b for b in BUDGETS if b > bc_flops] and len(cmp) >= 2
    for x in cmp:
        assert float(x["flops_init"]) == bc_flops and float(x["flops_kickstart"]) > 0 and x["return"] != ""
        assert float(x["total_flops"]) == float(x["flops_actual"]) + bc_flops + float(x["flops_kickstart"])
    report = (out / "report.html").read_text()
    assert "From scratch vs from BC, at equal total compute" in report and "rl-bc-h16-L1" in report
    assert [c["total"] for c in json.loads((out / "compare.json").read_text())] == [float(x["total_budget"]) for x in cmp]
    positive = all(float(x["return"]) > 0 for x in rows)
    if (out / "fit.json").is_file():
        fit = json.loads((out / "fit.json").read_text())
        assert "loss" not in fit and fit["config"]["flops_per_param_sample"] == 8.0 and "return" in fit
    else:  # too few or non-positive returns at these tiny sizes: the report and the command say why
        assert not positive and "No fit could run" in report and "no fit could run" in r.stdout
    before = {f.relative_to(out): f.stat().st_mtime_ns for f in (out / "runs").rglob("*.pt")}
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert {f.relative_to(out): f.stat().st_mtime_ns for f in (out / "runs").rglob("*.pt")} == before
    moved = Path(shutil.move(out, tmp_path / "moved"))  # a moved (or copied) sweep resumes where it is
    cmd[cmd.index(str(out))] = str(moved)
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert {f.relative_to(moved): f.stat().st_mtime_ns for f in (moved / "runs").rglob("*.pt")} == before
    snap = ckpt_io.resolve(moved / "bc")[0]  # the BC run retrained in place: the BC-initialised run is not kept
    ck = ckpt_io.load(snap)
    name = next(k for k, v in ck["model"].items() if v.is_floating_point())
    ck["model"][name] = ck["model"][name] + 1.0
    ckpt_io.save(snap, ck)
    r = subprocess.run(cmd, capture_output=True, text=True)
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.returncode == 1 and len(lines) == 1 and "rl-bc-h16-L1 holds an RL run from the BC snapshot" in lines[0], r.stderr
    assert "as it was before it changed (sha256" in lines[0], r.stderr
    assert {f.relative_to(moved): f.stat().st_mtime_ns for f in (moved / "runs").rglob("*.pt")} == before
