"""Behavioural cloning on a trajdata dataset: the paper's agents, counted in effective params and
FLOPs, with a checkpoint and a validation loss at every FLOP budget.

Read ``train`` top to bottom: ``start_run`` (devices, DDP, data, the run's shape and length, run
directory), ``build_state`` (model, EMA copy, optimizer, loader, resumed from the rolling
checkpoint), then a loop of named steps: the step's LR, its ``grad_accum`` micro-batches of (B, T)
lanes, ``Stepper.step`` (forward, backward, clip, AdamW, EMA), ``MetricsLog.after_step``,
``take_snapshots`` at the budgets it reached, ``save_latest`` every --checkpoint-every steps.
Every hyper-parameter is a field of ``BCConfig`` (CLI flags and TOML files override the defaults).

Counting follows the paper (``train.shape``): samples D are the real (unpadded) steps trained on,
N the effective parameters (``models.flops.effective_params``) and C = 6ND for NetHack; Atari
counts every layer, 3x the forward FLOPs. Budget C's snapshot is taken at the first optimizer step
whose cumulative samples reach C / (FLOPs per sample).

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
from contextlib import nullcontext
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from trajdata.config import (PRECISIONS, at_least, check_device, choose, coerce_fields, copy_option, from_mapping,
                             lock_dir, open_run_dir, option, parse_count, precision_context, read_run_config, read_toml,
                             require, uses_bf16)
from trajdata.errors import ConfigError, DataError, Terminated, TrajdataError
from trajdata.format.dataset import Dataset
from trajdata.loaders.stream import LoaderConfig, make_dataloader, select_episodes
from trajdata.models import flops as counting
from trajdata.models.atari import AtariConfig
from trajdata.models.nethack import NetHackConfig
from trajdata.train import checkpoint as ckpt_io
from trajdata.train import shape as shapes
from trajdata.train.shape import PRESETS, RunShape, atari_actions, run_shape

FAMILIES = ("auto", "nethack", "atari")
SCHEDULES = ("constant", "cosine")
DEVICES = ("auto", "cpu", "cuda")
# bf16 dense peak FLOP/s, for MFU (matched against torch.cuda.get_device_name)
PEAK_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12, "V100": 125e12}
# fields that may change when the same run is resumed
RESUME_FREE = ("samples", "budgets", "log_every", "checkpoint_every", "num_workers", "progress", "tensorboard",
               "compile", "val_batches", "trace_episodes")


@dataclass
class BCConfig:
    """Every hyper-parameter of a BC run (the CLI's flags are these fields)."""

    dataset: str = option("", "Dataset directory.", cli=False)
    out: str = option("", "Run directory (rerun to resume).", required=True, metavar="DIRECTORY")
    run_id: str = option("", "Name of this run in runs.csv [default: the --out directory's name].")
    family: str = option("auto", "Model family; auto picks the Atari CNN for Atari datasets, else the NetHack agent.",
                         choices=FAMILIES)
    # model size: one of preset, params, width (+ layers)
    preset: str | None = option(None, "A size of the paper's NetHack grid: grid-1 (64,1) .. grid-10 (1088,10); "
                                      "paper = (384,4).", choices=PRESETS)
    params: str | int | float | None = option(None, "Target effective parameters (10M, 250k): picks (width, layers) at width ~ "
                                      "100 x layers (Atari: the CNN width).", metavar="COUNT")
    width: int | None = option(None, "Core width h (NetHack) or CNN width multiplier w (Atari).")
    layers: int | None = option(None, "Transformer / LSTM layers (NetHack).")
    heads: int = copy_option(NetHackConfig, "heads")
    core: str = copy_option(NetHackConfig, "core")
    use_glyphs: bool = copy_option(NetHackConfig, "use_glyphs")
    use_inventory: bool = copy_option(NetHackConfig, "use_inventory")
    use_message: bool = copy_option(NetHackConfig, "use_message")
    encoders: str = copy_option(NetHackConfig, "encoders")
    # data
    seq_len: int = option(4096, "Unroll length T (lanes of whole episodes, back to back).")
    batch_size: int = option(1, "Lanes per micro-batch per rank (B).")
    grad_accum: int = option(1, "Micro-batches per optimizer step.")
    samples_per_step: int | None = option(None, "Samples per optimizer step over all ranks (sets --grad-accum; "
                                                "paper: 262144).", count=True)
    val_fraction: float = option(0.05, "Fraction of episodes (by hash of id) held out for the validation loss.")
    val_batches: int = option(0, "Validation batches per snapshot (0: the whole split).")
    num_workers: int = option(0, "Loader worker processes per rank.")
    # optimisation
    lr: float = option(1e-4, "Peak learning rate (AdamW).")
    schedule: str = option("constant", "constant (isoFLOP runs: one run serves every budget) or cosine (warm-up, "
                                       "then decay).", choices=SCHEDULES)
    warmup_steps: int = option(0, "Linear warm-up optimizer steps.")
    min_lr_ratio: float = option(0.1, "Cosine: final LR as a fraction of --lr.")
    decay_steps: int | None = option(None, "Cosine length in optimizer steps [default: the run's end].")
    weight_decay: float = option(0.0, "AdamW weight decay (the paper: 0).")
    beta1: float = option(0.9, "AdamW beta1.")
    beta2: float = option(0.999, "AdamW beta2.")
    eps: float = option(1e-8, "AdamW epsilon.")
    grad_clip: float = option(1.0, "Max global gradient norm, on unscaled gradients (0: off).")
    ema: float = option(0.0, "Snapshots (and their val loss) use an exponential moving average of the weights with "
                             "this decay per optimizer step, warmed up as min(ema, (1+t)/(10+t)); 0: the raw weights. "
                             "Steadies snapshots under a constant LR.")
    # length: up to the largest budget; --samples caps it; with neither, one pass over the data
    budgets: tuple[float, ...] = option((), "FLOP budgets, comma-separated (1e13,2e13,5e13): a snapshot, validation "
                                            "loss and runs.csv row at each.")
    samples: int | None = option(None, "Stop after this many samples (steps) [default: the largest budget, else one "
                                       "pass over the data].", count=True)
    # machinery
    device: str = option("auto", "auto (CUDA when present), cpu or cuda.", choices=DEVICES)
    precision: str = option("auto", "auto (bf16 autocast on CUDA, fp32 on CPU), bf16 or fp32.", choices=PRECISIONS)
    compile: bool = option(False, "torch.compile the model.")
    seed: int = option(0, "Seed of the model init and of the episode order.")
    log_every: int = option(10, "Optimizer steps between metrics.jsonl rows.")
    checkpoint_every: int = option(100, "Optimizer steps between rolling checkpoints (RUN/checkpoint.pt).")
    progress: bool = option(True, "Show a progress bar.")
    tensorboard: bool = option(True, "Write TensorBoard events to RUN/tb when tensorboard is installed.")
    trace_episodes: bool = option(False, "Log the steps each rank trained on, per episode and epoch "
                                         "(RUN/episodes.rank<r>.jsonl).")

    def __post_init__(self):
        coerce_fields(self)
        self.budgets = tuple(sorted(self.budgets))
        require(bool(self.dataset), "dataset", "is required")
        require(bool(self.out), "out", "is required")
        choose(self.family, FAMILIES, "family")
        choose(self.schedule, SCHEDULES, "schedule")
        choose(self.device, DEVICES, "device")
        choose(self.precision, PRECISIONS, "precision")
        if self.preset is not None:
            choose(self.preset, PRESETS, "preset")
        sized = [k for k in ("preset", "params", "width") if getattr(self, k) is not None]
        if len(sized) > 1:
            require(False, sized[-1], f"conflicts with --{sized[0]}: give one way to size the model")
        at_least(self, 1, "seq_len", "batch_size", "grad_accum", "log_every", "checkpoint_every")
        at_least(self, 1, "width", "layers", "samples", "samples_per_step", "decay_steps", optional=True)
        at_least(self, 0, "heads", "warmup_steps", "num_workers", "val_batches", "seed")
        require(self.lr > 0, "lr", f"must be positive (got {self.lr})")
        require(0.0 <= self.min_lr_ratio <= 1.0, "min_lr_ratio", f"must be in [0, 1] (got {self.min_lr_ratio})")
        require(0.0 < self.val_fraction < 1.0, "val_fraction", f"must be in (0, 1) (got {self.val_fraction})")
        require(self.weight_decay >= 0, "weight_decay", f"must be at least 0 (got {self.weight_decay})")
        require(self.grad_clip >= 0, "grad_clip", f"must be at least 0 (0: off; got {self.grad_clip})")
        for name in ("beta1", "beta2"):
            require(0.0 <= getattr(self, name) < 1.0, name, f"must be in [0, 1) (got {getattr(self, name)})")
        require(self.eps >= 0, "eps", f"must be at least 0 (got {self.eps})")
        if self.params is not None:
            parse_count(self.params, "params", whole=False, positive=True)
        require(0.0 <= self.ema < 1.0, "ema", f"must be in [0, 1) (got {self.ema})")
        require(all(math.isfinite(b) and b > 0 for b in self.budgets), "budgets",
                f"must be positive finite FLOP counts (got {', '.join(map(str, self.budgets))})")
        self.run_id = self.run_id or Path(self.out).name

    @classmethod
    def from_toml(cls, path: str | os.PathLike, **overrides) -> BCConfig:
        """Fields from a TOML file (a table ``[bc]`` or the top level), then ``overrides``."""
        data = read_toml(path)
        return from_mapping(cls, data.get("bc", data), f"config file {path}", **overrides)


# ---- set-up pieces ---------------------------------------------------------------------------------

def dataset_family(ds: Dataset) -> str:
    return "atari" if ds.schema.name == "atari" else "nethack"


def model_config(cfg: BCConfig, family: str, ds: Dataset) -> NetHackConfig | AtariConfig:
    """The model config the BC config asks for, on this dataset (``shape.model_config``)."""
    return shapes.model_config(cfg, family, atari_actions(ds.info) if family == "atari" else None)


def check_family(ds: Dataset, family: str) -> None:
    """One line for a model family the dataset cannot feed (before anything reads the data as that family)."""
    if family == "nethack" and ds.schema.name == "atari":
        raise ConfigError(f"{ds.root} is an Atari dataset: the NetHack model cannot train on it (use --family auto)",
                          field="family")
    if family == "atari" and not {"frame", "lives"} <= set(ds.schema.names):
        raise ConfigError(f"family atari: {ds.root} is a {ds.schema.name} dataset with no Atari frames "
                          f"(use --family auto)", field="family")


def check_dataset(ds: Dataset, family: str, mcfg) -> None:
    """One line for a dataset that cannot feed this model."""
    have = set(ds.schema.names)
    check_family(ds, family)
    lacking = [f for f in mcfg.input_fields if f not in have]
    if lacking:
        hint = {"inv_glyphs": " (--no-use-inventory trains without it)", "glyphs": " (drop --use-glyphs)"}.get(lacking[0], "")
        raise DataError(f"{ds.root} (schema {ds.schema.name!r}) lacks field {lacking[0]!r} that the model needs{hint}")


def pick_device(cfg: BCConfig, local_rank: int) -> torch.device:
    if cfg.device != "auto":
        check_device(cfg.device)
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
    return LoaderConfig(root=cfg.dataset, fields=mcfg.input_fields, batch_size=cfg.batch_size, seq_len=cfg.seq_len,
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
    return dict(loss=float(loss), loss_se=float(se), accuracy=correct / n.sum(), episodes=k, steps=int(n.sum()),
                per_episode=[(e, s[0] / s[1], int(s[1])) for e, s in sorted(sums.items())])


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
                frame_stack=getattr(mcfg, "frame_stack", 1), fields=list(mcfg.input_fields))


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


# ---- the run: what it is fixed to, and what changes step to step ------------------------------------

@dataclass
class Run:
    """A run as set up before its first step: devices, ranks, data, shape, length, run directory."""

    cfg: BCConfig
    rank: int
    world: int
    local_rank: int
    device: torch.device
    ds: Dataset
    shape: RunShape
    target: int  # training samples: the largest budget's, --samples, or one pass over the data
    last_step: int  # the cosine schedule's end when every slot holds a step
    dir: Path
    writer: bool  # rank 0 writes the run directory
    lock: object = None  # rank 0's hold on the run directory (``config.lock_dir``)

    @property
    def record(self) -> dict:
        """The dataset part of every checkpoint of the run."""
        return dataset_record(self.ds, self.cfg, self.shape.model)


@dataclass
class TrainState:
    """What changes step to step, and what a rolling checkpoint saves."""

    model: torch.nn.Module
    averaged: torch.nn.Module | None  # the EMA weights that snapshots hold (--ema)
    opt: torch.optim.Optimizer
    loader: object
    step: int = 0
    samples: int = 0
    carried: object = None  # the model state handed from one lanes batch to the next (LSTM (h, c), previous action)
    resumed: bool = False

    @property
    def snapshot_weights(self) -> torch.nn.Module:
        return self.averaged if self.averaged is not None else self.model


def start_run(cfg: BCConfig) -> Run:
    """Devices and ranks, the dataset, the run's shape and length; checks that the model fits the
    device; locks and opens (or resumes) the run directory (rank 0)."""
    rank, world, local_rank = init_distributed()
    device = pick_device(cfg, local_rank)
    ds = Dataset(cfg.dataset)
    family = dataset_family(ds) if cfg.family == "auto" else cfg.family
    check_family(ds, family)
    shape = run_shape(cfg, family, atari_actions(ds.info) if family == "atari" else None, world)
    check_dataset(ds, family, shape.model)
    step_slots, per_sample = shape.samples_per_step, shape.flops_per_sample
    for b in cfg.budgets:
        require(b / per_sample >= step_slots, "budgets",
                f"{b:g} is less than one optimizer step ({step_slots:,} samples = {step_slots * per_sample:.3g} FLOPs "
                f"at {per_sample:,} FLOPs/sample)")
    target = run_length(cfg, ds, shape)
    check_memory(shape, cfg, device)
    run = Run(cfg, rank, world, local_rank, device, ds, shape, target, shape.steps_for(target), Path(cfg.out),
              writer=rank == 0)
    if run.writer:
        run.lock = lock_dir(run.dir, "train bc", "trained into")
        try:
            open_bc_dir(run, family)
        except BaseException:
            run.lock.close()
            raise
    if world > 1:
        torch.distributed.barrier()
    return run


def dataset_identity(ds: Dataset) -> str:
    """What a run's data is, whatever path names it: a hash of dataset.json's description of the
    collection and of the index's episodes (id, shard, steps)."""
    import hashlib

    info = {k: ds.info.get(k) for k in ("format", "schema_version", "schema", "env", "expert", "collection")}
    h = hashlib.sha256(json.dumps(info, sort_keys=True, default=str).encode())
    for r in sorted(ds.index_rows(), key=lambda r: r["id"]):
        h.update(f"{r['id']}\t{r.get('shard')}\t{r['steps']}\n".encode())
    return h.hexdigest()[:16]


def run_started(run_dir: Path) -> bool:
    """Whether the run in ``run_dir`` left anything but its config (a checkpoint, a snapshot, a runs.csv row)."""
    return ((run_dir / ckpt_io.LATEST).is_file() or bool(ckpt_io.snapshots(run_dir))
            or bool(ckpt_io.read_runs(run_dir / ckpt_io.RUNS_CSV)))


def open_bc_dir(run: Run, family: str) -> None:
    """config.json of the run: a new run's, or a started run's checked against this config and this
    dataset (by identity, not by the path as typed); a run that never took a step is replaced."""
    cfg, shape = run.cfg, run.shape
    ident, root = dataset_identity(run.ds), str(Path(cfg.dataset).resolve())
    started = run_started(run.dir)
    old = read_run_config(run.dir) if started else None
    free = RESUME_FREE + ("dataset", "dataset_root")
    if old is not None and old.get("dataset_id") is None:
        free += ("dataset_id",)  # a run from before datasets had an identity
    elif old is not None:
        check_same_dataset(run.dir, old, ident, root)
    open_run_dir(run.dir, dict(asdict(cfg), dataset_root=root, dataset_id=ident, model=asdict(shape.model),
                               family=family, effective_params=shape.params, flops_per_sample=shape.flops_per_sample,
                               world_size=run.world, grad_accum_effective=shape.grad_accum),
                 resume_free=free, what="BC run", started=started)


def check_same_dataset(run_dir: Path, old: dict, ident: str, root: str) -> None:
    """One line when the run in ``run_dir`` (its config.json ``old``) was trained on other data than
    the dataset ``root`` with identity ``ident``."""
    if old.get("dataset_id") in (None, ident):
        return
    same = old.get("dataset_root") == root
    raise ConfigError(f"{run_dir} holds a BC run on " + (
        f"{root} as it was before it changed (dataset id {old['dataset_id']}, now {ident})" if same else
        f"another dataset ({old.get('dataset_root')}, id {old['dataset_id']}), not {root} (id {ident})")
        + "; use another --out to start a new BC run", field="dataset")


def check_finished_runs(cfgs: list[BCConfig]) -> None:
    """Finished runs that a sweep would keep: refused, as a resumed one is, when their data changed
    (each dataset's identity computed once)."""
    idents = {}
    for cfg in cfgs:
        old = read_run_config(cfg.out)
        if old is not None:
            root = str(Path(cfg.dataset).resolve())
            if root not in idents:
                idents[root] = dataset_identity(Dataset(cfg.dataset))
            check_same_dataset(Path(cfg.out), old, idents[root], root)


def check_memory(shape: RunShape, cfg: BCConfig, device: torch.device) -> None:
    """One line for a model whose weights, gradients and AdamW state (and EMA copy) alone exceed the
    device's memory (counted on the meta device: nothing is allocated)."""
    with torch.device("meta"):
        n = sum(p.numel() for p in ckpt_io.build_model(shape.family, asdict(shape.model)).parameters())
    need = n * 4 * (5 if cfg.ema else 4)
    if device.type == "cuda":
        have, where = torch.cuda.get_device_properties(device).total_memory, f"GPU {device}"
    else:
        have, where = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"), "this machine's memory"
    if need > have:
        size = (f"width {shape.model.width}" if shape.family == "atari"
                else f"(h, L) = ({shape.model.width}, {shape.model.layers})")
        raise ConfigError(f"model too large for {where}: {size} has {n:,} parameters (N = {shape.params:,} effective), "
                          f"whose weights, gradients and AdamW state need {need / 2**30:,.1f} GiB of its "
                          f"{have / 2**30:,.1f} GiB; choose a smaller --width/--layers/--params")


def run_length(cfg: BCConfig, ds: Dataset, shape: RunShape) -> int:
    """Training samples: --samples, else the largest budget's, else one pass over the training split
    (which, and the validation split when there are budgets, must hold episodes)."""
    train_rows = select_episodes(ds.index_rows(), loader_config(cfg, shape.model, "train"))
    if not train_rows:
        raise DataError(f"{cfg.dataset} has no training episodes (at --val-fraction {cfg.val_fraction})")
    if cfg.budgets and not select_episodes(ds.index_rows(), loader_config(cfg, shape.model, "val")):
        raise DataError(f"{cfg.dataset} has no validation episodes at --val-fraction {cfg.val_fraction} "
                        f"(budget snapshots need them; raise --val-fraction)")
    if cfg.samples is not None:
        return cfg.samples
    if cfg.budgets:
        return shape.samples_for(cfg.budgets[-1])
    return sum(int(r["steps"]) for r in train_rows)


def build_state(run: Run) -> TrainState:
    """Model (seeded), EMA copy, optimizer and loader; resumed from the rolling checkpoint if there is one."""
    cfg, device = run.cfg, run.device
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)
    random.seed(cfg.seed)
    model = ckpt_io.build_model(run.shape.family, asdict(run.shape.model)).to(device)
    averaged = copy.deepcopy(model).requires_grad_(False) if cfg.ema else None
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps,
                            weight_decay=cfg.weight_decay)
    loader = make_dataloader(loader_config(cfg, run.shape.model, "train", pin_memory=device.type == "cuda"),
                             cfg.num_workers)
    state = TrainState(model, averaged, opt, loader)
    latest = run.dir / ckpt_io.LATEST
    if latest.is_file():
        resume(state, ckpt_io.load(latest, map_location=device), latest, device)
    return state


