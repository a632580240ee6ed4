"""The paper's NetHack agent for RL: the BC model with an LSTM core (``NetHackModel``: the same
fixed encoders, the scaled MLP mixer, LSTM core and policy head) plus a value (baseline) head.

N, the effective parameters, is counted as for BC (``models.flops.effective_params``: mixer + core +
policy head) plus the value head; C = 8 N D (Appendix E: each learner forward and backward, 6N,
has an actor forward, 2N, beside it). ``trajdata.rl.shape`` counts them.

BatchNorm layers (in the map and crop encoders) always use their running statistics, in actors and
learner alike, so the behaviour and target policies are one function (V-trace corrects for their
staleness only); they stay at their initial values, or at the BC snapshot's with ``--init``.
"""
from __future__ import annotations

from dataclasses import asdict

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from trajdata.errors import DataError
from trajdata.models.nethack import BOTTOM_DIM, CROP_DIM, MAP_DIM, NetHackConfig, NetHackModel, NetHackState
from trajdata.rl.env import model_fields


class RLAgent(nn.Module):
    """``policy`` (a ``NetHackModel`` with an LSTM core: a BC snapshot's layout) + ``baseline`` Linear(h, 1)."""

    def __init__(self, cfg: NetHackConfig):
        super().__init__()
        if cfg.core != "lstm":
            raise DataError(f"the RL agent has an LSTM core, not {cfg.core!r}")
        self.cfg = cfg
        self.policy = NetHackModel(cfg)
        self.baseline = nn.Linear(cfg.width, 1)
        self.fields = model_fields(cfg.use_inventory, cfg.use_glyphs)
        super().train(False)

    def train(self, mode: bool = True) -> RLAgent:
        """Always evaluation mode: BatchNorm keeps its running statistics (see the module docstring)."""
        return super().train(False)

    def initial_hidden(self, batch: int, device=None) -> tuple[Tensor, Tensor]:
        device = device or self.baseline.weight.device
        return tuple(torch.zeros(self.cfg.layers, batch, self.cfg.width, device=device) for _ in range(2))

    def unroll(self, obs: dict[str, Tensor], prev_action: Tensor, reset: Tensor,
               hidden: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor, tuple[Tensor, Tensor]]:
        """(B, T) steps from LSTM state ``hidden`` ((L, B, h) each): logits (B, T, A), values (B, T)
        and the state after the last step. ``reset`` (B, T) marks game starts: the state and the
        previous-action input are zeroed there."""
        m = self.policy
        B, T = prev_action.shape
        prev = prev_action.long().masked_fill(reset, -1)
        x = m.encoder({k: obs[k].flatten(0, 1) for k in self.fields}, prev.flatten()).view(B, T, -1)
        state = NetHackState(prev_action=prev[:, 0], hidden=hidden)
        valid = torch.ones_like(reset)
        y, out = m.core(m.mixer(x), reset, valid, state)
        return m.head(y), self.baseline(y).squeeze(-1), out["hidden"]

    def record(self) -> dict:
        """The checkpoint's model part: the policy as a BC checkpoint holds it (``trajdata eval`` plays
        it as one), the value head beside it."""
        return dict(family="nethack", model_config=asdict(self.cfg), model=self.policy.state_dict(),
                    baseline=self.baseline.state_dict())

    def load_record(self, ck: dict) -> None:
        self.policy.load_state_dict(ck["model"])
        self.baseline.load_state_dict(ck["baseline"])


class ActorStep(nn.Module):
    """One step of many envs for a TorchRL collector: sample an action from the agent's policy.

    Inputs (B, ...) are the env's observation fields, ``prev_action``, ``is_init`` and the LSTM
    state ``h``, ``c`` (B, L, h); with a ``teacher`` (a BC model kickstarting the learner) also its
    state ``th``, ``tc``. Outputs: ``action``, its log-probability ``logp`` and the next states
    (``("next", "h")`` ...); with a teacher, ``teacher_logp`` (B, A), the teacher's log-probabilities
    of the env's actions. The teacher is held outside the module's parameters: weight updates
    carry only the agent."""

    def __init__(self, agent: RLAgent, teacher: Teacher | None = None):
        super().__init__()
        self.agent = agent
        self._teacher = (teacher,) if teacher is not None else ()

    def in_keys(self) -> list[str]:
        return [*self.agent.fields, "prev_action", "is_init", "h", "c"] + (["th", "tc"] if self._teacher else [])

    def out_keys(self) -> list:
        keys = ["action", "logp", ("next", "h"), ("next", "c")]
        return keys + (["teacher_logp", ("next", "th"), ("next", "tc")] if self._teacher else [])

    @torch.no_grad()
    def forward(self, *args: Tensor):
        n = len(self.agent.fields)
        obs = {k: v[:, None] for k, v in zip(self.agent.fields, args[:n])}
        prev, is_init, h, c = args[n:n + 4]
        reset = is_init.reshape(-1, 1).bool()
        prev = prev.reshape(-1, 1)
        hidden = (h.transpose(0, 1).contiguous(), c.transpose(0, 1).contiguous())
        logits, _, (h, c) = self.agent.unroll(obs, prev, reset, hidden)
        logp_all = torch.log_softmax(logits[:, 0].float(), -1)
        action = torch.multinomial(logp_all.exp(), 1)[:, 0]
        out = (action, logp_all.gather(1, action[:, None])[:, 0], h.transpose(0, 1), c.transpose(0, 1))
        if self._teacher:
            th, tc = args[n + 4:n + 6]
            t_logp, (th, tc) = self._teacher[0].step(obs, prev, reset,
                                                     (th.transpose(0, 1).contiguous(), tc.transpose(0, 1).contiguous()))
            out += (t_logp, th.transpose(0, 1), tc.transpose(0, 1))
        return out


