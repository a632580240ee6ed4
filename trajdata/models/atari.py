"""The paper's Atari policy: SimpleCNN(w) over 4 stacked 84x84 grayscale frames (all parameters count)."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from trajdata.config import at_least

FRAME = 84
# (out channels as a multiple of w, kernel, stride) of the three convs
CONVS = ((1, 8, 4), (2, 4, 2), (2, 3, 1))


def conv_out(size: int, kernel: int, stride: int) -> int:
    return (size - kernel) // stride + 1


@dataclass
class AtariConfig:
    """``width`` w: convs of w, 2w, 2w channels. ``final_relu`` adds a ReLU after the third conv
    (the seed code has none)."""

    width: int = 34
    n_actions: int = 18
    frame_stack: int = 4
    final_relu: bool = False

    def __post_init__(self):
        at_least(self, 1, "width", "n_actions", "frame_stack")

    @property
    def input_fields(self) -> tuple[str, ...]:
        """The dataset fields a batch must hold besides the stacked frames (the loader adds those)."""
        return ("action",)

    def conv_shapes(self) -> list[tuple[int, int, int, int, int]]:
        """(in channels, out channels, kernel, stride, output side) of each conv."""
        shapes, c_in, side = [], self.frame_stack, FRAME
        for mult, k, s in CONVS:
            side = conv_out(side, k, s)
            shapes.append((c_in, mult * self.width, k, s, side))
            c_in = mult * self.width
        return shapes

    @property
    def flat_dim(self) -> int:
        _, c, _, _, side = self.conv_shapes()[-1]
        return c * side * side


class AtariModel(nn.Module):
    """``forward(batch, state=None) -> (logits (B, T, n_actions), None)``; ``batch["frame"]`` is
    (B, T, frame_stack, 84, 84) uint8 (or (B, T, 84, 84) with ``frame_stack`` 1), scaled to [0, 1]."""

    def __init__(self, cfg: AtariConfig):
        super().__init__()
        self.cfg = cfg
        layers = []
        for i, (c_in, c_out, k, s, _) in enumerate(cfg.conv_shapes()):
            layers.append(nn.Conv2d(c_in, c_out, k, stride=s))
            if i < len(CONVS) - 1 or cfg.final_relu:
                layers.append(nn.ReLU())
        self.cnn = nn.Sequential(*layers)
        self.policy = nn.Linear(cfg.flat_dim, cfg.n_actions)

    def forward(self, batch: dict[str, Tensor], state=None) -> tuple[Tensor, None]:
        x = batch["frame"]
        if x.dim() == 4:
            x = x.unsqueeze(2)
        B, T = x.shape[:2]
        x = x.flatten(0, 1).to(self.policy.weight.dtype) / 255.0
        return self.policy(self.cnn(x).flatten(1)).view(B, T, -1), None


def random_batch(cfg: AtariConfig, batch_size: int, seq_len: int, seed: int = 0, device=None) -> dict[str, Tensor]:
    """Random stacked frames and actions in the loader's layout."""
    g = torch.Generator().manual_seed(seed)
    B, T = batch_size, seq_len
    batch = dict(
        frame=torch.randint(0, 256, (B, T, cfg.frame_stack, FRAME, FRAME), generator=g).to(torch.uint8),
        action=torch.randint(0, cfg.n_actions, (B, T), generator=g).to(torch.uint8),
        reset=torch.zeros(B, T, dtype=torch.bool),
        mask=torch.ones(B, T, dtype=torch.bool),
    )
    return {k: v.to(device) for k, v in batch.items()} if device is not None else batch
