"""Returns of a sweep's snapshots per (budget, size) over the size's training seeds ([sweep] seeds: runs
``...-sS``): their means, and how far the seeds scatter beyond their eval SEs."""
from __future__ import annotations

import re

import numpy as np


def size_name(run: str) -> str:
    """A run's name without its training seed (``rl-h8-L1-s1`` -> ``rl-h8-L1``)."""
    return re.sub(r"-s\d+$", "", run)


def seed_means(rows: list[dict]) -> list[dict]:
    """The evaluated snapshots of a runs table (rows with ``return`` and ``return_se``), one entry per
    (budget, size): the mean return over the size's training seeds (runs ``...-sS`` of [sweep] seeds),
    the eval SE of that mean, each seed's return (``seeds``) and the run's name without its seed."""
    cells: dict[tuple[float, str], list[dict]] = {}
    for r in rows:
        if r.get("return") not in (None, ""):
            cells.setdefault((float(r["budget"]), size_name(r["run"])), []).append(r)
    out = []
    for (c, name), rs in cells.items():
        ses = [float(r.get("return_se") or 0.0) for r in rs]
        out.append({"budget": c, "run": name if len(rs) > 1 else rs[0]["run"], "params": int(float(rs[0]["params"])),
                    "width": rs[0].get("width"), "layers": rs[0].get("layers"),
                    "return": float(np.mean([float(r["return"]) for r in rs])),
                    "se": float(np.sqrt(np.sum(np.square(ses)))) / len(rs),
                    "seeds": [float(r["return"]) for r in rs], "seed_ses": ses})
    return out


def seed_scatter(rows: list[dict]) -> dict | None:
    """How far a size's training seeds differ at a budget, against their eval SEs: over the (budget,
    size) cells with >= 2 seeds, chi² of the seeds' returns about their inverse-variance mean, summed,
    over its degrees of freedom (``ratio``: ~1 when eval noise explains the differences, above 1 when
    training seeds add their own); None without repeated seeds. Cells with a zero SE are left out."""
    chi2, dof, diffs = 0.0, 0, []
    for m in seed_means(rows):
        x, se = np.array(m["seeds"]), np.array(m["seed_ses"])
        if len(x) < 2 or (se <= 0).any():
            continue
        w = 1 / se ** 2
        chi2 += float((w * (x - (w * x).sum() / w.sum()) ** 2).sum())
        dof += len(x) - 1
        diffs.append(float(x.max() - x.min()))
    if not dof:
        return None
    return {"cells": len(diffs), "chi2": chi2, "dof": dof, "ratio": chi2 / dof, "median_range": float(np.median(diffs))}
