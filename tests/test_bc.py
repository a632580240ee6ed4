"""`train bc` on real small data: learning, budget snapshots, exact resume, DDP, bad input."""
from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from trajdata.errors import ConfigError, DataError
from trajdata.format.dataset import Dataset
from trajdata.loaders.stream import LoaderConfig, select_episodes
from trajdata.models.flops import effective_params, flops_per_sample, total_flops_per_sample
from trajdata.models.nethack import NetHackConfig
from trajdata.train import checkpoint as ckpt_io
from trajdata.train.bc import BCConfig, train

TRAJDATA = [sys.executable, "-m", "trajdata.cli"]
# one val episode of the scripted dataset at this fraction (its ids hash to 0.02, 0.55, ...)
TINY = dict(width=64, layers=1, seq_len=64, batch_size=4, lr=3e-3, val_fraction=0.3, progress=False,
            log_every=5, checkpoint_every=5)


def cli(*args, env=None):
    return subprocess.run([*TRAJDATA, *map(str, args)], capture_output=True, text=True, env=env)


def metrics(run: Path) -> list[dict]:
    return [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]


def test_nethack_loss_far_below_uniform_with_budget_snapshots(scripted_data, tmp_path):
    per_sample = 6 * effective_params(NetHackConfig(width=64, layers=1))
    budgets = (2000 * per_sample, 5000 * per_sample)
    cfg = BCConfig(dataset=str(scripted_data), out=str(tmp_path / "run"), budgets=budgets, samples=10_000, **TINY)
    r = train(cfg)
    uniform = math.log(121)
    rows = metrics(tmp_path / "run")
    first, last = rows[0]["loss"], rows[-1]["loss"]
    print(f"\nNetHack (64,1): train loss {first:.3f} -> {last:.3f} over {r['samples']:,} samples; uniform {uniform:.3f}")
    assert first > 0.7 * uniform and last < 0.5 * uniform  # the first row averages steps 1-5
    total = total_flops_per_sample(NetHackConfig(width=64, layers=1), 64)
    for row in rows:  # every FLOP beside 6N, and MFU against both (CPU: its measured matmul peak)
        assert row["flops"] == row["samples"] * per_sample and row["flops_total"] == row["samples"] * total
        assert 0 < row["mfu_6n"] < row["mfu_total"] < 1
        assert row["mfu_total"] / row["mfu_6n"] == pytest.approx(total / per_sample)
    assert r["samples"] >= 10_000 and r["finished"]
    table = ckpt_io.read_runs(tmp_path / "run" / "runs.csv")
    assert [float(t["budget"]) for t in table] == pytest.approx(sorted(budgets))
    for t, b in zip(table, sorted(budgets)):
        assert int(t["samples"]) >= b / per_sample  # the first optimizer step at or past the budget
        assert int(t["samples"]) < b / per_sample + 4 * 64
        assert int(t["params"]) == effective_params(NetHackConfig(width=64, layers=1)) == 188_793
        assert float(t["loss"]) < 0.6 * uniform and t["val_episodes"] == "1"
        snap = tmp_path / "run" / t["checkpoint"]
        model, ck = ckpt_io.load_model(snap)
        assert ck["budget"] == b and ck["samples"] == int(t["samples"]) and "optimizer" not in ck
        assert ck["dataset"]["schema"] == "nethack" and ck["dataset"]["expert"]["name"] == "scripted"
    # the table is what `scaling fit` reads
    from trajdata.scaling.runs import load_runs

    runs = load_runs(tmp_path / "run" / "runs.csv")
    assert len(runs) == 2 and runs.params[0] == 188_793
    # with each validation episode's loss, which the scaling bootstrap resamples
    for (ids, losses, steps), loss in zip(runs.loss_episodes, runs.loss):
        assert list(ids) == ["0"] and (losses * steps).sum() / steps.sum() == pytest.approx(loss, abs=1e-5)


