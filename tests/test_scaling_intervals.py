"""Intervals a user can trust: calibration on known laws, intervals on every forecast, the fit choices
side by side, and forecasts/fits that refuse what the data cannot say."""
import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from click.testing import CliRunner

from trajdata.cli.main import cli
from trajdata.errors import DataError
from trajdata.scaling import REFERENCE_RUNS, FitConfig, fit_all, forecast, load_runs
from trajdata.scaling.runs import runs_from_frame
from trajdata.scaling.synthetic import Law, coverage, runs_table

NETHACK = REFERENCE_RUNS / "nethack_llama_isoflop.csv"
TRAJDATA = [sys.executable, "-m", "trajdata.cli"]


def _run(*args):
    return CliRunner().invoke(cli, list(map(str, args)))


@pytest.fixture(scope="module")
def nethack_bs():
    return fit_all(load_runs(NETHACK), FitConfig(bootstrap=300, cv_folds=2))


# ---------------------------------------------------------------- calibration

def _check_coverage(res, methods):
    print(f"\ncoverage over {res['tables']} tables ({'grid' if res['grid'] else 'off-grid'}, "
          f"{res['bootstrap']} bootstrap draws each; true a = {res['true_a']}, true N = {res['true_n']:.4g} "
          f"at D = {res['dataset_size']:.4g}):")
    for m in methods:
        c = res["coverage"][m]
        print(f"  {m:10s} a: bootstrap {c['a_bootstrap']:.3f}, OLS/delta {c['a_analytic']:.3f};  "
              f"N: bootstrap {c['n_bootstrap']:.3f}, delta {c['n_analytic']:.3f};  "
              f"C to reach {res['reach']:.4g}: bootstrap {c['c_reach_bootstrap']:.3f}, delta {c['c_reach_analytic']:.3f}  "
              f"(median a interval width {res['median_a_ci_width'][m]:.4f})")
        assert res["fitted"][m] == res["tables"], res["failed"]
        assert 0.90 <= c["a_bootstrap"] <= 0.99, (m, c)
        assert 0.90 <= c["n_bootstrap"] <= 0.99, (m, c)
        assert 0.90 <= c["c_reach_bootstrap"] <= 0.99, (m, c)


def test_bootstrap_intervals_cover_the_true_law_on_an_isoflop_grid():
    """200 seeded grids (8 budgets x 10 sizes, SE 0.02-0.1 nats per point): the reported 95%
    intervals of a, of the forecast N and of the C that reaches a loss (``--reach``) hold the truth in
    90-99% of them, isoFLOP and quadratic."""
    _check_coverage(coverage(tables=200, bootstrap=200, grid=True), ("isoflop", "quadratic"))


def test_bootstrap_intervals_cover_the_true_law_off_grid():
    """200 seeded tables of 80 runs at random N and C (no shared budgets): the quadratic fit."""
    _check_coverage(coverage(tables=200, bootstrap=200, grid=False, methods=("quadratic",)), ("quadratic",))


def test_bootstrap_intervals_cover_with_per_episode_losses():
    """Runs validated on 20 shared episodes of varying difficulty: the bootstrap resamples the
    episodes (not the SEs) and still covers."""
    res = coverage(tables=200, bootstrap=200, grid=True, episodes=20)
    _check_coverage(res, ("isoflop", "quadratic"))


def test_synthetic_law_is_exact_for_both_methods():
    """Noise-free, the fits recover the law: any miss in the coverage test is the intervals' fault."""
    law = Law()
    df = runs_table(law, se_range=(0.0, 0.0))
    fit = fit_all(runs_from_frame(df), FitConfig(bootstrap=0, cv_folds=0, fit_return=False, chinchilla=False))
    D = 1e10
    for m in ("isoflop", "quadratic"):
        assert fit["loss"][m]["a"]["value"] == pytest.approx(law.a, abs=1e-6)
        row = forecast(fit, [m], ("loss",), dataset_size=D)[0]
        assert row["params"] == pytest.approx(law.n_for_dataset(D), rel=1e-4)


