"""Re-simulating recorded episodes: what replays an episode (``replay_spec``), envs kept per process
(``EnvPool``), playing actions into step arrays (``EpisodeReplay``) and checking each step against
a pack (``replay_chunks``).

A NetHack episode replays from NetHackChallenge-v0 with its character, NLE seeds (core, disp, lgen,
no reseeding), ``fix_moon_phase``, the pinned start time and the expert's ``no_progress_timeout``;
an Atari episode from ``make_play_env(game, noop_max, frame_skip)`` reset with its seed. Step t
holds the observation before action t (copied before stepping, as ``RecordingEnv`` records it), the
action, and the reward and done flag that action produced.
"""
from __future__ import annotations

import json
from typing import Iterator

import numpy as np

from trajdata.errors import DataError
from trajdata.format import fingerprint
from trajdata.format.schema import Schema
from trajdata.packs.store import CHECK_BITS

NETHACK_ENV = "NetHackChallenge-v0"
REPLAY_PACKAGES = {"nethack": ("nle", "gymnasium"),
                   "atari": ("ale-py", "gymnasium", "stable-baselines3", "opencv-python-headless")}


def _seeds(row: dict) -> dict:
    seeds = row.get("seeds")
    if isinstance(seeds, str):
        try:
            seeds = json.loads(seeds)
        except ValueError:
            seeds = None
    return seeds if isinstance(seeds, dict) else {}


def replay_spec(schema: str, info: dict, row: dict, where: str) -> dict:
    """How to re-simulate the episode of index row ``row`` of a dataset described by ``info``
    (its dataset.json); a DataError saying why if it cannot be."""
    eid = row.get("id")
    if schema == "nld":
        raise DataError(f"{where}: its games are imported NLD ttyrecs, which carry no seeds (and no NLE "
                        "settings), so they cannot be re-simulated; keep the dataset itself")
    expert = info.get("expert") or {}
    seeds = _seeds(row)
    if schema == "nethack":
        env = row.get("env") or info.get("env") or NETHACK_ENV
        if env != NETHACK_ENV:
            raise DataError(f"{where}: episode {eid} was played on {env}; packs replay {NETHACK_ENV}")
        if not isinstance(seeds.get("core"), int) or not isinstance(seeds.get("disp"), int):
            raise DataError(f"{where}: episode {eid} records no NLE seeds (core, disp), so it cannot be re-simulated")
        if seeds.get("reseed"):
            raise DataError(f"{where}: episode {eid} was played with NLE's reseeding on, so it cannot be re-simulated")
        character = row.get("character")
        if not isinstance(character, str) or character in ("", "@"):
            raise DataError(f"{where}: episode {eid} records no character, so it cannot be re-simulated")
        from trajdata.envs.nethack import pinned_start_time

        npt = expert.get("no_progress_timeout")
        return {"kind": "nethack", "env": NETHACK_ENV, "character": character, "core": seeds["core"],
                "disp": seeds["disp"], "lgen": seeds.get("lgen"), "start_time": pinned_start_time(seeds["core"]),
                "fix_moon_phase": bool(expert.get("fix_moon_phase", True)),
                "no_progress_timeout": int(npt) if npt is not None else None}
    if schema == "atari":
        from trajdata.envs.atari import FRAME_SKIP, NOOP_MAX, env_id, resolve_game

        game = expert.get("game") or info.get("env")
        seed = seeds.get("seed", row.get("seed"))
        if not game:
            raise DataError(f"{where}: its dataset.json names no Atari game, so its episodes cannot be re-simulated")
        if not isinstance(seed, int):
            raise DataError(f"{where}: episode {eid} records no seed, so it cannot be re-simulated")
        game = resolve_game(game)
        return {"kind": "atari", "env": env_id(game), "game": game, "seed": seed,
                "noop_max": int(expert.get("noop_max", NOOP_MAX)), "frame_skip": int(expert.get("frame_skip", FRAME_SKIP))}
    raise DataError(f"{where}: schema {schema!r} has no replay")


def installed_versions(kind: str) -> dict:
    """Versions of the packages a ``kind`` ("nethack", "atari") replay depends on, as installed."""
    import importlib.metadata

    out = {}
    for name in REPLAY_PACKAGES.get(kind, ()):
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    return out