def resume(state: TrainState, ck: dict, path: Path, device) -> None:
    """Weights, optimizer, loader position, RNG, EMA and carried model state from checkpoint ``ck``."""
    try:
        state.model.load_state_dict(ck["model"])
        state.opt.load_state_dict(ck["optimizer"])
        state.loader.load_state_dict(ck["loader"])
        set_rng_state(ck["rng"])
        if state.averaged is not None:
            state.averaged.load_state_dict(ck["ema"])
    except (KeyError, ValueError, RuntimeError) as e:
        raise DataError(f"checkpoint {path} does not match this run ({type(e).__name__}: "
                        f"{str(e).splitlines()[0][:120]})") from None
    state.step, state.samples, state.resumed = ck["step"], ck["samples"], True
    state.carried = state_to(ck["carried"], device) if ck.get("carried") is not None else None


def pending_budgets(run: Run, state: TrainState) -> list[tuple[float, int]]:
    """(budget, samples) still to snapshot; a budget already passed without a snapshot is refused."""
    done = {float(r["budget"]) for r in ckpt_io.read_runs(run.dir / ckpt_io.RUNS_CSV) if r.get("run") == run.cfg.run_id}
    late = [b for b, s in run.shape.budget_samples if s < state.samples and b not in done]
    if late:
        raise ConfigError(f"budget {late[0]:g} was passed before it was asked for (the run is at {state.samples:,} "
                          "samples); start a new --out for it", field="budgets")
    return [(b, s) for b, s in run.shape.budget_samples if b not in done]


