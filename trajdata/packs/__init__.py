"""Packs: a dataset as what replays it exactly (seeds, settings, actions, step checks), about half a
byte per step, and back (``trajdata pack`` / ``unpack``; loaders stream a pack directly).

``store``: the on-disk layout; ``replay``: re-simulating episodes and checking each step;
``build``: ``pack`` and ``unpack``, shard by shard on the collection runner.
"""
