"""Reliability (#15): odd episodes, bad options, full disks, signals, concurrency and corrupt data.

Real components at tiny sizes: the real NLE scripted expert, real shards. Every failure must be one
line naming the thing (``trajdata: error: ...``), a non-zero exit, no traceback and no data loss.
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from trajdata.cli.main import cli
from trajdata.errors import DataError
from trajdata.format.dataset import Dataset, build_index
from trajdata.format.inspect import verify
from trajdata.scaling import REFERENCE_RUNS

TRAJDATA = [sys.executable, "-m", "trajdata.cli"]
SCRIPTED = "trajdata.collectors.nethack:ScriptedExpert"


def run(*args, env=None):
    """Run the CLI in-process; returns (exit code, stdout + stderr)."""
    res = CliRunner().invoke(cli, [str(a) for a in args], env=env)
    assert not isinstance(res.exception, Exception) or isinstance(res.exception, SystemExit), res.exc_info
    return res.exit_code, res.output


def one_line_error(code: int, out: str, *names: str) -> str:
    """Assert ``out`` is one `trajdata: error:` line (naming each of ``names``) with a non-zero exit."""
    assert code != 0, out
    assert "Traceback" not in out, out
    lines = [ln for ln in out.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("trajdata: error:")]
    assert len(errors) == 1, out
    for n in names:
        assert str(n) in errors[0], (n, errors[0])
    return errors[0]


def collect_cli(out, *extra):
    return run("collect", "scripted", "--out", out, "--quiet", *extra)


# ---- 1. zero-step episodes and invalid option values ---------------------------------------------

@pytest.mark.parametrize("codec", ["stream2", "stream", "compact", "fast"])
def test_zero_step_episode_is_recorded_truncated(tmp_path, codec):
    """Failed before the fix: ValueError 'cannot reshape array of size 0' from every codec."""
    out = tmp_path / "x"
    code, text = collect_cli(out, "--shards", "1", "--episodes-per-shard", "2", "--max-steps", "50",
                             "--max-seconds", "0.0001", "--codec", codec)
    assert code == 0, text
    rows = pq.read_table(out / "index.parquet").to_pylist()
    assert [(r["steps"], r["status"]) for r in rows] == [(0, "truncated"), (0, "truncated")]
    assert all(r["end_reason"].startswith("max_seconds") for r in rows)
    assert verify(out)["episodes"] == 2
    code, text = run("show", out, "--episode", rows[0]["id"])
    one_line_error(code, text, rows[0]["id"])


def test_zero_step_episodes_with_two_workers(tmp_path):
    """Failed before the fix: the whole --workers 2 run aborted."""
    out = tmp_path / "x"
    code, text = collect_cli(out, "--shards", "2", "--workers", "2", "--max-steps", "50", "--max-seconds", "0.0001")
    assert code == 0, text
    assert json.loads(text.strip().splitlines()[-1])["episodes_total"] == 2


@pytest.mark.parametrize("flag,value,message", [
    ("--max-seconds", "-1", "--max-seconds must be positive"),
    ("--max-seconds", "0", "--max-seconds must be positive"),
    ("--seed", "-1", "--seed must be at least 0"),
    ("--stall-seconds", "-1", "--stall-seconds must be 0 (off) or positive"),
    ("--ray-address", "127.0.0.1:1", "--ray-address needs backend 'ray'"),
])
def test_invalid_collect_options_fail_up_front(tmp_path, flag, value, message):
    """Failed before the fix: -1 seconds / seed crashed with tracebacks; --ray-address was ignored."""
    code, text = collect_cli(tmp_path / "x", "--shards", "1", "--max-steps", "5", flag, value)
    one_line_error(code, text, message)
    assert not (tmp_path / "x").exists()


# ---- 7. wrong metadata -----------------------------------------------------------------------------

@pytest.mark.parametrize("character,names", [
    ("foo-bar", ["foo"]), ("bar-elf", ["elf", "bar"]), ("val-hum-law-mal", ["female"]),
    ("wiz-elf-neu", ["neu", "elf"]), ("kni-hum-law-xyz", ["xyz"]),
])
def test_unknown_characters_are_refused(tmp_path, character, names):
    """Failed before the fix: 'foo-bar' was recorded in the index while NLE played a Barbarian."""
    code, text = collect_cli(tmp_path / "x", "--shards", "1", "--max-steps", "5", "--character", character)
    one_line_error(code, text, "--character", character, *names)
    assert not (tmp_path / "x").exists()


def test_valid_characters_are_accepted_and_played():
    from trajdata.envs.nethack import ROLE_OPTIONS, character_problem, make_nethack_env, random_character

    assert all(character_problem(random_character(s)) is None for s in range(200))
    for c in ["@", "bar", "mon-hum", "pri-elf-cha", "val-dwa-law-fem", *ROLE_OPTIONS]:
        assert character_problem(c) is None, c
    env = make_nethack_env("pri-elf-cha-fem")  # what we accept, NLE plays: an elven priestess
    try:
        obs, _ = env.reset(seed=1)
        top = bytes(obs["tty_chars"].reshape(-1)).decode("latin-1")
        # the welcome line may be replaced by an item message; the status line names the rank (Aspirant = priest)
        assert any(w in top.lower() for w in ("elven", "priestess", "aspirant")), top[:400]
    finally:
        env.close()


@pytest.mark.parametrize("content", ["[1, 2]", '"text"', "3", "null"])
def test_dataset_json_not_an_object(scripted_copy, content):
    """Failed before the fix: AttributeError traceback ('list' object has no attribute 'get')."""
    (scripted_copy / "dataset.json").write_text(content)
    for cmd in (["inspect"], ["verify"], ["index"]):
        one_line_error(*run(*cmd, scripted_copy), "dataset.json")


def test_schema_version_of_another_type_is_named(scripted_copy):
    """Failed before the fix: 'version 1 is not supported (this trajdata reads 1)'."""
    info = json.loads((scripted_copy / "dataset.json").read_text())
    info["schema_version"] = str(info["schema_version"])
    (scripted_copy / "dataset.json").write_text(json.dumps(info))
    line = one_line_error(*run("inspect", scripted_copy), "dataset.json")
    assert f"'{info['schema_version']}'" in line


# ---- 6. silent loss on import ----------------------------------------------------------------------

@pytest.mark.parametrize("n", ["-1", "0"])
def test_import_nld_max_games_must_be_positive(tmp_path, n):
    """Failed before the fix: -1 exited 0 having imported 2 of 3 games (gameids[:-1]); 0 said 'has no ttyrecs'."""
    db = tmp_path / "ttyrecs.db"
    db.write_bytes(b"")
    code, text = run("import", "nld", "--db", db, "--name", "test", "--out", tmp_path / "o", "--max-games", n)
    one_line_error(code, text, f"--max-games must be at least 1 (got {n})")
    assert not (tmp_path / "o").exists()


# ---- 2. full disk ------------------------------------------------------------------------------------


FIT_RUNS = REFERENCE_RUNS / "nethack_llama_isoflop.csv"

# Loaded by every Python process of a CLI run (workers too) through PYTHONPATH: shard files fail with
# ENOSPC at byte TRAJDATA_TEST_FULL_AT, like a disk that fills up mid-shard.
FULL_DISK_SITECUSTOMIZE = '''
import errno, os
LIMIT = int(os.environ["TRAJDATA_TEST_FULL_AT"])
import trajdata.format.shard as shard

class _Full:
    def __init__(self, f):
        self._f = f
    def write(self, b):
        if self._f.tell() + len(b) > LIMIT:
            room = max(LIMIT - self._f.tell(), 0)
            self._f.write(b[:room])
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return self._f.write(b)
    def __getattr__(self, name):
        return getattr(self._f, name)

def _open(path, *a, **k):
    f = open(path, *a, **k)
    return _Full(f) if str(path).endswith(".tar.tmp") else f

shard.open = _open
'''


def cli_proc(*args, env=None, preexec_fn=None, timeout=300):
    return subprocess.run([*TRAJDATA, *map(str, args)], capture_output=True, text=True, env=env,
                          preexec_fn=preexec_fn, timeout=timeout)


def full_disk_env(tmp_path, at: int) -> dict:
    site = tmp_path / "site"
    site.mkdir(exist_ok=True)
    (site / "sitecustomize.py").write_text(FULL_DISK_SITECUSTOMIZE)
    path = os.pathsep.join([str(site), os.environ.get("PYTHONPATH", ""), str(Path(__file__).parent.parent)])
    return dict(os.environ, PYTHONPATH=path, TRAJDATA_TEST_FULL_AT=str(at))


def file_size_limit(n: int):
    """preexec_fn: writes past ``n`` bytes of any file fail with EFBIG (Python ignores SIGXFSZ)."""
    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (n, n))
    return limit


def proc_error_line(res, *names) -> str:
    # tqdm progress lines (`scaling fit` shows its fits' progress on stderr) are not error lines
    lines = [ln for ln in res.stderr.splitlines() if ln.strip() and not re.search(r"\d+/\d+ \[|\|\s*\d+/\d+", ln)]
    assert res.returncode == 1, res.stderr
    assert "Traceback" not in res.stderr and len(lines) == 1 and lines[0].startswith("trajdata: error:"), res.stderr
    for n in names:
        assert str(n) in lines[0], (n, lines[0])
    return lines[0]


def snapshot(root: Path) -> dict:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
            and p.name != "collect.lock"}


@pytest.mark.parametrize("workers", [1, 2])
def test_collect_onto_a_full_disk(tmp_path, workers):
    """Failed before the fix: chained `OSError: [Errno 28]` tracebacks and shard-*.tar.tmp left behind."""
    out = tmp_path / "x"
    args = ["collect", "scripted", "--out", out, "--max-steps", 50, "--quiet", "--workers", workers]
    assert cli_proc(*args, "--shards", 2).returncode == 0
    before = snapshot(out)
    res = cli_proc(*args, "--shards", 4, env=full_disk_env(tmp_path, 3000))
    line = proc_error_line(res, "shard-00000", "No space left on device")
    assert str(out) in line
    assert not list(out.rglob("*.tmp"))
    assert snapshot(out) == before  # finished shards, dataset.json and the previous index untouched
    res = cli_proc(*args, "--shards", 4)  # space freed
    assert res.returncode == 0, res.stderr
    assert verify(out)["episodes"] == 4


def test_index_stats_and_fit_on_a_full_disk(scripted_copy, tmp_path):
    """Failed before the fix: tracebacks, index.parquet.tmp left, 0-byte stats.png and fit.json."""
    ds, fit = scripted_copy, tmp_path / "fit"
    assert cli_proc("scaling", "fit", FIT_RUNS, "--out", fit).returncode == 0
    before, fit_before = snapshot(ds), snapshot(fit)
    full = file_size_limit(2048)
    proc_error_line(cli_proc("index", ds, preexec_fn=full), ds / "index.parquet", "File too large")
    proc_error_line(cli_proc("stats", ds, preexec_fn=full), ds / "stats.png", "File too large")
    proc_error_line(cli_proc("scaling", "fit", FIT_RUNS, "--out", fit, preexec_fn=full), fit / "fit.json",
                    "File too large")
    assert not list(ds.rglob("*.tmp")) and not list(fit.rglob("*.tmp"))
    assert snapshot(ds) == before and snapshot(fit) == fit_before  # no stats.png, the old index and fit intact
    assert cli_proc("index", ds).returncode == 0
    assert cli_proc("stats", ds).returncode == 0 and (ds / "stats.png").stat().st_size > 0
    assert cli_proc("scaling", "fit", FIT_RUNS, "--out", fit).returncode == 0


def test_full_disk_in_process_is_one_line(tmp_path, monkeypatch):
    """ENOSPC from a shard write, in this process (workers 1): one line naming the shard, no .tmp."""
    from trajdata.format import shard

    class Full:
        def __init__(self, f):
            self.f = f

        def write(self, b):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        def __getattr__(self, name):
            return getattr(self.f, name)

    monkeypatch.setattr(shard, "open", lambda p, *a: Full(open(p, *a)), raising=False)
    out = tmp_path / "x"
    code, text = collect_cli(out, "--shards", "1", "--max-steps", "5")
    one_line_error(code, text, "shard-000000.tar", "No space left on device")
    assert not list(out.rglob("*.tmp"))


# ---- 8. an unreachable Ray cluster -----------------------------------------------------------------

def test_unreachable_ray_address_fails_fast_in_one_line(tmp_path):
    """Failed before the fix: Ray retried 127.0.0.1:1 for more than 200 s."""
    pytest.importorskip("ray")
    t0 = time.monotonic()
    code, text = collect_cli(tmp_path / "x", "--shards", "1", "--max-steps", "5", "--backend", "ray",
                             "--ray-address", "127.0.0.1:1")
    one_line_error(code, text, "--ray-address 127.0.0.1:1", "cannot connect")
    assert time.monotonic() - t0 < 45


def test_unreachable_ray_address_fails_fast_in_one_line_in_eval_and_sweep(scripted_data, tmp_path):
    """Failed before the fix: `eval --backend ray --ray-address 127.0.0.1:1` still retried after 90 s (so did
    `sweep --backend ray`: both called ray.init directly, not collect's bounded connect)."""
    pytest.importorskip("ray")
    from tests.test_sweep import write_spec

    t0 = time.monotonic()
    code, text = run("eval", "--expert", "random", "--env", "nethack", "--out", tmp_path / "ev", "--episodes", "2", "--max-steps", "5",
                     "--backend", "ray", "--ray-address", "127.0.0.1:1", "--no-progress")
    one_line_error(code, text, "--ray-address 127.0.0.1:1", "cannot connect")
    spec = write_spec(tmp_path, scripted_data, sizes="[[16, 1]]", budgets="[1e8]")
    code, text = run("sweep", spec, "--out", tmp_path / "sw", "--backend", "ray", "--ray-address", "127.0.0.1:1",
                     "--skip-report", "--no-progress")
    one_line_error(code, text, "--ray-address 127.0.0.1:1", "cannot connect")
    assert time.monotonic() - t0 < 45


# ---- 3. signals: workers die with the collect, SIGTERM cleans up like Ctrl-C --------------------------

def _children() -> dict[int, int]:
    """pid -> parent pid of every live (non-zombie) process, from /proc."""
    out = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                stat = (d / "stat").read_text()
            except OSError:
                continue
            fields = stat.rpartition(")")[2].split()
            if fields[0] != "Z":
                out[int(d.name)] = int(fields[1])
    return out


def descendants(pid: int) -> set[int]:
    procs, found, todo = _children(), set(), [pid]
    while todo:
        p = todo.pop()
        kids = {c for c, pp in procs.items() if pp == p}
        found |= kids
        todo.extend(kids)
    return found


def alive(pids) -> set[int]:
    live = _children()
    return {p for p in pids if p in live}


def start_collect(out, *extra, seed=11, shards=6):
    args = ["collect", "scripted", "--out", out, "--shards", shards, "--episodes-per-shard", 1, "--workers", 2,
            "--max-steps", 600, "--seed", seed, "--quiet", *extra]
    # Ctrl-C reaches a terminal's foreground job: the child starts with SIGINT at its default even when
    # the tests run in a background job (bash starts those with SIGINT ignored, which Python keeps)
    proc = subprocess.Popen([*TRAJDATA, *map(str, args)], start_new_session=True, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    return proc, args


def wait_for(cond, seconds=120.0, step=0.02):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        v = cond()
        if v:
            return v
        time.sleep(step)
    raise AssertionError("timed out waiting")


def finished(out) -> set[str]:
    return {p.name for p in (out / "shards").glob("shard-*.tar")}


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_killing_the_collect_kills_its_workers(tmp_path, sig):
    """Failed before the fix: workers outlived the killed collect by minutes and renamed their shards."""
    out = tmp_path / "x"
    proc, args = start_collect(out)
    try:
        # both workers, the queue's manager and multiprocessing's resource tracker
        wait_for(lambda: list((out / "shards").glob("*.tar.tmp")) and len(descendants(proc.pid)) >= 4)
        workers = descendants(proc.pid)
        os.kill(proc.pid, sig)  # the main process only, not its group
        _, err = proc.communicate(timeout=30)
        wait_for(lambda: not alive(workers), seconds=5)
        after = finished(out)
        time.sleep(2)
        assert finished(out) == after  # no shard renamed after the collect died
        if sig == signal.SIGTERM:
            lines = err.strip().splitlines()
            assert proc.returncode == 143 and lines == ["trajdata: terminated"], err
            assert not list(out.rglob("*.tmp"))
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    res = cli_proc(*args)
    assert res.returncode == 0, res.stderr
    assert f'"shards_skipped": {len(after)}' in res.stdout
    assert verify(out)["episodes"] == 6
    assert [r["id"] for r in Dataset(out).index_rows()] == [f"{s:06d}-0000" for s in range(6)]
    assert not list(out.rglob("*.tmp"))


@pytest.mark.parametrize("delay", [0.0, 0.3, 1.0])
def test_ctrl_c_while_workers_start_is_one_line(tmp_path, delay):
    """Failed before the fix: ~100 lines of KeyboardInterrupt tracebacks from starting workers."""
    out = tmp_path / "x"
    proc, _ = start_collect(out)
    try:
        wait_for(lambda: descendants(proc.pid), step=0.005)  # the first process is starting
        time.sleep(delay)
        workers = descendants(proc.pid)
        os.killpg(proc.pid, signal.SIGINT)  # like Ctrl-C in a terminal: the whole group
        _, err = proc.communicate(timeout=60)
        wait_for(lambda: not alive(workers), seconds=5)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 130, err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) < 5 and "trajdata: interrupted" in lines and "Traceback" not in err, err
    assert not list(out.rglob("*.tmp"))


# ---- 4. two collects into one --out ----------------------------------------------------------------

@pytest.mark.slow
def test_second_collect_into_the_same_out_is_refused(tmp_path):
    """Failed before the fix: both collects wrote every shard through the same .tmp paths."""
    out = tmp_path / "x"
    first, args = start_collect(out, shards=4)
    try:
        wait_for(lambda: list((out / "shards").glob("*.tar.tmp")))
        second = cli_proc(*args)
        line = proc_error_line(second, str(out), f"pid {first.pid}", "another collect")
        assert "wait for it" in line
        _, err = first.communicate(timeout=300)
        assert first.returncode == 0, err
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(first.pid, signal.SIGKILL)
    assert verify(out)["episodes"] == 4
    assert [r["id"] for r in Dataset(out).index_rows()] == [f"{s:06d}-0000" for s in range(4)]


@pytest.mark.slow
def test_lock_of_a_killed_collect_does_not_block_a_rerun(tmp_path):
    out = tmp_path / "x"
    proc, args = start_collect(out, shards=4)
    try:
        wait_for(lambda: list((out / "shards").glob("*.tar.tmp")))
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    assert (out / "collect.lock").read_text().split()[0] == str(proc.pid)  # left behind, naming a dead pid
    res = cli_proc(*args)
    assert res.returncode == 0, res.stderr
    assert verify(out)["episodes"] == 4 and not list(out.rglob("*.tmp"))


# ---- 9. a corrected rerun after a collect that finished no shard -----------------------------------

def test_rerun_with_other_settings_after_nothing_was_finished(tmp_path, monkeypatch):
    """Failed before the fix: 'already holds a dataset with a different collection'."""
    from trajdata.format import shard

    out = tmp_path / "x"
    real = shard.ShardWriter.add_chunk

    def full(self, episode_id, index, blob):
        raise DataError(f"cannot write {self.path}: No space left on device")

    monkeypatch.setattr(shard.ShardWriter, "add_chunk", full)
    one_line_error(*collect_cli(out, "--shards", "2", "--max-steps", "5"), "No space left")
    assert (out / "dataset.json").is_file() and not list((out / "shards").iterdir())
    monkeypatch.setattr(shard.ShardWriter, "add_chunk", real)
    code, text = collect_cli(out, "--shards", "2", "--max-steps", "7")  # corrected
    assert code == 0, text
    notes = [ln for ln in text.splitlines() if ln.startswith("trajdata: note:")]
    assert len(notes) == 1 and "no finished shard" in notes[0] and "collection" in notes[0], text
    assert json.loads((out / "dataset.json").read_text())["collection"]["max_steps"] == 7
    assert verify(out)["steps"] == 14
    # with a finished shard, other settings are still refused
    one_line_error(*collect_cli(out, "--shards", "2", "--max-steps", "9"), "different collection")


# ---- a truncated finished shard on resume ---------------------------------------------------------

def test_resume_redoes_a_truncated_shard(tmp_path):
    """Failed before the fix: the truncated shard was skipped and the run ended with a stale index."""
    out = tmp_path / "x"
    args = ("--shards", "3", "--max-steps", "60", "--chunk-steps", "16")
    code, text = collect_cli(out, *args)
    assert code == 0, text
    good = (out / "shards" / "shard-000001.tar").read_bytes()
    def key():
        return [(r["id"], r["steps"], r["chunks"], r["score"], r["seed"]) for r in Dataset(out).index_rows()]

    rows = key()
    for cut in (len(good) // 2, len(good) - 1024, 1536):
        (out / "shards" / "shard-000001.tar").write_bytes(good[:cut])
        code, text = collect_cli(out, *args)
        assert code == 0, text
        warnings = [ln for ln in text.splitlines() if ln.startswith("trajdata: warning:")]
        assert len(warnings) == 1 and "shard-000001.tar is truncated" in warnings[0], text
        assert '"shards_written": 1' in text and '"shards_skipped": 2' in text
        assert (out / "shards" / "shard-000001.tar").stat().st_size == len(good)
        assert key() == rows and verify(out)["episodes"] == 3


def test_sigterm_with_one_worker_cleans_up_like_ctrl_c(tmp_path):
    """Failed before the fix: SIGTERM killed the collect on the spot, leaving shard-*.tar.tmp."""
    out = tmp_path / "x"
    proc, args = start_collect(out, "--workers", "1", shards=3)  # the later --workers wins
    try:
        wait_for(lambda: list((out / "shards").glob("*.tar.tmp")))
        os.kill(proc.pid, signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 143 and err.strip().splitlines() == ["trajdata: terminated"], err
    assert not list(out.rglob("*.tmp"))
    res = cli_proc(*args)
    assert res.returncode == 0, res.stderr
    assert verify(out)["episodes"] == 3
