"""Atari PPO experts: tiny real SB3 training on real ALE, collection through the runner, exact replay."""
import json
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("ale_py", reason="needs the atari extra (ale-py)")
pytest.importorskip("stable_baselines3", reason="needs the atari extra (stable-baselines3)")
pytest.importorskip("cv2", reason="needs opencv-python-headless (SB3's WarpFrame)")

from click.testing import CliRunner  # noqa: E402

from trajdata.cli.main import cli  # noqa: E402
from trajdata.collectors.atari import PPOExpert, load_policy  # noqa: E402
from trajdata.envs.atari import GAMES, evaluate, replay, resolve_game  # noqa: E402
from trajdata.collectors.runner import CollectConfig, ExpertSpec, collect  # noqa: E402
from trajdata.errors import ConfigError  # noqa: E402
from trajdata.format.dataset import Dataset  # noqa: E402
from trajdata.train.ppo import PPOConfig, parse_count, train_ppo  # noqa: E402

TINY = dict(game="Breakout", n_envs=2, n_steps=32, batch_size=64, checkpoint_every=64, eval_episodes=1)


@pytest.fixture(scope="module")
def run_dir(ppo_expert, tmp_path_factory):
    """A private copy of the session's expert (a test here continues training it)."""
    import shutil

    return Path(shutil.copytree(ppo_expert, tmp_path_factory.mktemp("ppo-own") / "run"))


def _episode(ds, row):
    chunks = list(ds.episode(row["id"]))
    return {k: np.concatenate([c.fields[k] for c in chunks]) for k in chunks[0].fields}


def test_game_names_and_counts():
    assert resolve_game("breakout") == "Breakout"
    assert resolve_game("Q*bert") == "Qbert"
    assert resolve_game("SpaceInvadersNoFrameskip-v4") == "SpaceInvaders"
    assert resolve_game("ALE/BankHeist-v5") == "BankHeist"
    with pytest.raises(ConfigError, match="valid games: BattleZone, .*Breakout"):
        resolve_game("Pong")
    assert [parse_count(s) for s in ("10M", "500k", "1e6", "2.5M", "1_000", 7)] == [10**7, 500_000, 10**6, 2_500_000, 1000, 7]
    for bad in ("1x", "", "1.5"):
        with pytest.raises(ConfigError):
            parse_count(bad)


def test_all_paper_games_make_envs():
    from trajdata.envs.atari import make_play_env

    for g in GAMES:
        env = make_play_env(g)
        frame, _ = env.reset(seed=1)
        assert frame.shape == (84, 84, 1) and frame.dtype == np.uint8
        env.close()


def test_train_save_reload_resume(run_dir):
    files = {p.name for p in run_dir.iterdir()}
    assert {"model.zip", "config.json", "eval.json", "progress.csv", "checkpoints"} <= files
    cfg = json.loads((run_dir / "config.json").read_text())
    assert cfg["game"] == "Breakout" and cfg["env_id"] == "BreakoutNoFrameskip-v4" and cfg["ent_coef"] == 0.01
    ev = json.loads((run_dir / "eval.json").read_text())
    assert ev["timesteps"] == 128 and ev["episodes"] == 1 and ev["lengths"][0] > 0
    policy = load_policy(run_dir)
    assert tuple(policy.observation_space.shape) == (4, 84, 84) and policy.action_space.n == 4

    # same command again with a larger budget continues from the newest checkpoint
    r = train_ppo(PPOConfig(timesteps=192, **TINY), run_dir, progress=False)
    assert r["timesteps"] == 192
    rows = (run_dir / "progress.csv").read_text().splitlines()[1:]
    assert [int(x.split(",")[0]) for x in rows] == [64, 128, 192]
    with pytest.raises(ConfigError, match="seed"):
        train_ppo(PPOConfig(timesteps=192, seed=5, **TINY), run_dir, progress=False)


