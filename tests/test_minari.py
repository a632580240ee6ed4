"""`trajdata export minari`: minari itself (``minari.load_dataset``) opens the export, and every episode
equals the trajdata one step for step (NetHack and Atari, real games): observations (plus the final
one, re-simulated or repeated), actions, rewards, terminations and truncations, spaces, metadata."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

minari = pytest.importorskip("minari", reason="needs the minari extra")

from trajdata.format.dataset import Dataset  # noqa: E402

TRAJDATA = [sys.executable, "-m", "trajdata.cli"]


@pytest.fixture
def minari_root(tmp_path, monkeypatch):
    root = tmp_path / "minari"
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(root))
    return root


def export(*args, **env):
    import os

    return subprocess.run([*TRAJDATA, "export", "minari", *map(str, args), "--quiet"], capture_output=True, text=True,
                          env=dict(os.environ, **env))


def check_equal(root, name: str, final_obs: str):
    ds = Dataset(root)
    data = minari.load_dataset(name)
    rows = sorted(ds.index_rows(), key=lambda r: r["id"])
    assert data.total_episodes == len(rows) and data.total_steps == sum(r["steps"] for r in rows)
    assert set(data.observation_space.spaces) == set(ds.schema.observation_names)
    for n in ds.schema.observation_names:
        space = data.observation_space[n]
        assert space.shape == ds.schema[n].shape and space.dtype == ds.schema[n].np_dtype
    meta = list(data.storage.get_episode_metadata(range(len(rows))))
    finals = []
    for row, ep, m in zip(rows, data.iterate_episodes(), meta):
        assert m["trajdata_id"] == row["id"] and m["trajdata_status"] == row["status"]
        chunks = list(ds.episode(row["id"]))
        rec = {k: np.concatenate([c.fields[k] for c in chunks]) for k in ds.schema.names}
        T = row["steps"]
        assert len(ep.actions) == T
        for n in ds.schema.observation_names:
            assert ep.observations[n].dtype == rec[n].dtype
            np.testing.assert_array_equal(ep.observations[n][:T], rec[n], err_msg=n)
        np.testing.assert_array_equal(ep.actions, rec["action"])
        np.testing.assert_array_equal(ep.rewards, rec["reward"])
        assert not ep.terminations[:-1].any() and not ep.truncations[:-1].any()
        assert ep.terminations[-1] != ep.truncations[-1]
        assert bool(ep.terminations[-1]) == (row["status"] == "complete" and bool(rec["done"][-1]))
        final = {n: ep.observations[n][T] for n in ds.schema.observation_names}
        same_as_last = all(np.array_equal(final[n], rec[n][-1]) for n in final)
        finals.append(same_as_last)
    if final_obs == "repeat":
        assert all(finals)
    else:
        assert not all(finals)  # the re-simulated final observations are new screens
    return data


def test_nethack_export_round_trips_through_minari(scripted_data, minari_root):
    p = export(scripted_data, "--name", "trajdata/scripted-v0")
    assert p.returncode == 0, p.stderr
    r = json.loads(p.stdout)
    assert r["episodes"] == 6 and r["final_obs"] == "replay"
    data = check_equal(scripted_data, "trajdata/scripted-v0", "replay")
    assert data.action_space.n == 121 and "trajdata" in data.storage.metadata["description"]
    assert data.storage.metadata["jpeg_encoding"] is False  # inv_strs (55 x 80 uint8) would count as an image
    line = export(scripted_data, "--name", "trajdata/scripted-v0").stderr.strip()
    assert line.startswith("trajdata: error:") and "already exists" in line and len(line.splitlines()) == 1
    p = export(scripted_data, "--name", "no version")
    assert p.returncode == 1 and "not a Minari dataset id" in p.stderr and len(p.stderr.strip().splitlines()) == 1


def test_atari_export_round_trips_through_minari(atari_data, minari_root, monkeypatch):
    from trajdata.exporters.minari import export_minari

    r = export_minari(atari_data, "atari-v0", final_obs="replay", progress=False)
    assert r["episodes"] == 2
    data = check_equal(atari_data, "atari-v0", "replay")
    assert data.action_space.n == 4  # Breakout
    r = export_minari(atari_data, "atari-repeat-v0", final_obs="repeat", minari_root=minari_root / "other",
                      progress=False)
    assert r["path"].startswith(str(minari_root / "other"))
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(minari_root / "other"))
    check_equal(atari_data, "atari-repeat-v0", "repeat")