# ---- one optimizer step ------------------------------------------------------------------------------

class Stepper:
    """Forward and backward over an optimizer step's micro-batches (DDP, torch.compile, autocast),
    then the clipped optimizer step and the EMA update."""

    def __init__(self, run: Run, state: TrainState):
        self.run, self.state = run, state
        cfg, device = run.cfg, run.device
        self.core = state.model
        if run.world > 1:
            self.core = torch.nn.parallel.DistributedDataParallel(
                state.model, device_ids=[run.local_rank] if device.type == "cuda" else None)
        self.fwd = torch.compile(self.core) if cfg.compile else self.core
        self.autocast = precision_context(cfg.precision, device)
        # the first optimizer step (1-based) whose loss was not finite, kept on the device (read only
        # before anything is written: no sync per step)
        self.first_bad = torch.full((), _NONE_BAD, dtype=torch.long, device=device)

    def real_steps(self, micro: list[dict], stop: bool = False) -> tuple[int, bool]:
        """Unpadded steps in the micro-batches over all ranks, and whether any rank was asked to stop
        (one all-reduce: every rank stops at the same step boundary)."""
        steps = torch.stack([b["mask"].sum() for b in micro]).sum()
        if self.run.world > 1:
            both = torch.stack([steps.long(), torch.tensor(int(stop), device=steps.device)])
            torch.distributed.all_reduce(both)
            return int(both[0]), bool(both[1])
        return int(steps), stop

    def set_lr(self, lr: float) -> None:
        for g in self.state.opt.param_groups:
            g["lr"] = lr

    def step(self, micro: list[dict], n_steps: int, tally: torch.Tensor) -> None:
        """One optimizer step on ``n_steps`` real steps; adds (CE sum, correct, steps) to ``tally``."""
        state, cfg, world = self.state, self.run.cfg, self.run.world
        state.opt.zero_grad(set_to_none=True)
        total = torch.zeros((), dtype=torch.float64, device=self.run.device)
        for i, b in enumerate(micro):
            with nullcontext() if (world == 1 or i == len(micro) - 1) else self.core.no_sync():
                with self.autocast:
                    logits, state.carried = self.fwd(b, state.carried)
                    ce, ok = step_losses(logits, b)
                    # the mean over all real steps of the optimizer step (all ranks): DDP averages over ranks
                    loss = ce.sum() * (world / n_steps)
                loss.backward()
            state.carried = state.carried.detach() if state.carried is not None else None
            total += ce.detach().sum().double()
            tally += torch.stack([ce.detach().sum().double(), ok.sum().double(), b["mask"].sum().double()])
        self.first_bad = torch.where(torch.isfinite(total) | (self.first_bad < _NONE_BAD), self.first_bad,
                                     state.step + 1)
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(state.model.parameters(), cfg.grad_clip)
        state.opt.step()
        if state.averaged is not None:
            update_average(state.averaged, state.model, min(cfg.ema, (1 + state.step) / (10 + state.step)))
        state.step += 1
        state.samples += n_steps

    def check_finite(self, last_good: int) -> None:
        """One line naming the first step whose loss was nan or inf (a sync; called before writing)."""
        bad = int(self.first_bad)
        if bad == _NONE_BAD:
            return
        latest = self.run.dir / ckpt_io.LATEST
        kept = (f"{latest} keeps step {last_good}, its last finite state (rerun to resume from it, or lower --lr "
                "in a new --out)") if latest.is_file() else "no checkpoint was written: rerun with a lower --lr"
        raise TrainingDiverged(f"the training loss became non-finite (nan or inf) at step {bad} (--lr "
                               f"{self.run.cfg.lr:g}); the run stopped there and {kept}")


