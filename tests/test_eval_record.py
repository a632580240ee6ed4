"""`trajdata eval --record DIR` on real NLE: a recorded eval episode replays exactly from its recorded
seeds and actions (every observation field, reward and done at every step, the return), and the
recorded dataset is a dataset like any other (loader, `inspect`, `verify`)."""
from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch")

from trajdata.evaluate import EvalConfig, evaluate  # noqa: E402
from trajdata.format.dataset import Dataset  # noqa: E402

TRAJDATA = [sys.executable, "-m", "trajdata.cli"]


def init_checkpoint(dataset, path: Path, seed: int = 0, **size) -> Path:
    """A freshly initialised (untrained) BC checkpoint for ``dataset``, in the file layout ``train bc`` writes."""
    import torch

    from trajdata.train import checkpoint as ckpt_io
    from trajdata.train.bc import BCConfig, dataset_family, dataset_record, model_config

    ds = Dataset(dataset)
    cfg = BCConfig(dataset=str(dataset), out=str(path.parent), **size)
    family = dataset_family(ds)
    mcfg = model_config(cfg, family, ds)
    torch.manual_seed(seed)
    model = ckpt_io.build_model(family, asdict(mcfg))
    path.parent.mkdir(parents=True, exist_ok=True)
    ckpt_io.save(path, dict(ckpt_io.model_record(model), dataset=dataset_record(ds, cfg, mcfg), train=asdict(cfg),
                            step=0, samples=0, flops=0.0, params=0, budget=None))
    return path


def recorded_steps(root, episode_id: str) -> dict:
    ds = Dataset(root)
    chunks = list(ds.episode(episode_id))
    return {k: np.concatenate([c.fields[k] for c in chunks]) for k in chunks[0].fields}


def replay_nethack(root, row: dict) -> int:
    """Replay one recorded NetHack episode on a fresh env; asserts every step; returns the steps."""
    from trajdata.envs.nethack import CharacterEnv, seed_and_reset

    ds = Dataset(root)
    seeds = row["seeds"] if isinstance(row["seeds"], dict) else json.loads(row["seeds"])
    rec = recorded_steps(root, row["id"])
    env = CharacterEnv(row["character"], ds.info["expert"].get("fix_moon_phase", True))
    try:
        obs, _ = seed_and_reset(env, seeds["core"], seeds["disp"], seeds.get("lgen"))
        total = 0.0
        for t, a in enumerate(rec["action"]):
            for name in ds.schema.observation_names:
                assert np.array_equal(rec[name][t], obs[name]), f"{row['id']} step {t}: {name}"
            obs, r, term, trunc, _ = env.step(int(a))
            assert rec["reward"][t] == np.float32(r) and bool(rec["done"][t]) == bool(term), f"{row['id']} step {t}"
            total += r
        assert total == pytest.approx(row["return"], abs=1e-6)
        return len(rec["action"])
    finally:
        env.close()


@pytest.mark.parametrize("policy", ["bc", "scripted"])
def test_recorded_nethack_eval_replays_exactly(scripted_data, tmp_path, policy):
    """An untrained BC checkpoint (random characters) and the scripted expert (it scores: rewards)."""
    ckpt = init_checkpoint(scripted_data, tmp_path / "run" / "checkpoint.pt", width=64, layers=1, seq_len=16)
    rec = tmp_path / "rec"
    cfg = EvalConfig(episodes=3, max_steps=80 if policy == "bc" else 150, seed=5, envs=2, record=str(rec),
                     record_chunk_steps=32, character="@" if policy == "bc" else None,
                     expert=None if policy == "bc" else policy, out=str(tmp_path / "eval"), update_runs=False)
    doc = evaluate(str(ckpt), cfg, progress=False)[0]
    rows = {r["id"]: r for r in Dataset(rec).index_rows()}
    assert len(rows) == 3 and {e["recorded"] for e in doc["episodes"]} == set(rows)
    for e in doc["episodes"]:
        row = rows[e["recorded"]]
        assert row["seed"] == e["seed"] and row["steps"] == e["steps"] and row["character"] == e["character"]
        assert replay_nethack(rec, row) == e["steps"]
    if policy == "scripted":
        assert any(e["return"] > 0 for e in doc["episodes"])  # so rewards were compared too
    print("\nrecorded returns", [e["return"] for e in doc["episodes"]], "steps", [e["steps"] for e in doc["episodes"]],
          "characters", [e["character"] for e in doc["episodes"]])
    # a dataset like any other: the loader streams every step, inspect and verify read it
    from trajdata.loaders.stream import LoaderConfig, make_dataloader

    loader = make_dataloader(LoaderConfig(root=str(rec), fields=("tty_chars", "action"), batch_size=2, seq_len=32,
                                          shuffle=False))
    assert sum(int(b["mask"].sum()) for b in loader) == sum(e["steps"] for e in doc["episodes"])
    p = subprocess.run([*TRAJDATA, "inspect", str(rec), "--json"], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    s = json.loads(p.stdout)
    assert s["episodes"] == 3 and s["steps"] == sum(e["steps"] for e in doc["episodes"])
    p = subprocess.run([*TRAJDATA, "verify", str(rec)], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    # a rerun with the same --record plays nothing new and leaves the dataset as it was
    again = evaluate(str(ckpt), cfg, progress=False)[0]
    assert [x["return"] for x in again["episodes"]] == [x["return"] for x in doc["episodes"]]
    assert len(Dataset(rec).index_rows()) == 3
