"""The paper's NetHack agent: fixed screen encoders -> scaled mixer + sequence core -> policy head.

Only the mixer, core and head grow with the model size (``width`` h, ``layers`` L); the encoders
(~3.9M parameters, as in the paper) are fixed. Inputs are the stored integer fields (tty_chars uint8,
tty_colors int8, tty_cursor uint8, inv_glyphs int16, glyphs int16, action uint8) in (B, T, ...)
batches as the loader makes them; they are embedded on whatever device they arrive on.

Episodes inside one unroll are kept apart: ``reset`` (True at an episode's first step) starts a new
attention block (a step attends only to earlier steps of its own episode), restarts the rotary
positions and the LSTM state, and zeroes the previous-action input. Steps with ``mask`` False
(padding) are never attended to.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from trajdata.config import at_least, choose, option, require
from trajdata.errors import ExtraError

N_ACTIONS = 121
MAX_GLYPH = 5976  # nle.nethack.MAX_GLYPH; inv_glyphs uses it for an empty slot
ROWS, COLS = 24, 80
MAP_ROWS = slice(1, 22)  # rows 1-21; row 0 is the message line, rows 22-23 the bottom lines
CHAR_DIM = 16
MAP_DIM = 512
CROP = 9
CROP_DIM = CROP * CROP * 8
MSG_DIM = 64
BOTTOM_DIM = 128
INV_SLOTS, INV_EMB, INV_DIM = 55, 32, 256
GLYPH_EMB = 16
CORES = ("transformer", "lstm", "mamba")
ENCODERS = ("paper", "cpu")
POOL = (3, 4)  # the CPU proxy's map: mean of each 3 x 4 block of embedded cells -> 7 x 20
ROWS_MAP = MAP_ROWS.stop - MAP_ROWS.start
BLOCKS = (ROWS_MAP // POOL[0]) * (COLS // POOL[1])
COARSE_DIM = 256


@dataclass
class NetHackConfig:
    """Size and inputs of a NetHack agent. ``heads`` 0 means ``width // 64`` (at least 1)."""

    width: int = 384
    layers: int = 4
    heads: int = option(0, "Attention heads (0: width // 64).")
    core: str = option("transformer", "Sequence core: transformer, lstm, or mamba (needs mamba-ssm, CUDA).",
                       choices=CORES)
    use_glyphs: bool = option(False, "Also embed the dungeon glyphs (information parity with the paper's text).")
    glyph_dim: int = 256
    use_inventory: bool = option(True, "Use the inventory encoder (--no-use-inventory: the paper's ablation).")
    use_message: bool = option(True, "Use the message encoder (--no-use-message: the paper's ablation).")
    encoders: str = option("paper", "paper (the map ResNet) or cpu: the CPU proxy, whose map encoder is the embedded "
                                    "map mean-pooled over 3 x 4 blocks and one linear layer (1/24 of the ResNet's "
                                    "FLOPs); the other encoders as the paper's.", choices=ENCODERS)
    n_actions: int = N_ACTIONS
    rope_theta: float = 10000.0
    norm_eps: float = 1e-6

    def __post_init__(self):
        at_least(self, 1, "width", "layers", "n_actions", "glyph_dim")
        at_least(self, 0, "heads")
        choose(self.core, CORES, "core")
        choose(self.encoders, ENCODERS, "encoders")
        if self.core == "transformer":
            require(self.width % self.n_heads == 0, "heads", f"must divide width {self.width} (got {self.n_heads})")
            require(self.head_dim % 2 == 0, "heads", f"must leave an even head size for rotary (got {self.head_dim})")

    @property
    def n_heads(self) -> int:
        return self.heads or max(1, self.width // 64)

    @property
    def head_dim(self) -> int:
        return self.width // self.n_heads

    @property
    def input_fields(self) -> tuple[str, ...]:
        """The dataset fields a batch must hold (besides the loader's mask, reset, episode, step)."""
        return ("tty_chars", "tty_colors", "tty_cursor", "action") + ("inv_glyphs",) * self.use_inventory \
            + ("glyphs",) * self.use_glyphs

    @property
    def d_in(self) -> int:
        """Width of the concatenated encoder features (1729 for the paper's inputs)."""
        map_dim = MAP_DIM if self.encoders == "paper" else COARSE_DIM
        return (map_dim + CROP_DIM + BOTTOM_DIM + self.n_actions + MSG_DIM * self.use_message
                + INV_DIM * self.use_inventory + self.glyph_dim * self.use_glyphs)


@dataclass
class NetHackState:
    """What one call hands the next for the same rows.

    ``prev_action`` (B,) is the action of each row's last step (-1: none); set it to the action a
    rollout took before the next call. ``hidden`` is the LSTM's (h, c). With a KV cache
    (``initial_state(cache_len=S)``), ``kv`` holds each layer's rotated keys and values
    (B, heads, <=S, head_dim), ``kv_valid`` (B, <=S) which of them belong to the row's current
    episode, and ``pos`` (B,) the rotary position of the row's next step.
    """

    prev_action: Tensor
    hidden: tuple[Tensor, Tensor] | None = None
    kv: list[tuple[Tensor, Tensor]] | None = None
    kv_valid: Tensor | None = None
    pos: Tensor | None = None
    cache_len: int = 0

    def detach(self) -> NetHackState:
        """The same state cut from the autograd graph (truncated backpropagation through time)."""
        return replace(
            self,
            hidden=None if self.hidden is None else tuple(x.detach() for x in self.hidden),
            kv=None if self.kv is None else [(k.detach(), v.detach()) for k, v in self.kv],
        )


# ---- fixed encoders ------------------------------------------------------------------------------

def _mlp(d_in: int, d: int, final_act: bool = True) -> nn.Sequential:
    """Linear-LayerNorm-ELU, then Linear (-LayerNorm-ELU if ``final_act``)."""
    tail = [nn.LayerNorm(d), nn.ELU()] if final_act else []
    return nn.Sequential(nn.Linear(d_in, d), nn.LayerNorm(d), nn.ELU(), nn.Linear(d, d), *tail)


class CountedBatchNorm2d(nn.BatchNorm2d):
    """``nn.BatchNorm2d`` (same parameters and buffers) that also takes a batch of distinct frames
    standing for a larger batch: frame i occurs ``counts[i]`` times there, and the training
    statistics (and running averages) are those of the larger batch, weighted by the counts."""

    def forward(self, x: Tensor, counts: Tensor | None = None) -> Tensor:
        if counts is None or not self.training:
            return super().forward(x)
        y, mean, var, n = WeightedBatchNorm.apply(x, self.weight, self.bias, counts, self.eps)
        with torch.no_grad():
            self.num_batches_tracked += 1
            m = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
            self.running_mean.lerp_(mean, m)
            self.running_var.lerp_(var * n / (n - 1), m)
        return y


class WeightedBatchNorm(torch.autograd.Function):
    """Training-mode batch norm of (N, C, H, W) frames with per-frame weights ``counts`` (N,), in fp32
    (two-pass variance); returns (y, mean, biased var, weighted element count)."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor, counts: Tensor, eps: float):
        with torch.autocast(x.device.type, enabled=False):
            return WeightedBatchNorm._forward(ctx, x, weight, bias, counts, eps)

    @staticmethod
    def _forward(ctx, x: Tensor, weight: Tensor, bias: Tensor, counts: Tensor, eps: float):
        xf = x.to(torch.promote_types(x.dtype, torch.float32))
        w = counts.to(xf.dtype)
        n = w.sum() * (x.shape[2] * x.shape[3])
        mean = (xf.sum((2, 3)) * w[:, None]).sum(0) / n
        centred = xf - mean[:, None, None]
        var = (centred.square().sum((2, 3)) * w[:, None]).sum(0) / n
        rstd = torch.rsqrt(var + eps)
        y = torch.addcmul(bias[:, None, None], centred, (rstd * weight)[:, None, None])
        ctx.save_for_backward(centred, rstd, weight, w, n)
        ctx.mark_non_differentiable(mean, var, n)
        return y.to(x.dtype), mean, var, n

    @staticmethod
    def backward(ctx, grad: Tensor, *_):
        with torch.autocast(grad.device.type, enabled=False):
            return WeightedBatchNorm._backward(ctx, grad)

    @staticmethod
    def _backward(ctx, grad: Tensor):
        centred, rstd, weight, w, n = ctx.saved_tensors
        g = grad.to(centred.dtype)
        sum_g = g.sum((2, 3))
        sum_gc = (g * centred).sum((2, 3))
        d_bias = sum_g.sum(0)
        d_weight = sum_gc.sum(0) * rstd
        a = rstd * weight
        coef = (w / n)[:, None]
        dx = g * a[:, None, None]
        dx -= (coef * (a * d_bias))[:, :, None, None]
        dx -= centred * (coef * (a * rstd * d_weight))[:, :, None, None]
        return dx.to(grad.dtype), d_weight, d_bias, None, None


def run_layers(layers: nn.Sequential, x: Tensor, counts: Tensor | None) -> Tensor:
    """``layers(x)``, handing ``counts`` to the layers that take it."""
    for layer in layers:
        x = layer(x, counts) if isinstance(layer, (CountedBatchNorm2d, ResBlock)) else layer(x)
    return x


class ResBlock(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.net = nn.Sequential(*[m for _ in range(2) for m in (nn.Conv2d(c, c, 3, padding=1), CountedBatchNorm2d(c), nn.ELU())])

    def forward(self, x: Tensor, counts: Tensor | None = None) -> Tensor:
        return x + run_layers(self.net, x, counts)


class MapEncoder(nn.Module):
    """IMPALA-style ResNet over the embedded map rows: (N, 16, 21, 80) -> (N, 512). ``counts``: see
    ``CountedBatchNorm2d``."""

    def __init__(self):
        super().__init__()
        stages, h, w = [], 21, 80
        for c_in, c_out in ((CHAR_DIM, 16), (16, 32)):
            stages += [nn.Conv2d(c_in, c_out, 3, padding=1), nn.MaxPool2d(3, stride=2), ResBlock(c_out), ResBlock(c_out)]
            h, w = (h - 3) // 2 + 1, (w - 3) // 2 + 1
        self.conv = nn.Sequential(*stages)
        self.fc = _mlp(32 * h * w, MAP_DIM)

    def forward(self, x: Tensor, counts: Tensor | None = None) -> Tensor:
        return self.fc(run_layers(self.conv, x, counts).flatten(1))


class CoarseMapEncoder(nn.Module):
    """The CPU proxy's map encoder: the mean embedding of each 3 x 4 block of map cells (7 x 20 blocks
    x 16) -> Linear -> LayerNorm -> ELU (N, 256). Takes the blocks' (N, 140, 16) mean embeddings."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Sequential(nn.Linear(BLOCKS * CHAR_DIM, COARSE_DIM), nn.LayerNorm(COARSE_DIM), nn.ELU())

    def forward(self, blocks: Tensor) -> Tensor:
        return self.fc(blocks.flatten(1))


