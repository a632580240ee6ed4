"""BC models: shapes, episode boundaries inside an unroll, state carry, KV cache, ablations, sizes, FLOPs."""
from __future__ import annotations

import importlib.util

import pytest
import torch

from trajdata.errors import ConfigError, ExtraError
from trajdata.models import (ATARI_WIDTHS, NETHACK_GRID, AtariConfig, AtariModel, NetHackConfig, NetHackModel,
                             effective_params, measured_flops_per_sample, nethack_grid, parse_count,
                             size_for_params, training_flops)
from trajdata.models import atari, nethack
from trajdata.models.flops import (atari_forward_flops, count_params, flops_per_sample, nethack_part_flops,
                                   total_flops_per_sample)
from trajdata.models.nethack import episode_positions
from trajdata.models.sizes import atari_width_for_params

OBS = ("tty_chars", "tty_colors", "tty_cursor", "inv_glyphs", "glyphs", "action")
PREV = slice(512 + 648 + 128, 512 + 648 + 128 + 121)  # previous-action one-hot in the encoder output
HAS_MAMBA = importlib.util.find_spec("mamba_ssm") is not None


def tiny(core="transformer", seed=0, **kw) -> NetHackModel:
    torch.manual_seed(seed)
    return NetHackModel(NetHackConfig(width=64, layers=2, heads=2, core=core, **kw)).eval()


def batch(model, T, B=1, seed=1, resets=()):
    b = nethack.random_batch(model.cfg, B, T, seed=seed)
    for t in resets:
        b["reset"][:, t] = True
    return b


def run(model, b, state=None):
    with torch.no_grad():
        return model(b, state)


def cut(b, a, z):
    return {k: v[:, a:z] for k, v in b.items()}


def paper_n(h, L):
    return 16 * L * h * h + h * h + 2 * L * h + 1858 * h + 121


# ---- shapes and inputs ---------------------------------------------------------------------------

@pytest.mark.parametrize("core", ["transformer", "lstm"])
def test_shapes_and_state(core):
    m = tiny(core)
    b = batch(m, 16, B=3)
    logits, state = run(m, b)
    assert logits.shape == (3, 16, 121) and logits.dtype == torch.float32
    assert torch.isfinite(logits).all()
    assert torch.equal(state.prev_action, b["action"][:, -1].long())
    if core == "lstm":
        assert state.hidden[0].shape == (2, 3, 64)
    else:
        assert state.kv is None and state.hidden is None


def test_encoder_width_is_paper_d_in():
    m = tiny()
    b = batch(m, 4)
    x = m.encoder({k: v.flatten(0, 1) for k, v in b.items()}, torch.zeros(4, dtype=torch.long))
    assert NetHackConfig().d_in == 1729 and x.shape == (4, 1729)
    assert m.mixer.net[0].in_features == 1729
    assert 3.8e6 < count_params(m.encoder) < 4.0e6  # the paper: ~3.9M fixed encoder parameters


def test_config_errors():
    with pytest.raises(ConfigError) as e:
        NetHackConfig(core="gru")
    assert e.value.field == "core"
    with pytest.raises(ConfigError) as e:
        NetHackConfig(width=100, heads=3)
    assert e.value.field == "heads"
    with pytest.raises(ConfigError) as e:
        AtariConfig(width=0)
    assert e.value.field == "width"


# ---- episode boundaries inside one unroll --------------------------------------------------------

@pytest.mark.parametrize("core", ["transformer", "lstm"])
def test_no_information_crosses_a_reset(core):
    m = tiny(core)
    T, k = 24, 10
    b = batch(m, T, resets=(0, k))
    other = batch(m, T, seed=2)
    changed = dict(b)
    for name in OBS:
        changed[name] = torch.cat([other[name][:, :k], b[name][:, k:]], 1)
    y, _ = run(m, b)
    y2, _ = run(m, changed)
    assert torch.allclose(y[:, k:], y2[:, k:], atol=1e-5), (y[:, k:] - y2[:, k:]).abs().max()
    assert not torch.allclose(y[:, :k], y2[:, :k], atol=1e-3)
    no_reset = dict(b, reset=torch.zeros_like(b["reset"]))
    y3, _ = run(m, no_reset)
    y4, _ = run(m, dict(changed, reset=no_reset["reset"]))
    assert not torch.allclose(y3[:, k:], y4[:, k:], atol=1e-3)  # without the reset, the past does matter


