"""Training benchmark: where `train bc` spends its time, and samples/s before and after the CPU speed-ups.

CPU (the default), on real scripted NetHack games (`--nethack-steps` in all):

1. ``profile``: per part of one training step (map encoder, crop, bottom line, message, inventory,
   mixer, core, head, loss: forward and backward each; then the whole step's forward, backward,
   optimizer (clip + AdamW + EMA) and loader wait), at the sizes of specs/cpu.toml (h = 4..64, L = 1,
   T = 128, B = 8) and at the paper's (384, 4) with T = 4096, B = 1. Three ways, timed in turn on the
   same batches in one process: ``reference`` (before: two embedding look-ups, every frame through
   the map and crop encoders, fp32), ``fast`` (fp32) and ``fast_bf16`` (bf16 autocast). Beside them
   FLOPs per sample from layer shapes (every part; 6N counts only mixer + core + head) and MFU
   against both, on this CPU's measured matmul peak (``models.flops.cpu_peak_flops``).
2. ``train``: the real loop (`trajdata.train.bc.train`: loader, optimizer, logging) in fresh
   processes at the spec's settings, before / fast / fast + bf16, the three commands in turn;
   and the thread layouts of a 2-core sweep: one run on 1 thread, one run on 2 threads, two runs
   on 1 thread each at once (their summed samples/s).
3. ``accuracy``: the same seed trained before / fast / fast + bf16 to the same budgets: the
   validation losses side by side (fast vs before: float rounding only; bf16: its real cost), and
   the before run at another seed for scale.
4. ``proxy``: the CPU proxy (``--encoders cpu``: the map ResNet replaced by a linear layer over 3 x 4
   block means) beside the paper's encoders: the profile at h = 4, 16, 64, and real runs of both at
   h = 16 at once (samples/s, validation losses at the same samples).
5. Atari CNN samples/s.

``--device cuda`` (the GPU check of issue #12): the paper preset at the return-forecast size
(h, L) = (576, 6) (33.3M effective), T = 4096, bf16, and the largest grid size whose training step
fits in memory at that batch.

    python bin/bench_train.py --out bench-results/train.json              # CPU, ~15 min on 2 idle cores
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

CPU_ATARI = [8, 34, 81]
SPEC_SIZES = [(4, 1), (8, 1), (16, 1), (32, 1), (64, 1)]  # specs/cpu.toml
SPEC_T, SPEC_B = 128, 8
PAPER = (384, 4, 4096, 1)  # (h, L, T, B)
MODES = {"reference": (False, False), "fast": (True, False), "fast_bf16": (True, True)}  # (fast encoder, bf16)


# ---- 1. per-part profile -----------------------------------------------------------------------------

def _timed(fn) -> tuple[float, float]:
    """(wall, CPU) seconds of one call."""
    t, c = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - t, time.process_time() - c


def profile_size(data: Path, h: int, L: int, T: int, B: int, batches: int, reps: int, threads: int, peaks: dict,
                 encoders: str = "paper") -> dict:
    """Per-part forward/backward ms per step and the whole step's phases, each mode in turn on the same batches."""
    import copy
    from contextlib import nullcontext

    import torch
    import torch.nn.functional as F

    from trajdata.loaders import make_dataloader
    from trajdata.models import flops as counting
    from trajdata.models.nethack import MAP_ROWS, NetHackConfig, NetHackModel, crop
    from trajdata.train.bc import BCConfig, loader_config, step_losses, to_device, update_average

    torch.set_num_threads(threads)
    cfg = BCConfig(dataset=str(data), out="-", width=h, layers=L, seq_len=T, batch_size=B, val_fraction=0.05)
    mcfg = NetHackConfig(width=h, layers=L, encoders=encoders)
    loader = make_dataloader(loader_config(cfg, mcfg, "train"))
    it = iter(loader)
    next(it)  # opening the shards is not a step's wait
    t0, c0 = time.perf_counter(), time.process_time()
    got = [to_device(next(it), torch.device("cpu")) for _ in range(batches)]
    loader_ms = (time.perf_counter() - t0) / batches * 1000  # num_workers 0: the loader's time is the step's wait
    loader_cpu = (time.process_time() - c0) / batches
    torch.manual_seed(0)
    base = NetHackModel(mcfg)
    models = {}
    for name, (fast, _) in MODES.items():
        m = copy.deepcopy(base).train()
        m.encoder.fast = fast
        models[name] = (m, torch.optim.AdamW(m.parameters(), lr=1e-4), copy.deepcopy(m).requires_grad_(False))

    def inputs(m, b):
        enc = m.encoder
        Bb, Tb = b["tty_chars"].shape[:2]
        obs = {k: b[k].flatten(0, 1) for k in ("tty_chars", "tty_colors", "tty_cursor", "inv_glyphs")}
        chars, colors = obs["tty_chars"], obs["tty_colors"]
        cells = chars[:, MAP_ROWS].int() * 128 + (colors[:, MAP_ROWS].int() & 127)
        cursor = obs["tty_cursor"].long() - torch.tensor([MAP_ROWS.start, 0])
        window = crop(cells[:, None], cursor)[:, 0]
        with torch.no_grad():
            feats = enc(obs, m.previous_actions(b).flatten()).view(Bb, Tb, -1)
            x = m.mixer(feats)
            core_out = m.core(x, b["reset"].bool(), b["mask"].bool(), None)[0]
            logits = m.head(core_out)
        leaf = lambda t: t.detach().float().requires_grad_()  # noqa: E731
        return dict(chars=chars, inv=obs["inv_glyphs"], cells=cells, window=window, feats=leaf(feats), x=leaf(x),
                    core_out=leaf(core_out), logits=leaf(logits), reset=b["reset"].bool(), valid=b["mask"].bool(),
                    action=b["action"].long().flatten())

    def parts_of(m):
        enc = m.encoder
        return {
            "map": (lambda c: enc.per_distinct(enc.map, c["cells"])) if encoders == "paper" else
                   (lambda c: enc.coarse_map(c["cells"])),
            "crop": lambda c: enc.per_distinct(enc.crop, c["window"]),
            "bottom": lambda c: enc.bottom(c["chars"][:, 22:24]),
            "message": lambda c: enc.message(c["chars"][:, 0]),
            "inventory": lambda c: enc.inventory(c["inv"]),
            "mixer": lambda c: m.mixer(c["feats"]),
            "core": lambda c: m.core(c["x"], c["reset"], c["valid"], None)[0],
            "head": lambda c: m.head(c["core_out"]),
        }

    part_flops = counting.nethack_part_flops(mcfg, T)
    six_n = counting.flops_per_sample(mcfg)
    total = counting.total_flops_per_sample(mcfg, T)
    ctxs = {name: [inputs(models[name][0], b) for b in got] for name in MODES}
    out = {}
    timings = {name: {} for name in MODES}
    for _ in range(reps + 1):  # modes in turn, so that load on the machine falls on all alike; best of reps after a warm-up
        for name, (fast, bf16) in MODES.items():
            m, opt, avg = models[name]
            autocast = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else nullcontext()
            tm = timings[name]
            for part, fn in list(parts_of(m).items()) + [("loss", None)]:
                def fwd(fn=fn, part=part):
                    for c in ctxs[name]:
                        with autocast:
                            y = F.cross_entropy(c["logits"].flatten(0, 1), c["action"]) if part == "loss" else fn(c)
                    return y

                def fwd_bwd(fn=fn, part=part):
                    for c in ctxs[name]:
                        with autocast:
                            y = F.cross_entropy(c["logits"].flatten(0, 1), c["action"]) if part == "loss" else fn(c)
                        y.float().sum().backward()
                (f, fc), (fb, fbc) = _timed(fwd), _timed(fwd_bwd)
                n = len(got)
                old = tm.get(part, (float("inf"),) * 4)
                tm[part] = (min(old[0], f / n), min(old[1], max(0.0, fb - f) / n), min(old[2], fc / n),
                            min(old[3], max(0.0, fbc - fc) / n))

            def phases():
                fw = bw = op = 0.0
                c0 = time.process_time()
                for b in got:
                    t0 = time.perf_counter()
                    with autocast:
                        logits, _ = m(b)
                        ce, _ = step_losses(logits, b)
                        loss = ce.sum() / b["mask"].sum()
                    t1 = time.perf_counter()
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    t2 = time.perf_counter()
                    torch.nn.utils.clip_grad_norm_(m.parameters(), 1.0)
                    opt.step()
                    update_average(avg, m, 0.9)
                    t3 = time.perf_counter()
                    fw, bw, op = fw + t1 - t0, bw + t2 - t1, op + t3 - t2
                return fw / len(got), bw / len(got), op / len(got), (time.process_time() - c0) / len(got)
            ph = phases()
            old = tm.get("_step", (float("inf"),) * 4)
            tm["_step"] = tuple(min(a, b) for a, b in zip(old, ph))
    for name, (fast, bf16) in MODES.items():
        tm = timings[name]
        fw, bw, op, cpu = tm.pop("_step")
        step_ms = (fw + bw + op) * 1000 + loader_ms
        sps = B * T / (step_ms / 1000)
        per_cpu_s = B * T / (cpu + loader_cpu)  # CPU seconds: what a loaded machine's time-slicing leaves out
        peak = peaks["bf16" if bf16 else "fp32"][str(threads)]
        step_cpu = cpu + loader_cpu
        out[name] = dict(
            parts={k: dict(forward_ms=round(f * 1000, 2), backward_ms=round(b_ * 1000, 2),
                           forward_cpu_ms=round(fc * 1000, 2), backward_cpu_ms=round(bc * 1000, 2),
                           share_cpu=round((fc + bc) / step_cpu, 4),
                           flops_per_sample=sum(part_flops.get(k, (0, 0)))) for k, (f, b_, fc, bc) in tm.items()},
            step=dict(forward_ms=round(fw * 1000, 2), backward_ms=round(bw * 1000, 2), optimizer_ms=round(op * 1000, 2),
                      loader_wait_ms=round(loader_ms, 2), total_ms=round(step_ms, 2), total_cpu_ms=round(step_cpu * 1000, 2)),
            samples_per_s=round(sps, 1), samples_per_cpu_s=round(per_cpu_s, 1),
            mfu_6n=sps * six_n / peak, mfu_total=sps * total / peak)
    ref, ref_cpu = out["reference"]["samples_per_s"], out["reference"]["samples_per_cpu_s"]
    return dict(width=h, layers=L, encoders=encoders, seq_len=T, batch_size=B, threads=threads, batches=batches, reps=reps,
                params=counting.effective_params(mcfg), flops_6n_per_sample=six_n, flops_total_per_sample=total,
                total_over_6n=round(total / six_n, 1), modes=out,
                speedup={k: round(v["samples_per_s"] / ref, 3) for k, v in out.items()},
                speedup_cpu_s={k: round(v["samples_per_cpu_s"] / ref_cpu, 3) for k, v in out.items()})