def test_atari_loss_far_below_uniform(atari_data, tmp_path):
    cfg = BCConfig(dataset=str(atari_data), out=str(tmp_path / "run"), width=16, seq_len=32, batch_size=4, lr=3e-3,
                   samples=25_000, val_fraction=0.01, progress=False, log_every=10)
    r = train(cfg)
    rows = metrics(tmp_path / "run")
    uniform = math.log(4)
    print(f"\nAtari CNN w=16: train loss {rows[0]['loss']:.3f} -> {rows[-1]['loss']:.3f} over {r['samples']:,} samples; "
          f"uniform {uniform:.3f}")
    assert r["family"] == "atari" and r["params"] == effective_params(ckpt_io.FAMILIES["atari"][0](width=16, n_actions=4))
    assert rows[-1]["loss"] < 0.5 * uniform


@pytest.mark.parametrize("core,ema", [("transformer", 0.0), ("lstm", 0.0), ("transformer", 0.9)])
def test_interrupted_then_resumed_equals_uninterrupted(scripted_data, tmp_path, core, ema):
    kw = dict(TINY, core=core, ema=ema, samples=3000, budgets=(1500 * 6 * effective_params(NetHackConfig(64, 1, core=core)),))
    whole = BCConfig(dataset=str(scripted_data), out=str(tmp_path / "whole"), **kw)
    parts = BCConfig(dataset=str(scripted_data), out=str(tmp_path / "parts"), **kw)
    train(whole)
    first = train(parts, stop_after=5)
    assert not first["finished"] and first["step"] == 5
    second = train(parts)
    assert second["resumed"] and second["finished"]
    key = lambda rows: [(m["step"], m["samples"], m["loss"], m["accuracy"], m["lr"]) for m in rows]  # noqa: E731
    assert key(metrics(tmp_path / "whole")) == key(metrics(tmp_path / "parts"))
    a, b = (ckpt_io.load(tmp_path / d / ckpt_io.LATEST) for d in ("whole", "parts"))
    assert a["step"] == b["step"] and a["samples"] == b["samples"]
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    assert (a["ema"] is None) == (b["ema"] is None) == (ema == 0)
    if ema:
        for k in a["ema"]:
            assert torch.equal(a["ema"][k], b["ema"][k]), k
        snap = ckpt_io.load(ckpt_io.snapshots(tmp_path / "parts")[0][1])
        assert any(not torch.equal(snap["model"][k], a["model"][k]) for k in a["model"])
    ra, rb = (ckpt_io.read_runs(tmp_path / d / "runs.csv") for d in ("whole", "parts"))
    assert [(r["samples"], r["loss"]) for r in ra] == [(r["samples"], r["loss"]) for r in rb]
    # the same command once more adds nothing
    assert train(parts)["step"] == second["step"]
    assert len(ckpt_io.read_runs(tmp_path / "parts" / "runs.csv")) == 1


@pytest.mark.slow
def test_two_process_ddp_sees_each_episode_once_per_epoch(scripted_data, tmp_path):
    run = tmp_path / "ddp"
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", "29531",
                        "-m", "trajdata.cli", "train", "bc", str(scripted_data), "--out", str(run), "--width", "64",
                        "--layers", "1", "--seq-len", "64", "--batch-size", "2", "--val-fraction", "0.3",
                        "--samples", "4000", "--trace-episodes", "--no-progress", "--device", "cpu"],
                       capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["world_size"] == 2
    train_eps = {r["id"]: int(r["steps"]) for r in select_episodes(
        Dataset(scripted_data).index_rows(), LoaderConfig(root=str(scripted_data), split="train", val_fraction=0.3))}
    seen = [json.loads(ln) for r in (0, 1) for ln in (run / f"episodes.rank{r}.jsonl").read_text().splitlines()]
    epoch0 = [s for s in seen if s["epoch"] == 0]
    assert {s["rank"] for s in epoch0} == {0, 1}
    ids = [e for s in epoch0 for e in s["steps"]]
    assert len(ids) == len(set(ids)) == len(train_eps)  # every train episode once, on one rank
    assert {e: n for s in epoch0 for e, n in s["steps"].items()} == train_eps
    assert ckpt_io.load(run / ckpt_io.LATEST)["samples"] >= 4000