def test_previous_action_is_none_at_a_reset():
    m = tiny()
    T, k = 12, 5
    b = batch(m, T, resets=(k,))
    state = m.initial_state(1)
    state.prev_action[:] = 7
    prev = m.previous_actions(b, state)
    act = b["action"].long()
    assert prev[0, 0] == 7 and prev[0, k] == -1
    assert torch.equal(prev[0, 1:k], act[0, : k - 1]) and torch.equal(prev[0, k + 1 :], act[0, k:-1])
    assert m.previous_actions(b)[0, 0] == -1
    with torch.no_grad():
        x = m.encoder({n: v.flatten(0, 1) for n, v in b.items()}, prev.flatten())
    onehot = x[:, PREV]
    assert onehot[k].abs().sum() == 0
    assert onehot[0].argmax() == 7 and onehot[k + 1].argmax() == act[0, k] and onehot.sum() == T - 1
    assert m.previous_actions(dict(b, prev_action=torch.full((1, T), 3)))[0].tolist() == [3] * k + [-1] + [3] * (T - k - 1)


def test_positions_restart_at_each_episode():
    reset = torch.tensor([[False, False, True, False, False, True, True, False]])
    assert episode_positions(reset).tolist() == [[0, 1, 0, 1, 2, 0, 0, 1]]
    assert episode_positions(reset, torch.tensor([5])).tolist() == [[5, 6, 0, 1, 2, 0, 0, 1]]


@pytest.mark.parametrize("core", ["transformer", "lstm"])
def test_episode_logits_do_not_depend_on_where_it_sits(core):
    m = tiny(core)
    ep, before, after = batch(m, 8, seed=3), batch(m, 6, seed=4), batch(m, 5, seed=5)
    first = {k: torch.cat([before[k], ep[k]], 1) for k in ep}
    first["reset"][:, [0, 6]] = True
    second = {k: torch.cat([ep[k], after[k]], 1) for k in ep}
    second["reset"][:, [0, 8]] = True
    y1, _ = run(m, first)
    y2, _ = run(m, second)
    assert torch.allclose(y1[:, 6:], y2[:, :8], atol=1e-5)


def test_padding_is_never_attended():
    m = tiny()
    b = batch(m, 12, resets=(0,))
    b["mask"][:, 8:] = False
    y, _ = run(m, b)
    y_short, _ = run(m, cut(b, 0, 8))
    assert torch.allclose(y[:, :8], y_short, atol=1e-5)
    garbage = dict(b, tty_chars=torch.cat([b["tty_chars"][:, :8], batch(m, 4, seed=9)["tty_chars"]], 1))
    assert torch.isfinite(run(m, garbage)[0]).all()
    front = batch(m, 12, seed=2)
    front["mask"][:, :4] = False
    state = m.initial_state(1)
    state.prev_action[:] = front["action"][:, 3]
    y, _ = run(m, front)
    assert torch.allclose(y[:, 4:], run(m, cut(front, 4, 12), state)[0], atol=1e-5)  # padded keys are masked


# ---- state across calls --------------------------------------------------------------------------

def test_lstm_state_carries_across_unrolls():
    m = tiny("lstm")
    b = batch(m, 32, B=2, resets=(0, 20))
    b["reset"][1, 20] = False
    full, end = run(m, b)
    y1, s = run(m, cut(b, 0, 16))
    y2, s2 = run(m, cut(b, 16, 32), s)
    assert torch.allclose(torch.cat([y1, y2], 1), full, atol=1e-5)
    assert torch.allclose(s2.hidden[0], end.hidden[0], atol=1e-5)
    y2_fresh, _ = run(m, cut(b, 16, 32))
    assert not torch.allclose(y2_fresh[1], full[1, 16:], atol=1e-3)  # the carried state mattered
    reset_now = dict(cut(b, 16, 32), reset=torch.ones(2, 16, dtype=torch.bool) & (torch.arange(16) == 0))
    assert torch.allclose(run(m, reset_now, s)[0], run(m, reset_now)[0], atol=1e-6)  # a reset drops it


