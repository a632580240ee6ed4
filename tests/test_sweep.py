"""`trajdata sweep`: exact plans, resume without redoing finished work, printed cluster commands, the
whole pipeline on tiny real data."""
from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from trajdata.errors import ConfigError
from trajdata.models.flops import effective_params
from trajdata.models.nethack import NetHackConfig
from trajdata.scaling import REFERENCE_RUNS
from trajdata.sweep.plan import describe, load_spec, make_plan
from trajdata.train import checkpoint as ckpt_io

ROOT = Path(__file__).resolve().parents[1]
TRAJDATA = [sys.executable, "-m", "trajdata.cli"]


def write_spec(tmp_path: Path, dataset, sizes="[[32, 1], [64, 1], [96, 1], [128, 1]]", budgets="[2e9, 4e9]",
               extra="", eval_table="") -> Path:
    p = tmp_path / "spec.toml"
    p.write_text(f"""[sweep]
name = "tiny"
family = "nethack"
sizes = {sizes}
budgets = {budgets}
{extra}
[data]
dataset = "{dataset}"
[train]
seq_len = 64
batch_size = 4
lr = 1e-3
val_fraction = 0.3
checkpoint_every = 2
[fit]
window = 0
cv_folds = 0
{eval_table}
[report]
reference = "{REFERENCE_RUNS / 'nethack_llama_isoflop.csv'}"
""")
    return p


def test_plan_is_exact(tmp_path):
    spec = load_spec(write_spec(tmp_path, tmp_path, budgets="[1e9, 2e9, 1e10]",
                                extra="samples_per_param = [0.001, 0.2]"))
    plan = make_plan(spec)
    assert plan.step_samples == 4 * 64
    want = {}
    for h, L in [(32, 1), (64, 1), (96, 1), (128, 1)]:
        n = effective_params(NetHackConfig(width=h, layers=L))
        kept = [c for c in (1e9, 2e9, 1e10) if 0.001 <= math.ceil(c / (6 * n)) / n <= 0.2
                and math.ceil(c / (6 * n)) >= 256]
        want[f"nethack-h{h}-L{L}"] = (n, kept, max((math.ceil(c / (6 * n)) for c in kept), default=0))
    got = {r.name: (r.params, r.budgets, r.samples) for r in plan.runs}
    assert got == want
    # by hand: (32,1) N=77,049: D(1e10) = 21,632, D/N = 0.28 > 0.2 -> skipped; D(2e9) = 4,327
    assert want["nethack-h32-L1"] == (77_049, [1e9, 2e9], 4_327)
    assert plan.compute == sum(6 * n * d for n, _, d in want.values())
    assert plan.snapshots == sum(len(k) for _, k, _ in want.values())
    text = describe(plan)
    assert "skip 1e+10: overtrained: D/N = 0.281" in text and f"{plan.compute:.3g} FLOPs" in text


def test_plan_and_train_bc_share_one_run_shape(scripted_data, tmp_path):
    """A plan's N, FLOPs per sample, samples per step and budget samples are the run's own (one owner)."""
    from dataclasses import replace

    from trajdata.models.flops import FAMILIES
    from trajdata.sweep.run import bc_config
    from trajdata.train.shape import run_shape

    spec = load_spec(write_spec(tmp_path, scripted_data, budgets="[1e9, 2e9]",
                                extra="samples_per_param = [0, 1e9]"))
    spec.train.update(heads=2, use_inventory=False)
    plan = make_plan(spec)
    for r in plan.active:
        cfg = bc_config(spec, r, scripted_data, tmp_path / "o")
        shape = run_shape(cfg, "nethack")
        assert shape == r.shape and shape.model.heads == 2 and not shape.model.use_inventory
        assert shape.flops_per_sample == 6 * shape.params and r.samples == shape.samples_for(max(r.budgets))
    # the FLOPs-per-sample multiplier belongs to the family: another trainer brings its own
    eight = run_shape(cfg, "nethack", counting=replace(FAMILIES["nethack"], multiplier=8))
    assert eight.flops_per_sample == 8 * shape.params and eight.samples_for(8e9) == shape.samples_for(6e9)


