"""BCPolicy's step-by-step decoding (KV cache / LSTM state, batched lanes) against the training
forward pass (the model's full-sequence forward, as ``train bc`` calls it) over the same real steps
of scripted NetHack games: same logits, in float32 and eval mode, across episode boundaries and for
more steps than the training ``seq_len``."""
from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from trajdata.evaluate.policy import BCPolicy  # noqa: E402
from trajdata.format.dataset import Dataset  # noqa: E402
from trajdata.models.nethack import NetHackConfig, NetHackModel  # noqa: E402

FIELDS = ["tty_chars", "tty_colors", "tty_cursor", "inv_glyphs"]
STEPS = 40  # steps of each episode used (the scripted games are longer)
ATOL, RTOL = 5e-5, 1e-5  # float32: batch-1 and batched kernels differ by ~2e-5 on logits ~10


def episodes(root, n: int, steps: int) -> list[dict]:
    """The first ``steps`` steps of the first ``n`` episodes of a dataset: field -> (T, ...) arrays."""
    ds = Dataset(root)
    out = []
    for row in ds.index_rows()[:n]:
        chunks = list(ds.episode(row["id"], FIELDS + ["action"]))
        ep = {k: np.concatenate([c.fields[k] for c in chunks])[:steps] for k in FIELDS + ["action"]}
        assert len(ep["action"]) == steps, "scripted_data episodes are longer than STEPS"
        out.append(ep)
    return out


def make_model(core: str, seed: int = 0) -> NetHackModel:
    torch.manual_seed(seed)
    model = NetHackModel(NetHackConfig(width=64, layers=2, heads=2, core=core))
    with torch.no_grad():  # sharper than the init, so that what a step attends to shows in its logits
        for name, p in model.core.named_parameters():
            if p.dim() >= 2:
                p.normal_(0, 0.15)
        model.head.weight.mul_(10)
    return model.eval()


def forward(model, eps: list[dict], reset: list[list[int]], prev: list[int]) -> np.ndarray:
    """The training forward: ``eps`` as a (B, T) batch with ``action`` (the shifted previous actions),
    ``reset`` rows and the state's previous action of step 0 (-1: none)."""
    batch = {k: torch.from_numpy(np.stack([e[k] for e in eps])) for k in FIELDS + ["action"]}
    r = torch.zeros(batch["action"].shape, dtype=torch.bool)
    for b, ts in enumerate(reset):
        r[b, ts] = True
    batch["reset"] = r
    state = model.initial_state(len(eps))
    state.prev_action = torch.tensor(prev, dtype=torch.long)
    with torch.no_grad():
        logits, _ = model(batch, state)
    return logits.float().numpy()


def training_reference(model, ep: dict, seq_len: int) -> np.ndarray:
    """(T, A) logits of an episode as ``train bc`` computes them: unrolls of ``seq_len`` steps from the
    episode start, ``logits, carried = model(batch, carried)``, the state carried from one to the next."""
    batch = {k: torch.from_numpy(v)[None] for k, v in ep.items()}
    reset = torch.zeros(batch["action"].shape, dtype=torch.bool)
    reset[0, 0] = True
    batch["reset"] = reset
    out, carried = [], None
    with torch.no_grad():
        for a in range(0, reset.shape[1], seq_len):
            logits, carried = model({k: v[:, a:a + seq_len] for k, v in batch.items()}, carried)
            out.append(logits[0].float().numpy())
    return np.concatenate(out)


def sliding_reference(model, ep: dict, context: int) -> np.ndarray:
    """(T, A) logits of every step recomputed over the last ``context`` steps of its episode."""
    n = len(ep["action"])
    first = forward(model, [{k: v[:context] for k, v in ep.items()}], [[0]], [-1])[0]
    wins = [{k: v[t - context + 1:t + 1] for k, v in ep.items()} for t in range(context, n)]
    later = forward(model, wins, [[] for _ in wins], [int(ep["action"][t - context]) for t in range(context, n)])
    return np.concatenate([first, later[:, -1]])


