"""Fuzzing the commands after collect (#27): `train bc`, `eval`, `sweep --dry-run` and `scaling fit`
with seeded random flag values, random spec keys and values, and malformed tables.

Every trial must end in exit 0, or in exit 1 / 2 with exactly one line on stderr (``trajdata: error:
...``): never a traceback, never longer than ``TRIAL_SECONDS``. Trials run the CLI in-process (click's
CliRunner: imports are paid once) and a few through a real subprocess (the entry point, exit codes
and stderr of a real run). Valid values are kept small, so a trial that is accepted does little work.
The seed and trial count come from TRAJDATA_FUZZ_SEED / TRAJDATA_CLI_FUZZ_TRIALS for a longer hunt.
"""
from __future__ import annotations

import os
import random
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from trajdata.cli.main import cli
from trajdata.scaling import REFERENCE_RUNS

SEED = int(os.environ.get("TRAJDATA_FUZZ_SEED", 27))
TRIALS = int(os.environ.get("TRAJDATA_CLI_FUZZ_TRIALS", 16))  # per command, in-process
SUBPROCESS_TRIALS = 2  # per command, through `python -m trajdata.cli`
TRIAL_SECONDS = 60
TRAJDATA = [sys.executable, "-m", "trajdata.cli"]
PROGRESS = re.compile(r"\d+/\d+ \[|\|\s*\d+/\d+|it/s\]|s/it\]")  # a tqdm line, not an error line

JUNK = ["", "-1", "0", "nan", "inf", "-inf", "1e30", "abc", "1.5", "-5", "1e-300", "10k", "\u00e9\u4e2d", "x" * 300,
        "1,2", "true", "[1]"]


def pick(rng: random.Random, good: list) -> str:
    return str(rng.choice(good if rng.random() < 0.7 else JUNK))


# ---- what each command is given -----------------------------------------------------------------------

TRAIN_FLAGS = {  # flag -> valid values that keep a run to a step or two of the smallest agent
    "--seq-len": [16, 32], "--batch-size": [1, 2], "--grad-accum": [1, 2], "--lr": ["1e-3", "0.1", "1e30"],
    "--beta1": [0.5, 0.9], "--beta2": [0.99, 0.5], "--eps": ["1e-8", 0], "--weight-decay": [0, 0.1],
    "--grad-clip": [0, 1], "--ema": [0, 0.9], "--samples": [32, 64], "--budgets": ["1e5", "7e6", "7e6,8e6"],
    "--val-fraction": [0.3, 0.5], "--warmup-steps": [0, 1], "--schedule": ["constant", "cosine", "linear"],
    "--min-lr-ratio": [0.1, 1], "--decay-steps": [1, 2], "--family": ["auto", "nethack", "atari"],
    "--core": ["transformer", "lstm", "gru"], "--heads": [1, 2, 3], "--width": [8, 16], "--layers": [1, 2],
    "--params": ["10k", "1e30", "5.6e14", "-5"], "--preset": ["grid-1", "paper", "grid-99"],
    "--device": ["cpu", "cuda", "foo"], "--precision": ["fp32", "bf16", "fp64"], "--seed": [0, 1],
    "--log-every": [1, 2], "--checkpoint-every": [1, 2], "--val-batches": [0, 1], "--samples-per-step": [64, 100],
    "--run-id": ["a", "b c"], "--num-workers": [0, 1],
}
EVAL_FLAGS = {
    "--episodes": [1, 2], "--seed": [0, 3], "--max-steps": [3, 8], "--workers": [1], "--envs": [1, 2],
    "--unit-episodes": [1, 2], "--temperature": [1, 0.5], "--budget": ["7e6", "1e5"], "--expert": ["random", "nope",
    "ppo:/nope", "scripted"], "--character": ["@", "foo-bar", "val-hum-law-fem"], "--context": [4, 8],
    "--device": ["cpu", "cuda", "foo"], "--threads": [1], "--record-chunk-steps": [16],
    "--env": ["nethack", "Breakout", "Pong2"], "--backend": ["local", "Ray"],  # (starting Ray would take ~20 s)
}
EVAL_SWITCHES = ["--all", "--greedy", "--no-update-runs"]
SWEEP_FLAGS = {"--flops-per-s": ["1e12"], "--parallel": [1, 2], "--threads": [1], "--backend": ["local", "print"],
               "--nproc-per-node": [1, 8]}
FIT_FLAGS = {"--optimum": ["vertex", "argmin"], "--window": [0, 2], "--min-points-per-budget": [3, 2],
             "--flops-per-param-sample": [6], "--ci": [0.9], "--cv-folds": [0, 1], "--bootstrap": [0, 3],
             "--seed": [0], "--bin-budgets": [0, 2], "--parametric-points": ["window", "all"],
             "--budgets": ["1e15,1e16"], "--min-budget": ["1e15"], "--max-budget": ["1e17"]}

