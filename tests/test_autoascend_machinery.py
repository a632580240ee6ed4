"""Collection machinery AutoAscend relies on, exercised with the built-in scripted expert (needs only nle):
stall watchdog, abort marking, resume, Ray backend (same output as local processes)."""
from __future__ import annotations

import json
import time

import numpy as np
import pytest

from trajdata.collectors.nethack import ScriptedExpert
from trajdata.collectors.runner import CollectConfig, ExpertSpec, collect
from trajdata.format.dataset import Dataset
from trajdata.format.inspect import diff_datasets

class StallingExpert(ScriptedExpert):
    """Hangs (a long sleep) at step `at` of every other episode it plays (the 1st, 3rd, ...)."""

    def __init__(self, at: int = 20, **kw):
        super().__init__(**kw)
        self.at, self.n, self.episode = at, 0, -1

    def begin(self, obs, seed):
        super().begin(obs, seed)
        self.n, self.episode = 0, self.episode + 1

    def act(self, obs):
        self.n += 1
        if self.episode % 2 == 0 and self.n > self.at:
            time.sleep(30)
        return super().act(obs)


class RaisingExpert(StallingExpert):
    """Raises at step `at` of every other episode it plays (an agent bug)."""

    def act(self, obs):
        if self.episode % 2 == 0 and self.n >= self.at:
            raise RuntimeError("agent bug")
        return super().act(obs)


def _collect(out, target="trajdata.collectors.nethack:ScriptedExpert", kwargs=None, **kw):
    cfg = CollectConfig(out=str(out), expert=ExpertSpec(target, kwargs or {}), **kw)
    return collect(cfg, progress=False)


def test_stall_watchdog_truncates_and_collection_goes_on(tmp_path):
    t = time.monotonic()
    res = _collect(tmp_path / "d", "test_autoascend_machinery:StallingExpert", {"at": 20},
                   shards=1, episodes_per_shard=2, max_steps=60, stall_seconds=1.0)
    assert time.monotonic() - t < 25  # the 30 s sleep was cut short
    rows = sorted(Dataset(tmp_path / "d").index_rows(), key=lambda r: r["id"])
    assert res["episodes_total"] == 2
    assert rows[0]["status"] == "truncated" and rows[0]["end_reason"].startswith("stalled")
    assert rows[0]["steps"] == 20  # the steps before the stall are kept
    assert rows[1]["status"] == "truncated" and rows[1]["end_reason"] == "max_steps (60)"
    assert rows[1]["steps"] == 60


def test_agent_exception_aborts_episode_and_keeps_steps(tmp_path):
    _collect(tmp_path / "d", "test_autoascend_machinery:RaisingExpert", {"at": 30},
             shards=2, episodes_per_shard=2, max_steps=50)
    rows = sorted(Dataset(tmp_path / "d").index_rows(), key=lambda r: r["id"])
    assert [r["status"] for r in rows] == ["aborted", "truncated", "aborted", "truncated"]
    assert rows[0]["end_reason"] == "RuntimeError: agent bug"
    assert rows[0]["steps"] == 30 and rows[1]["steps"] == 50
    ds = Dataset(tmp_path / "d")
    chunk = next(ds.episode(rows[0]["id"]))
    assert chunk.steps == 30 and not chunk.fields["done"].any()


def test_resume_redoes_only_missing_shards_with_identical_data(tmp_path):
    full, part = tmp_path / "full", tmp_path / "part"
    _collect(full, shards=3, max_steps=80)
    _collect(part, shards=3, max_steps=80)
    (part / "shards" / "shard-000001.tar").unlink()
    res = _collect(part, shards=3, max_steps=80)
    assert res["shards_written"] == 1 and res["shards_skipped"] == 2
    assert diff_datasets(full, part) is None


@pytest.mark.slow
def test_ray_backend_matches_local(tmp_path):
    pytest.importorskip("ray", reason="ray is not installed (pip install 'trajdata[ray]')")
    local, ray_out = tmp_path / "local", tmp_path / "ray"
    _collect(local, shards=3, max_steps=80, workers=1)
    res = _collect(ray_out, shards=3, max_steps=80, workers=2, backend="ray")
    assert res["shards_written"] == 3 and res["steps_written"] == 240
    assert diff_datasets(local, ray_out) is None
    assert json.loads((ray_out / "dataset.json").read_text())["expert"]["name"] == "scripted"
