"""Run a sweep's plan: data -> train bc (or train rl) per size (snapshots at its budgets) -> eval every
snapshot -> one runs.csv -> fits -> report. Every stage resumes: finished shards, runs, snapshots and
evaluations are not redone.

    OUT/data/                  the collected dataset (when the spec collects one)
    OUT/runs/<run>/            one `train bc` (`train rl`) run directory per size (its runs.csv, snapshots/, eval/)
    OUT/runs.csv               every snapshot's row, gathered
    OUT/baselines.json         the data's expert and a uniform-random policy on the same eval seeds
    OUT/plan.txt, fit.json, reference_fit.json, report.html (ours beside the reference runs)
    OUT/timings.jsonl          each invocation's phases (data, train, eval, report): seconds, whether it ended

An RL sweep's [compare] adds OUT/bc/ (the [compare.bc] run, trained first), OUT/runs/rl-bc-h<h>-L<L>/
(the BC-initialised run) and OUT/compare.csv (its rows with their total compute: BC + RL + teacher).
"""
from __future__ import annotations

import json
import os
import shlex
import signal
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass
from multiprocessing import get_context
from pathlib import Path

from trajdata.config import at_least, choose, coerce_fields, lock_dir, option, require
from trajdata.errors import ConfigError, DataError, Terminated
from trajdata.sweep.plan import (BC_RUN, Plan, PlannedRun, Spec, check_plan, collect_config, data_problem,
                                 dataset_path, describe, make_plan, run_config)
from trajdata.sweep.timings import timed, timing_totals
from trajdata.train import checkpoint as ckpt_io

BACKENDS = ("local", "ray", "print")


@dataclass
class SweepOptions:
    """How a sweep runs (the flags of `trajdata sweep`); what it runs is the spec."""

    out: str = option("", "Sweep directory [default: sweeps/<spec name>]. Rerun to resume.", metavar="DIRECTORY")
    parallel: int = option(1, "Training runs at once (local backend).")
    backend: str = option("local", "local processes, Ray tasks, or print the torchrun command of each run (for a "
                                   "cluster).", choices=BACKENDS)
    ray_address: str | None = option(None, "Ray cluster address (--backend ray).")
    nproc_per_node: int = option(8, "GPUs per printed torchrun command.")
    threads: int | None = option(None, "torch threads per training run [cores / --parallel].")
    progress: bool = option(True, "Show progress bars.")
    skip_eval: bool = option(False, "Fit loss only; no rollouts.")
    skip_report: bool = option(False, "Gather runs.csv only; no fit or report.")
    flops_per_s: float | None = option(None, "--dry-run: training FLOP/s to turn the plan's compute into hours (e.g. "
                                             "3e14 for an H100 at 30%).")
    samples_per_s: float | None = option(None, "--dry-run: training samples/s (all runs together) to turn the plan's "
                                               "samples into minutes (CPU: the encoders set a sample's cost, whatever "
                                               "the size).")

    def __post_init__(self):
        coerce_fields(self)
        choose(self.backend, BACKENDS, "backend")
        at_least(self, 1, "parallel", "nproc_per_node")
        at_least(self, 1, "threads", optional=True)
        require(self.ray_address is None or self.backend == "ray", "ray_address", "needs backend 'ray'")
        for name, unit in (("flops_per_s", "FLOP/s"), ("samples_per_s", "samples/s")):
            v = getattr(self, name)
            if v is not None and not v > 0:
                require(False, name, f"must be a positive finite number of {unit}, not {v:g}")


def ensure_data(spec: Spec, out: Path, progress: bool) -> Path:
    """The spec's dataset, collected (or its collection resumed) when the spec says how."""
    path = dataset_path(spec, out)
    if spec.collect:
        from trajdata.collectors.runner import collect

        collect(collect_config(spec, path), progress=progress)
    elif not (path / "dataset.json").is_file():
        raise DataError(f"dataset {path} does not exist (and the spec has no [data.collect] to make it)")
    return path


def bc_config(spec: Spec, run: PlannedRun, dataset: Path, out: Path, **extra):
    return run_config(spec, run.size, dataset=str(dataset), out=str(out / "runs" / run.name), run_id=run.name,
                      budgets=tuple(run.budgets), **_seeded(run), **extra)