SPEC = {
    "sweep": {"name": "fuzz", "family": "nethack", "sizes": [[4, 1], [8, 1], [16, 1], [32, 1]], "budgets": [1e10, 2e10],
              "samples_per_param": [0, 100]},
    "data": {"dataset": "DATASET"},
    "train": {"seq_len": 32, "batch_size": 2, "lr": 1e-3},
    "eval": {"episodes": 2, "max_steps": 100},
    "fit": {"window": 0},
}
SPEC_VALUES = [0, -1, 1, 2.5, "abc", "", True, [], [1], [[4, 1]], [5, "x"], {"a": 1}, float("inf"), float("nan"),
               10**30, "1e9", [[0, 1]], [[4, 1], [4, 1]]]
SPEC_KEYS = {  # table -> key -> values the sweep accepts there (a key with none is a typo or one the sweep sets)
    "sweep": {"name": ["x", "fuzz 2"], "family": ["nethack", "atari"], "sizes": [[[4, 1], [8, 1], [16, 1], [32, 1]],
              [[4, 1], [8, 2], [16, 1], [8, 1]]], "budgets": [[1e10, 2e10], [2e10, 1e10, 1.5e10]],
              "samples_per_param": [[0, 100], [1, 20], [0.5, 1e9]], "size": []},
    "train": {"seq_len": [16, 64], "lr": [1e-3, 0.1], "ema": [0, 0.9], "beta1": [0.5], "schedule": ["cosine"],
              "warmup_steps": [5], "width": [], "widht": [], "out": []},
    "eval": {"episodes": [0, 1, 4], "max_steps": [10, 1000], "seed": [0, 7], "workers": [1, 2],
             "expert": ["scripted", "random", "autoascend", "ppo:/x"], "greedy": [True], "episode": [], "all": [],
             "max_step": []},
    "fit": {"window": [0, 2], "cv_folds": [0, 2], "ci_level": [0.9], "optimum": ["argmin", "vertex"], "windw": []},
    "data": {"dataset": [], "collect": [{"shards": 2}, {"expert": "scripted", "max_steps": 100}], "datset": []},
}


def toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float) and v != v:
        return "nan"
    if isinstance(v, float) and v in (float("inf"), float("-inf")):
        return "inf" if v > 0 else "-inf"
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(v, list):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{k} = {toml_value(x)}" for k, x in v.items()) + "}"
    return repr(v)


def spec_text(spec: dict) -> str:
    lines = []
    for table, kv in spec.items():
        lines.append(f"[{table}]")
        lines += [f"{k} = {toml_value(v)}" for k, v in kv.items()]
    return "\n".join(lines) + "\n"


def mutated_spec(rng: random.Random, dataset: Path) -> str:
    spec = {t: dict(kv) for t, kv in SPEC.items()}
    spec["data"]["dataset"] = str(dataset)
    for _ in range(rng.randint(0, 3)):
        table = rng.choice(list(SPEC_KEYS))
        key = rng.choice(sorted(SPEC_KEYS[table]))
        good = SPEC_KEYS[table][key]
        what = rng.random()
        if what < 0.1:
            spec[table].pop(key, None)
        elif what < 0.15:
            spec[rng.choice(["sweeep", "evaluate", "report"])] = {key: 1}
        elif what < 0.6 and good:
            spec[table][key] = rng.choice(good)
        elif key == "collect":
            spec[table][key] = {rng.choice(["shards", "shardz", "expert", "max_steps", "out"]): rng.choice(SPEC_VALUES)}
        else:
            spec[table][key] = rng.choice(SPEC_VALUES)
    text = spec_text(spec)
    if rng.random() < 0.1:  # a malformed table
        cut = rng.randrange(len(text))
        text = text[:cut] + rng.choice(["[", "]", "=", "\x00", "[[sweep]]\n", '"']) + text[cut:]
    return text


def runs_table(rng: random.Random, out: Path) -> Path:
    """A small runs table from the reference runs (3 budgets x their sizes), sometimes malformed."""
    lines = (REFERENCE_RUNS / "nethack_llama_isoflop.csv").read_text().splitlines()
    header, rows = lines[0], lines[1:]
    cols = header.split(",")
    flops = cols.index("flops") if "flops" in cols else None
    keep = sorted({r.split(",")[flops] for r in rows}, key=float)[4:7] if flops is not None else []
    rows = [r for r in rows if flops is None or r.split(",")[flops] in keep]
    what = rng.random()
    if what < 0.15:
        rows = rows + rows  # every run twice
    elif what < 0.3:
        drop = rng.randrange(len(cols))
        header = ",".join(c for i, c in enumerate(cols) if i != drop)
        rows = [",".join(c for i, c in enumerate(r.split(",")) if i != drop) for r in rows]
    elif what < 0.45:
        i = rng.randrange(len(rows))
        cells = rows[i].split(",")
        cells[rng.randrange(len(cells))] = rng.choice(["nan", "inf", "-1", "abc", ""])
        rows[i] = ",".join(cells)
    elif what < 0.5:
        rows = rows[:rng.randint(0, 3)]
    path = out / "runs.csv"
    data = (header + "\n" + "\n".join(rows) + "\n").encode()
    if rng.random() < 0.08:
        data = bytes(rng.randrange(256) for _ in range(300))
    path.write_bytes(data)
    return path