def run_policy(model, context: int, lanes: list[list[dict]], train_seq_len: int = 16) -> list[list[np.ndarray]]:
    """Play the recorded actions of each lane's episodes one step at a time, all lanes in one batch
    (a lane whose episodes are over leaves, as in ``run_unit``); returns each episode's (T, A) logits."""
    ckpt = {"family": "nethack", "train": {"seq_len": train_seq_len}}
    policy = BCPolicy(model, ckpt, context=context if context != train_seq_len else None)
    assert policy.context == context
    policy.start(len(lanes))
    pos = [[0, 0] for _ in lanes]  # (episode, step) of each lane
    out = [[[] for _ in eps] for eps in lanes]
    for lane in range(len(lanes)):
        policy.begin(lane, lane)
    while True:
        active = [i for i in range(len(lanes)) if pos[i][0] < len(lanes[i])]
        if not active:
            break
        obs = [{k: lanes[i][pos[i][0]][k][pos[i][1]] for k in FIELDS} for i in active]
        logits = policy.logits(active, obs)
        actions = [int(lanes[i][pos[i][0]]["action"][pos[i][1]]) for i in active]
        policy.played(active, actions)
        for i, row in zip(active, logits):
            e, t = pos[i]
            out[i][e].append(row)
            if t + 1 == len(lanes[i][e]["action"]):
                pos[i] = [e + 1, 0]
                if e + 1 < len(lanes[i]):
                    policy.begin(i, 10 + i)
            else:
                pos[i][1] = t + 1
    return [[np.stack(x) for x in eps] for eps in out]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One torch thread, as an eval worker runs (on a busy machine 2 threads were ~30x slower here)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def games(scripted_data):
    a, b, c = episodes(scripted_data, 3, STEPS)
    c = {k: v[:STEPS // 2] for k, v in c.items()}  # shorter: lanes end and leave the batch at other times
    return a, b, c


def close(x, y) -> bool:
    return x.shape == y.shape and np.allclose(x, y, rtol=RTOL, atol=ATOL)


def test_transformer_kv_cache_matches_training_forward(games):
    a, b, c = games
    context = 8  # the training seq_len: every episode has 5x more steps
    model = make_model("transformer")
    d = {k: v[:13] for k, v in b.items()}  # lane 1: C (20 steps), then a new game while lane 0 is mid-block
    got = run_policy(model, context, [[a, b], [c, d]], train_seq_len=context)
    for ep, logits in ((a, got[0][0]), (b, got[0][1]), (c, got[1][0]), (d, got[1][1])):
        ref = training_reference(model, ep, context)
        assert logits.shape == (len(ep["action"]), 121)
        assert close(logits, ref), np.abs(logits - ref).max()
    # across the boundary, as a training unroll sees it: A's last steps then B's first, reset between
    k = 5
    joined = {key: np.concatenate([a[key][-k:], b[key][:context - k]]) for key in a}
    ref = forward(model, [joined], [[k]], [int(a["action"][-k - 1])])[0]
    assert close(got[0][1][:context - k], ref[k:])
    # the test can tell: the whole episode, a sliding window, or no reset give other logits
    for other in (forward(model, [a], [[0]], [-1])[0], sliding_reference(model, a, context)):
        assert np.abs(other[context:] - got[0][0][context:]).max() > 1000 * ATOL
    no_reset = forward(model, [joined], [[]], [int(a["action"][-k - 1])])[0]
    assert np.abs(no_reset[k:] - got[0][1][:context - k]).max() > 1000 * ATOL


def test_transformer_context_override_and_one_step(games):
    a, _, _ = games
    model = make_model("transformer", seed=1)
    for context in (1, 3):
        got = run_policy(model, context, [[a]], train_seq_len=8)[0][0]
        assert close(got, training_reference(model, a, context))


def test_lstm_state_matches_training_forward(games):
    a, b, c = games
    model = make_model("lstm")
    got = run_policy(model, 8, [[a, b], [c]], train_seq_len=8)
    # the LSTM sees the whole episode: one forward over A then B (reset at B's start), one over C
    ab = {k: np.concatenate([a[k], b[k]]) for k in a}
    ref = forward(model, [ab], [[0, len(a["action"])]], [-1])[0]
    assert close(np.concatenate(got[0]), ref), np.abs(np.concatenate(got[0]) - ref).max()
    ref_c = forward(model, [c], [[0]], [-1])[0]
    assert close(got[1][0], ref_c)
    # the reset at B's start zeroes (h, c) and the previous action: B after A = B from a fresh state
    assert close(got[0][1], forward(model, [b], [[0]], [-1])[0])
