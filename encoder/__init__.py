"""PainterBot encoder: images -> strokes. Knows nothing of shards, Ray or Parquet.

Public API::

    from encoder import FitConfig, load_config, fit_batch, render
"""
from .config import FitConfig, load_config
from .fit import FitResult, fit_batch
from .renderer import render

__all__ = ["FitConfig", "FitResult", "fit_batch", "load_config", "render"]
