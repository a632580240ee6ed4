"""Loader benchmark: trajdata's streaming loader vs `nle.dataset.TtyrecDataset`, same games, (B=32, T=4096).

1. Collect scripted NetHack games (all NLD-AA-L fields) with the default codec profile (stream), and
   `recode` them into the other profiles (compact, fast): the same games in each. Enough games for several
   full (B, T) batches, so per-epoch set-up and the last batch's padding do not dominate.
2. Replay the games' actions in NLE with its ttyrec recorder on (bin/bench_format.py), checking every
   frame, and index the ttyrecs with `nle.dataset`: the NLD version of the same games.
3. Each loader runs `--epochs` passes in a fresh single-threaded process (the first is warm-up:
   first-touch page faults on fresh batch memory dominate it): steps/s (wall and per CPU
   second = per core) and peak resident memory (getrusage ru_maxrss; also the rise over the
   resident size after imports). trajdata is measured with all fields and with the tty fields NLD
   yields; lanes mode (the long-context BC mode) and windows mode; and on the NLD ttyrecs imported
   with `trajdata import nld` (default codec), the path for users who already have NLD data.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path


B, T = 32, 4096


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def child(kind: str, root: str, fields: str, mode: str, epochs: str) -> dict:
    """One measurement in this (fresh) process: ``epochs`` passes; figures exclude the first (warm-up)
    unless there is only one."""
    import torch

    torch.set_num_threads(1)
    if kind == "nld":
        import nle.dataset as nld

        ds = nld.TtyrecDataset("bench", batch_size=B, seq_length=T, dbfilename=str(Path(root) / "ttyrecs.db"),
                               shuffle=False)
        base = _rss_mb()

        def epoch(e):
            return sum(int((mb["gameids"] != 0).sum()) for mb in ds)
    else:
        from trajdata.format.schema import TTY_FIELDS
        from trajdata.loaders import LoaderConfig, TrajectoryStream

        sel = tuple(TTY_FIELDS) if fields == "tty" else None
        stream = TrajectoryStream(LoaderConfig(root, fields=sel, batch_size=B, seq_len=T, mode=mode, seed=0))
        base = _rss_mb()

        def epoch(e):
            stream.set_epoch(e)
            return sum(int(b["mask"].sum()) for b in stream)
    runs = []
    for e in range(int(epochs)):
        t0, c0 = time.perf_counter(), time.process_time()
        steps = epoch(e)
        runs.append((steps, time.perf_counter() - t0, time.process_time() - c0))
    steady = runs[1:] or runs
    steps, wall, cpu = (sum(r[i] for r in steady) for i in range(3))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"steps_per_epoch": runs[0][0], "epochs": len(runs), "first_epoch_steps_per_s": round(runs[0][0] / runs[0][1]),
            "steps_per_s": round(steps / wall), "steps_per_cpu_s": round(steps / cpu),
            "peak_rss_mb": round(peak), "peak_rss_over_baseline_mb": round(peak - base)}


def measure(kind: str, root: Path, epochs: int, fields: str = "all", mode: str = "lanes") -> dict:
    cmd = [sys.executable, __file__, "--child", kind, str(root), fields, mode, str(epochs)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    return json.loads(out.stdout.strip().splitlines()[-1])


def prepare(work: Path, episodes: int, max_steps: int) -> tuple[dict, Path, int]:
    from trajdata.importers.ttyrec import export_ttyrecs
    from trajdata.collectors.runner import CollectConfig, ExpertSpec, collect
    from trajdata.format.codec import DEFAULT_PROFILE, PROFILES
    from trajdata.format.dataset import Dataset, recode

    per_shard = 8
    data = {p: work / f"trajdata-{p}" for p in PROFILES}
    first = data[DEFAULT_PROFILE]
    if not (first / "index.parquet").is_file():
        collect(CollectConfig(out=str(first), expert=ExpertSpec("trajdata.collectors.nethack:ScriptedExpert"),
                              shards=-(-episodes // per_shard), episodes_per_shard=per_shard, workers=2,
                              seed=1234, max_steps=max_steps, codec=DEFAULT_PROFILE), progress=False)
    for profile, d in data.items():  # the same games in every other profile (each chunk checked)
        if not (d / "index.parquet").is_file():
            recode(first, d, profile)
    steps = {p: sum(r["steps"] for r in Dataset(d).index_rows()) for p, d in data.items()}
    assert len(set(steps.values())) == 1, f"profiles collected different games: {steps}"
    nld = work / "nld"
    checked = 0
    if not (nld / "ttyrecs.db").is_file():
        import nle.dataset as nle_ds

        checked = export_ttyrecs(Dataset(data[DEFAULT_PROFILE]), nld)
        nle_ds.db.create(str(nld / "ttyrecs.db"))
        nle_ds.add_nledata_directory(str(nld), "bench", filename=str(nld / "ttyrecs.db"))
    imported = work / "trajdata-from-nld"
    if not (imported / "index.parquet").is_file():
        from trajdata.importers.nld import NldImportConfig, import_nld

        import_nld(NldImportConfig(db=str(nld / "ttyrecs.db"), name="bench", out=str(imported), codec=DEFAULT_PROFILE),
                   progress=False)
    data["nld-import"] = imported
    return data, nld, checked


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", help="JSON result path")
    ap.add_argument("--episodes", type=int, default=384, help="games (>= 32 fills the NLD loader's batch)")
    ap.add_argument("--max-steps", type=int, default=5000)
    ap.add_argument("--workdir", default=None, help="reuse datasets/ttyrecs prepared here by an earlier run")
    ap.add_argument("--epochs", type=int, default=3, help="passes per loader; the first is warm-up")
    ap.add_argument("--child", nargs=5, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(*args.child)))
        return
    if not args.out:
        ap.error("--out is required")
    work = Path(args.workdir or tempfile.mkdtemp(prefix="trajdata-bench-loader-"))
    work.mkdir(parents=True, exist_ok=True)
    data, nld, checked = prepare(work, args.episodes, args.max_steps)
    from trajdata.format.codec import DEFAULT_PROFILE
    from trajdata.format.dataset import Dataset

    steps = sum(r["steps"] for r in Dataset(data[DEFAULT_PROFILE]).index_rows())
    nld_res = measure("nld", nld, args.epochs)
    res = {"games": len(Dataset(data[DEFAULT_PROFILE]).index_rows()), "default_profile": DEFAULT_PROFILE, "steps": steps, "batch": B, "seq": T,
           "frames_replayed_identical": checked or "reused", "nld_TtyrecDataset_tty_only": nld_res, "trajdata": {}}
    for profile, d in data.items():
        runs = (("tty", "lanes"),) if profile.startswith("nld") else (("all", "lanes"), ("tty", "lanes"), ("all", "windows"))
        for fields, mode in runs:
            r = measure("trajdata", d, args.epochs, fields, mode)
            r["per_core_speedup_vs_nld"] = round(r["steps_per_cpu_s"] / nld_res["steps_per_cpu_s"], 1)
            res["trajdata"][f"{profile}/{fields}/{mode}"] = r
    head = res["trajdata"][f"{DEFAULT_PROFILE}/all/lanes"]["per_core_speedup_vs_nld"]
    res["target"] = {"what": f"default profile ({DEFAULT_PROFILE}), all NetHack fields, lanes, B={B}, T={T}: "
                             ">= 10x nle.dataset.TtyrecDataset steps per CPU-second", "speedup": head, "met": head >= 10}
    res["ge_10x_nld_per_core"] = {k: v["per_core_speedup_vs_nld"] >= 10 for k, v in res["trajdata"].items()}
    res["workdir"] = str(work)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=2) + "\n")
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
