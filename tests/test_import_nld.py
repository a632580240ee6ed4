"""`trajdata import nld`: NLE-written ttyrecs indexed by nle.dataset -> trajdata shards, frames identical."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import gymnasium as gym
import nle  # noqa: F401  (registers NetHackChallenge-v0)
import nle.dataset as nld
import numpy as np
import pytest
from click.testing import CliRunner
from nle import nethack

from trajdata.cli.main import cli
from trajdata.envs.nethack import seed_and_reset
from trajdata.errors import DataError
from trajdata.format.dataset import Dataset
from trajdata.loaders import LoaderConfig, TrajectoryStream
from trajdata.importers.nld import NO_ACTION, NldImportConfig, import_nld, key_to_action

from trajdata.importers.ttyrec import close_xlog

LENGTHS = (150, 260, 40)


@pytest.fixture(scope="module")
def nld_db(tmp_path_factory):
    """A few short NetHackChallenge games recorded by NLE's ttyrec writer, indexed by nle.dataset."""
    root = tmp_path_factory.mktemp("nld")
    taken = {}
    for g, n in enumerate(LENGTHS):
        d = root / f"game{g}"
        d.mkdir()
        env = gym.make("NetHackChallenge-v0", save_ttyrec_every=1, savedir=str(d), fix_moon_phase=True)
        seed_and_reset(env, 1000 + g, 2000 + g)  # seeded NetHack RNGs: the same games on every run and date
        rng = np.random.default_rng(g)
        acts = []
        for _ in range(n):
            acts.append(int(rng.integers(0, 121)))
            _, _, term, trunc, _ = env.step(acts[-1])
            if term or trunc:
                break
        env.close()
        close_xlog(d, {"score": 0, "depth": 1, "turns": 1})
        taken[g] = acts
    db = str(root / "nld.db")
    nld.db.create(db)
    nld.add_nledata_directory(str(root), "test", filename=db)
    return db, taken


def _reference(db, gameid):
    mbs = nld.TtyrecDataset("test", dbfilename=db, shuffle=False).get_ttyrec(gameid, chunk_size=512)
    ref = {k: np.concatenate([m[k][0] for m in mbs]) for k in mbs[0]}
    keep = ref["gameids"] != 0
    return {k: v[keep] for k, v in ref.items()}


def test_import_matches_nle_dataset(nld_db, tmp_path):
    db, taken = nld_db
    res = import_nld(NldImportConfig(db=db, name="test", out=str(tmp_path / "out"), episodes_per_shard=2,
                                     chunk_steps=64), progress=False)
    assert res["games"] == len(LENGTHS) and res["shards_written"] == 2 and res["ttyrec_version"] == 3
    ds = Dataset(tmp_path / "out")
    rows = sorted(ds.index_rows(), key=lambda r: r["nld_gameid"])
    assert ds.schema.name == "nld" and len(rows) == len(LENGTHS)
    for g, r in enumerate(rows):
        ref = _reference(db, r["nld_gameid"])
        ours = {}
        for c in ds.episode(r["id"]):
            for k, v in c.fields.items():
                ours.setdefault(k, []).append(v)
        ours = {k: np.concatenate(v) for k, v in ours.items()}
        # NLE's reset may press space past an opening --More--: those frames precede the agent's actions
        pre = r["steps"] - len(taken[g])
        assert r["steps"] == len(ref["tty_chars"]) and 0 <= pre <= 2
        assert ours["keypress"][:pre].tolist() == [32] * pre
        for a, b in [("tty_chars", "tty_chars"), ("tty_colors", "tty_colors"), ("tty_cursor", "tty_cursor"),
                     ("timestamps", "timestamp"), ("keypresses", "keypress"), ("scores", "score")]:
            assert np.array_equal(ref[a], ours[b]), (g, a)
        keys = [int(nethack.ACTIONS[a]) for a in taken[g]]  # some actions share a key: compare keys
        assert [int(nethack.ACTIONS[a]) for a in ours["action"][pre:]] == keys == ours["keypress"][pre:].tolist()
        assert ours["done"].tolist() == [False] * (r["steps"] - 1) + [True]
        assert np.array_equal(ours["reward"][:-1], np.diff(ours["score"]).astype(np.float32))

    stream = TrajectoryStream(LoaderConfig(str(tmp_path / "out"), fields=("tty_chars", "action"), batch_size=2,
                                           seq_len=128))
    assert sum(int(b["mask"].sum()) for b in stream) == sum(r["steps"] for r in rows)


def test_key_table_and_resume(nld_db, tmp_path):
    lut = key_to_action()
    assert all(nethack.ACTIONS[lut[int(a)]] == int(a) for a in nethack.ACTIONS)
    assert (lut == NO_ACTION).sum() == 256 - len({int(a) for a in nethack.ACTIONS})
    db, _ = nld_db
    out = tmp_path / "out"
    cfg = NldImportConfig(db=db, name="test", out=str(out), episodes_per_shard=1, max_games=2)
    assert import_nld(cfg, progress=False)["shards_written"] == 2
    again = import_nld(cfg, progress=False)
    assert again["shards_written"] == 0 and again["shards_skipped"] == 2
    with pytest.raises(DataError, match="no dataset 'nope'"):
        import_nld(NldImportConfig(db=db, name="nope", out=str(tmp_path / "x")), progress=False)


def test_cli_import_nld(nld_db, tmp_path):
    db, _ = nld_db
    runner = CliRunner()
    r = runner.invoke(cli, ["import", "nld", "--db", db, "--name", "test", "--out", str(tmp_path / "o"), "--quiet"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.output.strip().splitlines()[-1])["games"] == len(LENGTHS)
    r = runner.invoke(cli, ["import", "nld", "--db", str(tmp_path / "missing.db"), "--name", "test",
                            "--out", str(tmp_path / "o2")])
    assert r.exit_code == 1 and "trajdata: error:" in r.output and "missing.db" in r.output
    assert "NLD" in runner.invoke(cli, ["import", "nld", "--help"]).output
