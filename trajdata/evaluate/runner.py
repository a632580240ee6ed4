"""``evaluate(target, cfg)``: roll out BC checkpoints (or experts) on a fixed list of seeded episodes.

The list of episode seeds is fixed up front from ``cfg.seed`` and ``cfg.episodes`` (``eval_seeds``;
the first N of a longer list are the N of a shorter one), and every listed episode is played to its
end or its step cap: never "the first N that finish". Results are kept per episode, keyed by seed, in
one JSON file per evaluated policy (``RUN/eval/budget-2e13.json`` beside ``RUN/snapshots/``), written
atomically after every unit of work: a rerun plays only the seeds it does not have yet (so a rerun
with more episodes plays just the new ones, and an interrupted one resumes), and adds nothing twice.
Settings that change outcomes (greedy, temperature, step cap, character, context) go into the file
name, so each variant has its own file. A snapshot's row of ``RUN/runs.csv`` gains ``return``,
``return_se`` and ``episodes``.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from trajdata.collectors.config import ExpertSpec
from trajdata.collectors.runner import THREAD_ENV, die_with_parent, kill_pools, no_sigint_in_children, threads_env
from trajdata.config import atomic_write_text, check_device, file_sha256, lock_dir
from trajdata.errors import ConfigError, DataError, WorkerError, missing_extra
from trajdata.evaluate.config import DEFAULT_MAX_STEPS, EvalConfig
from trajdata.evaluate.rollout import PolicySpec, UnitSpec

FORMAT, VERSION = "trajdata-eval", 1
EVAL_DIR = "eval"
EVAL_SALT = 0x6576616C  # "eval": eval seeds are a stream of their own, apart from collection's
NETHACK_ENV = "NetHackChallenge-v0"
RL_ENVS = ("NetHackScore-v0",)  # other NLE tasks RL snapshots train on (trajdata.evaluate.rollout:RLHost plays them)


def eval_seeds(seed: int, episodes: int) -> list[int]:
    """The seed of each listed episode (a prefix of the list for a larger ``episodes``)."""
    return [int(np.random.SeedSequence([seed, EVAL_SALT, i]).generate_state(1, np.uint64)[0] >> np.uint64(1))
            for i in range(episodes)]


@dataclass
class Job:
    """One policy to evaluate and where its results go."""

    name: str
    family: str  # "nethack" | "atari"
    host: ExpertSpec
    policy: PolicySpec
    out: Path
    identity: dict  # what the results belong to: a stored file with another identity is started afresh
    env: dict
    run: Path | None = None
    ckpt: dict = field(default_factory=dict)


# ---- planning ---------------------------------------------------------------------------------------

def _need(family: str, torch: bool) -> None:
    """One-line errors for a missing extra, before any worker starts."""
    mods = (["torch"] if torch else []) + (["nle", "gymnasium"] if family == "nethack" else
                                           ["gymnasium", "ale_py", "stable_baselines3", "cv2"])
    for m in mods:
        try:
            __import__(m)
        except ModuleNotFoundError as e:
            raise missing_extra(e, "`trajdata eval`", ("train", "nethack", "atari")) from None


def _env_of_dataset(family: str, dataset: dict, where: str) -> dict:
    """The env a checkpoint's data came from, as host settings."""
    expert = dataset.get("expert") or {}
    if family == "nethack":
        env = dataset.get("env") or NETHACK_ENV
        if env != NETHACK_ENV and env not in RL_ENVS:
            raise DataError(f"{where} was trained on {env} data; trajdata eval plays "
                            f"{', '.join((NETHACK_ENV, *RL_ENVS))}")
        out = {"family": "nethack", "env": env, "character": expert.get("character") or "@",
               "fix_moon_phase": bool(expert.get("fix_moon_phase", True))}
        if expert.get("no_progress_timeout") is not None:
            out["no_progress_timeout"] = int(expert["no_progress_timeout"])
        return out
    from trajdata.envs.atari import FRAME_SKIP, NOOP_MAX, env_id, resolve_game

    game = expert.get("game") or dataset.get("env")
    if not game:
        raise DataError(f"{where}: its dataset record names no Atari game")
    game = resolve_game(game)
    return {"family": "atari", "env": env_id(game), "game": game, "noop_max": int(expert.get("noop_max", NOOP_MAX)),
            "frame_skip": int(expert.get("frame_skip", FRAME_SKIP))}