def rl_config(spec: Spec, run: PlannedRun, out: Path, **extra):
    return run_config(spec, run.size, out=str(out / "runs" / run.name), run_id=run.name, budgets=tuple(run.budgets),
                      **_seeded(run), **extra)


def _seeded(run: PlannedRun) -> dict:
    return {} if run.seed is None else {"seed": run.seed}


@dataclass
class Job:
    """One training run of the sweep: `train bc` or `train rl`, its config, its compute."""

    kind: str  # "bc" | "rl"
    cfg: object  # BCConfig | RLConfig
    compute: float

    @property
    def name(self) -> str:
        return self.cfg.run_id


def jobs(plan: Plan, dataset: Path, out: Path, opts: SweepOptions) -> list[Job]:
    """The sweep's training runs (an RL comparison's BC-initialised run last)."""
    progress = opts.progress and opts.parallel == 1 and opts.backend == "local"
    if not plan.spec.rl:
        return [Job("bc", bc_config(plan.spec, r, dataset, out, progress=progress), r.compute) for r in plan.active]
    threads = {} if opts.threads is None else {"threads": opts.threads}
    out_jobs = [Job("rl", rl_config(plan.spec, r, out, progress=progress, **threads), r.compute) for r in plan.active]
    c = plan.compare
    if c is not None:
        if c.run is None:
            raise DataError(f"the comparison cannot start: {c.note}")
        kw = {k: plan.spec.compare[k] for k in ("kickstart_coef", "kickstart_decay") if k in plan.spec.compare}
        cfg = run_config(plan.spec, None, out=str(out / "runs" / c.run.name), run_id=c.run.name,
                         budgets=tuple(c.run.budgets), init=c.init, progress=progress, **kw, **threads)
        out_jobs.append(Job("rl", cfg, c.run.compute))
    return out_jobs


def compare_bc_job(plan: Plan, dataset: Path, out: Path, opts: SweepOptions) -> Job | None:
    """The [compare.bc] run (trained before the RL runs: the comparison's budgets need its FLOPs)."""
    c = plan.compare
    if c is None or c.bc is None:
        return None
    from trajdata.train.bc import BCConfig

    cfg = BCConfig(**{**plan.spec.compare["bc"], "core": "lstm", "family": "nethack", "dataset": str(dataset),
                      "out": str(out / BC_RUN), "run_id": BC_RUN,
                      "progress": opts.progress and opts.backend == "local"})
    return Job("bc", cfg, c.bc.compute)


def run_done(cfg) -> bool:
    """Whether the run's rolling checkpoint already holds every budget's snapshot."""
    latest = Path(cfg.out) / ckpt_io.LATEST
    if not latest.is_file():
        return False
    have = {b for b, _ in ckpt_io.snapshots(cfg.out)}
    return all(b in have for b in cfg.budgets)


STOP_GRACE_S = 30.0  # after Ctrl-C, how long the runs have to reach a checkpoint before they are sent SIGTERM
_worker = {"pool": False, "in_run": False, "stopped": False}  # "pool": this is a training process of the pool


def _worker_signals() -> None:
    """In a training process, SIGTERM stops the run as Ctrl-C does (``Terminated``: at a step boundary,
    with a rolling checkpoint), and after either the process starts no other run."""
    _worker["pool"] = True

    def on_signal(signum, frame):
        _worker["stopped"] = True
        if not _worker["in_run"]:
            return
        if signum == signal.SIGTERM:
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            raise Terminated()
        raise KeyboardInterrupt()

    signal.signal(signal.SIGTERM, on_signal)
    if signal.getsignal(signal.SIGINT) is not signal.SIG_IGN:
        signal.signal(signal.SIGINT, on_signal)


def _stop_pool(pool: ProcessPoolExecutor, running: list, sigterm: bool) -> None:
    """Stop the training processes after the sweep was interrupted: every run checkpoints and no
    other starts. ``sigterm``: the sweep got SIGTERM, which only it received, and passes it on; after
    Ctrl-C the processes got the terminal's SIGINT too, and get SIGTERM if their runs are still going
    after ``STOP_GRACE_S``."""
    from concurrent.futures import wait

    procs = list((getattr(pool, "_processes", None) or {}).values())  # shutdown() forgets them
    pool.shutdown(wait=False, cancel_futures=True)
    if sigterm or wait(running, timeout=STOP_GRACE_S).not_done:
        for p in procs:
            if p.is_alive():
                p.terminate()
    wait(running)
    pool.shutdown(wait=True)