def flags(rng: random.Random, table: dict, n: tuple[int, int] = (1, 3)) -> list[str]:
    out = []
    for flag in rng.sample(sorted(table), rng.randint(*n)):
        out += [flag, pick(rng, table[flag])]
    return out


def trial_args(command: str, rng: random.Random, where: Path, dataset: Path, run: Path) -> list[str]:
    if command == "train":
        out = where / "run"
        return ["train", "bc", str(dataset), "--out", str(out), "--width", "8", "--layers", "1", "--seq-len", "32",
                "--batch-size", "2", "--samples", "64", "--val-fraction", "0.3", "--no-progress",
                *flags(rng, TRAIN_FLAGS)]
    if command == "eval":
        copy = Path(shutil.copytree(run, where / "run"))
        (where / "file").write_text("x")
        extra = flags(rng, EVAL_FLAGS) + rng.sample(EVAL_SWITCHES, rng.randint(0, 1))
        if rng.random() < 0.15:
            extra += ["--record", str(where / rng.choice(["file", "rec"]))]
        if rng.random() < 0.1:
            (copy / "runs.csv").write_bytes(bytes(range(256)))
        target = [] if rng.random() < 0.1 else [str(copy)]
        return ["eval", *target, "--episodes", "1", "--max-steps", "5", "--envs", "1", "--no-progress", *extra]
    if command == "sweep":
        spec = where / "spec.toml"
        spec.write_text(mutated_spec(rng, dataset))
        return ["sweep", str(spec), "--dry-run", "--out", str(where / "sw"), *flags(rng, SWEEP_FLAGS, (0, 2))]
    if command == "fit":
        table = runs_table(rng, where)
        return ["scaling", "fit", str(table), "--out", str(where / "fit"), "--cv-folds", "0", *flags(rng, FIT_FLAGS)]
    raise ValueError(command)


def judge(code: int, stderr: str, seconds: float) -> str | None:
    """Why a trial failed (None: it passed)."""
    if seconds > TRIAL_SECONDS:
        return f"took {seconds:.0f} s"
    if "Traceback" in stderr:
        return "traceback: " + stderr.strip().splitlines()[-1][:200]
    if code == 0:
        return None
    lines = [ln for ln in stderr.splitlines() if ln.strip() and not PROGRESS.search(ln)]
    if code not in (1, 2):
        return f"exit {code}: {stderr.strip()[-200:]}"
    if len(lines) != 1 or not lines[0].startswith("trajdata: error: "):
        return f"{len(lines)} stderr lines: {' | '.join(lines)[:300]}"
    return None


def in_process(args: list[str]) -> tuple[int, str]:
    res = CliRunner().invoke(cli, args)
    if res.exception is not None and not isinstance(res.exception, SystemExit):
        import traceback

        return 1, "".join(traceback.format_exception(res.exception))
    return res.exit_code, res.stderr


def subprocess_run(args: list[str]) -> tuple[int, str]:
    p = subprocess.run([*TRAJDATA, *args], capture_output=True, text=True, timeout=TRIAL_SECONDS * 3)
    return p.returncode, p.stderr


@pytest.fixture(scope="module")
def fuzz_run(scripted_data, tmp_path_factory) -> Path:
    """A run with snapshots at budgets 7e6 and 8e6 (the smallest agent, 2 steps)."""
    from trajdata.train.bc import BCConfig, train

    out = tmp_path_factory.mktemp("fuzzrun") / "run"
    train(BCConfig(dataset=str(scripted_data), out=str(out), width=8, layers=1, seq_len=32, batch_size=2,
                   val_fraction=0.3, budgets=(7e6, 8e6), progress=False))
    return out


@pytest.mark.parametrize("command", ["train", "eval", "sweep", "fit"])
def test_cli_fuzz(command, scripted_data, fuzz_run, tmp_path):
    rng = random.Random(f"{SEED}-{command}")
    failures, codes = [], {}
    for i in range(TRIALS + SUBPROCESS_TRIALS):
        where = tmp_path / f"t{i}"
        where.mkdir()
        args = trial_args(command, rng, where, scripted_data, fuzz_run)
        how = "subprocess" if i >= TRIALS else "in-process"
        t0 = time.monotonic()
        code, stderr = (subprocess_run if how == "subprocess" else in_process)(args)
        seconds = time.monotonic() - t0
        why = judge(code, stderr, seconds)
        codes[code] = codes.get(code, 0) + 1
        shown = " ".join(a if len(a) < 40 else a[:37] + "..." for a in args
                         if not a.startswith((str(tmp_path), str(scripted_data), str(fuzz_run))))
        last = (stderr.strip().splitlines() or [""])[-1][:150]
        print(f"\n{command} #{i} ({how}, {seconds:.1f} s) {shown}\n  -> exit {code} {last}"
              + (f"\n  FAILED: {why}" if why else ""), end="")
        if why:
            failures.append((args, why))
    print(f"\n{command}: {TRIALS + SUBPROCESS_TRIALS} trials (seed {SEED}), exits {dict(sorted(codes.items()))}, "
          f"{len(failures)} failures")
    assert not failures, "\n".join(f"{' '.join(a)}: {w}" for a, w in failures)
