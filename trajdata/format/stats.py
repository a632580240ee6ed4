"""Quality report of a NetHack dataset: score / turn / depth / length / death-cause distributions.

Compare with NLD-AA (AutoAscend games in the NetHack Learning Dataset): ~110k games, ~3.5B steps,
~32k steps per game on average.
"""
from __future__ import annotations

import io
import re
from collections import Counter
from pathlib import Path

import numpy as np

from trajdata.config import atomic_write_bytes
from trajdata.format.dataset import Dataset

NLD_AA = {"games": 110_000, "steps": 3_500_000_000, "mean_steps_per_game": 32_000}  # approximate
NUMERIC = ("score", "turns", "depth", "max_depth", "steps")
_ARTICLE = re.compile(r"^(a|an|the)\s+", re.I)


FOOD = "fainted from lack of food"  # AutoAscend's summary counts these deaths with starvation, as food deaths


def death_cause(death: str | None) -> str:
    """A death string as a category. A "while ..." clause is the category ("killed by a rothe, while
    fainted from lack of food" -> "fainted from lack of food"; "..., while frozen by a potion" ->
    "killed while frozen by potion"), else the killer ("killed by a hill orc" -> "killed by hill orc")."""
    d = (death or "").strip().lower()
    if not d:
        return "unknown"
    d, _, during = d.partition(", while ")
    if during:
        return FOOD if during.startswith(FOOD) else "killed while " + re.sub(r"\b(a|an|the) ", "", during)
    if d.startswith("killed by "):
        return "killed by " + _ARTICLE.sub("", d[len("killed by "):])
    if "starv" in d:
        return "starvation"
    for word in ("quit", "ascended", "escaped", "choked", "poisoned", "petrified", "drowned", "burned",
                 "dissolved", "crushed", "turned to", "zapped", "strangled", "frozen", "trickery"):
        if d.startswith(word):
            return word
    return " ".join(d.split()[:3])


def killer(death: str | None) -> str | None:
    """The monster of a "killed by ..." death, whatever it was doing ("killed by a rothe, while ..." -> "rothe")."""
    d = (death or "").strip().lower().partition(", while ")[0]
    return _ARTICLE.sub("", d[len("killed by "):]) if d.startswith("killed by ") else None


def is_food_death(death: str | None) -> bool:
    """Starved, or killed while fainted from lack of food (AutoAscend's "food" group)."""
    d = (death or "").lower()
    return "starv" in d or f"while {FOOD}" in d


def _dist(vals) -> dict | None:
    v = np.asarray([x for x in vals if x is not None], float)
    if not len(v):
        return None
    p10, p50, p90 = np.percentile(v, [10, 50, 90])
    return {"n": int(len(v)), "mean": float(v.mean()), "median": float(p50), "p10": float(p10),
            "p90": float(p90), "min": float(v.min()), "max": float(v.max())}


def dataset_stats(root) -> dict:
    """Distributions over the episodes of dataset `root` (from its index; no shard is decoded)."""
    ds = Dataset(root)
    rows = ds.index_rows()
    ended = [r for r in rows if r.get("status") == "complete"]
    out = {"dataset": str(ds.root), "expert": ds.info.get("expert", {}).get("name", ""),
           "episodes": len(rows), "steps": int(sum(r["steps"] for r in rows)),
           "status": dict(Counter(r.get("status") for r in rows)),
           "truncation_reasons": dict(Counter(str(r.get("end_reason")).split(" (")[0]
                                              for r in rows if r.get("status") != "complete"))}
    out["distributions"] = {key: _dist(r.get(key) for r in rows) for key in NUMERIC}
    out["missing"] = [key for key, d in out["distributions"].items() if d is None]
    out["death_source"] = "death" if any(r.get("death") for r in ended) else "end_reason"
    deaths = [r.get("death") or r.get("end_reason") for r in ended]
    out["death_causes"] = dict(Counter(map(death_cause, deaths)).most_common())
    out["killers"] = dict(Counter(k for k in map(killer, deaths) if k).most_common())
    out["food_deaths"] = sum(map(is_food_death, deaths))
    out["characters"] = dict(Counter(str(r.get("character", ""))[:3] for r in rows).most_common())
    out["nld_aa"] = NLD_AA
    return out


