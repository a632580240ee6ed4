"""Self-contained HTML report of a fit: tables plus matplotlib figures embedded as base64 PNG."""
from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import NullFormatter  # noqa: E402
import numpy as np  # noqa: E402
from scipy import stats  # noqa: E402

from trajdata.config import atomic_write_text  # noqa: E402
from trajdata.scaling.fits import allocation_n, predict_optimum, power_plus_const  # noqa: E402

LABELS = {"loss": "validation loss", "return": "mean return"}
METHOD_STYLE = {"quadratic": ("tab:orange", "--"), "chinchilla": ("tab:green", ":")}


def png(fig) -> str:
    """``fig`` as base64 PNG (for an ``<img src="data:image/png;base64,...">``); closes it."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode()


def _budget_colors(budgets):
    lc = np.log10(budgets)
    span = max(lc.max() - lc.min(), 1e-9)
    return {b: plt.cm.viridis((np.log10(b) - lc.min()) / span) for b in budgets}


def _count(n: float) -> str:
    """5820 -> '5.8k', 2.5e6 -> '2.5M'."""
    for div, unit in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if n >= div:
            return f"{n / div:.2g}{unit}"
    return f"{n:.0f}"


def plot_isoflop(res: dict, target: str):
    profiles = res["profiles"]
    colors = _budget_colors(np.array([p["flops"] for p in profiles]))
    fig, ax = plt.subplots(figsize=(8, 5.5))
    for p in profiles:
        c = colors[p["flops"]]
        N, y = np.array(p["params"]), np.array(p["value"])
        ax.errorbar(N, y, yerr=p.get("se"), fmt="o", color=c, ms=5, mfc=c if p["kept"] else "none",
                    alpha=1 if p["kept"] else 0.5, capsize=2, elinewidth=0.8)
        if p["coef"] is not None:
            xs = np.linspace(np.log(p["window"][0]), np.log(p["window"][1]), 60)
            ys = np.polyval(p["coef"], xs)
            ax.plot(np.exp(xs), np.exp(ys) if p["log_target"] else ys, "-" if p["kept"] else "--", color=c,
                    lw=1.5 if p["kept"] else 1.0, alpha=1 if p["kept"] else 0.6)
        if p["kept"]:
            ax.plot(p["n_opt"], p["y_opt"], "*", color="crimson", ms=11, mec="k", mew=0.5, zorder=5)
    ax.set_xscale("log")
    sizes = sorted({n for p in profiles for n in p["params"]})
    if len(sizes) <= 8:  # the grid's sizes as the ticks (log-axis minor labels overlap on 1-2 decades)
        ax.set_xticks(sizes, [_count(n) for n in sizes])
        ax.xaxis.set_minor_formatter(NullFormatter())
    if target == "loss":
        ax.set_yscale("log")
    sm = plt.cm.ScalarMappable(cmap="viridis", norm=matplotlib.colors.LogNorm(
        min(colors), max(colors)))
    fig.colorbar(sm, ax=ax, label="FLOP budget C")
    ax.set_xlabel("parameters N")
    ax.set_ylabel(LABELS[target])
    ax.set_title(f"isoFLOP profiles ({target}): filled = kept, hollow/dashed = dropped, * = optimum"
                 + ("" if any(p["kept"] for p in profiles) else "\n(no budget gives an optimum inside its sizes)"),
                 fontsize=10)
    return fig


def _c_range(fit: dict) -> np.ndarray:
    return np.logspace(np.log10(min(fit["budgets"])), np.log10(max(fit["budgets"])) + 1, 100)


def plot_runs(fit: dict, target: str):
    """All runs (no isoFLOP profiles to draw) coloured by budget, with each parametric fit's optimum path."""
    res = fit[target]
    pts = res["runs"]
    C, N, y = (np.array(pts[k]) for k in ("flops", "params", "value"))
    fig, ax = plt.subplots(figsize=(8, 5.5))
    sc = ax.scatter(N, y, c=C, cmap="viridis", norm=matplotlib.colors.LogNorm(C.min(), C.max()),
                    s=18, edgecolors="k", linewidths=0.3)
    fig.colorbar(sc, ax=ax, label="FLOP budget C")
    Cs = np.logspace(np.log10(C.min()), np.log10(C.max()), 100)
    k = fit["config"]["flops_per_param_sample"]
    for meth, (color, ls) in METHOD_STYLE.items():
        if meth in res and res[meth]["optimum_exists"]:
            No, Yo = predict_optimum(meth, res[meth], Cs, k)
            ax.plot(No, Yo, ls, color=color, lw=2, label=f"{meth}: compute-optimal runs")
    ax.set_xscale("log")
    if (y > 0).all():
        ax.set_yscale("log")
    ax.set_xlabel("parameters N")
    ax.set_ylabel(LABELS[target])
    ax.set_title(f"runs ({target}); the isoFLOP method did not run")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    return fig


