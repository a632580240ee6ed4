"""IMPALA on NetHack with TorchRL: ``train(RLConfig(...))`` (``trajdata train rl``).

Read ``train`` top to bottom: ``start_run`` (device, the --init BC snapshot, the run's shape and
length, run directory), ``build_state`` (agent, RMSprop, resumed from the rolling checkpoint),
``Actors`` (TorchRL collectors), then a loop of named steps over the unrolls they hand in:
``Learner.step`` (the IMPALA loss and an RMSprop step), ``Actors.sync`` (weights back to the
actors), ``MetricsLog.after_step``, ``take_snapshots`` at the budgets it reached, ``save_latest``
every --checkpoint-every steps.

Actors are TorchRL collectors: ``actors`` processes (a ``MultiAsyncCollector``; on a Ray cluster a
``RayCollector``, whose actors Ray places over the cluster's nodes), each stepping ``envs`` games
(``trajdata.rl.env``) with one batched forward of the agent per step and returning unrolls of
``unroll`` steps; ``actors`` 0 acts in the learner's process (a ``Collector``), synchronously. The
learner takes unrolls first come, first served, recomputes the agent over each from the LSTM state
the actor had at its start, takes TorchRL's V-trace targets (``vtrace_advantage_estimate``) and
descends TorchRL's ``A2CLoss`` on them (policy gradient + baseline + entropy, summed over the batch
as torchbeast) with RMSprop, then sends the weights back to the actors.

Counting follows the paper (Appendix E, ``trajdata.rl.shape``): D = env steps the learner has
trained on, N = the agent's effective parameters, C = 8 N D. Budget C's snapshot is taken at the
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
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path

import numpy as np

from trajdata.config import file_sha256, lock_dir, open_run_dir, read_run_config
from trajdata.errors import ConfigError, DataError, TrajdataError, WorkerError, missing_extra
from trajdata.rl.config import RESUME_FREE, RLConfig
from trajdata.rl.shape import FAMILY as RUN_FAMILY

LOCK_FILE = "train.lock"
BC_ENV = "NetHackChallenge-v0"  # the env (and action set) of the BC data an --init snapshot learnt from


def _need() -> None:
    for m in ("torch", "torchrl", "tensordict", "nle", "gymnasium"):
        try:
            __import__(m)
        except ModuleNotFoundError as e:
            raise missing_extra(e, "`trajdata train rl`", ("rl", "train", "nethack")) from None


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


# ---- the run: what it is fixed to, and what changes step to step ------------------------------------

@dataclass
class Init:
    """The --init BC snapshot: its checkpoint and architecture, each RL action's row in its action
    set, what config.json and runs.csv say of it, and the teacher's N when it also kickstarts."""

    ckpt: dict
    model: object  # NetHackConfig
    index: list[int]
    record: dict  # path, budget, flops, samples, params
    teacher_params: int = 0  # 0: no kickstarting


@dataclass
class Run:
    """A run as set up before its first step: device, --init, shape, length, run directory."""

    cfg: RLConfig
    device: object  # torch.device
    shape: object  # trajdata.train.shape.RunShape
    target: int  # env steps D to train on: the largest budget's, or --steps
    dir: Path
    init: Init | None
    dataset: dict  # the dataset part of every checkpoint (eval rebuilds the env from it)

    def kick_coef(self, step: int) -> float:
        return self.cfg.kickstart_coef * self.cfg.kickstart_decay ** step if self.kickstarts else 0.0

    @property
    def kickstarts(self) -> bool:
        return self.init is not None and self.init.teacher_params > 0

    def flops_kickstart(self, samples: int) -> int:
        """The teacher's forwards beside the actors': 2 N_BC per env step."""
        return 2 * self.init.teacher_params * samples if self.kickstarts else 0


