"""Streaming (B, T) batches from a trajdata dataset for recurrent / long-context BC.

A pipeline of small stages, each one job:

    select_episodes  index rows -> filtered, split (by hash of id) episode list
    assign           episodes -> the (rank, worker) slot that owns each (whole episodes, by steps)
    lane_plan        lanes mode: which episode segments fill each lane of each batch (index only)
    window_plan      windows mode: random-phase T-step crops of each episode (index only)
    shuffle          bounded shuffle buffer (windows)
    batches          plan -> numpy (B, T, ...) batches, streaming chunks through EpisodeReaders
    to_torch / pin   numpy -> tensors (optionally pinned)

``root`` may also be a pack (``trajdata pack``): its episodes are re-simulated in the readers
(``loaders.pack``), giving the batches the unpacked dataset would. Plans are computed from the
index alone, so resuming (``load_state_dict``) skips delivered batches
without decoding them. Each batch carries ``mask`` (False on padding), ``reset`` (True on an
episode's first step), ``episode`` (position in ``episode_ids``), ``step`` (step within the
episode) plus the selected schema fields; ``slot`` / ``batch_index`` say who made it (for resume).
"""
from __future__ import annotations

import ctypes
import hashlib
import heapq
import itertools
import mmap
import warnings
import weakref
from collections import deque
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from trajdata.config import at_least, choose, require
from trajdata.envs.atari import stack_frames
from trajdata.errors import ConfigError, DataError
from trajdata.format import codec, kernels
from trajdata.format.dataset import Dataset
from trajdata.format.shard import chunk_header, tar_members
from trajdata.loaders.chunks import ChunkCache, DenseChunk

MODES = ("lanes", "windows")
ON_CORRUPT = ("raise", "skip")


class CorruptDataWarning(UserWarning):
    """A corrupt episode was skipped (``LoaderConfig.on_corrupt="skip"``)."""

SPLITS = (None, "train", "val")
# LoaderConfig fields that decide which batches come in which order: a resumed loader must share them
ORDER_FIELDS = ("fields", "batch_size", "seq_len", "mode", "seed", "shuffle", "shuffle_buffer", "split",
                "val_fraction", "where", "min_score", "frame_stack", "even_batches")
FRAME_FIELD = "frame"
LIVES_FIELD = "lives"


@dataclass
class LoaderConfig:
    root: str
    fields: tuple[str, ...] | None = None  # schema fields to load; None = all
    batch_size: int = 32
    seq_len: int = 4096
    mode: str = "lanes"  # "lanes": continuous streams of whole episodes; "windows": random T-step crops
    seed: int = 0
    shuffle: bool = True
    shuffle_buffer: int = 256  # windows mode: crops held for shuffling
    split: str | None = None  # None (all), "train" or "val"
    val_fraction: float = 0.05
    where: dict = field(default_factory=dict)  # index column -> value, or list of accepted values
    min_score: float | None = None
    frame_stack: int = 1  # Atari: stack k frames (trajdata.envs.atari's rule; adds "frame" and "lives")
    pin_memory: bool = False
    rank: int | None = None  # default: torch.distributed if initialised, else 0
    world_size: int | None = None
    cache_chunks: int = 4  # windows mode: decoded chunks kept for neighbouring crops
    even_batches: bool = True  # every slot yields as many batches as the busiest (padding-only extras): DDP-safe
    tune_malloc: bool = True  # glibc: keep freed decode buffers in the process (see keep_freed_memory)
    # A corrupt chunk or episode: "raise" a DataError, or "skip" it (warned about and counted; its rows
    # become padding, so every rank still yields the same batches).
    on_corrupt: str = "raise"

    def __post_init__(self):
        choose(self.mode, MODES, "mode")
        choose(self.on_corrupt, ON_CORRUPT, "on_corrupt")
        choose(self.split, SPLITS, "split")
        at_least(self, 1, "batch_size", "seq_len", "frame_stack", "shuffle_buffer")
        require(0.0 <= self.val_fraction <= 1.0, "val_fraction", f"must be in [0, 1] (got {self.val_fraction})")

    def check_schema(self, schema) -> None:
        """The checks that need the dataset: fields exist, frame stacking has frames and lives."""
        for f in self.fields or ():
            require(f in schema.names, "fields", f"{f!r} is not in schema {schema.name!r} ({', '.join(schema.names)})")
        require(self.frame_stack == 1 or {FRAME_FIELD, LIVES_FIELD} <= set(schema.names), "frame_stack",
                f"needs {FRAME_FIELD!r} and {LIVES_FIELD!r} fields; schema {schema.name!r} lacks them")


