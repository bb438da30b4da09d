"""Streaming training loader: ``StrokeStream`` (a torch IterableDataset) and ``collate_strokes``.

The unit of work is a row group (256 rows by default, ~10 MB of strokes). Every epoch the row
groups of all files are put in one order drawn from ``(seed, epoch)``, dealt to the distributed
ranks and then to the DataLoader workers of each rank, so each row group is read by exactly one
worker of one rank: every row is served once per epoch and no file is read twice. A worker reads
its row groups one at a time (only the columns asked for, plus status/psnr for the filter) and
passes the rows through a bounded shuffle buffer, so memory is one row group plus ``buffer_size``
rows, whatever the folder's size.

Ranks are dealt row groups greedily by rows (each group goes to the rank with the fewest rows so
far), so their row counts differ by less than one row group; for DDP, where every rank must take
the same number of steps, bound the steps per epoch (e.g. ``len(stream) // (world_size * batch)``).

    stream = StrokeStream("OUT", min_psnr=20, rank=rank, world_size=world)   # defaults from torch.distributed
    loader = DataLoader(stream, batch_size=64, num_workers=4, collate_fn=collate_strokes)
    for epoch in range(epochs):
        stream.set_epoch(epoch)   # before iterating; picked up by non-persistent workers
        for batch in loader: ...
"""
from __future__ import annotations

import random

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.utils.rnn import pad_sequence
from torch.utils.data import IterableDataset, get_worker_info

from .columns import OK_ONLY, filter_columns, keep_mask, open_file, parquet_files, read_rows

DEFAULT_COLUMNS = ("key", "caption", "strokes", "background", "psnr")


def _deal(sizes: list[int], order: np.ndarray, parts: int) -> list[list[int]]:
    """Deal units (in ``order``) to ``parts`` parts, each to the part with the fewest rows so far."""
    dealt: list[list[int]] = [[] for _ in range(parts)]
    load = np.zeros(parts, dtype=np.int64)
    for unit in order:
        part = int(np.argmin(load))  # ties go to the lowest part: deterministic on every rank
        dealt[part].append(int(unit))
        load[part] += sizes[unit]
    return dealt


class StrokeStream(IterableDataset):
    """Rows of output Parquet files, streamed: dicts of the ``columns`` asked for (strokes as
    ``[N, 10]`` float32 tensors, fixed-size lists as tensors, the rest as Python values).

    source: folder, glob, file or list of them. statuses: statuses served (None: all; rows that
    failed have no strokes). min_psnr: drop rows below it. shuffle: row-group order and a
    ``buffer_size``-row shuffle buffer, both drawn from ``(seed, epoch)``; False reads in file
    order. rank / world_size: default to torch.distributed's when it is initialised, else 0 / 1.
    """

    def __init__(self, source, columns=DEFAULT_COLUMNS, min_psnr: float | None = None, statuses=OK_ONLY,
                 shuffle: bool = True, buffer_size: int = 1024, seed: int = 0, rank: int | None = None,
                 world_size: int | None = None):  # fmt: skip
        self.files = parquet_files(source)
        self.columns, self.min_psnr, self.statuses = list(columns), min_psnr, statuses
        self.shuffle, self.buffer_size, self.seed, self.epoch = shuffle, max(1, buffer_size), seed, 0
        distributed = dist.is_available() and dist.is_initialized()
        self.rank = rank if rank is not None else (dist.get_rank() if distributed else 0)
        self.world_size = world_size if world_size is not None else (dist.get_world_size() if distributed else 1)
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} not in [0, {self.world_size})")
        # (file, row group) units and their row counts, from the footers only: no data is read here.
        self._units: list[tuple[int, int]] = []
        self._sizes: list[int] = []
        for f, path in enumerate(self.files):
            meta = open_file(path).metadata
            for g in range(meta.num_row_groups):
                self._units.append((f, g))
                self._sizes.append(meta.row_group(g).num_rows)
        self._length: int | None = None

    def set_epoch(self, epoch: int) -> None:
        """Draw this epoch's order from ``(seed, epoch)``; call it before each epoch, on every rank."""
        self.epoch = epoch

    def __len__(self) -> int:
        """Rows served per epoch over all ranks (reads the status and psnr columns once)."""
        if self._length is None:
            need = filter_columns([], self.statuses, self.min_psnr)
            self._length = sum(int(keep_mask(open_file(p).read(columns=need), self.statuses, self.min_psnr).sum())
                               for p in self.files)  # fmt: skip
        return self._length

    def units(self, rank: int, worker: int = 0, workers: int = 1) -> list[tuple[int, int]]:
        """The (file, row group) units that ``worker`` of ``rank`` reads this epoch, in reading order."""
        rng = np.random.default_rng([self.seed, self.epoch])
        order = rng.permutation(len(self._units)) if self.shuffle else np.arange(len(self._units))
        mine = _deal(self._sizes, order, self.world_size)[rank]
        ours = _deal(self._sizes, np.array(mine, dtype=np.int64), workers)[worker] if mine else []
        return [self._units[u] for u in ours]

    def __iter__(self):
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        rng = random.Random(hash((self.seed, self.epoch, self.rank, worker)))
        handles: dict[int, object] = {}
        buffer: list[dict] = []
        for f, g in self.units(self.rank, worker, workers):
            if f not in handles:
                handles.clear()  # one open file at a time: units of a file are not adjacent when shuffled
                handles[f] = open_file(self.files[f])
            for row in read_rows(handles[f], g, self.columns, self.statuses, self.min_psnr):
                if not self.shuffle:
                    yield row
                    continue
                if len(buffer) < self.buffer_size:
                    buffer.append(row)
                    continue
                # Swap a random buffered row out for the new one: O(1), and the buffer stays full.
                i = rng.randrange(len(buffer))
                buffer[i], row = row, buffer[i]
                yield row
        rng.shuffle(buffer)
        yield from buffer


def collate_strokes(items: list[dict]) -> dict:
    """Batch rows of mixed stroke counts: strokes padded to the longest, with a mask.

    Returns ``strokes`` ``[B, L, 10]`` (zeros past each row's end), ``mask`` ``[B, L]`` (True on
    real strokes), ``lengths`` ``[B]``; other tensors stacked, numbers as tensors, and strings kept
    as lists in which a missing caption or url stays None (default_collate fails on those).
    """
    batch: dict = {}
    for name in items[0]:
        values = [item[name] for item in items]
        if name == "strokes":
            lengths = torch.tensor([len(v) for v in values], dtype=torch.int64)
            batch["strokes"] = pad_sequence(values, batch_first=True)
            batch["mask"] = torch.arange(batch["strokes"].shape[1])[None, :] < lengths[:, None]
            batch["lengths"] = lengths
        elif isinstance(values[0], torch.Tensor):
            batch[name] = torch.stack(values)
        elif all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
            batch[name] = torch.tensor(values)
        else:
            batch[name] = values
    return batch
