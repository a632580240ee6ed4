"""Sweeps: plan and run train bc at several sizes with budget snapshots, evaluate, fit, report.

    from trajdata.sweep import load_spec, make_plan, run_sweep, SweepOptions
    plan = make_plan(load_spec("specs/cpu.toml")); print(describe(plan))
"""
from trajdata.sweep.plan import Plan, PlannedRun, Spec, describe, load_spec, make_plan

__all__ = ["Plan", "PlannedRun", "Spec", "describe", "load_spec", "make_plan"]
