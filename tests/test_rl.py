"""`train rl` with the real engine (TorchRL actors on real NLE games, torch learner) at tiny sizes:
budget snapshots and the 8ND count, resume, BC -> RL init, kickstarting, bad input, eval of RL snapshots."""
from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="needs torch (the train extra)")
pytest.importorskip("torchrl", reason="needs torchrl (the rl extra)")
pytest.importorskip("nle", reason="needs nle (the nethack extra)")

from trajdata.config import file_sha256  # noqa: E402
from trajdata.errors import TrajdataError  # noqa: E402
from trajdata.models import flops as counting  # noqa: E402
from trajdata.models.nethack import NetHackConfig, random_batch  # noqa: E402
from trajdata.rl.agent import RLAgent, action_index, bc_snapshot, init_from_bc  # noqa: E402
from trajdata.rl.config import ENV_ACTIONS, RLConfig  # noqa: E402
from trajdata.rl.env import env_actions  # noqa: E402
from trajdata.rl.shape import effective_params  # noqa: E402
from trajdata.rl.train import train  # noqa: E402
from trajdata.train import checkpoint as ckpt_io  # noqa: E402

TRAJDATA = [sys.executable, "-m", "trajdata.cli"]
# 2 games x 16 steps = 32 env steps per learner step; N = 29,032 at width 16, so 8N x 32 = 7.43e6 FLOPs a step
TINY = dict(width=16, envs=2, unroll=16, actors=0, progress=False, log_every=1, checkpoint_every=3, seed=3)
STEP_FLOPS = 8 * 29_032 * 32
BUDGETS = (2.2e7, 4.4e7)  # reached at learner steps 3 (D = 96) and 6 (D = 192)


def cli(*args):
    return subprocess.run([*TRAJDATA, *map(str, args)], capture_output=True, text=True)