# ---- stage 1: which episodes ---------------------------------------------------------------------

def _jsonish(v):
    """``v`` as a saved state holds it (tuples as lists)."""
    return [_jsonish(x) for x in v] if isinstance(v, (list, tuple)) else v


def val_hash(episode_id: str) -> float:
    """Stable uniform [0, 1) value of an episode id: the train/val split never moves as data grows."""
    return int.from_bytes(hashlib.blake2b(episode_id.encode(), digest_size=8).digest(), "little") / 2.0**64


def select_episodes(rows: list[dict], cfg: LoaderConfig) -> list[dict]:
    """Index rows kept by the filters and the split, sorted by id."""
    cols = set(rows[0]) if rows else set()
    for col in cfg.where:
        if rows and col not in cols:
            raise ConfigError(f"filter column {col!r} is not in the index ({', '.join(sorted(cols))})")
    kept = [r for r in rows if r["steps"] > 0 and all(_accepts(want, r.get(col)) for col, want in cfg.where.items())
            and (cfg.min_score is None or (r.get("score") is not None and r["score"] >= cfg.min_score))]
    if cfg.split is not None:
        val = validation_ids([r["id"] for r in kept], cfg.val_fraction)
        kept = [r for r in kept if (r["id"] in val) == (cfg.split == "val")]
    return sorted(kept, key=lambda r: r["id"])


def validation_ids(ids: list[str], fraction: float) -> set[str]:
    """The validation split of episodes ``ids``: those whose ``val_hash`` is below ``fraction``; when
    that is none but ``fraction`` is above 0 and there are 2 or more episodes, the one of lowest hash."""
    val = {i for i in ids if val_hash(i) < fraction}
    if not val and fraction > 0 and len(ids) >= 2:
        val = {min(ids, key=lambda i: (val_hash(i), i))}
    return val


def _accepts(want, value) -> bool:
    return value in want if isinstance(want, (list, tuple, set, frozenset)) else value == want


def assign(steps: list[int], slots: int, seed: int, epoch: int, shuffle: bool) -> list[list[int]]:
    """Episode positions owned by each slot: a seeded permutation, each episode to the slot with
    the fewest steps so far (whole episodes, no overlap, nothing left out)."""
    order = np.random.default_rng([seed, epoch]).permutation(len(steps)) if shuffle else np.arange(len(steps))
    heap = [(0, s) for s in range(slots)]
    owned: list[list[int]] = [[] for _ in range(slots)]
    for i in order:
        total, s = heapq.heappop(heap)
        owned[s].append(int(i))
        heapq.heappush(heap, (total + steps[i], s))
    return owned


# ---- stage 2: plans (index only) ------------------------------------------------------------------
# A plan item is a batch: one list per row of (episode position, start step, steps, column offset).

def lane_plan(episodes: list[int], steps: list[int], B: int, T: int) -> Iterator[list[list[tuple]]]:
    """Lanes: each row a stream of whole episodes end to end. The next episode in order goes to the
    lane whose stream ends first (as B environments stepping in parallel would), so the lanes end
    within about one episode of each other and the epoch's last batches carry little padding."""
    queue = iter(episodes)
    heap = [(0, lane) for lane in range(B)]  # (time the lane's stream ends, lane)
    held: list[deque] = [deque() for _ in range(B)]  # (episode, start time)
    more = True
    for k in itertools.count():
        lo, hi = k * T, (k + 1) * T
        while more and heap[0][0] < hi:
            e = next(queue, None)
            if e is None:
                more = False
                break
            end, lane = heapq.heappop(heap)
            held[lane].append((e, end))
            heapq.heappush(heap, (end + steps[e], lane))
        batch = []
        for lane in range(B):
            segs = []
            for e, t0 in held[lane]:
                a, b = max(t0, lo), min(t0 + steps[e], hi)
                if b > a:
                    segs.append((e, a - t0, b - a, a - lo))
            while held[lane] and held[lane][0][1] + steps[held[lane][0][0]] <= hi:
                held[lane].popleft()
            batch.append(segs)
        if not any(batch):
            return
        yield batch