def _env_of_flag(name: str) -> dict:
    if name.lower() in ("nethack", NETHACK_ENV.lower()):
        return {"family": "nethack", "env": NETHACK_ENV, "character": "@", "fix_moon_phase": True}
    from trajdata.envs.atari import FRAME_SKIP, NOOP_MAX, env_id, resolve_game

    try:
        game = resolve_game(name)
    except ConfigError as e:
        raise ConfigError(f"env {name!r}: use nethack or an Atari game ({str(e).split('valid games: ')[-1]})",
                          field="env") from None
    return {"family": "atari", "env": env_id(game), "game": game, "noop_max": NOOP_MAX, "frame_skip": FRAME_SKIP}


def _match_env(env: dict, cfg: EvalConfig, where: str) -> dict:
    """``env`` with the user's --env / --character applied; an --env naming another env is an error."""
    env = dict(env)
    if cfg.env is not None:
        want = _env_of_flag(cfg.env)
        if want["env"] != env["env"]:
            raise ConfigError(f"env {cfg.env!r} does not match {where}, whose data came from {env['env']}", field="env")
    if cfg.character is not None:
        if env["family"] != "nethack":
            raise ConfigError(f"character is for NetHack; {where} plays {env['env']}", field="character")
        env["dataset_character"] = env["character"]
        env["character"] = cfg.character
    return env


def _host(env: dict) -> ExpertSpec:
    if env["family"] == "nethack":
        kw = {k: env[k] for k in ("character", "fix_moon_phase", "no_progress_timeout") if k in env}
        if env["env"] != NETHACK_ENV:
            return ExpertSpec("trajdata.evaluate.rollout:RLHost", dict(kw, env_id=env["env"]))
        return ExpertSpec("trajdata.evaluate.rollout:NetHackHost", kw)
    return ExpertSpec("trajdata.evaluate.rollout:AtariHost", {k: env[k] for k in ("game", "noop_max", "frame_skip")})


def _tags(cfg: EvalConfig, env: dict, sampled: bool) -> str:
    tags = []
    if sampled and cfg.greedy:
        tags.append("greedy")
    if sampled and not cfg.greedy and cfg.temperature != 1.0:
        tags.append(f"temp{cfg.temperature:g}")
    if cfg.max_steps is not None and cfg.max_steps != DEFAULT_MAX_STEPS[env["family"]]:
        tags.append(f"steps{cfg.max_steps}")
    if cfg.character is not None and cfg.character != env.get("dataset_character"):
        tags.append("char-random" if cfg.character == "@" else f"char-{cfg.character}")
    if cfg.context is not None:
        tags.append(f"ctx{cfg.context}")
    return "".join(f"-{t}" for t in tags)


def _eval_dir(path: Path) -> tuple[Path, Path | None]:
    """(eval directory, run directory or None) of checkpoint file ``path``."""
    from trajdata.train.checkpoint import LATEST, SNAPSHOTS

    if path.parent.name == SNAPSHOTS:
        return path.parent.parent / EVAL_DIR, path.parent.parent
    if path.name == LATEST:
        return path.parent / EVAL_DIR, path.parent
    return path.parent / EVAL_DIR, None


def _checkpoints(target, cfg: EvalConfig) -> list[Path]:
    from trajdata.train.checkpoint import resolve, snapshots

    if cfg.all:
        t = Path(target)
        if not t.is_dir():
            raise ConfigError(f"all needs a run directory; {target} is not one", field="all")
        snaps = [p for _, p in snapshots(t)]
        if not snaps:
            raise DataError(f"run {target} has no snapshots yet (snapshots/budget-*.pt)")
        return snaps
    return resolve(target, cfg.budget)