def map_blocks(cells: Tensor) -> Tensor:
    """(N, 21, 80) map cells -> (N * 140, 12): the cells of each 3 x 4 block, blocks row-major."""
    n = len(cells)
    rows, cols = ROWS_MAP // POOL[0], COLS // POOL[1]
    return cells.reshape(n, rows, POOL[0], cols, POOL[1]).permute(0, 1, 3, 2, 4).reshape(n * rows * cols, -1)


def unique_rows(x: Tensor) -> tuple[Tensor, Tensor]:
    """(distinct rows, inverse) of a 2-D CPU tensor, as ``torch.unique(x, dim=0)`` gives them but ~10x
    faster (numpy's sort of the rows as raw bytes; the order of the distinct rows differs)."""
    a = np.ascontiguousarray(x.numpy())
    _, first, inverse = np.unique(a.view(np.dtype((np.void, a.dtype.itemsize * a.shape[1]))).ravel(),
                                  return_index=True, return_inverse=True)
    return x[torch.from_numpy(first)], torch.from_numpy(inverse.reshape(-1))


class CropEncoder(nn.Module):
    """Five 3x3 convs (16,16,16,16,8 channels; BatchNorm, ELU) over the 9x9 crop: -> (N, 648)."""

    def __init__(self):
        super().__init__()
        chans = (CHAR_DIM, 16, 16, 16, 16, 8)
        self.net = nn.Sequential(*[m for a, b in zip(chans, chans[1:]) for m in (nn.Conv2d(a, b, 3, padding=1), CountedBatchNorm2d(b), nn.ELU())])

    def forward(self, x: Tensor, counts: Tensor | None = None) -> Tensor:
        return run_layers(self.net, x, counts).flatten(1)


