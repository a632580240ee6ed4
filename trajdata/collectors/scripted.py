"""Built-in scripted NetHack expert: dependency-free (nle only), simple and fast.

Strategy, one decision per step, first rule that fires wins:

1. Prompts: ``--More--`` -> Enter; menus and other waits -> Esc; yes/no, item and direction
   questions -> the answer for what it is doing (eat, pray, kick, engrave), otherwise Esc.
   "Really attack?" -> Esc, and that monster glyph counts as peaceful on this level until one hurts us.
2. Survival: pray when HP is low or weak from hunger (at most once per ~800 turns); when hurt
   with a hostile adjacent, engrave Elbereth in the dust and rest on it; eat fresh safe corpses of
   our kills and food from inventory; rest (search in place) when hurt and nothing hostile is near.
3. Fight: attack an adjacent monster that is not a pet, not known peaceful, and not one that hurts
   its attacker (floating eye, jellies, molds, acid blob, gas spore; those are walked around);
   wizards cast force bolt at it while they have the power.
4. Descend: standing on a known '>' -> press '>' (if the character's level is not too far behind
   the depth; stairs into the Gnomish Mines are climbed back and avoided).
5. Move: breadth-first search over the remembered map (open doors orthogonal only, traps, water and
   boulders avoided) to the down staircase if known, else to the nearest frontier (a walkable square
   next to stone that has never been adjacent to us), else to the best spot to search for hidden
   passages (dead ends first); locked doors are kicked. Paths are cached until they go stale.
6. Fallback: a random move. The same action on an unchanged screen is never sent more than
   ``max_repeats`` times in a row, and a goal that takes too long is dropped for a while.
"""

from __future__ import annotations

import random
import re
from collections import deque
from dataclasses import dataclass

import numpy as np
from nle import nethack as nh

ROWS, COLS = nh.DUNGEON_SHAPE
N_CELLS = ROWS * COLS

_KEY_TO_ACTION: dict[int, int] = {}
for _i, _a in enumerate(nh.ACTIONS):
    _KEY_TO_ACTION.setdefault(int(_a), _i)

MOVES = tuple(range(8))  # k l j h u n b y
MOVE_DELTAS = ((-1, 0), (0, 1), (1, 0), (0, -1), (-1, 1), (1, 1), (1, -1), (-1, -1))
RETURN = _KEY_TO_ACTION[ord("\r")]
ESC = _KEY_TO_ACTION[27]
DOWN = _KEY_TO_ACTION[ord(">")]
UP = _KEY_TO_ACTION[ord("<")]
SEARCH = _KEY_TO_ACTION[ord("s")]
EAT = _KEY_TO_ACTION[ord("e")]
KICK = _KEY_TO_ACTION[4]
PRAY = _KEY_TO_ACTION[ord("p") | 0x80]
YES = _KEY_TO_ACTION[ord("y")]
ENGRAVE = _KEY_TO_ACTION[ord("E")]
CAST = _KEY_TO_ACTION[ord("Z")]
SPELL_A = _KEY_TO_ACTION[ord("a")]
FINGERS = _KEY_TO_ACTION[ord("-")]
ELBERETH = [_KEY_TO_ACTION[c] for c in b"Elbereth"]
NO = _KEY_TO_ACTION[ord("n")]

# Glyph categories.
STONE, FLOOR, DOOR, WALL, AVOID, MONSTER, PET, DOWNSTAIR, OTHER = range(9)


