"""Policy evaluation: rolling out BC policies and experts (``trajdata eval``).

    from trajdata.evaluate import EvalConfig, evaluate
    docs = evaluate("runs/nh-64x1", EvalConfig(episodes=100, max_steps=10_000, workers=2))
    docs[0]["summary"]  # {"mean", "se", "median", "q1", "q3", "episodes", ...}; written to RUN/eval/<snapshot>.json
"""
from trajdata.evaluate.config import EvalConfig


def evaluate(target, cfg: EvalConfig, progress: bool = True) -> list[dict]:
    """Evaluate a run's snapshot(s), a checkpoint, or an expert (see ``trajdata.evaluate.runner``)."""
    from trajdata.evaluate.runner import evaluate as run

    return run(target, cfg, progress)


__all__ = ["EvalConfig", "evaluate"]
