"""Reliability after collect (#27): exact resume after Ctrl-C / SIGTERM, one command per directory,
the dataset's identity, runs that fail before their first step, non-finite losses, sizes too large.

Real components at tiny sizes: the real scripted-NetHack dataset (conftest), the real BC models and
loaders, real signals. Every failure must be one line and leave no data that was safe corrupted.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from trajdata.cli.main import cli
from trajdata.models.flops import effective_params
from trajdata.models.nethack import NetHackConfig
from trajdata.train import bc
from trajdata.train import checkpoint as ckpt_io
from trajdata.train.bc import BCConfig, train

TRAJDATA = [sys.executable, "-m", "trajdata.cli"]
# 4 lanes x 64 steps = 256 samples a step; one val episode at this fraction
TINY = dict(width=64, layers=1, seq_len=64, batch_size=4, lr=3e-3, val_fraction=0.3, progress=False, log_every=1,
            checkpoint_every=5, ema=0.9, samples=2048)
PER_SAMPLE = 6 * effective_params(NetHackConfig(64, 1))
BUDGETS = tuple(n * 256 * PER_SAMPLE for n in (2, 4, 7))  # snapshots after steps 2, 4 and 7 (of 8)
# 2 lanes x 32 steps = 64 samples a step of the smallest agent
SMALL = ["--width", "8", "--layers", "1", "--seq-len", "32", "--batch-size", "2", "--val-fraction", "0.3",
         "--no-progress", "--log-every", "1"]


def run_cli(*args):
    res = CliRunner().invoke(cli, [str(a) for a in args])
    assert not isinstance(res.exception, Exception) or isinstance(res.exception, SystemExit), res.exc_info
    return res.exit_code, res.output


def one_line(code: int, out: str, *names: str) -> str:
    assert code != 0 and "Traceback" not in out, out
    lines = [ln for ln in out.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("trajdata: error: "), out
    for n in names:
        assert n in lines[0], (n, lines[0])
    return lines[0]


# ---- 1. Ctrl-C / SIGTERM, then rerun: every tensor as in an uninterrupted run -----------------------

def tensors(x, prefix="") -> dict[str, torch.Tensor]:
    """Every tensor inside a checkpoint (nested dicts, lists, tuples, numpy RNG arrays), by path."""
    import numpy as np

    out = {}
    if isinstance(x, torch.Tensor):
        out[prefix] = x
    elif isinstance(x, np.ndarray):
        out[prefix] = torch.from_numpy(np.ascontiguousarray(x))
    elif isinstance(x, dict):
        for k, v in x.items():
            out.update(tensors(v, f"{prefix}/{k}"))
    elif isinstance(x, (list, tuple)):
        for i, v in enumerate(x):
            out.update(tensors(v, f"{prefix}/{i}"))
    return out


def compare(a: Path, b: Path) -> tuple[int, list[str], list[str]]:
    """(tensors compared, the checkpoint parts they are in, paths that differ) between two checkpoint
    files (``train``, the config, left out)."""
    ta, tb = (tensors({k: v for k, v in ckpt_io.load(p).items() if k != "train"}) for p in (a, b))
    assert ta.keys() == tb.keys(), set(ta) ^ set(tb)
    differ = [k for k in ta if ta[k].shape != tb[k].shape or not torch.equal(ta[k], tb[k])]
    parts = sorted({k.split("/")[1] for k in ta})
    return len(ta), parts, differ


@pytest.fixture(scope="module")
def small_run(scripted_data, tmp_path_factory) -> Path:
    """A run of the smallest agent with snapshots at budgets 7e6 and 8e6 (two steps)."""
    out = tmp_path_factory.mktemp("small") / "run"
    train(BCConfig(dataset=str(scripted_data), out=str(out), width=8, layers=1, seq_len=32, batch_size=2,
                   val_fraction=0.3, budgets=(7e6, 8e6), progress=False))
    return out


@pytest.fixture(scope="module")
def whole(scripted_data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("whole") / "run"
    train(BCConfig(dataset=str(scripted_data), out=str(out), budgets=BUDGETS, **TINY))
    return out


def interrupting(monkeypatch, sig: int, at: set[int]):
    """Make ``train`` receive ``sig`` from inside the map encoder's BatchNorm forward (after it
    updated its running statistics) while computing optimizer step k + 1, for each k in ``at``."""
    real = bc.build_state
    fired: set[int] = set()

    def build(run):
        state = real(run)
        norm = next(m for m in state.model.modules() if isinstance(m, torch.nn.BatchNorm2d))

        def hook(module, inputs, output):
            if module.training and state.step in at and state.step not in fired:
                fired.add(state.step)
                os.kill(os.getpid(), sig)

        norm.register_forward_hook(hook)
        return state

    monkeypatch.setattr(bc, "build_state", build)
    return fired


@pytest.mark.slow
@pytest.mark.parametrize("sig,at", [(signal.SIGINT, (1, 3, 6)), (signal.SIGTERM, (2, 5))])
def test_interrupted_by_signals_then_rerun_equals_uninterrupted(scripted_data, whole, tmp_path, monkeypatch, sig, at):
    """Failed before the fix: the interrupt handler saved BatchNorm statistics of the interrupted step's
    forward with the loader position of the step before (num_batches_tracked 17 vs 16 in the issue)."""
    from trajdata.cli.main import _terminate_like_interrupt

    parts = tmp_path / "parts"
    cfg = BCConfig(dataset=str(scripted_data), out=str(parts), budgets=BUDGETS, **TINY)
    interrupting(monkeypatch, sig, set(at))
    restore = _terminate_like_interrupt()  # SIGTERM as the CLI handles it (raises Terminated)
    saved = []
    try:
        for k in at:
            with pytest.raises(KeyboardInterrupt) as e:
                train(cfg)
            saved.append(ckpt_io.load(parts / ckpt_io.LATEST)["step"])
            print(f"\n{signal.Signals(sig).name} during step {k + 1}: {type(e.value).__name__}({e.value}); "
                  f"checkpoint at step {saved[-1]}")
        r = train(cfg)
    finally:
        restore()
    assert r["finished"] and r["resumed"]
    pairs = [(whole / ckpt_io.LATEST, parts / ckpt_io.LATEST)]
    pairs += [(p, parts / ckpt_io.SNAPSHOTS / p.name) for _, p in ckpt_io.snapshots(whole)]
    assert len(pairs) == 1 + len(BUDGETS)
    for a, b in pairs:
        n, held, differ = compare(a, b)
        norms = sum("running_" in k or "num_batches_tracked" in k for k in tensors(ckpt_io.load(a)["model"]))
        print(f"  {a.name}: {n} tensors compared ({', '.join(held)}; {norms} BatchNorm buffers in the model), "
              f"{len(differ)} differ" + (f": {differ[:6]}" if differ else ""))
        assert norms > 0 and not differ, (a.name, differ)
    assert saved == [k + 1 for k in at]  # the interrupted step finished, then the run stopped
    rows = lambda d: [(m["step"], m["samples"], m["loss"], m["accuracy"]) for m in  # noqa: E731
                      map(json.loads, (d / "metrics.jsonl").read_text().splitlines())]
    assert rows(whole) == rows(parts)
    val = lambda d: [(r["budget"], r["samples"], r["loss"]) for r in ckpt_io.read_runs(d / "runs.csv")]  # noqa: E731
    assert val(whole) == val(parts)
    print("  val losses: " + ", ".join(r[2] for r in val(parts)))


@pytest.mark.slow
def test_ctrl_c_and_sigterm_of_the_command_are_one_line_and_resume(scripted_data, tmp_path):
    """The real command in a terminal: Ctrl-C (to the process group) and SIGTERM end it with one line
    naming the checkpoint it left (exit 130 / 143); the same command then finishes the run."""
    run = tmp_path / "r"
    args = [*TRAJDATA, "train", "bc", scripted_data, "--out", run, *SMALL, "--samples", 100_000, "--log-every", 1]
    for sig, code, word in [(signal.SIGINT, 130, "interrupted"), (signal.SIGTERM, 143, "terminated")]:
        proc = subprocess.Popen(list(map(str, args)), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                start_new_session=True)
        try:
            start = len(metric_rows(run))
            wait_for(lambda: len(metric_rows(run)) >= start + 2, proc)
            os.killpg(proc.pid, sig)
            _, err = proc.communicate(timeout=120)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
        step = ckpt_io.load(run / ckpt_io.LATEST)["step"]
        print(f"\n{signal.Signals(sig).name}: exit {proc.returncode}: {err.strip()}")
        assert proc.returncode == code and err.strip().splitlines() == [
            f"trajdata: {word} ({run / ckpt_io.LATEST} holds step {step}: rerun the same command to resume)"], err
        assert [m["step"] for m in metric_rows(run)] == list(range(1, step + 1))  # every step once
    code, out = run_cli("train", "bc", scripted_data, "--out", run, *SMALL, "--samples", (step + 2) * 64)
    assert code == 0, out
    assert [m["step"] for m in metric_rows(run)] == list(range(1, step + 3))


# ---- 2. one train bc / eval / sweep per directory ----------------------------------------------------


def metric_rows(run: Path) -> list[dict]:
    path = run / "metrics.jsonl"
    return [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()] if path.is_file() else []


def wait_for(cond, proc=None, seconds=300.0):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if cond():
            return
        assert proc is None or proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    raise AssertionError("timed out")


def test_second_train_into_the_same_out_is_refused(scripted_data, tmp_path):
    """Failed before the fix: both ran to exit 0 and metrics.jsonl held every step twice."""
    run = tmp_path / "r"
    args = ["train", "bc", scripted_data, "--out", run, *SMALL, "--samples", 6 * 64]
    first = subprocess.Popen([*TRAJDATA, *map(str, args)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: (run / "config.json").is_file(), first)
        line = one_line(*run_cli(*args), str(run), f"pid {first.pid}", "another train bc")
        print("\n" + line)
        out, err = first.communicate(timeout=600)
        assert first.returncode == 0, err
    finally:
        first.kill()
    assert [m["step"] for m in metric_rows(run)] == [1, 2, 3, 4, 5, 6]
    code, out = run_cli(*args)  # the lock of a finished run blocks nothing
    assert code == 0, out


def hold_lock(directory: Path, what: str):
    """Another process holding ``directory`` as a running ``what`` command would (the same helper)."""
    code = (f"import sys, time; from trajdata.config import lock_dir; l = lock_dir({str(directory)!r}, {what!r}); "
            "print('held', flush=True); time.sleep(600)")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_eval_and_sweep_into_a_held_directory_are_refused(scripted_data, small_run, tmp_path):
    """Failed before the fix: a second eval (or sweep) wrote the same files as the first."""
    run = Path(shutil.copytree(small_run, tmp_path / "run"))
    holder = hold_lock(run / "eval", "eval")
    try:
        line = one_line(*run_cli("eval", run, "--episodes", 1, "--max-steps", 5, "--no-progress"),
                        f"pid {holder.pid}", "another eval", str(run / "eval"))
        print("\n" + line)
    finally:
        holder.kill()
    spec = tmp_path / "spec.toml"
    spec.write_text(f'[sweep]\nfamily = "nethack"\nsizes = [[4, 1], [8, 1]]\nbudgets = [1e7]\n'
                    f'[data]\ndataset = "{scripted_data}"\n[train]\nseq_len = 32\nbatch_size = 2\nval_fraction = 0.3\n')
    holder = hold_lock(tmp_path / "sw", "sweep")
    try:
        line = one_line(*run_cli("sweep", spec, "--out", tmp_path / "sw", "--skip-report", "--no-progress"),
                        f"pid {holder.pid}", "another sweep")
        print(line)
    finally:
        holder.kill()


# ---- 3. resume compares the dataset's identity, not the path as typed ---------------------------------

def test_resume_compares_the_dataset_not_the_path_as_typed(scripted_data, tmp_path, monkeypatch):
    """Failed before the fix: "ds" from another directory resumed on other data; the absolute path was refused."""
    from trajdata.format.dataset import build_index

    a, b = tmp_path / "a", tmp_path / "b"
    shutil.copytree(scripted_data, a / "ds")
    shutil.copytree(scripted_data, b / "ds")
    (b / "ds" / "shards" / "shard-000002.tar").unlink()  # b/ds: other data under the same relative path
    build_index(b / "ds")
    run = tmp_path / "run"
    monkeypatch.chdir(a)
    assert run_cli("train", "bc", "ds", "--out", run, *SMALL, "--samples", 64)[0] == 0
    monkeypatch.chdir(b)
    line = one_line(*run_cli("train", "bc", "ds", "--out", run, *SMALL, "--samples", 128), "another dataset",
                    str(a / "ds"), str(b / "ds"))
    print("\n" + line)
    code, out = run_cli("train", "bc", str(a / "ds"), "--out", run, *SMALL, "--samples", 128)  # same data, absolute
    assert code == 0, out
    assert [m["step"] for m in metric_rows(run)] == [1, 2]


def test_a_run_resumes_under_another_spelling_of_its_path_and_after_a_move(scripted_data, tmp_path, monkeypatch):
    """Failed before the fix: config.json kept --out as typed, so "run" refused to resume as its absolute
    path, or after the directory (a sweep's, say) was moved ("holds a BC run with out='run', not ...")."""
    monkeypatch.chdir(tmp_path)
    assert run_cli("train", "bc", scripted_data, "--out", "run", *SMALL, "--samples", 64)[0] == 0
    code, out = run_cli("train", "bc", scripted_data, "--out", tmp_path / "run", *SMALL, "--samples", 128)
    assert code == 0, out
    shutil.move(tmp_path / "run", tmp_path / "moved" / "run")  # a run renamed keeps its --run-id: it says so
    code, out = run_cli("train", "bc", scripted_data, "--out", "moved/run", *SMALL, "--samples", 192)
    assert code == 0, out
    assert [m["step"] for m in metric_rows(tmp_path / "moved" / "run")] == [1, 2, 3]
    one_line(*run_cli("train", "bc", scripted_data, "--out", "moved/run", *SMALL, "--samples", 256, "--lr", 0.5),
             "holds a BC run with --lr=")


def test_a_sweep_keeps_a_finished_run_only_on_the_data_it_was_trained_on(scripted_data, tmp_path):
    """Failed before the fix: a finished run counted as done on any data (only its snapshots were
    looked at), so a sweep whose dataset had changed kept and reported the run trained on the old one."""
    from trajdata.format.dataset import build_index

    ds = Path(shutil.copytree(scripted_data, tmp_path / "ds"))
    spec = tmp_path / "spec.toml"
    spec.write_text(f'[sweep]\nfamily = "nethack"\nsizes = [[4, 1]]\nbudgets = [1e7]\n[data]\ndataset = "{ds}"\n'
                    '[train]\nseq_len = 32\nbatch_size = 2\nval_fraction = 0.3\n')
    args = ("sweep", spec, "--out", tmp_path / "sw", "--skip-eval", "--skip-report", "--no-progress")
    assert run_cli(*args)[0] == 0
    run = tmp_path / "sw" / "runs" / "nethack-h4-L1"
    before = {f: f.stat().st_mtime_ns for f in run.rglob("*") if f.is_file()}
    assert run_cli(*args)[0] == 0  # the same data: kept, nothing redone
    (ds / "shards" / "shard-000002.tar").unlink()
    build_index(ds)
    line = one_line(*run_cli(*args), str(run), "as it was before it changed", "another --out")
    print("\n" + line)
    assert {f: f.stat().st_mtime_ns for f in run.rglob("*") if f.is_file()} == before


# ---- 4. a run that failed before its first step does not block the corrected rerun ------------------

def test_rerun_with_a_corrected_config_after_a_failure_before_the_first_step(scripted_data, tmp_path, monkeypatch):
    """Failed before the fix: config.json of the failed run refused the corrected one ('holds a BC run with ...')."""
    from trajdata.errors import DataError

    run = tmp_path / "r"
    real = bc.build_state

    def fails(run_):  # as an out-of-memory model or a bad optimizer setting did, after config.json was written
        raise DataError("no room for the model")

    monkeypatch.setattr(bc, "build_state", fails)
    one_line(*run_cli("train", "bc", scripted_data, "--out", run, *SMALL, "--samples", 64, "--lr", 1), "no room")
    assert json.loads((run / "config.json").read_text())["lr"] == 1
    monkeypatch.setattr(bc, "build_state", real)
    code, out = run_cli("train", "bc", scripted_data, "--out", run, *SMALL, "--samples", 64, "--lr", 1e-3)
    assert code == 0, out
    assert json.loads((run / "config.json").read_text())["lr"] == 1e-3
    # once a step is taken, a different config is refused as before
    one_line(*run_cli("train", "bc", scripted_data, "--out", run, *SMALL, "--samples", 128, "--lr", 1), "--lr")
    code, out = run_cli("train", "bc", scripted_data, "--out", tmp_path / "b", *SMALL, "--samples", 64, "--beta1", 2)
    one_line(code, out, "--beta1 must be in [0, 1) (got 2.0)")
    code, out = run_cli("train", "bc", scripted_data, "--out", tmp_path / "b", *SMALL, "--samples", 64, "--beta1", 0.5)
    assert code == 0, out


# ---- 5, 14, 16. bad values are one line naming the flag (or the file's key) and the value --------------

@pytest.mark.parametrize("args,message", [
    (["--beta1", "2"], "--beta1 must be in [0, 1) (got 2.0)"),
    (["--beta2", "nan"], "--beta2 must be a finite number (got nan)"),
    (["--eps", "-1"], "--eps must be at least 0 (got -1.0)"),
    (["--lr", "inf"], "--lr must be a finite number (got inf)"),
    (["--weight-decay", "inf"], "--weight-decay must be a finite number (got inf)"),
    (["--grad-clip", "nan"], "--grad-clip must be a finite number (got nan)"),
    (["--grad-clip", "-1"], "--grad-clip must be at least 0 (0: off; got -1.0)"),
    (["--samples", "-5"], "--samples must be at least 1 (got -5)"),
    (["--params", "-5"], "--params must be positive (got '-5')"),
    (["--family", "atari"], "--family atari: {ds} is a nethack dataset with no Atari frames"),
    (["--config", "width.toml"], "--width must be an integer (got 'abc')"),
    (["--config", "lr.toml"], "--lr must be a number (got 'fast')"),
    (["--config", "budgets.toml"], "--budgets 100000 is less than one optimizer step"),
    (["--config", "inf.toml"], "--lr must be a finite number (got inf)"),
])
def test_bad_train_values_are_one_line(scripted_data, tmp_path, monkeypatch, args, message):
    """Failed before the fix: --beta1 2, --beta2 nan, --eps -1 were ValueError tracebacks from AdamW; --lr inf
    and --weight-decay inf trained on nan to the end; --family atari named an unknown game."""
    monkeypatch.chdir(tmp_path)
    for name, text in [("width", 'width = "abc"'), ("lr", 'lr = "fast"'), ("budgets", 'budgets = "1e5"'),
                       ("inf", "lr = inf")]:
        Path(f"{name}.toml").write_text(text + "\n")
    base = SMALL[2:] if "--params" in args or "width.toml" in args else SMALL  # one way to size the model
    code, out = run_cli("train", "bc", scripted_data, "--out", tmp_path / "r", *base, "--samples", 64, *args)
    line = one_line(code, out, message.format(ds=scripted_data))
    print("\n" + line)
    assert not (tmp_path / "r" / ckpt_io.LATEST).exists()


@pytest.mark.parametrize("size", [["--params", "1e30"], ["--params", "5.6e14"], ["--width", "65536", "--layers", "40"]])
def test_sizes_too_large_are_one_line_at_once(scripted_data, tmp_path, size):
    """Failed before the fix: --params 1e30 printed nothing for 300 s (the size search never ended);
    5.6e14 ended in an allocator traceback."""
    t0 = time.monotonic()
    p = subprocess.run([*TRAJDATA, "train", "bc", str(scripted_data), "--out", str(tmp_path / "r"), *SMALL[4:], *size],
                       capture_output=True, text=True, timeout=120)
    took = time.monotonic() - t0
    print(f"\n{' '.join(size)}: exit {p.returncode} in {took:.1f} s: {p.stderr.strip()}")
    assert p.returncode == 1 and p.stderr.count("\n") == 1 and "too large for" in p.stderr, p.stderr
    assert not (tmp_path / "r" / "config.json").exists()


def test_a_loss_that_goes_non_finite_stops_the_run_naming_the_step(scripted_data, tmp_path):
    """Failed before the fix: the run trained on nan to the end (exit 0) and saved nan weights."""
    run = tmp_path / "r"
    code, out = run_cli("train", "bc", scripted_data, "--out", run, *SMALL, "--samples", 40 * 64, "--lr", "1e30",
                        "--checkpoint-every", 1, "--grad-clip", 0)
    line = one_line(code, out, "non-finite", "at step")
    print("\n" + line)
    bad = int(line.split("at step ")[1].split()[0])
    ck = ckpt_io.load(run / ckpt_io.LATEST)
    assert ck["step"] < bad and all(torch.isfinite(v).all() for v in ck["model"].values() if v.is_floating_point())
    assert f"keeps step {ck['step']}" in line
    assert all(m["step"] < bad and m["loss"] == m["loss"] for m in metric_rows(run))  # no nan row written


# ---- 11. metrics.jsonl after a run died before its first rolling checkpoint ---------------------------

def test_metrics_have_no_duplicates_after_a_death_before_the_first_checkpoint(scripted_data, tmp_path, monkeypatch):
    """Failed before the fix: the rerun appended steps 1..k again after the dead run's rows."""
    import errno

    run = tmp_path / "r"
    real = bc.save_latest

    def full_disk(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device", str(run / ckpt_io.LATEST))

    monkeypatch.setattr(bc, "save_latest", full_disk)
    one_line(*run_cli("train", "bc", scripted_data, "--out", run, *SMALL, "--samples", 4 * 64, "--checkpoint-every", 3),
             "No space left")
    assert [m["step"] for m in metric_rows(run)] == [1, 2, 3]  # rows of steps no checkpoint holds
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 4, "loss": 1.')  # and a torn last row
    monkeypatch.setattr(bc, "save_latest", real)
    code, out = run_cli("train", "bc", scripted_data, "--out", run, *SMALL, "--samples", 4 * 64, "--checkpoint-every", 3)
    assert code == 0, out
    assert [m["step"] for m in metric_rows(run)] == [1, 2, 3, 4]


# ---- 7, 10, 16. eval: bad values, devices, files in the way, its workers die with it ---------------------

def test_bad_eval_input_is_one_line(small_run, tmp_path):
    """Failed before the fix: tracebacks (ValueError, AssertionError, RuntimeError, FileExistsError,
    UnicodeDecodeError), and --device cuda exited 0 once every seed was played."""
    run = Path(shutil.copytree(small_run, tmp_path / "run"))
    base = ["eval", run, "--episodes", 1, "--max-steps", 5, "--no-progress"]
    code, out = run_cli(*base)
    assert code == 0, out  # every seed played: what follows must still check its input
    (tmp_path / "file").write_text("x")
    cases = [(["--seed", "-5"], "--seed must be at least 0 (got -5)"),
             (["--device", "foo"], "--device 'foo': use cpu, cuda, cuda:N or mps"),
             (["--record", tmp_path / "file"], f"--record {tmp_path / 'file'} is a file")]
    if not torch.cuda.is_available():
        cases.append((["--device", "cuda"], "--device 'cuda' was asked for, but this machine has no usable CUDA GPU"))
    for args, message in cases:
        print("\n" + one_line(*run_cli(*base, *args), message), end="")
    (run / "runs.csv").write_bytes(bytes(range(256)) * 4)
    print("\n" + one_line(*run_cli(*base, "--episodes", 2), str(run / "runs.csv"), "is not a runs table"))


def test_eval_of_a_run_without_runs_csv_writes_the_train_row(small_run, tmp_path):
    """The row eval adds to a run that lost its runs.csv is train's (run id, flops = the budget), not
    the directory's name and the actual FLOPs."""
    run = Path(shutil.copytree(small_run, tmp_path / "renamed"))
    want = {r["budget"]: r for r in ckpt_io.read_runs(run / "runs.csv")}
    (run / "runs.csv").unlink()
    code, out = run_cli("eval", run, "--all", "--episodes", 1, "--max-steps", 5, "--no-progress")
    assert code == 0, out
    rows = ckpt_io.read_runs(run / "runs.csv")
    assert len(rows) == 2
    for r in rows:
        assert {k: r[k] for k in ckpt_io.RUN_COLUMNS} == {k: want[r["budget"]][k] for k in ckpt_io.RUN_COLUMNS}
        assert r["run"] == "run" and float(r["flops"]) == float(r["budget"]) and r["episodes"] == "1"


def _children() -> dict[int, int]:
    out = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            with contextlib.suppress(OSError):
                fields = (d / "stat").read_text().rpartition(")")[2].split()
                if fields[0] != "Z":
                    out[int(d.name)] = int(fields[1])
    return out


def descendants(pid: int) -> set[int]:
    procs, found, todo = _children(), set(), [pid]
    while todo:
        parent = todo.pop()
        kids = {c for c, pp in procs.items() if pp == parent}
        found |= kids
        todo.extend(kids)
    return found


@pytest.mark.slow
def test_killing_eval_kills_its_workers(small_run, tmp_path):
    """Failed before the fix: after kill -9 of `eval --workers 2`, both spawn workers and the
    resource tracker lived on."""
    run = Path(shutil.copytree(small_run, tmp_path / "run"))
    proc = subprocess.Popen([*TRAJDATA, "eval", str(run), "--episodes", "8", "--max-steps", "20000", "--workers", "2",
                             "--envs", "1", "--unit-episodes", "1", "--no-progress"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        wait_for(lambda: len(descendants(proc.pid)) >= 3, proc)  # two workers and the resource tracker
        time.sleep(1.0)
        workers = descendants(proc.pid)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and workers & set(_children()):
            time.sleep(0.1)
        left = workers & set(_children())
        print(f"\nkill -9 of eval with {len(workers)} descendants: {len(left)} left after it")
        assert not left
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)


@pytest.mark.slow
def test_a_crashed_eval_worker_is_one_line_and_keeps_finished_episodes(small_run, tmp_path):
    """Failed before the fix: an eval worker that died of SIGSEGV (it happened in a sweep's rollouts)
    ended `trajdata eval` (and the sweep) with concurrent.futures' BrokenProcessPool traceback."""
    run = Path(shutil.copytree(small_run, tmp_path / "run"))
    cmd = [*TRAJDATA, "eval", str(run), "--episodes", "8", "--max-steps", "3000", "--workers", "2", "--envs", "1",
           "--unit-episodes", "1", "--no-progress", "--budget", "8e6"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    result = run / "eval" / "budget-8e6-steps3000.json"
    try:
        wait_for(lambda: result.is_file() and len(json.loads(result.read_text())["episodes"]) >= 1, proc)
        workers = {c for c, pp in _children().items() if pp == proc.pid}
        victim = max(workers, key=lambda c: Path(f"/proc/{c}/cmdline").read_bytes().count(b"spawn"))
        os.kill(victim, signal.SIGSEGV)
        out, err = proc.communicate(timeout=120)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    print(f"\nSIGSEGV to an eval worker: exit {proc.returncode}, stderr {err.strip()!r}")
    assert proc.returncode == 1 and err.count("\n") == 1 and "Traceback" not in err, err
    assert "an eval worker died (killed by SIGSEGV)" in err and "rerun to go on" in err, err
    kept = json.loads(result.read_text())["episodes"]
    assert len(kept) >= 1
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert len(json.loads(result.read_text())["episodes"]) == 8


# ---- 8, 9, 15, 16. sweep: the dry run checks what the real sweep would --------------------------------

SPEC = """[sweep]
name = "t"
family = "nethack"
sizes = {sizes}
budgets = [1e10, 2e10]
{sweep}
[data]
dataset = "{dataset}"
{data}
[train]
seq_len = 32
{train}
[eval]
{eval}
"""


def dry_run(tmp_path, dataset, *flags, sizes="[[4, 1], [8, 1], [16, 1], [32, 1]]", sweep="", data="", train="",
            eval="episodes = 2"):
    p = tmp_path / "spec.toml"
    p.write_text(SPEC.format(sizes=sizes, dataset=dataset, sweep=sweep, data=data, train=train, eval=eval))
    return run_cli("sweep", p, "--dry-run", *flags)


@pytest.mark.parametrize("change,message", [
    (dict(sweep="samples_per_param = [5]"), "[sweep] samples_per_param must be [lo, hi], two numbers (got [5])"),
    (dict(sweep='samples_per_param = "ab"'), "[sweep] samples_per_param must be [lo, hi], two numbers (got 'ab')"),
    (dict(train='lr = "fast"'), "[train] lr must be a number (got 'fast')"),
    (dict(train="lr = inf"), "[train] lr must be a finite number (got inf)"),
    (dict(eval="episodes = 2\nmax_step = 100"), "unknown key 'max_step' in [eval]"),
    (dict(eval="episode = 2"), "unknown key 'episode' in [eval]"),
    (dict(eval="episodes = -1"), "[eval] episodes must be an integer, at least 0"),
    (dict(eval="episodes = 2\nseed = -5"), "[eval] seed must be at least 0 (got -5)"),
    (dict(data="[data.collect]\nshardz = 2"), "[data.collect] unknown key 'shardz'"),
    (dict(data="[data.collect]\nshards = 0"), "[data.collect] shards must be at least 1 (got 0)"),
    (dict(sizes="[[4, 1], [8, 1], [4, 1], [16, 1]]"), "[sweep] sizes lists [4, 1] twice"),
    (dict(sizes="[[4, 1], [8, 1]]"), "the plan has 4 snapshots, and the scaling fit needs at least 8"),
    (dict(eval='episodes = 2\n[report]\nreference = "nope.csv"'), "[report] reference"),
])
def test_bad_sweep_specs_fail_the_dry_run_in_one_line(scripted_data, tmp_path, change, message):
    """Failed before the fix: tracebacks ([5], "ab"), or a dry run that passed and a sweep that failed
    after every run was trained ([eval] max_step, too few snapshots) or skipped all rollouts ([eval] episode)."""
    print("\n" + one_line(*dry_run(tmp_path, scripted_data, **change), message))


def test_dry_run_flags_and_missing_data(scripted_data, tmp_path):
    """Failed before the fix: --flops-per-s -5 printed a negative time; a missing dataset was silent."""
    one_line(*dry_run(tmp_path, scripted_data, "--flops-per-s", "-5"), "--flops-per-s must be a positive finite number of FLOP/s, not -5")
    code, out = dry_run(tmp_path, scripted_data, "--flops-per-s", "1e9")
    assert code == 0 and "h at 1e+09 FLOP/s" in out, out
    code, out = dry_run(tmp_path, tmp_path / "nope")
    assert code == 0, out
    warning = [ln for ln in out.splitlines() if ln.startswith("trajdata: warning:")]
    print("\n" + warning[0])
    assert len(warning) == 1 and str(tmp_path / "nope") in warning[0] and "does not exist" in warning[0]
    code, out = run_cli("sweep", tmp_path / "spec.toml", "--out", tmp_path / "o", "--no-progress")  # the real one refuses
    one_line(code, out, str(tmp_path / "nope"), "does not exist")
    atari = tmp_path / "atari.toml"  # data the runs could not train on: refused now, not at the first run
    atari.write_text(f'[sweep]\nfamily = "atari"\nsizes = [1, 2]\nbudgets = [1e10]\n[data]\ndataset = "{scripted_data}"\n')
    print("\n" + one_line(*run_cli("sweep", atari, "--dry-run", "--skip-report"), "is a nethack dataset with no Atari"))


# ---- stats: "while ..." is a death cause of its own ----------------------------------------------------

def test_death_causes_count_the_while_clause(scripted_copy):
    """Failed before the fix: "killed by a rothe, while fainted from lack of food" was "killed by rothe"
    (4 starvation deaths of 63 AutoAscend games where 30 had fainted from hunger)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from trajdata.format.stats import dataset_stats, death_cause, format_stats

    assert death_cause("killed by a rothe, while fainted from lack of food") == "fainted from lack of food"
    assert death_cause("killed by a hill orc, while frozen by a potion") == "killed while frozen by potion"
    assert death_cause("killed by a hill orc") == "killed by hill orc"
    assert death_cause("starved to death") == "starvation"
    index = scripted_copy / "index.parquet"
    table = pq.read_table(index)
    deaths = ["killed by a rothe, while fainted from lack of food", "killed by a bat, while fainted from lack of food",
              "starved to death", "killed by a jackal", "killed by a rothe", "killed by a newt, while sleeping"]
    deaths = (deaths * len(table))[:len(table)]
    table = table.drop_columns([c for c in ("death", "status") if c in table.column_names])
    table = table.append_column("death", pa.array(deaths)).append_column("status", pa.array(["complete"] * len(table)))
    pq.write_table(table, index)
    s = dataset_stats(scripted_copy)
    print("\n" + format_stats(s))
    assert s["death_causes"]["fainted from lack of food"] == 2 and s["food_deaths"] == 3
    assert s["killers"]["rothe"] == 2 and s["death_causes"]["killed while sleeping"] == 1


@pytest.mark.skipif(not os.environ.get("TRAJDATA_TEST_AA_DATASET"),
                    reason="set TRAJDATA_TEST_AA_DATASET to an AutoAscend dataset (collecting one takes ~20 min)")
def test_death_causes_of_an_autoascend_dataset():
    from trajdata.format.stats import dataset_stats, format_stats

    s = dataset_stats(os.environ["TRAJDATA_TEST_AA_DATASET"])
    print("\n" + format_stats(s))
    complete = s["status"].get("complete", 0)
    assert sum(s["death_causes"].values()) == complete and s["food_deaths"] <= complete
    assert not any(c.startswith("killed by") and "while" in c for c in s["death_causes"])
