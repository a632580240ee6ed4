"""Corrupt, copied and missing data (#15.5) and the small usability items of #15.10.

Real scripted-NetHack shards (the session fixture), damaged on a private copy. Every failure is one
`trajdata: error:` line; the problems verify finds are one line each, naming shard, episode, chunk.
"""
from __future__ import annotations

import json
import re
import shutil
import warnings
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from trajdata.cli.main import cli
from trajdata.errors import ConfigError, DataError
from trajdata.format.dataset import Dataset
from trajdata.format.inspect import summarize, verify


def run(*args):
    res = CliRunner(mix_stderr=False).invoke(cli, [str(a) for a in args]) if _mix_ok() else \
        CliRunner().invoke(cli, [str(a) for a in args])
    assert not isinstance(res.exception, Exception) or isinstance(res.exception, SystemExit), res.exc_info
    out = res.output + (res.stderr if _mix_ok() and res.stderr_bytes is not None else "")
    return res.exit_code, out


def _mix_ok() -> bool:
    import inspect

    return "mix_stderr" in inspect.signature(CliRunner.__init__).parameters


def error_line(code, out, *names) -> str:
    assert code != 0, out
    assert "Traceback" not in out, out
    errors = [ln for ln in out.splitlines() if ln.startswith("trajdata: error:")]
    assert len(errors) == 1, out
    for n in names:
        assert str(n) in errors[0], (n, errors[0])
    return errors[0]


def _flip_chunk_payload(shard: Path, which: int = 1) -> tuple[str, int]:
    """Flip a byte in the middle of chunk member ``which``'s payload; returns (episode, chunk) it holds."""
    import tarfile

    with tarfile.open(shard) as tar:
        m = [m for m in tar.getmembers() if m.name.endswith(".tdc")][which]
    data = bytearray(shard.read_bytes())
    data[m.offset_data + m.size - 40] ^= 0xFF  # in the last field frame, past the header
    shard.write_bytes(bytes(data))
    eid, _, k = m.name[: -len(".tdc")].rpartition("-c")
    return eid, int(k)


def _shards(root: Path) -> list[Path]:
    return sorted((root / "shards").glob("shard-*.tar"))


# ---- verify reports every problem ----------------------------------------------------------------

def test_verify_reports_every_bad_shard_episode_and_chunk(scripted_copy):
    """Failed before the fix: verify stopped at the first bad chunk (one shard named, no count)."""
    s0, s1, s2 = _shards(scripted_copy)
    bad = [(s0.name, *_flip_chunk_payload(s0, 1)), (s2.name, *_flip_chunk_payload(s2, 2))]
    code, out = run("verify", scripted_copy)
    line = error_line(code, out, s0.name, s2.name, "2 problems", "2 of 3 shards")
    problems = [ln for ln in out.splitlines() if ln.startswith("problem: ")]
    assert len(problems) == 2, out
    for (shard, eid, k), p in zip(bad, problems):
        assert f"shard {shard}: episode {eid} chunk {k}: field '" in p, p
    assert s1.name not in line
    with pytest.raises(DataError, match="verify found 2 problems"):
        verify(scripted_copy)


def test_verify_index_mismatch_names_the_shard(scripted_copy):
    """Failed before the fix: 'index.parquet does not match the shards' named no shard or episode."""
    table = pq.read_table(scripted_copy / "index.parquet")
    rows = table.to_pylist()
    rows[1]["steps"] += 1
    pq.write_table(pa.Table.from_pylist(rows, schema=table.schema), scripted_copy / "index.parquet")
    code, out = run("verify", scripted_copy)
    error_line(code, out, "does not match", rows[1]["shard"], rows[1]["id"], "steps")
    # The loader checks an episode's chunks against the index too (before: StopIteration -> RuntimeError).
    with pytest.raises(DataError, match=rf"{rows[1]['shard']}: episode {rows[1]['id']}: its chunks hold"):
        _batches(scripted_copy)


def test_verify_quarantine_moves_bad_shards_and_reindexes(scripted_copy):
    """Failed before the fix: no --quarantine (usage error); a bad shard left the dataset unusable."""
    from trajdata.loaders.stream import LoaderConfig, TrajectoryStream

    s0, s1, s2 = _shards(scripted_copy)
    _flip_chunk_payload(s1, 0)
    lost = [r["id"] for r in Dataset(scripted_copy).index_rows() if r["shard"] == s1.name]
    code, out = run("verify", scripted_copy, "--quarantine")
    assert code == 0, out
    assert f"{len(lost)} episode(s) lost" in out and s1.name in out, out
    assert (scripted_copy / "quarantine" / s1.name).is_file() and not s1.exists()
    assert verify(scripted_copy)["episodes"] == 6 - len(lost)
    s = summarize(scripted_copy)
    assert (s["shards"], s["episodes"], s["warnings"]) == (2, 6 - len(lost), [])
    stream = TrajectoryStream(LoaderConfig(str(scripted_copy), fields=("action",), batch_size=2, seq_len=256))
    assert sorted(stream.episode_ids) == sorted(set(r["id"] for r in Dataset(scripted_copy).index_rows()))
    assert sum(int(b["mask"].sum()) for b in stream.numpy_batches(0, 1)) == stream.total_steps


