"""AutoAscend expert: install, adapter, end-of-game parsing, `collect autoascend`, exact replay, stats.

Tests that need AutoAscend use the installed copy (`trajdata experts install autoascend`) or install
one into a temporary cache from TRAJDATA_AUTOASCEND_SRC (a git dir or checkout, e.g. the fetched
mirror); without either they skip.
"""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from trajdata.cli.main import cli
from trajdata.collectors import install
from trajdata.collectors.autoascend import (AutoAscendEnv, game_end, parse_xlog_line, replay_episode,
                                            topten_entry, xlogfile_path)
from trajdata.envs.nethack import CharacterEnv, seed_and_reset
from trajdata.errors import ExpertError
from trajdata.format.stats import death_cause, killer
from trajdata.format.dataset import Dataset

SRC = os.environ.get("TRAJDATA_AUTOASCEND_SRC")
needs_src = pytest.mark.skipif(not SRC, reason="set TRAJDATA_AUTOASCEND_SRC to an AutoAscend git dir or checkout")


@pytest.fixture(scope="module")
def autoascend(tmp_path_factory):
    """An AutoAscend install for this module's tests; sets TRAJDATA_CACHE (inherited by workers)."""
    old = os.environ.get("TRAJDATA_CACHE")
    if install.installed_path() is None:
        if not SRC:
            pytest.skip("AutoAscend not available: run `trajdata experts install autoascend` "
                        "or set TRAJDATA_AUTOASCEND_SRC")
        os.environ["TRAJDATA_CACHE"] = str(tmp_path_factory.mktemp("cache"))
        install.install_autoascend(SRC, deps=False)
    missing = install.missing_requirements()
    if missing:
        pytest.skip(f"AutoAscend's runtime packages are missing: {', '.join(missing)}")
    yield install.installed_path()
    if old is None:
        os.environ.pop("TRAJDATA_CACHE", None)
    else:
        os.environ["TRAJDATA_CACHE"] = old


def _run(args, env=None):
    return CliRunner().invoke(cli, args, env=env, catch_exceptions=False)


# ------------------------------------------------------------------------------------ install

def test_collect_without_install_names_the_install_command(tmp_path):
    out = tmp_path / "d"
    r = _run(["collect", "autoascend", "--out", str(out)], env={"TRAJDATA_CACHE": str(tmp_path / "empty")})
    assert r.exit_code == 1
    assert "trajdata experts install autoascend" in r.output
    assert "Traceback" not in r.output and len(r.output.strip().splitlines()) == 1
    assert not out.exists()


def test_install_rejects_a_directory_that_is_not_git(tmp_path, monkeypatch):
    monkeypatch.setenv("TRAJDATA_CACHE", str(tmp_path / "cache"))
    with pytest.raises(ExpertError, match="not a git repository"):
        install.install_autoascend(tmp_path, deps=False)
    assert install.installed_path() is None


@needs_src
@pytest.mark.parametrize("kind", ["as_given", "checkout"])
def test_install_from_git_dir_or_checkout(tmp_path, monkeypatch, kind):
    monkeypatch.setenv("TRAJDATA_CACHE", str(tmp_path / "cache"))
    src = SRC
    if kind == "checkout":
        src = str(tmp_path / "co")
        subprocess.run(["git", "clone", "--quiet", SRC, src], check=True)
    path = install.install_autoascend(src, deps=False, warm=False)
    assert path == install.installed_path() == tmp_path / "cache" / "experts" / "autoascend-8527910"
    assert (path / "autoascend" / "agent.py").is_file() and (path / "LICENSE").is_file()
    assert json.loads((path / install.MARKER).read_text())["commit"] == "8527910"
    stamp = (path / install.MARKER).stat().st_mtime_ns
    assert install.install_autoascend(src, deps=False, warm=False) == path  # idempotent: not re-extracted
    assert (path / install.MARKER).stat().st_mtime_ns == stamp
    r = _run(["experts", "list"], env={"TRAJDATA_CACHE": str(tmp_path / "cache")})
    assert "installed at" in r.output


# ---------------------------------------------------------------------- adapter, end parsing

def test_adapter_old_gym_api_and_quit_game_end():
    from nle.nethack import actions as A

    env = CharacterEnv("val-hum-law-fem")
    obs, info = seed_and_reset(env, 1, 2)
    ad = AutoAscendEnv(env, obs, info)
    assert ad._actions is env.unwrapped.actions
    first = ad.reset()
    assert first["tty_cursor"].dtype == np.int64 and int(first["tty_cursor"][0]) - 1 >= -1
    with ad.debug_tiles([(0, 0)], color=(1, 2, 3)), ad.debug_log("x"):
        o, r, done, info = ad.step(A.Command.QUIT)  # an enum, as the agent sends
    assert not done and isinstance(o, dict)
    o, r, done, info = ad.step(ord("y"))
    assert done and ad.steps == 2
    xlog = parse_xlog_line(xlogfile_path(env).read_text().splitlines()[-1])
    end = game_end(xlog, ad.last_observation["tty_chars"], obs["blstats"])
    assert end["death"] == "quit" and end["end_source"] == "xlogfile" and end["depth"] == 1
    assert topten_entry(ad.last_observation["tty_chars"])["death"] == "quit"
    assert death_cause(end["death"]) == "quit"
    env.close()


