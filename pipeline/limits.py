"""Sizes and counts against what this machine can hold, before any work: ``check_limits``.

A config can be valid field by field and still ask for what no machine has: 10^9 strokes, a
100,000-pixel side, a batch of 10^8 images, a million local CPUs or reader threads. Each of those
used to hang, or fill memory for minutes, before failing. Here each is one ``ValueError`` naming
the setting (its flag), what it would need and what there is, before Ray starts or the folder is
locked.

The decoded batches a worker queues for the fit (``queued_bytes``, pinned host memory on a GPU
machine: two shards held at B = 128 and 512 px hold up to 2.4 GB per worker) are compared with the
RAM available now.

The memory of a fit is estimated from its shapes (``fit_bytes``): the targets and their pyramid,
the canvases of a step, the per-tile stroke lists of binned launches and the optimiser's state.
The estimate errs high by design (the default preset at B = 128 estimates 6.2 GB against 5.2 GiB, 5.6 GB,
measured, benchmarks/RESULTS.md) and is compared with the GPU's memory for a local GPU run, or
with the RAM available now for CPU workers (each holds its own batch).
"""
from __future__ import annotations

import os

# Canvas-sized float32 buffers alive during a step, per image: target, its pyramid levels, base,
# canvas, gradients, the graphs' private copies.
_CANVASES = 14
_MAX_SEED = 2**63 - 1  # torch.Generator.manual_seed takes a signed 64-bit value
MAX_READER_THREADS = 256  # decoding threads per worker: beyond this they only contend


def fit_bytes(batch: int, size: int, strokes: int) -> int:
    """An upper estimate of the memory one ``fit_batch`` call of ``batch`` images holds."""
    pixels = size * size
    canvases = _CANVASES * 3 * pixels * 4
    lists = (pixels // 128 + 1) * strokes * (2 if strokes <= 32767 else 4)  # 16 x 8 tiles, int16 indices
    optimiser = strokes * 10 * 4 * 8  # strokes, moments, gradients, copies
    return batch * (canvases + lists + optimiser)


def queued_bytes(cfg, size: int) -> int:
    """Host memory of the decoded batches one worker holds: for each shard it holds
    (``shards_per_worker``), ``prefetch_batches`` queued and one in hand, float32 at ``size``."""
    return (cfg.prefetch_batches + 1) * cfg.shards_per_worker * cfg.batch_size * 3 * size * size * 4


def _available_ram() -> int | None:
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _gpu_bytes() -> int | None:
    """The smallest GPU's memory. Its size, not what is free: asking what is free would open a CUDA
    context on every GPU in the driver, memory the workers then lack for the whole run."""
    import torch

    if not torch.cuda.is_available():
        return None
    return min(torch.cuda.get_device_properties(i).total_memory for i in range(torch.cuda.device_count()))


def _gib(n: int) -> str:
    return f"{n / 2**30:.1f} GiB"


def check_limits(fit_config, cfg, device: str, local: bool, workers: int | None = None) -> None:
    """Raise ValueError for the first setting this machine cannot hold (see the module).

    ``local``: the run starts its own Ray or none (the cluster's machines are not known here).
    ``workers``: CPU workers that will share this machine's RAM (``--gpus 0``).
    """
    cpus = os.cpu_count() or 1
    batch, size, strokes = cfg.batch_size, fit_config.size, fit_config.strokes
    if not 0 <= fit_config.seed <= _MAX_SEED - batch:
        raise ValueError(f"--seed {fit_config.seed}: must be in [0, 2**63 - 1 - batch size] (image i of a batch "
                         "draws from seed + i)")
    if cfg.reader_threads > MAX_READER_THREADS:
        raise ValueError(f"--reader-threads {cfg.reader_threads}: at most {MAX_READER_THREADS} decoding threads "
                         f"per worker (this machine has {cpus} CPUs)")
    if local and cfg.num_cpus is not None and cfg.num_cpus > cpus:
        raise ValueError(f"--num-cpus {cfg.num_cpus}: this machine has {cpus} CPUs")
    if local and workers is not None and workers > max(cpus, cfg.num_cpus or 0):
        raise ValueError(f"--workers {workers}: this machine has {cpus} CPUs (one worker needs at least one)")
    per_fit = fit_bytes(batch, size, strokes)
    if device.startswith("cuda"):
        if not local:
            return  # the GPUs are on the cluster's machines, not known here
        have, where, count = _gpu_bytes(), "of GPU memory", 1
    else:
        have, where, count = _available_ram(), "of RAM available", max(1, workers or 1)
    if have is not None and per_fit * count > have:
        each = f" per worker, {count} workers" if count > 1 else ""
        raise ValueError(f"--batch-size {batch} x --size {size} x --strokes {strokes}: a fit needs about "
                         f"{_gib(per_fit)}{each}; {_gib(have)} {where}: lower the batch size, the size or the strokes")
    ram = _available_ram()
    if local and ram is not None:
        import torch

        count = max(1, torch.cuda.device_count()) if device.startswith("cuda") else max(1, workers or 1)
        queued = queued_bytes(cfg, size)
        if queued * count > ram:
            each = f" per worker, {count} workers" if count > 1 else ""
            raise ValueError(f"pipeline.prefetch_batches {cfg.prefetch_batches} x pipeline.shards_per_worker "
                             f"{cfg.shards_per_worker} x --batch-size {batch} x --size {size}: the decoded batches "
                             f"waiting for the fit need about {_gib(queued)}{each}; {_gib(ram)} of RAM available")
    decode = cfg.reader_threads * min(cfg.max_image_pixels, 1 << 28) * 4  # a decoded image per thread
    if ram is not None and decode > ram:
        raise ValueError(f"--reader-threads {cfg.reader_threads} x --max-image-pixels {cfg.max_image_pixels}: "
                         f"decoding may hold {_gib(decode)}, {_gib(ram)} of RAM available")
