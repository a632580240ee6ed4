"""Library side of `trajdata inspect / verify / show`: dataset summaries, full checks, frame rendering."""
from __future__ import annotations

from collections import Counter, defaultdict
from pathlib import Path

import numpy as np

from trajdata.errors import DataError
from trajdata.format.dataset import Dataset
from trajdata.format import codec
from trajdata.format.schema import get_schema
from trajdata.format.shard import (WALL_CLOCK_FIELDS, ShardReader, chunk_header, member_name, member_where,
                                   tar_members)


def summarize(root) -> dict:
    """Episodes, steps, bytes/step overall and per field, score/length summary, status counts."""
    ds = Dataset(root)
    per_field: dict[str, int] = defaultdict(int)
    total_bytes = 0
    rows = ds.index_rows()
    present = {p.name: p for p in ds.shard_paths()}
    listed = {r["shard"] for r in rows}
    warnings = []
    missing = sorted(listed - set(present))
    if missing:
        n = sum(1 for r in rows if r["shard"] in missing)
        warnings.append(f"shard{'s' if len(missing) > 1 else ''} {', '.join(missing)} listed in index.parquet "
                        f"{'do' if len(missing) > 1 else 'does'} not exist: counts exclude {n} episode(s) "
                        f"(`trajdata verify --quarantine {ds.root}` reindexes without them)")
        rows = [r for r in rows if r["shard"] not in missing]
    unindexed = sorted(set(present) - listed)
    if unindexed:
        warnings.append(f"shard{'s' if len(unindexed) > 1 else ''} {', '.join(unindexed)} not in index.parquet: "
                        f"counts exclude {'them' if len(unindexed) > 1 else 'it'} (rebuild with `trajdata index {ds.root}`)")
    for name in sorted(listed & set(present)):
        total_bytes += present[name].stat().st_size
        for h in ShardReader(present[name]).headers():
            for field, parts in h["fields"].items():
                per_field[field] += sum(p.get("nbytes", 0) for p in parts.values())
    steps = sum(r["steps"] for r in rows)

    def dist(key):
        vals = np.array([r[key] for r in rows if r.get(key) is not None], float)
        if not len(vals):
            return None
        return {"mean": float(vals.mean()), "median": float(np.median(vals)), "min": float(vals.min()),
                "max": float(vals.max())}

    return {
        "dataset": str(ds.root), "schema": ds.schema.name, "expert": ds.info.get("expert", {}),
        "shards": len(listed & set(present)), "episodes": len(rows), "warnings": warnings, "steps": steps,
        "bytes": total_bytes, "bytes_per_step": total_bytes / steps if steps else None,
        "field_bytes_per_step": {k: v / steps for k, v in per_field.items()} if steps else {},
        "raw_bytes_per_step": ds.schema.step_nbytes,
        "status": dict(Counter(r["status"] for r in rows)),
        "episode_steps": dist("steps"), "score": dist("score"), "return": dist("return"),
    }