def test_topten_screen_wrapped_at_80_columns():
    rows = ["", "You made the top ten list!", "", " " * 27 + "No  Points     Name", " " * 17 + "Hp [max]",
            " " * 27 + "1       3819  Agent-Ran-Elf-Fem-Cha died in The Dunge", "ons of Doom on",
            " " * 40 + "level 1.  Killed by a hill orc, while fr", "ozen by a", " " * 39 + "potion.", " " * 15 + "-  [43]"]
    screen = np.array([list(r.ljust(80).encode()) for r in rows + [""] * (24 - len(rows))], np.uint8)
    e = topten_entry(screen)
    assert e == {"points": 3819, "deathlev": 1, "maxlvl": 1, "death": "killed by a hill orc, while frozen by a potion"}
    xlog = parse_xlog_line("points=3819\tdeathlev=2\tmaxlvl=3\tdeath=killed by a hill orc\twhile=frozen by a potion\tturns=16744")
    end = game_end(xlog, screen, np.zeros(27, np.int64))
    assert (end["score"], end["turns"], end["depth"], end["max_depth"]) == (3819, 16744, 2, 3)
    assert end["death"] == e["death"]
    assert death_cause(end["death"]) == "killed while frozen by potion"  # the "while ..." clause is the cause
    assert killer(end["death"]) == "hill orc"
    assert death_cause("died of starvation") == "starvation"
    assert game_end(None, screen, np.zeros(27, np.int64))["end_source"] == "screen"


# ------------------------------------------------------------------------- with AutoAscend

@pytest.mark.slow
def test_collect_autoascend_verify_replay_stats(autoascend, tmp_path):
    out = tmp_path / "d"
    r = _run(["collect", "autoascend", "--out", str(out), "--shards", "2", "--episodes-per-shard", "1",
              "--workers", "2", "--max-steps", "300", "--quiet"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.output.strip().splitlines()[-1])["steps_written"] == 600
    assert _run(["verify", str(out)]).exit_code == 0
    assert _run(["inspect", str(out)]).exit_code == 0
    rows = Dataset(out).index_rows()
    assert len(rows) == 2 and len({r["character"] for r in rows}) >= 1
    for row in rows:
        assert row["status"] == "truncated" and row["end_reason"] == "max_steps (300)"
        assert set(json.loads(row["seeds"])) >= {"core", "disp"} and row["expert_version"] == "8527910"
        assert row["turns"] > 0 and row["depth"] >= 1
        assert replay_episode(out, row["id"]) == 300  # every recorded observation reproduced exactly
    r = _run(["stats", str(out)])
    assert r.exit_code == 0 and "max_steps 2" in r.output
    assert (out / "stats.png").stat().st_size > 1000


def _on_agent_step(monkeypatch, n: int, effect) -> None:
    """Make AutoAscend's ``Agent.step`` call ``effect()`` on its ``n``-th call."""
    from trajdata.collectors.autoascend import import_autoascend

    agent_lib = import_autoascend()
    real_step, calls = agent_lib.Agent.step, {"n": 0}

    def step(self, *a, **kw):
        calls["n"] += 1
        if calls["n"] == n:
            effect()
        return real_step(self, *a, **kw)

    monkeypatch.setattr(agent_lib.Agent, "step", step)


def test_agent_exception_marks_episode_aborted(autoascend, tmp_path, monkeypatch):
    def bug():
        raise AssertionError("simulated agent bug")

    _on_agent_step(monkeypatch, 50, bug)
    r = _run(["collect", "autoascend", "--out", str(tmp_path / "d"), "--shards", "1", "--episodes-per-shard", "2",
              "--max-steps", "120", "--character", "sam-hum-law-mal", "--quiet"])
    assert r.exit_code == 0, r.output
    rows = sorted(Dataset(tmp_path / "d").index_rows(), key=lambda r: r["id"])
    assert rows[0]["status"] == "aborted" and "simulated agent bug" in rows[0]["end_reason"]
    assert 0 < rows[0]["steps"] < 120 and rows[0]["character"] == "sam-hum-law-mal"
    assert rows[1]["status"] == "truncated" and rows[1]["steps"] == 120
    assert replay_episode(tmp_path / "d", rows[0]["id"]) == rows[0]["steps"]


def test_stalled_agent_is_cut_by_the_watchdog(autoascend, tmp_path, monkeypatch):
    import time

    # the sleep runs inside AutoAscend's own loop, which catches BaseException and re-raises
    _on_agent_step(monkeypatch, 40, lambda: time.sleep(60))
    t = time.monotonic()
    r = _run(["collect", "autoascend", "--out", str(tmp_path / "d"), "--shards", "1", "--episodes-per-shard", "2",
              "--max-steps", "100", "--stall-seconds", "1", "--character", "sam-hum-law-mal", "--quiet"])
    assert r.exit_code == 0, r.output
    assert time.monotonic() - t < 45
    rows = sorted(Dataset(tmp_path / "d").index_rows(), key=lambda r: r["id"])
    assert rows[0]["status"] == "truncated" and rows[0]["end_reason"].startswith("stalled")
    assert 0 < rows[0]["steps"] < 100
    assert rows[1]["status"] == "truncated" and rows[1]["steps"] == 100