@pytest.fixture(scope="module")
def collected(run_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("ppo-data") / "ds"
    spec = ExpertSpec("trajdata.collectors.atari:PPOExpert", {"model": str(run_dir), "game": "Breakout"})
    cfg = CollectConfig(out=str(out), expert=spec, shards=2, episodes_per_shard=1, workers=2, max_steps=None)
    return cfg, collect(cfg, progress=False)


def test_collect_and_replay_exact(collected):
    cfg, r = collected
    out = Path(cfg.out)
    assert r["episodes_total"] == 2 and r["shards_written"] == 2
    ds = Dataset(out)
    assert ds.info["schema"] == "atari" and ds.info["expert"]["game"] == "Breakout"
    rows = ds.index_rows()
    for row in rows:
        assert row["status"] == "complete" and row["lives_left"] == 0
        ep = _episode(ds, row)
        n = row["steps"]
        assert ep["frame"].shape == (n, 84, 84) and ep["frame"].dtype == np.uint8
        assert row["return"] == row["score"] == pytest.approx(float(ep["reward"].sum()))
        assert ep["done"].sum() == 1 and ep["done"][-1]
        assert ep["lives"][0] == 5 and ep["lives"][-1] == 1
        # on every life loss the expert plays the reset actions SB3 applied in training
        for i in np.flatnonzero(np.diff(ep["lives"].astype(int)) < 0) + 1:
            assert list(ep["action"][i:i + 3]) == [0, 1, 2]
        frames, lives, rewards, dones = zip(*replay("Breakout", row["seed"], ep["action"]))
        assert np.array_equal(np.stack(frames), ep["frame"])
        assert np.array_equal(lives, ep["lives"]) and np.array_equal(rewards, ep["reward"]) and np.array_equal(dones, ep["done"])
    assert rows[0]["seed"] != rows[1]["seed"]
    # a wrong seed does not replay: the test above can fail
    wrong = np.stack([f for f, *_ in replay("Breakout", rows[0]["seed"] + 1, _episode(ds, rows[0])["action"][:60])])
    assert not np.array_equal(wrong, _episode(ds, rows[0])["frame"][:60])

    r2 = collect(cfg, progress=False)  # the same command again: nothing left to do
    assert r2["shards_skipped"] == 2 and r2["shards_written"] == 0


def test_expert_checks_game_and_eval_random():
    with pytest.raises(Exception, match="not found"):
        PPOExpert("/nonexistent/model.zip", "Breakout")
    ev = evaluate(None, "Breakout", episodes=2, seed=3, progress=False)
    assert ev["episodes"] == 2 and all(n > 0 for n in ev["lengths"]) and ev["mean_return"] >= 0


def test_expert_rejects_other_game(run_dir):
    with pytest.raises(ConfigError, match="trained on Breakout"):
        PPOExpert(run_dir, "Boxing")
    assert PPOExpert(run_dir).game == "Breakout"


def test_cli_errors_are_one_line(run_dir, tmp_path):
    res = CliRunner().invoke(cli, ["train", "ppo", "--game", "Pong", "--timesteps", "1k", "--out", str(tmp_path / "x")])
    assert res.exit_code == 1 and res.output.strip().startswith("trajdata: error: unknown game 'Pong'")
    res = CliRunner().invoke(cli, ["collect", "ppo", "--model", str(run_dir), "--game", "Qbert", "--out", str(tmp_path / "d")])
    assert res.exit_code == 1 and "trained on Breakout" in res.output


def test_player_restarts_stack_after_life_loss_like_training():
    from trajdata.envs.atari import AtariPlayer

    p = AtariPlayer(None, n_actions=4, fire=True)
    f = [np.full((84, 84, 1), i + 1, np.uint8) for i in range(7)]
    p.begin(lives=5, seed=0)
    p.act(f[0], 5)
    assert list(p.stack[:, 0, 0]) == [0, 0, 0, 1]
    p.act(f[1], 5)
    assert list(p.stack[:, 0, 0]) == [0, 0, 1, 2]
    assert [p.act(f[2], 4), p.act(f[3], 4), p.act(f[4], 4)] == [0, 1, 2]  # NOOP, FIRE, 2 as SB3's reset did
    assert list(p.stack[:, 0, 0]) == [0, 3, 4, 5]  # the life restarted at f[2]; reset-action frames stack
    p.act(f[5], 4)
    assert list(p.stack[:, 0, 0]) == [3, 4, 5, 6]
    p.act(f[6], 0)  # game over: a last life start, nothing queued
    assert list(p.stack[:, 0, 0]) == [0, 0, 0, 7] and not p.queue


def test_loader_stacks_equal_the_stacks_the_player_acted_on(collected):
    """For recorded PPO games: replaying each with its seed and actions through the expert's player gives,
    at every step, exactly the stack the loader (frame_stack=4) delivers for that step."""
    from trajdata.envs.atari import AtariPlayer, has_fire, lives, make_play_env
    from trajdata.loaders import LoaderConfig, TrajectoryStream

    cfg, _ = collected
    ds = Dataset(cfg.out)
    played = {}
    env = make_play_env("Breakout")
    for row in ds.index_rows():
        actions = _episode(ds, row)["action"]
        player = AtariPlayer(None, env.action_space.n, has_fire(env))
        seen = []
        player.act_fn = lambda stack: (seen.append(stack.copy()), int(actions[len(seen) - 1]))[1]
        frame, _ = env.reset(seed=row["seed"])
        player.begin(lives(env), row["seed"])
        for a in actions:
            n = len(seen)
            assert player.act(frame, lives(env)) == a
            if len(seen) == n:  # a queued reset action: the policy was not asked; the stack is still this step's input
                seen.append(player.stack.copy())
            frame, *_ = env.step(int(a))
        played[row["id"]] = np.stack(seen)
    env.close()
    stream = TrajectoryStream(LoaderConfig(cfg.out, fields=("action",), batch_size=2, seq_len=97, frame_stack=4,
                                           shuffle=False))
    checked = 0
    for b in stream:
        m = b["mask"].numpy()
        for e, t, stack in zip(b["episode"].numpy()[m], b["step"].numpy()[m], b["frame"].numpy()[m]):
            np.testing.assert_array_equal(stack, played[stream.episode_ids[e]][t], err_msg=f"episode {e} step {t}")
            checked += 1
    assert checked == sum(len(v) for v in played.values()) > 100
    assert any(not s[:-1].any() and s[-1].any() for v in played.values() for s in v[1:])  # life restarts seen