def window_plan(episodes: list[int], steps: list[int], T: int, rng: np.random.Generator | None) -> Iterator[tuple]:
    """Windows: each episode cut into T-step crops at a random phase (every step in exactly one crop)."""
    for e in episodes:
        phase = int(rng.integers(0, T)) if rng is not None else 0
        for s in range(-phase, steps[e], T):
            a, b = max(s, 0), min(s + T, steps[e])
            if b > a:
                yield (e, a, b - a, 0)


def shuffle(items: Iterator, size: int, rng: np.random.Generator | None) -> Iterator:
    """Bounded shuffle buffer (webdataset style); ``rng=None`` passes items through."""
    if rng is None:
        yield from items
        return
    buf = []
    for x in items:
        if len(buf) < size:
            buf.append(x)
            continue
        i = int(rng.integers(0, size))
        yield buf[i]
        buf[i] = x
    rng.shuffle(buf)
    yield from buf


def window_batches(crops: Iterator[tuple], B: int) -> Iterator[list[list[tuple]]]:
    batch = []
    for c in crops:
        batch.append([c])
        if len(batch) == B:
            yield batch
            batch = []
    if batch:
        yield batch + [[] for _ in range(B - len(batch))]


# ---- stage 3: reading ----------------------------------------------------------------------------

class ChunkSource:
    """Random access to episode chunks: per-shard member tables (lazy) and a small decoded-chunk cache."""

    def __init__(self, root: Path, schema, fields: list[str], cache_chunks: int = 0):
        self.root, self.schema, self.fields = root, schema, fields
        self._tables: dict[str, dict[str, list[tuple]]] = {}
        self._cache = ChunkCache(cache_chunks)
        self._files: dict[str, object] = {}

    def _file(self, shard: str):
        if shard not in self._files:
            path = self.root / "shards" / shard
            if not path.is_file():
                raise DataError(f"shard {path} does not exist (index out of date? run `trajdata index {self.root}`)")
            if len(self._files) >= 8:
                self._files.pop(next(iter(self._files))).close()
            self._files[shard] = open(path, "rb")
        return self._files[shard]

    def chunks(self, shard: str, episode_id: str, steps: int | None = None) -> list[tuple]:
        """(offset, size, start, steps) of the episode's chunks, in order; checks they are its whole
        episode (chunks 0.. in order, contiguous, ending with its final chunk) and, given the index's
        ``steps``, that they hold that many steps."""
        if shard not in self._tables:
            table: dict[str, list[tuple]] = {}
            f = self._file(shard)
            f.seek(0)
            for m in tar_members(f, shard):
                f.seek(m.offset_data)
                header, _ = chunk_header(f.read(min(m.size, 1 << 16)), shard, m.name)
                table.setdefault(header["episode_id"], []).append(
                    (m.offset_data, m.size, header["start"], header["steps"], header["chunk"], header["last"]))
            self._tables[shard] = table
        try:
            table = self._tables[shard][episode_id]
        except KeyError:
            raise DataError(f"shard {shard}: no episode {episode_id!r} (index out of date?)") from None
        at = 0
        for k, (_, _, start, n, chunk, last) in enumerate(table):
            if chunk != k or start != at or last != (k == len(table) - 1):
                raise DataError(f"shard {shard}: episode {episode_id}: chunk {chunk} out of order or after its "
                                f"final chunk, or final chunk missing (corrupt shard)")
            at += n
        if steps is not None and at != steps:
            raise DataError(f"shard {shard}: episode {episode_id}: its chunks hold {at} steps, index.parquet says "
                            f"{steps} (rebuild it with `trajdata index {self.root}`)")
        return table

    def decode(self, shard: str, episode_id: str, k: int):
        """Chunk ``k`` of the episode: a fresh ``ChunkCursor`` (read once, in step order) if any
        wanted field is in the ``sparse`` stage, else a (cached) ``DenseChunk``."""
        key = (shard, episode_id, k)
        cached = self._cache.get(key)
        if cached is not None:
            return cached
        offset, size = self.chunks(shard, episode_id)[k][:2]
        f = self._file(shard)
        f.seek(offset)
        blob = f.read(size)
        where = f"shard {shard}: episode {episode_id} chunk {k}"
        if len(blob) != size:
            raise DataError(f"{where}: truncated ({len(blob)} of {size} bytes)")
        header, start = codec.read_header(blob, where)
        if header.get("chunk") != k or header.get("episode_id") != episode_id:
            raise DataError(f"{where}: header says episode {header.get('episode_id')} chunk {header.get('chunk')}")
        payload = memoryview(blob)[start:]
        if any(header["fields"].get(n, {}).get("data", {}).get("stage") == "sparse" for n in self.fields):
            return ChunkCursor(self.schema, header, payload, self.fields, where)
        chunk = DenseChunk(codec.decode_chunk(self.schema, header, payload, self.fields, where=where))
        return self._cache.put(key, chunk)

    def close(self) -> None:
        for f in self._files.values():
            f.close()
        self._files.clear()