def test_transformer_kv_cache_decoding_matches_full_unroll():
    m = tiny()
    T = 20
    b = batch(m, T, B=2, resets=(0,))
    b["reset"][0, 9] = True
    b["reset"][1, 14] = True
    full, _ = run(m, b)
    state, steps = m.initial_state(2, cache_len=T), []
    for t in range(T):
        y, state = run(m, cut(b, t, t + 1), state)
        steps.append(y)
    assert torch.allclose(torch.cat(steps, 1), full, atol=1e-5)
    state = m.initial_state(2, cache_len=T)
    y1, state = run(m, cut(b, 0, 7), state)
    y2, state = run(m, cut(b, 7, T), state)
    assert torch.allclose(torch.cat([y1, y2], 1), full, atol=1e-5)
    assert state.pos.tolist() == [T - 9, T - 14] and state.kv[0][0].shape[2] == T


def test_kv_cache_is_bounded():
    m = tiny()
    b = batch(m, 10, resets=(0,))
    full, _ = run(m, b)
    state, steps = m.initial_state(1, cache_len=4), []
    for t in range(10):
        y, state = run(m, cut(b, t, t + 1), state)
        steps.append(y)
        assert state.kv[1][0].shape[2] == min(t + 1, 4) and state.kv_valid.shape == (1, min(t + 1, 4))
    steps = torch.cat(steps, 1)
    assert torch.allclose(steps[:, :5], full[:, :5], atol=1e-5)  # until the window is full
    assert not torch.allclose(steps[:, 6:], full[:, 6:], atol=1e-4)
    with pytest.raises(ConfigError):
        tiny("lstm").initial_state(1, cache_len=4)


def test_transformer_state_carries_the_previous_action():
    m = tiny()
    b = batch(m, 8)
    _, s = run(m, cut(b, 0, 4))
    assert m.previous_actions(cut(b, 4, 8), s)[0, 0] == b["action"][0, 3]


# ---- input options -------------------------------------------------------------------------------

@pytest.mark.parametrize("flags, d_in", [
    (dict(), 1729),
    (dict(use_inventory=False), 1729 - 256),
    (dict(use_message=False), 1729 - 64),
    (dict(use_inventory=False, use_message=False), 1729 - 320),
    (dict(use_glyphs=True), 1729 + 256),
])
def test_input_flags_change_the_input_width(flags, d_in):
    m = tiny(**flags)
    assert m.cfg.d_in == d_in and m.mixer.net[0].in_features == d_in
    b = batch(m, 6)
    if not m.cfg.use_inventory:
        del b["inv_glyphs"]
    if not m.cfg.use_glyphs:
        del b["glyphs"]
    assert run(m, b)[0].shape == (1, 6, 121)
    assert effective_params(m.cfg) - effective_params(NetHackConfig(width=64, layers=2)) == (d_in - 1729) * 64


@pytest.mark.parametrize("flag, field, rows", [
    ("use_glyphs", "glyphs", None),
    ("use_inventory", "inv_glyphs", None),
    ("use_message", "tty_chars", slice(0, 1)),
])
def test_an_input_matters_only_when_used(flag, field, rows):
    b = batch(tiny(), 6)
    other = batch(tiny(), 6, seed=7)
    changed = dict(b)
    if rows is None:
        changed[field] = other[field]
    else:
        changed[field] = b[field].clone()
        changed[field][:, :, rows] = other[field][:, :, rows]
    for on in (True, False):
        m = tiny(**{flag: on})
        same = torch.allclose(run(m, b)[0], run(m, changed)[0], atol=1e-6)
        assert same is (not on), (flag, on)