# ---- index, inspect ------------------------------------------------------------------------------

def test_index_refuses_a_copied_shard(scripted_copy):
    """Failed before the fix: `index` wrote every episode of the copy twice and exited 0."""
    s0 = _shards(scripted_copy)[0]
    copy = s0.with_name("shard-000009.tar")
    shutil.copy(s0, copy)
    before = (scripted_copy / "index.parquet").read_bytes()
    error_line(*run("index", scripted_copy), s0.name, copy.name, "in both")
    assert (scripted_copy / "index.parquet").read_bytes() == before
    code, out = run("verify", scripted_copy)
    error_line(code, out, copy.name)
    assert "a copied shard" in out


def test_inspect_names_a_missing_shard_and_excludes_it(scripted_copy):
    """Failed before the fix: stale episode/step counts and bytes/step over the remaining bytes."""
    full = summarize(scripted_copy)
    gone = _shards(scripted_copy)[1]
    rows = [r for r in Dataset(scripted_copy).index_rows() if r["shard"] == gone.name]
    gone.unlink()
    s = summarize(scripted_copy)
    assert s["episodes"] == full["episodes"] - len(rows)
    assert s["steps"] == full["steps"] - sum(r["steps"] for r in rows)
    assert s["bytes_per_step"] == pytest.approx(s["bytes"] / s["steps"])
    code, out = run("inspect", scripted_copy)
    assert code == 0, out
    warns = [ln for ln in out.splitlines() if "warning" in ln]
    assert len(warns) == 1 and gone.name in warns[0] and "does not exist" in warns[0], out


def test_inspect_of_a_file_says_it_is_not_a_dataset_directory(scripted_data):
    """Failed before the fix: 'dataset directory .../dataset.json does not exist'."""
    line = error_line(*run("inspect", scripted_data / "dataset.json"), "not a dataset directory")
    assert "does not exist" not in line


# ---- loader: on_corrupt --------------------------------------------------------------------------

def _batches(root, **kw):
    from trajdata.loaders.stream import LoaderConfig, TrajectoryStream

    stream = TrajectoryStream(LoaderConfig(str(root), batch_size=2, seq_len=128,
                                           shuffle=False, **kw))
    rank, world = kw.get("rank", 0), kw.get("world_size", 1)
    return stream, [{k: np.array(v) for k, v in b.items()} for b in stream.numpy_batches(rank, world)]


def test_loader_on_corrupt_raise_is_the_default(scripted_copy):
    _flip_chunk_payload(_shards(scripted_copy)[0], 1)
    with pytest.raises(DataError, match=r"shard-000000.tar: episode \S+ chunk \d+: field"):
        _batches(scripted_copy)


def test_loader_on_corrupt_skip_warns_counts_and_keeps_ranks_in_step(scripted_data, scripted_copy, scripted_cfg):
    """Failed before the fix: LoaderConfig had no on_corrupt (TypeError); a bad chunk ended the epoch.

    Batches stream: the steps of the episode delivered before its corrupt chunk stay delivered, the
    rest of the episode becomes padding (mask False, zeros), and every other step is as on clean data."""
    eid, k = _flip_chunk_payload(_shards(scripted_copy)[0], 1)
    from_step = k * scripted_cfg["chunk_steps"]
    _, clean = _batches(scripted_data)
    with pytest.warns(UserWarning, match=f"skipping corrupt episode {eid}") as rec:
        stream, got = _batches(scripted_copy, on_corrupt="skip")
    assert len([w for w in rec if "skipping corrupt" in str(w.message)]) == 1
    assert stream.corrupt_skipped == 1 and list(stream.skipped) == [eid]
    assert stream.state_dict()["corrupt_skipped"] == 1
    assert int(got[-1]["corrupt_skipped"]) == 1
    assert len(got) == len(clean)  # same plan: the episode's rows are padding
    bad = stream.episode_ids.index(eid)
    for g, c in zip(got, clean):
        keep = c["mask"] & ~((c["episode"] == bad) & (c["step"] >= from_step))
        assert not (g["mask"] & (g["episode"] == bad) & (g["step"] >= from_step)).any()
        assert np.array_equal(g["mask"], keep)
        for k in ("action", "tty_chars", "step"):
            assert np.array_equal(g[k][keep], c[k][keep])
        assert not g["tty_chars"][~keep].any()
    # DDP: every rank yields as many batches as on clean data.
    for rank in (0, 1):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            n = len(_batches(scripted_copy, on_corrupt="skip", rank=rank, world_size=2)[1])
        assert n == len(_batches(scripted_data, rank=rank, world_size=2)[1])