def version_note(recorded: dict, kind: str) -> str:
    """'; the pack was made with nle 1.3.0 (here 1.4.0)' for the replay packages whose installed
    version differs from ``recorded``'s; '' if none does."""
    now = installed_versions(kind)
    diff = [f"{k} {v} (here {now.get(k, 'not installed')})" for k, v in sorted(recorded.items()) if now.get(k) != v]
    return f"; the pack was made with {', '.join(diff)}" if diff else ""


class EnvPool:
    """Idle envs of this process, reused from episode to episode (an NLE or ALE instance costs a
    fraction of a second to make); ``take`` one for a spec, ``give`` it back when its episode ends."""

    def __init__(self):
        self.idle: list[tuple[tuple, object]] = []

    def take(self, spec: dict):
        key = self._key(spec)
        for i, (k, env) in enumerate(self.idle):
            if k == key and (spec["kind"] != "nethack" or env.character == spec["character"]):
                return self.idle.pop(i)[1]
        for i, (k, env) in enumerate(self.idle):
            if k == key:
                return self.idle.pop(i)[1]
        return self._make(spec)

    def give(self, spec: dict, env) -> None:
        self.idle.append((self._key(spec), env))
        while len(self.idle) > 64:
            self.idle.pop(0)[1].close()

    @staticmethod
    def _key(spec: dict) -> tuple:
        if spec["kind"] == "nethack":
            return ("nethack", spec["fix_moon_phase"])
        return ("atari", spec["game"], spec["noop_max"], spec["frame_skip"])

    @staticmethod
    def _make(spec: dict):
        if spec["kind"] == "nethack":
            from trajdata.envs.nethack import CharacterEnv

            env = CharacterEnv(spec["character"], spec["fix_moon_phase"])
            env.default_no_progress_timeout = env.unwrapped.no_progress_timeout
            return env
        from trajdata.envs.atari import make_play_env

        return make_play_env(spec["game"], spec["noop_max"], spec["frame_skip"])

    def close(self) -> None:
        for _, env in self.idle:
            env.close()
        self.idle.clear()


class EpisodeReplay:
    """One episode being re-simulated: ``play(actions, out)`` plays the next steps, writing each
    step's fields into ``out``'s rows; ``close()`` hands the env back."""

    def __init__(self, pool: EnvPool, schema: Schema, spec: dict, steps: int, where: str):
        self.pool, self.schema, self.spec, self.steps, self.where = pool, schema, spec, steps, where
        self.env = pool.take(spec)
        self.t = 0
        self.nethack = spec["kind"] == "nethack"
        self.obs_names = [n for n in schema.observation_names]
        try:
            if self.nethack:
                from trajdata.envs.nethack import pinned_start_time, seed_and_reset, start_time

                self.env.leave_game()
                self.env.set_character(spec["character"])
                if not hasattr(self.env, "default_no_progress_timeout"):
                    self.env.default_no_progress_timeout = self.env.unwrapped.no_progress_timeout
                self.obs, _ = seed_and_reset(self.env, spec["core"], spec["disp"], spec.get("lgen"))
                if spec["start_time"] != pinned_start_time(spec["core"]):
                    start_time(self.env, spec["start_time"])
                npt = spec.get("no_progress_timeout")
                self.env.unwrapped.no_progress_timeout = npt if npt is not None else self.env.default_no_progress_timeout
            else:
                from trajdata.envs.atari import lives

                self._lives = lambda: lives(self.env)
                self.obs, _ = self.env.reset(seed=spec["seed"])
        except Exception as e:
            self.close()
            raise DataError(f"{where}: cannot start its game ({type(e).__name__}: {e})".splitlines()[0]) from None

    def play(self, actions: np.ndarray, out: dict[str, np.ndarray]) -> None:
        n = len(actions)
        if self.t + n > self.steps:
            raise ValueError(f"{self.where}: steps {self.t}..{self.t + n} past the episode's {self.steps}")
        env, obs = self.env, self.obs
        act, rew, done = out["action"], out["reward"], out["done"]
        rows = [(out[name], name) for name in self.obs_names]
        for i in range(n):
            a = int(actions[i])
            if self.nethack:
                for arr, name in rows:
                    arr[i] = obs[name]
            else:
                out["frame"][i] = obs[:, :, 0]
                out["lives"][i] = self._lives()
            act[i] = a
            try:
                obs, r, term, trunc, _ = env.step(a)
            except Exception as e:
                raise DataError(f"{self.where}: replay failed at step {self.t + i} ({type(e).__name__}: {e})"
                                .splitlines()[0]) from None
            rew[i] = r
            done[i] = term or trunc
            if (term or trunc) and self.t + i + 1 < self.steps:
                self.t += i + 1
                self.obs = obs
                raise EndedEarly(self.t - 1)
        self.t += n
        self.obs = obs

    def observation(self) -> dict[str, np.ndarray]:
        """The observation fields after the last step played (the one a next action would act on)."""
        if self.nethack:
            return {name: self.obs[name] for name in self.obs_names}
        return {"frame": self.obs[:, :, 0], "lives": self._lives()}

    def close(self) -> None:
        if self.env is not None:
            self.pool.give(self.spec, self.env)
            self.env = None


