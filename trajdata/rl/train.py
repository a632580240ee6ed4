"""IMPALA on NetHack with TorchRL: ``train(RLConfig(...))`` (``trajdata train rl``).

Actors are TorchRL collectors: ``actors`` processes (a ``MultiAsyncCollector``; on a Ray cluster a
``RayCollector``, whose actors Ray places over the cluster's nodes), each stepping ``envs`` games
(``trajdata.rl.env``) with one batched forward of the agent per step and returning unrolls of
``unroll`` steps; ``actors`` 0 acts in the learner's process (a ``Collector``), synchronously. The
learner takes unrolls first come, first served, recomputes the agent over each from the LSTM state
the actor had at its start, and descends the IMPALA loss (TorchRL's V-trace targets; policy
gradient + baseline + entropy terms summed over the batch, as torchbeast) with RMSprop, then sends
the weights back to the actors. Read ``train`` top to bottom.

Counting follows the paper (Appendix E): D = env steps the learner has trained on, N = the agent's
effective parameters (``agent.effective_params``), C = 8 N D. Budget C's snapshot is taken at the
first learner step with D >= C / 8N; it is a BC-format checkpoint of the policy (``trajdata eval``
plays it) plus the value head, and a row of ``RUN/runs.csv``.

Resume: the rolling checkpoint holds the learner's whole state (weights, RMSprop state, D, RNGs,
counters). A resumed run starts new games (NLE cannot save a game in progress; the new games come
from a seed stream of their own, so no game is played twice), so it continues exactly from the
learner's state but not along the same games as an uninterrupted run would.
"""
from __future__ import annotations

import copy
import json
import math
import random
import time
from dataclasses import asdict, replace
from functools import partial
from pathlib import Path

import numpy as np

from trajdata.config import open_run_dir
from trajdata.errors import ConfigError, DataError, missing_extra
from trajdata.rl.config import RESUME_FREE, RLConfig

RUN_FAMILY = "nethack-rl"  # the family column of RL rows in runs.csv
DEFAULT_WIDTH = 64
LOCK_FILE = "train.lock"


def _need() -> None:
    for m in ("torch", "torchrl", "tensordict", "nle", "gymnasium"):
        try:
            __import__(m)
        except ModuleNotFoundError as e:
            raise missing_extra(e, "`trajdata train rl`", ("rl", "train", "nethack")) from None


def model_config(cfg: RLConfig, n_actions: int, bc_cfg=None):
    """The agent's NetHackConfig: the BC snapshot's architecture with ``--init``, else sized by
    --width or --params at --layers."""
    from trajdata.models.nethack import NetHackConfig
    from trajdata.models.sizes import parse_count
    from trajdata.rl.agent import width_for_params

    if bc_cfg is not None:
        if cfg.width is not None and cfg.width != bc_cfg.width:
            raise ConfigError(f"width {cfg.width} differs from the --init snapshot's {bc_cfg.width} "
                              "(RL from BC keeps the BC architecture)", field="width")
        if cfg.params is not None:
            raise ConfigError("params cannot size a run that starts from --init (it keeps the BC architecture)",
                              field="params")
        if cfg.layers not in (1, bc_cfg.layers):
            raise ConfigError(f"layers {cfg.layers} differs from the --init snapshot's {bc_cfg.layers}", field="layers")
        return replace(bc_cfg, n_actions=n_actions, heads=0)
    base = NetHackConfig(width=DEFAULT_WIDTH, layers=cfg.layers, core="lstm", n_actions=n_actions,
                         use_inventory=cfg.use_inventory, use_message=cfg.use_message, use_glyphs=cfg.use_glyphs)
    if cfg.params is not None:
        return replace(base, width=width_for_params(parse_count(cfg.params), base))
    return replace(base, width=cfg.width or DEFAULT_WIDTH)


def pick_device(cfg: RLConfig):
    import torch

    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device 'cuda' was asked for, but this machine has no usable CUDA GPU (use --device cpu)",
                          field="device")
    return torch.device("cuda" if cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
                        else "cpu")


def rng_state() -> dict:
    import torch

    return dict(torch=torch.get_rng_state(), numpy=np.random.get_state(), python=random.getstate())


def set_rng_state(state: dict) -> None:
    import torch

    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])


# ---- actors ----------------------------------------------------------------------------------------

