"""An RL sweep's comparison: from-scratch vs BC-initialised RL at equal total compute, the BC
snapshot's training FLOPs (and, when kickstarted, the teacher's forwards) counted in.

The BC-initialised run's budgets are the sweep's budgets less those FLOPs (``plan.Comparison``), so
at every sweep budget C there is a from-scratch snapshot of each size and a BC-initialised one whose
total compute is C; all are evaluated on the same seeds.
"""
from __future__ import annotations

import html
import json
import math
from pathlib import Path

import numpy as np

from trajdata.scaling.report import png, table
from trajdata.sweep.plan import Plan
from trajdata.sweep.returns import seed_means
from trajdata.train import checkpoint as ckpt_io


def _ret(row: dict) -> tuple[float, float] | None:
    if row.get("return") in (None, ""):
        return None
    return float(row["return"]), float(row.get("return_se") or 0.0)


def comparison_rows(plan: Plan, out: Path) -> list[dict]:
    """Per sweep budget C: the BC-initialised snapshot at total compute C, the best from-scratch size
    at C and the from-scratch one of the BC architecture (each the mean over its training seeds, as
    ``seed_means``), and the difference."""
    arch = tuple(plan.compare.run.size)
    scratch: dict[float, list[dict]] = {}
    for m in seed_means(ckpt_io.read_runs(out / "runs.csv")):
        scratch.setdefault(m["budget"], []).append(m)
    rows = []
    for r in sorted(ckpt_io.read_runs(out / "compare.csv"), key=lambda x: float(x["total_budget"])):
        total = float(r["total_budget"])
        pool = scratch.get(total, [])
        best = max(pool, key=lambda x: x["return"], default=None)
        same = next((x for x in pool if (int(x["width"]), int(x["layers"])) == arch), None)
        row = dict(total=total, total_actual=float(r["total_flops"]), rl_flops=float(r["flops_actual"]),
                   bc_flops=float(r["flops_init"] or 0), kickstart_flops=float(r["flops_kickstart"] or 0),
                   bc_init=_ret(r), best=None, best_run=None, best_params=None,
                   same=(same["return"], same["se"]) if same else None)
        if best is not None:
            row.update(best=(best["return"], best["se"]), best_run=best["run"], best_params=best["params"])
        if row["bc_init"] and row["best"]:
            (a, sa), (b, sb) = row["bc_init"], row["best"]
            row["diff"] = (a - b, math.hypot(sa, sb))
        rows.append(row)
    return rows


def plot_comparison(plan: Plan, out: Path, rows: list[dict], baselines: dict):
    """Return vs total training compute: every from-scratch size, the best of them at each budget, the
    BC-initialised run (its BC FLOPs counted in) and where the BC snapshot's own compute lies."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    cmap = plt.get_cmap("viridis")
    by_run: dict[str, list] = {}
    for r in ckpt_io.read_runs(out / "runs.csv"):
        if _ret(r) is not None:
            by_run.setdefault(r["run"], []).append((float(r["flops"]), *_ret(r)))
    for i, (name, pts) in enumerate(sorted(by_run.items())):
        f, m, se = (np.array(v) for v in zip(*sorted(pts)))
        ax.errorbar(f, m, yerr=se, marker=".", lw=0.8, alpha=0.5, capsize=2, color=cmap(i / max(1, len(by_run) - 1)),
                    label=f"from scratch {name}")
    best = [(r["total"], *r["best"]) for r in rows if r["best"]]
    if best:
        f, m, se = (np.array(v) for v in zip(*best))
        ax.plot(f, m, "-", color="k", lw=2, label="from scratch: best size at each budget")
    ours = [(r["total"], *r["bc_init"]) for r in rows if r["bc_init"]]
    if ours:
        f, m, se = (np.array(v) for v in zip(*ours))
        ax.errorbar(f, m, yerr=se, marker="o", lw=2, capsize=3, color="crimson",
                    label=f"from BC ({plan.compare.run.name}), BC FLOPs counted in")
    if plan.compare.bc_flops:
        ax.axvline(plan.compare.bc_flops, ls=":", color="crimson", alpha=0.6, label="the BC snapshot's FLOPs")
    b = baselines.get("random")
    if b and b.get("episodes"):
        ax.axhline(b["mean"], ls=":", color="k", label=f"random: {b['mean']:.1f} ± {b['se']:.1f}")
    ax.set_xscale("log")
    ax.set_xlabel("total training FLOPs (BC + RL + teacher)")
    ax.set_ylabel("mean return (± SE)")
    ax.set_title("From scratch vs from a BC snapshot, equal total compute")
    ax.legend(fontsize=7)
    fig.tight_layout()
    return png(fig)


def comparison_section(plan: Plan, out: Path, baselines: dict) -> str:
    """The report's section (and OUT/compare.json): the table per budget and the figure."""
    rows = comparison_rows(plan, out)
    (out / "compare.json").write_text(json.dumps(rows, indent=1) + "\n")
    c, spec = plan.compare, plan.spec

    def pm(v):
        return f"{v[0]:.1f} ± {v[1]:.1f}" if v else ""

    body = [[f"{r['total']:.3g}", f"{r['rl_flops']:.3g} + {r['bc_flops']:.3g}" + (
             f" + {r['kickstart_flops']:.3g}" if r["kickstart_flops"] else ""), pm(r["bc_init"]),
             f"{pm(r['best'])} ({r['best_run']})" if r["best"] else "", pm(r["same"]),
             (f"{r['diff'][0]:+.1f} ± {r['diff'][1]:.1f}" if r.get("diff") else "")] for r in rows]
    kick = spec.compare.get("kickstart_coef", 0)
    how = (f"The BC-initialised run ({html.escape(c.run.name)}) starts from <code>{html.escape(c.init)}</code>, whose "
           f"training took {c.bc_flops:.3g} FLOPs (6·N·D of BC); "
           + (f"it is kickstarted toward the BC policy (coefficient {kick:g}, decay "
              f"{spec.compare.get('kickstart_decay', 0.999):g} per learner step), the teacher's forwards counted as "
              "2·N_BC per env step; " if kick else "")
           + "its RL budgets are the sweep's budgets less those FLOPs, so each of its snapshots has the total compute "
             "of the from-scratch snapshots it is compared with. Every snapshot is evaluated on the same seeds"
           + ("; a from-scratch size's return is the mean over its training seeds" if spec.seeds else "") + ".")
    return ("<h2>From scratch vs from BC, at equal total compute</h2>"
            f"<p>{how}</p>"
            + table(body, ["total FLOPs C", "RL + BC (+ teacher) FLOPs", "from BC: return ± SE",
                           "from scratch, best size", "from scratch, same size", "from BC − best from scratch"])
            + f"<img src='data:image/png;base64,{plot_comparison(plan, out, rows, baselines)}'>")