def _band(ax, fit: dict, C, color, label, draws=None, level=0.95):
    """Power-law line with its band: percentiles of the bootstrap draws (rows of intercept, slope)
    where given, else the OLS covariance's t-band."""
    X = np.stack([np.ones_like(C), np.log(C)], 1)
    mu = X @ [fit["intercept"]["value"], fit["exponent"]["value"]]
    ax.plot(C, np.exp(mu), "-", color=color, label=label)
    if draws is not None:
        lines = draws[np.isfinite(draws).all(1)] @ X.T
        lo, hi = np.percentile(lines, [50 * (1 - level), 50 * (1 + level)], axis=0)
        ax.fill_between(C, np.exp(lo), np.exp(hi), color=color, alpha=0.2)
        return
    cov = np.array(fit["cov"])
    se = np.sqrt(np.einsum("ij,jk,ik->i", X, cov, X))
    q = stats.t.ppf(0.5 + level / 2, max(fit["n"] - 2, 1))
    ax.fill_between(C, np.exp(mu - q * se), np.exp(mu + q * se), color=color, alpha=0.2)


def plot_allocation(fit: dict, target: str):
    res = fit[target]
    iso = res.get("isoflop")
    kept = [p for p in iso["profiles"] if p["kept"]] if iso else []
    Ck = np.array([p["flops"] for p in kept])
    C = _c_range(fit)
    k = fit["config"]["flops_per_param_sample"]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    dr = (fit.get("bootstrap_draws") or {}).get(target, {}).get("isoflop")
    headline = (fit.get("summary") or {}).get(f"{target}.isoflop.a", {}).get("ci_method", "bootstrap")
    P = np.array(dr["values"], float)[:, :2] if dr and headline.startswith("bootstrap") else None  # the band = the CI
    band = {"N": P, "D": None if P is None else np.stack([-np.log(k) - P[:, 0], 1 - P[:, 1]], 1)}
    level = fit["config"]["ci_level"]
    for ax, key, pts, name in ((axes[0], "N_opt", [p["n_opt"] for p in kept], "N"),
                               (axes[1], "D_opt", [p["d_opt"] for p in kept], "D")):
        if iso:
            e = iso[key]["exponent"]
            _band(ax, iso[key], C, "tab:blue",
                  f"isoFLOP: {name} ∝ C^{e['value']:.3f} ({e['ci'][0]:.2f}, {e['ci'][1]:.2f})"
                  + (", bootstrap band" if P is not None else ", OLS band"), band[name], level)
            ax.plot(Ck, pts, "o", color="tab:blue", mec="k")
        for meth, (color, ls) in METHOD_STYLE.items():
            if meth in res and res[meth]["optimum_exists"]:
                N = allocation_n(res[meth]["allocation"], C)
                y = N if name == "N" else C / (k * N)
                ex = res[meth]["a" if name == "N" else "b"]["value"]
                ax.plot(C, y, ls, color=color, label=f"{meth}: {name} ∝ C^{ex:.3f}")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("FLOPs C")
        ax.set_ylabel(f"{target}-optimal {'parameters N' if name == 'N' else 'samples D'}")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.suptitle(f"compute-optimal allocation ({target})")
    return fig


