"""Reinforcement learning (``trajdata train rl``): IMPALA on NetHack with TorchRL, the paper's agent with an
LSTM core, budget snapshots at C = 8ND, optionally started from (and kickstarted toward) a BC snapshot.

    from trajdata.rl import RLConfig, train
    train(RLConfig(out="runs/rl-100k", params="100k", budgets=(1e13, 2e13), actors=2))
"""
from trajdata.rl.config import RLConfig


def train(cfg: RLConfig, stop_after: int | None = None) -> dict:
    """Train (or resume) the RL run ``cfg.out`` (see ``trajdata.rl.train``)."""
    from trajdata.rl.train import train as run

    return run(cfg, stop_after)


__all__ = ["RLConfig", "train"]