@dataclass
class TrainState:
    """What changes step to step, and what a rolling checkpoint saves."""

    agent: object  # RLAgent
    opt: object  # torch.optim.RMSprop
    step: int = 0
    samples: int = 0
    episodes: int = 0
    wall: float = 0.0
    recent: list[float] = field(default_factory=list)  # returns of the training games since the last snapshot
    resumed: bool = False
    mid_step: bool = False  # between a learner update and its counters: no checkpoint can be taken there


def load_init(cfg: RLConfig) -> Init | None:
    """The --init snapshot, its actions mapped to the RL env's by keypress."""
    if cfg.init is None:
        return None
    from trajdata.models import flops as counting
    from trajdata.rl.agent import action_index, bc_snapshot
    from trajdata.rl.env import env_actions

    ck, bc_cfg = bc_snapshot(cfg.init)
    bc_actions = env_actions(BC_ENV)
    if bc_cfg.n_actions != len(bc_actions):
        raise DataError(f"--init {cfg.init}: the BC model has {bc_cfg.n_actions} actions, not {BC_ENV}'s "
                        f"{len(bc_actions)}")
    record = dict(path=str(Path(ck["path"]).resolve()), sha256=file_sha256(ck["path"]), budget=ck.get("budget"),
                  flops=ck.get("flops"), samples=ck.get("samples"), params=ck.get("params"))
    teacher = counting.effective_params(bc_cfg) if cfg.kickstart_coef > 0 else 0
    return Init(ck, bc_cfg, action_index(bc_actions, env_actions(cfg.env)), record, teacher)


def start_run(cfg: RLConfig) -> Run:
    """Device, the --init snapshot, the run's shape and length; opens (or resumes) the run directory."""
    import torch

    from trajdata.rl.env import model_fields
    from trajdata.rl.shape import run_shape

    device = pick_device(cfg)
    torch.set_num_threads(cfg.threads)
    init = load_init(cfg)
    shape = run_shape(cfg, bc_cfg=init.model if init else None)
    per_step, batch = shape.flops_per_sample, shape.samples_per_step
    for b in cfg.budgets:
        if b / per_step < batch:
            raise ConfigError(f"budget {b:g} is less than one learner step ({batch:,} env steps = "
                              f"{batch * per_step:.3g} FLOPs at 8N = {per_step:,} FLOPs/step)", field="budgets")
    if cfg.steps is None and not cfg.budgets:
        raise ConfigError("give --budgets or --steps (RL has no natural end)")
    target = cfg.steps if cfg.steps is not None else shape.samples_for(cfg.budgets[-1])
    mcfg = shape.model
    dataset = dict(env=cfg.env, schema="nethack", kind="rl", fields=list(model_fields(mcfg.use_inventory, mcfg.use_glyphs)),
                   expert=dict(name="rl", character=cfg.game_character, fix_moon_phase=True))
    run = Run(cfg, device, shape, target, Path(cfg.out), init, dataset)
    check_init(run.dir, read_run_config(run.dir), init.record if init else None)
    open_run_dir(run.dir, dict(asdict(cfg), model=asdict(mcfg), effective_params=shape.params, flops_per_step=per_step,
                               init_snapshot=init.record if init else None, action_index=init.index if init else None),
                 resume_free=RESUME_FREE + ("init", "init_snapshot"), what="RL run")
    return run


def check_finished_runs(cfgs: list[RLConfig]) -> None:
    """Finished runs that a sweep would keep: refused, as a resumed one is, when their --init snapshot
    changed (each snapshot read once)."""
    inits = {}
    for cfg in cfgs:
        if cfg.init not in inits:
            inits[cfg.init] = load_init(cfg).record if cfg.init is not None else None
        check_init(Path(cfg.out), read_run_config(cfg.out), inits[cfg.init])


INIT_SAME = ("sha256", "budget", "flops", "samples", "params")  # what makes a resumed run's --init snapshot the same