def _glyph_table() -> np.ndarray:
    walls = set(range(1, 12)) | {17, 18, 37, 38}  # walls, iron bars, tree, raised drawbridge
    doors = {13, 14, 15, 16}  # open and closed doors: no diagonal moves in or out
    avoid = {32, 34, 41}  # water, lava
    boulder = nh.GLYPH_OBJ_OFF + [
        i for i in range(nh.NUM_OBJECTS) if nh.OBJ_NAME(nh.objclass(i)) == "boulder"
    ][0]
    lut = np.full(nh.MAX_GLYPH + 1, OTHER, np.uint8)
    for g in range(nh.MAX_GLYPH):
        if nh.glyph_is_pet(g):
            lut[g] = PET
        elif nh.glyph_is_monster(g) or nh.glyph_is_invisible(g):
            lut[g] = MONSTER
        elif g == boulder or nh.glyph_is_statue(g):
            lut[g] = AVOID
        elif nh.glyph_is_trap(g):
            lut[g] = AVOID
        elif nh.glyph_is_cmap(g):
            c = nh.glyph_to_cmap(g)
            lut[g] = (
                STONE if c == 0 else WALL if c in walls else DOOR if c in doors
                else AVOID if c in avoid else DOWNSTAIR if c in (24, 26)
                else FLOOR if c < 42 else OTHER
            )
        elif nh.glyph_is_object(g):
            lut[g] = FLOOR
    return lut


GLYPH_CAT = _glyph_table()
PASSABLE = np.zeros(16, bool)
PASSABLE[[FLOOR, DOOR, MONSTER, PET, DOWNSTAIR, OTHER]] = True
NEVER_ATTACK = {  # passive damage or explodes; none of them chase us
    nh.GLYPH_MON_OFF + i for i in range(nh.NUMMONS)
    if nh.permonst(i).mname in ("floating eye", "gas spore", "acid blob", "blue jelly", "spotted jelly",
                                "ochre jelly", "brown mold", "yellow mold", "green mold", "red mold")
}
MINES_DNUM = 2
DOORWAY = nh.GLYPH_CMAP_OFF + 12  # empty or broken doorway: diagonal moves allowed
SWALLOW_LO, SWALLOW_HI = nh.GLYPH_SWALLOW_OFF, nh.GLYPH_WARNING_OFF
BODY_LO, BODY_HI = nh.GLYPH_BODY_OFF, nh.GLYPH_BODY_OFF + nh.NUMMONS


def _safe_corpses() -> set[bytes]:
    """Monsters whose fresh corpse is safe to eat: not poisonous, petrifying, were, cannibalism
    for any playable race, a pet species, or with nasty side effects."""
    m1_pois = 0x10000000
    m2_undead, m2_were, m2_human, m2_elf, m2_dwarf, m2_gnome, m2_orc = 0x2, 0x4, 0x8, 0x10, 0x20, 0x40, 0x80
    m2_domestic = 0x00400000
    bad_m2 = m2_undead | m2_were | m2_human | m2_elf | m2_dwarf | m2_gnome | m2_orc | m2_domestic
    bad_names = {"cockatrice", "chickatrice", "Medusa", "green slime", "bat", "giant bat", "vampire bat",
                 "violet fungus", "small mimic", "large mimic", "giant mimic", "chameleon",
                 "quantum mechanic", "leprechaun", "water nymph", "wood nymph", "mountain nymph", "tengu"}
    out = set()
    for i in range(nh.NUMMONS):
        p = nh.permonst(i)
        if not (p.mflags1 & m1_pois or p.mflags2 & bad_m2 or p.mname in bad_names):
            out.add(p.mname.encode())
    return out


SAFE_CORPSES = _safe_corpses()
FLOOR_FOOD_RE = re.compile(rb"There (?:is|are) (?:an? |\d+ )(?:partly eaten )?(.+?) corpses? here; eat")


def _neighbours() -> list[tuple[tuple[int, int, bool], ...]]:
    out = []
    for c in range(N_CELLS):
        y, x = divmod(c, COLS)
        row = []
        for a, (dy, dx) in enumerate(MOVE_DELTAS):
            ny, nx = y + dy, x + dx
            if 0 <= ny < ROWS and 0 <= nx < COLS:
                row.append((ny * COLS + nx, a, a >= 4))
        out.append(tuple(row))
    return out


NEIGHBOURS = _neighbours()
MENU_RE = re.compile(rb"\((?:end|\d+ of \d+)\)")


