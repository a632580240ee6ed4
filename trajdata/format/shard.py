"""Shards: webdataset-compatible tar files of episode chunks.

Each tar member is one chunk, named ``<episode_id>-c<chunk>.tdc`` (a webdataset sample with key
``<episode_id>-c<chunk>`` and one ``tdc`` entry). A chunk blob (see ``codec``) holds every field of up
to ``chunk_steps`` consecutive steps; the last chunk of an episode carries the episode's index row
under ``"episode"``. Writers stream: at most one chunk of steps is held in memory.

A shard is written to ``<name>.tmp``, fsynced and atomically renamed, so readers never see a
partial shard.
"""
from __future__ import annotations

import os
import re
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from trajdata.errors import DataError, write_error
from trajdata.format import codec
from trajdata.format.schema import Schema, get_schema, SCHEMA_VERSION

DEFAULT_CHUNK_STEPS = 4096
CHUNK_EXT = "tdc"
# Episode columns that depend on the wall clock, not on what was played: kept out of the shard bytes
# (so the same command writes the same shards) and carried in the index only (``build_index``).
# Shards of older trajdata versions still carry them in their headers, and are read as before.
WALL_CLOCK_FIELDS = ("wall_seconds", "collection_date")
TAR_MTIME = 0  # every member's mtime: tar headers hold no wall-clock time either (uid/gid 0, no names)


def _no_wall_clock(d: dict | None) -> dict | None:
    return None if d is None else {k: v for k, v in d.items() if k not in WALL_CLOCK_FIELDS}


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


_spare_buffers: dict[tuple, list[dict]] = {}  # (schema, chunk_steps) -> chunk buffers of closed episodes


def _spare(schema: Schema, n: int) -> list[dict[str, np.ndarray]]:
    return _spare_buffers.setdefault((schema.name, schema.version, n), [])


def _chunk_buffers(schema: Schema, n: int) -> dict[str, np.ndarray]:
    """Reuses a closed episode's buffers: a fresh ~70 MB NetHack chunk buffer costs page faults on
    every step it is first written at."""
    spare = _spare(schema, n)
    return spare.pop() if spare else {f.name: np.zeros((n, *f.shape), f.np_dtype) for f in schema.fields}


class EpisodeWriter:
    """Buffers steps of one episode and writes them out chunk by chunk."""

    def __init__(self, shard: "ShardWriter", episode_id: str, meta: dict):
        self.shard, self.episode_id, self.meta = shard, episode_id, dict(meta)
        self.buffers = _chunk_buffers(shard.schema, shard.chunk_steps)
        self.steps = 0
        self.chunks = 0
        self._fill = 0
        self.closed = False

    def append(self, fields: dict, action=None) -> None:
        """Copy one step's fields (observation + action, which may be passed apart; reward/done
        default 0/False) into the buffer."""
        if self._fill == self.shard.chunk_steps:
            self._flush(last=False)
        i = self._fill
        for name, buf in self.buffers.items():
            v = action if action is not None and name == "action" else fields.get(name)
            if v is None:
                if name not in ("reward", "done"):
                    raise KeyError(f"step is missing field {name!r}")
                v = 0
            buf[i] = v
        self._fill += 1
        self.steps += 1

    def extend(self, arrays: dict[str, np.ndarray]) -> None:
        """Append every step of ``arrays`` (each field's (n, ...) array), as ``append`` would one by one."""
        n, i = len(arrays["action"]), 0
        while i < n:
            if self._fill == self.shard.chunk_steps:
                self._flush(last=False)
            m = min(n - i, self.shard.chunk_steps - self._fill)
            for name, buf in self.buffers.items():
                buf[self._fill : self._fill + m] = arrays[name][i : i + m]
            self._fill += m
            self.steps += m
            i += m

    def set_outcome(self, reward: float, done: bool) -> None:
        """Set reward/done of the most recent step (known only after the env stepped)."""
        self.buffers["reward"][self._fill - 1] = reward
        self.buffers["done"][self._fill - 1] = done

    def last(self, name: str) -> np.ndarray:
        """The most recently appended step's value of ``name``."""
        return self.buffers[name][self._fill - 1]

    def _flush(self, last: bool, episode_row: dict | None = None) -> None:
        n = self._fill
        meta = {"episode_id": self.episode_id, "chunk": self.chunks, "start": self.steps - n, "last": last}
        if self.chunks == 0:
            meta["episode_meta"] = _no_wall_clock(self.meta)
        if last:
            meta["episode"] = _no_wall_clock(episode_row)
        blob = codec.encode_chunk(self.shard.schema, {k: v[:n] for k, v in self.buffers.items()}, meta,
                                  profile=self.shard.profile)
        self.shard.add_chunk(self.episode_id, self.chunks, blob)
        self.chunks += 1
        self._fill = 0

    def close(self, summary: dict) -> dict:
        """Write the remaining steps with the episode's index row (``meta`` + ``summary``); returns the row."""
        row = dict(self.meta, **summary, id=self.episode_id, steps=self.steps, chunks=self.chunks + 1)
        self._flush(last=True, episode_row=row)
        self.closed = True
        spare = _spare(self.shard.schema, self.shard.chunk_steps)
        if not spare:  # one spare set is enough: a process writes one episode at a time
            spare.append(self.buffers)
        self.buffers = {}
        return row