def check_init(run_dir: Path, old: dict | None, record: dict | None) -> None:
    """One line when the run in ``run_dir`` (its config.json ``old``) started from another BC snapshot than
    ``record`` (None: from scratch). Snapshots are compared by content, not by path: a moved sweep resumes,
    a BC run retrained in place does not. Runs from before snapshots had a digest compare the rest."""
    if old is None:
        return
    was = old.get("init_snapshot")
    if was is None and record is None:
        return
    if was is None or record is None:
        what = (f"from scratch, not from --init {record['path']}" if was is None
                else f"from the BC snapshot {was.get('path')}, not from scratch")
        raise ConfigError(f"{run_dir} holds an RL run {what}; use another --out to start a new RL run", field="init")
    for k in INIT_SAME:
        if k in was and was.get(k) != record.get(k):
            raise ConfigError(f"{run_dir} holds an RL run from the BC snapshot {was.get('path')} as it was before it "
                              f"changed ({k} {str(was.get(k))[:16]}, now {str(record.get(k))[:16]}); use another "
                              "--out (or delete the run) to start one from it as it is now", field="init")


def build_state(run: Run) -> TrainState:
    """Agent (seeded; the --init weights), RMSprop; resumed from the rolling checkpoint if there is one."""
    import torch

    from trajdata.rl.agent import RLAgent, init_from_bc
    from trajdata.train import checkpoint as ckpt_io

    cfg = run.cfg
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)
    random.seed(cfg.seed)
    agent = RLAgent(run.shape.model)
    if run.init is not None:
        init_from_bc(agent, run.init.ckpt["model"], run.init.index)
    agent.to(run.device)
    opt = torch.optim.RMSprop(agent.parameters(), lr=cfg.lr, alpha=cfg.rms_alpha, eps=cfg.rms_eps,
                              momentum=cfg.rms_momentum)
    state = TrainState(agent, opt)
    latest = run.dir / ckpt_io.LATEST
    if latest.is_file():
        resume(state, ckpt_io.load(latest, map_location=run.device), latest)
    return state


def resume(state: TrainState, ck: dict, path: Path) -> None:
    """Weights, RMSprop state, RNGs and counters from checkpoint ``ck``."""
    try:
        state.agent.load_record(ck)
        state.opt.load_state_dict(ck["optimizer"])
        set_rng_state(ck["rng"])
        state.step, state.samples, state.episodes, state.wall = ck["step"], ck["samples"], ck["episodes"], \
            ck["wall_seconds"]
        state.recent = list(ck["recent"])
    except (KeyError, ValueError, RuntimeError, TypeError) as e:
        raise DataError(f"checkpoint {path} does not match this run ({type(e).__name__}: "
                        f"{str(e).splitlines()[0][:120]})") from None
    state.resumed = True


def pending_budgets(run: Run, state: TrainState) -> list[tuple[float, int]]:
    """(budget, env steps) still to snapshot; a budget already passed without a snapshot is refused."""
    from trajdata.train import checkpoint as ckpt_io

    done = {float(r["budget"]) for r in ckpt_io.read_runs(run.dir / ckpt_io.RUNS_CSV) if r.get("run") == run.cfg.run_id}
    late = [b for b, d in run.shape.budget_samples if d < state.samples and b not in done]
    if late:
        raise ConfigError(f"budget {late[0]:g} was passed before it was asked for (the run is at {state.samples:,} env "
                          "steps); start a new --out for it", field="budgets")
    return [(b, d) for b, d in run.shape.budget_samples if b not in done]


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
            import ray
            from torchrl.collectors import Collector
            from torchrl.collectors.distributed import RayCollector
        except ModuleNotFoundError as e:
            raise missing_extra(e, "`trajdata train rl --ray-address`", ("ray",)) from None
        from trajdata.collectors.ray_backend import QUIET, connect

        if cfg.ray_address != "local" and not ray.is_initialized():  # bounded: Ray retries a wrong address for minutes
            connect(ray, cfg.ray_address, **QUIET)
        return RayCollector([envs(k) for k in range(max(cfg.actors, 1))], policy=policy, collector_class=Collector,
                            collector_kwargs={"frames_per_batch": frames}, frames_per_batch=frames, total_frames=2**62,
                            sync=False, ray_init_config=QUIET,
                            remote_configs={"num_cpus": 1}, num_collectors=max(cfg.actors, 1))
    if cfg.actors == 0:
        from torchrl.collectors import Collector

        return Collector(envs(0), policy, frames_per_batch=frames, total_frames=-1)
    from torchrl.collectors import MultiAsyncCollector

    from trajdata.collectors.runner import no_sigint_in_children

    with no_sigint_in_children():
        return MultiAsyncCollector([envs(k) for k in range(cfg.actors)], policy=policy, frames_per_batch=frames,
                                   total_frames=-1)


