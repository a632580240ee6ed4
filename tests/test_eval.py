"""`trajdata eval` on real NLE with checkpoints written by `train bc`: fixed seeds, reruns, 1 vs 2
workers, baselines, the runs table, bad input."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from trajdata.evaluate import EvalConfig, evaluate
from trajdata.train import checkpoint as ckpt_io
from trajdata.train.bc import BCConfig, train

TRAJDATA = [sys.executable, "-m", "trajdata.cli"]


@pytest.fixture(scope="module")
def bc_run(scripted_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("bc") / "run"
    per = 6 * 188_793
    train(BCConfig(dataset=str(scripted_data), out=str(out), width=64, layers=1, seq_len=64, batch_size=4, lr=3e-3,
                   val_fraction=0.3, budgets=(1000 * per, 3000 * per), progress=False))
    return out


def test_fixed_seeds_rerun_and_workers_agree(bc_run, tmp_path):
    cfg = dict(episodes=4, max_steps=150, seed=3, envs=2, out=str(tmp_path / "a"), update_runs=False)
    one = evaluate(str(bc_run), EvalConfig(workers=1, **cfg), progress=False)[0]
    again = evaluate(str(bc_run), EvalConfig(workers=1, **cfg), progress=False)[0]
    two = evaluate(str(bc_run), EvalConfig(workers=2, **dict(cfg, out=str(tmp_path / "b"))), progress=False)[0]
    key = lambda d: [(e["seed"], e["return"], e["steps"]) for e in d["episodes"]]  # noqa: E731
    assert len(key(one)) == 4 and key(one) == key(again) == key(two)
    assert all(e["steps"] <= 150 for e in one["episodes"])


def test_ray_backend_plays_the_same_episodes(bc_run, tmp_path):
    """`eval --backend ray` (a local Ray instance, started quietly and shut down after) plays what local workers play."""
    ray = pytest.importorskip("ray")
    cfg = dict(episodes=4, max_steps=150, seed=3, envs=2, workers=2, update_runs=False)
    local = evaluate(str(bc_run), EvalConfig(out=str(tmp_path / "a"), **cfg), progress=False)[0]
    on_ray = evaluate(str(bc_run), EvalConfig(out=str(tmp_path / "b"), backend="ray", **cfg), progress=False)[0]
    key = lambda d: [(e["seed"], e["return"], e["steps"]) for e in d["episodes"]]  # noqa: E731
    assert len(key(on_ray)) == 4 and key(on_ray) == key(local)
    assert not ray.is_initialized()


def test_all_snapshots_fill_the_runs_table_once(bc_run):
    for _ in range(2):
        docs = evaluate(str(bc_run), EvalConfig(all=True, episodes=3, max_steps=100, seed=0, envs=3), progress=False)
    assert len(docs) == 2
    rows = ckpt_io.read_runs(bc_run / "runs.csv")
    assert len(rows) == 2 and all(r["episodes"] == "3" and r["return"] != "" for r in rows)


def test_expert_and_random_on_the_same_seeds(bc_run, tmp_path):
    cfg = dict(episodes=4, max_steps=300, seed=11, envs=4, out=str(tmp_path), update_runs=False)
    exp = evaluate(str(bc_run), EvalConfig(expert="scripted", **cfg), progress=False)[0]
    rnd = evaluate(str(bc_run), EvalConfig(expert="random", **cfg), progress=False)[0]
    seeds = lambda d: [e["seed"] for e in d["episodes"]]  # noqa: E731
    assert seeds(exp) == seeds(rnd)
    print(f"\nscripted {exp['summary']['mean']:.1f} ± {exp['summary']['se']:.1f}, "
          f"random {rnd['summary']['mean']:.1f} ± {rnd['summary']['se']:.1f}")
    assert exp["summary"]["mean"] > rnd["summary"]["mean"]


def test_cli_and_bad_input(bc_run, tmp_path):
    p = subprocess.run([*TRAJDATA, "eval", str(bc_run), "--budget", "1e99", "--episodes", "1"],
                       capture_output=True, text=True)
    assert p.returncode == 1 and "no snapshot for budget" in p.stderr and p.stderr.count("\n") == 1, p.stderr
    p = subprocess.run([*TRAJDATA, "eval", str(tmp_path / "missing"), "--episodes", "1"], capture_output=True, text=True)
    assert p.returncode == 1 and "missing" in p.stderr and p.stderr.count("\n") == 1, p.stderr
    p = subprocess.run([*TRAJDATA, "eval", str(bc_run), "--episodes", "2", "--max-steps", "50", "--no-progress",
                        "--out", str(tmp_path / "e"), "--no-update-runs"], capture_output=True, text=True)
    assert p.returncode == 0 and "over 2 episodes" in p.stdout, p.stderr
    files = list((tmp_path / "e").glob("*.json"))
    assert files and json.loads(files[0].read_text())["summary"]["episodes"] == 2


def test_cpu_proxy_trains_and_plays_from_the_cli(scripted_data, tmp_path):
    """`train bc --encoders cpu`: its N in runs.csv, a snapshot that loads as the proxy and plays real NLE."""
    from trajdata.models.flops import effective_params
    from trajdata.models.nethack import NetHackConfig

    n = effective_params(NetHackConfig(width=32, layers=1, encoders="cpu"))
    assert n == effective_params(NetHackConfig(width=32, layers=1)) - 256 * 32
    run = tmp_path / "run"
    p = subprocess.run([*TRAJDATA, "train", "bc", str(scripted_data), "--out", str(run), "--width", "32", "--layers", "1",
                        "--encoders", "cpu", "--seq-len", "32", "--batch-size", "2", "--val-fraction", "0.3",
                        "--budgets", f"{6 * n * 300:g}", "--no-progress"], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    row = ckpt_io.read_runs(run / "runs.csv")[0]
    assert int(row["params"]) == n and float(row["loss"]) > 0
    model, _ = ckpt_io.load_model(run / row["checkpoint"])
    assert model.cfg.encoders == "cpu" and model.mixer.net[0].in_features == 1473
    p = subprocess.run([*TRAJDATA, "eval", str(run), "--episodes", "2", "--max-steps", "30", "--envs", "2",
                        "--no-progress", "--out", str(tmp_path / "e"), "--no-update-runs"], capture_output=True, text=True)
    assert p.returncode == 0 and "over 2 episodes" in p.stdout, p.stderr
    p = subprocess.run([*TRAJDATA, "train", "bc", str(scripted_data), "--out", str(tmp_path / "r2"), "--encoders", "gpu"],
                       capture_output=True, text=True)
    assert p.returncode != 0 and "gpu" in p.stderr and p.stderr.count("\n") == 1, p.stderr