def plan(target, cfg: EvalConfig) -> list[Job]:
    """The policies ``target`` and ``cfg`` name, each with its env, output file and identity."""
    if target is None and cfg.expert is None:
        raise ConfigError("give a run directory or checkpoint (RUN_OR_CKPT), or an --expert", field="expert")
    if cfg.record is not None and Path(cfg.record).exists() and not Path(cfg.record).is_dir():
        raise ConfigError(f"record {cfg.record} is a file; --record names a dataset directory to write", field="record")
    if target is not None or cfg.device != "cpu":
        try:
            check_device(cfg.device)
        except ModuleNotFoundError as e:
            raise missing_extra(e, "`trajdata eval`", ("train",)) from None
    ckpts = []
    if target is not None:
        try:
            import torch  # noqa: F401
        except ModuleNotFoundError as e:
            raise missing_extra(e, "`trajdata eval`", ("train",)) from None
        from trajdata.train.checkpoint import load

        for p in _checkpoints(target, cfg):
            ckpts.append((p, load(p)))
    if cfg.expert is None:
        return [_bc_job(p, ck, cfg) for p, ck in ckpts]
    base = None
    if ckpts:
        p, ck = ckpts[-1]
        base = _env_of_dataset(ck["family"], ck.get("dataset") or {}, f"checkpoint {p}")
        base = _match_env(base, cfg, f"checkpoint {p}")
        out = Path(cfg.out) if cfg.out else _eval_dir(p)[0]
    else:
        out = Path(cfg.out) if cfg.out else None
    return [_expert_job(cfg, base, out)]


def _bc_job(path: Path, ckpt: dict, cfg: EvalConfig) -> Job:
    family = ckpt.get("family")
    if family not in ("nethack", "atari"):
        raise DataError(f"checkpoint {path}: unknown model family {family!r}")
    where = f"checkpoint {path}"
    env = _match_env(_env_of_dataset(family, ckpt.get("dataset") or {}, where), cfg, where)
    _need(family, torch=True)
    if family == "nethack":
        from trajdata.envs.nethack import check_character

        check_character(env["character"])
    eval_dir, run = _eval_dir(path)
    if path.name.startswith("checkpoint"):
        stem = f"checkpoint-step{ckpt.get('step', 0)}"
    else:
        stem = path.stem
    name = stem + _tags(cfg, env, sampled=True)
    policy = PolicySpec("bc", str(path.resolve()), cfg.greedy, cfg.temperature, cfg.context, cfg.device)
    info = {k: ckpt.get(k) for k in ("budget", "step", "samples", "flops", "params")}
    identity = {"kind": "bc", "sha256": file_sha256(path), **info}
    return Job(name, family, _host(env), policy, Path(cfg.out) if cfg.out else eval_dir, identity, env,
               run if ckpt.get("budget") is not None else None, dict(ckpt, path=str(path)))


def _expert_job(cfg: EvalConfig, base: dict | None, out: Path | None) -> Job:
    from trajdata.errors import ExpertError

    name = cfg.expert
    if name == "random":
        if base is None:
            if cfg.env is None:
                raise ConfigError("env is needed for --expert random without a checkpoint (nethack or an Atari game)",
                                  field="env")
            base = _match_env(_env_of_flag(cfg.env), cfg, f"env {cfg.env}")
        _need(base["family"], torch=True)
        job_name, host, identity = "random", _host(base), {"kind": "random"}
        env, policy = base, PolicySpec("random")
    elif name in ("scripted", "autoascend"):
        if base is None:
            base = _match_env(_env_of_flag(cfg.env or "nethack"), cfg, f"--expert {name}")
        if base["env"] != NETHACK_ENV:
            raise ConfigError(f"expert {name!r} plays {NETHACK_ENV}; the checkpoint's data came from {base['env']}",
                              field="expert")
        _need("nethack", torch=True)
        from trajdata.envs.nethack import check_character

        check_character(base["character"])
        kw = {"character": base["character"], "fix_moon_phase": base["fix_moon_phase"]}
        if name == "scripted":
            host = ExpertSpec.named("scripted", **kw)
        else:
            from trajdata.collectors.autoascend import AutoAscendConfig, find_source

            find_source(None)  # one line when it is not installed
            kw["no_progress_timeout"] = base.get("no_progress_timeout", AutoAscendConfig.no_progress_timeout)
            host = ExpertSpec.named("autoascend", **kw)
        job_name, env, policy = f"expert-{name}", dict(base, **{k: v for k, v in kw.items()}), PolicySpec("expert")
        identity = {"kind": "expert", "expert": name}
    else:  # ppo:MODEL
        if base is not None and base["family"] != "atari":
            raise ConfigError(f"a PPO expert plays Atari; the checkpoint's data came from {base['env']}", field="expert")
        _need("atari", torch=True)
        from trajdata.collectors.atari import PPOExpert

        game = base["game"] if base is not None else (_env_of_flag(cfg.env)["game"] if cfg.env else None)
        model = name[4:]
        if not Path(model).exists():
            raise ExpertError(f"PPO model not found: {model}")
        expert = PPOExpert(model, game, deterministic=cfg.greedy)
        if base is not None and expert.game != base["game"]:
            raise ConfigError(f"PPO model plays {expert.game}; the checkpoint's data came from {base['game']}",
                              field="expert")
        env = base or _env_of_flag(expert.game)
        env = dict(env, noop_max=expert.noop_max, frame_skip=expert.frame_skip)
        host = ExpertSpec.named("ppo", model=str(expert.model.resolve()), game=expert.game, deterministic=cfg.greedy)
        job_name = f"expert-ppo-{expert.sha256[:8]}"
        identity = {"kind": "expert", "expert": "ppo", "sha256": expert.sha256, "deterministic": cfg.greedy}
        policy = PolicySpec("expert")
    if out is None:
        raise ConfigError("out is needed for an expert evaluated without a run (RUN_OR_CKPT)", field="out")
    job_name += _tags(cfg, env, sampled=name.startswith("ppo:"))
    return Job(job_name, env["family"], host, policy, out, identity, env)


