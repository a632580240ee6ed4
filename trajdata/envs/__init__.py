"""Environments every stage shares: NetHack (``envs.nethack``) and Atari (``envs.atari``) creation, seeding, frame stacking."""
