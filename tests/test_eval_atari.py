"""`trajdata eval` on real ALE Breakout with a BC CNN trained briefly on the PPO expert's games:
reruns and 1 vs 2 workers agree, the PPO expert plays the same seeds, a recorded episode replays
exactly, the policy's frame stacks are the loader's, and an env that does not match is one line."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
for _mod in ("ale_py", "stable_baselines3", "cv2"):
    pytest.importorskip(_mod, reason="needs the atari extra (ale-py, stable-baselines3, opencv)")

from trajdata.evaluate import EvalConfig, evaluate  # noqa: E402
from trajdata.format.dataset import Dataset  # noqa: E402
from trajdata.train.bc import BCConfig, train  # noqa: E402

TRAJDATA = [sys.executable, "-m", "trajdata.cli"]
KEY = lambda d: [(e["seed"], e["return"], e["steps"]) for e in d["episodes"]]  # noqa: E731


@pytest.fixture(scope="module")
def atari_ckpt(atari_data, tmp_path_factory):
    run = tmp_path_factory.mktemp("atari-bc") / "run"
    train(BCConfig(dataset=str(atari_data), out=str(run), width=8, seq_len=16, batch_size=2, lr=3e-3, samples=512,
                   val_fraction=0.01, progress=False, tensorboard=False))
    return run / "checkpoint.pt"


def test_bc_reruns_and_workers_agree(atari_ckpt, tmp_path):
    cfg = dict(episodes=3, max_steps=120, seed=2, envs=2, unit_episodes=2, update_runs=False)
    one = evaluate(str(atari_ckpt), EvalConfig(workers=1, out=str(tmp_path / "a"), **cfg), progress=False)[0]
    again = evaluate(str(atari_ckpt), EvalConfig(workers=1, out=str(tmp_path / "b"), **cfg), progress=False)[0]
    two = evaluate(str(atari_ckpt), EvalConfig(workers=2, out=str(tmp_path / "c"), **cfg), progress=False)[0]
    assert len(KEY(one)) == 3 and KEY(one) == KEY(again) == KEY(two)
    assert one["env"]["game"] == "Breakout" and all(0 < e["steps"] <= 120 for e in one["episodes"])
    print("\nBC Breakout returns", KEY(one))


def test_ppo_expert_on_the_same_seeds(atari_ckpt, ppo_expert, tmp_path):
    cfg = dict(episodes=3, max_steps=120, seed=2, envs=2, out=str(tmp_path), update_runs=False)
    bc = evaluate(str(atari_ckpt), EvalConfig(**cfg), progress=False)[0]
    ppo = evaluate(str(atari_ckpt), EvalConfig(expert=f"ppo:{ppo_expert}", **cfg), progress=False)[0]
    again = evaluate(None, EvalConfig(expert=f"ppo:{ppo_expert}", **dict(cfg, out=str(tmp_path / "x"))),
                     progress=False)[0]
    assert [e["seed"] for e in bc["episodes"]] == [e["seed"] for e in ppo["episodes"]]
    assert ppo["name"].startswith("expert-ppo-") and ppo["identity"]["expert"] == "ppo"
    assert KEY(ppo) == KEY(again)  # the same seeds without the checkpoint: the same games
    print("\nPPO Breakout returns", KEY(ppo))


def test_recorded_episode_replays_exactly(atari_ckpt, tmp_path):
    from trajdata.envs.atari import replay

    rec = tmp_path / "rec"
    doc = evaluate(str(atari_ckpt), EvalConfig(episodes=2, max_steps=150, seed=4, envs=2, record=str(rec),
                                               out=str(tmp_path / "e"), update_runs=False), progress=False)[0]
    ds = Dataset(rec)
    rows = {r["id"]: r for r in ds.index_rows()}
    env = doc["env"]
    for e in doc["episodes"]:
        row = rows[e["recorded"]]
        chunks = list(ds.episode(row["id"]))
        got = {k: np.concatenate([c.fields[k] for c in chunks]) for k in ("frame", "lives", "action", "reward", "done")}
        assert len(got["action"]) == e["steps"] == row["steps"]
        total = 0.0
        for t, (frame, lives, r, done) in enumerate(replay(env["game"], row["seed"], got["action"], env["noop_max"],
                                                           env["frame_skip"])):
            assert np.array_equal(frame, got["frame"][t]) and lives == got["lives"][t], f"step {t}"
            assert np.float32(r) == got["reward"][t] and done == bool(got["done"][t]), f"step {t}"
            total += r
        assert total == e["return"]
    for cmd in (["inspect", str(rec), "--json"], ["verify", str(rec)]):
        p = subprocess.run([*TRAJDATA, *cmd], capture_output=True, text=True)
        assert p.returncode == 0, p.stderr
    assert json.loads(subprocess.run([*TRAJDATA, "inspect", str(rec), "--json"], capture_output=True,
                                     text=True).stdout)["episodes"] == 2


def test_policy_frame_stacks_are_the_loaders(atari_ckpt, atari_data):
    """BCPolicy stacks frames step by step (FrameStack) as the training loader stacks them: the same
    logits over both games played one after the other in one lane."""
    from trajdata.evaluate.policy import BCPolicy
    from trajdata.loaders.stream import LoaderConfig, make_dataloader
    from trajdata.train.checkpoint import load_model

    model, ckpt = load_model(atari_ckpt)
    loader = make_dataloader(LoaderConfig(root=str(atari_data), fields=("frame", "lives", "action"), batch_size=1,
                                          seq_len=64, shuffle=False, frame_stack=4))
    ds = Dataset(atari_data)
    raw = []
    for row in ds.index_rows():
        chunks = list(ds.episode(row["id"], ["frame", "lives"]))
        raw.append({k: np.concatenate([c.fields[k] for c in chunks]) for k in ("frame", "lives")})
    ref = []
    with torch.no_grad():
        for b in loader:
            logits, _ = model({"frame": b["frame"]})
            ref.append(logits[0][b["mask"][0]].numpy())
    ref = np.concatenate(ref)
    policy = BCPolicy(model, ckpt)
    policy.start(1)
    got = []
    for i, ep in enumerate(raw):
        policy.begin(0, i)
        for t in range(len(ep["frame"])):
            got.append(policy.logits([0], [{"frame": ep["frame"][t], "lives": ep["lives"][t]}])[0])
            policy.played([0], [0])
    got = np.stack(got)
    assert got.shape == ref.shape and len(got) == sum(len(ep["frame"]) for ep in raw) > 8
    assert np.allclose(got, ref, rtol=1e-5, atol=1e-5), np.abs(got - ref).max()
    print(f"\n{len(got)} steps of {len(raw)} games, logits agree to {np.abs(got - ref).max():.1e}")


def test_env_that_does_not_match_is_one_line(atari_ckpt, scripted_data, tmp_path):
    from test_eval_record import init_checkpoint

    nethack = init_checkpoint(scripted_data, tmp_path / "nh" / "checkpoint.pt", width=64, layers=1, seq_len=16)
    cases = [
        ([str(nethack), "--env", "Breakout"], "does not match"),
        ([str(atari_ckpt), "--env", "nethack"], "does not match"),
        ([str(atari_ckpt), "--env", "Qbert"], "does not match"),
        ([str(atari_ckpt), "--expert", "scripted"], "plays NetHack"),
        ([str(atari_ckpt), "--character", "@"], "character is for NetHack"),
        ([str(nethack), "--expert", "ppo:missing.zip"], "plays Atari"),
    ]
    for args, msg in cases:
        p = subprocess.run([*TRAJDATA, "eval", *args, "--episodes", "1", "--no-progress", "--out", str(tmp_path / "o")],
                           capture_output=True, text=True)
        assert p.returncode == 1 and msg in p.stderr and p.stderr.count("\n") == 1, (args, p.stderr)
