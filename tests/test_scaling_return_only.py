"""Scaling fits of RL runs: a runs table with returns and no loss (as `train rl` + `eval` write it,
C = 8ND) is fitted on the return alone, by the library, `scaling fit` and `scaling forecast`."""
import json

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

from trajdata.cli.main import cli
from trajdata.errors import DataError
from trajdata.scaling import FitConfig, fit_all
from trajdata.scaling.runs import runs_from_frame
from trajdata.scaling.synthetic import Law, runs_table

LAW = Law(k=8.0)  # N_opt ∝ C^0.6


def rl_frame(seed=0) -> pd.DataFrame:
    """An isoFLOP grid whose return 1000·L^-4 peaks at the law's N_opt, in the columns `train rl` writes:
    an empty loss, the return with its SE."""
    df = runs_table(LAW, seed=seed, budgets=np.logspace(15, 18, 6), sizes=np.logspace(5, 8.8, 9))
    ret = 1000 * df["loss"] ** -4.0
    return pd.DataFrame({"run": [f"r{i}" for i in range(len(df))], "budget": df["flops"], "params": df["params"],
                         "samples": df["samples"], "flops": df["flops"], "loss": "", "loss_se": "",
                         "family": "nethack-rl", "return": ret, "return_se": 0.01 * ret, "episodes": 100})


def test_a_table_without_loss_is_fitted_on_the_return():
    runs = runs_from_frame(rl_frame())
    assert not runs.has_loss and len(runs) == 54
    fit = fit_all(runs, FitConfig(flops_per_param_sample=8, bootstrap=100, cv_folds=2))
    assert "loss" not in fit and "returns only" in fit["loss_skipped"]
    iso = fit["return"]["isoflop"]
    assert len(iso["budgets_kept"]) == 6
    assert iso["a"]["ci"][0] <= LAW.a <= iso["a"]["ci"][1] and abs(iso["a"]["value"] - LAW.a) < 0.05
    assert fit["return"]["quadratic"]["a"]["value"] == pytest.approx(LAW.a, abs=0.05)
    assert set(fit["summary"]) >= {"return.isoflop.a", "return.quadratic.a"} and "bootstrap" in fit
    assert {r["target"] for r in fit["forecasts"]["rows"]} == {"return"}


def test_scaling_fit_and_forecast_read_rl_rows(tmp_path):
    runs = tmp_path / "runs.csv"
    rl_frame().to_csv(runs, index=False)
    r = CliRunner().invoke(cli, ["scaling", "fit", str(runs), "--out", str(tmp_path / "fit"),
                                 "--flops-per-param-sample", "8", "--bootstrap", "50"])
    assert r.exit_code == 0, r.output
    assert "return.isoflop.a" in r.output and "loss." not in r.output and "return budgets kept: 6 of 6" in r.output
    assert "median C/(N·D)" not in r.output
    fit = json.loads((tmp_path / "fit" / "fit.json").read_text())
    assert "loss" not in fit and "Loss fits: not fitted" in (tmp_path / "fit" / "report.html").read_text()
    r = CliRunner().invoke(cli, ["scaling", "fit", str(runs), "--out", str(tmp_path / "fit6"), "--bootstrap", "0"])
    assert r.exit_code == 0 and "median C/(N·D) is 8 but k = 6" in r.output, r.output
    r = CliRunner().invoke(cli, ["scaling", "forecast", str(tmp_path / "fit" / "fit.json"), "--compute", "3e18"])
    assert r.exit_code == 0, r.output
    assert "compute-optimal run (return" in r.output and "trajdata train rl --out runs/forecast-rl-" in r.output
    line = next(ln for ln in r.output.splitlines() if "trajdata train rl" in ln)
    assert "--params" in line and "--steps" in line


def test_a_table_without_loss_or_return_is_one_line(tmp_path):
    df = rl_frame().drop(columns=["return", "return_se"])
    with pytest.raises(DataError, match="is empty and there is no return column"):
        runs_from_frame(df)
    with pytest.raises(DataError, match="neither a loss nor a return column"):
        runs_from_frame(df.drop(columns=["loss", "loss_se"]))
    few = rl_frame()
    few.loc[5:, "return"] = np.nan
    with pytest.raises(DataError, match="only 5 runs"):
        fit_all(runs_from_frame(few), FitConfig(bootstrap=0))