def test_bad_specs_are_one_line(tmp_path):
    cases = {
        "[sweep]\nfamily = 'nethack'\nsizes = [[64, 1]]\n": "needs 'budgets'",
        "[sweep]\nfamily = 'go'\nsizes = [[64, 1]]\nbudgets = [1e9]\n[data]\ndataset = 'x'\n": "'go': choose one of",
        "[sweep]\nfamily = 'nethack'\nsizes = [64]\nbudgets = [1e9]\n[data]\ndataset = 'x'\n": "[width, layers] pairs",
        "[sweep]\nfamily = 'nethack'\nsizes = [[64, 1]]\nbudgets = [1e9]\n[data]\ndataset = 'x'\n[train]\nwidht = 3\n":
            "unknown key 'widht' in [train]",
        "[sweep]\nfamily = 'nethack'\nsizes = [[64, 1]]\nbudgets = [1e9]\n[data]\ndataset = 'x'\n[train]\nwidth = 3\n":
            "may not set 'width'",
        "[sweeep]\n": "unknown table [sweeep]",
        "[sweep\n": "not valid TOML",
        "extends = 'nowhere.toml'\n": "nowhere.toml does not exist",
        "extends = 3\n": "extends must be the path of another spec",
        "extends = 's9.toml'\n": "goes round in a circle",  # this file is s9.toml
    }
    for i, (text, want) in enumerate(cases.items()):
        p = tmp_path / f"s{i}.toml"
        p.write_text(text)
        r = subprocess.run([*TRAJDATA, "sweep", str(p), "--dry-run"], capture_output=True, text=True)
        assert r.returncode == 1 and want in r.stderr and r.stderr.count("\n") == 1, (text, r.stderr)
        with pytest.raises(ConfigError):
            load_spec(p)


def test_a_spec_extends_another_key_by_key(scripted_data, tmp_path):
    """extends = "base.toml": the base's tables, overridden key by key; the base's relative paths stay
    relative to the base; [sweep] name is the child's (or its file name), never the base's."""
    base = write_spec(tmp_path, "data/x", extra="seeds = [0, 1]")
    base.rename(tmp_path / "base.toml")
    sub = tmp_path / "variants"
    sub.mkdir()
    child = sub / "wide.toml"
    child.write_text('extends = "../base.toml"\n[sweep]\nsizes = [[16, 1], [32, 1]]\n[train]\nlr = 2e-3\n')
    spec, parent = load_spec(child), load_spec(tmp_path / "base.toml")
    assert spec.name == "wide" and parent.name == "tiny"
    assert spec.sizes == [(16, 1), (32, 1)] and spec.budgets == parent.budgets and spec.seeds == [0, 1]
    assert spec.train == dict(parent.train, lr=2e-3) and spec.fit == parent.fit
    assert spec.dataset == parent.dataset == str(tmp_path / "data" / "x")