class MessageEncoder(nn.Module):
    """One-hot (80 x 256) of screen row 0 -> 64 -> 64. The first layer is the seed's
    Linear(20480, 64) on the one-hot, computed as the equal (and cheaper) sum of looked-up columns."""

    def __init__(self):
        super().__init__()
        self.onehot = nn.EmbeddingBag(COLS * 256, MSG_DIM, mode="sum")
        self.bias = nn.Parameter(torch.zeros(MSG_DIM))
        self.rest = nn.Sequential(nn.LayerNorm(MSG_DIM), nn.ELU(), nn.Linear(MSG_DIM, MSG_DIM), nn.LayerNorm(MSG_DIM), nn.ELU())
        self.register_buffer("offsets", torch.arange(COLS) * 256, persistent=False)

    def forward(self, row0: Tensor) -> Tensor:
        return self.rest(self.onehot(row0.long() + self.offsets) + self.bias)


class BottomLineEncoder(nn.Module):
    """Screen rows 22-23 as two 1-D channels, (c-32)/96 and digits (c-47)/10 (zero outside '-'..'9'):
    Conv1d(2->32, k8, s4), Conv1d(32->64, k4) (ELU) -> 2304 -> 128 -> 128."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Sequential(nn.Conv1d(2, 32, 8, stride=4), nn.ELU(), nn.Conv1d(32, 64, 4), nn.ELU())
        width = ((2 * COLS - 8) // 4 + 1) - 4 + 1
        self.fc = _mlp(64 * width, BOTTOM_DIM)

    def forward(self, lines: Tensor) -> Tensor:
        c = lines.flatten(1).to(self.fc[0].weight.dtype)
        digits = ((c > 44) & (c < 58)) * (c - 47) / 10
        return self.fc(self.conv(torch.stack([(c - 32) / 96, digits], 1)).flatten(1))


class InventoryEncoder(nn.Module):
    """Embedding(5977, 32) of the 55 inventory glyphs -> 256 (LayerNorm, ELU) -> 256."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(MAX_GLYPH + 1, INV_EMB)
        self.fc = _mlp(INV_SLOTS * INV_EMB, INV_DIM, final_act=False)

    def forward(self, inv_glyphs: Tensor) -> Tensor:
        return self.fc(self.emb(inv_glyphs.long().clamp(0, MAX_GLYPH)).flatten(1))


