"""Library side of `trajdata inspect / verify / show`: dataset summaries, full checks, frame rendering."""
from __future__ import annotations

from collections import Counter, defaultdict

import numpy as np

from trajdata.errors import DataError
from trajdata.format.dataset import Dataset
from trajdata.format.shard import WALL_CLOCK_FIELDS, ShardReader


def summarize(root) -> dict:
    """Episodes, steps, bytes/step overall and per field, score/length summary, status counts."""
    ds = Dataset(root)
    per_field: dict[str, int] = defaultdict(int)
    total_bytes = 0
    for path in ds.shard_paths():
        total_bytes += path.stat().st_size
        for h in ShardReader(path).headers():
            for name, parts in h["fields"].items():
                per_field[name] += sum(p.get("nbytes", 0) for p in parts.values())
    rows = ds.index_rows()
    steps = sum(r["steps"] for r in rows)

    def dist(key):
        vals = np.array([r[key] for r in rows if r.get(key) is not None], float)
        if not len(vals):
            return None
        return {"mean": float(vals.mean()), "median": float(np.median(vals)), "min": float(vals.min()),
                "max": float(vals.max())}

    return {
        "dataset": str(ds.root), "schema": ds.schema.name, "expert": ds.info.get("expert", {}),
        "shards": len(ds.shard_paths()), "episodes": len(rows), "steps": steps,
        "bytes": total_bytes, "bytes_per_step": total_bytes / steps if steps else None,
        "field_bytes_per_step": {k: v / steps for k, v in per_field.items()} if steps else {},
        "raw_bytes_per_step": ds.schema.step_nbytes,
        "status": dict(Counter(r["status"] for r in rows)),
        "episode_steps": dist("steps"), "score": dist("score"), "return": dist("return"),
    }


def verify(root, progress: bool = False) -> dict:
    """Decode every field of every chunk (checking all checksums) and cross-check the index."""
    ds = Dataset(root)
    paths = ds.shard_paths()
    if progress:
        from tqdm import tqdm

        paths = tqdm(paths, desc="verify", unit="shard", disable=None)
    steps = chunks = 0
    shard_rows = []
    for path in paths:
        reader = ShardReader(path)
        for c in reader.chunks():
            steps += c.steps
            chunks += 1
        shard_rows += reader.episode_rows()
    index_ids = sorted(r["id"] for r in ds.index_rows())
    shard_ids = sorted(r["id"] for r in shard_rows)
    if len(set(shard_ids)) != len(shard_ids):
        dup = next(i for i, n in Counter(shard_ids).items() if n > 1)
        raise DataError(f"{ds.root}: episode {dup} appears in more than one shard")
    if index_ids != shard_ids:
        raise DataError(f"{ds.root}: index.parquet does not match the shards; rebuild it with `trajdata index {ds.root}`")
    if steps != sum(r["steps"] for r in shard_rows):
        raise DataError(f"{ds.root}: step counts in chunk headers disagree with episode rows")
    return {"dataset": str(ds.root), "shards": len(ds.shard_paths()), "episodes": len(shard_ids),
            "chunks": chunks, "steps": steps, "ok": True}


def step_frame(root, episode_id: str, step: int) -> dict[str, np.ndarray]:
    """All fields of one step."""
    ds = Dataset(root)
    for c in ds.episode(episode_id):
        if c.start <= step < c.start + c.steps:
            return {k: v[step - c.start] for k, v in c.fields.items()}
    raise DataError(f"episode {episode_id} has no step {step}")


_ANSI = {i: f"\033[{30 + (i & 7)}{';1' if i & 8 else ''}m" for i in range(16)}


def render_tty(chars: np.ndarray, colors: np.ndarray, cursor=None, color: bool = True) -> str:
    """The 24x80 terminal as text, with ANSI colours (and the cursor in reverse video)."""
    lines = []
    for r in range(chars.shape[0]):
        out, last = [], None
        for c in range(chars.shape[1]):
            ch = chr(int(chars[r, c])) if 32 <= int(chars[r, c]) < 127 else " "
            if color:
                code = _ANSI.get(int(colors[r, c]) & 15, "\033[0m")
                if cursor is not None and (r, c) == (int(cursor[0]), int(cursor[1])):
                    out.append("\033[0m\033[7m" + ch + "\033[0m")
                    last = None
                    continue
                if code != last:
                    out.append("\033[0m" + code)
                    last = code
            out.append(ch)
        lines.append("".join(out) + ("\033[0m" if color else ""))
    return "\n".join(lines)


def render_atari(frame: np.ndarray, width: int = 84) -> str:
    """An 84x84 gray frame as half-block characters with 24-bit colour."""
    rows = []
    for r in range(0, frame.shape[0] - 1, 2):
        cells = []
        for c in range(frame.shape[1]):
            top, bot = int(frame[r, c]), int(frame[r + 1, c])
            cells.append(f"\033[38;2;{top};{top};{top}m\033[48;2;{bot};{bot};{bot}m\u2580")
        rows.append("".join(cells) + "\033[0m")
    return "\n".join(rows)


VOLATILE_COLUMNS = WALL_CLOCK_FIELDS


def diff_datasets(a, b, ignore=VOLATILE_COLUMNS) -> str | None:
    """The first difference between datasets ``a`` and ``b`` (index rows but ``ignore``d columns, then
    every stored step of every field), or None if they hold the same episodes."""
    da, db = Dataset(a), Dataset(b)
    rows = [{r["id"]: {k: v for k, v in r.items() if k not in ignore} for r in d.index_rows()} for d in (da, db)]
    if rows[0].keys() != rows[1].keys():
        return f"episodes differ: {sorted(rows[0].keys() ^ rows[1].keys())[:5]}"
    for eid in sorted(rows[0]):
        if rows[0][eid] != rows[1][eid]:
            k = next(k for k in rows[0][eid].keys() | rows[1][eid].keys() if rows[0][eid].get(k) != rows[1][eid].get(k))
            return f"episode {eid}: index column {k} differs ({rows[0][eid].get(k)!r} vs {rows[1][eid].get(k)!r})"
        if da.schema.names != db.schema.names:
            return f"schemas differ: {da.schema.name} vs {db.schema.name}"
        for name in da.schema.names:
            x = np.concatenate([c.fields[name] for c in da.episode(eid, fields=[name])])
            y = np.concatenate([c.fields[name] for c in db.episode(eid, fields=[name])])
            if x.shape != y.shape or not np.array_equal(x, y):
                return f"episode {eid}: field {name} differs"
    return None
