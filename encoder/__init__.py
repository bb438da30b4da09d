"""PainterBot encoder: images -> strokes. Knows nothing of shards, Ray or Parquet.

This module is the encoder's only door: the pipeline, the command line and
users import from here, never from the submodules. Public API::

    from encoder import load_config, fit_batch, render          # fit and paint
    from encoder import STROKE_FIELDS, stroke_bounds, validate_strokes, load_seed_checkpoint
    from encoder import load_image, center_crop_resize, pil_to_tensor, tensor_to_pil, psnr
    from encoder import read_preset, preset_names, parse_overrides, check_field_types   # presets, config
"""
from .config import FitConfig, check_field_types, load_config, parse_overrides, preset_names, read_preset
from .fit import FitResult, fit_batch
from .images import ImageError, center_crop_resize, load_image, pil_to_tensor, psnr, tensor_to_pil
from .renderer import loss_and_grad, render, resolve_backend, resolve_device
from .strokes import FIELDS as STROKE_FIELDS
from .strokes import StrokeError, load_seed_checkpoint, random_strokes
from .strokes import bounds as stroke_bounds
from .strokes import validate as validate_strokes

__all__ = [
    "FitConfig", "FitResult", "ImageError", "STROKE_FIELDS", "StrokeError", "center_crop_resize",
    "check_field_types", "fit_batch", "load_config", "load_image", "load_seed_checkpoint", "loss_and_grad",
    "parse_overrides", "pil_to_tensor", "preset_names", "psnr", "random_strokes", "read_preset", "render",
    "resolve_backend", "resolve_device", "stroke_bounds", "tensor_to_pil", "validate_strokes",
]
