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


def test_start_time_pin_finds_the_library_by_device_and_inode(tmp_path, monkeypatch):
    """The start-time pin reads NetHack's globals at the load address of nle's memfd copy of
    libnethack.so: a /dev/shm semaphore with the same inode number on another device (which crashed
    an eval worker with SIGSEGV) is not taken for it, and a real env's pinned time reads back."""
    import builtins
    import os

    from nle.env.tasks import NetHackScore

    from trajdata.envs import nethack as nh

    real = os.stat_result((0o100600, 4242, os.makedev(0, 1), 1, 0, 0, 10, 0, 0, 0))
    maps = ("7f0000000000-7f0000001000 rw-s 00000000 00:1b 4242 /dev/shm/sem.mp-x\n"
            "7f1000000000-7f1000100000 r--p 00000000 00:01 4242 /memfd:nle.so (deleted)\n")
    (tmp_path / "maps").write_text(maps)
    opened = builtins.open
    monkeypatch.setattr(builtins, "open", lambda f, *a, **k: opened(tmp_path / "maps" if f == "/proc/self/maps" else f,
                                                                    *a, **k))
    assert nh._load_base(real) == 0x7f1000000000
    with pytest.raises(RuntimeError, match="device 00:02 inode 4242"):
        nh._load_base(os.stat_result((0o100600, 4242, os.makedev(0, 2), 1, 0, 0, 10, 0, 0, 0)))
    monkeypatch.undo()
    env = NetHackScore()
    try:
        nh.seed_and_reset(env, 5, 6)
        assert nh._start_time_cell(env).value == nh._start_time_cell(env).value > 0
    finally:
        env.close()