class ShardWriter:
    """Context manager writing one shard atomically; an exception inside discards the partial file."""

    def __init__(self, path: str | os.PathLike, schema: Schema, chunk_steps: int = DEFAULT_CHUNK_STEPS,
                 profile: str = codec.DEFAULT_PROFILE, before_commit=None):
        self.path = Path(path)
        self.before_commit = before_commit  # called just before the rename; raising discards the shard
        self.profile = profile
        self.tmp = self.path.with_name(self.path.name + ".tmp")
        self.schema, self.chunk_steps = schema, chunk_steps
        self.rows: list[dict] = []
        self.bytes_written = 0

    def __enter__(self) -> "ShardWriter":
        try:
            self._f = open(self.tmp, "wb")
        except OSError as e:
            raise write_error(e, self.path) from None
        return self

    def episode(self, episode_id: str, meta: dict) -> EpisodeWriter:
        if "." in episode_id or "/" in episode_id:
            raise ValueError(f"episode id {episode_id!r} must not contain '.' or '/'")
        return EpisodeWriter(self, episode_id, meta)

    def add_chunk(self, episode_id: str, index: int, blob: bytes) -> None:
        """Append chunk ``index`` of episode ``episode_id``, already encoded (``codec.encode_chunk``)."""
        info = tarfile.TarInfo(f"{episode_id}-c{index:05d}.{CHUNK_EXT}")
        info.size, info.mtime, info.mode = len(blob), TAR_MTIME, 0o644
        info.uid = info.gid = 0
        info.uname = info.gname = ""
        pad = -len(blob) % tarfile.BLOCKSIZE
        try:
            self._f.write(info.tobuf(tarfile.USTAR_FORMAT) + blob + tarfile.NUL * pad)
        except OSError as e:
            raise write_error(e, self.path) from None
        self.bytes_written += len(blob)

    def add_episode_row(self, row: dict) -> None:
        self.rows.append(row)

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self._discard()
            return
        try:
            try:
                self._f.write(tarfile.NUL * (2 * tarfile.BLOCKSIZE))  # end of archive, without tarfile's 10 KiB record padding
                self._f.flush()
                os.fsync(self._f.fileno())
                self._f.close()
            except OSError as e:
                raise write_error(e, self.path) from None
            if self.before_commit is not None:
                self.before_commit()
        except BaseException:
            self._discard()
            raise
        os.replace(self.tmp, self.path)
        _fsync_dir(self.path.parent)

    def _discard(self) -> None:
        """Close and remove the partial file (a close that fails to flush, e.g. on a full disk, is ignored)."""
        try:
            self._f.close()
        except OSError:
            pass
        self.tmp.unlink(missing_ok=True)


def tar_members(f, shard: str) -> Iterator[tarfile.TarInfo]:
    """The chunk members of the open shard file ``f``, in order. tarfile alone ends the archive
    silently at a corrupt or truncated member header; here anything but the end-of-archive marker
    (zero blocks to the end of the file) after the last member is a DataError."""
    try:
        tar = tarfile.open(fileobj=f, mode="r:")
        while True:
            m = tar.next()
            if m is None:
                break
            if not m.isfile() or not m.name.endswith("." + CHUNK_EXT):
                continue
            yield m
        end = tar.offset
    except (tarfile.TarError, EOFError) as e:
        raise DataError(f"shard {shard}: truncated or not a tar file ({e})") from None
    f.seek(end)
    rest = f.read()
    if len(rest) < 2 * tarfile.BLOCKSIZE or rest.count(0) != len(rest):
        what = "no end-of-archive marker (truncated)" if not rest.strip(b"\0") else "corrupt member header"
        raise DataError(f"shard {shard}: {what} at byte {end}")


_MEMBER = re.compile(r"(?:.*/)?(.+)-c(\d+)\." + CHUNK_EXT)