def test_crop_is_centred_on_the_cursor_and_zero_outside():
    grid = torch.arange(21 * 80).view(1, 1, 21, 80) + 1
    w = nethack.crop(grid, torch.tensor([[10, 40]]))
    assert w.shape == (1, 1, 9, 9) and w[0, 0, 4, 4] == grid[0, 0, 10, 40] and w[0, 0, 0, 0] == grid[0, 0, 6, 36]
    corner = nethack.crop(grid, torch.tensor([[0, 0]]))
    assert corner[0, 0, 4, 4] == grid[0, 0, 0, 0] and corner[0, 0, :4].sum() == 0 and corner[0, 0, :, :4].sum() == 0
    off = nethack.crop(grid, torch.tensor([[-1, 79]]))  # cursor on the message line
    assert off[0, 0, 5, 4] == grid[0, 0, 0, 79] and off[0, 0, :5].sum() == 0


def test_bottom_line_channels():
    enc = nethack.BottomLineEncoder()
    seen = {}
    enc.conv.register_forward_hook(lambda mod, inp, out: seen.update(x=inp[0]))
    lines = torch.full((1, 2, 80), ord(" "), dtype=torch.uint8)
    lines[0, 0, :4] = torch.tensor([ord(c) for c in "D:-9"])
    enc(lines)
    x = seen["x"][0]
    assert x.shape == (2, 160)
    assert torch.allclose(x[0, :4], (torch.tensor([68.0, 58, 45, 57]) - 32) / 96)
    assert torch.allclose(x[1, :5], torch.tensor([0, 0, -0.2, 1.0, 0]))


@pytest.mark.skipif(HAS_MAMBA, reason="mamba_ssm is installed")
def test_mamba_core_needs_mamba_ssm():
    with pytest.raises(ExtraError, match="mamba_ssm"):
        NetHackModel(NetHackConfig(width=64, layers=1, core="mamba"))


@pytest.mark.skipif(not (HAS_MAMBA and torch.cuda.is_available()), reason="mamba core needs mamba_ssm and CUDA")
def test_mamba_core_forward():
    torch.manual_seed(0)
    m = NetHackModel(NetHackConfig(width=64, layers=2, core="mamba")).cuda().eval()
    b = batch(m, 16, resets=(0, 8))
    y, _ = run(m, {k: v.cuda() for k, v in b.items()})
    assert y.shape == (1, 16, 121) and torch.isfinite(y).all()


# ---- sizes and FLOPs -----------------------------------------------------------------------------

@pytest.mark.parametrize("h, L", NETHACK_GRID)
def test_effective_params_is_the_paper_formula(h, L):
    cfg = NetHackConfig(width=h, layers=L)
    assert effective_params(cfg) == paper_n(h, L)
    with torch.device("meta"):
        m = NetHackModel(cfg)
    assert count_params(*m.scaled_modules()) == paper_n(h, L) - h  # no unused 1 x h token embedding
    assert training_flops(cfg, 1000) == 6 * paper_n(h, L) * 1000


def test_paper_preset_and_other_cores():
    assert effective_params(NetHackConfig(width=384, layers=4)) == 10_301_305
    assert [c.width for c in nethack_grid()] == [h for h, _ in NETHACK_GRID]
    h, L = 128, 2
    lstm = NetHackConfig(width=h, layers=L, core="lstm")
    assert effective_params(lstm) == (h * h + 1735 * h) + L * (8 * h * h + 8 * h) + (121 * h + 121)
    m = tiny("lstm")
    assert effective_params(m.cfg) == count_params(*m.scaled_modules())


def test_parse_count():
    assert parse_count("10M") == 10_000_000 and parse_count("1.5e6") == 1_500_000
    assert parse_count(" 250k ") == 250_000 and parse_count("2B") == 2 * 10**9 and parse_count(3e7) == 30_000_000
    assert parse_count(".5m") == 500_000
    for bad in ("ten", "10X", "", "-5M", 0):
        with pytest.raises(ConfigError):
            parse_count(bad)


