"""Run a sweep's plan: data -> train bc per size (snapshots at its budgets) -> eval every snapshot ->
one runs.csv -> fits -> report. Every stage resumes: finished shards, runs, snapshots and
evaluations are not redone.

    OUT/data/                  the collected dataset (when the spec collects one)
    OUT/runs/<run>/            one `train bc` run directory per size (its runs.csv, snapshots/, eval/)
    OUT/runs.csv               every snapshot's row, gathered
    OUT/baselines.json         the data's expert and a uniform-random policy on the same eval seeds
    OUT/plan.txt, fit.json, reference_fit.json, report.html (ours beside the reference runs)
"""
from __future__ import annotations

import json
import os
import shlex
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass
from multiprocessing import get_context
from pathlib import Path

from trajdata.config import at_least, choose, coerce_fields, lock_dir, option, require
from trajdata.errors import ConfigError, DataError
from trajdata.sweep.plan import (Plan, PlannedRun, Spec, check_plan, collect_config, data_problem, dataset_path,
                                 describe, make_plan, run_config)
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
                      budgets=tuple(run.budgets), **extra)


def run_done(cfg) -> bool:
    """Whether the run's rolling checkpoint already holds every budget's snapshot."""
    latest = Path(cfg.out) / ckpt_io.LATEST
    if not latest.is_file():
        return False
    have = {b for b, _ in ckpt_io.snapshots(cfg.out)}
    return all(b in have for b in cfg.budgets)


def _train_one(cfg_dict: dict, threads: int) -> dict:
    import torch

    from trajdata.train.bc import BCConfig, train

    torch.set_num_threads(threads)
    return train(BCConfig(**cfg_dict))


def torchrun_command(cfg, nproc: int) -> str:
    """The `torchrun ... train bc` command of one run, for a cluster."""
    from trajdata.train.bc import BCConfig

    args = ["torchrun", "--nproc-per-node", str(nproc), "-m", "trajdata.cli", "train", "bc", cfg.dataset,
            "--out", cfg.out]
    d = asdict(BCConfig(dataset="-", out="-"))
    for k, v in asdict(cfg).items():
        if k in ("dataset", "out") or v == d[k]:
            continue
        flag = "--" + k.replace("_", "-")
        if isinstance(v, bool):
            args.append(flag if v else f"--no-{k.replace('_', '-')}")
        elif k == "budgets":
            args += [flag, ",".join(repr(b) for b in v)]
        else:
            args += [flag, str(v)]
    return shlex.join(args)