def member_name(member: str) -> tuple[str, int] | None:
    """(episode id, chunk) a member's name ``<episode>-c<chunk>.tdc`` says it holds."""
    m = _MEMBER.fullmatch(member)
    return (m.group(1), int(m.group(2))) if m else None


def member_where(member: str) -> str:
    named = member_name(member)
    return f"episode {named[0]} chunk {named[1]}" if named else f"chunk {member}"


def chunk_header(blob: bytes, shard: str, member: str) -> tuple[dict, int]:
    """A chunk's header and payload start, checked against its member name ``<episode>-c<chunk>.tdc``."""
    where = f"shard {shard}: {member_where(member)}"
    header, start = codec.read_header(blob, where)
    if not isinstance(header, dict):
        raise DataError(f"{where}: chunk header is not an object (corrupt data)")
    if header.get("schema_version") != SCHEMA_VERSION:
        raise DataError(
            f"{where}: schema version {header.get('schema_version')!r} is not supported (this trajdata reads {SCHEMA_VERSION!r})"
        )
    try:
        name = f"{header['episode_id']}-c{header['chunk']:05d}.{CHUNK_EXT}"
        ok = (isinstance(header["steps"], int) and isinstance(header["start"], int) and isinstance(header["last"], bool)
              and isinstance(header["fields"], dict) and isinstance(header["schema"], str))
    except (KeyError, TypeError, ValueError):
        name, ok = None, False
    if not ok:
        raise DataError(f"{where}: chunk header lacks episode_id/chunk/start/steps/last/schema/fields (corrupt data)")
    if name != member.rpartition("/")[2]:
        raise DataError(f"{where}: header says episode {header['episode_id']} chunk {header['chunk']} (corrupt data)")
    return header, start


@dataclass
class Chunk:
    shard: str
    episode_id: str
    index: int
    start: int
    steps: int
    last: bool
    header: dict
    fields: dict[str, np.ndarray]


class ShardReader:
    """Streams the chunks of one shard, decoding only the requested fields."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.is_file():
            raise DataError(f"shard {self.path} does not exist")

    def _members(self, f) -> Iterator[tuple[tarfile.TarInfo, int]]:
        for m in tar_members(f, self.path.name):
            yield m, m.offset_data

    def headers(self) -> Iterator[dict]:
        """Chunk headers only (cheap: reads a few KB per chunk)."""
        with open(self.path, "rb") as f:
            for m, off in self._members(f):
                f.seek(off)
                prefix = f.read(min(m.size, 1 << 16))
                header, _ = self._header(prefix, m)
                yield header

    def _header(self, blob: bytes, m: tarfile.TarInfo) -> tuple[dict, int]:
        return chunk_header(blob, self.path.name, m.name)

    def chunks(self, fields=None, episode_id: str | None = None) -> Iterator[Chunk]:
        """Decoded chunks in file order (of one episode if ``episode_id``); ``fields=None`` decodes
        all, ``[]`` none."""
        with open(self.path, "rb") as f:
            for m, off in self._members(f):
                f.seek(off)
                blob = f.read(m.size)
                where = f"shard {self.path.name}: chunk {m.name}"
                if len(blob) != m.size:
                    raise DataError(f"{where}: truncated ({len(blob)} of {m.size} bytes)")
                header, start = self._header(blob, m)
                if episode_id is not None and header["episode_id"] != episode_id:
                    continue
                where = f"shard {self.path.name}: episode {header['episode_id']} chunk {header['chunk']}"
                schema = get_schema(header["schema"])
                data = codec.decode_chunk(schema, header, memoryview(blob)[start:], fields, where=where)
                yield Chunk(
                    self.path.name, header["episode_id"], header["chunk"], header["start"], header["steps"],
                    header["last"], header, data,
                )

    def episode_rows(self) -> list[dict]:
        """Index rows of the episodes in this shard, from chunk headers, checking chunk order."""
        rows, expect = [], {}
        for h in self.headers():
            eid = h["episode_id"]
            if h["chunk"] != expect.get(eid, 0):
                raise DataError(f"shard {self.path.name}: episode {eid}: chunk {h['chunk']} out of order")
            expect[eid] = h["chunk"] + 1
            if h["last"]:
                if not isinstance(h.get("episode"), dict) or h["episode"].get("id") != eid:
                    raise DataError(f"shard {self.path.name}: episode {eid}: final chunk has no episode row (corrupt data)")
                rows.append(dict(h["episode"], shard=self.path.name))
                del expect[eid]
        if expect:
            raise DataError(f"shard {self.path.name}: episode {next(iter(expect))} has no final chunk")
        return rows
