"""Diagnostics of the Triton renderer, used by tests and benchmarks only.

Production code (the fit, the CLI, the pipeline) does not import this module;
it exposes the renderer's culling decision, which the renderer itself only
acts on.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .triton_render import PREP, _grid, _reach, _tile, prepare


@triton.jit
def _tile_hits_kernel(PREPARED, HITS, N, H, W, inv_h, BH: tl.constexpr, BW: tl.constexpr):
    b, img, plane, mask, xs, ys, x0, x1, y0, y1 = _tile(H, W, inv_h, BH, BW)
    tiles = tl.num_programs(0)
    for j in range(N):
        hit = _reach(PREPARED + (b * N + j) * PREP, x0, x1, y0, y1)
        tl.store(HITS + (b * N + j) * tiles + tl.program_id(0), hit.to(tl.int8))


def tile_hits(strokes: torch.Tensor, height: int, width: int, tile: tuple[int, int]) -> torch.Tensor:
    """Which tiles each stroke is painted on: bool ``[B, N, tiles]``, tiles in row-major order.

    The culling decision itself, for tests of its soundness and for the
    benchmark's account of the work culling saves.
    """
    bsz, n = strokes.shape[:2]
    grid = _grid(bsz, height, width, tile)
    hits = torch.zeros(bsz, n, grid[0], dtype=torch.int8, device=strokes.device)
    _tile_hits_kernel[grid](prepare(strokes), hits, n, height, width, 1.0 / height, BH=tile[0], BW=tile[1])
    return hits.bool()


def listed_pixels(bins, n: int, height: int, width: int) -> torch.Tensor:
    """Where each stroke may paint under ``bins`` (``triton_render.bin_strokes``): ``[B, N, H, W]``, 1.0 on
    the pixels of every tile whose list holds the stroke, else 0.0, as float64 for the reference's ``mask``.

    A binned launch paints a listed stroke over its whole tile and nothing else, so the reference with this
    mask is the painting such a launch makes, also with lists kept from earlier stroke parameters.
    """
    tile = bins.tile
    bsz, tiles = bins.counts.shape
    tiles_w = -(-width // tile[1])
    listed = torch.zeros(bsz, n, tiles, dtype=torch.float64)
    counts, lists = bins.counts.cpu(), bins.lists.cpu().long()
    for i in range(bsz):
        for t in range(tiles):
            listed[i, lists[i, t, : counts[i, t]], t] = 1.0
    # [B, N, tile rows, tile cols] -> every pixel of each tile, cropped to the canvas
    grid = listed.reshape(bsz, n, -(-height // tile[0]), tiles_w)
    pixels = grid.repeat_interleave(tile[0], dim=2).repeat_interleave(tile[1], dim=3)
    return pixels[:, :, :height, :width].contiguous()
