"""Behavioural cloning on a trajdata dataset: the paper's agents, counted in effective params and
FLOPs, with a checkpoint and a validation loss at every FLOP budget.

Read ``train`` top to bottom: set up (devices, DDP, data, model, optimizer, run directory, resume),
then one loop of optimizer steps, each of ``grad_accum`` micro-batches of (B, T) lanes. Every
hyper-parameter is a field of ``BCConfig`` (CLI flags and TOML files override the defaults).

Counting follows the paper: samples D are the real (unpadded) steps trained on, N the effective
parameters (``models.flops.effective_params``) and C = 6ND for NetHack; Atari counts every layer,
3x the forward FLOPs. Budget C's snapshot is taken at the first optimizer step whose cumulative
samples reach C / (FLOPs per sample).

Several GPUs: ``torchrun --nproc-per-node K -m trajdata.cli train bc ...``: each rank reads its
own episodes (the loader splits by rank), gradients are averaged by DDP, rank 0 writes.
"""
from __future__ import annotations

import copy
import json
import math
import os
import random
import time
import tomllib
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from trajdata.config import at_least, choose, open_run_dir, require
from trajdata.errors import ConfigError, DataError
from trajdata.format.dataset import Dataset
from trajdata.loaders.stream import LoaderConfig, make_dataloader, select_episodes
from trajdata.models import flops as counting
from trajdata.models.atari import AtariConfig
from trajdata.models.nethack import NetHackConfig
from trajdata.models.sizes import NETHACK_GRID, PAPER_SIZE, atari_width_for_params, size_for_params
from trajdata.train import checkpoint as ckpt_io

FAMILIES = ("auto", "nethack", "atari")
SCHEDULES = ("constant", "cosine")
DEVICES = ("auto", "cpu", "cuda")
PRECISIONS = ("auto", "bf16", "fp32")
# presets: the paper's ten NetHack sizes, smallest first, and its headline size
PRESETS = {f"grid-{i + 1}": hl for i, hl in enumerate(NETHACK_GRID)} | {"paper": PAPER_SIZE}
NETHACK_FIELDS = ("tty_chars", "tty_colors", "tty_cursor", "action")
# bf16 dense peak FLOP/s, for MFU (matched against torch.cuda.get_device_name)
PEAK_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12, "V100": 125e12}
# fields that may change when the same run is resumed
RESUME_FREE = ("samples", "budgets", "log_every", "checkpoint_every", "num_workers", "progress", "tensorboard",
               "compile", "val_batches", "trace_episodes")