class GlyphEncoder(nn.Module):
    """Optional dungeon glyphs (21 x 79): Embedding(5977, 16), two stride-2 3x3 convs (ELU) -> ``dim``."""

    def __init__(self, dim: int):
        super().__init__()
        self.emb = nn.Embedding(MAX_GLYPH + 1, GLYPH_EMB)
        self.conv = nn.Sequential(nn.Conv2d(GLYPH_EMB, 16, 3, stride=2, padding=1), nn.ELU(),
                                  nn.Conv2d(16, 8, 3, stride=2, padding=1), nn.ELU())
        self.fc = nn.Sequential(nn.Linear(8 * 6 * 20, dim), nn.LayerNorm(dim), nn.ELU())

    def forward(self, glyphs: Tensor) -> Tensor:
        x = self.emb(glyphs.long().clamp(0, MAX_GLYPH)).permute(0, 3, 1, 2)
        return self.fc(self.conv(x).flatten(1))


class RowLookup(torch.autograd.Function):
    """``table[idx]`` (rows of a 2-D table); the backward sums the gradient rows with ``index_add_``."""

    @staticmethod
    def forward(ctx, table: Tensor, idx: Tensor) -> Tensor:
        ctx.save_for_backward(idx)
        ctx.rows = table.shape[0]
        return table.index_select(0, idx.flatten()).view(*idx.shape, table.shape[1])

    @staticmethod
    def backward(ctx, grad: Tensor):
        (idx,) = ctx.saved_tensors
        g = grad.reshape(-1, grad.shape[-1])
        return g.new_zeros(ctx.rows, g.shape[1]).index_add_(0, idx.flatten(), g), None


def crop(grid: Tensor, center: Tensor, size: int = CROP) -> Tensor:
    """``size`` x ``size`` windows of ``grid`` (N, C, H, W) centred on ``center`` (N, 2) = (row, col),
    zero outside the grid. The seed's grid_sample crop sat one cell up and left of the cursor; this one is centred."""
    n, _, h, w = grid.shape
    p = size // 2 + 1
    padded = F.pad(grid, (p, p, p, p))
    d = torch.arange(size, device=grid.device) + 1
    rows = center[:, 0].long().clamp(-1, h)[:, None] + d
    cols = center[:, 1].long().clamp(-1, w)[:, None] + d
    idx = torch.arange(n, device=grid.device)[:, None, None]
    return padded[idx, :, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)


