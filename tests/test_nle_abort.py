"""nle 1.3.0 aborts the process (SIGABRT) when it ends some games a step cap left mid-prompt; the
CharacterEnv that every collector and eval lane uses leaves such a game with ESCs first. The game is
a real eval game (tests/data/nle_abort_game.json): its 1000 actions end at
"You swap places with your saddled pony.--More--"."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("nle", reason="needs the nethack extra")

GAME = Path(__file__).parent / "data" / "nle_abort_game.json"

REPLAY = """
import json, sys
from trajdata.envs.nethack import CharacterEnv, seed_and_reset
g = json.load(open(sys.argv[1]))
env = CharacterEnv(g["character"], g["fix_moon_phase"])
seed_and_reset(env, g["seeds"]["core"], g["seeds"]["disp"], g["seeds"]["lgen"])
for a in g["actions"]:
    _, _, term, trunc, _ = env.step(a)
    assert not (term or trunc)
msg = bytes(env.unwrapped.last_observation[env.unwrapped._observation_keys.index("message")]).rstrip(b"\\0")
print(msg.decode())
getattr(env, sys.argv[2])(*sys.argv[3:])
env.close()
print("ended")
"""


@pytest.mark.parametrize("how", [["reset"], ["set_character", "tou-hum-neu-fem"], ["close"]])
def test_a_game_nle_cannot_end_mid_prompt_ends_cleanly(how):
    p = subprocess.run([sys.executable, "-c", REPLAY, str(GAME), *how], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, (p.returncode, p.stderr[-2000:])
    assert "swap places with your saddled pony" in p.stdout and p.stdout.rstrip().endswith("ended")
