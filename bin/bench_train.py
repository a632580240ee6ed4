"""Training benchmark: `train bc` samples/s and data-wait fraction per model size, NetHack and Atari.

1. Collect real data: scripted NetHack games (`--nethack-steps` in all) and, for Atari, a tiny SB3 PPO
   Breakout expert's games.
2. For each size, run `trajdata.train.bc.train` (the real loop: real loader, optimizer, logging) for
   `--steps` optimizer steps in a fresh process and read its metrics.jsonl: samples/s and the fraction of
   wall time spent waiting for the next batch, over the steps after the first (warm-up) log window.
   On CUDA also MFU (effective 6N and total FLOPs from FlopCounterMode) and peak GPU memory.
3. ``--device cuda`` (the GPU check of issue #12): the paper preset at the return-forecast size
   (h, L) = (576, 6) (33.3M effective), T = 4096, bf16, and the largest grid size whose training step
   fits in memory at that batch.

    python bin/bench_train.py --out bench-results/train.json              # CPU, a few minutes
    python bin/bench_train.py --device cuda --out $OUT/train_gpu.json     # GPU
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CPU_NETHACK = [(64, 1), (128, 1), (192, 2), (256, 2)]
CPU_ATARI = [8, 34, 81]


def collect_nethack(out: Path, steps: int, workers: int) -> Path:
    from trajdata.collectors.runner import CollectConfig, ExpertSpec, collect

    per_ep = 2000
    shards = max(2, steps // (2 * per_ep))
    collect(CollectConfig(out=str(out), expert=ExpertSpec("trajdata.collectors.nethack:ScriptedExpert"), shards=shards,
                          episodes_per_shard=2, max_steps=per_ep, workers=workers, seed=1), progress=False)
    return out


def collect_atari(out: Path, workers: int) -> Path:
    from trajdata.collectors.runner import CollectConfig, ExpertSpec, collect
    from trajdata.train.ppo import PPOConfig, train_ppo

    expert = out.parent / "ppo"
    train_ppo(PPOConfig(game="Breakout", timesteps=128, n_envs=2, n_steps=32, batch_size=64, checkpoint_every=64,
                        eval_episodes=0), expert, progress=False)
    spec = ExpertSpec("trajdata.collectors.atari:PPOExpert", {"model": str(expert), "game": "Breakout"})
    collect(CollectConfig(out=str(out), expert=spec, shards=4, episodes_per_shard=1, workers=workers, max_steps=None),
            progress=False)
    return out


def child(cfg_json: str) -> None:
    """One run in this fresh process; prints a JSON summary of its metrics."""
    import torch

    from trajdata.train.bc import BCConfig, train

    kw = json.loads(cfg_json)
    threads = kw.pop("threads", None)
    if threads:
        torch.set_num_threads(threads)
    cfg = BCConfig(**kw)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    r = train(cfg)
    wall = time.perf_counter() - t0
    rows = [json.loads(x) for x in (Path(cfg.out) / "metrics.jsonl").read_text().splitlines()]
    steady = rows[1:] or rows
    span = sum(1 for _ in steady)
    out = dict(params=r["params"], model=r["model"], steps=r["step"], samples=r["samples"], wall_s=round(wall, 2),
               samples_per_s=sum(x["samples_per_s"] for x in steady) / span,
               data_wait=sum(x["data_wait"] for x in steady) / span, final_loss=rows[-1]["loss"])
    for k in ("mfu_6n", "mfu_total"):
        if k in steady[-1]:
            out[k] = sum(x[k] for x in steady) / span
    if torch.cuda.is_available():
        out["peak_gpu_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
    print("BENCH " + json.dumps(out))


def run_child(kw: dict, timeout: float) -> dict:
    p = subprocess.run([sys.executable, __file__, "--child", json.dumps(kw)], capture_output=True, text=True,
                       timeout=timeout)
    for line in p.stdout.splitlines():
        if line.startswith("BENCH "):
            return json.loads(line[6:])
    return dict(error=(p.stderr.strip().splitlines() or ["no output"])[-1][:300])


def fits(width: int, layers: int, batch: int, seq_len: int) -> dict:
    """Whether one bf16 training step of (width, layers) at (batch, seq_len) fits in GPU memory."""
    import torch

    from trajdata.models.nethack import NetHackConfig, NetHackModel, random_batch

    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    try:
        model = NetHackModel(NetHackConfig(width=width, layers=layers)).cuda()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        b = random_batch(model.cfg, batch, seq_len, device="cuda")
        with torch.autocast("cuda", dtype=torch.bfloat16):
            logits, _ = model(b)
        torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), b["action"].long().flatten()).backward()
        opt.step()
        torch.cuda.synchronize()
        return dict(fits=True, peak_gpu_mem_gib=torch.cuda.max_memory_allocated() / 2**30)
    except torch.OutOfMemoryError:
        return dict(fits=False)
    finally:
        model = opt = b = logits = None  # noqa: F841
        torch.cuda.empty_cache()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None, help="JSON file to write (required)")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--steps", type=int, default=0, help="optimizer steps per size [cpu 12, cuda 30]")
    ap.add_argument("--seq-len", type=int, default=0, help="T [cpu 1024, cuda 4096]")
    ap.add_argument("--batch-size", type=int, default=0, help="lanes B [cpu 2, cuda 16]")
    ap.add_argument("--nethack-steps", type=int, default=0, help="steps to collect [cpu 40k, cuda 400k]")
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="collection processes and loader workers")
    ap.add_argument("--data", default=None, help="directory for the collected data (reused if there) [temp]")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        return child(a.child)
    if not a.out:
        ap.error("--out is required")
    gpu = a.device == "cuda"
    steps = a.steps or (30 if gpu else 12)
    T = a.seq_len or (4096 if gpu else 1024)
    B = a.batch_size or (16 if gpu else 2)
    want = a.nethack_steps or (400_000 if gpu else 40_000)
    tmp = Path(a.data or tempfile.mkdtemp(prefix="bench-train-"))
    tmp.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    nethack = tmp / "nethack"
    if not (nethack / "index.parquet").exists():
        collect_nethack(nethack, want, a.workers)
    result = dict(device=a.device, seq_len=T, batch_size=B, steps=steps, cpu_count=os.cpu_count(),
                  collect_s=round(time.time() - t0, 1), nethack={}, atari={})
    from trajdata.format.dataset import Dataset

    result["nethack_dataset_steps"] = int(sum(r["steps"] for r in Dataset(nethack).index_rows()))
    common = dict(dataset=str(nethack), seq_len=T, batch_size=B, progress=False, log_every=max(1, steps // 4),
                  checkpoint_every=10**9, val_fraction=0.05, device=a.device, tensorboard=False)
    sizes = [(576, 6)] if gpu else CPU_NETHACK
    for h, L in sizes:
        kw = dict(common, out=str(tmp / f"run-nethack-{h}-{L}"), width=h, layers=L, samples=steps * B * T,
                  num_workers=min(4, a.workers) if gpu else 0, threads=None if gpu else 1)
        r = run_child(kw, timeout=3600)
        result["nethack"][f"{h}x{L}"] = r
        print(f"nethack ({h},{L}): {json.dumps(r)}", flush=True)
    if gpu:
        from trajdata.models.sizes import NETHACK_GRID

        result["grid_fit"] = {}
        for h, L in NETHACK_GRID:
            result["grid_fit"][f"{h}x{L}"] = f = fits(h, L, B, T)
            print(f"fits ({h},{L}) at B={B} T={T}: {f}", flush=True)
        fitting = [k for k, v in result["grid_fit"].items() if v["fits"]]
        result["largest_grid_size_that_fits"] = fitting[-1] if fitting else None
        result["target_samples_per_s"] = 93_000
    else:
        atari = tmp / "atari"
        if not (atari / "index.parquet").exists():
            collect_atari(atari, a.workers)
        for w in CPU_ATARI:
            kw = dict(common, dataset=str(atari), out=str(tmp / f"run-atari-{w}"), width=w, seq_len=64, batch_size=4,
                      samples=steps * 4 * 64 * 4, num_workers=0, threads=1, val_fraction=0.01)
            r = run_child(kw, timeout=1800)
            result["atari"][f"w{w}"] = r
            print(f"atari w={w}: {json.dumps(r)}", flush=True)
    result["total_s"] = round(time.time() - t0, 1)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