# ---- results ----------------------------------------------------------------------------------------

def summarize(results: list[dict]) -> dict:
    """mean, SE (std / sqrt(n), ddof 1), median, quartiles of the returns, and how episodes ended."""
    x = np.asarray([r["return"] for r in results], float)
    n = len(x)
    if n == 0:
        return {"episodes": 0}
    q1, med, q3 = np.percentile(x, [25, 50, 75])
    out = {"episodes": n, "mean": float(x.mean()), "se": float(x.std(ddof=1) / np.sqrt(n)) if n > 1 else 0.0,
           "median": float(med), "q1": float(q1), "q3": float(q3), "min": float(x.min()), "max": float(x.max()),
           "mean_steps": float(np.mean([r["steps"] for r in results])),
           "truncated": int(sum(r.get("status") != "complete" for r in results))}
    for k in ("depth", "turns"):
        v = [r[k] for r in results if r.get(k) is not None]
        if v:
            out[f"mean_{k}"] = float(np.mean(v))
    return out


def _load_existing(path: Path, identity: dict, settings: dict) -> dict[int, dict]:
    if not path.is_file():
        return {}
    try:
        old = json.loads(path.read_text())
    except ValueError:
        raise DataError(f"{path} is not valid JSON (delete it to start this evaluation afresh)") from None
    if old.get("format") != FORMAT or old.get("identity") != _jsonable(identity) or old.get("settings") != _jsonable(settings):
        return {}  # another policy or settings under this name (e.g. a retrained snapshot): start afresh
    return {int(r["seed"]): r for r in old.get("episodes", [])}


def _jsonable(x):
    return json.loads(json.dumps(x))


def _write(job: Job, cfg: EvalConfig, settings: dict, seeds: list[int], done: dict[int, dict]) -> dict:
    listed = [done[s] for s in seeds if s in done]
    doc = {"format": FORMAT, "version": VERSION, "name": job.name, "identity": job.identity, "settings": settings,
           "env": job.env, "policy": asdict(job.policy), "seed": cfg.seed, "requested": len(seeds),
           "complete": len(listed) == len(seeds), "summary": summarize(listed),
           "episodes": sorted(done.values(), key=lambda r: (r.get("index", 0), r["seed"])),
           "updated": time.strftime("%Y-%m-%dT%H:%M:%S")}
    doc = _jsonable(doc)
    path = job.out / f"{job.name}.json"
    job.out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(doc, indent=1) + "\n")
    return dict(doc, path=str(path))