@dataclass
class BCConfig:
    """Every hyper-parameter of a BC run (the CLI's flags are these fields)."""

    dataset: str = ""
    out: str = ""
    run_id: str = ""  # name in runs.csv (default: the run directory's name)
    family: str = "auto"  # from the dataset's schema: "atari" datasets get the Atari CNN
    # model size: preset, or params (--params 10M picks (h, L) at h ~ 100 L), or width (+ layers)
    preset: str | None = None
    params: str | None = None
    width: int | None = None
    layers: int | None = None
    heads: int = 0
    core: str = "transformer"
    use_glyphs: bool = False
    use_inventory: bool = True
    use_message: bool = True
    # data
    seq_len: int = 4096
    batch_size: int = 1  # lanes per micro-batch per rank
    grad_accum: int = 1  # micro-batches per optimizer step
    samples_per_step: int | None = None  # instead of grad_accum: B*T*accum*world (paper: 2**18)
    val_fraction: float = 0.05
    val_batches: int = 0  # 0: the whole validation split
    num_workers: int = 0
    # optimisation
    lr: float = 1e-4
    schedule: str = "constant"  # constant (isoFLOP runs: one run serves all budgets) or cosine (forecast runs)
    warmup_steps: int = 0
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    decay_steps: int | None = None  # cosine length (default: the run's last step)
    weight_decay: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    grad_clip: float = 1.0  # max gradient norm (0: off), applied to the true (unscaled) gradients
    ema: float = 0.0  # snapshots hold an exponential moving average of the weights, decay min(ema, (1+t)/(10+t)) at step t (0: the weights)
    # length: up to the largest budget; --samples caps it; with neither, one pass over the data
    budgets: tuple[float, ...] = ()
    samples: int | None = None
    # machinery
    device: str = "auto"
    precision: str = "auto"  # auto: bf16 autocast on CUDA, fp32 on CPU
    compile: bool = False
    seed: int = 0
    log_every: int = 10
    checkpoint_every: int = 100  # optimizer steps between rolling checkpoints
    progress: bool = True
    tensorboard: bool = True  # events in RUN/tb when tensorboard is installed
    trace_episodes: bool = False  # each rank logs the steps it trained on per episode and epoch (RUN/episodes.rank<r>.jsonl)

    def __post_init__(self):
        self.budgets = tuple(sorted(float(b) for b in self.budgets))
        require(bool(self.dataset), "dataset", "is required")
        require(bool(self.out), "out", "is required")
        choose(self.family, FAMILIES, "family")
        choose(self.schedule, SCHEDULES, "schedule")
        choose(self.device, DEVICES, "device")
        choose(self.precision, PRECISIONS, "precision")
        if self.preset is not None:
            choose(self.preset, PRESETS, "preset")
        require(sum(x is not None for x in (self.preset, self.params, self.width)) <= 1, "preset",
                "conflicts with --params/--width: give one way to size the model")
        at_least(self, 1, "seq_len", "batch_size", "grad_accum", "log_every", "checkpoint_every")
        at_least(self, 1, "width", "layers", "samples", "samples_per_step", "decay_steps", optional=True)
        at_least(self, 0, "heads", "warmup_steps", "num_workers", "val_batches", "seed")
        require(self.lr > 0, "lr", f"must be positive (got {self.lr})")
        require(0.0 <= self.min_lr_ratio <= 1.0, "min_lr_ratio", f"must be in [0, 1] (got {self.min_lr_ratio})")
        require(0.0 < self.val_fraction < 1.0, "val_fraction", f"must be in (0, 1) (got {self.val_fraction})")
        require(self.weight_decay >= 0 and self.grad_clip >= 0, "grad_clip", "and weight_decay must be >= 0")
        require(0.0 <= self.ema < 1.0, "ema", f"must be in [0, 1) (got {self.ema})")
        require(all(math.isfinite(b) and b > 0 for b in self.budgets), "budgets",
                f"must be positive finite FLOP counts (got {', '.join(map(str, self.budgets))})")
        self.run_id = self.run_id or Path(self.out).name

    @classmethod
    def from_toml(cls, path: str | os.PathLike, **overrides) -> BCConfig:
        """Fields from a TOML file (a table ``[bc]`` or the top level), then ``overrides``."""
        p = Path(path)
        try:
            data = tomllib.loads(p.read_text())
        except FileNotFoundError:
            raise ConfigError(f"config file {p} does not exist", field="config") from None
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
            raise ConfigError(f"config file {p} is not valid TOML ({e})", field="config") from None
        data = data.get("bc", data)
        known = {f.name for f in fields(cls)}
        bad = sorted(set(data) - known)
        if bad:
            raise ConfigError(f"config file {p}: unknown field {bad[0]!r}", field="config")
        return cls(**{**data, **overrides})


# ---- set-up pieces ---------------------------------------------------------------------------------

def dataset_family(ds: Dataset) -> str:
    return "atari" if ds.schema.name == "atari" else "nethack"


def atari_actions(info: dict) -> int:
    """The size of the action set the Atari expert acted in (the env's minimal set)."""
    from trajdata.envs.atari import make_play_env

    expert = info.get("expert", {})
    env = make_play_env(expert.get("game") or info.get("env"))
    try:
        return int(env.action_space.n)
    finally:
        env.close()


