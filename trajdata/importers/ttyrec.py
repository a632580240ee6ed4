"""The other direction: a trajdata NetHack dataset replayed into NLE's own ttyrecs (what ``nle.dataset`` indexes).

Used to compare against the NLD loader on the same games, and to test ``import nld`` round trips.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from trajdata.envs.nethack import make_nethack_env, seed_and_reset
from trajdata.errors import DataError
from trajdata.format.dataset import Dataset

_XLOG = ("version=3.6.7\tpoints={score}\tdeathdnum=0\tdeathlev={depth}\tmaxlvl={depth}\thp=1\tmaxhp=1\tdeaths=0\t"
         "deathdate=20260101\tbirthdate=20260101\tuid=0\trole=Val\trace=Hum\tgender=Fem\talign=Law\tname=Agent\t"
         "death=truncated\tconduct=0x0\tturns={turns}\tachieve=0x0\trealtime=0\tstarttime=0\tendtime=0\t"
         "gender0=Fem\talign0=Law\tflags=0x4\tttyrecname={ttyrec}\n")


def export_ttyrecs(ds: Dataset, savedir: Path) -> int:
    """Replay every episode of ``ds`` with NLE's ttyrec recorder on, one directory per episode under
    ``savedir``; every frame is checked against the stored one. Returns the frames checked."""
    checked = 0
    expert = ds.info.get("expert") or {}
    for row in ds.index_rows():
        seeds = json.loads(row["seeds"])
        gamedir = Path(savedir) / row["id"]
        gamedir.mkdir(parents=True, exist_ok=True)
        # With a savedir, nle 1.3.0 looks for NetHack's score file at <savedir>/nle.<pid>.record but only
        # creates it in its private hackdir; a level that names a statue or corpse after a top-ten entry
        # then shows "Cannot open record file!" and the game diverges from the recorded one.
        (gamedir / f"nle.{os.getpid()}.record").touch()
        env = make_nethack_env(row["character"], fix_moon_phase=True, save_ttyrec_every=1, savedir=str(gamedir))
        obs, _ = seed_and_reset(env, seeds["core"], seeds["disp"], seeds["lgen"])
        if expert.get("no_progress_timeout") is not None:  # AutoAscend's games: as they were played
            env.unwrapped.no_progress_timeout = int(expert["no_progress_timeout"])
        for chunk in ds.episode(row["id"], fields=["tty_chars", "action"]):
            for t in range(chunk.steps):
                if not np.array_equal(obs["tty_chars"], chunk.fields["tty_chars"][t]):
                    raise DataError(f"replay diverged: episode {row['id']} step {chunk.start + t}")
                checked += 1
                obs, _, term, trunc, _ = env.step(int(chunk.fields["action"][t]))
        env.close()
        close_xlog(gamedir, row)
    return checked


def close_xlog(gamedir: Path, row: dict) -> None:
    """NLE writes an xlogfile line only for finished games; add one (from ``row``'s score, depth and
    turns) for a truncated game so ``nle.dataset`` indexes its ttyrec too."""
    xlog = next(Path(gamedir).glob("*.xlogfile"))
    if xlog.read_text().strip():
        return
    ttyrec = next(Path(gamedir).glob("*.ttyrec*.bz2")).name
    with open(xlog, "a") as f:
        f.write(_XLOG.format(score=row["score"], depth=max(1, row["depth"]), turns=row["turns"], ttyrec=ttyrec))
