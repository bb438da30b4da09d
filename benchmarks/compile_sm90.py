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
FWD = dict(S=P, PREPARED=P, BASE=P, TARGET=P, CANVAS=P, LOSS=P, N="i32", H="i32", W="i32", inv_h="fp32",
           loss_scale="fp32", LOSS_KIND="constexpr", HAS_TARGET="constexpr", BH="constexpr", BW="constexpr",
           FAST="constexpr")
BWD = dict(S=P, PREPARED=P, BASE=P, TARGET=P, CANVAS=P, GRAD_LOSS=P, GRAD_S=P, GRAD_BASE=P, N="i32", H="i32",
           W="i32", inv_h="fp32", loss_scale="fp32", unblend_limit="fp32", LOSS_KIND="constexpr",
           BASE_GRAD="constexpr", BH="constexpr", BW="constexpr", FAST="constexpr")
PREPARE = dict(S=P, PREPARED=P, total="i32", cull_opacity="fp32", BLOCK="constexpr")
HITS = dict(PREPARED=P, HITS="*i8", N="i32", H="i32", W="i32", inv_h="fp32", BH="constexpr", BW="constexpr")
ADAM = dict(P=P, G=P, M=P, V=P, LR=P, LO=P, HI=P, n="i32", b1="fp32", b2="fp32", bias1="fp32", bias2="fp32",
            eps="fp32", FIELDS="constexpr", BLOCK="constexpr")

triton.compile(ASTSource(tr._prepare_kernel, PREPARE, dict(BLOCK=256)), target=TARGET, options={"num_warps": 4})
for bh, bw, warps, _ in tr.TILES:
    for kind in (0, 1, 2):
        for has_target in (True, False):
            consts = dict(LOSS_KIND=kind, HAS_TARGET=has_target, BH=bh, BW=bw, FAST=True)
            triton.compile(ASTSource(tr._forward_kernel, FWD, consts), target=TARGET, options={"num_warps": warps})
        consts = dict(LOSS_KIND=kind, BASE_GRAD=True, BH=bh, BW=bw, FAST=True)
        triton.compile(ASTSource(tr._backward_kernel, BWD, consts), target=TARGET, options={"num_warps": warps})
    triton.compile(ASTSource(triton_debug._tile_hits_kernel, HITS, dict(BH=bh, BW=bw)), target=TARGET,
                   options={"num_warps": warps})
    print(f"tile {bh}x{bw} on {warps} warps: forward, backward (every loss) and culling compile for sm_90")
triton.compile(ASTSource(optim._adam_kernel, ADAM, dict(FIELDS=10, BLOCK=1024)), target=TARGET, options={"num_warps": 2})
print("prepare and fused Adam step compile for sm_90")
