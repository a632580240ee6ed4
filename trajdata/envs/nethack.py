"""NetHack on stock nle 1.3.0: the environment every stage plays (NetHackChallenge-v0 without NLE's
recorder), characters, reproducible seeding, and the start-time pin that makes a game replayable."""
from __future__ import annotations

import os
import re

import gymnasium as gym
import numpy as np


# NetHack 3.6 role -> (races, alignments); races constrain alignment too; valkyries are female.
ROLE_OPTIONS = {
    "arc": ("hum dwa gno", "law neu"), "bar": ("hum orc", "neu cha"), "cav": ("hum dwa gno", "law neu"),
    "hea": ("hum gno", "neu"), "kni": ("hum", "law"), "mon": ("hum", "law neu cha"),
    "pri": ("hum elf", "law neu cha"), "rog": ("hum orc", "cha"), "ran": ("hum elf gno orc", "neu cha"),
    "sam": ("hum", "law"), "tou": ("hum", "neu"), "val": ("hum dwa", "law neu"), "wiz": ("hum elf gno orc", "neu cha"),
}
RACE_ALIGNMENTS = {"hum": "law neu cha", "elf": "cha", "dwa": "law", "gno": "neu", "orc": "cha"}
_CHARACTER = re.compile(r"^(@|[a-z]{3}(-[a-z]{3}){0,3})$")


def random_character(seed: int) -> str:
    """A valid role-race-alignment-gender, drawn like NetHack's own random pick (role first)."""
    rng = np.random.default_rng([seed, 0xC4A7])
    role = str(rng.choice(sorted(ROLE_OPTIONS)))
    races, aligns = ROLE_OPTIONS[role]
    race = str(rng.choice(races.split()))
    align = str(rng.choice([a for a in aligns.split() if a in RACE_ALIGNMENTS[race]]))
    gender = "fem" if role == "val" else str(rng.choice(["mal", "fem"]))
    return f"{role}-{race}-{align}-{gender}"


GENDERS = ("mal", "fem")


def character_problem(character: str) -> str | None:
    """Why NLE would not play ``character`` as written ('@' = random; else role[-race[-alignment[-gender]]]
    in NetHack's 3-letter codes, e.g. 'mon-hum-neu-mal'), or None if it is valid."""
    if character == "@":
        return None
    if not _CHARACTER.match(character):
        return "use '@' (random) or role-race-alignment-gender, e.g. 'mon-hum-neu-mal'"
    role, *rest = character.split("-")
    if role not in ROLE_OPTIONS:
        return f"unknown role {role!r} (one of {', '.join(sorted(ROLE_OPTIONS))})"
    races, aligns = (x.split() for x in ROLE_OPTIONS[role])
    kinds = [("race", races), ("alignment", aligns), ("gender", list(GENDERS))]
    for (kind, allowed), value in zip(kinds, rest):
        if value not in allowed:
            return f"{kind} {value!r} is not one NetHack allows for role {role!r} ({', '.join(allowed)})"
    if len(rest) >= 2 and rest[1] not in RACE_ALIGNMENTS[rest[0]].split():
        return f"alignment {rest[1]!r} is not one NetHack allows for race {rest[0]!r} ({RACE_ALIGNMENTS[rest[0]]})"
    if role == "val" and len(rest) == 3 and rest[2] != "fem":
        return "valkyries are female ('val-...-fem')"
    return None


def check_character(character: str) -> str:
    """``character`` if it names a NetHack character NLE accepts ('@' = random), else a ConfigError."""
    problem = character_problem(character)
    if problem is not None:
        from trajdata.errors import ConfigError

        raise ConfigError(f"character {character!r}: {problem}", field="character")
    return character


# NetHackChallenge-v0's observations (nle 1.3.0; NLE adds program_state and internal itself)
CHALLENGE_OBSERVATIONS = ("glyphs", "chars", "colors", "specials", "blstats", "message", "inv_glyphs", "inv_strs",
                          "inv_letters", "inv_oclasses", "tty_chars", "tty_colors", "tty_cursor", "misc")


def make_nethack_env(character: str = "@", fix_moon_phase: bool = True, env_id: str = "NetHackChallenge-v0",
                     **kwargs) -> gym.Env:
    """NetHackChallenge-v0 (or another NLE task, ``env_id``, with the Challenge's observations: the
    nethack schema's fields, not NetHackScore's costly screen_descriptions) without NLE's own ttyrec
    recording (trajdata records)."""
    import nle  # noqa: F401  (registers the envs)

    kwargs.setdefault("save_ttyrec_every", 0)
    if env_id != "NetHackChallenge-v0":
        kwargs.setdefault("observation_keys", CHALLENGE_OBSERVATIONS)
    return gym.make(env_id, character=character, fix_moon_phase=fix_moon_phase, **kwargs)


ESC = 27
LEAVE_ESCAPES = 3


