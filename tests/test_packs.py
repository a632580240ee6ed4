"""Packs on real NLE and ALE games: `pack` keeps what replays each episode, `unpack` re-simulates a
dataset that decodes to exactly the source's (per-episode digests, index, shards byte for byte), the
loader streams a pack into the batches the unpacked dataset gives, and bad input is one line: a
replay that diverges (a corrupt action, another nle version), a corrupt pack, NLD data (no seeds),
a recording that does not replay."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from trajdata.errors import DataError
from trajdata.format.dataset import Dataset, build_index, create_or_check
from trajdata.format.schema import NLD
from trajdata.format.shard import ShardReader, ShardWriter
from trajdata.loaders import LoaderConfig, make_dataloader
from trajdata.packs import store
from trajdata.packs.build import PackConfig, UnpackConfig, pack, unpack

TRAJDATA = [sys.executable, "-m", "trajdata.cli"]


def cli(*args, env=None):
    return subprocess.run([*TRAJDATA, *map(str, args)], capture_output=True, text=True,
                          env=None if env is None else dict(os.environ, **env))


def one_line_error(p, *needles):
    lines = p.stderr.strip().splitlines()
    assert p.returncode == 1 and len(lines) == 1 and lines[0].startswith("trajdata: error:"), p.stderr
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]


def digests(root) -> dict:
    """episode -> field -> sha256 of the decoded episode array (as tests/test_golden computes them)."""
    ds = Dataset(root)
    out = {}
    for row in ds.index_rows():
        chunks = list(ds.episode(row["id"]))
        out[row["id"]] = {f: hashlib.sha256(np.ascontiguousarray(np.concatenate([c.fields[f] for c in chunks]))
                                            .tobytes()).hexdigest() for f in ds.schema.names}
    return out


def assert_same_dataset(a, b):
    da, db = Dataset(a), Dataset(b)
    assert digests(a) == digests(b)
    assert da.index_rows() == db.index_rows()
    assert da.info == db.info
    for p in da.shard_paths():
        assert p.read_bytes() == (db.shard_dir / p.name).read_bytes(), p.name


def batches(root, workers=0, **kw):
    loader = make_dataloader(LoaderConfig(str(root), **kw), num_workers=workers)
    return [{k: v.numpy().copy() for k, v in b.items()} for b in loader]


def assert_same_batches(a, b):
    assert len(a) == len(b) and len(a) > 0
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for k in x:
            np.testing.assert_array_equal(x[k], y[k], err_msg=k)


@pytest.fixture(scope="module")
def scripted_pack(scripted_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("packs") / "scripted.pack"
    p = cli("pack", scripted_data, "--out", out, "--quiet")
    assert p.returncode == 0, p.stderr
    return out, json.loads(p.stdout)


def test_scripted_pack_unpacks_to_the_same_dataset(scripted_data, scripted_pack, tmp_path):
    pk, summary = scripted_pack
    steps = sum(r["steps"] for r in Dataset(scripted_data).index_rows())
    assert summary["steps"] == steps and summary["verified"] and summary["episodes"] == 6
    assert summary["bytes_per_step"] < summary["source_bytes_per_step"] / 5
    d2 = tmp_path / "d2"
    p = cli("unpack", pk, "--out", d2, "--workers", "2", "--quiet")
    assert p.returncode == 0, p.stderr
    r = json.loads(p.stdout)
    assert r["steps_written"] == steps and r["shards_byte_identical"] == "3/3"
    assert_same_dataset(scripted_data, d2)
    again = json.loads(cli("unpack", pk, "--out", d2, "--quiet").stdout)
    assert again["shards_skipped"] == 3 and again["shards_written"] == 0
    assert json.loads(cli("pack", scripted_data, "--out", pk, "--quiet").stdout)["shards_skipped"] == 3
    print(f"\nscripted pack: {summary['bytes_per_step']} B/step (source {summary['source_bytes_per_step']})")


def test_loader_streams_a_pack_as_its_unpacked_dataset(scripted_data, scripted_pack):
    pk, _ = scripted_pack
    for kw in (dict(batch_size=3, seq_len=100, mode="lanes"), dict(batch_size=2, seq_len=64, mode="windows", seed=3),
               dict(batch_size=2, seq_len=70, fields=("tty_chars", "action"), split="train", val_fraction=0.3)):
        assert_same_batches(batches(scripted_data, **kw), batches(pk, **kw))
    kw = dict(batch_size=2, seq_len=90)
    assert_same_batches(batches(scripted_data, workers=2, **kw), batches(pk, workers=2, **kw))
    # resuming mid-epoch from a state saved while streaming the pack
    loader = make_dataloader(LoaderConfig(str(pk), **kw))
    it = iter(loader)
    next(it)
    state = loader.state_dict()
    rest = make_dataloader(LoaderConfig(str(pk), **kw))
    rest.load_state_dict(state)
    assert_same_batches(batches(scripted_data, **kw)[1:], [{k: v.numpy() for k, v in b.items()} for b in rest])


def test_unpack_on_ray(scripted_data, scripted_pack, tmp_path):
    pytest.importorskip("ray", reason="ray is not installed (pip install 'trajdata[ray]')")
    pk, _ = scripted_pack
    r = unpack(UnpackConfig(str(pk), str(tmp_path / "d2"), workers=2, backend="ray"), progress=False)
    assert r["shards_written"] == 3
    assert_same_dataset(scripted_data, tmp_path / "d2")


def test_atari_pack_unpacks_and_streams(atari_data, tmp_path):
    pk, d2 = tmp_path / "p", tmp_path / "d2"
    s = pack(PackConfig(str(atari_data), str(pk)), progress=False)
    r = unpack(UnpackConfig(str(pk), str(d2)), progress=False)
    assert s["steps"] == r["steps_written"] == sum(x["steps"] for x in Dataset(atari_data).index_rows())
    assert s["bytes_per_step"] < s["source_bytes_per_step"] / 4  # two short games: pack.json and headers weigh most
    assert_same_dataset(atari_data, d2)
    kw = dict(batch_size=2, seq_len=64, frame_stack=4)
    assert_same_batches(batches(atari_data, **kw), batches(pk, **kw))
    print(f"\natari pack: {s['bytes_per_step']} B/step (source {s['source_bytes_per_step']})")


def test_eval_recorded_episodes_pack(tmp_path):
    pytest.importorskip("torch")
    rec = tmp_path / "rec"
    p = cli("eval", "--expert", "scripted", "--env", "nethack", "--episodes", "2", "--max-steps", "150", "--envs", "1",
            "--record", rec, "--record-chunk-steps", "64", "--out", tmp_path / "eval")
    assert p.returncode == 0, p.stderr
    pack(PackConfig(str(rec), str(tmp_path / "p")), progress=False)
    unpack(UnpackConfig(str(tmp_path / "p"), str(tmp_path / "d2")), progress=False)
    assert_same_dataset(rec, tmp_path / "d2")


def _rewrite(pk: Path, shard: str, change) -> None:
    header, eps = store.Pack(pk).read_shard(shard)
    change(eps)
    (pk / "shards" / store.pack_shard_name(shard)).write_bytes(store.encode_pack_shard(header["source"],
                                                                                      header["chunk_steps"], eps))


def test_a_diverging_replay_is_one_line_naming_episode_and_step(scripted_pack, tmp_path):
    src, _ = scripted_pack
    pk = Path(shutil.copytree(src, tmp_path / "p"))
    t = 123

    def corrupt(eps):
        eps[1].actions = eps[1].actions.copy()
        eps[1].actions[t] = (int(eps[1].actions[t]) + 7) % 121

    _rewrite(pk, "shard-000001.tar", corrupt)
    eid = store.Pack(pk).read_shard("shard-000001.tar")[1][1].id
    d2 = tmp_path / "d2"
    line = one_line_error(cli("unpack", pk, "--out", d2, "--quiet"), f"episode {eid}", "diverges")
    step = int(line.split(" at step ")[1].split()[0].rstrip(";"))
    assert t <= step <= t + 3, line  # the step of the corrupt action (a 2-bit check misses 1 step in 4)
    # nothing already written is lost: shard 0 was finished and is indexed; shard 1 left no partial file
    assert sorted(p.name for p in (d2 / "shards").iterdir()) == ["shard-000000.tar"]
    assert {r["shard"] for r in Dataset(d2).index_rows()} == {"shard-000000.tar"}
    # the loader streaming the pack stops there too (or, with on_corrupt="skip", pads the episode)
    with pytest.raises(DataError, match=f"episode {eid}: replay diverges"):
        batches(pk, batch_size=2, seq_len=100)
    with pytest.warns(UserWarning, match=f"skipping corrupt episode {eid}"):
        got = batches(pk, batch_size=2, seq_len=100, on_corrupt="skip")
    assert sum(int(b["mask"].sum()) for b in got) < 2400


def test_another_nle_version_is_named(scripted_pack, tmp_path):
    src, _ = scripted_pack
    pk = Path(shutil.copytree(src, tmp_path / "p"))
    info = json.loads((pk / "pack.json").read_text())
    info["versions"]["nle"] = "0.9.0"
    (pk / "pack.json").write_text(json.dumps(info))
    p = cli("unpack", pk, "--out", tmp_path / "ok", "--quiet")  # the games still replay: a warning, not an error
    assert p.returncode == 0 and "warning: the pack was made with nle 0.9.0 (here 1.3.0)" in p.stderr, p.stderr

    def corrupt(eps):
        eps[0].actions = eps[0].actions.copy()
        eps[0].actions[50] = (int(eps[0].actions[50]) + 1) % 121

    _rewrite(pk, "shard-000000.tar", corrupt)
    p = cli("unpack", pk, "--out", tmp_path / "bad", "--quiet")
    assert p.returncode == 1 and "diverges" in p.stderr and "the pack was made with nle 0.9.0 (here 1.3.0)" in \
        p.stderr.splitlines()[-1]


def test_a_corrupt_pack_is_one_line(scripted_data, scripted_pack, tmp_path):
    src, _ = scripted_pack
    pk = Path(shutil.copytree(src, tmp_path / "p"))
    f = pk / "shards" / "shard-000002.tdp"
    b = bytearray(f.read_bytes())
    b[-150] ^= 0xFF  # inside the check bits
    f.write_bytes(bytes(b))
    one_line_error(cli("unpack", pk, "--out", tmp_path / "d2", "--quiet"), "shard-000002.tdp", "corrupt pack")
    one_line_error(cli("unpack", tmp_path / "nope", "--out", tmp_path / "d3"), "does not exist")
    one_line_error(cli("unpack", scripted_data, "--out", tmp_path / "d3"), "not a trajdata pack")
    assert not (tmp_path / "d2").exists()


def test_nld_data_is_refused(tmp_path):
    """An NLD-schema dataset (what `import nld` writes: tty frames and keypresses, no seeds)."""
    root = tmp_path / "nld"
    create_or_check(root, {"schema": "nld", "env": "nld:test", "expert": {"name": "nld"}, "collection": {}})
    with ShardWriter(Dataset(root).shard_dir / "shard-000000.tar", NLD, chunk_steps=8) as sw:
        ew = sw.episode("000000-0000", {"gameid": 1})
        for t in range(5):
            ew.append({f.name: np.zeros(f.shape, f.np_dtype) for f in NLD.fields})
        ew.close({"status": "complete"})
    build_index(root)
    one_line_error(cli("pack", root, "--out", tmp_path / "p"), "imported NLD ttyrecs", "no seeds")
    assert not (tmp_path / "p").exists()


def test_a_recording_that_does_not_replay_is_not_packed(scripted_data, tmp_path):
    d = Path(shutil.copytree(scripted_data, tmp_path / "d"))
    path = d / "shards" / "shard-000000.tar"
    chunks = list(ShardReader(path).chunks())
    schema = Dataset(d).schema
    with ShardWriter(path, schema, chunk_steps=128) as sw:  # the same episodes, one screen cell altered
        for c in chunks:
            if c.index == 0:
                ew = sw.episode(c.episode_id, c.header["episode_meta"])
            fields = {k: v.copy() for k, v in c.fields.items()}
            if c.episode_id.endswith("0001") and c.index == 1:
                fields["tty_chars"][5, 3, 7] ^= 1
            ew.extend(fields)
            if c.last:
                ew.close({k: v for k, v in c.header["episode"].items() if k not in ("id", "steps", "chunks")})
    line = one_line_error(cli("pack", d, "--out", tmp_path / "p"), "episode 000000-0001",
                          "diverges from the recording at step 133 (tty_chars differs)")
    assert "nle" in line
    assert not list((tmp_path / "p" / "shards").glob("*.tdp"))


@pytest.mark.slow
def test_autoascend_pack(tmp_path):
    """Skips without AutoAscend (CI has no GitHub access): see tests/test_autoascend.py."""
    from trajdata.collectors import install

    if install.installed_path() is None:
        pytest.skip("AutoAscend not installed (`trajdata experts install autoascend`)")
    if install.missing_requirements():
        pytest.skip(f"AutoAscend's runtime packages are missing: {', '.join(install.missing_requirements())}")
    d = tmp_path / "aa"
    p = cli("collect", "autoascend", "--out", d, "--shards", "2", "--max-steps", "1500", "--chunk-steps", "512",
            "--quiet")
    assert p.returncode == 0, p.stderr
    s = pack(PackConfig(str(d), str(tmp_path / "p")), progress=False)
    unpack(UnpackConfig(str(tmp_path / "p"), str(tmp_path / "d2")), progress=False)
    assert_same_dataset(d, tmp_path / "d2")
    assert s["bytes_per_step"] < 2  # short games: the per-episode header weighs more than in full ones
    print(f"\nautoascend pack: {s['bytes_per_step']} B/step (source {s['source_bytes_per_step']})")