class ActorsFailed(WorkerError):
    """An actor process died or the actors' engine failed (a Ray node, its weight sync): the learner's
    state is whole, so the run checkpoints and a rerun resumes."""


class Actors:
    """The run's collector, acting on the CPU: with a GPU learner through a CPU copy of the agent,
    refreshed after every update (``sync``); with a kickstarting --init, the BC teacher beside it.
    Remote actors' failures are ``ActorsFailed``; a dead actor process (TorchRL would wait for it
    forever) is noticed by ``ActorWatch``."""

    def __init__(self, run: Run, state: TrainState):
        from tensordict.nn import TensorDictModule

        from trajdata.rl.agent import ActorStep, Teacher

        self.agent = state.agent
        self.acting = state.agent if run.device.type == "cpu" else copy.deepcopy(state.agent).to("cpu")
        teacher = Teacher(run.cfg.init, run.init.index) if run.kickstarts else None
        step = ActorStep(self.acting, teacher)
        self.policy = TensorDictModule(step, in_keys=step.in_keys(), out_keys=step.out_keys())
        self.remote = run.cfg.actors > 0 or run.cfg.ray_address is not None
        self.engine = "the Ray actors" if run.cfg.ray_address is not None else "the actor processes"
        self.collector, self.watch = None, None
        with self.failing():
            self.collector = make_collector(run.cfg, self.policy, run.shape.model,
                                            run.init.model if teacher else None, generation=state.step)
            if getattr(self.collector, "procs", None):
                self.watch = ActorWatch(self.collector.procs)
            if run.cfg.ray_address is not None:
                ray_sync_timeout()
            if self.remote:
                self.collector.update_policy_weights_(self.policy)

    def __iter__(self):
        it = iter(self.collector)
        while True:
            with self.failing():
                td = next(it, None)
            if td is None:
                return
            yield td

    @contextmanager
    def failing(self):
        """Errors of remote actors as one ``ActorsFailed`` line (in-process actors' errors are the learner's)."""
        try:
            with self.watch.waiting() if self.watch is not None else nullcontext():
                yield
        except (ActorsFailed, KeyboardInterrupt, TrajdataError):
            raise
        except Exception as e:
            if not self.remote:
                raise
            line = (str(e).strip().splitlines() or [""])[0][:200]
            raise ActorsFailed(f"{self.engine} failed ({type(e).__name__}: {line})") from None

    def sync(self) -> None:
        """The learner's weights to the actors."""
        import torch

        if self.acting is not self.agent:
            with torch.no_grad():
                for mine, theirs in zip(self.acting.parameters(), self.agent.parameters()):
                    mine.copy_(theirs)
        if self.remote:
            with self.failing():
                self.collector.update_policy_weights_(self.policy)

    def shutdown(self) -> None:
        if self.watch is not None:
            self.watch.close()
        if self.collector is not None:
            self.collector.shutdown()


RAY_SYNC_SECONDS = 600.0  # env TRAJDATA_RAY_SYNC_SECONDS overrides


