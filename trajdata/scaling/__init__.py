"""Scaling-law fits over a runs table (params, samples, FLOPs, loss, return): isoFLOP profiles,
parametric fits, return-vs-loss, forecasts and an HTML report."""
from trajdata.scaling.fits import FitConfig, fit_all
from trajdata.scaling.forecast import forecast
from trajdata.scaling.runs import Runs, load_runs

__all__ = ["FitConfig", "Runs", "fit_all", "forecast", "load_runs"]