@dataclass
class ScriptedConfig:
    max_repeats: int = 5  # same action on an unchanged screen at most this often in a row
    max_stall: int = 40  # agent steps without a game turn passing before acting at random
    rest_hp_frac: float = 0.4  # rest below this HP fraction when nothing hostile is near
    descend_hp_frac: float = 0.5  # rest on the stairs before descending below this
    search_per_spot: int = 15  # searches at one spot before moving on
    max_search_per_spot: int = 45
    first_pray_turn: int = 120  # prayer timeout starts at 300 and must be <= 200 to be answered
    pray_every: int = 800  # turns between prayers
    max_kicks: int = 8  # per locked door
    goal_patience: int = 25  # extra steps allowed over the planned path length
    bad_goal_steps: int = 300  # how long a dropped goal stays dropped (agent steps)
    max_rest: int = 300  # consecutive rest turns
    depth_over_xl: int = 1  # deeper than experience level + this: explore the level before descending
    corpse_fresh_turns: int = 30  # eat corpses of our kills this young
    corpse_max_dist: int = 8
    elbereth_hp_frac: float = 0.5  # engrave Elbereth below this HP fraction with a hostile adjacent
    elbereth_rest_frac: float = 0.7  # then rest on it up to this fraction
    avoid_mines: bool = True  # the Gnomish Mines kill low-level characters: take the main '>' only


class _Level:
    """What the agent remembers about one dungeon level."""

    def __init__(self):
        self.seen_adj = np.zeros((ROWS, COLS), bool)  # squares that were ever next to us
        self.doors = np.zeros((ROWS, COLS), bool)  # seen as a door: no diagonal moves in or out
        self.searched = np.zeros(N_CELLS, np.int32)
        self.down: set[int] = set()
        self.locked: dict[int, int] = {}  # door cell -> kicks so far
        self.blocked: set[int] = set()
        self.peaceful: set[int] = set()  # monster glyphs that asked "Really attack?"
        self.bad_goals: dict[int, int] = {}  # goal cell -> step when it may be tried again
        self.fresh: dict[int, int] = {}  # cell -> turn we killed something there
        self.no_down: set[int] = set()  # stairs into the Gnomish Mines


@dataclass
class _Now:
    """What one step's observation says, read once for the decision rules."""

    bl: np.ndarray
    x: int
    y: int
    hp: int
    hpmax: int
    hunger: int
    turn: int
    key: tuple[int, int]  # (dungeon, level)
    lvl: _Level
    pos: int
    glyphs: np.ndarray
    flat_glyphs: np.ndarray
    cat: np.ndarray
    hp_dropped: bool


