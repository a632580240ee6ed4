"""Loaders: streaming (B, T) batches for behavioural cloning (see ``stream``).

    from trajdata.loaders import LoaderConfig, make_dataloader
    loader = make_dataloader(LoaderConfig("data/nethack", fields=("tty_chars", "action"), batch_size=32,
                                          seq_len=4096, mode="lanes", split="train"), num_workers=2)
    for batch in loader:          # dict of (B, T, ...) tensors + mask / reset / episode / step
        ...
        ckpt = loader.state_dict()  # later: loader.load_state_dict(ckpt) continues mid-epoch
"""
from trajdata.loaders.stream import (
    LoaderConfig,
    StreamLoader,
    TrajectoryStream,
    make_dataloader,
    select_episodes,
    val_hash,
)

__all__ = ["LoaderConfig", "StreamLoader", "TrajectoryStream", "make_dataloader", "select_episodes", "val_hash"]