def check_shard(path: Path) -> dict:
    """Decode every chunk of one shard, going on past bad chunks: the episode rows whose chunks all
    read back (``rows``), every episode id seen (``ids``), chunk/step counts and problem lines (each
    naming the shard, and the episode, chunk and field where known)."""
    name = path.name
    problems: list[str] = []
    rows, ids, state = [], set(), {}
    chunks = steps = 0
    try:
        with open(path, "rb") as f:
            for m in tar_members(f, name):
                f.seek(m.offset_data)
                blob = f.read(m.size)
                header = None
                try:
                    if len(blob) != m.size:
                        raise DataError(f"shard {name}: {member_where(m.name)}: truncated ({len(blob)} of {m.size} bytes)")
                    header, start = chunk_header(blob, name, m.name)
                    eid, k = header["episode_id"], header["chunk"]
                    ids.add(eid)
                    where = f"shard {name}: episode {eid} chunk {k}"
                    codec.decode_chunk(get_schema(header["schema"]), header, memoryview(blob)[start:], where=where)
                except DataError as e:
                    problems.append(str(e))
                    named = (header["episode_id"], header["chunk"]) if header else member_name(m.name)
                    if named is not None:  # go on checking the episode's other chunks, without follow-on noise
                        ids.add(named[0])
                        st = state.setdefault(named[0], _episode_state())
                        st["bad"] = True
                        st["next"] = named[1] + 1
                        if header is None:
                            st["unknown"] = True
                        else:
                            st["steps"] += header["steps"]
                            st["done"] = st["done"] or header["last"]
                    continue
                chunks += 1
                steps += header["steps"]
                st = state.setdefault(eid, _episode_state())
                if st["done"] or k != st["next"] or (header["start"] != st["steps"] and not st["unknown"]):
                    problems.append(f"shard {name}: episode {eid} chunk {k}: out of order (expected chunk "
                                    f"{st['next']} at step {st['steps']})")
                    st["bad"] = True
                st["next"], st["steps"] = k + 1, st["steps"] + header["steps"]
                if header["last"]:
                    st["done"] = True
                    row = header.get("episode")
                    if not isinstance(row, dict) or row.get("id") != eid:
                        problems.append(f"shard {name}: episode {eid} chunk {k}: final chunk has no episode row")
                    elif not st["unknown"] and (row.get("steps") != st["steps"] or row.get("chunks") != st["next"]):
                        problems.append(f"shard {name}: episode {eid}: episode row says {row.get('steps')} steps in "
                                        f"{row.get('chunks')} chunks, its chunks hold {st['steps']} in {st['next']}")
                    else:
                        rows.append(dict(row, shard=name))
    except DataError as e:
        problems.append(str(e))
    except OSError as e:
        problems.append(f"shard {name}: unreadable ({e.strerror or e})")
    for eid, st in state.items():
        if not st["done"] and not st["unknown"]:  # an unreadable header may have been the final chunk's
            problems.append(f"shard {name}: episode {eid}: no final chunk (chunks 0..{st['next'] - 1} found)")
    return {"shard": name, "rows": rows, "ids": ids, "chunks": chunks, "steps": steps, "problems": problems}


def _episode_state() -> dict:
    return {"next": 0, "steps": 0, "bad": False, "done": False, "unknown": False}


# Index columns checked against the shards' episode rows (the rest are the episode's own metadata).
CHECKED_COLUMNS = ("shard", "chunks", "steps", "status", "score", "return", "seed")


def check(root, progress: bool = False, on_problem=None) -> dict:
    """Every problem with dataset ``root``: decodes every chunk of every shard (checking all
    checksums), going on past bad ones, and cross-checks the index against the shards. Returns
    counts plus ``problems`` (one line each) and ``bad_shards``; ``on_problem`` gets each line as
    it is found."""
    ds = Dataset(root)
    problems: list[str] = []
    bad: list[str] = []

    def report(line: str, shard: str | None = None) -> None:
        problems.append(line)
        if shard is not None and shard not in bad:
            bad.append(shard)
        if on_problem is not None:
            on_problem(line)

    paths = ds.shard_paths()
    it = paths
    if progress:
        from tqdm import tqdm

        it = tqdm(paths, desc="verify", unit="shard", disable=None)
    steps = chunks = 0
    by_id: dict[str, dict] = {}
    seen: dict[str, set] = {}
    for path in it:
        r = check_shard(path)
        steps += r["steps"]
        chunks += r["chunks"]
        seen[path.name] = r["ids"]
        for line in r["problems"]:
            report(line, path.name)
        for row in r["rows"]:
            if row["id"] in by_id:
                report(f"shard {path.name}: episode {row['id']} is also in {by_id[row['id']]['shard']} (a copied "
                       "shard?)", path.name)
                continue
            by_id[row["id"]] = row
    try:
        index = ds.index_rows()
    except DataError as e:
        report(str(e))
        index = None
    missing: dict[str, int] = {}
    if index is not None:
        listed = set()
        names = {p.name for p in paths}
        for r in index:
            eid, shard = r.get("id"), r.get("shard")
            listed.add(eid)
            if shard not in names:
                missing[shard] = missing.get(shard, 0) + 1
                continue
            if shard in bad:
                continue
            got = by_id.get(eid)
            if got is None or got["shard"] != shard:
                where = f" (it is in {got['shard']})" if got is not None else ""
                report(f"index.parquet does not match the shards: episode {eid} is listed in {shard}, which does "
                       f"not hold it{where}; rebuild it with `trajdata index {ds.root}`")
                continue
            for col in CHECKED_COLUMNS:
                if col in got and not _same(r.get(col), got[col]):
                    report(f"index.parquet does not match the shards: episode {eid} ({shard}): {col} is "
                           f"{r.get(col)!r}, the shard says {got[col]!r}; rebuild it with `trajdata index {ds.root}`")
                    break
        for shard, n in sorted(missing.items()):
            report(f"shard {shard} is listed in index.parquet ({n} episode(s)) but does not exist in {ds.shard_dir}")
        for eid, row in sorted(by_id.items()):
            if eid not in listed:
                report(f"index.parquet does not match the shards: episode {eid} ({row['shard']}) is not in the "
                       f"index; rebuild it with `trajdata index {ds.root}`")
    good = {e: r for e, r in by_id.items() if r["shard"] not in bad}
    return {"dataset": str(ds.root), "shards": len(paths), "episodes": len(good), "chunks": chunks,
            "steps": sum(r["steps"] for r in good.values()) if bad else steps, "ok": not problems,
            "problems": problems, "bad_shards": bad, "missing_shards": sorted(missing), "ids": seen, "index": index}


