"""Write the golden datasets (tests/data/golden): small real shards in every codec profile, NetHack
(scripted expert) and Atari (uniformly random actions on Breakout), and the digests test_golden checks.

Run only on purpose: when the on-disk format changes deliberately (then bump SCHEMA_VERSION or the
profile, and say so in the commit). ``python bin/make_golden.py [--out tests/data/golden]``;
``--add PROFILE`` writes only a new profile's sets, recoded from the checked-in ``stream`` ones (the
others are left as they are, byte for byte).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import tempfile
from pathlib import Path

import numpy as np

from trajdata.collectors.runner import CollectConfig, ExpertSpec, collect
from trajdata.format.codec import PROFILES
from trajdata.format.dataset import Dataset, build_index, create_or_check, recode
from trajdata.format.schema import ATARI
from trajdata.format.shard import ShardWriter

STEPS, CHUNK = 40, 16


def digest(ds: Dataset) -> dict:
    """episode id -> field -> sha256 of the decoded (steps, *shape) array, with dtype and shape."""
    out = {}
    for row in sorted(ds.index_rows(), key=lambda r: r["id"]):
        chunks = list(ds.episode(row["id"]))
        out[row["id"]] = {}
        for name in ds.schema.names:
            a = np.ascontiguousarray(np.concatenate([c.fields[name] for c in chunks]))
            out[row["id"]][name] = f"{a.dtype.str}{list(a.shape)}:{hashlib.sha256(a.tobytes()).hexdigest()}"
    return out


def atari_random(root: Path, episodes: int = 2) -> None:
    from trajdata.envs.atari import lives, make_play_env

    create_or_check(root, {"schema": "atari", "env": "BreakoutNoFrameskip-v4", "expert": {"name": "random"},
                           "collection": {"golden": True}})
    env = make_play_env("Breakout")
    rng = np.random.default_rng(0)
    with ShardWriter(Dataset(root).shard_dir / "shard-000000.tar", ATARI, chunk_steps=CHUNK, profile="stream") as sw:
        for e in range(episodes):
            frame, _ = env.reset(seed=e)
            w = sw.episode(f"000000-{e:04d}", {"seed": e})
            ret, done = 0.0, False
            for t in range(STEPS):
                a = int(rng.integers(env.action_space.n))
                w.append({"frame": frame[..., 0], "lives": lives(env), "action": a})
                frame, r, term, trunc, _ = env.step(a)
                ret += float(r)
                done = term or trunc
                w.set_outcome(float(r), done or t == STEPS - 1)
                if done:
                    break
            sw.add_episode_row(w.close({"status": "complete" if done else "truncated", "score": ret}))
    env.close()
    build_index(root)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "tests/data/golden"))
    ap.add_argument("--add", default=None, help="Only add this profile's sets (recoded from the stream sets).")
    args = ap.parse_args()
    out = Path(args.out)
    if args.add:
        digests = json.loads((out / "digests.json").read_text())
        for env in ("atari", "nethack"):
            name = f"{env}-{args.add}"
            shutil.rmtree(out / name, ignore_errors=True)
            recode(out / f"{env}-stream", out / name, args.add, progress=False)
            digests[name] = digest(Dataset(out / name))
            if digests[name] != digests[f"{env}-stream"]:
                raise SystemExit(f"{name} does not decode to what {env}-stream holds")
        (out / "digests.json").write_text(json.dumps(digests, indent=1, sort_keys=True) + "\n")
        print(f"added {args.add} to the golden datasets in {out}")
        return
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    with tempfile.TemporaryDirectory() as tmp:
        src = {"nethack": Path(tmp) / "nethack", "atari": Path(tmp) / "atari"}
        collect(CollectConfig(out=str(src["nethack"]), expert=ExpertSpec("trajdata.collectors.nethack:ScriptedExpert"),
                              shards=1, episodes_per_shard=2, max_steps=STEPS, chunk_steps=CHUNK, seed=3), progress=False)
        atari_random(src["atari"])
        digests = {}
        for env, path in src.items():
            for profile in sorted(PROFILES):
                name = f"{env}-{profile}"
                recode(path, out / name, profile, progress=False)
                digests[name] = digest(Dataset(out / name))
    (out / "digests.json").write_text(json.dumps(digests, indent=1, sort_keys=True) + "\n")
    print(f"wrote {len(digests)} golden datasets to {out}")


if __name__ == "__main__":
    main()
