"""Streaming loader: exactly-once delivery across ranks x workers, lanes, windows, resume, split, filters, stacking."""
from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from trajdata.errors import ConfigError
from trajdata.format.codec import PROFILES
from trajdata.format.dataset import Dataset, build_index, create_or_check, recode
from trajdata.format.schema import ATARI
from trajdata.format.shard import ShardWriter
from trajdata.loaders import LoaderConfig, TrajectoryStream, make_dataloader, select_episodes, val_hash
from trajdata.loaders.stream import lane_plan

ATARI_LENGTHS = [37, 300, 5, 129, 64, 1, 200, 90, 17]


@pytest.fixture(scope="module")
def nethack(scripted_data):
    """Real scripted NetHack games, stored in short chunks so episodes span several."""
    return str(scripted_data)


@pytest.fixture(scope="module")
def reference(nethack):
    """(episode id, step) -> (action, tty_chars row sum) straight from the shards."""
    ds = Dataset(nethack)
    ref = {}
    for p in ds.shard_paths():
        for c in ds.shard(p.name).chunks(["action", "tty_chars"]):
            for t in range(c.steps):
                ref[(c.episode_id, c.start + t)] = (int(c.fields["action"][t]), int(c.fields["tty_chars"][t].sum()))
    return ref


def _lives(t):
    return max(1, 3 - t // 40)  # a life lost at steps 40 and 80


def _life_start(t):
    return min(t // 40, 2) * 40


@pytest.fixture(scope="module")
def atari(tmp_path_factory):
    """Atari-schema dataset of varied lengths; frame pixels encode (episode, step) for checks."""
    root = tmp_path_factory.mktemp("at") / "ds"
    create_or_check(root, {"schema": "atari", "env": "test", "expert": "test", "collection": {}})
    for s in range(3):
        with ShardWriter(Dataset(root).shard_dir / f"shard-{s:06d}.tar", ATARI, chunk_steps=64) as sw:
            for e, n in enumerate(ATARI_LENGTHS[s::3]):
                ep = s * 3 + e
                w = sw.episode(f"ep{ep:03d}", {"character": "odd" if ep % 2 else "even"})
                for t in range(n):
                    frame = np.zeros((84, 84), np.uint8)
                    frame[0, 0], frame[0, 1], frame[0, 2] = ep, t % 256, t // 256
                    w.append({"frame": frame, "lives": _lives(t), "action": t % 7})
                    w.set_outcome(1.0, t == n - 1)
                sw.add_episode_row(w.close({"status": "complete", "score": float(n)}))
    build_index(root)
    return str(root)


def _steps(batch):
    m = batch["mask"].numpy()
    return list(zip(batch["episode"].numpy()[m].tolist(), batch["step"].numpy()[m].tolist())), m


def _ids(stream):
    return stream.episode_ids


@pytest.mark.parametrize("mode", ["lanes", "windows"])
def test_every_step_once_across_2_ranks_x_2_workers(nethack, reference, mode):
    seen, batches = [], []
    for rank in range(2):
        cfg = LoaderConfig(nethack, fields=("action", "tty_chars"), batch_size=2, seq_len=150, mode=mode,
                           rank=rank, world_size=2, seed=3, shuffle_buffer=4)
        loader = make_dataloader(cfg, num_workers=2)
        batches.append(0)
        for b in loader:
            batches[-1] += 1
            steps, m = _steps(b)
            actions = b["action"].numpy()[m]
            sums = b["tty_chars"].numpy()[m].reshape(len(steps), -1).sum(1) if steps else []
            for (e, t), a, s in zip(steps, actions, sums):
                key = (loader.dataset.episode_ids[e], t)
                assert reference[key] == (int(a), int(s)), key
                seen.append(key)
            assert (b["tty_chars"].numpy()[~m] == 0).all()
    assert len(seen) == len(set(seen)) == len(reference)
    assert batches[0] == batches[1] > 0  # even batches per rank: DDP never waits on a finished rank
    assert loader.dataset.epoch == 1  # a completed pass advances the epoch


def test_epochs_reshuffle_and_deliver_everything(atari):
    s = TrajectoryStream(LoaderConfig(atari, batch_size=2, seq_len=64, seed=0))
    order = []
    for _ in range(2):
        order.append([x for b in s for x in _steps(b)[0]])
    assert s.epoch == 2
    assert sorted(order[0]) == sorted(order[1]) and len(order[0]) == sum(ATARI_LENGTHS)
    assert order[0] != order[1]


def test_lanes_contiguous_with_boundary_flags(nethack, reference):
    s = TrajectoryStream(LoaderConfig(nethack, fields=("action", "done"), batch_size=2, seq_len=170, seed=1))
    lanes = [[], []]
    for b in s:
        assert b["action"].shape == (2, 170)
        for row in range(2):
            m = b["mask"][row].numpy()
            assert not m[np.argmin(m):].any() if not m.all() else True  # padding only at a lane's end
            for t in np.flatnonzero(m):
                lanes[row].append((int(b["episode"][row, t]), int(b["step"][row, t]), bool(b["reset"][row, t]),
                                   bool(b["done"][row, t])))
    steps = dict(zip(range(len(s.steps)), s.steps))
    delivered = 0
    for lane in lanes:
        for prev, cur in zip(lane, lane[1:]):
            if cur[0] == prev[0]:
                assert cur[1] == prev[1] + 1 and not cur[2]
            else:
                assert prev[1] == steps[prev[0]] - 1 and cur[1] == 0 and cur[2]
        assert lane[0][1] == 0 and lane[0][2]
        delivered += len(lane)
    assert delivered == len(reference)
    assert sum(x[2] for lane in lanes for x in lane) == len(steps)


def test_lane_plan_is_exact_contiguous_and_balanced():
    """Index-only: every step of every episode lands once, each lane is its episodes end to end, and
    lanes end within one episode of each other (so the epoch needs few padded batches)."""
    rng = np.random.default_rng(3)
    steps = [int(n) for n in rng.integers(0, 900, 200)]
    B, T = 7, 256
    lanes = [[] for _ in range(B)]
    batches = list(lane_plan(list(rng.permutation(len(steps))), steps, B, T))
    for k, batch in enumerate(batches):
        assert len(batch) == B
        for lane, segs in enumerate(batch):
            col = 0
            for e, start, n, c in segs:
                assert c == col and n > 0 and c + n <= T
                lanes[lane].append((k * T + c, e, start, n))
                col = c + n
    seen = {}
    for lane in lanes:
        t = 0
        for when, e, start, n in lane:
            assert when == t and start == seen.get(e, 0)  # no gaps, episodes in one piece, in order
            seen[e] = start + n
            t += n
    assert seen == {e: n for e, n in enumerate(steps) if n}
    ends = [sum(x[3] for x in lane) for lane in lanes]
    assert max(ends) - min(ends) <= max(steps)
    assert len(batches) == -(-max(ends) // T)


@pytest.mark.parametrize("mode,workers", [("lanes", 0), ("windows", 0), ("lanes", 2)])
def test_resume_continues_exactly(atari, mode, workers):
    cfg = LoaderConfig(atari, batch_size=2, seq_len=40, mode=mode, seed=5, frame_stack=3, shuffle_buffer=3)
    full = [b for b in make_dataloader(cfg, workers)]
    assert len(full) > 6
    first = make_dataloader(cfg, workers)
    head = list(itertools.islice(iter(first), 4))
    state = first.state_dict()
    second = make_dataloader(cfg, workers)
    second.load_state_dict(state)
    rest = list(second)
    assert len(head) + len(rest) == len(full)
    key = lambda b: (int(b["slot"]), int(b["batch_index"]))
    got = {key(b): b for b in head + rest}
    assert set(got) == {key(b) for b in full}
    for b in full:
        for k, v in b.items():
            assert torch.equal(v, got[key(b)][k]), k


def test_windows_are_random_crops_within_one_episode(atari):
    def crops(seed):
        s = TrajectoryStream(LoaderConfig(atari, batch_size=4, seq_len=50, mode="windows", seed=seed))
        out = []
        for b in s:
            assert b["frame"].shape == (4, 50, 84, 84)
            for row in range(4):
                m = b["mask"][row].numpy()
                if not m.any():
                    continue
                n = int(m.sum())
                assert m[:n].all()
                e, t = b["episode"][row, :n].numpy(), b["step"][row, :n].numpy()
                assert (e == e[0]).all() and (np.diff(t) == 1).all()
                assert (b["frame"][row, :n, 0, 2].numpy().astype(int) * 256 + b["frame"][row, :n, 0, 1].numpy() == t).all()
                assert bool(b["reset"][row, 0]) == (t[0] == 0)
                out.append((int(e[0]), int(t[0]), n))
        return out

    a, b, c = crops(0), crops(0), crops(1)
    assert a == b
    assert a != c
    assert sum(n for *_, n in a) == sum(ATARI_LENGTHS)
    assert any(t % 50 for _, t, _ in a)  # random phase, not chunk-aligned crops


def test_frame_stack_restarts_at_episode_and_life_starts(atari):
    k = 4
    s = TrajectoryStream(LoaderConfig(atari, batch_size=3, seq_len=33, frame_stack=k, seed=2))
    checked = 0
    for b in s:
        assert b["frame"].shape == (3, 33, k, 84, 84)
        m = b["mask"].numpy()
        st = b["step"].numpy()[m]
        ep = b["episode"].numpy()[m]
        fr = b["frame"].numpy()[m][:, :, 0, :3].astype(int)
        for e, t, f in zip(ep, st, fr):
            for j in range(k):
                src = t - k + 1 + j
                if src < _life_start(t):
                    assert not f[j].any(), (e, t, j)  # zeros before the life's first frame
                else:
                    assert f[j, 1] + 256 * f[j, 2] == src and f[j, 0] == int(s.episode_ids[e][2:]), (e, t, j)
            checked += 1
    assert checked == sum(ATARI_LENGTHS)


def test_filters_and_val_split_stable(atari):
    rows = Dataset(atari).index_rows()
    odd = TrajectoryStream(LoaderConfig(atari, where={"character": "odd"}))
    assert odd.episode_ids and all(int(i[2:]) % 2 for i in odd.episode_ids)
    big = TrajectoryStream(LoaderConfig(atari, min_score=100))
    assert sorted(big.steps) == sorted(n for n in ATARI_LENGTHS if n >= 100)
    both = TrajectoryStream(LoaderConfig(atari, where={"character": ["odd", "even"]}, min_score=10))
    assert len(both.episode_ids) == sum(n >= 10 for n in ATARI_LENGTHS)
    with pytest.raises(ConfigError, match="nope"):
        TrajectoryStream(LoaderConfig(atari, where={"nope": 1}))

    grown = rows + [dict(rows[0], id=f"new{i:04d}") for i in range(400)]
    split = lambda rs, name: {r["id"] for r in select_episodes(rs, LoaderConfig(atari, split=name, val_fraction=0.3))}
    val, train = split(grown, "val"), split(grown, "train")
    assert not val & train and len(val | train) == len(grown)
    assert 0.2 < len(val) / len(grown) < 0.4
    assert split(rows, "val") == val & {r["id"] for r in rows}  # growing the dataset moves no episode
    assert val_hash("ep001") == val_hash("ep001") and 0 <= val_hash("x") < 1


def test_a_small_split_holds_out_one_episode():
    """Failed before the fix: 4 episodes at --val-fraction 0.3 gave an empty validation split."""
    rows = [dict(id=f"000000-{e:04d}", steps=10) for e in range(4)]  # hashes 0.62, 0.99, 0.41, 0.55
    assert all(val_hash(r["id"]) >= 0.3 for r in rows)
    split = lambda rs, name, f=0.3: [r["id"] for r in select_episodes(rs, LoaderConfig("x", split=name, val_fraction=f))]
    assert split(rows, "val") == ["000000-0002"]  # the lowest hash
    assert split(rows, "train") == ["000000-0000", "000000-0001", "000000-0003"]
    assert split(rows, "val", 0.0) == [] and split(rows[:1], "val") == [] and split(rows[:1], "train") == ["000000-0000"]
    rows.append(dict(id="000001-0003", steps=10))  # hash 0.12: the hash split holds it out, and only it
    assert split(rows, "val") == ["000001-0003"]


def test_reading_a_dataset_without_an_index_writes_nothing(scripted_copy):
    """Failed before the fix: building a loader wrote index.parquet into the dataset."""
    index = scripted_copy / "index.parquet"
    want = [r["id"] for r in Dataset(scripted_copy).index_rows()]
    index.unlink()
    stream = TrajectoryStream(LoaderConfig(str(scripted_copy), fields=("action",), batch_size=2, seq_len=16))
    assert stream.episode_ids == sorted(want) and sum(1 for _ in stream) > 0
    assert not index.exists() and not (scripted_copy / "index.parquet.tmp").exists()
    build_index(scripted_copy)
    assert index.is_file()


def test_resume_refuses_a_state_of_other_settings_and_carries_the_skip_count(atari):
    """Failed before the fix: load_state_dict ignored the saved config and corrupt-episode count."""
    cfg = LoaderConfig(atari, batch_size=2, seq_len=40, seed=5)
    first = make_dataloader(cfg)
    next(iter(first))
    state = dict(first.state_dict(), corrupt_skipped=2)
    other = make_dataloader(LoaderConfig(atari, batch_size=2, seq_len=40, seed=6))
    with pytest.raises(ConfigError, match="seed=5, not 6") as e:
        other.load_state_dict(state)
    assert e.value.field == "seed"
    same = make_dataloader(LoaderConfig(atari, batch_size=2, seq_len=40, seed=5, pin_memory=True))  # order unchanged
    same.load_state_dict(state)
    assert same.corrupt_skipped == 2 and same.state_dict()["corrupt_skipped"] == 2


def test_bad_config_is_one_line_error(atari):
    with pytest.raises(ConfigError, match="tty_chars"):
        TrajectoryStream(LoaderConfig(atari, fields=("tty_chars",)))
    with pytest.raises(ConfigError, match="mode"):
        TrajectoryStream(LoaderConfig(atari, mode="random"))
    s = TrajectoryStream(LoaderConfig(atari, batch_size=2, seq_len=40))
    head = list(itertools.islice(iter(s), 1))
    state = s.state_dict()
    other = TrajectoryStream(LoaderConfig(atari, batch_size=2, seq_len=40, rank=0, world_size=2))
    other.load_state_dict(state)
    with pytest.raises(ConfigError, match="slots"):
        next(iter(other))
    assert head


def _ddp_rank(rank, root, store, out):
    import torch.distributed as dist

    dist.init_process_group("gloo", rank=rank, world_size=2, init_method=f"file://{store}")
    try:
        s = TrajectoryStream(LoaderConfig(root, fields=("action",), batch_size=2, seq_len=50, seed=4))
        steps = [x for b in s for x in _steps(b)[0]]
        with open(f"{out}.{rank}", "w") as f:
            f.write(repr([s.slot(), [(s.episode_ids[e], t) for e, t in steps]]))
    finally:
        dist.destroy_process_group()


def test_split_follows_torch_distributed(atari, tmp_path):
    import ast

    import torch.multiprocessing as mp

    mp.spawn(_ddp_rank, args=(atari, str(tmp_path / "store"), str(tmp_path / "out")), nprocs=2)
    got = [ast.literal_eval((tmp_path / f"out.{r}").read_text()) for r in range(2)]
    assert [g[0] for g in got] == [(0, 2), (1, 2)]
    a, b = (set(g[1]) for g in got)
    assert a and b and not a & b and len(a | b) == sum(ATARI_LENGTHS)


@pytest.mark.parametrize("profile", sorted(PROFILES))
def test_every_field_delivered_exactly_and_resumes(scripted_data, tmp_path, profile):
    """Lanes and windows: every field of every delivered step equals the shard's whole-chunk decode;
    batches and crops cut chunks at varying offsets (the stream profile decodes straight into
    them, skipping ahead to a crop's start), and a resumed stream starts mid-chunk."""
    root = tmp_path / "ds"
    recode(scripted_data, root, profile)
    ds = Dataset(root)
    ref = {}
    for p in ds.shard_paths():
        for c in ds.shard(p.name).chunks():
            for t in range(c.steps):
                ref[(c.episode_id, c.start + t)] = {k: v[t] for k, v in c.fields.items()}
    for mode in ("lanes", "windows"):
        cfg = LoaderConfig(str(root), batch_size=3, seq_len=100, seed=2, mode=mode)
        stream = TrajectoryStream(cfg)
        batches = [{k: v.clone() for k, v in b.items()} for b in stream]

        def check(batch):
            n = 0
            for row, t in zip(*np.nonzero(batch["mask"].numpy())):
                want = ref[(stream.episode_ids[int(batch["episode"][row, t])], int(batch["step"][row, t]))]
                for name, value in want.items():
                    np.testing.assert_array_equal(batch[name][row, t].numpy(), value, err_msg=f"{mode} {name}")
                n += 1
            return n

        assert sum(check(b) for b in batches) == len(ref)
        first = TrajectoryStream(cfg)
        next(iter(first))
        resumed = TrajectoryStream(cfg)
        resumed.load_state_dict(first.state_dict())
        rest = list(resumed)
        assert len(rest) == len(batches) - 1
        for got, want in zip(rest, batches[1:]):
            for k in want:
                np.testing.assert_array_equal(got[k].numpy(), want[k].numpy(), err_msg=f"{mode} {k}")


def test_batches_held_by_the_caller_are_never_overwritten(nethack):
    cfg = LoaderConfig(nethack, fields=("tty_chars", "action"), batch_size=2, seq_len=64, seed=1)
    it = iter(TrajectoryStream(cfg))
    held = next(it)
    held_copy = {k: v.clone() for k, v in held.items() if isinstance(v, torch.Tensor)}
    row = next(it)["tty_chars"][1]  # only a slice of this batch stays alive
    row_copy = row.clone()
    arr = next(it)["action"].numpy()[0]  # a numpy view of a tensor of this one
    arr_copy = arr.copy()
    later = [next(it) for _ in range(5)]
    assert all(torch.equal(held[k], v) for k, v in held_copy.items())
    assert torch.equal(row, row_copy) and np.array_equal(arr, arr_copy)
    ptrs = {held["tty_chars"].data_ptr(), row.data_ptr(), *(b["tty_chars"].data_ptr() for b in later)}
    assert len(ptrs) == 7  # every live batch has its own memory
    del held, row, arr, later
    seen = []
    for b in it:  # the loop variable keeps one batch alive while the next is made: two blocks alternate
        seen.append(b["tty_chars"].data_ptr())
    assert len(seen) >= 3 and len(set(seen)) == 2
    assert all(x != y for x, y in zip(seen, seen[1:]))  # never the memory of the batch still held