def _same(a, b) -> bool:
    return a == b or (isinstance(a, float) and isinstance(b, float) and a != a and b != b)


def verify(root, progress: bool = False, on_problem=None) -> dict:
    """``check`` the dataset; raises one DataError summing up its problems (naming the bad shards)."""
    r = check(root, progress, on_problem)
    if r["problems"]:
        raise DataError(problem_summary(r))
    return {k: r[k] for k in ("dataset", "shards", "episodes", "chunks", "steps", "ok")}


def problem_summary(r: dict) -> str:
    n, bad = len(r["problems"]), r["bad_shards"]
    shards = f"{len(bad)} of {r['shards']} shards bad ({', '.join(bad)})" if bad else "no shard bad"
    return (f"{r['dataset']}: verify found {n} problem{'s' if n != 1 else ''}, {shards}; first: {r['problems'][0]}"
            + ("; `trajdata verify --quarantine` moves bad shards aside" if bad else ""))


QUARANTINE_DIR = "quarantine"


def quarantine(root, report: dict) -> dict:
    """Move ``report``'s bad shards into ``root/quarantine/`` and rebuild the index from the rest:
    returns the shards moved and the episodes and steps lost (as the old index, or the shards'
    readable headers, count them)."""
    from trajdata.format.dataset import build_index

    ds = Dataset(root)
    qdir = ds.root / QUARANTINE_DIR
    qdir.mkdir(exist_ok=True)
    index = report.get("index") or []
    lost_ids: set[str] = set()
    moved = []
    for name in report["bad_shards"]:
        src = ds.shard_dir / name
        if not src.is_file():
            continue
        lost_ids |= {r.get("id") for r in index if r.get("shard") == name} | set(report["ids"].get(name, ()))
        moved.append(name)
        dst, i = qdir / name, 1
        while dst.exists():
            dst, i = qdir / f"{name}.{i}", i + 1
        src.rename(dst)
    for name in report.get("missing_shards", ()):  # deleted shards: their episodes are lost too
        lost_ids |= {r.get("id") for r in index if r.get("shard") == name}
    table = build_index(ds.root)
    kept = set(table.column("id").to_pylist()) if table.num_rows else set()
    lost_ids -= kept  # a duplicate's other copy is still there
    gone = set(moved) | set(report.get("missing_shards", ()))
    lost_steps = sum(int(r.get("steps") or 0) for r in index if r.get("id") in lost_ids and r.get("shard") in gone)
    return {"quarantined": moved, "missing_shards": list(report.get("missing_shards", ())), "quarantine_dir": str(qdir), "episodes_lost": len(lost_ids),
            "steps_lost_per_old_index": lost_steps, "episodes_left": table.num_rows}


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