def _update_runs(job: Job, doc: dict) -> None:
    from trajdata.train.checkpoint import RUNS_CSV, read_runs, snapshot_row, upsert_run

    ck, s = job.ckpt, doc["summary"]
    path = job.run / RUNS_CSV
    budget = float(ck["budget"])
    rows = read_runs(path)
    hit = next((r for r in rows if _float(r.get("budget")) is not None and
                abs(_float(r["budget"]) - budget) <= 1e-9 * budget), None)
    row = hit.copy() if hit is not None else snapshot_row(ck, ck["path"], job.run)
    row.update({"return": s["mean"], "return_se": s["se"], "episodes": s["episodes"],
                "eval": os.path.relpath(doc["path"], job.run)})
    upsert_run(path, row)


def _float(v):
    try:
        return float(v)
    except (TypeError, ValueError):
        return None


# ---- running ----------------------------------------------------------------------------------------

def _record_info(job: Job, cfg: EvalConfig, settings: dict) -> dict:
    from trajdata.collectors.worker import package_versions

    expert = {"name": job.name, "policy": job.identity, **{k: v for k, v in job.env.items() if k != "family"}}
    return {"schema": job.family, "env": job.env["env"], "expert": _jsonable(expert),
            "collection": _jsonable({"eval": True, "seed": cfg.seed, **settings}), "packages": package_versions()}


def _run_units(units: list[UnitSpec], cfg: EvalConfig, on_result, on_unit) -> None:
    from trajdata.evaluate.rollout import release, run_unit

    if not units:
        return
    if cfg.backend == "ray":
        return _run_ray(units, cfg, on_result, on_unit)
    if cfg.workers == 1 or len(units) == 1:
        import torch

        threads = torch.get_num_threads()
        try:
            for u in units:
                on_unit(run_unit(u, report=on_result))
        finally:
            release()
            torch.set_num_threads(threads)
        return
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
    from concurrent.futures.process import BrokenProcessPool
    from multiprocessing import get_context

    # workers die with this process (PR_SET_PDEATHSIG), even on kill -9, and take no Ctrl-C of their own
    with threads_env(cfg.threads), ProcessPoolExecutor(min(cfg.workers, len(units)), mp_context=get_context("spawn"),
                                                       initializer=die_with_parent, initargs=(os.getpid(),)) as pool:
        with no_sigint_in_children():
            running = {pool.submit(run_unit, u) for u in units}
        workers = list((getattr(pool, "_processes", None) or {}).values())  # their exit codes, once broken
        try:
            while running:
                done, running = wait(running, return_when=FIRST_COMPLETED)
                for f in done:
                    try:
                        results = f.result()
                    except BrokenProcessPool:
                        what = units[0].policy.checkpoint or units[0].policy.kind
                        raise WorkerError(f"an eval worker died ({_deaths(workers)}) playing {what}; the episodes of "
                                          "finished units are kept: rerun to go on") from None
                    for r in results:
                        on_result(r)
                    on_unit(results)
        except BaseException:
            for f in running:
                f.cancel()
            kill_pools([pool])
            raise


def _deaths(workers) -> str:
    """How dead pool workers ended (``killed by SIGSEGV``), from their exit codes."""
    import signal

    for w in workers:
        w.join(timeout=5)
    codes = sorted({w.exitcode for w in workers if w.exitcode not in (None, 0)})
    codes = [c for c in codes if c != -signal.SIGTERM] or codes  # the pool terminates the survivors
    said = [f"killed by {signal.Signals(-c).name}" if c < 0 and -c in signal.valid_signals() else f"exit code {c}"
            for c in codes]
    return ", ".join(said) or "a crash"


def _run_ray(units, cfg: EvalConfig, on_result, on_unit) -> None:
    try:
        import ray
    except ImportError:
        raise ConfigError("backend ray needs Ray: pip install 'trajdata[ray]'", field="backend") from None
    from trajdata.collectors.ray_backend import start
    from trajdata.evaluate.rollout import run_unit

    started = not ray.is_initialized()
    if started:
        env = {k: str(cfg.threads) for k in THREAD_ENV}
        start(ray, cfg.ray_address, num_cpus=cfg.workers, runtime_env={"env_vars": env})
    try:
        task = ray.remote(num_cpus=1, max_retries=1)(run_unit)
        pending = [task.remote(u) for u in units]
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            results = ray.get(done[0])
            for r in results:
                on_result(r)
            on_unit(results)
    finally:
        if started:
            ray.shutdown()


