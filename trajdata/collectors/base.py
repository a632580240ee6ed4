"""The collector framework's two interfaces: ``Expert`` and ``RecordingEnv``.

An expert either is a policy (``begin``/``act``: the default ``run_episode`` loops for it) or owns
its loop (override ``run_episode`` and call ``env.step`` yourself, as AutoAscend does). Either way
every ``env.step`` goes through a ``RecordingEnv``, which copies the observation the agent acted on
into the episode's chunk buffer *before* stepping (NLE reuses its observation buffers), then fills
in the reward and done flag the step produced.
"""
from __future__ import annotations

import abc
import faulthandler
import signal
import time
from typing import Any

import gymnasium as gym
import numpy as np

from trajdata.format.shard import EpisodeWriter


class EpisodeTruncated(Exception):
    """Raised by ``RecordingEnv.step`` when a cap is reached; the episode is kept, marked truncated."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


class EpisodeStalled(Exception):
    """Raised (from a SIGALRM handler) when no step happened for ``stall_seconds``."""


class Expert(abc.ABC):
    """An expert and the environment it plays. Instantiated inside each worker process."""

    name: str = "expert"
    version: str = "0"
    schema: str = "nethack"

    @abc.abstractmethod
    def make_env(self) -> gym.Env:
        """A fresh, un-recorded environment (created once per worker)."""

    @abc.abstractmethod
    def reset_env(self, env: gym.Env, seed: int) -> tuple[Any, dict, dict]:
        """Seed and reset ``env`` for one episode; returns (obs, info, seeds to record)."""

    def step_fields(self, obs, info: dict) -> dict[str, np.ndarray]:
        """The schema's observation fields of ``obs`` (the default fits NLE's dict observations)."""
        return obs

    def begin(self, obs, seed: int) -> None:
        """Start of an episode, for policy experts."""

    def act(self, obs) -> int:
        raise NotImplementedError(f"{type(self).__name__} neither implements act() nor run_episode()")

    def run_episode(self, env: "RecordingEnv", obs, info: dict, seed: int) -> None:
        """Play one episode through ``env`` until it ends (or ``env.step`` raises a cap)."""
        self.begin(obs, seed)
        while True:
            obs, _, terminated, truncated, info = env.step(self.act(obs))
            if terminated or truncated:
                return

    def summary(self, env: "RecordingEnv") -> dict:
        """Expert-specific index columns for the episode just played (score, turns, depth, ...)."""
        return {}

    def describe(self) -> dict:
        """Settings that decide what the expert produces; stored in dataset.json."""
        return {"name": self.name, "version": self.version}

    def close(self) -> None:
        pass


class RecordingEnv(gym.Wrapper):
    """Records every step into an ``EpisodeWriter``; enforces step, wall-time and stall caps."""

    def __init__(self, env: gym.Env, expert: Expert, writer: EpisodeWriter, max_steps: int | None = None,
                 max_seconds: float | None = None, stall_seconds: float | None = None,
                 backstop: "HardWatchdog | None" = None):
        super().__init__(env)
        self.expert, self.writer = expert, writer
        self.max_steps, self.max_seconds, self.stall_seconds = max_steps, max_seconds, stall_seconds
        self.backstop = backstop
        self.steps = 0
        self.episode_return = 0.0
        self.terminated = self.truncated = False
        self.last_obs = self.last_info = None
        self.start_time = time.monotonic()

    def start(self, obs, info: dict) -> None:
        """Take the observation ``reset`` produced; arms the stall watchdog."""
        self.last_obs, self.last_info = obs, info
        self.start_time = time.monotonic()
        self._arm()

    def reset(self, **kwargs):
        raise RuntimeError("RecordingEnv covers one episode: the runner resets the env")

    def step(self, action):
        if self.terminated or self.truncated:
            raise RuntimeError("step() after the episode ended")
        if self.max_steps is not None and self.steps >= self.max_steps:
            raise EpisodeTruncated(f"max_steps ({self.max_steps})")
        if self.max_seconds is not None and time.monotonic() - self.start_time > self.max_seconds:
            raise EpisodeTruncated(f"max_seconds ({self.max_seconds:g})")
        fields = self.expert.step_fields(self.last_obs, self.last_info)
        self.writer.append(fields, action=int(action))
        obs, reward, terminated, truncated, info = self.env.step(action)
        self._arm()
        self.steps += 1
        self.episode_return += float(reward)
        self.writer.set_outcome(reward, terminated or truncated)
        self.terminated, self.truncated = bool(terminated), bool(truncated)
        self.last_obs, self.last_info = obs, info
        return obs, reward, terminated, truncated, info

    def _arm(self) -> None:
        if self.stall_seconds:
            signal.setitimer(signal.ITIMER_REAL, self.stall_seconds)
        if self.backstop is not None:
            self.backstop.kick()

    def disarm(self) -> None:
        if self.stall_seconds:
            signal.setitimer(signal.ITIMER_REAL, 0)


class HardWatchdog:
    """Backstop for hangs SIGALRM cannot interrupt (inside C code, or with SIGALRM blocked).

    ``seconds`` after the last arm, faulthandler's watchdog thread dumps every thread's Python stack
    to stderr and exits the process (the runner then retries the shard in a fresh worker). Arming
    starts a thread, so ``kick`` re-arms only when more than ``seconds / 4`` passed since the last
    arm: it fires between ``0.75 * seconds`` and ``seconds`` after the last kick (~0.1 µs per kick).
    """

    def __init__(self, seconds: float | None):
        self.seconds = float(seconds or 0)
        self.every = self.seconds / 4
        self.armed_at = -float("inf")

    def kick(self, force: bool = False) -> None:
        if self.seconds:
            now = time.monotonic()
            if force or now - self.armed_at > self.every:
                faulthandler.dump_traceback_later(self.seconds, exit=True, file=2)
                self.armed_at = now

    def cancel(self) -> None:
        if self.seconds and self.armed_at > -float("inf"):
            faulthandler.cancel_dump_traceback_later()
            self.armed_at = -float("inf")


def _on_alarm(signum, frame):
    raise EpisodeStalled("no step for the stall timeout")


def install_stall_handler() -> None:
    """Make SIGALRM raise ``EpisodeStalled`` in the main thread (call once per worker process)."""
    signal.signal(signal.SIGALRM, _on_alarm)
