"""Fuzzing the readers with corrupt datasets (#15.5), and same command, same bytes.

Each trial copies a small real dataset, applies one seeded mutation (flipped bytes, a truncation, or
bytes spliced in from another shard; in a shard, ``index.parquet`` or ``dataset.json``), then runs
``verify``, the loader over every episode and ``show`` of a step, in-process. Every one of them must
give exactly the original data or raise a ``TrajdataError`` whose message is one line: never
another exception, a hang, a crash, or different data without an error.
"""
from __future__ import annotations

import collections
import faulthandler
import hashlib
import os
import shutil
import signal
import time
import warnings
from pathlib import Path

import numpy as np
import pytest

from trajdata.errors import TrajdataError
from trajdata.loaders.stream import CorruptDataWarning

FUZZ = dict(shards=2, episodes_per_shard=2, max_steps=150, chunk_steps=64, seed=11)
TRIALS = int(os.environ.get("TRAJDATA_FUZZ_TRIALS", 300))  # more for a longer hunt, off CI
TRIAL_SECONDS = 10  # a trial that takes longer has hung


def _collect(out: Path, **kw):
    pytest.importorskip("nle", reason="needs nle (the nethack extra)")
    from trajdata.collectors.runner import CollectConfig, ExpertSpec, collect

    collect(CollectConfig(out=str(out), expert=ExpertSpec("trajdata.collectors.nethack:ScriptedExpert"), **kw),
            progress=False)
    return out


@pytest.fixture(scope="module")
def fuzz_data(tmp_path_factory) -> Path:
    return _collect(tmp_path_factory.mktemp("fuzz") / "ds", **FUZZ)


def _episodes_from_shards(root: Path) -> dict[str, dict[str, np.ndarray]]:
    from trajdata.format.dataset import Dataset

    ds = Dataset(root)
    out: dict[str, dict[str, list]] = {}
    for path in ds.shard_paths():
        for c in ds.shard(path.name).chunks():
            d = out.setdefault(c.episode_id, {})
            for k, v in c.fields.items():
                d.setdefault(k, []).append(v)
    return {e: {k: np.concatenate(v) for k, v in d.items()} for e, d in out.items()}


def _episodes_from_loader(root: Path, on_corrupt: str = "raise"):
    """Every episode as the loader delivers it; with ``on_corrupt="skip"``, (episodes, steps seen)."""
    from trajdata.loaders.stream import LoaderConfig, TrajectoryStream

    stream = TrajectoryStream(LoaderConfig(str(root), batch_size=2, seq_len=128, shuffle=False, tune_malloc=False,
                                           on_corrupt=on_corrupt))
    names = list(stream.fields)
    got: dict[str, dict[str, np.ndarray]] = {
        eid: {n: np.zeros((n_steps, *stream.schema[n].shape), stream.schema[n].np_dtype) for n in names}
        for eid, n_steps in zip(stream.episode_ids, stream.steps)}
    seen = {eid: np.zeros(n, bool) for eid, n in zip(stream.episode_ids, stream.steps)}
    for batch in stream.numpy_batches(0, 1):
        rows, cols = np.nonzero(batch["mask"])
        for r, c in zip(rows, cols):
            eid = stream.episode_ids[batch["episode"][r, c]]
            t = batch["step"][r, c]
            assert not seen[eid][t], (eid, t)
            seen[eid][t] = True
            for n in names:
                got[eid][n][t] = batch[n][r, c]
    if on_corrupt == "skip":
        return got, seen
    assert all(s.all() for s in seen.values()), "loader left steps out without an error"
    return got


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(
        a[e].keys() == b[e].keys() and all(x.shape == b[e][k].shape and np.array_equal(x, b[e][k])
                                           for k, x in a[e].items()) for e in a)


def _delivered_match(got: dict, seen: dict, original: dict) -> bool:
    """Every step the loader delivered (``seen``) equals the original's."""
    for e, d in got.items():
        if not seen[e].any():
            continue
        if e not in original or any(len(seen[e]) != len(original[e][k]) for k in d):
            return False
        if not all(np.array_equal(v[seen[e]], original[e][k][seen[e]]) for k, v in d.items()):
            return False
    return True


def _mutate(rng: np.random.Generator, root: Path) -> str:
    """One seeded mutation of a file of ``root``; returns what it did."""
    shards = sorted((root / "shards").glob("shard-*.tar"))
    target = rng.choice([*shards, *shards, *shards, root / "index.parquet", root / "dataset.json"])
    data = bytearray(target.read_bytes())
    kind = rng.choice(["flip", "flip", "truncate", "splice"])
    if kind == "flip":
        n = int(rng.integers(1, 9))
        for i in rng.integers(0, len(data), n):
            data[i] ^= int(rng.integers(1, 256))
        what = f"flip {n} byte(s)"
    elif kind == "truncate":
        n = int(rng.integers(0, len(data)))
        del data[n:]
        what = f"truncate to {n}"
    else:
        other = [p for p in shards if p != target] or shards
        src = other[int(rng.integers(0, len(other)))].read_bytes()
        n = int(rng.integers(1, 4097))
        a = int(rng.integers(0, max(1, len(src) - n)))
        b = a if rng.random() < 0.5 else int(rng.integers(0, len(data)))
        data[b : b + n] = src[a : a + n]
        what = f"splice {n} bytes at {b}"
    target.write_bytes(bytes(data))
    return f"{target.name}: {what}"