def run_job(job: Job, cfg: EvalConfig, progress: bool = True) -> dict:
    """Play the job's missing episodes and write its eval JSON; returns that document (+ ``path``)."""
    max_steps = cfg.max_steps or DEFAULT_MAX_STEPS[job.family]
    # "decoding": results of the earlier sliding-window Transformer decoding are not merged with these
    settings = {"max_steps": max_steps, "greedy": cfg.greedy, "temperature": cfg.temperature, "context": cfg.context,
                "decoding": "blocks"}
    if job.policy.kind != "bc":
        settings = {"max_steps": max_steps, "greedy": cfg.greedy if job.identity.get("expert") == "ppo" else None}
    seeds = eval_seeds(cfg.seed, cfg.episodes)
    path = job.out / f"{job.name}.json"
    done = _load_existing(path, job.identity, settings)
    record, recorded = None, set()
    meta = {}
    if cfg.record:
        from trajdata.format.dataset import SHARD_DIR, create_or_check, shard_name

        record = Path(cfg.record)
        create_or_check(record, _record_info(job, cfg, settings))
        recorded = {i for i in range(len(seeds)) if (record / SHARD_DIR / shard_name(i)).exists()}
        meta = {"expert": job.name, "expert_version": str(job.identity.get("sha256", ""))[:12], "env": job.env["env"]}
    todo = [(i, s) for i, s in enumerate(seeds) if s not in done or (record is not None and i not in recorded)]
    size = cfg.unit_size
    lanes = cfg.envs
    units = [UnitSpec(job.host, job.policy, tuple(todo[a:a + size]), lanes, max_steps, cfg.threads,
                      str(record) if record else None, cfg.record_chunk_steps, meta)
             for a in range(0, len(todo), size)]
    from tqdm import tqdm

    bar = tqdm(total=len(seeds), initial=len(seeds) - len(todo), desc=f"eval {job.name}", unit="ep",
               disable=None if progress else True, dynamic_ncols=True)
    listed = set(seeds)

    def mean_so_far() -> str:
        x = [done[s]["return"] for s in seeds if s in done]
        return f"{np.mean(x):.1f}" if x else "-"

    bar.set_postfix(mean=mean_so_far())

    def on_result(r: dict) -> None:
        done[int(r["seed"])] = r
        if int(r["seed"]) in listed:
            bar.update(1)
        bar.set_postfix(mean=mean_so_far(), refresh=False)

    def on_unit(results) -> None:
        _write(job, cfg, settings, seeds, done)

    try:
        _run_units(units, cfg, on_result, on_unit)
    finally:
        bar.close()
    doc = _write(job, cfg, settings, seeds, done)
    if record is not None:
        from trajdata.format.dataset import build_index

        build_index(record, wall_clock=[{"id": r["recorded"], "wall_seconds": r.get("wall_seconds")}
                                        for r in done.values() if r.get("recorded")])
    if job.run is not None and cfg.update_runs:
        _update_runs(job, doc)
    return doc


def evaluate(target, cfg: EvalConfig, progress: bool = True) -> list[dict]:
    """Evaluate what ``target`` (a run directory or checkpoint file; None with an expert) and ``cfg``
    name; returns one eval document per policy (its ``summary`` has mean, se, median, quartiles)."""
    jobs = plan(target, cfg)
    from contextlib import ExitStack

    with ExitStack() as locks:
        for out in sorted({str(j.out) for j in jobs}):
            locks.enter_context(lock_dir(out, "eval", "evaluated into"))
        if cfg.record:
            locks.enter_context(lock_dir(cfg.record, "eval --record", "recorded into", "collect.lock"))
        return _evaluate_jobs(jobs, cfg, progress)


def _evaluate_jobs(jobs: list[Job], cfg: EvalConfig, progress: bool) -> list[dict]:
    if cfg.record and len(jobs) > 1:
        base = cfg.record
        out = []
        for job in jobs:
            from dataclasses import replace

            out.append(run_job(job, replace(cfg, record=str(Path(base) / job.name)), progress))
        return out
    return [run_job(job, cfg, progress) for job in jobs]