def model_config(cfg: BCConfig, family: str, ds: Dataset) -> NetHackConfig | AtariConfig:
    """The model config the BC config asks for, on this dataset."""
    if family == "atari":
        require(cfg.preset is None, "preset", "presets are NetHack sizes; size the Atari CNN with --width or --params")
        width = cfg.width or (atari_width_for_params(cfg.params) if cfg.params else AtariConfig.width)
        return AtariConfig(width=width, n_actions=atari_actions(ds.info))
    base = NetHackConfig(heads=cfg.heads, core=cfg.core, use_glyphs=cfg.use_glyphs,
                         use_inventory=cfg.use_inventory, use_message=cfg.use_message)
    if cfg.preset:
        h, L = PRESETS[cfg.preset]
    elif cfg.params:
        h, L = size_for_params(cfg.params, base)
    else:
        h, L = cfg.width or base.width, cfg.layers or base.layers
    return replace(base, width=h, layers=L)


def needed_fields(mcfg) -> tuple[str, ...]:
    if isinstance(mcfg, AtariConfig):
        return ("action",)
    return NETHACK_FIELDS + ("inv_glyphs",) * mcfg.use_inventory + ("glyphs",) * mcfg.use_glyphs


def check_dataset(ds: Dataset, family: str, mcfg) -> None:
    """One line for a dataset that cannot feed this model."""
    have = set(ds.schema.names)
    if family == "nethack" and ds.schema.name == "atari":
        raise ConfigError(f"{ds.root} is an Atari dataset: the NetHack model cannot train on it (use --family auto)",
                          field="family")
    if family == "atari" and not {"frame", "lives"} <= have:
        raise ConfigError(f"{ds.root} (schema {ds.schema.name!r}) has no Atari frames for the Atari model",
                          field="family")
    lacking = [f for f in needed_fields(mcfg) if f not in have]
    if lacking:
        hint = {"inv_glyphs": " (--no-use-inventory trains without it)", "glyphs": " (drop --use-glyphs)"}.get(lacking[0], "")
        raise DataError(f"{ds.root} (schema {ds.schema.name!r}) lacks field {lacking[0]!r} that the model needs{hint}")


def pick_device(cfg: BCConfig, local_rank: int) -> torch.device:
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device 'cuda' was asked for, but this machine has no usable CUDA GPU (use --device cpu)",
                          field="device")
    if cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available()):
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def init_distributed() -> tuple[int, int, int]:
    """(rank, world size, local rank); starts the process group under torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not torch.distributed.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        torch.distributed.init_process_group(backend)
    if torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size(), int(os.environ.get("LOCAL_RANK", 0))
    return 0, 1, 0


def lr_at(cfg: BCConfig, step: int, last_step: int) -> float:
    """Learning rate of optimizer step ``step`` (0-based)."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return cfg.lr
    total = max(1, (cfg.decay_steps or last_step) - cfg.warmup_steps)
    t = min(1.0, (step - cfg.warmup_steps) / total)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t)))


def loader_config(cfg: BCConfig, mcfg, split: str, **kw) -> LoaderConfig:
    return LoaderConfig(root=cfg.dataset, fields=needed_fields(mcfg), batch_size=cfg.batch_size, seq_len=cfg.seq_len,
                        mode="lanes", seed=cfg.seed, split=split, val_fraction=cfg.val_fraction,
                        frame_stack=mcfg.frame_stack if isinstance(mcfg, AtariConfig) else 1, **kw)


def to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items() if isinstance(v, torch.Tensor) and v.dim() >= 2}


def step_losses(logits: torch.Tensor, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-step cross-entropy (B, T) (zero on padding) and per-step correctness of the argmax."""
    target = batch["action"].long()
    ce = F.cross_entropy(logits.float().flatten(0, 1), target.flatten(), reduction="none").view_as(target)
    mask = batch["mask"]
    return ce * mask, (logits.argmax(-1) == target) & mask


def rng_state() -> dict:
    return dict(torch=torch.get_rng_state(), numpy=np.random.get_state(), python=random.getstate(),
                cuda=torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None)


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def peak_flops(device: torch.device, bf16: bool = False) -> float | None:
    """Peak FLOP/s for MFU: a GPU's datasheet bf16 figure, or this CPU's measured matmul rate
    (``models.flops.cpu_peak_flops``, in the run's compute dtype)."""
    if device.type == "cpu":
        return counting.cpu_peak_flops(dtype=torch.bfloat16 if bf16 else torch.float32)
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_FLOPS.items() if k in name), None)


