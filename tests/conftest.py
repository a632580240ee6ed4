"""Shared session fixtures: one real scripted-NetHack dataset that tests read (copy it before changing it)."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

SCRIPTED = dict(shards=3, episodes_per_shard=2, max_steps=400, chunk_steps=128, seed=7)


@pytest.fixture(scope="session")
def scripted_data(tmp_path_factory) -> Path:
    """Real games of the scripted expert (``SCRIPTED`` settings), episodes spanning several chunks. Read-only."""
    pytest.importorskip("nle", reason="needs nle (the nethack extra)")
    from trajdata.collectors.runner import CollectConfig, ExpertSpec, collect

    out = tmp_path_factory.mktemp("scripted") / "ds"
    collect(CollectConfig(out=str(out), expert=ExpertSpec("trajdata.collectors.nethack:ScriptedExpert"), **SCRIPTED),
            progress=False)
    return out


@pytest.fixture
def scripted_copy(scripted_data, tmp_path) -> Path:
    """A private copy of ``scripted_data`` a test may change."""
    return Path(shutil.copytree(scripted_data, tmp_path / "copy"))


@pytest.fixture(scope="session")
def scripted_cfg() -> dict:
    """The collection settings of ``scripted_data``."""
    return dict(SCRIPTED)


PPO_TINY = dict(game="Breakout", n_envs=2, n_steps=32, batch_size=64, checkpoint_every=64, eval_episodes=1)


@pytest.fixture(scope="session")
def ppo_expert(tmp_path_factory) -> Path:
    """A real (barely trained) SB3 PPO Breakout expert's run directory. Read-only."""
    for mod in ("ale_py", "stable_baselines3", "cv2"):
        pytest.importorskip(mod, reason="needs the atari extra (ale-py, stable-baselines3, opencv)")
    from trajdata.train.ppo import PPOConfig, train_ppo

    out = tmp_path_factory.mktemp("ppo")
    train_ppo(PPOConfig(timesteps=128, **PPO_TINY), out, progress=False)
    return out


@pytest.fixture(scope="session")
def atari_data(ppo_expert, tmp_path_factory) -> Path:
    """Two full Breakout games of ``ppo_expert`` collected through the runner. Read-only."""
    from trajdata.collectors.runner import CollectConfig, ExpertSpec, collect

    out = tmp_path_factory.mktemp("atari") / "ds"
    spec = ExpertSpec("trajdata.collectors.atari:PPOExpert", {"model": str(ppo_expert), "game": "Breakout"})
    collect(CollectConfig(out=str(out), expert=spec, shards=2, episodes_per_shard=1, workers=1, max_steps=None),
            progress=False)
    return out
