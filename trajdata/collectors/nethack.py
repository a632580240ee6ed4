"""NetHack experts: the base class every NetHack expert shares (environment, seeds, index columns)
and the built-in scripted player."""
from __future__ import annotations

from trajdata.collectors.base import Expert, RecordingEnv
from trajdata.envs.nethack import CharacterEnv, check_character, random_character, seed_and_reset, seeds_from


class NetHackExpert(Expert):
    """Common NetHack plumbing: env, seeds, and the index columns read off the last observation."""

    schema = "nethack"

    def __init__(self, character: str = "@", fix_moon_phase: bool = True):
        self.character, self.fix_moon_phase = check_character(character), fix_moon_phase
        self.episode_character = character

    def make_env(self) -> CharacterEnv:
        return CharacterEnv(self.character if self.character != "@" else "val-hum-law-fem", self.fix_moon_phase)

    def reset_env(self, env: CharacterEnv, seed):
        """Seeded reset; with character '@' the character is drawn from the episode seed."""
        self.episode_character = random_character(seed) if self.character == "@" else self.character
        env.set_character(self.episode_character)
        core, disp = seeds_from(seed)
        obs, info = seed_and_reset(env, core, disp)
        return obs, info, {"core": core, "disp": disp, "reseed": False, "lgen": None}

    def summary(self, env: RecordingEnv) -> dict:
        from nle import nethack

        bl = env.writer.last("blstats") if env.steps else env.last_obs["blstats"]
        end = "running"
        if env.terminated:
            status = env.last_info.get("end_status")
            end = {1: "death", -1: "aborted"}.get(int(status), str(status)) if status is not None else "done"
        elif env.truncated:
            end = "env_step_limit"
        return {
            "score": int(bl[nethack.NLE_BL_SCORE]),
            "turns": int(bl[nethack.NLE_BL_TIME]),
            "depth": int(bl[nethack.NLE_BL_DEPTH]),
            "character": self.episode_character,
            "end_reason": end,
        }

    def describe(self) -> dict:
        import nle

        return {"name": self.name, "version": self.version, "character": self.character,
                "fix_moon_phase": self.fix_moon_phase, "env": "NetHackChallenge-v0",
                "nle": getattr(nle, "__version__", "unknown")}


class ScriptedExpert(NetHackExpert):
    """The built-in scripted NetHack player (``trajdata.collectors.scripted``) as an Expert."""

    name = "scripted"

    def __init__(self, character: str = "@", fix_moon_phase: bool = True):
        super().__init__(character, fix_moon_phase)
        from trajdata.collectors.scripted import ScriptedNetHackExpert

        self.policy = ScriptedNetHackExpert()
        self.version = self.policy.version

    def begin(self, obs, seed):
        self.policy.reset(obs, seed)

    def act(self, obs):
        return self.policy.act(obs)
