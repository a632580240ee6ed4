"""`trajdata export minari`: a dataset as a Minari dataset (the minari package's own storage).

Each episode becomes a Minari episode: ``observations`` a dict of the schema's observation fields
(each a Box of the field's dtype and shape), T + 1 of them; ``actions`` (Discrete: the env's action
set), ``rewards``, and ``terminations`` / ``truncations`` from ``done`` and the episode's status (the
last step terminates a game that ended, truncates one cut short by a cap, a stall, an abort or
the env's own time limit). Minari ends an episode with the observation after its last action,
which trajdata does not store: ``final_obs="replay"`` re-simulates the episode to get it (and checks
every recorded step on the way), ``"repeat"`` repeats the last stored one. Stored as arrow without
JPEG (lossless). Each episode's metadata names its trajdata id, status, end reason and seeds.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import warnings
from pathlib import Path

import numpy as np

from trajdata.errors import ConfigError, DataError
from trajdata.format.dataset import Dataset

FINAL_OBS = ("replay", "repeat")
REPLAY_CHUNK = 4096


def box(field):
    """The gymnasium Box describing a schema field."""
    import gymnasium as gym

    info = np.iinfo(field.np_dtype) if field.np_dtype.kind in "iu" else None
    low, high = (info.min, info.max) if info is not None else (-np.inf, np.inf)
    return gym.spaces.Box(low=low, high=high, shape=field.shape, dtype=field.np_dtype)


def spaces(ds: Dataset):
    """(observation space, action space) of a dataset's steps."""
    import gymnasium as gym

    obs = gym.spaces.Dict({n: box(ds.schema[n]) for n in ds.schema.observation_names})
    return obs, gym.spaces.Discrete(n_actions(ds))


def n_actions(ds: Dataset) -> int:
    """Size of the action set the dataset's actions index."""
    if ds.schema.name == "nethack":
        from trajdata.envs.nethack import make_nethack_env

        env = make_nethack_env()
        try:
            return int(env.action_space.n)
        finally:
            env.close()
    if ds.schema.name == "atari":
        import gymnasium as gym

        from trajdata.envs.atari import env_id, register_ale

        register_ale()
        game = (ds.info.get("expert") or {}).get("game") or ds.info.get("env")
        env = gym.make(env_id(game))
        try:
            return int(env.action_space.n)
        finally:
            env.close()
    return 256  # NLD keypresses


@contextlib.contextmanager
def _minari_root(root):
    old = os.environ.get("MINARI_DATASETS_PATH")
    if root is not None:
        Path(root).mkdir(parents=True, exist_ok=True)
        os.environ["MINARI_DATASETS_PATH"] = str(Path(root).resolve())
    try:
        yield
    finally:
        if root is not None:
            if old is None:
                os.environ.pop("MINARI_DATASETS_PATH", None)
            else:
                os.environ["MINARI_DATASETS_PATH"] = old


def export_minari(root, name: str, final_obs: str = "replay", *, minari_root=None, progress: bool = True) -> dict:
    """Write dataset ``root`` as Minari dataset ``name`` (under ``minari_root`` or Minari's default
    directory); returns a summary. Episodes of no steps have no observation to give and are left out."""
    import minari
    from minari.data_collector.episode_buffer import EpisodeBuffer
    from minari.dataset.minari_dataset import parse_dataset_id
    from minari.storage.datasets_root_dir import get_dataset_path
    from tqdm import tqdm

    if final_obs not in FINAL_OBS:
        raise ConfigError(f"final_obs {final_obs!r}: choose one of {', '.join(FINAL_OBS)}", field="final_obs")
    try:
        parse_dataset_id(name)
    except ValueError:
        raise ConfigError(f"name {name!r} is not a Minari dataset id: use (namespace/)name-v<version>, e.g. "
                          "trajdata/nethack-v0", field="name") from None
    ds = Dataset(root)
    rows = sorted(ds.index_rows(), key=lambda r: r["id"])
    specs = {}
    if final_obs == "replay":
        from trajdata.packs.replay import replay_spec

        where = f"cannot re-simulate the final observations of {ds.root}"
        try:
            specs = {r["id"]: replay_spec(ds.schema.name, ds.info, r, where) for r in rows}
        except DataError as e:
            raise DataError(f"{e}; export with --final-obs repeat") from None
    obs_space, act_space = spaces(ds)
    kept = [r for r in rows if int(r["steps"]) > 0]
    with _minari_root(minari_root):
        path = Path(get_dataset_path(name))
        if path.exists():
            raise DataError(f"a Minari dataset {name} already exists at {path}; remove it or pick another --name")
        bar = tqdm(kept, desc="export minari", unit="episode", disable=None if progress else True)
        try:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", category=UserWarning, module=r"minari(\..*)?$")
                buffers = (_buffer(EpisodeBuffer, ds, i, r, specs.get(r["id"])) for i, r in enumerate(bar))
                expert = ds.info.get("expert") or {}
                dataset = minari.create_dataset_from_buffers(
                    name, buffers, env=None, observation_space=obs_space, action_space=act_space,
                    algorithm_name=f"trajdata expert {expert.get('name', '?')} {expert.get('version', '')}".strip(),
                    description=_description(ds, final_obs), data_format="arrow", jpeg_encoding=False)
                dataset.storage.update_episode_metadata([_episode_meta(r) for r in kept], range(len(kept)))
        except BaseException:
            shutil.rmtree(path, ignore_errors=True)
            raise
        finally:
            bar.close()
            while _pool:
                _pool.pop().close()
    return {"name": name, "path": str(path), "episodes": len(kept), "steps": sum(int(r["steps"]) for r in kept),
            "left_out_empty": len(rows) - len(kept), "final_obs": final_obs}


