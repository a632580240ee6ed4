"""trajdata: expert trajectories to datasets to imitation-learning scaling laws."""
__version__ = "0.1.0"