def test_reach_solves_the_budget_whose_optimum_has_the_loss_noise_free():
    """--reach on a noise-free law: the C (and N, D) whose optimal loss is the given one, every method."""
    law = Law()
    fit = fit_all(runs_from_frame(runs_table(law, se_range=(0.0, 0.0))),
                  FitConfig(bootstrap=0, cv_folds=0, fit_return=False, chinchilla=False))
    C = 3e19
    for m in ("isoflop", "quadratic"):
        row = forecast(fit, [m], ("loss",), reach=float(law.loss(law.n_opt(C), C)))[0]
        assert row["flops"] == pytest.approx(C, rel=1e-3)
        assert row["params"] == pytest.approx(law.n_opt(C), rel=1e-3)
        assert row["samples"] == pytest.approx(C / (law.k * law.n_opt(C)), rel=1e-3)


# ---------------------------------------------------------------- the reference runs

def test_point_estimates_are_unchanged_by_the_bootstrap(nethack_bs):
    """The exponents on the paper's runs are what the fits gave before intervals were added."""
    before = {"loss.isoflop.a": 0.6171, "loss.quadratic.a": 0.5996, "loss.chinchilla.a": 0.5478,
              "return.isoflop.a": 0.5987, "return.quadratic.a": 0.5501}
    plain = fit_all(load_runs(NETHACK), FitConfig(bootstrap=0, cv_folds=0))
    for k, v in before.items():
        assert nethack_bs["summary"][k]["value"] == pytest.approx(v, abs=1e-4)
        assert plain["summary"][k]["value"] == nethack_bs["summary"][k]["value"]
    s = nethack_bs["summary"]["loss.isoflop.a"]
    assert s["ci_method"].startswith("bootstrap percentile, 300 of 300 draws")
    assert s["ci_analytic"] == pytest.approx([0.5969, 0.6373], abs=1e-4)
    assert s["ci"][0] < s["ci_analytic"][0] and s["ci"][1] > s["ci_analytic"][1]  # the OLS interval is too narrow
    assert plain["summary"]["loss.isoflop.a"]["ci_method"] == "OLS t-interval over the budget optima"


def test_bootstrap_is_reproducible():
    runs = runs_from_frame(runs_table(seed=3))
    cfg = FitConfig(bootstrap=50, cv_folds=0, fit_return=False)
    a, b = fit_all(runs, cfg), fit_all(runs, cfg)
    assert a["bootstrap_draws"] == b["bootstrap_draws"] and a["summary"] == b["summary"]
    assert a["bootstrap_draws"]["loss"]["chinchilla"]["columns"] == ["log_E", "log_A", "log_B", "alpha", "beta"]


def test_every_forecast_row_has_intervals(nethack_bs):
    rows = forecast(nethack_bs, dataset_size=40e9)
    assert {(r["target"], r["method"]) for r in rows} == {("loss", "isoflop"), ("loss", "quadratic"),
                                                          ("loss", "chinchilla"), ("return", "isoflop"),
                                                          ("return", "quadratic")}
    for r in rows:
        t = r["target"]
        for q in ("flops", "params", t):
            lo, hi = r[q + "_ci"]
            assert lo < r[q] < hi, (r["method"], q, lo, r[q], hi)
        assert r["samples_ci"] == pytest.approx([40e9, 40e9])  # D is given
        assert r["interval"].startswith("bootstrap percentile") and r["ci_level"] == 0.95
    bare = {k: v for k, v in nethack_bs.items() if k != "bootstrap_draws"}
    for r in forecast(bare, dataset_size=40e9):
        assert r["interval"].startswith("delta method") and r["params_ci"][0] < r["params"] < r["params_ci"][1]


