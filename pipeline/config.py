"""Pipeline settings: the ``pipeline:`` section of a config YAML, plus flag overrides.

The encoder owns the ``encoder:`` section (``encoder.load_config`` reads it);
this module reads only ``pipeline:``, so the two halves of a preset can evolve
independently and an unknown key in either is caught by its owner.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import yaml

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CONFIG = REPO_ROOT / "configs" / "default.yaml"
CPU_CONFIG = REPO_ROOT / "configs" / "cpu_small.yaml"


@dataclass
class PipelineConfig:
    # Images per fit_batch call: the unit of GPU work (DESIGN.md, performance shape).
    batch_size: int = 16
    # Extra attempts for a shard whose task raised or whose actor died.
    max_retries: int = 2
    # Threads decoding images inside each worker (PIL releases the GIL while decoding).
    reader_threads: int = 2
    # Decoded batches waiting for the fit; bounds a worker's memory while hiding decode time.
    prefetch_batches: int = 2
    # Refuse images above this many pixels before decoding them (decompression bombs).
    max_image_pixels: int = 100_000_000
    # Refuse images whose short side is below this: upscaling them would paint blur.
    min_image_side: int = 16
    # Let libjpeg decode at a reduced scale (DCT scaling) that still covers the fit size:
    # large JPEGs then decode several times faster, for a tiny change of the target.
    jpeg_draft: bool = True
    # Rows per Parquet row group: what the writer buffers and the loader reads at once.
    row_group_size: int = 256
    # CPU actors when no GPU is used (--workers).
    workers: int = 1
    # CPUs reserved per actor (decode threads and the writer need a core next to the GPU).
    cpus_per_worker: int = 1
    # Local Ray only: CPUs to offer (null = all of them).
    num_cpus: int | None = None
    # Local Ray only: object store bytes (null = Ray's default); results are tiny stats dicts.
    object_store_memory: int | None = None
    include_dashboard: bool = True
    # The dashboard binds to loopback unless asked otherwise: it has no authentication.
    dashboard_host: str = "127.0.0.1"
    dashboard_port: int = 8265
    # Seconds between progress polls of the workers.
    progress_interval: float = 0.5
    # Sample error messages kept per shard in its stats file.
    max_error_messages: int = 50


PIPELINE_KEYS = tuple(f.name for f in dataclasses.fields(PipelineConfig))


def read_yaml(path: str | Path | None) -> dict:
    """The whole YAML document of a preset (empty dict when path is None)."""
    if path is None:
        return {}
    with open(path, encoding="utf-8") as handle:
        data = yaml.safe_load(handle) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: a config must be a mapping with 'encoder:' and 'pipeline:' sections")
    return data


def load_pipeline_config(path: str | Path | None = None, **overrides) -> PipelineConfig:
    """Read the ``pipeline:`` section of ``path`` and apply ``overrides`` (None values are ignored).

    Unknown keys raise ValueError: a misspelt knob silently ignored costs a whole run.
    """
    section = read_yaml(path).get("pipeline") or {}
    if not isinstance(section, dict):
        raise ValueError(f"{path}: 'pipeline:' must be a mapping")
    values = {**section, **{k: v for k, v in overrides.items() if v is not None}}
    unknown = sorted(set(values) - set(PIPELINE_KEYS))
    if unknown:
        raise ValueError(f"unknown pipeline config keys {unknown}; known: {list(PIPELINE_KEYS)}")
    config = PipelineConfig(**values)
    if config.batch_size < 1:
        raise ValueError("pipeline.batch_size must be >= 1")
    if config.max_retries < 0:
        raise ValueError("pipeline.max_retries must be >= 0")
    if config.reader_threads < 1 or config.prefetch_batches < 1 or config.row_group_size < 1:
        raise ValueError("pipeline.reader_threads, prefetch_batches and row_group_size must be >= 1")
    return config
