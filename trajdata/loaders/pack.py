"""Streaming straight from a pack: the loader's readers get each episode's chunks by re-simulating it
in the process that reads it (the main process, or each DataLoader worker), every step checked
against the pack (``packs.replay.replay_chunks``). Batches equal those of the unpacked dataset.

An episode read in step order (lanes mode) is simulated once; a read that goes back in an episode
(windows mode, resuming mid-episode) re-simulates it from its start, so windows mode is slow on a
pack (``cache_chunks`` keeps recent chunks).
"""
from __future__ import annotations

from collections import OrderedDict

from trajdata.errors import DataError
from trajdata.loaders.chunks import ChunkCache, DenseChunk
from trajdata.packs.replay import EnvPool, replay_chunks, version_note
from trajdata.packs.store import Pack

MAX_LIVE = 256  # episodes simulated at once (each holds an env): more than any batch's lanes


class PackSource:
    """``ChunkSource``'s interface over a pack: chunk tables from its headers, chunks by re-simulation."""

    def __init__(self, pack: Pack, schema, fields: list[str], cache_chunks: int = 0):
        self.pack, self.schema, self.fields = pack, schema, fields
        self.pool = EnvPool()
        self.note = version_note(pack.info.get("versions") or {}, schema.name)
        self._shards: dict[str, tuple[dict, dict]] = {}
        self._live: OrderedDict = OrderedDict()  # (shard, episode) -> [chunk generator, next chunk]
        self._cache = ChunkCache(cache_chunks)

    def _episode(self, shard: str, episode_id: str):
        if shard not in self._shards:
            header, eps = self.pack.read_shard(shard)
            self._shards[shard] = (header, {e.id: e for e in eps})
            while len(self._shards) > 64:
                self._shards.pop(next(iter(self._shards)))
        header, eps = self._shards[shard]
        if episode_id not in eps:
            raise DataError(f"pack {self.pack.root}: shard {shard} has no episode {episode_id!r}")
        return header, eps[episode_id]

    def chunks(self, shard: str, episode_id: str, steps: int | None = None) -> list[tuple]:
        """(None, None, start, steps, chunk, last) of the episode's chunks."""
        header, ep = self._episode(shard, episode_id)
        if steps is not None and steps != ep.steps:
            raise DataError(f"pack {self.pack.root}: episode {episode_id}: {ep.steps} steps packed, the index says {steps}")
        C = header["chunk_steps"]
        starts = list(range(0, ep.steps, C)) or [0]
        return [(None, None, s, min(C, ep.steps - s), k, k == len(starts) - 1) for k, s in enumerate(starts)]

    def decode(self, shard: str, episode_id: str, k: int) -> DenseChunk:
        key = (shard, episode_id, k)
        cached = self._cache.get(key)
        if cached is not None:
            return cached
        header, ep = self._episode(shard, episode_id)
        live = self._live.pop((shard, episode_id), None)
        if live is None or live[1] > k:
            if live is not None:
                live[0].close()
            gen = replay_chunks(self.pool, self.schema, ep, header["chunk_steps"], f"pack {self.pack.root}", self.note,
                                bits=header["check_bits"])
            live = [gen, 0]
        try:
            while live[1] < k:
                next(live[0])
                live[1] += 1
            arrays = next(live[0])
            live[1] += 1
        except BaseException:
            live[0].close()
            raise
        if live[1] < ep.chunks:
            self._live[(shard, episode_id)] = live
            while len(self._live) > MAX_LIVE:
                self._live.popitem(last=False)[1][0].close()
        else:
            live[0].close()
        chunk = DenseChunk({n: arrays[n] for n in self.fields})
        return self._cache.put(key, chunk)

    def close(self) -> None:
        for gen, _ in self._live.values():
            gen.close()
        self._live.clear()
        self.pool.close()