def test_per_episode_losses_are_resampled_where_the_table_has_them():
    df = runs_table(seed=1, episodes=12)
    fit = fit_all(runs_from_frame(df), FitConfig(bootstrap=40, cv_folds=0, fit_return=False))
    assert fit["bootstrap"]["validation_noise"]["loss"] == "12 validation episodes resampled (shared by the runs) for 80 runs"
    fit = fit_all(runs_from_frame(df.drop(columns="val_episode_losses")), FitConfig(bootstrap=40, cv_folds=0))
    assert fit["bootstrap"]["validation_noise"]["loss"] == "value + SE x N(0,1) for 80 runs"
    bad = df.assign(val_episode_losses="0:abc:10")
    with pytest.raises(DataError, match="EPISODE:LOSS:STEPS"):
        runs_from_frame(bad)


def test_vertex_weights_are_an_option_with_their_own_interval():
    fit = fit_all(load_runs(NETHACK), FitConfig(bootstrap=0, cv_folds=0, vertex_weights="se", fit_return=False))
    iso = fit["loss"]["isoflop"]
    assert iso["noise"]["weighted"] and "Knapp-Hartung" in iso["a"]["ci_method"]
    assert all(p["n_opt_se"] > 0 for p in iso["profiles"] if p["kept"])
    assert 0.55 < iso["a"]["value"] < 0.65


# ---------------------------------------------------------------- CLI

def test_cli_forecast_prints_and_returns_intervals(tmp_path):
    r = _run("scaling", "fit", NETHACK, "--out", tmp_path, "--bootstrap", 200, "--cv-folds", 2)
    assert r.exit_code == 0, r.output
    assert "intervals: 95% bootstrap percentile, 200 draws" in r.output
    fit = json.loads((tmp_path / "fit.json").read_text())
    assert fit["forecasts"]["given"] == {"compute": 1e20} and len(fit["forecasts"]["rows"]) == 5
    html = (tmp_path / "report.html").read_text()
    assert "The headline intervals are 95% bootstrap percentile intervals (200 draws)" in html
    assert "<h2>Forecast</h2>" in html and "rolling cross-validation prefers it" in html
    f = _run("scaling", "forecast", tmp_path / "fit.json", "--dataset-size", "40e9", "--json")
    assert f.exit_code == 0, f.output
    rows = json.loads(f.output)
    assert all({"params_ci", "samples_ci", "flops_ci", r["target"] + "_ci"} <= set(r) for r in rows)
    t = _run("scaling", "forecast", tmp_path / "fit.json", "--dataset-size", "40e9", "--target", "loss")
    assert t.exit_code == 0, t.output
    lines = t.output.splitlines()
    iso = next(x for x in lines if x.startswith("loss    isoflop"))
    assert iso.split()[2] == "2.97e+19" and iso.split()[3].startswith("(") and iso.split()[5] == "1.24e+08"
    i = next(i for i, x in enumerate(lines) if x.startswith("compute-optimal run (loss isoflop, rolling cross"))
    assert lines[i + 1].startswith("  N 1.24e+08 (") and "predicted loss 0.1297 (" in lines[i + 1]


def test_cli_sensitivity_marks_settings_outside_the_default(tmp_path):
    r = _run("scaling", "forecast", NETHACK, "--dataset-size", "40e9", "--sensitivity", "--bootstrap", 100,
             "--cv-folds", 2, "--json")
    assert r.exit_code == 0, r.output
    sens = json.loads(r.output)["sensitivity"]
    rows = {(x["setting"], x["target"], x["method"]): x for x in sens["rows"]}
    # the table: isoFLOP N at D = 40e9 under each setting (loss, return)
    for setting, loss_n, ret_n in (("default", 1.24e8, 8.57e7), ("window ±2", 1.09e8, 3.29e7),
                                   ("window: all sizes", 1.81e8, 2.08e7), ("optimum argmin", 9.01e7, 8.5e6),
                                   ("window: all sizes, budgets >= 1e+15", 1.81e8, 4.62e8)):
        assert rows[(setting, "loss", "isoflop")]["params"] == pytest.approx(loss_n, rel=0.01)
        assert rows[(setting, "return", "isoflop")]["params"] == pytest.approx(ret_n, rel=0.01)
    assert all("outside_default" in x and "overlaps_default" in x for x in sens["rows"])
    assert rows[("parametric points: all", "loss", "quadratic")]["overlaps_default"] is False
    assert sens["preferred"]["loss"]["method"] == "isoflop"
    r = _run("scaling", "forecast", NETHACK, "--dataset-size", "40e9", "--sensitivity", "--bootstrap", 30,
             "--cv-folds", 0, "--no-return")
    assert r.exit_code == 0, r.output
    assert any(ln.startswith(" ! parametric points: all") for ln in r.output.splitlines())
    f = _run("scaling", "fit", NETHACK, "--out", tmp_path / "rep", "--sensitivity", "--bootstrap", 30,
             "--cv-folds", 0, "--no-return")
    assert f.exit_code == 0, f.output
    assert "forecasts at C = 1e+20 under each setting:" in f.output
    html = (tmp_path / "rep" / "report.html").read_text()
    assert "<h2>Fit choices side by side</h2>" in html and "disjoint" in html
    (tmp_path / "fit.json").write_text("{}")
    bad = _run("scaling", "forecast", tmp_path / "fit.json", "--compute", "1e19", "--sensitivity")
    assert bad.exit_code == 1 and "--sensitivity refits the runs under each setting: give the RUNS table" in bad.output