class ChunkCursor(DenseChunk):
    """A chunk read once in step order: ``sparse``-stage fields decode straight into the caller's
    batch rows (their state machines hold one row each); other fields are decoded whole."""

    def __init__(self, schema, header: dict, payload, fields: list[str], where: str):
        self.sparse = {}
        needed = codec.decode_order(schema, header, fields, where)
        sources = codec.follow_sources(header, needed)
        for name in needed:
            if header["fields"][name]["data"].get("stage") == "sparse":
                field = codec.sparse_field(schema, header, name, codec.read_parts(schema, header, payload, name, where),
                                           where)
                field.emit = name in sources
                self.sparse[name] = field
        dense = [n for n in fields if n not in self.sparse]
        super().__init__(codec.decode_chunk(schema, header, payload, dense, where=where) if dense else {})
        self.t = 0

    def read(self, out: dict, row: int, col: int, i: int, m: int, skip=()) -> None:
        if i < self.t:
            raise ValueError(f"chunk cursor at step {self.t} cannot go back to {i}")
        if i > self.t:
            self._run(None, row, col, i - self.t, skip)
        self._run(out, row, col, m, skip)
        super().read(out, row, col, i, m, skip)

    def _run(self, out, row: int, col: int, m: int, skip) -> None:
        wls = {}
        for name, field in self.sparse.items():
            dst = (out[name][row, col : col + m].reshape(m, field.F)
                   if out is not None and name in out and name not in skip else None)
            wls[name] = field.decode(m, dst, [wls[s] for s in field.sources], stream=True)
        self.t += m


class EpisodeReader:
    """Sequential reader of one episode from step ``start``: holds one decoded chunk at a time. With
    ``frame_stack`` k > 1 it stacks frames by the rule of ``trajdata.envs.atari`` (the last k frames of
    the current life, zeros before it), reading ``lives`` and keeping k - 1 frames of history."""

    def __init__(self, src: ChunkSource, shard: str, episode_id: str, start: int, frame_stack: int = 1,
                 steps: int | None = None):
        self.src, self.shard, self.episode_id, self.k = src, shard, episode_id, frame_stack
        self.table = src.chunks(shard, episode_id, steps)
        self._chunk, self._data = -1, None
        self.pos = start
        if self.k > 1:
            self.hist = np.zeros((self.k - 1, *src.schema[FRAME_FIELD].shape), src.schema[FRAME_FIELD].np_dtype)
            self.prev_lives, self.run = None, 0
            self.pos = max(0, start - self.k)  # one step more than the stack: its lives tell whether a life starts
            if self.pos < start:
                self._advance(start - self.pos, None, 0, 0)

    def _locate(self) -> tuple[DenseChunk, int, int]:
        while self._chunk < 0 or self.pos >= self.table[self._chunk][2] + self.table[self._chunk][3]:
            self._chunk = next((i for i, c in enumerate(self.table) if c[2] <= self.pos < c[2] + c[3]), None)
            if self._chunk is None:
                raise DataError(f"shard {self.shard}: episode {self.episode_id}: no step {self.pos} "
                                "(index out of date, or a corrupt shard)")
            self._data = self.src.decode(self.shard, self.episode_id, self._chunk)
        _, _, cstart, csteps = self.table[self._chunk][:4]
        return self._data, self.pos - cstart, cstart + csteps - self.pos

    def read_into(self, out: dict[str, np.ndarray], row: int, col: int, n: int) -> None:
        self._advance(n, out, row, col)

    def _advance(self, n: int, out, row: int, col: int) -> None:
        """The next ``n`` steps into ``out`` rows (``None``: only advance, keeping the stack's history)."""
        while n > 0:
            chunk, i, avail = self._locate()
            m = min(n, avail)
            if self.k == 1:
                if out is not None:
                    chunk.read(out, row, col, i, m)
            else:
                if out is None:
                    lives = np.empty((1, m), self.src.schema[LIVES_FIELD].np_dtype)
                    chunk.read({LIVES_FIELD: lives}, 0, 0, i, m)
                    lives, dst = lives[0], None
                else:
                    chunk.read(out, row, col, i, m, skip=(FRAME_FIELD,))
                    lives, dst = out[LIVES_FIELD][row, col : col + m], out[FRAME_FIELD][row, col : col + m]
                if FRAME_FIELD not in chunk.dense:
                    raise DataError(f"shard {self.shard}: episode {self.episode_id}: frames stored sparse "
                                    "cannot be stacked (recode the dataset)")
                _, self.hist, self.prev_lives, self.run = stack_frames(
                    chunk.dense[FRAME_FIELD][i : i + m], lives, self.k, self.hist, self.prev_lives, self.run, dst)
            self.pos += m
            col += m
            n -= m


