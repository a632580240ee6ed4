"""Coverage of the loss isoFLOP exponent's bootstrap interval on synthetic tables shaped like
specs/cpu.toml's sweep: its 5 budgets and 6 sizes, cells with D/N in [0.3, 300], 22 shared validation
episodes, a known law (a = 0.5, N_opt(1e10) = 8k, curvature 0.2), and optionally a training-seed offset per
run (per size, shared by its snapshots, in ln loss) that the validation noise does not hold.

    python bin/coverage_window.py --tables 500 --window 1 --run-sd 0 0.015 0.03 0.06
"""
from __future__ import annotations

import argparse
import json
import time

import numpy as np

BUDGETS = np.array([1e10, 1.78e10, 3.16e10, 5.62e10, 1e11])
SIZES = np.array([3397, 6809, 14041, 30137, 68857, 172409], float)  # the CPU proxy at h = 2..64, L = 1


def table(law, i: int, run_sd: float, episode_sd: float):
    from trajdata.scaling.synthetic import runs_table

    df = runs_table(law, i, True, budgets=BUDGETS, sizes=SIZES, episodes=22, episode_sd=episode_sd)
    dn = df["samples"] / df["params"]
    df = df[(dn >= 0.3) & (dn <= 300)].reset_index(drop=True)
    if run_sd > 0:
        off = dict(zip(SIZES, np.random.default_rng(10_000 + i).normal(0, run_sd, len(SIZES))))
        f = np.exp(df["params"].map(off).to_numpy())
        df["loss"] = df["loss"] * f
        df["val_episode_losses"] = [" ".join(f"{e}:{float(v) * m:.7g}:{n}" for e, v, n in (x.split(":") for x in cell.split()))
                                    for cell, m in zip(df["val_episode_losses"], f)]
    return df


def coverage(tables: int, window: int, run_sd: float, episode_sd: float, a: float = 0.5) -> dict:
    from trajdata.scaling.fits import FitConfig, fit_all
    from trajdata.scaling.runs import runs_from_frame
    from trajdata.scaling.synthetic import Law

    law = Law(a=a, n_at_1e15=8000 * 1e5 ** a, loss_at_1e15=1.8 * 1e5 ** -0.54, loss_slope=-0.54, kappa=0.2)
    cfg = FitConfig(window=window, bootstrap=200, cv_folds=0, fit_return=False, chinchilla=False)
    hits, widths, est, failed = [], [], [], 0
    t = time.perf_counter()
    for i in range(tables):
        try:
            iso = fit_all(runs_from_frame(table(law, i, run_sd, episode_sd)), cfg)["loss"]["isoflop"]
            ci = iso["a"]["ci_bootstrap"]
        except Exception:
            failed += 1
            continue
        hits.append(ci[0] <= a <= ci[1])
        widths.append(ci[1] - ci[0])
        est.append(iso["a"]["value"])
    return dict(tables=tables, window=window, run_sd=run_sd, episode_sd=episode_sd, fitted=len(hits), failed=failed,
                coverage=float(np.mean(hits)), median_half_width=float(np.median(widths)) / 2,
                mean_a=float(np.mean(est)), sd_a=float(np.std(est)), seconds=round(time.perf_counter() - t, 1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tables", type=int, default=500)
    ap.add_argument("--window", type=int, default=1)
    ap.add_argument("--run-sd", type=float, nargs="+", default=[0.0, 0.015, 0.03, 0.06])
    ap.add_argument("--episode-sd", type=float, default=0.25)
    ap.add_argument("--out", default=None, help="JSON file to write")
    args = ap.parse_args()
    out = []
    for sd in args.run_sd:
        out.append(coverage(args.tables, args.window, sd, args.episode_sd))
        print(json.dumps(out[-1]), flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