_NONE_BAD = 2**62


class TrainingDiverged(TrajdataError):
    """The training loss went nan or inf; nothing after the last finite step was written."""


class Batches:
    """The training loader's batches, epoch after epoch, moved to the device; times the wait for
    them and, with --trace-episodes, logs the steps of each episode this rank trained on."""

    def __init__(self, run: Run, loader):
        self.run, self.loader = run, loader
        self.it = iter(self.loader)
        self.wait = 0.0
        self.trace: dict[int, int] = {}

    def take(self, n: int) -> list[dict]:
        return [self.next() for _ in range(n)]

    def next(self) -> dict:
        t0 = time.perf_counter()
        # Starting an epoch's iterator (lazily, at its first batch) draws the loader workers' base seed
        # from the global RNG; the loader's order has its own seed, so the draw is undone: the RNG a
        # rolling checkpoint saves is then the one an uninterrupted run has at that step.
        with torch.random.fork_rng(devices=[]):
            try:
                batch = next(self.it)
            except StopIteration:  # an epoch ended: the next one has its own shuffle
                self.flush_trace(self.loader.dataset.epoch - 1)
                self.it = iter(self.loader)
                batch = next(self.it)
        self.wait += time.perf_counter() - t0
        if self.run.cfg.trace_episodes:
            for e, n in zip(*np.unique(batch["episode"][batch["mask"]].numpy(), return_counts=True)):
                self.trace[int(e)] = self.trace.get(int(e), 0) + int(n)
        return to_device(batch, self.run.device)

    def flush_trace(self, epoch: int) -> None:
        if self.run.cfg.trace_episodes and self.trace:
            ids, rank = self.loader.dataset.episode_ids, self.run.rank
            with open(self.run.dir / f"episodes.rank{rank}.jsonl", "a") as f:
                f.write(json.dumps(dict(epoch=epoch, rank=rank, steps={ids[e]: n for e, n in sorted(self.trace.items())}))
                        + "\n")
            self.trace.clear()