def plot_y_opt(fit: dict, target: str):
    res = fit[target]
    iso = res.get("isoflop")
    kept = [p for p in iso["profiles"] if p["kept"]] if iso else []
    C = _c_range(fit)
    k = fit["config"]["flops_per_param_sample"]
    yf = iso["Y_opt"] if iso else None
    fig, ax = plt.subplots(figsize=(7, 4.5))
    if yf is not None:
        Y = power_plus_const(yf, C)
        Y = 1 / Y if yf.get("inverse") else Y
        form = "R = 1/(E + A·C^-k)" if yf.get("inverse") else "L = E + A·C^-k"
        ax.plot(C, Y, "-", color="tab:blue",
                label=f"isoFLOP {form}: E={yf['E']['value']:.3g}, k={yf['k']['value']:.3f}")
    ax.plot([p["flops"] for p in kept], [p["y_opt"] for p in kept], "o", color="tab:blue", mec="k")
    ys = [p["y_opt"] for p in kept]
    for meth, (color, ls) in METHOD_STYLE.items():
        if meth in res and res[meth]["optimum_exists"]:
            Y = predict_optimum(meth, res[meth], C, k)[1]
            ax.plot(C, Y, ls, color=color, label=f"{meth} at its optimum")
            ys.extend(Y[np.isfinite(Y)])
    ax.set_xscale("log")
    if ys and all(v > 0 for v in ys):
        ax.set_yscale("log")
    if not ys:
        ax.text(0.5, 0.5, "no method gives a compute-optimal point", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel("FLOPs C")
    ax.set_ylabel(f"optimal {LABELS[target]}")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    return fig


def plot_return_vs_loss(fit: dict):
    r = fit["return_vs_loss"]
    L, R = np.array(r["points"]["loss"]), np.array(r["points"]["return"])
    Ls = np.geomspace(L.min() * 0.8, L.max() * 1.1, 100)
    d = r["delta"]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.plot(L, R, "o", color="tab:purple", mec="k")
    ax.plot(Ls, np.exp(r["log_c"]["value"]) * Ls ** d["value"], "-", color="tab:purple",
            label=f"R ∝ L^{d['value']:.2f} ({d['ci'][0]:.2f}, {d['ci'][1]:.2f})")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("loss at each budget's loss-optimal size")
    ax.set_ylabel("mean return")
    ax.legend()
    return fig


def _fmt(e: dict) -> str:
    return f"{e['value']:.3f} ({e['ci'][0]:.3f}, {e['ci'][1]:.3f})"


def table(rows, header) -> str:
    """An HTML table of ``rows`` under ``header`` (cells escaped)."""
    th = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><tr>{th}</tr>{body}</table>"


def forecast_table(rows: list[dict]) -> str:
    """Forecast rows (trajdata.scaling.forecast) with their intervals as an HTML table."""
    def cell(r, q, f=".3g"):
        lo, hi = r[q + "_ci"]
        return f"{r[q]:{f}} ({lo:{f}}, {hi:{f}})"

    body = [[r["target"], r["method"], cell(r, "flops"), cell(r, "params"), cell(r, "samples"),
             f"{r['reach']:.4g} (given)" if "reach" in r else cell(r, r["target"], ".4g"),
             r["interval"] + (f"; {r['warning']}" if "warning" in r else "")]
            for r in rows]
    lvl = int(round(100 * rows[0]["ci_level"])) if rows else 95
    return table(body, ["target", "method", f"FLOPs ({lvl}% interval)", "params", "samples", "predicted", "interval"])


def forecast_section(fit: dict) -> str:
    f = fit["forecasts"]
    pref = "; ".join(f"{t}: {p['method']} ({html.escape(p['why'])})" for t, p in f["preferred"].items())
    return (f"<h2>Forecast</h2><p>The compute-optimal run at C = {f['given']['compute']:.3g} FLOPs (a decade past "
            f"the largest budget), by each method, with intervals from the same draws. Preferred: {pref}.</p>"
            + forecast_table(f["rows"]))


def sensitivity_section(sens: dict) -> str:
    given = ", ".join(f"{k} = {v:.3g}" for k, v in sens["given"].items())
    parts = [f"<h2>Fit choices side by side</h2><p>The forecast at {given} under each setting (alternatives "
             "bootstrapped with fewer draws). <b>outside</b>: the forecast N lies outside the default setting's interval "
             "for the same method; <b>disjoint</b>: the two intervals do not overlap.</p>"]
    for t in ("loss", "return"):
        mine = [r for r in sens["rows"] if r["target"] == t]
        if not mine:
            continue
        p = sens["preferred"].get(t, {})
        rows = [[r["setting"], r["method"], f"{r['params']:.3g} ({r['params_ci'][0]:.3g}, {r['params_ci'][1]:.3g})",
                 f"{r[t]:.4g} ({r[t + '_ci'][0]:.4g}, {r[t + '_ci'][1]:.4g})",
                 "disjoint" if r.get("overlaps_default") is False else ("outside" if r.get("outside_default") else "")]
                for r in mine]
        parts.append(f"<h3>{t}</h3><p>Rolling cross-validation prefers <b>{p.get('method')}</b> "
                     f"({html.escape(str(p.get('why')))}).</p>"
                     + table(rows, ["setting", "method", "N (interval)", f"{t} (interval)", "vs default"]))
    if sens["failed"]:
        parts.append("<p>" + "; ".join(html.escape(f"{f['setting']}: {f['reason']}") for f in sens["failed"]) + "</p>")
    return "".join(parts)


def build_figures(fit: dict) -> dict[str, str]:
    figs = {}
    for target in ("loss", "return"):
        if target not in fit:
            continue
        res = fit[target]
        figs[f"{target}_isoflop"] = (plot_isoflop(res["isoflop"], target) if "isoflop" in res
                                     else plot_runs(fit, target))
        if "isoflop" not in res and res.get("isoflop_profiles"):
            figs[f"{target}_profiles"] = plot_isoflop({"profiles": res["isoflop_profiles"]}, target)
        figs[f"{target}_allocation"] = plot_allocation(fit, target)
        figs[f"{target}_optimum"] = plot_y_opt(fit, target)
    if "return_vs_loss" in fit:
        figs["return_vs_loss"] = plot_return_vs_loss(fit)
    return {k: png(f) for k, f in figs.items()}


STYLE = ("<style>body{font-family:sans-serif;max-width:1100px;margin:auto}table{border-collapse:collapse;"
         "margin:8px 0}td,th{border:1px solid #ccc;padding:3px 8px;font-size:13px}img{max-width:100%}</style>")


def page(title: str, body: str) -> str:
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>{STYLE}</head>"
            f"<body>{body}</body></html>")