def ray_sync_timeout() -> None:
    """Give the Ray actors RAY_SYNC_SECONDS to join the first weight sync, where TorchRL gives 60 s: on
    a loaded node Ray starts the processes behind it (the rendezvous actor) that slowly."""
    import os
    from datetime import timedelta

    from torchrl.weight_update import _ray as weight_sync  # torchrl 0.14.1 (pinned): a module constant

    if hasattr(weight_sync, "_DIST_TIMEOUT"):
        weight_sync._DIST_TIMEOUT = timedelta(seconds=float(os.environ.get("TRAJDATA_RAY_SYNC_SECONDS",
                                                                           RAY_SYNC_SECONDS)))


class ActorWatch:
    """Raises ``ActorsFailed`` in the learner when an actor process exits: TorchRL waits for a dead
    actor's weight-sync acknowledgement forever. While the learner waits on the actors (``waiting``) a
    death is raised through SIGUSR1, which also ends a blocking read; outside such a wait (or where
    signals cannot be caught: not the main thread) it is raised when the next wait begins."""

    def __init__(self, procs: list, every: float = 1.0):
        import signal
        import threading

        self.procs, self.dead, self.blocked = procs, None, False
        self.stop = threading.Event()
        self.armed = threading.current_thread() is threading.main_thread()
        self.thread = threading.Thread(target=self._run, args=(threading.main_thread().ident, every),
                                       name="actor-watch", daemon=True)
        if self.armed:
            self.previous = signal.signal(signal.SIGUSR1, self._raise)
        self.thread.start()

    def _run(self, main: int, every: float) -> None:
        import signal

        while not self.stop.wait(every):
            if self.dead is None:
                self.dead = next((p for p in self.procs if p.exitcode is not None), None)
            if self.dead is not None and self.blocked and self.armed:
                signal.pthread_kill(main, signal.SIGUSR1)
                return

    def failure(self) -> ActorsFailed:
        return ActorsFailed(f"actor process {self.dead.pid} died ({exit_reason(self.dead.exitcode)})")

    def _raise(self, signum, frame):
        if self.blocked and not self.stop.is_set():
            self.blocked = False
            raise self.failure()

    @contextmanager
    def waiting(self):
        """Scope of a wait on the actors."""
        if self.dead is not None:
            raise self.failure()
        self.blocked = True
        try:
            yield
        finally:
            self.blocked = False

    def close(self) -> None:
        import signal

        self.stop.set()
        self.thread.join()
        if self.armed:
            signal.signal(signal.SIGUSR1, self.previous)


def exit_reason(code: int) -> str:
    import signal

    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit status {code}"


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


def actor_critic_loss(cfg: RLConfig):
    """TorchRL's ``A2CLoss`` over logits and values the learner has already computed (identity modules
    read them from the batch): the policy gradient on given advantages, the value loss toward given
    targets and the entropy bonus, each summed over the batch as torchbeast sums them. Its l2 value
    loss is (target - value)², so torchbeast's 0.5 goes into the coefficient."""
    import torch
    from tensordict.nn import TensorDictModule
    from torchrl.modules import ProbabilisticActor
    from torchrl.objectives import A2CLoss

    actor = ProbabilisticActor(TensorDictModule(torch.nn.Identity(), in_keys=["logits"], out_keys=["logits"]),
                               in_keys=["logits"], distribution_class=torch.distributions.Categorical)
    critic = TensorDictModule(torch.nn.Identity(), in_keys=["state_value"], out_keys=["state_value"])
    return A2CLoss(actor, critic, entropy_bonus=True, entropy_coeff=cfg.entropy_coef,
                   critic_coeff=0.5 * cfg.baseline_coef, loss_critic_type="l2", reduction="sum", functional=False)


