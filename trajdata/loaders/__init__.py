"""Loaders: streaming (B, T) batches for behavioural cloning (see ``stream``)."""
from trajdata.loaders.stream import (
    LoaderConfig,
    StreamLoader,
    TrajectoryStream,
    make_dataloader,
    select_episodes,
    val_hash,
)

__all__ = ["LoaderConfig", "StreamLoader", "TrajectoryStream", "make_dataloader", "select_episodes", "val_hash"]