def render_html(fit: dict, figures: dict[str, str]) -> str:
    return page("trajdata scaling report", render_body(fit, figures))


def exponents_section(fit: dict, level: int) -> str:
    """The exponents with their headline interval, how it was computed, and the analytic one beside it."""
    rows = []
    for key, e in fit["summary"].items():
        an = e.get("ci_analytic")
        rows.append([key, _fmt(e), e.get("ci_method", "OLS / delta method"),
                     f"({an[0]:.3f}, {an[1]:.3f})" if an else ""])
    bs = fit.get("bootstrap")
    noise = "; ".join(f"{t}: {v}" for t, v in (bs or {}).get("validation_noise", {}).items())
    how = (f"The headline intervals are {level}% bootstrap percentile intervals ({bs['draws']} draws), which the "
           "coverage test calibrates: each draw redraws the validation noise ("
           f"{html.escape(noise)}), the run scatter the SEs do not explain and the budget "
           "optima's scatter, then reruns the same fits. The OLS/delta-method intervals are shown beside them."
           if bs else "The intervals are OLS t-intervals (isoFLOP) and delta-method intervals (parametric): the fit "
           "ran without a bootstrap (--bootstrap 0).")
    return ("<h2>Exponents</h2><p>a: N_opt ∝ C^a, b: D_opt ∝ C^b; delta: R ∝ L^delta; "
            f"k: L_opt = E + A·C^-k. {how}</p>"
            + table(rows, ["quantity", f"estimate ({level}% interval)", "interval", "OLS / delta-method interval"]))