def metrics(run: Path) -> list[dict]:
    return [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def rl_run(tmp_path_factory) -> Path:
    """An uninterrupted tiny run: 8 learner steps, snapshots at BUDGETS. Read-only."""
    out = tmp_path_factory.mktemp("rl") / "a"
    r = train(RLConfig(out=str(out), budgets=BUDGETS, steps=256, **TINY))
    assert r["step"] == 8 and r["samples"] == 256 and not r["resumed"]
    return out


@pytest.fixture(scope="module")
def bc_lstm(scripted_data, tmp_path_factory) -> Path:
    """A BC run of the LSTM-core NetHack family (its rolling checkpoint). Read-only."""
    from trajdata.train.bc import BCConfig, train as train_bc

    out = tmp_path_factory.mktemp("bc") / "lstm"
    train_bc(BCConfig(dataset=str(scripted_data), out=str(out), core="lstm", width=16, layers=1, seq_len=32,
                      batch_size=2, lr=3e-3, samples=128, val_fraction=0.3, progress=False))
    return out


def test_effective_params_are_mixer_core_and_heads():
    cfg = NetHackConfig(width=16, layers=1, core="lstm", n_actions=23)
    agent = RLAgent(cfg)
    counted = counting.count_params(agent.policy.mixer, agent.policy.core, agent.policy.head, agent.baseline)
    assert effective_params(cfg) == counted == 29_032
    assert effective_params(cfg) == counting.effective_params(cfg) + 16 + 1


def test_run_shape_counts_8nd_with_bcs_run_shape():
    """RL's shape is train.shape's RunShape with the nethack-rl count: N with the value head, 8N per
    env step, envs x unroll env steps per learner step, budgets at ceil(C / 8N)."""
    from trajdata.rl.shape import run_shape

    shape = run_shape(RLConfig(out="-", width=16, envs=2, unroll=16, budgets=BUDGETS))
    assert shape.family == "nethack-rl" and shape.model.core == "lstm" and shape.model.n_actions == 23
    assert shape.params == 29_032 and shape.flops_per_sample == 8 * 29_032 and shape.samples_per_step == 32
    assert shape.budget_samples == [(b, -(-int(b) // (8 * 29_032))) for b in BUDGETS]
    assert run_shape(RLConfig(out="-", params="100k")).params == pytest.approx(100_000, rel=0.05)
    assert ENV_ACTIONS == {e: len(env_actions(e)) for e in ENV_ACTIONS}


def _unroll_batch(agent, E=3, T=7, seed=0):
    """A fixed unroll batch in ``learner_batch``'s layout: games ending (terminated or capped) inside it,
    behaviour log-probabilities off the learner's (so V-trace's weights are clipped both ways)."""
    g = torch.Generator().manual_seed(seed)
    cfg = agent.cfg
    b = {k: v for k, v in random_batch(cfg, E, T + 1, seed=seed).items() if k in agent.fields}
    b["prev_action"] = torch.randint(0, cfg.n_actions, (E, T + 1), generator=g)
    b["reset"] = torch.zeros(E, T + 1, dtype=torch.bool)
    b["reset"][:, 0] = True
    b["reset"][1, 4] = True
    b["hidden"] = agent.initial_hidden(E)
    b["action"] = torch.randint(0, cfg.n_actions, (E, T), generator=g)
    b["logp"] = -torch.rand(E, T, generator=g) * 4
    b["reward"] = torch.randint(0, 30, (E, T), generator=g).float()
    b["done"] = torch.zeros(E, T, dtype=torch.bool)
    b["terminated"] = torch.zeros(E, T, dtype=torch.bool)
    b["done"][1, 3] = b["terminated"][1, 3] = True  # a death inside the unroll
    b["done"][2, 5] = True  # a game capped inside the unroll
    b["episode_return"] = torch.zeros(E, T)
    return b


def _torchbeast_loss(agent, b, cfg):
    """The IMPALA loss as phase 1 wrote it by hand (torchbeast's three sums) around TorchRL's V-trace."""
    from torchrl.objectives.value.functional import vtrace_advantage_estimate

    E, T = b["action"].shape
    logits, values, _ = agent.unroll({k: b[k] for k in agent.fields}, b["prev_action"], b["reset"], b["hidden"])
    logp_all = torch.log_softmax(logits[:, :T].float(), -1)
    logp = logp_all.gather(-1, b["action"].long()[..., None])[..., 0]
    v = values[:, :T].float()
    next_v = torch.cat([v[:, 1:], values[:, T:].float()], 1)
    inside = b["done"] & ~b["terminated"]
    inside[:, -1] = False
    next_v = torch.where(inside, v, next_v)
    reward = (b["reward"].float() * cfg.reward_scale).clamp(-cfg.reward_clip, cfg.reward_clip)
    with torch.no_grad():
        adv, vs = vtrace_advantage_estimate(cfg.gamma, logp.detach()[..., None], b["logp"][..., None],
                                            v.detach()[..., None], next_v.detach()[..., None], reward[..., None],
                                            b["done"][..., None], b["terminated"][..., None],
                                            rho_thresh=cfg.rho_clip, c_thresh=cfg.c_clip, time_dim=-2)
    pg = -(logp * adv[..., 0]).sum()
    baseline = 0.5 * ((vs[..., 0] - v) ** 2).sum()
    entropy = -(logp_all.exp() * logp_all).sum()
    return pg + cfg.baseline_coef * baseline - cfg.entropy_coef * entropy


def test_actor_envs_are_the_seeded_games_stacked():
    """``make_actor_envs`` (one TorchRL env over E games) gives what each game's ``SeededGames`` gives:
    the same observations, rewards and flags step by step, and a partial reset starts the next game of
    the marked stream only."""
    from trajdata.rl.env import SeededGames, make_actor_envs, model_fields

    E, fields = 2, model_fields()
    env = make_actor_envs("NetHackScore-v0", "mon-hum-neu-mal", fields, 5, (0, 0), E, {"h": (1, 8), "c": (1, 8)})
    ref = [SeededGames("NetHackScore-v0", "mon-hum-neu-mal", fields, 5, (0, 0, i)) for i in range(E)]

    def same(td, i, obs):
        for k, v in obs.items():
            assert np.array_equal(td[k][i].numpy().reshape(np.shape(v)), v), k

    td = env.reset()
    for i, g in enumerate(ref):
        same(td, i, g.reset()[0])
    assert td["is_init"].all() and td["h"].abs().sum() == 0
    rng = np.random.default_rng(0)
    for _ in range(60):
        a = rng.integers(23, size=E)
        td = env.step(td.set("action", torch.as_tensor(a)))
        for i, g in enumerate(ref):
            obs, r, term, trunc, _ = g.step(int(a[i]))
            same(td["next"], i, obs)
            assert td["next", "reward"][i, 0] == np.float32(r) and td["next", "terminated"][i, 0] == term
            assert td["next", "done"][i, 0] == (term or trunc)
        td = td["next"].exclude("reward", "done", "terminated", "truncated")
    after = env.reset(td.set("_reset", torch.tensor([[False], [True]])))
    assert np.array_equal(after["tty_chars"][0], td["tty_chars"][0])  # game 0 goes on
    same(after, 1, ref[1].reset()[0])  # stream 1's next game
    assert after["prev_action"][1, 0] == -1 and after["episode_return"][1, 0] == 0
    env.close()


def test_impala_loss_is_torchrls_a2c_loss_on_vtrace_targets():
    """TorchRL's A2CLoss on V-trace advantages and targets is the three-term IMPALA loss: same value,
    same gradient, on a fixed batch with deaths, caps and off-policy actions."""
    from trajdata.rl.train import impala_loss

    cfg = RLConfig(out="-", entropy_coef=0.05, baseline_coef=0.7, rho_clip=0.9, c_clip=1.1, gamma=0.99)
    torch.manual_seed(0)
    agent = RLAgent(NetHackConfig(width=16, layers=1, core="lstm", n_actions=23))
    b = _unroll_batch(agent)
    grads = []
    for loss_fn in (lambda: impala_loss(agent, b, cfg, 0.0)[0], lambda: _torchbeast_loss(agent, b, cfg)):
        agent.zero_grad()
        loss = loss_fn()
        loss.backward()
        grads.append((loss.item(), [p.grad.clone() for p in agent.parameters() if p.grad is not None]))
    (mine, g_mine), (ref, g_ref) = grads
    assert mine == pytest.approx(ref, rel=1e-6) and abs(ref) > 1e-3
    assert len(g_mine) == len(g_ref) > 0
    assert all((a - b).abs().max() <= 1e-5 * b.abs().max() for a, b in zip(g_mine, g_ref))  # float rounding only


def test_bf16_learner_loss_and_gradient_match_fp32(tmp_path):
    """--precision bf16: the agent's unroll under bf16 autocast gives the fp32 loss and gradient to bf16
    rounding; a tiny run under it learns with fp32 actors (the staleness it adds is rounding only), and
    its precision is fixed for the run (a resume with another is refused)."""
    from trajdata.rl.train import impala_loss

    cfg = RLConfig(out="-", entropy_coef=0.05)
    torch.manual_seed(0)
    agent = RLAgent(NetHackConfig(width=16, layers=1, core="lstm", n_actions=23, encoders="cpu"))
    b = _unroll_batch(agent)
    out = []
    for autocast in (None, torch.autocast("cpu", dtype=torch.bfloat16)):
        agent.zero_grad()
        loss, parts = impala_loss(agent, b, cfg, 0.0, autocast=autocast)
        loss.backward()
        out.append((loss.item(), torch.cat([p.grad.flatten() for p in agent.parameters() if p.grad is not None])))
    (l32, g32), (l16, g16) = out
    assert l16 != l32 and l16 == pytest.approx(l32, rel=1e-3)
    assert torch.isfinite(g16).all() and torch.nn.functional.cosine_similarity(g16, g32, 0) > 0.99

    run = tmp_path / "bf16"
    r = train(RLConfig(out=str(run), steps=128, precision="bf16", **TINY))
    m = metrics(run)
    assert r["step"] == 4 and all(math.isfinite(x["loss"]) for x in m)
    assert all(0 < x["log_rho"] < 0.01 for x in m)  # fp32 actors, bf16 learner: rounding, not staleness
    with pytest.raises(TrajdataError, match="precision"):
        train(RLConfig(out=str(run), steps=256, precision="fp32", **TINY))


def test_torchrls_vtrace_module_weighs_the_wrong_action():
    """Why the V-trace targets come from TorchRL's functional ``vtrace_advantage_estimate`` and not
    its ``VTrace`` estimator (which A2CLoss would call): in torchrl 0.14.1 the estimator's learner
    log-probability is of the policy's mode (or of a fresh sample), not of the action the actor took,
    so its importance weights are not IMPALA's. If a torchrl release fixes this, this test fails:
    then ``make_value_estimator(ValueEstimators.VTrace)`` can replace ``vtrace_targets``."""
    from tensordict import TensorDict
    from tensordict.nn import TensorDictModule
    from torchrl.modules import ProbabilisticActor
    from torchrl.objectives.value.advantages import _call_actor_net

    actor = ProbabilisticActor(TensorDictModule(torch.nn.Identity(), in_keys=["logits"], out_keys=["logits"]),
                               in_keys=["logits"], distribution_class=torch.distributions.Categorical)
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 6, 5, generator=g)
    action = torch.randint(0, 5, (2, 6), generator=g)
    td = TensorDict(dict(logits=logits, action=action), batch_size=[2, 6])
    used = _call_actor_net(actor, td, None, "action_log_prob")
    taken = torch.log_softmax(logits, -1).gather(-1, action[..., None])[..., 0]
    mode = torch.log_softmax(logits, -1).max(-1).values
    assert torch.allclose(used, mode) and not torch.allclose(used, taken)


def test_budget_snapshots_at_8nd(rl_run):
    rows = ckpt_io.read_runs(rl_run / ckpt_io.RUNS_CSV)
    assert [float(r["budget"]) for r in rows] == list(BUDGETS)
    for r, want_steps in zip(rows, (96, 192)):
        n, d = int(r["params"]), int(r["samples"])
        assert n == 29_032 and r["family"] == "nethack-rl" and r["env"] == "NetHackScore-v0"
        assert d == want_steps  # the first learner step (32 env steps each) with 8ND >= C
        assert float(r["flops_actual"]) == pytest.approx(8 * n * d) and float(r["flops"]) == float(r["budget"])
        assert 8 * n * (d - 32) < float(r["budget"]) <= 8 * n * d
        ck = ckpt_io.load(rl_run / r["checkpoint"])
        assert ck["budget"] == float(r["budget"]) and ck["samples"] == d and ck["flops"] == 8 * n * d
        assert ck["dataset"]["env"] == "NetHackScore-v0" and ck["model_config"]["n_actions"] == 23
    m = metrics(rl_run)
    assert [x["step"] for x in m] == list(range(1, 9))
    assert all(x["flops"] == x["samples"] * STEP_FLOPS // 32 for x in m)
    assert all(x["log_rho"] < 1e-4 for x in m)  # acting in the learner's process: behaviour = target policy
    assert 0 < m[0]["entropy"] <= torch.log(torch.tensor(23.0)).item() + 1e-6


def test_interrupted_then_resumed(rl_run, tmp_path):
    """Up to the checkpoint an interrupted run is bitwise the uninterrupted one; the resumed run goes
    on from the checkpoint's learner state to the same end, each budget once, metrics logged once."""
    out = tmp_path / "b"
    cfg = RLConfig(out=str(out), budgets=BUDGETS, steps=256, **TINY)
    r = train(cfg, stop_after=3)
    assert r["step"] == 3 and not r["finished"]
    a_snap = ckpt_io.load(rl_run / "snapshots" / ckpt_io.budget_name(BUDGETS[0]))
    b_latest = ckpt_io.load(out / ckpt_io.LATEST)
    assert b_latest["step"] == 3 and b_latest["samples"] == 96
    for k, v in a_snap["model"].items():
        assert torch.equal(v, b_latest["model"][k]), k
    for k, v in a_snap["baseline"].items():
        assert torch.equal(v, b_latest["baseline"][k]), k
    saved_opt = b_latest["optimizer"]
    r = train(cfg)
    assert r["resumed"] and r["step"] == 8 and r["samples"] == 256
    rows = ckpt_io.read_runs(out / ckpt_io.RUNS_CSV)
    assert [float(x["budget"]) for x in rows] == list(BUDGETS) and rows[1]["samples"] == "192"
    assert [x["step"] for x in metrics(out)] == list(range(1, 9))
    # the resumed learner started from the checkpoint's RMSprop state: its step counts went on from there
    after = ckpt_io.load(out / ckpt_io.LATEST)["optimizer"]["state"]
    assert all(int(after[i]["step"]) == int(saved_opt["state"][i]["step"]) + 5 for i in saved_opt["state"])


def test_bc_init_loads_the_bc_weights(bc_lstm):
    ck, bc_cfg = bc_snapshot(bc_lstm)
    bc_model = ckpt_io.build_model("nethack", asdict(bc_cfg)).eval()
    bc_model.load_state_dict(ck["model"])
    index = action_index(env_actions("NetHackChallenge-v0"), env_actions("NetHackScore-v0"))
    assert len(index) == 23 and len(set(index)) == 23
    agent = RLAgent(replace(bc_cfg, n_actions=23))
    init_from_bc(agent, ck["model"], index)
    bc_state, rl_state = bc_model.state_dict(), agent.policy.state_dict()
    for k, v in rl_state.items():
        if k not in ("head.weight", "head.bias", "mixer.net.0.weight"):
            assert torch.equal(v, bc_state[k]), k
    assert torch.equal(rl_state["head.weight"], bc_state["head.weight"][index])
    # the same policy: on the same games (previous actions mapped), the RL logits are the BC logits of the env's actions
    batch = random_batch(bc_cfg, 2, 6, seed=1)
    rl_actions = torch.randint(0, 23, (2, 6), generator=torch.Generator().manual_seed(2))
    batch["reset"][:, 0] = True
    rl_batch = dict(batch, action=rl_actions)
    bc_batch = dict(batch, action=torch.tensor(index)[rl_actions])
    with torch.no_grad():
        want = bc_model(bc_batch)[0][..., index]
        got = agent.policy(rl_batch)[0]
    assert torch.allclose(got, want, atol=1e-5)


def test_bc_init_and_kickstart_decay(bc_lstm, tmp_path):
    out = tmp_path / "k"
    budget = 3 * STEP_FLOPS * 1.0  # N is the BC snapshot's architecture: width 16, 1 layer, as TINY
    r = train(RLConfig(out=str(out), init=str(bc_lstm), kickstart_coef=2.0, kickstart_decay=0.5, steps=128,
                       budgets=(budget,), **TINY))
    assert r["params"] == 29_032
    m = metrics(out)
    assert [x["kickstart_coef"] for x in m] == [2.0, 1.0, 0.5, 0.25]
    assert all(x["kickstart_loss"] > 0 for x in m)
    weighted = [x["kickstart_coef"] * x["kickstart_loss"] for x in m]
    assert weighted == sorted(weighted, reverse=True)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["init_snapshot"]["path"] == str((bc_lstm / ckpt_io.LATEST).resolve())
    row = ckpt_io.read_runs(out / ckpt_io.RUNS_CSV)[0]
    bc_ck = ckpt_io.load(bc_lstm / ckpt_io.LATEST)
    assert float(row["flops_init"]) == bc_ck["flops"]
    assert int(row["flops_kickstart"]) == 2 * counting.effective_params(NetHackConfig(**bc_ck["model_config"])) * 96


def test_a_moved_run_resumes_and_its_init_snapshot_is_compared_by_content(bc_lstm, tmp_path):
    """Failed before the fix: a run resumed only under the --out and --init paths it was started with
    (a copied sweep directory was refused), and a BC snapshot retrained in place passed unnoticed."""
    bc = Path(shutil.copytree(bc_lstm, tmp_path / "a" / "bc"))
    out = tmp_path / "a" / "rl"
    train(RLConfig(out=str(out), init=str(bc), steps=64, **TINY))
    shutil.move(tmp_path / "a", tmp_path / "b")
    bc, out = tmp_path / "b" / "bc", tmp_path / "b" / "rl"
    r = train(RLConfig(out=str(out), init=str(bc), steps=96, **TINY))
    assert r["resumed"] and r["step"] == 3 and [x["step"] for x in metrics(out)] == [1, 2, 3]
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["out"] == str(out) and cfg["init_snapshot"]["path"] == str((bc / ckpt_io.LATEST).resolve())
    assert cfg["init_snapshot"]["sha256"] == file_sha256(bc / ckpt_io.LATEST)
    ck = ckpt_io.load(bc / ckpt_io.LATEST)  # the BC run retrained in place: same budget, FLOPs and samples
    name = next(k for k, v in ck["model"].items() if v.is_floating_point())
    ck["model"][name] = ck["model"][name] + 1.0
    ckpt_io.save(bc / ckpt_io.LATEST, ck)
    with pytest.raises(TrajdataError, match="as it was before it changed .sha256") as e:
        train(RLConfig(out=str(out), init=str(bc), steps=128, **TINY))
    assert str(bc / ckpt_io.LATEST) in str(e.value) and "delete the run" in str(e.value)
    with pytest.raises(TrajdataError, match="not from scratch"):
        train(RLConfig(out=str(out), steps=128, **TINY))
    assert [x["step"] for x in metrics(out)] == [1, 2, 3]


def test_a_dead_actor_process_stops_the_run_in_one_line_checkpointed(tmp_path):
    """Failed before the fix: after an actor process died the learner waited forever for its
    weight-sync acknowledgement. Now: one line naming the actor, the learner's last step checkpointed
    (a rolling checkpoint is not due for 1,000 steps), and the rerun resumes from it."""
    out = tmp_path / "p"
    args = ["train", "rl", "--out", out, "--width", "16", "--envs", "2", "--unroll", "16", "--actors", "1",
            "--checkpoint-every", "1000", "--log-every", "1", "--no-progress"]
    proc = subprocess.Popen([*TRAJDATA, *map(str, args), "--steps", "100000"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240
    while len(metrics(out) if (out / "metrics.jsonl").is_file() else []) < 3 and time.monotonic() < deadline:
        time.sleep(0.5)
        assert proc.poll() is None, proc.stderr.read()
    actor = next(k for k in _children(proc.pid) if "spawn_main" in Path(f"/proc/{k}/cmdline").read_text())
    os.kill(actor, signal.SIGKILL)
    try:
        err = proc.communicate(timeout=60)[1]
    except subprocess.TimeoutExpired:
        proc.kill()
        raise AssertionError("the learner did not stop within 60 s of its actor's death") from None
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert proc.returncode == 1 and len(lines) == 1, err
    assert f"actor process {actor} died (killed by SIGKILL)" in lines[0] and "rerun to resume" in lines[0], err
    step = ckpt_io.load(out / ckpt_io.LATEST)["step"]
    assert step == metrics(out)[-1]["step"] >= 3 and f"learner step {step:,}" in lines[0]
    p = cli(*args, "--steps", 32 * (step + 1))
    assert p.returncode == 0, p.stderr
    assert [x["step"] for x in metrics(out)] == list(range(1, step + 2))


def test_a_ray_weight_sync_that_times_out_is_one_line_and_leaves_no_checkpoint(tmp_path):
    """Before: TorchRL's DistStoreError traceback (its sync waited 60 s, seen in CI on a loaded machine; the
    wait is now TRAJDATA_RAY_SYNC_SECONDS, 600 s by default, here 1 ms to make it fail)."""
    out = tmp_path / "r"
    p = subprocess.run([*TRAJDATA, *map(str, ["train", "rl", "--out", out, "--width", "16", "--envs", "2", "--unroll",
                                              "16", "--actors", "1", "--ray-address", "local", "--steps", "32",
                                              "--no-progress"])],
                       capture_output=True, text=True, env=dict(os.environ, TRAJDATA_RAY_SYNC_SECONDS="0.001"))
    last = p.stderr.strip().splitlines()[-1]
    assert p.returncode == 1 and "Traceback" not in p.stderr, p.stderr
    assert "Started a local Ray instance" not in p.stderr, p.stderr  # Ray's INFO lines are off (ray_backend.QUIET)
    assert last.startswith("trajdata: error: the Ray actors failed (Dist") and "after 1ms" in last, p.stderr  # store or socket
    assert last.endswith("; nothing was trained yet: rerun to start"), p.stderr
    assert not (out / ckpt_io.LATEST).exists()


def test_bad_input_is_one_line(bc_lstm, scripted_data, tmp_path):
    from trajdata.errors import TrajdataError
    from trajdata.train.bc import BCConfig, train as train_bc

    tf = tmp_path / "tf"
    train_bc(BCConfig(dataset=str(scripted_data), out=str(tf), width=16, layers=1, seq_len=16, batch_size=1,
                      samples=16, val_fraction=0.3, progress=False))
    cases = {
        "budget-below-step": (dict(budgets=(1e3,)), "less than one learner step"),
        "params-and-width": (dict(params="1M", steps=32), "conflicts with --width"),
        "missing-init": (dict(init=str(tmp_path / "nope"), steps=32), "neither a checkpoint file nor a run"),
        "transformer-init": (dict(init=str(tf), steps=32), "'transformer' core"),
        "kickstart-alone": (dict(kickstart_coef=1.0, steps=32), "needs --init"),
        "encoders-vs-init": (dict(init=str(bc_lstm), encoders="cpu", steps=32), "encoders cpu differ from"),
        "bad-env": (dict(env="Pong", steps=32), "choose one of NetHackScore-v0"),
        "bad-character": (dict(character="xyz-hum", steps=32), "unknown role"),
    }
    for name, (kw, want) in cases.items():
        with pytest.raises(TrajdataError, match=want):
            train(RLConfig(out=str(tmp_path / name), **dict(TINY, **kw)))
    base = ["--width", "16", "--envs", "2", "--unroll", "16", "--actors", "0", "--no-progress"]
    p = cli("train", "rl", "--out", tmp_path / "no-length", *base)
    assert p.returncode == 1 and "give --budgets or --steps" in p.stderr and p.stderr.count("\n") == 1, p.stderr
    t0 = time.monotonic()  # before the fix Ray retried a refused address for minutes
    p = cli("train", "rl", "--out", tmp_path / "ray", "--width", "16", "--envs", "2", "--unroll", "16", "--actors", "1",
            "--ray-address", "127.0.0.1:1", "--steps", "32", "--no-progress")
    assert p.returncode == 1 and p.stderr.count("\n") == 1 and time.monotonic() - t0 < 60, p.stderr
    assert "--ray-address 127.0.0.1:1: cannot connect" in p.stderr, p.stderr
    run = tmp_path / "r"
    train(RLConfig(out=str(run), steps=32, **TINY))
    with pytest.raises(TrajdataError, match="holds a RL run with lr=0.0002, not 0.001"):
        train(RLConfig(out=str(run), steps=64, **dict(TINY, lr=1e-3)))
    from trajdata.config import lock_dir

    lock = lock_dir(run, "train rl", "trained into", "train.lock")
    try:
        p = cli("train", "rl", "--out", run, *base, "--steps", "64", "--seed", "3", "--log-every", "1",
                "--checkpoint-every", "3")
        assert p.returncode == 1 and f"pid {os.getpid()}" in p.stderr and p.stderr.count("\n") == 1, p.stderr
    finally:
        lock.close()
    latest = run / ckpt_io.LATEST
    latest.write_bytes(latest.read_bytes()[:1000])
    with pytest.raises(TrajdataError, match="corrupt or truncated"):
        train(RLConfig(out=str(run), steps=64, **TINY))


def test_eval_plays_rl_snapshots(rl_run, tmp_path):
    from trajdata.evaluate import EvalConfig, evaluate
    from trajdata.format.inspect import verify

    run = Path(shutil.copytree(rl_run, tmp_path / "a"))
    rec = tmp_path / "rec"
    [doc] = evaluate(run, EvalConfig(budget=BUDGETS[0], episodes=2, max_steps=40, envs=2, record=str(rec)),
                     progress=False)
    assert doc["env"]["env"] == "NetHackScore-v0" and doc["env"]["character"] == "mon-hum-neu-mal"
    assert [e["steps"] for e in doc["episodes"]] == [40, 40] and doc["summary"]["episodes"] == 2
    row = ckpt_io.read_runs(run / ckpt_io.RUNS_CSV)[0]
    assert int(row["episodes"]) == 2 and float(row["return"]) == pytest.approx(doc["summary"]["mean"])
    assert float(row["return_se"]) == pytest.approx(doc["summary"]["se"])
    assert verify(rec)["ok"]


def _children(pid: int) -> list[int]:
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                fields = (d / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                out.append(int(d.name))
    return out


@pytest.mark.slow
def test_actor_processes_killed_run_resumes_and_ray(tmp_path):
    """One actor process (kill -9 of the learner takes it along; a rerun resumes from the last
    checkpoint), then actors on a local Ray."""
    out = tmp_path / "p"
    args = ["train", "rl", "--out", out, "--width", "16", "--envs", "2", "--unroll", "16", "--actors", "1",
            "--checkpoint-every", "2", "--log-every", "1", "--no-progress"]
    proc = subprocess.Popen([*TRAJDATA, *map(str, args), "--steps", "100000"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    deadline = time.monotonic() + 240
    while not (out / ckpt_io.LATEST).is_file() and time.monotonic() < deadline:
        time.sleep(0.5)
    assert (out / ckpt_io.LATEST).is_file(), proc.stderr.read() if proc.poll() is not None else "no checkpoint"
    kids = _children(proc.pid)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    time.sleep(1)
    step = ckpt_io.load(out / ckpt_io.LATEST)["step"]
    deadline = time.monotonic() + 30
    while any(Path(f"/proc/{k}").exists() for k in kids) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not any(Path(f"/proc/{k}").exists() and "zombie" not in Path(f"/proc/{k}/status").read_text()
                   for k in kids)
    target = 32 * (step + 2)
    p = cli(*args, "--steps", target)
    assert p.returncode == 0, p.stderr
    m = metrics(out)
    assert [x["step"] for x in m] == list(range(1, step + 3)) and m[-1]["samples"] == target
    assert all(x["log_rho"] < 0.1 for x in m)  # the actor acts with weights at most a few updates old
    ray_out = tmp_path / "ray"
    p = cli("train", "rl", "--out", ray_out, "--width", "16", "--envs", "2", "--unroll", "16", "--actors", "1",
            "--ray-address", "local", "--steps", "64", "--budgets", "7.5e6", "--no-progress")
    assert p.returncode == 0, p.stderr
    assert len(ckpt_io.read_runs(ray_out / ckpt_io.RUNS_CSV)) == 1