# ---------------------------------------------------------------- refusals (#27 items 12, 13, 16)

def test_forecast_far_outside_the_fitted_range_warns_and_absurd_is_refused():
    """Failed before the fix: --dataset-size 1e6 printed N = 5.6e14, loss 1.9e113 and exit 0."""
    r = _run("scaling", "forecast", NETHACK, "--dataset-size", "1e6", "--bootstrap", 0, "--cv-folds", 0)
    assert r.exit_code == 1
    assert r.output.startswith("trajdata: error: no credible forecast for dataset_size=1e+06: ")
    assert "decades outside the fitted budgets (1e+14 .. 1e+19)" in r.output and len(r.output.splitlines()) == 1
    p = subprocess.run([*TRAJDATA, "scaling", "forecast", str(NETHACK), "--compute", "3e20", "--method", "isoflop",
                        "--bootstrap", "0", "--cv-folds", "0"], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    assert "warning: loss isoflop: extrapolated: C = 3e+20 FLOPs is 1.5 decades above the fitted budgets" in p.stderr
    ok = _run("scaling", "forecast", NETHACK, "--compute", "3e20", "--bootstrap", 0, "--cv-folds", 0,
              "--max-extrapolation", "1")
    assert ok.exit_code == 1 and "refused beyond 1 decades" in ok.output


def test_reach_inverts_the_forecast_at_a_compute(nethack_bs):
    """On the paper's runs: the C whose compute-optimal run is predicted to reach the loss (return) that
    `--compute 1e19` predicts is 1e19 again, with the same N and D, for every method and target; the
    isoFLOP method's agrees with its closed form; the intervals hold the point."""
    import numpy as np

    for t in ("loss", "return"):
        for r in forecast(nethack_bs, targets=(t,), compute=1e19):
            back = forecast(nethack_bs, [r["method"]], (t,), reach=r[t])[0]
            assert back["reach"] == r[t] and back[t] == pytest.approx(r[t], rel=1e-9)
            for q in ("flops", "params", "samples"):
                assert back[q] == pytest.approx(r[q], rel=1e-6), (t, r["method"], q)
                assert back[q + "_ci"][0] < back[q] < back[q + "_ci"][1]
            if r["method"] == "isoflop":
                yf = nethack_bs[t]["isoflop"]["Y_opt"]
                E, ya, yk = yf["theta"]
                y = 1 / r[t] if yf["inverse"] else r[t]
                assert np.log(back["flops"]) == pytest.approx(yf["log_c0"] + (ya - np.log(y - E)) / yk, rel=1e-9)
    # a loss above the fitted budgets' needs less compute; a return above them, more
    lo = forecast(nethack_bs, ["isoflop"], ("loss",), reach=0.13)[0]["flops"]
    assert lo < forecast(nethack_bs, ["isoflop"], ("loss",), reach=0.125)[0]["flops"]


def test_reach_names_what_no_fit_can_reach(tmp_path):
    """A return past every fit's ceiling is one line naming each fit's best; --reach on a fit with both
    targets needs --target; --reach with another given, or not positive, is refused."""
    fit = fit_all(load_runs(NETHACK), FitConfig(bootstrap=0, cv_folds=0))
    (tmp_path / "fit.json").write_text(json.dumps(fit))
    r = _run("scaling", "forecast", tmp_path / "fit.json", "--reach", "7000", "--target", "return")
    assert r.exit_code == 1
    assert r.output.startswith("trajdata: error: the return isoflop fit never reaches 7000: it levels off at 6"
                               ) and "(C up to 1e+45 FLOPs)" in r.output
    assert "the return quadratic fit never reaches 7000: its best is 6" in r.output
    assert r.output.count("\n") == 1
    r = _run("scaling", "forecast", tmp_path / "fit.json", "--reach", "6000")
    assert r.exit_code == 1 and "--reach 6000 is a loss or a return: say which with --target loss or --target return" in r.output
    r = _run("scaling", "forecast", tmp_path / "fit.json", "--reach", "6000", "--compute", "1e19")
    assert r.exit_code == 1 and "give exactly one of --dataset-size, --compute, --params, --reach" in r.output
    r = _run("scaling", "forecast", tmp_path / "fit.json", "--reach", "-1", "--target", "loss")
    assert r.exit_code == 1 and "--reach must be a positive finite number, not -1" in r.output
    ok = _run("scaling", "forecast", tmp_path / "fit.json", "--reach", "6000", "--target", "return")
    assert ok.exit_code == 0, ok.output
    sens = _run("scaling", "forecast", NETHACK, "--reach", "6000", "--target", "return", "--bootstrap", 30,
                "--sensitivity")
    assert sens.exit_code == 0, sens.output
    assert "   default                                isoflop    N  6.64e+07" in sens.output and " C 1.34e+19 (" in sens.output
    assert "6000 (given)" in ok.output and "; to reach return 6000" in ok.output


def test_parametric_fits_refuse_a_single_flop_budget():
    """Failed before the fix: Chinchilla reported a = -0.008 from one budget's runs."""
    df = pd.read_csv(NETHACK)
    one = runs_from_frame(df[df.flops == 1e16])
    with pytest.raises(DataError, match=r"no loss fit could run: .*chinchilla: the Chinchilla fit needs runs at more "
                                        r"than one FLOP budget"):
        fit_all(one, FitConfig(bootstrap=0))


def test_duplicated_rows_count_once(tmp_path):
    """Failed before the fix: a table with 30 rows listed twice counted 237 runs."""
    df = pd.read_csv(NETHACK)
    pd.concat([df, df.iloc[:30]]).to_csv(tmp_path / "dup.csv", index=False)
    r = _run("scaling", "fit", tmp_path / "dup.csv", "--out", tmp_path / "o", "--bootstrap", 0, "--cv-folds", 0)
    assert r.exit_code == 0, r.output
    fit = json.loads((tmp_path / "o" / "fit.json").read_text())
    assert fit["n_runs"] == 207 and fit["dropped_duplicates"] == 30
    assert "30 rows repeated verbatim were counted once" in r.output


def test_no_progress_bars_on_a_non_terminal_stderr(tmp_path):
    """Failed before the fix: `scaling fit 2>log` wrote tqdm bars (carriage returns) into the log."""
    p = subprocess.run([*TRAJDATA, "scaling", "fit", str(NETHACK), "--out", str(tmp_path), "--bootstrap", "20",
                        "--cv-folds", "0"], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    assert p.stderr == ""


def test_sweep_dry_run_rejects_a_negative_flops_per_s():
    """Failed before the fix: `--flops-per-s -5` printed a negative number of hours."""
    spec = Path(__file__).resolve().parents[1] / "specs" / "cpu.toml"
    r = _run("sweep", spec, "--dry-run", "--flops-per-s", "-5")
    assert r.exit_code == 1
    assert r.output.strip() == "trajdata: error: --flops-per-s must be a positive finite number of FLOP/s, not -5"
