"""Golden chunks: checked-in shards (every codec profile; NetHack and Atari) decode to checked-in digests, and
re-encoding what they hold gives the same headers and the same stored (decompressed) bytes. A refactor
that changes the on-disk format or what it decodes to fails here; regenerate only on purpose
(``python bin/make_golden.py``)."""
from __future__ import annotations

import hashlib
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest

from trajdata.format import codec
from trajdata.format.dataset import Dataset
from trajdata.format.schema import get_schema
from trajdata.format.shard import CHUNK_EXT

GOLDEN = Path(__file__).parent / "data" / "golden"
DIGESTS = json.loads((GOLDEN / "digests.json").read_text())
NAMES = sorted(DIGESTS)
STORAGE_KEYS = ("offset", "nbytes", "crc32")  # depend on zstd's exact output, not on the format


def _digest(a: np.ndarray) -> str:
    a = np.ascontiguousarray(a)
    return f"{a.dtype.str}{list(a.shape)}:{hashlib.sha256(a.tobytes()).hexdigest()}"


def _chunks(path: Path):
    with tarfile.open(path) as tar:
        for m in tar.getmembers():
            if m.name.endswith("." + CHUNK_EXT):
                yield m.name, tar.extractfile(m).read()


def _layout(header: dict) -> dict:
    return {k: v for k, v in header.items() if k != "fields"} | {
        "fields": {f: {p: {k: v for k, v in e.items() if k not in STORAGE_KEYS} for p, e in parts.items()}
                   for f, parts in header["fields"].items()}}


def _stored(header: dict, payload) -> dict:
    """field -> decompressed bytes of each of its frames (the format's content, independent of zstd's version)."""
    out = {}
    for name, parts in header["fields"].items():
        out[name] = [codec._frame(payload, e, name, "golden") for e in parts.values() if "offset" in e]
    return out


def test_golden_set_is_complete():
    assert NAMES == [f"{env}-{p}" for env in ("atari", "nethack") for p in sorted(codec.PROFILES)]


@pytest.mark.parametrize("name", NAMES)
def test_decodes_to_checked_in_digests(name):
    ds = Dataset(GOLDEN / name)
    got = {}
    for row in ds.index_rows():
        chunks = list(ds.episode(row["id"]))
        assert len(chunks) > 1  # several chunks per episode, the last one partial
        got[row["id"]] = {f: _digest(np.concatenate([c.fields[f] for c in chunks])) for f in ds.schema.names}
    assert got == DIGESTS[name]


@pytest.mark.parametrize("env", ["atari", "nethack"])
def test_every_profile_holds_the_same_data(env):
    assert len({json.dumps(DIGESTS[f"{env}-{p}"], sort_keys=True) for p in codec.PROFILES}) == 1


@pytest.mark.parametrize("name", NAMES)
def test_reencoding_gives_the_same_chunks(name):
    profile = name.split("-", 1)[1]
    n = 0
    for path in sorted((GOLDEN / name / "shards").glob("*.tar")):
        for member, blob in _chunks(path):
            header, start = codec.read_header(blob, member)
            schema = get_schema(header["schema"])
            arrays = codec.decode_chunk(schema, header, memoryview(blob)[start:], None, where=member)
            meta = {k: v for k, v in header.items() if k not in ("steps", "schema", "schema_version", "fields")}
            again = codec.encode_chunk(schema, arrays, meta, profile=profile)
            header2, start2 = codec.read_header(again, member)
            assert _layout(header2) == _layout(header), member
            assert _stored(header2, memoryview(again)[start2:]) == _stored(header, memoryview(blob)[start:]), member
            n += 1
    assert n >= 4


def test_a_changed_byte_is_noticed(tmp_path):
    """The digests can fail: one flipped pixel of a decoded frame changes its digest."""
    ds = Dataset(GOLDEN / "atari-stream")
    row = ds.index_rows()[0]
    frames = np.concatenate([c.fields["frame"] for c in ds.episode(row["id"])])
    assert _digest(frames) == DIGESTS["atari-stream"][row["id"]]["frame"]
    frames[3, 10, 10] ^= 1
    assert _digest(frames) != DIGESTS["atari-stream"][row["id"]]["frame"]