def _kind(msg: str) -> str:
    for key, words in [("checksum", ("checksum", "Zstd", "zstd", "frame")), ("tar", ("tar file", "archive", "member header")),
                       ("chunk header", ("chunk header", "bad magic", "header says", "header lacks")),
                       ("index", ("index",)), ("dataset.json", ("dataset.json",)),
                       ("episode structure", ("out of order", "final chunk", "no episode", "no step", "chunks hold")),
                       ("truncated", ("truncated",))]:
        if any(w in msg for w in words):
            return key
    return "other"


class _Hung(Exception):
    pass


def _alarm(signum, frame):
    raise _Hung()


def test_fuzz_corrupt_datasets_end_in_original_data_or_one_line_error(fuzz_data, tmp_path):
    from trajdata.format.dataset import Dataset
    from trajdata.format.inspect import step_frame, verify

    original = _episodes_from_shards(fuzz_data)
    rows = Dataset(fuzz_data).index_rows()
    assert _same(_episodes_from_loader(fuzz_data), original)
    outcomes: collections.Counter = collections.Counter()
    failures = []
    t0 = time.monotonic()
    old = signal.signal(signal.SIGALRM, _alarm)
    try:
        for trial in range(TRIALS):
            faulthandler.dump_traceback_later(TRIAL_SECONDS * 3, exit=True)  # a hang inside native code
            rng = np.random.default_rng([2026, trial])
            root = tmp_path / f"t{trial}"
            shutil.copytree(fuzz_data, root)
            what = _mutate(rng, root)
            row = rows[int(rng.integers(0, len(rows)))]
            step = int(rng.integers(0, row["steps"]))
            errors = []
            signal.alarm(TRIAL_SECONDS)
            warnings.simplefilter("ignore", CorruptDataWarning)
            try:
                for name, op in [("verify", lambda: verify(root)),
                                 ("loader", lambda: _episodes_from_loader(root)),
                                 ("show", lambda: step_frame(root, row["id"], step)),
                                 ("skip", lambda: _episodes_from_loader(root, "skip"))]:
                    try:
                        got = op()
                    except TrajdataError as e:
                        msg = str(e)
                        if not msg or "\n" in msg:
                            failures.append(f"trial {trial} ({what}): {name}: error not one line: {msg!r}")
                        errors.append(msg)
                        continue
                    except _Hung:
                        raise
                    except Exception as e:  # noqa: BLE001 - any other exception is the bug we look for
                        failures.append(f"trial {trial} ({what}): {name}: {type(e).__name__}: {e}")
                        errors.append("")
                        continue
                    if name == "loader" and not _same(got, original):
                        failures.append(f"trial {trial} ({what}): loader: different data without an error")
                    if name == "skip":  # skipped steps are padding; every delivered step is original
                        if not _delivered_match(*got, original):
                            failures.append(f"trial {trial} ({what}): loader (skip): different data delivered")
                    if name == "show":
                        want = {k: v[step] for k, v in original[row["id"]].items()}
                        if got.keys() != want.keys() or not all(np.array_equal(got[k], want[k]) for k in want):
                            failures.append(f"trial {trial} ({what}): show: different data without an error")
            except _Hung:
                failures.append(f"trial {trial} ({what}): hung (> {TRIAL_SECONDS} s)")
            finally:
                signal.alarm(0)
            outcomes["original data" if not errors else f"error: {_kind(errors[0])}"] += 1
            shutil.rmtree(root)
    finally:
        faulthandler.cancel_dump_traceback_later()
        signal.signal(signal.SIGALRM, old)
    kinds = collections.Counter(f.split(": ", 2)[-1].split(":")[0][:60] for f in failures)
    print(f"fuzz: {TRIALS} trials in {time.monotonic() - t0:.1f} s: {dict(sorted(outcomes.items()))}; "
          f"{len(failures)} failure(s) {dict(kinds)}")
    assert not failures, "\n".join(failures[:20])
    assert sum(outcomes.values()) == TRIALS


# ---- same command, same bytes ----------------------------------------------------------------------

def test_same_collect_command_writes_byte_identical_shards(tmp_path):
    """Failed before the fix: tar mtimes (time.time()) and wall_seconds in the final chunk header."""
    small = dict(shards=2, episodes_per_shard=1, max_steps=40, chunk_steps=16, seed=5)
    a, b = _collect(tmp_path / "a", **small), _collect(tmp_path / "b", **small)
    sha = lambda p: hashlib.sha256(p.read_bytes()).hexdigest()
    names = sorted(p.name for p in (a / "shards").glob("*.tar"))
    assert names == ["shard-000000.tar", "shard-000001.tar"]
    assert [sha(a / "shards" / n) for n in names] == [sha(b / "shards" / n) for n in names]
    import pyarrow.parquet as pq

    rows = pq.read_table(a / "index.parquet").to_pylist()
    assert all(r["wall_seconds"] is not None and r["collection_date"] for r in rows)  # kept in the index
    from trajdata.format.dataset import build_index

    rebuilt = build_index(a).to_pylist()  # a rebuild carries them over
    assert [r["wall_seconds"] for r in rebuilt] == [r["wall_seconds"] for r in rows]
