"""Codec and shard round trips on real NLE observations; corruption and truncation errors."""
from __future__ import annotations

import numpy as np
import pytest
import webdataset

from trajdata.errors import DataError
from trajdata.format import codec
from trajdata.format.schema import ATARI, NETHACK
from trajdata.format.shard import ShardReader, ShardWriter


@pytest.fixture(scope="module")
def nle_steps():
    """~700 consecutive real NetHackChallenge steps (mostly moves, some menus) incl. an episode end."""
    from trajdata.envs.nethack import make_nethack_env, seed_and_reset

    env = make_nethack_env("val-hum-law-fem")
    obs, _ = seed_and_reset(env, 1, 2)
    rng = np.random.default_rng(0)
    rows = {f.name: [] for f in NETHACK.fields}
    for _ in range(700):
        for k in NETHACK.observation_names:
            rows[k].append(obs[k].copy())
        a = int(rng.integers(8)) if rng.random() < 0.8 else int(rng.integers(121))
        obs, r, term, trunc, _ = env.step(a)
        rows["action"].append(a)
        rows["reward"].append(r)
        rows["done"].append(term or trunc)
        if term or trunc:
            obs, _ = env.reset()
    env.close()
    return {f.name: np.asarray(rows[f.name], f.np_dtype) for f in NETHACK.fields}


@pytest.mark.parametrize("profile", sorted(codec.PROFILES))
def test_chunk_round_trip_exact_every_field(nle_steps, profile):
    blob = codec.encode_chunk(NETHACK, nle_steps, {"k": 1}, profile=profile)
    header, start = codec.read_header(blob, "t")
    assert header["k"] == 1 and header["steps"] == 700
    out = codec.decode_chunk(NETHACK, header, memoryview(blob)[start:])
    for f in NETHACK.fields:
        assert out[f.name].dtype == f.np_dtype
        np.testing.assert_array_equal(out[f.name], nle_steps[f.name], err_msg=f.name)
    assert len(blob) < 0.01 * NETHACK.step_nbytes * 700


def test_partial_decode_and_field_subset(nle_steps):
    blob = codec.encode_chunk(NETHACK, nle_steps, {})
    header, start = codec.read_header(blob, "t")
    out = codec.decode_chunk(NETHACK, header, memoryview(blob)[start:], ["specials", "message"])
    assert set(out) == {"specials", "message"}
    np.testing.assert_array_equal(out["specials"], nle_steps["specials"])


@pytest.mark.slow
def test_extreme_values_round_trip():
    rng = np.random.default_rng(1)
    arrays = {f.name: rng.integers(0, 256, (50, *f.shape)).astype(f.np_dtype) for f in NETHACK.fields}
    arrays["blstats"] = rng.integers(-2**62, 2**62, (50, 27))
    arrays["glyphs"] = rng.integers(-32768, 32767, (50, 21, 79)).astype(np.int16)
    arrays["reward"] = rng.normal(size=50).astype(np.float32)
    for profile in codec.PROFILES:
        blob = codec.encode_chunk(NETHACK, arrays, {}, profile=profile)
        h, s = codec.read_header(blob, "t")
        out = codec.decode_chunk(NETHACK, h, memoryview(blob)[s:])
        for k in arrays:
            np.testing.assert_array_equal(out[k], arrays[k], err_msg=f"{profile}/{k}")


def _write_shard(path, nle_steps, chunk_steps=128, episodes=(("000000-0000", 300), ("000000-0001", 400))):
    with ShardWriter(path, NETHACK, chunk_steps=chunk_steps) as sw:
        offset = 0
        for eid, n in episodes:
            ew = sw.episode(eid, {"seed": 1})
            for t in range(offset, offset + n):
                ew.append({k: nle_steps[k][t] for k in NETHACK.names if k not in ("reward", "done")})
                ew.set_outcome(nle_steps["reward"][t], nle_steps["done"][t])
            ew.close({"status": "complete"})
            offset += n


def test_shard_streams_chunks_and_rows(tmp_path, nle_steps):
    path = tmp_path / "shard-000000.tar"
    _write_shard(path, nle_steps)
    assert not (tmp_path / "shard-000000.tar.tmp").exists()
    chunks = list(ShardReader(path).chunks())
    assert [(c.episode_id, c.index, c.steps) for c in chunks][:4] == [
        ("000000-0000", 0, 128), ("000000-0000", 1, 128), ("000000-0000", 2, 44), ("000000-0001", 0, 128)]
    joined = {k: np.concatenate([c.fields[k] for c in chunks]) for k in NETHACK.names}
    for k in NETHACK.names:
        np.testing.assert_array_equal(joined[k], nle_steps[k][:700], err_msg=k)
    rows = ShardReader(path).episode_rows()
    assert [(r["id"], r["steps"], r["chunks"], r["seed"]) for r in rows] == [
        ("000000-0000", 300, 3, 1), ("000000-0001", 400, 4, 1)]


def test_plain_webdataset_iterates_shards(tmp_path, nle_steps):
    path = tmp_path / "shard-000000.tar"
    _write_shard(path, nle_steps)
    samples = list(webdataset.WebDataset(str(path), shardshuffle=False))
    assert [s["__key__"] for s in samples][:2] == ["000000-0000-c00000", "000000-0000-c00001"]
    assert len(samples) == 7 and all(s["tdc"][:4] == codec.MAGIC for s in samples)