def make_collector(cfg: RLConfig, policy, mcfg, teacher_cfg, generation: int):
    """The actors: games of stream (generation, actor, env) for each actor."""
    from trajdata.rl.env import make_actor_envs, model_fields

    states = {"h": (mcfg.layers, mcfg.width), "c": (mcfg.layers, mcfg.width)}
    if teacher_cfg is not None:
        states |= {"th": (teacher_cfg.layers, teacher_cfg.width), "tc": (teacher_cfg.layers, teacher_cfg.width)}
    fields = model_fields(mcfg.use_inventory, mcfg.use_glyphs)

    def envs(k: int):
        return partial(make_actor_envs, cfg.env, cfg.game_character, fields, cfg.seed, (generation, k), cfg.envs, states)

    frames = cfg.envs * cfg.unroll
    if cfg.ray_address is not None:
        try:
            import ray  # noqa: F401
            from torchrl.collectors import Collector
            from torchrl.collectors.distributed import RayCollector
        except ModuleNotFoundError as e:
            raise missing_extra(e, "`trajdata train rl --ray-address`", ("ray",)) from None
        init = {} if cfg.ray_address == "local" else {"address": cfg.ray_address}
        return RayCollector([envs(k) for k in range(max(cfg.actors, 1))], policy=policy, collector_class=Collector,
                            collector_kwargs={"frames_per_batch": frames}, frames_per_batch=frames, total_frames=2**62,
                            sync=False, ray_init_config=dict(init, include_dashboard=False, log_to_driver=False),
                            remote_configs={"num_cpus": 1}, num_collectors=max(cfg.actors, 1))
    if cfg.actors == 0:
        from torchrl.collectors import Collector

        return Collector(envs(0), policy, frames_per_batch=frames, total_frames=-1)
    from torchrl.collectors import MultiAsyncCollector

    from trajdata.collectors.runner import no_sigint_in_children

    with no_sigint_in_children():
        return MultiAsyncCollector([envs(k) for k in range(cfg.actors)], policy=policy, frames_per_batch=frames,
                                   total_frames=-1)


# ---- the learner -----------------------------------------------------------------------------------

def learner_batch(td, fields, E: int, T: int, device):
    """An unroll (E, T) as tensors, with step T (the last step's next observation) appended for the bootstrap value."""
    import torch

    if tuple(td.batch_size) != (E, T):
        td = td.reshape(E, T)
    nxt = td["next"]
    b = {k: torch.cat([td[k], nxt[k][:, -1:]], 1).to(device) for k in fields}
    b["prev_action"] = torch.cat([td["prev_action"].reshape(E, T), nxt["prev_action"].reshape(E, T)[:, -1:]], 1)
    b["reset"] = torch.cat([td["is_init"].reshape(E, T), torch.zeros(E, 1, dtype=torch.bool)], 1)
    b["hidden"] = tuple(td[k][:, 0].transpose(0, 1).contiguous() for k in ("h", "c"))
    for k in ("action", "logp"):
        b[k] = td[k].reshape(E, T)
    for k in ("reward", "done", "terminated", "episode_return"):
        b[k] = nxt[k].reshape(E, T)
    if "teacher_logp" in td.keys():
        b["teacher_logp"] = td["teacher_logp"]
    return {k: tuple(x.to(device) for x in v) if isinstance(v, tuple) else v.to(device) for k, v in b.items()}