def render_body(fit: dict, figures: dict[str, str], title: str = "Scaling-law fit") -> str:
    """The report sections of one fit (an h1 title, then h2/h3 sections)."""
    cfg = fit["config"]
    level = int(round(cfg["ci_level"] * 100))
    parts = [f"<h1>{html.escape(title)}</h1><p>source: <code>{html.escape(fit['source'])}</code>; "
             f"{fit['n_runs']} runs, {len(fit['budgets'])} FLOP budgets; optimum = {cfg['optimum']}, "
             f"window = ±{cfg['window']} sizes, C = {cfg['flops_per_param_sample']:g}·N·D "
             f"(median C/(N·D) in the data: {fit['median_flops_per_param_sample']:.3g}); {level}% CIs.</p>"]
    notes = []
    d = fit.get("dropped_non_finite") or {}
    if d.get("n"):
        cols = ", ".join(f"{c}: {n}" for c, n in d["by_column"].items())
        notes.append(f"{d['n']} of {d['of']} runs were dropped for NaN/inf values ({cols}).")
    if fit.get("dropped_duplicates"):
        notes.append(f"{fit['dropped_duplicates']} rows repeated verbatim in the table were counted once.")
    if "binning" in fit:
        b = fit["binning"]
        notes.append(f"FLOP budgets were binned ({b['bins_per_decade']:g} bins per decade, each run snapped to "
                     f"its bin's geometric centre): {b['budgets_before']} budgets became {b['budgets_after']}.")
    if "loss_skipped" in fit:
        notes.append(f"Loss fits: not fitted ({fit['loss_skipped']}).")
    if "return_skipped" in fit:
        notes.append(f"Return fits: not fitted ({fit['return_skipped']}).")
    parts.extend(f"<p>{html.escape(n)}</p>" for n in notes)
    parts.append(exponents_section(fit, level))
    if fit.get("forecasts"):
        parts.append(forecast_section(fit))
    if fit.get("sensitivity"):
        parts.append(sensitivity_section(fit["sensitivity"]))
    for target in ("loss", "return"):
        if target not in fit:
            continue
        res = fit[target]
        meth_rows = [[m, "yes" if st["ran"] else "no", st["reason"]] for m, st in res["methods"].items()]
        parts.append(f"<h2>{target.capitalize()}</h2><h3>Methods</h3>"
                     + table(meth_rows, ["method", "ran", "on what / why not"]))
        if "isoflop" in res:
            prof = [[f"{p['flops']:.3g}", p["n_sizes"], "yes" if p["kept"] else "no", p["reason"],
                     f"{p['n_opt']:.3g}" if p["kept"] else "", f"{p['y_opt']:.4g}" if p["kept"] else ""]
                    for p in res["isoflop"]["profiles"]]
            parts.append(f"<h3>isoFLOP profiles</h3><img src='data:image/png;base64,{figures[target + '_isoflop']}'>"
                         + table(prof, ["budget C", "sizes", "kept", "why dropped", "N_opt", f"{target} at optimum"]))
        else:
            parts.append(f"<h3>Runs</h3><p>isoFLOP profiles: not fitted "
                         f"({html.escape(res['methods']['isoflop']['reason'])}).</p>"
                         f"<img src='data:image/png;base64,{figures[target + '_isoflop']}'>")
            if target + "_profiles" in figures:
                prof = [[f"{p['flops']:.3g}", p["n_sizes"], "yes" if p["kept"] else "no", p["reason"],
                         f"{p['n_opt']:.3g}" if p["kept"] else "", f"{p['y_opt']:.4g}" if p["kept"] else "",
                         f"{p['best_n']:.3g}" if p.get("best_n") else ""]
                        for p in res["isoflop_profiles"]]
                parts.append(f"<h3>isoFLOP profiles (each budget's parabola; too few give an optimum)</h3>"
                             f"<img src='data:image/png;base64,{figures[target + '_profiles']}'>"
                             + table(prof, ["budget C", "sizes", "optimum inside", "why not", "N_opt (vertex)",
                                            f"{target} at vertex", "best observed N"]))
        parts.append(f"<h3>Optimal allocation</h3><img src='data:image/png;base64,{figures[target + '_allocation']}'>"
                     f"<h3>Optimal {target} vs compute</h3>"
                     f"<img src='data:image/png;base64,{figures[target + '_optimum']}'>")
        coef_rows = [[m, name, _fmt(e)] for m in ("quadratic", "chinchilla") if m in res
                     for name, e in res[m]["coef"].items()]
        parts.append("<h3>Parametric fits</h3>" + table(coef_rows, ["method", "coefficient", "estimate"]))
        cv = res["crossval"]
        if cv.get("skipped"):
            parts.append(f"<h3>Rolling cross-validation</h3><p>not run: {html.escape(cv['skipped'])}</p>")
            continue
        cv_rows = [[m, f"{v['log10_n_opt']:.3f}" if v["log10_n_opt"] is not None else "",
                    f"{v['rel_y_opt']:.3f}" if v["rel_y_opt"] is not None else ""] for m, v in cv["rmse"].items()]
        held = ", ".join(f"{r['held_out']:.3g}" for r in cv["folds"])
        parts.append(f"<h3>Rolling cross-validation</h3><p>each held-out budget ({held}) is predicted from "
                     f"all smaller budgets; best by {target} RMSE: <b>{cv['best_by_y_opt']}</b></p>"
                     + table(cv_rows, ["method", "RMSE log10 N_opt", f"RMSE relative {target}"]))
    if "return_vs_loss" in figures:
        parts.append(f"<h2>Return vs loss</h2><img src='data:image/png;base64,{figures['return_vs_loss']}'>")
    return "".join(parts)


def strict_json(obj):
    """NaN/inf -> null, so fit.json is valid JSON for any reader."""
    if isinstance(obj, dict):
        return {k: strict_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [strict_json(v) for v in obj]
    if isinstance(obj, float) and not np.isfinite(obj):
        return None
    return obj


def write_report(fit: dict, out_dir: str | Path) -> dict[str, Path]:
    """Write fit.json and report.html into `out_dir`."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "fit.json", json.dumps(strict_json(fit), indent=1, allow_nan=False))
    atomic_write_text(out / "report.html", render_html(fit, build_figures(fit)))
    return {"json": out / "fit.json", "html": out / "report.html"}