class NetHackEncoder(nn.Module):
    """(N, ...) integer fields + previous actions (N,) -> (N, d_in) features.

    ``fast`` False computes the reference way: two embedding look-ups and an add, every frame
    through the map and crop encoders (for tests and before/after benchmarks)."""

    fast = True

    def __init__(self, cfg: NetHackConfig):
        super().__init__()
        self.cfg = cfg
        self.char_emb = nn.Embedding(256, CHAR_DIM)
        self.color_emb = nn.Embedding(128, CHAR_DIM)
        self.map = MapEncoder() if cfg.encoders == "paper" else CoarseMapEncoder()
        self.crop = CropEncoder()
        self.bottom = BottomLineEncoder()
        self.message = MessageEncoder() if cfg.use_message else None
        self.inventory = InventoryEncoder() if cfg.use_inventory else None
        self.glyphs = GlyphEncoder(cfg.glyph_dim) if cfg.use_glyphs else None

    def embed(self, cells: Tensor) -> Tensor:
        """Summed char and colour embeddings of ``cells`` (N, H, W) = char * 128 + colour, channels
        first: -> (N, 16, H, W) (channels-last in memory, as the convs take it).

        The sums come from a (256 * 128, 16) table of every char + colour sum, so the values are
        bitwise those of two look-ups and an add; one look-up moves a third of the bytes, and on CPU
        its backward sums rows with ``index_add_`` (deterministic, ~2x faster than an embedding's)."""
        if not self.fast:
            cells = cells.long()
            return (self.char_emb(cells // 128) + self.color_emb(cells % 128)).permute(0, 3, 1, 2)
        table = self.sum_table()
        if table.is_cuda:
            return F.embedding(cells, table).permute(0, 3, 1, 2)
        return RowLookup.apply(table, cells).permute(0, 3, 1, 2)

    def sum_table(self) -> Tensor:
        """Every char + colour embedding sum, (256 * 128, 16). Without autograd (acting, evaluating) it is
        kept between calls until either embedding's weights change (in place or replaced)."""
        c, k = self.char_emb.weight, self.color_emb.weight
        if torch.is_grad_enabled() and (c.requires_grad or k.requires_grad):
            return (c[:, None] + k[None]).flatten(0, 1)
        key = (c.data_ptr(), c._version, k.data_ptr(), k._version, c.device, c.dtype)
        cached = self.__dict__.get("_sum_table")
        if cached is None or cached[0] != key:
            cached = (key, (c[:, None] + k[None]).flatten(0, 1).detach())
            self.__dict__["_sum_table"] = cached
        return cached[1]

    def per_distinct(self, encoder: nn.Module, cells: Tensor) -> Tensor:
        """``encoder(self.embed(cells))``. On CPU, computed once per distinct grid of cells (N, H, W) and
        handed out to its repeats (consecutive game steps often share a map), with batch statistics
        weighted by the repeats: the same function of the batch, in fewer FLOPs."""
        if not self.fast or cells.device.type != "cpu" or len(cells) < 2:
            return encoder(self.embed(cells))
        distinct, inverse, counts = torch.unique(cells.flatten(1), dim=0, return_inverse=True, return_counts=True)
        if len(distinct) == len(cells):
            return encoder(self.embed(cells))
        # index_select: its backward (index_add_) is deterministic, where [inverse]'s is not on 2+ threads
        return encoder(self.embed(distinct.view(-1, *cells.shape[1:])), counts).index_select(0, inverse)

    def coarse_map(self, cells: Tensor) -> Tensor:
        """The CPU proxy's map features of ``cells`` (N, 21, 80). On CPU each distinct 3 x 4 block of the
        batch is embedded once (a batch of 1,024 game steps holds ~1.7k distinct blocks of its ~143k)."""
        blocks = map_blocks(cells)
        if not self.fast or cells.device.type != "cpu":
            means = self.embed(blocks[:, None]).mean((2, 3))
        else:
            distinct, inverse = unique_rows(blocks)
            means = self.embed(distinct[:, None]).mean((2, 3)).index_select(0, inverse)
        return self.map(means.view(len(cells), BLOCKS, CHAR_DIM))

    def forward(self, obs: dict[str, Tensor], prev_action: Tensor) -> Tensor:
        chars, colors = obs["tty_chars"], obs["tty_colors"]
        cells = chars[:, MAP_ROWS].int() * 128 + (colors[:, MAP_ROWS].int() & 127)
        cursor = obs["tty_cursor"].long() - torch.tensor([MAP_ROWS.start, 0], device=chars.device)
        window = crop(cells[:, None], cursor)[:, 0]  # char 0 colour 0 (cell 0) outside the map
        feats = [
            self.per_distinct(self.map, cells) if self.cfg.encoders == "paper" else self.coarse_map(cells),
            self.per_distinct(self.crop, window),
            self.bottom(chars[:, 22:24]),
            F.one_hot(prev_action.clamp(min=0), self.cfg.n_actions) * (prev_action >= 0)[:, None],
        ]
        if self.message is not None:
            feats.append(self.message(chars[:, 0]))
        if self.inventory is not None:
            feats.append(self.inventory(obs["inv_glyphs"]))
        if self.glyphs is not None:
            feats.append(self.glyphs(obs["glyphs"]))
        dtype = feats[0].dtype
        return torch.cat([f.to(dtype) for f in feats], 1)


# ---- scaled part ---------------------------------------------------------------------------------

class Mixer(nn.Module):
    """2 x (Linear + LayerNorm + ReLU): d_in -> h -> h."""

    def __init__(self, d_in: int, h: int):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(d_in, h), nn.LayerNorm(h), nn.ReLU(), nn.Linear(h, h), nn.LayerNorm(h), nn.ReLU())

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


def rotary_angles(pos: Tensor, head_dim: int, theta: float) -> tuple[Tensor, Tensor]:
    """cos, sin of the rotary angles of positions (B, T): each (B, 1, T, head_dim / 2) float32."""
    inv_freq = theta ** -(torch.arange(0, head_dim, 2, device=pos.device, dtype=torch.float64) / head_dim)
    ang = (pos.to(torch.float64)[..., None] * inv_freq)[:, None]
    return ang.cos().float(), ang.sin().float()


def rotate(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    x1, x2 = x.float().chunk(2, -1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1).to(x.dtype)


class Attention(nn.Module):
    def __init__(self, cfg: NetHackConfig):
        super().__init__()
        self.heads, self.head_dim = cfg.n_heads, cfg.head_dim
        self.qkv = nn.Linear(cfg.width, 3 * cfg.width, bias=False)
        self.proj = nn.Linear(cfg.width, cfg.width, bias=False)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor | None,
                past: tuple[Tensor, Tensor] | None = None) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        """``mask`` (B, 1, T, S+T) bool (None: plain causal, no ``past``); returns output and (k, v) incl. ``past``."""
        B, T, C = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k = rotate(q, cos, sin), rotate(k, cos, sin)
        if past is not None:
            k, v = torch.cat([past[0].to(k.dtype), k], 2), torch.cat([past[1].to(v.dtype), v], 2)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None)
        return self.proj(y.transpose(1, 2).reshape(B, T, C)), (k, v)