def vtrace_targets(logp, b: dict, v, next_v, cfg: RLConfig):
    """TorchRL's V-trace advantages and value targets (E, T, 1) for actions of log-probability ``logp``
    under the learner's policy (``b["logp"]`` under the actors')."""
    import torch
    from torchrl.objectives.value.functional import vtrace_advantage_estimate

    reward = (b["reward"].float() * cfg.reward_scale).clamp(-cfg.reward_clip, cfg.reward_clip)
    with torch.no_grad():
        return vtrace_advantage_estimate(cfg.gamma, logp.detach()[..., None], b["logp"].float()[..., None],
                                         v.detach()[..., None], next_v.detach()[..., None], reward[..., None],
                                         b["done"][..., None], b["terminated"][..., None],
                                         rho_thresh=cfg.rho_clip, c_thresh=cfg.c_clip, time_dim=-2)


def impala_loss(agent, b: dict, cfg: RLConfig, kick_coef: float, loss_module=None, autocast=None) -> tuple:
    """The IMPALA loss of one unroll batch (sums over its E x T steps) and its parts (means per step);
    the agent's unroll under ``autocast`` (a bf16 autocast context, or none), the loss in fp32."""
    import torch
    from tensordict import TensorDict

    loss_module = loss_module or actor_critic_loss(cfg)
    E, T = b["action"].shape
    with autocast or nullcontext():
        logits, values, _ = agent.unroll({k: b[k] for k in agent.fields}, b["prev_action"], b["reset"], b["hidden"])
    logits, v = logits[:, :T].float(), values[:, :T].float()
    next_v = torch.cat([v[:, 1:], values[:, T:].float()], 1)
    truncated_inside = b["done"] & ~b["terminated"]
    truncated_inside[:, -1] = False  # the last step's next value is the appended step's, of its own game
    next_v = torch.where(truncated_inside, v, next_v)  # a capped game inside the unroll bootstraps from its last value
    logp_all = torch.log_softmax(logits, -1)
    action = b["action"].long()
    logp = logp_all.gather(-1, action[..., None])[..., 0]
    adv, vs = vtrace_targets(logp, b, v, next_v, cfg)
    out = loss_module(TensorDict(dict(logits=logits, state_value=v[..., None], action=action, advantage=adv,
                                      value_target=vs), batch_size=[E, T]))
    loss = out["loss_objective"] + out["loss_critic"] + out.get("loss_entropy", torch.zeros(()))
    kick = torch.zeros((), device=loss.device)
    if "teacher_logp" in b:
        kick = -(b["teacher_logp"].float().exp() * logp_all).sum()
        loss = loss + kick_coef * kick
    n = E * T
    with torch.no_grad():
        entropy = -(logp_all.exp() * logp_all).sum() / n
        baseline = 0.5 * ((vs[..., 0] - v) ** 2).sum() / n
    parts = dict(loss=loss.item() / n, pg_loss=out["loss_objective"].item() / n, baseline_loss=baseline.item(),
                 entropy=entropy.item(), kickstart_loss=kick.item() / n,
                 log_rho=(logp.detach() - b["logp"]).abs().mean().item())
    return loss, parts