# ---- what a step leaves behind: metrics, snapshots, checkpoints ----------------------------------------

class MetricsLog:
    """Loss, accuracy, LR, samples/s and data-wait rows every --log-every steps (and at the end) into
    metrics.jsonl, TensorBoard and the progress bar; samples/s counts training time only."""

    def __init__(self, run: Run, state: TrainState):
        self.run = run
        self.path = run.dir / ckpt_io.METRICS
        if run.writer and self.path.is_file():  # rows logged after the checkpoint (if any) are logged again
            self.path.write_text("".join(ln + "\n" for ln in ckpt_io.read_metrics(self.path, state.step)))
        self.tb = ckpt_io.tensorboard(run.dir, run.cfg.tensorboard) if run.writer else None
        cfg = run.cfg
        self.peak = peak_flops(run.device, uses_bf16(cfg.precision, run.device.type))
        self.total_per_sample = counting.total_flops_per_sample(run.shape.model, cfg.seq_len)  # encoders included
        self.bar = _progress_bar(run, state.samples)
        self.tally = torch.zeros(3, dtype=torch.float64, device=run.device)  # CE sum, correct, steps: read at log time only
        self.restart_clock()

    def restart_clock(self) -> None:
        self.t_last, self.busy_samples = time.perf_counter(), 0

    def pause(self, seconds: float) -> None:
        """Leave ``seconds`` (a snapshot's validation) out of samples/s and data-wait."""
        self.t_last += seconds

    def due(self, state: TrainState) -> bool:
        """Whether this step writes a row."""
        return state.step % self.run.cfg.log_every == 0 or state.samples >= self.run.target

    def after_step(self, state: TrainState, n_steps: int, lr: float, batches: Batches) -> None:
        run = self.run
        self.busy_samples += n_steps
        self.bar.update(min(state.samples, run.target) - self.bar.n)
        if self.due(state):
            self.write(self.row(state, lr, batches.wait))
            self.restart_clock()
            batches.wait = 0.0
            self.tally.zero_()

    def row(self, state: TrainState, lr: float, wait: float) -> dict:
        dt = max(time.perf_counter() - self.t_last, 1e-9)
        ce_sum, n_ok, n_log = self.tally.tolist()
        row = dict(step=state.step, samples=state.samples, flops=self.run.shape.flops(state.samples),
                   flops_total=state.samples * self.total_per_sample,
                   loss=ce_sum / max(n_log, 1), accuracy=n_ok / max(n_log, 1), lr=lr,
                   samples_per_s=self.busy_samples / dt, data_wait=min(1.0, wait / dt))
        if self.peak:
            world = self.run.world
            row["mfu_6n"] = row["samples_per_s"] * self.run.shape.flops_per_sample / (self.peak * world)
            row["mfu_total"] = row["samples_per_s"] * self.total_per_sample / (self.peak * world)
        return row

    def write(self, row: dict) -> None:
        if self.run.writer:
            with open(self.path, "a") as f:
                f.write(json.dumps(row) + "\n")
            if self.tb is not None:
                for k, v in row.items():
                    if k != "step":
                        self.tb.add_scalar(k, v, row["step"])
        self.bar.set_postfix(loss=f"{row['loss']:.4f}", sps=f"{row['samples_per_s']:.0f}")

    def close(self) -> None:
        self.bar.close()
        if self.tb is not None:
            self.tb.close()


