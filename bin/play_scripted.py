"""Play NetHack games with the built-in scripted expert; print the final screen and figures.

    python bin/play_scripted.py --seed 0 --steps 5000 [--games 3] [--quiet] [--random]

--random plays uniformly random actions instead (the anchor the expert must beat).
"""

import argparse
import time

import numpy as np
from nle import nethack as nh

from trajdata.envs.nethack import make_nethack_env, seed_and_reset, seeds_from
from trajdata.collectors.scripted import ScriptedNetHackExpert


class RandomPolicy:
    def reset(self, obs, seed):
        self.rng = np.random.default_rng(seed)

    def act(self, obs):
        return int(self.rng.integers(len(nh.ACTIONS)))


def play(env, expert, seed: int, steps: int) -> dict:
    obs, _ = seed_and_reset(env, *seeds_from(seed))
    expert.reset(obs, seed)
    act_time, n, done, max_depth, score, turns = 0.0, 0, False, 1, 0, 0
    t0 = time.perf_counter()
    while n < steps and not done:
        t = time.perf_counter()
        a = expert.act(obs)
        act_time += time.perf_counter() - t
        last = obs
        obs, _, term, trunc, _ = env.step(a)
        done = term or trunc
        n += 1
        bl = obs["blstats"]
        max_depth = max(max_depth, int(bl[nh.NLE_BL_DEPTH]))
        score, turns = max(score, int(bl[nh.NLE_BL_SCORE])), max(turns, int(bl[nh.NLE_BL_TIME]))
    wall = time.perf_counter() - t0
    return {
        "seed": seed, "steps": n, "died": bool(done and n < steps),
        "score": score, "depth": max_depth, "turns": turns,
        "steps_per_s": round(n / wall), "act_ms": round(1e3 * act_time / n, 3),
        "screen": "\n".join(bytes(r).decode("latin-1") for r in (last if done else obs)["tty_chars"]),
    }


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=5000)
    p.add_argument("--games", type=int, default=1)
    p.add_argument("--quiet", action="store_true", help="don't print the final screens")
    p.add_argument("--random", action="store_true", help="uniformly random actions instead")
    args = p.parse_args()
    env = make_nethack_env()
    expert = RandomPolicy() if args.random else ScriptedNetHackExpert()
    rows = []
    for s in range(args.seed, args.seed + args.games):
        r = play(env, expert, s, args.steps)
        if not args.quiet:
            print(r.pop("screen"))
        r.pop("screen", None)
        print(r)
        rows.append(r)
    if len(rows) > 1:
        print({k: float(np.mean([r[k] for r in rows])) for k in ("score", "depth", "steps_per_s", "act_ms")})


if __name__ == "__main__":
    main()
