"""The built-in scripted NetHack expert, on real NLE (NetHackChallenge-v0, seeded)."""

import numpy as np
import pytest

nle = pytest.importorskip("nle", reason="needs nle (the nethack extra)")
from nle import nethack as nh  # noqa: E402

from trajdata.envs.nethack import make_nethack_env, seed_and_reset, seeds_from  # noqa: E402
from trajdata.collectors.scripted import (  # noqa: E402
    FLOOR_FOOD_RE, MENU_RE, RETURN, SAFE_CORPSES, ScriptedConfig, ScriptedNetHackExpert,
)

SEEDS = (0, 1, 2, 3)
STEPS = 2000


def _play(env, seed, policy, steps=STEPS, keep_obs=False):
    """Play one seeded game; returns a dict of the trajectory's figures."""
    obs, _ = seed_and_reset(env, *seeds_from(seed))
    if isinstance(policy, ScriptedNetHackExpert):
        policy.reset(obs, seed)
    actions, screens, kept = [], [], []
    score = depth = 0
    for _ in range(steps):
        if keep_obs:
            kept.append({k: v.copy() for k, v in obs.items()})
        a = policy.act(obs)
        actions.append(a)
        screens.append(obs["tty_chars"].tobytes())
        obs, _, term, trunc, _ = env.step(a)
        if term or trunc:
            break
        score = max(score, int(obs["blstats"][nh.NLE_BL_SCORE]))
        depth = max(depth, int(obs["blstats"][nh.NLE_BL_DEPTH]))
    return {"actions": actions, "screens": screens, "obs": kept, "score": score, "depth": depth}


class _Random:
    def __init__(self, seed):
        self.rng = np.random.default_rng(seed)

    def act(self, obs):
        return int(self.rng.integers(len(nh.ACTIONS)))


@pytest.fixture(scope="module")
def env():
    e = make_nethack_env()
    yield e
    e.close()


@pytest.fixture(scope="module")
def games(env):
    expert = ScriptedNetHackExpert()
    return {s: _play(env, s, expert, keep_obs=(s == SEEDS[0])) for s in SEEDS}


def test_makes_progress_and_beats_random(env, games):
    progressed = [g["depth"] > 1 or g["score"] > 0 for g in games.values()]
    assert sum(progressed) >= len(SEEDS) - 1, {s: (g["depth"], g["score"]) for s, g in games.items()}
    assert sum(g["depth"] > 1 for g in games.values()) >= len(SEEDS) // 2
    random_scores = [_play(env, s, _Random(s))["score"] for s in SEEDS]
    ours = np.mean([g["score"] for g in games.values()])
    print(f"\nmean score over {STEPS} steps: scripted {ours:.0f}, random {np.mean(random_scores):.0f}; "
          f"depths {[g['depth'] for g in games.values()]}")
    assert ours > np.mean(random_scores) + 50


def test_no_action_repeated_on_unchanged_screen(games):
    limit = ScriptedConfig().max_repeats
    for seed, g in games.items():
        run = longest = 1
        for i in range(1, len(g["actions"])):
            same = g["screens"][i] == g["screens"][i - 1] and g["actions"][i] == g["actions"][i - 1]
            run = run + 1 if same else 1
            longest = max(longest, run)
        assert longest <= limit, f"seed {seed}: same action on an unchanged screen {longest} times"


def test_answers_more_prompts(games):
    for g in games.values():
        more = [a for s, a in zip(g["screens"], g["actions"]) if b"--More--" in s]
        assert more, "expected some --More-- prompts in 2000 steps"
        assert np.mean([a == RETURN for a in more]) > 0.9


def test_deterministic_given_seed_and_observations(games):
    g = games[SEEDS[0]]
    replay = ScriptedNetHackExpert()
    replay.reset(g["obs"][0], SEEDS[0])
    assert [replay.act(o) for o in g["obs"]] == g["actions"]  # the live run saw NLE's reused buffers


def test_same_seed_same_game(env, games):
    again = _play(env, SEEDS[0], ScriptedNetHackExpert(), steps=500)
    assert again["actions"] == games[SEEDS[0]]["actions"][:500]


def test_closes_menus_and_refuses_unknown_questions(env):
    expert = ScriptedNetHackExpert()
    obs, _ = seed_and_reset(env, *seeds_from(5))
    expert.reset(obs, 5)
    while b"--More--" in obs["tty_chars"].tobytes():
        obs, *_ = env.step(RETURN)
    turn = int(obs["blstats"][nh.NLE_BL_TIME])
    obs, *_ = env.step(nh.ACTIONS.index(ord("i")))
    assert MENU_RE.search(obs["tty_chars"].tobytes())
    obs, *_ = env.step(expert.act(obs))
    assert not MENU_RE.search(obs["tty_chars"].tobytes())
    obs, *_ = env.step(nh.ACTIONS.index(ord("p") | 0x80))
    assert b"Are you sure you want to pray?" in obs["tty_chars"].tobytes() and obs["misc"][0]
    obs, *_ = env.step(expert.act(obs))
    assert not obs["misc"].any()
    assert int(obs["blstats"][nh.NLE_BL_TIME]) == turn  # did not pray


def test_corpse_rules():
    assert {b"newt", b"jackal", b"floating eye"} <= SAFE_CORPSES
    assert not {b"kobold", b"cockatrice", b"human zombie", b"werejackal", b"kitten", b"gnome lord"} & SAFE_CORPSES
    m = FLOOR_FOOD_RE.search(b"There is a partly eaten jackal corpse here; eat it? [ynq] (n)")
    assert m and m.group(1) == b"jackal"
    assert FLOOR_FOOD_RE.search(b"There are 2 newt corpses here; eat one? [ynq] (n)").group(1) == b"newt"

