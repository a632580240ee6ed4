"""Import an NLD dataset (ttyrec.bz2 files indexed by ``nle.dataset``, e.g. NLD-AA, NLD-NAO) into trajdata shards.

Frames are converted by NLE's own ttyrec converter (the one ``nle.dataset.TtyrecDataset`` uses), so
the tty fields are exactly what NLD's loader yields. ttyrec v2+ keypresses are kept as ``keypress``
and mapped to NetHackChallenge action indices as ``action`` (255: no such action); v3 in-game scores
give ``score`` and ``reward`` (the score change the keypress led to). Games go to shards in gameid
order, ``episodes_per_shard`` each; finished shards are skipped when an import is resumed.
"""
from __future__ import annotations

import os
import sqlite3
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from trajdata.config import at_least, choose, coerce_fields, option
from trajdata.errors import DataError
from trajdata.format.codec import DEFAULT_PROFILE, PROFILE_HELP, PROFILES
from trajdata.format.dataset import Dataset, build_index, create_or_check, shard_name
from trajdata.format.schema import NLD
from trajdata.format.shard import DEFAULT_CHUNK_STEPS, ShardWriter

NO_ACTION = 255
ROWS, COLS = 24, 80


@dataclass
class NldImportConfig:
    """Every setting of `trajdata import nld`."""

    db: str = option(help="nle.dataset sqlite database (ttyrecs.db).", metavar="FILE")
    name: str = option(help="Dataset name inside the database (e.g. nld-aa, nld-nao).")
    out: str = option(help="trajdata dataset directory (created, or resumed).", metavar="DIRECTORY")
    episodes_per_shard: int = option(16, "Games per shard.")
    chunk_steps: int = option(DEFAULT_CHUNK_STEPS, "Steps per stored chunk.")
    codec: str = option(DEFAULT_PROFILE, PROFILE_HELP, choices=sorted(PROFILES))
    max_games: int | None = option(None, "Import only the first N games (by gameid; N >= 1; default: all).")

    def __post_init__(self):
        coerce_fields(self)
        at_least(self, 1, "episodes_per_shard", "chunk_steps")
        at_least(self, 1, "max_games", optional=True)
        choose(self.codec, PROFILES, "codec")


def key_to_action() -> np.ndarray:
    """Lookup table: keypress byte -> index into NetHackChallenge's action set (``NO_ACTION`` if none)."""
    from nle import nethack

    lut = np.full(256, NO_ACTION, np.uint8)
    for i, a in reversed(list(enumerate(nethack.ACTIONS))):
        lut[int(a)] = i
    return lut


def _games(cfg: NldImportConfig) -> tuple[str, int, list[int], dict, dict]:
    """(ttyrec root, ttyrec version, gameids, gameid -> ttyrec paths, gameid -> games-table row)."""
    try:
        conn = sqlite3.connect(cfg.db)
        conn.row_factory = sqlite3.Row
        root = conn.execute("SELECT root, ttyrec_version FROM roots WHERE dataset_name=?", (cfg.name,)).fetchone()
        if root is None:
            names = [r[0] for r in conn.execute("SELECT dataset_name FROM roots")]
            raise DataError(f"{cfg.db} has no dataset {cfg.name!r} (has: {', '.join(names) or 'none'})")
        paths: dict[int, list[str]] = {}
        for r in conn.execute(
            "SELECT ttyrecs.gameid, ttyrecs.part, ttyrecs.path FROM ttyrecs INNER JOIN datasets "
            "ON ttyrecs.gameid=datasets.gameid WHERE datasets.dataset_name=? ORDER BY ttyrecs.gameid, ttyrecs.part",
            (cfg.name,),
        ):
            paths.setdefault(r[0], []).append(r[2])
        meta = {r["gameid"]: dict(r) for r in conn.execute(
            "SELECT games.* FROM games INNER JOIN datasets ON games.gameid=datasets.gameid WHERE datasets.dataset_name=?",
            (cfg.name,))}
    except sqlite3.DatabaseError as e:
        raise DataError(f"{cfg.db}: not an nle.dataset database ({e})") from None
    gameids = sorted(paths)[: cfg.max_games]
    return root["root"], int(root["ttyrec_version"]), gameids, paths, meta


