"""Effective parameters and training FLOPs, the paper's way (C = 6ND for NetHack, 3x forward for
Atari), and FLOPs measured by torch's FlopCounterMode (everything, for MFU)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn
from torch.utils import flop_counter

from trajdata.models import atari, nethack
from trajdata.models.atari import AtariConfig
from trajdata.models.nethack import NetHackConfig

aten = torch.ops.aten


def count_params(*modules: nn.Module) -> int:
    return sum(p.numel() for m in modules for p in m.parameters())


def effective_params(cfg: NetHackConfig | AtariConfig) -> int:
    """N of the scaling laws.

    NetHack: mixer + core + head (encoders excluded). For the Transformer core this adds the 1 x h
    input embedding that the seed's HF ``LlamaModel(vocab_size=1)`` carried unused (our model has no
    such parameter), so N is the paper's 16Lh^2 + h^2 + 2Lh + 1858h + 121 exactly (h=384, L=4:
    10,301,305) and budgets line up with the released runs; the module's own count is N - h.
    Atari: every parameter.
    """
    if isinstance(cfg, AtariConfig):
        with torch.device("meta"):
            return count_params(atari.AtariModel(cfg))
    with torch.device("meta"):
        n = count_params(nethack.Mixer(cfg.d_in, cfg.width), nethack.make_core(cfg), nn.Linear(cfg.width, cfg.n_actions))
    return n + cfg.width * (cfg.core == "transformer")


def atari_forward_flops(cfg: AtariConfig) -> int:
    """Forward FLOPs of one sample: 2*H_out*W_out*C_out*K^2*C_in per conv (output sizes, not the
    seed's input sizes) + 2*in*out for the linear layer; biases and ReLUs are not counted."""
    convs = sum(2 * side * side * c_out * k * k * c_in for c_in, c_out, k, _, side in cfg.conv_shapes())
    return convs + 2 * cfg.flat_dim * cfg.n_actions


def rl_effective_params(cfg: NetHackConfig) -> int:
    """N of an RL agent (Appendix E: the policy and value heads both scale): the BC count (mixer +
    LSTM core + policy head) plus the value head."""
    return effective_params(cfg) + cfg.width + 1


@dataclass(frozen=True)
class Family:
    """How a model family counts training FLOPs: ``multiplier`` x ``unit(cfg)`` per sample, and its N."""

    name: str
    unit: Callable[[NetHackConfig | AtariConfig], int]  # what the multiplier multiplies, per sample
    multiplier: int
    params: Callable[[NetHackConfig | AtariConfig], int] = effective_params  # N of the scaling laws

    def flops_per_sample(self, cfg: NetHackConfig | AtariConfig) -> int:
        return self.multiplier * self.unit(cfg)


# BC, the paper's way: C = 6ND for NetHack (N effective parameters), 3 x forward FLOPs for Atari; RL
# (IMPALA, Appendix E): C = 8ND, each learner forward and backward (6N) has an actor forward (2N) beside it
FAMILIES = {"nethack": Family("nethack", effective_params, 6), "atari": Family("atari", atari_forward_flops, 3),
            "nethack-rl": Family("nethack-rl", rl_effective_params, 8, rl_effective_params)}


def flops_per_sample(cfg: NetHackConfig | AtariConfig) -> int:
    """Training FLOPs per sample of BC: 6N (NetHack), 3 x forward (Atari)."""
    return FAMILIES["atari" if isinstance(cfg, AtariConfig) else "nethack"].flops_per_sample(cfg)


def training_flops(cfg: NetHackConfig | AtariConfig, samples: int) -> int:
    """C for ``samples`` training samples (steps)."""
    return flops_per_sample(cfg) * int(samples)


def nethack_part_flops(cfg: NetHackConfig, seq_len: int) -> dict[str, tuple[int, int]]:
    """(forward, backward) FLOPs per sample of each part of the NetHack agent, from its layer shapes:
    2 * multiply-adds of every conv, linear and attention matmul (attention as full T x T, as
    ``measured_flops_per_sample`` counts it); backward is twice forward (input and weight
    gradients), but for a layer whose input needs no gradient (the bottom-line encoder's first conv
    reads the screen), which costs once. Look-ups, norms and activations count nothing."""
    def conv(side: tuple[int, int], c_in: int, c_out: int, k: int = 3) -> int:
        return 2 * side[0] * side[1] * c_out * c_in * k * k

    def lin(a: int, b: int) -> int:
        return 2 * a * b

    parts: dict[str, tuple[int, int]] = {}
    side, f = (nethack.MAP_ROWS.stop - nethack.MAP_ROWS.start, nethack.COLS), 0
    if cfg.encoders == "paper":
        for c_in, c_out in ((nethack.CHAR_DIM, 16), (16, 32)):
            f += conv(side, c_in, c_out)
            side = ((side[0] - 3) // 2 + 1, (side[1] - 3) // 2 + 1)
            f += 4 * conv(side, c_out, c_out)
        f += lin(32 * side[0] * side[1], nethack.MAP_DIM) + lin(nethack.MAP_DIM, nethack.MAP_DIM)
    else:  # the mean pooling counts nothing, like the norms
        f = lin(nethack.CHAR_DIM * nethack.BLOCKS, nethack.COARSE_DIM)
    parts["map"] = (f, 2 * f)
    chans = (nethack.CHAR_DIM, 16, 16, 16, 16, 8)
    f = sum(conv((nethack.CROP, nethack.CROP), a, b) for a, b in zip(chans, chans[1:]))
    parts["crop"] = (f, 2 * f)
    w1 = (2 * nethack.COLS - 8) // 4 + 1  # Conv1d(2, 32, 8, stride 4), then Conv1d(32, 64, 4)
    first = conv((1, w1), 2, 32, k=1) * 8
    f = conv((1, w1 - 3), 32, 64, k=1) * 4 + lin(64 * (w1 - 3), nethack.BOTTOM_DIM) + lin(nethack.BOTTOM_DIM, nethack.BOTTOM_DIM)
    parts["bottom"] = (first + f, first + 2 * f)
    if cfg.use_message:
        f = lin(nethack.MSG_DIM, nethack.MSG_DIM)
        parts["message"] = (f, 2 * f)
    if cfg.use_inventory:
        f = lin(nethack.INV_SLOTS * nethack.INV_EMB, nethack.INV_DIM) + lin(nethack.INV_DIM, nethack.INV_DIM)
        parts["inventory"] = (f, 2 * f)
    if cfg.use_glyphs:
        f = conv((11, 40), nethack.GLYPH_EMB, 16) + conv((6, 20), 16, 8) + lin(8 * 6 * 20, cfg.glyph_dim)
        parts["glyphs"] = (f, 2 * f)
    h = cfg.width
    f = lin(cfg.d_in, h) + lin(h, h)
    parts["mixer"] = (f, 2 * f)
    if cfg.core == "transformer":
        f = cfg.layers * (lin(h, 3 * h) + lin(h, h) + 3 * lin(h, 4 * h) + 2 * lin(seq_len, h))
    elif cfg.core == "lstm":
        f = cfg.layers * 2 * lin(h, 4 * h)
    else:  # Mamba2: its projections (expand 2, d_state 128, headdim 64, one group), the scan uncounted
        d_inner = 2 * h
        f = cfg.layers * (lin(h, 2 * d_inner + 2 * 128 + d_inner // 64) + lin(d_inner, h))
    parts["core"] = (f, 2 * f)
    f = lin(h, cfg.n_actions)
    parts["head"] = (f, 2 * f)
    return parts


def total_flops_per_sample(cfg: NetHackConfig | AtariConfig, seq_len: int) -> int:
    """Training FLOPs per sample of everything the model computes (NetHack: encoders included, from
    ``nethack_part_flops``; Atari: 3 x forward, which is all of it)."""
    if isinstance(cfg, AtariConfig):
        return flops_per_sample(cfg)
    return sum(fw + bw for fw, bw in nethack_part_flops(cfg, seq_len).values())


def cpu_peak_flops(threads: int | None = None, dtype: torch.dtype = torch.float32, size: int = 512, reps: int = 30) -> float:
    """Peak FLOP/s of this CPU for MFU: the best of ``reps`` ``size``^3 matmuls in ``dtype`` on one
    thread, times ``threads`` [torch's current thread count]. Measured, not a datasheet figure
    (cores x clock x FMA width x 2); the best of many short trials finds an uncontended moment on a
    shared machine, and one thread's rate times the threads leaves out how well threads scale."""
    import time

    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        g = torch.Generator().manual_seed(0)
        a = torch.randn(size, size, generator=g).to(dtype)
        b = torch.randn(size, size, generator=g).to(dtype)
        a @ b
        best = float("inf")
        for _ in range(reps):
            t = time.perf_counter()
            a @ b
            best = min(best, time.perf_counter() - t)
    finally:
        torch.set_num_threads(old)
    return 2 * size**3 / best * (threads or old)


def _sdpa_cpu(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return flop_counter.sdpa_flop_count(query_shape, key_shape, value_shape)


def _sdpa_cpu_backward(grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return flop_counter.sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)


# torch counts the CUDA attention kernels itself, but not the CPU one.
CPU_ATTENTION_FLOPS = {
    aten._scaled_dot_product_flash_attention_for_cpu: _sdpa_cpu,
    aten._scaled_dot_product_flash_attention_for_cpu_backward: _sdpa_cpu_backward,
}


def measured_flops_per_sample(model: nn.Module, seq_len: int, batch_size: int = 1, backward: bool = True) -> float:
    """FLOPs per sample that FlopCounterMode sees in a forward (+ backward) pass of ``model`` on a
    random (batch_size, seq_len) batch: encoders and attention included (attention counted as full
    T x T, masked or not; embedding look-ups and elementwise ops are free). The model's gradients
    and train/eval mode are left as they were."""
    cfg = model.cfg
    module = atari if isinstance(cfg, AtariConfig) else nethack
    device = next(model.parameters()).device
    batch = module.random_batch(cfg, batch_size, seq_len, device=device)
    grads = [p.grad for p in model.parameters()]
    was_training = model.training
    model.eval()
    try:
        counter = flop_counter.FlopCounterMode(display=False, custom_mapping=CPU_ATTENTION_FLOPS)
        with counter, torch.set_grad_enabled(backward):
            logits, _ = model(batch)
            if backward:
                logits.float().sum().backward()
    finally:
        for p, g in zip(model.parameters(), grads):
            p.grad = g
        model.train(was_training)
    return counter.get_total_flops() / (batch_size * seq_len)