# ---- starting from a BC snapshot ------------------------------------------------------------------

PREV_ACTION_COLUMN = MAP_DIM + CROP_DIM + BOTTOM_DIM  # where the previous-action one-hot starts in the features


def bc_snapshot(path) -> tuple[dict, NetHackConfig]:
    """A BC checkpoint (file or run directory: its largest-budget snapshot) of the LSTM-core NetHack family."""
    from trajdata.train.checkpoint import load, resolve

    p = resolve(path)[0]
    ck = load(p)
    if ck.get("family") != "nethack":
        raise DataError(f"--init {path}: {p} is a {ck.get('family')!r} model; RL starts from a NetHack BC snapshot")
    try:
        cfg = NetHackConfig(**ck["model_config"])
    except (KeyError, TypeError) as e:
        raise DataError(f"--init {path}: {p} has no readable model config ({e})") from None
    if cfg.core != "lstm":
        raise DataError(f"--init {path}: {p} has a {cfg.core!r} core; RL starts from the LSTM-core BC family "
                        "(train bc --core lstm)")
    return dict(ck, path=str(p)), cfg


def action_index(bc_actions: list[int], rl_actions: list[int]) -> list[int]:
    """For each action of the RL env, the index of the same keypress in the BC model's action set."""
    where = {}
    for i, a in enumerate(bc_actions):
        where.setdefault(a, i)
    missing = [a for a in rl_actions if a not in where]
    if missing:
        raise DataError(f"the BC model's action set lacks keypress {missing[0]} of the RL env")
    return [where[a] for a in rl_actions]


def init_from_bc(agent: RLAgent, bc_state: dict, index: list[int]) -> None:
    """Load a BC policy's weights into ``agent.policy``, the action-indexed rows taken at ``index``
    (the policy head's rows and the mixer's previous-action columns); the value head is untouched."""
    state = dict(bc_state)
    idx = torch.tensor(index)
    n_bc = state["head.bias"].numel()
    state["head.weight"], state["head.bias"] = state["head.weight"][idx], state["head.bias"][idx]
    w = state["mixer.net.0.weight"]
    a = PREV_ACTION_COLUMN
    state["mixer.net.0.weight"] = torch.cat([w[:, :a], w[:, a:a + n_bc][:, idx], w[:, a + n_bc:]], 1)
    agent.policy.load_state_dict(state)


class Teacher:
    """A BC policy acting alongside an actor: its log-probabilities over the RL env's actions (its
    own logits at ``index``, renormalised), its LSTM state carried like the agent's."""

    def __init__(self, path: str, index: list[int]):
        from trajdata.train.checkpoint import build_model

        ck, cfg = bc_snapshot(path)
        self.model = build_model("nethack", asdict(cfg)).eval().requires_grad_(False)
        self.model.load_state_dict(ck["model"])
        self.index = torch.tensor(index)
        self.cfg = cfg
        self.fields = model_fields(cfg.use_inventory, cfg.use_glyphs)

    @torch.no_grad()
    def step(self, obs: dict[str, Tensor], prev: Tensor, reset: Tensor, hidden):
        m = self.model
        B, T = prev.shape
        prev = torch.where(prev >= 0, self.index[prev.clamp(min=0)], prev).masked_fill(reset, -1)
        x = m.encoder({k: obs[k].flatten(0, 1) for k in self.fields}, prev.flatten()).view(B, T, -1)
        y, out = m.core(m.mixer(x), reset, torch.ones_like(reset), NetHackState(prev_action=prev[:, 0], hidden=hidden))
        logits = m.head(y)[:, 0, self.index].float()
        return F.log_softmax(logits, -1), out["hidden"]