def format_stats(s: dict) -> str:
    lines = [f"{s['dataset']}: {s['episodes']} episodes, {s['steps']:,} steps, expert {s['expert'] or '?'}",
             "  status " + ", ".join(f"{k} {v}" for k, v in s["status"].items())]
    if s["truncation_reasons"]:
        lines.append("  not complete: " + ", ".join(f"{k} {v}" for k, v in s["truncation_reasons"].items()))
    lines.append(f"  {'':<10}{'mean':>10}{'median':>10}{'p10':>10}{'p90':>10}{'min':>10}{'max':>10}")
    for key in NUMERIC:
        d = s["distributions"].get(key)
        if d:
            lines.append(f"  {key:<10}" + "".join(f"{d[k]:>10,.0f}" for k in ("mean", "median", "p10", "p90", "min", "max")))
    if s.get("missing"):
        lines.append(f"  not in this dataset's index (no panel): {', '.join(s['missing'])}")
    if s["death_causes"] and len(s["death_causes"]) == 1 and s.get("death_source") == "end_reason":
        (cause, c), = s["death_causes"].items()
        lines.append(f"  end of complete games: all {c} ended by {cause!r} (the index has no death column; "
                     "no cause breakdown)")
    elif s["death_causes"]:
        src = "" if s.get("death_source", "death") == "death" else " (end_reason; the index has no death column)"
        lines.append(f"  end of complete games{src} (a \"while ...\" clause is a cause of its own):")
        n = sum(s["death_causes"].values())
        for cause, c in list(s["death_causes"].items())[:15]:
            lines.append(f"    {c:>6}  {100 * c / n:5.1f}%  {cause}")
        if s.get("killers"):
            lines.append("  killed by (whatever the hero was doing): "
                         + ", ".join(f"{k} {v}" for k, v in list(s["killers"].items())[:10]))
        if s.get("food_deaths") is not None:
            lines.append(f"  food deaths (starved, or killed while {FOOD}; AutoAscend's \"food\" group): "
                         f"{s['food_deaths']} of {n}")
    if s["characters"]:
        lines.append("  roles: " + ", ".join(f"{k} {v}" for k, v in s["characters"].items()))
    ref = s["nld_aa"]
    mean = s["steps"] / max(s["episodes"], 1)
    lines.append(f"  NLD-AA: ~{ref['games']:,} games, ~{ref['mean_steps_per_game']:,} steps/game on average "
                 f"(here {mean:,.0f})")
    if "png" in s:
        lines.append(f"  histograms: {s['png']}")
    return "\n".join(lines)


def plot_stats(root, png: str | Path | None = None) -> Path:
    """Histograms of score, turns, steps and max depth, plus the top death causes, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ds = Dataset(root)
    rows = ds.index_rows()
    png = Path(png) if png is not None else ds.root / "stats.png"
    fig, axes = plt.subplots(2, 3, figsize=(15, 8))
    for ax, key in zip(axes.flat, ("score", "turns", "steps", "depth", "max_depth")):
        vals = [r[key] for r in rows if r.get(key) is not None]
        if not vals:
            _note(ax, key, f"no {key} column in this dataset's index")
            continue
        ax.hist(vals, bins=min(50, max(5, len(vals))), color="tab:blue")
        ax.set_title(f"{key} (n={len(vals)})")
    complete = [r for r in rows if r.get("status") == "complete"]
    causes = Counter(death_cause(r.get("death") or r.get("end_reason")) for r in complete)
    top = causes.most_common(10)[::-1]
    ax = axes.flat[5]
    if not any(r.get("death") for r in complete) and len(causes) <= 1:
        _note(ax, "end of complete games", f"{len(complete)} complete games" + (f", all {top[0][0]!r}" if top else "")
              + "\n(no death column in the index: no cause breakdown)")
    else:
        ax.barh([c for c, _ in top], [n for _, n in top], color="tab:red")
        ax.set_title("end of complete games")
    ax.tick_params(axis="y", labelsize=7)
    fig.suptitle(f"{ds.root.name}: {len(rows)} episodes")
    fig.tight_layout()
    buf = io.BytesIO()
    try:
        fig.savefig(buf, dpi=80, format="png")
    finally:
        plt.close(fig)
    atomic_write_bytes(png, buf.getvalue())
    return png


def _note(ax, title: str, text: str) -> None:
    """A panel with no data: its title and a note saying why, instead of empty axes."""
    ax.set_title(title)
    ax.text(0.5, 0.5, text, ha="center", va="center", fontsize=9, wrap=True, transform=ax.transAxes)
    ax.set_xticks([])
    ax.set_yticks([])