def test_size_for_params_picks_sensible_sizes():
    assert size_for_params("10M") == (384, 4)
    assert size_for_params("1.5e6") == (192, 2)
    assert size_for_params(1e3) == (64, 1)
    assert [size_for_params(paper_n(h, L)) for h, L in NETHACK_GRID] == list(NETHACK_GRID)
    last = 0
    for target in (1.5e6, 3e6, 1e7, 3e7, 1e8, 3e8, 1e9):
        h, L = size_for_params(target)
        assert h % 64 == 0 and 0.6 <= h / (100 * L) <= 1.6 and abs(paper_n(h, L) / target - 1) < 0.15, (target, h, L)
        assert paper_n(h, L) > last
        last = paper_n(h, L)
    small = dict(use_inventory=False, use_message=False)
    h, L = size_for_params("10M", base=NetHackConfig(**small))
    assert abs(effective_params(NetHackConfig(width=h, layers=L, **small)) / 1e7 - 1) < 0.1
    assert size_for_params("10M", multiple=128)[0] % 128 == 0


# seed code's table (il_scale/atari/networks/atari_networks.py, 4 actions)
SEED_ATARI_PARAMS = (725, 2575, 4969, 9580, 19985, 50995, 100814, 202654, 499045, 1007257, 2005507, 4985110)


def test_atari_params_match_the_seed_table():
    assert [effective_params(AtariConfig(w, 4)) for w in ATARI_WIDTHS] == list(SEED_ATARI_PARAMS)
    assert effective_params(AtariConfig(50, 6)) == count_params(AtariModel(AtariConfig(50, 6)))
    assert atari_width_for_params(1e6, n_actions=4) == 117


@pytest.mark.parametrize("w, A", [(1, 4), (8, 6), (34, 18)])
def test_atari_flops_match_hand_formula(w, A):
    cfg = AtariConfig(w, A)
    hand = (2 * 20 * 20 * w * 8 * 8 * 4          # conv1: 84 -> 20
            + 2 * 9 * 9 * (2 * w) * 4 * 4 * w    # conv2: 20 -> 9
            + 2 * 7 * 7 * (2 * w) * 3 * 3 * (2 * w)  # conv3: 9 -> 7
            + 2 * 7 * 7 * 2 * w * A)             # linear
    assert atari_forward_flops(cfg) == hand
    assert flops_per_sample(cfg) == 3 * hand and training_flops(cfg, 10) == 30 * hand
    torch.manual_seed(0)
    assert measured_flops_per_sample(AtariModel(cfg), seq_len=3, batch_size=2, backward=False) == hand


def test_atari_model_shapes():
    m = AtariModel(AtariConfig(8, 6))
    b = atari.random_batch(m.cfg, 2, 5)
    y, s = m(b)
    assert y.shape == (2, 5, 6) and s is None
    m1 = AtariModel(AtariConfig(8, 6, frame_stack=1))
    assert m1(dict(frame=b["frame"][:, :, 0]))[0].shape == (2, 5, 6)
    assert isinstance(m1.cnn[-1], torch.nn.Conv2d)
    assert isinstance(AtariModel(AtariConfig(8, 6, final_relu=True)).cnn[-1], torch.nn.ReLU)


def test_measured_flops_count_encoders_and_attention():
    m = tiny()
    m.train()
    grad = torch.ones_like(m.head.bias)
    m.head.bias.grad = grad
    f16 = measured_flops_per_sample(m, seq_len=16)
    f32 = measured_flops_per_sample(m, seq_len=32)
    assert m.training and m.head.bias.grad is grad
    assert f16 > 6 * effective_params(m.cfg) * 10  # the fixed encoders dominate at this size
    h, L = m.cfg.width, m.cfg.layers
    assert f32 - f16 == 14 * (32 - 16) * h * L  # attention: 4T^2h forward + 10T^2h backward per layer


