"""The collector framework end to end with real NLE and the built-in scripted expert."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from trajdata.cli.main import cli
from trajdata.collectors.nethack import ScriptedExpert
from trajdata.envs.nethack import make_nethack_env, seed_and_reset, start_time
from trajdata.collectors.runner import CollectConfig, ExpertSpec, collect
from trajdata.format.dataset import Dataset, build_index
from trajdata.format.inspect import verify

SCRIPTED = ExpertSpec("trajdata.collectors.nethack:ScriptedExpert")
TRAJDATA = [sys.executable, "-m", "trajdata.cli"]


class _NthActionExpert(ScriptedExpert):
    """The scripted expert, misbehaving (``on_nth``) at its ``nth`` action of every episode."""

    nth = 0

    def begin(self, obs, seed):
        super().begin(obs, seed)
        self.n = 0

    def act(self, obs):
        self.n += 1
        if self.n == self.nth:
            self.on_nth()
        return super().act(obs)


class CrashingExpert(_NthActionExpert):
    nth = 50

    def on_nth(self):
        raise ValueError("expert blew up")


class StallingExpert(_NthActionExpert):
    """Stops stepping (a long think)."""

    nth = 30

    def on_nth(self):
        time.sleep(30)


@pytest.fixture(scope="module")
def small(scripted_data):
    return scripted_data


def test_collect_writes_index_and_verifies(small, scripted_cfg):
    rows = Dataset(small).index_rows()
    assert [r["id"] for r in rows] == [f"{s:06d}-{e:04d}" for s in range(scripted_cfg["shards"]) for e in range(2)]
    for r in rows:
        assert r["status"] in ("complete", "truncated") and 0 < r["steps"] <= scripted_cfg["max_steps"]
        assert r["expert"] == "scripted" and r["env"] == "NetHackChallenge-v0" and r["env_version"] == "1.3.0"
        assert set(json.loads(r["seeds"])) == {"core", "disp", "reseed", "lgen"}
        assert len(r["character"].split("-")) == 4 and r["collection_date"]
        assert r["chunks"] == -(-r["steps"] // scripted_cfg["chunk_steps"])
    assert verify(small)["steps"] == sum(r["steps"] for r in rows)


def test_replay_from_recorded_seeds_reproduces_every_field(small):
    ds = Dataset(small)
    for row in ds.index_rows()[:2]:
        seeds = json.loads(row["seeds"])
        env = make_nethack_env(row["character"])
        obs, _ = seed_and_reset(env, seeds["core"], seeds["disp"], seeds["lgen"])
        n = 0
        for chunk in ds.episode(row["id"]):
            for t in range(chunk.steps):
                for k in ds.schema.observation_names:
                    np.testing.assert_array_equal(obs[k], chunk.fields[k][t], err_msg=f"{row['id']} step {n} {k}")
                obs, r, term, trunc, _ = env.step(int(chunk.fields["action"][t]))
                assert r == chunk.fields["reward"][t] and (term or trunc) == chunk.fields["done"][t]
                n += 1
        assert n == row["steps"]
        env.close()


def test_index_rebuilds_from_shards_alone(scripted_copy, tmp_path):
    small = scripted_copy
    before = pq.read_table(small / "index.parquet").to_pylist()
    (small / "index.parquet").unlink()
    after = build_index(small).to_pylist()
    # Wall-clock columns are not stored in shards (same command, same bytes, #15.5): a rebuild keeps
    # them from the index it replaces, and without one leaves them empty.
    from trajdata.format.shard import WALL_CLOCK_FIELDS

    strip = lambda rows: [{k: v for k, v in r.items() if k not in WALL_CLOCK_FIELDS} for r in rows]
    assert strip(after) == strip(before)
    assert all(r[k] is None for r in after for k in WALL_CLOCK_FIELDS)
    (small / "index.parquet").unlink()
    pq.write_table(pq.read_table(pa.BufferReader(_table_bytes(before))), small / "index.parquet")
    assert build_index(small).to_pylist() == before


def _table_bytes(rows):
    sink = pa.BufferOutputStream()
    pq.write_table(pa.Table.from_pylist(rows), sink)
    return sink.getvalue()


def test_resume_and_growth_skip_finished_shards(tmp_path):
    out = tmp_path / "d"
    cfg = dict(out=str(out), expert=SCRIPTED, episodes_per_shard=1, max_steps=150, seed=3)
    first = collect(CollectConfig(shards=2, **cfg), progress=False)
    again = collect(CollectConfig(shards=2, **cfg), progress=False)
    more = collect(CollectConfig(shards=3, **cfg), progress=False)
    assert (first["shards_written"], again["shards_written"], again["shards_skipped"]) == (2, 0, 2)
    assert (more["shards_written"], more["episodes_total"]) == (1, 3)
    with pytest.raises(Exception, match="different collection"):
        collect(CollectConfig(shards=3, **dict(cfg, seed=4)), progress=False)


def test_expert_crash_keeps_steps_and_marks_aborted(tmp_path):
    out = tmp_path / "crash"
    collect(CollectConfig(out=str(out), expert=ExpertSpec(f"{__name__}:CrashingExpert"), shards=1,
                          episodes_per_shard=2, max_steps=300), progress=False)
    rows = Dataset(out).index_rows()
    assert [r["status"] for r in rows] == ["aborted", "aborted"]
    assert all(r["steps"] == 49 and r["end_reason"] == "ValueError: expert blew up" for r in rows)
    assert verify(out)["steps"] == 98


def test_stall_watchdog_truncates_and_goes_on(tmp_path):
    out = tmp_path / "stall"
    t0 = time.monotonic()
    collect(CollectConfig(out=str(out), expert=ExpertSpec(f"{__name__}:StallingExpert"), shards=1,
                          episodes_per_shard=2, max_steps=300, stall_seconds=1.0), progress=False)
    assert time.monotonic() - t0 < 20
    rows = Dataset(out).index_rows()
    assert [r["status"] for r in rows] == ["truncated", "truncated"]
    assert all(r["steps"] == 29 and r["end_reason"].startswith("stalled") for r in rows)


def test_max_steps_marks_truncated(small):
    rows = [r for r in Dataset(small).index_rows() if r["steps"] == 400]
    assert rows and all(r["status"] == "truncated" and r["end_reason"] == "max_steps (400)" for r in rows)


def _run(*args, **kw):
    return subprocess.run([*TRAJDATA, *map(str, args)], capture_output=True, text=True, **kw)


@pytest.mark.slow
def test_kill_dash_nine_then_rerun_loses_and_duplicates_nothing(tmp_path):
    out = tmp_path / "killed"
    args = ["collect", "scripted", "--out", out, "--shards", 6, "--episodes-per-shard", 1, "--workers", 2,
            "--max-steps", 500, "--seed", 11, "--quiet"]
    proc = subprocess.Popen([*TRAJDATA, *map(str, args)], start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not list((out / "shards").glob("*.tar")) and time.monotonic() < deadline:
        time.sleep(0.05)  # kill with at least one shard finished and others in flight
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    finished = sorted(p.name for p in (out / "shards").glob("*.tar"))
    res = _run(*args)
    assert res.returncode == 0, res.stderr
    assert f'"shards_skipped": {len(finished)}' in res.stdout
    v = _run("verify", out)
    assert v.returncode == 0, v.stderr
    ids = [r["id"] for r in Dataset(out).index_rows()]
    assert ids == [f"{s:06d}-0000" for s in range(6)]
    clean = tmp_path / "clean"
    assert _run(*[clean if a == out else a for a in args]).returncode == 0
    key = lambda d: [(r["id"], r["steps"], r["score"], r["seed"]) for r in Dataset(d).index_rows()]
    assert key(out) == key(clean)


def _one_line_error(res, *needles):
    assert res.returncode == 1
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("trajdata: error:"), res.stderr
    assert "Traceback" not in res.stderr
    for n in needles:
        assert n in lines[0], lines[0]


def test_cli_errors_are_one_line(small, tmp_path):
    import shutil

    _one_line_error(_run("inspect", tmp_path / "nope"), "does not exist")
    _one_line_error(_run("verify", tmp_path / "nope"), "does not exist")
    bad = tmp_path / "bad"
    shutil.copytree(small, bad)
    shard = sorted((bad / "shards").glob("*.tar"))[0]
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x55
    shard.write_bytes(bytes(data))
    _one_line_error(_run("verify", bad), shard.name)
    trunc = tmp_path / "trunc"
    shutil.copytree(small, trunc)
    shard = sorted((trunc / "shards").glob("*.tar"))[1]
    shard.write_bytes(shard.read_bytes()[:5000])
    _one_line_error(_run("verify", trunc), shard.name)
    ver = tmp_path / "ver"
    shutil.copytree(small, ver)
    meta = json.loads((ver / "dataset.json").read_text())
    meta["schema_version"] = 99
    (ver / "dataset.json").write_text(json.dumps(meta))
    _one_line_error(_run("inspect", ver), "schema version 99")
    res = _run("collect", "scripted", "--out", tmp_path / "x", "--shards", 0)
    _one_line_error(res, "--shards")
    res = _run("collect", "scripted", "--out", tmp_path / "x", "--character", "xyz-abc-def-ghi-jkl")
    _one_line_error(res, "--character")


def test_inspect_and_show(small):
    runner = CliRunner()
    res = runner.invoke(cli, ["inspect", str(small)])
    assert res.exit_code == 0 and "bytes/step" in res.output and "tty_chars" in res.output
    res = runner.invoke(cli, ["inspect", str(small), "--json"])
    s = json.loads(res.output)
    assert s["episodes"] == len(Dataset(small).index_rows()) == 6 and s["bytes_per_step"] < 100
    res = runner.invoke(cli, ["show", str(small), "--episode", "000000-0000", "--step", "3", "--no-color"])
    assert res.exit_code == 0
    lines = res.output.splitlines()
    assert len(lines) == 25 and "Dlvl:" in lines[23] and "step 3" in lines[24]
    res = runner.invoke(cli, ["show", str(small), "--episode", "000000-0000", "--step", "99999"])
    assert res.exit_code == 1


def _replay_until_mismatch(ds, row, shift_start_time: int = 0):
    """Replay ``row``'s tty frames; returns the first step that differs (None: all equal)."""
    seeds = json.loads(row["seeds"])
    env = make_nethack_env(row["character"])
    obs, _ = seed_and_reset(env, seeds["core"], seeds["disp"], seeds["lgen"])
    if shift_start_time:
        start_time(env, start_time(env) + shift_start_time)
    try:
        for chunk in ds.episode(row["id"], fields=["tty_chars", "action"]):
            for t in range(chunk.steps):
                if not np.array_equal(obs["tty_chars"], chunk.fields["tty_chars"][t]):
                    return chunk.start + t, bytes(obs["tty_chars"][0]).decode("latin-1")
                obs, *_ = env.step(int(chunk.fields["action"][t]))
        return None
    finally:
        env.close()


def test_game_start_time_is_pinned_so_shopkeeper_names_replay(tmp_path):
    """NetHack names shopkeepers from the game's start time; it is pinned per seed (not the clock)."""
    cfg = CollectConfig(out=str(tmp_path / "d"), expert=ExpertSpec("trajdata.collectors.nethack:ScriptedExpert"),
                        shards=1, episodes_per_shard=4, seed=1234, max_steps=600)
    collect(cfg, progress=False)
    ds = Dataset(tmp_path / "d")
    row = next(r for r in ds.index_rows() if r["id"] == "000000-0003")  # enters a shop at step 552
    assert _replay_until_mismatch(ds, row) is None
    step, top_line = _replay_until_mismatch(ds, row, shift_start_time=5 * 257)  # as if started 21 min later
    assert 500 < step < 600 and "Welcome to" in top_line  # ... the shopkeeper's name differs