# ---- stage 4: assembling batches -----------------------------------------------------------------

class BatchPool:
    """Batch buffers, reused without ever overwriting a batch in use.

    A batch's arrays are views of one block of memory, made through a fresh base array each time the
    block is handed out. Every view, slice or tensor of a batch keeps that base array alive (numpy and
    torch keep the array memory came from), and the pool holds only a weak reference to it: a block is
    handed out again only once nothing of its last batch is left. Reuse saves the first-touch page
    faults of fresh multi-GB batches, which cost more than the decode; only each row's stale tail is
    re-zeroed. If every pooled block is in use, a batch gets fresh memory.
    """

    ALIGN = 64

    def __init__(self, layout: dict[str, tuple[tuple[int, ...], np.dtype]], size: int = 2):
        self.layout, self.size = layout, size
        self.offsets, n = {}, 0
        for name, (shape, dtype) in layout.items():
            self.offsets[name] = n
            n += -(-int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize // self.ALIGN) * self.ALIGN
        self.nbytes = max(n, 1)
        self.blocks: list[dict] = []  # {"memory", "ends", "base": weakref of the base array handed out last}

    def _new_block(self) -> dict:
        block = {"memory": mmap.mmap(-1, self.nbytes), "ends": None, "base": None}  # zeroed pages
        out = self._views(block)
        out["episode"][:] = -1
        block["ends"] = np.zeros(len(out["mask"]), np.int64)
        return block

    def _views(self, block: dict) -> dict[str, np.ndarray]:
        base = np.frombuffer(block["memory"], np.uint8)
        block["base"] = weakref.ref(base)
        out = {}
        for name, (shape, dtype) in self.layout.items():
            n = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
            out[name] = base[self.offsets[name] : self.offsets[name] + n].view(dtype).reshape(shape)
        return out

    def get(self) -> tuple[dict, np.ndarray]:
        """A batch's arrays (zero but for the stale tails ``ends`` records, and ``episode`` -1)."""
        for block in self.blocks:
            if block["base"] is None or block["base"]() is None:
                return self._views(block), block["ends"]
        block = self._new_block()
        if len(self.blocks) < self.size:
            self.blocks.append(block)
        return self._views(block), block["ends"]

    @staticmethod
    def clear_tails(out: dict, ends: np.ndarray, new_ends: np.ndarray) -> None:
        for row in np.flatnonzero(ends > new_ends):
            for name, arr in out.items():
                tail = arr[row, new_ends[row] : ends[row]]
                if name == "episode":
                    tail[:] = -1
                else:
                    kernels.stream_zero(tail)  # contiguous, and not read back soon
        ends[:] = new_ends


def batch_layout(schema, fields: list[str], B: int, T: int, frame_stack: int) -> dict[str, tuple]:
    """name -> (shape, dtype) of a batch's arrays."""
    out = {}
    for name in fields:
        f = schema[name]
        shape = (frame_stack, *f.shape) if name == FRAME_FIELD and frame_stack > 1 else f.shape
        out[name] = ((B, T, *shape), f.np_dtype)
    out["mask"] = ((B, T), np.dtype(bool))
    out["reset"] = ((B, T), np.dtype(bool))
    out["episode"] = ((B, T), np.dtype(np.int64))
    out["step"] = ((B, T), np.dtype(np.int64))
    return out


_malloc_tuned = False


def keep_freed_memory() -> None:
    """glibc only, once per process: serve allocations up to 32 MB (a chunk's decoded fields) from
    the heap and keep freed heap memory, so each decoded chunk reuses pages instead of page-faulting
    fresh ones (tty decode ~1.4-1.8x faster in ``bin/bench_loader.py``); peak memory is unchanged."""
    global _malloc_tuned
    if _malloc_tuned:
        return
    _malloc_tuned = True
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 32 << 20)  # M_MMAP_THRESHOLD (its maximum on 64-bit)
        libc.mallopt(-1, 1 << 30)  # M_TRIM_THRESHOLD
    except (OSError, AttributeError):
        pass