@torch.no_grad()
def validate(model, cfg: BCConfig, mcfg, device, autocast) -> dict:
    """Mean per-step cross-entropy on the validation split and its SE across episodes (episodes as
    clusters: the ratio estimator's SE), plus accuracy. Every episode of the split, in full."""
    loader = make_dataloader(loader_config(cfg, mcfg, "val", shuffle=False, rank=0, world_size=1))
    sums: dict[int, list[float]] = {}
    correct = 0
    state = None
    was_training = model.training
    model.eval()
    for i, batch in enumerate(loader):
        if cfg.val_batches and i >= cfg.val_batches:
            break
        b = to_device(batch, device)
        with autocast:
            logits, state = model(b, state)
        ce, ok = step_losses(logits, b)
        correct += int(ok.sum())
        ep = b["episode"][b["mask"]].cpu().numpy()
        per_ep = np.bincount(ep, weights=ce[b["mask"]].double().cpu().numpy())
        counts = np.bincount(ep)
        for e in np.nonzero(counts)[0]:
            s = sums.setdefault(int(e), [0.0, 0])
            s[0] += per_ep[e]
            s[1] += counts[e]
    model.train(was_training)
    if not sums:
        raise DataError(f"{cfg.dataset} has no validation episodes at --val-fraction {cfg.val_fraction}")
    tot = np.array([s[0] for s in sums.values()])
    n = np.array([s[1] for s in sums.values()], dtype=float)
    loss = tot.sum() / n.sum()
    k = len(n)
    se = math.sqrt(k / (k - 1) * ((tot - loss * n) ** 2).sum()) / n.sum() if k > 1 else float("nan")
    return dict(loss=float(loss), loss_se=float(se), accuracy=correct / n.sum(), episodes=k, steps=int(n.sum()))


def _tensorboard(run: Path, enabled: bool):
    if not enabled:
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except Exception:
        return None
    return SummaryWriter(str(run / "tb"))


def _read_metrics(path: Path, up_to_step: int) -> list[str]:
    if not path.is_file():
        return []
    return [ln for ln in path.read_text().splitlines() if ln.strip() and json.loads(ln)["step"] <= up_to_step]


# ---- the run ---------------------------------------------------------------------------------------