def _description(ds: Dataset, final_obs: str) -> str:
    expert = ds.info.get("expert") or {}
    last = ("re-simulated from the episode's seeds and actions" if final_obs == "replay"
            else "a copy of the last stored one (trajdata does not store it)")
    return (f"Exported by trajdata from {ds.root.name} (schema {ds.schema.name}, env {ds.info.get('env')}, expert "
            f"{expert.get('name')}). Each step is the observation the agent acted on, its action and the reward "
            f"and termination it produced. The final observation is {last}.")


def _episode_meta(row: dict) -> dict:
    keep = ("id", "status", "end_reason", "seed", "seeds", "character", "score")
    return {f"trajdata_{k}": row[k] for k in keep if row.get(k) is not None}


def _buffer(EpisodeBuffer, ds: Dataset, i: int, row: dict, spec: dict | None):
    chunks = list(ds.episode(row["id"]))
    arrays = {n: np.concatenate([c.fields[n] for c in chunks]) for n in ds.schema.names}
    T = len(arrays["action"])
    final = _replayed_final(ds, row, spec, arrays) if spec is not None else {n: arrays[n][-1] for n in arrays}
    obs = {n: np.concatenate([arrays[n], np.asarray(final[n], arrays[n].dtype)[None]])
           for n in ds.schema.observation_names}
    done = arrays["done"].astype(bool)
    term = np.zeros(T, bool)
    trunc = np.zeros(T, bool)
    ended = bool(done[-1]) and row.get("end_reason") != "env_truncated"
    term[-1], trunc[-1] = ended, not ended
    seed = row.get("seed") if ds.schema.name == "atari" else None
    return EpisodeBuffer(id=i, seed=seed, observations=obs, actions=arrays["action"].astype(np.int64),
                         rewards=arrays["reward"], terminations=term, truncations=trunc)


_pool: list = []


def _replayed_final(ds: Dataset, row: dict, spec: dict, arrays: dict) -> dict:
    """The observation after the episode's last action, re-simulated; every recorded step is checked."""
    from trajdata.packs.replay import EnvPool, EpisodeReplay, EndedEarly, new_chunk

    if not _pool:
        _pool.append(EnvPool())
    T = len(arrays["action"])
    where = f"{ds.root}: episode {row['id']}"
    rep = EpisodeReplay(_pool[0], ds.schema, spec, T, where)
    try:
        buf = new_chunk(ds.schema, min(T, REPLAY_CHUNK))
        for s in range(0, T, REPLAY_CHUNK):
            m = min(REPLAY_CHUNK, T - s)
            got = {n: a[:m] for n, a in buf.items()}
            try:
                rep.play(arrays["action"][s : s + m], got)
            except EndedEarly as e:
                raise DataError(f"{where}: replaying it, the game ends at step {e.step}; the recording goes on "
                                "(export with --final-obs repeat)") from None
            for n in ds.schema.names:
                want = arrays[n][s : s + m]
                if not np.array_equal(got[n], want):
                    t = s + int(np.argmax((got[n] != want).reshape(m, -1).any(axis=1)))
                    raise DataError(f"{where}: replay diverges from the recording at step {t} ({n} differs); "
                                    "export with --final-obs repeat")
        return rep.observation()
    finally:
        rep.close()