def _to_torch(batch: dict, pin: bool) -> dict:
    out = {}
    for k, v in batch.items():
        t = torch.from_numpy(v) if isinstance(v, np.ndarray) else torch.tensor(v)
        out[k] = t.pin_memory() if pin else t
    return out


def open_dataset(root):
    """The dataset at ``root``, or the pack (``trajdata pack``), whose episodes the readers re-simulate."""
    from trajdata.packs.store import Pack, is_pack

    return Pack(root) if is_pack(root) else Dataset(root)


class TrajectoryStream(IterableDataset):
    """``IterableDataset`` of dict batches shaped (B, T, ...); use with ``DataLoader(batch_size=None)``
    or ``make_dataloader``. Whole episodes go to each (rank, worker) slot; resumable."""

    def __init__(self, cfg: LoaderConfig):
        self.cfg = cfg
        self.ds = open_dataset(cfg.root)
        self.schema = self.ds.schema
        cfg.check_schema(self.schema)
        self.fields = list(cfg.fields) if cfg.fields is not None else list(self.schema.names)
        if cfg.frame_stack > 1:
            self.fields += [n for n in (FRAME_FIELD, LIVES_FIELD) if n not in self.fields]
        self.rows = select_episodes(self.ds.index_rows(), cfg)
        self.episode_ids = [r["id"] for r in self.rows]
        self.steps = [int(r["steps"]) for r in self.rows]
        self.epoch = 0
        self.delivered: dict[int, int] = {}
        self.slots: int | None = None
        self._resume: dict[int, int] = {}
        self.skipped: dict[str, str] = {}  # on_corrupt="skip": episode id -> why (this process's readers)
        self._skip_counts: dict[int, int] = {}  # slot -> episodes it reported skipped
        self._skipped_before = 0  # skipped before the state this loader resumed from

    @property
    def total_steps(self) -> int:
        return sum(self.steps)

    def set_epoch(self, epoch: int) -> None:
        """Start epoch ``epoch`` (its own shuffle); a completed pass advances the epoch by itself."""
        self.epoch, self.delivered, self._resume = epoch, {}, {}

    def rank_world(self) -> tuple[int, int]:
        """(rank, world size): the config's, else torch.distributed's, else (0, 1)."""
        if self.cfg.rank is not None or self.cfg.world_size is not None:
            rank, world = self.cfg.rank or 0, self.cfg.world_size or 1
        elif torch.distributed.is_available() and torch.distributed.is_initialized():
            rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
        else:
            rank, world = 0, 1
        if not 0 <= rank < world:
            raise ConfigError(f"rank {rank} is not in [0, world_size={world})")
        return rank, world

    def slot(self) -> tuple[int, int]:
        rank, world = self.rank_world()
        info = get_worker_info()
        workers, wid = (info.num_workers, info.id) if info else (1, 0)
        return rank * workers + wid, world * workers

    def plan(self, slot: int, slots: int) -> Iterator[list[list[tuple]]]:
        cfg = self.cfg
        mine = assign(self.steps, slots, cfg.seed, self.epoch, cfg.shuffle)[slot]
        if cfg.mode == "lanes":
            return lane_plan(mine, self.steps, cfg.batch_size, cfg.seq_len)
        rng = np.random.default_rng([cfg.seed, self.epoch, slot, 1]) if cfg.shuffle else None
        crops = window_plan(mine, self.steps, cfg.seq_len, rng)
        return window_batches(shuffle(crops, cfg.shuffle_buffer, rng), cfg.batch_size)

    def numpy_batches(self, slot: int, slots: int, skip: int = 0) -> Iterator[dict]:
        """The slot's batches as numpy dicts, after skipping ``skip`` already-delivered ones."""
        cfg = self.cfg
        if cfg.tune_malloc:
            keep_freed_memory()
        if getattr(self, "_src", None) is None:  # kept across epochs: its chunk tables cost a header read per chunk
            cache = cfg.cache_chunks if cfg.mode == "windows" else 0
            if isinstance(self.ds, Dataset):
                self._src = ChunkSource(Path(cfg.root), self.schema, self.fields, cache)
            else:
                from trajdata.loaders.pack import PackSource

                self._src = PackSource(self.ds, self.schema, self.fields, cache)
        src = self._src
        readers: dict[int, EpisodeReader] = {}  # lanes: row -> reader of its current episode
        if getattr(self, "_pool", None) is None:
            self._pool = BatchPool(batch_layout(self.schema, self.fields, cfg.batch_size, cfg.seq_len, cfg.frame_stack))
        pool = self._pool
        plan = self.plan(slot, slots)
        if cfg.even_batches and slots > 1:
            most = max(sum(1 for _ in self.plan(s, slots)) for s in range(slots))
            plan = itertools.chain(plan, itertools.repeat([[] for _ in range(cfg.batch_size)]))
            plan = itertools.islice(plan, most)
        try:
            for b, batch in enumerate(plan):
                if b < skip:
                    continue
                out, ends = pool.get()
                pool.clear_tails(out, ends, np.array([max((c + n for _, _, n, c in segs), default=0) for segs in batch]))
                out["reset"][:] = False
                for row, segs in enumerate(batch):
                    for e, start, n, col in segs:
                        if self.episode_ids[e] in self.skipped:
                            self._pad(out, row, col, n)
                            continue
                        try:
                            r = readers.get(row)
                            if r is None or r.episode_id != self.episode_ids[e] or r.pos != start:
                                r = readers[row] = EpisodeReader(src, self.rows[e]["shard"], self.episode_ids[e],
                                                                 start, cfg.frame_stack, self.steps[e])
                            r.read_into(out, row, col, n)
                        except DataError as err:
                            if cfg.on_corrupt == "raise":
                                raise
                            readers.pop(row, None)
                            self._skip(e, err)
                            self._pad(out, row, col, n)
                            continue
                        out["mask"][row, col : col + n] = True
                        out["episode"][row, col : col + n] = e
                        out["step"][row, col : col + n] = np.arange(start, start + n)
                        if start == 0:
                            out["reset"][row, col] = True
                    if cfg.mode == "windows":
                        readers.pop(row, None)
                yield dict(out, slot=np.int64(slot), batch_index=np.int64(b),
                           corrupt_skipped=np.int64(len(self.skipped)))
                del out
        finally:
            src.close()

    def _skip(self, e: int, err: DataError) -> None:
        """``on_corrupt="skip"``: episode ``e`` is corrupt; warn (once) and count it."""
        eid = self.episode_ids[e]
        if eid not in self.skipped:
            self.skipped[eid] = str(err)
            warnings.warn(f"trajdata loader: skipping corrupt episode {eid} ({self.rows[e]['shard']}, "
                          f"{self.steps[e]} steps; its steps not yet delivered become padding): {err}",
                          CorruptDataWarning, stacklevel=2)

    def _pad(self, out: dict, row: int, col: int, n: int) -> None:
        """Rows ``col:col+n`` of batch row ``row`` as padding (mask False, zeros): a skipped episode's
        place in the plan, so the batch count (and every DDP rank's) is unchanged."""
        for name, arr in out.items():
            arr[row, col : col + n] = -1 if name == "episode" else 0

    @property
    def corrupt_skipped(self) -> int:
        """Episodes skipped as corrupt (``on_corrupt="skip"``) since the run began: before the state it
        resumed from (an episode met again after a resume counts again), then in this process's
        readers or, with workers, as their batches reported (the largest count each slot reported)."""
        return self._skipped_before + max(len(self.skipped), sum(self._skip_counts.values()))

    def __iter__(self) -> Iterator[dict]:
        slot, slots = self.slot()
        if self._resume and self.slots not in (None, slots):
            raise ConfigError(f"cannot resume: state was saved with {self.slots} rank x worker slots, now {slots}")
        self.slots = slots
        pin = self.cfg.pin_memory and get_worker_info() is None and torch.cuda.is_available()
        for batch in self.numpy_batches(slot, slots, self._resume.get(slot, 0)):
            batch = _to_torch(batch, pin)
            if get_worker_info() is None:
                self.observe(batch)
            yield batch
        if get_worker_info() is None:
            self.set_epoch(self.epoch + 1)

    def observe(self, batch: dict) -> None:
        """Record that a batch reached the consumer (``make_dataloader`` calls this for worker batches)."""
        self.delivered[int(batch["slot"])] = int(batch["batch_index"]) + 1
        if "corrupt_skipped" in batch:
            slot = int(batch["slot"])
            self._skip_counts[slot] = max(self._skip_counts.get(slot, 0), int(batch["corrupt_skipped"]))

    def state_dict(self) -> dict:
        done = dict(self._resume)
        done.update(self.delivered)
        return {"epoch": self.epoch, "slots": self.slots, "delivered": done, "config": asdict(self.cfg),
                "corrupt_skipped": self.corrupt_skipped}

    def load_state_dict(self, state: dict) -> None:
        """Continue from ``state_dict()``'s position: same epoch, each slot after its delivered batches.
        The saved config must order batches as this one does (else ``ConfigError`` naming the field
        that differs), and the corrupt-episode count carries on."""
        saved = state.get("config") or {}
        now = asdict(self.cfg)
        for k in ORDER_FIELDS:
            if k in saved and _jsonish(saved[k]) != _jsonish(now[k]):
                raise ConfigError(f"cannot resume: the loader state was saved with {k}={saved[k]!r}, not {now[k]!r}",
                                  field=k)
        self.epoch = state["epoch"]
        self.slots = state["slots"]
        self._resume = {int(k): int(v) for k, v in state["delivered"].items()}
        self.delivered = dict(self._resume)
        self._skipped_before = int(state.get("corrupt_skipped") or 0)