def cpu_peaks(threads=(1, 2)) -> dict:
    import torch

    from trajdata.models.flops import cpu_peak_flops

    return {name: {str(t): cpu_peak_flops(t, dtype) for t in threads}
            for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16))}


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
    if kw.pop("reference", False):
        from trajdata.models.nethack import NetHackEncoder

        NetHackEncoder.fast = False
    cfg = BCConfig(**kw)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    t0, c0 = time.perf_counter(), time.process_time()
    r = train(cfg)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    rows = [json.loads(x) for x in (Path(cfg.out) / "metrics.jsonl").read_text().splitlines()]
    steady = rows[1:] or rows
    span = sum(1 for _ in steady)
    out = dict(params=r["params"], model=r["model"], steps=r["step"], samples=r["samples"], wall_s=round(wall, 2),
               cpu_s=round(cpu, 2), samples_per_cpu_s=r["samples"] / cpu if threads == 1 else None,
               samples_per_s=sum(x["samples_per_s"] for x in steady) / span,
               data_wait=sum(x["data_wait"] for x in steady) / span, final_loss=rows[-1]["loss"])
    runs = ckpt_rows(Path(cfg.out))
    if runs:
        out["val"] = runs
    for k in ("mfu_6n", "mfu_total"):
        if k in steady[-1]:
            out[k] = sum(x[k] for x in steady) / span
    if torch.cuda.is_available():
        out["peak_gpu_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
    print("BENCH " + json.dumps(out))


def ckpt_rows(run: Path) -> list[dict]:
    from trajdata.train import checkpoint as ckpt_io

    return [dict(budget=float(r["budget"]), samples=int(r["samples"]), loss=float(r["loss"]), loss_se=float(r["loss_se"]))
            for r in ckpt_io.read_runs(run / ckpt_io.RUNS_CSV)]


def _parse(p) -> dict:
    for line in p.stdout.splitlines():
        if line.startswith("BENCH "):
            return json.loads(line[6:])
    return dict(error=(p.stderr.strip().splitlines() or ["no output"])[-1][:300])


def run_child(kw: dict, timeout: float) -> dict:
    return _parse(subprocess.run([sys.executable, __file__, "--child", json.dumps(kw)], capture_output=True, text=True,
                                 timeout=timeout))


def run_children_at_once(kws: list[dict], timeout: float) -> list[dict]:
    procs = [subprocess.Popen([sys.executable, __file__, "--child", json.dumps(kw)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for kw in kws]
    out = []
    for p in procs:
        stdout, stderr = p.communicate(timeout=timeout)
        out.append(_parse(subprocess.CompletedProcess(p.args, p.returncode, stdout, stderr)))
    return out


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


def cpu_info() -> dict:
    info = dict(cpu_count=os.cpu_count())
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and "model" not in info:
                info["model"] = line.split(":", 1)[1].strip()
            if line.startswith("cpu MHz") and "mhz" not in info:
                info["mhz"] = float(line.split(":", 1)[1])
        info["loadavg_at_start"] = os.getloadavg()
    except OSError:
        pass
    return info


def cpu_train(nethack: Path, tmp: Path, steps: int) -> dict:
    """The real loop at the spec's settings: before / fast / fast+bf16 in turn; then thread layouts."""
    common = dict(dataset=str(nethack), seq_len=SPEC_T, batch_size=SPEC_B, progress=False, log_every=max(1, steps // 5),
                  checkpoint_every=10**9, val_fraction=0.05, device="cpu", tensorboard=False, num_workers=0,
                  samples=steps * SPEC_B * SPEC_T, lr=1e-2)
    modes = {"reference": dict(reference=True), "fast": {}, "fast_bf16": dict(precision="bf16")}
    out = {}
    for h, L in ((4, 1), (16, 1), (64, 1)):
        row = out[f"{h}x{L}"] = {}
        for name, extra in modes.items():  # the three commands in turn, one size after another
            kw = dict(common, out=str(tmp / f"train-{h}-{L}-{name}"), width=h, layers=L, threads=1, **extra)
            row[name] = run_child(kw, timeout=3600)
            print(f"train ({h},{L}) {name}: samples/s {row[name].get('samples_per_s', row[name])}, "
                  f"per CPU s {row[name].get('samples_per_cpu_s')}", flush=True)
        for key in ("samples_per_s", "samples_per_cpu_s"):
            ref = row["reference"].get(key)
            row[f"speedup_{key}"] = {k: round(v[key] / ref, 3) for k, v in row.items()
                                     if ref and isinstance(v, dict) and v.get(key)}
    layouts = {}
    for name, extra in (("fast", {}), ("fast_bf16", dict(precision="bf16"))):
        kw = dict(common, width=16, layers=1, **extra)
        one = run_child(dict(kw, out=str(tmp / f"thr1-{name}"), threads=1), timeout=3600)
        two = run_child(dict(kw, out=str(tmp / f"thr2-{name}"), threads=2), timeout=3600)
        pair = run_children_at_once([dict(kw, out=str(tmp / f"pair{i}-{name}"), threads=1) for i in range(2)], timeout=3600)
        layouts[name] = {"1 run x 1 thread": one.get("samples_per_s"), "1 run x 2 threads": two.get("samples_per_s"),
                         "2 runs x 1 thread (sum)": sum(p.get("samples_per_s", 0) for p in pair)}
        print(f"threads (16,1) {name}: {layouts[name]}", flush=True)
    out["thread_layouts_16x1"] = layouts
    return out


def cpu_accuracy(nethack: Path, tmp: Path, samples: tuple[int, ...]) -> dict:
    """Same seed and data to the same budgets, before / fast / fast+bf16: validation losses side by side."""
    from trajdata.models.flops import flops_per_sample
    from trajdata.models.nethack import NetHackConfig

    h, L = 16, 1
    per = flops_per_sample(NetHackConfig(width=h, layers=L))
    common = dict(dataset=str(nethack), seq_len=SPEC_T, batch_size=SPEC_B, progress=False, log_every=20,
                  checkpoint_every=10**9, val_fraction=0.1, device="cpu", tensorboard=False, lr=1e-2, ema=0.9,
                  warmup_steps=10, width=h, layers=L, budgets=[s * per for s in samples], threads=1)
    out = {}
    for name, extra in (("reference", dict(reference=True)), ("fast", {}), ("fast_bf16", dict(precision="bf16")),
                        ("reference_seed1", dict(reference=True, seed=1))):  # the scale: another seed's difference
        out[name] = run_child(dict(common, out=str(tmp / f"acc-{name}"), **extra), timeout=3600)
        print(f"accuracy {name}: {out[name].get('val', out[name])}", flush=True)
    ref = out["reference"].get("val", [])
    for name in ("fast", "fast_bf16", "reference_seed1"):
        got = out[name].get("val", [])
        out[f"{name}_minus_reference"] = [round(b["loss"] - a["loss"], 5) for a, b in zip(ref, got)]
    return out


def cpu_proxy(nethack: Path, tmp: Path, samples: tuple[int, ...], reps: int, peaks: dict) -> dict:
    """The CPU proxy (``encoders = "cpu"``) beside the paper's encoders, fast + bf16 both: the per-part
    profile at h = 4, 16, 64 and real ``train bc`` runs at h = 16 (specs/cpu.toml's settings), the
    two at once on one thread each, to the same samples: samples/s and validation losses."""
    from trajdata.models.flops import flops_per_sample
    from trajdata.models.nethack import NetHackConfig

    out: dict = {"profile": {}}
    for h in (4, 16, 64):
        both = {e: profile_size(nethack, h, 1, SPEC_T, SPEC_B, 2, reps, 1, peaks, encoders=e) for e in ("paper", "cpu")}
        row = {e: dict(samples_per_s=r["modes"]["fast_bf16"]["samples_per_s"], params=r["params"],
                       total_over_6n=r["total_over_6n"], step=r["modes"]["fast_bf16"]["step"],
                       parts={k: v["share_cpu"] for k, v in r["modes"]["fast_bf16"]["parts"].items()})
               for e, r in both.items()}
        row["speedup"] = round(row["cpu"]["samples_per_s"] / row["paper"]["samples_per_s"], 2)
        out["profile"][f"{h}x1"] = row
        print(f"proxy profile h = {h}: samples/s paper {row['paper']['samples_per_s']}, cpu {row['cpu']['samples_per_s']} "
              f"({row['speedup']}x)", flush=True)
    h = 16
    kws = []
    for e in ("paper", "cpu"):
        per = flops_per_sample(NetHackConfig(width=h, layers=1, encoders=e))
        kws.append(dict(dataset=str(nethack), out=str(tmp / f"proxy-{e}"), width=h, layers=1, encoders=e,
                        seq_len=SPEC_T, batch_size=SPEC_B, lr=3e-3, ema=0.9, warmup_steps=10, precision="bf16",
                        val_fraction=0.1, budgets=[s * per for s in samples], progress=False, log_every=20,
                        checkpoint_every=10**9, device="cpu", tensorboard=False, threads=1))
    for e, r in zip(("paper", "cpu"), run_children_at_once(kws, timeout=3600)):
        out[f"train_{e}"] = r
        print(f"proxy train {e}: {r.get('samples_per_s')} samples/s, val {r.get('val', r)}", flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None, help="JSON file to write (required)")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--steps", type=int, default=0, help="optimizer steps per run [cpu 25, cuda 30]")
    ap.add_argument("--seq-len", type=int, default=0, help="T of the CUDA runs [4096]")
    ap.add_argument("--batch-size", type=int, default=0, help="lanes B of the CUDA runs [16]")
    ap.add_argument("--nethack-steps", type=int, default=0, help="steps to collect [cpu 60k, cuda 400k]")
    ap.add_argument("--sections", default="profile,train,accuracy,proxy,atari",
                    help="CPU: which of profile,train,accuracy,proxy,atari to run")
    ap.add_argument("--reps", type=int, default=2, help="CPU profile: timing repetitions after a warm-up (best of)")
    ap.add_argument("--accuracy-samples", default="20000,40000,60000",
                    help="CPU accuracy: training samples at each budget snapshot")
    ap.add_argument("--proxy-samples", default="30000,60000,120000",
                    help="CPU proxy: training samples at each budget snapshot of the paper-vs-proxy runs")
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="collection processes and loader workers")
    ap.add_argument("--data", default=None, help="directory for the collected data (reused if there) [temp]")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        return child(a.child)
    if not a.out:
        ap.error("--out is required")
    gpu = a.device == "cuda"
    steps = a.steps or (30 if gpu else 25)
    T = a.seq_len or 4096
    B = a.batch_size or 16
    want = a.nethack_steps or (400_000 if gpu else 60_000)
    tmp = Path(a.data or tempfile.mkdtemp(prefix="bench-train-"))
    tmp.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    nethack = tmp / "nethack"
    if not (nethack / "index.parquet").exists():
        collect_nethack(nethack, want, a.workers)
    result = dict(device=a.device, steps=steps, cpu_count=os.cpu_count(), collect_s=round(time.time() - t0, 1))
    from trajdata.format.dataset import Dataset

    result["nethack_dataset_steps"] = int(sum(r["steps"] for r in Dataset(nethack).index_rows()))
    if gpu:
        result.update(seq_len=T, batch_size=B, nethack={})
        common = dict(dataset=str(nethack), seq_len=T, batch_size=B, progress=False, log_every=max(1, steps // 4),
                      checkpoint_every=10**9, val_fraction=0.05, device=a.device, tensorboard=False)
        for h, L in [(576, 6)]:
            kw = dict(common, out=str(tmp / f"run-nethack-{h}-{L}"), width=h, layers=L, samples=steps * B * T,
                      num_workers=min(4, a.workers), threads=None)
            r = run_child(kw, timeout=3600)
            result["nethack"][f"{h}x{L}"] = r
            print(f"nethack ({h},{L}): {json.dumps(r)}", flush=True)
        from trajdata.models.sizes import NETHACK_GRID

        result["grid_fit"] = {}
        for h, L in NETHACK_GRID:
            result["grid_fit"][f"{h}x{L}"] = f = fits(h, L, B, T)
            print(f"fits ({h},{L}) at B={B} T={T}: {f}", flush=True)
        fitting = [k for k, v in result["grid_fit"].items() if v["fits"]]
        result["largest_grid_size_that_fits"] = fitting[-1] if fitting else None
        result["target_samples_per_s"] = 93_000
    else:
        sections = set(a.sections.split(","))
        result["cpu"] = cpu_info()
        peaks = cpu_peaks()
        result["cpu_peak_flops"] = dict(peaks, how="best of 5 1024^3 matmuls per thread count and dtype (torch)")
        print(f"CPU matmul peak FLOP/s: {json.dumps(peaks)}", flush=True)
        if "profile" in sections:
            prof = result["profile"] = {}
            for h, L in SPEC_SIZES:
                prof[f"{h}x{L}_T{SPEC_T}_B{SPEC_B}"] = r = profile_size(nethack, h, L, SPEC_T, SPEC_B, 2, a.reps, 1, peaks)
                print(f"profile ({h},{L}): samples/s {({k: (v['samples_per_s'], v['samples_per_cpu_s']) for k, v in r['modes'].items()})} (wall, per CPU s)", flush=True)
            r = profile_size(nethack, 16, 1, SPEC_T, SPEC_B, 2, a.reps, 2, peaks)
            prof[f"16x1_T{SPEC_T}_B{SPEC_B}_2threads"] = r
            print(f"profile (16,1) 2 threads: samples/s {({k: (v['samples_per_s'], v['samples_per_cpu_s']) for k, v in r['modes'].items()})} (wall, per CPU s)", flush=True)
            h, L, Tp, Bp = PAPER
            prof[f"{h}x{L}_T{Tp}_B{Bp}"] = r = profile_size(nethack, h, L, Tp, Bp, 1, max(1, a.reps - 1), 1, peaks)
            print(f"profile ({h},{L}) T={Tp}: samples/s {({k: (v['samples_per_s'], v['samples_per_cpu_s']) for k, v in r['modes'].items()})} (wall, per CPU s)", flush=True)
        if "train" in sections:
            result["train"] = cpu_train(nethack, tmp, steps)
        if "accuracy" in sections:
            result["accuracy"] = cpu_accuracy(nethack, tmp, tuple(int(x) for x in a.accuracy_samples.split(",")))
        if "proxy" in sections:
            result["proxy"] = cpu_proxy(nethack, tmp, tuple(int(x) for x in a.proxy_samples.split(",")), a.reps, peaks)
        if "atari" in sections:
            result["atari"] = {}
            atari = tmp / "atari"
            if not (atari / "index.parquet").exists():
                collect_atari(atari, a.workers)
            for w in CPU_ATARI:
                kw = dict(dataset=str(atari), out=str(tmp / f"run-atari-{w}"), width=w, seq_len=64, batch_size=4,
                          samples=12 * 4 * 64 * 4, num_workers=0, threads=1, val_fraction=0.01, progress=False,
                          log_every=3, checkpoint_every=10**9, device="cpu", tensorboard=False)
                r = run_child(kw, timeout=1800)
                result["atari"][f"w{w}"] = r
                print(f"atari w={w}: {json.dumps(r)}", flush=True)
        result["cpu"]["loadavg_at_end"] = os.getloadavg()
    result["total_s"] = round(time.time() - t0, 1)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