def test_part_flops_are_what_the_flop_counter_sees():
    m = tiny()
    T = 16
    parts = nethack_part_flops(m.cfg, T)
    assert set(parts) == {"map", "crop", "bottom", "message", "inventory", "mixer", "core", "head"}
    h, L = m.cfg.width, m.cfg.layers
    # the counter's CPU attention backward recomputes the scores: 2Th per layer more than 2x forward
    assert measured_flops_per_sample(m, seq_len=T) - total_flops_per_sample(m.cfg, T) == 2 * T * h * L
    assert parts["map"][0] > 25e6 and parts["mixer"] == (2 * (1729 * h + h * h), 4 * (1729 * h + h * h))
    assert total_flops_per_sample(m.cfg, T) > 50 * 6 * effective_params(m.cfg)  # the fixed encoders dominate


# ---- the fast encoder path computes the reference function -----------------------------------------

def _with_repeats(model, B=2, T=12, seed=3):
    """A batch whose maps repeat (as consecutive game steps' do), with the cursor moving on some."""
    b = batch(model, T, B=B, seed=seed, resets=(0, 7))
    for t in (1, 2, 5, 9, 10):
        for k in ("tty_chars", "tty_colors"):
            b[k][:, t] = b[k][:, t - 1]
    b["tty_cursor"][:, 2] = b["tty_cursor"][:, 1]
    b["tty_chars"][1, 5] = b["tty_chars"][0, 4]  # the same map in another lane
    b["tty_colors"][1, 5] = b["tty_colors"][0, 4]
    return b


