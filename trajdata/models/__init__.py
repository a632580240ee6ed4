"""Behavioural-cloning policies: the paper's NetHack agent and Atari CNN, their sizes and FLOPs."""
from trajdata.models.atari import AtariConfig, AtariModel
from trajdata.models.flops import (effective_params, flops_per_sample, measured_flops_per_sample,
                                   total_flops_per_sample, training_flops)
from trajdata.models.nethack import NetHackConfig, NetHackModel, NetHackState
from trajdata.models.sizes import (ATARI_WIDTHS, NETHACK_GRID, nethack_grid, parse_count,
                                   size_for_params)

__all__ = [
    "AtariConfig", "AtariModel", "NetHackConfig", "NetHackModel", "NetHackState",
    "effective_params", "flops_per_sample", "measured_flops_per_sample", "total_flops_per_sample", "training_flops",
    "ATARI_WIDTHS", "NETHACK_GRID", "nethack_grid", "parse_count", "size_for_params",
]