def test_loader_on_corrupt_must_be_raise_or_skip(scripted_data):
    from trajdata.loaders.stream import LoaderConfig

    with pytest.raises(ConfigError, match="on_corrupt"):
        LoaderConfig(str(scripted_data), on_corrupt="ignore")


# ---- #15.10: help texts, README, stats -----------------------------------------------------------

@pytest.mark.parametrize("args,flag,words", [
    (["collect", "scripted"], "--episodes-per-shard", "Episodes played into each shard"),
    (["collect", "scripted"], "--stall-seconds", "0 disables the watchdog"),
    (["show"], "--step", "Step of the episode"),
    (["show"], "--no-color", "no ANSI colours"),
    (["verify"], "--quarantine", "quarantine/"),
])
def test_help_texts(args, flag, words):
    """Failed before the fix: these flags had no help text (or did not say 0 disables the watchdog)."""
    code, out = run(*args, "--help")
    assert code == 0, out
    text = " ".join(out.split())
    assert flag in text and words in text, text


def test_readme_command_table_lists_recode():
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    rows = [ln for ln in readme.splitlines() if ln.startswith("| `trajdata ")]
    assert any(ln.startswith("| `trajdata recode ") for ln in rows), rows


def test_stats_on_scripted_data_says_what_it_lacks(scripted_data, tmp_path):
    """Failed before the fix: a one-word 'end of complete games' breakdown and an empty max_depth panel."""
    from trajdata.format.stats import dataset_stats, format_stats, plot_stats

    s = dataset_stats(scripted_data)
    text = format_stats(s)
    assert "max_depth" in s["missing"] and re.search(r"not in this dataset's index.*max_depth", text), text
    fake = dict(s, status={"complete": 3}, death_causes={"done": 3}, death_source="end_reason")
    line = next(ln for ln in format_stats(fake).splitlines() if "end of complete games" in ln)
    assert "no death column" in line and "'done'" in line, line
    assert plot_stats(scripted_data, tmp_path / "s.png").stat().st_size > 0


def test_verify_json_summary_unchanged_on_good_data(scripted_data):
    code, out = run("verify", scripted_data)
    assert code == 0, out
    assert json.loads(out.strip().splitlines()[-1])["ok"] is True


def test_scaling_fit_shows_progress_on_stderr(capsys):
    """Failed before the fix: `scaling fit` ran its fits (12-20 s on real runs) with no output."""
    pytest.importorskip("scipy")
    pd = pytest.importorskip("pandas")
    from trajdata.scaling.fits import FitConfig, fit_all
    from trajdata.scaling.runs import runs_from_frame

    rng = np.random.default_rng(0)
    rows = []
    for C in np.logspace(15, 19, 9):  # isoFLOP grid around L = E + A/N^a + B/D^b
        for N in (C / 6) ** 0.5 * np.logspace(-1, 1, 9):
            D = C / (6 * N)
            rows.append({"flops": C, "params": N, "samples": D,
                         "loss": (1.7 + 400 / N ** 0.34 + 410 / D ** 0.28) * np.exp(0.003 * rng.standard_normal())})
    fit_all(runs_from_frame(pd.DataFrame(rows), source="synthetic"), FitConfig(bootstrap=0), progress=True)
    err = capsys.readouterr().err
    assert "fit loss" in err and "1/3" in err, err


def test_loader_skip_counter_reaches_the_main_process_from_workers(scripted_copy):
    """With DataLoader workers the skip happens in a worker: its batches carry the count."""
    from trajdata.loaders.stream import LoaderConfig, make_dataloader

    eid, _ = _flip_chunk_payload(_shards(scripted_copy)[2], 0)
    loader = make_dataloader(LoaderConfig(str(scripted_copy), batch_size=2, seq_len=256, shuffle=False,
                                          on_corrupt="skip"), num_workers=1)
    batches = list(loader)
    assert batches and loader.corrupt_skipped == 1
    assert loader.state_dict()["corrupt_skipped"] == 1


def test_corrupt_member_header_mid_shard_is_an_error_not_the_end(scripted_copy):
    """Failed before the fix: tarfile ends the archive silently at a bad member header, so readers saw a
    shorter shard (the loader then raised RuntimeError: generator raised StopIteration)."""
    import tarfile

    from trajdata.format.shard import ShardReader

    shard = _shards(scripted_copy)[0]
    with tarfile.open(shard) as tar:
        m = [m for m in tar.getmembers()][2]
    data = bytearray(shard.read_bytes())
    data[m.offset + 100] ^= 0x01  # the member header's mode field: its checksum no longer matches
    shard.write_bytes(bytes(data))
    with pytest.raises(DataError, match=rf"shard {shard.name}: corrupt member header at byte {m.offset}"):
        list(ShardReader(shard).chunks())
    with pytest.raises(DataError, match=shard.name):
        _batches(scripted_copy)
    code, out = run("verify", scripted_copy)
    error_line(code, out, shard.name)
