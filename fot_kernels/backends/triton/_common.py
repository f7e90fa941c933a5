"""Device helpers shared by the Triton kernels (see README.md beside this file for the math).

Packed top-k keys: an fp32 score s and a slot index m (0 <= m < 2**32) are packed into one int64
whose signed order is the contract's order (score descending, then index ascending):

    key = (ord32(s) << 32) | (0xFFFFFFFF - m),   ord32(s) = bits(s) ^ ((bits(s) >> 31) & 0x7FFFFFFF)

``ord32`` maps fp32 bit patterns to int32 monotonically (negative floats have all but the sign
bit flipped). Only finite scores are packed (NaN and +-inf scores are never candidates).
Non-candidates get ``EMPTY = INT64_MIN``, below every real key (ord32 of any float > INT32_MIN), so
they sort last and unpack as (-inf, -1).
"""

from __future__ import annotations

import triton
import triton.language as tl

EMPTY_KEY = tl.constexpr(-(2**63))


@triton.jit
def finite(x):
    """float [...] -> bool [...]: x is neither NaN nor +-inf (NaN compares false). Scores failing it
    are dropped everywhere (docs/DESIGN.md 3.2): one abs and one compare per score, no extra pass."""
    return tl.abs(x) < float("inf")


@triton.jit
def pack_keys(s, idx):
    """s fp32 [...] (finite; -0.0 is folded to +0.0 so that equal scores tie on the index),
    idx int32/int64 [...] slot numbers -> int64 keys [...]."""
    s = tl.where(s == 0.0, 0.0, s)
    bits = s.to(tl.int32, bitcast=True)
    ordered = bits ^ ((bits >> 31) & 0x7FFFFFFF)
    low = 0xFFFFFFFF - idx.to(tl.int64)
    return (ordered.to(tl.int64) << 32) | low


@triton.jit
def unpack_keys(key):
    """int64 keys [...] -> (score fp32 [...], index int64 [...]); EMPTY_KEY -> (-inf, -1)."""
    empty = key == EMPTY_KEY
    ordered = (key >> 32).to(tl.int32)
    bits = ordered ^ ((ordered >> 31) & 0x7FFFFFFF)
    score = bits.to(tl.float32, bitcast=True)
    index = 0xFFFFFFFF - (key & 0xFFFFFFFF)
    score = tl.where(empty, float("-inf"), score)
    index = tl.where(empty, -1, index)
    return score, index


@triton.jit
def merge_topk(run, cand, K: tl.constexpr):
    """run: int64 [BM, K] sorted descending; cand: int64 [BM, BN] (any order, BN >= K).
    Returns the K largest of both, sorted descending (bitonic: max(run, reversed(top_K(cand))) is a
    bitonic sequence holding the K largest, one bitonic merge sorts it)."""
    top = tl.topk(cand, K, dim=1)  # [BM, K] descending
    both = tl.maximum(run, tl.flip(top, 1))
    return tl.bitonic_merge(both, 1, descending=True)


@triton.jit
def tile_dot(a, b, acc, FP32: tl.constexpr, INTERPRET: tl.constexpr):
    """acc + a @ b with fp32 accumulation.

    FP32: the operands differ in dtype or are fp32: both are converted per tile (never the whole
    tensor) and multiplied on the tensor cores with 3xTF32 (hi/lo split, about fp32 accuracy; bf16
    and fp16 values are exact in TF32 so a bf16 operand adds no error). Otherwise a native
    fp16/bf16 tensor-core product. INTERPRET is only set under TRITON_INTERPRET=1, whose numpy dot
    cannot multiply bf16: there the tiles are widened to fp32 first, which gives the same products
    (bf16 x bf16 is exact in fp32) and keeps the GPU path untouched.
    """
    if INTERPRET:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    elif FP32:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="tf32x3")
    else:
        return tl.dot(a, b, acc)