def _progress_bar(run: Run, samples: int):
    from tqdm import tqdm

    return tqdm(total=run.target, initial=min(samples, run.target), unit="sample", unit_scale=True,
                disable=not (run.cfg.progress and run.writer), desc=f"train bc {run.cfg.run_id}", dynamic_ncols=True)


def take_snapshots(run: Run, state: TrainState, pending: list, stepper: Stepper, log: MetricsLog) -> None:
    """A snapshot (weights, validation loss, runs.csv row) for every pending budget this step reached."""
    while pending and state.samples >= pending[0][1]:
        budget, _ = pending.pop(0)
        t0 = time.perf_counter()
        val = snapshot(run, state, budget, stepper.autocast)
        log.pause(time.perf_counter() - t0)
        log.bar.write(f"budget {budget:.3g}: {state.samples:,} samples, val loss {val['loss']:.4f} ± "
                      f"{val['loss_se']:.4f} ({val['episodes']} episodes)")


def snapshot(run: Run, state: TrainState, budget: float, autocast) -> dict:
    """Validate the snapshot weights; rank 0 writes snapshots/budget-C.pt and its runs.csv row."""
    weights = state.snapshot_weights
    val = validate(weights, run.cfg, run.shape.model, run.device, autocast)
    if run.writer:
        path = ckpt_io.snapshot_path(run.dir, budget)
        record = dict(ckpt_io.model_record(weights), dataset=run.record, train=asdict(run.cfg), step=state.step,
                      samples=state.samples, flops=run.shape.flops(state.samples), params=run.shape.params,
                      budget=budget, val=val)
        ckpt_io.save(path, record)
        ckpt_io.upsert_run(run.dir / ckpt_io.RUNS_CSV, ckpt_io.snapshot_row(record, path, run.dir))
    return val