def test_embedding_table_gives_the_two_lookups_bitwise():
    m = tiny()
    enc = m.encoder
    cells = torch.randint(0, 256 * 128, (3, 5, 7), dtype=torch.int32)
    ref = (enc.char_emb(cells.long() // 128) + enc.color_emb(cells.long() % 128)).permute(0, 3, 1, 2)
    assert torch.equal(enc.embed(cells), ref)
    grad = torch.randn_like(ref)
    enc.embed(cells).backward(grad)
    fast = enc.char_emb.weight.grad.clone(), enc.color_emb.weight.grad.clone()
    enc.zero_grad()
    ref.backward(grad)
    assert all(torch.allclose(a, b.grad, atol=1e-5) for a, b in zip(fast, (enc.char_emb.weight, enc.color_emb.weight)))


def test_embedding_table_is_kept_without_autograd_until_the_weights_change():
    """Acting and evaluating (no autograd) reuse the char + colour table; an in-place weight update (an
    optimizer step, a weight sync to an actor) or a new weight tensor rebuilds it; with autograd it is
    built per call, so gradients reach the embeddings."""
    enc = tiny().encoder
    cells = torch.randint(0, 256 * 128, (2, 3, 4), dtype=torch.int32)

    def ref():
        return (enc.char_emb(cells.long() // 128) + enc.color_emb(cells.long() % 128)).permute(0, 3, 1, 2)

    with torch.no_grad():
        first = enc.sum_table()
        assert enc.sum_table() is first and torch.equal(enc.embed(cells), ref())
        enc.char_emb.weight.add_(1.0)
        assert enc.sum_table() is not first and torch.equal(enc.embed(cells), ref())
        kept = enc.sum_table()
        enc.color_emb.weight = torch.nn.Parameter(enc.color_emb.weight * 2)
        assert enc.sum_table() is not kept and torch.equal(enc.embed(cells), ref())
    out = enc.embed(cells)
    assert out.requires_grad and enc.sum_table() is not enc.sum_table()
    out.sum().backward()
    assert enc.char_emb.weight.grad.abs().sum() > 0


def test_counted_batch_norm_is_the_full_batch_norm():
    torch.manual_seed(0)
    x = torch.randn(4, 3, 5, 6, dtype=torch.float64)
    which = torch.tensor([0, 1, 1, 3, 0, 0, 2])
    full = x[which].requires_grad_()
    distinct, inverse, counts = torch.unique(which, return_inverse=True, return_counts=True)
    xd = x[distinct].requires_grad_()
    ref, bn = torch.nn.BatchNorm2d(3).double(), nethack.CountedBatchNorm2d(3).double()
    with torch.no_grad():
        ref.weight.uniform_(0.5, 2)
        ref.bias.uniform_(-1, 1)
    bn.load_state_dict(ref.state_dict())
    grad = torch.randn(7, 3, 5, 6, dtype=torch.float64)
    for _ in range(2):  # twice: the running averages move on
        y_ref, y = ref(full), bn(xd, counts)[inverse]
        assert torch.allclose(y, y_ref, atol=1e-12)
    (y_ref * grad).sum().backward()
    (y * grad).sum().backward()
    assert torch.allclose(xd.grad, torch.zeros_like(xd).index_add_(0, inverse, full.grad), atol=1e-12)
    for a, b in ((bn.weight.grad, ref.weight.grad), (bn.bias.grad, ref.bias.grad)):
        assert torch.allclose(a, b, atol=1e-12)
    for k, v in ref.state_dict().items():
        assert torch.allclose(bn.state_dict()[k].double(), v.double(), atol=1e-12), k
    bn.eval()
    ref.eval()
    assert torch.allclose(bn(x, counts), ref(x), atol=1e-12)  # eval: running statistics, counts unused


def _fast_matches_reference(model_kw: dict, make_batch):
    """A tiny float64 model on its fast path and a copy on the reference path (``fast = False``): the
    same logits and parameter gradients on ``make_batch(model)``; returns both (after backward) and the batch."""
    m = tiny(**model_kw).double().train()
    ref = tiny(**model_kw).double().train()
    ref.load_state_dict(m.state_dict())
    ref.encoder.fast = False
    b = make_batch(m)
    (y, _), (y_ref, _) = m(b), ref(b)
    assert torch.allclose(y, y_ref, atol=1e-9)
    grad = torch.randn_like(y)
    (y * grad).sum().backward()
    (y_ref * grad).sum().backward()
    for (name, p), q in zip(m.named_parameters(), ref.parameters()):
        assert torch.allclose(p.grad, q.grad, atol=1e-9), name
    return m, ref, b


@pytest.mark.parametrize("core", ["transformer", "lstm"])
def test_fast_encoder_computes_the_reference_function(core):
    """Shared look-up table, each distinct map and crop encoded once with count-weighted batch norm:
    the same logits, gradients and BatchNorm statistics as the reference path (float64)."""
    m, ref, b = _fast_matches_reference(dict(core=core), _with_repeats)
    for (name, a), c in zip(m.named_buffers(), ref.buffers()):
        assert torch.allclose(a.double(), c.double(), atol=1e-12), name
    m.eval()
    ref.eval()
    with torch.no_grad():
        assert torch.allclose(m(b)[0], ref(b)[0], atol=1e-9)


# ---- the CPU proxy (encoders = "cpu") ----------------------------------------------------------------

def test_cpu_proxy_is_counted_like_the_paper_agent():
    """Its map encoder is one linear layer over 3 x 4 block means: d_in 1473 (the ResNet's 512
    features become 256), N is mixer + core + head as for the paper's agent, and the encoders' FLOPs
    shrink from ~455x to ~86x of 6N at h = 16."""
    m = tiny(encoders="cpu")
    assert m.cfg.d_in == 1729 - 512 + 256 == 1473 and m.mixer.net[0].in_features == 1473
    assert effective_params(m.cfg) - effective_params(NetHackConfig(width=64, layers=2)) == (1473 - 1729) * 64
    assert effective_params(m.cfg) == count_params(*tiny(encoders="cpu").scaled_modules()) + 64  # + the unused 1 x h
    assert isinstance(m.encoder.map, nethack.CoarseMapEncoder)
    assert count_params(m.encoder.map) == 2240 * 256 + 256 + 2 * 256
    parts = nethack_part_flops(m.cfg, 16)
    assert parts["map"] == (2 * 2240 * 256, 4 * 2240 * 256)
    assert {k: v for k, v in parts.items() if k != "map" and k != "mixer"} == \
        {k: v for k, v in nethack_part_flops(tiny().cfg, 16).items() if k != "map" and k != "mixer"}
    small = [total_flops_per_sample(NetHackConfig(width=16, layers=1, encoders=e), 128)
             / flops_per_sample(NetHackConfig(width=16, layers=1, encoders=e)) for e in ("paper", "cpu")]
    assert 450 < small[0] < 460 and 80 < small[1] < 90
    assert measured_flops_per_sample(m, seq_len=16) - total_flops_per_sample(m.cfg, 16) == 2 * 16 * 64 * 2
    with pytest.raises(ConfigError) as e:
        NetHackConfig(encoders="tiny")
    assert e.value.field == "encoders"


def test_cpu_proxy_map_is_the_block_means_and_sees_every_cell():
    m = tiny(encoders="cpu")
    b = batch(m, 3)
    obs = {k: v.flatten(0, 1) for k, v in b.items()}
    chars, colors = obs["tty_chars"], obs["tty_colors"]
    cells = chars[:, nethack.MAP_ROWS].int() * 128 + (colors[:, nethack.MAP_ROWS].int() & 127)
    emb = m.encoder.char_emb(cells.long() // 128) + m.encoder.color_emb(cells.long() % 128)  # (3, 21, 80, 16)
    means = torch.nn.functional.avg_pool2d(emb.permute(0, 3, 1, 2), (3, 4)).permute(0, 2, 3, 1)  # (3, 7, 20, 16)
    with torch.no_grad():
        assert torch.allclose(m.encoder.coarse_map(cells), m.encoder.map(means.reshape(3, 140, 16)), atol=1e-6)
        base = m.encoder.coarse_map(cells)
        for r, c in ((0, 0), (20, 79), (10, 41)):  # one cell changed anywhere on the map changes the features
            other = cells.clone()
            other[:, r, c] = (other[:, r, c] + 128 * 7) % (256 * 128)
            assert not torch.allclose(m.encoder.coarse_map(other), base)


def test_unique_rows_is_torch_unique():
    x = torch.randint(0, 3, (500, 12), dtype=torch.int32)
    distinct, inverse = nethack.unique_rows(x)
    assert torch.equal(distinct[inverse], x)
    assert torch.equal(torch.unique(distinct, dim=0), torch.unique(x, dim=0))


def test_cpu_proxy_fast_path_computes_the_reference_function():
    """Each distinct 3 x 4 block embedded once: the same logits and gradients as every block's own look-ups."""
    def blank_blocks(m):
        b = _with_repeats(m)
        b["tty_chars"][:, :, 1:12, 20:60] = ord(" ")  # blank blocks, as a real map's unexplored part
        b["tty_colors"][:, :, 1:12, 20:60] = 0
        return b

    m, _, _ = _fast_matches_reference(dict(encoders="cpu"), blank_blocks)
    assert m.encoder.char_emb.weight.grad.abs().sum() > 0


# ---- learning ------------------------------------------------------------------------------------

def _overfit(m, b, lr: float, steps: int) -> list[float]:
    opt = torch.optim.Adam(m.parameters(), lr=lr)
    losses = []
    for _ in range(steps):
        logits, _ = m(b)
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), b["action"].flatten().long())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def test_tiny_nethack_model_overfits_a_batch():
    torch.manual_seed(0)
    m = NetHackModel(NetHackConfig(width=64, layers=1))
    losses = _overfit(m, batch(m, 16, B=2, resets=(0, 9)), lr=2e-3, steps=25)
    assert losses[-1] < 0.3 * losses[0], losses


def test_tiny_atari_model_overfits_a_batch():
    torch.manual_seed(0)
    m = AtariModel(AtariConfig(4, 6))
    losses = _overfit(m, atari.random_batch(m.cfg, 4, 4), lr=3e-3, steps=40)
    assert losses[-1] < 0.3 * losses[0], losses


@pytest.mark.filterwarnings("ignore:Mismatch dtype between input and weight")
def test_bf16_autocast_forward_and_cache():
    m = tiny()
    b = batch(m, 8, resets=(0, 4))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        y, _ = m(b)
        state = m.initial_state(1, cache_len=8)
        for t in range(3):
            y1, state = m(cut(b, t, t + 1), state)
    assert y.shape == (1, 8, 121) and torch.isfinite(y.float()).all()
    assert torch.allclose(y1[:, 0].float(), y[:, 2].float(), atol=0.1)