def _train_one(kind: str, cfg_dict: dict, threads: int) -> dict:
    if _worker["stopped"]:
        raise KeyboardInterrupt("the sweep is stopping")
    import torch

    torch.set_num_threads(threads)
    _worker["in_run"] = True
    try:
        if kind == "rl":
            from trajdata.rl.config import RLConfig
            from trajdata.rl.train import train

            return train(RLConfig(**cfg_dict))
        from trajdata.train.bc import BCConfig, train

        return train(BCConfig(**cfg_dict))
    except KeyboardInterrupt:
        _worker["stopped"] = _worker["pool"]  # a run's own handlers (train bc's) may have taken the signal
        raise
    finally:
        _worker["in_run"] = False


def command(job: Job, nproc: int) -> str:
    """The command of one run, for a cluster: `torchrun ... train bc` (BC), `trajdata train rl` (RL)."""
    if job.kind == "rl":
        from trajdata.rl.config import RLConfig

        return shlex.join(["trajdata", "train", "rl", "--out", job.cfg.out] + _flags(job.cfg, RLConfig(out="-")))
    return torchrun_command(job.cfg, nproc)


def torchrun_command(cfg, nproc: int) -> str:
    """The `torchrun ... train bc` command of one run, for a cluster."""
    from trajdata.train.bc import BCConfig

    return shlex.join(["torchrun", "--nproc-per-node", str(nproc), "-m", "trajdata.cli", "train", "bc", cfg.dataset,
                       "--out", cfg.out] + _flags(cfg, BCConfig(dataset="-", out="-")))


def _flags(cfg, defaults) -> list[str]:
    """The flags that set ``cfg``'s fields where they differ from ``defaults``."""
    args, d = [], asdict(defaults)
    for k, v in asdict(cfg).items():
        if k in ("dataset", "out") or v == d[k] or v is None:
            continue
        flag = "--" + k.replace("_", "-")
        if isinstance(v, bool):
            args.append(flag if v else f"--no-{k.replace('_', '-')}")
        elif k == "budgets":
            args += [flag, ",".join(repr(b) for b in v)]
        else:
            args += [flag, str(v)]
    return args