def step_boundary(state: TrainState) -> tuple:
    """What a rolling checkpoint needs besides weights and optimizer, as it is between two steps: the
    loader position, the carried model state and the RNG states."""
    return state.loader.state_dict(), state.carried, rng_state()


def save_latest(run: Run, state: TrainState, boundary: tuple) -> None:
    """The rolling checkpoint, at the last step boundary (``boundary``: ``step_boundary`` there)."""
    if not run.writer:
        return
    loader_state, carried, rng = boundary
    ckpt_io.save(run.dir / ckpt_io.LATEST, dict(
        ckpt_io.model_record(state.model), dataset=run.record, train=asdict(run.cfg), step=state.step,
        samples=state.samples, flops=run.shape.flops(state.samples), params=run.shape.params, budget=None,
        optimizer=state.opt.state_dict(), loader=loader_state, rng=rng,
        ema=state.averaged.state_dict() if state.averaged is not None else None,
        carried=state_to(carried, "cpu") if carried is not None else None))


# ---- the loop ----------------------------------------------------------------------------------------

def train(cfg: BCConfig, stop_after: int | None = None) -> dict:
    """Train (or resume) the run in ``cfg.out``; returns its summary (steps, samples, snapshots).

    Ctrl-C or SIGTERM stops it at the next step boundary (a second one at once) with a rolling
    checkpoint of that boundary, then raises KeyboardInterrupt (``Terminated``): rerunning resumes
    exactly. ``stop_after``: stop the same way after that many optimizer steps of this call."""
    run = start_run(cfg)
    try:
        with StopSignals() as stop:
            return train_loop(run, stop, stop_after)
    finally:
        if run.lock is not None:
            run.lock.close()