class SwiGLU(nn.Module):
    def __init__(self, h: int):
        super().__init__()
        self.gate = nn.Linear(h, 4 * h, bias=False)
        self.up = nn.Linear(h, 4 * h, bias=False)
        self.down = nn.Linear(4 * h, h, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down(F.silu(self.gate(x)) * self.up(x))


class Block(nn.Module):
    def __init__(self, cfg: NetHackConfig):
        super().__init__()
        self.norm1 = nn.RMSNorm(cfg.width, eps=cfg.norm_eps)
        self.attn = Attention(cfg)
        self.norm2 = nn.RMSNorm(cfg.width, eps=cfg.norm_eps)
        self.mlp = SwiGLU(cfg.width)

    def forward(self, x, cos, sin, mask, past=None):
        a, kv = self.attn(self.norm1(x), cos, sin, mask, past)
        x = x + a
        return x + self.mlp(self.norm2(x)), kv


def episode_positions(reset: Tensor, start: Tensor | None = None) -> Tensor:
    """Rotary positions (B, T): steps since the last reset in the unroll; before a row's first reset,
    ``start`` (B,) + t (0 + t when None)."""
    B, T = reset.shape
    t = torch.arange(T, device=reset.device).expand(B, T)
    last = torch.where(reset, t, torch.full_like(t, -1)).cummax(1).values
    before = t if start is None else start[:, None] + t
    return torch.where(last >= 0, t - last, before)


def attention_mask(reset: Tensor, valid: Tensor, past_valid: Tensor | None = None) -> Tensor:
    """(B, 1, T, S+T) bool: step i sees step j <= i of its own episode that is not padding, and
    itself; cached key s (``past_valid`` (B, S)) is seen by the steps before the row's first reset."""
    B, T = reset.shape
    seg = reset.long().cumsum(1)
    i = torch.arange(T, device=reset.device)
    own = (seg[:, :, None] == seg[:, None, :]) & (i[None, :, None] >= i[None, None, :]) & valid[:, None, :]
    own = own | torch.eye(T, dtype=torch.bool, device=reset.device)
    if past_valid is not None:
        own = torch.cat([past_valid[:, None, :] & (seg == 0)[:, :, None], own], 2)
    return own[:, None]


class TransformerCore(nn.Module):
    """LLaMA-style decoder: pre-norm RMSNorm, rotary positions, SwiGLU (4h), no biases, final RMSNorm."""

    def __init__(self, cfg: NetHackConfig):
        super().__init__()
        self.cfg = cfg
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.layers))
        self.norm = nn.RMSNorm(cfg.width, eps=cfg.norm_eps)

    def forward(self, x: Tensor, reset: Tensor, valid: Tensor, state: NetHackState | None) -> tuple[Tensor, dict]:
        cached = state is not None and state.kv is not None
        pos = episode_positions(reset, state.pos if cached else None)
        cos, sin = rotary_angles(pos, self.cfg.head_dim, self.cfg.rope_theta)
        if cached:
            mask = attention_mask(reset, valid, state.kv_valid)
        elif bool(reset[:, 1:].any()) or not bool(valid.all()):
            mask = attention_mask(reset, valid)
        else:
            mask = None
        kvs = []
        for i, block in enumerate(self.blocks):
            x, kv = block(x, cos, sin, mask, state.kv[i] if cached else None)
            kvs.append(kv)
        out = {}
        if cached:
            seg = reset.long().cumsum(1)
            keep = torch.cat([state.kv_valid & (seg[:, -1:] == 0), (seg == seg[:, -1:]) & valid], 1)
            n = state.cache_len
            out = dict(kv=[(k[:, :, -n:], v[:, :, -n:]) for k, v in kvs], kv_valid=keep[:, -n:], pos=pos[:, -1] + 1)
        return self.norm(x), out


