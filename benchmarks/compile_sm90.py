"""Compile every Triton kernel for an H100 (sm_90) on a machine without a GPU.

    python benchmarks/compile_sm90.py

Catches type and lowering errors that the interpreter (TRITON_INTERPRET=1,
used by the tests) lets through, at no GPU time. Needs a Triton with the
CUDA backend (the Linux wheel bundles ptxas).
"""
import sys
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from encoder import optim, triton_debug, triton_render as tr  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)
P = "*fp32"
FWD = dict(S=P, PREPARED=P, LIST=P, COUNT=P, BASE=P, TARGET=P, CANVAS=P, LOSS=P, N="i32", H="i32", W="i32", inv_h="fp32",
           loss_scale="fp32", LOSS_KIND="constexpr", HAS_TARGET="constexpr", BINNED="constexpr", BH="constexpr",
           BW="constexpr", FAST="constexpr")
BWD = dict(S=P, PREPARED=P, LIST=P, COUNT=P, BASE=P, TARGET=P, CANVAS=P, GRAD_LOSS=P, GRAD_S=P, GRAD_BASE=P, N="i32", H="i32",
           W="i32", inv_h="fp32", loss_scale="fp32", unblend_limit="fp32", LOSS_KIND="constexpr",
           BASE_GRAD="constexpr", BINNED="constexpr", BH="constexpr", BW="constexpr", FAST="constexpr")
# A binned launch passes the tile lists (int16 stroke indices and int32 counts); an unbinned one any pointer.
LISTED = dict(LIST="*i16", COUNT="*i32")
BIN = dict(PREPARED=P, SOURCE="*i16", SOURCE_COUNT="*i32", LIST="*i16", COUNT="*i32", N="i32", H="i32", W="i32",
           inv_h="fp32", BH="constexpr", BW="constexpr", COARSE_ROWS="constexpr", COARSE_COLS="constexpr",
           FROM_COARSE="constexpr", BLOCK="constexpr")
PREPARE = dict(S=P, PREPARED=P, total="i32", cull_opacity="fp32", BLOCK="constexpr")
HITS = dict(PREPARED=P, HITS="*i8", N="i32", H="i32", W="i32", inv_h="fp32", BH="constexpr", BW="constexpr")
ADAM = dict(P=P, G=P, M=P, V=P, LR=P, LO=P, HI=P, n="i32", b1="fp32", b2="fp32", bias1="fp32", bias2="fp32",
            eps="fp32", scale="fp32", FIELDS="constexpr", BLOCK="constexpr")

triton.compile(ASTSource(tr._prepare_kernel, PREPARE, dict(BLOCK=256)), target=TARGET, options={"num_warps": 4})
tiles = [(bh, bw, warps) for bh, bw, warps, _ in (*tr.TILES, tr.BIN_SMALL_TILE)]
for bh, bw, warps in tiles:
    for binned in (False, True):
        fwd, bwd = (dict(FWD, **LISTED), dict(BWD, **LISTED)) if binned else (FWD, BWD)
        for kind in (0, 1) if binned else (0, 1, 2):  # the prefix loss is never binned
            for has_target in (True, False):
                consts = dict(LOSS_KIND=kind, HAS_TARGET=has_target, BINNED=binned, BH=bh, BW=bw, FAST=True)
                triton.compile(ASTSource(tr._forward_kernel, fwd, consts), target=TARGET, options={"num_warps": warps})
            consts = dict(LOSS_KIND=kind, BASE_GRAD=True, BINNED=binned, BH=bh, BW=bw, FAST=True)
            triton.compile(ASTSource(tr._backward_kernel, bwd, consts), target=TARGET, options={"num_warps": warps})
    # One level (every stroke tested), and the second level of two (the coarse tile's list tested).
    for coarse in ((1, 1, False), (tr.COARSE_TILE_PIXELS // bh, tr.COARSE_TILE_PIXELS // bw, True)):
        consts = dict(BH=bh, BW=bw, COARSE_ROWS=coarse[0], COARSE_COLS=coarse[1], FROM_COARSE=coarse[2],
                      BLOCK=tr._BIN_BLOCK)
        triton.compile(ASTSource(tr._bin_kernel, BIN, consts), target=TARGET, options={"num_warps": 4})
    triton.compile(ASTSource(triton_debug._tile_hits_kernel, HITS, dict(BH=bh, BW=bw)), target=TARGET,
                   options={"num_warps": warps})
    print(f"tile {bh}x{bw} on {warps} warps: forward, backward (every loss, walked and binned), binning (one and two levels) and culling "
          "compile for sm_90")
triton.compile(ASTSource(optim._adam_kernel, ADAM, dict(FIELDS=10, BLOCK=1024)), target=TARGET, options={"num_warps": 2})
print("prepare and fused Adam step compile for sm_90")