def train_loop(run: Run, stop: StopSignals, stop_after: int | None) -> dict:
    """The loop of named steps, from the state ``build_state`` restores."""
    cfg = run.cfg
    state = build_state(run)
    pending = pending_budgets(run, state)
    stepper = Stepper(run, state)
    log = MetricsLog(run, state)
    state.model.train()
    batches = Batches(run, state.loader)
    boundary = step_boundary(state)  # what the rolling checkpoint resumes from
    calls, exhausted, saved = 0, False, state.step
    try:
        while state.samples < run.target and not (stop.signal and run.world == 1):
            lr = lr_at(cfg, state.step, run.last_step)
            stepper.set_lr(lr)
            micro = stop.taking(batches, run.shape.grad_accum)
            if micro is None:  # a signal ended the loader's workers while the step waited for them
                break
            n_steps, stopping = stepper.real_steps(micro, bool(stop.signal))
            if stopping:
                break
            if n_steps == 0:  # only padding (even_batches' extras): nothing to learn
                exhausted = True
                break
            stepper.step(micro, n_steps, log.tally)
            calls += 1
            if log.due(state) or (pending and state.samples >= pending[0][1]) or state.step % cfg.checkpoint_every == 0:
                stepper.check_finite(saved)
            log.after_step(state, n_steps, lr, batches)
            take_snapshots(run, state, pending, stepper, log)
            boundary = step_boundary(state)
            if state.step % cfg.checkpoint_every == 0:
                save_latest(run, state, boundary)
                saved = state.step
            if stop_after is not None and calls >= stop_after:
                break
        stepper.check_finite(saved)
    except torch.OutOfMemoryError:
        raise DataError(f"out of {run.device} memory at step {state.step + 1}: lower --batch-size or --seq-len "
                        f"(the run keeps step {saved})") from None
    finally:
        log.close()
    save_latest(run, state, boundary)
    stop.raise_if_stopped(f"{run.dir / ckpt_io.LATEST} holds step {state.step}: rerun the same command to resume")
    batches.flush_trace(state.loader.dataset.epoch)
    if run.world > 1:
        torch.distributed.barrier()
    return dict(run=str(run.dir), run_id=cfg.run_id, step=state.step, samples=state.samples,
                flops=run.shape.flops(state.samples), params=run.shape.params, resumed=state.resumed,
                finished=state.samples >= run.target or exhausted,
                snapshots=[str(p) for _, p in ckpt_io.snapshots(run.dir)], model=asdict(run.shape.model),
                family=run.shape.family)


class StopSignals:
    """Ctrl-C and SIGTERM while training: the first asks the loop to stop at the next step boundary
    (an interrupt in the middle of a step would save a state no uninterrupted run passes through:
    BatchNorm statistics of a forward pass whose step never happened); a second stops at once.
    Installed only in the main thread."""

    def __init__(self):
        self.signal: int | None = None
        self.old: dict = {}

    def __enter__(self) -> StopSignals:
        import signal
        import threading

        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self.old[sig] = signal.signal(sig, self.on_signal)
        return self

    def __exit__(self, *exc) -> None:
        import signal

        for sig, handler in self.old.items():
            signal.signal(sig, handler)

    def on_signal(self, signum, frame) -> None:
        import signal

        if self.signal is not None:
            raise Terminated() if signum == signal.SIGTERM else KeyboardInterrupt()
        self.signal = signum

    def taking(self, batches: Batches, n: int) -> list[dict] | None:
        """``batches.take(n)``, or None when a signal came meanwhile and the loader failed with it
        (its workers got the terminal's Ctrl-C too)."""
        try:
            return batches.take(n)
        except Exception:
            if self.signal is None:
                raise
            return None

    def raise_if_stopped(self, message: str) -> None:
        import signal

        if self.signal is not None:
            raise Terminated(message) if self.signal == signal.SIGTERM else KeyboardInterrupt(message)
