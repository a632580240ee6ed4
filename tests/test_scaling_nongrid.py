"""Scaling fits on runs that are not on an isoFLOP grid, budget binning, and the fit/forecast messages."""
import json
import warnings

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

from trajdata.cli.main import cli
from trajdata.errors import ConfigError, DataError
from trajdata.scaling import FitConfig, fit_all, forecast
from trajdata.scaling.fits import bin_budgets, fit_quadratic
from trajdata.scaling.report import strict_json
from trajdata.scaling.runs import runs_from_frame

LAW = dict(E=1.7, A=400.0, alpha=0.34, B=410.0, beta=0.28)
A_TRUE = LAW["beta"] / (LAW["alpha"] + LAW["beta"])


def chinchilla_loss(N, D, E, A, alpha, B, beta):
    return E + A / N ** alpha + B / D ** beta


def random_frame(n=120, noise=0.003, seed=0):
    """Runs at log-uniform random N and D (each its own budget), loss from LAW, return = 100 L^-2."""
    rng = np.random.default_rng(seed)
    N, D = 10 ** rng.uniform(6, 9, n), 10 ** rng.uniform(8, 11, n)
    L = chinchilla_loss(N, D, **LAW) * np.exp(noise * rng.standard_normal(n))
    return pd.DataFrame({"flops": 6 * N * D, "params": N, "samples": D, "loss": L, "return": 100 * L ** -2.0})


def jittered_frame(jitter=0.05, seed=0):
    """9 budgets x 7 sizes around the optimum, each run's budget scaled by exp(U(-jitter, jitter))."""
    rng = np.random.default_rng(seed)
    al, be = LAW["alpha"], LAW["beta"]
    G = (al * LAW["A"] / (be * LAW["B"])) ** (1 / (al + be))
    rows = []
    for C in np.logspace(17, 21, 9):
        for N in G * (C / 6) ** A_TRUE * np.logspace(-1, 1, 7):
            Cj = C * np.exp(rng.uniform(-jitter, jitter))
            D = Cj / (6 * N)
            L = chinchilla_loss(N, D, **LAW) * np.exp(0.003 * rng.standard_normal())
            rows.append({"flops": Cj, "params": N, "samples": D, "loss": L})
    return pd.DataFrame(rows)


@pytest.fixture(scope="module")
def random_fit():
    return fit_all(runs_from_frame(random_frame(), source="random"))


@pytest.fixture(scope="module")
def random_fit_json(tmp_path_factory):
    """The random-runs fit without its return section (as for a table with no return column), saved."""
    fit = fit_all(runs_from_frame(random_frame().drop(columns="return")), FitConfig(cv_folds=0))
    path = tmp_path_factory.mktemp("fit") / "fit.json"
    path.write_text(json.dumps(strict_json(fit), allow_nan=False))
    return path


def _run(*args):
    return CliRunner().invoke(cli, list(map(str, args)))