def test_shipped_specs_plan(tmp_path):
    r = subprocess.run([*TRAJDATA, "sweep", str(ROOT / "specs/paper-nethack.toml"), "--dry-run", "--flops-per-s", "1e15"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("sweep paper-nethack: 10 runs") and "h at 1e+15 FLOP/s" in r.stdout
    small = make_plan(load_spec(ROOT / "specs/cpu-small.toml"))
    assert len(small.active) >= 4 and len(small.spec.budgets) >= 3
    kept_per_budget = {b: sum(b in r.budgets for r in small.runs) for b in small.spec.budgets}
    assert min(kept_per_budget.values()) >= 3  # every budget can have a parabola
    # make scaling-report's spec (issue #22): a decade in >= 5 budgets, 4+ sizes at each; its time at a samples/s
    decade = make_plan(load_spec(ROOT / "specs/cpu.toml"))
    budgets = decade.spec.budgets
    assert len(budgets) >= 5 and budgets[-1] / budgets[0] >= 10
    assert min(sum(b in r.budgets for r in decade.runs) for b in budgets) >= 4
    assert decade.spec.train["encoders"] == "cpu"  # the CPU proxy; the paper's spec keeps the paper's encoders
    assert "encoders" not in make_plan(load_spec(ROOT / "specs/paper-nethack.toml")).spec.train
    r = subprocess.run([*TRAJDATA, "sweep", str(ROOT / "specs/cpu.toml"), "--dry-run", "--samples-per-s", "2000"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert f"~{decade.samples / 2000 / 60:.3g} min of training at 2000 samples/s" in r.stdout.splitlines()[0]


def test_print_backend_commands_parse_back(scripted_data, tmp_path):
    """`--backend print` gives one torchrun command per run whose flags rebuild that run's BCConfig."""
    import shlex

    from trajdata.cli.train import train_bc
    from trajdata.sweep.run import bc_config

    spec_path = write_spec(tmp_path, scripted_data)
    r = subprocess.run([*TRAJDATA, "sweep", str(spec_path), "--out", str(tmp_path / "o"), "--backend", "print",
                        "--nproc-per-node", "4"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.strip().splitlines()
    plan = make_plan(load_spec(spec_path))
    assert len(lines) == len(plan.active)
    for line, run in zip(lines, plan.active):
        argv = shlex.split(line)
        assert argv[:6] == ["torchrun", "--nproc-per-node", "4", "-m", "trajdata.cli", "train"]
        ctx = train_bc.make_context("bc", argv[7:])
        want = bc_config(plan.spec, run, Path(scripted_data), tmp_path / "o")
        for k, v in ctx.params.items():
            if hasattr(want, k) and k not in ("progress",):
                assert v == getattr(want, k) or (k == "budgets" and tuple(v) == want.budgets), (k, v, getattr(want, k))
    assert not (tmp_path / "o" / "runs").exists() and not (tmp_path / "o" / "timings.jsonl").exists()


@pytest.mark.slow
def test_killed_sweep_resumes_without_redoing_finished_runs(scripted_data, tmp_path):
    spec_path = write_spec(tmp_path, scripted_data)
    out = tmp_path / "o"
    cmd = [*TRAJDATA, "sweep", str(spec_path), "--out", str(out), "--skip-eval", "--no-progress"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, start_new_session=True)
    first = out / "runs" / "nethack-h32-L1"
    deadline = time.time() + 240
    while time.time() < deadline and len(ckpt_io.read_runs(first / "runs.csv")) < 2:
        time.sleep(0.2)
    time.sleep(1.5)  # into the second run
    os.killpg(p.pid, signal.SIGKILL)
    p.wait()
    assert len(ckpt_io.read_runs(first / "runs.csv")) == 2
    before = {f: f.stat().st_mtime_ns for f in first.rglob("*") if f.is_file()}
    r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr
    after = {f: f.stat().st_mtime_ns for f in first.rglob("*") if f.is_file()}
    assert after == before  # the finished run was not touched
    rows = ckpt_io.read_runs(out / "runs.csv")
    assert sorted((x["run"], float(x["budget"])) for x in rows) == sorted(
        (r.name, b) for r in make_plan(load_spec(spec_path)).active for b in r.budgets)
    assert (out / "report.html").stat().st_size > 10_000
    fit = json.loads((out / "fit.json").read_text())
    assert fit["n_runs"] == len(rows) == 8
    # the killed invocation's data phase and the rerun's phases are in the report's wall times
    from trajdata.sweep.timings import timing_totals

    n, totals = timing_totals(out)
    assert n == 2 and totals["data_s"] >= 0 and totals["train_s"] > 0
    assert "all 2 invocations into this directory" in (out / "report.html").read_text()


def test_sigterm_stops_a_parallel_sweep_with_its_runs_checkpointed(scripted_data, tmp_path):
    """Failed before the fix: SIGTERM to `sweep --parallel 2` (what `kill` and cluster schedulers send)
    left the sweep waiting for its training processes, which trained on to the end of their runs."""
    spec_path = write_spec(tmp_path, scripted_data, sizes="[[32, 1], [64, 1]]", budgets="[2e9, 8e9]")
    out = tmp_path / "o"
    cmd = [*TRAJDATA, "sweep", str(spec_path), "--out", str(out), "--skip-eval", "--skip-report", "--parallel", "2",
           "--no-progress"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env,
                         start_new_session=True)
    runs = [out / "runs" / n for n in ("nethack-h32-L1", "nethack-h64-L1")]
    deadline = time.time() + 300
    while time.time() < deadline and p.poll() is None and not all((r / ckpt_io.LATEST).is_file() for r in runs):
        time.sleep(0.2)
    try:
        p.send_signal(signal.SIGTERM)  # the sweep's process only, not its group
        _, err = p.communicate(timeout=120)
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
    assert p.returncode == 143 and err.strip().splitlines()[-1] == "trajdata: terminated", err
    assert "Traceback" not in err, err
    assert not any(len(ckpt_io.read_runs(r / "runs.csv")) == 2 for r in runs)  # both stopped before their end
    steps = [torch_load_step(r) for r in runs]
    time.sleep(3)
    assert [torch_load_step(r) for r in runs] == steps  # no training process is left
    r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr
    assert [len(ckpt_io.read_runs(x / "runs.csv")) for x in runs] == [2, 2]
    assert all(0 < s < torch_load_step(x) for s, x in zip(steps, runs))


def test_an_interrupted_run_in_the_sweeps_own_process_does_not_stop_the_next(monkeypatch):
    """Only the pool's training processes start no run after an interrupt: a sequential sweep (or a
    notebook) that was interrupted trains again when called again."""
    import trajdata.train.bc as bc
    from trajdata.sweep import run

    calls = []

    def train(cfg):
        calls.append(cfg)
        if len(calls) == 1:
            raise KeyboardInterrupt
        return {"run": "ok"}

    monkeypatch.setattr(bc, "BCConfig", lambda **kw: kw)
    monkeypatch.setattr(bc, "train", train)
    with pytest.raises(KeyboardInterrupt):
        run._train_one("bc", {}, 1)
    try:
        again = run._train_one("bc", {}, 1)
    except KeyboardInterrupt as e:
        pytest.fail(f"the second call refused to train: {e}")
    assert again == {"run": "ok"} and len(calls) == 2


def torch_load_step(run: Path) -> int:
    import torch

    return int(torch.load(run / ckpt_io.LATEST, map_location="cpu", weights_only=False)["step"])


@pytest.mark.slow
def test_seeds_give_one_run_per_size_and_seed(scripted_data, tmp_path, monkeypatch):
    """[sweep] seeds: each size trained once per seed (run ...-sS, its config's seed), every snapshot a
    point of the fit; a [train] seed beside them, or a repeated or negative seed, is one line."""
    from trajdata.sweep.run import bc_config

    spec_path = write_spec(tmp_path, scripted_data, sizes="[[32, 1], [64, 1]]", extra="seeds = [0, 3]")
    plan = make_plan(load_spec(spec_path))
    assert [(r.name, r.seed) for r in plan.runs] == [("nethack-h32-L1-s0", 0), ("nethack-h32-L1-s3", 3),
                                                    ("nethack-h64-L1-s0", 0), ("nethack-h64-L1-s3", 3)]
    assert [bc_config(plan.spec, r, scripted_data, tmp_path / "o").seed for r in plan.runs] == [0, 3, 0, 3]
    assert plan.runs[0].shape == plan.runs[1].shape and plan.samples == 2 * sum(r.samples for r in plan.runs[::2])
    out = tmp_path / "o"
    r = subprocess.run([*TRAJDATA, "sweep", str(spec_path), "--out", str(out), "--skip-eval", "--no-progress"],
                       capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert r.returncode == 0, r.stderr
    rows = ckpt_io.read_runs(out / "runs.csv")
    assert sorted({x["run"] for x in rows}) == [r.name for r in plan.runs] and len(rows) == 8
    loss = {(x["run"], float(x["budget"])): float(x["loss"]) for x in rows}
    assert loss[("nethack-h32-L1-s0", 4e9)] != loss[("nethack-h32-L1-s3", 4e9)]  # the seed reached training
    assert json.loads((out / "fit.json").read_text())["n_runs"] == 8
    # the return plot: each seed's run thin, each size's mean over its seeds bold
    from trajdata.sweep import report

    for i, r in enumerate(plan.runs):
        table = out / "runs" / r.name / ckpt_io.RUNS_CSV
        for x in ckpt_io.read_runs(table):
            ckpt_io.upsert_run(table, dict(x, **{"return": str(i + float(x["budget"]) / 1e9), "return_se": "1.0"}))
    figs = []
    monkeypatch.setattr(report, "png", lambda fig: figs.append(fig) or "png")
    report.plot_returns(plan, out, {})
    ax = figs[0].axes[0]
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert labels[:4] == [r.name for r in plan.runs]
    assert labels[4:] == ["nethack-h32-L1: mean of 2 seeds", "nethack-h64-L1: mean of 2 seeds"]
    mean_line = [ln for ln in ax.get_lines() if ln.get_linewidth() == 2.2][0]  # h32: runs 0 and 1
    assert list(mean_line.get_ydata()) == [0.5 + b / 1e9 for b in sorted({float(x["budget"]) for x in rows})]
    for extra, want in (("seeds = [0, 0]", "lists 0 twice"), ("seeds = [-1]", "integers >= 0"),
                        ("seeds = []", "list of training seeds")):
        with pytest.raises(ConfigError, match=want):
            load_spec(write_spec(tmp_path, scripted_data, extra=extra))
    seeded = write_spec(tmp_path, scripted_data, extra="seeds = [1, 2]")
    seeded.write_text(seeded.read_text().replace("[train]\n", "[train]\nseed = 4\n"))
    with pytest.raises(ConfigError, match=r"\[train\] may not set 'seed'"):
        load_spec(seeded)


def test_phase_times_are_logged_even_when_interrupted(tmp_path):
    """Each phase appends its seconds to OUT/timings.jsonl as it ends or is interrupted; the report
    shows this invocation's and, once resumed, every invocation's sums."""
    from trajdata.sweep.report import wall_times
    from trajdata.sweep.timings import TIMINGS, timed, timing_totals

    t = {}
    with timed(tmp_path, t, "data"):
        pass
    assert wall_times(tmp_path, t) == f"Wall time: data {t['data_s']:.0f} s."
    with pytest.raises(KeyboardInterrupt):
        with timed(tmp_path, t, "train"):
            time.sleep(0.2)
            raise KeyboardInterrupt
    with (tmp_path / TIMINGS).open("a") as f:
        f.write("{half a line\n")
    with timed(tmp_path, t, "data"):
        pass
    with timed(tmp_path, t, "train"):
        time.sleep(0.1)
    rows = [json.loads(x) for x in (tmp_path / TIMINGS).read_text().splitlines() if x.startswith('{"')]
    assert [(r["phase"], r["ended"]) for r in rows] == [("data", True), ("train", False), ("data", True),
                                                        ("train", True)]
    n, totals = timing_totals(tmp_path)
    assert n == 2 and totals["train_s"] == pytest.approx(0.3, abs=0.15)
    said = wall_times(tmp_path, {"data_s": 1.0, "train_s": 2.0, "total_s": 3.0})
    assert said.startswith("Wall time, this invocation: data 1 s, train 2 s; all 2 invocations into this directory: ")


def test_forecast_prints_the_train_bc_command():
    import shlex

    from trajdata.cli.train import train_bc

    src = REFERENCE_RUNS / "nethack_llama_isoflop.csv"
    r = subprocess.run([*TRAJDATA, "scaling", "forecast", str(src), "--dataset-size", "40e9", "--target", "loss",
                        "--dataset", "data/x"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    line = next(x for x in r.stdout.splitlines() if x.startswith("compute-optimal run"))
    argv = shlex.split(line.split(": ", 1)[1])
    assert argv[:4] == ["trajdata", "train", "bc", "data/x"]
    params = dict(train_bc.make_context("bc", argv[3:]).params)
    assert params["samples"] == 40_000_000_000 and params["schedule"] == "cosine" and params["lr"] == 2e-4
    isoflop = next(x for x in r.stdout.splitlines() if x.startswith("loss    isoflop"))
    assert float(isoflop.split()[5]) == pytest.approx(float(params["params"]), rel=1e-2)  # C (lo, hi) N
    r = subprocess.run([*TRAJDATA, "scaling", "forecast", str(src), "--dataset-size", "40e9", "--run"],
                       capture_output=True, text=True)
    assert r.returncode == 1 and "--run needs --dataset" in r.stderr


def test_best_return_per_budget_and_its_separation():
    from trajdata.sweep.report import best_return_html, best_returns, seed_scatter_html
    from trajdata.sweep.returns import seed_scatter

    rows = [dict(run="a", budget="1e10", params="100", **{"return": "2.0", "return_se": "1.0"}),
            dict(run="b", budget="1e10", params="200", **{"return": "3.0", "return_se": "2.0"}),
            dict(run="a", budget="1e11", params="100", **{"return": "30.0", "return_se": "4.0"}),
            dict(run="b", budget="1e11", params="200", **{"return": "", "return_se": ""}),  # not evaluated
            dict(run="b", budget="3e10", params="200", **{"return": "-1.0", "return_se": "0.5"})]
    best = best_returns(rows)
    assert [(b["budget"], b["run"], b["return"]) for b in best] == [(1e10, "b", 3.0), (3e10, "b", -1.0),
                                                                    (1e11, "a", 30.0)]
    html = best_return_html(best)
    assert "+27.00 (6.0 SE)" in html and html.count("<tr>") == 4  # (30 - 3) / hypot(2, 4) = 6.04
    assert best_return_html(best[:1]) == ""
    # training seeds: a size's return is the mean over its seeds, the SE that of the mean
    seeds = [dict(run="rl-h8-L1-s0", budget="1e10", params="100", **{"return": "10.0", "return_se": "3.0"}),
             dict(run="rl-h8-L1-s1", budget="1e10", params="100", **{"return": "1.0", "return_se": "4.0"}),
             dict(run="rl-h16-L1-s0", budget="1e10", params="200", **{"return": "7.0", "return_se": "1.0"}),
             dict(run="rl-h16-L1-s1", budget="1e10", params="200", **{"return": "5.0", "return_se": "1.0"})]
    (b,) = best_returns(seeds)
    assert (b["run"], b["params"], b["return"], b["seeds"]) == ("rl-h16-L1", 200, 6.0, [7.0, 5.0])
    assert b["se"] == pytest.approx(2 ** 0.5 / 2)
    html = best_return_html([b, dict(b, budget=1e11, **{"return": 9.0})])
    assert "each seed" in html and "7.0, 5.0" in html and "mean over its training seeds" in html
    # the seeds' scatter against their eval SEs: (10 - 1)² / (3² + 4²) = 3.24 and (7 - 5)² / 2 = 2 over 2 dof
    sc = seed_scatter(seeds)
    assert (sc["cells"], sc["dof"], sc["median_range"]) == (2, 2, 5.5) and sc["ratio"] == pytest.approx(2.62)
    assert "= 2.62" in seed_scatter_html(sc) and seed_scatter(rows) is None and seed_scatter_html(None) == ""