def train(cfg: BCConfig, stop_after: int | None = None) -> dict:
    """Train (or resume) the run in ``cfg.out``; returns its summary (steps, samples, snapshots).

    ``stop_after``: stop (with a rolling checkpoint) after that many optimizer steps of this call,
    as an interruption would."""
    rank, world, local_rank = init_distributed()
    device = pick_device(cfg, local_rank)
    ds = Dataset(cfg.dataset)
    family = dataset_family(ds) if cfg.family == "auto" else cfg.family
    mcfg = model_config(cfg, family, ds)
    check_dataset(ds, family, mcfg)
    n_params = counting.effective_params(mcfg)
    per_sample = counting.flops_per_sample(mcfg)
    B, T = cfg.batch_size, cfg.seq_len
    accum = cfg.grad_accum
    if cfg.samples_per_step is not None:
        require(cfg.samples_per_step % (B * T * world) == 0, "samples_per_step",
                f"{cfg.samples_per_step} is not a multiple of batch_size x seq_len x ranks = {B * T * world}")
        accum = cfg.samples_per_step // (B * T * world)
    step_slots = B * T * accum * world
    for b in cfg.budgets:
        require(b / per_sample >= step_slots, "budgets",
                f"{b:g} is less than one optimizer step ({step_slots:,} samples = {step_slots * per_sample:.3g} FLOPs "
                f"at {per_sample:,} FLOPs/sample)")
    train_rows = select_episodes(ds.index_rows(), loader_config(cfg, mcfg, "train"))
    if not train_rows:
        raise DataError(f"{cfg.dataset} has no training episodes (at --val-fraction {cfg.val_fraction})")
    if cfg.budgets and not select_episodes(ds.index_rows(), loader_config(cfg, mcfg, "val")):
        raise DataError(f"{cfg.dataset} has no validation episodes at --val-fraction {cfg.val_fraction} "
                        f"(budget snapshots need them; raise --val-fraction)")
    if cfg.samples is not None:
        target = cfg.samples
    elif cfg.budgets:
        target = math.ceil(cfg.budgets[-1] / per_sample)
    else:
        target = sum(int(r["steps"]) for r in train_rows)
    budget_samples = [(b, math.ceil(b / per_sample)) for b in cfg.budgets]
    last_step = math.ceil(target / step_slots)  # the cosine schedule's end when every slot holds a step

    run = Path(cfg.out)
    writer = rank == 0
    config = dict(asdict(cfg), model=asdict(mcfg), family=family, effective_params=n_params,
                  flops_per_sample=per_sample, world_size=world, grad_accum_effective=accum)
    if writer:
        open_run_dir(run, config, resume_free=RESUME_FREE, what="BC run")
    if world > 1:
        torch.distributed.barrier()

    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)
    random.seed(cfg.seed)
    model = ckpt_io.build_model(family, asdict(mcfg)).to(device)
    averaged = copy.deepcopy(model).requires_grad_(False) if cfg.ema else None
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps,
                            weight_decay=cfg.weight_decay)
    loader = make_dataloader(loader_config(cfg, mcfg, "train", pin_memory=device.type == "cuda"), cfg.num_workers)
    step = samples = 0
    carried = None  # the model state handed from one lanes batch to the next (LSTM (h, c), previous action)
    resumed = (run / ckpt_io.LATEST).is_file()
    if resumed:
        ck = ckpt_io.load(run / ckpt_io.LATEST, map_location=device)
        try:
            model.load_state_dict(ck["model"])
            opt.load_state_dict(ck["optimizer"])
            loader.load_state_dict(ck["loader"])
            set_rng_state(ck["rng"])
            if averaged is not None:
                averaged.load_state_dict(ck["ema"])
        except (KeyError, ValueError, RuntimeError) as e:
            raise DataError(f"checkpoint {run / ckpt_io.LATEST} does not match this run ({type(e).__name__}: "
                            f"{str(e).splitlines()[0][:120]})") from None
        step, samples, carried = ck["step"], ck["samples"], ck.get("carried")
        if carried is not None:
            carried = state_to(carried, device)
    done_budgets = {float(r["budget"]) for r in ckpt_io.read_runs(run / ckpt_io.RUNS_CSV) if r.get("run") == cfg.run_id}
    late = [b for b, s in budget_samples if s < samples and b not in done_budgets]
    if late:
        raise ConfigError(f"budget {late[0]:g} was passed before it was asked for (the run is at {samples:,} samples); "
                          "start a new --out for it", field="budgets")
    pending = [(b, s) for b, s in budget_samples if b not in done_budgets]

    core = model
    if world > 1:
        core = torch.nn.parallel.DistributedDataParallel(model, device_ids=[local_rank] if device.type == "cuda" else None)
    fwd = torch.compile(core) if cfg.compile else core
    bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and device.type == "cuda")
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else nullcontext()
    metrics_path = run / ckpt_io.METRICS
    if writer and resumed:  # rows logged after the checkpoint are logged again
        metrics_path.write_text("".join(ln + "\n" for ln in _read_metrics(metrics_path, step)))
    tb = _tensorboard(run, cfg.tensorboard) if writer else None
    peak = peak_flops(device, bf16)
    total_per_sample = counting.total_flops_per_sample(mcfg, T)  # encoders included (6N leaves them out)

    def save_latest(loader_state, carried_state) -> None:
        if writer:
            ckpt_io.save(run / ckpt_io.LATEST, dict(
                ckpt_io.model_record(model), dataset=dataset_record(ds, cfg, mcfg), train=asdict(cfg), step=step,
                samples=samples, flops=samples * per_sample, params=n_params, budget=None,
                optimizer=opt.state_dict(), loader=loader_state, rng=rng_state(),
                ema=averaged.state_dict() if averaged is not None else None,
                carried=state_to(carried_state, "cpu") if carried_state is not None else None))

    def snapshot(budget: float) -> dict:
        weights = averaged if averaged is not None else model
        val = validate(weights, cfg, mcfg, device, autocast)
        if writer:
            path = ckpt_io.snapshot_path(run, budget)
            ckpt_io.save(path, dict(ckpt_io.model_record(weights), dataset=dataset_record(ds, cfg, mcfg),
                                    train=asdict(cfg), step=step, samples=samples, flops=samples * per_sample,
                                    params=n_params, budget=budget, val=val))
            ckpt_io.upsert_run(run / ckpt_io.RUNS_CSV, dict(
                run=cfg.run_id, budget=repr(budget), params=n_params, samples=samples,
                flops=repr(budget), flops_actual=f"{samples * per_sample:.6g}", loss=f"{val['loss']:.6f}", loss_se=f"{val['loss_se']:.6f}",
                val_episodes=val["episodes"], family=family, width=mcfg.width,
                layers=getattr(mcfg, "layers", ""), core=getattr(mcfg, "core", "cnn"),
                checkpoint=str(path.relative_to(run))))
        return val

    from tqdm import tqdm

    bar = tqdm(total=target, initial=min(samples, target), unit="sample", unit_scale=True, disable=not (cfg.progress and writer),
               desc=f"train bc {cfg.run_id}", dynamic_ncols=True)
    model.train()
    batches = iter(loader)
    boundary_loader = loader.state_dict()
    boundary_carried = carried
    calls, exhausted = 0, False
    trace: dict[int, int] = {}

    def flush_trace(epoch: int) -> None:
        if cfg.trace_episodes and trace:
            ids = loader.dataset.episode_ids
            with open(run / f"episodes.rank{rank}.jsonl", "a") as f:
                f.write(json.dumps(dict(epoch=epoch, rank=rank, steps={ids[e]: n for e, n in sorted(trace.items())})) + "\n")
            trace.clear()
    t_last, wait, busy_samples = time.perf_counter(), 0.0, 0
    tally = torch.zeros(3, dtype=torch.float64, device=device)  # this rank's CE sum, correct, steps: read at log time only
    try:
        while samples < target:
            lr = lr_at(cfg, step, last_step)
            for g in opt.param_groups:
                g["lr"] = lr
            micro = []
            for _ in range(accum):
                t0 = time.perf_counter()
                try:
                    batch = next(batches)
                except StopIteration:  # an epoch ended: the next one has its own shuffle
                    flush_trace(loader.dataset.epoch - 1)
                    batches = iter(loader)
                    batch = next(batches)
                wait += time.perf_counter() - t0
                if cfg.trace_episodes:
                    for e, n in zip(*np.unique(batch["episode"][batch["mask"]].numpy(), return_counts=True)):
                        trace[int(e)] = trace.get(int(e), 0) + int(n)
                micro.append(to_device(batch, device))
            steps_here = torch.stack([b["mask"].sum() for b in micro]).sum()
            if world > 1:
                torch.distributed.all_reduce(steps_here)
            n_steps = int(steps_here)
            if n_steps == 0:  # only padding (even_batches' extras): nothing to learn
                exhausted = True
                break
            opt.zero_grad(set_to_none=True)
            for i, b in enumerate(micro):
                sync = nullcontext() if (world == 1 or i == len(micro) - 1) else core.no_sync()
                with sync, autocast:
                    logits, carried = fwd(b, carried)
                    ce, ok = step_losses(logits, b)
                    # the mean over all real steps of the optimizer step (all ranks): DDP averages over ranks
                    loss = ce.sum() * (world / n_steps)
                loss.backward()
                carried = carried.detach() if carried is not None else None
                tally += torch.stack([ce.detach().sum().double(), ok.sum().double(), b["mask"].sum().double()])
            if cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            opt.step()
            if averaged is not None:
                update_average(averaged, model, min(cfg.ema, (1 + step) / (10 + step)))
            step += 1
            samples += n_steps
            calls += 1
            busy_samples += n_steps
            boundary_loader, boundary_carried = loader.state_dict(), carried
            bar.update(min(samples, target) - bar.n)
            if step % cfg.log_every == 0 or samples >= target:
                now = time.perf_counter()
                dt = max(now - t_last, 1e-9)
                ce_sum, n_ok, n_log = tally.tolist()
                row = dict(step=step, samples=samples, flops=samples * per_sample, flops_total=samples * total_per_sample,
                           loss=ce_sum / max(n_log, 1),
                           accuracy=n_ok / max(n_log, 1), lr=lr, samples_per_s=busy_samples / dt,
                           data_wait=min(1.0, wait / dt))
                if peak:
                    row["mfu_6n"] = row["samples_per_s"] * per_sample / (peak * world)
                    row["mfu_total"] = row["samples_per_s"] * total_per_sample / (peak * world)
                if writer:
                    with open(metrics_path, "a") as f:
                        f.write(json.dumps(row) + "\n")
                    if tb is not None:
                        for k, v in row.items():
                            if k not in ("step",):
                                tb.add_scalar(k, v, step)
                bar.set_postfix(loss=f"{row['loss']:.4f}", sps=f"{row['samples_per_s']:.0f}")
                t_last, wait, busy_samples = time.perf_counter(), 0.0, 0
                tally.zero_()
            while pending and samples >= pending[0][1]:
                budget, _ = pending.pop(0)
                t_snap = time.perf_counter()
                val = snapshot(budget)
                t_last += time.perf_counter() - t_snap  # samples/s and data-wait count training time only
                bar.write(f"budget {budget:.3g}: {samples:,} samples, val loss {val['loss']:.4f} ± {val['loss_se']:.4f} "
                          f"({val['episodes']} episodes)")
            if step % cfg.checkpoint_every == 0:
                save_latest(boundary_loader, boundary_carried)
            if stop_after is not None and calls >= stop_after:
                break
    except KeyboardInterrupt:
        save_latest(boundary_loader, boundary_carried)
        bar.close()
        raise
    save_latest(boundary_loader, boundary_carried)
    flush_trace(loader.dataset.epoch)
    bar.close()
    if tb is not None:
        tb.close()
    if world > 1:
        torch.distributed.barrier()
    return dict(run=str(run), run_id=cfg.run_id, step=step, samples=samples, flops=samples * per_sample,
                params=n_params, resumed=resumed, finished=samples >= target or exhausted,
                snapshots=[str(p) for _, p in ckpt_io.snapshots(run)], model=asdict(mcfg), family=family)


