"""Model sizes: the paper's grids and a size picker for a target effective parameter count."""
from __future__ import annotations

from dataclasses import replace

from trajdata import config
from trajdata.errors import ConfigError
from trajdata.models.atari import AtariConfig
from trajdata.models.nethack import NetHackConfig

# (width h, layers L) of the paper's NetHack runs: h ~ 100 L, 0.19M .. 193M effective parameters
NETHACK_GRID = ((64, 1), (128, 1), (192, 2), (256, 2), (320, 3), (384, 4), (512, 5), (704, 7), (896, 8), (1088, 10))
PAPER_SIZE = (384, 4)
# the paper's Atari SimpleCNN widths (~1k .. 5M parameters)
ATARI_WIDTHS = (1, 3, 5, 8, 13, 23, 34, 50, 81, 117, 167, 266)
# where the size pickers stop: far past any model that fits a machine (the NetHack grid ends near
# 6.9e12 effective parameters at (40960, 256); the CNN near 1.2e9 at width 4096)
MAX_LAYERS = 256
MAX_ATARI_WIDTH = 4096

def parse_count(text: str | int | float, field: str = "params") -> int:
    """``"10M"``, ``"250k"``, ``"1.5e6"``, ``2e9`` -> a positive int (fractions rounded)."""
    return config.parse_count(text, field, whole=False, positive=True)


def nethack_grid(**overrides) -> list[NetHackConfig]:
    """The paper's ten NetHack sizes as configs (``overrides``: other NetHackConfig fields)."""
    return [NetHackConfig(width=h, layers=L, **overrides) for h, L in NETHACK_GRID]


def size_for_params(target: str | int | float, base: NetHackConfig | None = None, multiple: int = 64,
                    aspect: float = 100.0, band: tuple[float, float] = (0.6, 1.6)) -> tuple[int, int]:
    """(h, L) whose effective N (``flops.effective_params`` of ``base`` at that size) is closest to
    ``target`` among the h that are multiples of ``multiple`` (64, the head size: heads = h / 64)
    with h / (``aspect`` * L) inside ``band`` (ties: the aspect nearer 1). The band holds all ten of
    the paper's sizes, so their N give them back; 10M -> (384, 4), 1.5M -> (192, 2)."""
    from trajdata.models.flops import effective_params

    n_target = parse_count(target)
    base = base or NetHackConfig()
    one_two: dict[int, tuple[int, int]] = {}

    def n_params(h: int, L: int) -> int:  # every layer of a core has the same size: N is linear in L
        if h not in one_two:
            one_two[h] = tuple(effective_params(replace(base, width=h, layers=k, heads=1)) for k in (1, 2))
        n1, n2 = one_two[h]
        return n1 + (L - 1) * (n2 - n1)

    def widths(L: int) -> list[int]:
        return [h for h in range(multiple, int(band[1] * aspect * L) + 1, multiple) if h >= band[0] * aspect * L]

    top = max((L for L in range(MAX_LAYERS, 0, -1) if widths(L)), default=None)
    if top is None or n_target > n_params(widths(top)[-1], top):
        most = f"{n_params(widths(top)[-1], top):.3g} effective parameters at (h, L) = ({widths(top)[-1]}, {top})" \
            if top else "no size"
        raise ConfigError(f"params {target} is too large for the NetHack agent (its sizes end at {most})",
                                 field="params")
    best, best_key, L = (multiple, 1), (float("inf"), 0.0), 0
    while L < top:
        L += 1
        hs = widths(L)
        if not hs:
            continue
        lo, hi = 0, len(hs) - 1
        while lo < hi:  # the first h with N >= target (N grows with h)
            mid = (lo + hi) // 2
            lo, hi = (mid + 1, hi) if n_params(hs[mid], L) < n_target else (lo, mid)
        for h in {hs[max(lo - 1, 0)], hs[lo]}:
            key = (abs(n_params(h, L) - n_target), abs(h / (aspect * L) - 1))
            if key < best_key:
                best, best_key = (h, L), key
        if n_params(hs[0], L) - n_target > best_key[0]:  # deeper only gets further away
            return best
    return best


def atari_width_for_params(target: str | int | float, n_actions: int = 18, frame_stack: int = 4) -> int:
    """The SimpleCNN width w whose parameter count is closest to ``target``."""
    from trajdata.models.flops import effective_params

    n_target = parse_count(target)
    most = effective_params(AtariConfig(MAX_ATARI_WIDTH, n_actions, frame_stack))
    if n_target > most:
        raise ConfigError(f"params {target} is too large for the Atari CNN (its widths end at {most:.3g} "
                                 f"parameters at width {MAX_ATARI_WIDTH})", field="params")
    w, prev = 1, None
    while (n := effective_params(AtariConfig(w, n_actions, frame_stack))) < n_target:
        prev, w = (w, n), w + 1
    return w - 1 if prev is not None and n_target - prev[1] < n - n_target else w
