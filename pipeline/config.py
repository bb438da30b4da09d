"""Pipeline settings: the ``pipeline:`` section of a preset, plus flag overrides.

The encoder owns the ``encoder:`` section and the reading of presets
(``encoder.read_preset``: a packaged name such as ``cpu_small`` or a YAML
path); this module validates only ``pipeline:``, so each half of a preset is
checked by its owner and every bad value is one clear error before anything
starts.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import encoder

from .sources import Timeouts
from .writer import COLUMNS

DEFAULT_PRESET = "default"
CPU_PRESET = "cpu_small"
# Types a kept img2dataset .json field may have as its own column (pyarrow type names).
EXTRA_COLUMN_TYPES = ("float64", "int64", "string", "bool")


@dataclass
class PipelineConfig:
    # Images per fit_batch call: the unit of GPU work (docs/architecture.md, performance shape).
    batch_size: int = 16
    # Extra attempts for a shard whose task raised or whose actor died.
    max_retries: int = 2
    # Threads decoding images inside each worker (PIL releases the GIL while decoding).
    reader_threads: int = 2
    # Decoded batches waiting for the fit; bounds a worker's memory while hiding decode time.
    prefetch_batches: int = 2
    # Shards a worker holds at once. Their fits take turns on its device; with 2 the next shard
    # decodes its first batches while this one fits and commits, so the device does not wait at
    # shard boundaries. Each held shard queues up to prefetch_batches decoded batches.
    shards_per_worker: int = 2
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
    # Ray: seconds between looks at the cluster for nodes that joined (more GPUs: more workers)
    # and for room to replace workers lost with a node.
    cluster_check_interval: float = 10.0
    # Ray: seconds a new worker may take to come up (import torch, CUDA, runtime env) before its
    # slot is given up; also how long a run waits with no worker at all before failing its shards.
    worker_start_timeout: float = 300.0
    # Sample error messages kept per shard in its stats file.
    max_error_messages: int = 50
    # A tar member larger than this is not read: its sample becomes a too_large row. Bounds a
    # worker's memory against a huge caption or image member (the pixel limit needs the bytes first).
    max_member_bytes: int = 128 * 1024 * 1024
    # Fields of img2dataset's per-sample .json to keep as typed columns of their own, e.g.
    # {AESTHETIC_SCORE: float64, pwatermark: float64} for LAION; the rest stay in the extra column.
    # Every file of a folder must share one schema, so this is set per run, not found per shard.
    extra_columns: dict = dataclasses.field(default_factory=dict)
    # Remote shards (http(s), pipe:): seconds to connect (or start the command), and seconds any one
    # read may wait for data. A stalled source fails the attempt within them.
    connect_timeout: float = 30.0
    read_timeout: float = 60.0

    def __post_init__(self) -> None:
        encoder.check_field_types(self, "pipeline")
        for name, kind in self.extra_columns.items():
            if not isinstance(name, str) or kind not in EXTRA_COLUMN_TYPES:
                raise ValueError(f"pipeline.extra_columns maps .json field names to one of "
                                 f"{', '.join(EXTRA_COLUMN_TYPES)}, got {name!r}: {kind!r}")  # fmt: skip
            if name in COLUMNS:  # a second column of that name: every shard's file would be refused
                raise ValueError(f"pipeline.extra_columns: {name!r} is a column of the output already")
        at_least_one = ("batch_size", "reader_threads", "prefetch_batches", "shards_per_worker", "row_group_size",
                        "workers", "cpus_per_worker", "max_image_pixels", "min_image_side", "max_error_messages",
                        "max_member_bytes")  # fmt: skip
        for name in at_least_one:
            if getattr(self, name) < 1:
                raise ValueError(f"pipeline.{name} must be >= 1, got {getattr(self, name)}")
        if self.shards_per_worker > 8:
            raise ValueError(f"pipeline.shards_per_worker must be <= 8 (each holds decoded batches), "
                             f"got {self.shards_per_worker}")
        if self.max_retries < 0:
            raise ValueError(f"pipeline.max_retries must be >= 0, got {self.max_retries}")
        if self.num_cpus is not None and self.num_cpus < 1:
            raise ValueError(f"pipeline.num_cpus must be >= 1 or null, got {self.num_cpus}")
        if self.object_store_memory is not None and self.object_store_memory < 78 * 1024 * 1024:
            raise ValueError("pipeline.object_store_memory must be null or at least 78 MiB (Ray's minimum)")
        if not 0 < self.dashboard_port < 65536:
            raise ValueError(f"pipeline.dashboard_port must be a TCP port, got {self.dashboard_port}")
        for name in ("progress_interval", "cluster_check_interval", "worker_start_timeout", "connect_timeout",
                     "read_timeout"):
            if not 0 < getattr(self, name) < float("inf"):
                raise ValueError(f"pipeline.{name} must be > 0 seconds (and finite), got {getattr(self, name)}")
        if not self.dashboard_host:
            raise ValueError("pipeline.dashboard_host must not be empty")

    def timeouts(self) -> Timeouts:
        return Timeouts(connect=self.connect_timeout, read=self.read_timeout)


PIPELINE_KEYS = tuple(f.name for f in dataclasses.fields(PipelineConfig))


def load_pipeline_config(preset: str | Path | None = None, **overrides) -> PipelineConfig:
    """Read the ``pipeline:`` section of a preset (name or path) and apply ``overrides`` (None values are ignored).

    Unknown keys raise ValueError: a misspelt knob silently ignored costs a whole run.
    """
    section = encoder.read_preset(preset).get("pipeline") or {}
    values = {**section, **{k: v for k, v in overrides.items() if v is not None}}
    unknown = sorted(set(values) - set(PIPELINE_KEYS))
    if unknown:
        raise ValueError(f"unknown pipeline config keys {unknown}; known: {list(PIPELINE_KEYS)}")
    return PipelineConfig(**values)
