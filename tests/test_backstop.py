"""Collection survives workers that die (SIGKILL) or hang inside "C" (SIGALRM blocked): real NLE, scripted expert.

`DoomedExpert` picks its victims by episode seed: the test passes the seeds of shard 1's episodes
(`episode_seed(seed, 1, e)`), so exactly shard 1 misbehaves, on every attempt, whichever worker runs it.
With `marker`, it misbehaves only while that file does not exist and creates it first: a transient death.
"""
from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from trajdata.cli.collect import collect_options, run_collect
from trajdata.cli.main import COMMANDS, cli
from trajdata.collectors.nethack import ScriptedExpert
from trajdata.collectors.runner import WORKER_DIED, CollectConfig, ExpertSpec, collect, episode_seed, failure_message
from trajdata.errors import ConfigError, ExpertError
from trajdata.format.dataset import Dataset
from trajdata.format.inspect import diff_datasets, verify


DOOMED = "test_backstop:DoomedExpert"
SHARDS = ["shard-000000.tar", "shard-000001.tar", "shard-000002.tar"]


class DoomedExpert(ScriptedExpert):
    """At action `at` of an episode whose seed is in `seeds`: SIGKILL itself (`how="kill"`), or block
    SIGALRM and sleep 600 s (`how="hang"`, a hang the stall watchdog cannot interrupt)."""

    def __init__(self, seeds=(), at: int = 20, how: str = "kill", marker: str | None = None, **kw):
        super().__init__(**kw)
        self.seeds, self.at, self.how, self.marker = set(seeds), at, how, marker

    def begin(self, obs, seed):
        super().begin(obs, seed)
        self.n = 0
        self.doomed = seed in self.seeds and not (self.marker and Path(self.marker).exists())

    def act(self, obs):
        self.n += 1
        if self.doomed and self.n == self.at:
            if self.marker:
                Path(self.marker).touch()
            if self.how == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGALRM})
            time.sleep(600)
        return super().act(obs)


def shard_seeds(shard: int, episodes: int = 1, seed: int = 0) -> list[int]:
    return [episode_seed(seed, shard, e) for e in range(episodes)]


def _cfg(out, kwargs=None, **kw):
    kw = {"shards": 3, "workers": 2, "max_steps": 60, **kw}
    return CollectConfig(out=str(out), expert=ExpertSpec(DOOMED, kwargs or {}), **kw)


def _shards(out):
    return sorted(p.name for p in (Path(out) / "shards").glob("*.tar"))


@click.command("doomed")
@collect_options(max_steps=60)
@click.option("--doomed-shard", type=int, multiple=True)
def collect_doomed(doomed_shard, quiet, **opts):
    """The scripted expert, SIGKILLing its worker in the given shards."""
    seeds = [s for shard in doomed_shard for s in shard_seeds(shard, opts["episodes_per_shard"], opts["seed"])]
    run_collect(DOOMED, {"seeds": seeds}, quiet=quiet, **opts)


@pytest.fixture
def doomed_cli(monkeypatch):
    monkeypatch.setitem(COMMANDS["collect"][1], "doomed", ("test_backstop:collect_doomed", "doomed expert", ()))
    yield cli


def test_dying_shard_fails_alone_one_line_exit_1(tmp_path, doomed_cli):
    out = tmp_path / "d"
    res = CliRunner().invoke(doomed_cli, ["collect", "doomed", "--out", str(out), "--shards", "3", "--workers", "2",
                                          "--doomed-shard", "1", "--max-shard-retries", "1", "--quiet"])
    assert res.exit_code == 1, res.output
    assert "Traceback" not in res.output
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert lines == ["trajdata: error: shard 1 failed: worker died 2 times (crash, out of memory or hang); "
                     "finished shards are kept, rerun to retry them"]
    assert _shards(out) == [SHARDS[0], SHARDS[2]]
    v = CliRunner().invoke(cli, ["verify", str(out)])
    assert v.exit_code == 0, v.output
    assert [r["id"] for r in Dataset(out).index_rows()] == ["000000-0000", "000002-0000"]
    assert verify(out)["steps"] == 120
    res = CliRunner().invoke(doomed_cli, ["collect", "doomed", "--out", str(out), "--shards", "3", "--workers", "2", "--quiet"])
    assert res.exit_code == 0, res.output
    assert '"shards_written": 1, "shards_skipped": 2' in res.output
    assert verify(out)["steps"] == 180


def test_transient_death_is_retried_and_data_is_identical(tmp_path):
    marker = tmp_path / "died-once"
    res = collect(_cfg(tmp_path / "d", {"seeds": shard_seeds(1), "marker": str(marker)}), progress=False)
    assert marker.exists()  # the worker did die once
    assert res["shards_written"] == 3 and res["steps_written"] == 180
    collect(_cfg(tmp_path / "clean", workers=1), progress=False)
    assert diff_datasets(tmp_path / "clean", tmp_path / "d") is None


@pytest.mark.slow
def test_hang_in_c_is_killed_by_hard_watchdog(tmp_path, capfd):
    t0 = time.monotonic()
    cfg = _cfg(tmp_path / "d", {"seeds": shard_seeds(1), "how": "hang"}, stall_seconds=1.0,
               hard_stall_seconds=3.0, max_shard_retries=1)
    with pytest.raises(ExpertError, match=r"^shard 1 failed: worker died 2 times"):
        collect(cfg, progress=False)
    assert time.monotonic() - t0 < 60
    assert _shards(tmp_path / "d") == [SHARDS[0], SHARDS[2]]
    assert verify(tmp_path / "d")["episodes"] == 2
    err = capfd.readouterr().err
    assert "Timeout (0:00:03)!" in err and "in act" in err  # faulthandler dumped the hung stack


def test_failure_message_is_one_line_naming_the_shards():
    msg = failure_message({7: WORKER_DIED.format(n=3), 3: WORKER_DIED.format(n=3)})
    assert msg == ("shards 3, 7 failed: worker died 3 times (crash, out of memory or hang); "
                   "finished shards are kept, rerun to retry them")


def test_hard_watchdog_config_checks():
    assert _cfg("x", stall_seconds=60.0).hard_seconds() == 120.0
    assert _cfg("x", stall_seconds=5.0).hard_seconds() == 35.0
    assert _cfg("x", stall_seconds=None).hard_seconds() == 0.0
    assert _cfg("x", hard_stall_seconds=0).hard_seconds() == 0.0
    with pytest.raises(ConfigError, match="^hard_stall_seconds ") as e:
        _cfg("x", stall_seconds=10.0, hard_stall_seconds=15.0)
    assert e.value.field == "hard_stall_seconds"
    with pytest.raises(ConfigError, match="^max_shard_retries must be at least 0") as e:
        _cfg("x", max_shard_retries=-1)
    assert e.value.field == "max_shard_retries"


@pytest.mark.slow
def test_ray_dying_shard_does_not_take_down_the_others(tmp_path, monkeypatch):
    pytest.importorskip("ray", reason="ray is not installed (pip install 'trajdata[ray]')")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")]))
    cfg = _cfg(tmp_path / "d", {"seeds": shard_seeds(1)}, backend="ray", max_shard_retries=1)
    with pytest.raises(ExpertError, match=r"^shard 1 failed: worker died 2 times"):
        collect(cfg, progress=False)
    assert _shards(tmp_path / "d") == [SHARDS[0], SHARDS[2]]
    assert verify(tmp_path / "d")["steps"] == 120