class ScriptedNetHackExpert:
    """Rule-based NetHack player. `act(obs)` returns an index into `nle.nethack.ACTIONS`."""

    name = "scripted"
    version = "1"

    def __init__(self, config: ScriptedConfig | None = None):
        self.cfg = config or ScriptedConfig()
        self.reset({}, 0)

    def reset(self, obs: dict, seed: int) -> None:
        self.rng = random.Random(seed)
        self.levels: dict[tuple[int, int], _Level] = {}
        self.steps = 0
        self.intent: tuple | None = None  # what the next prompt is about: ("eat", letter), ("eat_floor",),
        # ("pray",), ("kick", dir), ("cast", dir), ("engrave", chars typed)
        self.last_screen = None
        self.last_turn = -1
        self.stall = 0
        self.last_action = -1
        self.repeats = 0
        self.last_move_to = -1
        self.last_move_glyph = -1
        self.level: _Level | None = None
        self.search_until = 0
        self.last_pray = -10**9
        self.last_eat_try = -10**9
        self.last_hp = 0
        self.rest_turns = 0
        self.path: list[tuple[int, int]] = []  # [(cell, action)] still to walk
        self.goal = -1
        self.goal_kind = ""
        self.goal_deadline = 0
        self.expected = -1
        self.cautious = False
        self.elbereth: tuple | None = None  # (level, cell) where we wrote Elbereth
        self.engrave_at: tuple | None = None
        self.engrave_turn = -10**9
        self.went_down_from: tuple | None = None  # (level, cell) of the last '>' we took
        self.force_bolt: bool | None = None  # a wizard: knows force bolt (spell a)

    # -- public --------------------------------------------------------------------------------

    def act(self, obs: dict) -> int:
        tty = obs["tty_chars"].tobytes()
        turn = int(obs["blstats"][nh.NLE_BL_TIME])
        self.stall = self.stall + 1 if turn == self.last_turn else 0
        self.last_turn = turn
        if self.stall >= self.cfg.max_stall:  # no game time passes: some loop we do not understand
            action = self.rng.choice(MOVES + (ESC, RETURN))
            self.path, self.intent = [], None
        else:
            action = self._decide(obs, tty)
        if tty == self.last_screen and action == self.last_action:
            self.repeats += 1
            if self.repeats >= self.cfg.max_repeats:
                action = self.rng.choice([a for a in MOVES + (ESC, RETURN) if a != action])
                self.path, self.intent = [], None
                self.repeats = 0
        else:
            self.repeats = 0
        self.last_screen, self.last_action = tty, action
        self.steps += 1
        return action

    # -- decision ------------------------------------------------------------------------------

    def _decide(self, obs: dict, tty: bytes) -> int:
        """The next action: answer what the screen asks, else the first of survive, fight, eat, rest
        and explore that acts."""
        action = self._prompt(obs, tty)
        if action is not None:
            return action
        self.intent = None
        now = self._observe(obs)
        if now is None:
            return UP  # we stand on the up stairs: back out of the Gnomish Mines
        for rule in (self._survive, self._fight, self._eat, self._rest):
            action = rule(obs, now)
            if action is not None:
                return action
        return self._explore(now)

    def _prompt(self, obs: dict, tty: bytes) -> int | None:
        """The key for a --More--, a menu or a question on the screen (None when there is none)."""
        if b"--More--" in tty:
            return RETURN
        if MENU_RE.search(tty):
            if self.intent and self.intent[0] == "cast" and b"Choose which spell" in tty:
                return SPELL_A
            return ESC  # Enter does not close every menu
        misc = obs.get("misc")
        top = tty[:COLS + 1].rstrip()
        if misc is not None:
            if misc[0]:
                return self._answer(top)
            if misc[1] and self.intent and self.intent[0] == "engrave":
                return self._type_elbereth()
            if misc[1] or misc[2]:
                return ESC
        elif top.endswith((b"]", b"?")) and b"[" in top:
            return self._answer(top)
        return None

    def _observe(self, obs: dict) -> _Now | None:
        """Read the status, map and message into this level's memory; None when the step just
        entered the Gnomish Mines from above (the expert avoids them)."""
        bl = obs["blstats"]
        x, y = int(bl[nh.NLE_BL_X]), int(bl[nh.NLE_BL_Y])
        key = (int(bl[nh.NLE_BL_DNUM]), int(bl[nh.NLE_BL_DLEVEL]))
        lvl = self.levels.get(key)
        if lvl is None:
            lvl = self.levels[key] = _Level()
            self.path = []
            came = self.went_down_from
            if self.cfg.avoid_mines and key[0] == MINES_DNUM and came and came[0][0] != MINES_DNUM:
                prev = self.levels[came[0]]
                prev.down.discard(came[1])
                prev.no_down.add(came[1])
                return None
        self.level = lvl
        self.cautious = int(bl[nh.NLE_BL_DEPTH]) > int(bl[nh.NLE_BL_XP]) + self.cfg.depth_over_xl
        pos = y * COLS + x
        lvl.seen_adj[max(0, y - 1):y + 2, max(0, x - 1):x + 2] = True
        glyphs = obs["glyphs"]
        cat = GLYPH_CAT[glyphs]
        lvl.doors = (lvl.doors | (cat == DOOR)) & (glyphs != DOORWAY)  # doors under monsters/objects
        for c in np.flatnonzero(cat == DOWNSTAIR).tolist():
            if c not in lvl.no_down:
                lvl.down.add(c)
        hp, turn = int(bl[nh.NLE_BL_HP]), int(bl[nh.NLE_BL_TIME])
        self._read_message(bytes(obs["message"]).rstrip(b"\0"), lvl, pos, turn)
        hp_dropped = hp < self.last_hp
        self.last_hp = hp
        return _Now(bl, x, y, hp, max(1, int(bl[nh.NLE_BL_HPMAX])), int(bl[nh.NLE_BL_HUNGER]), turn, key, lvl, pos,
                    glyphs, glyphs.ravel(), cat, hp_dropped)

    def _survive(self, obs: dict, now: _Now) -> int | None:
        """Hit the engulfer; pray when weak or hungry (and the god is not angered yet)."""
        if SWALLOW_LO <= int(now.glyphs[now.y, now.x - 1 if now.x else now.x + 1]) < SWALLOW_HI:
            return self.rng.choice(MOVES)  # engulfed: any direction hits the engulfer
        low_hp = now.hp <= 5 or now.hp * 7 <= now.hpmax
        if ((low_hp or now.hunger >= 3) and now.turn > self.cfg.first_pray_turn
                and now.turn - self.last_pray > self.cfg.pray_every):
            self.last_pray = now.turn
            self.intent = ("pray",)
            return PRAY
        return None

    def _fight(self, obs: dict, now: _Now) -> int | None:
        """Rest on Elbereth, engrave it when losing, else attack an adjacent hostile monster."""
        lvl, turn, hp, hpmax = now.lvl, now.turn, now.hp, now.hpmax
        target = None
        for n, a, _ in NEIGHBOURS[now.pos]:
            if now.cat[n // COLS, n % COLS] == MONSTER:
                g = int(now.flat_glyphs[n])
                if now.hp_dropped and g in lvl.peaceful:
                    lvl.peaceful.discard(g)  # peaceful monsters don't hurt us: another of its kind does
                if g not in lvl.peaceful and g not in NEVER_ATTACK:
                    target = (n, a, g)
                    break
        on_elbereth = self.elbereth == (now.key, now.pos)
        if on_elbereth and now.hp_dropped and turn > self.engrave_turn + 1:
            on_elbereth, self.elbereth = False, None  # scuffed, or the attacker ignores it
        if on_elbereth and hp < self.cfg.elbereth_rest_frac * hpmax and now.hunger < 3:
            return SEARCH
        if (target is not None and not on_elbereth and hp < self.cfg.elbereth_hp_frac * hpmax
                and turn > self.engrave_turn + 10):
            self.engrave_turn, self.engrave_at = turn, (now.key, now.pos)
            self.intent = ("engrave", 0)
            self.path = []
            return ENGRAVE
        if target is None:
            return None
        n, a, g = target
        self.path = []
        self.last_move_to, self.last_move_glyph = n, g
        if self.force_bolt is None:
            self.force_bolt = any(b"spellbook of force bolt" in bytes(t) for t in obs["inv_strs"])
        if self.force_bolt and int(now.bl[nh.NLE_BL_ENE]) >= 5:
            self.intent = ("cast", a)
            return CAST
        return a

    def _eat(self, obs: dict, now: _Now) -> int | None:
        """Walk to a fresh corpse when hungry; eat from the pack when weak."""
        if now.hunger >= 1 and now.lvl.fresh:
            a = self._go_eat_corpse(now.lvl, now.cat, now.flat_glyphs, now.pos, now.turn)
            if a is not None:
                return a
        if now.hunger >= 2 and self.steps - self.last_eat_try > 50:
            self.last_eat_try = self.steps
            letter = self._food_letter(obs)
            if letter is not None:
                self.intent = ("eat", letter)
                return EAT
        return None

    def _rest(self, obs: dict, now: _Now) -> int | None:
        """Search in place to heal when hurt and no hostile monster is near."""
        lvl, hpmax = now.lvl, now.hpmax
        if not (now.hp < self.cfg.descend_hp_frac * hpmax and now.hunger < 3):
            self.rest_turns = 0
            return None
        hostile_near = any(
            max(abs(c // COLS - now.y), abs(c % COLS - now.x)) <= 6
            for c in np.flatnonzero(now.cat == MONSTER).tolist()
            if int(now.flat_glyphs[c]) not in lvl.peaceful and int(now.flat_glyphs[c]) not in NEVER_ATTACK
        )
        want_rest = now.hp < self.cfg.rest_hp_frac * hpmax or now.pos in lvl.down
        if want_rest and not hostile_near and not now.hp_dropped and self.rest_turns < self.cfg.max_rest:
            self.rest_turns += 1
            return SEARCH
        return None

    def _explore(self, now: _Now) -> int:
        """Go down when on the stairs (and not cautious), else search or walk towards the goal."""
        lvl, pos = now.lvl, now.pos
        if pos in lvl.down and (not self.cautious or self.goal_kind == "down"):
            self.path = []
            self.went_down_from = (now.key, pos)
            return DOWN
        if self.goal_kind == "search" and pos == self.goal and lvl.searched[pos] < self.search_until:
            lvl.searched[pos] += 1
            return SEARCH
        step = self._navigate(lvl, now.cat, now.flat_glyphs, pos)
        if step is not None:
            cell, a = step
            if now.cat[cell // COLS, cell % COLS] == DOOR and cell in lvl.locked:
                lvl.locked[cell] += 1
                if lvl.locked[cell] > self.cfg.max_kicks:
                    lvl.blocked.add(cell)
                self.path = []
                self.intent = ("kick", a)
                return KICK
            self.last_move_to, self.last_move_glyph = cell, int(now.flat_glyphs[cell])
            return a
        if self.goal_kind == "search" and pos == self.goal and lvl.searched[pos] < self.search_until:
            lvl.searched[pos] += 1
            return SEARCH
        return self.rng.choice(MOVES)

    def _answer(self, top: bytes) -> int:
        """Answer the yes/no, item or direction question on the top line."""
        intent = self.intent or ("",)
        if b"Really attack" in top:
            if self.level is not None:
                self.level.peaceful.add(self.last_move_glyph)
            self.path = []
            return ESC
        if b"direction" in top:
            return intent[1] if intent[0] in ("kick", "cast") else ESC
        if b"Continue eating" in top:
            return NO
        if intent[0] == "eat_floor":
            m = FLOOR_FOOD_RE.search(top)
            return YES if m and m.group(1) in SAFE_CORPSES else NO if m else ESC
        if intent[0] == "eat":
            if b"What do you want to eat" in top:
                return _KEY_TO_ACTION.get(intent[1], ESC)
            if b"; eat" in top:
                return NO  # food on the floor: eat our own
        if intent[0] == "pray" and b"pray" in top:
            return YES
        if intent[0] == "engrave":
            if b"write with" in top:
                return FINGERS
            if b"add to the current engraving" in top:
                return NO
        return ESC

    def _type_elbereth(self) -> int:
        i = self.intent[1]
        if i < len(ELBERETH):
            self.intent = ("engrave", i + 1)
            return ELBERETH[i]
        self.intent, self.elbereth = None, self.engrave_at
        return RETURN

    def _read_message(self, msg: bytes, lvl: _Level, pos: int, turn: int) -> None:
        if not msg:
            return
        if (b"staircase down here" in msg or b"ladder down here" in msg) and pos not in lvl.no_down:
            lvl.down.add(pos)
        if (b"You kill" in msg or b"You destroy" in msg) and self.last_move_to >= 0:
            lvl.fresh[self.last_move_to] = turn
        if b"door is locked" in msg and self.last_move_to >= 0:
            lvl.locked.setdefault(self.last_move_to, 0)
        elif b"can't move diagonally" in msg and self.last_move_to >= 0:
            lvl.doors[divmod(pos, COLS)] = lvl.doors[divmod(self.last_move_to, COLS)] = True
            self.path = []
        elif (b"You try to move the boulder" in msg
              or b"carrying too much to get through" in msg) and self.last_move_to >= 0:
            lvl.blocked.add(self.last_move_to)
            self.path = []

    @staticmethod
    def _food_letter(obs: dict) -> int | None:
        for cls, letter, s in zip(obs["inv_oclasses"], obs["inv_letters"], obs["inv_strs"]):
            if cls == nh.FOOD_CLASS:
                name = bytes(s).rstrip(b"\0")
                if b"tin" not in name and b"corpse" not in name and b"egg" not in name:
                    return int(letter)
        return None

    def _go_eat_corpse(self, lvl: _Level, cat, flat_glyphs, pos: int, turn: int) -> int | None:
        """Eat a corpse of something we killed in the last few turns, if it lies close by."""
        for c, t in list(lvl.fresh.items()):
            if turn - t > self.cfg.corpse_fresh_turns:
                del lvl.fresh[c]
        if pos in lvl.fresh:
            del lvl.fresh[pos]
            self.intent = ("eat_floor",)
            return EAT
        target = [False] * N_CELLS
        for c in lvl.fresh:
            target[c] = BODY_LO <= int(flat_glyphs[c]) < BODY_HI
        path = self._bfs(pos, *self._walkable(lvl, cat, flat_glyphs), target)
        if path and len(path) <= self.cfg.corpse_max_dist:
            self.path = []
            self.last_move_to, self.last_move_glyph = path[0][0], int(flat_glyphs[path[0][0]])
            return path[0][1]
        return None

    # -- navigation ----------------------------------------------------------------------------

    @staticmethod
    def _walkable(lvl: _Level, cat: np.ndarray, flat_glyphs: np.ndarray) -> tuple[list, list]:
        """(passable, door) flags per cell, as lists (fast to index)."""
        passable = PASSABLE[cat].ravel()
        if lvl.blocked:
            passable[list(lvl.blocked)] = False
        for c in np.flatnonzero(cat == MONSTER).tolist():
            g = int(flat_glyphs[c])
            if g in lvl.peaceful or g in NEVER_ATTACK:
                passable[c] = False
        return passable.tolist(), lvl.doors.ravel().tolist()

    def _navigate(self, lvl: _Level, cat, flat_glyphs, pos: int) -> tuple[int, int] | None:
        passable, doors = self._walkable(lvl, cat, flat_glyphs)
        valid = (
            self.path and pos == self.expected and passable[self.path[0][0]]
            and self.steps < self.goal_deadline
            and (self.goal_kind == "down" or not lvl.down or self.cautious)
        )
        if valid and self.goal_kind == "explore":
            valid = self._frontier_mask(lvl, cat)[divmod(self.goal, COLS)]
        if not valid:
            if self.path and self.steps >= self.goal_deadline:
                lvl.bad_goals[self.goal] = self.steps + self.cfg.bad_goal_steps
            self._plan(lvl, cat, pos, passable, doors)
        if not self.path:
            return None
        step = self.path.pop(0)
        self.expected = step[0]
        return step

    @staticmethod
    def _frontier_mask(lvl: _Level, cat: np.ndarray) -> np.ndarray:
        """Walkable squares next to stone that was never adjacent to us (so may hide a passage)."""
        unknown = np.zeros((ROWS + 2, COLS + 2), bool)
        unknown[1:-1, 1:-1] = (cat == STONE) & ~lvl.seen_adj
        near = np.zeros((ROWS, COLS), bool)
        for dy in (0, 1, 2):
            for dx in (0, 1, 2):
                near |= unknown[dy:dy + ROWS, dx:dx + COLS]
        return near & PASSABLE[cat]

    def _plan(self, lvl: _Level, cat, pos: int, passable: list, doors: list) -> None:
        self.path = []
        bad = {g for g, t in lvl.bad_goals.items() if t > self.steps}
        frontier = self._frontier_mask(lvl, cat).ravel()
        if bad:
            frontier[list(bad)] = False
        plans = [("explore", frontier)]
        if lvl.down - bad:
            down = np.zeros(N_CELLS, bool)
            down[list(lvl.down - bad)] = True
            plans.insert(len(plans) if self.cautious else 0, ("down", down))
        for kind, target in plans:
            if target.any():
                path = self._bfs(pos, passable, doors, target.tolist())
                if path:
                    return self._set_path(kind, path)
        path = self._search_spot(lvl, cat, pos, passable, doors, bad)
        if path is None and lvl.searched.any():
            lvl.searched[:] = 0  # searched everywhere in vain: start over (finding is random)
            path = self._search_spot(lvl, cat, pos, passable, doors, bad)
        if path is not None:
            self._set_path("search", path)
            self.goal = path[-1][0] if path else pos

    def _set_path(self, kind: str, path: list[tuple[int, int]]) -> None:
        self.path, self.goal_kind = path, kind
        self.goal = path[-1][0] if path else -1
        self.goal_deadline = self.steps + 2 * len(path) + self.cfg.goal_patience

    @staticmethod
    def _bfs(start: int, passable: list, doors: list, target: list) -> list[tuple[int, int]]:
        """Shortest path start -> nearest target cell as [(cell, action)], or [] if none."""
        prev = [-1] * N_CELLS
        prev[start] = start
        q = deque((start,))
        while q:
            c = q.popleft()
            dc = doors[c]
            for n, a, diag in NEIGHBOURS[c]:
                if prev[n] != -1 or not passable[n] or (diag and (dc or doors[n])):
                    continue
                prev[n] = c * 8 + a + N_CELLS * 8
                if target[n]:
                    return _unwind(prev, start, n)
                q.append(n)
        return []

    @staticmethod
    def _unknown_density(lvl: _Level, cat: np.ndarray, r: int = 6) -> np.ndarray:
        """Per square, how much never-seen stone lies within `r` squares (0..10)."""
        unknown = ((cat == STONE) & ~lvl.seen_adj).astype(np.int32)
        s = np.zeros((ROWS + 1, COLS + 1), np.int32)
        s[1:, 1:] = unknown.cumsum(0).cumsum(1)
        y0 = np.clip(np.arange(ROWS) - r, 0, ROWS)[:, None]
        y1 = np.clip(np.arange(ROWS) + r + 1, 0, ROWS)[:, None]
        x0 = np.clip(np.arange(COLS) - r, 0, COLS)[None, :]
        x1 = np.clip(np.arange(COLS) + r + 1, 0, COLS)[None, :]
        box = s[y1, x1] - s[y0, x1] - s[y1, x0] + s[y0, x0]
        return box * (10.0 / (2 * r + 1) ** 2)

    def _search_spot(self, lvl: _Level, cat, pos: int, passable: list, doors: list, bad: set):
        """Path to the best reachable square to search from ([] if we are on it), or None.

        Good spots touch walls or stone (dead ends best), lie near unexplored areas, are close,
        and have not been searched much yet."""
        prev = [-1] * N_CELLS
        prev[pos] = pos
        dist = {pos: 0}
        q = deque((pos,))
        wallish = ((cat == STONE) | (cat == WALL)).ravel().tolist()
        unknown = self._unknown_density(lvl, cat).ravel().tolist()
        searched = lvl.searched.tolist()
        best, best_score = None, None
        cap = self.cfg.max_search_per_spot
        while q:
            c = q.popleft()
            dc = doors[c]
            hidden = 0
            for n, a, diag in NEIGHBOURS[c]:
                hidden += wallish[n]
                if prev[n] != -1 or not passable[n] or (diag and (dc or doors[n])):
                    continue
                prev[n] = c * 8 + a + N_CELLS * 8
                dist[n] = dist[c] + 1
                q.append(n)
            if hidden and searched[c] < cap and c not in bad:
                score = dist[c] / 4 + searched[c] - hidden - unknown[c]
                if best_score is None or score < best_score:
                    best, best_score = c, score
        if best is None:
            return None
        self.search_until = min(cap, searched[best] + self.cfg.search_per_spot)
        return _unwind(prev, pos, best)


def _unwind(prev: list[int], start: int, end: int) -> list[tuple[int, int]]:
    path = []
    c = end
    while c != start:
        code = prev[c] - N_CELLS * 8
        path.append((c, code % 8))
        c = code // 8
    path.reverse()
    return path
