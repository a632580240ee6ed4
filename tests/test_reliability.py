"""Reliability (#15): odd episodes, bad options, full disks, signals, concurrency and corrupt data.

Real components at tiny sizes: the real NLE scripted expert, real shards. Every failure must be one
line naming the thing (``trajdata: error: ...``), a non-zero exit, no traceback and no data loss.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from trajdata.cli.main import cli
from trajdata.format.dataset import Dataset, build_index
from trajdata.format.inspect import verify

TRAJDATA = [sys.executable, "-m", "trajdata.cli"]
SCRIPTED = "trajdata.collectors.nethack:ScriptedExpert"


def run(*args, env=None):
    """Run the CLI in-process; returns (exit code, stdout + stderr)."""
    res = CliRunner().invoke(cli, [str(a) for a in args], env=env)
    assert not isinstance(res.exception, Exception) or isinstance(res.exception, SystemExit), res.exc_info
    return res.exit_code, res.output


def one_line_error(code: int, out: str, *names: str) -> str:
    """Assert ``out`` is one `trajdata: error:` line (naming each of ``names``) with a non-zero exit."""
    assert code != 0, out
    assert "Traceback" not in out, out
    lines = [ln for ln in out.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("trajdata: error:")]
    assert len(errors) == 1, out
    for n in names:
        assert str(n) in errors[0], (n, errors[0])
    return errors[0]


def collect_cli(out, *extra):
    return run("collect", "scripted", "--out", out, "--quiet", *extra)


# ---- 1. zero-step episodes and invalid option values ---------------------------------------------

@pytest.mark.parametrize("codec", ["stream", "compact", "fast"])
def test_zero_step_episode_is_recorded_truncated(tmp_path, codec):
    """Failed before the fix: ValueError 'cannot reshape array of size 0' from every codec."""
    out = tmp_path / "x"
    code, text = collect_cli(out, "--shards", "1", "--episodes-per-shard", "2", "--max-steps", "50",
                             "--max-seconds", "0.0001", "--codec", codec)
    assert code == 0, text
    rows = pq.read_table(out / "index.parquet").to_pylist()
    assert [(r["steps"], r["status"]) for r in rows] == [(0, "truncated"), (0, "truncated")]
    assert all(r["end_reason"].startswith("max_seconds") for r in rows)
    assert verify(out)["episodes"] == 2
    code, text = run("show", out, "--episode", rows[0]["id"])
    one_line_error(code, text, rows[0]["id"])


def test_zero_step_episodes_with_two_workers(tmp_path):
    """Failed before the fix: the whole --workers 2 run aborted."""
    out = tmp_path / "x"
    code, text = collect_cli(out, "--shards", "2", "--workers", "2", "--max-steps", "50", "--max-seconds", "0.0001")
    assert code == 0, text
    assert json.loads(text.strip().splitlines()[-1])["episodes_total"] == 2


@pytest.mark.parametrize("flag,value,message", [
    ("--max-seconds", "-1", "--max-seconds must be positive"),
    ("--max-seconds", "0", "--max-seconds must be positive"),
    ("--seed", "-1", "--seed must be at least 0"),
    ("--stall-seconds", "-1", "--stall-seconds must be 0 (off) or positive"),
    ("--ray-address", "127.0.0.1:1", "--ray-address needs backend 'ray'"),
])
def test_invalid_collect_options_fail_up_front(tmp_path, flag, value, message):
    """Failed before the fix: -1 seconds / seed crashed with tracebacks; --ray-address was ignored."""
    code, text = collect_cli(tmp_path / "x", "--shards", "1", "--max-steps", "5", flag, value)
    one_line_error(code, text, message)
    assert not (tmp_path / "x").exists()


# ---- 7. wrong metadata -----------------------------------------------------------------------------

@pytest.mark.parametrize("character,names", [
    ("foo-bar", ["foo"]), ("bar-elf", ["elf", "bar"]), ("val-hum-law-mal", ["female"]),
    ("wiz-elf-neu", ["neu", "elf"]), ("kni-hum-law-xyz", ["xyz"]),
])
def test_unknown_characters_are_refused(tmp_path, character, names):
    """Failed before the fix: 'foo-bar' was recorded in the index while NLE played a Barbarian."""
    code, text = collect_cli(tmp_path / "x", "--shards", "1", "--max-steps", "5", "--character", character)
    one_line_error(code, text, "--character", character, *names)
    assert not (tmp_path / "x").exists()


def test_valid_characters_are_accepted_and_played():
    from trajdata.envs.nethack import ROLE_OPTIONS, character_problem, make_nethack_env, random_character

    assert all(character_problem(random_character(s)) is None for s in range(200))
    for c in ["@", "bar", "mon-hum", "pri-elf-cha", "val-dwa-law-fem", *ROLE_OPTIONS]:
        assert character_problem(c) is None, c
    env = make_nethack_env("pri-elf-cha-fem")  # what we accept, NLE plays: an elven priestess
    try:
        obs, _ = env.reset(seed=1)
        top = bytes(obs["tty_chars"].reshape(-1)).decode("latin-1")
        assert "elven" in top.lower() or "priestess" in top.lower(), top[:400]
    finally:
        env.close()


@pytest.mark.parametrize("content", ["[1, 2]", '"text"', "3", "null"])
def test_dataset_json_not_an_object(scripted_copy, content):
    """Failed before the fix: AttributeError traceback ('list' object has no attribute 'get')."""
    (scripted_copy / "dataset.json").write_text(content)
    for cmd in (["inspect"], ["verify"], ["index"]):
        one_line_error(*run(*cmd, scripted_copy), "dataset.json")


def test_schema_version_of_another_type_is_named(scripted_copy):
    """Failed before the fix: 'version 1 is not supported (this trajdata reads 1)'."""
    info = json.loads((scripted_copy / "dataset.json").read_text())
    info["schema_version"] = str(info["schema_version"])
    (scripted_copy / "dataset.json").write_text(json.dumps(info))
    line = one_line_error(*run("inspect", scripted_copy), "dataset.json")
    assert f"'{info['schema_version']}'" in line


# ---- 6. silent loss on import ----------------------------------------------------------------------

@pytest.mark.parametrize("n", ["-1", "0"])
def test_import_nld_max_games_must_be_positive(tmp_path, n):
    """Failed before the fix: -1 exited 0 having imported 2 of 3 games (gameids[:-1]); 0 said 'has no ttyrecs'."""
    db = tmp_path / "ttyrecs.db"
    db.write_bytes(b"")
    code, text = run("import", "nld", "--db", db, "--name", "test", "--out", tmp_path / "o", "--max-games", n)
    one_line_error(code, text, f"--max-games must be at least 1 (got {n})")
    assert not (tmp_path / "o").exists()