def impala_loss(agent, b: dict, cfg: RLConfig, kick_coef: float) -> tuple:
    """The IMPALA loss of one unroll batch (sums over its E x T steps) and its parts."""
    import torch
    from torchrl.objectives.value.functional import vtrace_advantage_estimate

    E, T = b["action"].shape
    logits, values, _ = agent.unroll({k: b[k] for k in agent.fields}, b["prev_action"], b["reset"], b["hidden"])
    logp_all = torch.log_softmax(logits[:, :T].float(), -1)
    logp = logp_all.gather(-1, b["action"].long()[..., None])[..., 0]
    v = values[:, :T].float()
    next_v = torch.cat([v[:, 1:], values[:, T:].float()], 1)
    truncated_inside = b["done"] & ~b["terminated"]
    truncated_inside[:, -1] = False  # the last step's next value is the appended step's, of its own game
    next_v = torch.where(truncated_inside, v, next_v)  # a capped game inside the unroll bootstraps from its last value
    reward = (b["reward"].float() * cfg.reward_scale).clamp(-cfg.reward_clip, cfg.reward_clip)
    with torch.no_grad():
        adv, vs = vtrace_advantage_estimate(cfg.gamma, logp.detach()[..., None], b["logp"].float()[..., None],
                                            v.detach()[..., None], next_v.detach()[..., None], reward[..., None],
                                            b["done"][..., None], b["terminated"][..., None],
                                            rho_thresh=cfg.rho_clip, c_thresh=cfg.c_clip, time_dim=-2)
    pg = -(logp * adv[..., 0]).sum()
    baseline = 0.5 * ((vs[..., 0] - v) ** 2).sum()
    probs = logp_all.exp()
    entropy = -(probs * logp_all).sum()
    loss = pg + cfg.baseline_coef * baseline - cfg.entropy_coef * entropy
    kick = torch.zeros((), device=loss.device)
    if "teacher_logp" in b:
        kick = -(b["teacher_logp"].float().exp() * logp_all).sum()
        loss = loss + kick_coef * kick
    n = E * T
    parts = dict(loss=loss.item() / n, pg_loss=pg.item() / n, baseline_loss=baseline.item() / n,
                 entropy=entropy.item() / n, kickstart_loss=kick.item() / n,
                 log_rho=(logp.detach() - b["logp"]).abs().mean().item())
    return loss, parts


def _read_metrics(path: Path, up_to_step: int) -> list[str]:
    if not path.is_file():
        return []
    return [ln for ln in path.read_text().splitlines() if ln.strip() and json.loads(ln)["step"] <= up_to_step]


def _tensorboard(run: Path, enabled: bool):
    if not enabled:
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except Exception:
        return None
    return SummaryWriter(str(run / "tb"))


def train(cfg: RLConfig, stop_after: int | None = None) -> dict:
    """Train (or resume) the RL run in ``cfg.out``; returns its summary (steps, D, FLOPs, snapshots).

    ``stop_after``: stop (with a rolling checkpoint) after that many learner steps of this call, as
    an interruption would."""
    _need()
    from trajdata.collectors.runner import lock_out

    run = Path(cfg.out)
    lock = lock_out(run, LOCK_FILE, "being trained by another `trajdata train rl`")
    try:
        return _train(cfg, run, stop_after)
    finally:
        lock.close()