@torch.no_grad()
def update_average(averaged: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    """averaged <- decay * averaged + (1 - decay) * model for the weights; buffers (BatchNorm
    statistics) are copied."""
    torch._foreach_lerp_(list(averaged.parameters()), list(model.parameters()), 1.0 - decay)
    for a, b in zip(averaged.buffers(), model.buffers()):
        a.copy_(b)


def dataset_record(ds: Dataset, cfg: BCConfig, mcfg) -> dict:
    """What a checkpoint says about its training data (eval rebuilds the env from it)."""
    info = ds.info
    return dict(root=str(Path(cfg.dataset).resolve()), env=info.get("env"), schema=ds.schema.name,
                expert=info.get("expert", {}), collection=info.get("collection", {}),
                frame_stack=getattr(mcfg, "frame_stack", 1), fields=list(needed_fields(mcfg)))


def state_to(state, device):
    """A NetHackState (or None) with every tensor moved to ``device``."""
    if state is None:
        return None
    moved = {}
    for f in fields(state):
        v = getattr(state, f.name)
        if isinstance(v, torch.Tensor):
            v = v.to(device)
        elif isinstance(v, tuple) and v and isinstance(v[0], torch.Tensor):
            v = tuple(x.to(device) for x in v)
        moved[f.name] = v
    return replace(state, **moved)