def train_all(plan: Plan, dataset: Path, out: Path, opts: SweepOptions, todo_jobs: list[Job] | None = None) -> list[dict]:
    """Train every planned run (or ``todo_jobs``) that is not finished: sequentially, K at a time, or on Ray."""
    from tqdm import tqdm

    all_jobs = jobs(plan, dataset, out, opts) if todo_jobs is None else todo_jobs
    if opts.backend == "print":
        for j in all_jobs:
            print(command(j, opts.nproc_per_node))
        return []
    todo, done = [], []
    for j in all_jobs:
        (done if run_done(j.cfg) else todo).append(j)
    if any(j.kind == "bc" for j in done):  # a finished run is kept only if its data is the same
        from trajdata.train.bc import check_finished_runs

        check_finished_runs([j.cfg for j in done if j.kind == "bc"])
    if any(j.kind == "rl" and j.cfg.init is not None for j in done):  # ... and its BC snapshot
        from trajdata.rl.train import check_finished_runs as check_finished_rl

        check_finished_rl([j.cfg for j in done if j.kind == "rl"])
    spent = sum(j.compute for j in done)
    total = sum(j.compute for j in all_jobs)
    bar = tqdm(total=len(all_jobs), initial=len(all_jobs) - len(todo), unit="run", desc="sweep train",
               disable=not opts.progress)
    bar.set_postfix_str(f"compute {spent:.3g} done, {total - spent:.3g} left")
    threads = opts.threads or max(1, (os.cpu_count() or 1) // max(1, opts.parallel))
    results = []

    def finished(j: Job, r):
        nonlocal spent
        spent += j.compute
        results.append(r)
        bar.update(1)
        bar.set_postfix_str(f"compute {spent:.3g} done, {total - spent:.3g} left")

    if opts.backend == "ray":
        import ray

        from trajdata.collectors.ray_backend import start

        if not ray.is_initialized():
            start(ray, opts.ray_address)
        remote = ray.remote(num_cpus=threads)(_train_one)
        refs = {remote.remote(j.kind, asdict(j.cfg), threads): j for j in todo}
        pending = list(refs)
        while pending:
            ready, pending = ray.wait(pending, num_returns=1)
            finished(refs[ready[0]], ray.get(ready[0]))
    elif opts.parallel > 1:
        pool = ProcessPoolExecutor(opts.parallel, mp_context=get_context("spawn"), initializer=_worker_signals)
        futs = {}
        try:
            futs = {pool.submit(_train_one, j.kind, asdict(j.cfg), threads): j for j in todo}
            for f in as_completed(futs):
                finished(futs[f], f.result())
        except KeyboardInterrupt as e:
            _stop_pool(pool, [f for f in futs if not f.done()], isinstance(e, Terminated))
            raise
        finally:
            pool.shutdown()
    else:
        for j in todo:
            finished(j, _train_one(j.kind, asdict(j.cfg), threads))
    bar.close()
    return results


def run_dirs(plan: Plan, out: Path) -> list[Path]:
    """The run directory of every planned training run whose snapshots are evaluated (an RL
    comparison's BC-initialised run last)."""
    runs = plan.active + ([plan.compare.run] if plan.compare is not None and plan.compare.run is not None else [])
    return [out / "runs" / r.name for r in runs if r.budgets]


def eval_all(plan: Plan, out: Path, progress: bool) -> dict:
    """Roll out every snapshot of every run (seeds already played are kept), then, on the same seeds,
    the data's expert ([eval] expert = "scripted" | "autoascend" | "ppo:MODEL") and a uniform-random
    policy: the report's ceiling and floor. Returns their summaries by name."""
    ev = dict(plan.spec.eval)
    if int(ev.get("episodes", 0)) <= 0:
        return {}
    from trajdata.evaluate import EvalConfig, evaluate

    expert = ev.pop("expert", None)
    baselines = {}
    dirs = run_dirs(plan, out)
    for d in dirs:
        evaluate(str(d), EvalConfig(all=True, **ev), progress=progress)
    first = str(dirs[0])  # its checkpoints name the env the data came from (an RL run's: the env it played)
    for name in ([expert] if expert else []) + ["random"]:
        docs = evaluate(first, EvalConfig(expert=name, out=str(out / "baselines"), update_runs=False,
                                          **{k: v for k, v in ev.items() if k != "out"}), progress=progress)
        if docs:
            baselines["expert" if name == expert else "random"] = dict(policy=name, **docs[0]["summary"])
    (out / "baselines.json").write_text(json.dumps(baselines, indent=1) + "\n")
    return baselines


def gather(plan: Plan, out: Path) -> Path:
    """One runs.csv of every planned snapshot that exists (rows of runs not in the plan are left out);
    an RL comparison's rows go to compare.csv, each with its total compute."""
    rows = _rows(plan.active, out)
    if not rows:
        raise DataError(f"sweep {out} has no snapshots yet")
    path = out / "runs.csv"
    ckpt_io.write_runs(path, rows)
    c = plan.compare
    if c is not None and c.run is not None:
        rows = [dict(r, total_budget=repr(c.totals[float(r["budget"])]),
                     total_flops=float(r["flops_actual"]) + float(r["flops_init"] or 0) + float(r["flops_kickstart"] or 0))
                for r in _rows([c.run], out)]
        ckpt_io.write_runs(out / "compare.csv", rows)
    return path


def check_data(plan: Plan, dataset: Path) -> None:
    """What each run would find wrong with the data (when it exists already): a family or fields the
    models cannot train on, no training or validation episodes at the spec's val_fraction."""
    if plan.spec.rl or not (dataset / "dataset.json").is_file():
        return
    from trajdata.format.dataset import Dataset
    from trajdata.train.bc import check_dataset, run_length

    ds = Dataset(dataset)
    try:
        for r in plan.active:
            check_dataset(ds, plan.spec.family, r.model)
            run_length(bc_config(plan.spec, r, dataset, Path("-")), ds, r.shape)
    except ConfigError as e:
        raise ConfigError(f"sweep spec {plan.spec.path}: {e}".replace(" (use --family auto)", "")) from None


def dry_run(spec: Spec, opts: SweepOptions) -> tuple[str, str | None]:
    """(the plan and its cost, a warning) after every check the real sweep makes before it starts;
    the warning says what this machine lacks for it (the data may be where the sweep will run)."""
    plan = make_plan(spec, out=Path(opts.out))
    check_plan(plan, fit=not opts.skip_report)
    dataset = dataset_path(spec, Path(opts.out))
    check_data(plan, dataset)
    return describe(plan, opts.flops_per_s, opts.samples_per_s), (data_problem(spec, dataset) if needs_data(spec)
                                                                          else None)


def _rows(runs: list[PlannedRun], out: Path) -> list[dict]:
    rows = []
    for r in runs:
        for row in ckpt_io.read_runs(out / "runs" / r.name / ckpt_io.RUNS_CSV):
            if float(row["budget"]) in r.budgets:
                rows.append(dict(row, checkpoint=f"runs/{r.name}/{row['checkpoint']}"))
    return rows


def needs_data(spec: Spec) -> bool:
    return not spec.rl or "bc" in spec.compare


def run_sweep(spec: Spec, opts: SweepOptions) -> dict:
    """The whole pipeline for ``spec`` (one sweep per OUT at a time); returns a summary (plan, wall
    time, where the report is)."""
    out = Path(opts.out or f"sweeps/{spec.name}")
    cluster = opts.backend == "print"  # the runs' commands are printed, to run elsewhere: no data or fit here
    check_plan(make_plan(spec), fit=not (opts.skip_report or cluster))
    problem = None if cluster or not needs_data(spec) else data_problem(spec, dataset_path(spec, out))
    if problem:
        raise DataError(problem)
    if not cluster:
        check_data(make_plan(spec), dataset_path(spec, out))
    with lock_dir(out, "sweep", "swept into"):
        return _run_sweep(spec, opts, out)


def _run_sweep(spec: Spec, opts: SweepOptions, out: Path) -> dict:
    t0 = time.time()
    (out / "spec.json").write_text(json.dumps(asdict(spec), indent=1, default=str) + "\n")
    dataset = dataset_path(spec, out)
    timings = {}
    log = opts.backend != "print"
    with timed(out, timings, "data", log):
        if opts.backend != "print" and needs_data(spec):
            dataset = ensure_data(spec, out, opts.progress)
        n_actions = None
        if spec.family == "atari" and (dataset / "dataset.json").is_file():
            from trajdata.format.dataset import Dataset
            from trajdata.train.shape import atari_actions

            n_actions = atari_actions(Dataset(dataset).info)
        plan = make_plan(spec, n_actions, out=out)
    with timed(out, timings, "train", log):
        bc = compare_bc_job(plan, dataset, out, opts)
        if bc is not None:  # first: the comparison's RL budgets are the sweep's less its FLOPs
            train_all(plan, dataset, out, opts, [bc])
            if opts.backend != "print":
                plan = make_plan(spec, n_actions, out=out)
        (out / "plan.txt").write_text(describe(plan) + "\n")
        train_all(plan, dataset, out, opts)
    if opts.backend == "print":
        return dict(plan=describe(plan), printed=True)
    baselines = {}
    if not opts.skip_eval:
        with timed(out, timings, "eval"):
            baselines = eval_all(plan, out, opts.progress)
    runs_csv = gather(plan, out)
    result = dict(out=str(out), runs_csv=str(runs_csv), plan=describe(plan), compute=plan.compute,
                  snapshots=plan.snapshots, baselines=baselines, timings=timings)
    if not opts.skip_report:
        from trajdata.sweep.report import write_sweep_report

        with timed(out, timings, "report"):
            result["report"], error = write_sweep_report(plan, out, baselines, timings)
        if error:
            result["fit_error"] = error
    timings["total_s"] = round(time.time() - t0, 1)
    result["invocations"], result["timings_all"] = timing_totals(out)
    (out / "sweep.json").write_text(json.dumps(result, indent=1, default=str) + "\n")
    return result