def _row(gameid: int, meta: dict, name: str) -> tuple[str, dict]:
    m = meta.get(gameid, {})
    character = "-".join(str(m.get(k, "?")).lower()[:3] for k in ("role", "race", "align", "gender"))
    return f"nld-{gameid:09d}", {
        "character": character, "score": m.get("points"), "turns": m.get("turns"), "depth": m.get("maxlvl"),
        "end_reason": m.get("death"), "player": m.get("name"), "nld_dataset": name, "nld_gameid": gameid,
        "expert": "nld", "env": "nld-ttyrec",
    }


def _frames(conv, files: list[str], root: str, gameid: int, n: int):
    """Converted frames of one game as arrays of up to ``n`` frames at a time."""
    chars = np.zeros((n, ROWS, COLS), np.uint8)
    colors = np.zeros((n, ROWS, COLS), np.int8)
    cursors = np.zeros((n, 2), np.int16)
    timestamps = np.zeros(n, np.int64)
    keys = np.zeros(n, np.uint8)
    scores = np.zeros(n, np.int32)
    for part, path in enumerate(files):
        full = os.path.join(root, path)
        if not os.path.isfile(full):
            raise DataError(f"game {gameid}: ttyrec {full} does not exist")
        conv.load_ttyrec(full, gameid=gameid, part=part)
        while True:
            remaining = conv.convert(chars, colors, cursors, timestamps, keys, scores)
            end = n - remaining
            if end:
                yield chars[:end], colors[:end], cursors[:end], timestamps[:end], keys[:end], scores[:end]
            if remaining:
                break


def import_game(writer: ShardWriter, conv, files, root, gameid, meta, name, lut) -> dict:
    """Write one game as one episode; the reward of a frame is the score change up to the next frame."""
    eid, row = _row(gameid, meta, name)
    w = writer.episode(eid, row)
    score = first = None
    for chars, colors, cursors, ts, keys, scores in _frames(conv, files, root, gameid, writer.chunk_steps):
        for t in range(len(chars)):
            if score is not None:
                w.set_outcome(float(scores[t] - score), False)
            w.append({"tty_chars": chars[t], "tty_colors": colors[t], "tty_cursor": cursors[t].astype(np.uint8),
                      "timestamp": ts[t], "keypress": keys[t], "score": scores[t], "action": lut[keys[t]]})
            score = int(scores[t])
            first = score if first is None else first
    if w.steps == 0:
        raise DataError(f"game {gameid}: its ttyrecs hold no frames")
    w.set_outcome(0.0, True)
    return w.close({"status": "complete", "return": float(score - first)})


def import_nld(cfg: NldImportConfig, progress: bool = True) -> dict:
    """Convert ``cfg.name`` from the NLD database ``cfg.db`` into a trajdata dataset at ``cfg.out``."""
    from nle import _pyconverter
    from tqdm import tqdm

    if not os.path.isfile(cfg.db):
        raise DataError(f"NLD database {cfg.db} does not exist")
    root, version, gameids, paths, meta = _games(cfg)
    if not gameids:
        raise DataError(f"{cfg.db}: dataset {cfg.name!r} has no ttyrecs")
    create_or_check(cfg.out, {
        "schema": NLD.name, "env": "nld-ttyrec", "expert": {"nld_dataset": cfg.name},
        "collection": {"episodes_per_shard": cfg.episodes_per_shard, "chunk_steps": cfg.chunk_steps,
                       "codec": cfg.codec, "max_games": cfg.max_games, "ttyrec_version": version},
    })
    ds = Dataset(cfg.out)
    lut = key_to_action()
    per = cfg.episodes_per_shard
    shards = [gameids[i : i + per] for i in range(0, len(gameids), per)]
    written = skipped = steps = 0
    bar = tqdm(total=len(gameids), desc="import nld", unit="game", disable=not progress)
    for s, games in enumerate(shards):
        path = ds.shard_dir / shard_name(s)
        if path.is_file():
            skipped += 1
            bar.update(len(games))
            continue
        with ShardWriter(path, NLD, cfg.chunk_steps, cfg.codec) as sw:
            for g in games:
                conv = _pyconverter.Converter(ROWS, COLS, version)
                row = import_game(sw, conv, paths[g], root, g, meta, cfg.name, lut)
                sw.add_episode_row(row)
                steps += row["steps"]
                bar.update(1)
        written += 1
    bar.close()
    build_index(cfg.out)
    return {"out": str(Path(cfg.out)), "games": len(gameids), "shards_written": written, "shards_skipped": skipped,
            "steps_written": steps, "ttyrec_version": version}