def _train(cfg: RLConfig, run: Path, stop_after: int | None) -> dict:
    import torch
    from tensordict.nn import TensorDictModule
    from tqdm import tqdm

    from trajdata.rl.agent import (ActorStep, RLAgent, Teacher, action_index, bc_snapshot, effective_params,
                                   init_from_bc)
    from trajdata.rl.env import env_actions
    from trajdata.train import checkpoint as ckpt_io

    device = pick_device(cfg)
    torch.set_num_threads(cfg.threads)
    rl_actions = env_actions(cfg.env)
    bc = bc_cfg = index = None
    if cfg.init is not None:
        bc, bc_cfg = bc_snapshot(cfg.init)
        bc_actions = env_actions("NetHackChallenge-v0")
        if bc_cfg.n_actions != len(bc_actions):
            raise DataError(f"--init {cfg.init}: the BC model has {bc_cfg.n_actions} actions, not NetHackChallenge-v0's "
                            f"{len(bc_actions)}")
        index = action_index(bc_actions, rl_actions)
    mcfg = model_config(cfg, len(rl_actions), bc_cfg)
    n_params = effective_params(mcfg)
    per_step = 8 * n_params
    batch_steps = cfg.envs * cfg.unroll
    for b in cfg.budgets:
        if b / per_step < batch_steps:
            raise ConfigError(f"budget {b:g} is less than one learner step ({batch_steps:,} env steps = "
                              f"{batch_steps * per_step:.3g} FLOPs at 8N = {per_step:,} FLOPs/step)", field="budgets")
    if cfg.steps is not None:
        target = cfg.steps
    elif cfg.budgets:
        target = math.ceil(cfg.budgets[-1] / per_step)
    else:
        raise ConfigError("give --budgets or --steps (RL has no natural end)")
    teacher = cfg.init if cfg.kickstart_coef > 0 else None
    n_teacher = 0
    if teacher:
        from trajdata.models import flops as counting

        n_teacher = counting.effective_params(bc_cfg)
    init_info = None
    if bc is not None:
        init_info = dict(path=str(Path(bc["path"]).resolve()), budget=bc.get("budget"), flops=bc.get("flops"),
                         samples=bc.get("samples"), params=bc.get("params"))
    config = dict(asdict(cfg), model=asdict(mcfg), effective_params=n_params, flops_per_step=per_step,
                  init_snapshot=init_info, action_index=index)
    open_run_dir(run, config, resume_free=RESUME_FREE, what="RL run")

    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)
    random.seed(cfg.seed)
    agent = RLAgent(mcfg)
    if bc is not None:
        init_from_bc(agent, bc["model"], index)
    agent.to(device)
    opt = torch.optim.RMSprop(agent.parameters(), lr=cfg.lr, alpha=cfg.rms_alpha, eps=cfg.rms_eps,
                              momentum=cfg.rms_momentum)
    step = samples = episodes = 0
    wall = 0.0
    recent: list[float] = []  # returns of the training games that ended since the last snapshot
    resumed = (run / ckpt_io.LATEST).is_file()
    if resumed:
        ck = ckpt_io.load(run / ckpt_io.LATEST, map_location=device)
        try:
            agent.load_record(ck)
            opt.load_state_dict(ck["optimizer"])
            set_rng_state(ck["rng"])
            step, samples, episodes, wall = ck["step"], ck["samples"], ck["episodes"], ck["wall_seconds"]
            recent = list(ck["recent"])
        except (KeyError, ValueError, RuntimeError, TypeError) as e:
            raise DataError(f"checkpoint {run / ckpt_io.LATEST} does not match this run ({type(e).__name__}: "
                            f"{str(e).splitlines()[0][:120]})") from None
    runs_csv = run / ckpt_io.RUNS_CSV
    done_budgets = {float(r["budget"]) for r in ckpt_io.read_runs(runs_csv) if r.get("run") == cfg.run_id}
    budget_steps = [(b, math.ceil(b / per_step)) for b in cfg.budgets]
    late = [b for b, d in budget_steps if d < samples and b not in done_budgets]
    if late:
        raise ConfigError(f"budget {late[0]:g} was passed before it was asked for (the run is at {samples:,} env "
                          "steps); start a new --out for it", field="budgets")
    pending = [(b, d) for b, d in budget_steps if b not in done_budgets]

    metrics_path = run / ckpt_io.METRICS
    if resumed:  # rows logged after the checkpoint are logged again
        metrics_path.write_text("".join(ln + "\n" for ln in _read_metrics(metrics_path, step)))
    tb = _tensorboard(run, cfg.tensorboard)
    dataset = dict(env=cfg.env, schema="nethack", kind="rl", fields=list(agent.fields),
                   expert=dict(name="rl", character=cfg.game_character, fix_moon_phase=True))

    def kick_coef(k: int) -> float:
        return cfg.kickstart_coef * cfg.kickstart_decay ** k if teacher else 0.0

    def flops_kickstart() -> int:
        return 2 * n_teacher * samples if teacher else 0

    def common() -> dict:
        return dict(dataset=dataset, train=asdict(cfg), step=step, samples=samples, flops=samples * per_step,
                    params=n_params, init=init_info, flops_kickstart=flops_kickstart())

    def save_latest() -> None:
        ckpt_io.save(run / ckpt_io.LATEST, dict(agent.record(), **common(), budget=None, optimizer=opt.state_dict(),
                                                rng=rng_state(), episodes=episodes, wall_seconds=wall,
                                                recent=list(recent)))

    def snapshot(budget: float) -> float | None:
        path = ckpt_io.snapshot_path(run, budget)
        train_return = float(np.mean(recent)) if recent else None
        ckpt_io.save(path, dict(agent.record(), **common(), budget=budget, train_return=train_return))
        ckpt_io.upsert_run(runs_csv, dict(
            run=cfg.run_id, budget=repr(budget), params=n_params, samples=samples, flops=repr(budget),
            flops_actual=samples * per_step, loss="", loss_se="", val_episodes="", family=RUN_FAMILY,
            width=mcfg.width, layers=mcfg.layers, core=mcfg.core, checkpoint=str(path.relative_to(run)),
            env=cfg.env, train_return="" if train_return is None else f"{train_return:.4f}",
            train_episodes=len(recent), init=init_info["path"] if init_info else "",
            flops_init=init_info["flops"] if init_info else "", flops_kickstart=flops_kickstart()))
        recent.clear()
        return train_return

    # actors act on the CPU: with a GPU learner they get a CPU copy of the agent, refreshed after every update
    actor_agent = agent if device.type == "cpu" else copy.deepcopy(agent).to("cpu")
    step_module = ActorStep(actor_agent, Teacher(teacher, index) if teacher else None)
    policy = TensorDictModule(step_module, in_keys=step_module.in_keys(), out_keys=step_module.out_keys())
    collector = None
    bar = tqdm(total=target, initial=min(samples, target), unit="step", unit_scale=True, disable=not cfg.progress,
               desc=f"train rl {cfg.run_id}", dynamic_ncols=True)
    window = dict(t=time.perf_counter(), samples=0, parts=[], returns=[])
    calls = 0
    mid_step = False  # between a learner update and its counters: no checkpoint can be taken there
    try:
        if samples < target:
            collector = make_collector(cfg, policy, mcfg, bc_cfg if teacher else None, generation=step)
            remote = cfg.actors > 0 or cfg.ray_address is not None
            if remote:
                collector.update_policy_weights_(policy)
            t_wall = time.perf_counter()
            for td in collector:
                b = learner_batch(td, agent.fields, cfg.envs, cfg.unroll, device)
                loss, parts = impala_loss(agent, b, cfg, kick_coef(step))
                mid_step = True
                opt.zero_grad(set_to_none=True)
                loss.backward()
                if cfg.grad_clip > 0:
                    parts["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(agent.parameters(), cfg.grad_clip))
                opt.step()
                parts["kickstart_coef"] = kick_coef(step)
                if actor_agent is not agent:
                    with torch.no_grad():
                        for mine, theirs in zip(actor_agent.parameters(), agent.parameters()):
                            mine.copy_(theirs)
                if remote:
                    collector.update_policy_weights_(policy)
                step += 1
                calls += 1
                samples += b["action"].numel()
                ended = b["episode_return"][b["done"]].tolist()
                episodes += len(ended)
                recent.extend(ended)
                window["returns"].extend(ended)
                window["parts"].append(parts)
                window["samples"] += b["action"].numel()
                mid_step = False
                now = time.perf_counter()
                wall += now - t_wall
                t_wall = now
                bar.update(min(samples, target) - bar.n)
                if step % cfg.log_every == 0 or samples >= target:
                    dt = max(now - window["t"], 1e-9)
                    row = dict(step=step, samples=samples, flops=samples * per_step, episodes=episodes,
                               samples_per_s=window["samples"] / dt, wall_seconds=wall,
                               **{k: float(np.mean([p[k] for p in window["parts"]])) for k in window["parts"][0]})
                    if window["returns"]:
                        row |= dict(return_mean=float(np.mean(window["returns"])), games=len(window["returns"]))
                    with open(metrics_path, "a") as f:
                        f.write(json.dumps(row) + "\n")
                    if tb is not None:
                        for k, v in row.items():
                            if k != "step":
                                tb.add_scalar(k, v, step)
                    post = dict(sps=f"{row['samples_per_s']:.0f}")
                    if "return_mean" in row:
                        post["ret"] = f"{row['return_mean']:.1f}"
                    bar.set_postfix(post)
                    window = dict(t=time.perf_counter(), samples=0, parts=[], returns=[])
                while pending and samples >= pending[0][1]:
                    budget, _ = pending.pop(0)
                    ret = snapshot(budget)
                    bar.write(f"budget {budget:.3g}: {samples:,} env steps, N={n_params:,}"
                              + (f", training games' return {ret:.1f}" if ret is not None else ""))
                if step % cfg.checkpoint_every == 0:
                    save_latest()
                if samples >= target or (stop_after is not None and calls >= stop_after):
                    break
    except KeyboardInterrupt:
        if not mid_step:  # else the previous rolling checkpoint stands
            save_latest()
        raise
    finally:
        bar.close()
        if collector is not None:
            collector.shutdown()
        if tb is not None:
            tb.close()
    save_latest()
    return dict(run=str(run), run_id=cfg.run_id, step=step, samples=samples, flops=samples * per_step,
                params=n_params, resumed=resumed, finished=samples >= target, episodes=episodes,
                snapshots=[str(p) for _, p in ckpt_io.snapshots(run)], model=asdict(mcfg))
