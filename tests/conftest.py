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