class StreamLoader:
    """A ``DataLoader`` over a ``TrajectoryStream`` that keeps its resume state in the main process."""

    def __init__(self, dataset: TrajectoryStream, num_workers: int = 0, **kwargs):
        self.dataset, self.num_workers = dataset, num_workers
        self.loader = DataLoader(dataset, batch_size=None, num_workers=num_workers,
                                 pin_memory=dataset.cfg.pin_memory and torch.cuda.is_available(), **kwargs)

    def __iter__(self) -> Iterator[dict]:
        rank, world = self.dataset.rank_world()
        slots = world * max(1, self.num_workers)
        if self.dataset._resume and self.dataset.slots not in (None, slots):
            raise ConfigError(f"cannot resume: state was saved with {self.dataset.slots} rank x worker slots, now {slots}")
        self.dataset.slots = slots
        for batch in self.loader:
            if self.num_workers:
                self.dataset.observe(batch)
            yield batch
        if self.num_workers:
            self.dataset.set_epoch(self.dataset.epoch + 1)

    def set_epoch(self, epoch: int) -> None:
        self.dataset.set_epoch(epoch)

    @property
    def corrupt_skipped(self) -> int:
        """Episodes skipped as corrupt so far (``on_corrupt="skip"``), across workers."""
        return self.dataset.corrupt_skipped

    def state_dict(self) -> dict:
        return self.dataset.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.dataset.load_state_dict(state)


def make_dataloader(cfg: LoaderConfig, num_workers: int = 0, **kwargs) -> StreamLoader:
    """Streaming loader with ``num_workers`` processes; ``state_dict()`` resumes mid-epoch."""
    return StreamLoader(TrajectoryStream(cfg), num_workers, **kwargs)