def test_toml_config_and_cli_override(scripted_data, tmp_path):
    toml = tmp_path / "bc.toml"
    toml.write_text('[bc]\nwidth = 64\nlayers = 1\nseq_len = 32\nbatch_size = 2\nlr = 0.002\nsamples = 200\n'
                    'val_fraction = 0.3\n')
    p = cli("train", "bc", scripted_data, "--out", tmp_path / "r", "--config", toml, "--lr", "0.001", "--no-progress")
    assert p.returncode == 0, p.stderr
    cfg = json.loads((tmp_path / "r" / "config.json").read_text())
    assert cfg["lr"] == 0.001 and cfg["seq_len"] == 32 and cfg["model"]["width"] == 64
    samples = int(re.search(r"([\d,]+) samples", p.stdout).group(1).replace(",", ""))
    assert 200 <= samples < 200 + 2 * 32  # --samples 200 from the file: it stops within one step of B x T
    # a different config in the same run directory is refused in one line, naming the flag
    p = cli("train", "bc", scripted_data, "--out", tmp_path / "r", "--config", toml, "--lr", "0.01", "--no-progress")
    assert p.returncode == 1 and p.stderr.count("\n") == 1 and "--lr" in p.stderr, p.stderr
    toml.write_text("[bc]\nwidht = 64\n")
    p = cli("train", "bc", scripted_data, "--out", tmp_path / "r2", "--config", toml)
    assert p.returncode == 1 and "unknown key 'widht'" in p.stderr and p.stderr.count("\n") == 1


def test_bad_input_is_one_line(scripted_data, atari_data, tmp_path):
    base = ["--width", "64", "--layers", "1", "--seq-len", "32", "--batch-size", "2", "--val-fraction", "0.3",
            "--no-progress"]
    cases = {
        "atari-for-nethack": ([atari_data, "--family", "nethack"], "is an Atari dataset"),
        "budget-below-step": ([scripted_data, "--budgets", "1e6"], "less than one optimizer step"),
        "cuda-absent": ([scripted_data, "--device", "cuda"], "no usable CUDA GPU"),
        "missing-dataset": ([tmp_path / "nope"], "nope"),
        "bad-budgets": ([scripted_data, "--budgets", "1e13,x"], "--budgets must be a comma-separated list"),
        "preset-and-width": ([scripted_data, "--preset", "paper"], "conflicts with"),
    }
    if torch.cuda.is_available():
        del cases["cuda-absent"]
    for name, (args, want) in cases.items():
        p = cli("train", "bc", *args[:1], "--out", tmp_path / name, *base, *args[1:])
        assert p.returncode != 0 and want in p.stderr and p.stderr.count("\n") == 1, (name, p.stderr)
    # a corrupt rolling checkpoint is named, not loaded
    ok = cli("train", "bc", scripted_data, "--out", tmp_path / "c", *base, "--samples", "100")
    assert ok.returncode == 0, ok.stderr
    latest = tmp_path / "c" / ckpt_io.LATEST
    latest.write_bytes(latest.read_bytes()[:1000])
    p = cli("train", "bc", scripted_data, "--out", tmp_path / "c", *base, "--samples", "200")
    assert p.returncode == 1 and str(latest) in p.stderr and "corrupt or truncated" in p.stderr, p.stderr