def _one_error_line(r) -> str:
    assert r.exit_code == 1, r.output
    lines = [ln for ln in r.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("trajdata: error:"), r.output
    return lines[0]


# ---------------------------------------------------------------- fits on random (non-grid) runs

def test_chinchilla_recovers_law_on_random_runs(random_fit):
    loss = random_fit["loss"]
    iso = loss["methods"]["isoflop"]
    assert not iso["ran"] and "0 of 120 FLOP budgets" in iso["reason"] and "--bin-budgets" in iso["reason"]
    assert "isoflop" not in loss and "loss.isoflop.a" not in random_fit["summary"]
    ch = loss["chinchilla"]
    assert loss["methods"]["chinchilla"] == {"ran": True, "reason": "on 120 runs (all runs: the isoFLOP method did not run)"}
    assert ch["converged"] and ch["optimum_exists"]
    alpha, beta = ch["coef"]["alpha"]["value"], ch["coef"]["beta"]["value"]
    assert alpha == pytest.approx(LAW["alpha"], abs=0.01)
    assert beta == pytest.approx(LAW["beta"], abs=0.01)
    assert ch["E"] == pytest.approx(LAW["E"], rel=0.02)
    assert ch["a"]["value"] == pytest.approx(beta / (alpha + beta), abs=1e-6)
    assert ch["a"]["value"] == pytest.approx(A_TRUE, abs=0.01)
    assert ch["a"]["ci"][0] < A_TRUE < ch["a"]["ci"][1]
    assert random_fit["summary"]["loss.chinchilla.a"] == ch["a"]
    assert loss["crossval"]["folds"] == [] and "did not run" in loss["crossval"]["skipped"]


def test_quadratic_runs_on_random_runs(random_fit):
    q = random_fit["loss"]["quadratic"]
    assert random_fit["loss"]["methods"]["quadratic"]["ran"] and q["n"] == 120
    assert q["optimum_exists"]
    # a quadratic in (ln N, ln D) only approximates Chinchilla's form over three decades
    assert q["a"]["value"] == pytest.approx(A_TRUE, abs=0.08)
    # ln R = ln 100 - 2 ln L exactly, so the maximised return quadratic has the same allocation
    r = random_fit["return"]
    assert not r["methods"]["isoflop"]["ran"] and r["methods"]["quadratic"]["ran"]
    assert r["quadratic"]["a"]["value"] == pytest.approx(q["a"]["value"], abs=1e-9)
    assert random_fit["return_vs_loss"]["delta"]["value"] == pytest.approx(-2.0, abs=1e-9)


def test_quadratic_recovers_exponent_on_random_runs():
    b = (0.5, -0.12, -0.10, 0.006, 0.004, 0.005)
    a = (2 * b[5] - b[4]) / (2 * (b[3] - b[4] + b[5]))
    rng = np.random.default_rng(1)
    x, y = np.log(10 ** rng.uniform(6, 9, 80)), np.log(10 ** rng.uniform(8, 11, 80))
    t = b[0] + b[1] * x + b[2] * y + b[3] * x * x + b[4] * x * y + b[5] * y * y + 0.002 * rng.standard_normal(80)
    runs = runs_from_frame(pd.DataFrame({"flops": 6 * np.exp(x + y), "params": np.exp(x), "samples": np.exp(y),
                                         "loss": np.exp(t)}))
    q = fit_quadratic(runs, runs.loss, FitConfig())
    assert q["optimum_exists"]
    assert q["a"]["value"] == pytest.approx(a, abs=0.005)
    assert q["a"]["ci"][0] < a < q["a"]["ci"][1]


def test_bootstrap_resamples_all_runs_when_off_grid():
    runs = runs_from_frame(random_frame(n=60).drop(columns="return"))
    fit = fit_all(runs, FitConfig(bootstrap=4, grid_top_k=2))
    bs = fit["bootstrap"]["loss.chinchilla.a"]
    assert bs["n"] == 4 and bs["ci"][0] < bs["ci"][1]  # a resample per budget would repeat the same runs
    assert bs["median"] == pytest.approx(A_TRUE, abs=0.03)
    assert "loss.isoflop.a" not in fit["bootstrap"]


def test_no_loss_method_can_run_is_a_data_error():
    df = pd.DataFrame({"flops": 6e17 * np.arange(1, 11), "params": 1e6, "samples": 1e11 * np.arange(1, 11),
                       "loss": 2.0})
    with pytest.raises(DataError, match=r"no loss fit could run: isoflop: .*; quadratic: .*; chinchilla: .*2 sizes"):
        fit_all(runs_from_frame(df))


# ---------------------------------------------------------------- binning budgets

def test_bin_budgets_snaps_to_bin_centres():
    runs = runs_from_frame(jittered_frame())
    binned = bin_budgets(runs, 10)
    assert len(runs.budgets) == 63 and len(binned.budgets) == 9
    assert binned.budgets == pytest.approx(np.logspace(17, 21, 9), rel=1e-12)
    assert np.abs(np.log10(binned.flops / runs.flops)).max() < 0.05
    assert binned.params is runs.params and binned.samples is runs.samples
    assert bin_budgets(runs, 0) is runs
    with pytest.raises(ConfigError, match="bin_budgets must be >= 0") as e:
        FitConfig(bin_budgets=-1)
    assert e.value.field == "bin_budgets"  # the CLI shows it as --bin-budgets


def test_binning_makes_isoflop_possible_on_jittered_budgets():
    runs = runs_from_frame(jittered_frame())
    plain = fit_all(runs, FitConfig(cv_folds=0))
    assert not plain["loss"]["methods"]["isoflop"]["ran"]
    assert plain["loss"]["chinchilla"]["a"]["value"] == pytest.approx(A_TRUE, abs=0.01)
    fit = fit_all(runs, FitConfig(bin_budgets=10, cv_folds=2))
    assert fit["binning"] == {"bins_per_decade": 10, "budgets_before": 63, "budgets_after": 9}
    assert fit["loss"]["methods"]["isoflop"] == {"ran": True, "reason": "9 of 9 FLOP budgets give an optimum"}
    iso = fit["loss"]["isoflop"]
    assert iso["budgets_kept"] == pytest.approx(np.logspace(17, 21, 9), rel=1e-12)
    assert iso["a"]["value"] == pytest.approx(A_TRUE, abs=0.01)  # the snapped +-5% jitter biases it ~0.005
    assert len(fit["loss"]["crossval"]["folds"]) == 2
    assert "inside the kept isoFLOP windows" in fit["loss"]["methods"]["chinchilla"]["reason"]


# ---------------------------------------------------------------- CLI and messages

def test_cli_fit_and_forecast_off_grid_with_dropped_runs(tmp_path):
    df = random_frame().drop(columns="return")
    df.loc[3, "loss"] = np.nan
    df.loc[5, "flops"] = np.inf
    df.loc[7, "loss"] = -np.inf
    df.to_csv(tmp_path / "runs.csv", index=False)
    r = _run("scaling", "fit", tmp_path / "runs.csv", "--out", tmp_path / "rep")
    assert r.exit_code == 0, r.output
    lines = r.output.splitlines()
    assert [ln for ln in lines if ln.startswith("dropped")] == [
        "dropped 3 of 120 runs with NaN/inf values (flops: 1, loss: 2)"]
    assert any(ln.startswith("loss.isoflop: not run: only 0 of 117 FLOP budgets") for ln in lines)
    assert any(ln.startswith("loss.chinchilla.a") for ln in lines)
    fit = json.loads((tmp_path / "rep" / "fit.json").read_text())
    assert fit["n_runs"] == 117
    assert fit["dropped_non_finite"] == {"n": 3, "of": 120, "by_column": {"flops": 1, "loss": 2}}
    assert {m: s["ran"] for m, s in fit["loss"]["methods"].items()} == \
        {"isoflop": False, "quadratic": True, "chinchilla": True}
    html = (tmp_path / "rep" / "report.html").read_text()
    assert html.count("data:image/png;base64,") == 3
    assert "isoFLOP profiles: not fitted" in html and "3 of 120 runs were dropped" in html
    f = _run("scaling", "forecast", tmp_path / "rep" / "fit.json", "--dataset-size", "40e9", "--json")
    assert f.exit_code == 0, f.output
    rows = json.loads(f.output)
    assert {r["method"] for r in rows} == {"quadratic", "chinchilla"}
    assert all(r["samples"] == pytest.approx(40e9, rel=1e-9) for r in rows)


def test_cli_bin_budgets_flag(tmp_path):
    jittered_frame().to_csv(tmp_path / "runs.csv", index=False)
    r = _run("scaling", "forecast", tmp_path / "runs.csv", "--bin-budgets", "10", "--cv-folds", "0",
             "--method", "isoflop", "--compute", "1e22", "--json")
    assert r.exit_code == 0, r.output
    (row,) = json.loads(r.output)
    assert row["method"] == "isoflop" and row["flops"] == pytest.approx(1e22)
    assert "must be >= 0" in _one_error_line(_run("scaling", "fit", tmp_path / "runs.csv", "--out",
                                                  tmp_path / "o", "--bin-budgets", "-1"))


def test_cli_reports_runs_without_return(tmp_path):
    df = random_frame(n=40)
    df.loc[::10, "return"] = np.nan
    df.to_csv(tmp_path / "runs.csv", index=False)
    r = _run("scaling", "forecast", tmp_path / "runs.csv", "--cv-folds", "0", "--compute", "1e19", "--json")
    assert r.exit_code == 0, r.output
    assert "4 runs without a finite return are left out of the return fits" in r.output


@pytest.mark.parametrize("flag, value", [("--compute", "inf"), ("--compute", "nan"), ("--compute", "0"),
                                         ("--compute", "-1e19"), ("--dataset-size", "inf"), ("--params", "nan")])
def test_forecast_rejects_non_finite_or_non_positive_input(random_fit_json, flag, value):
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        line = _one_error_line(_run("scaling", "forecast", random_fit_json, flag, value))
    assert f"{flag} must be a positive finite number" in line


def test_forecast_return_on_fit_without_returns(random_fit_json):
    line = _one_error_line(_run("scaling", "forecast", random_fit_json, "--compute", "1e20", "--target", "return"))
    assert line == "trajdata: error: the fit has no return data (the runs table has no return column)"
    fit = json.loads(random_fit_json.read_text())
    assert {r["target"] for r in forecast(fit, compute=1e20)} == {"loss"}
    off = fit_all(runs_from_frame(random_frame(n=30)), FitConfig(fit_return=False, cv_folds=0))
    with pytest.raises(DataError, match=r"no return data \(return fits were turned off"):
        forecast(off, targets=("return",), compute=1e20)


def test_forecast_says_why_a_method_did_not_run(random_fit_json):
    line = _one_error_line(_run("scaling", "forecast", random_fit_json, "--compute", "1e20", "--method", "isoflop"))
    assert "the loss isoflop fit did not run: only 0 of 120 FLOP budgets" in line
    assert "return" not in line