class LSTMCore(nn.Module):
    """nn.LSTM(h, h, L); a row's (h, c) is zeroed at its resets and carried in the state."""

    def __init__(self, cfg: NetHackConfig):
        super().__init__()
        self.cfg = cfg
        self.lstm = nn.LSTM(cfg.width, cfg.width, cfg.layers, batch_first=True)

    def forward(self, x: Tensor, reset: Tensor, valid: Tensor, state: NetHackState | None) -> tuple[Tensor, dict]:
        B, T, h = x.shape
        if state is not None and state.hidden is not None:
            hc = state.hidden
        else:
            hc = tuple(x.new_zeros(self.cfg.layers, B, h) for _ in range(2))
        cuts = sorted({0, T} | set(torch.nonzero(reset.any(0)).flatten().tolist()))
        outs = []
        for a, b in zip(cuts, cuts[1:]):
            keep = (~reset[:, a]).to(x.dtype)[None, :, None]
            y, hc = self.lstm(x[:, a:b], tuple(s * keep for s in hc))
            outs.append(y)
        return torch.cat(outs, 1), dict(hidden=hc)


class MambaCore(nn.Module):
    """Pre-norm residual stack of mamba_ssm's Mamba2 with a final RMSNorm; episodes are separated
    with Mamba2's ``seq_idx``. Needs mamba_ssm (CUDA); no state is carried across calls."""

    def __init__(self, cfg: NetHackConfig):
        super().__init__()
        try:
            from mamba_ssm import Mamba2
        except Exception as e:
            raise ExtraError(f"core 'mamba' needs mamba_ssm, which does not import here ({type(e).__name__}): "
                             "pip install mamba-ssm (CUDA only)") from None
        self.norms = nn.ModuleList(nn.RMSNorm(cfg.width, eps=cfg.norm_eps) for _ in range(cfg.layers))
        self.mixers = nn.ModuleList(Mamba2(d_model=cfg.width, layer_idx=i) for i in range(cfg.layers))
        self.norm = nn.RMSNorm(cfg.width, eps=cfg.norm_eps)

    def forward(self, x: Tensor, reset: Tensor, valid: Tensor, state: NetHackState | None) -> tuple[Tensor, dict]:
        seq_idx = reset.to(torch.int32).cumsum(1, dtype=torch.int32)
        for norm, mixer in zip(self.norms, self.mixers):
            x = x + mixer(norm(x), seq_idx=seq_idx)
        return self.norm(x), {}


def make_core(cfg: NetHackConfig) -> nn.Module:
    return {"transformer": TransformerCore, "lstm": LSTMCore, "mamba": MambaCore}[cfg.core](cfg)


# ---- the agent -----------------------------------------------------------------------------------