class EndedEarly(Exception):
    """The game ended at ``step``, before the recording does (``EpisodeReplay.play``)."""

    def __init__(self, step: int):
        super().__init__(step)
        self.step = step


def new_chunk(schema: Schema, n: int) -> dict[str, np.ndarray]:
    return {f.name: np.zeros((n, *f.shape), f.np_dtype) for f in schema.fields}


def _diverged(where: str, eid: str, t: int, note: str) -> DataError:
    return DataError(f"{where}: episode {eid}: replay diverges from the recording at step {t}{note}")


def replay_chunks(pool: EnvPool, schema: Schema, ep, chunk_steps: int, where: str, note: str = "",
                  reuse: bool = False, bits: int = CHECK_BITS) -> Iterator[dict[str, np.ndarray]]:
    """Re-simulate packed episode ``ep`` (``store.PackedEpisode``) chunk by chunk (``chunk_steps``
    steps each, the last partial; one empty chunk for an episode of no steps), checking every step's
    fingerprint bits and each chunk end's chain value against the pack: the first step that differs
    is a one-line DataError naming the episode and step (``note`` is added: versions that differ).
    With ``reuse`` every chunk is written into the same arrays."""
    c = np.uint64(fingerprint.CHAIN_START)
    rep = EpisodeReplay(pool, schema, ep.replay, ep.steps, f"{where}: episode {ep.id}")
    try:
        buf = None
        starts = range(0, ep.steps, chunk_steps) if ep.steps else [0]
        if len(starts) != ep.chunks or len(ep.ends) != ep.chunks:
            raise DataError(f"{where}: episode {ep.id}: {ep.chunks} chunks and {len(ep.ends)} chunk ends listed for "
                            f"{ep.steps} steps of {chunk_steps} (corrupt pack)")
        for k, s in enumerate(starts):
            n = min(chunk_steps, ep.steps - s)
            if buf is None or not reuse:
                buf = new_chunk(schema, chunk_steps if reuse else n)
            arrays = {name: a[:n] for name, a in buf.items()}
            ended = None
            try:
                rep.play(ep.actions[s : s + n], arrays)
            except EndedEarly as e:
                ended = e.step
            m = n if ended is None else ended - s + 1
            h = fingerprint.step_hashes({k_: a[:m] for k_, a in arrays.items()}, schema.names)
            chained = fingerprint.chain(h, int(c))
            bad = np.flatnonzero(fingerprint.check_bits(chained, bits) != ep.checks[s : s + m])
            if bad.size:
                raise _diverged(where, ep.id, s + int(bad[0]), note)
            if ended is not None:
                raise _diverged(where, ep.id, ended, f" (the game ended there; the recording goes on to step "
                                                     f"{ep.steps - 1}){note}")
            if m:
                c = chained[-1]
            if int(c) != ep.ends[k]:
                raise DataError(f"{where}: episode {ep.id}: replay diverges from the recording between steps {s} "
                                f"and {s + n - 1}{note}")
            yield arrays
    finally:
        rep.close()

