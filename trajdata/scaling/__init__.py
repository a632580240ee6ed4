"""Scaling-law fits over a runs table (params, samples, FLOPs, loss, return): isoFLOP profiles,
parametric fits, return-vs-loss, forecasts and an HTML report.

``REFERENCE_RUNS`` holds the paper authors' released runs tables (package data): the NetHack
isoFLOP runs a sweep's report is fitted beside, and the Atari ones."""
from pathlib import Path

from trajdata.scaling.fits import FitConfig, fit_all
from trajdata.scaling.forecast import forecast
from trajdata.scaling.runs import Runs, load_runs

REFERENCE_RUNS = Path(__file__).resolve().parent / "reference"

__all__ = ["FitConfig", "REFERENCE_RUNS", "Runs", "fit_all", "forecast", "load_runs"]