class NetHackModel(nn.Module):
    """``forward(batch, state=None) -> (logits (B, T, n_actions), new_state)``.

    ``batch`` holds (B, T, ...) tensors: tty_chars, tty_colors, tty_cursor, inv_glyphs (if
    ``use_inventory``), glyphs (if ``use_glyphs``), and optionally action (the previous-action input
    of step t > 0 is action[t-1]), reset, mask and prev_action (B, T) (overrides the shifted actions;
    -1 = none). The previous action of step 0 comes from ``state.prev_action`` (none without a
    state); it is none at every reset.

    Rotary positions count steps since the last reset inside the unroll. Before a row's first reset
    they start at 0, not at the loader's ``step``: rotary attention depends only on position
    differences and no step attends across unrolls (without a cache), so any start gives the same
    logits, and 0 keeps the angles small. With a KV cache positions continue from ``state.pos``.
    """

    def __init__(self, cfg: NetHackConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = NetHackEncoder(cfg)
        self.mixer = Mixer(cfg.d_in, cfg.width)
        self.core = make_core(cfg)
        self.head = nn.Linear(cfg.width, cfg.n_actions)
        if cfg.core == "transformer":
            self.core.apply(self._init_core)
            for name, p in self.core.named_parameters():
                if name.endswith(("attn.proj.weight", "mlp.down.weight")):
                    nn.init.normal_(p, std=0.02 / (2 * cfg.layers) ** 0.5)

    @staticmethod
    def _init_core(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=0.02)

    def scaled_modules(self) -> tuple[nn.Module, nn.Module, nn.Module]:
        """The parts counted in the effective parameters: mixer, core, head."""
        return self.mixer, self.core, self.head

    def initial_state(self, batch_size: int, device=None, cache_len: int = 0) -> NetHackState:
        """State for rows at an episode start. ``cache_len`` > 0 (Transformer): keep a KV cache of the
        last ``cache_len`` steps, so successive calls (e.g. one step at a time) see earlier steps."""
        cfg = self.cfg
        device = device or self.head.weight.device
        state = NetHackState(prev_action=torch.full((batch_size,), -1, dtype=torch.long, device=device))
        if cache_len > 0:
            require(cfg.core == "transformer", "core", f"{cfg.core!r} has no KV cache (cache_len needs 'transformer')")
            dtype = self.head.weight.dtype
            empty = torch.zeros(batch_size, cfg.n_heads, 0, cfg.head_dim, device=device, dtype=dtype)
            state.kv = [(empty, empty) for _ in range(cfg.layers)]
            state.kv_valid = torch.zeros(batch_size, 0, dtype=torch.bool, device=device)
            state.pos = torch.zeros(batch_size, dtype=torch.long, device=device)
            state.cache_len = cache_len
        return state

    def previous_actions(self, batch: dict[str, Tensor], state: NetHackState | None = None) -> Tensor:
        """(B, T) long: the previous-action input of each step, -1 where there is none."""
        B, T = batch["tty_chars"].shape[:2]
        device = batch["tty_chars"].device
        if "prev_action" in batch:
            prev = batch["prev_action"].long()
        else:
            first = state.prev_action.long()[:, None] if state is not None else torch.full((B, 1), -1, device=device)
            act = batch.get("action")
            rest = act[:, :-1].long() if act is not None else torch.full((B, T - 1), -1, device=device)
            prev = torch.cat([first, rest], 1)
        reset = batch.get("reset")
        return prev if reset is None else prev.masked_fill(reset.bool(), -1)

    def forward(self, batch: dict[str, Tensor], state: NetHackState | None = None) -> tuple[Tensor, NetHackState]:
        B, T = batch["tty_chars"].shape[:2]
        device = batch["tty_chars"].device
        reset = batch["reset"].bool() if "reset" in batch else torch.zeros(B, T, dtype=torch.bool, device=device)
        valid = batch["mask"].bool() if "mask" in batch else torch.ones(B, T, dtype=torch.bool, device=device)
        prev = self.previous_actions(batch, state)
        names = [k for k in self.cfg.input_fields if k != "action"]
        obs = {k: batch[k].flatten(0, 1) for k in names}
        x = self.encoder(obs, prev.flatten()).view(B, T, -1)
        x, core_out = self.core(self.mixer(x), reset, valid, state)
        last = batch["action"][:, -1].long() if "action" in batch else torch.full((B,), -1, dtype=torch.long, device=device)
        new_state = NetHackState(prev_action=last, cache_len=state.cache_len if state is not None else 0, **core_out)
        return self.head(x), new_state


def random_batch(cfg: NetHackConfig, batch_size: int, seq_len: int, seed: int = 0, device=None) -> dict[str, Tensor]:
    """A batch of random observations and actions in the loader's layout (no resets, no padding)."""
    g = torch.Generator().manual_seed(seed)
    B, T = batch_size, seq_len

    def ints(high, shape, dtype, low=0):
        return torch.randint(low, high, (B, T, *shape), generator=g).to(dtype)

    cursor = torch.stack([ints(22, (), torch.uint8, 1), ints(COLS, (), torch.uint8)], -1)
    batch = dict(
        tty_chars=ints(128, (ROWS, COLS), torch.uint8, 32),
        tty_colors=ints(16, (ROWS, COLS), torch.int8),
        tty_cursor=cursor,
        glyphs=ints(MAX_GLYPH + 1, (21, 79), torch.int16),
        inv_glyphs=ints(MAX_GLYPH + 1, (INV_SLOTS,), torch.int16),
        action=ints(cfg.n_actions, (), torch.uint8),
        reset=torch.zeros(B, T, dtype=torch.bool),
        mask=torch.ones(B, T, dtype=torch.bool),
    )
    return {k: v.to(device) for k, v in batch.items()} if device is not None else batch