class CharacterEnv(gym.Wrapper):
    """NetHackChallenge whose character can change between episodes (NLE fixes it at construction)."""

    def __init__(self, character: str = "@", fix_moon_phase: bool = True, env_id: str = "NetHackChallenge-v0"):
        self.character, self.fix_moon_phase, self.env_id = character, fix_moon_phase, env_id
        self.in_game = False
        super().__init__(make_nethack_env(character, fix_moon_phase, env_id))

    def set_character(self, character: str) -> None:
        if character != self.character:
            self.close()
            self.env = make_nethack_env(character, fix_moon_phase=self.fix_moon_phase, env_id=self.env_id)
            self.character = character

    def reset(self, **kwargs):
        self.leave_game()
        out = self.env.reset(**kwargs)
        self.in_game = True
        return out

    def step(self, action):
        out = self.env.step(action)
        self.in_game = not (out[2] or out[3])
        return out

    def close(self) -> None:
        self.leave_game()
        self.env.close()

    def leave_game(self) -> None:
        """Before a game in progress is ended (by reset or close), dismiss its prompts with ESC.

        nle 1.3.0 aborts the whole process (SIGABRT, uncatchable) ending some games that a step cap
        left mid-prompt, e.g. at "You swap places with your saddled pony.--More--"; after a few ESCs
        the same game ends cleanly. The episode is already over, so these steps are recorded nowhere.
        Tasks whose action set lacks ESC (NetHackScore-v0) get it as a keypress straight to NetHack."""
        if not self.in_game:
            return
        self.in_game = False
        actions = self.env.unwrapped.actions
        if ESC not in actions:
            nethack = self.env.unwrapped.nethack
            for _ in range(LEAVE_ESCAPES):
                if nethack.step(ESC)[1]:
                    break
            return
        esc = actions.index(ESC)
        for _ in range(LEAVE_ESCAPES):
            _, _, term, trunc, _ = self.env.step(esc)
            if term or trunc:
                break


def allow_seeding(env: gym.Env) -> None:
    """Undo NetHackChallenge's per-instance ban on seeding (its __init__ patches the nethack object)."""
    nh = env.unwrapped.nethack
    for name in ("set_initial_seeds", "set_current_seeds", "get_current_seeds"):
        nh.__dict__.pop(name, None)


def seeds_from(seed: int) -> tuple[int, int]:
    core, disp = np.random.SeedSequence(seed).generate_state(2, np.uint64)
    return int(core >> np.uint64(1)), int(disp >> np.uint64(1))


def seed_and_reset(env: gym.Env, core: int, disp: int, lgen: int | None = None):
    """Reset ``env`` with NetHack's RNGs seeded (no anti-TAS reseeding): reproducible games."""
    from nle.env.base import NLE

    allow_seeding(env)
    NLE.seed(env.unwrapped, core, disp, False, lgen)
    obs, info = env.reset()
    pin_start_time(env, core)
    return obs, info


_symbol_offsets: dict[str, int] = {}


def _load_base(st: os.stat_result) -> int:
    """Load address of the file ``st`` (its offset-0 mapping in /proc/self/maps), matched by device
    and inode: inode numbers repeat across file systems (nle's memfd copy of libnethack.so and a
    /dev/shm semaphore can share one), and a wrong match read NetHack's globals off another mapping."""
    dev = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}"
    with open("/proc/self/maps") as f:
        for line in f:
            parts = line.split()
            if len(parts) >= 5 and parts[2] == "00000000" and int(parts[4]) == st.st_ino and parts[3] == dev:
                return int(parts[0].split("-")[0], 16)
    raise RuntimeError(f"no mapping of device {dev} inode {st.st_ino} in /proc/self/maps")


def _symbol_offset(name: str) -> int:
    """Offset of a global of nle's libnethack.so from its load address (same in every copy)."""
    if name not in _symbol_offsets:
        import _ctypes
        import ctypes

        from nle.nethack.nethack import DLPATH

        lib = ctypes.CDLL(DLPATH)
        try:
            addr = ctypes.addressof(ctypes.c_char.in_dll(lib, name))
            _symbol_offsets[name] = addr - _load_base(os.stat(DLPATH))
        finally:
            _ctypes.dlclose(lib._handle)
    return _symbol_offsets[name]


def _start_time_cell(env: gym.Env):
    import ctypes

    nethack = env.unwrapped.nethack
    base = _load_base(os.fstat(nethack._dl.fileno()))
    return ctypes.c_int64.from_address(base + _symbol_offset("ubirthday"))


def pin_start_time(env: gym.Env, core: int) -> bool:
    """Set NetHack's game start time (the global ``ubirthday``) from the core seed, right after reset.

    NetHack 3.6 names shopkeepers from ``ubirthday / 257`` (wall-clock seconds at game start), which
    nle 1.3.0's ``fix_moon_phase`` leaves alone, so replays of a game that meets a shopkeeper diverge
    once the clock has moved on. Shops never appear on dungeon level 1, so every shop is created after
    this and gets its name from the pinned time (which still varies from game to game, by seed).
    Linux only (reads /proc/self/maps); returns whether the time was pinned.
    """
    import sys
    import time

    if not sys.platform.startswith("linux"):
        return False
    cell = _start_time_cell(env)
    if abs(cell.value - time.time()) > 86400:
        raise RuntimeError(f"nle's ubirthday reads {cell.value}, not the current time: unknown libnethack layout")
    cell.value = pinned_start_time(core)
    return True


def pinned_start_time(core: int) -> int:
    """The game start time ``pin_start_time`` gives the game of core seed ``core``."""
    return 257 * (1_700_000_000 // 257 + core % 65)


def start_time(env: gym.Env, value: int | None = None) -> int:
    """NetHack's game start time (``ubirthday``) of ``env``'s current game; sets it first if ``value``."""
    cell = _start_time_cell(env)
    if value is not None:
        cell.value = value
    return cell.value