def train_all(plan: Plan, dataset: Path, out: Path, opts: SweepOptions) -> list[dict]:
    """Train every planned run that is not finished: sequentially, K at a time, or on Ray."""
    from tqdm import tqdm

    cfgs = [bc_config(plan.spec, r, dataset, out, progress=opts.progress and opts.parallel == 1 and opts.backend == "local")
            for r in plan.active]
    if opts.backend == "print":
        for c in cfgs:
            print(torchrun_command(c, opts.nproc_per_node))
        return []
    by_name = {r.name: r for r in plan.active}
    todo = [c for c in cfgs if not run_done(c)]
    spent = sum(by_name[c.run_id].compute for c in cfgs if c not in todo)
    total = plan.compute
    bar = tqdm(total=len(cfgs), initial=len(cfgs) - len(todo), unit="run", desc="sweep train", disable=not opts.progress)
    bar.set_postfix_str(f"compute {spent:.3g} done, {total - spent:.3g} left")
    threads = opts.threads or max(1, (os.cpu_count() or 1) // max(1, opts.parallel))
    results = []

    def finished(c, r):
        nonlocal spent
        spent += by_name[c.run_id].compute
        results.append(r)
        bar.update(1)
        bar.set_postfix_str(f"compute {spent:.3g} done, {total - spent:.3g} left")

    if opts.backend == "ray":
        import ray

        ray.init(address=opts.ray_address, ignore_reinit_error=True, log_to_driver=False)
        remote = ray.remote(num_cpus=threads)(_train_one)
        refs = {remote.remote(asdict(c), threads): c for c in todo}
        pending = list(refs)
        while pending:
            ready, pending = ray.wait(pending, num_returns=1)
            finished(refs[ready[0]], ray.get(ready[0]))
    elif opts.parallel > 1:
        with ProcessPoolExecutor(opts.parallel, mp_context=get_context("spawn")) as pool:
            futs = {pool.submit(_train_one, asdict(c), threads): c for c in todo}
            for f in as_completed(futs):
                finished(futs[f], f.result())
    else:
        import torch

        torch.set_num_threads(threads)
        from trajdata.train.bc import train

        for c in todo:
            finished(c, train(c))
    bar.close()
    return results


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
    for r in plan.active:
        evaluate(str(out / "runs" / r.name), EvalConfig(all=True, **ev), progress=progress)
    first = str(out / "runs" / plan.active[0].name)  # its checkpoints name the env the data came from
    for name in ([expert] if expert else []) + ["random"]:
        docs = evaluate(first, EvalConfig(expert=name, out=str(out / "baselines"), update_runs=False,
                                          **{k: v for k, v in ev.items() if k != "out"}), progress=progress)
        if docs:
            baselines["expert" if name == expert else "random"] = dict(policy=name, **docs[0]["summary"])
    (out / "baselines.json").write_text(json.dumps(baselines, indent=1) + "\n")
    return baselines


def gather(plan: Plan, out: Path) -> Path:
    """One runs.csv of every planned snapshot that exists (rows of runs not in the plan are left out)."""
    rows = []
    for r in plan.active:
        for row in ckpt_io.read_runs(out / "runs" / r.name / ckpt_io.RUNS_CSV):
            if float(row["budget"]) in r.budgets:
                rows.append(dict(row, checkpoint=f"runs/{r.name}/{row['checkpoint']}"))
    if not rows:
        raise DataError(f"sweep {out} has no snapshots yet")
    path = out / "runs.csv"
    ckpt_io.write_runs(path, rows)
    return path


def check_data(plan: Plan, dataset: Path) -> None:
    """What each run would find wrong with the data (when it exists already): a family or fields the
    models cannot train on, no training or validation episodes at the spec's val_fraction."""
    if not (dataset / "dataset.json").is_file():
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
    plan = make_plan(spec)
    check_plan(plan, fit=not opts.skip_report)
    dataset = dataset_path(spec, Path(opts.out))
    check_data(plan, dataset)
    return describe(plan, opts.flops_per_s, opts.samples_per_s), data_problem(spec, dataset)


def run_sweep(spec: Spec, opts: SweepOptions) -> dict:
    """The whole pipeline for ``spec`` (one sweep per OUT at a time); returns a summary (plan, wall
    time, where the report is)."""
    out = Path(opts.out or f"sweeps/{spec.name}")
    cluster = opts.backend == "print"  # the runs' commands are printed, to run elsewhere: no data or fit here
    check_plan(make_plan(spec), fit=not (opts.skip_report or cluster))
    problem = None if cluster else data_problem(spec, dataset_path(spec, out))
    if problem:
        raise DataError(problem)
    if not cluster:
        check_data(make_plan(spec), dataset_path(spec, out))
    with lock_dir(out, "sweep", "swept into"):
        return _run_sweep(spec, opts, out)


def _run_sweep(spec: Spec, opts: SweepOptions, out: Path) -> dict:
    t0 = time.time()
    (out / "spec.json").write_text(json.dumps(asdict(spec), indent=1, default=str) + "\n")
    dataset = ensure_data(spec, out, opts.progress) if opts.backend != "print" else dataset_path(spec, out)
    n_actions = None
    if spec.family == "atari" and (dataset / "dataset.json").is_file():
        from trajdata.format.dataset import Dataset
        from trajdata.train.shape import atari_actions

        n_actions = atari_actions(Dataset(dataset).info)
    plan = make_plan(spec, n_actions)
    (out / "plan.txt").write_text(describe(plan) + "\n")
    timings = {"data_s": round(time.time() - t0, 1)}
    train_all(plan, dataset, out, opts)
    if opts.backend == "print":
        return dict(plan=describe(plan), printed=True)
    timings["train_s"] = round(time.time() - t0 - timings["data_s"], 1)
    baselines = {}
    if not opts.skip_eval:
        t1 = time.time()
        baselines = eval_all(plan, out, opts.progress)
        timings["eval_s"] = round(time.time() - t1, 1)
    runs_csv = gather(plan, out)
    result = dict(out=str(out), runs_csv=str(runs_csv), plan=describe(plan), compute=plan.compute,
                  snapshots=plan.snapshots, baselines=baselines, timings=timings)
    if not opts.skip_report:
        from trajdata.sweep.report import write_sweep_report

        t1 = time.time()
        result["report"] = write_sweep_report(plan, out, baselines, timings)
        timings["report_s"] = round(time.time() - t1, 1)
    timings["total_s"] = round(time.time() - t0, 1)
    (out / "sweep.json").write_text(json.dumps(result, indent=1, default=str) + "\n")
    return result