def test_dataset_lacking_a_field(scripted_data, tmp_path):
    cfg = BCConfig(dataset=str(scripted_data), out=str(tmp_path / "g"), width=64, layers=1, use_glyphs=True,
                   samples=10, progress=False)
    # the scripted schema has glyphs, so that trains; a model asking for a field the schema lacks does not
    from trajdata.train import bc

    ds = Dataset(scripted_data)
    mcfg = bc.model_config(cfg, "nethack", ds)
    bc.check_dataset(ds, "nethack", mcfg)
    import dataclasses

    ds.schema = dataclasses.replace(ds.schema, fields=tuple(f for f in ds.schema.fields if f.name != "inv_glyphs"))
    with pytest.raises(DataError, match="lacks field 'inv_glyphs'.*--no-use-inventory"):
        bc.check_dataset(ds, "nethack", mcfg)


def test_config_validation_names_fields():
    for kw, field in [(dict(lr=0), "lr"), (dict(seq_len=0), "seq_len"), (dict(schedule="linear"), "schedule"),
                      (dict(budgets=(float("inf"),)), "budgets"), (dict(val_fraction=1.0), "val_fraction")]:
        with pytest.raises(ConfigError) as e:
            BCConfig(dataset="d", out="o", **kw)
        assert e.value.field == field


def test_wrong_types_are_one_line_naming_the_field(scripted_data, tmp_path):
    """Failed before the fix: seq_len = "abc" in a TOML file was a TypeError traceback."""
    toml = tmp_path / "bc.toml"
    toml.write_text('[bc]\nseq_len = "abc"\n')
    p = cli("train", "bc", scripted_data, "--out", tmp_path / "r", "--config", toml)
    assert p.returncode == 1 and p.stderr == "trajdata: error: --seq-len must be an integer (got 'abc')\n", p.stderr
    p = cli("train", "bc", scripted_data, "--out", tmp_path / "r", "--seq-len", "abc")
    assert p.returncode == 1 and p.stderr == "trajdata: error: --seq-len must be an integer (got 'abc')\n", p.stderr
    for kw, field in [(dict(seq_len="abc"), "seq_len"), (dict(use_glyphs="maybe"), "use_glyphs"),
                      (dict(budgets=["1e13", "x"]), "budgets"), (dict(samples="ten"), "samples")]:
        with pytest.raises(ConfigError) as e:
            BCConfig(dataset="d", out="o", **kw)
        assert e.value.field == field
    cfg = BCConfig(dataset="d", out="o", seq_len="128", lr=1, budgets="2e13,1e13", samples="10k")
    assert (cfg.seq_len, cfg.lr, cfg.budgets, cfg.samples) == (128, 1.0, (1e13, 2e13), 10_000)


def test_weight_average_update():
    from trajdata.train.bc import update_average

    avg, cur = torch.nn.BatchNorm1d(3), torch.nn.BatchNorm1d(3)
    with torch.no_grad():
        avg.weight.fill_(1.0)
        cur.weight.fill_(3.0)
        cur.running_mean.fill_(7.0)
    update_average(avg, cur, 0.75)
    assert torch.allclose(avg.weight, torch.full((3,), 1.5)) and torch.equal(avg.running_mean, cur.running_mean)
    assert torch.equal(cur.weight, torch.full((3,), 3.0))


def test_lr_schedules():
    from trajdata.train.bc import lr_at

    const = BCConfig(dataset="d", out="o", lr=1e-3, warmup_steps=10)
    assert lr_at(const, 0, 100) == pytest.approx(1e-4) and lr_at(const, 50, 100) == 1e-3
    cos = BCConfig(dataset="d", out="o", lr=1e-3, schedule="cosine", warmup_steps=10, min_lr_ratio=0.1)
    assert lr_at(cos, 9, 110) == pytest.approx(1e-3) and lr_at(cos, 110, 110) == pytest.approx(1e-4)
    assert lr_at(cos, 60, 110) == pytest.approx(1e-3 * (0.1 + 0.9 * 0.5))


def test_flops_per_sample_counts():
    assert flops_per_sample(NetHackConfig(384, 4)) == 6 * 10_301_305