class Learner:
    """One learner step per unroll: the IMPALA loss (the agent under bf16 autocast with --precision
    bf16), a clipped RMSprop step, the counters."""

    def __init__(self, run: Run, state: TrainState):
        from trajdata.config import precision_context

        self.run, self.state = run, state
        self.loss_module = actor_critic_loss(run.cfg)
        self.autocast = precision_context(run.cfg.precision, run.device)

    def step(self, td) -> tuple[dict, int, list[float]]:
        """Learn from unroll ``td``; returns the loss parts, its env steps and the returns of games that ended in it."""
        import torch

        run, state, cfg = self.run, self.state, self.run.cfg
        b = learner_batch(td, state.agent.fields, cfg.envs, cfg.unroll, run.device)
        loss, parts = impala_loss(state.agent, b, cfg, run.kick_coef(state.step), self.loss_module, self.autocast)
        state.mid_step = True
        state.opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip > 0:
            parts["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(state.agent.parameters(), cfg.grad_clip))
        state.opt.step()
        parts["kickstart_coef"] = run.kick_coef(state.step)
        n = b["action"].numel()
        ended = b["episode_return"][b["done"]].tolist()
        state.step += 1
        state.samples += n
        state.episodes += len(ended)
        state.recent.extend(ended)
        state.mid_step = False
        return parts, n, ended


# ---- what a step leaves behind: metrics, snapshots, checkpoints ----------------------------------------

class MetricsLog:
    """Losses, entropy, staleness, grad norm, learner samples/s and the returns of finished training
    games every --log-every steps (and at the end) into metrics.jsonl, TensorBoard and the progress
    bar; also the run's wall time."""

    def __init__(self, run: Run, state: TrainState):
        from tqdm import tqdm

        from trajdata.train import checkpoint as ckpt_io

        self.run = run
        self.path = run.dir / ckpt_io.METRICS
        if state.resumed:  # rows logged after the checkpoint are logged again
            self.path.write_text("".join(ln + "\n" for ln in ckpt_io.read_metrics(self.path, state.step)))
        self.tb = ckpt_io.tensorboard(run.dir, run.cfg.tensorboard)
        self.bar = tqdm(total=run.target, initial=min(state.samples, run.target), unit="step", unit_scale=True,
                        disable=not run.cfg.progress, desc=f"train rl {run.cfg.run_id}", dynamic_ncols=True)
        self.start_clock()

    def start_clock(self) -> None:
        self.t_wall = time.perf_counter()
        self.window = dict(t=self.t_wall, samples=0, parts=[], returns=[])

    def after_step(self, state: TrainState, parts: dict, n: int, ended: list[float]) -> None:
        run, w = self.run, self.window
        now = time.perf_counter()
        state.wall += now - self.t_wall
        self.t_wall = now
        w["returns"].extend(ended)
        w["parts"].append(parts)
        w["samples"] += n
        self.bar.update(min(state.samples, run.target) - self.bar.n)
        if state.step % run.cfg.log_every == 0 or state.samples >= run.target:
            row = dict(step=state.step, samples=state.samples, flops=run.shape.flops(state.samples),
                       episodes=state.episodes, samples_per_s=w["samples"] / max(now - w["t"], 1e-9),
                       wall_seconds=state.wall, **{k: float(np.mean([p[k] for p in w["parts"]])) for k in w["parts"][0]})
            if w["returns"]:
                row |= dict(return_mean=float(np.mean(w["returns"])), games=len(w["returns"]))
            self.write(row)
            self.window = dict(t=time.perf_counter(), samples=0, parts=[], returns=[])

    def write(self, row: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        if self.tb is not None:
            for k, v in row.items():
                if k != "step":
                    self.tb.add_scalar(k, v, row["step"])
        post = dict(sps=f"{row['samples_per_s']:.0f}")
        if "return_mean" in row:
            post["ret"] = f"{row['return_mean']:.1f}"
        self.bar.set_postfix(post)

    def close(self) -> None:
        self.bar.close()
        if self.tb is not None:
            self.tb.close()


def checkpoint_record(run: Run, state: TrainState) -> dict:
    """What every checkpoint of the run holds: the agent, its data and config, the counters."""
    return dict(state.agent.record(), dataset=run.dataset, train=asdict(run.cfg), step=state.step,
                samples=state.samples, flops=run.shape.flops(state.samples), params=run.shape.params,
                init=run.init.record if run.init else None, flops_kickstart=run.flops_kickstart(state.samples))


def take_snapshots(run: Run, state: TrainState, pending: list, log: MetricsLog) -> None:
    """A snapshot (weights, runs.csv row) for every pending budget this step reached."""
    while pending and state.samples >= pending[0][1]:
        budget, _ = pending.pop(0)
        ret = snapshot(run, state, budget)
        log.bar.write(f"budget {budget:.3g}: {state.samples:,} env steps, N={run.shape.params:,}"
                      + (f", training games' return {ret:.1f}" if ret is not None else ""))


def snapshot(run: Run, state: TrainState, budget: float) -> float | None:
    """snapshots/budget-C.pt and its runs.csv row; returns the training games' mean return since the last one."""
    from trajdata.train import checkpoint as ckpt_io

    path = ckpt_io.snapshot_path(run.dir, budget)
    train_return = float(np.mean(state.recent)) if state.recent else None
    ckpt_io.save(path, dict(checkpoint_record(run, state), budget=budget, train_return=train_return))
    mcfg, init = run.shape.model, run.init.record if run.init else None
    ckpt_io.upsert_run(run.dir / ckpt_io.RUNS_CSV, dict(
        run=run.cfg.run_id, budget=repr(budget), params=run.shape.params, samples=state.samples, flops=repr(budget),
        flops_actual=run.shape.flops(state.samples), loss="", loss_se="", val_episodes="", family=RUN_FAMILY,
        width=mcfg.width, layers=mcfg.layers, core=mcfg.core, checkpoint=str(path.relative_to(run.dir)),
        env=run.cfg.env, train_return="" if train_return is None else f"{train_return:.4f}",
        train_episodes=len(state.recent), init=init["path"] if init else "", flops_init=init["flops"] if init else "",
        flops_kickstart=run.flops_kickstart(state.samples)))
    state.recent.clear()
    return train_return


def save_latest(run: Run, state: TrainState) -> None:
    """The rolling checkpoint: the learner's whole state."""
    from trajdata.train import checkpoint as ckpt_io

    ckpt_io.save(run.dir / ckpt_io.LATEST, dict(checkpoint_record(run, state), budget=None,
                                                optimizer=state.opt.state_dict(), rng=rng_state(),
                                                episodes=state.episodes, wall_seconds=state.wall,
                                                recent=list(state.recent)))


# ---- the loop ----------------------------------------------------------------------------------------

def train(cfg: RLConfig, stop_after: int | None = None) -> dict:
    """Train (or resume) the RL run in ``cfg.out``; returns its summary (steps, D, FLOPs, snapshots).

    ``stop_after``: stop (with a rolling checkpoint) after that many learner steps of this call, as
    an interruption would."""
    _need()
    lock = lock_dir(cfg.out, "train rl", "trained into", LOCK_FILE)
    try:
        run = start_run(cfg)
        state = build_state(run)
        pending = pending_budgets(run, state)
        log = MetricsLog(run, state)
        actors, calls = None, 0
        try:
            if state.samples < run.target:
                actors = Actors(run, state)
                learner = Learner(run, state)
                log.start_clock()
                for td in actors:
                    parts, n, ended = learner.step(td)
                    calls += 1
                    log.after_step(state, parts, n, ended)
                    take_snapshots(run, state, pending, log)
                    if state.step % cfg.checkpoint_every == 0:
                        save_latest(run, state)
                    if state.samples >= run.target or (stop_after is not None and calls >= stop_after):
                        break
                    actors.sync()
        except KeyboardInterrupt:
            if not state.mid_step:  # else the previous rolling checkpoint stands
                save_latest(run, state)
            raise
        except ActorsFailed as e:
            if state.samples == 0:
                raise ActorsFailed(f"{e}; nothing was trained yet: rerun to start") from None
            if not state.mid_step:
                save_latest(run, state)
            raise ActorsFailed(f"{e}; {run.dir} is checkpointed at learner step {state.step:,} ({state.samples:,} env "
                               "steps): rerun to resume") from None
        finally:
            log.close()
            if actors is not None:
                actors.shutdown()
        save_latest(run, state)
        return summary(run, state)
    finally:
        lock.close()


def summary(run: Run, state: TrainState) -> dict:
    from trajdata.train import checkpoint as ckpt_io

    return dict(run=str(run.dir), run_id=run.cfg.run_id, step=state.step, samples=state.samples,
                flops=run.shape.flops(state.samples), params=run.shape.params, resumed=state.resumed,
                finished=state.samples >= run.target, episodes=state.episodes,
                snapshots=[str(p) for _, p in ckpt_io.snapshots(run.dir)], model=asdict(run.shape.model))
