"""A sweep's wall times: each invocation's phases appended to OUT/timings.jsonl as they end (or are
interrupted), summed for a resumed sweep's report."""
from __future__ import annotations

import json
import time
from contextlib import contextmanager
from pathlib import Path

TIMINGS = "timings.jsonl"


@contextmanager
def timed(out: Path, timings: dict, phase: str, log: bool = True):
    """Time a phase into ``timings`` (``<phase>_s``) and append it to OUT/timings.jsonl, also when it
    is interrupted (``ended`` false), so a resumed sweep's report can sum every invocation's work."""
    t = time.time()
    ended = False
    try:
        yield
        ended = True
    finally:
        timings[f"{phase}_s"] = round(time.time() - t, 1)
        if log:
            with open(out / TIMINGS, "a") as f:
                f.write(json.dumps({"phase": phase, "s": timings[f"{phase}_s"], "ended": ended,
                                    "at": time.strftime("%Y-%m-%dT%H:%M:%S")}) + "\n")


def timing_totals(out: Path) -> tuple[int, dict]:
    """Invocations of the sweep into ``out`` (its data phases started) and each phase's seconds summed
    over them, from OUT/timings.jsonl (unreadable lines are skipped)."""
    path = out / TIMINGS
    n, totals = 0, {}
    for line in path.read_text().splitlines() if path.is_file() else []:
        try:
            r = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(r, dict) and isinstance(r.get("s"), (int, float)):
            key = f"{r.get('phase')}_s"
            totals[key] = round(totals.get(key, 0.0) + r["s"], 1)
            n += r.get("phase") == "data"
    return n, totals
