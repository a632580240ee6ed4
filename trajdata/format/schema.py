"""Every stored field, named once: name, dtype, per-step shape, description.

A step row holds the observation the agent acted on, the action it took, and the reward and done
flag that action produced. The observation after the final action is not stored (as in NLD).
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np

SCHEMA_VERSION = 1


@dataclass(frozen=True)
class Field:
    name: str
    dtype: str
    shape: tuple[int, ...]
    description: str

    @cached_property
    def np_dtype(self) -> np.dtype:
        return np.dtype(self.dtype)

    @property
    def step_nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * self.np_dtype.itemsize


@dataclass(frozen=True)
class Schema:
    name: str
    fields: tuple[Field, ...]
    version: int = SCHEMA_VERSION

    def __getitem__(self, name: str) -> Field:
        try:
            return self._by_name[name]
        except KeyError:
            raise KeyError(f"schema {self.name!r} has no field {name!r}") from None

    @cached_property
    def _by_name(self) -> dict[str, Field]:
        return {f.name: f for f in self.fields}

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(f.name for f in self.fields)

    @property
    def observation_names(self) -> tuple[str, ...]:
        return tuple(n for n in self.names if n not in STEP_OUTCOME_FIELDS)

    @property
    def step_nbytes(self) -> int:
        return sum(f.step_nbytes for f in self.fields)


STEP_OUTCOME_FIELDS = ("action", "reward", "done")

_OUTCOME = (
    Field("action", "uint8", (), "index of the action taken in this step (expert's action set)"),
    Field("reward", "float32", (), "reward received for this step's action"),
    Field("done", "bool", (), "the episode ended after this step's action"),
)

NETHACK = Schema(
    "nethack",
    (
        Field("tty_chars", "uint8", (24, 80), "terminal characters"),
        Field("tty_colors", "int8", (24, 80), "terminal colours"),
        Field("tty_cursor", "uint8", (2,), "terminal cursor (row, col)"),
        Field("glyphs", "int16", (21, 79), "dungeon glyph ids"),
        Field("chars", "uint8", (21, 79), "dungeon map characters"),
        Field("colors", "uint8", (21, 79), "dungeon map colours"),
        Field("specials", "uint8", (21, 79), "dungeon map glyph flags"),
        Field("blstats", "int64", (27,), "bottom-line statistics (nle.nethack.NLE_BL_*)"),
        Field("message", "uint8", (256,), "top-line message bytes"),
        Field("inv_glyphs", "int16", (55,), "inventory item glyphs"),
        Field("inv_letters", "uint8", (55,), "inventory letters"),
        Field("inv_oclasses", "uint8", (55,), "inventory object classes"),
        Field("inv_strs", "uint8", (55, 80), "inventory item descriptions"),
        Field("misc", "int32", (3,), "in yn-question, in getlin, waiting for space"),
    )
    + _OUTCOME,
)

ATARI = Schema(
    "atari",
    (
        Field("frame", "uint8", (84, 84), "84x84 grayscale frame (single; stacking is the loader's job)"),
        Field("lives", "uint8", (), "lives left"),
    )
    + _OUTCOME,
)

NLD = Schema(
    "nld",
    tuple(NETHACK[n] for n in ("tty_chars", "tty_colors", "tty_cursor"))
    + (
        Field("timestamp", "int64", (), "ttyrec frame timestamp (as nle.dataset reports it)"),
        Field("keypress", "uint8", (), "key pressed after this frame (ttyrec v2+; 0 if unknown)"),
        Field("score", "int32", (), "in-game score at this frame (ttyrec v3; 0 if unknown)"),
    )
    + _OUTCOME,
)

SCHEMAS: dict[str, Schema] = {s.name: s for s in (NETHACK, ATARI, NLD)}

TTY_FIELDS = ("tty_chars", "tty_colors", "tty_cursor")


def get_schema(name: str) -> Schema:
    from trajdata.errors import DataError

    try:
        return SCHEMAS[name]
    except KeyError:
        raise DataError(f"unknown schema {name!r} (known: {', '.join(SCHEMAS)})") from None