def test_the_allocation_band_is_the_headline_interval():
    """The allocation plot's band is the bootstrap only where the exponent's headline interval is; where the
    bootstrap gave too few fits (the CPU RL sweep: 654 of 1000) the headline is OLS, and so is the band
    (before: a bootstrap band of the draws that happened to fit, under the OLS interval's numbers)."""
    from trajdata.scaling.report import plot_allocation

    fit = fit_all(runs_from_frame(rl_frame()), FitConfig(flops_per_param_sample=8, bootstrap=50, cv_folds=0))
    labels = lambda f: plot_allocation(f, "return").axes[0].get_legend_handles_labels()[1]  # noqa: E731
    assert fit["summary"]["return.isoflop.a"]["ci_method"].startswith("bootstrap")
    assert any(s.endswith("bootstrap band") for s in labels(fit))
    fit["summary"]["return.isoflop.a"]["ci_method"] = "OLS t-interval over the budget optima (the bootstrap: ...)"
    assert any(s.endswith("OLS band") for s in labels(fit)) and not any("bootstrap band" in s for s in labels(fit))


def test_a_forecast_interval_comes_from_the_bootstrap_only_where_the_exponents_does():
    """Where fewer than BOOTSTRAP_MIN_SHARE of the draws give a run (the CPU RL sweep's isoFLOP: 654 of 1000), the
    forecast's interval is the delta method's, as the exponent's headline is (before: percentiles of the 654)."""
    from trajdata.scaling.config import BOOTSTRAP_MIN_SHARE
    from trajdata.scaling.forecast import forecast_one

    fit = fit_all(runs_from_frame(rl_frame()), FitConfig(flops_per_param_sample=8, bootstrap=50, cv_folds=0))
    values = fit["bootstrap_draws"]["return"]["isoflop"]["values"]
    full = forecast_one(fit, "return", "isoflop", compute=1e18)
    assert full["interval"].startswith("bootstrap percentile")
    keep = int(np.ceil(BOOTSTRAP_MIN_SHARE * len(values))) - 1
    for row in values[keep:]:
        row[:] = [float("nan")] * len(row)
    few = forecast_one(fit, "return", "isoflop", compute=1e18)
    assert few["interval"] == f"delta method on the fit's covariance, t(4) (the bootstrap: only {keep} of 50 draws gave a run)"
    assert few["params"] == full["params"] and few["params_ci"][0] < few["params"] < few["params_ci"][1]


def test_reach_forecasts_the_compute_for_a_return_and_the_rl_report_shows_it(tmp_path):
    """`--reach R`: the C whose compute-optimal run the fits predict to reach return R, with intervals
    holding the law's C and N; the RL report's section shows it however far out, and says when no fit
    gets there."""
    from trajdata.rl.config import HUMAN_SCORE
    from trajdata.scaling.forecast import forecast
    from trajdata.sweep.report import reach_section

    fit = fit_all(runs_from_frame(rl_frame()), FitConfig(flops_per_param_sample=8, bootstrap=200, cv_folds=0))
    C = 1e19
    R = float(1000 * LAW.loss(LAW.n_opt(C), C) ** -4.0)
    rows = forecast(fit, targets=("return",), reach=R)
    assert {r["method"] for r in rows} == {"isoflop", "quadratic"}
    for r in rows:
        assert r["reach"] == R and r["return"] == pytest.approx(R, rel=1e-9)
        assert r["flops_ci"][0] <= C <= r["flops_ci"][1] and r["flops"] == pytest.approx(C, rel=0.5), r
        assert r["params_ci"][0] <= LAW.n_opt(C) <= r["params_ci"][1], r
        assert r["interval"].startswith("bootstrap percentile")
    (tmp_path / "fit.json").write_text(json.dumps(fit))
    res = CliRunner().invoke(cli, ["scaling", "forecast", str(tmp_path / "fit.json"), "--reach", str(R)])
    assert res.exit_code == 0, res.output
    assert f"{R:.4g} (given)" in res.output and "trajdata train rl --out runs/forecast-rl-N" in res.output
    html = reach_section(fit, float(HUMAN_SCORE), rl=True)
    assert "Compute to reach the average human score (127,000" in html and "Table 6" in html
    assert "1.27e+05 (given)" in html and "decades above the fitted budgets" in html
    never = reach_section(fit, 1e15, rl=True)
    assert "No forecast: the return isoflop fit never reaches 1e+15" in never and "Table 6" not in never