def test_exception_inside_writer_leaves_no_shard(tmp_path, nle_steps):
    path = tmp_path / "shard-000001.tar"
    with pytest.raises(RuntimeError):
        with ShardWriter(path, NETHACK) as sw:
            ew = sw.episode("000001-0000", {})
            ew.append({k: nle_steps[k][0] for k in NETHACK.names})
            raise RuntimeError("expert crashed")
    assert list(tmp_path.iterdir()) == []


def test_flipped_byte_names_shard_episode_field(tmp_path, nle_steps):
    path = tmp_path / "shard-000000.tar"
    _write_shard(path, nle_steps)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(DataError, match=r"shard shard-000000.tar: (episode 000000-\d{4} chunk \d+: field '\w+'|chunk )"):
        for _ in ShardReader(path).chunks():
            pass


def test_truncated_shard_is_reported(tmp_path, nle_steps):
    path = tmp_path / "shard-000000.tar"
    _write_shard(path, nle_steps)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) * 2 // 3])
    with pytest.raises(DataError, match="shard-000000.tar"):
        for _ in ShardReader(path).chunks():
            pass
    with pytest.raises(DataError, match="shard-000000.tar"):
        ShardReader(path).episode_rows()


def test_atari_schema_round_trip():
    rng = np.random.default_rng(2)
    T = 300
    frames = np.zeros((T, 84, 84), np.uint8)
    frames[:, 10:20, :] = rng.integers(0, 255, (T, 1, 84))
    arrays = {"frame": frames, "lives": np.repeat(np.arange(5, 0, -1), T // 5).astype(np.uint8),
              "action": rng.integers(0, 18, T).astype(np.uint8), "reward": rng.integers(0, 2, T).astype(np.float32),
              "done": np.zeros(T, bool)}
    blob = codec.encode_chunk(ATARI, arrays, {})
    h, s = codec.read_header(blob, "t")
    out = codec.decode_chunk(ATARI, h, memoryview(blob)[s:])
    for k in arrays:
        np.testing.assert_array_equal(out[k], arrays[k])


def test_recode_between_profiles_keeps_every_value_and_resumes(scripted_data, tmp_path):
    from trajdata.format.dataset import Dataset, recode

    src, dst = tmp_path / "compact", tmp_path / "stream"
    steps = sum(r["steps"] for r in Dataset(scripted_data).index_rows())
    assert recode(scripted_data, src, "compact")["steps"] == steps
    assert recode(src, dst, "stream") == {"shards_written": 3, "shards_skipped": 0, "steps": steps}
    a, b = Dataset(src), Dataset(dst)
    assert b.info["collection"]["codec"] == "stream" and a.index_rows() == [dict(r) for r in b.index_rows()]
    for p in a.shard_paths():
        old, new = list(a.shard(p.name).chunks()), list(b.shard(p.name).chunks())
        assert [c.header["fields"]["glyphs"]["data"]["stage"] for c in new] == ["sparse"] * len(old)
        for x, y in zip(old, new):
            assert (x.episode_id, x.index, x.start, x.last) == (y.episode_id, y.index, y.start, y.last)
            for k in x.fields:
                np.testing.assert_array_equal(x.fields[k], y.fields[k], err_msg=k)
    assert recode(src, dst, "stream")["shards_skipped"] == 3


def test_older_shards_with_wall_clock_headers_still_read(tmp_path):
    """Shards of earlier trajdata carry wall_seconds / collection_date in their chunk headers and real
    tar mtimes and owner names (and tarfile's record padding): they still verify, index and load."""
    import io
    import tarfile

    from trajdata.format.dataset import Dataset, build_index, create_or_check
    from trajdata.format.inspect import verify
    from trajdata.loaders.stream import LoaderConfig, TrajectoryStream

    root = tmp_path / "old"
    create_or_check(root, {"schema": "atari", "env": "test", "expert": "test", "collection": {}})
    T = 40
    arrays = {"frame": np.full((T, 84, 84), 7, np.uint8), "lives": np.full(T, 3, np.uint8),
              "action": (np.arange(T) % 5).astype(np.uint8), "reward": np.zeros(T, np.float32),
              "done": np.arange(T) == T - 1}
    row = {"id": "ep0", "steps": T, "chunks": 1, "status": "complete", "wall_seconds": 1.5,
           "collection_date": "2025-01-02"}
    blob = codec.encode_chunk(ATARI, arrays, {"episode_id": "ep0", "chunk": 0, "start": 0, "last": True,
                                              "episode_meta": {"collection_date": "2025-01-02"}, "episode": row})
    with tarfile.open(Dataset(root).shard_dir / "shard-000000.tar", "w") as tar:
        info = tarfile.TarInfo("ep0-c00000.tdc")
        info.size, info.mtime, info.uname = len(blob), 1_700_000_000, "someone"
        tar.addfile(info, io.BytesIO(blob))
    got = build_index(root).to_pylist()
    assert [(r["id"], r["steps"], r["wall_seconds"], r["collection_date"]) for r in got] == [("ep0", T, 1.5, "2025-01-02")]
    assert verify(root)["steps"] == T
    batch = next(TrajectoryStream(LoaderConfig(str(root), batch_size=1, seq_len=T, tune_malloc=False)).numpy_batches(0, 1))
    np.testing.assert_array_equal(batch["action"][0], arrays["action"])
